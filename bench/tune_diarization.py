"""How the embedded diarization's hyper-parameters were chosen: DER and speaker counts over a grid.

For each segmentation step (the sliding window's hop, as a fraction of its 10 s) the pipeline's
segmentation and CAM++ embeddings are computed once per recording (pyannote's own training
cache) and the clustering threshold and minimum cluster size are swept over them.

Recordings, all real speech with exact references:
- pyannote's ``sample.wav`` (2 talkers, 30 s);
- ``--conversations`` 55 s four-talker conversations (the sample's talkers + the two of
  ``../shared/data/speech/utterances``);
- ``--many`` conversations of 5-8 LibriSpeech readers (249 voices, none used elsewhere in tuning),
  one to three of them minor (3-6 s of speech);
- a ``--long-minutes`` meeting of the four talkers (clustering behaves differently with many
  embeddings per speaker), with ``--long-guests`` readers laid in its pauses who speak once, 3-6 s
  (a cluster of a few embeddings among thousands; ``evaluation.longform.with_minor_talkers``);
- ``--short`` one-reader and two-reader recordings of 15-35 s (a handful of embeddings each);
- ``--meetings`` meeting-like conversations of 3-5 LibriSpeech readers, 1.2-2.6 min, with long
  overlaps at 40 % of turn changes and 0.3-1.2 s interjections inside other talkers' turns
  (``evaluation.speech.meeting_conversation``); every other one has a minor talker. Their
  DER is also split into missed speech / false alarm / confusion (shares of reference speech).
- ``--panels`` panels of 10-16 LibriSpeech readers, 4-9 min, talk time 3-60 s each
  (``evaluation.speech.panel_conversation``): DER in its parts and speaker counts, as the meetings.

``--condition room|phone|narrowband|noisy`` lays the conversations, the many-talker set and the
meeting out in a reverberant room, through a telephone line, at 8 kHz or under noise
(``evaluation.conditions``).

DER: pyannote.metrics, collar 0, overlap included. "count err" is the mean absolute difference
between found and true speaker counts over the many-talker set.

    .venv/bin/python bench/tune_diarization.py --steps 0.5 --thresholds 0.55 0.6 0.65 0.7
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from pyannote.metrics.diarization import DiarizationErrorRate

from engine.audio import SAMPLE_RATE, load_audio
from evaluation.speech import (
    diarization_error_rate,
    librispeech_clips,
    load_reference,
    many_talker_conversation,
    meeting_conversation,
    panel_conversation,
    to_annotation,
    multi_speaker_conversation,
    pyannote_sample,
)
from evaluation.conditions import CONDITIONS, Condition
from evaluation.longform import long_conversation, with_minor_talkers
from engine.pipelines.diarization import build_embedded_pipeline, to_turns
from shared.settings import Settings


# first seeds of each set: the tuning draw, and a held-out draw no default was chosen on
DRAWS = {
    "tuning": {"conv": 0, "many": 100, "solo": 300, "duo": 400, "long": 0, "meet": 700, "guests": 900,
               "panel": 2100},
    "held-out": {"conv": 8, "many": 200, "solo": 500, "duo": 600, "long": 100, "meet": 800, "guests": 1000,
                 "panel": 2200},
    # drawn for the first time on 2026-12-06 to judge a rule that both draws above had shaped
    # (docs/models.md, "Fragments joined"); the conversations' seeds leave room for 30
    # recordings before the next draw's, the other sets' for 100
    "fresh": {"conv": 40, "many": 1100, "solo": 1200, "duo": 1300, "long": 200, "meet": 1400, "guests": 1500,
              "panel": 2300},
    # drawn after the rule was mended on "fresh" (complete linkage), to judge the mended rule
    "fresh2": {"conv": 70, "many": 1600, "solo": 1700, "duo": 1800, "long": 300, "meet": 1900, "guests": 2000,
               "panel": 2400},
    # the panels (10-16 talkers) were added to every draw later still (2026-12-06, last), after
    # every default above was chosen: no draw's panels shaped one
}


def recordings(conversations: int, many: int, long_minutes: float, condition: Condition | None = None,
               short: int = 0, draw: str = "tuning", meetings: int = 0, long_guests: int = 0, panels: int = 0):
    first = DRAWS[draw]
    wav, rttm = pyannote_sample()
    yield "sample", load_audio(wav).float32(), load_reference(rttm)
    for i in range(conversations):
        yield f"conv{i}", *multi_speaker_conversation(seed=first["conv"] + i, condition=condition)
    clips = librispeech_clips() if many or short or meetings or long_guests or panels else []
    for i in range(many):
        talkers = 5 + i % 4
        yield f"many{i}", *many_talker_conversation(
            talkers, minor=1 + i % 3, seed=first["many"] + i, clips=clips, condition=condition)
    for i in range(short):
        yield f"solo{i}", *many_talker_conversation(1, seed=first["solo"] + i, clips=clips, condition=condition)
        yield f"duo{i}", *many_talker_conversation(2, seed=first["duo"] + i, clips=clips, condition=condition)
    for i in range(meetings):
        yield f"meet{i}", *meeting_conversation(3 + i % 3, minor=i % 2, seed=first["meet"] + i, clips=clips)
    for i in range(panels):
        yield f"panel{i}", *panel_conversation(first["panel"] + i, clips=clips)
    if long_minutes:
        samples, reference = long_conversation(long_minutes, condition=condition, first_seed=first["long"])
        if long_guests:
            samples, reference, _ = with_minor_talkers(samples, reference, clips, long_guests, seed=first["guests"])
        yield "long", samples, reference


def main() -> None:
    parser = argparse.ArgumentParser()
    defaults = Settings()
    parser.add_argument("--steps", type=float, nargs="+", default=[defaults.segmentation_step])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.55, 0.6, 0.65, 0.7])
    parser.add_argument("--min-cluster-sizes", type=int, nargs="+", default=[defaults.clustering_min_cluster_size])
    parser.add_argument("--min-cluster-shares", type=float, nargs="+", default=[defaults.clustering_min_cluster_share],
                        help="a cluster holding less than this share of the embeddings is small too")
    parser.add_argument("--distinct-distances", type=float, nargs="+", default=[defaults.clustering_distinct_distance],
                        help="a small cluster farther than this from every speaker stays a speaker (engine.pipelines.embedded)")
    parser.add_argument("--telephone-threshold", type=float, default=defaults.clustering_telephone_threshold,
                        help="the threshold for a recording that came through a telephone line (engine.channel); "
                             "0: --thresholds for every recording, as when sweeping the phone condition")
    parser.add_argument("--spread-lambdas", type=float, nargs="+", default=[defaults.clustering_spread_lambda],
                        help="size-aware merging by the recording's within-talker spread (engine.pipelines.embedded; 0: off)")
    parser.add_argument("--spread-references", type=float, nargs="+", default=[defaults.clustering_spread_reference],
                        help="the within-talker spread below which the merging does nothing")
    parser.add_argument("--centre-sigmas", type=float, nargs="+", default=[defaults.diarization_centre_sigma or 0.0],
                        help="reconstruction weighted to each chunk's middle (engine.pipelines.discrete; 0: "
                             "every frame of a chunk counts the same, as pyannote's)")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--many", type=int, default=8)
    parser.add_argument("--minors-apart", type=int, nargs="+", choices=(0, 1), default=[1],
                        help="1: a small cluster like a minor talker joins it, one like a main speaker folds into a "
                             "main speaker; 0: every small cluster folds into the nearest speaker kept "
                             "(engine.pipelines.embedded, before 2026-12-06)")
    parser.add_argument("--join-fragments", type=int, nargs="+", choices=(0, 1),
                        default=[int(defaults.clustering_join_fragments)],
                        help="1: speakers of a few embeddings within the distinct distance of each other are one "
                             "talker (engine.pipelines.embedded._join_fragments)")
    parser.add_argument("--reference-concentrations", type=float, nargs="+",
                        default=[defaults.clustering_reference_concentration or 0.0],
                        help="large clusters merge by mean direction as at this concentration; 0: off "
                             "(engine.pipelines.embedded._cut_directed)")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--long-guests", type=int, default=0,
                        help="this many LibriSpeech readers who speak once, 3-6 s, laid in pauses of the long "
                             "meeting (evaluation.longform.with_minor_talkers); prints how many were found")
    parser.add_argument("--short", type=int, default=0,
                        help="this many one-reader and two-reader recordings of 15-35 s (few embeddings each)")
    parser.add_argument("--panels", type=int, default=0,
                        help="panels of 10-16 readers, 4-9 min (evaluation.speech.panel_conversation)")
    parser.add_argument("--meetings", type=int, default=0,
                        help="this many meeting-like conversations (long overlaps, interjections; 3-5 talkers)")
    parser.add_argument("--stored-as", choices=["float16", "float32"], default="float16",
                        help="the recordings' dtype as handed to the pipeline (workers hold decoded audio as float16)")
    parser.add_argument("--draw", choices=sorted(DRAWS), default="tuning",
                        help="which recordings: those the defaults were tuned on, a held-out draw of each set, or "
                             "one of two draws first used on 2026-12-06 (fresh, fresh2)")
    parser.add_argument("--condition", choices=CONDITIONS, default="clean",
                        help="the conversations as taken in a room, through a telephone line or under noise "
                             "(evaluation.conditions); pyannote's sample stays as recorded")
    args = parser.parse_args()

    condition = None if args.condition == "clean" else Condition(args.condition)
    data = list(recordings(args.conversations, args.many, args.long_minutes, condition, args.short, args.draw,
                           args.meetings, args.long_guests, args.panels))
    total_s = sum(len(s) for _, s, _ in data) / SAMPLE_RATE
    print(f"{len(data)} recordings, {total_s / 60:.1f} min, torch threads {torch.get_num_threads()}")
    print("step  mcs  share  thr    dist  DER sample  conv mean  conv max  many mean  many max  long    count err  "
          "speakers found (conv | many | long)  s per audio min")
    for step in args.steps:
        pipeline = build_embedded_pipeline(Settings(segmentation_step=step))
        pipeline.training = True  # keep segmentation + embeddings per file across trials
        pipeline.telephone_threshold = args.telephone_threshold or None
        files = [
            {"uri": name, "waveform": torch.from_numpy(s.astype(args.stored_as))[None], "sample_rate": SAMPLE_RATE}
            for name, s, _ in data
        ]
        first_pass_s = None
        trials = ((m, t, d, sh, lam, ref, sig, apart, join, rc) for m in args.min_cluster_sizes for t in args.thresholds
                  for d in args.distinct_distances for sh in args.min_cluster_shares for lam in args.spread_lambdas
                  for ref in args.spread_references for sig in args.centre_sigmas for apart in args.minors_apart
                  for join in args.join_fragments for rc in args.reference_concentrations)
        for mcs, threshold, distinct, share, lam, ref, sigma, apart, join, rc in trials:
            params = pipeline.parameters(instantiated=True)
            params["clustering"].update(threshold=threshold, min_cluster_size=mcs)
            pipeline.instantiate(params)
            pipeline.clustering.distinct_distance = distinct
            pipeline.clustering.min_cluster_share = share
            pipeline.clustering.spread_lambda = lam
            pipeline.clustering.spread_reference = ref
            pipeline.centre_sigma = sigma or None
            pipeline.clustering.minors_apart = bool(apart)
            pipeline.clustering.join_fragments = bool(join)
            pipeline.clustering.reference_concentration = rc or None
            started = time.perf_counter()
            ders, found, count_err, short_err = {}, {}, [], []
            meet_err, meet_parts, guests = [], [], ""
            panel_err, panel_parts = [], []
            with torch.inference_mode():
                for file, (name, _, reference) in zip(files, data):
                    turns = to_turns(pipeline(file), min_speaker_s=defaults.diarization_min_speaker_s)
                    ders[name] = diarization_error_rate(reference, turns)
                    n, true = len({t.speaker for t in turns}), len(reference.labels())
                    found[name] = f"{n}/{true}"
                    if name.startswith("many"):
                        count_err.append(abs(n - true))
                    if name.startswith(("solo", "duo")):
                        short_err.append(abs(n - true))
                    minors = [label for label in reference.labels() if label.startswith("minor-")]
                    if name == "long" and minors:
                        # found: an output speaker is mapped to the guest (pyannote.metrics' optimal mapping)
                        mapped = set(DiarizationErrorRate(collar=0.0, skip_overlap=False).optimal_mapping(
                            reference, to_annotation(turns)).values())
                        guests = f"  long's guests found {sum(m in mapped for m in minors)}/{len(minors)}"
                    if name.startswith(("meet", "panel")):
                        errors, shares = (meet_err, meet_parts) if name.startswith("meet") else (panel_err, panel_parts)
                        errors.append(n - true)
                        parts = DiarizationErrorRate(collar=0.0, skip_overlap=False)(
                            reference, to_annotation(turns), detailed=True)
                        shares.append([parts[k] / parts["total"] for k in
                                       ("missed detection", "false alarm", "confusion")])
            if first_pass_s is None:
                first_pass_s = time.perf_counter() - started

            def pick(prefix):
                return [v for k, v in ders.items() if k.startswith(prefix)] or [float("nan")]

            conv, many = pick("conv"), pick("many")
            counts = " ".join(v for k, v in found.items() if k.startswith("conv")) + " | " + " ".join(
                v for k, v in found.items() if k.startswith("many")) + " | " + found.get("long", "-")

            def in_parts(prefix: str, label: str, errors: list[int], shares: list[list[float]]) -> str:
                """The set's DER in its parts (averaged once) and its speaker counts."""
                if not errors:
                    return ""
                miss, false_alarm, confusion = np.mean(shares, axis=0)
                return (f"  {label} DER {np.mean(pick(prefix)):.3f} max {np.max(pick(prefix)):.3f} "
                        f"(miss {miss:.3f} fa {false_alarm:.3f} conf {confusion:.3f}), found-true "
                        f"{np.mean(errors):+.2f} |err| {np.mean(np.abs(errors)):.2f}: "
                        + " ".join(v for k, v in found.items() if k.startswith(prefix))
                        + " DER " + " ".join(f"{v:.2f}" for k, v in ders.items() if k.startswith(prefix)))
            print(
                f"{step:<5} {mcs:<4} {share:<6} {threshold:<6} {distinct:<5} l{lam:<4} r{ref:<5} c{sigma:<5} a{apart} j{join} rc{rc} {ders['sample']:<11.3f} {np.mean(conv):<10.3f} {np.max(conv):<9.3f} "
                f"{np.mean(many):<10.3f} {np.max(many):<9.3f} {ders.get('long', float('nan')):<7.3f} "
                f"{np.mean(count_err) if count_err else float('nan'):<10.2f} {counts}  {first_pass_s / (total_s / 60):.2f}"
                + (f"  short DER {np.mean(pick('solo') + pick('duo')):.3f}, count err {np.mean(short_err):.2f}"
                   if short_err else "")
                + in_parts("meet", "meetings", meet_err, meet_parts)
                + in_parts("panel", "panels", panel_err, panel_parts)
                + guests,
                flush=True,
            )


if __name__ == "__main__":
    main()
