#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints with ruff, runs the whole pytest suite (slow tests too).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k generate -x`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# The browser test drives Debian's Chromium. Install it where we can (root with apt); without it
# that one test is skipped with its reason, and everything else still runs.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser test" >&2
  { apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "[test] could not install chromium; the browser test will be skipped" >&2
fi
.venv/bin/ruff check src tests bench
# Everything, the slow whole runs included (a later -m given in "$@" still narrows it).
exec .venv/bin/python -m pytest -m "slow or not slow" "$@"
