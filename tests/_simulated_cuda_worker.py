"""A Celery worker on a simulated CUDA device (tests/_simulated_cuda.py), run by
tests/test_worker_device.py as a GPU worker is run: ``python -m tests._simulated_cuda_worker
<celery worker options>`` with ``AUDIO_ANALYSIS_DEVICE=cuda:0``.

No GPU here, which the simulation stands in for; everything else (the Celery worker and its
prefork pool, Redis, the job store, the models, the engine's GPU code paths) is real. The
simulation starts in each pool process, before the models load there (``worker_process_init``
receivers run in the order they were connected: this one is connected first).
"""

from __future__ import annotations

import sys

from celery import signals

from tests import _simulated_cuda


@signals.worker_process_init.connect
def _simulate(**_: object) -> None:
    _simulated_cuda.install()


if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
