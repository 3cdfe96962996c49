"""The inference stage: generation and the HTTP server."""
