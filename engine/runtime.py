"""How torch's CPU runtime behaves; imported before torch by every module that runs models.

**Threads.** torch's wheels use GNU OpenMP, whose idle threads spin for a while before sleeping.
When another process holds a core (the API, a second worker, a browser, CI), the spinning threads
and the thread doing the work take turns on too few cores, and every parallel region waits for a
descheduled thread: segmentation's LSTM measured 36 ms per chunk on an idle 2-core machine and
680-950 ms with one busy-looping process beside it; with passive waiting, 70-80 ms under the same
load. Passive waiting is the default here; an operator who owns the whole machine can set
``OMP_WAIT_POLICY=ACTIVE``. libgomp reads it once, when torch is first imported. Passive waiting
is slow on an idle machine (each barrier wakes a sleeping thread), so diarization on the CPU does
not use OpenMP teams at all: it runs single-threaded lanes side by side (``engine.lanes``).

**oneDNN's primitive cache.** oneDNN keeps a compiled kernel and its buffers for every input shape
it has seen, up to 1024 of them. CAM++ sees a new shape in nearly every batch (rows are bucketed
by length), so after one 20-minute diarization the cache held about 500 MB that no later job
reused. 16 entries keep the speed (28.4 s with 1024, 28.5 s with 8 on that file) and the memory.

**cuDNN's execution plans (a GPU worker).** The same on a GPU: torch's cuDNN convolutions build an
execution plan for every (convolution, input shape) they see and keep it in an LRU cache of
10,000 plans by default, which torch's documentation puts at about 2 GiB of host memory (200 KiB a
plan; ``TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT``). CAM++ has 225 convolutions, and the diarization's
CAM++ batches come in a new (rows, frames) shape nearly every call (rows bucketed by length, each
batch cut to its shortest), a few dozen new shapes an hour, so a GPU worker's memory would grow by
plans no later job reuses until the default limit holds some 2 GiB. 1,000 plans (about 200 MB)
hold every plan of several shapes, more than one batch needs (within a job, a shape recurs only in
consecutive batches of full-length rows). ``scripts/device_check.sh`` (step 5) prints the time
new shapes cost and the memory they leave.

**Freed memory.** glibc keeps freed heap memory for reuse; ``release_memory`` hands it back after
a job, so a worker's RSS between jobs is what it holds (about 180 MB less after 20 minutes).

**Two malloc arenas.** glibc gives threads arenas of their own as they contend (up to 8 per core),
and memory freed in one arena is not reused by a thread allocating from another. The lanes' threads
and the pipeline's own thread each took one, and the hour's peak depended on which thread freed
what: in 4 of 6 runs of the same hour (2-core AVX-512 EPYC, nothing else running) its RSS peaked at
1837-1873 MB at the end of segmentation, against 1305-1342 MB in the others. With two arenas
(glibc's ``M_ARENA_MAX``, set here before any thread exists; an operator's ``MALLOC_ARENA_MAX``
wins) 1305-1335 MB in 6 of 6, in the same time (43.3-44.3 s against 43.1-45.4 s); one arena,
1317-1334 MB but 47-48 s.

**CUDA's libraries on a CPU worker.** torch's wheel links CUDA's libraries (cuBLASLt, NVRTC,
nvJitLink, cuSPARSELt, Triton, ...), so ``import torch`` maps them even where there is no GPU, and
the loader's relocation pass and the kernel's read-ahead leave much of them resident: 224 MB of
those libraries' pages on a 2-core AVX-512 host (RSS after the imports 960 -> 632 MB once handed
back), in code a CPU process never runs.
``drop_gpu_libraries`` asks the kernel to reclaim those pages (``MADV_PAGEOUT``); they are clean
file pages, so nothing is written anywhere, and a page that is ever touched again is simply read
back. The kernel keeps a page another process maps too, so a prefork parent hands them back
before it forks (``worker/lifecycle.py``). A CPU-only torch wheel would not map them at all; the
project installs one wheel for both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
# read by torch at a process's first cuDNN convolution, so before any model runs on a GPU
os.environ.setdefault("TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT", "1000")


def _libc_function(name: str, argtypes: list | None = None, restype=None):
    """The C library's ``name`` (errno kept for ctypes.get_errno), or None where it has none."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): no such function
        return None
    if argtypes is not None:
        function.argtypes = argtypes
    if restype is not None:
        function.restype = restype
    return function


_TRIM = _libc_function("malloc_trim")
_M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def _limit_arenas() -> int | None:
    """At most ``MALLOC_ARENAS`` malloc arenas (the module's docstring); the limit set, or None
    where the operator chose one (``MALLOC_ARENA_MAX``, read by glibc itself) or the C library
    has no ``mallopt`` (not glibc)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return None
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None or mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
        return None
    return MALLOC_ARENAS


malloc_arenas = _limit_arenas()


def release_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim), where there is one."""
    if _TRIM is not None:
        _TRIM(0)


# the files of CUDA's libraries as torch's wheel installs them: the nvidia-* wheels' folder,
# Triton's, and torch's own CUDA halves
_GPU_LIBRARY_PARTS = ("/site-packages/nvidia/", "/site-packages/triton/")
_GPU_LIBRARY_NAMES = ("libtorch_cuda", "libc10_cuda", "libcaffe2_nvrtc")


def _is_gpu_library(path: str) -> bool:
    name = os.path.basename(path)
    return any(part in path for part in _GPU_LIBRARY_PARTS) or name.startswith(_GPU_LIBRARY_NAMES)


def drop_gpu_libraries() -> int:
    """Ask the kernel to reclaim the resident pages of CUDA's libraries; for CPU-only processes.

    Returns how many mappings the kernel took the advice for (0 off Linux, and on a kernel before
    5.4, which refuses it and keeps the pages as before).
    """
    if not sys.platform.startswith("linux"):
        return 0
    # Linux's value (5.4+); Python's mmap module names it only when built against such headers
    advice = getattr(mmap, "MADV_PAGEOUT", 21)
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return 0
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not _is_gpu_library(fields[5].strip()):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, advice) == 0:
            advised += 1
    return advised


def cpu_only(device_setting: str) -> bool:
    """Whether a process configured with ``device_setting`` (``Settings.device``) will run on the
    CPU, decided without touching CUDA (a prefork parent must not, its children fork from it):
    "cpu", or "auto" on a host without NVIDIA's device node."""
    setting = device_setting.strip().lower()
    return setting == "cpu" or (setting == "auto" and not os.path.exists("/dev/nvidiactl"))
