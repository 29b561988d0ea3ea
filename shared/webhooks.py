"""Webhook signing, URL policy and a single delivery attempt.

Retries, backoff and the once-per-job guarantee live in the Celery task
(``worker.tasks.deliver_webhook``); this module is plain functions so receivers can reuse
:func:`verify` to check a signature.

Address policy (SSRF): unless ``webhook_allow_private_addresses`` is set, a webhook may reach
only public unicast addresses. The host is resolved and every address checked when the job is
submitted (422), and again when the delivery connects: the connection goes to the very address
that was checked (:class:`_PinnedBackend`, a network backend of httpcore, the library under
httpx), so a DNS answer that changes between check and use (rebinding) reaches nothing. Odd IP
spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) are resolved by the system resolver like
any name, so they are checked as the address they stand for.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from shared.errors import InputError

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-AudioAnalysis-Timestamp"
SIGNATURE_HEADER = "X-AudioAnalysis-Signature"
JOB_ID_HEADER = "X-AudioAnalysis-Job-Id"
# 1 on the first delivery, 2 on the first retry, ...: a receiver sees a retried delivery as such
ATTEMPT_HEADER = "X-AudioAnalysis-Attempt"


class WebhookDeliveryError(Exception):
    """The receiver did not accept the delivery (network error or non-2xx): retry later.

    Its message is shown to the job's owner (``webhook.last_error``), so it says no more than
    "delivery failed, status N" or that the connection failed: never what answered there.
    """


class AddressNotAllowed(Exception):
    """The webhook host resolves to an address the policy refuses."""


# cloud metadata services are reached by name as well as by their link-local address
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                             "instance-data.ec2.internal", "metadata.azure.com"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(address: str) -> bool:
    """True only for a public unicast address (IPv4-mapped and NAT64 IPv6 judged by their IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
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
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise AddressNotAllowed(f"{host} resolves to non-public {refused}")
    return addresses


class _PinnedBackend(httpcore.NetworkBackend):
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
        raise httpcore.ConnectError("unix sockets are not webhook targets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _transport(allow_private: bool) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(trust_env=False)
    if not allow_private:
        # httpx builds its httpcore pool without a way to pass a network backend: rebuild it
        # with ours (same TLS context and limits as httpx's own defaults)
        pool = transport._pool
        transport._pool = httpcore.ConnectionPool(
            ssl_context=pool._ssl_context, max_connections=pool._max_connections,
            max_keepalive_connections=pool._max_keepalive_connections, keepalive_expiry=pool._keepalive_expiry,
            network_backend=_PinnedBackend(),
        )
    return transport


# the secret the settings fall back to: public, so deliveries signed with it prove nothing
DEFAULT_SECRET = "change-me"
MIN_SECRET_LENGTH = 16


class InsecureSecretError(RuntimeError):
    """The service must not start: anyone could forge its webhook deliveries."""


def check_secret(secret: str, *, allow_insecure: bool = False) -> None:
    """Refuse the built-in default, an empty or a short secret, unless explicitly allowed."""
    if allow_insecure:
        return
    if secret == DEFAULT_SECRET or len(secret) < MIN_SECRET_LENGTH:
        raise InsecureSecretError(
            f"AUDIO_ANALYSIS_WEBHOOK_SECRET is the default or shorter than {MIN_SECRET_LENGTH} characters: anyone "
            "could forge webhook deliveries. Set a random one (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'); `audio-analysis up` generates one."
        )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float | None = 300) -> bool:
    """Receiver side: constant-time check, and reject stale timestamps (replays)."""
    if tolerance_s is not None:
        try:
            if abs(time.time() - int(timestamp)) > tolerance_s:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def validate_webhook_url(url: str, allowed_hosts: list[str], allow_private: bool = False) -> str:
    """Refuse (422) anything but an absolute http(s) URL to an allowed, public host.

    Resolves the host (blocking: call it from a thread in async code).
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError("webhook_url must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise InputError("webhook_url must be an absolute http(s) URL")
    # whitespace and control characters (CR LF: header injection) have no place in a URL; httpx
    # would refuse them only at delivery, long after the caller could be told
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
        raise InputError("webhook_url must not contain whitespace or control characters")
    if allowed_hosts and parts.hostname.lower() not in {h.lower() for h in allowed_hosts}:
        raise InputError(f"webhook host {parts.hostname!r} is not in the allowed hosts")
    if not allow_private:
        try:
            resolve_allowed(parts.hostname, port)
        except AddressNotAllowed as exc:
            log.info("webhook_url refused: %s", exc)
            raise InputError(
                "webhook_url must reach a public address (loopback, private, link-local, multicast and "
                "reserved addresses are refused)"
            ) from None
    return url


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(url: str, job_id: str, payload: dict[str, Any], secret: str, timeout_s: float,
         allow_private: bool = False, attempt: int = 1) -> int:
    """One signed POST, the ``attempt``-th for this job. Raises WebhookDeliveryError unless the
    receiver answers 2xx."""
    body = encode(payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        JOB_ID_HEADER: job_id,
        ATTEMPT_HEADER: str(attempt),
    }
    try:
        # redirects are not followed: they would sidestep the address policy and allowed hosts;
        # trust_env off: a proxy from the environment would connect for us, unchecked
        with httpx.Client(transport=_transport(allow_private), timeout=timeout_s, follow_redirects=False,
                          trust_env=False) as client:
            # the status line is all we need: the body is never read (a receiver could stream
            # gigabytes), nor shown to anyone
            with client.stream("POST", url, content=body, headers=headers) as response:
                status = response.status_code
    # InvalidURL is not an HTTPError; a URL stored before the checks above could still be one
    except (httpx.HTTPError, httpx.InvalidURL, httpcore.ConnectError, OSError, ValueError) as exc:
        log.warning("webhook delivery for job %s failed: %s: %s", job_id, type(exc).__name__, exc)
        raise WebhookDeliveryError("delivery failed: could not connect") from None
    if not 200 <= status < 300:
        raise WebhookDeliveryError(f"delivery failed, status {status}")
    return status
