"""Fine-tuning modes: each brings its data, head, loss and trainable set to the one loop."""
