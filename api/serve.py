"""Run the API under uvicorn, with read timeouts for slow clients: ``python -m api.serve``.

uvicorn closes idle keep-alive connections, but has no limit on how long a client may take to
send its request head: 60 slowloris connections trickling header bytes were never closed. The
protocol classes below close a connection whose request head is not complete within
``http_header_timeout_s`` of the connection opening (or of the previous response). Slow bodies
are cut by :class:`api.limits.BodyLimitMiddleware` (``http_body_timeout_s`` between parts).

In production, put a reverse proxy in front anyway (nginx, Caddy, a cloud load balancer): it
buffers slow clients for every worker process at once (see docs/service.md).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import http
import logging
import os
import re
import struct
import termios
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared import logs
from shared.lifeline import follow_parent
from shared.schemas import ErrorBody
from shared.settings import get_settings

log = logging.getLogger(__name__)


class _HeaderTimeout:
    """Mixed into uvicorn's HTTP protocol classes (they share these hooks and attributes)."""

    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        timeout = get_settings().http_header_timeout_s
        self._header_timer = self.loop.call_later(timeout, self._on_header_timeout)  # type: ignore[attr-defined]

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        cycle = self.cycle  # type: ignore[attr-defined]
        # no request being served: the client is still (slowly) sending a request head
        if cycle is None or cycle.response_complete:
            self.transport.close()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # the next request head on this keep-alive connection gets the same allowance
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]


class _SendTimeout:
    """Mixed into uvicorn's HTTP protocol class: a response its client stops reading is cut.

    A response is handed to the transport whole (Starlette writes a body in one message), and
    what the client has not read stays in the transport's buffer: a client that asked for a
    long result (100,000 turns: 5.4 MB) and read nothing held it in the API's memory for as long
    as it kept the connection open, for ever, and 40 such connections took 248 MB. Once the
    buffer passed its high-water mark, a client that reads nothing of it for
    ``http_body_timeout_s`` has its connection aborted (a close would wait for the buffer to be
    sent). A slow client that reads is not cut: each period in which it took anything (the
    buffer and the socket's kernel queue shrank) starts the next."""

    _send_timer: asyncio.TimerHandle | None = None
    _send_left: int = 0

    def _unsent(self) -> int:
        """Bytes of the response the client has not taken: the transport's buffer and the
        socket's send queue (Linux's SIOCOUTQ). The buffer alone shrinks only once the kernel
        queue (megabytes, autotuned) drained by a third: a client reading 27 KB/s took a minute
        for that, and was taken for one that reads nothing."""
        transport = self.transport  # type: ignore[attr-defined]
        unsent = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        try:
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (AttributeError, OSError, ValueError):
            pass  # no kernel queue to read (another platform, a socket gone): the buffer alone
        return unsent

    def _arm_send_timer(self) -> None:
        self._cancel_send_timer()
        self._send_left = self._unsent()
        timeout = get_settings().http_body_timeout_s
        self._send_timer = self.loop.call_later(timeout, self._on_send_timeout)  # type: ignore[attr-defined]

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing() and transport.get_write_buffer_size() == 0:
            return
        left = self._unsent()
        if left < self._send_left:
            self._arm_send_timer()  # the client reads, slowly
            return
        log.info("connection aborted: its client read nothing of %d bytes of its response for %.0f s", left,
                 get_settings().http_body_timeout_s)
        transport.abort()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._arm_send_timer()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_send_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)  # type: ignore[misc]


class _RecordingConnection(h11.Connection):
    """h11's connection, keeping the protocol error it raised (uvicorn catches it and keeps only
    "Invalid HTTP request received."): what the refusal says, and its status (431 for a head over
    the size limit)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):  # type: ignore[no-untyped-def]
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


# where h11's message starts quoting what it read: "illegal header line: bytearray(b'...')",
# "Illegal header value b'...'"
_QUOTED = re.compile(r":? (?:bytearray\(|b['\"])")


class _DocumentedRefusal:
    """A request h11 cannot parse (a malformed request line or header, two different
    Content-Lengths, a transfer coding other than chunked, a head over the size limit, a broken
    chunk) answered in the documented error shape.

    uvicorn answered these before any ASGI app saw them, with ``400 text/plain`` "Invalid HTTP
    request received.": the one error of the API a client could not read as ``{"detail",
    "error_type", "timestamp"}``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # the connection uvicorn made, the same but for keeping its error
        size = self.config.h11_max_incomplete_event_size  # type: ignore[attr-defined]
        self.conn = _RecordingConnection(h11.SERVER, size) if size is not None else _RecordingConnection(h11.SERVER)

    def send_400_response(self, msg: str) -> None:
        exc = self.conn.last_error
        status = exc.error_status_hint if exc is not None and 400 <= exc.error_status_hint < 500 else 400
        if status == 431:
            detail = "request head (request line and headers) is larger than the server takes"
        else:
            # h11's reason without the bytes it quotes ("illegal header line: bytearray(b'...')"):
            # the client knows what it sent, and a header line may be its API key
            reason = _QUOTED.split(str(exc), 1)[0][:200] if exc is not None else ""
            detail = f"invalid HTTP request: {reason}" if reason else "invalid HTTP request"
        body = ErrorBody(detail=detail, error_type="ValidationError").model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers,
                                                  reason=http.HTTPStatus(status).phrase.encode()))  # type: ignore[attr-defined]
            output += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError:
            # a response already on its way (an error in the middle of a body being answered):
            # nothing more can be said on this connection
            output = b""
        if output:
            self.transport.write(output)  # type: ignore[attr-defined]
        self.transport.close()  # type: ignore[attr-defined]


class TimeoutH11Protocol(_DocumentedRefusal, _HeaderTimeout, _SendTimeout, H11Protocol):
    pass


def protocol_path() -> str:
    # h11, not httptools: uvicorn bounds a request head only with h11
    # (h11_max_incomplete_event_size); under httptools a 100 KB header line was read and served,
    # and nothing but the header timeout bounded how much more a client could send.
    # By import path, as uvicorn takes it: a class object would not reach spawned --workers.
    return "api.serve:TimeoutH11Protocol"


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit of open files raised to the hard one; returns (soft, hard) as they are now.

    Every upload past the spool size is a temporary file, and a batch takes up to 1000 of them
    at once: under the 1024 soft limit many hosts start services with (the hard one often far
    higher), a second batch arriving during a first one ran out of file handles, and every
    other connection with it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # an infinite hard limit the kernel caps lower: keep what we have
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    raise_open_files_limit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=settings.api_host)
    parser.add_argument("--port", type=int, default=settings.api_port)
    parser.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from --forwarded-allow-ips")
    parser.add_argument("--forwarded-allow-ips", default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    # the app (built at import, here or in each spawned worker process) reads where it listens from
    # api_host: its Host check is on by default only on a loopback address (api/hosts.py)
    os.environ["AUDIO_ANALYSIS_API_HOST"] = args.host
    get_settings.cache_clear()
    options: dict[str, Any] = {
        "host": args.host, "port": args.port, "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips, "workers": args.workers,
        "http": protocol_path(),
        # no route takes a WebSocket: an upgrade request is served as the plain HTTP request it
        # also is (documented error shape and all), where uvicorn's WebSocket protocol answered
        # every one 403 with an empty body, after a handshake through a protocol class the
        # header timeout above does not cover
        "ws": "none",
        # idle keep-alive connections: closed after this (uvicorn's default is 5 s)
        "timeout_keep_alive": 5,
        # request heads larger than this are refused by h11 (its default is 16 KiB)
        "h11_max_incomplete_event_size": 64 * 1024,
        # on SIGTERM, the requests in flight get this long, then are cancelled (a synchronous
        # call's job with it: Dispatcher.run_sync); uvicorn's default waited for every one, a
        # synchronous call up to sync_timeout_s, until the orchestrator's SIGKILL
        "timeout_graceful_shutdown": settings.http_shutdown_grace_s,
    }
    # our formatter on the root logger, uvicorn's loggers propagating to it: its access and error
    # lines come out as JSON (or text) with the request id, like the app's own
    logs.configure(settings.log_format, settings.log_level)
    options["log_config"] = None
    # an API started by `audio-analysis up` ends with it
    follow_parent()
    uvicorn.run("api.main:app", **options)


if __name__ == "__main__":
    main()
