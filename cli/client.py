"""Python client for the job interface: ``submit`` a file, ``wait`` with progress, get the ``result``.

    from cli.client import Client
    with Client("http://127.0.0.1:8000") as c:
        job = c.submit("diarize", "meeting.wav", num_speakers=2)
        done = c.wait(job["job_id"], progress=lambda f, step: print(f"{f:.0%} {step}"))
        print(c.result(job["job_id"]))                 # the JSON body, as a dict
        print(c.result(job["job_id"], format="srt"))   # or rttm, vtt: the text

Audio may be given by URL instead of a file: a ``str`` that starts with ``http://`` or
``https://`` is sent as the field's ``<name>_url`` (the service's worker fetches it), e.g.
``c.submit("diarize", "https://bucket.s3.amazonaws.com/meeting.wav?X-Amz-Signature=...")``.
A multiple-file field (``enroll``'s ``files``) takes local files only.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import httpx

from shared.errors import AnalysisError
from shared.jobs import TERMINAL
from shared.kinds import KINDS

# the form fields that carry files, per kind (as the API's routes take them)
FILE_FIELDS = {name: tuple(f.name for f in kind.files) for name, kind in KINDS.items()}
# upload field -> the field that gives it by URL instead, per kind (audio fields only)
URL_FIELDS = {name: {f.name: f.url_name for f in kind.audio_files if f.url_name} for name, kind in KINDS.items()}


def is_url(source: str | Path) -> bool:
    """A source given as an http(s) URL (a ``str``); a ``Path`` is always a local file."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def _assign(kind: str, files: tuple[str | Path, ...]) -> list[tuple[str, str | Path]]:
    """(field, file) pairs in the kind's order; a multiple-file field (last) takes the rest."""
    specs = KINDS[kind].files
    if specs and specs[-1].multiple and len(files) >= len(specs):
        names = [f.name for f in specs[:-1]] + [specs[-1].name] * (len(files) - len(specs) + 1)
        if len(files) - len(specs) + 1 > specs[-1].max_count:
            raise ValueError(f"{kind} takes at most {specs[-1].max_count} files for {specs[-1].name}")
        return list(zip(names, files))
    if len(files) != len(specs):
        raise ValueError(f"{kind} takes {len(specs)} file(s): {', '.join(f.name for f in specs)}; got {len(files)}")
    return [(f.name, path) for f, path in zip(specs, files)]


def check_sources(kind: str, files: tuple[str | Path, ...]) -> list[tuple[str, str | Path]]:
    """``kind``'s (field, source) pairs, or ValueError saying what the call got wrong (how many
    files the kind takes, a URL where only uploads go): before anything is sent."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
    pairs = _assign(kind, files)
    for field, source in pairs:
        if is_url(source) and URL_FIELDS[kind].get(field) is None:
            raise ValueError(f"{kind}: {field} must be a local file (only single audio fields may be given by URL)")
    return pairs


# answers after which the same request is sent again: a proxy or a service restarting (502, 503,
# 504), and a submission with the same Idempotency-Key still in progress (409, submits only)
TRANSIENT_STATUS = frozenset({502, 503, 504})


def _retry_wait(response: httpx.Response | None, attempt: int, most_s: float) -> float:
    """The service's Retry-After where it gave one, else 1, 2, 4 ... s; at most ``most_s``."""
    try:
        asked = float(response.headers["retry-after"]) if response is not None else None
    except (KeyError, ValueError):
        asked = None
    return min(most_s, asked if asked is not None and asked >= 0 else 2.0 ** attempt)


def _form_value(value: Any) -> str:
    """A parameter as its form field: ``true``/``false``, and a list of ids (voiceprints) as the
    API reads one, separated by commas; a list went out as its Python text, ``['vp_1', 'vp_2']``,
    and was refused naming a voiceprint ``"['vp_1'"``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value)
    return str(value)


# what an error's detail quotes at most of a body that is not the API's error shape
_QUOTED_BODY = 300


def _raise_for_error(response: httpx.Response) -> None:
    """An error answer as the AnalysisError it says. A body not in the API's error shape (a
    proxy's or another server's: ``[...]``, ``null``, ``"text"``, ``{"message": ...}``) is
    quoted, at most _QUOTED_BODY characters of it: a JSON body that was not an object raised
    TypeError ("'list' object is not a mapping") out of every call, a traceback in the CLI, and
    ``{"message": "Forbidden"}`` was "unknown error"."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
        said = body if isinstance(body, str) else next(
            (body[k] for k in ("detail", "message", "error") if isinstance(body, dict) and isinstance(body.get(k), str)),
            None) or response.text.strip() or response.reason_phrase
        body = {"detail": said[:_QUOTED_BODY], "error_type": body.get("error_type") if isinstance(body, dict) else None}
    raise AnalysisError.from_body({**body, "status_code": response.status_code})


class NotThisApi(AnalysisError):
    """A success answer that is not this API's (not JSON, or JSON of another shape): the server at
    the client's base URL is something else (another service on that port, a proxy's login page
    answered 200) or misbehaves. 502: the fault is the server's, as a gateway's would be."""

    error_type = "ProcessingError"
    status_code = 502


def _answer(response: httpx.Response, *, needs: tuple[str, ...] = ()) -> Any:
    """The JSON body of a success answer, an object holding ``needs`` (each a string) where
    given; :class:`NotThisApi` otherwise. Such an answer (an HTML page, ``[]``, a record without
    ``status``) was a JSONDecodeError, TypeError or KeyError out of the call: a traceback."""
    try:
        body = response.json()
    except ValueError:
        body = _NOT_JSON
    if body is not _NOT_JSON and (not needs or isinstance(body, dict)
                                  and all(isinstance(body.get(k), str) for k in needs)):
        return body
    if response.is_redirect:
        # never followed: the X-API-Key would go wherever a proxy (http to https, a moved host) or
        # anyone answering there pointed it
        raise NotThisApi(f"{response.request.method} {response.url.copy_with(query=None)} answered "
                         f"{response.status_code}, a redirect to {response.headers.get('location', '')[:200]!r}, "
                         "which the client does not follow (its API key would go with it): give the API's own URL")
    kind = (response.headers.get("content-type") or "no Content-Type").split(";", 1)[0].strip()[:60]
    what = "not JSON" if body is _NOT_JSON else "JSON of another shape" + (f" (no {', '.join(needs)})" if needs else "")
    raise NotThisApi(f"{response.request.method} {response.url.copy_with(query=None)} answered "
                     f"{response.status_code} with {kind}, {what}: not this service's answer (is the URL the API's?)")


_NOT_JSON = object()


def _record(response: httpx.Response) -> dict[str, Any]:
    """A job record (:func:`_answer` with ``job_id`` and ``status``) whose ``error`` is an object
    or null, as callers read it: a string there was an AttributeError out of the CLI's
    ``submit --wait`` (``record["error"].get("status_code")``), a traceback."""
    record = _answer(response, needs=("job_id", "status"))
    if not isinstance(record.get("error"), (dict, type(None))):
        raise NotThisApi(f"{response.request.method} {response.url.copy_with(query=None)} answered a job record "
                         "whose error is not an object: not this service's answer (is the URL the API's?)")
    return record


class Client:
    """``retries``: how many times a submit, or a poll of ``wait``, is sent again after the
    connection failed or the service answered 502/503/504 (a submit also after a 429, its
    tenant at its quota), waiting its Retry-After (at most ``retry_wait_max_s``). A submit carries an ``Idempotency-Key``, so that a retry after an
    answer lost on the way (a reset, a timeout) gets the job the first attempt made instead of
    running the recording twice. ``on_retry(why, wait_s, retry, retries)``, when given, is told
    of each retry before its wait (the CLI says it on stderr)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 4, retry_wait_max_s: float = 30.0,
                 on_retry: Callable[[str, float, int, int], None] | None = None):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.retries = retries
        self.retry_wait_max_s = retry_wait_max_s
        self.on_retry = on_retry

    def _retrying(self, send: Callable[[], httpx.Response], retried: frozenset[int] = TRANSIENT_STATUS) -> httpx.Response:
        """``send()``, again after a transport error or an answer in ``retried``, ``retries`` times
        at most; the last answer (or error) is the caller's."""
        for attempt in range(self.retries + 1):
            response: httpx.Response | None = None
            try:
                response = send()
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise
                why = f"no answer ({type(exc).__name__}: {exc})"
            else:
                if response.status_code not in retried or attempt == self.retries:
                    return response
                why = f"answered {response.status_code}"
            wait_s = _retry_wait(response, attempt, self.retry_wait_max_s)
            if self.on_retry is not None:
                self.on_retry(why, wait_s, attempt + 1, self.retries)
            time.sleep(wait_s)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, kind: str, *files: str | Path, webhook_url: str | None = None,
               webhook_payload: str | None = None, idempotency_key: str | None = None, **params: Any) -> dict[str, Any]:
        """Upload (or, for an http(s) URL, name) each of the kind's inputs and enqueue; returns the
        job record (status 'queued'). ``params``: the kind's form fields (``num_speakers=2``,
        ``voiceprints="vp_1,vp_2"`` or a list of ids, ``voiceprints="all"``). ``webhook_payload``:
        'full' (default) or 'status' (the webhook carries the record without its result).
        ``idempotency_key``: the submission's key (a fresh one by default); the same key again
        within a day gets the same job."""
        pairs = check_sources(kind, files)
        data = {k: _form_value(v) for k, v in params.items() if v is not None}
        if webhook_url:
            data["webhook_url"] = webhook_url
        if webhook_payload:
            data["webhook_payload"] = webhook_payload
        local: list[tuple[str, str | Path]] = []
        for field, source in pairs:
            if is_url(source):
                data[URL_FIELDS[kind][field]] = str(source)
            else:
                local.append((field, source))
        key = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        # 409: the first attempt, whose answer was lost, is still being submitted; 429: this
        # key's tenant is at its quota of unfinished jobs, which free a slot as each one ends
        response = self._retrying(lambda: self._post_files(f"/jobs/{kind}", local, data, key),
                                  TRANSIENT_STATUS | {409, 429})
        _raise_for_error(response)
        return _record(response)

    def _post_files(self, path: str, pairs: list[tuple[str, str | Path]], data: dict[str, str],
                    headers: dict[str, str] | None = None) -> httpx.Response:
        # opened for each attempt: a retry sends the files from their start
        handles = [open(f, "rb") for _, f in pairs]
        try:
            # httpx streams file objects from disk rather than loading them
            upload = [(field, (Path(f).name, h)) for (field, f), h in zip(pairs, handles)]
            # only URLs: an urlencoded form, which the API's routes read as well
            return self.http.post(path, files=upload or None, data=data, headers=headers)
        finally:
            for h in handles:
                h.close()

    # --- voiceprints ----------------------------------------------------------------------------
    def create_voiceprint(self, label: str, *files: str | Path, idempotency_key: str | None = None) -> dict[str, Any]:
        """Enroll a person from one or more recordings; returns the stored voiceprint (its ``id``).
        Retried as a submit is, with an ``Idempotency-Key`` (a fresh one by default): a retry after
        an answer lost on the way is answered the voiceprint the first attempt stored, not a second
        one (a 409 is not retried: it is also a key's full room)."""
        key = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._retrying(lambda: self._post_files("/voiceprints", [("files", f) for f in files],
                                                           {"label": label}, key))
        _raise_for_error(response)
        return _answer(response, needs=("id",))

    def voiceprints(self, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every voiceprint of this key, oldest first: the listing comes a page at a time, each
        naming the next in its ``Link`` header."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page_size}
        seen: set[str] = set()
        while True:
            response = self.http.get("/voiceprints", params=params)
            _raise_for_error(response)
            page = _answer(response)
            if not isinstance(page, dict) or not isinstance(page.get("voiceprints"), list):
                raise NotThisApi(f"GET {response.url.copy_with(query=None)} answered a page without its voiceprints")
            found += page["voiceprints"]
            following = response.links.get("next", {}).get("url")
            if not following:
                return found
            # only the cursor is taken from the link: the key goes to this client's own base URL
            cursor = (parse_qs(urlsplit(following).query).get("cursor") or [""])[0]
            # a cursor given twice is a server going round (one that ignores the cursor, behind
            # a proxy that drops the query string, answers page one again and again): the loop
            # listed the same voiceprints without end, the list growing until memory ran out
            if not cursor or cursor in seen:
                raise NotThisApi(f"GET {response.url.copy_with(query=None)}: its next page "
                                 + ("names no cursor" if not cursor else "is one already listed: the listing goes round"))
            seen.add(cursor)
            params = {"limit": page_size, "cursor": cursor}

    def delete_voiceprint(self, voiceprint_id: str) -> None:
        _raise_for_error(self.http.delete(f"/voiceprints/{voiceprint_id}"))

    def status(self, job_id: str) -> dict[str, Any]:
        # a read: an API restarting under an hour-long wait is waited out, not the end of it
        response = self._retrying(lambda: self.http.get(f"/jobs/{job_id}"))
        _raise_for_error(response)
        return _record(response)

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.http.post(f"/jobs/{job_id}/cancel")
        _raise_for_error(response)
        return _record(response)

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
                progress(_fraction(record.get("progress")), record.get("step") or record["status"])
            if record["status"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {record['status']} after {timeout_s} s")
            time.sleep(interval_s)

    def result(self, job_id: str, format: str = "json") -> Any:  # noqa: A002
        """The result of a succeeded job (``GET /jobs/{id}/result``): the body as a dict for
        ``json``, the text for ``rttm``, ``srt`` and ``vtt``. Raises the job's own error if it
        failed, and the API's 409 while it is queued or running (or was cancelled)."""
        response = self.http.get(f"/jobs/{job_id}/result", params={"format": format})
        if response.status_code == 409:
            record = self.status(job_id)
            if record["status"] == "failed":
                error = record.get("error")
                raise AnalysisError.from_body(error if isinstance(error, dict) else {"detail": str(error)})
        _raise_for_error(response)
        return _answer(response) if format == "json" else response.text


def _fraction(value: Any) -> float:
    """A record's ``progress`` as a fraction for the caller's progress hook: 0 for anything else."""
    try:
        fraction = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return fraction if 0.0 <= fraction <= 1.0 else 0.0
