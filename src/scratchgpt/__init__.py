"""scratchgpt: a GPT-2-class language model toolkit written from scratch in PyTorch."""

from typing import Any

from scratchgpt.config import GPTConfig, SamplingConfig

__all__ = ["GPT", "GPTConfig", "KVCache", "SamplingConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The model (and torch) load on first use, so that `import scratchgpt` and the CLI start instantly
    # and a Ctrl-C during start-up meets the CLI's handler rather than torch's import machinery.
    if name in ("GPT", "KVCache"):
        # checkpoint too: it gives GPT.from_pretrained its loader (the model stage cannot import it).
        from scratchgpt import checkpoint  # noqa: F401
        from scratchgpt.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'scratchgpt' has no attribute {name!r}")
