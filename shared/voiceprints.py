"""Voiceprints: a named person's averaged speaker embedding, stored in Redis per owner.

A voiceprint is made by the ``enroll`` job kind (a worker embeds the speech of one or more
recordings and averages them), stored here by ``POST /voiceprints`` and handed to ``diarize`` and
``identify`` jobs by id. Ids are resolved in the API (:meth:`VoiceprintStore.resolve`): the
worker gets labels and vectors as plain numbers in the job's parameters, never an id to look up
(stored once beside the job records, by content: ``shared/jobs.py`` ``JobStore.keep_apart``).

Unlike job records, voiceprints do not expire: they are the service's own data, kept in the
same Redis (``voiceprint_redis_url`` to put them elsewhere), which therefore runs with
persistence (append-only file) and ``noeviction``; docs/service.md says why and how to back it up.

Tenancy is that of jobs: a voiceprint belongs to the API key that created it (its ``owner``
digest); another key is answered 404, as for an unknown id. Without API keys there is one tenant.

Exports are JSON (the vector with its label, model and dimension) or ``.npy`` (the float32
vector alone); imports take the same two formats and never a pickle.

``narrowband`` says whether every recording a voiceprint was enrolled from was at 8 kHz or less (a
telephone call): a telephone recording is then matched against it at the model's narrowband
identification threshold. Voiceprints stored or exported before the field existed have none
(null: not known), and are matched as the others are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import redis
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InputError
from shared.formats import visible
from shared.record_heads import RecordHeads
from shared.settings import Settings

FORMAT = "audio-analysis/voiceprint-v1"


@dataclass(frozen=True)
class EmbeddingModel:
    """The model whose vectors a voiceprint holds: vectors of two models are not comparable."""

    name: str
    dimension: int


# Per model profile (shared/settings.py ``model_profile``): the embedder of /embedding, /compare and
# of voiceprints. engine/profiles.py reads its names from here, so API (no torch) and worker agree.
# A change of weights or of how the engine computes the vector must change the name.
EMBEDDING_MODELS: dict[str, EmbeddingModel] = {
    "embedded": EmbeddingModel("3d-speaker/campplus-cn-en-common", 192),
    "production": EmbeddingModel("speechbrain/spkrec-ecapa-voxceleb", 192),
}


def embedding_model(settings: Settings) -> EmbeddingModel:
    return EMBEDDING_MODELS[settings.model_profile]


_ID = re.compile(r"^vp_[0-9a-f]{32}$")
# what a refusal may echo of an id it was given (api/errors.py's rule for a path's id)
_ECHOED = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_LABEL = 200


def new_voiceprint_id() -> str:
    return "vp_" + uuid.uuid4().hex


def enrolled_id(job_id: str) -> str:
    """The voiceprint an enrolment job makes: one per job (both ids are 32 hex digits), so a retry
    answered that job's result again (its Idempotency-Key) finds it stored instead of adding one."""
    return "vp_" + job_id


def deleted_since(voiceprint_id: str) -> InputError:
    """What a retried enrolment is answered once the voiceprint it stored was deleted."""
    return InputError(f"voiceprint {voiceprint_id}, which this enrolment stored, was deleted since; it is not "
                      "stored again (enrol with a new Idempotency-Key to store the person again)", status_code=409)


def enrolment_job_id(voiceprint_id: str) -> str:
    """The enrolment job an enrolled voiceprint was made by (:func:`enrolled_id` read back)."""
    return voiceprint_id.removeprefix("vp_")


# Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): a label
# ends up in subtitle cues, RTTM lines and the web page next to other text, and an unclosed
# right-to-left override there shows "SPEAKER_00" as "00_REKAEPS" and reorders whatever follows.
# Joiners (U+200C, U+200D, part of Persian and emoji names) and the plain direction marks stay.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# Unicode's default-ignorable code points (DerivedCoreProperties.txt, Default_Ignorable_Code_Point):
# drawn as nothing. "Alex\u200b" or "Alex\u2060" beside "Alex" were two voiceprints whose names
# showed alike everywhere, and a job they both named wrote two speakers as "Alex" into its
# subtitles and RTTM, which give two people enrolled as "Alex" names of their own (round 14).
_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
# kept where they do something: the plain direction marks (the formats drop them when writing a
# name, so they never part two names there); joiners (ZWNJ, ZWJ) between two non-ASCII characters
# (Persian and Indic words, emoji sequences); selectors, tags and the Hangul fillers after one (an
# emoji's presentation, a flag's tags, an old syllable). Beside ASCII they change nothing seen, and
# the rest (zero-width space, word joiner, BOM, soft hyphen, ...) nothing anywhere in a name
_DIRECTION_MARKS = frozenset("\u200e\u200f\u061c")
_JOINERS = frozenset("\u200c\u200d")
_MODIFIERS = ((0x115F, 0x1160), (0x180B, 0x180D), (0x180F, 0x180F), (0x3164, 0x3164), (0xFE00, 0xFE0F),
              (0xFFA0, 0xFFA0), (0xE0020, 0xE007F), (0xE0100, 0xE01EF))


def _ignorable(c: str, ranges: tuple[tuple[int, int], ...] = _IGNORABLE) -> bool:
    point = ord(c)
    return any(low <= point <= high for low, high in ranges)


def _without_invisible(label: str) -> str:
    """``label`` without the default-ignorable characters that change nothing drawn (above)."""
    kept: list[str] = []
    for i, c in enumerate(label):
        if _ignorable(c) and c not in _DIRECTION_MARKS and c not in _BIDI_CONTROLS:
            # what it sits between as drawn: the character kept before it, the next one not ignorable
            before = kept[-1] if kept else ""
            after = next((d for d in label[i + 1:] if not _ignorable(d)), "")
            if c in _JOINERS:
                meant = bool(before) and not before.isascii() and bool(after) and not after.isascii()
            else:
                meant = _ignorable(c, _MODIFIERS) and bool(before) and not before.isascii()
            if not meant:
                continue
        kept.append(c)
    return "".join(kept)


def _printable(c: str) -> bool:
    # Cc: C0 and C1 controls and DEL (not only below 32); Zl/Zp: U+2028/U+2029, line breaks to
    # every Unicode-aware reader; Cs: lone surrogates, which no UTF-8 encoder writes
    return unicodedata.category(c) not in ("Cc", "Zl", "Zp", "Cs") and c not in _BIDI_CONTROLS


def clean_label(label: Any) -> str:
    """A person's name as stored and shown: one line of printable text, at most MAX_LABEL long.

    Checked wherever a label comes in (enrollment at the edge, before a worker is spent on it;
    imports), so a label never needs escaping beyond each format's own syntax."""
    if not isinstance(label, str) or not label.strip():
        raise InputError("label: a voiceprint needs a non-empty label (the person's name)")
    # one spelling per name: NFC ("Zoe" + U+0308 is "Zoë", which was stored as another name that
    # showed alike), and nothing that is drawn as nothing (_without_invisible)
    label = _without_invisible(unicodedata.normalize("NFC", label.strip())).strip()
    if len(label) > MAX_LABEL or not all(_printable(c) for c in label):
        raise InputError(f"label: at most {MAX_LABEL} printable characters (no control, line-break or "
                         "bidirectional-override characters)")
    if not any(visible(c) for c in label):
        # "\u200b\u200b" or a lone combining mark: stored, listed as an empty cell on the page,
        # and written as a blank cue into subtitles, a speaker nobody can read
        raise InputError("label: needs at least one visible character (a letter, digit, punctuation or symbol)")
    return label


def unit_vector(values: Iterable[float], dimension: int) -> list[float]:
    """A stored vector: ``dimension`` finite numbers, not all zero, L2-normalised."""
    import numpy as np  # not at import: the API starts without numpy

    vector = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if vector.shape != (dimension,):
        raise InputError(f"voiceprint has {vector.size} values; the model's dimension is {dimension}")
    norm = float(np.linalg.norm(vector)) if np.all(np.isfinite(vector)) else float("nan")
    if not np.isfinite(norm) or norm == 0:
        raise InputError("voiceprint must be finite numbers, not all zero")
    return [float(x) for x in (vector / norm).astype(np.float32)]


class Voiceprint(BaseModel):
    """A stored voiceprint. ``owner`` (a digest of the API key) is never shown."""

    model_config = ConfigDict(extra="ignore")

    id: str
    label: str
    model: str = Field(description="embedding model the vector comes from")
    dimension: int
    embedding: list[float] = Field(description="L2-normalised average embedding")
    speech_seconds: float | None = Field(None, description="speech the vector was computed from (None: imported)")
    files: int | None = Field(None, description="recordings it was averaged over (None: imported)")
    narrowband: bool | None = Field(
        None, description="enrolled from telephone recordings only (every file at 8 kHz or less); "
        "None: not known (stored or exported before this field, or a bare vector imported)")
    created_at: str
    # made by an enrolment job, its id the job's (:func:`enrolled_id`): only such a voiceprint's
    # delete is remembered (:meth:`VoiceprintStore.delete`). None: stored before this field.
    # Never shown, as ``owner``; both before the vector, which ``to_json`` stores last
    enrolled: bool | None = None
    owner: str | None = None

    def public(self) -> dict[str, Any]:
        """What GET /voiceprints shows: no vector, no owner."""
        return self.model_dump(mode="json", exclude={"embedding", "owner", "enrolled"})

    def to_json(self) -> str:
        # the vector last, after ``owner``: a listing reads each stored voiceprint up to it and
        # no further (VoiceprintStore.page); every other field keeps its order
        head = self.model_dump_json(exclude={"embedding"})
        return f"{head[:-1]},{self.model_dump_json(include={'embedding'})[1:]}"

    def export(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.model_dump(mode="json", exclude={"owner", "enrolled"})}

    def reference(self) -> dict[str, Any]:
        """What a job's parameters carry (shared.kinds.VoiceprintRef): ``narrowband`` only when
        true, so the reference of any other voiceprint (and its stored digest) is what it was."""
        ref = {"id": self.id, "label": self.label, "model": self.model, "embedding": self.embedding}
        if self.narrowband:
            ref["narrowband"] = True
        return ref


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class VoiceprintSummary(BaseModel):
    """A voiceprint as a listing shows it: no vector, no owner (``Voiceprint.public``), parsed from
    the stored JSON's head alone."""

    model_config = ConfigDict(extra="ignore")

    id: str
    label: str
    model: str
    dimension: int
    speech_seconds: float | None = None
    files: int | None = None
    narrowband: bool | None = None
    created_at: str


@dataclass(frozen=True)
class VoiceprintPage:
    """One page of an owner's voiceprints, oldest first; ``next_cursor`` None on the last."""

    voiceprints: list[VoiceprintSummary]
    next_cursor: str | None


# One page of an owner's index, oldest first, after the cursor's (score, id): the members with a
# lower score, and those of the same score ordered before or at the id (a sorted set orders ties
# by member), are skipped; counted each time, so a page starts right even when the voiceprint
# the cursor names was deleted since, and nothing is listed twice when one before it was.
# ARGV: score ('' for the first page), id, how many. Returns ids and scores, flat.
_PAGE = """
local start = 0
if ARGV[1] ~= '' then
  start = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
    if member <= ARGV[2] then start = start + 1 end
  end
end
return redis.call('ZRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'WITHSCORES')
"""

# the fields but the vector: about 300 bytes, and a label of 200 four-byte characters 800 more
_SUMMARY_HEAD_BYTES = 2048
# score:id, and since this release :tag, the owner's (_owner_tag); a cursor given before it has none
_CURSOR = re.compile(r"^(-?[0-9][0-9.e+-]{0,30}):(vp_[0-9a-f]{32})(?::([0-9a-f]{12}))?$")
# b64decode skips what is not base64 rather than refuse it: "<cursor>!!" and "<cursor>====" were
# taken for the cursor (GET /jobs's check)
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_NOT_GIVEN = "cursor: not one this API gave (pass the next page's cursor as it was given)"


def _owner_tag(owner: str | None) -> str:
    # 48 bits of the owner's digest: tells one key's cursor from another's, names neither
    return hashlib.sha256((owner or "-").encode()).hexdigest()[:12]


def _cursor(score: float, voiceprint_id: str, owner: str | None) -> str:
    """Opaque to clients: where a page ended (its last voiceprint's place in the owner's index),
    and whose listing it is."""
    return base64.urlsafe_b64encode(f"{score!r}:{voiceprint_id}:{_owner_tag(owner)}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str, owner: str | None) -> tuple[str, str]:
    """(score, id) of a cursor :func:`_cursor` gave ``owner``; 422 for anything else. Another
    API key's cursor was taken as a place in this key's listing (its page started at the other
    key's time, skipping what came before without a word)."""
    try:
        if not _BASE64URL.match(cursor):
            raise ValueError(cursor)
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        found = _CURSOR.match(text)
        if found is None or not math.isfinite(float(found.group(1))):
            raise ValueError(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(_NOT_GIVEN) from exc
    if found.group(3) is not None and found.group(3) != _owner_tag(owner):
        raise InputError(_NOT_GIVEN)
    return repr(float(found.group(1))), found.group(2)


class VoiceprintStore:
    """Voiceprints in Redis: ``<prefix>:voiceprint:<id>`` (JSON) and one set of ids per owner."""

    def __init__(self, client: redis.Redis, prefix: str = "aa", max_per_owner: int | None = None,
                 deleted_for_s: int = 24 * 3600) -> None:
        self.redis = client
        self.prefix = prefix
        self.max_per_owner = max_per_owner
        # how long a deleted voiceprint's id is remembered (:meth:`delete`): as long as a retried
        # enrolment can be answered its job's result (the job's record, the key's window)
        self.deleted_for_s = deleted_for_s
        self._page = client.register_script(_PAGE)
        # each record up to its embedding, cut in Redis (Voiceprint.to_json stores it last)
        self._summary_heads = RecordHeads(client, cut_before="embedding", last_before="owner",
                                          head_bytes=_SUMMARY_HEAD_BYTES)

    @classmethod
    def from_settings(cls, settings: Settings) -> "VoiceprintStore":
        url = settings.voiceprint_redis_url or settings.redis_url
        # the service's reply and connect timeouts (shared/queue.py), as the job store's: none
        # at all in the redis-py 5.x releases pyproject.toml allows
        from shared.queue import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S

        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                      socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_keepalive=True)
        return cls(client, settings.redis_key_prefix,
                   settings.voiceprints_max_per_owner,
                   deleted_for_s=max(settings.result_expires_s, settings.idempotency_window_s))

    def check_room(self, owner: str | None) -> None:
        """409 when ``owner`` already keeps ``max_per_owner`` voiceprints: asked before an
        enrollment spends a worker, and again, atomically, when one is stored."""
        if self.max_per_owner is not None and self.redis.zcard(self._index(owner)) >= self.max_per_owner:
            raise self._full()

    def _full(self) -> InputError:
        return InputError(f"this API key already keeps {self.max_per_owner} voiceprints, the most one key may; "
                          "delete some (DELETE /voiceprints/{id}) first", status_code=409)

    def _key(self, voiceprint_id: str) -> str:
        return f"{self.prefix}:voiceprint:{voiceprint_id}"

    def _index(self, owner: str | None) -> str:
        return f"{self.prefix}:voiceprints:{owner or '_'}"

    def _deleted_key(self, voiceprint_id: str) -> str:
        return f"{self.prefix}:voiceprint-deleted:{voiceprint_id}"

    def create(self, *, owner: str | None, label: str, model: EmbeddingModel, embedding: Iterable[float],
               speech_seconds: float | None = None, files: int | None = None,
               narrowband: bool | None = None, voiceprint_id: str | None = None) -> Voiceprint:
        """Store a new voiceprint. With ``voiceprint_id`` (an enrolment's, made from its job's id,
        :func:`enrolled_id`), one already stored under it is returned as it is, room or not: a
        retried enrolment answered its job's result again stores nothing twice."""
        vp = Voiceprint(
            id=voiceprint_id or new_voiceprint_id(), label=clean_label(label), model=model.name,
            dimension=model.dimension,
            embedding=unit_vector(embedding, model.dimension),
            speech_seconds=None if speech_seconds is None else round(float(speech_seconds), 3),
            files=files, narrowband=narrowband, created_at=_utc_now(), enrolled=voiceprint_id is not None,
            owner=owner,
        )
        index = self._index(owner)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # the count and the write in one transaction: concurrent imports cannot
                    # all pass a count taken before any of them was stored
                    pipe.watch(index, self._key(vp.id), self._deleted_key(vp.id))
                    if voiceprint_id is not None and (stored := pipe.get(self._key(vp.id))) is not None:
                        pipe.unwatch()
                        return Voiceprint.model_validate_json(stored)
                    if voiceprint_id is not None and pipe.exists(self._deleted_key(vp.id)):
                        # a retried enrolment, answered its job's result again after the
                        # voiceprint was deleted: storing it again undid the delete (a person's
                        # voiceprint back, a new created_at, under the id the delete was told of)
                        pipe.unwatch()
                        raise deleted_since(vp.id)
                    if self.max_per_owner is not None and pipe.zcard(index) >= self.max_per_owner:
                        pipe.unwatch()
                        raise self._full()
                    pipe.multi()
                    pipe.set(self._key(vp.id), vp.to_json())
                    pipe.zadd(index, {vp.id: time.time()})
                    pipe.execute()
                    return vp
                except redis.WatchError:
                    continue

    def get(self, voiceprint_id: str, owner: str | None, *, admin: bool = False) -> Voiceprint | None:
        """The voiceprint if this owner may see it; None for an unknown id and another's alike."""
        if not _ID.match(voiceprint_id or ""):
            return None
        raw = self.redis.get(self._key(voiceprint_id))
        if raw is None:
            return None
        vp = Voiceprint.model_validate_json(raw)
        if owner is not None and not admin and vp.owner != owner:
            return None
        return vp

    def list(self, owner: str | None) -> list[Voiceprint]:
        """The owner's voiceprints, oldest first (without API keys: everyone's, one tenant)."""
        ids = self.redis.zrange(self._index(owner), 0, -1)
        raws = self.redis.mget([self._key(i) for i in ids]) if ids else []
        return [Voiceprint.model_validate_json(r) for r in raws if r is not None]

    def page(self, owner: str | None, limit: int, cursor: str | None = None) -> VoiceprintPage:
        """At most ``limit`` of the owner's voiceprints, oldest first, after ``cursor`` (a page's
        ``next_cursor``), without their vectors.

        Reads each one up to its vector, cut in Redis: the whole list of 10,000 voiceprints (the
        most one key keeps) read 43 MB of vectors it then dropped, in 0.6 s of the API."""
        score, after = _parse_cursor(cursor, owner) if cursor else ("", "")
        # one more than asked for: whether a next page exists
        flat = self._page(keys=[self._index(owner)], args=[score, after, limit + 1])
        ids, scores = flat[0::2], [float(x) for x in flat[1::2]]
        more = len(ids) > limit
        ids, scores = ids[:limit], scores[:limit]
        heads = self._summary_heads([self._key(i) for i in ids])
        missing = [i for i, head in zip(ids, heads) if head is None]
        whole = dict(zip(missing, self.redis.mget([self._key(i) for i in missing]))) if missing else {}
        raws = [head if head is not None else whole.get(i) for i, head in zip(ids, heads)]
        found = [VoiceprintSummary.model_validate_json(r) for r in raws if r]
        return VoiceprintPage(found, _cursor(scores[-1], ids[-1], owner) if more else None)

    def delete(self, voiceprint_id: str, owner: str | None, *, admin: bool = False) -> Voiceprint | None:
        """Delete the voiceprint if this owner may see it; the voiceprint deleted, None for an
        unknown id and another's alike."""
        vp = self.get(voiceprint_id, owner, admin=admin)
        if vp is None:
            return None
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(vp.id))
            pipe.zrem(self._index(vp.owner), vp.id)
            if vp.enrolled is not False:
                # remembered, so that a retried enrolment of it (create with its id) does not store
                # it again. Not an import's: nothing stores one under its id again, and a key that
                # imported and deleted in a loop left a marker a cycle (104 bytes each, for a day),
                # unbounded by the per-key cap, until Redis refused every tenant's writes
                pipe.set(self._deleted_key(vp.id), 1, ex=max(1, self.deleted_for_s))
            pipe.execute()
        return vp

    def resolve(self, spec: str, owner: str | None, model: EmbeddingModel, limit: int) -> list[dict[str, Any]]:
        """A job's ``voiceprints`` field (comma-separated ids, or ``all`` for the caller's own) as
        the references the worker gets; unknown, another tenant's or another model's are refused."""
        spec = (spec or "").strip()
        if spec.lower() == "all":
            # counted before any is read: a key may keep 10,000 (about 50 MB to read and parse)
            # and a job takes at most ``limit``
            count = self.redis.zcard(self._index(owner))
            if count > limit:
                raise InputError(f"voiceprints: at most {limit} per job; this key has {count}")
            found = self.list(owner)
            if not found:
                raise InputError("voiceprints: 'all' given, but this API key has no voiceprints")
        else:
            ids = list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
            if not ids:
                raise InputError("voiceprints: give voiceprint ids separated by commas, or 'all'")
            if len(ids) > limit:
                raise InputError(f"voiceprints: at most {limit} per job, {len(ids)} given")
            found = []
            for i in ids:
                vp = self.get(i, owner)
                if vp is None:
                    # echoed only where it looks like an id (as api.errors.not_found does): a
                    # field of up to 64 KB, markup and all, came back whole in the 404
                    named = repr(i) if _ECHOED.match(i) else "with that id (not an id this service makes)"
                    raise InputError(f"voiceprints: no voiceprint {named}", status_code=404)
                found.append(vp)
        if len(found) > limit:
            raise InputError(f"voiceprints: at most {limit} per job; this key has {len(found)}")
        for vp in found:
            check_model(vp.model, vp.dimension, model, what=f"voiceprint {vp.id} ({vp.label!r})")
        return [vp.reference() for vp in found]


def _shown(name: Any) -> str:
    """A model name from a request, as a 422 quotes it: at most 80 characters. A form field of
    64 KB or a name of 900 KB inside an imported file came back whole in the answer, markup and
    all (as an unknown voiceprint id did before round 13)."""
    text = name if isinstance(name, str) else str(name)
    return repr(text) if len(text) <= 80 else repr(text[:80]) + f"… ({len(text)} characters)"


def check_model(name: str, dimension: int, expected: EmbeddingModel, *, what: str = "voiceprint") -> None:
    if name != expected.name or dimension != expected.dimension:
        raise InputError(
            f"{what} was made with {_shown(name)} ({dimension}-dim); this service's embedding model is "
            f"{expected.name!r} ({expected.dimension}-dim): enroll the person again with this service"
        )


# --- export and import --------------------------------------------------------------------------
def to_npy(vp: Voiceprint) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(vp.embedding, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Imported:
    label: str
    model: str
    dimension: int
    embedding: list[float]
    speech_seconds: float | None = None
    files: int | None = None
    narrowband: bool | None = None


# the largest "dimension" an imported document may declare (refused afterwards unless the model's)
_MAX_DIMENSION = 4096


def parse_import(data: bytes, filename: str | None, *, label: str | None, model: str | None,
                 expected: EmbeddingModel) -> Imported:
    """An uploaded voiceprint: our JSON export (label, model and dimension inside) or a bare
    vector (``.npy`` or a JSON array), for which ``label`` and ``model`` must be given.

    Never a pickle: a voiceprint is data, and pickles are code.
    """
    from shared.embedding_file import MAX_EMBEDDING_BYTES, check_json_size, load_embedding

    if len(data) > MAX_EMBEDDING_BYTES:
        raise InputError(f"file is {len(data)} bytes; the limit is {MAX_EMBEDDING_BYTES}")
    document: dict[str, Any] = {}
    stripped = data.removeprefix(b"\xef\xbb\xbf").lstrip()
    if stripped[:1] == b"{":
        # the most values a document may name (its "dimension", below), counted before parsing
        check_json_size(stripped, _MAX_DIMENSION)
        try:
            document = json.loads(stripped.decode("utf-8"), parse_int=_small_int, object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InputError(f"file is not valid JSON ({exc.__class__.__name__})") from exc
        if not isinstance(document, dict):
            raise InputError("voiceprint JSON must be an object")
        # another version's document (or another tool's) was read as this one: a v2 export whose
        # vector means something else was stored as a v1 voiceprint, with no sign of it. A
        # document without "format" (written by hand: label, model, embedding) is still read
        if "format" in document and document["format"] != FORMAT:
            named = document["format"]
            shown = repr(named[:80]) if isinstance(named, str) else "not a string"
            raise InputError(f"format: {shown} is not a voiceprint format this service reads ({FORMAT!r})")
    dimension = document.get("dimension", expected.dimension)
    if not isinstance(dimension, int) or isinstance(dimension, bool) or not 1 <= dimension <= _MAX_DIMENSION:
        raise InputError("dimension: must be a whole number of values")
    # load_embedding detects the format from the content; allow_pickle=False refuses pickles
    vector = load_embedding(data, filename, dimension=dimension, allow_pickle=False)
    doc_model, doc_label = document.get("model"), document.get("label")
    if model and doc_model and model != doc_model:
        raise InputError(f"model: the file says {_shown(doc_model)}, the form {_shown(model)}")
    name = model or doc_model
    if not name or not isinstance(name, str):
        raise InputError("model: a bare vector (.npy or a JSON array) needs the name of the model that made it "
                         f"(this service's: {expected.name!r})")
    check_model(name, dimension, expected)
    return Imported(
        label=clean_label(label or doc_label), model=name, dimension=dimension, embedding=[float(x) for x in vector],
        speech_seconds=_number_or_none(document.get("speech_seconds")),
        files=_count_or_none(document.get("files")),
        # only a JSON true or false: an export from before the field (or a bare vector) is not known
        narrowband=document.get("narrowband") if isinstance(document.get("narrowband"), bool) else None,
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose every key is named once: ``{"label": "A", ..., "label": "B"}`` was
    stored as B (Python's reading keeps the last), while another reader of the same file keeps
    the first; which person a vector is of is not guessed."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InputError(f"voiceprint JSON names {twice[:40]!r} more than once; name each key once")
    return document


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:
        raise InputError("JSON holds an integer too large")
    return int(text)


def _count_or_none(value: Any) -> int | None:
    # how many recordings the vector averages, as the file says: a whole number of at least one
    # (``true`` was stored as 1 file, ``-5`` as -5 files, and shown so)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1_000_000:
        return value
    return None


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None
