"""Job kinds, each declared once.

A :class:`JobKind` says everything the service needs to offer one analysis: its upload fields,
its parameters (a pydantic model, validated once at the edge), its result model and the engine
call that produces it. Everything else is derived from :data:`KINDS`:

* the API's routes: ``POST /jobs/<name>`` (202, a job) and the synchronous ``sync_path`` of the
  original contract (``api/routes/analyses.py``), their form fields and OpenAPI docs;
* the Celery task ``audio.<name>`` that runs it on a worker (``worker/tasks.py``);
* the Python client's upload fields and the CLI's offline and ``submit`` commands (``cli/``);
* the formats its result is offered in (``GET /jobs/{id}/result?format=``, the CLI's
  ``--format``): JSON for every kind, plus the kind's ``renderers`` (``shared/formats.py``);
* the metrics' per-kind series (``api/metrics.py``).

Every single audio field ``<name>`` may instead be given by URL as ``<name>_url`` on the job routes
(``FileField.url_name``; fetched by the worker, ``shared/url_input.py``); a multiple-file field
(``enroll``'s ``files``) is uploads only.

Adding a kind (voice identification) is a declaration here, its engine method and a
test. An upload field may take several files (``FileField.max_count``: ``enroll``); a
:class:`Lookup` is a form field the API resolves into a parameter (``voiceprints``: ids in, the
stored vectors out), so the worker never resolves ids, checks tenancy or sees a voiceprint
deleted after submit. A lookup ``kept_apart`` (voiceprints: 4.3 KB each, 200 a job) has its
resolved value stored once by content, shared by every job naming it, and the job record
carries only its digest; the worker loads it by digest (``shared/jobs.py``
``JobStore.keep_apart``). This module imports no torch: the engine reaches ``run`` only as an
argument, in workers and in the offline CLI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Callable, Literal, Mapping, Protocol, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from shared.errors import InputError
from shared.formats import DIARIZATION_RENDERERS
from shared.schemas import CompareResponse, DiarizationResponse, EmbeddingResponse, EnrollResponse, IdentifyResponse
from shared.settings import Settings

ProgressCallback = Callable[[str, float], None]


# --- parameters ---------------------------------------------------------------------------------
# A number sent as text (a form field, a query parameter) in the plain form every client writes:
# ASCII digits, an optional leading minus, for a number a decimal point and an exponent. Python's
# int() and float(), and so pydantic's lax mode, also take digit-group underscores, a leading "+"
# and surrounding spaces: ``num_speakers=1_0`` ran with 10 speakers, ``min_duration=1_0.5`` with
# 10.5 s. A value written so is more likely a typo or a misread template than a number meant.
_PLAIN_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)


def number_type(annotation: Any) -> type | None:
    """``int`` or ``float`` for a parameter that takes one (also as ``X | None``), else None;
    ``bool`` (an ``int`` to Python) is neither."""
    if annotation in (int, float):
        return annotation
    if get_origin(annotation) in (Union, UnionType):
        found = {number_type(arg) for arg in get_args(annotation) if arg is not type(None)}
        if len(found) == 1:
            return found.pop()
    return None


def loose_number(name: str, text: str, kind: type) -> str | None:
    """The 422 detail for ``text`` sent for number parameter ``name`` if it is not written as
    plain digits (:data:`_PLAIN_INTEGER`, :data:`_PLAIN_NUMBER`), else None. An empty value is
    the field left out, and is left to the caller."""
    if text == "" or (_PLAIN_INTEGER if kind is int else _PLAIN_NUMBER).fullmatch(text):
        return None
    shown = text if len(text) <= 40 else text[:40] + "…"
    what = "an integer (digits, a leading - for a negative one" if kind is int \
        else "a number (digits, a leading - for a negative one, a decimal point, an exponent such as 1e-3"
    return (f"{name}: {shown!r} is not {what}); send it without spaces, '+', digit-group '_' "
            "or other characters")


class Params(BaseModel):
    """Base of every kind's parameters: unknown names are refused, values are plain JSON, and a
    number given as text must be written plainly (:func:`loose_number`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, value in data.items():
                field_info = cls.model_fields.get(name)
                kind = number_type(field_info.annotation) if field_info is not None else None
                if kind is not None and isinstance(value, str) and (problem := loose_number(name, value, kind)):
                    raise ValueError(problem)
        return data


class VoiceprintRef(Params):
    """A stored voiceprint as a job carries it: resolved from its id in the API."""

    id: str
    label: str
    model: str = Field(description="embedding model the vector comes from (checked against the worker's)")
    embedding: list[float] = Field(min_length=1, max_length=4096)
    # enrolled from telephone recordings only (8 kHz or less): a telephone recording is matched
    # against it at the profile's narrowband identification threshold (Engine.identification_thresholds).
    # Sent only when true, so a job naming other voiceprints carries what it did before this field
    narrowband: bool = Field(False, description="enrolled from telephone recordings (8 kHz or less) only")

    @field_validator("embedding")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        if not all(v == v and abs(v) != float("inf") for v in value) or not any(value):
            raise ValueError("must be finite numbers, not all zero")
        return value


_VOICEPRINTS = "voiceprint ids separated by commas, or 'all' for every voiceprint of this API key"
_ID_THRESHOLD = ("cosine threshold in [-1, 1] for naming a speaker; default: calibrated for the active model "
                 "(docs/models.md), and for a telephone recording (8 kHz or less) against voiceprints enrolled "
                 "from telephone recordings, the model's narrowband identification threshold")


class DiarizeParams(Params):
    num_speakers: int | None = Field(None, ge=1, le=100, description="exact number of speakers (overrides min/max)")
    min_speakers: int | None = Field(None, ge=1, le=100, description="at least this many speakers")
    max_speakers: int | None = Field(None, ge=1, le=100, description="at most this many speakers")
    min_duration: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="drop segments shorter than this (seconds); at most the longest audio the service takes "
        "(AUDIO_ANALYSIS_MAX_AUDIO_SECONDS)",
    )
    exclusive: bool = Field(
        False,
        description="one speaker at a time (pyannote's exclusive diarization: in overlapped speech only the "
        "most active speaker is kept), for aligning with a transcript",
    )
    # filled from the ``voiceprints`` form field (ids), resolved in the API, kept apart from the
    # job record (Lookup.kept_apart) and loaded back by the worker
    voiceprints: list[VoiceprintRef] | None = Field(None, description="voiceprints to name the speakers with")
    identification_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description=_ID_THRESHOLD
    )

    @field_validator("min_duration")
    @classmethod
    def _within_audio(cls, value: float | None, info: ValidationInfo) -> float | None:
        # 1e20 s was taken and every segment dropped: a value past the longest audio the service
        # takes can drop nothing but everything, so it is a mistake (a unit, a typo) to say so.
        # Bounded where the settings are given (the API's edge, validate_params); a worker reads
        # back what its API checked, under a limit it may not share
        settings = (info.context or {}).get("settings")
        if value is not None and settings is not None and value > settings.max_audio_seconds:
            raise ValueError(f"{value:g} s is longer than the longest audio this service takes "
                             f"({settings.max_audio_seconds:g} s); it would drop every segment")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "DiarizeParams":
        if self.min_speakers is not None and self.max_speakers is not None and self.max_speakers < self.min_speakers:
            raise ValueError(f"max_speakers ({self.max_speakers}) is smaller than min_speakers ({self.min_speakers})")
        # num_speakers overrides the bounds: num_speakers=2 with min_speakers=5 ran with 2 and
        # the 5 dropped without a word. Bounds that agree with it (2 within 1..3) are harmless
        if self.num_speakers is not None:
            for name, bound, outside in (("min_speakers", self.min_speakers, lambda b: self.num_speakers < b),
                                         ("max_speakers", self.max_speakers, lambda b: self.num_speakers > b)):
                if bound is not None and outside(bound):
                    raise ValueError(f"num_speakers: {self.num_speakers} is outside {name} ({bound}); num_speakers "
                                     "is the exact count and overrides the bounds, so send one or the other")
        return self

    @model_validator(mode="after")
    def _threshold_names_someone(self, info: ValidationInfo) -> "DiarizeParams":
        # a threshold for naming speakers with nobody to name them after was dropped without a
        # word: a client (or CLI user) that forgot or misspelt voiceprints got speakers never
        # named and no sign why. Checked where the request is read (settings given: the API, the
        # offline CLI); a worker reads back a record its API checked, voiceprints kept apart
        if (info.context or {}).get("settings") is not None and self.identification_threshold is not None \
                and not self.voiceprints:
            raise ValueError("identification_threshold: given without voiceprints; it says how sure a match must "
                             "be to name a speaker, so give voiceprints too, or leave it out")
        return self


class EmbeddingParams(Params):
    normalize: bool = Field(True, description="L2-normalise the vector")


_THRESHOLD = (
    "cosine threshold in [-1, 1]; default: calibrated for the active model "
    "(0.45 for the embedded CAM++ model, 0.55 when both recordings are telephone-band, 8 kHz or less; "
    "0.25 for the production ECAPA model, as in the original contract)"
)


class CompareParams(Params):
    # omitted -> None, so the worker's engine applies the threshold calibrated for its model:
    # the contract's 0.25 was calibrated for ECAPA and accepts most impostors with CAM++
    threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description=_THRESHOLD)


class CompareEmbeddingParams(CompareParams):
    # filled from the uploaded embedding file, parsed once in the API: the worker gets numbers
    embedding: list[float] = Field(description="the stored embedding, from the uploaded file")


class EnrollParams(Params):
    label: str = Field(min_length=1, max_length=200, description="the person's name, as jobs will report it")

    @field_validator("label")
    @classmethod
    def _clean(cls, value: str) -> str:
        # the voiceprint's own rule, here at the edge: POST /voiceprints refused a label with a
        # line break only after a worker had embedded every file
        from shared.voiceprints import clean_label

        try:
            return clean_label(value)
        except InputError as exc:
            raise ValueError(exc.detail.removeprefix("label: ")) from None


class IdentifyParams(Params):
    voiceprints: list[VoiceprintRef] = Field(min_length=1, description="voiceprints to compare with")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description=_ID_THRESHOLD)


# --- uploads ------------------------------------------------------------------------------------
def _read_embedding(data: bytes, filename: str | None, settings: Settings) -> list[float]:
    from shared.embedding_file import load_embedding  # numpy: loaded when a file comes in

    return [float(x) for x in load_embedding(data, filename, dimension=settings.embedding_dimension)]


@dataclass(frozen=True)
class FileField:
    """One upload of a kind. Audio is stored for the worker and its header checked at submit;
    any other file is ``parse``-d in the API into the parameter ``into`` and never stored."""

    name: str
    description: str = "audio file (any common format)"
    parse: Callable[[bytes, str | None, Settings], Any] | None = None
    into: str | None = None
    max_bytes: int = 1024 * 1024
    # more than 1: the field takes one or more files (audio only), stored as <name>.0, <name>.1...
    # and given to the kind's ``run`` as a list of paths
    max_count: int = 1

    @property
    def audio(self) -> bool:
        return self.parse is None

    @property
    def url_name(self) -> str | None:
        """The form field that gives this audio by URL instead of an upload: ``<name>_url``.

        One rule for every kind (``shared/url_input.py``); None for a non-audio file, which is
        parsed in the API and so always uploaded, and for a multiple-file field (uploads only).
        """
        return f"{self.name}_url" if self.audio and not self.multiple else None

    @property
    def multiple(self) -> bool:
        return self.max_count > 1


class Edge(Protocol):
    """What a :class:`Lookup` may use in the API: the caller and the service's stores."""

    owner: str | None
    settings: Settings

    @property
    def voiceprints(self) -> Any: ...


@dataclass(frozen=True)
class Lookup:
    """A form field whose value names stored things; the API resolves it into parameter ``into``
    (``resolve``), the offline CLI from files (``resolve_offline``). The worker sees only the
    resolved value, validated by the kind's model like any parameter."""

    name: str
    into: str
    description: str
    resolve: Callable[[str, Edge], Any]
    resolve_offline: Callable[[str, Settings], Any]
    # the resolved value (a list) is stored once by content instead of in each job record, which
    # carries its digest (shared/jobs.py JobStore.keep_apart; the worker loads it back): 200
    # voiceprints are 0.86 MB, and a batch of 1000 files copied them into 1000 records
    kept_apart: bool = False

    @property
    def field(self) -> FieldInfo:
        return FieldInfo(annotation=str, default=None, description=self.description)

    def field_filling(self, params: type[BaseModel]) -> FieldInfo:
        """The form field, required where the parameter it fills is required (identify's
        ``voiceprints``, not diarize's): the OpenAPI document and the CLI's help say so."""
        if params.model_fields[self.into].is_required():
            return FieldInfo(annotation=str, description=self.description)
        return self.field


def _resolve_voiceprints(value: str, edge: Edge) -> list[dict[str, Any]]:
    from shared.voiceprints import embedding_model

    return edge.voiceprints.resolve(value, edge.owner, embedding_model(edge.settings),
                                    edge.settings.voiceprints_max_per_job)


def _voiceprint_files(value: str, settings: Settings) -> list[dict[str, Any]]:
    """Offline (CLI): comma-separated voiceprint JSON files (an export, or the ``enroll`` output)."""
    from shared.voiceprints import embedding_model, parse_import

    refs = []
    for i, name in enumerate(p.strip() for p in value.split(",") if p.strip()):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"voiceprints: {name} is not a file (offline, voiceprints are JSON files)")
        vp = parse_import(path.read_bytes(), path.name, label=None, model=None, expected=embedding_model(settings))
        refs.append({"id": path.stem or f"file{i}", "label": vp.label, "model": vp.model, "embedding": vp.embedding,
                     **({"narrowband": True} if vp.narrowband else {})})
    if not refs:
        raise InputError("voiceprints: name at least one voiceprint file")
    return refs


VOICEPRINTS = Lookup(
    "voiceprints", "voiceprints",
    _VOICEPRINTS + " (the offline CLI: voiceprint JSON files, from `enroll` or an export)",
    _resolve_voiceprints, _voiceprint_files, kept_apart=True,
)


class Engine(Protocol):
    """What a kind's ``run`` needs of :class:`engine.core.Engine` (named here, imported nowhere)."""

    def diarize(self, source: Path, **kwargs: Any) -> DiarizationResponse: ...
    def enroll(self, sources: list[Path], **kwargs: Any) -> EnrollResponse: ...
    def identify(self, source: Path, voiceprints: Any, **kwargs: Any) -> IdentifyResponse: ...
    def embed(self, source: Path, **kwargs: Any) -> EmbeddingResponse: ...
    def compare(self, first: Path, second: Path, **kwargs: Any) -> CompareResponse: ...
    def compare_embedding(self, source: Path, reference: Any, **kwargs: Any) -> CompareResponse: ...


# a multiple-file field's value is a list of paths
Runner = Callable[[Engine, Mapping[str, Any], Any, "ProgressCallback | None"], BaseModel]
# (result body, uri: the audio's name) -> the result as text in one format
Renderer = Callable[[Mapping[str, Any], str], str]


@dataclass(frozen=True)
class JobKind:
    name: str
    summary: str
    files: tuple[FileField, ...]
    params: type[Params]
    result: type[BaseModel]
    # (engine, {audio field: local path}, validated params, progress) -> result
    run: Runner
    # the route of the original synchronous contract (None: asynchronous only)
    sync_path: str | None = None
    # offered by POST /jobs/batch (one job per file): kinds with a single audio upload
    batch: bool = False
    # formats besides JSON its result renders to (shared/formats.py)
    renderers: Mapping[str, Renderer] = field(default_factory=dict, hash=False)
    # form fields the API resolves into parameters (voiceprint ids -> vectors)
    lookups: tuple[Lookup, ...] = ()

    @property
    def task_name(self) -> str:
        return f"audio.{self.name}"

    @property
    def audio_files(self) -> tuple[FileField, ...]:
        return tuple(f for f in self.files if f.audio)

    @property
    def url_fields(self) -> dict[str, FileField]:
        """``<name>_url`` -> the audio field it stands for."""
        return {f.url_name: f for f in self.audio_files if f.url_name}

    @property
    def form_fields(self) -> dict[str, Any]:
        """Parameters the client sends as form fields (those no upload fills); each one
        ``is_required()`` where the kind cannot run without it (enroll's ``label``, identify's
        ``voiceprints``)."""
        filled = {f.into for f in self.files} | {lookup.into for lookup in self.lookups}
        fields = {name: field for name, field in self.params.model_fields.items() if name not in filled}
        return {**fields, **{lookup.name: lookup.field_filling(self.params) for lookup in self.lookups}}

    @property
    def kept_apart(self) -> tuple[str, ...]:
        """Parameters whose value the job record carries as a digest (``Lookup.kept_apart``)."""
        return tuple(lookup.into for lookup in self.lookups if lookup.kept_apart)

    def parse_params(self, values: Mapping[str, Any], settings: Settings | None = None) -> Params:
        return validate_params(self.params, values, settings=settings)

    @property
    def formats(self) -> tuple[str, ...]:
        return ("json", *self.renderers)

    def check_format(self, name: str) -> str:
        """``name`` if this kind's result is offered in it; a 422 naming the ones it is offered in."""
        if name not in self.formats:
            raise InputError(f"format {name!r} is not offered for {self.name} results; one of {', '.join(self.formats)}")
        return name

    def render(self, body: Mapping[str, Any], name: str, *, uri: str = "audio") -> str:
        """The result body as text in format ``name`` (JSON: indented, as the CLI prints it)."""
        if self.check_format(name) == "json":
            return json.dumps(body, indent=2) + "\n"
        return self.renderers[name](body, uri)


def validate_params(model: type[Params], values: Mapping[str, Any], *, settings: Settings | None = None) -> Params:
    """Validate what a caller sent (omitted values are None); a bad value is a 422 naming it.
    With ``settings``, values are also held to the service's limits (``min_duration`` to
    ``max_audio_seconds``)."""
    try:
        return model.model_validate({k: v for k, v in values.items() if v is not None},
                                    context={"settings": settings} if settings is not None else None)
    except ValidationError as exc:
        raise InputError(_message(exc)) from None


def _message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid parameters"


# --- the kinds ----------------------------------------------------------------------------------
DIARIZE = JobKind(
    name="diarize",
    summary="Who spoke when",
    files=(FileField("file"),),
    params=DiarizeParams,
    result=DiarizationResponse,
    run=lambda engine, files, p, progress: engine.diarize(files["file"], **p.model_dump(), progress=progress),
    sync_path="/diarize",
    batch=True,
    renderers=DIARIZATION_RENDERERS,
    lookups=(VOICEPRINTS,),
)

EMBEDDING = JobKind(
    name="embedding",
    summary="192-dim speaker embedding",
    files=(FileField("file"),),
    params=EmbeddingParams,
    result=EmbeddingResponse,
    run=lambda engine, files, p, progress: engine.embed(files["file"], normalize=p.normalize),
    sync_path="/embedding",
    batch=True,
)

COMPARE = JobKind(
    name="compare",
    summary="Are two recordings the same speaker",
    files=(FileField("file1", "first recording"), FileField("file2", "second recording")),
    params=CompareParams,
    result=CompareResponse,
    run=lambda engine, files, p, progress: engine.compare(files["file1"], files["file2"], threshold=p.threshold),
    sync_path="/compare",
)

COMPARE_EMBEDDING = JobKind(
    name="compare_embedding",
    summary="Compare a recording with a stored embedding",
    files=(
        FileField("audio", "recording to check"),
        FileField(
            "embedding", "stored embedding: .npy, JSON array or a (safely read) pickle",
            parse=_read_embedding, into="embedding",
        ),
    ),
    params=CompareEmbeddingParams,
    result=CompareResponse,
    run=lambda engine, files, p, progress: engine.compare_embedding(
        files["audio"], p.embedding, threshold=p.threshold
    ),
    sync_path="/compare_embedding",
)

ENROLL = JobKind(
    name="enroll",
    summary="Voiceprint of one person from one or more recordings",
    files=(FileField("files", "one or more recordings of the person (any common format)", max_count=20),),
    params=EnrollParams,
    result=EnrollResponse,
    run=lambda engine, files, p, progress: engine.enroll(files["files"], label=p.label),
    # POST /voiceprints runs it and stores the result (api/routes/voiceprints.py)
)

IDENTIFY = JobKind(
    name="identify",
    summary="Whose voice is this, among stored voiceprints",
    files=(FileField("file", "recording of one person"),),
    params=IdentifyParams,
    result=IdentifyResponse,
    run=lambda engine, files, p, progress: engine.identify(files["file"], p.voiceprints, threshold=p.threshold),
    sync_path="/identify",
    batch=True,
    lookups=(VOICEPRINTS,),
)

KINDS: dict[str, JobKind] = {
    k.name: k for k in (DIARIZE, EMBEDDING, COMPARE, COMPARE_EMBEDDING, ENROLL, IDENTIFY)
}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)
# for response models and query parameters: the set of names, as a type
KindName = Literal[KIND_NAMES]  # type: ignore[valid-type]


def get_kind(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"unknown job kind {name!r}; one of {', '.join(KIND_NAMES)}") from None
