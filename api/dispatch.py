"""Submitting, waiting for and cancelling jobs: the glue between routes, storage and Celery.

Every kind goes through the same path (:meth:`Dispatcher.submit`): its non-audio uploads are
parsed into parameters, the parameters validated by the kind's model, the audio streamed into
storage and its header checked (audio given by URL: the URL checked against the address policy
and kept in the record for the worker to fetch), the record created, the job id sent by task
name. The API never imports the engine or the task code, so its process stays free of torch and
model weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping, Sequence, TypeVar

import anyio
import anyio.to_thread
import redis
from celery import Celery
from fastapi import HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from api.errors import (STORE_REFUSED, JobConflict, KeyInUse, StorageFull, StorageUnavailable, StoreRefused,
                        SyncTimeout, not_found, refuses_writes)
from api.idempotency import Digesting, Idempotent, IdempotencyKey, UploadPart, digest_upload
from shared import logs
from shared.audio_limits import SYNC_HINT, DurationBudget, NotAudioError, check_audio_limits
from shared.errors import AnalysisError, AudioDecodeError, InputError, ModelError
from shared.formats import file_name, one_line
from shared.jobs import (CANCELLED, FAILED, INTERRUPTED_SUBMISSION, QUEUED, SUCCEEDED, JobRecord, JobStore, KeyClaim,
                         KeyHolder, KeyLost, Quota, is_job_id, new_job_id)
from shared.kinds import JobKind, Params
from shared.queue import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S, send_job, send_webhook
from shared.settings import Settings
from shared.storage import Storage, out_of_room
from shared.url_input import check_media_url, filename_of
from shared.voiceprints import VoiceprintStore
from shared.webhooks import validate_webhook_url

if TYPE_CHECKING:
    from api.deps import Principal

log = logging.getLogger(__name__)

T = TypeVar("T")

# Host lookups of submitted URLs (webhook_url, <field>_url) that may run at once. Each waits up to
# submit_lookup_timeout_s for a resolver the caller chose (the DNS server of their own domain),
# in a thread: in the shared pool, 40 submissions naming a host whose DNS server never answers
# held all of its threads, and every other request (each runs its key check there) waited for
# them, 10 s at a time. Past this many, lookups wait for a slot without holding a thread.
MAX_CONCURRENT_LOOKUPS = 8
# ... of which one tenant (an API key) may hold this many: one tenant's 16 submissions naming
# hosts whose DNS server never answers held all 8 in turn, and another tenant's submission, its
# webhook host an IP address with nothing to look up, waited behind them in the same queue (3.5 s
# at a 2 s lookup limit; 45 of them at the default 10 s, about 50 s). Its further lookups wait for
# its own slots; without API keys there is one tenant, held to MAX_CONCURRENT_LOOKUPS alone.
MAX_LOOKUPS_PER_TENANT = 4
# Uploads being copied into storage at once, each in a thread of their own. An S3 upload holds
# its thread for as long as the bucket takes (a 1 GB file, a slow or far bucket): in the shared
# pool, 40 of them held every thread, and every other request (a status poll's Redis read)
# waited seconds for one. Past this many, copies wait for a slot without holding a thread.
MAX_CONCURRENT_SAVES = 16
# ... of which one tenant (an API key) may hold half: behind one key's 32 uploads into a bucket
# taking 1.5 s a copy, another key's waited 2.7 s in the one queue (0.06 s now). Without API keys
# there is one tenant.
MAX_SAVES_PER_TENANT = MAX_CONCURRENT_SAVES // 2
# Header checks of uploads (duration, sample rate), off the pool every request shares, in two
# lanes. A header only FFmpeg reads is read by a child process held to probe_cpu_s of CPU (3 s)
# and probe_timeout_s of wall time (10 s). In the shared pool, 45 uploads at once of a file whose
# header FFmpeg reads slowly held 40 of its threads and ran 45 readers at once on the API's cores:
# a status poll waited 10.9 s for a thread, and the readers, starved, hit the wall-clock limit
# before their CPU one, so 40 of the 45 were answered 503 (the service's state: clients retry it)
# instead of 415 for the file. Such readers run one a core the API may run on, up to four, each
# then getting its CPU within its wall clock; a WAV, FLAC or Ogg upload (libsndfile reads its
# header in microseconds) is checked in a lane of its own, never queued behind them.
MAX_CONCURRENT_PROBES = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1))
MAX_CONCURRENT_CHECKS = 16
# ... of which one tenant (an API key) may hold half of each lane: in one queue for everybody, one
# key's 45 uploads of such a file put another key's upload of one behind all of them (6.8 s at
# 0.3 s a read, two at a time). Its further checks wait for its own share; without API keys there
# is one tenant, held to the lanes alone.
MAX_PROBES_PER_TENANT = max(1, MAX_CONCURRENT_PROBES // 2)
MAX_CHECKS_PER_TENANT = MAX_CONCURRENT_CHECKS // 2
# what an upload starts with where libsndfile reads its header (RIFF....WAVE, fLaC, OggS)
_LIBSNDFILE_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS")
# Results rendered as text (SubRip, WebVTT, RTTM) at once. A render is Python and its parse one
# C call that holds the GIL throughout (76 ms for 150,000 turns), so two at once finish no sooner
# than one after the other, and three clients' parses back to back held every other request of
# the API, /health included, for their sum.
MAX_CONCURRENT_RENDERS = 1
# ... for a result of at least this much JSON (about 4,000 turns: a meeting of some hours). A
# smaller one parses in under 3 ms and renders in tens: it never waits behind another tenant's
# day-long recording (0.6 s a SubRip render of 150,000 turns; 20 of them queued 12 s).
RENDER_ALONE_BYTES = 256 * 1024
# ... and each tenant (an API key) has one such render in that queue at a time: one key asking for
# its day-long diarization's SubRip 8 times at once put another key's own long result behind all 8
# (40,000 turns each: 1.5 s late); its further ones now wait for its own turn, not in the queue
# A synchronous call polls its job's record from sync_poll_interval_s (50 ms: a short job is
# answered at once), each poll half again as long, up to this. At a fixed 50 ms, every waiting
# call read and parsed its record 20 times a second for up to sync_timeout_s (an hour): a few
# hundred calls waiting on busy or absent workers took the API's core with them.
SYNC_POLL_MAX_S = 1.0
# ... but not before the call has waited this long: a verification of a 3 s clip takes its worker
# 0.4-0.6 s, and backing off from the first poll saw a job that ended at 0.45 s at 0.66 s and one
# that ended at 0.7 s at 1.04 s (0.19 s median between the worker's end and the answer over 498
# /compare calls). A call's first seconds at 50 ms are some 40 reads of a small record.
SYNC_POLL_STEADY_S = 2.0
# Connections of the API's asyncio Redis client (the synchronous calls' polls). redis-py's plain
# pool refuses a request past its 100 connections ("Too many connections"): when more polls than
# that were on their way at once (200 calls waiting, a Redis slow to answer), the calls were
# answered 503 while their jobs, queued, ran for nobody. This pool makes a poll wait for a free
# connection instead, up to REDIS_POOL_WAIT_S.
REDIS_POOL_CONNECTIONS = 100
REDIS_POOL_WAIT_S = 30.0
# Retry-After (seconds) of a synchronous call refused for want of a worker: about what a worker
# takes to come up with its models. The call was queued and waited sync_timeout_s (an hour) for
# a 504 before, while the client's load balancer (60 s) had long given up on it.
NO_WORKER_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class Submission:
    """A request, parsed once at the edge: typed parameters and the audio still to store."""

    kind: JobKind
    params: Params
    # upload name -> file; a multiple-file field's files as <name>.0, <name>.1, ...
    audio: Mapping[str, UploadFile]
    # audio fields given by URL instead (checked against the address policy): the worker fetches them
    urls: Mapping[str, str] = field(default_factory=dict)
    # parameter -> digest of its value, stored already (JobStore.keep_apart): the record carries
    # the digest, not the value (the kind's kept-apart lookups: voiceprints)
    kept_apart: Mapping[str, str] = field(default_factory=dict)
    # upload name -> SHA-256 of a non-audio upload, parsed here and never stored (an embedding
    # file): part of an Idempotency-Key's request fingerprint, as the audio's digests are
    digests: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """The jobs a submission is answered 202 for: new ones, or (``replayed``) those its
    Idempotency-Key's first submission made."""

    records: list[JobRecord]
    replayed: bool = False

    @property
    def record(self) -> JobRecord:
        (record,) = self.records
        return record


# the 409s of a key held by another submission (KeyInUse, with Retry-After)
STILL_SUBMITTING = ("Idempotency-Key: a request with this key is still being submitted; retry later, when it is "
                    "answered with that request's jobs")
TAKEN = "Idempotency-Key: a request with this key is being submitted; retry later, when it is answered with its jobs"


@dataclass(frozen=True)
class _Keyed:
    """A submission made with an Idempotency-Key: the request as sent, and its hold on the key."""

    request: Idempotent
    claim: KeyClaim


@dataclass
class _Renewal:
    """A held key's renewals (Dispatcher._renewing): ``lost`` once one found the hold gone."""

    lost: bool = False


# pauses before each question whether a confirmation whose answer was lost ran
ANSWERED_FOR_PAUSES_S = (0.0, 0.2, 0.5)
_UNKNOWN = object()


class _ConfirmationUnknown(Exception):
    """The store failed around a keyed confirmation and again when asked whether it ran."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class EdgeContext:
    """What a kind's lookups see (shared.kinds.Edge): the caller and the stores."""

    owner: str | None
    settings: Settings
    voiceprints: VoiceprintStore


@dataclass
class Dispatcher:
    settings: Settings
    store: JobStore
    storage: Storage
    celery: Celery
    voiceprints: VoiceprintStore | None = None
    # created on first use, inside the server's event loop
    _aredis: Any = field(default=None, init=False, repr=False)
    _lookups: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)
    # per tenant (owner digest), beside _lookups: one per API key the settings name, at most
    _tenant_lookups: dict[str, anyio.CapacityLimiter] = field(default_factory=dict, init=False, repr=False)
    _tenant_renders: dict[str, anyio.CapacityLimiter] = field(default_factory=dict, init=False, repr=False)
    _tenant_saves: dict[str, anyio.CapacityLimiter] = field(default_factory=dict, init=False, repr=False)
    _tenant_checks: dict[tuple[str, bool], anyio.CapacityLimiter] = field(default_factory=dict, init=False,
                                                                           repr=False)
    _saves: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)
    _probes: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)
    _checks: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)
    _renders: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)
    # (answer, until when) of the last look for workers older than the queues' keys (has_worker)
    _legacy: tuple[bool, float] = field(default=(False, 0.0), init=False, repr=False)
    # jobs of synchronous calls without an Idempotency-Key while their calls wait for them: a call
    # the server gives up on as it stops (http_shutdown_grace_s) leaves its job here, and close(),
    # in the lifespan's shutdown, cancels it. Registered before the wait rather than as the
    # cancellation reaches the call, which can be after close() ran (the cancellation crosses
    # the middleware's task groups in several turns of the loop; the lifespan's shutdown does not
    # wait for them)
    _sync_waits: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.voiceprints is None:
            self.voiceprints = VoiceprintStore.from_settings(self.settings)

    # --- the edge: what a client sent, parsed and validated once ----------------------------
    async def read(self, kind: JobKind, uploads: Mapping[str, Any], form: Mapping[str, Any],
                   principal: Principal | None = None, urls: Mapping[str, str] | None = None) -> Submission:
        """Non-audio uploads (a stored embedding) and lookups (voiceprint ids) become
        parameters; all are validated.

        Each single audio field comes as an upload or, on the job routes, as a URL (``urls``, by
        field): exactly one of the two. A URL is checked here (422) and fetched by the worker.
        A multiple-file field (``enroll``'s ``files``) is uploads only.
        """
        urls = dict(urls or {})
        for spec in kind.audio_files:
            if spec.name in urls and spec.url_name is None:
                raise InputError(f"{spec.name}: this field takes uploads only")
            if uploads.get(spec.name) is not None and spec.name in urls:
                raise InputError(f"{spec.name}: give either an upload or {spec.url_name}, not both")
            if uploads.get(spec.name) is None and spec.name not in urls:
                if spec.multiple:
                    raise InputError(f"{spec.name}: at least one file is required")
                raise InputError(f"{spec.name}: an upload (or {spec.url_name}) is required")
        values = dict(form)
        edge = EdgeContext(principal.owner if principal is not None else None, self.settings, self.voiceprints)
        for lookup in kind.lookups:
            given = values.pop(lookup.name, None)
            if given is not None and str(given).strip():
                values[lookup.into] = await run_in_threadpool(lookup.resolve, str(given), edge)
        digests: dict[str, str] = {}
        for spec in kind.files:
            if spec.parse is None:
                continue
            upload = uploads[spec.name]
            data = await upload.read(spec.max_bytes + 1)
            await upload.close()
            if len(data) > spec.max_bytes:
                raise InputError(f"{spec.name}: file is larger than {spec.max_bytes} bytes")
            digests[spec.name] = hashlib.sha256(data).hexdigest()  # at most max_bytes (1 MB), in memory already
            values[spec.into or spec.name] = await run_in_threadpool(spec.parse, data, upload.filename, self.settings)
        params = kind.parse_params(values, self.settings)  # with settings: the edge's own rules too
        for spec in kind.audio_files:
            if spec.name in urls:
                # resolves the host name: off the event loop, in a thread of the lookups' own
                await self._lookup(edge.owner, check_media_url, urls[spec.name], spec.url_name, self.settings,
                                   self.settings.submit_lookup_timeout_s)
        audio: dict[str, UploadFile] = {}
        for spec in kind.audio_files:
            if spec.name not in uploads:
                continue  # given by URL
            upload = uploads[spec.name]
            if not spec.multiple:
                audio[spec.name] = upload
                continue
            files = [u for u in (upload or []) if u is not None]
            if not files:
                raise InputError(f"{spec.name}: at least one file is required")
            if len(files) > spec.max_count:
                raise InputError(f"{spec.name}: at most {spec.max_count} files, {len(files)} given")
            audio.update({f"{spec.name}.{i}": u for i, u in enumerate(files)})
        return Submission(kind, params, audio, urls, await self._keep_apart(kind, params), digests)

    async def read_batch(self, kind: JobKind, uploads: list[UploadFile], form: Mapping[str, Any],
                         principal: Principal | None = None) -> list[Submission]:
        """One submission per file of a batch, sharing one set of parameters: read, resolved,
        validated and kept apart once (``voiceprints=all`` with 1000 files was resolved, and
        its vectors copied into a record, 1000 times)."""
        (spec,) = kind.audio_files  # batch kinds: one audio upload, every other field a form field
        first = await self.read(kind, {spec.name: uploads[0]}, form, principal)
        return [first, *(replace(first, audio={spec.name: upload}) for upload in uploads[1:])]

    async def _keep_apart(self, kind: JobKind, params: Params) -> dict[str, str]:
        """Store the kind's kept-apart parameters once, by content; their digests by name."""
        values = params.model_dump(mode="json", include=set(kind.kept_apart))
        return {name: await run_in_threadpool(self.store.keep_apart, value)
                for name, value in values.items() if value is not None}

    async def check_webhook(self, url: str | None, principal: Principal | None = None) -> str | None:
        if not url:
            return None
        # resolves the host name: off the event loop, in a thread of the lookups' own
        return await self._lookup(
            principal.owner if principal is not None else None, validate_webhook_url, url, self.settings.webhook_allowed_hosts, self.settings.webhook_allow_private_addresses,
            self.settings.submit_lookup_timeout_s,
        )

    async def _lookup(self, owner: str | None, check: Callable[..., T], *args: Any) -> T:
        """``check(*args)`` (a URL check that resolves its host) in a thread, at most
        MAX_CONCURRENT_LOOKUPS at once, so lookups that stall never take the threads the other
        requests need, and at most MAX_LOOKUPS_PER_TENANT of them ``owner``'s (a tenant: an API
        key), so that one tenant's never hold another's back."""
        if self._lookups is None:
            self._lookups = anyio.CapacityLimiter(MAX_CONCURRENT_LOOKUPS)
        if owner is None:
            return await anyio.to_thread.run_sync(functools.partial(check, *args), limiter=self._lookups)
        tenant = self._tenant_lookups.setdefault(owner, anyio.CapacityLimiter(MAX_LOOKUPS_PER_TENANT))
        async with tenant:
            return await anyio.to_thread.run_sync(functools.partial(check, *args), limiter=self._lookups)

    async def render(self, owner: str | None, size: int, render: Callable[..., T], *args: Any) -> T:
        """``render(*args)`` (a result of ``size`` bytes of JSON, as text) in a thread; from
        RENDER_ALONE_BYTES on, at most MAX_CONCURRENT_RENDERS at once, and one of ``owner``'s
        (a tenant: an API key; None, without keys, is one tenant) in their queue at a time."""
        if size < RENDER_ALONE_BYTES:
            return await run_in_threadpool(render, *args)
        if self._renders is None:
            self._renders = anyio.CapacityLimiter(MAX_CONCURRENT_RENDERS)
        if owner is None:
            return await anyio.to_thread.run_sync(functools.partial(render, *args), limiter=self._renders)
        async with self._tenant_renders.setdefault(owner, anyio.CapacityLimiter(1)):
            return await anyio.to_thread.run_sync(functools.partial(render, *args), limiter=self._renders)

    # --- submit -----------------------------------------------------------------------------
    def _saves_limiter(self) -> anyio.CapacityLimiter:
        if self._saves is None:
            self._saves = anyio.CapacityLimiter(MAX_CONCURRENT_SAVES)
        return self._saves

    async def _save(self, job_id: str, name: str, upload: UploadFile, max_bytes: int,
                    digests: dict[str, str] | None = None, owner: str | None = None) -> str:
        """``storage.save`` in a thread, at most MAX_CONCURRENT_SAVES at once, off the shared pool,
        at most MAX_SAVES_PER_TENANT of them ``owner``'s; with ``digests``, the upload's SHA-256
        taken as it streams is put there under ``name``."""
        stream = upload.file if digests is None else Digesting(upload.file)  # type: ignore[arg-type]
        save = functools.partial(self.storage.save, job_id, name, stream, max_bytes=max_bytes)
        share = contextlib.nullcontext() if owner is None else \
            self._tenant_saves.setdefault(owner, anyio.CapacityLimiter(MAX_SAVES_PER_TENANT))
        async with share:  # type: ignore[attr-defined]
            key = await anyio.to_thread.run_sync(save, limiter=self._saves_limiter())
        if isinstance(stream, Digesting) and digests is not None:
            digests[name] = stream.hexdigest()
        return key

    async def save_uploads(self, job_id: str, uploads: Mapping[str, UploadFile], *, sync: bool,
                           digests: dict[str, str] | None = None, checked: bool = False,
                           owner: str | None = None) -> dict[str, str]:
        """Check each upload's header, then stream it into storage; the request as a whole stays
        under max_upload_bytes. The header is read from the upload as received, before anything
        is stored: nothing refused is written, and an S3 backend is never read back. With
        ``digests`` (a submission with an Idempotency-Key), each upload's SHA-256, taken as it
        is stored, is put there by name. ``checked``: the headers were checked already (a batch's,
        all of them before any job)."""
        keys: dict[str, str] = {}
        budget = self.settings.max_upload_bytes
        storing = False
        try:
            if not checked:
                await self.check_audio_limits(uploads.values(), sync=sync, owner=owner)
            if sync:
                # nothing stored yet: a refused call leaves neither upload nor job behind
                await self.require_worker()
            for name, upload in uploads.items():
                storing = True
                try:
                    key = await self._save(job_id, name, upload, budget, digests, owner)
                except AnalysisError:
                    raise  # the client's (413 past the limit)
                except Exception as exc:
                    if out_of_room(exc):
                        # a full disk answered 500 "internal server error": nothing the client did
                        log.error("upload storage full (%s): job %s refused", exc, job_id)
                        raise StorageFull("upload storage is full; retry later") from None
                    # a bucket answering 503 or out of reach was a 500 "internal server error"
                    log.error("upload storage failed (%s: %s): job %s refused", type(exc).__name__,
                              one_line(str(exc))[:300], job_id)
                    raise StorageUnavailable("upload storage unavailable; retry later") from None
                keys[name] = key
                budget -= upload.size if upload.size is not None else 0
        except BaseException:
            # only once something may have been stored: a refusal by the header check (415, 413)
            # stored nothing, and was a 500 when a failing bucket refused the clean-up as well
            if storing:
                await self.delete_uploads(job_id)
            raise
        finally:
            for upload in uploads.values():
                await upload.close()
        return keys

    async def submit(
        self,
        submission: Submission,
        *,
        webhook_url: str | None = None,
        webhook_payload: str | None = None,
        batch_id: str | None = None,
        sync: bool = False,
        principal: Principal | None = None,
        idempotent: Idempotent | None = None,
    ) -> Accepted:
        return await self.submit_all([submission], webhook_url=webhook_url, webhook_payload=webhook_payload,
                                     batch_id=batch_id, sync=sync, principal=principal, idempotent=idempotent)

    async def submit_all(
        self,
        submissions: Sequence[Submission],
        *,
        webhook_url: str | None = None,
        webhook_payload: str | None = None,
        batch_id: str | None = None,
        sync: bool = False,
        principal: Principal | None = None,
        idempotent: Idempotent | None = None,
        checked: bool = False,
    ) -> Accepted:
        """Jobs the client is answered for at once (one, or a batch's): every upload stored first,
        then each record written and its message sent, then all of them confirmed
        (``JobStore.confirm_queued``) just before the caller answers 202.

        Until confirmed, a record is one whose submission may have stopped: a process that dies
        between record and message (or before its answer) leaves jobs the workers' recovery pass
        fails after ``job_submit_grace_s``, since the client, told nothing, submits them again.
        The uploads go first so that a batch's records and messages are written within
        milliseconds of each other, not one file's storing apart (a 1 GB file on a slow bucket
        takes minutes). Refused midway, nothing stays: uploads deleted, jobs made so far withdrawn.

        With an Idempotency-Key (``idempotent``), the key is held for this submission first: a
        key held by another is answered at once from it, with nothing stored (the first's jobs
        again, 409 while it is still being submitted, 422 for another request). Held, the hold
        is renewed while this submission is alive (:meth:`_renewing`), taken again once the
        uploads are stored, now with the request's fingerprint (their digests taken as they
        streamed), and the jobs are confirmed only while it still holds the key, which then
        names them. A submission refused gives the key back. ``checked``: every upload's header
        was checked already (a batch's, by the route), and is not read again.
        """
        if webhook_payload is not None and webhook_url is None:
            # what a webhook carries, with no webhook: dropped without a word, so a client that
            # misspelt or forgot webhook_url waited for a delivery that never came
            raise InputError("webhook_payload: given without webhook_url; it says what the webhook carries "
                             "(full or status), so give webhook_url too, or leave it out")
        keyed = _Keyed(idempotent, KeyClaim(self._key_entry(principal, idempotent.key))) \
            if idempotent is not None else None
        if keyed is not None:
            answer = await self._take_key(keyed, None, submissions, None)
            if answer is not None:
                return answer
        async with self._renewing(keyed) as renewal:
            return await self._submit_held(submissions, keyed, renewal, webhook_url=webhook_url,
                                           webhook_payload=webhook_payload, batch_id=batch_id, sync=sync,
                                           principal=principal, checked=checked)

    async def _submit_held(self, submissions: Sequence[Submission], keyed: _Keyed | None, renewal: _Renewal, *,
                           webhook_url: str | None, webhook_payload: str | None, batch_id: str | None, sync: bool,
                           principal: Principal | None, checked: bool = False) -> Accepted:
        """:meth:`submit_all` once its key (if any) is held by it."""
        stored: list[tuple[str, dict[str, str]]] = []
        digests: list[dict[str, str]] = []
        fingerprint = ""
        owner = principal.owner if principal is not None else None
        # (job id, bytes of its uploads) of each job this submission would make
        sized = [(new_job_id(), _upload_bytes(submission)) for submission in submissions]
        # admin keys too: an operator's runaway script fills Redis for every tenant as well
        quota = Quota.from_settings(self.settings)
        try:
            # a tenant at its quota is refused before a byte is stored (429); the check that holds
            # when its submissions race is the one that writes each record (create_queued).
            # After the key: a retry answered from its key is never refused by the jobs it holds
            await run_in_threadpool(self.store.check_room, owner, quota, sized)
            for submission, (job_id, _) in zip(submissions, sized):
                if keyed is not None and renewal.lost:
                    # stop storing a request whose key another took (its own retry, after this
                    # one's hold lapsed); a hold that merely lapsed is taken again
                    await self._hold_again(keyed, renewal, None)
                digests.append({})
                stored.append((job_id, await self.save_uploads(job_id, submission.audio, sync=sync,
                                                               digests=digests[-1] if keyed else None,
                                                               checked=checked, owner=owner)))
            if keyed is not None:
                # the key again, now with what the request was: taken by another meanwhile (this
                # one's hold lapsed while its uploads were stored), that one answers for it
                fingerprint = await self._fingerprint(keyed.request, submissions, digests)
                # cleared before the claim: a lapse the renewal finds after it is seen
                renewal.lost = False
                answer = await self._take_key(keyed, fingerprint, submissions, digests)
                if answer is not None:
                    await self._delete_all(stored)
                    return answer
        except BaseException:
            # the one refused cleaned up after itself (save_uploads)
            await self._delete_all(stored)
            await self._release_key(keyed)
            raise
        records: list[JobRecord] = []
        # before the first record is written: the key names the jobs no longer than it lives
        created = time.monotonic()
        try:
            late: list[str] = []
            for n, (submission, (job_id, keys)) in enumerate(zip(submissions, stored), 1):
                if keyed is not None and renewal.lost:
                    await self._hold_again(keyed, renewal, fingerprint)
                # the last one's message sent, all of them are confirmed (with a key, by the key's
                # own step below, one more thread hop)
                confirm = [*(record.job_id for record in records), job_id] if n == len(stored) and not keyed else []
                # counted against the quota with the rest of the submission, held for it from its
                # first record: a batch is refused whole, before any of its jobs exists
                record, late = await self._enqueue(submission, job_id, keys, confirm, webhook_url=webhook_url,
                                                   webhook_payload=webhook_payload, batch_id=batch_id, sync=sync,
                                                   principal=principal, quota=quota, size=sized[n - 1][1],
                                                   reserve=sized[n:] if n == 1 else ())
                records.append(record)
            if keyed is not None:
                if renewal.lost:
                    await self._hold_again(keyed, renewal, fingerprint)
                late = await self._confirm_claimed(keyed.claim, [r.job_id for r in records], batch_id, created,
                                                   fingerprint)
            # a late job failed as interrupted fails the request (503): with a key, it names the
            # jobs by now, and is given back below with them withdrawn
            await self._confirmed_late(late)
        except _ConfirmationUnknown as unknown:
            # the store failed around the confirmation and when asked whether it ran: the jobs
            # are left as they are and the key is kept (503). Ran, the key names them, confirmed
            # and live, and a retry is answered them; not run, they stay unconfirmed (no worker
            # starts one: worker/tasks.py, the recovery pass fails it after job_submit_grace_s
            # and deletes its upload) and the hold, naming no jobs and no longer renewed, lapses
            # within idempotency_reservation_s, after which a retry is a new submission.
            # Withdrawn here, a confirmation that had run left the retry a cancelled job for the
            # whole window
            raise unknown.error from None
        except BaseException:
            # refused midway (storage, job store or broker gone): what was not queued is deleted,
            # what was is withdrawn. The job store or broker that refused is likely still down, so
            # a withdrawal that fails too is logged and the rest go on (the recovery pass fails
            # what stays unconfirmed), and the client gets the first error, not the cleanup's.
            # The key is given back only once every job was withdrawn: one that was confirmed
            # (a late job's record unreadable) and not withdrawn still runs, and the key, naming
            # it, answers the retry; a hold naming none lapses by itself
            if await self._withdraw_all(stored, records, owner):
                await self._release_key(keyed)
            raise
        for submission, record in zip(submissions, records):
            with logs.bound(job_id=record.job_id, kind=submission.kind.name):
                log.info("job queued (%s)", ", ".join(f"{k}={v}" for k, v in record.files.items()) or "no uploads")
        return Accepted(records)

    async def _delete_all(self, stored: Iterable[tuple[str, dict[str, str]]]) -> None:
        for job_id, _ in stored:
            await self.delete_uploads(job_id)

    async def _withdraw_all(self, stored: Sequence[tuple[str, dict[str, str]]], records: Sequence[JobRecord],
                            owner: str | None) -> bool:
        """A refused submission's cleanup: uploads of jobs not made deleted, and the quota they
        held given back; jobs made withdrawn. True once every one was withdrawn."""
        made = {record.job_id for record in records}
        await self._delete_all([(job_id, keys) for job_id, keys in stored if job_id not in made])
        try:
            await run_in_threadpool(self.store.give_back_reserved, owner,
                                    [job_id for job_id, _ in stored if job_id not in made])
        except Exception as exc:  # noqa: BLE001 - the store that refused: they lapse by themselves
            log.warning("quota reservations not given back now (%s); they lapse within %.0f s", exc,
                        self.settings.job_submit_grace_s)
        withdrawn = True
        for record in records:
            try:
                await self.withdraw(record.job_id)
            except Exception as exc:  # noqa: BLE001
                withdrawn = False
                log.warning("job %s of a refused submission not withdrawn now (%s: %s); the recovery "
                            "pass fails it", record.job_id, type(exc).__name__, exc)
        return withdrawn

    # --- Idempotency-Key (api/idempotency.py) -----------------------------------------------
    async def _fingerprint(self, idempotent: Idempotent, submissions: Sequence[Submission],
                           digests: Sequence[Mapping[str, str]] | None) -> str:
        """The request's fingerprint: its audio's digests as taken while it was stored, or
        (``digests`` None: a request answered from its key, whose audio is never stored) read
        from the uploads as received, in a thread of the saves' own."""
        uploads: list[list[UploadPart]] = []
        for n, submission in enumerate(submissions):
            found = dict(submission.digests)
            for name, upload in submission.audio.items():
                found[name] = digests[n][name] if digests is not None else \
                    await anyio.to_thread.run_sync(digest_upload, upload, limiter=self._saves_limiter())
            # (field, file name, digest); a parsed upload (closed by now) by its field and digest
            audio = submission.audio
            uploads.append(sorted((name, audio[name].filename if name in audio else None, digest)
                                  for name, digest in found.items()))
        return idempotent.fingerprint(uploads)

    async def _take_key(self, keyed: _Keyed, fingerprint: str | None, submissions: Sequence[Submission],
                        digests: Sequence[Mapping[str, str]] | None) -> Accepted | None:
        """Hold the key for this submission (with its fingerprint once known): None once held,
        else the answer from the key (:meth:`_answer_from_key`). The request is fingerprinted
        here only when the holder's fingerprint is known: while the first is still storing, the
        answer is 409 whatever this request is, and its upload is not read for nothing."""
        for _ in range(2):
            holder = await run_in_threadpool(self.store.claim_key, keyed.claim, fingerprint)
            if holder is None:
                return None
            if holder.fingerprint is None or (fingerprint is None and holder.jobs is None):
                # the first still being submitted: 409 whatever this request is, its upload not read
                raise KeyInUse(STILL_SUBMITTING)
            if fingerprint is None:
                fingerprint = await self._fingerprint(keyed.request, submissions, digests)
            answer = await self._answer_from_key(keyed.claim, holder, fingerprint)
            if answer is not None:
                return answer
            # the jobs it named are gone, and so is the key's entry: taken anew for this one
        raise KeyInUse(STILL_SUBMITTING)

    async def _hold_again(self, keyed: _Keyed, renewal: _Renewal, fingerprint: str | None) -> None:
        """A renewal found this submission's hold gone: taken again if the key is free (it only
        lapsed: a stalled process, the store out of reach for a while), else 409 (another
        request with the key, this one's retry, holds it and answers for it). ``lost`` is
        cleared before the claim, so that a lapse the renewal (still running) finds after it
        is seen at the next step."""
        renewal.lost = False
        if await run_in_threadpool(self.store.claim_key, keyed.claim, fingerprint) is not None:
            log.warning("Idempotency-Key taken by another request while this one was being submitted; stopped")
            raise KeyInUse(TAKEN)

    async def _answer_from_key(self, claim: KeyClaim, holder: KeyHolder, fingerprint: str) -> Accepted | None:
        """The answer to a request whose key another submission holds: 422 when it was another
        request, 409 while that one is being submitted, else the jobs it made (as they are now).
        Nothing of this request was kept: its uploads were never stored, or are deleted.

        None when a job the key names is gone (a queued record past its life, evicted, a store
        restored from an older copy): its entry is deleted, and the request is a new submission,
        instead of a 404 to every retry for the rest of the key's window."""
        if holder.fingerprint is not None and holder.fingerprint != fingerprint:
            raise InputError("Idempotency-Key: already used for another request (another route, file or form "
                             "fields); send a new key for a new request")
        if holder.jobs is None:
            raise KeyInUse(STILL_SUBMITTING)
        # a batch is answered with summaries (as POST /jobs/batch is), a job with its whole record
        records = await run_in_threadpool(functools.partial(self.store.get_many, holder.jobs,
                                                            summaries=holder.batch_id is not None))
        if len(records) == len(holder.jobs):
            return Accepted(records, replayed=True)
        found = {record.job_id for record in records}
        log.warning("Idempotency-Key names jobs %s, whose records are gone; the key is free for a new submission",
                    ", ".join(job_id for job_id in holder.jobs if job_id not in found))
        await run_in_threadpool(self.store.forget_answer, claim.entry, holder.jobs)
        return None

    async def _confirm_claimed(self, claim: KeyClaim, job_ids: list[str], batch_id: str | None,
                               created: float, fingerprint: str) -> list[str]:
        """Confirm the jobs unless another request holds the key, which then names them; 409
        (the jobs withdrawn by the caller) when another took it meanwhile. Returns the late
        ones."""
        try:
            # shielded: confirmed, the jobs stay (a cancellation then comes at the route's next
            # step, and the key answers the client's retry with them), never withdrawn behind a
            # key that names them
            with anyio.CancelScope(shield=True):
                try:
                    return await run_in_threadpool(self.store.confirm_queued, job_ids, claim, batch_id, created,
                                                   fingerprint)
                except KeyLost as lost:
                    # lapsed since the last step, nobody holding it: taken again (the script never
                    # takes a free key itself), then confirmed; taken by another, 409
                    if not lost.free or await run_in_threadpool(self.store.claim_key, claim, fingerprint) is not None:
                        raise
                    return await run_in_threadpool(self.store.confirm_queued, job_ids, claim, batch_id, created,
                                                   fingerprint)
        except KeyLost:
            log.warning("jobs %s: their Idempotency-Key was taken by another request before they were confirmed; "
                        "withdrawn", ", ".join(job_ids))
            raise KeyInUse(TAKEN) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # the script may have run with its answer lost: the key then names the jobs, which
            # must run (a retry is answered them), so they are not withdrawn nor the key given back
            with anyio.CancelScope(shield=True):
                named = await self._answered_for(claim)
            if named is _UNKNOWN:
                log.error("jobs %s: whether their confirmation ran is unknown (%s); left unconfirmed (the "
                          "recovery pass fails them unless it ran), their Idempotency-Key kept",
                          ", ".join(job_ids), exc)
                raise _ConfirmationUnknown(exc) from None
            if named != tuple(job_ids):
                # it did not run (and, should it still, it finds the key given back: it confirms
                # nothing): refused as any other failure of the store
                raise
            log.warning("jobs %s: confirmed, its answer lost (%s)", ", ".join(job_ids), exc)
            # which were late is not known: each is looked at (_confirmed_late)
            return list(job_ids)

    async def _answered_for(self, claim: KeyClaim) -> tuple[str, ...] | None | object:
        """``JobStore.answered_for``, asked up to three times (a store that reset one connection
        often answers the next a moment later); _UNKNOWN when it never answered."""
        for pause in ANSWERED_FOR_PAUSES_S:
            await asyncio.sleep(pause)
            try:
                return await run_in_threadpool(self.store.answered_for, claim)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
        return _UNKNOWN

    async def _release_key(self, keyed: _Keyed | None) -> None:
        """Give the key back (a refused submission), shielded from cancellation and never as the
        request's error: a key not given back is free again after idempotency_reservation_s."""
        if keyed is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self.store.release_key, keyed.claim)
        except Exception as exc:  # noqa: BLE001
            log.warning("Idempotency-Key not given back now (%s: %s); it is free again within %.0f s",
                        type(exc).__name__, one_line(str(exc))[:300], self.settings.idempotency_reservation_s)

    @contextlib.asynccontextmanager
    async def _renewing(self, keyed: _Keyed | None) -> AsyncIterator[_Renewal]:
        """While the body runs, the key's hold is renewed every third of
        idempotency_reservation_s (``JobStore.renew_key``), so that it lapses only once this
        process is gone: held for the reservation alone, a submission storing a large upload for
        longer lost its key to its client's retry, which lost it to the next (none accepted,
        each upload stored and deleted). A renewal that finds the hold gone sets ``lost``, which
        the submission looks at between its steps."""
        renewal = _Renewal()
        if keyed is None:
            yield renewal
            return
        task = asyncio.get_running_loop().create_task(self._renew(keyed.claim, renewal))
        try:
            yield renewal
        finally:
            # not awaited: a renewal cancelled on the wire drops its connection, and one that ran
            # after the confirmation changes nothing (the key names jobs by then)
            task.cancel()

    async def _renew(self, claim: KeyClaim, renewal: _Renewal) -> None:
        """Renew until cancelled, through the asyncio client (no thread of the shared pool). A
        renewal that finds the hold gone sets ``lost`` and the loop goes on: the submission takes
        the hold again at its next step (:meth:`_hold_again`), and this keeps renewing it. Ended
        at the first lapse, a hold taken again was never renewed, and lapsed for good."""
        every = self.settings.idempotency_reservation_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                held = await self.store.arenew_key(self.store_async(), claim)
            except Exception as exc:  # noqa: BLE001 - the next renewal, or the confirmation, tells
                log.warning("Idempotency-Key hold not renewed now (%s: %s)", type(exc).__name__,
                            one_line(str(exc))[:300])
                continue
            if not held:
                renewal.lost = True

    async def _enqueue(self, submission: Submission, job_id: str, keys: dict[str, str], confirm: list[str], *,
                       webhook_url: str | None, webhook_payload: str | None, batch_id: str | None, sync: bool,
                       principal: Principal | None, quota: Quota, size: int,
                       reserve: Sequence[tuple[str, int]]) -> tuple[JobRecord, list[str]]:
        """The job's record (unconfirmed; within the tenant's ``quota`` with its ``size`` and
        the submission's jobs to ``reserve``, see ``JobStore.create_queued``), then its message,
        then the jobs ``confirm`` names are confirmed; returns the record and those confirmed
        late (``JobStore.confirm_queued``)."""
        record = JobRecord(
            job_id=job_id, kind=submission.kind.name, webhook_url=webhook_url, batch_id=batch_id, sync=sync,
            # what the webhook carries; only a job with a webhook has one
            webhook_payload=(webhook_payload or "full") if webhook_url else None,
            filename=_first_filename(submission), owner=principal.owner if principal is not None else None,
            params=submission.params.model_dump(mode="json", exclude=set(submission.kept_apart)),
            kept_apart=dict(submission.kept_apart), files=keys, urls=dict(submission.urls),
            queue=self.settings.queue_name, request_id=logs.current("request_id"),
        )
        try:
            # the priority level of its message, decided with the record from its tenant's waiting
            # jobs (shared/queue.py, fair_priority): another tenant's first job overtakes a backlog
            record, level = await run_in_threadpool(functools.partial(
                self.store.create_queued, record, quota=quota, size=size, reserve=reserve))
        except BaseException:
            # job store down (503), or the tenant's quota (429): no job exists, so no upload may stay behind
            await self.delete_uploads(job_id)
            raise
        try:
            late = await run_in_threadpool(self._send, submission.kind, job_id, confirm, level)
        except Exception as exc:  # noqa: BLE001 - broker down: the job never existed for a worker
            # failed as the recovery pass fails an interrupted submission (with the same words, and
            # out of the unconfirmed); should the job store fail this too, the pass does it later
            await self.delete_uploads(job_id)
            try:
                await run_in_threadpool(self.store.fail_interrupted, job_id)
            except Exception as store_exc:  # noqa: BLE001 - the client gets the broker's 503 all the same
                log.warning("job %s not failed now (%s); the recovery pass fails it", job_id, store_exc)
            # the broker's own words stay in the log: they name queues and commands, not the client's error
            log.error("could not enqueue or confirm job %s: %s", job_id, exc)
            if refuses_writes(exc):
                # the broker is the job store's Redis: full (or read-only) for the message as it
                # may be for the record, which of the two writes hits it first is chance; one answer
                raise StoreRefused(STORE_REFUSED) from exc
            raise ModelError("job queue unavailable, retry later") from exc
        return record, late

    def _send(self, kind: JobKind, job_id: str, confirm: list[str], level: int = 0) -> list[str]:
        """Send the job's message at priority ``level``, then confirm ``confirm``, in one thread hop: on a
        loaded API a hop costs more than the command (a hop of its own put 2-3 ms on a 10 ms accept)."""
        send_job(self.celery, kind, job_id, self.settings.queue_name, level)
        return self.store.confirm_queued(confirm)

    async def _confirmed_late(self, late: list[str]) -> None:
        """503 when the recovery pass failed a job just queued before it was confirmed (the
        submission took longer than ``job_submit_grace_s``: a stalled process), so that the client
        never holds a 202 for a job that says its submission was interrupted."""
        for job_id in late:
            record = await run_in_threadpool(self.store.get, job_id)
            # not unconfirmed any more but not failed by the pass: it ended by itself meanwhile
            # (run at once by an idle worker, while this process stalled), which the client may see
            if record is None or (record.status == FAILED and record.error is not None
                                  and record.error.detail == INTERRUPTED_SUBMISSION):
                log.error("job %s: failed by the recovery pass before its submission was confirmed", job_id)
                raise ModelError(INTERRUPTED_SUBMISSION)

    async def check_audio_limits(self, uploads: Iterable[UploadFile], *, sync: bool, of_several: bool = False,
                                 owner: str | None = None) -> None:
        """Duration and sample rate from the container header, before any worker decodes.

        A file that neither libsndfile nor FFmpeg opens as audio, or that has no audio stream, is
        refused here (415, the file named): it was left to the worker ("cannot be read" was taken
        for "let it through"), so a text file, a web page, a picture or a silent video was
        answered 202, stored and queued, and failed in the worker with the same 415, a batch
        holding one such file queued the others. A header that went unread for the check's own
        reasons (shared.audio_limits.audio_header: None) is still left to the worker's decoder.
        Any other refusal names the file too where there are several (``of_several``: a batch's).
        """
        limit = min(self.settings.sync_max_audio_seconds, self.settings.max_audio_seconds) if sync \
            else self.settings.max_audio_seconds
        hint = SYNC_HINT if sync else ""
        budget = DurationBudget(limit, hint)
        uploads = list(uploads)
        for upload in uploads:
            name = (upload.filename or "")[:100]
            if await _is_empty(upload):
                # nothing a worker could decode: refused here, as the synchronous route's worker did
                raise AudioDecodeError(f"uploaded file {name!r} is empty")
            lane, tenant = await self._check_lane(upload, owner)
            try:
                # off the shared pool, in the lane of the reader it needs, within the tenant's share
                async with tenant:
                    info = await anyio.to_thread.run_sync(functools.partial(
                        check_audio_limits, upload.file, max_duration=limit,
                        min_sample_rate=self.settings.min_sample_rate, hint=hint, sandbox=self.settings.probe_limits(),
                    ), limiter=lane)
            except NotAudioError as exc:
                # which of a batch's (or an enrollment's) files it is
                raise exc.about(f"uploaded file {name!r}") from None
            except InputError as exc:
                # too long, too low a rate, a header past its limits: of several files, which one
                # (a batch of 40 answered "audio is 7300 s long" left the caller to find it)
                if of_several or len(uploads) > 1:
                    raise exc.about(f"uploaded file {name!r}") from None
                raise
            budget.add(info)

    async def _check_lane(self, upload: UploadFile, owner: str | None) -> tuple[anyio.CapacityLimiter, Any]:
        """The limiter an upload's header check runs under (MAX_CONCURRENT_CHECKS for what
        libsndfile reads by its first bytes, MAX_CONCURRENT_PROBES for the rest: FFmpeg's), and
        ``owner``'s share of it to hold meanwhile (nothing to hold without API keys)."""
        if self._probes is None:
            self._probes = anyio.CapacityLimiter(MAX_CONCURRENT_PROBES)
            self._checks = anyio.CapacityLimiter(MAX_CONCURRENT_CHECKS)
        head = await upload.read(4)
        await upload.seek(0)
        libsndfile = head in _LIBSNDFILE_MAGIC
        lane = self._checks if libsndfile else self._probes
        if owner is None:
            return lane, contextlib.nullcontext()  # type: ignore[return-value]
        share = MAX_CHECKS_PER_TENANT if libsndfile else MAX_PROBES_PER_TENANT
        return lane, self._tenant_checks.setdefault((owner, libsndfile),  # type: ignore[return-value]
                                                    anyio.CapacityLimiter(share))

    # --- the synchronous contract -----------------------------------------------------------
    async def has_worker(self) -> bool:
        """True while a worker that can run jobs heartbeats for this API's queue: one EXISTS of
        the key the workers keep alive (worker/lifecycle.py, announce_queues), which lapses with
        the heartbeats (3 heartbeat intervals, as /health's). A worker still loading its models
        counts, one whose models failed to load does not."""
        key = self.store.consumers_key(self.settings.queue_name)
        if await self.store_async().exists(key):
            return True
        return await self._legacy_worker()

    async def _legacy_worker(self) -> bool:
        """A worker of a version before the queues' keys heartbeats (a rolling upgrade that
        brought this API up before its workers): its heartbeat names no queues, and it is taken
        for this queue's, as every synchronous call waited for it before. Without this, such an
        upgrade answered every synchronous call 503 until the workers caught up. The heartbeats
        are found by a SCAN, so only where the key is missing, and the answer is kept 5 s."""
        answer, until = self._legacy
        if time.monotonic() < until:
            return answer
        workers = await run_in_threadpool(self.store.workers)
        answer = any("queues" not in w and w.get("loads_models", True) and not w.get("load_error") for w in workers)
        self._legacy = (answer, time.monotonic() + 5.0)
        return answer

    async def key_in_use(self, principal: Principal | None, key: IdempotencyKey | None) -> bool:
        """Whether ``key`` already names a submission of this caller's: its retry is answered from
        the key, so a check made before the submission (the quota's, ahead of the headers) must
        not refuse it for the room that submission itself took."""
        if key is None:
            return False
        return bool(await run_in_threadpool(self.store.redis.exists, self._key_entry(principal, key)))

    def _key_entry(self, principal: Principal | None, key: IdempotencyKey) -> str:
        """Where ``key`` of this caller lives in Redis (keys are each tenant's own)."""
        return self.store.key_entry(principal.owner if principal is not None else None, key.value)

    async def require_worker(self) -> None:
        """503 with Retry-After when no worker could take a synchronous call's job now."""
        if self.settings.sync_requires_live_worker and not await self.has_worker():
            raise _no_worker()

    async def run_sync(self, submission: Submission, principal: Principal | None = None,
                       request: Request | None = None, idempotent: Idempotent | None = None) -> JobRecord:
        """Submit the job and wait for it to succeed: its record, the result in it (the job's id
        names what an enrollment stores). With an Idempotency-Key (``idempotent``), a retry of the
        same request is answered from the key as the jobs routes' are, here by waiting for the
        first's job (``request.state.idempotent_replayed`` set): a client whose connection dropped
        and that retried ran its audio a second time. A job the key names that was cancelled (the
        first's wait gave up: no worker, its timeout, the store failing; or a cancel) is given up
        with its key, and the retry is a new submission."""
        for _ in range(2):
            accepted = await self.submit(submission, sync=True, principal=principal, idempotent=idempotent)
            record = accepted.record
            if not (accepted.replayed and idempotent is not None and record.status == CANCELLED):
                break
            await run_in_threadpool(self.store.forget_answer, self._key_entry(principal, idempotent.key),
                                    (record.job_id,))
        if accepted.replayed and request is not None:
            request.state.idempotent_replayed = True
        job_id, abandoned = record.job_id, False
        if idempotent is None:
            self._sync_waits.add(job_id)
        try:
            # with a key, the job outlives a client that hangs up: its retry is answered the result
            record = await self.wait(job_id, self.settings.sync_timeout_s, request,
                                     keep_on_disconnect=idempotent is not None)
        except asyncio.CancelledError:
            # the server is stopping and gave up on this call (http_shutdown_grace_s): its client
            # submits again, elsewhere, so the job must not run for nobody as well, as when a
            # client hangs up. Not cancelled here: the server goes on to the lifespan's shutdown
            # without waiting for this task; close() cancels it there (it stays in _sync_waits).
            # A keyed call's job runs on: its retry with the key is answered its result
            abandoned = True
            task = asyncio.current_task()
            if task is None:
                raise
            # answered 503 in the documented shape, which clients retry (cli.client does), where
            # the cancellation reached uvicorn as a text/plain 500 "Internal Server Error"
            task.uncancel()
            retry = "retry with the same Idempotency-Key: it is answered this call's job" if idempotent is not None \
                else "its job was cancelled; submit it again"
            raise ModelError(f"the API stopped before this call's job ended; {retry}", status_code=503) from None
        except (redis.ConnectionError, redis.TimeoutError):
            # the client is told to retry (503): the job it never heard of must not run as well
            # (a retry ran it twice); best effort, as the store may be gone for this cancel too
            try:
                await self._cancel_quietly(record.job_id)
            except Exception as exc:  # noqa: BLE001
                log.warning("sync job %s not cancelled after its wait failed: %s", record.job_id, exc)
            raise
        finally:
            if not abandoned:
                self._sync_waits.discard(job_id)
        if record.status == FAILED:
            raise AnalysisError.from_body(record.error or {})
        if record.status == CANCELLED:
            raise JobConflict("job was cancelled")
        return record

    async def wait(self, job_id: str, timeout_s: float, request: Request | None = None, *,
                   keep_on_disconnect: bool = False) -> JobRecord:
        """Poll the record until the job ends (synchronous endpoints).

        A client that hangs up gets its job cancelled: nobody is left to read the result, and
        the worker should not spend an hour on it. Unless it sent an Idempotency-Key
        (``keep_on_disconnect``): its retry with the key waits for this job and is answered it.
        """
        deadline = time.monotonic() + timeout_s
        interval = self.settings.sync_poll_interval_s
        steady_until = time.monotonic() + SYNC_POLL_STEADY_S
        # the call was taken with a worker live (require_worker); once a heartbeat interval
        # passed with the job still queued, whether one still is, at most once an interval
        recheck_s = self.settings.worker_heartbeat_interval_s
        next_check = time.monotonic() + recheck_s
        aredis = self.store_async()
        key = self.store.key("job", job_id)
        while True:
            raw = await aredis.get(key)
            if raw is None:
                # the store lost it (evicted under maxmemory, flushed, a failover to a replica
                # behind): the service's own state, to retry, where 404 "disappeared" with
                # error_type ValidationError put it on the client
                raise ModelError(f"job {job_id}'s record was lost by the job store; retry", status_code=503)
            record = JobRecord.from_json(raw)
            if record.ended:
                return record
            # a job that ends between the read above and the cancel below is not cancelled: its
            # outcome is read on the next turn (a result that came in as the deadline passed was
            # answered 504, and the client, told of no job, ran it again)
            if time.monotonic() >= deadline:
                if await self._cancel_quietly(job_id):
                    raise SyncTimeout(f"no result within {timeout_s:.0f} s; submit long audio to /jobs instead")
                continue
            if request is not None and await request.is_disconnected():
                if keep_on_disconnect:
                    log.info("sync client of job %s disconnected: the job runs on for its Idempotency-Key's retry",
                             job_id)
                    raise JobConflict("client disconnected; the job runs on, a retry with its Idempotency-Key "
                                      "is answered its result")
                log.info("sync client of job %s disconnected: cancelling it", job_id)
                if await self._cancel_quietly(job_id):
                    raise JobConflict("client disconnected; job cancelled")
                continue
            if record.status == QUEUED and self.settings.sync_requires_live_worker and time.monotonic() >= next_check:
                next_check = time.monotonic() + recheck_s
                # every worker of the queue gone (their heartbeats lapsed) with the job not yet
                # taken: nobody will run it within the hour the call would wait for its 504
                if not await self.has_worker():
                    log.warning("sync job %s: no live worker for queue %s; cancelling it", job_id,
                                self.settings.queue_name)
                    if await self._cancel_quietly(job_id):
                        raise _no_worker()
                    continue
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
            if time.monotonic() >= steady_until:
                interval = min(interval * 1.5, max(SYNC_POLL_MAX_S, self.settings.sync_poll_interval_s))

    async def _cancel_quietly(self, job_id: str) -> bool:
        """Cancel the job: True, or False when it ended meanwhile."""
        try:
            await self.cancel(job_id)
        except JobConflict:
            return False
        return True

    def store_async(self):
        import redis.asyncio

        if self._aredis is None:
            # the service's reply and connect timeouts (shared/queue.py), as the job store's: none
            # at all in the redis-py 5.x releases pyproject.toml allows, where a connection whose
            # Redis went away without closing it held its request for ever
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.settings.redis_url, decode_responses=True, max_connections=REDIS_POOL_CONNECTIONS,
                timeout=REDIS_POOL_WAIT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_keepalive=True)
            self._aredis = redis.asyncio.Redis(connection_pool=pool)
        return self._aredis

    # --- read and cancel --------------------------------------------------------------------
    def get(self, job_id: str, principal: Principal | None = None) -> JobRecord:
        # anything but an id we made is unknown: never read as a key (``<id>:lease`` is a running
        # job's lease, whose value is no record: that was a 500)
        record = self.store.get(job_id) if is_job_id(job_id) else None
        # another tenant's job is answered exactly like a missing one: its existence is not told
        if record is None or (principal is not None and not principal.can_see(record)):
            raise not_found("job", job_id, "unknown or expired")
        return record

    def get_split(self, job_id: str, principal: Principal | None = None) -> tuple[JobRecord, str | None]:
        """:meth:`get` with the result apart, as its stored JSON text (``JobStore.get_split``)."""
        split = self.store.get_split(job_id) if is_job_id(job_id) else None
        if split is None or (principal is not None and not principal.can_see(split[0])):
            raise not_found("job", job_id, "unknown or expired")
        return split

    async def aget(self, job_id: str, principal: Principal | None = None) -> JobRecord:
        """:meth:`get` off the event loop (the routes' way to read a record)."""
        return await run_in_threadpool(self.get, job_id, principal)

    async def cancel(self, job_id: str, principal: Principal | None = None) -> JobRecord:
        record = await self.aget(job_id, principal)
        if record.ended:
            raise JobConflict(f"job {job_id} already {record.status}")
        # notify: the delivery is owed (its due time in Redis) in the cancel's own transaction,
        # so an API that dies before send_webhook below leaves it to the workers' recovery pass
        cancelled, changed = await run_in_threadpool(self.store.finish, job_id, CANCELLED, notify=True)
        if not changed or cancelled is None:
            raise JobConflict(f"job {job_id} already {cancelled.status if cancelled else 'gone'}")
        # a queued job is dropped by the worker that receives it (revoke, plus the task's own
        # check of the record); a running diarization stops at its next progress report. The
        # cancel has happened: a broker failing now (a blip) answered it 5xx, and a client that
        # retried was told 409 "already cancelled". The revoke is a courtesy (the task checks
        # the record), and an owed delivery is sent by the workers' recovery pass (its due time
        # was written with the cancel)
        try:
            await run_in_threadpool(self.celery.control.revoke, job_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s cancelled but not revoked (%s): its worker skips it by its record", job_id, exc)
        await self.delete_uploads(job_id)
        if cancelled.webhook_url:
            try:
                await run_in_threadpool(send_webhook, self.celery, job_id, self.settings)
            except Exception as exc:  # noqa: BLE001
                log.warning("job %s cancelled; its webhook not queued now (%s): the recovery pass sends it",
                            job_id, exc)
        return cancelled

    async def withdraw(self, job_id: str) -> None:
        """Cancel a job the client was never told of (a refused batch's): no webhook, no error."""
        _, changed = await run_in_threadpool(functools.partial(self.store.finish, job_id, CANCELLED, unannounced=True))
        await self.delete_uploads(job_id)
        if changed:
            # a courtesy to the worker that would take it (which skips an ended job anyway): the
            # broker that refused the batch may refuse this too
            try:
                await run_in_threadpool(self.celery.control.revoke, job_id)
            except Exception as exc:  # noqa: BLE001
                log.warning("job %s withdrawn but not revoked (%s)", job_id, exc)

    async def delete_uploads(self, job_id: str) -> None:
        """Delete a job's uploads in a thread, shielded from cancellation, and never as the
        request's error.

        On the event loop, an S3 bucket's two requests (with botocore's retries) held every
        other request of every client for as long as the bucket took: 6 s of a frozen API for
        one cancel with a bucket 3 s slow a call. A bucket that failed them turned a cancel that
        had happened into a 500 (its webhook never sent) and a refused upload's 415 into one.
        What stays behind is swept by the workers after ``upload_expires_s``."""
        try:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self.storage.delete_job, job_id)
        except Exception as exc:  # noqa: BLE001 - the sweep removes what is left
            log.warning("uploads of job %s not deleted now (%s: %s); the workers' sweep removes them",
                        job_id, type(exc).__name__, one_line(str(exc))[:300])

    async def close(self) -> None:
        """At the server's shutdown: cancel the jobs of the synchronous calls it gave up on
        (run_sync: those still waiting), then close the Redis client."""
        while self._sync_waits:
            job_id = self._sync_waits.pop()
            try:
                if await self._cancel_quietly(job_id):
                    log.info("sync job %s cancelled: the API stopped before its call was answered", job_id)
            except Exception as exc:  # noqa: BLE001 - the others are still to be cancelled
                log.warning("sync job %s not cancelled as the API stopped: %s", job_id, exc)
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = None


def _no_worker() -> HTTPException:
    # 503 in the documented shape (api/errors.py: error_type ModelError, the service's state)
    return HTTPException(
        503, "no worker is running to take this job; retry later, or submit it as a job (POST /jobs/...), "
        "which waits in the queue until a worker is up",
        headers={"Retry-After": str(NO_WORKER_RETRY_AFTER_S)})


async def _is_empty(upload: UploadFile) -> bool:
    if upload.size is not None:
        return upload.size == 0
    head = await upload.read(1)
    await upload.seek(0)
    return not head


def _upload_bytes(submission: Submission) -> int:
    """What the submission's uploads will hold in storage (audio by URL is fetched by the worker)."""
    return sum(upload.size or 0 for upload in submission.audio.values())


def _first_filename(submission: Submission) -> str | None:
    """The name of the kind's first audio: the upload's file name, or the URL path's last part."""
    for spec in submission.kind.audio_files:
        # a multiple-file field's first file is <name>.0
        for name in (spec.name, f"{spec.name}.0"):
            if name in submission.audio:
                # as a URL's name (filename_of): one line of printable text, at most 255 long; a
                # client's "evil\u202evaw.exe" read as another name on the page and in listings
                return file_name(submission.audio[name].filename or "")
        if spec.name in submission.urls:
            return filename_of(submission.urls[spec.name])
    return None


def _status_url(record: JobRecord, base_url: str) -> str:
    return f"{base_url}/jobs/{record.job_id}"


def view(record: JobRecord, base_url: str = "") -> dict[str, Any]:
    """The record as a client sees it, with where to poll it."""
    return {**record.public(), "status_url": _status_url(record, base_url)}


def view_json(record: JobRecord, result: str | None, base_url: str = "") -> bytes:
    """:func:`view` as a response body, with the result's stored JSON text (``JobStore.get_split``)
    set in as it is: a long diarization's result is megabytes, and turning it into objects and
    back held the GIL, so every other request of the API, for a third of a second a poll."""
    body = view(record, base_url)
    body.pop("result", None)
    head = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f'{head[:-1]},"result":{result or "null"}}}'.encode()


def summary_view(record: JobRecord, base_url: str = "") -> dict[str, Any]:
    """A job as a listing shows it (GET /jobs, the batch routes): the record without its result,
    with where to poll it and, once it succeeded, where its result is."""
    url = _status_url(record, base_url)
    return {**record.summary(), "status_url": url, "result_url": f"{url}/result" if record.status == SUCCEEDED else None}
