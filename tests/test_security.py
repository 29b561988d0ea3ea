"""Issue 8: what a hostile client tried, against real processes (uvicorn, Redis, Celery workers).

Each test fails on the code before its fix: the pickle crashed the process, key B read key A's
jobs, webhooks reached loopback, the default secret was accepted, a chunked upload was read to
its end, Celery carried the client's data, slow clients were never dropped.
"""

from __future__ import annotations

import itertools
import json
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import json_embedding_file, wait_for_job

ERROR_KEYS = {"detail", "error_type", "timestamp"}
PROJECT = Path(__file__).resolve().parents[1]


# --- 1. pickles that make numpy corrupt memory; JSON with huge integers ----------------------------


class _Reduce:
    """Pickles as an arbitrary ``callable(*args)`` + BUILD ``state``, as a hostile client writes it."""

    def __init__(self, func: Any, args: tuple, state: Any = None) -> None:
        self.value = (func, args) if state is None else (func, args, state)

    def __reduce__(self) -> Any:
        return self.value


def object_dtype_pickle() -> bytes:
    """The 213-byte pickle that segfaulted uvicorn: object dtype, shape (192,), 2 items of data."""
    return pickle.dumps(
        _Reduce(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (192,), np.dtype("O8"), False, [1.0, 1.0])),
        protocol=2,
    )


def _fuzz_pickles() -> Iterator[bytes]:
    dtypes = [np.dtype(c) for c in ("O8", "O", "V8", "U4", "S4", "M8[s]", "c8", "?", "f4", ">f8", "i2")]
    dtypes.append(np.dtype([("a", "f4"), ("b", "O")]))
    shapes = [(192,), (2,), (0,), (1, 192), (), (10**9,), (-1,), (192, 10**9)]
    datas: list[Any] = [[1.0, 1.0], [1.0] * 192, b"\0" * 8, b"\x01" * 768, None, 1.5, "abc", (b"x",)]
    reconstruct = np._core.multiarray._reconstruct
    for dtype, shape, data, fortran in itertools.product(dtypes, shapes, datas, (False, True)):
        yield pickle.dumps(_Reduce(reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data)), protocol=2)
        # the same state without its version, and given to _reconstruct directly
        yield pickle.dumps(_Reduce(reconstruct, (np.ndarray, shape, dtype), (shape, dtype, fortran, data)), protocol=4)
    for dtype, data in itertools.product(dtypes, datas):
        yield pickle.dumps([_Reduce(np._core.multiarray.scalar, (dtype, data))] * 192, protocol=2)
        yield pickle.dumps(_Reduce(np._core.numeric._frombuffer, (data, dtype, (192,), "C")), protocol=5)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    # a segfault must fail the test, not kill pytest
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)


def test_object_dtype_pickle_is_refused_before_numpy_builds_it(tmp_path):
    payload = tmp_path / "seg.pkl"
    payload.write_bytes(object_dtype_pickle())
    proc = _run_isolated(f"""
        from shared.embedding_file import load_embedding
        from shared.errors import InputError
        try:
            load_embedding(open({str(payload)!r}, "rb").read())
        except InputError as exc:
            print("refused:", exc.detail)
    """)
    assert proc.returncode == 0, f"process died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert "refused:" in proc.stdout and "must hold numbers, not object" in proc.stdout, proc.stdout


def test_fuzz_of_dtype_shape_and_state_never_crashes(tmp_path):
    cases = list(_fuzz_pickles())
    (tmp_path / "cases.pkl").write_bytes(pickle.dumps(cases))
    proc = _run_isolated(f"""
        import pickle
        from shared.embedding_file import load_embedding
        from shared.errors import InputError
        refused = accepted = 0
        for data in pickle.load(open({str(tmp_path / "cases.pkl")!r}, "rb")):
            try:
                vector = load_embedding(data)
            except InputError:
                refused += 1
            else:
                assert vector.shape == (192,) and vector.dtype == "float32"
                accepted += 1
        print(refused, accepted)
    """)
    assert proc.returncode == 0, f"process died with {proc.returncode}: {proc.stderr[-2000:]}"
    refused, accepted = map(int, proc.stdout.split())
    print(f"\npickle fuzz: {len(cases)} variants, {refused} refused, {accepted} accepted, no crash")
    assert refused + accepted == len(cases)
    # only plain numeric arrays with the right amount of data may pass (f4/f8/i2 x 768 bytes...)
    assert accepted < len(cases) // 10


def test_json_with_huge_integers_is_refused_as_input():
    from shared.embedding_file import load_embedding
    from shared.errors import InputError

    for payload in (b"[" + b"9" * 4000 + b"]" * 1, json.dumps([int("9" * 4000)] + [1] * 191).encode(),
                    pickle.dumps([int("9" * 4000)] + [1.0] * 191)):
        with pytest.raises(InputError):
            load_embedding(payload)
