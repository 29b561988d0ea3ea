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
169.254.169.254), IPv6 site-local, multicast, reserved, documentation and unspecified addresses
are refused, as are ``localhost``, ``*.internal`` and the metadata host names; IPv4-mapped, NAT64 and 6to4 IPv6
addresses are judged by their IPv4 address (``2002:a00:1::`` is 10.0.0.1). Odd IP spellings
(``2130706433``, ``0x7f.1``, ``0177.0.0.1``)
are resolved by the system resolver like any name, so they are checked as the address they stand
for. Ports that are not web ports (``BAD_PORTS``: SMTP, SSH and the rest of the Fetch standard's
list) are refused whatever the address. Each use has its own setting that lifts the address policy (local development, the tests, a server
inside your network).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import unicodedata
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


# Ports no web request may go to: the WHATWG Fetch standard's "bad ports", which every browser
# refuses, plus 0. Each is a service that speaks something other than HTTP (SMTP, SSH, IRC, NFS,
# SIP, X11...) and would take the request's bytes as its own protocol: a webhook or a media URL
# aimed at a mail server on a public address is a relay, not a receiver. Refused at submit and
# again at connect (a redirect names a port of its own), whatever the address policy.
BAD_PORTS = frozenset({
    0, 1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103,
    104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514,
    515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723,
    2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
})


# cloud metadata services are reached by name as well as by their link-local address
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                             "instance-data.ec2.internal", "metadata.azure.com"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IPv6 ranges that are not global and that this Python's ipaddress does not know as such:
# site-local (fec0::/10, deprecated but still routed inside some networks, and is_global says
# True) and the documentation prefix 3fff::/20 (RFC 9637, 2024)
_NOT_GLOBAL_V6 = (ipaddress.ip_network("fec0::/10"), ipaddress.ip_network("3fff::/20"))


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
        elif any(ip in net for net in _NOT_GLOBAL_V6):
            return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


class ResolveTimeout(Exception):
    """The host name did not resolve in the time left (a resolver that stalls)."""


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def getaddrinfo_within(name: str, port: int, timeout: float | None) -> list[Any]:
    """``socket.getaddrinfo(name, port)`` for TCP, given up after ``timeout`` seconds (None: the
    system resolver's own limits, which a stalling DNS server stretches to tens of seconds per
    name and try, beyond any deadline of the connection: getaddrinfo takes no timeout).

    The lookup runs in a daemon thread; on timeout that thread is left to end on its own (a
    blocking getaddrinfo cannot be interrupted) and ResolveTimeout is raised. IP literals need no
    lookup and are answered here.
    """
    if timeout is None or _is_ip_literal(name):
        return socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    if timeout <= 0:
        raise ResolveTimeout(f"{name} did not resolve in time (no time left)")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name=f"resolve {name[:60]}", daemon=True).start()
    if not done.wait(timeout):
        raise ResolveTimeout(f"{name} did not resolve within {timeout:.3g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def resolve_allowed(host: str, port: int, timeout: float | None = None, *, check: bool = True) -> list[str]:
    """Every address ``host`` resolves to, if all are allowed; AddressNotAllowed otherwise
    (``check=False``: every address, unchecked). ResolveTimeout when the lookup takes longer
    than ``timeout`` seconds.

    All must pass, not just one: a name answering both a public and an internal address would
    otherwise reach the internal one on some attempt.
    """
    name = host.strip("[]").rstrip(".").lower()
    if check and (name in _METADATA_HOSTS or name.endswith(".internal") or name == "localhost"
                  or name.endswith(".localhost")):
        raise AddressNotAllowed(f"{host} is an internal name")
    try:
        infos = getaddrinfo_within(name, port, timeout)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise AddressNotAllowed(f"{host} does not resolve ({exc})") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not check:
        if not addresses:
            raise AddressNotAllowed(f"{host} does not resolve")
        return addresses
    # address_allowed is looked up here, at call time, so a test can stand a loopback server in
    # for a public one by replacing it
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise AddressNotAllowed(f"{host} resolves to non-public {refused}")
    return addresses


class PinnedBackend(httpcore.NetworkBackend):
    """Resolves, checks (unless ``check`` is off), and connects to the checked address itself (no
    second lookup). The connect ``timeout`` bounds the lookup and the connection together: a
    resolver that stalls cannot hold the caller past it (nor past a :class:`DeadlineBackend`'s
    deadline, which passes what is left of it as the timeout)."""

    def __init__(self, check: bool = True) -> None:
        self._inner = httpcore.SyncBackend()
        self._check = check

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        end = None if timeout is None else time.monotonic() + timeout
        if port in BAD_PORTS:
            raise httpcore.ConnectError(f"port {port} is not a web port")
        try:
            addresses = resolve_allowed(host, port, timeout, check=self._check)
        except AddressNotAllowed as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        except ResolveTimeout as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        last: Exception | None = None
        for address in addresses:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise httpcore.ConnectTimeout(f"could not connect to {host} in time")
            try:
                # TLS still verifies, and sends SNI for, the URL's host name: httpcore takes it
                # from the request's origin, not from this address
                return self._inner.connect_tcp(address, port, timeout=left, local_address=local_address,
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


def _time_left(deadline: float, timeout: float | None, error: type[Exception]) -> float:
    """What is left of ``deadline`` (time.monotonic()), at most ``timeout``; ``error`` once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("deadline passed") from DeadlineExceeded()
    return left if timeout is None else min(timeout, left)


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
        return _time_left(self._deadline, timeout, error)

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
        left = _time_left(self._deadline, timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, timeout=left, local_address=local_address,
                                         socket_options=socket_options)
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

    Host names are resolved by :class:`PinnedBackend` either way (checked or not), so the lookup
    too is bounded by the connect timeout and the deadline. ``trust_env`` is off: a proxy from
    the environment would connect for us, unchecked.
    """
    result = httpx.HTTPTransport(trust_env=False)
    backend: httpcore.NetworkBackend = PinnedBackend(check=not allow_private)
    if deadline is not None:
        backend = DeadlineBackend(backend, deadline, on_read)
    # httpx builds its httpcore pool without a way to pass a network backend: rebuild it with
    # ours (same TLS context and limits as httpx's own defaults)
    pool = result._pool
    result._pool = httpcore.ConnectionPool(
        ssl_context=pool._ssl_context, max_connections=pool._max_connections,
        max_keepalive_connections=pool._max_keepalive_connections, keepalive_expiry=pool._keepalive_expiry,
        network_backend=backend,
    )
    return result


def check_url(url: str, *, field: str, allowed_hosts: list[str], allow_private: bool = False,
              what: str | None = None, max_length: int = MAX_URL_LENGTH, timeout: float | None = None) -> str:
    """Refuse (422, naming ``field``) anything but an absolute http(s) URL to an allowed, public host.

    Resolves the host (blocking: call it from a thread in async code), for at most ``timeout``
    seconds when given (422 past it).
    """
    if len(url) > max_length:
        # said as what it is: "must be an absolute http(s) URL" sent the client looking for a
        # mistake in a URL that was only too long (a presigned URL's signature, a long query)
        raise InputError(f"{field} is {len(url)} characters long, longer than the limit of {max_length}: "
                         "give a shorter URL (a presigned URL with fewer parameters, a shortened link)")
    try:
        parts = urlsplit(url)
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{field} must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{field} must be an absolute http(s) URL")
    # whitespace and control characters (CR LF: header injection) have no place in a URL; httpx
    # would refuse them only when connecting, long after the caller could be told. Nor have
    # characters drawn as nothing or that reorder what follows (Unicode's format characters: a
    # bidi override, U+202E, made "https://evil.example/\u202egro.knab" read as a bank's address
    # wherever the job's record is shown), which a URL only ever carries percent-encoded
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F or unicodedata.category(c) == "Cf" for c in url):
        raise InputError(f"{field} must not contain whitespace, control or invisible formatting characters "
                         "(percent-encode them)")
    if port in BAD_PORTS:
        raise InputError(f"{field} must not name port {port}: it is not a web port (the Fetch standard's bad ports)")
    if allowed_hosts and parts.hostname.lower() not in {h.lower() for h in allowed_hosts}:
        raise InputError(f"{what or field + ' host'} {parts.hostname!r} is not in the allowed hosts")
    if not allow_private:
        try:
            resolve_allowed(parts.hostname, port, timeout)
        except ResolveTimeout as exc:
            log.info("%s refused: %s", field, exc)
            raise InputError(f"{what or field + ' host'} {parts.hostname!r} did not resolve in time") from None
        except AddressNotAllowed as exc:
            log.info("%s refused: %s", field, exc)
            # one answer for a name that does not resolve and one that resolves to an internal
            # address: told apart, they would let a caller map which internal names exist (the
            # log says which). The first is the common mistake (a typo, a host that is gone),
            # so it is named, not left to be read as "private"
            raise InputError(
                f"{field} must reach a public address: {parts.hostname!r} does not resolve, or resolves to an "
                "address that is refused (loopback, private, link-local, multicast and reserved addresses)"
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
