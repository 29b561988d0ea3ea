"""Temporary storage for uploads, shared by the API (writes) and the workers (read, delete).

Keys are ``<job_id>/<name>`` so everything a job uploaded can be deleted at once when the job
ends. Two backends behind one :class:`Storage` protocol, chosen by ``settings.storage_backend``:

* :class:`LocalStorage` (the embedded default): a directory every process mounts;
* :class:`S3Storage`: any S3-compatible object store (AWS S3, MinIO, GCS's S3 interface), so API
  and workers on different hosts share nothing but Redis and the bucket. Uploads stream in as
  multipart uploads, workers stream the object down to a temporary file, a job's objects are
  deleted when it ends, and a sweep (or the bucket's own lifecycle rule) removes what was left.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from shared.errors import InputError
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


def out_of_room(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk had no room left (ENOSPC, or a quota's EDQUOT): the service's
    state, answered 507 by the API (an upload) and by the worker (a fetched or copied file)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def refused_by_storage(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage refused or failed the service's own file: a disk's (a
    volume mounted or turned read-only: EROFS; no permission: EACCES, EPERM) or the S3 backend's
    (the bucket out of reach or answering an error once boto3's retries ran out: botocore's
    errors come from nothing else in a worker). The service's state, as the API answers an
    upload so refused (503), never the caller's doing nor an internal error."""
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return type(exc).__module__.partition(".")[0] == "botocore"


CHUNK = 1024 * 1024
# the S3 backend's local copies of objects (S3Storage.local_path), swept once stale
TEMP_PREFIX = ".s3-"


class UploadTooLargeError(InputError):
    status_code = 413


class Storage(Protocol):
    def save(self, job_id: str, name: str, stream: BinaryIO, *, max_bytes: int) -> str: ...

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]: ...

    def exists(self, key: str) -> bool: ...

    def delete_job(self, job_id: str) -> None: ...

    def sweep(self, older_than_s: float) -> int: ...


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe_part(value: str) -> str:
    # job ids and names end up in paths: never let "../" or a slash through
    cleaned = _SAFE.sub("_", value)[:128].lstrip(".")
    if not cleaned:
        raise ValueError(f"unusable storage key part {value!r}")
    return cleaned


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A folder that cannot be made (a read-only volume, its parent a file, no permission)
            # raised here: the API died at import and served nothing, not even its health or the
            # results of jobs already run, and a worker's heartbeat thread died, leaving it off
            # /health. Each save makes the folder again (mkdir parents), and fails there, answered
            # 503 "upload storage unavailable" until the storage is fixed.
            log.error("upload storage %s is unusable (%s: %s): uploads are refused until it is fixed",
                      self.root, type(exc).__name__, exc)

    def _path(self, key: str) -> Path:
        job, _, name = key.partition("/")
        return self.root / _safe_part(job) / _safe_part(name)

    def save(self, job_id: str, name: str, stream: BinaryIO, *, max_bytes: int) -> str:
        """Copy ``stream`` chunk by chunk; refuse (413) once it grows past ``max_bytes``."""
        key = f"{_safe_part(job_id)}/{_safe_part(name)}"
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # write under a temporary name so a reader never sees a half-written upload
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        written = 0
        try:
            with open(partial, "wb") as out:
                while chunk := stream.read(CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise UploadTooLargeError(f"upload is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return key

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        yield self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / _safe_part(job_id), ignore_errors=True)

    def sweep(self, older_than_s: float) -> int:
        """Delete upload folders older than ``older_than_s`` (jobs that never ran or were lost)."""
        cutoff = time.time() - older_than_s
        removed = 0
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class _Limited:
    """A read-only stream that refuses (413) to give more than ``max_bytes``."""

    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self.stream, self.max_bytes, self.read_bytes = stream, max_bytes, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(CHUNK if size is None or size < 0 else size)
        self.read_bytes += len(chunk)
        if self.read_bytes > self.max_bytes:
            raise UploadTooLargeError(f"upload is larger than the limit of {self.max_bytes} bytes")
        return chunk


class S3Storage:
    """Uploads in an S3-compatible bucket, through boto3 (credentials from the usual AWS chain:
    environment, shared config and credentials files, instance or task role)."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not settings.s3_bucket:
            raise ValueError("storage_backend 's3' needs s3_bucket")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/") + "/" if settings.s3_prefix.strip("/") else ""
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": settings.s3_addressing_style}),
        )
        # parts of 16 MiB: a 1 GiB upload is 64 parts, each held in memory once while it is sent
        self.transfer = TransferConfig(multipart_threshold=16 * CHUNK, multipart_chunksize=16 * CHUNK, max_concurrency=4)
        self.extra: dict[str, str] = {}
        if settings.s3_server_side_encryption:
            self.extra["ServerSideEncryption"] = settings.s3_server_side_encryption
            if settings.s3_kms_key_id:
                self.extra["SSEKMSKeyId"] = settings.s3_kms_key_id
        self.temp_dir = Path(settings.storage_dir)

    def _object(self, key: str) -> str:
        job, _, name = key.partition("/")
        return f"{self.prefix}{_safe_part(job)}/{_safe_part(name)}"

    def save(self, job_id: str, name: str, stream: BinaryIO, *, max_bytes: int) -> str:
        """Stream ``stream`` into the bucket (multipart past 16 MiB); 413 past ``max_bytes``, and
        then nothing of it stays (the transfer aborts its multipart upload)."""
        key = f"{_safe_part(job_id)}/{_safe_part(name)}"
        self.client.upload_fileobj(_Limited(stream, max_bytes), self.bucket, self._object(key),
                                   ExtraArgs=self.extra or None, Config=self.transfer)
        return key

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """The object streamed down to a temporary file, removed afterwards (decoders need a seekable file)."""
        import tempfile

        from botocore.exceptions import ClientError

        self.temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + key.rpartition("/")[2], dir=self.temp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    self.client.download_fileobj(self.bucket, self._object(key), out, Config=self.transfer)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                        raise FileNotFoundError(key) from None
                    raise
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _sweep_copies(self, older_than_s: float) -> int:
        """Remove the worker's local copies that outlived their job: ``local_path`` deletes its copy
        when the job ends, but a process killed mid-job (SIGKILL, the OOM killer, a CUDA fault's
        exit) never gets there. Its copy, up to a whole upload, stayed in ``temp_dir`` for good,
        and a Kubernetes ``emptyDir`` outlives the container, so each kill of a pod's worker left
        another one until the pod was evicted for its disk. No job runs longer than
        ``older_than_s`` (the uploads' own expiry), so an older copy belongs to no running job."""
        return _sweep_copies_in(self.temp_dir, older_than_s)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})

    def delete_job(self, job_id: str) -> None:
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{_safe_part(job_id)}/")
        keys = [o["Key"] for o in listing.get("Contents", [])]
        if keys:
            self._delete(keys)

    def sweep(self, older_than_s: float) -> int:
        """Delete objects older than ``older_than_s``; returns how many jobs' uploads went.

        A bucket lifecycle rule expiring the prefix after a day does the same without a client
        (docs/scaling.md); the sweep keeps a bucket without one clean.
        """
        import datetime

        self._sweep_copies(older_than_s)
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=older_than_s)
        old: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            old += [o["Key"] for o in page.get("Contents", []) if o["LastModified"] < cutoff]
        if old:
            self._delete(old)
        return len({k[len(self.prefix):].partition("/")[0] for k in old})


def _sweep_copies_in(folder: Path, older_than_s: float) -> int:
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.glob(TEMP_PREFIX + "*") if folder.is_dir() else ():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def get_storage(settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_dir)
    if settings.storage_backend == "s3":
        return S3Storage(settings)
    raise ValueError(f"unknown storage backend {settings.storage_backend!r}")
