"""The Redis database the tests use: AUDIO_ANALYSIS_TEST_REDIS_URL (DB 15 by default), one of its
own for each process when the suite runs in several (pytest-xdist, ``scripts/dev.sh test``).

Every session flushes its database and runs its own worker on its queues there, so two processes
sharing one would take each other's jobs and wipe each other's records. Process gwN counts down
from the configured database: gw0 has it, gw1 the one below, and so on (wrapping at 0)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

DEFAULT = "redis://127.0.0.1:6379/15"


def session_redis_url() -> str:
    url = os.environ.get("AUDIO_ANALYSIS_TEST_REDIS_URL", DEFAULT)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db - int(worker[2:])) % 16}"))
