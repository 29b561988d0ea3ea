"""Diarize an hour of real speech on this machine: real-time factor, peak RSS and DER.

    .venv/bin/python bench/diarization_speed.py --minutes 60

Target (issue #2): 1 h in under 5 minutes and under 3 GB RSS on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from engine.audio import Audio
from engine.core import Engine
from evaluation.speech import diarization_error_rate
from evaluation.longform import long_conversation


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()

    engine = Engine().load_models()
    samples, reference = long_conversation(args.minutes)
    audio = Audio(samples)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    result = engine.diarize(audio)
    elapsed = time.perf_counter() - started
    der = diarization_error_rate(reference, result.diarization_results)
    print(
        f"audio={audio.duration / 60:.1f}min elapsed={elapsed:.1f}s rtf={elapsed / audio.duration:.4f} "
        f"({audio.duration / elapsed:.0f}x real time) peak_rss={peak_rss_mb():.0f}MB "
        f"(after loading models and audio: {rss_before:.0f}MB) threads={torch.get_num_threads()} "
        f"device={engine.model_device}"
    )
    print(
        f"speakers_found={len({t.speaker for t in result.diarization_results})} "
        f"reference_speakers={len(reference.labels())} segments={result.segments_count} DER={der:.3f}"
    )


if __name__ == "__main__":
    main()
