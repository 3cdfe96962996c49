"""The model stage: the GPT as pure torch.nn, and the book's own build of it."""
