"""scratchgpt: a GPT-2-class language model toolkit written from scratch in PyTorch."""

from scratchgpt.config import GPTConfig, SamplingConfig
from scratchgpt.model.gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "SamplingConfig"]
__version__ = "0.1.0"
