"""The header check's reader (``shared.probe_sandbox``'s child) killed from outside, as an OOM
killer kills it, as many times as the file ``PROBE_KILL_FILE`` says (installed by
tests/_cuda_oom_worker.py).

Nothing here can make the host's OOM killer pick that process on demand; the SIGKILL it would send
is sent by the child itself, before FFmpeg runs, while the count is above zero (counted down). The
fork server, the child, its limits and the parent's reading of its death are the real ones.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from shared import probe_sandbox

_real_child = probe_sandbox._child


def child(conn: Any, kind: str, payload: Any, limits: probe_sandbox.ProbeLimits) -> None:
    count = Path(os.environ["PROBE_KILL_FILE"])
    left = int(count.read_text() or 0)
    if left > 0:
        count.write_text(str(left - 1))
        os.kill(os.getpid(), signal.SIGKILL)
    _real_child(conn, kind, payload, limits)


def install() -> None:
    probe_sandbox._child = child
