"""Refuse oversized or too slow request bodies while they stream in; bound what a form holds in memory.

A declared Content-Length over the limit is answered 413 at once. A body without one (chunked)
is counted as it arrives: the moment it passes the limit, reading stops and the request is
answered 413. Before, Starlette's multipart parser wrote a 3 GiB chunked upload (limit 1 GiB) to
its temporary files to the end, and only the copy into storage noticed.

A client that stops sending in the middle of a body (slowloris on the body) is answered 408 once
``http_body_timeout_s`` passed without a new part. Slow request heads are cut by the server
protocol (api/serve.py), since no ASGI app sees a request before its head is complete.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import re
from typing import Any, Callable, Coroutine
from urllib.parse import unquote_plus, unquote_to_bytes

import starlette.requests
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE, parse_options_header
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import AwaitableOrContextManager
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.forms import ascii_compatible, refuse_fields_in_query, refuse_other_bodies

# What a form may hold in memory. Every form field of every route is a number, a flag, a name or
# a URL (8 KB at most), so 64 fields of 64 KB each is far more than any request needs. Starlette's
# defaults (1000 fields of 1 MB) let one request of 900 one-megabyte fields take 900 MB of the
# API's memory, and the form is parsed before the API key is checked.
MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
# A form without files (application/x-www-form-urlencoded: fields and <field>_url, no uploads)
# never needs more than this. python-multipart reads such a body byte by byte in Python, about
# 350 ns a byte on the API's event loop, and separators alone ("&&&&...") count as no field: a
# 1 GiB body of them, within the upload limit, was six minutes of the API's core for one request.
MAX_URLENCODED_BYTES = 1024 * 1024
# an uploaded file is held in memory up to this, then spooled to a temporary file; at Starlette's
# 1 MB, 900 uploads of just under 1 MB (a batch) also stayed in memory, 900 MB a request
SPOOL_BYTES = 64 * 1024
MultiPartParser.spool_max_size = SPOOL_BYTES
# ... and only this many of a request's uploads are (the rest go to disk at once): at most
# 16 x 64 KB of a form's files in memory, however many a batch holds
SPOOLED_IN_MEMORY_FILES = 16


# ;filename*=charset'language'percent-encoded (RFC 5987 / 8187), and a plain ;filename=... beside it
_EXTENDED_FILENAME = re.compile(rb";\s*filename\*\s*=\s*([^;]*)", re.IGNORECASE)
_PLAIN_FILENAME = re.compile(rb';\s*filename\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;]*)', re.IGNORECASE)


def _extended_filename(disposition: bytes) -> str | None:
    """The file name of a ``filename*`` parameter, decoded; None without one or with one that is
    not ``charset'language'value``. The name only names the upload (it is cleaned before it is
    shown: ``api.dispatch._first_filename``), so bytes its charset does not decode, or a charset
    Python does not know (RFC 8187 names only UTF-8 and ISO-8859-1), leave a replacement
    character rather than turn the file into text."""
    found = _EXTENDED_FILENAME.search(disposition)
    if found is None:
        return None
    parts = found.group(1).strip().strip(b'"').split(b"'", 2)
    if len(parts) != 3:
        return None
    # the two of RFC 8187, and ASCII; any other name is read as UTF-8: Python's codecs include
    # ones that are no text encoding ("hex", "zlib", "unicode_escape") and would raise or rewrite
    try:
        charset = codecs.lookup(parts[0].decode("latin-1").strip()).name
    except LookupError:
        charset = "utf-8"
    if charset not in ("utf-8", "iso8859-1", "latin-1", "ascii"):
        charset = "utf-8"
    return unquote_to_bytes(parts[2].decode("latin-1")).decode(charset, errors="replace")


class WholeMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, refusing (400) a body that ends before its closing boundary.

    python-multipart takes the end of the body for the end of the form wherever it comes: a body
    cut short (a Content-Length smaller than what was sent, a client or proxy that stopped) lost
    its unfinished last part without a word, and the rest ran as a job. A diarization whose
    ``num_speakers=3`` was that last part ran with the default; a cut upload was answered
    "file required" only when the file happened to be last."""

    def on_end(self) -> None:
        self.closed_properly = True

    def on_headers_finished(self) -> None:
        """A part's file name given as RFC 5987's ``filename*=UTF-8''r%C3%A9union.wav`` is the
        part's name, as RFC 7578 and 6266 have it (preferred to a plain ``filename=`` beside it).

        python-multipart knows only ``filename=``: a part that named its file with ``filename*``
        alone (what some HTTP libraries write for a non-ASCII name) was read as a text field, and
        the client told "expected an uploaded file, got text"; one with both was stored under
        the plain fallback (``R_union.wav``). The decoded name is given to Starlette's parser as
        the plain ``filename`` it reads."""
        disposition = self._current_part.content_disposition
        named = _extended_filename(disposition) if disposition else None
        if named is not None:
            plain = _PLAIN_FILENAME.sub(b"", disposition)
            # as Starlette decodes it: in the form's charset (UTF-8 unless the request says)
            quoted = named.replace("\\", "_").replace('"', "_").encode(self._charset or "utf-8", errors="replace")
            self._current_part.content_disposition = plain + b'; filename="' + quoted + b'"'
        super().on_headers_finished()
        upload = self._current_part.file
        if upload is not None and self._current_files > SPOOLED_IN_MEMORY_FILES:
            # past the first few, each upload goes to its temporary file from its first byte: every
            # file under SPOOL_BYTES stayed in memory, and a batch of 1,000 files of 60 KB held
            # 60 MB of the API's memory until it was answered (300 files: 18.6 MB)
            upload.file.rollover()  # type: ignore[attr-defined]

    async def parse(self) -> FormData:
        self.closed_properly = False
        try:
            form = await super().parse()
        except MultiPartException as exc:
            raise MultiPartException(self._said(exc)) from exc
        if not self.closed_properly:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    await value.close()
            raise MultiPartException("the multipart body ended before its closing boundary: it was cut short")
        return form

    def _said(self, exc: MultiPartException) -> str:
        """Starlette's refusal of a form, said as the limit the client passed and what to do.

        A part's headers past python-multipart's 4 KB (a 5,000-character file name) were "Invalid
        multipart data.", which names no limit; a field past 64 KB did not say which field."""
        cause = exc.__cause__
        part = self._current_part.field_name if self._current_part is not None else ""
        named = f"{part[:40]}: " if part else ""
        if exc.message.startswith("Part exceeded maximum size"):
            return (f"{named}a form field over {MAX_FIELD_BYTES // 1024} KB; fields are numbers, names and URLs "
                    "(send audio as a file part, with a filename=)")
        if exc.message.startswith("Too many fields"):
            return f"a form of more than {MAX_FORM_FIELDS} fields; no route takes that many"
        if exc.message.startswith("Too many files"):
            return f"a form of more than {self.max_files} files; send them in smaller batches"
        if isinstance(cause, Exception) and "header size" in str(cause):
            return (f"a form part's header line is over {DEFAULT_MAX_HEADER_SIZE} bytes: give files "
                    "names of at most 255 characters")
        if isinstance(cause, Exception) and "header count" in str(cause):
            return "a form part has more than 8 header lines; send Content-Disposition and Content-Type"
        if exc.message.startswith("The Content-Disposition header field \"name\""):
            return "a form part without a name= in its Content-Disposition (form-data; name=\"file\"; filename=...)"
        if exc.message.startswith("Missing boundary"):
            return "multipart/form-data without a boundary= in its Content-Type"
        if exc.message == "Invalid multipart data.":
            why = str(cause)[:120] if cause is not None else ""
            return "the multipart body is malformed" + (f" ({why})" if why else "") + \
                ": send the form as multipart/form-data with the Content-Type's boundary"
        return exc.message


class BoundedFormParser(FormParser):
    """Starlette's parser of application/x-www-form-urlencoded, naming the limit a form passed,
    and reading its text as UTF-8 (or the charset the request names).

    Starlette read a field's raw bytes as Latin-1 (its %-escapes as UTF-8): ``curl -d
    'file_url=https://host/réunion.wav'`` sends the é as two raw UTF-8 bytes, and the job was
    made for ``rÃ©union.wav``. Raw bytes are decoded in the form's charset (UTF-8 unless the
    request names one that writes ASCII as ASCII: :func:`api.forms.refuse_unreadable_charset`),
    bytes it does not decode replaced; %-escapes are UTF-8, as before."""

    def on_field_end(self) -> None:
        super().on_field_end()  # counts the field (and refuses one too many), appends Starlette's reading
        self._items[-1] = (self._text(self._field_name), self._text(self._field_value))

    def _text(self, raw: bytes) -> str:
        # as Starlette does, with the form's charset for Latin-1: %-escapes stay UTF-8, as before
        return unquote_plus(bytes(raw).decode(self._form_charset, errors="replace"))

    def _charset_named(self) -> str:
        """The charset the Content-Type names, where it writes a url-encoded form's ASCII as
        ASCII; else UTF-8 (a route without form fields is not gated, and "hex" or UTF-16 would
        raise or garble)."""
        _, params = parse_options_header(self.headers.get("Content-Type", ""))
        named = params.get(b"charset", b"utf-8").decode("latin-1").strip()
        return ascii_compatible(named, "name=a+b%20&") or "utf-8"

    async def parse(self) -> FormData:
        self._form_charset = self._charset_named()  # once a form, not twice a field
        try:
            return await super().parse()
        except MultiPartException as exc:
            if exc.message.startswith("Field exceeded maximum size"):
                raise MultiPartException(
                    f"a form field over {MAX_FIELD_BYTES // 1024} KB; fields are numbers, names and URLs "
                    "(send audio as multipart/form-data, a file part with a filename=)") from exc
            if exc.message.startswith("Too many fields"):
                raise MultiPartException(
                    f"a form of more than {MAX_FORM_FIELDS} fields; no route takes that many") from exc
            raise


# Request.form builds its parser by this name (every request of the app, bounded or not)
starlette.requests.MultiPartParser = WholeMultiPartParser  # type: ignore[misc]
starlette.requests.FormParser = BoundedFormParser  # type: ignore[misc]


# what the API itself lacks while it spools a form (not the client's doing): the disk of the
# temporary files full, or no file handle left (each upload past SPOOL_BYTES holds one)
_OUT_OF_ROOM = {errno.ENOSPC: (507, "no room left for uploads; retry later"),
                errno.EDQUOT: (507, "no room left for uploads; retry later"),
                errno.EMFILE: (503, "too many uploads at once; retry later"),
                errno.ENFILE: (503, "too many uploads at once; retry later")}


class BoundedFormRequest(Request):
    """A request whose form parsing keeps to MAX_FORM_FIELDS fields of MAX_FIELD_BYTES (400 past them)."""

    def form(self, *, max_files: int | float = 1000, max_fields: int | float = MAX_FORM_FIELDS,
             max_part_size: int = MAX_FIELD_BYTES) -> AwaitableOrContextManager[FormData]:
        return super().form(max_files=max_files, max_fields=min(max_fields, MAX_FORM_FIELDS),
                            max_part_size=min(max_part_size, MAX_FIELD_BYTES))

    async def _get_form(self, **limits: Any) -> FormData:
        """Starlette's form parsing, a full spool disk (507) or no file handle left (503) said as
        the service's own state: FastAPI turned either into 400 "There was an error parsing the
        body", a client's mistake, for a valid upload the client should simply send again."""
        try:
            return await super()._get_form(**limits)
        except OSError as exc:
            if exc.errno not in _OUT_OF_ROOM:
                raise
            status, detail = _OUT_OF_ROOM[exc.errno]
            raise HTTPException(status, detail, headers={"Retry-After": "30"}) from exc


class BoundedFormRoute(APIRoute):
    """A route that parses its form as a :class:`BoundedFormRequest` (``route_class`` of the
    routers); one that takes a form refuses its fields sent in the query string instead
    (:func:`api.forms.refuse_fields_in_query`), and a body that is not a form (JSON, audio
    itself: :func:`api.forms.refuse_other_bodies`), before reading its body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        form_fields = frozenset(f.alias for f in self.dependant.body_params) - \
            frozenset(q.alias for q in self.dependant.query_params)

        async def bounded(request: Request) -> Response:
            if form_fields and request.query_params:
                refuse_fields_in_query(request, form_fields)
            if form_fields:
                refuse_other_bodies(request)
            return await handler(BoundedFormRequest(request.scope, request.receive))

        return bounded


def readable_size(n: int) -> str:
    """``n`` bytes as a person reads them, in powers of 1024: 1073741824 is "1 GiB", 1500000000
    "1.4 GiB", 1048576 "1 MiB", 500 "500 bytes"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n % scale else f"{n // scale} {unit}"
    return f"{n} bytes"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        # the first Content-Type, the one Starlette's form parsing reads
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        limit = self.max_bytes
        if content_type.split(b";", 1)[0].strip().lower() == b"application/x-www-form-urlencoded":
            limit = min(limit, MAX_URLENCODED_BYTES)
        # the size in bytes as before (what a client may parse), then as a person reads it: "limit
        # of 1073741824 bytes" alone had the page's user counting digits
        too_large = (f"request body is larger than the limit of {limit} bytes ({readable_size(limit)})"
                     if limit == self.max_bytes else
                     f"a form without files (application/x-www-form-urlencoded) is larger than {limit} bytes "
                     f"({readable_size(limit)}); send uploads as multipart/form-data")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # the connection closes with the answer (CloseUnreadBody): a 500 MB recording was
            # uploaded in full, minutes on a home uplink, to be refused at its first byte
            response = error_response(413, too_large, "ValidationError")
            await response(scope, receive, send)
            return

        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                # after the body: only http.disconnect is left to wait for (sync endpoints
                # watch for it), with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                # an HTTPException passes FastAPI's body parsing unchanged, so the client gets
                # this status in the documented shape (api.errors), and the connection closes
                raise HTTPException(408, f"request body stalled for {self.body_timeout_s:.0f} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large)
                if not message.get("more_body", False):
                    body_done = True
            return message

        await self.app(scope, limited_receive, send)


class CloseUnreadBody:
    """A response started before its request's body was all received closes the connection.

    Every refusal made from a request's headers (a declared length over the limit, a compressed
    body, a host this API is not reached by, another site's page, a missing key, a tenant at its
    quota, a form field in the query) is answered while the client is still sending. Kept open,
    the connection had uvicorn read and drop the whole body to serve the next request on it, and a
    client (a browser above all) sent all of it, hundreds of MB, before it read the answer. With
    ``Connection: close`` the server stops reading and the client stops sending at once. A
    response to a request whose body was read, or that had none, is left as it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _declares_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        received = False

        async def watched_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                received = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not received:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watched_receive, closing_send)


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's head says a body follows (chunked, or a length other than 0)."""
    return any(k.lower() == b"transfer-encoding" or (k.lower() == b"content-length" and v.strip() not in (b"", b"0"))
               for k, v in headers)


class RequestFramingGate:
    """Requests whose body is framed ambiguously, or encoded in a way the API does not decode,
    are refused before anything reads them.

    * ``Transfer-Encoding`` and ``Content-Length`` together (400, and the connection closed):
      h11 reads such a body as chunked and kept the connection open for the next request, while
      a proxy in front that goes by Content-Length sees another body, and a request of the
      attacker's hidden in it (request smuggling). RFC 9112 6.1: the server MUST close the
      connection after such a request.
    * a ``Content-Encoding`` other than identity (415, ``Accept-Encoding: identity``): no body is
      decompressed here, so a gzip-compressed form was parsed as the compressed bytes and refused
      as "Invalid multipart data", a misleading 400 (RFC 7694 says 415). Refused, nothing of it
      is inflated, a decompression bomb included.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [k.lower() for k, _ in scope["headers"]]
            if b"transfer-encoding" in names and b"content-length" in names:
                response = error_response(
                    400, "Transfer-Encoding and Content-Length in one request: send one of them", "ValidationError",
                    headers={"Connection": "close"})
                await response(scope, receive, send)
                return
            has_body = _declares_body(scope["headers"])
            codings = [c.strip().lower() for k, v in scope["headers"] if k.lower() == b"content-encoding"
                       for c in v.split(b",") if c.strip()]
            if has_body and any(c != b"identity" for c in codings):
                shown = b", ".join(codings).decode("latin-1")[:100]
                response = error_response(
                    415, f"Content-Encoding {shown!r}: request bodies are taken uncompressed only", "ValidationError",
                    headers={"Accept-Encoding": "identity"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
