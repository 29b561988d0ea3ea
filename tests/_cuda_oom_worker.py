"""A Celery worker on a simulated CUDA device (tests/_simulated_cuda.py) whose diarizations run out
of GPU memory as many times as a file says (run by tests/test_worker_device.py:
``python -m tests._cuda_oom_worker <celery worker options>`` with ``AUDIO_ANALYSIS_DEVICE=cuda:0``).

No GPU here, so neither the card nor its running out of memory is real: ``Engine.diarize`` raises
torch's own ``OutOfMemoryError`` (what CUDA's allocator raises) while the count in
``CUDA_OOM_FILE`` is above zero, and counts it down. Everything else (the Celery worker, its pool,
Redis, the job store, the models on the simulated card, the engine) is real.

Its header checks' readers are killed from outside as many times as ``PROBE_KILL_FILE`` says
(tests/_probe_faults.py): another shortage of the host, met the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from celery import signals

from engine.core import Engine
from tests import _probe_faults, _simulated_cuda

COUNT = Path(os.environ["CUDA_OOM_FILE"])
_real_diarize = Engine.diarize


def _diarize(self: Engine, *args, **kwargs):
    left = int(COUNT.read_text() or 0)
    if left > 0:
        COUNT.write_text(str(left - 1))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 118.00 MiB (simulated)")
    return _real_diarize(self, *args, **kwargs)


Engine.diarize = _diarize


@signals.worker_process_init.connect
def _simulate(**_: object) -> None:
    _simulated_cuda.install()
    _probe_faults.install()


if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
