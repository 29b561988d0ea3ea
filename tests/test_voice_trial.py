"""A voice-authentication client's trial of the service: short phone-like clips, verification at
volume, through the real API and worker (tests/conftest.py's fixtures: real Redis, the session's
Celery worker with the embedded CAM++).

- ``test_sync_call_answers_as_its_job_ends``: a synchronous call (``/compare``, ``/embedding``,
  ``/compare_embedding``, ``POST /voiceprints``, ``/identify``) polls its job's record. The poll
  interval grew by half from 50 ms from the first poll, so a job that ended 0.45 s in was seen
  0.21 s late, at 0.7 s 0.35 s late, at 1.8 s 0.72 s late (this test, before): on 498 /compare
  calls of 1-7 s clips the answer came 0.19 s (median) after the worker's own 0.50 s. It now
  polls at 50 ms for a short job's first 2 s, then backs off as before.
"""

from __future__ import annotations

import asyncio
import threading
import time


def test_sync_call_answers_as_its_job_ends(settings):
    from api.dispatch import Dispatcher
    from shared.jobs import RUNNING, SUCCEEDED, JobRecord, JobStore, new_job_id
    from shared.queue import make_celery
    from shared.storage import get_storage

    store = JobStore.from_settings(settings)
    lags = {}

    async def run(ends_after: float) -> float:
        dispatcher = Dispatcher(settings, store, get_storage(settings), make_celery(settings))
        record = store.create(JobRecord(job_id=new_job_id(), kind="compare"))
        store.update(record.job_id, lambda r: r.model_copy(update={"status": RUNNING}))
        ended = {}

        def finish() -> None:
            time.sleep(ends_after)
            store.finish(record.job_id, SUCCEEDED, result={"similarity_score": 0.9})
            ended["at"] = time.monotonic()

        worker = threading.Thread(target=finish)
        worker.start()
        try:
            answer = await dispatcher.wait(record.job_id, 30)
            answered = time.monotonic()
        finally:
            worker.join()
            await dispatcher.close()
        assert answer.status == SUCCEEDED
        return answered - ended["at"]

    for ends_after in (0.3, 0.45, 0.7, 1.2, 1.8):
        lags[ends_after] = asyncio.run(run(ends_after))
    # one poll interval (50 ms) and a Redis read, with room for a loaded 2-core machine
    assert max(lags.values()) < 0.15, lags

