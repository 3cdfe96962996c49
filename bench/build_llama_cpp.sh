#!/usr/bin/env bash
# Builds llama-cpp-python from source, with this CPU's own instruction sets, into a virtual environment
# outside the repo (bench-only: the decode race in bench/decode_race.py imports it from there).
#
#   bash bench/build_llama_cpp.sh            # ~10 CPU-minutes once; later runs reuse the folder
#   LLAMA_CPP_VENV=/some/dir bash bench/build_llama_cpp.sh
#
# Why from source: the PyPI wheels are generic x86-64 builds; the race must meet llama.cpp at its best on
# this machine (AVX-512 / AVX-512 BF16 / VNNI where present), so GGML_NATIVE=ON -- except on CPUs with
# AMX: ggml's AMX buffer (weights repacked for AMX-INT8) crashed with a segmentation fault at the first
# Q8_0 token on a 2-core Sapphire-Rapids-class KVM guest (llama-cpp-python 0.3.36; the machine-dependent
# crash of ggml-org/llama.cpp#20824), so there the build names every instruction set the CPU reports
# except AMX. The flags used are kept in the folder (build-flags.txt); other flags rebuild it (never from
# pip's wheel cache, whose key ignores CMAKE_ARGS).
set -euo pipefail
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
VENV="${LLAMA_CPP_VENV:-$HOME/.cache/scratchgpt-bench/llama-cpp-$VERSION}"
FLAGS="-DGGML_NATIVE=ON"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=$(has sse4_2) -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2)"
    FLAGS+=" -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)"
    FLAGS+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
    FLAGS+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
    FLAGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null \
        && [ "$(cat "$VENV/build-flags.txt" 2>/dev/null)" = "$FLAGS" ]; then
    echo "$VENV"; exit 0
fi
if [ -e "$VENV" ]; then
    # Only a virtual environment is replaced (LLAMA_CPP_VENV may name any folder).
    [ -f "$VENV/pyvenv.cfg" ] || { echo "bench/build_llama_cpp.sh: $VENV exists and is not a virtual environment; pass another LLAMA_CPP_VENV" >&2; exit 1; }
    rm -rf "$VENV"
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
CMAKE_ARGS="$FLAGS -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION" numpy >&2
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" >&2
echo "$FLAGS" > "$VENV/build-flags.txt"
echo "$VENV"
