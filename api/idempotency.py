"""``Idempotency-Key`` on the asynchronous submits (``POST /jobs/<kind>``, ``POST /jobs/batch``),
as Stripe and draft-ietf-httpapi-idempotency-key-header have it.

A client whose 202 was lost on the wire (a timeout, a proxy's reset) cannot tell whether its job
exists; without a key it submits again and the hour of audio runs, and is paid for, twice. With
one, the same key from the same tenant within ``idempotency_window_s`` is answered the first
submission's jobs (202, same ids, ``Idempotent-Replayed: true``) and nothing new is stored or
queued; the key reused for another request (another route, file or parameters) is 422; a
request arriving while the first is still being submitted is 409 (retry later). The key is held
and answered in Redis (``JobStore.claim_key``, ``confirm_queued``); the dispatcher drives it
(``Dispatcher.submit_all``).

This module holds what the edge makes of the request: the validated key, and the request's
fingerprint (a digest of the route, its form fields and every uploaded byte, the audio's taken
as it is streamed into storage, so nothing is read twice).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Mapping, Sequence

from fastapi import UploadFile

from shared.errors import InputError

HEADER = "Idempotency-Key"
# what a key may be: 1 to 255 printable ASCII characters (Stripe's limit; the draft leaves the
# length to the server). Taken as sent, quotes included: the draft's sf-string form ("…") and
# Stripe's bare one both work, so long as a client sends its key the same way each time
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# answered to a request whose key's first submission is still being stored and queued: that
# takes milliseconds to a few seconds (a large upload to a slow bucket), after which the retry
# gets the first submission's answer
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class IdempotencyKey:
    """The ``Idempotency-Key`` header, validated (:func:`parse_key`)."""

    value: str


def parse_key(values: Sequence[str]) -> IdempotencyKey | None:
    """The header's values as received (None: no header, nothing changes); 422 for a key
    given twice, empty, longer than 255 characters or not printable ASCII."""
    if not values:
        return None
    if len(values) > 1:
        raise InputError(f"{HEADER}: given {len(values)} times; send one key")
    value = values[0].strip()
    if not _KEY.match(value):
        # Starlette decodes headers as latin-1: anything past "~" was not ASCII on the wire
        why = "empty" if not value else f"{len(value)} characters long, at most 255" if len(value) > 255 \
            else "not printable ASCII"
        raise InputError(f"{HEADER}: {why}; send 1 to 255 printable ASCII characters (a UUID, say)")
    return IdempotencyKey(value)


@dataclass(frozen=True)
class Idempotent:
    """A submission made with a key: the key, and the request as the route read it, whose
    digest tells a retry of it from another request made with the same key."""

    key: IdempotencyKey
    # the route ("jobs/diarize", "jobs/batch")
    route: str
    # its form fields as the route read them (typed values; uploads apart)
    fields: Mapping[str, Any]

    def fingerprint(self, uploads: Sequence[Sequence[tuple[str, str | None, str]]]) -> str:
        """SHA-256 of the route, the form fields and, per job, each upload's (field, file
        name, SHA-256 of its bytes), in the order sent."""
        text = json.dumps({"route": self.route, "fields": {k: v for k, v in self.fields.items() if v is not None},
                           "uploads": uploads}, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def form_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """An endpoint's keyword values without its uploads (which the fingerprint takes by digest)."""
    def upload(value: Any) -> bool:
        return isinstance(value, UploadFile) or \
            (isinstance(value, list) and any(isinstance(v, UploadFile) for v in value))

    return {name: value for name, value in values.items() if not upload(value)}


class Digesting:
    """A read-only stream that hashes what is read through it: an upload's digest taken as it
    is streamed into storage (``Storage.save`` only reads), instead of reading it again."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.sha256.update(chunk)
        return chunk

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def digest_upload(upload: UploadFile, chunk: int = 1024 * 1024) -> str:
    """SHA-256 of an upload as received, read from its start (blocking: call it in a thread),
    the upload left at its start: for a retry answered from the key, whose audio is not stored."""
    upload.file.seek(0)
    reader = Digesting(upload.file)  # type: ignore[arg-type]
    while reader.read(chunk):
        pass
    upload.file.seek(0)
    return reader.hexdigest()
