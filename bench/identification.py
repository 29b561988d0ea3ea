"""Known speakers by name, on real speech: how much speech gets the right name, how often a
talker without a voiceprint is named anyway, and what naming adds to a diarization job.

The 249 LibriSpeech readers of ../shared/data/speech/librispeech-train-clean (one utterance
each) are split in two: even positions (sorted by reader id) calibrate, odd positions evaluate.
Each reader's trimmed utterance is cut in half: the first half enrolls a voiceprint (the engine's
``enroll``, as ``POST /voiceprints`` runs it), the second half is that reader's speech in the
conversations. Each conversation (``evaluation.speech.many_talker_conversation``) has
``--enrolled`` readers whose voiceprints the job gets, one reader whose voiceprint it does not get
(the unenrolled talker), and the job's voiceprints also hold ``--distractors`` other readers of
the same split, as a tenant's ``voiceprints=all`` would.

Printed, at 10 ms frames against the exact reference:

- right name: share of the enrolled talkers' speech covered by a segment carrying their name;
- wrong name: share of it covered by a segment carrying another name;
- false acceptance: share of the unenrolled talker's solo speech covered by a named segment, and
  the share of conversations in which most of it was named (talker level);
- time added: the same diarization with and without voiceprints (warm, same audio), and the
  identification step's own time from the result.

``--calibrate`` first sweeps the threshold on the calibration conversations (speaker embeddings
computed once, the assignment redone per threshold) and picks the one that maximises right name
minus false acceptance; the evaluation then runs at that threshold. Without it the evaluation runs
at the profile's ``identification_threshold``. Also printed: ``identify`` on the evaluation
readers' second halves against all their voiceprints (top-1 accepted and right; with the reader's
own voiceprint removed, the share accepted as someone else).

    .venv/bin/python bench/identification.py --calibrate
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.audio import Audio  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.pipelines import identification as ident  # noqa: E402
from evaluation.speech import Clip, librispeech_clips, many_talker_conversation  # noqa: E402
from shared.kinds import VoiceprintRef  # noqa: E402
from shared.errors import InputError  # noqa: E402
from evaluation.conditions import add_noise, telephone  # noqa: E402

STEP = 0.01


def enroll_all(engine: Engine, clips: list[Clip]) -> tuple[dict[str, VoiceprintRef], dict[str, Clip], list[str]]:
    prints, tests, refused = {}, {}, []
    for clip in clips:
        half = len(clip.samples) // 2
        try:
            r = engine.enroll([Audio(clip.samples[:half])], label=clip.speaker)
        except InputError:
            refused.append(clip.speaker)
            continue
        prints[clip.speaker] = VoiceprintRef(id=f"vp_{clip.speaker}", label=clip.speaker, model=r.model,
                                             embedding=r.embedding)
        tests[clip.speaker] = Clip(clip.speaker, clip.samples[half:])
    return prints, tests, refused


def conversations(prints: dict[str, VoiceprintRef], tests: dict[str, Clip], n: int, enrolled: int,
                  distractors: int, seed: int):
    """(audio, reference, the job's voiceprints, enrolled talkers, unenrolled talker) per conversation."""
    rng = np.random.default_rng(seed)
    names = sorted(prints)
    for i in range(n):
        chosen = [str(x) for x in rng.choice(names, size=enrolled + 1 + distractors, replace=False)]
        talkers, outsider, others = chosen[:enrolled], chosen[enrolled], chosen[enrolled + 1:]
        samples, reference = many_talker_conversation(enrolled + 1, clips=[tests[t] for t in talkers + [outsider]],
                                                      seed=seed * 1000 + i)
        job_prints = [prints[t] for t in talkers + others]
        order = rng.permutation(len(job_prints))
        yield Audio(samples), reference, [job_prints[j] for j in order], talkers, outsider


def _frames(segments, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for start, end in segments:
        mask[int(round(start / STEP)): int(round(end / STEP))] = True
    return mask


def score(reference, turns, identities: dict[str, str | None], talkers: list[str], outsider: str, duration: float):
    """Seconds and counts of one conversation (summed by :func:`summarise`)."""
    n = int(duration / STEP) + 1
    ref = {label: _frames([(s.start, s.end) for s in reference.label_timeline(label)], n) for label in reference.labels()}
    named: dict[str, np.ndarray] = {}
    by_speaker: dict[str, np.ndarray] = {}
    for t in turns:
        mask = _frames([(t.start, t.end)], n)
        by_speaker.setdefault(t.speaker, np.zeros(n, dtype=bool))
        by_speaker[t.speaker] |= mask
        name = identities.get(t.speaker)
        if name is not None:
            named.setdefault(name, np.zeros(n, dtype=bool))
            named[name] |= mask
    any_named = np.zeros(n, dtype=bool)
    for mask in named.values():
        any_named |= mask
    # each reported speaker stands for the talker it overlaps most
    majority = {s: max(ref, key=lambda label: int((ref[label] & m).sum())) for s, m in by_speaker.items()}
    out = dict.fromkeys(("right", "wrong", "total", "ceiling", "fa", "solo", "spk_enrolled", "spk_right",
                         "spk_wrong", "spk_outsider", "spk_fa"), 0.0)
    for t in talkers:
        own = named.get(t, np.zeros(n, dtype=bool))
        out["right"] += (ref[t] & own).sum() * STEP
        out["wrong"] += (ref[t] & any_named & ~own).sum() * STEP
        out["total"] += ref[t].sum() * STEP
        theirs = np.zeros(n, dtype=bool)
        for s, m in by_speaker.items():
            if majority[s] == t:
                theirs |= m
        out["ceiling"] += (ref[t] & theirs).sum() * STEP
    others = np.zeros(n, dtype=bool)
    for label, mask in ref.items():
        if label != outsider:
            others |= mask
    solo = ref[outsider] & ~others
    out["fa"], out["solo"] = (solo & any_named).sum() * STEP, solo.sum() * STEP
    for s, talker in majority.items():
        name = identities.get(s)
        if talker == outsider:
            out["spk_outsider"] += 1
            out["spk_fa"] += name is not None
        else:
            out["spk_enrolled"] += 1
            out["spk_right"] += name == talker
            out["spk_wrong"] += name is not None and name != talker
    return out


def summarise(rows) -> dict[str, float]:
    t = {k: sum(r[k] for r in rows) for k in rows[0]}
    return {
        "right": t["right"] / t["total"], "wrong": t["wrong"] / t["total"], "ceiling": t["ceiling"] / t["total"],
        "fa": t["fa"] / max(t["solo"], 1e-9),
        "spk_right": t["spk_right"] / max(t["spk_enrolled"], 1), "spk_wrong": t["spk_wrong"] / max(t["spk_enrolled"], 1),
        "spk_fa": t["spk_fa"] / max(t["spk_outsider"], 1), "spk_enrolled": t["spk_enrolled"],
        "spk_outsider": t["spk_outsider"],
    }


def calibrate(engine: Engine, convs) -> float:
    cached = []
    for audio, reference, refs, talkers, outsider in convs:
        result = engine.diarizer.run(audio)
        vectors, _ = engine.speaker_vectors(audio, result.turns, result.speech)
        order = [s for s, v in vectors.items() if v is not None]
        matrix = ident.score_matrix(np.stack([vectors[s] for s in order]), np.asarray([r.embedding for r in refs]))
        cached.append((reference, result.turns, order, matrix, refs, talkers, outsider, audio.duration))
    print("\ncalibration sweep: share of enrolled talkers' speech named right / wrong, of the unenrolled")
    print("talker's solo speech named (FA); per reported speaker (standing for the talker it overlaps most):")
    print("enrolled talkers' speakers named right / wrong, the unenrolled talker's speakers named (FA)")
    print("  thr     right   wrong   FA      spk right  spk wrong  spk FA   right-FA")
    sweep = []
    for threshold in np.arange(0.20, 0.701, 0.025):
        rows = []
        for reference, turns, order, matrix, refs, talkers, outsider, duration in cached:
            assigned = ident.assign(matrix, float(threshold))
            identities = {s: (refs[a].label if a is not None else None) for s, a in zip(order, assigned)}
            rows.append(score(reference, turns, identities, talkers, outsider, duration))
        m = summarise(rows)
        sweep.append((float(threshold), m["right"] - m["fa"]))
        print(f"  {threshold:.3f}   {m['right']:.3f}   {m['wrong']:.3f}   {m['fa']:.3f}   {m['spk_right']:.3f}      "
              f"{m['spk_wrong']:.3f}      {m['spk_fa']:.3f}    {m['right'] - m['fa']:.3f}")
    best = max(objective for _, objective in sweep)
    # the middle of the plateau rather than its first point: equal objectives over a range
    plateau = [t for t, objective in sweep if objective >= best - 0.005]
    chosen = round(statistics.median(plateau) / 0.025) * 0.025
    print(f"best right-FA {best:.3f}; within 0.005 of it: {plateau[0]:.3f}..{plateau[-1]:.3f}; chosen {chosen:.3f}")
    return chosen


def evaluate(engine: Engine, convs, threshold: float) -> None:
    rows, added, steps, durations, found = [], [], [], [], []
    for audio, reference, refs, talkers, outsider in convs:
        t = time.perf_counter()
        engine.diarize(audio)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        result = engine.diarize(audio, voiceprints=refs, identification_threshold=threshold)
        named = time.perf_counter() - t
        added.append(named - plain)
        steps.append(result.identification.processing_time)
        durations.append(plain)
        identities = {s.speaker: s.identity for s in result.speakers}
        found.append((len(result.speakers), len(talkers) + 1))
        rows.append(score(reference, result.diarization_results, identities, talkers, outsider, audio.duration))
    m = summarise(rows)
    print(f"\nevaluation at threshold {threshold:.3f}: {len(rows)} conversations, {len(convs[0][2])} voiceprints each")
    print(f"  right name: {m['right']:.1%} of enrolled talkers' speech (ceiling set by the diarization: "
          f"{m['ceiling']:.1%} lies in a speaker that stands for its talker); wrong name: {m['wrong']:.1%}")
    print(f"  false acceptance of the unenrolled talker: {m['fa']:.1%} of their solo speech named")
    print(f"  per reported speaker: {m['spk_right']:.1%} of {m['spk_enrolled']:.0f} enrolled talkers' speakers named "
          f"right, {m['spk_wrong']:.1%} wrong; {m['spk_fa']:.1%} of {m['spk_outsider']:.0f} unenrolled talkers' "
          f"speakers named (false acceptance)")
    print(f"  speakers found / present: {sum(f for f, _ in found)} / {sum(p for _, p in found)}")
    print(f"  time added per job: median {statistics.median(added):.2f} s (identification step "
          f"{statistics.median(steps):.2f} s) on a median diarization of {statistics.median(durations):.2f} s "
          f"for {statistics.median([c[0].duration for c in convs]):.0f} s of audio")


def long_meeting(engine: Engine, minutes: float) -> None:
    """Time only: naming the four talkers of a long meeting (evaluation.longform), voiceprints
    enrolled from their own clips (so no accuracy is claimed here)."""
    from evaluation.longform import long_conversation
    from evaluation.speech import pyannote_sample, reference_clips, speech_clips

    wav, rttm = pyannote_sample()
    pools: dict[str, list[np.ndarray]] = {}
    for clip in reference_clips(wav, rttm) + [c for c in speech_clips() if c.speaker in ("spk1", "spk2")]:
        pools.setdefault(clip.speaker, []).append(clip.samples)
    refs = []
    for name, pieces in pools.items():
        r = engine.enroll([Audio(p) for p in pieces], label=name)
        refs.append(VoiceprintRef(id=f"vp_{name}", label=name, model=r.model, embedding=r.embedding))
    samples, _ = long_conversation(minutes)
    audio = Audio(samples)
    t = time.perf_counter()
    engine.diarize(audio)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    result = engine.diarize(audio, voiceprints=refs)
    named = time.perf_counter() - t
    print(f"\n{audio.duration / 60:.0f} min meeting of {len(refs)} talkers: diarization {plain:.1f} s, with "
          f"{len(refs)} voiceprints {named:.1f} s (identification step {result.identification.processing_time:.2f} s, "
          f"{len(result.speakers)} speakers, each named from at most "
          f"{engine.settings.identification_max_speech_s:.0f} s of its speech)")


def identify_trials(engine: Engine, prints: dict[str, VoiceprintRef], tests: dict[str, Clip], threshold: float) -> None:
    names = sorted(prints)
    vectors = []
    for name in names:
        vector, _ = engine.speech_vector(Audio(tests[name].samples))
        vectors.append(vector)
    keep = [i for i, v in enumerate(vectors) if v is not None]
    matrix = ident.score_matrix(np.stack([vectors[i] for i in keep]), np.asarray([prints[n].embedding for n in names]))
    right = accepted = impostor = 0
    for row, i in enumerate(keep):
        best = int(np.argmax(matrix[row]))
        if matrix[row, best] >= threshold:
            accepted += 1
            right += best == i
        others = np.delete(matrix[row], i)
        impostor += float(others.max()) >= threshold
    n = len(keep)
    print(f"\nidentify, {n} readers' second halves against {len(names)} voiceprints (threshold {threshold:.3f}):")
    print(f"  accepted {accepted / n:.1%}, accepted and right {right / n:.1%}; with their own voiceprint removed, "
          f"accepted as someone else {impostor / n:.1%}")


# --- through a telephone line (--line) ------------------------------------------------------------
def line_wav(samples: np.ndarray, seed: int) -> bytes:
    """``samples`` through evaluation.conditions' G.711 line (line noise 25 dB down, 300-3400 Hz,
    mu-law), written as the 8 kHz mu-law WAV a call recorder keeps: the decoder sees 8 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    rng = np.random.default_rng(seed)
    noisy = add_noise(samples, rng.standard_normal(len(samples)).astype(np.float32), 25.0)
    narrow = resample_poly(telephone(noisy), 1, 2)
    buf = io.BytesIO()
    sf.write(buf, np.clip(narrow, -1, 1), 8000, format="WAV", subtype="ULAW")
    return buf.getvalue()


def line_vectors(engine: Engine, clips: list[Clip], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per reader: the voiceprint enrolled from the first half through the line (``enroll``, as
    ``POST /voiceprints`` runs it on the WAV) and the unit vector of the second half's speech
    through the line (as ``identify`` embeds it); readers refused either way are left out."""
    out = {}
    for n, clip in enumerate(clips):
        half = len(clip.samples) // 2
        try:
            enrolled = engine.enroll([line_wav(clip.samples[:half], seed * 100_000 + 2 * n)], label=clip.speaker)
        except InputError:
            continue
        audio = engine.load(line_wav(clip.samples[half:], seed * 100_000 + 2 * n + 1))
        assert audio.narrowband, audio.source_rate
        vector, speech_s = engine.speech_vector(audio)
        if vector is None or speech_s < engine.settings.identification_min_speech_s:
            continue
        out[clip.speaker] = (np.asarray(enrolled.embedding, dtype=np.float32), vector)
    return out


def line_rates(pairs: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float,
               gallery: int | None = None, draws: int = 20) -> tuple[float, float]:
    """``identify`` of every reader's line probe against line voiceprints of the split: the share
    named right (own voiceprint best and at least the threshold) and, with the reader's own
    voiceprint left out (a caller never enrolled), the share named as someone. ``gallery``: the
    job holds that many voiceprints (the own one and others drawn at random, ``draws`` times per
    reader, as a tenant's 20 voiceprints of the conversations' calibration); None: every one."""
    names = sorted(pairs)
    matrix = ident.score_matrix(np.stack([pairs[n][1] for n in names]), np.stack([pairs[n][0] for n in names]))
    rng = np.random.default_rng(0)
    right = named = trials = 0
    for i in range(len(names)):
        others = np.delete(matrix[i], i)
        sets = ([np.arange(len(others))] if gallery is None else
                [rng.choice(len(others), size=gallery, replace=False) for _ in range(draws)])
        for chosen in sets:
            # with the own voiceprint: the gallery's other gallery - 1; without it: all gallery others
            with_own = others[chosen[:-1]] if gallery is not None else others
            right += matrix[i, i] >= threshold and matrix[i, i] > with_own.max()
            named += others[chosen].max() >= threshold
            trials += 1
    return right / trials, named / trials


def line_calibration(engine: Engine, calibration: list[Clip], evaluation: list[Clip], default: float,
                     gallery: int = 20) -> float:
    """The narrowband identification threshold, read off the calibration readers (the one that
    maximises named right minus unenrolled named, the middle of its plateau) and checked on the
    held-out readers at the default and at it."""
    t = time.perf_counter()
    cal, held = line_vectors(engine, calibration, seed=1), line_vectors(engine, evaluation, seed=2)
    print(f"through the G.711 line: {len(cal)} calibration and {len(held)} held-out readers "
          f"({time.perf_counter() - t:.0f} s)")
    for split, pairs in (("calibration", cal), ("held out", held)):
        names = sorted(pairs)
        matrix = ident.score_matrix(np.stack([pairs[n][1] for n in names]), np.stack([pairs[n][0] for n in names]))
        same = np.diag(matrix)
        other = matrix[~np.eye(len(names), dtype=bool)]
        print(f"  {split}: same reader median {np.median(same):.3f} [10 %: {np.quantile(same, 0.1):.3f}], "
              f"other readers median {np.median(other):.3f} (99th pct {np.quantile(other, 0.99):.3f}, "
              f"max {other.max():.3f})")
    print(f"  a job of {gallery} voiceprints (left: all {len(cal)} / {len(held)} of the split)")
    print("  thr    calibration: named right / unenrolled named    held out: named right / unenrolled named")
    sweep = []
    for threshold in np.arange(0.40, 0.951, 0.01):
        threshold = round(float(threshold), 2)
        right, named = line_rates(cal, threshold, gallery)
        h_right, h_named = line_rates(held, threshold, gallery)
        a_right, a_named = line_rates(cal, threshold)
        ah_right, ah_named = line_rates(held, threshold)
        sweep.append((threshold, right - named))
        print(f"  {threshold:.2f}   {right:6.1%} / {named:6.1%}   {h_right:6.1%} / {h_named:6.1%}   "
              f"(all: {a_right:6.1%} / {a_named:6.1%}   {ah_right:6.1%} / {ah_named:6.1%})")
    best = max(objective for _, objective in sweep)
    plateau = [t for t, objective in sweep if objective >= best - 0.005]
    chosen = round(statistics.median(plateau) / 0.025) * 0.025
    print(f"calibration ({gallery} voiceprints a job): best right-named {best:.3f}; within 0.005 of it "
          f"{plateau[0]:.2f}..{plateau[-1]:.2f}; chosen {chosen:.3f}")
    for label, threshold in (("default", default), ("chosen", chosen)):
        for size in (gallery, None):
            right, named = line_rates(cal, threshold, size)
            h_right, h_named = line_rates(held, threshold, size)
            print(f"  {label} {threshold:.3f}, {size or 'all'} voiceprints: calibration {right:.1%} right / "
                  f"{named:.1%} unenrolled named; held out {h_right:.1%} / {h_named:.1%} ({len(held)} readers)")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--enrolled", type=int, default=4)
    parser.add_argument("--distractors", type=int, default=16)
    parser.add_argument("--long-minutes", type=float, default=10.0, help="time a long meeting too (0: skip)")
    parser.add_argument("--skip-conversations", action="store_true", help="only the long meeting's timing")
    parser.add_argument("--line", action="store_true",
                        help="only the narrowband threshold: voiceprints and probes through a G.711 line, 8 kHz WAVs")
    args = parser.parse_args()

    engine = Engine()
    engine.load_models()
    if args.line:
        clips = librispeech_clips()
        line_calibration(engine, clips[0::2], clips[1::2], engine.identification_threshold,
                         gallery=args.enrolled + args.distractors)
        return
    if args.long_minutes:
        long_meeting(engine, args.long_minutes)
    if args.skip_conversations:
        return
    clips = librispeech_clips()
    calibration, evaluation = clips[0::2], clips[1::2]
    t = time.perf_counter()
    cal_prints, cal_tests, cal_refused = enroll_all(engine, calibration)
    prints, tests, refused = enroll_all(engine, evaluation)
    print(f"{engine.profile.name} profile, {engine.embedding_model}; enrolled {len(cal_prints)} + {len(prints)} readers "
          f"in {time.perf_counter() - t:.0f} s, refused (under {engine.settings.voiceprint_min_speech_s:.1f} s of "
          f"speech in half an utterance): {len(cal_refused) + len(refused)}")
    threshold = args.threshold if args.threshold is not None else engine.identification_threshold
    if args.calibrate:
        threshold = calibrate(engine, list(conversations(cal_prints, cal_tests, args.conversations, args.enrolled,
                                                         args.distractors, seed=1)))
    evaluate(engine, list(conversations(prints, tests, args.conversations, args.enrolled, args.distractors, seed=2)),
             threshold)
    identify_trials(engine, prints, tests, threshold)


if __name__ == "__main__":
    main()
