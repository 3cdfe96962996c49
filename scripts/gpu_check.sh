#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: a Python with a CUDA build of torch, the gpu tests
# (tests/test_gpu.py, `pytest -m gpu`), bench/gpu.py, then one JSON summary line on stdout. About 8
# minutes on one H100 (the torch.compile warm-ups included). Logs go to out/gpu-check/.
#
# Where CUDA torch comes from (chosen here, in this order):
#   offline: python3 already imports a CUDA torch that sees the GPU (prebuilt GPU images): that python is
#            used as it is, with this checkout's src/ on PYTHONPATH. Nothing is installed, no network.
#            Tests needing a package it lacks (fastapi, uvicorn) skip with their reason.
#   online:  .venv (created if missing) gets torch==<constraints.txt's pin> from the PyTorch index of the
#            newest CUDA the driver supports (cu130, cu128, cu126), else PyPI's default wheel (a CUDA
#            build on Linux), then scratchgpt[dev]. The CPU pin stays the default everywhere else.
# Without a GPU it prints one line and exits 1 before touching anything (no venv, no install).
# Environment: PYTHON (default python3), GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds),
# GPU_CHECK_BENCH_ARGS (extra bench/gpu.py flags).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
start=$(date +%s)
log() { echo "[gpu_check] $*" >&2; }

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

if has_cuda_torch "$py"; then
  mode=offline
  PY="$py"
  export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
  log "offline mode: $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') from $(command -v "$py")"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  mode=online
  pin="$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' constraints.txt | head -n1)"
  [ -n "$pin" ] || { echo "gpu_check: constraints.txt pins no torch version (torch==X.Y.Z)" >&2; exit 1; }
  driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -n1)"
  [ -x .venv/bin/python ] || { log "creating .venv with $($py --version 2>&1)"; "$py" -m venv .venv || exit 1; }
  PY=.venv/bin/python
  if ! has_cuda_torch "$PY"; then
    $PY -m pip uninstall -q -y torch >/dev/null 2>&1  # a CPU build of the same version would count as installed
    installed=""
    for tag in 130 128 126; do  # newest first; a driver runs CUDA builds up to its own version only
      if [ -n "$driver_cuda" ] && [ "$tag" -gt "$driver_cuda" ]; then continue; fi
      log "installing torch==$pin from https://download.pytorch.org/whl/cu$tag"
      if $PY -m pip install -q "torch==$pin" --index-url "https://download.pytorch.org/whl/cu$tag" >&2; then
        installed="cu$tag"
        break
      fi
    done
    if [ -z "$installed" ]; then
      log "no CUDA index had torch==$pin for driver CUDA ${driver_cuda:-unknown}; trying PyPI's default wheel"
      $PY -m pip install -q "torch==$pin" >&2 || exit 1
    fi
  fi
  $PY -m pip install -q -c constraints.txt -e ".[dev]" >&2 || exit 1
  has_cuda_torch "$PY" || { echo "gpu_check: .venv's torch does not see the GPU (driver CUDA ${driver_cuda:-unknown})" >&2; exit 1; }
else
  echo "gpu_check: no CUDA GPU here (no nvidia-smi GPU and $py's torch sees none); nothing was installed" >&2
  exit 1
fi

out=out/gpu-check
mkdir -p "$out"
# Deterministic cuBLAS for the exact-resume test (harmless elsewhere: a fixed workspace size).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export TOKENIZERS_PARALLELISM=false

log "gpu tests (log: $out/tests.log)"
timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" "$PY" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider \
  >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 5 "$out/tests.log" >&2

log "bench/gpu.py (log: $out/bench.log)"
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: extra flags, e.g. "--batch-size 8" for a smaller GPU
timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$PY" bench/gpu.py ${GPU_CHECK_BENCH_ARGS:-} >"$out/bench.json" \
  2>"$out/bench.log"
bench_rc=$?
[ $bench_rc -eq 0 ] || tail -n 5 "$out/bench.log" >&2

"$PY" - "$out" "$mode" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, mode, tests_rc, bench_rc, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
log = (out / "tests.log").read_text(errors="replace")
results = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, flags=re.M)
count = {k: sum(1 for _, r in results if r == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
summary = {
    "gpu_check": "ok" if tests_rc == 0 and bench_rc == 0 and count["PASSED"] else "failed", "mode": mode, "seconds": seconds,
    "tests": {"passed": count["PASSED"], "failed": count["FAILED"], "errors": count["ERROR"],
              "skipped": count["SKIPPED"], "exit": "timeout" if tests_rc == 124 else tests_rc,
              "failed_names": [n.split("::", 1)[1] for n, r in results if r in ("FAILED", "ERROR")]},
}
try:
    bench = json.loads((out / "bench.json").read_text().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    summary["bench"] = {"exit": "timeout" if bench_rc == 124 else bench_rc}
else:
    tr, dec = bench["train"], bench["decode"]
    mfu = tr["scratchgpt"]["mfu"]
    summary["device"], summary["torch"] = bench["device"], bench["torch"]
    summary["bench"] = {
        "train_tok_s": tr["scratchgpt"]["tok_s"], "train_mfu": mfu, "transformers_tok_s": tr["transformers"]["tok_s"],
        "train_vs_transformers": tr["ratio"],
        "decode_b1_vs_transformers": dec["batch_1"]["ratio"], "decode_b32_vs_transformers": dec["batch_32"]["ratio"],
        "decode_b1_tok_s": dec["batch_1"]["scratchgpt_tok_s"], "decode_b32_tok_s": dec["batch_32"]["scratchgpt_tok_s"],
    }
    summary["targets"] = {"train_mfu_ge_0.45": mfu is not None and mfu >= 0.45, "train_ge_1.2x": tr["ratio"] >= 1.2,
                          "decode_ge_1.5x": min(dec["batch_1"]["ratio"], dec["batch_32"]["ratio"]) >= 1.5}
print(json.dumps(summary))
sys.exit(0 if summary["gpu_check"] == "ok" else 1)
EOF
