"""This engine against senko's own Diarizer on the same recording, in one run.

    .venv/bin/python bench/diarization_vs_senko.py --minutes 60            # CPU (and GPU if present)
    .venv/bin/python bench/diarization_vs_senko.py --minutes 240 --only ours --device cuda

The recording is `evaluation.longform.long_conversation` (real speech of four talkers, exact
reference). Each engine runs in a fresh child process, one after the other, so its peak RSS and
peak GPU memory are its own and neither inherits the other's warm caches; models are loaded and
warmed before the clock starts (a worker holds them loaded). DER: pyannote.metrics, collar 0,
overlap scored. The ratio is senko's time over ours (above 1: we are faster). Each runs with its
own threading defaults: ours single-threaded lanes with passive waiting (``engine.lanes``), senko
torch's threads with the wait policy of the shell (libgomp's spinning default when unset).

senko ships its CPU fbank as a C++ library built for AVX-512; on a CPU without it that library
dies with SIGILL, so there the bench replaces that one step with torchaudio's Kaldi fbank (same
options, same per-segment mean normalisation) and says so. senko's VAD, CAM++ and clustering run
unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the wait policy this shell gave, before our engine sets its own default: senko runs with it
# (libgomp's spinning default when unset), not with ours
SHELL_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

from engine import runtime  # noqa: E402,F401  (before torch)


def _has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peaks(device: str) -> dict:
    import torch

    from worker.telemetry import peak_rss_bytes

    # the child's own peak since the clock started (_start_peak), as a worker reports each
    # job's: its ru_maxrss would carry the RSS of the bench's parent it was forked from before
    # exec (ours read 1466 MB in four runs whatever the engine did, while its own memory map
    # peaked at 1130-1153 MB). File pages count too: where other processes map torch's CUDA
    # libraries at the same time (a test suite), the kernel keeps those pages resident in every
    # one of them, and ours read 1481-1808 MB for an hour it diarized in 1217-1236 MB alone
    out = {"peak_rss_mb": peak_rss_bytes() / 2**20}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        # what the process took from the card: the caching allocator keeps freed blocks (and the
        # gaps between CAM++'s batches of a new shape each call) reserved, so a neighbour sharing
        # the card cannot have them; a memory share (gpu_memory_fraction) caps this figure, not
        # the one above
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def _start_peak(device: str) -> None:
    """The peak from here on (models loaded, warm-up done), as a worker measures each job's."""
    import torch

    from worker.telemetry import reset_peak_rss

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def run_ours(audio_path: str, device: str, threads: int | None, queue) -> None:
    import numpy as np
    import torch

    from engine.audio import STORAGE_DTYPE, Audio
    from engine.core import Engine
    from shared.settings import Settings

    if threads:
        torch.set_num_threads(threads)
    # as a worker: models loaded at start-up, then the file decoded into float16 (a worker's
    # decoder writes its 16 kHz result into a float16 buffer; it never holds a float32 copy)
    engine = Engine(Settings(device=device, torch_threads=threads)).load_models()
    samples = _read_as(audio_path, STORAGE_DTYPE)
    engine.diarize(Audio(np.ascontiguousarray(samples[: 60 * 16000])))  # warm-up, as a worker is
    _start_peak(device)
    audio = Audio(samples)
    # when each of the pipeline's steps last reported progress: segmentation's ends with its
    # scores on the host, clustering and reconstruction sit between embeddings and the last one
    last: dict[str, float] = {}
    _sync(device)
    started = time.perf_counter()
    result = engine.diarize(audio, progress=lambda step, _: last.__setitem__(step, time.perf_counter()))
    _sync(device)
    elapsed = time.perf_counter() - started
    turns = [(t.start, t.end, t.speaker) for t in result.diarization_results]
    queue.put({"elapsed_s": elapsed, "turns": turns, "device": engine.model_device,
               "threads": torch.get_num_threads(), "steps": {k: round(v - started, 2) for k, v in last.items()},
               # what step 1b turns on through the environment: said, so a run it missed shows
               "embedding_tf32": engine.settings.embedding_tf32,
               **_peaks(device)})


def _read_as(path: str, dtype) -> "np.ndarray":
    """A saved 1-D array read a minute at a time into ``dtype``: no whole copy in the file's
    dtype, and read, not memory-mapped (a mapping's pages would count in the RSS)."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (length,), _, stored = header(f)
        out = np.empty(length, dtype=dtype)
        block = 60 * 16000
        for start in range(0, length, block):
            count = min(block, length - start)
            out[start : start + count] = np.fromfile(f, dtype=stored, count=count)
    return out


def _patch_senko_fbank() -> None:
    """senko's own fbank step, computed with torchaudio (for CPUs without AVX-512)."""
    import numpy as np
    import senko.diarizer as sd
    import torch
    import torchaudio.compliance.kaldi as kaldi

    def fbank(self, audio, subsegments, *, sample_offset=0):
        wav = torch.from_numpy(np.asarray(audio, dtype=np.float32)) * 32768
        feats, frames, offsets, offset = [], [], [], 0
        for start_s, end_s in subsegments:
            start = int(start_s * 16000) - sample_offset
            seg = wav[start : start + int((end_s - start_s) * 16000)]
            if seg.numel() < 400:  # senko pads to one frame too
                seg = torch.nn.functional.pad(seg, (0, 400 - seg.numel()))
            f = kaldi.fbank(seg[None], num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0,
                            sample_frequency=16000, window_type="povey")
            f = f - f.mean(dim=0, keepdim=True)
            feats.append(f.reshape(-1))
            frames.append(f.shape[0])
            offsets.append(offset)
            offset += f.numel()
        return torch.cat(feats).numpy(), np.asarray(frames), np.asarray(offsets), 80

    sd.Diarizer._extract_fbank_features = sd.time_method("fbank_time", "Fbank feature extraction")(fbank)


def run_senko(audio_path: str, device: str, threads: int | None, queue) -> None:
    import numpy as np
    import torch

    # on a GPU too: without kaldifeat (not installed), senko computes its fbank on the CPU
    patched = not _has_avx512() and (device == "cpu" or importlib.util.find_spec("kaldifeat") is None)
    if patched:
        _patch_senko_fbank()
    import senko

    samples = np.ascontiguousarray(np.load(audio_path))
    diarizer = senko.Diarizer(device="cuda" if device.startswith("cuda") else "cpu", warmup=True, quiet=True)
    if threads:
        torch.set_num_threads(threads)
    diarizer.diarize_samples(samples[: 60 * 16000], 16000)  # warm-up
    _start_peak(device)
    _sync(device)
    started = time.perf_counter()
    result = diarizer.diarize_samples(samples, 16000)
    _sync(device)
    elapsed = time.perf_counter() - started
    turns = [(s["start"], s["end"], str(s["speaker"])) for s in (result or {}).get("merged_segments", [])]
    queue.put({"elapsed_s": elapsed, "turns": turns, "device": device, "threads": torch.get_num_threads(),
               "steps": (result or {}).get("timing_stats"), "fbank": "torchaudio (no AVX-512)" if patched else "senko",
               **_peaks(device)})


class ChildFailed(RuntimeError):
    """The child ended without a result (an exception, a CUDA error, killed for memory)."""


def in_child(target, *args, env: dict[str, str | None] | None = None, timeout_s: float = 3 * 3600) -> dict:
    """``target(*args, queue)`` in a fresh process, with ``env`` changed for it (None: unset).

    Raises ChildFailed as soon as the child is gone without a result: waiting on the queue alone,
    a child that died (senko's GPU run without its rebuilt models, an out-of-memory error) held
    the bench until the device check's step limit, minutes of a lent GPU spent on nothing."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    saved = {k: os.environ.get(k) for k in (env or {})}
    for k, v in (env or {}).items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        proc.start()  # a spawned child copies os.environ now
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except Empty:
                pass
            if not proc.is_alive():
                try:  # its result may have landed between the wait and the check
                    return queue.get(timeout=1.0)
                except Empty:
                    raise ChildFailed(f"{getattr(target, '__name__', target)} ended with exit code "
                                      f"{proc.exitcode} and no result (its traceback is above)") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise ChildFailed(f"{getattr(target, '__name__', target)} gave no result in {timeout_s:.0f} s")
    finally:
        proc.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, then the GPU too when there is one")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: all cores)")
    parser.add_argument("--only", choices=["both", "ours", "senko"], default="both")
    args = parser.parse_args()

    import numpy as np
    import torch

    from evaluation.speech import diarization_error_rate
    from evaluation.longform import long_conversation
    from engine.pipelines.diarization import Turn

    samples, reference = long_conversation(args.minutes)
    duration = len(samples) / 16000
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    engines = {"ours": run_ours, "senko": run_senko}
    if args.only != "both":
        engines = {args.only: engines[args.only]}
    print(f"audio {duration / 60:.1f} min, {len(reference.labels())} speakers, cpu cores {os.cpu_count()}")
    # each engine's child is spawned from this process, which has torch loaded: pages of CUDA's
    # libraries it holds are shared with the children and the kernel keeps them resident there
    # too. This process runs no CUDA, so it hands them back first, as a worker's prefork parent
    # does (worker/lifecycle.py); each child loads what it uses itself
    runtime.drop_gpu_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audio.npy")
        np.save(path, samples)
        del samples
        for device in devices:
            figures = {}
            for name, target in engines.items():
                env = {"OMP_WAIT_POLICY": SHELL_OMP_WAIT_POLICY} if name == "senko" else None
                try:
                    r = in_child(target, path, device, args.threads if device == "cpu" else None, env=env)
                except ChildFailed as exc:  # the other engine's figures still count
                    print(f"[{device}] {name:<5} failed: {exc}")
                    continue
                r["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") if env is None else SHELL_OMP_WAIT_POLICY
                turns = [Turn(a, b, s) for a, b, s in r.pop("turns")]
                r["der"] = diarization_error_rate(reference, turns)
                r["speakers"] = len({t.speaker for t in turns})
                figures[name] = r
                gpu = (f" peak_gpu={r['peak_gpu_mb']:.0f}MB reserved={r['peak_gpu_reserved_mb']:.0f}MB"
                       if "peak_gpu_mb" in r else "")
                extra = f" steps={json.dumps(r['steps'])}" if r.get("steps") else ""
                extra += f" fbank={r['fbank']}" if "fbank" in r else ""
                extra += " embedding_tf32=on" if r.get("embedding_tf32") else ""
                # the device the engine's models ran on, as it said (a card it could not use: the CPU)
                print(f"[{device}] {name:<5} on {r['device']}: {r['elapsed_s']:7.1f} s  {duration / r['elapsed_s']:6.0f}x real time  "
                      f"DER {r['der']:.3f}  speakers {r['speakers']}/{len(reference.labels())}  "
                      f"peak_rss={r['peak_rss_mb']:.0f}MB{gpu} threads={r['threads']} "
                      f"OMP_WAIT_POLICY={r['omp_wait_policy'] or 'unset'}{extra}")
                print(f"[{device}] {name:<5} 1 h would take {r['elapsed_s'] * 3600 / duration:.1f} s")
            if len(figures) == 2:
                ratio = figures["senko"]["elapsed_s"] / figures["ours"]["elapsed_s"]
                print(f"[{device}] ratio senko/ours = {ratio:.2f}x  (1 h would take us "
                      f"{figures['ours']['elapsed_s'] * 3600 / duration:.1f} s)")


if __name__ == "__main__":
    main()
