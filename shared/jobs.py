"""Job records in Redis: the small piece of state that status, list, cancel and webhooks read.

The Celery task id *is* the job id, so Celery's own primitives (``AsyncResult``, ``revoke``)
address the same job. The record is the source of truth for what a client sees because it
outlives worker restarts and carries what Celery's result does not (kind, webhook, cancel).

Every status change goes through :meth:`JobStore.update` (a WATCH/MULTI transaction), and a
terminal status is never overwritten: a job cancelled while running stays cancelled even when
the worker finishes it, and a redelivered job that already finished is not run again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Literal, Sequence

import redis
from pydantic import BaseModel, ConfigDict, Field, create_model

from shared.errors import InputError, ModelError, QuotaExceeded
from shared.queue import PRIORITY_STEPS, REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S, level_thresholds
from shared.record_heads import RecordHeads
from shared.schemas import JobError
from shared.settings import Settings, get_settings

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
WebhookPayload = Literal["full", "status"]
# upper bounds (seconds) of the job duration histogram kept in Redis for /metrics
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 10800.0)
# worker seconds per hour of audio: 6 s is 600x real time, 3600 s is real time
PER_AUDIO_HOUR_BUCKETS = (2.0, 6.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_job_id() -> str:
    return uuid.uuid4().hex


# what new_job_id makes (batch ids too): 32 lowercase hex digits
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def is_job_id(value: str) -> bool:
    """True for an id this service could have made. A job id from a client names a Redis key
    (``<prefix>:job:<id>``): ``<id>:lease`` would name a running job's lease instead."""
    return bool(_JOB_ID.match(value or ""))


class WebhookState(BaseModel):
    status: Literal["pending", "retrying", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_error: str | None = None
    delivered_at: str | None = None


def _internal(description: str, default: Any = None, **kw: Any) -> Any:
    # stored under "_<name>" (records written before they were typed keep reading) and never
    # shown: JobRecord.public() leaves every internal field out
    if "default_factory" not in kw:
        kw["default"] = default
    return Field(description=description, json_schema_extra={"internal": True}, **kw)


class JobRecord(BaseModel):
    """A job as stored in Redis. The public fields are what GET /jobs/{id} shows."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", validate_assignment=True)

    job_id: str
    kind: str
    status: Status = QUEUED
    created_at: str = Field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = 0.0
    step: str | None = None
    attempts: int = 0
    result: dict[str, Any] | None = None
    error: JobError | None = None
    webhook_url: str | None = None
    webhook: WebhookState | None = None
    # "full": the webhook carries the record with its result; "status": without it
    webhook_payload: WebhookPayload | None = None
    batch_id: str | None = None
    filename: str | None = None
    sync: bool = False

    # the tenant (a digest of its API key): only it sees the job (api.deps.Principal)
    owner: str | None = _internal("tenant", alias="_owner")
    # what the worker needs to run the job, validated by its kind's parameter model at submit;
    # kept here, not in the Celery message, so the broker, its result backend and Flower carry
    # only the job id
    params: dict[str, Any] = _internal("kind parameters", alias="_params", default_factory=dict)
    # upload field -> storage key of the audio the worker decodes
    files: dict[str, str] = _internal("uploads", alias="_files", default_factory=dict)
    # audio field -> the URL the worker fetches it from (shared/url_input.py); internal because
    # a presigned URL carries its credentials
    urls: dict[str, str] = _internal("audio by URL", alias="_urls", default_factory=dict)
    # parameter -> digest of its value, kept apart from the record (JobStore.keep_apart): a
    # lookup's resolved value (200 voiceprints, 0.86 MB) stored once for every job naming it,
    # instead of in each record, re-parsed on every poll and listing
    kept_apart: dict[str, str] = _internal("parameters kept apart", alias="_kept_apart", default_factory=dict)
    # the queue it was sent to: a job recovered by another worker goes back there, not to the
    # recovering worker's own queue (another pool, another kind of device)
    queue: str | None = _internal("queue", alias="_queue")
    # the HTTP request that created the job: its log lines in API and worker carry it
    request_id: str | None = _internal("request id", alias="_request_id")
    # attempts whose worker died (counted towards job_max_attempts)
    lost: int = _internal("lost attempts", 0, alias="_lost")
    created_ts: float = _internal("epoch seconds", 0.0, alias="_created_ts")
    started_ts: float | None = _internal("epoch seconds", alias="_started_ts")
    finished_ts: float | None = _internal("epoch seconds", alias="_finished_ts")
    # epoch seconds the record never outlives (JobStore.horizon_s after its creation): what it
    # names (index entries, its batch's list, values kept apart) was stored to outlive it. None:
    # written before records' lifetimes followed their status (they keep the TTL they were given)
    expires_by: float | None = _internal("epoch seconds", alias="_expires_by")

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict[str, Any]:
        """What a client sees (API, webhook): no internal field."""
        return self.model_dump(mode="json", exclude=_INTERNAL)

    def summary(self) -> dict[str, Any]:
        """What a listing shows (GET /jobs, GET /batches/{id}): the public fields but the result,
        whose body can be megabytes per job; GET /jobs/{id} and its /result carry it."""
        return self.model_dump(mode="json", exclude=_INTERNAL | {"result"})

    def to_json(self) -> str:
        # the result last: a listing reads each record up to it and no further
        # (JobStore.get_many with summaries); every other field keeps its order
        head = self.model_dump_json(by_alias=True, exclude={"result"})
        return f"{head[:-1]},{self.model_dump_json(include={'result'})[1:]}"

    @classmethod
    def from_json(cls, raw: str | bytes) -> "JobRecord":
        record = cls.model_validate_json(raw)
        if not record.files and not record.urls:
            record = _upgrade(record)
        return record


_INTERNAL = frozenset(
    name for name, f in JobRecord.model_fields.items() if (f.json_schema_extra or {}).get("internal")
)


# A record read for a listing: every field but the result, which is skipped while parsing (a
# diarization's result is most of its record: 1 MB for 20,000 turns, parsed 6 times faster without)
_JobSummaryRecord = create_model(  # type: ignore[call-overload]
    "_JobSummaryRecord", __config__=ConfigDict(populate_by_name=True, extra="ignore"),
    **{name: (f.annotation, f) for name, f in JobRecord.model_fields.items() if name != "result"},
)


# a record's fields but its result: about 1 KB; URLs, a stored embedding's numbers and long
# names make it longer (at most some 25 KB, read whole past this)
_SUMMARY_HEAD_BYTES = 32768


def _summary_from_json(raw: str | bytes) -> JobRecord:
    """The record without its result (None): for listings, never for anything that writes it back."""
    return JobRecord.model_construct(**dict(_JobSummaryRecord.model_validate_json(raw)))


# Where a record's result begins, in the form JobRecord.to_json writes: its last other field, then
# the result. A match whose head does not parse as a whole object is not at the top level (a
# marker's quotes are escaped inside a string, and one inside a nested object leaves the head
# unclosed), so a head that parses places the result exactly.
_RESULT_STARTS = re.compile(r'"_expires_by":(?:null|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?),"result":')


def split_result(raw: str) -> tuple[JobRecord, str | None] | None:
    """The record without its result (a read-only copy, as :func:`_summary_from_json` gives) and
    the result's JSON text as stored, unparsed (None for no result); None for a record stored in
    another form (an earlier release's), which the caller reads whole.

    A diarization of 150,000 turns is an 8 MB record: parsing it (95 ms), dumping it back for a
    response (75 ms) and encoding that (144 ms) each held the GIL throughout, so four clients
    fetching such a result held every other request of the API, /health included, for a second
    on a loaded 2-core host. Its text is what a response carries anyway."""
    found = _RESULT_STARTS.search(raw)
    if found is None or not raw.endswith("}"):
        return None
    try:
        record = _summary_from_json(raw[:found.end() - len(',"result":')] + "}")
    except ValueError:  # pydantic's ValidationError: the match was not at the top level
        return None
    text = raw[found.end():-1]
    return record, (None if text == "null" else text)


def _upgrade(record: JobRecord) -> JobRecord:
    """Records written before kinds were declared once kept upload keys among the parameters."""
    from shared.kinds import KINDS

    kind = KINDS.get(record.kind)
    if kind is None:
        return record
    names = {f.name for f in kind.files}
    files = {k: v for k, v in record.params.items() if k in names and isinstance(v, str)}
    if not files:
        return record
    params = {k: v for k, v in record.params.items() if k not in files}
    return record.model_copy(update={"files": files, "params": params})


# What a job whose client was never told of it keeps of its webhook: nothing. A submission
# interrupted before its 202, a batch's job withdrawn when the batch was refused: a worker that
# later took its message found it ended and sent its webhook, about a job id nobody was given.
_UNANNOUNCED: dict[str, Any] = {"webhook_url": None, "webhook": None, "webhook_payload": None}


# Values kept apart outlive every record that names them by this much: a record is written after
# its value (a batch's last record after all of its files were stored, which for 1 GB on slow
# storage takes minutes) and never outlives JobStore.horizon_s after that (its expires_by),
# whatever happens to the job in between (queue wait, redelivery, recovery).
KEPT_APART_MARGIN_S = 3600

# What a job whose submission was interrupted between its record and its queue message says
# (failed by the workers' recovery pass, or by the API when the broker refused the message): the
# client was never answered 202, and submits it again.
INTERRUPTED_SUBMISSION = "the submission was interrupted before the job was queued; submit it again"


def _epoch(time_reply: tuple[int, int]) -> float:
    """Redis's TIME reply (seconds, microseconds) as epoch seconds."""
    seconds, micros = time_reply
    return seconds + micros / 1e6


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# A stored record begins with its job id, kind and status, in JobRecord's field order
# (``{"job_id":"<32 hex>","kind":"compare_embedding","status":"succeeded",...``: at most 92
# bytes, all ASCII, so a cut at _HEAD_BYTES never splits a character). JobStore.count_by_status
# reads only that head.
_HEAD_BYTES = 128
_STATUS_HEAD = re.compile(r'^\{"job_id":"[0-9a-f]{32}","kind":"[a-z_]{1,32}","status":"([a-z]+)"')


@dataclass(frozen=True)
class Quota:
    """A tenant's limits on its unfinished work (``tenant_max_unfinished_*``): jobs queued or
    running, and the bytes of uploads stored for them. 0: no limit."""

    max_jobs: int = 0
    max_bytes: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Quota":
        return cls(settings.tenant_max_unfinished_jobs, settings.tenant_max_unfinished_bytes)


@dataclass(frozen=True)
class KeyClaim:
    """One submission's hold on an Idempotency-Key (``JobStore.claim_key``): its entry in Redis
    (``JobStore.key_entry``) and the token that tells this submission from another with the key."""

    entry: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class KeyHolder:
    """What holds a key another submission claimed: its request's fingerprint (None while not
    yet known) and, once its jobs were confirmed, their ids (None: still being submitted)."""

    fingerprint: str | None
    jobs: tuple[str, ...] | None
    batch_id: str | None


class KeyLost(Exception):
    """A submission's hold on its Idempotency-Key was gone when its jobs were to be confirmed:
    taken by another, or (``free``) lapsed with nobody holding it."""

    def __init__(self, entry: str, free: bool = False) -> None:
        super().__init__(entry)
        self.free = free


# ARGV: token, fingerprint ('' unknown), hold in ms. Free (or held by this token already): held
# by it, nil returned; else what holds it: token, fingerprint, jobs, batch.
_CLAIM_KEY = """
local held = redis.call('HMGET', KEYS[1], 'token', 'fingerprint', 'jobs', 'batch')
if (held[1] == false or held[1] == ARGV[1]) and held[3] == false then
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fingerprint', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return nil
end
return held
"""
# ARGV: token, hold in ms. The hold extended while this token has it and it names no jobs yet: 1;
# else 0 (lapsed, taken by another, or answered already)
_RENEW_KEY = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'jobs') == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: the unconfirmed, the key's entry; ARGV: token, jobs (JSON), batch, answer's life in ms,
# fingerprint, job ids. -1 when another token holds the key; else ZREM's answer per job, and the key
# names the jobs, late ones too: the caller fails the request if a late one was failed as
# interrupted, and then withdraws them and gives the key back (naming them only when none was
# late left a 202 whose key named nothing, should the hold lapse before a second step). -2 when
# the key is free: confirmed only while this token holds it, never taken anew here, since a
# script delayed on the wire (its caller saw a timeout, asked answered_for, heard "not run",
# withdrew the jobs and gave the key back) would run after that and name the cancelled jobs for
# the whole window. The submission renews its hold while alive and takes a lapsed one again
# itself (claim_key) before it confirms
_CONFIRM_CLAIMED = """
local token = redis.call('HGET', KEYS[2], 'token')
if token == false then return -2 end
if token ~= ARGV[1] then return -1 end
local removed = {}
for i = 6, #ARGV do
  removed[#removed + 1] = redis.call('ZREM', KEYS[1], ARGV[i])
end
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'fingerprint', ARGV[5], 'jobs', ARGV[2], 'batch', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return removed
"""
# ARGV: token. Deleted only while this token holds it (named jobs too: a submission refused after
# its confirmation, cancelled in its last step, withdrew them)
_RELEASE_KEY = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# ARGV: jobs (JSON). Deleted only while it still names these jobs (not another submission's key
# taken meanwhile)
_FORGET_ANSWER = """
if redis.call('HGET', KEYS[1], 'jobs') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class JobPage:
    """One page of a listing, newest first; ``next_cursor`` None on the last. A page filtered by
    status or kind may hold fewer than its limit (even none) and still have a next page: each
    looks through a bounded stretch of the index (``JobStore.recent_page``)."""

    jobs: list[JobRecord]
    next_cursor: str | None


# A tenant's unfinished jobs (queued or running; JobStore "tenants' quota"): a sorted set of job
# ids (KEYS[1]) scored by when each record expires at the latest (its life in its status, as
# update sets it), beside a hash (KEYS[2]) of the bytes of uploads each holds in storage and their
# total ('-total'). A job leaves both when it ends (update, _LEAVE_UNFINISHED); an entry whose
# record expired or was lost (evicted, a removal missed) is dropped once past its score, so a
# slot can never stay taken for longer than a record could live. Shared by the scripts below.
_UNFINISHED_LIB = """
-- a count of bytes as Redis takes it: a Lua number past 10^7 goes out as 1e+12, which HINCRBY refuses
local function int(n) return string.format('%d', n) end
local function trim(unfinished, sizes, now)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', unfinished, '-inf', now)) do
    local size = redis.call('HGET', sizes, gone)
    if size then
      redis.call('HDEL', sizes, gone)
      redis.call('HINCRBY', sizes, '-total', '-' .. size)
    end
  end
  redis.call('ZREMRANGEBYSCORE', unfinished, '-inf', now)
end
-- the tenant's unfinished jobs and bytes besides ``mine`` ({{id, bytes}, ...}: one submission's,
-- some of them held already), and which limit ('jobs', 'bytes') taking all of mine would cross
local function over(unfinished, sizes, mine, max_jobs, max_bytes)
  local jobs = redis.call('ZCARD', unfinished)
  local bytes = tonumber(redis.call('HGET', sizes, '-total') or '0')
  local adding = 0
  for _, m in ipairs(mine) do
    adding = adding + m[2]
    if redis.call('ZSCORE', unfinished, m[1]) then
      jobs = jobs - 1
      bytes = bytes - tonumber(redis.call('HGET', sizes, m[1]) or '0')
    end
  end
  if max_jobs > 0 and jobs + #mine > max_jobs then return 'jobs', jobs, bytes end
  if max_bytes > 0 and bytes + adding > max_bytes then return 'bytes', jobs, bytes end
  return false, jobs, bytes
end
local function hold(unfinished, sizes, id, bytes, score, only_new)
  if only_new then redis.call('ZADD', unfinished, 'NX', score, id) else redis.call('ZADD', unfinished, score, id) end
  if bytes > 0 and redis.call('HSETNX', sizes, id, int(bytes)) == 1 then
    redis.call('HINCRBY', sizes, '-total', int(bytes))
  end
end
"""

# Whether one submission (ARGV[1]: JSON {{id, bytes}, ...}) fits its tenant's quota (KEYS: its
# unfinished jobs and their bytes; ARGV: now, max jobs, max bytes), before its uploads are stored:
# a tenant at its limit is refused without a gigabyte written and deleted again. Changes nothing
# but the trim; create_queued decides. Returns {limit crossed or false, jobs, bytes} (the
# tenant's, those of the submission held already left out).
_ROOM = _UNFINISHED_LIB + """
trim(KEYS[1], KEYS[2], tonumber(ARGV[2]))
local crossed, jobs, bytes = over(KEYS[1], KEYS[2], cjson.decode(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return {crossed, jobs, bytes}
"""

# A job's record written, or nothing at all, in one step: refused by its tenant's quota, the record,
# its index entries and its marks are never written, which a MULTI could not do (each of its
# commands runs, whatever an earlier one answered).
# KEYS: 1 the record, 2 the unconfirmed, 3 the tenant's waiting jobs on its queue, 4 its last
# level, 5 its unfinished jobs, 6 their bytes, 7 the index of waiting sets (JobStore.waiting_sets),
# 8.. the job indexes, then the batch's list (with
# p.batch). ARGV: 1 job id, 2 the record (JSON), 3 p (JSON): now, record_ttl, horizon, lives_until (when
# the record expires at the latest), reserve_until, size (its uploads' bytes), reserve ({{id,
# bytes}, ...}: the rest of its submission, held for it now, so a batch is refused whole or taken
# whole whatever is submitted meanwhile), max_jobs, max_bytes (0: no limit), waiting_stale (before
# when a waiting entry is dropped), waiting_ttl, thresholds (the levels', see below).
#
# The waiting part: the job joins its tenant's waiting jobs (a sorted set of job ids by when they
# were queued) and gets its queue priority (shared/queue.py, fair_priority). Entries older than
# waiting_stale are dropped first: a removal missed (a record that expired while queued) inflates
# the count for that long at most. The level is the count's (one per threshold it reaches), but
# never below the level last given (KEYS[4]) while the tenant still has jobs waiting: counted
# alone, a tenant's new job could get a lower level than its older ones still waiting once the
# jobs ahead of those had started, and overtake them. With none waiting the level starts again
# from 0. Returns {1, waiting before it, its level}, or {0, limit crossed, jobs, bytes} refused.
_CREATE_QUEUED = _UNFINISHED_LIB + """
local id, p = ARGV[1], cjson.decode(ARGV[3])
local unfinished, sizes = KEYS[5], KEYS[6]
trim(unfinished, sizes, p.now)
local mine = {{id, p.size}}
for _, r in ipairs(p.reserve) do mine[#mine + 1] = r end
local crossed, jobs, bytes = over(unfinished, sizes, mine, p.max_jobs, p.max_bytes)
if crossed then return {0, crossed, jobs, bytes} end

redis.call('SET', KEYS[1], ARGV[2], 'EX', p.record_ttl)
local last = #KEYS
if p.batch then last = last - 1 end
for i = 8, last do
  -- trimmed here rather than by a cron: records expire on their own, at the latest their
  -- expires_by, horizon after the creation time they are scored by
  redis.call('ZADD', KEYS[i], p.now, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', p.now - p.horizon)
  redis.call('EXPIRE', KEYS[i], p.horizon)
end
if p.batch then
  redis.call('RPUSH', KEYS[#KEYS], id)
  redis.call('EXPIRE', KEYS[#KEYS], p.horizon)
end
-- no record without its mark
redis.call('ZADD', KEYS[2], p.now, id)

hold(unfinished, sizes, id, p.size, p.lives_until, false)
for _, r in ipairs(p.reserve) do hold(unfinished, sizes, r[1], r[2], p.reserve_until, true) end
-- every entry is scored at most its record's expires_by, horizon after a creation no later than now
redis.call('EXPIRE', unfinished, p.horizon)
redis.call('EXPIRE', sizes, p.horizon)

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', p.waiting_stale)
local ahead = redis.call('ZCARD', KEYS[3])
redis.call('ZADD', KEYS[3], p.now, id)
redis.call('EXPIRE', KEYS[3], p.waiting_ttl)
redis.call('SADD', KEYS[7], KEYS[3])
redis.call('EXPIRE', KEYS[7], p.waiting_ttl)
local level = 0
if ahead > 0 then
  for _, threshold in ipairs(p.thresholds) do
    if ahead >= threshold then level = level + 1 end
  end
  local before = tonumber(redis.call('GET', KEYS[4]) or '0')
  if before > level then level = before end
end
redis.call('SET', KEYS[4], level, 'EX', p.waiting_ttl)
return {1, ahead, level}
"""

# A job that ended (or a reservation given back) leaves its tenant's unfinished jobs (KEYS[1]) and
# their bytes (KEYS[2]). ARGV: job ids.
_LEAVE_UNFINISHED = """
for _, id in ipairs(ARGV) do
  redis.call('ZREM', KEYS[1], id)
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    redis.call('HDEL', KEYS[2], id)
    redis.call('HINCRBY', KEYS[2], '-total', '-' .. size)
  end
end
return 0
"""


# The heartbeats of the workers alive: each worker's record (KEYS[1] prefix .. name) for every
# name in the index of workers (KEYS[2], a set); a name whose record expired leaves the index here,
# in the same step, so a worker that heartbeats meanwhile is never dropped from it. False while no
# job worker of this release heartbeats (KEYS[3], its mark, lives as long as its heartbeat).
# A name whose record expired is a worker that did not stop (a stop removes both, forget_worker):
# it died, froze or lost its host, and its BRPOP may have taken a message nobody will read, so
# the mark KEYS[4] is set for ARGV[1] seconds (JobStore.consumer_lost_key). ARGV[2] '1': the
# pruning alone (the recovery pass's, each worker's every interval), no heartbeat sent back.
_LIVE_WORKERS = """
local out = {}
local gone = false
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local info = redis.call('GET', KEYS[1] .. name)
  if info then table.insert(out, info) else redis.call('SREM', KEYS[2], name); gone = true end
end
if gone then redis.call('SET', KEYS[4], '1', 'EX', ARGV[1]) end
if ARGV[2] == '1' then return false end
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
return out
"""

# The next stretch of an index, newest first, after the cursor's (score, id). ZREVRANGE orders by
# score, ties by member, both descending: the members with a higher score, and those of the same
# score ordered before or at the id, are skipped. Counted each time, so a page starts right when
# jobs were created since (their scores are higher) or the job the cursor names expired (the
# index is trimmed at its old end). ARGV: score ('' for the first page), id, how many. Returns
# ids and scores, flat.
_AFTER = """
local start = 0
if ARGV[1] ~= '' then
  start = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
    if member >= ARGV[2] then start = start + 1 end
  end
end
return redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'WITHSCORES')
"""
# score:id, and since this release :tag, the listing's (_listing_tag); a cursor given before it has none
_CURSOR = re.compile(r"^([0-9][0-9.e+-]{0,30}):([0-9a-f]{32})(?::([0-9a-f]{12}))?$")
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def _listing_tag(status: str | None, kind: str | None) -> str:
    """48 bits of a digest of the filters of the listing a cursor walks: tells one listing's
    cursor from another's. Not the owner: another key's cursor is taken, and shows that key its
    own jobs from the cursor's place (tests/test_jobs_paging.py), as it always did."""
    return hashlib.sha256(json.dumps([status, kind]).encode()).hexdigest()[:12]


def _cursor(score: float, job_id: str, listing: str) -> str:
    """Opaque to clients: where a page stopped (the last job it looked at, by its place in the
    index), and which listing it is a place in."""
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}:{listing}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str, listing: str) -> tuple[str, str]:
    """(score, id) of a cursor :func:`_cursor` gave ``listing``; 422 for anything else. The
    place is one in the index of every job, whatever the filters: a cursor given for
    ``kind=embedding`` and sent with ``kind=diarize`` (or another ``status``) carried on from the
    first listing's place without a word."""
    try:
        if not _BASE64URL.match(cursor):  # b64decode would skip what is not base64 rather than refuse it
            raise ValueError(cursor)
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        found = _CURSOR.match(text)
        if found is None or not math.isfinite(float(found.group(1))):
            raise ValueError(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError("cursor: not one this API gave (pass a page's next_cursor, or follow its Link "
                         "rel=\"next\", as it was given)") from exc
    if found.group(3) is not None and found.group(3) != listing:
        raise InputError("cursor: given for another listing (other status or kind filters); send it with the "
                         "filters of the page that gave it, or start again without one")
    return repr(float(found.group(1))), found.group(2)


@dataclass(frozen=True)
class DueSet:
    """Jobs owed something by a time: a sorted set of job id -> due time (the Redis clock), which
    a recovery pass reads once past due and takes over one job at a time. Two are kept (worker
    messages held as retries, webhook deliveries owed); they differ only in what a take-over also
    claims."""

    redis: Any
    key: str
    clock: Callable[[], float]

    # past due: due again at ARGV[3] and, where a claim key is given, that claim written in the
    # same step (KEYS[2] is nil with one key), so exactly one caller takes a due job over
    _TAKE_OVER = """
    local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
    if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
    if KEYS[2] then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5]) end
    return 1
    """

    def owe(self, job_id: str, in_s: float, *, keep_earlier: bool = False) -> None:
        """Due ``in_s`` seconds from now (``keep_earlier``: an earlier due time already set stays)."""
        self.redis.zadd(self.key, {job_id: self.clock() + in_s}, nx=keep_earlier)

    def settle(self, job_id: str) -> None:
        self.redis.zrem(self.key, job_id)

    def due_at(self, job_id: str) -> float | None:
        return self.redis.zscore(self.key, job_id)

    def past_due(self, limit: int = 100) -> list[str]:
        return list(self.redis.zrangebyscore(self.key, "-inf", self.clock(), start=0, num=limit))

    def take_over(self, job_id: str, next_in_s: float, *, claim: tuple[str, str, int] | None = None) -> bool:
        """Atomically, if ``job_id`` is past due: due again in ``next_in_s`` (should the caller die
        before it acted), ``claim`` (key, value, TTL in s) set, and True for this caller alone."""
        now = self.clock()
        keys = [self.key] if claim is None else [self.key, claim[0]]
        args = [job_id, repr(now), repr(now + next_in_s)] + ([] if claim is None else [claim[1], str(claim[2])])
        return bool(self.redis.eval(self._TAKE_OVER, len(keys), *keys, *args))


class JobStore:
    """Job records and what goes with them in Redis.

    How long a record lives follows its job (set by each status change, :meth:`update`), so a
    result is there ``result_expires_s`` after the job ENDS, however long it waited and ran:

    - queued (created, or back in the queue): at least ``queued_life_s`` from then, as long as
      the job could still run (its upload is swept ``upload_expires_s`` after it was stored);
    - running (each attempt's start): at least ``running_life_s`` from then, as long as one
      attempt may last before it ends or the recovery pass puts it back;
    - ended (succeeded, failed, cancelled): exactly ``result_expires_s`` from the end.

    Counted from creation (as before), a job that waited its day in the queue lost its record
    while it ran or right after, and its client never saw the result. Whatever happens, a record
    never outlives its ``expires_by``, ``horizon_s`` after its creation (the sum of the three:
    a job that waits, runs and is then kept): the index entries (trimmed by creation time), its
    batch's list and its values kept apart are stored to live that long from the moment they are
    written, so none of them is gone while a record names it, and no status change has to read
    or extend them.
    """

    def __init__(self, client: redis.Redis, settings: Settings | None = None) -> None:
        self.redis = client
        self.settings = settings or get_settings()
        self.prefix = self.settings.redis_key_prefix
        s = self.settings
        # how long a result is kept after its job ended (and a webhook's keys after delivery)
        self.ttl = int(s.result_expires_s)
        self.queued_life_s = float(max(s.result_expires_s, s.upload_expires_s))
        # Celery's hard limit ends a prefork attempt, the job's own deadline a solo one (its
        # soft limit and the grace past it); the recovery pass takes a dead one within a lease
        # and an interval
        self.running_life_s = float(max(s.task_time_limit_s, s.task_soft_time_limit_s + s.job_time_limit_grace_s)
                                    + s.job_lease_s + s.job_recovery_interval_s)
        self.horizon_s = self.queued_life_s + self.running_life_s + self.ttl
        # an Idempotency-Key's answer is rebuilt from its jobs' records, which are kept at least
        # result_expires_s after the key was stored (a job ends after its confirmation, and is
        # kept that long from its end): never longer, or a retry would find the key and no job
        self.idempotency_window_s = float(min(s.idempotency_window_s, s.result_expires_s))
        # each record up to its result, cut in Redis (JobRecord.to_json stores it last)
        self._summary_heads = RecordHeads(client, cut_before="result", last_before="_finished_ts",
                                          head_bytes=_SUMMARY_HEAD_BYTES)
        self._after = client.register_script(_AFTER)
        self._claim = client.register_script(_CLAIM_KEY)
        self._confirm_claimed = client.register_script(_CONFIRM_CLAIMED)
        self._renew = client.register_script(_RENEW_KEY)
        self._release = client.register_script(_RELEASE_KEY)
        self._forget = client.register_script(_FORGET_ANSWER)
        self._create_queued = client.register_script(_CREATE_QUEUED)
        self._room = client.register_script(_ROOM)
        self._leave_unfinished = client.register_script(_LEAVE_UNFINISHED)
        self._live_workers = client.register_script(_LIVE_WORKERS)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "JobStore":
        settings = settings or get_settings()
        # timeouts of the service's own (shared/queue.py), not the client library's default: 5 s
        # in redis-py 8, none at all (wait for ever on a connection whose Redis went away without
        # closing it) in the 5.x releases pyproject.toml allows
        return cls(redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_keepalive=True),
                   settings)

    # --- the one clock every process reads --------------------------------------------------
    def clock(self) -> float:
        """Epoch seconds by the Redis server's clock, for the times one process writes and
        another compares with its own "now": when a submission was left unconfirmed, when a
        webhook delivery is due. Each process's own clock made those comparisons by two clocks:
        a worker 60 s ahead of the API (a host without NTP, a VM resumed with a stale clock)
        failed every job it took before the API confirmed it, milliseconds after its message was
        sent, as a submission interrupted a minute ago, and one ahead by a delivery's grace took
        every delivery in progress for lost and sent it again while the first was posting."""
        return _epoch(self.redis.time())

    # --- keys -------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _job_key(self, job_id: str) -> str:
        return self.key("job", job_id)

    def consumers_key(self, queue: str) -> str:
        """The key a queue's live workers keep up (worker/lifecycle.py, announce_queues) and the
        API reads, as one EXISTS, before it takes a synchronous call (api/dispatch.py,
        Dispatcher.has_worker): the per-worker heartbeats could only be found by a SCAN of every
        key. Not under "worker:", which /health reads as heartbeats."""
        return self.key("consumers", queue)

    # --- tenants' waiting jobs (fair ordering, shared/queue.py fair_priority) -------------------
    # A sorted set per tenant of its queued job ids, by when they were queued: a job joins it when
    # its record is created or goes back to the queue, and leaves it when its record leaves
    # "queued" (update, where every status change goes through). Jobs without an owner (no API
    # keys configured) share one set: one tenant, first in first out as before.
    # Per queue as well: a tenant's jobs on another queue (other workers) are no one's backlog here.
    def _waiting_key(self, record: JobRecord) -> str:
        queue = record.queue or self.settings.queue_name
        return self.key("waiting", queue, "owner", record.owner) if record.owner \
            else self.key("waiting", queue, "anonymous")

    def waiting_count(self, record: JobRecord) -> int:
        """How many jobs of ``record``'s tenant are queued on its queue (entries older than a
        queued record's life are not counted)."""
        return int(self.redis.zcount(self._waiting_key(record), self.clock() - self.queued_life_s, "+inf"))

    def _track_waiting(self, pipe: Any, before: JobRecord, after: JobRecord) -> None:
        if before.status == QUEUED and after.status != QUEUED:
            pipe.zrem(self._waiting_key(after), after.job_id)
        elif after.status == QUEUED and before.status != QUEUED:
            # back in the queue (its message goes at priority 0): waiting again, so counted again
            # for the tenant's next submissions
            pipe.zadd(self._waiting_key(after), {after.job_id: self.clock()})
            pipe.expire(self._waiting_key(after), math.ceil(self.queued_life_s))
            pipe.sadd(self._waiting_index(), self._waiting_key(after))
            pipe.expire(self._waiting_index(), math.ceil(self.queued_life_s))

    # Every tenant's waiting set of every queue, named in one set (written with each entry, and
    # living as long as the longest of them), so that the recovery pass that looks for queued jobs
    # whose message was lost (worker/recovery.py, recover_unqueued_jobs) reads them without a SCAN
    # of the keyspace. A set that emptied (Redis deletes an empty sorted set) or expired leaves the
    # index in the same script that finds it gone, so a job queued meanwhile is never dropped.
    _PRUNE_WAITING_INDEX = """
    local out = {}
    for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
      if redis.call('EXISTS', key) == 1 then table.insert(out, key) else redis.call('SREM', KEYS[1], key) end
    end
    return out
    """

    def _waiting_index(self) -> str:
        return self.key("waiting-sets")

    def waiting_sets(self) -> list[str]:
        """The keys of every tenant's waiting set, on every queue (see above)."""
        return list(self.redis.eval(self._PRUNE_WAITING_INDEX, 1, self._waiting_index()))

    def index_waiting_sets(self, keys: Iterable[str]) -> None:
        """Add waiting sets to the index: those an API of an earlier release wrote, which it
        never named there (found by one SCAN, worker/recovery.py)."""
        keys = list(keys)
        if keys:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(self._waiting_index(), *keys)
                pipe.expire(self._waiting_index(), math.ceil(self.queued_life_s))
                pipe.execute()

    def waiting_before(self, keys: Sequence[str], before: float, limit: int) -> list[str]:
        """The ids of jobs queued before ``before`` (Redis clock) in these waiting sets, up to
        ``limit`` of the oldest of each, in one round trip. Entries older than a queued record's
        life are left out: their records expired (a removal missed), and they would take the
        places of live jobs."""
        if not keys:
            return []
        since = self.clock() - self.queued_life_s
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrangebyscore(key, since, before, start=0, num=limit)
            return [job_id for ids in pipe.execute() for job_id in ids]

    # --- create / read ----------------------------------------------------------------------
    def create(self, record: JobRecord) -> JobRecord:
        """Write a new job's record, queued and unconfirmed: until :meth:`confirm_queued`, a
        submission that stops (its process dies, the broker refuses the message) leaves a job
        the recovery pass fails (:meth:`fail_interrupted`) instead of one queued for nobody."""
        return self.create_queued(record)[0]

    def create_queued(self, record: JobRecord, *, quota: Quota | None = None, size: int = 0,
                      reserve: Sequence[tuple[str, int]] = ()) -> tuple[JobRecord, int]:
        """:meth:`create`, and the queue priority its message goes at (``fair_priority`` of how
        many jobs its tenant had waiting, never below its tenant's waiting jobs' levels: a
        tenant's jobs keep their order), decided in the same step as the record.

        The job is counted among its tenant's unfinished ones (with ``size``, its uploads' bytes)
        in that step too, and with ``quota`` it is created only while that leaves the tenant
        within it: else nothing is written and :class:`QuotaExceeded` is raised. ``reserve``
        (job id, bytes) are the rest of its submission (a batch's later files), counted and held
        for it from now on, so that a batch is refused whole at its first job or not at all; a
        reservation whose job is never created lapses after ``job_submit_grace_s``."""
        # by the Redis clock (see clock): the unconfirmed mark's time, which the workers compare,
        # and expires_by, which each status change compares with its "now" (_lives_until_ms)
        now = self.clock()
        horizon = math.ceil(self.horizon_s)
        record = record.model_copy(update={"status": QUEUED, "created_ts": now, "expires_by": now + horizon})
        if record.webhook_url and record.webhook is None:
            record = record.model_copy(update={"webhook": WebhookState()})
        record_ttl = math.ceil(self.queued_life_s)
        indexes = [self.key("jobs")] + ([self._owner_index(record.owner)] if record.owner else [])
        batch = [self.key("batch", record.batch_id)] if record.batch_id else []
        quota = quota or Quota()
        params = {
            "now": now, "record_ttl": record_ttl, "horizon": horizon, "lives_until": now + record_ttl,
            "reserve_until": now + self.settings.job_submit_grace_s, "size": int(size),
            "reserve": [[job_id, int(n)] for job_id, n in reserve],
            "max_jobs": quota.max_jobs, "max_bytes": quota.max_bytes, "batch": bool(batch),
            "waiting_stale": now - self.queued_life_s, "waiting_ttl": record_ttl,
            "thresholds": list(level_thresholds(len(PRIORITY_STEPS))),
        }
        reply = self._create_queued(
            keys=[self._job_key(record.job_id), self._unconfirmed(), self._waiting_key(record),
                  self._waiting_key(record) + ":level", *self._unfinished_keys(record.owner),
                  self._waiting_index(), *indexes, *batch],
            args=[record.job_id, record.to_json(), json.dumps(params)])
        if not reply[0]:
            _, limit, jobs, held = reply
            raise self._refused(record.owner, quota, limit, int(jobs), int(held), 1 + len(reserve),
                                int(size) + sum(n for _, n in reserve))
        _ok, _ahead, level = reply
        return record, int(level) if self.settings.fair_queueing else 0

    # --- tenants' quota: their unfinished work ---------------------------------------------------
    # A sorted set per tenant (not per queue) of its jobs queued or running, scored by when each
    # record expires at the latest, and a hash of their uploads' bytes (see _UNFINISHED_LIB). A
    # job joins in create_queued's step, where the quota is checked, and leaves in update's
    # transaction when it ends, whichever way (succeeded, failed, cancelled, withdrawn, failed as
    # interrupted, given up by the recovery pass); each status change that keeps it unfinished
    # moves its score to the record's new expiry. Jobs without an owner (no API keys) are one
    # tenant, as for fair ordering.
    def _unfinished_keys(self, owner: str | None) -> tuple[str, str]:
        key = self.key("unfinished", "owner", owner) if owner else self.key("unfinished", "anonymous")
        return key, key + ":bytes"

    def check_room(self, owner: str | None, quota: Quota, jobs: Sequence[tuple[str, int]]) -> None:
        """:class:`QuotaExceeded` when ``jobs`` (job id, bytes of its uploads) would take the
        tenant past ``quota`` now: asked before a submission's uploads are stored, so that a
        tenant at its limit is refused without its gigabyte written and deleted again.
        create_queued's own check is the one that holds when submissions race."""
        if not quota.max_jobs and not quota.max_bytes:
            return
        limit, held_jobs, held_bytes = self._room(keys=list(self._unfinished_keys(owner)), args=[
            json.dumps([[job_id, int(n)] for job_id, n in jobs]), self.clock(), quota.max_jobs, quota.max_bytes])
        if limit:
            raise self._refused(owner, quota, limit, int(held_jobs), int(held_bytes), len(jobs),
                                sum(n for _, n in jobs))

    def unfinished(self, owner: str | None) -> tuple[int, int]:
        """The tenant's unfinished jobs and the bytes of their uploads, as its quota counts them."""
        _, jobs, held = self._room(keys=list(self._unfinished_keys(owner)), args=["[]", self.clock(), 0, 0])
        return int(jobs), int(held)

    def give_back_reserved(self, owner: str | None, job_ids: Sequence[str]) -> None:
        """A refused submission's jobs that were never created no longer hold their reservation
        (it would lapse by itself after job_submit_grace_s)."""
        if job_ids:
            self._leave_unfinished(keys=list(self._unfinished_keys(owner)), args=list(job_ids))

    def _track_unfinished(self, pipe: Any, before: JobRecord, after: JobRecord, until_ms: int | None) -> None:
        if after.ended and not before.ended:
            self._leave_unfinished(keys=list(self._unfinished_keys(after.owner)), args=[after.job_id], client=pipe)
        elif not after.ended and until_ms is not None:
            # still unfinished, its record's life set anew (started, back in the queue): counted as
            # long as the record may live, not longer; XX: a job created before quotas is not added
            pipe.zadd(self._unfinished_keys(after.owner)[0], {after.job_id: until_ms / 1000.0}, xx=True)

    def _refused(self, owner: str | None, quota: Quota, limit: str, jobs: int, held: int, adding: int,
                 size: int) -> InputError:
        """The refusal of ``adding`` jobs (``size`` bytes), counted for /metrics: a 429 to retry
        once some of the tenant's jobs have ended, or a 413 where the submission alone is past the
        limit (a batch of more files than it, an upload larger than it), which no wait mends."""
        self.redis.hincrby(self.key("stats", "quota_refused"), limit, 1)
        who = "this API key has" if owner else "the service has"
        these = "this job" if adding == 1 else f"these {adding} jobs"
        if limit == "jobs" and adding > quota.max_jobs:
            return InputError(f"{these} are more than the {quota.max_jobs} jobs this API key may have queued or "
                              "running at once (AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS); submit them in smaller "
                              "batches", status_code=413)
        if limit == "bytes" and size > quota.max_bytes:
            return InputError(f"{these} ({size} bytes of uploads) would alone take this API key past its limit of "
                              f"{quota.max_bytes} bytes held for unfinished jobs "
                              "(AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_BYTES); send less at once", status_code=413)
        if limit == "jobs":
            detail = (f"{who} {jobs} job{'' if jobs == 1 else 's'} queued or running, and {these} would take it "
                      f"past its limit of {quota.max_jobs} (AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS)")
        else:
            detail = (f"{who} {held} bytes of uploads held for jobs queued or running, and {these} "
                      f"({size} bytes) would take it past its limit of {quota.max_bytes} "
                      "(AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_BYTES)")
        return QuotaExceeded(f"{detail}; submit again once some of its jobs have ended")

    def quota_refusals(self) -> dict[str, int]:
        """Submissions refused by a tenant's quota, by the limit they crossed ("jobs", "bytes")."""
        return {k: int(v) for k, v in self.redis.hgetall(self.key("stats", "quota_refused")).items()}

    # --- submissions: the record written, the queue message not yet known to be sent ----------
    # A submission writes the record, sends the message, then confirms (the API answers 202
    # after that). A record left unconfirmed past job_submit_grace_s was cut off in between: no
    # client was told of it, so its client submits it again, and it must not run later. A sorted
    # set of the unconfirmed (by creation time) costs one ZADD in create's transaction and one
    # ZREM per submission, and the recovery pass reads only its old end: a flag in the record
    # would need its own index for the pass to find it, and looking for the message in the
    # broker's queue reads the whole queue (and misses one a worker holds unacked).
    def _unconfirmed(self) -> str:
        return self.key("submitting")

    def confirm_queued(self, job_ids: list[str], claim: KeyClaim | None = None, batch_id: str | None = None,
                       created: float | None = None, fingerprint: str = "") -> list[str]:
        """These jobs' messages were sent and their client is answered now: no longer at risk.
        Returns those that were not unconfirmed any more (the recovery pass got there first:
        the submission took past job_submit_grace_s).

        With ``claim`` (the submission holds an Idempotency-Key; ``fingerprint`` its request's),
        only while no other submission holds the key, and the key then names these jobs (and
        ``batch_id``), in the same script: a submission whose hold was taken (it stalled,
        another request with the key took it) confirms nothing and gets :class:`KeyLost`, so
        two submissions with one key never both run. The key names them for
        ``idempotency_window_s``, and never past the life a queued record has from its creation
        (``created``: ``time.monotonic()`` before the first record was written): counted from
        the confirmation, the key outlived a record that was never started by the submission's
        own duration, and a retry found the key and no job."""
        if claim is not None:
            life_s = self.idempotency_window_s
            if created is not None:
                # a second short of it: the record's life was counted from when Redis wrote it,
                # after ``created``; this one is counted from when this script runs, a little
                # after ``life_s`` is worked out here
                life_s = min(life_s, self.queued_life_s - (time.monotonic() - created) - 1.0)
            removed = self._confirm_claimed(keys=[self._unconfirmed(), claim.entry], args=[
                claim.token, json.dumps(job_ids), batch_id or "", max(1, int(life_s * 1000)), fingerprint, *job_ids])
            if removed in (-1, -2):
                raise KeyLost(claim.entry, free=removed == -2)
            return [job_id for job_id, found in zip(job_ids, removed) if not found]
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zrem(self._unconfirmed(), job_id)
            removed = pipe.execute()
        return [job_id for job_id, found in zip(job_ids, removed) if not found]

    def unconfirmed(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Jobs whose submission has not been confirmed for ``older_than_s`` seconds, oldest first."""
        return list(self.redis.zrangebyscore(self._unconfirmed(), "-inf", self.clock() - older_than_s,
                                             start=0, num=limit))

    def unconfirmed_for_s(self, job_id: str) -> float | None:
        """How long this job's submission has been unconfirmed (by the Redis clock); None once
        it is not (confirmed, failed, or never marked: a record of an earlier version)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self._unconfirmed(), job_id)
            pipe.time()
            marked, now = pipe.execute()
        return None if marked is None else max(0.0, _epoch(now) - float(marked))

    def queued_confirmed(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The records of those of these jobs that are queued and whose submission was confirmed
        (their message was sent), in one round trip. Each job's unconfirmed mark is read before its
        record: a job failed as interrupted in between reads failed, and one confirmed in between
        was sent."""
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zscore(self._unconfirmed(), job_id)
                pipe.get(self._job_key(job_id))
            replies = pipe.execute()
        records = []
        for marked, raw in zip(replies[::2], replies[1::2]):
            if marked is None and raw is not None:
                record = JobRecord.from_json(raw)
                if record.status == QUEUED:
                    records.append(record)
        return records

    def look_again_later(self, job_id: str) -> None:
        """An unconfirmed job that started all the same (its message went out before the API
        stopped): left unconfirmed until it ends, behind the others."""
        self.redis.zadd(self._unconfirmed(), {job_id: self.clock()}, xx=True)

    def forget_unconfirmed(self, job_id: str) -> None:
        self.redis.zrem(self._unconfirmed(), job_id)

    # --- Idempotency-Key: one submission per key and tenant -------------------------------------
    # A client whose 202 was lost (a timeout, a proxy's reset) submits again with the key it sent
    # the first time, and must get the first submission's jobs, not new ones. Each key and tenant
    # is a hash, ``<prefix>:idempotency:<owner>:<sha256 of the key>``: ``token`` (the submission
    # that holds it), ``fingerprint`` (the request's digest, api/idempotency.py; empty until
    # known), and once its jobs were confirmed ``jobs`` (their ids, JSON) and ``batch``. Held (no
    # ``jobs``), it lives idempotency_reservation_s from its last renewal (the submission renews
    # it while alive, renew_key), so only a submission whose process died frees it by itself;
    # answered (``jobs``), idempotency_window_s. Hashes, written by scripts, because whether the
    # key is free, held or answered is read and changed in one step.
    def key_entry(self, owner: str | None, key: str) -> str:
        # the key's digest: a key of 255 printable characters names no odd Redis key, and the
        # tenant's part keeps two tenants' keys apart whatever they chose
        return self.key("idempotency", owner or "-", hashlib.sha256(key.encode()).hexdigest())

    def claim_key(self, claim: KeyClaim, fingerprint: str | None) -> KeyHolder | None:
        """Hold the key for ``claim``'s submission (again: its earlier hold renewed, or taken
        anew once lapsed), for idempotency_reservation_s; None once held. Another submission's
        hold, or the jobs the key names once answered, come back as its :class:`KeyHolder`."""
        held = self._claim(keys=[claim.entry], args=[
            claim.token, fingerprint or "", int(self.settings.idempotency_reservation_s * 1000)])
        if held is None:
            return None
        _, found, jobs, batch = held
        return KeyHolder(fingerprint=found or None, jobs=tuple(json.loads(jobs)) if jobs else None,
                         batch_id=batch or None)

    def renew_key(self, claim: KeyClaim) -> bool:
        """Extend ``claim``'s hold by idempotency_reservation_s while it is still its own and
        names no jobs: the submission holding it is alive (storing a large upload, queueing a
        large batch) and renews it every third of that. False once it is not its own any more."""
        return bool(self._renew(keys=[claim.entry], args=[
            claim.token, int(self.settings.idempotency_reservation_s * 1000)]))

    async def arenew_key(self, aredis: Any, claim: KeyClaim) -> bool:
        """:meth:`renew_key` through the API's asyncio client (``aredis``, decoding responses):
        no thread of the shared pool taken every renewal, and none left running once the
        submission is done."""
        return bool(await aredis.eval(_RENEW_KEY, 1, claim.entry, claim.token,
                                      int(self.settings.idempotency_reservation_s * 1000)))

    def answered_for(self, claim: KeyClaim) -> tuple[str, ...] | None:
        """The jobs the key names while ``claim``'s submission holds it (None: it names none, or
        another holds it): whether a confirmation whose answer was lost had run."""
        token, jobs = self.redis.hmget(claim.entry, ["token", "jobs"])
        if token != claim.token or not jobs:
            return None
        return tuple(json.loads(jobs))

    def forget_answer(self, entry: str, jobs: tuple[str, ...]) -> bool:
        """Delete a key's entry that names ``jobs`` (and nothing else holds it meanwhile) once
        a record of theirs is gone (evicted, a queued record past its life, a restore): the
        key is free for a new submission, instead of answering 404 to every retry for the
        rest of its window."""
        return bool(self._forget(keys=[entry], args=[json.dumps(list(jobs))]))

    def release_key(self, claim: KeyClaim) -> None:
        """A submission refused (4xx, 503, ...) gives its key back, if it still holds it: the
        client retries with the same key, and must not be answered jobs that were withdrawn or
        never existed."""
        self._release(keys=[claim.entry], args=[claim.token])

    def fail_interrupted(self, job_id: str) -> JobRecord | None:
        """Fail a job whose submission never completed, while it is still queued and never
        started, and drop it from the unconfirmed in the same transaction (so the API's
        :meth:`confirm_queued` sees the one or the other, never a failed job it then answers 202
        for). Returns the failed record; None when its submission was confirmed meanwhile, or the
        job started, ended or is gone (it then stays unconfirmed: the caller decides). No webhook:
        nobody was told of the job."""
        error = ModelError(INTERRUPTED_SUBMISSION).body()
        failed = False

        def change(r: JobRecord) -> JobRecord | None:
            nonlocal failed
            if r.status != QUEUED or r.attempts != 0:
                return None
            failed = True
            return r.model_copy(update={"status": FAILED, "finished_at": utc_now(), "finished_ts": time.time(),
                                        "error": error, **_UNANNOUNCED})

        # only while the mark is there, read in the transaction: the API confirms (ZREM) without
        # touching the record, so watching the record alone let a confirmation that came after the
        # pass listed the job (and before this) answer 202 for a job failed the next moment
        unconfirmed = self._unconfirmed()

        def still_unconfirmed(pipe: Any) -> bool:
            nonlocal failed
            # read first on each try of the transaction: whether it failed the job is decided
            # again there (as in finish), also by a try that lost to the confirmation
            failed = False
            return pipe.zscore(unconfirmed, job_id) is not None

        def also(pipe: Any, record: JobRecord) -> None:
            pipe.zrem(unconfirmed, job_id)
            self._count_finished(pipe, record)  # with the end, as finish counts

        record = self.update(job_id, change, also, watch=(unconfirmed,), holds=still_unconfirmed)
        return record if failed else None

    # --- values kept apart from records -----------------------------------------------------
    def keep_apart(self, items: list[Any]) -> str:
        """Store a list of JSON values once, by content, for the records that will name it; its
        digest is what a record carries (``kept_apart``).

        Each item is stored under its own digest and the list as the list of those: a value
        named by a thousand jobs (a batch with ``voiceprints=all``) is stored once, and one that
        differs by an item (another subset of ids) costs its list, 66 bytes an item, not the items again.
        Every call renews the TTL of the list and its items, to outlive any record created after
        it (``horizon_s`` and ``KEPT_APART_MARGIN_S``)."""
        texts = [_canonical(item) for item in items]
        entries = {_digest(text): text for text in texts}
        listing = _canonical([_digest(text) for text in texts])
        digest = _digest(listing)
        entries[digest] = listing
        # a record written after this one lives at most horizon_s (JobRecord.expires_by)
        ttl = math.ceil(self.horizon_s) + KEPT_APART_MARGIN_S
        with self.redis.pipeline(transaction=False) as pipe:
            # what exists is renewed, not sent again: a key name an item instead of 4 KB
            for d in entries:
                pipe.expire(self.key("value", d), ttl)
            renewed = pipe.execute()
            for d, found in zip(entries, renewed):
                if not found:
                    pipe.set(self.key("value", d), entries[d], ex=ttl)
            pipe.execute()
        return digest

    def kept(self, digest: str) -> list[Any] | None:
        """The list stored by :meth:`keep_apart` under ``digest``; None when it (or any of its
        items) is gone, or is not what the digest says."""
        if not _DIGEST.match(digest or ""):
            return None
        listing = self.redis.get(self.key("value", digest))
        if listing is None or _digest(listing) != digest:
            return None
        digests = json.loads(listing)
        texts = self.redis.mget([self.key("value", d) for d in digests]) if digests else []
        if any(t is None or _digest(t) != d for t, d in zip(texts, digests)):
            return None
        return [json.loads(t) for t in texts]

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self._job_key(job_id))
        return JobRecord.from_json(raw) if raw else None

    def get_split(self, job_id: str) -> tuple[JobRecord, str | None] | None:
        """The record without its result, and the result's stored JSON text (:func:`split_result`):
        for a read that sends the result on as it is (GET /jobs/{id} and its JSON result)."""
        raw = self.redis.get(self._job_key(job_id))
        if not raw:
            return None
        split = split_result(raw)
        if split is None:  # stored in another form, or a value holding the markers: read whole
            record = JobRecord.from_json(raw)
            text = record.model_dump_json(include={"result"})[len('{"result":'):-1]
            split = (record.model_copy(update={"result": None}), None if record.result is None else text)
        return split

    def get_many(self, job_ids: Iterable[str], *, summaries: bool = False) -> list[JobRecord]:
        """The records of these ids that still exist, in order; ``summaries``: without their result
        (read-only copies for listings)."""
        ids = list(job_ids)
        if not ids:
            return []
        if not summaries:
            return [JobRecord.from_json(r) for r in self.redis.mget([self._job_key(i) for i in ids]) if r]
        # each record up to its result, cut in Redis: a listing or a batch's status of 1,000
        # finished diarizations read 104 MB of results it then skipped, in 1 s of the API's
        # event loop on every poll (the whole API stood still meanwhile)
        heads = self._summary_heads([self._job_key(i) for i in ids])
        missing = [i for i, head in zip(ids, heads) if head is None]
        whole = dict(zip(missing, self.redis.mget([self._job_key(i) for i in missing]))) if missing else {}
        raws = [head if head is not None else whole.get(i) for i, head in zip(ids, heads)]
        return [_summary_from_json(r) for r in raws if r]

    def _owner_index(self, owner: str) -> str:
        return self.key("jobs", "owner", owner)

    def recent(
        self, limit: int, status: str | None = None, kind: str | None = None, *, owner: str | None = None,
        summaries: bool = False,
    ) -> list[JobRecord]:
        """The first page of :meth:`recent_page`, its jobs alone."""
        return self.recent_page(limit, status, kind, owner=owner, summaries=summaries).jobs

    def recent_page(
        self, limit: int, status: str | None = None, kind: str | None = None, *, owner: str | None = None,
        cursor: str | None = None, summaries: bool = False,
    ) -> JobPage:
        """At most ``limit`` jobs, newest first, of one owner (owner None: everyone's), after
        ``cursor`` (a page's ``next_cursor``; 422 for anything else). ``summaries``: the records
        without their result (see ``get_many``).

        The cursor is a place in the index (score and id), not an offset: jobs created between two
        pages are newer than it and shift nothing, and none is listed twice or skipped. Filters
        apply after the fetch, so a page looks through a bounded stretch of the index, at most
        max(10 x limit, 1000) entries read max(limit, 100) at a time (unfiltered, ``limit`` first);
        it stops once ``limit`` matched. Entries whose record expired are passed over the same way,
        filtered or not: the index keeps an entry for the horizon (51 h), a record lives 24 h after
        its job ended, and an unfiltered page read ``limit`` entries alone, so a listing walked
        through such a stretch came back in empty pages, each with a ``next_cursor``. A filter that
        matches nothing there gives a page with fewer jobs, even none, and a ``next_cursor`` where
        the stretch ended, so no request reads the whole index."""
        filtered = status is not None or kind is not None
        window = max(limit * 10, 1000)
        chunk = max(limit, 100) if filtered else limit
        index = self._owner_index(owner) if owner else self.key("jobs")
        listing = _listing_tag(status, kind)
        score, after = _parse_cursor(cursor, listing) if cursor else ("", "")
        records: list[JobRecord] = []
        scanned, more = 0, True
        while more and scanned < window and len(records) < limit:
            n = min(chunk, window - scanned)
            # one more than asked for: whether anything follows
            flat = self._after(keys=[index], args=[score, after, n + 1])
            ids, scores = flat[0::2][:n], flat[1::2][:n]
            more = len(flat) > 2 * n
            found = {r.job_id: r for r in self.get_many(ids, summaries=summaries)}
            # unfiltered, the first read is the page itself; only expired entries make it read on
            chunk = max(limit, 100)
            for i, (job_id, at) in enumerate(zip(ids, scores)):
                score, after = str(at), job_id
                scanned += 1
                record = found.get(job_id)  # None: expired since it was indexed
                if record is not None and (status is None or record.status == status) \
                        and (kind is None or record.kind == kind):
                    records.append(record)
                    if len(records) == limit:
                        more = more or i + 1 < len(ids)
                        break
        return JobPage(records, _cursor(float(score), after, listing) if more and scanned else None)

    def batch(self, batch_id: str, *, summaries: bool = False) -> list[JobRecord]:
        return self.get_many(self.redis.lrange(self.key("batch", batch_id), 0, -1), summaries=summaries)

    def count_by_status(self, window: int = 10000) -> dict[str, int]:
        """Jobs by status among the newest ``window``, for /metrics (open without a key).

        Only the head of each record is read, where its status is: reading whole records sent
        the scraper every result (2,000 finished diarizations: 215 MB out of Redis and 2-3 s per
        scrape, 1 GB at the full window), so any unauthenticated client could make the API
        hold gigabytes by asking for /metrics a few times at once. A record whose head does not
        say its status (written by another version) is read whole."""
        counts = dict.fromkeys(STATES, 0)
        ids = self.redis.zrevrange(self.key("jobs"), 0, window - 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.getrange(self._job_key(job_id), 0, _HEAD_BYTES - 1)
            heads = pipe.execute() if ids else []
        unsure = []
        for job_id, head in zip(ids, heads):
            found = _STATUS_HEAD.match(head or "")
            if found and found.group(1) in counts:
                counts[found.group(1)] += 1
            elif head:  # an expired record's head is empty: not counted
                unsure.append(job_id)
        for record in self.get_many(unsure, summaries=True):
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    # --- transitions ------------------------------------------------------------------------
    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None],
               also: Callable[[Any, JobRecord], None] | None = None, *, watch: tuple[str, ...] = (),
               holds: Callable[[Any], bool] | None = None) -> JobRecord | None:
        """Apply ``change`` atomically; it returns the new record or None to leave it as is.

        ``change`` gets a copy it may modify. Returns the record as stored afterwards (None
        when the job does not exist). ``also(pipe, new_record)`` queues further commands in the
        same transaction (written with the record or not at all). ``holds(pipe)`` is a condition
        on other keys, read on the watched pipe (``watch`` names them): the change is made only
        while it holds, and not if those keys change before it is written.

        A change of status (or a new attempt) sets how long the record lives from now on (see the
        class); any other change (progress, a webhook's state) keeps its TTL.
        """
        key = self._job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *watch)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    current = JobRecord.from_json(raw)
                    if holds is not None and not holds(pipe):
                        pipe.unwatch()
                        return current
                    changed = change(current.model_copy(deep=True))
                    if changed is None:
                        pipe.unwatch()
                        return current
                    until_ms = self._lives_until_ms(current, changed, lambda: int(pipe.pttl(key)))
                    pipe.multi()
                    if until_ms is None:
                        pipe.set(key, changed.to_json(), keepttl=True)
                    else:
                        pipe.set(key, changed.to_json(), pxat=until_ms)
                    self._track_waiting(pipe, current, changed)
                    self._track_unfinished(pipe, current, changed, until_ms)
                    if also is not None:
                        also(pipe, changed)
                    pipe.execute()
                    return changed
                except redis.WatchError:
                    continue

    def drop_from_result(self, job_id: str, field: str, *, kind: str, owner: str | None) -> bool:
        """Remove ``field`` from the result of job ``job_id``, if it is a job of ``kind`` of this
        ``owner`` that holds one; whether it was removed. The record keeps its TTL and the rest of
        its result (an enrolment's vector, once its voiceprint is deleted: the voiceprints route)."""
        dropped = False

        def change(r: JobRecord) -> JobRecord | None:
            nonlocal dropped  # the last try's (update tries again when the record changed)
            dropped = r.kind == kind and r.owner == owner and bool(r.result) and field in r.result
            if not dropped:
                return None
            r.result = {k: v for k, v in r.result.items() if k != field}
            return r

        self.update(job_id, change)
        return dropped

    def _lives_until_ms(self, before: JobRecord, after: JobRecord, pttl_ms: Callable[[], int]) -> int | None:
        """When the record expires after the change from ``before`` to ``after`` (epoch ms), or
        None to keep its TTL. ``pttl_ms`` reads its TTL now (only for a job going on: a record
        going back to the queue or starting keeps a longer life it already has)."""
        if after.expires_by is None:
            return None  # written before lifetimes followed the status: what it names expires with it as before
        if after.ended and before.ended:
            return None  # a webhook's state on an ended job: its result's time runs on
        if not after.ended and after.status == before.status and after.attempts == before.attempts:
            return None  # progress: no clock read (a Redis round trip) on the hottest write
        # the Redis clock, which PXAT is read by: by its own, a worker a day behind (result_expires_s)
        # set an ended job's record to expire in the past, and Redis deleted it with its result at once
        now = self.clock()
        if after.ended:
            until = now + self.ttl
        else:
            life = self.running_life_s if after.status == RUNNING else self.queued_life_s
            left_ms = pttl_ms()
            until = max(now + life, now + left_ms / 1000.0 if left_ms > 0 else 0.0)
        # never past expires_by (what the record names is kept that long and no longer), and never
        # in the past: a clock a little ahead of the API's that wrote expires_by must not delete it
        return int(max(min(until, after.expires_by), now + 1.0) * 1000)

    def _running_set(self) -> str:
        return self.key("running")

    def mark_running(self, job_id: str) -> JobRecord | None:
        # in the set of running jobs before the record says so: the recovery pass
        # (worker/recovery.py) reads the set, and drops entries whose record is not running
        self.redis.sadd(self._running_set(), job_id)

        def change(r: JobRecord) -> JobRecord | None:
            if r.ended:
                return None
            if r.status == RUNNING:
                # its previous attempt never ended (the caller holds the lease, so that attempt's
                # worker is gone): counted towards job_max_attempts
                r.lost += 1
            # a redelivered job starts again from scratch: reset what the lost run reported
            return r.model_copy(update={
                "status": RUNNING, "started_at": utc_now(), "progress": 0.0, "step": "starting",
                "started_ts": time.time(), "attempts": r.attempts + 1,
            })

        return self.update(job_id, change)

    def requeue(self, job_id: str, attempt: int, *, lost: bool) -> JobRecord | None:
        """Running attempt ``attempt`` goes back to queued (handed back, or its worker died).

        Returns the new record, or None when the job is no longer at that attempt (finished,
        requeued by someone else, or started again).
        """
        done = False

        def change(r: JobRecord) -> JobRecord | None:
            nonlocal done
            done = False  # decided again on each try of the transaction, as in finish
            if r.status != RUNNING or r.attempts != attempt:
                return None
            done = True
            return r.model_copy(update={
                "status": QUEUED, "progress": 0.0, "step": None, "started_at": None, "lost": r.lost + int(lost),
            })

        record = self.update(job_id, change)
        if done:
            self.redis.srem(self._running_set(), job_id)
        return record if done else None

    def running_ids(self) -> list[str]:
        return list(self.redis.smembers(self._running_set()))

    def forget_running(self, job_id: str) -> None:
        self.redis.srem(self._running_set(), job_id)

    def set_progress(self, job_id: str, fraction: float, step: str) -> JobRecord | None:
        def change(r: JobRecord) -> JobRecord | None:
            if r.status != RUNNING:
                return None
            return r.model_copy(update={"progress": round(float(fraction), 4), "step": step})

        return self.update(job_id, change)

    def finish(
        self, job_id: str, status: str, *, result: dict[str, Any] | None = None, error: JobError | None = None,
        attempt: int | None = None, notify: bool = False, unannounced: bool = False,
    ) -> tuple[JobRecord | None, bool]:
        """Move to a terminal status unless already terminal. Returns (record, changed).

        With ``attempt``, only while the job is still at that attempt: a worker whose lease was
        lost (it stalled, another worker started the job again) must not write its outcome.
        With ``notify``, a job with a webhook gets its delivery's due time in the same
        transaction (:meth:`webhook_due`): a process that dies between recording the end and
        queueing the delivery leaves it to the recovery pass, not to the broker's 6 h. With
        ``unannounced`` (a job its client was never told of), the record keeps no webhook.
        """
        assert status in TERMINAL
        changed_flag = False

        def change(r: JobRecord) -> JobRecord | None:
            nonlocal changed_flag
            # decided again on each try of the transaction (update retries on a record that
            # changed under it): a first try that lost the race to another end (two cancels, a
            # cancel and the worker's result) left it True, and both took the end for their own
            changed_flag = False
            if r.ended or (attempt is not None and r.attempts != attempt):
                return None
            changed_flag = True
            update: dict[str, Any] = {
                "status": status, "finished_at": utc_now(), "result": result, "error": error,
                "finished_ts": time.time(),
            }
            if status == SUCCEEDED:
                # no step is running any more: a finished embedding said "starting" for good (its
                # only step); a failed or cancelled job keeps the step it stopped in
                update.update(progress=1.0, step=None)
            if unannounced:
                update.update(_UNANNOUNCED)
            return r.model_copy(update=update)

        # read before the transaction (no read inside it): the clock the recovery pass compares with;
        # only where a due time may be written (a Redis round trip)
        due = self.clock() + self.webhook_grace_s() if notify and not unannounced else 0.0

        def also(pipe: Any, record: JobRecord) -> None:
            if due and record.webhook_url:
                pipe.zadd(self._webhooks_due().key, {job_id: due})
            # in the same transaction as the end: written after it, a reader of /metrics that saw
            # the job end could miss it from the counts, and a worker dying in between left the job
            # uncounted (and in the running set, for the recovery pass to look at again) for good
            pipe.srem(self._running_set(), job_id)
            self._count_finished(pipe, record)

        record = self.update(job_id, change, also)
        return record, changed_flag

    # --- job messages a worker holds before the job started ---------------------------------------
    # A worker that takes a job's message before the API confirmed its submission waits a moment,
    # then holds the message as a Celery retry (an ETA message, worker.tasks._confirmation_awaited):
    # unacked in Redis, where the broker hands it out again only after its visibility timeout (6 h)
    # should that worker die meanwhile (SIGKILL, the OOM killer, a container's memory limit). The
    # job is queued, not running: no lease, nothing the recovery pass looked at, and a job its
    # client was answered 202 for stayed "queued" those 6 h. So each such hold has a due time here,
    # by which the retry must have run again; the recovery pass sends the job's message again once
    # it passed (worker/recovery.py, recover_held_jobs). A retry that runs late meets a job started
    # or ended by the message sent again, and skips it or waits for it as any copy does.
    def _held(self) -> DueSet:
        return DueSet(self.redis, self.key("held"), self.clock)

    def hold_message(self, job_id: str, in_s: float) -> None:
        """A worker holds ``job_id``'s message (a retry), to run again within ``in_s`` seconds."""
        self._held().owe(job_id, in_s)

    def drop_hold(self, job_id: str) -> None:
        """The held message ran again (or was sent again): no longer owed."""
        self._held().settle(job_id)

    def holds_past_due(self, limit: int = 100) -> list[str]:
        return self._held().past_due(limit)

    def take_over_hold(self, job_id: str, next_in_s: float) -> bool:
        """Atomically, if the hold of ``job_id`` is past due: due again in ``next_in_s`` (should the
        caller die before it sent the message again), and True for this caller alone."""
        return self._held().take_over(job_id, next_in_s)

    # --- webhook deliveries that must still happen -----------------------------------------------
    # A delivery is a Celery message acked late: a worker killed while it delivers, or while it
    # holds the delivery's retry for its countdown, leaves the message unacked, and the broker
    # hands it out again only after its visibility timeout (6 h). So every delivery owed has a
    # due time here: the time by which its task must have been heard from again (started, retried,
    # done). The recovery pass (worker/recovery.py) sends again those past due.
    def _webhooks_due(self) -> DueSet:
        return DueSet(self.redis, self.key("webhooks", "due"), self.clock)

    def webhook_grace_s(self) -> float:
        """How long past its expected start a delivery may be silent before it is presumed lost:
        an attempt's own deadline plus a lease's period (queueing, a slow start)."""
        return float(self.settings.webhook_deadline_s) + float(self.settings.job_lease_s)

    def webhook_due(self, job_id: str, in_s: float, *, keep_earlier: bool = False) -> None:
        """The delivery of ``job_id`` is owed and must be heard from within ``in_s`` seconds
        (``keep_earlier``: an earlier due time already set stays)."""
        self._webhooks_due().owe(job_id, in_s, keep_earlier=keep_earlier)

    _QUEUED = """
    local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
    if (not due and ARGV[2] == '') or (due and ARGV[2] ~= '' and tonumber(due) == tonumber(ARGV[2])) then
        redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
        return 1
    end
    return 0
    """

    def webhook_due_at(self, job_id: str) -> float | None:
        return self._webhooks_due().due_at(job_id)

    def webhook_queued(self, job_id: str, expected: float | None, in_s: float) -> bool:
        """The delivery's message is now in its queue, where it waits durably however long the
        queue is: its due time moves ``in_s`` ahead, unless it changed since it read ``expected``
        (a worker took the message and set its own, or the delivery settled). Without this a
        queue backed up past the due time had each of its deliveries sent again, and again."""
        return bool(self.redis.eval(self._QUEUED, 1, self._webhooks_due().key, job_id,
                                    "" if expected is None else repr(float(expected)), repr(self.clock() + in_s)))

    def webhook_settled(self, job_id: str) -> None:
        """Delivered, failed for good, or nothing to deliver: no longer owed."""
        self._webhooks_due().settle(job_id)

    def webhooks_past_due(self, limit: int = 100) -> list[str]:
        return self._webhooks_due().past_due(limit)

    def take_over_webhook(self, job_id: str, task_id: str, next_in_s: float) -> float | None:
        """Atomically, if the delivery of ``job_id`` is past due: make ``task_id`` its owner (the
        claim a delivery task checks, so a late copy of the lost one stops) and set its next due
        time, which it returns. None when it is not past due (delivered, or another worker took
        it over first)."""
        due = self._webhooks_due()
        claim = (self.key("webhook", job_id, "claim"), task_id, max(1, self.ttl))
        return due.due_at(job_id) if due.take_over(job_id, next_in_s, claim=claim) else None

    def set_webhook(self, job_id: str, *, owner: str | None = None, **fields: Any) -> bool:
        """Write the delivery's state; with ``owner`` (a delivery task's id) only while that task
        still owns the delivery (its claim) and it was not delivered: False, and nothing written,
        otherwise. A task whose worker stalled mid-POST past its due time came back after the
        recovery pass had handed the delivery to another task, which delivered it, and wrote its
        own failure over the record: "retrying" (or "failed") for a delivered webhook, for good."""
        claim, delivered = self.key("webhook", job_id, "claim"), self.key("webhook", job_id, "delivered")
        owns = [True]

        def holds(pipe: Any) -> bool:
            owns[0] = pipe.get(claim) == owner and not pipe.exists(delivered)
            return owns[0]

        def change(r: JobRecord) -> JobRecord | None:
            state = (r.webhook or WebhookState()).model_copy(update=fields)
            return r.model_copy(update={"webhook": state})

        if owner is None:
            self.update(job_id, change)
        else:
            self.update(job_id, change, watch=(claim, delivered), holds=holds)
            if not owns[0]:
                return False
        if fields.get("status") in ("retrying", "delivered", "failed"):
            # every delivery attempt's outcome, for /metrics (webhook retries on the dashboard)
            self.redis.hincrby(self.key("stats", "webhooks"), fields["status"], 1)
        return True

    def webhook_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.key("stats", "webhooks")).items()}

    # --- metrics kept in Redis so every API replica reports the same figures ----------------
    def _count_finished(self, pipe: Any, record: JobRecord) -> None:
        kind, status = record.kind, record.status
        pipe.hincrby(self.key("stats", "finished"), f"{kind}:{status}", 1)
        started = record.started_ts
        if started is not None and record.finished_ts is not None and status == SUCCEEDED:
            duration = max(0.0, record.finished_ts - started)
            self._observe(pipe, "duration", kind, DURATION_BUCKETS, duration)
            audio_s = (record.result or {}).get("audio_duration")
            if isinstance(audio_s, (int, float)) and audio_s > 0:
                # what users pay for: worker seconds per hour of audio (a real-time factor)
                self._observe(pipe, "per_audio_hour", kind, PER_AUDIO_HOUR_BUCKETS, duration * 3600.0 / audio_s)

    def _observe(self, pipe: Any, name: str, kind: str, bounds: tuple[float, ...], value: float) -> None:
        """One observation of a per-kind histogram kept as le:<bound>/count/sum in a Redis hash."""
        key = self.key("stats", name, kind)
        for bound in bounds:
            if value <= bound:
                pipe.hincrby(key, f"le:{bound}", 1)
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "sum", value)

    def _histogram(self, name: str, kind: str) -> dict[str, float]:
        return {k: float(v) for k, v in self.redis.hgetall(self.key("stats", name, kind)).items()}

    def finished_counts(self) -> dict[tuple[str, str], int]:
        raw = self.redis.hgetall(self.key("stats", "finished"))
        return {tuple(k.split(":", 1)): int(v) for k, v in raw.items()}  # type: ignore[misc]

    def duration_histogram(self, kind: str) -> dict[str, float]:
        return self._histogram("duration", kind)

    def per_audio_hour_histogram(self, kind: str) -> dict[str, float]:
        return self._histogram("per_audio_hour", kind)

    # --- worker heartbeats ------------------------------------------------------------------
    # Each worker's heartbeat is a record that expires, and its name is in an index of workers:
    # /health and /metrics (open to anyone) list the workers from the index, in time that grows
    # with the workers, not with the keyspace. They found the records by a SCAN of every key
    # before, every job record and voiceprint: 0.25 s a call at 200,000 keys. A worker of an
    # earlier release writes no index entry, so the index is read only while a job worker of
    # this release heartbeats (its mark lives as long as its heartbeat): an API upgraded first,
    # with the webhook workers that share its image, still finds the old job workers by the
    # SCAN, and a fleet rolled back goes back to it within a heartbeat's lifetime. A job worker
    # of the earlier release beside one of this release is not listed (docs/service.md).
    def heartbeat(self, worker: str, info: dict[str, Any], ttl_s: float) -> None:
        ttl = max(1, int(ttl_s))
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key("worker", worker), json.dumps(info), ex=ttl)
        pipe.sadd(self.key("workers"), worker)
        if info.get("loads_models", True) is not False:
            pipe.set(self.key("workers", "indexed"), "1", ex=ttl)
        pipe.execute()

    def forget_worker(self, worker: str) -> None:
        """A worker that stops removes its heartbeat (its name leaves the index with it)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key("worker", worker))
        pipe.srem(self.key("workers"), worker)
        pipe.execute()

    def consumer_lost_key(self) -> str:
        """Set while a worker lately stopped heartbeating without stopping (or its main process
        stalled, worker/recovery.py note_stalled_consumer): the recovery pass then looks for lost
        messages among queued jobs of any age (recover_unqueued_jobs)."""
        return self.key("unqueued", "stalled")

    def _prune_workers(self, *, only: bool = False) -> Any:
        return self._live_workers(keys=[self.key("worker", ""), self.key("workers"), self.key("workers", "indexed"),
                                        self.consumer_lost_key()],
                                  args=[max(1, math.ceil(self.settings.job_unqueued_after_s)), "1" if only else "0"])

    def prune_workers(self) -> None:
        """Drop the names of workers whose heartbeat lapsed from the index, noting that one may
        have taken a message with it (see _LIVE_WORKERS); each recovery pass does, so that a
        worker lost while nobody asks for /health is noticed too."""
        self._prune_workers(only=True)

    def workers(self) -> list[dict[str, Any]]:
        raw = self._prune_workers()
        if raw is None:  # no worker of this release yet: the earlier releases' records by a SCAN
            keys = list(self.redis.scan_iter(match=self.key("worker", "*"), count=100))
            raw = [r for r in (self.redis.mget(keys) if keys else []) if r]
        infos = []
        for r in raw:
            try:
                infos.append(json.loads(r))
            except ValueError:
                continue
        return [w for w in infos if isinstance(w, dict)]
