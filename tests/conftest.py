"""Fixtures shared by every test file: the real data folder and the GPT-2 tokenizer built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The repo's sibling ../shared/data, unless SCRATCHGPT_DATA_DIR points elsewhere.
DATA_DIR = Path(
    os.environ.get("SCRATCHGPT_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread count for the whole session, subprocesses included.

    Runs that a test compares bit for bit (resume vs a straight run, 1 vs N workers) must use the same
    thread count: it changes how float sums are split. Left alone, every `scratchgpt train` picks its count
    from the machine's load at that moment (device.choose_threads: fewer threads on a busy machine), so two
    runs of one test could differ on a loaded machine. The tests of that choice unset this themselves.
    """
    if not os.environ.get("OMP_NUM_THREADS"):
        from scratchgpt.device import default_threads

        os.environ["OMP_NUM_THREADS"] = str(default_threads())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, with one reason, where torch sees no CUDA device (CI and every CPU
    machine), whatever -m selected them (`pytest -m gpu`, scripts/test.sh's "slow or not slow")."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs the gpu tests on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder (GPT-2 files, Tiny Shakespeare, ...); skips the test when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}; set SCRATCHGPT_DATA_DIR to the shared data folder")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_shakespeare(data_dir: Path) -> str:
    """The full Tiny Shakespeare text (1,115,394 characters)."""
    return (data_dir / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir: Path):
    """GPT-2's tokenizer from the local data folder, so no test ever downloads it."""
    # Imported here so that a broken tokenizer module fails its own tests, not every test file.
    from scratchgpt.data.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer.from_dir(data_dir / "gpt2")


@pytest.fixture(autouse=True)
def _gpt2_files_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point GPT-2 file lookup at the local data, so code that resolves them never reaches the network."""
    gpt2_dir = DATA_DIR / "gpt2"
    if gpt2_dir.is_dir():
        monkeypatch.setenv("SCRATCHGPT_GPT2_DIR", str(gpt2_dir))


# ---------------------------------------------------------------------------------------------
# Serving (tests/test_serve*.py): a tiny chat checkpoint and real uvicorn servers on loopback
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> Path:
    """A tiny random GPT (2 layers, 32 wide, 64-token context) with GPT-2's tokenizer, saved as an
    Alpaca-tuned run directory."""
    import torch

    from scratchgpt import GPT, GPTConfig
    from scratchgpt.checkpoint import save_model

    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    run_dir = tmp_path_factory.mktemp("tiny-chat")
    return save_model(model, run_dir, tokenizer=gpt2_tokenizer, extra={"chat_template": "alpaca"})


@pytest.fixture(scope="module")
def start_server():
    """`start_server(app) -> base URL`: runs the ASGI app under uvicorn in a thread on a free loopback
    port; every server started is shut down when the module's tests are done."""
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    running = []

    def start(app) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, and nobody can take it meanwhile
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ---------------------------------------------------------------------------------------------
# Training data (tests/test_train.py, tests/test_distributed.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def char_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared char-level folder (train.bin, val.bin, meta.json, tokenizer) of Tiny Shakespeare's first 40k chars."""
    from scratchgpt.data.dataset import prepare

    root = tmp_path_factory.mktemp("char_data")
    text = (data_dir / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    (root / "input.txt").write_text(text, encoding="utf-8")
    prepare(root / "input.txt", root / "data", tokenizer="char", progress=False)
    return root / "data"
