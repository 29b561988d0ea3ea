"""Model definitions and loaders (no HTTP, no queue)."""

from shared.models import runtime  # noqa: F401  (before torch is imported)
