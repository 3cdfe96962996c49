"""The data stage: tokenizers, token files and datasets, chat templates."""
