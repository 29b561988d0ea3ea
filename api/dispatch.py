"""Submitting, waiting for and cancelling jobs: the glue between routes, storage and Celery.

The API never imports the engine or the task code: tasks are sent by name, so the API process
stays free of model weights.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from fastapi import Request, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import Principal
from api.errors import JobConflict, JobNotFound, SyncTimeout
from shared.audio_limits import check_audio_limits
from shared.errors import AnalysisError, ModelError
from shared.jobs import CANCELLED, FAILED, TERMINAL, JobStore, error_body, new_job_id, public_view
from shared.settings import Settings
from shared.storage import Storage
from shared.webhooks import validate_webhook_url

log = logging.getLogger(__name__)

TASK_NAMES = {
    "diarize": "audio.diarize",
    "embedding": "audio.embedding",
    "compare": "audio.compare",
    "compare_embedding": "audio.compare_embedding",
}


@dataclass
class Dispatcher:
    settings: Settings
    store: JobStore
    storage: Storage
    celery: Celery
    # created on first use, inside the server's event loop
    _aredis: Any = field(default=None, init=False, repr=False)

    async def check_webhook(self, url: str | None) -> str | None:
        if not url:
            return None
        # resolves the host name: off the event loop
        return await run_in_threadpool(
            validate_webhook_url, url, self.settings.webhook_allowed_hosts, self.settings.webhook_allow_private_addresses
        )

    async def save_uploads(self, job_id: str, uploads: dict[str, UploadFile]) -> dict[str, str]:
        """Stream each upload into storage; the request as a whole stays under max_upload_bytes."""
        keys: dict[str, str] = {}
        budget = self.settings.max_upload_bytes
        try:
            for name, upload in uploads.items():
                key = await run_in_threadpool(self.storage.save, job_id, name, upload.file, max_bytes=budget)
                keys[name] = key
                budget -= upload.size if upload.size is not None else 0
        except BaseException:
            self.storage.delete_job(job_id)
            raise
        finally:
            for upload in uploads.values():
                await upload.close()
        return keys

    async def submit(
        self,
        kind: str,
        uploads: dict[str, UploadFile],
        params: dict[str, Any],
        *,
        webhook_url: str | None = None,
        batch_id: str | None = None,
        sync: bool = False,
        job_id: str | None = None,
        principal: Principal | None = None,
    ) -> dict[str, Any]:
        job_id = job_id or new_job_id()
        keys = await self.save_uploads(job_id, uploads)
        try:
            await self.check_audio_limits(keys, sync=sync)
        except BaseException:
            self.storage.delete_job(job_id)
            raise
        first = next(iter(uploads.values()), None)
        try:
            record = await run_in_threadpool(
                self.store.create,
                job_id, kind, uploads=list(keys.values()), webhook_url=webhook_url, batch_id=batch_id, sync=sync,
                filename=first.filename if first is not None else None,
                owner=principal.owner if principal is not None else None, params={**params, **keys},
                queue=self.settings.queue_name,
            )
        except BaseException:
            # job store down (503): no job exists, so no upload may stay behind
            self.storage.delete_job(job_id)
            raise
        try:
            await run_in_threadpool(
                # only the job id travels through the broker: parameters, file names and webhook URLs
                # stay in the job record, out of Flower and the result backend
                self.celery.send_task, TASK_NAMES[kind], args=(job_id,), task_id=job_id,
                queue=self.settings.queue_name,
            )
        except Exception as exc:  # noqa: BLE001 - broker down: the job never existed for a worker
            self.storage.delete_job(job_id)
            self.store.finish(job_id, FAILED, error=error_body("ModelError", f"could not enqueue: {exc}", 503))
            raise ModelError(f"job queue unavailable: {exc}") from exc
        return record

    async def wait(self, job_id: str, timeout_s: float, request: Request | None = None) -> dict[str, Any]:
        """Poll the record until the job ends (synchronous endpoints).

        A client that hangs up gets its job cancelled: nobody is left to read the result, and
        the worker should not spend an hour on it.
        """
        deadline = time.monotonic() + timeout_s
        aredis = self.store_async()
        key = self.store.key("job", job_id)
        while True:
            raw = await aredis.get(key)
            record = json.loads(raw) if raw else None
            if record is None:
                raise JobNotFound(f"job {job_id} disappeared")
            if record["status"] in TERMINAL:
                return record
            if time.monotonic() >= deadline:
                await self._cancel_quietly(job_id)
                raise SyncTimeout(f"no result within {timeout_s:.0f} s; submit long audio to /jobs instead")
            if request is not None and await request.is_disconnected():
                log.info("sync client of job %s disconnected: cancelling it", job_id)
                await self._cancel_quietly(job_id)
                raise JobConflict("client disconnected; job cancelled")
            await asyncio.sleep(self.settings.sync_poll_interval_s)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.cancel(job_id)
        except JobConflict:
            pass  # it ended meanwhile

    async def check_audio_limits(self, keys: dict[str, str], *, sync: bool) -> None:
        """Duration and sample rate from the container header, before any worker decodes.

        A file whose header cannot be read is left to the worker, which answers 415.
        """
        limit = min(self.settings.sync_max_audio_seconds, self.settings.max_audio_seconds) if sync \
            else self.settings.max_audio_seconds
        hint = "; submit it to /jobs/* instead (asynchronous, longer limit)" if sync else ""
        for name, key in keys.items():
            if name == "embedding":
                continue
            with self.storage.local_path(key) as path:
                await run_in_threadpool(
                    check_audio_limits, path, max_duration=limit, min_sample_rate=self.settings.min_sample_rate, hint=hint
                )

    def store_async(self):
        import redis.asyncio

        if self._aredis is None:
            self._aredis = redis.asyncio.Redis.from_url(self.settings.redis_url, decode_responses=True)
        return self._aredis

    async def run_sync(
        self, kind: str, uploads: dict[str, UploadFile], params: dict[str, Any], principal: Principal | None = None,
        request: Request | None = None,
    ) -> dict[str, Any]:
        record = await self.submit(kind, uploads, params, sync=True, principal=principal)
        record = await self.wait(record["job_id"], self.settings.sync_timeout_s, request)
        if record["status"] == FAILED:
            raise AnalysisError.from_dict(record["error"] or {})
        if record["status"] == CANCELLED:
            raise JobConflict("job was cancelled")
        return record["result"]

    def get(self, job_id: str, principal: Principal | None = None) -> dict[str, Any]:
        record = self.store.get(job_id)
        # another tenant's job is answered exactly like a missing one: its existence is not told
        if record is None or (principal is not None and not principal.can_see(record)):
            raise JobNotFound(f"no job {job_id} (unknown or expired)")
        return record

    async def cancel(self, job_id: str, principal: Principal | None = None) -> dict[str, Any]:
        record = self.get(job_id, principal)
        if record["status"] in TERMINAL:
            raise JobConflict(f"job {job_id} already {record['status']}")
        record, changed = self.store.finish(job_id, CANCELLED)
        if not changed:
            raise JobConflict(f"job {job_id} already {record['status'] if record else 'gone'}")
        # a queued job is dropped by the worker that receives it (revoke, plus the task's own
        # check of the record); a running diarization stops at its next progress report
        await run_in_threadpool(self.celery.control.revoke, job_id)
        self.storage.delete_job(job_id)
        if record and record.get("webhook_url"):
            await run_in_threadpool(
                self.celery.send_task, "audio.deliver_webhook", args=(job_id,), queue=self.settings.webhook_queue_name
            )
        return record

    async def close(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = None


def view(record: dict[str, Any], base_url: str = "") -> dict[str, Any]:
    out = public_view(record)
    out["status_url"] = f"{base_url}/jobs/{record['job_id']}"
    return out
