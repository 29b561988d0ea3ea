"""Speaker embeddings and verification scores."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from engine.audio import SAMPLE_RATE, Audio

# Long inputs are embedded window by window and averaged, so memory stays flat with duration.
WINDOW_S = 30.0


class SpeakerEmbedder(Protocol):
    dimension: int

    def embed(self, audio: Audio) -> np.ndarray:
        """One raw (not normalised) embedding for the whole recording."""


def _windows(samples: np.ndarray, window: int) -> list[np.ndarray]:
    if len(samples) <= window * 1.5:
        return [samples]
    starts = range(0, len(samples), window)
    # fold a short tail into the previous window rather than embedding a scrap on its own
    pieces = [samples[s : s + window] for s in starts]
    if len(pieces) > 1 and len(pieces[-1]) < window // 2:
        pieces[-2] = np.concatenate([pieces[-2], pieces.pop()])
    return pieces


class CAMPPlusEmbedder:
    """Embedded default: CAM++ (192-dim)."""

    def __init__(self, model, device: torch.device):
        self.model = model.to(device).eval().prepare(device)
        self.device = device
        self.dimension = int(model.dimension)

    @torch.inference_mode()
    def embed(self, audio: Audio) -> np.ndarray:
        pieces = _windows(audio.samples, int(WINDOW_S * SAMPLE_RATE))
        vectors, weights = [], []
        for piece in pieces:
            wav = torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32)).to(self.device)[None, None]
            vectors.append(self.model(wav)[0].float().cpu().numpy())
            weights.append(len(piece))
        return _combine(vectors, weights)


class ECAPAEmbedder:
    """Production: SpeechBrain ECAPA-TDNN (192-dim)."""

    def __init__(self, classifier, device: torch.device):
        # the classifier was built on ``device`` (run_opts); moving it again with .to() would
        # leave InputNormalization's statistics behind, as they are plain tensors, not buffers
        if str(classifier.device) != str(device):
            raise ValueError(f"ECAPA classifier is on {classifier.device}, expected {device}")
        self.classifier = classifier.eval()
        self.device = device
        # read from the checkpoint's last layer so a different ECAPA export cannot pass as 192-dim
        self.dimension = int(classifier.mods.embedding_model.fc.conv.out_channels)

    @torch.inference_mode()
    def embed(self, audio: Audio) -> np.ndarray:
        pieces = _windows(audio.samples, int(WINDOW_S * SAMPLE_RATE))
        vectors, weights = [], []
        for piece in pieces:
            wav = torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32))[None].to(self.device)
            # normalize=False: raw embedding; callers L2-normalise (the ECAPA recipe's own scoring)
            vectors.append(self.classifier.encode_batch(wav, normalize=False).reshape(-1).float().cpu().numpy())
            weights.append(len(piece))
        return _combine(vectors, weights)


def _combine(vectors: list[np.ndarray], weights: list[int]) -> np.ndarray:
    if len(vectors) == 1:
        return vectors[0].astype(np.float32)
    # average directions, weighted by duration: a window's scale carries no speaker information
    unit = [v / max(np.linalg.norm(v), 1e-12) for v in vectors]
    return np.average(np.stack(unit), axis=0, weights=np.asarray(weights, dtype=np.float64)).astype(np.float32)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
