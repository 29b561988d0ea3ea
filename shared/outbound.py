"""Connections the service opens to addresses its callers chose: the one address policy (SSRF).

Two things reach out to a caller's URL: webhook deliveries (``shared/webhooks.py``) and audio
given by URL (``shared/url_input.py``). Both go through this module, so both refuse the same
addresses in the same way:

* at the edge, :func:`check_url` refuses (422) anything but an absolute http(s) URL of reasonable
  length, without whitespace or control characters, to an allowed host that resolves only to
  public unicast addresses;
* when connecting, :func:`transport` resolves the host again, checks every address, and connects
  to the very address that was checked (:class:`PinnedBackend`, a network backend of httpcore,
  the library under httpx), so a DNS answer that changes between check and use (rebinding)
  reaches nothing. TLS still verifies, and sends SNI for, the URL's host name.

Loopback, private (RFC 1918, ULA), carrier-grade NAT, link-local (cloud metadata at
169.254.169.254), multicast, reserved and unspecified addresses are refused, as are
``localhost``, ``*.internal`` and the metadata host names; IPv4-mapped, NAT64 and 6to4 IPv6
addresses are judged by their IPv4 address (``2002:a00:1::`` is 10.0.0.1). Odd IP spellings
(``2130706433``, ``0x7f.1``, ``0177.0.0.1``)
are resolved by the system resolver like any name, so they are checked as the address they stand
for. Each use has its own setting that lifts the policy (local development, the tests, a server
inside your network).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import httpcore
import httpx

from shared.errors import InputError

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
# a presigned URL with a session token (X-Amz-Security-Token) runs past 2 KB
MAX_MEDIA_URL_LENGTH = 8192


class AddressNotAllowed(Exception):
    """The host is an internal name or resolves to an address the policy refuses."""


# cloud metadata services are reached by name as well as by their link-local address
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                             "instance-data.ec2.internal", "metadata.azure.com"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(address: str) -> bool:
    """True only for a public unicast address (IPv4-mapped, NAT64 and 6to4 IPv6 judged by their IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            # 6to4 (2002::/16): a host with a 6to4 tunnel sends it to the IPv4 address inside,
            # so 2002:a00:1:: is 10.0.0.1 and 2002:7f00:1:: loopback; it passed as public
            ip = ip.sixtofour
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def resolve_allowed(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, if all are allowed; AddressNotAllowed otherwise.

    All must pass, not just one: a name answering both a public and an internal address would
    otherwise reach the internal one on some attempt.
    """
    name = host.strip("[]").rstrip(".").lower()
    if name in _METADATA_HOSTS or name.endswith(".internal") or name == "localhost" or name.endswith(".localhost"):
        raise AddressNotAllowed(f"{host} is an internal name")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise AddressNotAllowed(f"{host} does not resolve ({exc})") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    # address_allowed is looked up here, at call time, so a test can stand a loopback server in
    # for a public one by replacing it
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise AddressNotAllowed(f"{host} resolves to non-public {refused}")
    return addresses


class PinnedBackend(httpcore.NetworkBackend):
    """Resolves, checks, and connects to the checked address itself (no second lookup)."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            addresses = resolve_allowed(host, port)
        except AddressNotAllowed as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for address in addresses:
            try:
                # TLS still verifies, and sends SNI for, the URL's host name: httpcore takes it
                # from the request's origin, not from this address
                return self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address for {host}")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not outbound targets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# how often a stream calls its on_read hook at most (a job's checks write to Redis)
_ON_READ_EVERY_S = 0.25


class DeadlineExceeded(Exception):
    """The connection's overall deadline passed (the cause of the timeout httpx raises then)."""


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every read, write and TLS handshake waits at most until ``deadline``.

    httpx's timeouts are per operation: a peer that sends its status line and headers a byte at
    a time, each within the read timeout, kept a connection (and the worker process holding it)
    for as long as it liked. Bounding each socket operation by what is left of one deadline
    bounds the whole exchange, the response head included.
    """

    def __init__(self, inner: httpcore.NetworkStream, deadline: float,
                 on_read: Callable[[], None] | None = None) -> None:
        self._inner, self._deadline, self._on_read = inner, deadline, on_read
        self._checked = 0.0

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("deadline passed") from DeadlineExceeded()
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._on_read is not None and time.monotonic() - self._checked >= _ON_READ_EVERY_S:
            # the caller's own checks (a job's cancel, a warm shutdown) between reads: they may
            # raise, and end the exchange there, response head or not
            self._checked = time.monotonic()
            self._on_read()
        return self._inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._deadline, self._on_read)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """``inner``'s connections, each bounded as a whole by ``deadline`` (time.monotonic());
    ``on_read`` is called before a read (at most every quarter second)."""

    def __init__(self, inner: httpcore.NetworkBackend, deadline: float,
                 on_read: Callable[[], None] | None = None) -> None:
        self._inner, self._deadline, self._on_read = inner, deadline, on_read

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("deadline passed") from DeadlineExceeded()
        stream = self._inner.connect_tcp(host, port, timeout=left if timeout is None else min(timeout, left),
                                         local_address=local_address, socket_options=socket_options)
        return _DeadlineStream(stream, self._deadline, self._on_read)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not outbound targets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def transport(allow_private: bool, deadline: float | None = None,
              on_read: Callable[[], None] | None = None) -> httpx.HTTPTransport:
    """An httpx transport that connects only to checked addresses (unless ``allow_private``);
    with ``deadline`` (a time.monotonic() value), every connection it makes ends by then, however
    slowly its peer trickles, and ``on_read`` runs between its reads (:class:`DeadlineBackend`).

    ``trust_env`` is off: a proxy from the environment would connect for us, unchecked.
    """
    result = httpx.HTTPTransport(trust_env=False)
    backend: httpcore.NetworkBackend | None = None if allow_private else PinnedBackend()
    if deadline is not None:
        backend = DeadlineBackend(backend or httpcore.SyncBackend(), deadline, on_read)
    if backend is not None:
        # httpx builds its httpcore pool without a way to pass a network backend: rebuild it
        # with ours (same TLS context and limits as httpx's own defaults)
        pool = result._pool
        result._pool = httpcore.ConnectionPool(
            ssl_context=pool._ssl_context, max_connections=pool._max_connections,
            max_keepalive_connections=pool._max_keepalive_connections, keepalive_expiry=pool._keepalive_expiry,
            network_backend=backend,
        )
    return result


def check_url(url: str, *, field: str, allowed_hosts: list[str], allow_private: bool = False,
              what: str | None = None, max_length: int = MAX_URL_LENGTH) -> str:
    """Refuse (422, naming ``field``) anything but an absolute http(s) URL to an allowed, public host.

    Resolves the host (blocking: call it from a thread in async code).
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{field} must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > max_length:
        raise InputError(f"{field} must be an absolute http(s) URL")
    # whitespace and control characters (CR LF: header injection) have no place in a URL; httpx
    # would refuse them only when connecting, long after the caller could be told
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
        raise InputError(f"{field} must not contain whitespace or control characters")
    if allowed_hosts and parts.hostname.lower() not in {h.lower() for h in allowed_hosts}:
        raise InputError(f"{what or field + ' host'} {parts.hostname!r} is not in the allowed hosts")
    if not allow_private:
        try:
            resolve_allowed(parts.hostname, port)
        except AddressNotAllowed as exc:
            log.info("%s refused: %s", field, exc)
            raise InputError(
                f"{field} must reach a public address (loopback, private, link-local, multicast and "
                "reserved addresses are refused)"
            ) from None
    return url


def redact(url: str) -> str:
    """The URL without user info, query or fragment: what may go into a log or an error.

    A presigned S3 or GCS URL carries its credentials in the query string.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"
