"""A worker container's liveness probe: ``python -m worker.alive``.

Exits 0 while the worker's main process stamps ``AUDIO_ANALYSIS_WORKER_LIVENESS_FILE`` (each
second, from its consumer's loop: worker/lifecycle.py), 1 once the stamp is older than
``AUDIO_ANALYSIS_WORKER_LIVENESS_MAX_AGE_S`` or missing. A main process that is frozen or whose loop
hangs fetches no job however healthy its pool processes are; their heartbeat already lapses from
/health (so no synchronous call waits for it), and this lets Kubernetes restart it. Reads the file's
age only: no Redis, no broker, nothing a busy worker could be slow to answer.
"""

from __future__ import annotations

import sys
import time

from shared.settings import get_settings


def stamp_age_s() -> float | None:
    """Seconds since the main process last stamped its liveness file; None: no such file."""
    path = get_settings().worker_liveness_file
    if path is None:
        raise SystemExit("AUDIO_ANALYSIS_WORKER_LIVENESS_FILE is not set: the worker keeps no liveness file")
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


def main() -> int:
    most = get_settings().worker_liveness_max_age_s
    age = stamp_age_s()
    if age is None:
        print("no liveness file yet: the worker has not started", file=sys.stderr)
        return 1
    if age > most:
        print(f"the worker's main process last stamped its liveness file {age:.0f} s ago (most {most:.0f} s): "
              "frozen or hung", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
