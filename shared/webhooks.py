"""Webhook signing, URL policy and a single delivery attempt.

Retries, backoff and the once-per-job guarantee live in the Celery task
(``worker.tasks.deliver_webhook``); this module is plain functions so receivers can reuse
:func:`verify` to check a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.errors import InputError

TIMESTAMP_HEADER = "X-AudioAnalysis-Timestamp"
SIGNATURE_HEADER = "X-AudioAnalysis-Signature"
JOB_ID_HEADER = "X-AudioAnalysis-Job-Id"


class WebhookDeliveryError(Exception):
    """The receiver did not accept the delivery (network error or non-2xx): retry later."""


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


def validate_webhook_url(url: str, allowed_hosts: list[str]) -> str:
    """Refuse (422) anything but an absolute http(s) URL to an allowed host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"webhook_url must be an absolute http(s) URL, got {url!r}")
    if allowed_hosts and parts.hostname.lower() not in {h.lower() for h in allowed_hosts}:
        raise InputError(f"webhook host {parts.hostname!r} is not in the allowed hosts")
    return url


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(url: str, job_id: str, payload: dict[str, Any], secret: str, timeout_s: float) -> int:
    """One signed POST. Raises WebhookDeliveryError unless the receiver answers 2xx."""
    body = encode(payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        JOB_ID_HEADER: job_id,
    }
    try:
        # redirects are not followed: they would sidestep the allowed-hosts policy
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise WebhookDeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise WebhookDeliveryError(f"receiver answered {response.status_code}")
    return response.status_code
