"""The analysis engine: one object per process that owns the models and runs the pipelines.

The worker, the CLI, the benchmarks and the tests all call this; none of it knows about HTTP or
Celery. Models are loaded lazily, once, and kept for the life of the process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine import runtime  # noqa: I001  (before torch is imported)

import torch  # noqa: E402

from engine import channel as line_channel
from engine.audio import Audio, AudioSource, load_audio, load_channel
from engine.models.loading import device_label, resolve_device
from engine.pipelines import identification as ident
from engine.pipelines.diarization import Diarization, Diarizer, ProgressCallback, Turn
from engine.pipelines.embedding import SpeakerEmbedder, cosine_similarity, l2_normalize
from engine.profiles import PROFILES, ModelProfile
from shared.errors import InputError
from shared.kinds import (
    CompareParams, DiarizeParams, EnrollParams, IdentifyParams, Params, VoiceprintRef, validate_params,
)
from shared.schemas import (
    CompareResponse, DiarizationResponse, DiarizationSegment, EmbeddingResponse, EnrollResponse, Identification,
    IdentifyResponse, SpeakerIdentity,
)
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

# the least speech a voice is embedded from: CAM++/ECAPA need a few hundred ms of frames, and
# less carries no voice anyway
MIN_EMBEDDED_S = 0.5


def _check(params: type[Params], **values: object) -> Params:
    # the engine is an edge too (CLI, benches, tests): the same models the API validates with
    return validate_params(params, values)


class Engine:
    def __init__(self, settings: Settings | None = None, device: str | None = None,
                 profile: ModelProfile | None = None):
        self.settings = settings or get_settings()
        self.device = resolve_device(device or self.settings.device)
        self.profile = profile or PROFILES[self.settings.model_profile]
        if self.device.type == "cpu":
            # a CPU worker never runs CUDA's libraries, which torch's import left resident
            # (engine.runtime: 224 MB of their pages on the AVX-512 host)
            runtime.drop_gpu_libraries()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.device.type == "cuda":
            # full float32 for every model from the first job on. torch leaves cuDNN's TF32 on by
            # default, and pyannote turns it off (its issue 1370) only inside its own pipeline
            # and inference calls: the embeddings of /embedding and /compare ran in TF32 until the
            # worker's first diarization, in float32 after it, so one request's score depended on
            # the jobs before it. Where TF32 pays and the DER holds, Settings.embedding_tf32 turns
            # it on for that block alone (engine.pipelines.embedded.tf32).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if self.device.type == "cuda" and self.settings.gpu_memory_fraction is not None:
            # several workers on one card: each stays inside its share (an allocation beyond
            # it fails that job with an out-of-memory error instead of the neighbour's)
            torch.cuda.set_per_process_memory_fraction(self.settings.gpu_memory_fraction, self.device)
        self._diarizer: Diarizer | None = None
        self._embedder: SpeakerEmbedder | None = None
        self._speech: ident.SpeechDetector | None = None
        self._lock = threading.Lock()
        self._decode_limit_s: float | None = None  # decoding_at_most

    # --- models ----------------------------------------------------------------------------
    def device_works(self) -> bool:
        """False once this process's CUDA context has failed; always True on the CPU.

        A device-side assert, an illegal memory access or a launch failure is sticky: every later
        CUDA call of the process fails with it, so a worker that went on would fail every job
        after it. An out-of-memory error is not: the context still works."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return bool((torch.ones(1, device=self.device) + 1).item() == 2)
        except Exception:  # noqa: BLE001 - whatever fails here, the context does
            return False

    def ran_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this engine's GPU running out of memory (torch's allocator, or the
        ``MemoryError`` pyannote makes of it), its cached blocks then handed back so that a next
        attempt finds them. False on the CPU, where running out of memory is the kernel's OOM
        killer, not an exception a job could wait out.

        Segmentation and CAM++ batches are retried in halves where they run out
        (``get_segmentations``, ``chunk_embeddings``); anything else that does (the recording's
        upload, a speech detector's batch, the fbank) meets what the card's other tenants hold
        at that moment, which the next attempt may not."""
        if self.device.type != "cuda":
            return False
        seen: BaseException | None = exc
        for _ in range(4):  # the error itself, or the one pyannote's MemoryError was raised from
            if seen is None:
                return False
            if isinstance(seen, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
                return True
            seen = seen.__cause__ or seen.__context__
        return False

    @property
    def model_device(self) -> str:
        return device_label(self.device)

    @property
    def default_threshold(self) -> float:
        if self.settings.verification_threshold is not None:
            return self.settings.verification_threshold
        return self.profile.default_threshold

    def verification_threshold(self, first: Audio, second: Audio) -> float:
        """The threshold a comparison of two recordings is decided at, when its caller gives none:
        the profile's for two telephone recordings (``Audio.narrowband``), else
        :attr:`default_threshold` (the operator's, if set, holds for both). ``/compare_embedding``
        keeps the default: a stored vector does not say what it was recorded at.

        CAM++ hears nothing above 4 kHz in a call, so every narrowband voice shares that much of
        its embedding: two different LibriSpeech readers, both at 8 kHz, scored 0.27 on average
        against 0.09 at 16 kHz, and 7.6-8.8 % of them passed the 0.45 threshold
        (docs/models.md, "Through a telephone line")."""
        narrowband = self.profile.narrowband_threshold
        if (self.settings.verification_threshold is None and narrowband is not None
                and first.narrowband and second.narrowband):
            return narrowband
        return self.default_threshold

    @property
    def identification_threshold(self) -> float:
        if self.settings.identification_threshold is not None:
            return self.settings.identification_threshold
        return self.profile.identification_threshold

    def identification_thresholds(self, audio: Audio, refs: list[VoiceprintRef], given: float | None = None
                                  ) -> tuple[np.ndarray, float, float | None]:
        """Per voiceprint, the threshold a recording's speaker must reach to be named after it; the
        answer's ``threshold`` and ``narrowband_threshold`` (None: every voiceprint held to ``threshold``).

        A caller's ``given`` threshold, or the operator's (``identification_threshold``), holds for
        every voiceprint. Otherwise a telephone recording (``Audio.narrowband``) is held to the
        profile's ``narrowband_identification_threshold`` against voiceprints enrolled from telephone
        recordings (``VoiceprintRef.narrowband``): through the line every CAM++ voice shares the
        band below 4 kHz, other readers scored a median 0.52 against such voiceprints, and at the
        default 0.50 a never-enrolled caller was named in 99.5 % of 20-voiceprint jobs
        (docs/models.md, "Through a telephone line"). Against every other voiceprint the default
        holds: a call against a microphone voiceprint scores lower, not higher."""
        if given is not None:
            return np.full(len(refs), given, dtype=np.float64), given, None
        default = self.identification_threshold
        narrowband = self.profile.narrowband_identification_threshold
        if (self.settings.identification_threshold is not None or narrowband is None or not audio.narrowband
                or not any(r.narrowband for r in refs)):
            return np.full(len(refs), default, dtype=np.float64), default, None
        per = np.asarray([narrowband if r.narrowband else default for r in refs], dtype=np.float64)
        return per, (narrowband if all(r.narrowband for r in refs) else default), narrowband

    @property
    def embedding_model(self) -> str:
        return self.profile.embedding_model

    @property
    def diarization_loaded(self) -> bool:
        return self._diarizer is not None

    @property
    def verification_loaded(self) -> bool:
        return self._embedder is not None

    @property
    def diarizer(self) -> Diarizer:
        with self._lock:
            if self._diarizer is None:
                self._diarizer = Diarizer(
                    self._load_diarization_pipeline(), self.device, self.settings.diarization_min_speaker_s
                )
            return self._diarizer

    @property
    def embedder(self) -> SpeakerEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            return self._embedder

    @property
    def speech_detector(self) -> ident.SpeechDetector:
        diarizer = self.diarizer
        with self._lock:
            if self._speech is None:
                segmentation = diarizer.pipeline._segmentation
                self._speech = ident.SpeechDetector(segmentation.model, self.device, step=segmentation.step,
                                                    lanes=getattr(diarizer.pipeline, "lanes", None))
            return self._speech

    def load_models(self) -> "Engine":
        """Load everything now (worker start-up), rather than on the first job; on a GPU, warm
        the models up too (``warm_up``, ``Settings.model_warm_up``)."""
        _ = self.diarizer, self.embedder
        warm = self.settings.model_warm_up
        if warm or (warm is None and self.device.type == "cuda"):
            try:
                self.warm_up()
            except Exception:  # noqa: BLE001 - a job meets the same failure and reports it as its own
                log.warning("the models' warm-up failed", exc_info=True)
        # tracing CAM++ and loading checkpoints leave ~80 MB of freed heap that glibc would keep
        runtime.release_memory()
        return self

    def warm_up(self) -> float | None:
        """Diarize pyannote's own sample (30 s of two talkers, shipped inside pyannote.audio) and
        compare its halves, once; the seconds it took, or None without the sample.

        On a GPU the first job of a process pays for what CUDA sets up on first use: cuDNN's and
        cuBLAS's handles, each kernel the models run (CUDA loads them lazily), the LSTM's cuDNN
        descriptors; a fresh worker (the autoscaler starts them as jobs queue) would add that to
        a user's first hour. Real speech, so that every model runs: noise gives CAM++ nothing."""
        import pyannote.audio

        sample = Path(pyannote.audio.__file__).parent / "sample" / "sample.wav"
        if not sample.is_file():
            log.warning("no warm-up: pyannote.audio's sample is not installed (%s)", sample)
            return None
        started = time.perf_counter()
        audio = self.load(sample)
        half = len(audio.samples) // 2
        self.diarize(audio)
        self.compare(Audio(audio.samples[:half], audio.sample_rate), Audio(audio.samples[half:], audio.sample_rate))
        seconds = time.perf_counter() - started
        log.info("models warmed up on %s in %.1fs", self.model_device, seconds)
        return seconds

    def _load_diarization_pipeline(self):
        return self.profile.load_diarization(self.settings, self.device)

    def _load_embedder(self) -> SpeakerEmbedder:
        return self.profile.load_embedder(self.settings, self.device)

    # --- audio -----------------------------------------------------------------------------
    def load(self, source: AudioSource | Audio, field: str | None = None) -> Audio:
        """``source`` decoded; where a kind takes several recordings, ``field`` names this one in
        a refusal ("file2: audio is silent ..."), which otherwise leaves the caller guessing."""
        if isinstance(source, Audio):
            return source
        try:
            return load_audio(source, max_duration=self._decode_limit, min_duration=self.settings.min_audio_seconds)
        except InputError as exc:
            if field is None:
                raise
            raise exc.about(field) from exc

    @property
    def _decode_limit(self) -> float:
        """How long a file may decode to: the settings' limit, or the job's own (decoding_at_most)."""
        limit = self.settings.max_audio_seconds
        return limit if self._decode_limit_s is None else min(limit, self._decode_limit_s)

    @contextlib.contextmanager
    def decoding_at_most(self, seconds: float) -> Iterator[None]:
        """Inside the block, no file is decoded past ``seconds`` (the job's own limit: a
        synchronous request's 30 min, not the 24 h of a queued job).

        A header's length is an estimate where the container has none (MP3 without a Xing frame,
        AMR: FFmpeg guesses it from the first frames' bitrate), and unknown where an ADTS AAC's
        frames cannot all be counted (shared.audio_limits.adts_length). 100 loud frames and
        then quiet ones made 606 s of audio that the API and the worker's header check took for
        18 s, and a synchronous request then decoded it to the 24 h limit. Held to its limit as it
        decodes, it is refused as too long (413) instead."""
        saved = self._decode_limit_s
        self._decode_limit_s = seconds if saved is None else min(saved, seconds)
        try:
            yield
        finally:
            self._decode_limit_s = saved

    @contextlib.contextmanager
    def one_job(self) -> Iterator[None]:
        """The block is one job: on the way out, the heap it freed is handed back to the system.

        glibc keeps freed memory for the next allocation, so without this a worker's resident
        memory between jobs held whatever its largest recent jobs had freed, and moved by steps
        from job to job: 80 embedding jobs of 2-8 s grew a worker's anonymous memory by 0-17 MB,
        as much as a kept clip per job would have (tests/test_reliability.py). Handed back after
        each, it moved by under 0.1 MB in four runs, for a few milliseconds a job."""
        try:
            yield
        finally:
            runtime.release_memory()

    # --- tasks -----------------------------------------------------------------------------
    def diarize(
        self,
        source: AudioSource | Audio,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        min_duration: float | None = None,
        exclusive: bool = False,
        voiceprints: list[VoiceprintRef] | list[dict] | None = None,
        identification_threshold: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> DiarizationResponse:
        """Who spoke when; ``exclusive``: one speaker at a time (no overlapping turns);
        ``voiceprints``: name the speakers after the enrolled people they match."""
        checked = _check(DiarizeParams, num_speakers=num_speakers, min_speakers=min_speakers,
                         max_speakers=max_speakers, min_duration=min_duration, exclusive=exclusive,
                         voiceprints=voiceprints, identification_threshold=identification_threshold)
        refs = self._usable(checked.voiceprints) if checked.voiceprints else None
        started = time.perf_counter()
        position = source.tell() if hasattr(source, "seek") and not isinstance(source, Audio) else None
        audio = self.load(source)
        two = None
        if self._two_talkers_possible(num_speakers, min_speakers, max_speakers):
            two = self.talker_channels(source, audio, position)
        if two is not None:
            result = self._diarize_channels(two, min_duration=min_duration or 0.0, exclusive=exclusive,
                                            progress=progress)
        else:
            result = self.diarizer.run(
                audio,
                num_speakers=num_speakers,
                min_speakers=min_speakers,
                max_speakers=max_speakers,
                min_duration=min_duration or 0.0,
                exclusive=exclusive,
                progress=progress,
            )
        turns: list[Turn] = result.turns
        identities: dict[str, str | None] = {}
        speakers = info = None
        if refs is not None:
            named = time.perf_counter()
            per, threshold, narrowband = self.identification_thresholds(audio, refs, identification_threshold)
            own = None if two is None else {"SPEAKER_00": two[0], "SPEAKER_01": two[1]}
            speakers = self.name_speakers(audio, turns, result.speech, refs, per, own)
            identities = {s.speaker: s.identity for s in speakers}
            info = Identification(threshold=threshold, narrowband_threshold=narrowband,
                                  model=self.embedding_model, voiceprints=len(refs),
                                  processing_time=round(time.perf_counter() - named, 4))
            if progress is not None:
                progress("identification", 1.0)
        return DiarizationResponse(
            diarization_results=[
                DiarizationSegment(start=t.start, end=t.end, speaker=t.speaker, identity=identities.get(t.speaker))
                for t in turns
            ],
            segments_count=len(turns),
            speakers=speakers,
            identification=info,
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(audio.duration, 4),
            model_device=self.model_device,
        )

    # --- stereo calls: one talker a channel -------------------------------------------------
    def _two_talkers_possible(self, num_speakers: int | None, min_speakers: int | None,
                              max_speakers: int | None) -> bool:
        if not self.settings.diarize_by_channel:
            return False
        if num_speakers is not None:
            return num_speakers == 2
        return (min_speakers is None or min_speakers <= 2) and (max_speakers is None or max_speakers >= 2)

    def talker_channels(self, source: AudioSource | Audio, audio: Audio,
                        position: int | None = None) -> tuple[Audio, Audio] | None:
        """(left, right) of a two-channel recording whose channels each carry a talker of their
        own (engine.channel.separated), else None. The left channel is decoded again alone; the
        right is what the mean leaves (2 x mean - left: decoding and resampling are linear), so a
        stereo file costs one more decode, a mono one nothing."""
        if audio.channels != 2 or isinstance(source, Audio):
            return None
        if position is not None:
            source.seek(position)  # type: ignore[union-attr]
        try:
            left = load_channel(source, 0, max_duration=self._decode_limit, min_duration=0.0)
        except InputError as exc:  # what decoded as a mean is diarized as one, as before
            log.info("stereo recording's left channel did not decode alone (%s): diarized on the mix", exc)
            return None
        n = min(len(left.samples), len(audio.samples))
        if n == 0:
            return None
        # a block at a time, as stored: float32 copies of an hour's mean and left would be 460 MB
        right = np.empty(n, dtype=audio.samples.dtype)
        step = 1 << 20
        for first in range(0, n, step):
            last = min(n, first + step)
            block = 2 * audio.samples[first:last].astype(np.float32) - left.samples[first:last].astype(np.float32)
            right[first:last] = np.clip(block, -1.0, 1.0)
        pair = (Audio(left.samples[:n]), Audio(right))
        if not line_channel.separated(pair[0].samples, pair[1].samples):
            return None
        log.info("stereo recording with a talker on each channel: diarized by its channels")
        return pair

    def _diarize_channels(self, pair: tuple[Audio, Audio], *, min_duration: float, exclusive: bool,
                          progress: ProgressCallback | None = None) -> Diarization:
        """Each channel's speech is its own talker's: SPEAKER_00 the left channel's, SPEAKER_01
        the right's. ``exclusive``: where both speak, the turn already under way keeps the time."""
        regions = []
        for k, (mine, other) in enumerate((pair, pair[::-1])):
            found = self.speech_detector(mine)
            regions.append(line_channel.own_speech(found, mine.samples, other.samples))
            if progress is not None:
                progress("segmentation", 0.5 * (k + 1))
        end = math.floor(pair[0].duration * 1000) / 1000
        turns = [Turn(round(s, 3), round(min(e, end), 3), f"SPEAKER_{k:02d}")
                 for k, found in enumerate(regions) for s, e in found if min(e, end) > s]
        turns.sort(key=lambda t: (t.start, t.end))
        if exclusive:
            cut: list[Turn] = []
            busy_until = 0.0
            for t in turns:  # in start order: a turn loses the part heard over an earlier one
                start = max(t.start, busy_until)  # a channel's own regions never overlap
                if t.end > start:
                    cut.append(Turn(round(start, 3), t.end, t.speaker))
                busy_until = max(busy_until, t.end)
            turns = cut
        turns = [t for t in turns if t.end - t.start >= min_duration]
        if progress is not None:
            progress("discrete_diarization", 1.0)
        # each talker's speech for naming it: its own channel, overlap included (the other talker
        # is on the other channel)
        speech = {name: [(t.start, t.end) for t in turns if t.speaker == name]
                  for name in dict.fromkeys(t.speaker for t in turns)}
        return Diarization(turns, speech)

    # --- voiceprints -----------------------------------------------------------------------
    def _usable(self, voiceprints: list[VoiceprintRef] | list[dict]) -> list[VoiceprintRef]:
        """The job's voiceprints, refused unless they come from this worker's embedding model."""
        refs = [v if isinstance(v, VoiceprintRef) else VoiceprintRef.model_validate(v) for v in voiceprints]
        dimension = self.embedder.dimension
        for ref in refs:
            if ref.model != self.embedding_model or len(ref.embedding) != dimension:
                raise InputError(
                    f"voiceprint {ref.id} ({ref.label!r}) was made with {ref.model!r} ({len(ref.embedding)}-dim); "
                    f"this worker embeds with {self.embedding_model!r} ({dimension}-dim)"
                )
        return refs

    def speech_vector(self, audio: Audio, regions: list[tuple[float, float]] | None = None,
                      max_s: float | None = None) -> tuple[np.ndarray | None, float]:
        """(unit embedding of the detected speech, or None when there is too little to embed;
        seconds of speech embedded). ``regions`` defaults to what the speech detector finds."""
        if regions is None:
            regions = self.speech_detector(audio)
        samples = ident.cut(audio, regions, max_s)
        speech_s = len(samples) / audio.sample_rate
        if speech_s < MIN_EMBEDDED_S:
            return None, round(speech_s, 3)
        return ident.unit(self.embedder.embed(Audio(samples))), round(speech_s, 3)

    def speaker_vectors(self, audio: Audio, turns: list[Turn], speech: dict[str, list[tuple[float, float]]],
                        own: dict[str, Audio] | None = None) -> tuple[dict[str, np.ndarray | None], dict[str, float]]:
        """Per reported speaker: the unit embedding of its own non-overlapped speech (None with
        less than identification_min_speech_s), and the seconds embedded. ``own``: a speaker's
        own recording (its channel of a stereo call) to embed instead of ``audio``."""
        order = list(dict.fromkeys(t.speaker for t in turns))
        if any(not speech.get(name) for name in order):
            speech = {**ident.exclusive_regions(turns), **{k: v for k, v in speech.items() if v}}
        vectors: dict[str, np.ndarray | None] = {}
        secs: dict[str, float] = {}
        for name in order:
            regions = speech.get(name, [])
            if ident.seconds(regions) < self.settings.identification_min_speech_s:
                vectors[name], secs[name] = None, round(ident.seconds(regions), 3)
                continue
            vectors[name], secs[name] = self.speech_vector((own or {}).get(name, audio), regions,
                                                           self.settings.identification_max_speech_s)
        return vectors, secs

    def name_speakers(self, audio: Audio, turns: list[Turn], speech: dict[str, list[tuple[float, float]]],
                      refs: list[VoiceprintRef], threshold: float | np.ndarray, own: dict[str, Audio] | None = None
                      ) -> list[SpeakerIdentity]:
        """Each diarized speaker's identity: its own speech embedded, then the optimal assignment.
        ``threshold``: one for all voiceprints, or one per voiceprint (identification_thresholds)."""
        order = list(dict.fromkeys(t.speaker for t in turns))
        vectors, secs = self.speaker_vectors(audio, turns, speech, own)
        scored = [n for n in order if vectors[n] is not None]
        prints = np.asarray([r.embedding for r in refs], dtype=np.float32)
        matrix = ident.score_matrix(np.stack([vectors[n] for n in scored]), prints) if scored else np.zeros((0, len(refs)))
        assigned = ident.assign(matrix, threshold)
        out = []
        for name in order:
            if vectors[name] is None:
                out.append(SpeakerIdentity(speaker=name, identity=None, voiceprint_id=None, confidence=None,
                                           runner_up=None, speech_seconds=secs[name]))
                continue
            row = scored.index(name)
            out.append(SpeakerIdentity(speaker=name, speech_seconds=secs[name],
                                       **ident.describe(matrix[row], assigned[row], refs)))
        return out

    def enroll(self, sources: list[AudioSource | Audio], *, label: str) -> EnrollResponse:
        """One voiceprint from recordings of one person: each file's speech embedded, the unit
        vectors averaged weighted by speech, the mean normalised again."""
        _check(EnrollParams, label=label)
        if not sources:
            raise InputError("files: at least one recording is required")
        started = time.perf_counter()
        vectors, weights, per_file, duration, narrowband = [], [], [], 0.0, True
        for n, source in enumerate(sources):
            audio = self.load(source, f"file {n + 1} of {len(sources)}" if len(sources) > 1 else None)
            duration += audio.duration
            vector, speech_s = self.speech_vector(audio)
            per_file.append(speech_s)
            if vector is not None:
                vectors.append(vector)
                weights.append(speech_s)
                # of the files the vector is made of: a microphone clip too short to embed beside
                # telephone calls made a voiceprint of calls alone a microphone one, matched at
                # the default threshold that names nearly every caller over the line
                narrowband = narrowband and audio.narrowband
        # the speech the vector is made of: a file with too little to embed (under MIN_EMBEDDED_S)
        # was counted too, so 19 clips of 0.3 s and one of 1 s passed the 3 s minimum (7.4 s
        # detected) with a vector of 1.7 s of speech, and the voiceprint said 7.4 s
        total = round(sum(weights), 3)
        needed = self.settings.voiceprint_min_speech_s
        if total < needed or not vectors:
            detected, least = shortfall(total, needed)
            short = sum(1 for s in per_file if 0 < s < MIN_EMBEDDED_S)
            raise InputError(
                f"too little speech for a voiceprint: {detected} s detected in {len(sources)} file(s)"
                + (f" ({short} file(s) under {MIN_EMBEDDED_S} s of speech each, too little to embed, not counted)"
                   if short else "")
                + f", at least {least} s of the person speaking are needed (more gives a steadier voiceprint)"
            )
        mean = ident.unit(np.average(np.stack(vectors), axis=0, weights=np.asarray(weights)))
        # every file at 8 kHz or less: a telephone recording is matched against it at the
        # narrowband identification threshold (identification_thresholds)
        return EnrollResponse(
            label=label, model=self.embedding_model, dimension=int(mean.shape[0]),
            embedding=[float(x) for x in mean], speech_seconds=total, file_speech_seconds=per_file,
            narrowband=narrowband,
            processing_time=round(time.perf_counter() - started, 4), audio_duration=round(duration, 4),
            model_device=self.model_device,
        )

    def identify(self, source: AudioSource | Audio, voiceprints: list[VoiceprintRef] | list[dict], *,
                 threshold: float | None = None) -> IdentifyResponse:
        """The best-matching voiceprint for the speech of one recording, if it passes the threshold."""
        checked = _check(IdentifyParams, voiceprints=voiceprints, threshold=threshold)
        refs = self._usable(checked.voiceprints)
        started = time.perf_counter()
        audio = self.load(source)
        per, threshold, narrowband = self.identification_thresholds(audio, refs, threshold)
        vector, speech_s = self.speech_vector(audio)
        needed = self.settings.identification_min_speech_s
        if vector is None or speech_s < needed:
            detected, least = shortfall(speech_s, needed)
            raise InputError(f"too little speech to identify: {detected} s detected, at least {least} s needed")
        scores = ident.score_matrix(vector[None], np.asarray([r.embedding for r in refs], dtype=np.float32))[0]
        # the best margin over its own threshold (one threshold: the best score, if it reaches it)
        match = ident.describe(scores, ident.assign(scores[None], per)[0], refs)
        return IdentifyResponse(
            **match, speech_seconds=speech_s, threshold=threshold, narrowband_threshold=narrowband,
            model=self.embedding_model, voiceprints=len(refs),
            processing_time=round(time.perf_counter() - started, 4), audio_duration=round(audio.duration, 4),
            model_device=self.model_device,
        )

    def embedding_vector(self, source: AudioSource | Audio) -> tuple[np.ndarray, Audio]:
        """The embedding of the recording's speech (``_embed_speech``), and the recording."""
        audio = self.load(source)
        return self._embed_speech(audio, self.speech_detector(audio)), audio

    def _embed_speech(self, audio: Audio, regions: list[tuple[float, float]]) -> np.ndarray:
        """The embedding of ``regions`` of the recording (what the speech detector heard, cut
        together), or of the whole recording where they hold too little to embed (a tone, hum).

        Embedded whole, the pauses and the background were half of what CAM++ heard: 8 s of the
        same room noise around each of 120 LibriSpeech readers' utterances took the mean
        different-speaker score from 0.10 to 0.24 and the false accepts at the 0.45 threshold
        from 0.27 % to 5.2 % (two callers on one line, one hold music, sound alike); of their
        speech alone, 0.096 and 0.25 %, as without the noise (docs/models.md, "Verification
        threshold")."""
        samples = ident.cut(audio, regions)
        if len(samples) < MIN_EMBEDDED_S * audio.sample_rate:
            return self.embedder.embed(audio)
        return self.embedder.embed(Audio(samples, audio.sample_rate))

    def embed(self, source: AudioSource | Audio, *, normalize: bool = True) -> EmbeddingResponse:
        started = time.perf_counter()
        vector, audio = self.embedding_vector(source)
        if normalize:
            vector = l2_normalize(vector)
        return EmbeddingResponse(
            embedding=[float(x) for x in vector],
            normalized=normalize,
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(audio.duration, 4),
            model_device=self.model_device,
        )

    def require_speech(self, audio: Audio, field: str) -> list[tuple[float, float]]:
        """The speech detector's regions of the recording, refused (422) when it hears no speech
        at all, before a verification decides anything from it; the caller embeds those regions
        (``_embed_speech``), so the detector runs once per file.

        A stationary sound has the same embedding whatever it is: mean-normalised filterbanks
        of a tone, mains hum or a DC offset are all zeros, so CAM++ gave 50 Hz hum and a 1 kHz
        tone a similarity of 1.000 and two recordings of -60 dBFS room noise 0.998, and /compare
        said same_speaker=true for two files without a voice in them. The detector (the one
        identification and enrollment use) finds none in those and all of a real utterance,
        down to -75 dBFS.

        Nor is a voice verified from less speech than can be embedded alone (``MIN_EMBEDDED_S``,
        0.5 s): under it the whole recording was embedded, its silence with it, and 3 s holding
        0.25 s of a reader's voice scored 0.105 against that reader (200, same_speaker false).
        Over 250 same-reader trials of 1-3 s clips, at the 0.45 threshold, clips with 0.5-0.75 s
        of speech were rejected 64 % of the time, 0.75-1 s 11 %, none with more than 1 s, and no
        other reader was accepted at any length: such a score is weak but not wrong, and short
        answers ("yes", a name) are what some verification clients send, so they are scored
        (``identify``, which names a person, keeps its 1 s, ``identification_min_speech_s``)."""
        regions = self.speech_detector(audio)
        speech_s = ident.seconds(regions)
        if speech_s <= 0:
            raise InputError(f"{field}: no speech detected in its {audio.duration:.1f} s: "
                             "a voice cannot be verified from a recording without one")
        needed = MIN_EMBEDDED_S
        if speech_s < needed:
            detected, least = shortfall(speech_s, needed)
            raise InputError(f"{field}: too little speech to verify: {detected} s detected in its "
                             f"{audio.duration:.1f} s, at least {least} s needed")
        return regions

    def compare(
        self, first: AudioSource | Audio, second: AudioSource | Audio, *, threshold: float | None = None
    ) -> CompareResponse:
        _check(CompareParams, threshold=threshold)
        started = time.perf_counter()
        audio_a, audio_b = self.load(first, "file1"), self.load(second, "file2")
        if threshold is None:
            threshold = self.verification_threshold(audio_a, audio_b)
        speech_a = self.require_speech(audio_a, "file1")
        speech_b = self.require_speech(audio_b, "file2")
        a = self._embed_speech(audio_a, speech_a)
        b = self._embed_speech(audio_b, speech_b)
        return self._decision(cosine_similarity(a, b), threshold, started, audio_a.duration + audio_b.duration)

    def compare_embedding(
        self, source: AudioSource | Audio, reference: np.ndarray, *, threshold: float | None = None
    ) -> CompareResponse:
        threshold = self.default_threshold if threshold is None else threshold
        _check(CompareParams, threshold=threshold)
        dim = self.settings.embedding_dimension
        reference = np.asarray(reference, dtype=np.float64).reshape(-1)
        if reference.shape != (dim,):
            raise InputError(f"stored embedding has {reference.size} values; {dim} are expected")
        if not np.all(np.isfinite(reference)) or not np.any(reference):
            raise InputError("stored embedding must be finite and not all zero")
        started = time.perf_counter()
        audio = self.load(source)
        vector = self._embed_speech(audio, self.require_speech(audio, "audio"))
        return self._decision(cosine_similarity(vector, reference), threshold, started, audio.duration)

    def _decision(self, score: float, threshold: float, started: float, duration: float) -> CompareResponse:
        # decided on the score as reported (the contract: same_speaker is similarity_score >=
        # threshold): the same file twice at threshold 1 scored just under 1 and was answered
        # similarity_score 1.0, same_speaker false
        score = round(float(score), ident.SCORE_DECIMALS)
        return CompareResponse(
            similarity_score=score,
            same_speaker=score >= threshold,
            threshold=threshold,
            processing_time=round(time.perf_counter() - started, 4),
            audio_duration=round(duration, 4),
            model_device=self.model_device,
        )


def shortfall(detected: float, needed: float) -> tuple[str, str]:
    """Speech found and speech needed, to a tenth of a second, rounded apart (found down, needed
    up): rounded to nearest, 2.96 s of a 3 s minimum read "3.0 s detected, at least 3.0 s needed"."""
    return f"{math.floor(detected * 10) / 10:.1f}", f"{math.ceil(round(needed * 10, 6)) / 10:.1f}"


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine (one per worker process)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def built_engine() -> Engine | None:
    """The process-wide engine if it was built, without building it (a worker whose engine failed
    to build reports that in its heartbeat instead of failing the heartbeat too)."""
    return _engine
