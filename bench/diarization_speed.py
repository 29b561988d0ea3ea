"""Diarize an hour of real speech on this machine: real-time factor, peak RSS and DER.

    .venv/bin/python bench/diarization_speed.py --minutes 60

Target (issue #2): 1 h in under 5 minutes and under 3 GB RSS on the 2-core CPU. On a GPU
(``AUDIO_ANALYSIS_DEVICE=cuda``) the clock starts after a one-minute warm-up, as a worker's jobs
after its first: the first call pays for CUDA's kernels and cuDNN's and cuBLAS's handles, seconds
beside a target of 6 s per hour. The GPU's peak memory is printed too.
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
    cuda = engine.device.type == "cuda"
    if cuda:
        engine.diarize(Audio(samples[: 60 * 16000]))
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    result = engine.diarize(audio)
    if cuda:
        torch.cuda.synchronize(engine.device)
    elapsed = time.perf_counter() - started
    der = diarization_error_rate(reference, result.diarization_results)
    print(
        f"audio={audio.duration / 60:.1f}min elapsed={elapsed:.1f}s rtf={elapsed / audio.duration:.4f} "
        f"({audio.duration / elapsed:.0f}x real time) peak_rss={peak_rss_mb():.0f}MB "
        f"(after loading models and audio: {rss_before:.0f}MB) threads={torch.get_num_threads()} "
        f"device={engine.model_device}"
        + (f" peak_gpu={torch.cuda.max_memory_allocated(engine.device) / 2**20:.0f}MB"
           f" reserved={torch.cuda.max_memory_reserved(engine.device) / 2**20:.0f}MB" if cuda else "")
    )
    print(
        f"speakers_found={len({t.speaker for t in result.diarization_results})} "
        f"reference_speakers={len(reference.labels())} segments={result.segments_count} DER={der:.3f}"
    )


if __name__ == "__main__":
    main()
