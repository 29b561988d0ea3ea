"""Python client for the job interface: ``submit`` a file, ``wait`` with progress, get the ``result``.

    from cli.client import Client
    with Client("http://127.0.0.1:8000") as c:
        job = c.submit("diarize", "meeting.wav", num_speakers=2)
        done = c.wait(job["job_id"], progress=lambda f, step: print(f"{f:.0%} {step}"))
        print(c.result(job["job_id"]))

Audio may be given by URL instead of a file: a ``str`` that starts with ``http://`` or
``https://`` is sent as the field's ``<name>_url`` (the service's worker fetches it), e.g.
``c.submit("diarize", "https://bucket.s3.amazonaws.com/meeting.wav?X-Amz-Signature=...")``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import httpx

from shared.errors import AnalysisError, ProcessingError
from shared.jobs import TERMINAL
from shared.kinds import KINDS

# the form fields that carry files, per kind (as the API's routes take them)
FILE_FIELDS = {name: tuple(f.name for f in kind.files) for name, kind in KINDS.items()}
# upload field -> the field that gives it by URL instead, per kind (audio fields only)
URL_FIELDS = {name: {f.name: f.url_name for f in kind.audio_files if f.url_name} for name, kind in KINDS.items()}


def is_url(source: str | Path) -> bool:
    """A source given as an http(s) URL (a ``str``); a ``Path`` is always a local file."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text or response.reason_phrase}
    raise AnalysisError.from_body({**body, "status_code": response.status_code})


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout_s: float = 60.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, kind: str, *files: str | Path, webhook_url: str | None = None, **params: Any) -> dict[str, Any]:
        """Upload (or, for an http(s) URL, name) each of the kind's inputs and enqueue; returns the
        job record (status 'queued')."""
        fields = FILE_FIELDS.get(kind)
        if fields is None:
            raise ValueError(f"unknown job kind {kind!r}; one of {sorted(FILE_FIELDS)}")
        if len(files) != len(fields):
            raise ValueError(f"{kind} takes {len(fields)} file(s): {', '.join(fields)}")
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items() if v is not None}
        if webhook_url:
            data["webhook_url"] = webhook_url
        local: list[tuple[str, str | Path]] = []
        for field, source in zip(fields, files):
            if is_url(source):
                url_field = URL_FIELDS[kind].get(field)
                if url_field is None:
                    raise ValueError(f"{kind}: {field} must be a local file (only audio may be given by URL)")
                data[url_field] = str(source)
            else:
                local.append((field, source))
        handles = [open(f, "rb") for _, f in local]
        try:
            # httpx streams file objects from disk rather than loading them
            upload = {field: (Path(f).name, h) for (field, f), h in zip(local, handles)}
            # only URLs: an urlencoded form, which the API's routes read as well
            response = self.http.post(f"/jobs/{kind}", files=upload or None, data=data)
        finally:
            for h in handles:
                h.close()
        _raise_for_error(response)
        return response.json()

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        _raise_for_error(response)
        return response.json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.http.post(f"/jobs/{job_id}/cancel")
        _raise_for_error(response)
        return response.json()

    def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[float, str | None], None] | None = None,
        timeout_s: float | None = None,
        interval_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the job ends; ``progress(fraction, step)`` on every poll. Returns the record."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.status(job_id)
            if progress is not None:
                progress(float(record.get("progress") or 0.0), record.get("step") or record["status"])
            if record["status"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {record['status']} after {timeout_s} s")
            time.sleep(interval_s)

    def result(self, job_id: str) -> dict[str, Any]:
        """The result body of a finished job; raises the job's error if it failed."""
        record = self.status(job_id)
        if record["status"] == "succeeded":
            return record["result"]
        if record["status"] == "failed":
            raise AnalysisError.from_body(record.get("error") or {})
        raise ProcessingError(f"job {job_id} is {record['status']}, no result")
