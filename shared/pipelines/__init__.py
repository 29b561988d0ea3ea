"""Pure analysis pipelines: decoded audio in, results out (no HTTP, no queue)."""

from shared.models import runtime  # noqa: F401  (before torch is imported)
