"""Job kinds, each declared once.

A :class:`JobKind` says everything the service needs to offer one analysis: its upload fields,
its parameters (a pydantic model, validated once at the edge), its result model and the engine
call that produces it. Everything else is derived from :data:`KINDS`:

* the API's routes: ``POST /jobs/<name>`` (202, a job) and the synchronous ``sync_path`` of the
  original contract (``api/routes/analyses.py``), their form fields and OpenAPI docs;
* the Celery task ``audio.<name>`` that runs it on a worker (``worker/tasks.py``);
* the Python client's upload fields and the CLI's offline and ``submit`` commands (``cli/``);
* the metrics' per-kind series (``api/metrics.py``).

Every audio field ``<name>`` may instead be given by URL as ``<name>_url`` on the job routes
(``FileField.url_name``; fetched by the worker, ``shared/url_input.py``).

Adding a kind (voice identification) is a declaration here, its engine method and a
test. This module imports no torch: the engine reaches ``run`` only as an argument, in workers
and in the offline CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import InputError
from shared.schemas import CompareResponse, DiarizationResponse, EmbeddingResponse
from shared.settings import Settings

ProgressCallback = Callable[[str, float], None]


# --- parameters ---------------------------------------------------------------------------------
class Params(BaseModel):
    """Base of every kind's parameters: unknown names are refused, values are plain JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DiarizeParams(Params):
    num_speakers: int | None = Field(None, ge=1, le=100, description="exact number of speakers (overrides min/max)")
    min_speakers: int | None = Field(None, ge=1, le=100, description="at least this many speakers")
    max_speakers: int | None = Field(None, ge=1, le=100, description="at most this many speakers")
    min_duration: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="drop segments shorter than this (seconds)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> "DiarizeParams":
        if self.min_speakers is not None and self.max_speakers is not None and self.max_speakers < self.min_speakers:
            raise ValueError(f"max_speakers ({self.max_speakers}) is smaller than min_speakers ({self.min_speakers})")
        return self


class EmbeddingParams(Params):
    normalize: bool = Field(True, description="L2-normalise the vector")


_THRESHOLD = (
    "cosine threshold in [-1, 1]; default: calibrated for the active model "
    "(0.25 for the production ECAPA model, as in the original contract)"
)


class CompareParams(Params):
    # omitted -> None, so the worker's engine applies the threshold calibrated for its model:
    # the contract's 0.25 was calibrated for ECAPA and accepts most impostors with CAM++
    threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description=_THRESHOLD)


class CompareEmbeddingParams(CompareParams):
    # filled from the uploaded embedding file, parsed once in the API: the worker gets numbers
    embedding: list[float] = Field(description="the stored embedding, from the uploaded file")


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

    @property
    def audio(self) -> bool:
        return self.parse is None

    @property
    def url_name(self) -> str | None:
        """The form field that gives this audio by URL instead of an upload: ``<name>_url``.

        One rule for every kind (``shared/url_input.py``); None for a non-audio file, which is
        parsed in the API and so always uploaded.
        """
        return f"{self.name}_url" if self.audio else None


class Engine(Protocol):
    """What a kind's ``run`` needs of :class:`engine.core.Engine` (named here, imported nowhere)."""

    def diarize(self, source: Path, **kwargs: Any) -> DiarizationResponse: ...
    def embed(self, source: Path, **kwargs: Any) -> EmbeddingResponse: ...
    def compare(self, first: Path, second: Path, **kwargs: Any) -> CompareResponse: ...
    def compare_embedding(self, source: Path, reference: Any, **kwargs: Any) -> CompareResponse: ...


Runner = Callable[[Engine, Mapping[str, Path], Any, "ProgressCallback | None"], BaseModel]


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
        """Parameters the client sends as form fields (those no upload fills)."""
        filled = {f.into for f in self.files}
        return {name: field for name, field in self.params.model_fields.items() if name not in filled}

    def parse_params(self, values: Mapping[str, Any]) -> Params:
        return validate_params(self.params, values)


def validate_params(model: type[Params], values: Mapping[str, Any]) -> Params:
    """Validate what a caller sent (omitted values are None); a bad value is a 422 naming it."""
    try:
        return model.model_validate({k: v for k, v in values.items() if v is not None})
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

KINDS: dict[str, JobKind] = {k.name: k for k in (DIARIZE, EMBEDDING, COMPARE, COMPARE_EMBEDDING)}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)
# for response models and query parameters: the set of names, as a type
KindName = Literal[KIND_NAMES]  # type: ignore[valid-type]


def get_kind(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"unknown job kind {name!r}; one of {', '.join(KIND_NAMES)}") from None
