"""CPU inference in lanes: N single-threaded model calls side by side, not one N-threaded call.

torch parallelises each operator over OpenMP threads. Segmentation's LSTM and CAM++ are long
chains of small operators, so most of that time is spent at the barriers between them: threads
either spin there (libgomp's default) or sleep and are woken (``OMP_WAIT_POLICY=PASSIVE``, our
default since a spinning team collapses when another process holds a core, see
``engine.runtime``). Giving each batch one thread and running ``count`` batches at once, in
Python threads (torch releases the GIL inside operators), has no barrier at all. Measured on this
project's 2-core machine, 10 min of four-talker speech, step 0.5 (docs/models.md):

    =============================  ==========  =================================
    2 threads, passive waiting        31.2 s   29.5 s beside a busy process
    2 threads, spinning (ACTIVE)      19.8 s
    2 lanes of 1 thread               14.7 s   23.4 s beside a busy process
    =============================  ==========  =================================

DER is unchanged (each row's numbers are the same model on the same input). The engine's
diarization and its speech detector (verification, identification, enrolment, stereo calls) run
in lanes on the CPU; a GPU takes whole batches as before.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def _one_thread() -> None:
    torch.set_num_threads(1)


class Lanes:
    """``count`` single-threaded lanes, open during ``session()``; outside one, ``map`` runs inline."""

    def __init__(self, count: int) -> None:
        self.count = max(1, int(count))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def session(self) -> Iterator["Lanes"]:
        """Lanes open for one job. The calling thread drops to one intra-op thread too: torch keeps
        one process-wide count that a new thread copies, and the lanes must start at one (their
        first operator reads it), while the caller's own work between model calls is small."""
        if self.count == 1:
            yield self
            return
        with self._lock:  # one job at a time per engine; a second caller waits for the lanes
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            # fresh threads per session: each reads the count of one at its first operator
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="lane", initializer=_one_thread)
            try:
                yield self
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None
                torch.set_num_threads(previous)

    @contextlib.contextmanager
    def open(self) -> Iterator["Lanes"]:
        """The lanes for a model call made outside the diarization (the speech detector): a
        session of its own, or the one already open (never a second on the same thread, whose lock
        it would wait on for ever)."""
        if self._pool is not None:
            yield self
            return
        with self.session():
            yield self

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` in the lanes (in inference mode, which is per thread), in order."""
        pool = self._pool
        if pool is None:
            return [fn(item) for item in items]

        def run(item: T) -> R:
            with torch.inference_mode():
                return fn(item)

        return list(pool.map(run, items))

    def split_batches(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make ``model(x)`` run its batch (dim 0) as ``count`` parts in the lanes, when open.

        For a model driven by a library's own batching loop (pyannote's ``Inference`` slides
        the segmentation model over the file): its loop stays as it is, each call's batch is
        shared out. Outside a session, or for a batch of one, the model runs as before.
        """
        forward = model.forward

        def laned(x: torch.Tensor, *args, **kwargs):
            if self._pool is None or args or kwargs or x.shape[0] < 2:
                return forward(x, *args, **kwargs)
            parts = [part for part in torch.tensor_split(x, self.count) if part.shape[0]]
            return torch.cat(self.map(forward, parts))

        model.forward = laned  # an instance attribute: nn.Module.__call__ looks it up first
        return model
