"""Speaker diarization with pyannote.audio's own SpeakerDiarization pipeline."""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

from engine import runtime  # noqa: I001  (before torch)

import torch  # noqa: E402

from engine.audio import Audio
from engine.lanes import Lanes
from engine.models import pyannote_env  # noqa: F401
from shared.errors import ProcessingError
from shared.settings import Settings

# (step name, fraction of that step done)
ProgressCallback = Callable[[str, float], None]

# the pipeline's own steps, in order, with their share of the wall time on CPU (measured on
# 10 min of speech at step 0.25 in lanes: segmentation 8.9 s, embeddings 15.1 s, the rest under
# 1 s); used to turn per-step progress into one overall fraction
_STEP_WEIGHTS = {"segmentation": 0.37, "speaker_counting": 0.01, "embeddings": 0.61, "discrete_diarization": 0.01}


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: str


def build_embedded_pipeline(settings: Settings, device: torch.device | None = None):
    """The 3.1 recipe from local weights: segmentation-3.0 + CAM++ + agglomerative clustering,
    with CAM++ run in batches (``engine.pipelines.embedded``)."""
    from pyannote.audio import Model

    from engine.models.campplus import CAMPPlusEmbedding
    from engine.models import bundled
    from engine.pipelines.embedded import EmbeddedSpeakerDiarization, budget_for

    on_gpu = device is not None and device.type == "cuda"
    # CPU: one lane per intra-op thread the operator gave (all cores by default)
    lanes = None if on_gpu else Lanes(settings.torch_threads or torch.get_num_threads())
    pipeline = EmbeddedSpeakerDiarization(
        segmentation=Model.from_pretrained(bundled.segmentation_path()),
        segmentation_step=settings.segmentation_step,
        embedding=CAMPPlusEmbedding.shared(device or torch.device("cpu"), settings.embedding_frozen),
        embedding_exclude_overlap=settings.embedding_exclude_overlap,
        # a GPU takes far larger segmentation batches than the CPU gains from
        segmentation_batch_size=settings.segmentation_batch_size or (256 if lanes is None else 4 * lanes.count),
        budget=budget_for(device),
        lanes=lanes,
        distinct_distance=settings.clustering_distinct_distance,
        join_fragments=settings.clustering_join_fragments,
        reference_concentration=settings.clustering_reference_concentration,
        min_cluster_share=settings.clustering_min_cluster_share,
        telephone_threshold=settings.clustering_telephone_threshold,
        spread_lambda=settings.clustering_spread_lambda,
        spread_reference=settings.clustering_spread_reference,
        embedding_tf32=settings.embedding_tf32,
        centre_sigma=settings.diarization_centre_sigma,
        stray_speaker_s=settings.diarization_min_speaker_s,
    )
    pipeline.instantiate(
        {
            "segmentation": {"min_duration_off": 0.0},
            "clustering": {
                "method": "centroid",
                "min_cluster_size": settings.clustering_min_cluster_size,
                "threshold": settings.clustering_threshold,
            },
        }
    )
    if device is not None:
        pipeline = pipeline.to(device)
    return pipeline


class Diarizer:
    def __init__(self, pipeline, device: torch.device, min_speaker_s: float = 0.0):
        self.pipeline = pipeline.to(device)
        self.device = device
        self.min_speaker_s = min_speaker_s

    def __call__(self, audio: Audio, **kwargs) -> list[Turn]:
        return self.run(audio, **kwargs).turns

    def run(
        self,
        audio: Audio,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        min_duration: float = 0.0,
        exclusive: bool = False,
        progress: ProgressCallback | None = None,
    ) -> "Diarization":
        """The turns, and each reported speaker's non-overlapped speech (for naming it)."""
        kwargs = {}
        if num_speakers is not None:
            kwargs["num_speakers"] = num_speakers
        else:
            if min_speakers is not None:
                kwargs["min_speakers"] = min_speakers
            if max_speakers is not None:
                kwargs["max_speakers"] = max_speakers
        hook = _ProgressHook(progress) if progress else None
        # stdout belongs to the CLI's JSON/RTTM: anything a library prints goes to stderr
        lanes = getattr(self.pipeline, "lanes", None)
        try:
            with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr), (
                lanes.session() if lanes is not None else contextlib.nullcontext()
            ):
                compact = getattr(self.pipeline, "casts_its_input", False)
                output = self.pipeline(audio.as_pyannote(compact=compact), hook=hook, **kwargs)
        finally:
            runtime.release_memory()  # the job's scratch, not kept until the next one
        names: dict[str, str] = {}
        turns = to_turns(
            output, min_speaker_s=self.min_speaker_s, num_speakers=num_speakers, min_speakers=min_speakers,
            min_duration=min_duration, exclusive=exclusive, names=names, duration=audio.duration,
        )
        alone = getattr(output, "exclusive_speaker_diarization", None)
        speech: dict[str, list[tuple[float, float]]] = {name: [] for name in dict.fromkeys(t.speaker for t in turns)}
        if alone is not None:
            for seg, _, label in alone.itertracks(yield_label=True):
                name = names.get(str(label))
                if name in speech:
                    speech[name].append((float(seg.start), float(seg.end)))
        return Diarization(turns, speech)


@dataclass(frozen=True)
class Diarization:
    turns: list[Turn]
    # reported speaker -> its non-overlapped speech regions (seconds), from pyannote's exclusive
    # diarization; empty for a pipeline that gives none
    speech: dict[str, list[tuple[float, float]]]


def to_turns(
    output,
    *,
    min_speaker_s: float,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    min_duration: float = 0.0,
    exclusive: bool = False,
    names: dict[str, str] | None = None,
    duration: float | None = None,
) -> list[Turn]:
    """The pipeline's output as the product reports it: stray speakers dropped (unless the caller
    fixed the count), turns shorter than ``min_duration`` left out, labels by first appearance.

    ``exclusive``: the pipeline's own exclusive diarization instead (pyannote.audio 4's
    ``DiarizeOutput.exclusive_speaker_diarization``: the same clusters reconstructed with the
    per-frame speaker count capped at one, so in overlapped speech only the most active speaker
    is kept). Its speakers and labels are the regular diarization's: a speaker keeps the label
    it has without ``exclusive``, and one heard only in overlap has no exclusive turn.
    ``names`` receives pipeline label -> reported label (voiceprint identification uses it).
    ``duration``: the recording's length; turns end there (pyannote's last frames can reach a
    few tens of ms past it: 2.917 s for a 2.87 s file).
    """
    regular = getattr(output, "speaker_diarization", output)
    if num_speakers is None:
        regular = drop_stray_speakers(regular, min_speaker_s, keep_at_least=min_speakers or 1)
    kept = _tracks(regular, min_duration, duration)
    labels = first_appearance_names(kept)
    if names is not None:
        names.update(labels)
    if not exclusive:
        return relabel_by_first_appearance(kept, labels)
    annotation = getattr(output, "exclusive_speaker_diarization", None)
    if annotation is None:
        # a pipeline run with legacy=True (or an older pyannote) returns the annotation alone
        raise ProcessingError("this diarization pipeline gives no exclusive diarization")
    speakers = set(regular.labels())
    turns = [t for t in _tracks(annotation, min_duration, duration) if t[2] in speakers]
    return relabel_by_first_appearance(turns, labels)


def _tracks(annotation, min_duration: float, duration: float | None = None) -> list[tuple[float, float, str]]:
    # to the millisecond below: turns are reported rounded to 1 ms, never past the recording
    end = float("inf") if duration is None else math.floor(duration * 1000) / 1000
    clipped = ((float(seg.start), min(float(seg.end), end), str(label))
               for seg, _, label in annotation.itertracks(yield_label=True))
    return [(a, b, label) for a, b, label in clipped if b > a and b - a >= min_duration]


def drop_stray_speakers(annotation, min_total_s: float, keep_at_least: int = 1):
    """Remove speakers with less than ``min_total_s`` of speech in the whole recording.

    A small cluster that survives clustering can end up owning a few frames (70 ms on
    pyannote's sample at the tuned threshold): a "speaker" no caller wants to see. The
    smallest go first, and never below ``keep_at_least`` speakers.
    """
    durations = sorted((annotation.label_duration(label), label) for label in annotation.labels())
    stray = [label for total, label in durations if total < min_total_s]
    stray = stray[: max(0, len(durations) - keep_at_least)]
    if not stray:
        return annotation
    return annotation.subset(stray, invert=True)


def first_appearance_names(turns: list[tuple[float, float, str]]) -> dict[str, str]:
    """label -> SPEAKER_00, SPEAKER_01, ... in order of each speaker's first turn."""
    names: dict[str, str] = {}
    for _, _, label in sorted(turns, key=lambda t: (t[0], t[1])):
        names.setdefault(label, f"SPEAKER_{len(names):02d}")
    return names


def relabel_by_first_appearance(
    turns: list[tuple[float, float, str]], names: dict[str, str] | None = None
) -> list[Turn]:
    """SPEAKER_00, SPEAKER_01, ... in order of each speaker's first turn (or as ``names`` says,
    new labels numbered on from there)."""
    turns = sorted(turns, key=lambda t: (t[0], t[1]))
    names = dict(names or {})
    out = []
    for start, end, label in turns:
        name = names.setdefault(label, f"SPEAKER_{len(names):02d}")
        out.append(Turn(round(start, 3), round(end, 3), name))
    return out


class _ProgressHook:
    """Adapts pyannote's ``hook(step, artifact, total=, completed=)`` to one overall fraction."""

    def __init__(self, callback: ProgressCallback):
        self.callback = callback
        self.last = -1.0

    def __call__(self, step_name, step_artifact, file=None, total=None, completed=None):
        done_before = 0.0
        for name, weight in _STEP_WEIGHTS.items():
            if name == step_name:
                # pyannote's inference reports ``completed`` as the batches' starts plus a batch
                # size, uncapped: with a GPU's batch of 256 chunks, a recording of fewer chunks
                # said 100 % once segmentation was done, and the embeddings' progress, below
                # that, was never reported
                frac = min(1.0, completed / total) if total and completed is not None else 1.0
                overall = min(1.0, done_before + weight * frac)
                # report in 1 % steps: a callback may write to Redis
                if overall - self.last >= 0.01 or overall >= 1.0:
                    self.last = overall
                    self.callback(step_name, overall)
                return
            done_before += weight
