"""pyannote's SpeakerDiarization with the embedded profile's two replacements.

- **Embeddings** come from ``chunk_embeddings`` (one fbank per region, each second of speech
  embedded about once, CAM++ in length-bucketed batches) instead of one (chunk, speaker) per
  model call.
- **Clustering** is pyannote's agglomerative clustering (centroid linkage on unit vectors, a
  distance threshold, small clusters folded into the nearest large one) with the speaker-count
  constraints made exact: asked for N speakers, it cuts the dendrogram where it holds N large
  clusters, and if no cut does, where it holds N clusters of any size. pyannote's version settles
  for "the closest it found" and prints about it on stdout. Unconstrained, a small cluster unlike
  every speaker (cosine distance above ``distinct_distance``) stays a speaker of its own instead
  of being folded in (a minor talker). Speakers too short to embed inherit
  the cluster of the local speaker they continue in the neighbouring chunk instead of cluster 0.

Segmentation, speaker counting and reconstruction are pyannote's own. On the CPU, segmentation's
batches and CAM++'s run in single-threaded lanes side by side (``engine.lanes``).
"""

from __future__ import annotations

import numpy as np
import torch
from pyannote.audio.pipelines import SpeakerDiarization
from pyannote.audio.pipelines.clustering import AgglomerativeClustering
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist

from engine import runtime
from engine.lanes import Lanes
from engine.models.loading import unused_plda
from engine.pipelines.chunk_embeddings import EmbeddingBudget, chunk_embeddings


def budget_for(device: torch.device | None) -> EmbeddingBudget:
    """Batch sizes for the device: a GPU wants big batches, a CPU gains little past ~32k frames."""
    if device is not None and device.type == "cuda":
        # ~50k frames: a few hundred rows per call, about 2 GB of activations at the peak
        return EmbeddingBudget(batch_frames=50_000, group_chunks=1024)
    return EmbeddingBudget()


class EmbeddedSpeakerDiarization(SpeakerDiarization):
    def __init__(self, *, budget: EmbeddingBudget, lanes: Lanes | None = None,
                 distinct_distance: float | None = None, **kwargs):
        super().__init__(plda=unused_plda(), clustering="AgglomerativeClustering", **kwargs)
        self.budget = budget
        self.clustering = ExactCountClustering(metric=self._embedding.metric)
        self.clustering.distinct_distance = distinct_distance
        # CPU: segmentation batches and CAM++ batches shared out over single-threaded lanes
        self.lanes = lanes or Lanes(1)
        self.lanes.split_batches(self._segmentation.model)
        _float32_input(self._segmentation.model)

    # it takes the recording as stored (float16, engine.audio.STORAGE_DTYPE): segmentation's
    # batches and the embeddings' fbank blocks are made float32 one at a time
    casts_its_input = True

    def get_embeddings(self, file, binary_segmentations, exclude_overlap: bool = False, hook=None):
        # the tuning bench reuses one file's embeddings across clustering trials (pyannote's cache)
        if self.training and "embeddings" in file.get("training_cache/embeddings", {}):
            return file["training_cache/embeddings"]["embeddings"]
        # segmentation's freed activations stay in the lanes' heaps (glibc arenas) and would sit
        # under CAM++'s: 40-90 MB handed back here, at the cost of one malloc_trim
        runtime.release_memory()
        window = binary_segmentations.sliding_window
        progress = None
        if hook is not None:
            hook("embeddings", None, total=1, completed=0)

            def progress(done: int, total: int) -> None:
                hook("embeddings", None, total=total, completed=done)

        embeddings = chunk_embeddings(
            self._embedding.model_,
            file["waveform"][0],
            binary_segmentations.data,
            window.start,
            window.step,
            window.duration,
            exclude_overlap=exclude_overlap,
            budget=self.budget,
            progress=progress,
            lanes=self.lanes,
        )
        if self.training:
            file["training_cache/embeddings"] = {"embeddings": embeddings}
        return embeddings


def _float32_input(model: torch.nn.Module) -> None:
    """``model(x)`` casts each batch to float32: pyannote's inference slides the model over the
    recording as it was given, and a float32 copy of a whole hour is 230 MB."""
    forward = model.forward

    def cast(x: torch.Tensor, *args, **kwargs):
        return forward(x.float(), *args, **kwargs)

    model.forward = cast  # an instance attribute, as Lanes.split_batches sets


class ExactCountClustering(AgglomerativeClustering):
    # see _keep_distinct; None folds every small cluster, as pyannote does
    distinct_distance: float | None = None

    def cluster(self, embeddings, min_clusters=None, max_clusters=None, num_clusters=None):
        n = embeddings.shape[0]
        if n == 1:
            return np.zeros((1,), dtype=np.int64)
        min_size = min(self.min_cluster_size, max(1, round(0.1 * n)))
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        dendrogram = linkage(unit, method=self.method, metric="euclidean")
        clusters = fcluster(dendrogram, self.threshold, criterion="distance") - 1
        found = _num_large(clusters, min_size)
        target = num_clusters
        if target is None and min_clusters is not None and found < min_clusters:
            target = min_clusters
        if target is None and max_clusters is not None and found > max_clusters:
            target = max_clusters
        if target is not None and found != target:
            clusters, keep = _cut_with(dendrogram, n, min(target, n), min_size)
        else:
            counts = np.bincount(clusters)
            keep = np.flatnonzero(counts >= min_size)
            if num_clusters is None and self.distinct_distance is not None:
                keep = _keep_distinct(unit, clusters, keep, self.metric, self.distinct_distance, max_clusters)
        return _fold_into(unit, clusters, keep, self.metric)

    def __call__(self, embeddings, segmentations=None, **kwargs):
        hard, soft, centroids = super().__call__(embeddings, segmentations=segmentations, **kwargs)
        if segmentations is not None:
            _inherit_from_neighbours(hard, embeddings, segmentations)
        return hard, soft, centroids


def _num_large(clusters: np.ndarray, min_size: int) -> int:
    return int(np.sum(np.bincount(clusters) >= min_size))


def _cut_with(dendrogram: np.ndarray, n: int, target: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first cut (walking down from ``target`` clusters) with ``target`` large clusters.

    Heights are replaced by merge order, as pyannote does, because centroid linkage is not
    monotonic: cutting below merge ``t`` leaves exactly ``n - t`` clusters.
    """
    ordered = dendrogram.copy()
    ordered[:, 2] = np.arange(n - 1)

    def cut(m: int) -> np.ndarray:
        return fcluster(ordered, n - m - 1, criterion="distance") - 1 if m < n else np.arange(n)

    # a few hundred finer cuts cover any realistic count of outliers; past that the clusters
    # are not there at this size, and every cluster counts
    for m in range(target, min(n, target + 300) + 1):
        clusters = cut(m)
        if _num_large(clusters, min_size) >= target:
            # the target largest clusters of this cut are the speakers
            return clusters, np.argsort(-np.bincount(clusters), kind="stable")[:target]
    clusters = cut(target)
    return clusters, np.unique(clusters)


def _centroids(unit: np.ndarray, clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean unit vector of each cluster in ``labels``, one row each."""
    return np.vstack([unit[clusters == k].mean(axis=0) for k in labels])


def _keep_distinct(unit: np.ndarray, clusters: np.ndarray, keep: np.ndarray, metric: str, distance: float,
                   max_clusters: int | None) -> np.ndarray:
    """``keep`` plus the small clusters unlike every kept one (centroid distance above ``distance``),
    farthest first and never past ``max_clusters``.

    A talker with a few seconds in a meeting gives one or two chunk embeddings: a cluster below
    ``min_cluster_size``, which pyannote folds into the nearest speaker whatever the distance. If
    no speaker is close enough to have said it (by the verification threshold), it is a speaker
    of its own. Measured on 5-8-talker conversations with minor talkers: speaker-count error
    1.50 -> 0.38 and DER 0.338 -> 0.305, with the four-talker sets and the hour unchanged.
    """
    small = np.setdiff1d(np.unique(clusters), keep)
    if len(keep) == 0 or len(small) == 0:
        return keep
    nearest = cdist(_centroids(unit, clusters, keep), _centroids(unit, clusters, small), metric=metric).min(axis=0)
    order = np.argsort(-nearest, kind="stable")
    distinct = [small[i] for i in order if nearest[i] > distance]
    if max_clusters is not None:
        distinct = distinct[: max(0, max_clusters - len(keep))]
    return np.concatenate([keep, np.asarray(distinct, dtype=keep.dtype)]) if distinct else keep


def _fold_into(unit: np.ndarray, clusters: np.ndarray, keep: np.ndarray, metric: str) -> np.ndarray:
    """Fold every cluster not in ``keep`` into the nearest kept one (by centroid); 0..K-1 labels."""
    labels = np.unique(clusters)
    if len(keep) == 0:
        return np.zeros_like(clusters)
    small = np.setdiff1d(labels, keep)
    if len(small):
        nearest = np.argmin(cdist(_centroids(unit, clusters, keep), _centroids(unit, clusters, small), metric=metric),
                            axis=0)
        for k, j in zip(small, nearest):
            clusters[clusters == k] = keep[j]
    return np.unique(clusters, return_inverse=True)[1]


def _inherit_from_neighbours(hard: np.ndarray, embeddings: np.ndarray, segmentations) -> None:
    """Give an active speaker with no embedding the cluster of the neighbouring chunk's local
    speaker it overlaps most in time (chunks overlap unless the step is the whole window)."""
    data = np.nan_to_num(segmentations.data, nan=0.0)
    num_chunks, num_frames, _ = data.shape
    window = segmentations.sliding_window
    shift = int(round(num_frames * window.step / window.duration))
    missing = np.isnan(embeddings).any(axis=2) & (data.sum(axis=1) > 0)
    for c, s in zip(*np.nonzero(missing)):
        best, label = 0.0, -2
        for n in (c - 1, c + 1):
            if not 0 <= n < num_chunks or shift >= num_frames:
                continue
            if n > c:
                mine, theirs = data[c, shift:, s], data[n, : num_frames - shift]
            else:
                mine, theirs = data[c, : num_frames - shift, s], data[n, shift:]
            overlap = mine @ theirs
            t = int(np.argmax(overlap))
            if overlap[t] > best and not missing[n, t] and hard[n, t] >= 0:
                best, label = float(overlap[t]), int(hard[n, t])
        hard[c, s] = label
