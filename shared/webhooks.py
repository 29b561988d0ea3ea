"""Webhook signing, URL policy and a single delivery attempt.

Retries, backoff and the once-per-job guarantee live in the Celery task
(``worker.tasks.deliver_webhook``); this module is plain functions so receivers can reuse
:func:`verify` to check a signature.

Address policy (SSRF): unless ``webhook_allow_private_addresses`` is set, a webhook may reach
only public unicast addresses, checked when the job is submitted (422) and again when the
delivery connects, to the very address that was checked. The policy is ``shared/outbound.py``,
the same one that audio given by URL goes through.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpcore
import httpx

from shared.outbound import DeadlineExceeded, check_url, transport

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-AudioAnalysis-Timestamp"
SIGNATURE_HEADER = "X-AudioAnalysis-Signature"
JOB_ID_HEADER = "X-AudioAnalysis-Job-Id"
# 1 on the first delivery, 2 on the first retry, ...: a receiver sees a retried delivery as such
ATTEMPT_HEADER = "X-AudioAnalysis-Attempt"


class WebhookDeliveryError(Exception):
    """The receiver did not accept the delivery (network error or non-2xx): retry later.

    Its message is shown to the job's owner (``webhook.last_error``), so it says what happened
    (could not connect, connected but timed out after N s, connection closed before an answer,
    "delivery failed, status N") and no more: never what answered there, nor an address or
    reason the connection was refused (the address policy's verdict names the addresses a host
    resolved to, which may be the service's own network's).
    """


def failure_message(exc: BaseException, timeout_s: float, deadline_s: float, elapsed_s: float) -> str:
    """What ``webhook.last_error`` says of an attempt that raised ``exc`` after ``elapsed_s``.

    Every failure was "could not connect", a receiver that took the connection and never
    answered (httpx.ReadTimeout) too, which sent its owner looking for a firewall. The time said
    is the limit that ran out: the attempt's ``deadline_s`` when it had passed (the socket's
    last wait is cut to what is left of it, shared/outbound.py), else ``timeout_s``, which bounds
    each connect, write and read.
    """
    cause: BaseException | None = exc
    seen: set[int] = set()
    # a little short of the deadline: a socket's wait cut to what was left of it ends on it
    deadline = elapsed_s >= deadline_s - 0.05
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        deadline = deadline or isinstance(cause, DeadlineExceeded)
        cause = cause.__cause__ or cause.__context__
    took = f"{deadline_s if deadline else timeout_s:g} s"
    if isinstance(exc, (httpx.ConnectTimeout, httpcore.ConnectTimeout)):
        return f"delivery failed: could not connect within {took}"
    if isinstance(exc, (httpx.ReadTimeout, httpcore.ReadTimeout)):
        return f"delivery failed: connected, then timed out after {took} waiting for the answer"
    if isinstance(exc, (httpx.WriteTimeout, httpcore.WriteTimeout)):
        return f"delivery failed: connected, then timed out after {took} sending the delivery"
    if isinstance(exc, (httpx.TimeoutException, httpcore.TimeoutException)):  # a pool timeout: no connection
        return f"delivery failed: could not connect within {took}"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpcore.ReadError,
                        httpcore.WriteError, httpcore.RemoteProtocolError)):
        # connected: the receiver closed or reset the connection, or answered something not HTTP
        return "delivery failed: connected, but the connection ended without a valid answer"
    # refused, unreachable, not resolved, an address the policy refuses, an invalid stored URL
    return "delivery failed: could not connect"


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


def signing_secret(secret: str, owner: str | None) -> str:
    """The secret a job's deliveries are signed with: its API key's own where the service has
    keys, the operator's ``secret`` where it has none (``owner`` None).

    With one secret for every tenant, key A could submit a job whose webhook is key B's receiver
    and have the service send it a correctly signed body of A's choosing (job id, file name,
    result): a receiver that checks the signature, as it should, took it for one of B's own jobs.
    Each key's secret is derived from the operator's and the key's owner digest (HMAC-SHA256), so
    nothing per key is stored, and a key's holder reads it from ``GET /webhooks/secret``."""
    if owner is None:
        return secret
    return hmac.new(secret.encode(), b"webhook-signing-secret:" + owner.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float | None = 300) -> bool:
    """Receiver side: constant-time check, and reject stale timestamps (replays).

    False, never an exception, for whatever the headers hold: anyone who reaches the receiver
    chooses them. The signature is compared as bytes: ``hmac.compare_digest`` raises TypeError
    on a ``str`` with a non-ASCII character (a 500 in the receiver, for one header value).
    """
    if tolerance_s is not None:
        try:
            if abs(time.time() - int(timestamp)) > tolerance_s:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode("utf-8", "surrogateescape"))


def validate_webhook_url(url: str, allowed_hosts: list[str], allow_private: bool = False,
                         timeout: float | None = None) -> str:
    """Refuse (422) anything but an absolute http(s) URL to an allowed, public host.

    Resolves the host (blocking: call it from a thread in async code), within ``timeout`` seconds
    when given.
    """
    return check_url(url, field="webhook_url", allowed_hosts=allowed_hosts, allow_private=allow_private,
                     what="webhook host", timeout=timeout)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(url: str, job_id: str, payload: dict[str, Any], secret: str, timeout_s: float,
         allow_private: bool = False, attempt: int = 1, deadline_s: float = 30.0) -> int:
    """One signed POST, the ``attempt``-th for this job. Raises WebhookDeliveryError unless the
    receiver answers 2xx. ``timeout_s`` bounds each connect, write and read; ``deadline_s`` the
    whole attempt: a receiver trickling its status line a byte at a time, each within the
    timeout, held the delivering worker (which may be the one running the jobs) for hours."""
    body = encode(payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        JOB_ID_HEADER: job_id,
        ATTEMPT_HEADER: str(attempt),
    }
    started = time.monotonic()
    try:
        # redirects are not followed: they would sidestep the address policy and allowed hosts;
        # trust_env off: a proxy from the environment would connect for us, unchecked
        with httpx.Client(transport=transport(allow_private, time.monotonic() + deadline_s), timeout=timeout_s,
                          follow_redirects=False,
                          trust_env=False) as client:
            # the status line is all we need: the body is never read (a receiver could stream
            # gigabytes), nor shown to anyone
            with client.stream("POST", url, content=body, headers=headers) as response:
                status = response.status_code
    # InvalidURL is not an HTTPError; a URL stored before the checks above could still be one
    except (httpx.HTTPError, httpx.InvalidURL, httpcore.ConnectError, OSError, ValueError) as exc:
        log.warning("webhook delivery for job %s failed: %s: %s", job_id, type(exc).__name__, exc)
        raise WebhookDeliveryError(failure_message(exc, timeout_s, deadline_s, time.monotonic() - started)) from None
    if not 200 <= status < 300:
        raise WebhookDeliveryError(f"delivery failed, status {status}")
    return status
