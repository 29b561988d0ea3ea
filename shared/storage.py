"""Temporary storage for uploads, shared by the API (writes) and the workers (read, delete).

Keys are ``<job_id>/<name>`` so everything a job uploaded can be deleted at once when the job
ends. Only :class:`LocalStorage` (a directory mounted into every container) is implemented; an
S3-compatible backend implements the same :class:`Storage` protocol (``save`` = multipart upload,
``local_path`` = download to a temp file, ``delete_job`` = delete by prefix, ``sweep`` = a bucket
lifecycle rule) and is selected by ``settings.storage_backend``.
"""

from __future__ import annotations

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

CHUNK = 1024 * 1024


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
        self.root.mkdir(parents=True, exist_ok=True)

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


def get_storage(settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_dir)
    raise ValueError(f"unknown storage backend {settings.storage_backend!r}")
