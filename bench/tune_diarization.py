"""How the embedded diarization's hyper-parameters were chosen: DER and speed over a grid.

For each segmentation step (the sliding window's hop, as a fraction of its 10 s) the pipeline's
segmentation and CAM++ embeddings are computed once per recording (pyannote's own training
cache) and the clustering threshold is swept over them. Recordings: pyannote's sample.wav with
its reference, and 55 s four-talker conversations laid from real speech (shared.evaluation).
DER: pyannote.metrics, collar 0, overlap included.

    .venv/bin/python bench/tune_diarization.py --steps 0.2 0.5 --thresholds 0.65 0.7 0.75 --min-cluster-sizes 6 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from shared.audio import SAMPLE_RATE, load_audio
from shared.evaluation import diarization_error_rate, load_reference, multi_speaker_conversation, pyannote_sample
from shared.longform import long_conversation
from shared.pipelines.diarization import build_embedded_pipeline, to_turns
from shared.settings import Settings


def recordings(conversations: int, long_minutes: float):
    wav, rttm = pyannote_sample()
    yield "sample", load_audio(wav).samples, load_reference(rttm)
    for seed in range(conversations):
        samples, reference = multi_speaker_conversation(seed=seed)
        yield f"conv{seed}", samples, reference
    if long_minutes:
        # clustering behaves differently with many embeddings per speaker: check a long meeting too
        yield "long", *long_conversation(long_minutes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.75, 0.8])
    defaults = Settings()
    parser.add_argument("--min-cluster-sizes", type=int, nargs="+", default=[defaults.clustering_min_cluster_size])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--long-minutes", type=float, default=20.0)
    args = parser.parse_args()

    data = list(recordings(args.conversations, args.long_minutes))
    total_s = sum(len(s) for _, s, _ in data) / SAMPLE_RATE
    print(f"{len(data)} recordings, {total_s / 60:.1f} min, torch threads {torch.get_num_threads()}")
    print("step  mcs  threshold  DER(sample)  DER(conv mean)  DER(conv max)  DER(long)  speakers found per recording  s per audio min")
    for step in args.steps:
        pipeline = build_embedded_pipeline(Settings(segmentation_step=step))
        pipeline.training = True  # keep segmentation + embeddings per file across thresholds
        files = [
            {"uri": name, "waveform": torch.from_numpy(s)[None], "sample_rate": SAMPLE_RATE}
            for name, s, _ in data
        ]
        first_pass_s = None
        for mcs, threshold in ((m, t) for m in args.min_cluster_sizes for t in args.thresholds):
            params = pipeline.parameters(instantiated=True)
            params["clustering"].update(threshold=threshold, min_cluster_size=mcs)
            pipeline.instantiate(params)
            started = time.perf_counter()
            ders, found = {}, []
            with torch.inference_mode():
                for file, (name, _, reference) in zip(files, data):
                    turns = to_turns(pipeline(file), min_speaker_s=defaults.diarization_min_speaker_s)
                    ders[name] = diarization_error_rate(reference, turns)
                    found.append(f"{len({t.speaker for t in turns})}/{len(reference.labels())}")
            if first_pass_s is None:
                first_pass_s = time.perf_counter() - started
            conv = [v for k, v in ders.items() if k.startswith("conv")]
            print(
                f"{step:<5} {mcs:<4} {threshold:<10} {ders['sample']:<12.3f} {np.mean(conv):<15.3f} {np.max(conv):<14.3f} "
                f"{ders.get('long', float('nan')):<10.3f} {' '.join(found):<30} {first_pass_s / (total_s / 60):.2f}"
            )


if __name__ == "__main__":
    main()
