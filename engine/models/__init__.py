"""Model definitions and loaders (no HTTP, no queue)."""
