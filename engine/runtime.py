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

**Freed memory.** glibc keeps freed heap memory for reuse; ``release_memory`` hands it back after
a job, so a worker's RSS between jobs is what it holds (about 180 MB less after 20 minutes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim), where there is one."""
    if _TRIM is not None:
        _TRIM(0)
