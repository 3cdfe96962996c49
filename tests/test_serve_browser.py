"""The chat page in a real browser: headless Chromium (Debian's) driven by Playwright.

Needs /usr/bin/chromium (`apt-get install chromium`); `playwright install` is never used, so the
test runs offline. The screenshot path is printed (see it with `pytest -s`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scratchgpt.checkpoint import load_any
from scratchgpt.inference.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found; install Debian's browser with `apt-get install chromium`"
)


def _slow_forward(module, args, kwargs):
    time.sleep(0.03)  # ~30 tokens/s, so the answer visibly streams in


@pytest.fixture(scope="module")
def page_url(tiny_chat_checkpoint, start_server) -> str:
    pytest.importorskip("fastapi")
    model, tok = load_any(tiny_chat_checkpoint)
    model.register_forward_pre_hook(_slow_forward, with_kwargs=True)
    return start_server(create_app(model, tok, model_name="tiny"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_chat_page_streams_an_answer(browser, page_url, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 960, "height": 640})
    # Every CSP violation, as the page's own event and as the console message Chromium prints for it.
    # (Init scripts come from the driver, so the page's CSP does not stop this one.)
    page.add_init_script("window.cspViolations = [];"
                         "document.addEventListener('securitypolicyviolation',"
                         " (e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));")
    console = []
    page.on("console", lambda m: console.append(m.text))
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(page_url) else None)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(page_url)
    expect(page.locator("#model")).to_have_text("tiny")
    # The page names the model before it has applied the model's context to Max tokens (one more request);
    # filling the field in between raced with that clamp (CI once sent 64 instead of 24): wait for it.
    expect(page.locator("#max-tokens")).not_to_have_attribute("max", "1024")

    page.locator("#temperature").fill("0.5")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Write one line about the sea.")
    page.press("#input", "Enter")

    # Watch the answer grow while it streams.
    answer = page.locator(".message.assistant").last
    expect(page.locator(".message.user")).to_have_text("Write one line about the sea.")
    lengths = []
    deadline = time.monotonic() + 20
    while "streaming" in (answer.get_attribute("class") or "") and time.monotonic() < deadline:
        lengths.append(len(answer.locator(".text").inner_text()))
        time.sleep(0.05)
    final = answer.locator(".text").inner_text()
    assert final, "no answer appeared"
    assert len({n for n in lengths if 0 < n < len(final)}) >= 2, f"the answer did not stream in: {lengths}"
    expect(page.locator("#send")).to_be_visible()
    assert bodies[-1]["stream"] is True
    assert (bodies[-1]["temperature"], bodies[-1]["max_tokens"]) == (0.5, 24)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Write one line about the sea."}]

    screenshot = tmp_path / "chat-page.png"
    page.screenshot(path=str(screenshot))
    print(f"\nscreenshot of the chat page: {screenshot}")

    # A second turn sends the history; Stop cuts it short.
    page.fill("#max-tokens", "60")
    page.fill("#input", "And another?")
    page.press("#input", "Enter")
    second = page.locator(".message.assistant").nth(1)
    expect(second.locator(".text")).not_to_have_text("")
    page.click("#stop")
    expect(second.locator(".note", has_text="(stopped)")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()
    # The first try sends the whole conversation (the page drops old turns if the context overflows).
    first_try = bodies[1]["messages"]
    assert [m["role"] for m in first_try] == ["user", "assistant", "user"]
    assert first_try[1]["content"] == final

    page.click("#clear")
    expect(page.locator(".message")).to_have_count(0)
    assert outside == []  # nothing loaded from anywhere but the server
    assert page.evaluate("window.cspViolations") == []
    assert not [m for m in console if "Content Security Policy" in m], console

    # The check sees violations: an inline script injected into the page is refused, and reported.
    page.evaluate("() => { const s = document.createElement('script');"
                  " s.textContent = 'window.injected = true'; document.body.appendChild(s); }")
    page.wait_for_function("window.cspViolations.length > 0")  # the event comes as a task of its own
    assert page.evaluate("window.injected === undefined")
    assert [v.split()[0] for v in page.evaluate("window.cspViolations")] == ["script-src-elem"]
    page.close()
