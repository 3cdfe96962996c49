"""Evaluation: perplexity and bits per byte, multiple-choice log-likelihood tasks, classifier metrics,
judged instruction answers, an lm-evaluation-harness model, and the reports every eval writes."""
