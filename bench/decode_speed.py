"""Decode a long compressed recording the way a worker does, beside FFmpeg's one pass.

    .venv/bin/python bench/decode_speed.py --minutes 60

Builds ``--minutes`` of real four-talker speech (``evaluation.longform``) as 44.1 kHz stereo,
the usual shape of an upload, writes it as MP3, FLAC and M4A (AAC), and times three ways of
turning each into the engine's 16 kHz mono samples, side by side in one run:

- ``load_audio``: what a worker runs (a long file libsndfile can seek in is decoded by up to 8
  threads; FFmpeg's frames are resampled in blocks of 10 s);
- ``load_audio``, one thread: the same with ``engine.audio._decode_threads`` held to 1;
- FFmpeg via PyAV, frame by frame through libswresample to 16 kHz mono, as ``ffmpeg -ac 1 -ar
  16000`` does (the peer; it was also this decoder's own path for M4A).

Encoding takes a few minutes for an hour (the MP3 and AAC encoders are slow); the files are
kept under ``--dir`` and reused when present.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

import engine.audio as audio  # noqa: E402
from evaluation.encoding import encode  # noqa: E402

RATE = 44_100


def build(minutes: float, folder: Path) -> list[Path]:
    paths = [folder / f"speech-{minutes:g}min.{ext}" for ext in ("mp3", "flac", "m4a")]
    if all(p.exists() for p in paths):
        return paths
    from evaluation.longform import long_conversation

    samples, _ = long_conversation(minutes)
    mono = audio.resample(samples, audio.SAMPLE_RATE, RATE)
    stereo = np.stack([mono, 0.8 * mono], axis=1).astype(np.float32)
    for path, fmt in zip(paths[:2], ("MP3", "FLAC")):
        with sf.SoundFile(path, "w", RATE, 2, format=fmt) as out:
            for start in range(0, len(stereo), 10 * RATE):
                out.write(stereo[start : start + 10 * RATE])
    encode(stereo, RATE, container="mp4", codec="aac", bit_rate=128_000, path=paths[2])
    return paths


def ffmpeg_one_pass(path: Path) -> int:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=audio.SAMPLE_RATE)
    n = 0
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            n += sum(out.samples for out in resampler.resample(frame))
    return n + sum(out.samples for out in resampler.resample(None))


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    n = fn()
    return time.perf_counter() - started, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/audio-analysis-decode-bench"))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is printed")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    paths = build(args.minutes, args.dir)
    threads = audio._decode_threads()
    print(f"{args.minutes:g} min, 44.1 kHz stereo; decode threads here: {threads}")
    default_threads = audio._decode_threads

    def ours(path: Path, n_threads: int):
        def run() -> int:
            audio._decode_threads = lambda: n_threads
            try:
                return audio.load_audio(path, max_duration=24 * 3600).samples.size
            finally:
                audio._decode_threads = default_threads
        return run

    for path in paths:
        rows = {
            f"load_audio ({threads} threads)": ours(path, threads),
            "load_audio (1 thread)": ours(path, 1),
            "FFmpeg frame by frame": lambda: ffmpeg_one_pass(path),
        }
        results = {name: min((timed(fn) for _ in range(args.repeat)), key=lambda r: r[0]) for name, fn in rows.items()}
        peer = results["FFmpeg frame by frame"][0]
        cells = "  ".join(f"{name}: {t:.2f} s ({n / audio.SAMPLE_RATE / 60:.1f} min)" for name, (t, n) in results.items())
        print(f"{path.suffix[1:]:>4} {path.stat().st_size / 2**20:.0f} MB  {cells}  "
              f"ratio {peer / results[f'load_audio ({threads} threads)'][0]:.2f}x")


if __name__ == "__main__":
    main()
