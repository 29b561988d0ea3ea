"""Pure analysis pipelines: decoded audio in, results out (no HTTP, no queue)."""
