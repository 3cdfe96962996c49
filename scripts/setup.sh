#!/usr/bin/env bash
# Create (or refresh) .venv at the repo root with scratchgpt and its dev extras installed.
# Idempotent: it reinstalls only when pyproject.toml or constraints.txt changed since the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version 2>&1)" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.scratchgpt-setup
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing scratchgpt[dev] into .venv (torch pinned by constraints.txt)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2 || true
  # torch first and alone, so that nothing else gets to pick a (CUDA) build of it.
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" >&2
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" >&2
  echo "$want" > "$stamp"
fi
