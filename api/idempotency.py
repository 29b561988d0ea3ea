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
fingerprint (a digest of the route, the form fields the client sent and every uploaded byte, the
audio's taken as it is streamed into storage, so nothing is read twice).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from fastapi import UploadFile
from starlette.datastructures import FormData

from shared.errors import InputError

HEADER = "Idempotency-Key"
# what a key may be: 1 to 255 printable ASCII characters (Stripe's limit; the draft leaves the
# length to the server). Taken as sent, quotes included: the draft's sf-string form ("…") and
# Stripe's bare one both work, so long as a client sends its key the same way each time
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# what a key may be, for the OpenAPI schema (the header's own check is _KEY's)
KEY_PATTERN = _KEY.pattern
KEY_MAX_LENGTH = 255


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


# an upload's part in the fingerprint: (field, file name, SHA-256 of its bytes)
UploadPart = tuple[str, str | None, str]


@dataclass(frozen=True)
class Idempotent:
    """A submission made with a key: the key, and the request as the client sent it, whose
    digest tells a retry of it from another request made with the same key."""

    key: IdempotencyKey
    # the route ("jobs/diarize", "jobs/batch")
    route: str
    # the form fields the client sent (sent_fields): not as the route typed them, nor with its
    # defaults, so that a retry answered by another version of the API (a rolling deploy that
    # adds a field or changes a default) is the same request
    fields: tuple[tuple[str, str], ...]

    def fingerprint(self, uploads: Sequence[Sequence[UploadPart]]) -> str:
        """SHA-256 of the route, the form fields and, per job, each upload's (field, file
        name, SHA-256 of its bytes). Plain JSON types only: anything else fails here, never
        written as its ``str()`` (an upload's was its part headers: the same file sent as
        ``audio/x-wav`` instead of ``audio/wav`` was "another request")."""
        text = json.dumps({"route": self.route, "fields": self.fields, "uploads": uploads},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def sent_fields(form: FormData) -> tuple[tuple[str, str], ...]:
    """The request's text form fields as sent, sorted: every uploaded file apart (the
    fingerprint takes each by its name and digest, never its part's headers)."""
    return tuple(sorted((name, value) for name, value in form.multi_items() if isinstance(value, str)))


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
