"""Tokenizers behind one interface (`base.Tokenizer`): GPT-2 BPE through tiktoken (`gpt2`), byte-level
BPE in pure Python trained from scratch (`bpe`, its trainer alone in `bpe_train`), characters (`char`),
and a model's own Hugging Face tokenizer.json (`hf`).

Every tokenizer saves itself into a run directory as `tokenizer.json` (GPT-2 adds its two vocabulary
files), and `load_tokenizer(run_dir)` restores whichever kind is there (`load`). The text
`<|endoftext|>` is treated like tiktoken treats it: encoding it raises unless `allowed_special=True`,
so a document that merely quotes it can never smuggle in a document boundary.
"""

from scratchgpt.data.tokenizers.base import EOT_TEXT, TOKENIZER_FILE, Tokenizer, TokenizerKind, safe_cut
from scratchgpt.data.tokenizers.bpe import ByteBPETokenizer, Pretokenizer
from scratchgpt.data.tokenizers.char import CharTokenizer
from scratchgpt.data.tokenizers.gpt2 import (
    GPT2_DIR_ENV,
    GPT2_PATTERN,
    GPT2Tokenizer,
    default_gpt2_cache_dir,
    find_gpt2_dir,
    gpt2_byte_to_unicode,
    gpt2_tokenizer,
)
from scratchgpt.data.tokenizers.hf import HF_CHAT_TEMPLATE_FILE, HF_TOKENIZER_CONFIG, HFTokenizer
from scratchgpt.data.tokenizers.load import build_tokenizer, load_tokenizer

__all__ = [
    "EOT_TEXT",
    "GPT2_DIR_ENV",
    "GPT2_PATTERN",
    "HF_CHAT_TEMPLATE_FILE",
    "HF_TOKENIZER_CONFIG",
    "TOKENIZER_FILE",
    "ByteBPETokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "HFTokenizer",
    "Pretokenizer",
    "Tokenizer",
    "TokenizerKind",
    "build_tokenizer",
    "default_gpt2_cache_dir",
    "find_gpt2_dir",
    "gpt2_byte_to_unicode",
    "gpt2_tokenizer",
    "load_tokenizer",
    "safe_cut",
]
