"""pyannote's SpeakerDiarization with the embedded profile's two replacements.

- **Embeddings** come from ``chunk_embeddings`` (one fbank per region, each second of speech
  embedded about once, CAM++ in length-bucketed batches) instead of one (chunk, speaker) per
  model call.
- **Clustering** is pyannote's agglomerative clustering (centroid linkage on unit vectors, a
  distance threshold, small clusters folded into the nearest large one) with the speaker-count
  constraints made exact: asked for N speakers, it keeps the free count's speakers if they are N,
  else cuts the dendrogram where it holds N large clusters, and if no cut does, where it holds N
  clusters of any size. pyannote's version settles
  for "the closest it found" and prints about it on stdout. Unconstrained, a small cluster unlike
  every speaker (cosine distance above ``distinct_distance``) stays a speaker of its own instead
  of being folded in (a minor talker); two such clusters alike are one minor talker, and a small
  cluster like a main speaker is folded into a main speaker, not into a minor talker kept on one
  embedding (``minors_apart``). Speakers of a few embeddings each, all within that distance of
  each other, are one talker's fragments (``join_fragments``). Speakers too short to embed inherit
  the cluster of the local speaker they continue in the neighbouring chunk instead of cluster 0.
  Where the recording's own within-talker spread is high (a room, noise), clusters of a few
  embeddings merge more readily than the threshold alone allows (``_merge_spread``).

Segmentation, speaker counting and reconstruction are pyannote's own, except that consecutive chunks
of a segmentation batch share SincNet's first convolution (``engine.models.sincnet``) and that the
frame-level steps at the end give pyannote's numbers without its per-frame loops and its
reconstruction array (``engine.pipelines.discrete``), and that a quiet recording is segmented as
if at a speech level (``speech_level_gain``). On the CPU, segmentation's batches and
CAM++'s run in single-threaded lanes side by side (``engine.lanes``); on a GPU the recording is
uploaded once (``DEVICE_AUDIO_MAX_BYTES``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import torch
from pyannote.audio.pipelines import SpeakerDiarization
from pyannote.audio.pipelines.clustering import AgglomerativeClustering
from scipy.cluster.hierarchy import fcluster, linkage, maxdists
from scipy.spatial.distance import cdist, cosine, pdist

from engine import runtime
from engine.channel import through_a_telephone_line
from engine.lanes import Lanes
from engine.models.loading import unused_plda
from engine.models.sincnet import share_first_convolution
from engine.pipelines import discrete
from engine.pipelines.chunk_embeddings import EmbeddingBudget, chunk_embeddings


log = logging.getLogger(__name__)

# the longest recording whose samples are moved to the GPU whole (512 MB: 4.6 h of float16);
# a longer one stays on the host and goes batch by batch, so that a job's GPU memory stays bounded
# whatever the length (several workers share a card)
DEVICE_AUDIO_MAX_BYTES = 512 * 2**20


def uploaded_once(file: dict, device: torch.device) -> dict:
    """``file`` with its waveform moved to ``device`` whole, where that is a GPU and the recording
    is at most ``DEVICE_AUDIO_MAX_BYTES`` (an hour of float16: 115 MB); as it was otherwise.

    Left on the host, each segmentation batch is a strided view of the recording (chunks every
    2.5 s of 10 s) that torch copies into a contiguous host buffer before sending: every sample
    four times, 4.6 GB an hour through host memory and the bus while the GPU waits. The
    diarization and the speech detector (engine.pipelines.identification) both segment it."""
    waveform = file["waveform"]
    if (device.type != "cuda" or waveform.device == device
            or waveform.numel() * waveform.element_size() > DEVICE_AUDIO_MAX_BYTES):
        return file
    return {**file, "waveform": waveform.to(device)}


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN's convolutions inside the block (``enabled``), the process's flag as it was
    after it; nothing changes when not enabled.

    Convolutions only: they are CAM++'s work. Matrix products stay float32, among them the fbank's
    mel projection, whose TF32 rounding (10-bit mantissa) would move every feature before CAM++
    and blur what the device check's DER comparison says about the convolutions."""
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def budget_for(device: torch.device | None) -> EmbeddingBudget:
    """Batch sizes for the device: a GPU wants big batches, a CPU gains little past ~32k frames."""
    if device is not None and device.type == "cuda":
        # ~50k frames: a few hundred rows per call, about 2 GB of activations at the peak
        return EmbeddingBudget(batch_frames=50_000, group_chunks=1024)
    return EmbeddingBudget()


class EmbeddedSpeakerDiarization(SpeakerDiarization):
    def __init__(self, *, budget: EmbeddingBudget, lanes: Lanes | None = None,
                 distinct_distance: float | None = None, join_fragments: bool = False,
                 reference_concentration: float | None = None, min_cluster_share: float = 0.0,
                 telephone_threshold: float | None = None, spread_lambda: float = 0.0,
                 spread_reference: float = 0.85, embedding_tf32: bool = False,
                 centre_sigma: float | None = None, stray_speaker_s: float = 0.0, **kwargs):
        super().__init__(plda=unused_plda(), clustering="AgglomerativeClustering", **kwargs)
        self.budget = budget
        # the clustering threshold for a recording that came through a telephone line
        # (engine.channel); None: the one threshold for every recording
        self.telephone_threshold = telephone_threshold
        self.embedding_tf32 = embedding_tf32
        # reconstruction weighted to each chunk's middle (discrete.centre_weights); None: pyannote's
        self.centre_sigma = centre_sigma
        # a speaker with less than this in pyannote's reconstruction is a stray, dropped after it
        # (drop_stray_speakers): the weighted reconstruction gives it no frame it could avoid
        self.stray_speaker_s = stray_speaker_s
        self.clustering = ExactCountClustering(metric=self._embedding.metric)
        self.clustering.distinct_distance = distinct_distance
        self.clustering.join_fragments = join_fragments
        self.clustering.reference_concentration = reference_concentration
        self.clustering.min_cluster_share = min_cluster_share
        self.clustering.spread_lambda = spread_lambda
        self.clustering.spread_reference = spread_reference
        # CPU: segmentation batches and CAM++ batches shared out over single-threaded lanes
        self.lanes = lanes or Lanes(1)
        self.lanes.split_batches(self._segmentation.model)
        _float32_input(self._segmentation.model)
        # consecutive chunks of a batch share SincNet's first convolution (engine/models/sincnet.py);
        # pyannote slides the model every ``step`` seconds
        sincnet = getattr(self._segmentation.model, "sincnet", None)
        if sincnet is not None:
            rate = int(self._segmentation.model.hparams.sample_rate)
            share_first_convolution(sincnet, int(round(self._segmentation.step * rate)))

    # Binarize without a Python loop per frame (engine.pipelines.discrete; reconstruct below too)
    to_annotation = staticmethod(discrete.to_annotation)

    # it takes the recording as stored (float16, engine.audio.STORAGE_DTYPE): segmentation's
    # batches and the embeddings' fbank blocks are made float32 one at a time
    casts_its_input = True

    def apply(self, file, **kwargs):
        # per recording, like the count a caller forces: set for this call only
        self.clustering.channel_threshold = None
        if self.telephone_threshold is not None and through_a_telephone_line(file["waveform"][0].numpy()):
            self.clustering.channel_threshold = self.telephone_threshold
        if not self.training:
            file = uploaded_once(file, self._segmentation.device)
        model = self._segmentation.model
        model.input_gain = speech_level_gain(file["waveform"], int(file.get("sample_rate", 16000)))
        try:
            return super().apply(file, **kwargs)
        finally:
            self.clustering.channel_threshold = None
            model.input_gain = 1.0

    def get_segmentations(self, file, hook=None):
        """pyannote's, with a batch that does not fit in memory tried again in halves.

        pyannote turns an out-of-memory error of a batch into ``MemoryError`` ("batch_size is
        probably too large") and the job failed on every attempt: on a card that several workers
        share, what one batch of 256 chunks needs depends on what the neighbours hold at that
        moment. Each chunk is segmented on its own, so a smaller batch gives the same answer; the
        pipeline's batch size is back as it was after the call."""
        inference = self._segmentation
        size = inference.batch_size
        try:
            while True:
                try:
                    return super().get_segmentations(file, hook=hook)
                except MemoryError:
                    if inference.batch_size <= 1:
                        raise
                    if inference.device.type == "cuda":
                        torch.cuda.empty_cache()
                    inference.batch_size = max(1, inference.batch_size // 2)
                    log.warning("segmentation ran out of memory: batches of %d chunks now", inference.batch_size)
        finally:
            inference.batch_size = size

    def reconstruct(self, segmentations, hard_clusters, count):
        diarization = discrete.reconstruct(segmentations, hard_clusters, count)
        if self.centre_sigma is not None:
            diarization = self._centred(segmentations, hard_clusters, count, diarization)
        # only for a count the caller forced: left free, a cluster that wins no frame is mostly a
        # fragment, and claiming frames for it took the conversations' DER from 0.183 to 0.210
        if self.clustering.forced_count is not None:
            _claim_orphans(diarization, segmentations, hard_clusters)
        return diarization

    def _centred(self, segmentations, hard_clusters, count, equal):
        """The reconstruction again, each chunk's frames weighted to its middle
        (``discrete.centre_weights``), among the speakers the equal-weight one (``equal``,
        pyannote's) found.

        Equal weights decide who is a speaker, the weighted sums who speaks when. A cluster of
        one odd row (a cough, two talkers the segmentation mixed in one chunk) is outvoted by the
        three other chunks over its frames with equal weights, and then dropped as a stray
        (``stray_speaker_s``); weighted, it would own its chunk's middle and stay a speaker:
        noisy four-talker conversations came out as 5-8 talkers, and one or two readers as one
        more. A count the caller forced keeps every cluster (``_claim_orphans`` gives each its
        frames)."""
        alive = None
        if self.clustering.forced_count is None:
            found = equal.data.sum(axis=0) * equal.sliding_window.step
            alive = found >= max(self.stray_speaker_s, equal.sliding_window.step)
            # as drop_stray_speakers keeps one speaker at least: with every cluster ranked last,
            # the first of them would have taken every frame
            alive[np.argmax(found)] = True
        weights = discrete.centre_weights(segmentations.data.shape[1], self.centre_sigma)
        return discrete.reconstruct(segmentations, hard_clusters, count, weights=weights, alive=alive)

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

        # pyannote turns TF32 off for the whole process at every call (its issue 1370: its
        # embedding model lost accuracy); CAM++'s convolutions may take it where the DER holds
        with tf32(self.embedding_tf32):
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
    """``model(x)`` casts each batch to float32, times ``model.input_gain`` (this recording's,
    set by ``EmbeddedSpeakerDiarization.apply``): pyannote's inference slides the model over the
    recording as it was given, and a float32 copy of a whole hour is 230 MB."""
    forward = model.forward
    model.input_gain = 1.0
    model.casts_its_input = True  # any pipeline over this model may hand it float16 (SpeechDetector)

    def cast(x: torch.Tensor, *args, **kwargs):
        x = x.float()
        if model.input_gain != 1.0:
            x = x * model.input_gain
        return forward(x, *args, **kwargs)

    model.forward = cast  # an instance attribute, as Lanes.split_batches sets


# A recording whose loud moments are quieter than QUIET_LEVEL (RMS, full scale 1.0) is
# segmented as if they were at SPEECH_LEVEL (see speech_level_gain)
QUIET_LEVEL = 0.01  # -40 dBFS
SPEECH_LEVEL = 0.05  # -26 dBFS
LEVEL_FRAME_S = 0.1
# the share of 0.1 s frames louder than the level taken as the recording's speech: 36 s an hour
LOUD_SHARE = 0.01


def speech_level_gain(waveform: torch.Tensor, sample_rate: int) -> float:
    """The gain that brings a quiet recording's loud moments to SPEECH_LEVEL; 1.0 for one whose
    are at QUIET_LEVEL or louder, and for silence.

    segmentation-3.0 starts with an instance norm of each 10 s chunk's waveform whose epsilon
    (1e-5) is a variance: where a chunk's RMS nears 0.003 (-50 dBFS) the model no longer sees the
    speech at its level but shrunk toward silence. pyannote's sample played 35 dB quieter (peaks
    at -45 dBFS, as a far-field recorder set low makes them) was diarized with 3 speakers for 2,
    DER 0.059 -> 0.120; 45 dB quieter, 0.153. CAM++'s features are level-free (same scores at
    -55 dB), so only segmentation is given the gain. A recording at a usual level is left as it
    is, to the bit."""
    frame = max(1, int(round(LEVEL_FRAME_S * sample_rate)))
    x = waveform.reshape(-1)
    usable = x.numel() // frame * frame
    if usable == 0:
        return 1.0
    # frame energies 10 min at a time: a float32 copy of the whole recording is 230 MB an hour
    energies = torch.cat([block.float().view(-1, frame).pow(2).mean(dim=1)
                          for block in x[:usable].split(frame * 6000)])
    k = max(1, int(np.ceil(LOUD_SHARE * energies.numel())))
    loud = float(torch.topk(energies, k).values[-1].sqrt())
    if not loud > 0.0 or loud >= QUIET_LEVEL:
        return 1.0
    return SPEECH_LEVEL / loud


class ExactCountClustering(AgglomerativeClustering):
    # see _keep_distinct; None folds every small cluster, as pyannote does
    distinct_distance: float | None = None
    # embeddings the dendrogram is built from, at most: centroid linkage holds all n(n-1)/2
    # distances (12k embeddings, about 4 h at step 0.25: 0.6 GB and 10-20 s on this project's
    # CPU; 4k: 64 MB, about 1.5 s). Past it an evenly spaced subset (in time) is clustered and
    # every embedding is then assigned to its nearest centroid, as pyannote assigns those it
    # left out of training (short or overlapped speech).
    max_train: int = 4000
    min_cluster_share: float = 0.0
    # the threshold for this recording's channel when it is not the tuned one (a telephone line:
    # EmbeddedSpeakerDiarization.apply), None for the pipeline's own
    channel_threshold: float | None = None
    # the count the last ``cluster`` call was held to (num_speakers, or a min/max the free count
    # missed), None when the free count stood
    forced_count: int | None = None
    # size-aware merging where the recording's own within-talker spread (_linked_spread) is
    # above the reference (_merge_spread; Settings.clustering_spread_lambda); 0: off
    spread_lambda: float = 0.0
    spread_reference: float = 0.85
    # this recording's spread, measured in __call__ (which has the segmentation) for ``cluster``
    _spread: float | None = None
    # minor talkers are kept apart from the main speakers' fragments: a small cluster like a
    # minor talker kept before it joins that talker, and one like a main speaker is not folded
    # into a minor talker kept on one embedding (_keep_distinct, ``cluster``); False: every small
    # cluster folds into the nearest speaker kept, minor or main (before 2026-12-06)
    minors_apart: bool = True
    # speakers of at most FRAGMENT_SIZE embeddings all within the distinct distance of each other
    # are one talker (_join_fragments); False: each stays a speaker (before 2026-12-06, later)
    join_fragments: bool = False
    # two clusters of at least LARGE_FOR_DIRECTION embeddings each are not merged when their mean
    # directions lie further apart (cosine distance) than the threshold allows at this
    # concentration, the length of a large clean cluster's mean unit vector (_cut_directed,
    # _merge_spread); None: the threshold alone, on centroid distances
    reference_concentration: float | None = None

    def filter_embeddings(self, embeddings, segmentations=None, **kwargs):
        train, chunk_idx, speaker_idx = super().filter_embeddings(embeddings, segmentations=segmentations, **kwargs)
        if len(train) > self.max_train:
            keep = np.unique(np.linspace(0, len(train) - 1, self.max_train).round().astype(np.int64))
            train, chunk_idx, speaker_idx = train[keep], chunk_idx[keep], speaker_idx[keep]
        return train, chunk_idx, speaker_idx

    def cluster(self, embeddings, min_clusters=None, max_clusters=None, num_clusters=None):
        n = embeddings.shape[0]
        if n == 1:
            return np.zeros((1,), dtype=np.int64)
        large = max(self.min_cluster_size, int(np.ceil(self.min_cluster_share * n)))
        # a cut held to the caller's count: pyannote lowers the minimum to a tenth of the
        # embeddings (to one below 15) so that a short recording's second talker, one or two
        # embeddings, is not folded away; and the caller says the talkers are there, so a long
        # recording's minimum stays at FORCED_MIN_SHARE however high the free count's share is
        forced_large = max(self.min_cluster_size,
                           int(np.ceil(min(self.min_cluster_share, FORCED_MIN_SHARE) * n)))
        min_size = min(forced_large, max(1, round(0.1 * n)))
        # left free, a lone embedding is a speaker only if it is unlike every speaker
        # (_keep_distinct), in a 15 s clip as in an hour: with every singleton a speaker, one
        # reader in a reverberant room came out as 3-4 speakers (see docs/models.md)
        free_size = large if self.distinct_distance is not None and n >= 2 * self.min_cluster_size else min_size
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        dendrogram = linkage(unit, method=self.method, metric="euclidean")
        threshold = self.threshold if self.channel_threshold is None else self.channel_threshold
        apart = None if self.reference_concentration is None else threshold**2 / (2 * self.reference_concentration**2)
        clusters = (fcluster(dendrogram, threshold, criterion="distance") - 1 if apart is None
                    else _cut_directed(dendrogram, unit, threshold, apart))
        if self.spread_lambda > 0 and self._spread is not None and self._spread > self.spread_reference:
            extra = self.spread_lambda * (self._spread**2 - self.spread_reference**2) / 2
            clusters = _merge_spread(unit, clusters, threshold, extra, apart=apart)
        # the free count's speakers, the large clusters first: when the caller asks for as many
        # as it has large clusters, or as many as it has speakers in all (with the minor talkers
        # it kept), that is the answer (a cut held to the count would fold a minor talker the
        # free count kept and split someone else instead); otherwise a cut makes the count
        keep, large_count = self._free_speakers(unit, clusters, free_size)
        found = len(keep)
        target = num_clusters
        if target is None and min_clusters is not None and found < min_clusters:
            target = min_clusters
        if target is None and max_clusters is not None and large_count > max_clusters:
            target = max_clusters
        self.forced_count = target
        if target is not None and target not in (found, large_count):
            clusters, keep = _cut_with(dendrogram, n, min(target, n), min_size)
        else:
            # a bound alone folds the minor talkers past it, the farthest kept first
            keep = keep[: target or max_clusters]
            if self.minors_apart and self.distinct_distance is not None:
                # a minor talker kept on one embedding (one moment unlike everyone) is no centre
                # to gather others around: a small cluster within the distinct distance of a main
                # speaker goes to the nearest main speaker or minor talker of min_cluster_size,
                # not to a nearer lone one (such a singleton drew 5 fragments of three talkers:
                # 15 s of an extra speaker in a 10 min meeting, see docs/models.md); a small
                # cluster unlike every main speaker still goes to the nearest kept, lone or not
                sizes = np.bincount(clusters)[keep]
                main = keep[(np.arange(len(keep)) < large_count) | (sizes >= self.min_cluster_size)]
                return _fold_into(unit, clusters, keep, self.metric, main=main, near=self.distinct_distance)
        return _fold_into(unit, clusters, keep, self.metric)

    def _free_speakers(self, unit: np.ndarray, clusters: np.ndarray, free_size: int) -> tuple[np.ndarray, int]:
        """The clusters the free count keeps, and how many of them are large: the large ones
        first, then the small ones distinct from them, farthest first."""
        counts = np.bincount(clusters)
        keep = np.flatnonzero(counts >= free_size)
        if len(keep) == 0:
            # every cluster is small: the largest (of those, the one nearest the mean voice)
            # is the first speaker, and the others stay speakers only if distinct from it
            largest = np.flatnonzero(counts == counts.max())
            middle = unit.mean(axis=0, keepdims=True)
            keep = largest[[int(np.argmin(cdist(_centroids(unit, clusters, largest), middle, metric=self.metric)))]]
        large_count = len(keep)
        if self.distinct_distance is not None:
            keep = _keep_distinct(unit, clusters, keep, self.metric, self.distinct_distance,
                                  join_minors=self.minors_apart)
            if self.join_fragments:
                keep, large_count = _join_fragments(unit, clusters, keep, large_count, self.metric,
                                                    self.distinct_distance)
        return keep, large_count

    def __call__(self, embeddings, segmentations=None, **kwargs):
        # here, not in ``cluster``: pyannote skips ``cluster`` when at most one speaker is allowed,
        # and the previous job's forced count must not reach this job's reconstruction
        self.forced_count = None
        self._spread = None
        if segmentations is not None and self.spread_lambda > 0:
            self._spread = _linked_spread(embeddings, segmentations)
        hard, soft, centroids = super().__call__(embeddings, segmentations=segmentations, **kwargs)
        if segmentations is not None:
            _inherit_from_neighbours(hard, embeddings, segmentations)
        return hard, soft, centroids


# the share of the embeddings a cluster needs to count toward a count the caller forces: 0.5 %,
# about 18 s of an hour. At the free count's 3 %, an hour of three talkers and a fourth with 2 %
# of it, held to num_speakers=4, found no cut with four clusters of 3 % and fell back to the
# dendrogram's top four: one cluster and three lone outliers.
FORCED_MIN_SHARE = 0.005


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


# share of the embeddings a small cluster needs to stay a speaker of its own (see _keep_distinct)
DISTINCT_MIN_SHARE = 0.001


def _keep_distinct(unit: np.ndarray, clusters: np.ndarray, keep: np.ndarray, metric: str,
                   distance: float, join_minors: bool = False) -> np.ndarray:
    """``keep`` plus the small clusters unlike every kept one (centroid distance above ``distance``),
    farthest first. With ``join_minors``, a small cluster unlike every kept one but like a minor
    talker kept before it (within ``distance``) is that talker: it is merged into it in
    ``clusters`` (changed in place) instead of being a speaker of its own.

    A talker with a few seconds in a meeting gives one or two chunk embeddings: a cluster below
    ``min_cluster_size``, which pyannote folds into the nearest speaker whatever the distance. If
    no speaker is close enough to have said it (by the verification threshold), it is a speaker
    of its own. Measured on 5-8-talker conversations with minor talkers: speaker-count error
    1.50 -> 0.38 and DER 0.338 -> 0.305, with the four-talker sets and the hour unchanged.
    """
    small = np.setdiff1d(np.unique(clusters), keep)
    # odd moments (one chunk's embedding unlike everyone) come at a rate per embedding, so a long
    # recording needs more support for a speaker of its own: the hour (2,200 embeddings) had 4
    # singletons kept as 4 extra speakers of 2-6 s, while in 1-2 min conversations a singleton
    # is as often a minor talker (requiring two everywhere: many-talker count error 0.38 -> 0.50)
    support = max(1, int(np.ceil(DISTINCT_MIN_SHARE * len(clusters))))
    small = small[np.bincount(clusters)[small] >= support]
    if len(keep) == 0 or len(small) == 0:
        return keep
    nearest = cdist(_centroids(unit, clusters, keep), _centroids(unit, clusters, small), metric=metric).min(axis=0)
    order = np.argsort(-nearest, kind="stable")
    distinct = [small[i] for i in order if nearest[i] > distance]
    if join_minors and len(distinct) > 1:
        # one guest's few seconds can come out as two small clusters (two 2 s rows of one 5 s
        # turn 0.46 apart: too far for the threshold's merge, near enough to be one voice by the
        # verification threshold); the farthest from the main speakers first, as above
        minors: list[int] = []
        for k in distinct:
            if minors:
                gaps = cdist(_centroids(unit, clusters, np.asarray([k])),
                             _centroids(unit, clusters, np.asarray(minors)), metric=metric)[0]
                if gaps.min() <= distance:
                    clusters[clusters == k] = minors[int(np.argmin(gaps))]
                    continue
            minors.append(k)
        distinct = minors
    return np.concatenate([keep, np.asarray(distinct, dtype=keep.dtype)]) if distinct else keep


# a kept speaker of at most this many embeddings is a fragment (_join_fragments)
FRAGMENT_SIZE = 4


def _join_fragments(unit: np.ndarray, clusters: np.ndarray, keep: np.ndarray, large_count: int, metric: str,
                    distance: float) -> tuple[np.ndarray, int]:
    """``keep`` with its fragments (speakers of at most :data:`FRAGMENT_SIZE` embeddings) that
    lie within ``distance`` of each other merged, in ``clusters`` too (complete linkage among the
    fragments, each group into its first in ``keep``); the large count less the large ones merged
    away. A speaker of more embeddings is never merged here.

    The mean of 2-4 embeddings is nearly as noisy as one, so two such clusters are compared as
    two short utterances are, by the verification distance, not by the threshold tuned on
    centroids of many: one talker of 13 s in a minute of many talkers came out as three speakers
    of 3 embeddings 0.38-0.52 apart (docs/models.md, "Over-counts on the held-out draw" and
    "Fragments joined")."""
    sizes = np.bincount(clusters)[keep]
    small = np.flatnonzero(sizes <= FRAGMENT_SIZE)
    if len(small) < 2:
        return keep, large_count
    # complete linkage: a group's fragments are all within the distance of each other. Single
    # linkage chained three fragments of a minute's two minor talkers (0.44 and 0.48 apart, the
    # two ends 0.67) into one speaker
    centroids = _centroids(unit, clusters, keep[small])
    groups = fcluster(linkage(pdist(centroids, metric=metric), method="complete"), distance, criterion="distance")
    gone = np.zeros(len(keep), dtype=bool)
    for group in np.unique(groups):
        members = small[groups == group]  # positions in keep, in keep's order
        for position in members[1:]:
            clusters[clusters == keep[position]] = keep[members[0]]
            gone[position] = True
    return keep[~gone], large_count - int(gone[:large_count].sum())


def _fold_into(unit: np.ndarray, clusters: np.ndarray, keep: np.ndarray, metric: str,
               main: np.ndarray | None = None, near: float | None = None) -> np.ndarray:
    """Fold every cluster not in ``keep`` into the nearest kept one (by centroid), or into the
    nearest of ``main`` when one of those is within ``near``; 0..K-1 labels."""
    labels = np.unique(clusters)
    if len(keep) == 0:
        return np.zeros_like(clusters)
    small = np.setdiff1d(labels, keep)
    if len(small):
        distances = cdist(_centroids(unit, clusters, keep), _centroids(unit, clusters, small), metric=metric)
        targets = keep[np.argmin(distances, axis=0)]
        if main is not None and near is not None and len(main):
            in_main = np.isin(keep, main)
            to_main = np.where(in_main[:, None], distances, np.inf)
            like_main = to_main.min(axis=0) <= near
            targets = np.where(like_main, keep[np.argmin(to_main, axis=0)], targets)
        for k, j in zip(small, targets):
            clusters[clusters == k] = j
    return np.unique(clusters, return_inverse=True)[1]


def _inherit_from_neighbours(hard: np.ndarray, embeddings: np.ndarray, segmentations) -> None:
    """Give an active speaker with no embedding the cluster of the local speaker it overlaps most
    in time in the nearest overlapping chunk on either side that has embeddings (chunks overlap
    unless the step is the whole window; chunks left unembedded are skipped over)."""
    data = np.nan_to_num(segmentations.data, nan=0.0)
    num_chunks, num_frames, _ = data.shape
    window = segmentations.sliding_window
    shift = int(round(num_frames * window.step / window.duration))
    unembedded = np.isnan(embeddings).any(axis=2)
    missing = unembedded & (data.sum(axis=1) > 0)
    usable = ~unembedded & (hard >= 0)
    if not usable.any():
        # nobody of the recording could be embedded (a few seconds whose speech is all too short
        # or overlapped): no cluster to inherit, so pyannote's one cluster for every active
        # speaker stands. Each taking -2 left no cluster at all, and the reconstruction failed
        # on a negative count of clusters (a 3 s clip was a 500 "internal error")
        return
    has_usable = usable.any(axis=1)
    for c, s in zip(*np.nonzero(missing)):
        best, label = 0.0, -2
        for direction in (-1, 1):
            n = c + direction
            while 0 <= n < num_chunks and not has_usable[n] and abs(n - c) * shift < num_frames:
                n += direction
            lag = abs(n - c) * shift
            if not 0 <= n < num_chunks or shift <= 0 or lag >= num_frames:
                continue
            if n > c:
                mine, theirs = data[c, lag:, s], data[n, : num_frames - lag]
            else:
                mine, theirs = data[c, : num_frames - lag, s], data[n, lag:]
            overlap = mine @ theirs
            t = int(np.argmax(overlap))
            if overlap[t] > best and usable[n, t]:
                best, label = float(overlap[t]), int(hard[n, t])
        hard[c, s] = label


def _claim_orphans(discrete, segmentations, hard_clusters: np.ndarray) -> None:
    """Give a cluster that reconstruction left without a frame the speech of its own members.

    pyannote's reconstruction sums, for each output frame, the activations every overlapping
    chunk gives each cluster, and keeps as many clusters as speakers counted there. A talker
    clustered from one chunk's embedding (a minor talker, or a speaker the caller's
    ``num_speakers`` forced apart) gets one vote per frame, while the chunks around it, whose
    rows went to the nearest big cluster, give that cluster three (step 0.25: four chunks see each
    frame): the talker ends with no frame, so a forced count came out short (6 of 7). Here such a
    cluster takes back the frames where its members are active in their own chunks, from a
    cluster those chunks do not see there; the frame's speaker count is kept.
    """
    data = discrete.data
    present = np.unique(hard_clusters[hard_clusters >= 0])
    orphans = [int(k) for k in present if k < data.shape[1] and not data[:, k].any()]
    if not orphans:
        return
    seg = np.nan_to_num(segmentations.data, nan=0.0) > 0
    window, grid = segmentations.sliding_window, discrete.sliding_window
    for k in orphans:
        members = sorted(zip(*np.nonzero(hard_clusters == k)), key=lambda m: -seg[m[0], :, m[1]].sum())
        for c, s in members:
            start = grid.closest_frame(window[c].start + 0.5 * grid.duration)
            for f in np.flatnonzero(seg[c, :, s]):
                t = start + f
                if not 0 <= t < len(data) or data[t, k]:
                    continue
                # clusters this chunk itself hears at that frame keep it; another one gives way
                heard = {int(hard_clusters[c, o]) for o in np.flatnonzero(seg[c, f]) if o != s}
                others = [j for j in np.flatnonzero(data[t]) if j != k and j not in heard]
                if others:
                    data[t, others[0]] = 0
                    data[t, k] = 1


def _linked_spread(embeddings: np.ndarray, segmentations, min_iou: float = 0.7, max_lag: int = 3,
                   min_pairs: int = 10) -> float | None:
    """The recording's within-talker spread: median distance between the unit embeddings of rows
    the segmentation gives the same stretch of speech in chunks up to ``max_lag`` apart; None
    with fewer than ``min_pairs`` such pairs.

    Where two overlapping chunks give one stretch of speech to one local speaker each (their
    activities there agree: intersection over union at least ``min_iou``, each the other's best
    match, a second or more in common), the two rows are one talker, and each embeds its own 2 s
    from its chunk's middle: their distance is how far one talker's embeddings scatter in this
    recording. Median over the tuning sets: clean 0.71, room 0.79, noise 0.78, 8 kHz 0.68,
    telephone line 0.63 (docs/models.md).
    """
    data = np.nan_to_num(segmentations.data, nan=0.0) > 0.5
    num_chunks, num_frames, _ = data.shape
    window = segmentations.sliding_window
    shift = int(round(num_frames * window.step / window.duration))
    valid = ~np.isnan(embeddings).any(axis=2)
    unit = np.where(valid[..., None], embeddings, 0.0)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=2, keepdims=True), 1e-12)
    distances = []
    for d in range(1, max_lag + 1):
        lag = d * shift
        if shift <= 0 or lag >= num_frames or d >= num_chunks:
            break
        a = data[:-d, lag:, :].astype(np.float32)
        b = data[d:, : num_frames - lag, :].astype(np.float32)
        common = np.einsum("cfs,cft->cst", a, b)
        union = a.sum(axis=1)[:, :, None] + b.sum(axis=1)[:, None, :] - common
        iou = np.where(union > 0, common / np.maximum(union, 1), 0.0)
        mutual = (iou == iou.max(axis=2, keepdims=True)) & (iou == iou.max(axis=1, keepdims=True))
        linked = mutual & (iou >= min_iou) & (common >= num_frames / window.duration)
        linked &= valid[:-d, :, None] & valid[d:, None, :]
        c, s, t = np.nonzero(linked)
        distance = np.linalg.norm(unit[c, s] - unit[c + d, t], axis=1)
        distances.append(distance[distance > 1e-4])  # rows that share one embedding say nothing
    distances = np.concatenate(distances) if distances else np.zeros(0)
    return float(np.median(distances)) if len(distances) >= min_pairs else None


def _merge_spread(unit: np.ndarray, clusters: np.ndarray, threshold: float, extra: float,
                  apart: float | None = None) -> np.ndarray:
    """Merge clusters whose centroids are closer than the threshold once the noise of a centroid
    of few embeddings is allowed for: squared distance under threshold^2 + extra (1/n_A + 1/n_B),
    closest first.

    The mean of n embeddings of one talker is off their true centre by a squared distance of
    about sigma^2 / n (sigma^2: one embedding's spread), so two clusters of one talker lie about
    sigma^2 (1/n_A + 1/n_B) apart on top of whatever truly separates them. The threshold was
    tuned where that noise is the reference's; ``extra`` is the excess of this recording's
    (``ExactCountClustering.cluster``: lambda x (spread^2 - reference^2) / 2, a linked pair's
    squared distance being about 2 sigma^2). Clusters of 2-5 embeddings (a talker of a 55 s
    recording in a room) get most of it; clusters of a meeting's hundreds, none.
    """
    labels, clusters = np.unique(clusters, return_inverse=True)
    k = len(labels)
    sums = np.zeros((k, unit.shape[1]))
    np.add.at(sums, clusters, unit)
    counts = np.bincount(clusters, minlength=k).astype(np.float64)
    centroids = sums / counts[:, None]
    squares = (centroids**2).sum(axis=1)
    # squared centroid distances, k x k, kept up to date after each merge by the Lance-Williams
    # formula for centroid linkage: no (k, k, dim) array and no recomputation per merge (a noisy
    # hour's cut can leave hundreds of fragments)
    d2 = np.maximum(squares[:, None] + squares[None, :] - 2 * centroids @ centroids.T, 0.0)
    np.fill_diagonal(d2, np.inf)
    inv = 1.0 / counts
    # pairs of large clusters whose directions are too far apart to merge (_cut_directed); a
    # cluster merged from a vetoed one stays vetoed against the same clusters
    vetoed = np.zeros((k, k), dtype=bool)
    while True:
        margin = np.where(vetoed, np.inf, d2 - extra * (inv[:, None] + inv[None, :]))
        i, j = np.unravel_index(int(np.argmin(margin)), margin.shape)
        if not margin[i, j] < threshold**2:
            break
        if apart is not None and min(counts[i], counts[j]) >= LARGE_FOR_DIRECTION and \
                cosine(sums[i], sums[j]) > apart:
            vetoed[i, j] = vetoed[j, i] = True
            continue
        n_i, n_j = counts[i], counts[j]
        n = n_i + n_j
        merged = (n_i * d2[i] + n_j * d2[j]) / n - n_i * n_j * d2[i, j] / n**2
        d2[i, :] = d2[:, i] = merged
        d2[j, :] = d2[:, j] = np.inf
        d2[i, i] = np.inf
        counts[i], inv[i], inv[j] = n, 1.0 / n, 0.0
        sums[i] += sums[j]
        vetoed[i, :] |= vetoed[j, :]
        vetoed[:, i] |= vetoed[:, j]
        clusters[clusters == j] = i
    return np.unique(clusters, return_inverse=True)[1]


# embeddings a cluster needs before its mean direction, not its centroid, decides a merge
# (ExactCountClustering.reference_concentration)
LARGE_FOR_DIRECTION = 30


def _cut_directed(dendrogram: np.ndarray, unit: np.ndarray, threshold: float, apart: float) -> np.ndarray:
    """``fcluster(dendrogram, threshold, "distance")``, except that no flat cluster joins two
    clusters of :data:`LARGE_FOR_DIRECTION` embeddings or more whose mean directions lie more
    than ``apart`` (cosine distance) from each other; 0..K-1 labels.

    Centroid linkage compares means of unit vectors, whose length (the concentration) falls as a
    talker's embeddings scatter: in a reverberant room or under noise a large cluster's mean is
    0.75-0.8 long against 0.83-0.89 in clean speech, so two talkers whose directions lie as far
    apart as in clean speech (cosine distance 0.45-0.51) come within the threshold (0.74-0.80
    against 0.86) and an hour of four talkers came out as three. ``apart`` is the cosine distance
    the threshold allows at a clean concentration; a flat cluster is a subtree whose every merge
    is under the threshold (as fcluster's, centroid linkage not being monotonic) and none of
    them one of two such large clusters too far apart.
    """
    n = len(unit)
    nodes = n + len(dendrogram)
    sums = np.zeros((nodes, unit.shape[1]))
    sums[:n] = unit
    # each node's size (linkage's fourth column) and the highest merge in its subtree (what
    # fcluster's distance criterion compares with the threshold); leaves first
    sizes = np.concatenate([np.ones(n), dendrogram[:, 3]])
    top = np.concatenate([np.zeros(n), maxdists(dendrogram)])
    bad = np.zeros(nodes, dtype=bool)  # a vetoed merge in the subtree
    children = dendrogram[:, :2].astype(np.int64)
    for m, (a, b) in enumerate(children):
        node = n + m
        sums[node] = sums[a] + sums[b]
        bad[node] = bad[a] or bad[b] or (
            min(sizes[a], sizes[b]) >= LARGE_FOR_DIRECTION and cosine(sums[a], sums[b]) > apart)
    # numbered as fcluster numbers them (the order of the labels decides ties further on: which
    # of two kept speakers a fragment joins): depth first, a node's internal children (left, then
    # right) before its leaves
    clusters = np.empty(n, dtype=np.int64)
    label, stack = 0, [(nodes - 1, False)]
    while stack:
        node, expanded = stack.pop()
        left, right = children[node - n]
        if expanded:
            for leaf in (left, right):
                if leaf < n:
                    clusters[leaf] = label
                    label += 1
            continue
        if top[node] <= threshold and not bad[node]:
            members, pending = [], [node]
            while pending:
                x = pending.pop()
                if x < n:
                    members.append(x)
                else:
                    pending.extend(children[x - n])
            clusters[members] = label
            label += 1
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in (right, left) if child >= n)
    return clusters
