"""One embedding per (chunk, local speaker), computed in batches from one fbank per region.

pyannote's diarization pipeline asks for an embedding of every local speaker of every sliding
chunk. Fed one (chunk, speaker) at a time, CAM++ costs thousands of small calls per hour of audio,
each recomputing the fbank of its whole chunk. Here instead:

1. **fbank once.** Kaldi frames are local (``CAMPPlusEmbedding.fbank_frames``), so the fbank of a
   chunk is a slice of the fbank of the recording. It is computed once per group of chunks, on
   the model's device, which bounds memory whatever the recording's length.
2. **At most 0.8 of a step per (chunk, speaker)**, the speaker's frames nearest the chunk's middle
   (2 s at the default step of 2.5 s, never under ``MIN_ROW_FRAMES``). Chunks overlap (a 10 s
   window every 2.5 s at step 0.25), so embedding each local speaker over its whole chunk would
   embed every second of speech four times; the frames nearest the middle cover the speaker's
   share of the chunk's own centre (centres tile the recording), where the segmentation model
   has context on both sides. Measured (docs/models.md): at step 0.5, 5 s rows gave DER 0.184
   on a 10 min meeting against 0.233 for whole chunks; at step 0.25, 2.5 s rows embed about as
   many frames as step 0.5 did and took the four-talker conversations from 0.259 to 0.18,
   where 5 s rows at step 0.25 (twice the frames) reached only 0.21; 2 s rows then took them
   to 0.167, the many-talker ones from 0.275 to 0.262 and the 10 min meeting from 0.157 to
   0.128 (1.6 s rows lost it all again).
3. **Overlap left out**, as pyannote's ``embedding_exclude_overlap``: frames where another local
   speaker is active are dropped when enough clean frames remain.
4. **Batched by length.** CAM++ pools over its whole input in every CAM layer, so rows cannot be
   zero-padded. Rows are sorted by length and batched with others at most 10 % longer, each
   cropped (around its middle) to the shortest in its batch.
5. **Same speech embedded once.** A short turn lies wholly in the middle of every chunk that holds
   it, so those chunks select the same frames for it; a row whose frames are 90 % those of a row
   of an overlapping chunk (Jaccard index) takes that row's embedding. 11 % fewer frames through
   CAM++ on a 10 min meeting (embeddings 12.9 -> 11.5 s); tuning sets' DER unchanged
   (conversations 0.183 -> 0.181, many-talker 0.274 -> 0.275, 10 min meeting 0.157).

Rows with fewer than ``MIN_FRAMES`` frames get NaN, which pyannote's clustering leaves out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine import runtime
from engine.lanes import Lanes
from engine.models.campplus import FRAME_LENGTH, FRAME_SHIFT, MIN_FRAMES, CAMPPlusEmbedding

log = logging.getLogger(__name__)

# a speaker's embedding in a chunk uses at most this share of a step's worth of its frames (10 ms
# each) there, those nearest the chunk's middle, and never fewer than MIN_ROW_FRAMES (shorter
# rows embed worse). Swept at step 0.25 (docs/models.md): 1.6 s rows, 1.8, 2.0, 2.25 and 2.5 s
# gave the four-talker conversations 0.190, 0.159, 0.167, 0.167, 0.181 and the many-talker ones
# 0.301, 0.270, 0.262, 0.269, 0.275
ROW_STEP_SHARE = 0.8
MIN_ROW_FRAMES = 200
# the longest row in a batch is at most this much longer than the shortest (which all are cut to)
BUCKET_RATIO = 1.1
# a row whose frames (in the recording) are nearly those of a row already embedded in an
# overlapping chunk takes that row's embedding (Jaccard index of the two frame sets); None: never
SAME_ROW_JACCARD: float | None = 0.9


@dataclass(frozen=True)
class EmbeddingBudget:
    """How much work one call may hold at once (device memory is the limit)."""

    # fbank frames per CAM++ call: CAM++'s first 2-D layers hold 32 x 80 floats per frame, so
    # 32k frames took 1 GB+ of activations on the CPU. On one thread (a lane, engine/lanes.py)
    # the heap a call leaves behind grows with the batch (about 100 MB per lane at 2k frames,
    # 200 MB at 4k, on top of the live activations), while the time per frame hardly moves
    # (2k: the hour 5 % slower than 4k, 125 MB lower at its peak; docs/models.md)
    batch_frames: int = 2_000
    group_chunks: int = 128  # chunks whose fbank is held at once


def select_frames(
    binary: np.ndarray,
    chunk_frames: int,
    exclude_overlap: bool,
    min_clean_frames: int,
    row_frames: int,
) -> list[tuple[int, int, np.ndarray]]:
    """Which fbank frames (relative to its chunk) embed each (chunk, speaker).

    ``binary`` is the (chunks, segmentation frames, speakers) binarized segmentation. Returns
    ``(chunk, speaker, frame indices)`` for the rows to embed, each at most ``row_frames`` long.
    """
    num_chunks, seg_frames, num_speakers = binary.shape
    # segmentation frame of each fbank frame: nearest, as torch's interpolate(mode="nearest")
    index = np.arange(chunk_frames) * seg_frames // chunk_frames
    masks = np.nan_to_num(binary[:, index, :], nan=0.0) > 0.5  # (chunks, frames, speakers)
    if exclude_overlap:
        clean = masks & (masks.sum(axis=2, keepdims=True) < 2)
        enough = clean.sum(axis=1, keepdims=True) > min_clean_frames
        masks = np.where(enough, clean, masks)
    middle = (chunk_frames - 1) / 2
    rows = []
    for c in range(num_chunks):
        for s in range(num_speakers):
            frames = np.flatnonzero(masks[c, :, s])
            if frames.size < MIN_FRAMES:
                continue
            if frames.size > row_frames:
                nearest = np.argsort(np.abs(frames - middle), kind="stable")[:row_frames]
                frames = np.sort(frames[nearest])
            rows.append((c, s, frames))
    return rows


def same_rows(rows: list[tuple[int, int, np.ndarray]], step_frames: int, chunk_frames: int,
              min_jaccard: float) -> dict[int, int]:
    """``{row: earlier row}`` for rows that would embed nearly the same speech as an earlier row.

    A short turn lies in every chunk that overlaps it (four at step 0.25) and is wholly in each
    one's middle step, so each of those chunks selects the same frames of the recording for it:
    embedding them once is the same answer for a quarter of the work. Frames are compared in the
    recording's frame index; rows ``(chunk, speaker, frames)`` are in chunk order.
    """
    placed = [c * step_frames + frames for c, _, frames in rows]  # sorted, as the rows' frames
    same: dict[int, int] = {}
    kept: list[int] = []  # rows embedded, in order; candidates are those of overlapping chunks
    for i, (c, _, _) in enumerate(rows):
        frames = placed[i]
        found = None
        for j in reversed(kept):
            cj, other = rows[j][0], placed[j]
            if (c - cj) * step_frames >= chunk_frames:
                break
            if cj == c or other[-1] < frames[0] or other[0] > frames[-1]:
                continue
            small, large = sorted((len(frames), len(other)))
            if small < min_jaccard * large:
                continue
            common = np.intersect1d(frames, other, assume_unique=True).size
            if common >= min_jaccard * (len(frames) + len(other) - common):
                found = j
                break
        if found is None:
            kept.append(i)
        else:
            same[i] = found
    return same


def length_batches(lengths: np.ndarray, batch_frames: int) -> list[np.ndarray]:
    """Row indices grouped so that within a group the longest is at most BUCKET_RATIO x shortest."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = lengths[order[start]]
        end = start + 1
        limit = max(1, batch_frames // max(1, int(longest)))
        while end < len(order) and end - start < limit and lengths[order[end]] * BUCKET_RATIO >= longest:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def chunk_embeddings(
    model: CAMPPlusEmbedding,
    waveform: torch.Tensor,
    binary: np.ndarray,
    chunk_start_s: float,
    chunk_step_s: float,
    chunk_duration_s: float,
    *,
    exclude_overlap: bool = True,
    budget: EmbeddingBudget = EmbeddingBudget(),
    progress: Callable[[int, int], None] | None = None,
    lanes: Lanes | None = None,
) -> np.ndarray:
    """(chunks, speakers, dimension) float32 embeddings, NaN where a speaker has too little speech.

    ``waveform`` is the (samples,) recording at 16 kHz on the model's device; ``binary`` the
    binarized segmentation of chunks starting every ``chunk_step_s`` from ``chunk_start_s``.
    With ``lanes`` open (CPU), the batches of a group run side by side, one thread each.
    """
    lanes = lanes or Lanes(1)
    rate = int(model.hparams.sample_rate)
    device = next(model.parameters()).device
    num_chunks, _, num_speakers = binary.shape
    chunk_frames = model.num_frames(int(round(chunk_duration_s * rate)))
    step_frames = int(round(chunk_step_s * rate / FRAME_SHIFT))
    # 20 % of the chunk clean: below that pyannote embeds the speaker's overlapped frames too
    rows = select_frames(binary, chunk_frames, exclude_overlap, min_clean_frames=MIN_FRAMES,
                         row_frames=max(MIN_ROW_FRAMES, round(ROW_STEP_SHARE * step_frames)))
    same = {} if SAME_ROW_JACCARD is None else same_rows(rows, step_frames, chunk_frames, SAME_ROW_JACCARD)
    out = np.full((num_chunks, num_speakers, model.dimension), np.nan, dtype=np.float32)
    groups = range(0, num_chunks, budget.group_chunks)
    for done, first in enumerate(groups, 1):
        last = min(num_chunks, first + budget.group_chunks)
        group = [r for i, r in enumerate(rows) if first <= r[0] < last and i not in same]
        if group:
            # fbank of the span these chunks cover, in frames from the span's first frame
            start_frame = int(round(chunk_start_s * rate / FRAME_SHIFT)) + first * step_frames
            end_frame = start_frame + (last - 1 - first) * step_frames + chunk_frames
            a = max(0, start_frame * FRAME_SHIFT)
            b = min(waveform.numel(), (end_frame - 1) * FRAME_SHIFT + FRAME_LENGTH)
            feats = _fbank(model, waveform[a:b].to(device), lanes)
            offset = a // FRAME_SHIFT - start_frame  # 0 unless the span started before sample 0
            _embed_rows(model, feats, group, first, step_frames, offset, out, budget.batch_frames, lanes)
            del feats
            # CAM++'s freed activations stay in the lanes' heaps, which drift upward over a long
            # file; handed back once per group (an hour: 12 calls, peak RSS 1618 -> 1486 MB)
            runtime.release_memory()
        if progress is not None:
            progress(done, len(groups))
    for i, j in same.items():  # every original was embedded itself (same_rows never maps to a copy)
        out[rows[i][0], rows[i][1]] = out[rows[j][0], rows[j][1]]
    return out


def _fbank(model: CAMPPlusEmbedding, samples: torch.Tensor, lanes: Lanes) -> torch.Tensor:
    """``model.fbank_frames(samples)``, its frames shared out over the lanes (each frame is its
    own 25 ms of samples, so the parts are exact slices); one lane computes it whole. Serial,
    it left a core idle for 2.2 s of the hour on the 2-core host."""
    total = model.num_frames(samples.numel())
    if lanes.count == 1 or total < 2 * lanes.count:
        return model.fbank_frames(samples)
    bounds = np.linspace(0, total, lanes.count + 1).round().astype(int)
    parts = [samples[first * FRAME_SHIFT : (last - 1) * FRAME_SHIFT + FRAME_LENGTH]
             for first, last in zip(bounds[:-1], bounds[1:]) if last > first]
    return torch.cat(lanes.map(model.fbank_frames, parts))


def _embed_rows(model, feats, group, first, step_frames, offset, out, batch_frames, lanes: Lanes) -> None:
    # frame indices of each row in ``feats``; rows reaching past the recording's end are cut
    indices = []
    for c, _, frames in group:
        idx = (c - first) * step_frames + frames - offset
        indices.append(idx[(idx >= 0) & (idx < feats.shape[0])])
    lengths = np.array([len(i) for i in indices])
    on_gpu = feats.device.type == "cuda"
    # a GPU's batches stay on it until the group is done: no wait for each batch's result, so
    # the host prepares and launches the next batches while the GPU works on this one
    pending: list[tuple[list[int], torch.Tensor]] = []

    def store(keep: list[int], vectors: np.ndarray) -> None:
        for b, vector in zip(keep, vectors):
            c, s, _ = group[b]
            out[c, s] = vector  # each (chunk, speaker) belongs to one batch: lanes never collide

    def embed(batch: np.ndarray) -> None:
        keep = [b for b in batch if lengths[b] >= MIN_FRAMES]
        if not keep:
            return
        shortest = int(min(lengths[b] for b in keep))
        picks = []
        for b in keep:
            cut = (lengths[b] - shortest) // 2  # keep the middle of the row
            picks.append(indices[b][cut : cut + shortest])
        run(keep, torch.from_numpy(np.stack(picks)))

    def run(keep: list[int], gather: torch.Tensor) -> None:
        try:
            if on_gpu:
                pending.append((keep, model.embed_batch(feats[_to_device(gather, feats.device)])))
            else:
                store(keep, model.embed_batch(feats[gather.to(feats.device)]).float().cpu().numpy())
            return
        except torch.OutOfMemoryError:
            if len(keep) < 2:
                raise
        # the batch in halves, each row cut as before (the same embeddings): GPU memory is what a
        # worker's share (gpu_memory_fraction) or a neighbour on the card leaves, and the batch
        # budget is fixed (a 50k-frame batch holds about 2 GB at its peak). Retried here, out of
        # the handler, once the failed call's tensors (held by its traceback) are freed
        log.warning("a CAM++ batch of %d rows ran out of GPU memory; embedding it in halves", len(keep))
        half = len(keep) // 2
        run(keep[:half], gather[:half])
        run(keep[half:], gather[half:])

    lanes.map(embed, length_batches(lengths, batch_frames))
    for keep, vectors in pending:
        store(keep, vectors.float().cpu().numpy())


def _to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``indices`` on ``device`` without waiting for the GPU: a copy from pageable memory
    synchronises with it, one from pinned memory does not. Pageable where pinning is refused (a
    sandbox without page locking): correct, only slower."""
    try:
        return indices.pin_memory().to(device, non_blocking=True)
    except RuntimeError:
        return indices.to(device)
