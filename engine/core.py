"""The analysis engine: one object per process that owns the models and runs the pipelines.

The worker, the CLI, the benchmarks and the tests all call this; none of it knows about HTTP or
Celery. Models are loaded lazily, once, and kept for the life of the process.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from engine import runtime  # noqa: F401  (before torch is imported)

import torch  # noqa: E402

from engine.audio import Audio, AudioSource, load_audio
from engine.models.loading import device_label, resolve_device
from engine.pipelines.diarization import Diarizer, ProgressCallback, Turn
from engine.pipelines.embedding import SpeakerEmbedder, cosine_similarity, l2_normalize
from engine.profiles import PROFILES, ModelProfile
from shared.errors import InputError
from shared.kinds import CompareParams, DiarizeParams, Params, validate_params
from shared.schemas import CompareResponse, DiarizationResponse, DiarizationSegment, EmbeddingResponse
from shared.settings import Settings, get_settings


def _check(params: type[Params], **values: object) -> Params:
    # the engine is an edge too (CLI, benches, tests): the same models the API validates with
    return validate_params(params, values)


class Engine:
    def __init__(self, settings: Settings | None = None, device: str | None = None,
                 profile: ModelProfile | None = None):
        self.settings = settings or get_settings()
        self.device = resolve_device(device or self.settings.device)
        self.profile = profile or PROFILES[self.settings.model_profile]
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.device.type == "cuda" and self.settings.gpu_memory_fraction is not None:
            # several workers on one card: each stays inside its share (an allocation beyond
            # it fails that job with an out-of-memory error instead of the neighbour's)
            torch.cuda.set_per_process_memory_fraction(self.settings.gpu_memory_fraction, self.device)
        self._diarizer: Diarizer | None = None
        self._embedder: SpeakerEmbedder | None = None
        self._lock = threading.Lock()

    # --- models ----------------------------------------------------------------------------
    @property
    def model_device(self) -> str:
        return device_label(self.device)

    @property
    def default_threshold(self) -> float:
        if self.settings.verification_threshold is not None:
            return self.settings.verification_threshold
        return self.profile.default_threshold

    @property
    def diarization_loaded(self) -> bool:
        return self._diarizer is not None

    @property
    def verification_loaded(self) -> bool:
        return self._embedder is not None

    @property
    def diarizer(self) -> Diarizer:
        with self._lock:
            if self._diarizer is None:
                self._diarizer = Diarizer(
                    self._load_diarization_pipeline(), self.device, self.settings.diarization_min_speaker_s
                )
            return self._diarizer

    @property
    def embedder(self) -> SpeakerEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            return self._embedder

    def load_models(self) -> "Engine":
        """Load everything now (worker start-up), rather than on the first job."""
        _ = self.diarizer, self.embedder
        return self

    def _load_diarization_pipeline(self):
        return self.profile.load_diarization(self.settings, self.device)

    def _load_embedder(self) -> SpeakerEmbedder:
        return self.profile.load_embedder(self.settings, self.device)

    # --- audio -----------------------------------------------------------------------------
    def load(self, source: AudioSource | Audio) -> Audio:
        if isinstance(source, Audio):
            return source
        return load_audio(
            source, max_duration=self.settings.max_audio_seconds, min_duration=self.settings.min_audio_seconds
        )

    # --- tasks -----------------------------------------------------------------------------
    def diarize(
        self,
        source: AudioSource | Audio,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        min_duration: float | None = None,
        exclusive: bool = False,
        progress: ProgressCallback | None = None,
    ) -> DiarizationResponse:
        """Who spoke when; ``exclusive``: one speaker at a time (no overlapping turns)."""
        _check(DiarizeParams, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers,
               min_duration=min_duration, exclusive=exclusive)
        started = time.perf_counter()
        audio = self.load(source)
        turns: list[Turn] = self.diarizer(
            audio,
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
            min_duration=min_duration or 0.0,
            exclusive=exclusive,
            progress=progress,
        )
        return DiarizationResponse(
            diarization_results=[DiarizationSegment(start=t.start, end=t.end, speaker=t.speaker) for t in turns],
            segments_count=len(turns),
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(audio.duration, 4),
            model_device=self.model_device,
        )

    def embedding_vector(self, source: AudioSource | Audio) -> tuple[np.ndarray, Audio]:
        audio = self.load(source)
        return self.embedder.embed(audio), audio

    def embed(self, source: AudioSource | Audio, *, normalize: bool = True) -> EmbeddingResponse:
        started = time.perf_counter()
        vector, audio = self.embedding_vector(source)
        if normalize:
            vector = l2_normalize(vector)
        return EmbeddingResponse(
            embedding=[float(x) for x in vector],
            normalized=normalize,
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(audio.duration, 4),
            model_device=self.model_device,
        )

    def compare(
        self, first: AudioSource | Audio, second: AudioSource | Audio, *, threshold: float | None = None
    ) -> CompareResponse:
        threshold = self.default_threshold if threshold is None else threshold
        _check(CompareParams, threshold=threshold)
        started = time.perf_counter()
        a, audio_a = self.embedding_vector(first)
        b, audio_b = self.embedding_vector(second)
        return self._decision(cosine_similarity(a, b), threshold, started, audio_a.duration + audio_b.duration)

    def compare_embedding(
        self, source: AudioSource | Audio, reference: np.ndarray, *, threshold: float | None = None
    ) -> CompareResponse:
        threshold = self.default_threshold if threshold is None else threshold
        _check(CompareParams, threshold=threshold)
        dim = self.settings.embedding_dimension
        reference = np.asarray(reference, dtype=np.float64).reshape(-1)
        if reference.shape != (dim,):
            raise InputError(f"stored embedding has {reference.size} values; {dim} are expected")
        if not np.all(np.isfinite(reference)) or not np.any(reference):
            raise InputError("stored embedding must be finite and not all zero")
        started = time.perf_counter()
        vector, audio = self.embedding_vector(source)
        return self._decision(cosine_similarity(vector, reference), threshold, started, audio.duration)

    def _decision(self, score: float, threshold: float, started: float, duration: float) -> CompareResponse:
        return CompareResponse(
            similarity_score=round(score, 6),
            same_speaker=score >= threshold,
            threshold=threshold,
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(duration, 4),
            model_device=self.model_device,
        )


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine (one per worker process)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine
