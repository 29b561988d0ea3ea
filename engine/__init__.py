"""The analysis engine: audio decoding, models, pipelines and :class:`engine.core.Engine`.

Only worker processes, the offline CLI, benches and tests import this package: it loads torch.
The API never does (tests/test_boundaries.py holds it to that).
"""

from engine import runtime  # noqa: F401  (sets torch's thread policy before torch is imported)
