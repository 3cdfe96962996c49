"""The training stage: the one loop, LoRA, and the modes that feed it."""
