#!/usr/bin/env bash
# Builds llama-cpp-python from source, with this CPU's native flags, into a virtual environment outside
# the repo (bench-only: the decode race in bench/decode_race.py imports it from there).
#
#   bash bench/build_llama_cpp.sh            # ~10 CPU-minutes once; later runs reuse the folder
#   LLAMA_CPP_VENV=/some/dir bash bench/build_llama_cpp.sh
#
# Why from source: the PyPI wheels are generic x86-64 builds; the race must meet llama.cpp at its best on
# this machine (AVX-512 / AVX-512 BF16 / AMX where present), so GGML_NATIVE=ON.
set -euo pipefail
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
VENV="${LLAMA_CPP_VENV:-$HOME/.cache/scratchgpt-bench/llama-cpp-$VERSION}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "$VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install -q --no-binary llama-cpp-python "llama-cpp-python==$VERSION" numpy >&2
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" >&2
echo "$VENV"
