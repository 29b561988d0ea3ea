"""Audio given by URL: a job's audio field ``<name>`` may be sent as ``<name>_url`` instead.

The rule is the registry's (``FileField.url_name`` in ``shared/kinds.py``), so every kind with
audio uploads takes URLs without code of its own: ``file_url`` for diarize and embedding,
``file1_url``/``file2_url`` for compare, ``audio_url`` for compare_embedding.

The API checks the URL at submit (:func:`check_media_url`, the webhooks' check of
``shared/outbound.py``: http(s), allowed hosts, public addresses only unless
``url_allow_private_addresses``; 422) and keeps it in the job
record, never in a Celery message. The worker downloads it (:func:`fetch_audio`), so no API
request is held open for a big file, and a URL that fails is the job's error: a
``ValidationError`` with a 4xx ``status_code`` that says what went wrong (the server's status,
a timeout, too large, not audio, a refused redirect).

The download:

* goes through the same address policy as webhooks, at connect time too (pinned address: DNS
  rebinding reaches nothing), and follows redirects itself, checking every target like the
  first URL (allowed hosts, public addresses; no https to http downgrade), at most
  ``url_fetch_max_redirects`` of them;
* waits at most ``url_fetch_timeout_s`` to connect and for each next piece of the answer, and
  stops once ``url_fetch_deadline_s`` has passed since it began (redirects included);
* refuses a declared ``Content-Length`` over the limit before reading the body, and otherwise
  stops reading the moment the bytes received pass it (chunked answers), the limit being
  ``max_upload_bytes`` for all of a job's URLs together, as for an upload;
* refuses a body sent with a ``Content-Encoding`` (it asks for identity; a gzip of zeros inflates
  a thousandfold, twice over when stacked), and reads the bytes as they came;
* refuses answers that declare a non-audio type (``text/html``, JSON, XML, images...), and checks
  what it stored with the same header checks as an upload (duration, sample rate; 413/415);
* is streamed into storage in 1 MiB chunks under a temporary name, so a half-fetched file is
  never seen and nothing is left behind when it fails.

URLs are logged and reported without their query string: a presigned S3 or GCS URL carries its
credentials there.
"""

from __future__ import annotations

import logging
import re
import time
from http import HTTPStatus
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

import httpx

from shared.audio_limits import NotAudioError, check_audio_limits
from shared.errors import AnalysisError, AudioDecodeError, InputError
from shared.formats import file_name
from shared.outbound import MAX_MEDIA_URL_LENGTH, AddressNotAllowed, check_url, redact, transport
from shared.settings import Settings
from shared.storage import Storage, UploadTooLargeError

log = logging.getLogger(__name__)

USER_AGENT = "audio-analysis (audio by URL)"
DOWNLOAD_STEP = "downloading"


class UrlFetchError(InputError):
    """The URL could not be fetched: its server's answer, a timeout, a refused redirect (422)."""

    status_code = 422


def filename_of(url: str) -> str | None:
    """The last segment of the URL's path (what a job record shows as its ``filename``), as one
    line of printable text: percent-decoding made ``%0a``, ``%1b`` and ``%e2%80%ae`` (a
    right-to-left override: "evil\u202evaw.exe" reads "evilexe.wav") into the name."""
    try:
        return file_name(unquote(urlsplit(url).path.rsplit("/", 1)[-1]))
    except ValueError:
        return None


def _declares_not_audio(content_type: str) -> bool:
    """True for answers that say they are a page, a document or an image. Servers label audio
    in many ways (``audio/*``, ``video/*``, ``application/octet-stream``, S3's
    ``binary/octet-stream``, none at all): those are read and their header checked instead."""
    mime = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = mime.partition("/")
    return main in ("text", "image", "font", "model", "multipart", "message") or sub in (
        "json", "xml", "html", "xhtml+xml", "javascript", "pdf", "x-www-form-urlencoded",
    ) or sub.endswith(("+json", "+xml"))


def _status(code: int) -> str:
    """``404 Not Found``: the code and its standard phrase, never the server's own reason phrase
    (up to 100 KB of whatever text it likes, into the job's error as if the service said it)."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}")


def _media_type(content_type: str) -> str:
    """The answer's media type as the job's error names it: a type/subtype token, else a
    stand-in (the header is the server's text, as long as it likes)."""
    mime = content_type.split(";", 1)[0].strip()
    return mime if _MEDIA_TYPE.fullmatch(mime) else "a non-audio Content-Type"


class _Body:
    """The answer's body as the file-like object storage reads: counts, limits and reports."""

    def __init__(self, chunks: Iterator[bytes], *, limit: int, deadline: float, field: str,
                 progress: Callable[[], None] | None) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._done = False
        self.received = 0
        self.limit, self.deadline, self.field, self.progress = limit, deadline, field, progress

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                break
            self.received += len(chunk)
            if self.received > self.limit:
                raise UploadTooLargeError(f"{self.field}: the file is larger than the limit of {self.limit} bytes")
            if time.monotonic() > self.deadline:
                raise _Deadline()
            self._buffer += chunk
            if self.progress is not None:
                self.progress()
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = bytes(self._buffer), bytearray()
        else:
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
        return out


class _Deadline(Exception):
    pass


def _refused_by_policy(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressNotAllowed):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch_audio(
    url: str,
    *,
    field: str,
    storage: Storage,
    job_id: str,
    name: str,
    settings: Settings,
    max_bytes: int,
    max_duration: float,
    progress: Callable[[], None] | None = None,
) -> tuple[str, int]:
    """Download ``url`` into storage as ``<job_id>/<name>``; returns (storage key, bytes).

    Raises :class:`UrlFetchError` (422), :class:`UploadTooLargeError` (413) or
    :class:`AudioDecodeError`/``AudioTooLongError`` (415/413), each naming ``field``.
    ``progress`` is called for every chunk received (a job's cancellation and hand-back checks).
    """
    started = time.monotonic()
    deadline = started + settings.url_fetch_deadline_s
    allow_private = settings.url_allow_private_addresses
    where = redact(url)
    current = url
    try:
        # the deadline bounds every socket operation, the response head too: a server trickling
        # its headers a byte at a time, each within the timeout, held the worker for hours; and
        # progress (a cancel, a warm shutdown) is checked between reads, head or body
        with httpx.Client(transport=transport(allow_private, deadline, progress), follow_redirects=False,
                          trust_env=False,
                          headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}) as client:
            for hop in range(settings.url_fetch_max_redirects + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Deadline()
                timeout = httpx.Timeout(min(settings.url_fetch_timeout_s, remaining))
                with client.stream("GET", current, timeout=timeout) as response:
                    if response.is_redirect:
                        current = _next_hop(response, field, settings, deadline)
                        where = redact(current)
                        continue
                    if not 200 <= response.status_code < 300:
                        raise UrlFetchError(f"{field}: {where} answered {_status(response.status_code)}")
                    if response.status_code == HTTPStatus.PARTIAL_CONTENT:
                        # a part of the file, where no part was asked for (no Range is sent): its
                        # first 40 KB of a WAV were analysed as the whole recording, unsaid
                        raise UrlFetchError(f"{field}: {where} answered {_status(response.status_code)} to a "
                                            "request for the whole file; only a whole file is accepted")
                    content_type = response.headers.get("content-type", "")
                    if content_type and _declares_not_audio(content_type):
                        raise AudioDecodeError(f"{field}: {where} sent {_media_type(content_type)}, not audio")
                    # asked for identity; a body sent encoded all the same is refused, never
                    # decoded: "gzip, gzip" of zeros made 3.5 KB into 2 GiB in one piece (4 GB
                    # of worker memory before any limit could count it)
                    encoding = response.headers.get("content-encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        raise UrlFetchError(
                            f"{field}: {where} sent the file with Content-Encoding {encoding[:40]}; "
                            "only an unencoded file is accepted"
                        )
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise UploadTooLargeError(
                            f"{field}: the file is {int(declared)} bytes, larger than the limit of {max_bytes} bytes"
                        )
                    # no chunk_size: httpx would gather that much before handing anything on,
                    # and the deadline and progress are checked for each piece that arrives;
                    # raw: the bytes as they came, so the limit counts what arrives, nothing inflated
                    body = _Body(response.iter_raw(), limit=max_bytes, deadline=deadline, field=field,
                                 progress=progress)
                    key = storage.save(job_id, name, body, max_bytes=max_bytes)
                    break
            else:
                raise UrlFetchError(f"{field}: more than {settings.url_fetch_max_redirects} redirects")
    except _Deadline:
        raise UrlFetchError(
            f"{field}: {where} did not send the file within the deadline of {settings.url_fetch_deadline_s:g} s"
        ) from None
    except httpx.TimeoutException:
        if time.monotonic() >= deadline:
            raise UrlFetchError(
                f"{field}: {where} did not send the file within the deadline of {settings.url_fetch_deadline_s:g} s"
            ) from None
        raise UrlFetchError(
            f"{field}: {where} did not answer within {settings.url_fetch_timeout_s:g} s (timeout)"
        ) from None
    except httpx.ConnectError as exc:
        if _refused_by_policy(exc):
            raise UrlFetchError(
                f"{field}: {where} resolves to an address that is refused (loopback, private, link-local, "
                "multicast and reserved addresses are)"
            ) from None
        raise UrlFetchError(f"{field}: could not connect to {where}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        log.info("job %s: fetching %s failed: %s: %s", job_id, where, type(exc).__name__, exc)
        raise UrlFetchError(f"{field}: the download from {where} failed ({type(exc).__name__})") from None
    log.info("job %s: fetched %d bytes from %s in %.1f s", job_id, body.received, where, time.monotonic() - started)
    _check_fetched(storage, key, field, where, body.received, max_duration, settings)
    return key, body.received


def check_media_url(url: str, field: str, settings: Settings, timeout: float | None = None) -> str:
    """The submit-time check of a ``<field>_url`` (and of every redirect, its host resolved
    within ``timeout`` seconds): 422 naming ``field``."""
    return check_url(url, field=field, allowed_hosts=settings.url_allowed_hosts,
                     allow_private=settings.url_allow_private_addresses, max_length=MAX_MEDIA_URL_LENGTH,
                     timeout=timeout)


def _next_hop(response: httpx.Response, field: str, settings: Settings, deadline: float | None = None) -> str:
    """Where a redirect points, checked like the URL the caller gave (its host resolved before
    the download's deadline)."""
    location = response.headers.get("location", "").strip()
    if not location:
        # a 3xx with nothing to follow: the server's answer, told as such (a KeyError here failed
        # the job as the service's own "internal error")
        raise UrlFetchError(f"{field}: {redact(str(response.url))} answered {_status(response.status_code)} "
                            "without a Location to follow")
    try:
        target = response.url.join(location)
    except (httpx.InvalidURL, ValueError):
        raise UrlFetchError(f"{field}: {redact(str(response.url))} redirected to a Location that is not a URL") from None
    nxt = str(target)
    if response.url.scheme == "https" and target.scheme != "https":
        raise UrlFetchError(f"{field}: redirect from https to {redact(nxt)} refused (no downgrade to http)")
    try:
        left = settings.url_fetch_timeout_s if deadline is None else deadline - time.monotonic()
        check_media_url(nxt, field, settings, timeout=min(settings.url_fetch_timeout_s, left))
    except InputError as exc:
        raise UrlFetchError(f"{field}: redirect to {redact(nxt)} refused: {exc.detail}") from None
    return nxt


def _check_fetched(storage: Storage, key: str, field: str, where: str, size: int, max_duration: float,
                   settings: Settings) -> None:
    """The header checks an upload gets at submit, with the field named."""
    if size == 0:
        raise AudioDecodeError(f"{field}: {where} sent an empty file")
    with storage.local_path(key) as path:
        try:
            info = check_audio_limits(path, max_duration=max_duration, min_sample_rate=settings.min_sample_rate,
                                      sandbox=settings.probe_limits())
        except NotAudioError:
            info = None  # refused below, in the words this check has always used for it
        except AnalysisError as exc:
            raise exc.about(field) from None
    if info is None:
        raise AudioDecodeError(f"{field}: what {where} sent ({size} bytes) is not audio in a format this service reads")
