"""shared.embedding_file: every format clients store embeddings in loads; nothing else does, and
nothing in a file ever runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from shared.embedding_file import MAX_EMBEDDING_BYTES, load_embedding
from shared.errors import InputError

DIM = 192


@pytest.fixture(scope="module")
def vector() -> np.ndarray:
    # random, not a constant, so a loader returning the wrong values cannot pass
    return np.random.default_rng(1234).standard_normal(DIM)


def _assert_same(out: np.ndarray, expected: np.ndarray) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == (DIM,)
    np.testing.assert_allclose(out, np.asarray(expected, dtype=np.float64).reshape(-1), rtol=1e-6, atol=1e-6)


# --- accepted formats ----------------------------------------------------------------------------

PICKLE_SHAPES = {
    "list": lambda v: v.tolist(),
    "tuple": lambda v: tuple(v.tolist()),
    "list_of_np_float64": lambda v: list(v),
    "list_of_np_float32": lambda v: list(v.astype(np.float32)),
    "nested_list": lambda v: [v.tolist()],
    "float32_array": lambda v: v.astype(np.float32),
    "float64_array": lambda v: v.astype(np.float64),
    "float32_row": lambda v: v.astype(np.float32).reshape(1, DIM),
    "float64_row": lambda v: v.reshape(1, DIM),
    "fortran_row": lambda v: np.asfortranarray(v.reshape(1, DIM)),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("shape", sorted(PICKLE_SHAPES))
def test_pickle_round_trip(vector: np.ndarray, protocol: int, shape: str) -> None:
    data = pickle.dumps(PICKLE_SHAPES[shape](vector), protocol=protocol)
    _assert_same(load_embedding(data, "enrolled.pkl"), vector)


@pytest.mark.parametrize("protocol", [0, 2, 3])
def test_pickle_written_by_numpy_1_loads(vector: np.ndarray, protocol: int) -> None:
    # numpy 1.x pickles name numpy.core.multiarray (numpy 2 renamed it numpy._core); most stored
    # enrollments predate numpy 2. Protocols 0-3 spell globals as text, so the rename is exact.
    data = pickle.dumps(vector.astype(np.float32), protocol=protocol)
    assert b"numpy._core.multiarray" in data
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    _assert_same(load_embedding(legacy), vector)


def test_pickle_file_name_does_not_matter(vector: np.ndarray) -> None:
    data = pickle.dumps(vector.tolist(), protocol=4)
    for name in (None, "x.json", "x.npy", "x.bin", "noext"):
        _assert_same(load_embedding(data, name), vector)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("row", [False, True])
def test_npy_round_trip(vector: np.ndarray, dtype: type, row: bool) -> None:
    buf = io.BytesIO()
    np.save(buf, vector.astype(dtype).reshape((1, DIM) if row else (DIM,)))
    out = load_embedding(buf.getvalue(), "enrolled.npy")
    tol = 1e-3 if dtype is np.float16 else 1e-6
    np.testing.assert_allclose(out, vector.astype(dtype).astype(np.float64), rtol=tol, atol=tol)
    assert out.dtype == np.float32 and out.shape == (DIM,)


def test_npy_named_pkl_is_read_by_content(vector: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vector)
    _assert_same(load_embedding(buf.getvalue(), "enrolled.pkl"), vector)


JSON_SHAPES = {
    "flat": lambda v: json.dumps(v.tolist()),
    "nested": lambda v: json.dumps([v.tolist()]),
    "endpoint_body": lambda v: json.dumps({"embedding": v.tolist(), "normalized": False, "processing_time": 0.1}),
    "pretty": lambda v: "\n  " + json.dumps({"embedding": v.tolist()}, indent=2),
    "bom": lambda v: "\ufeff" + json.dumps(v.tolist()),
}


@pytest.mark.parametrize("shape", sorted(JSON_SHAPES))
def test_json_round_trip(vector: np.ndarray, shape: str) -> None:
    _assert_same(load_embedding(JSON_SHAPES[shape](vector).encode("utf-8"), "enrolled.json"), vector)


def test_integer_vector_is_numeric_and_accepted() -> None:
    ints = np.arange(1, DIM + 1)
    _assert_same(load_embedding(pickle.dumps(ints.tolist())), ints)
    _assert_same(load_embedding(json.dumps(ints.tolist()).encode()), ints)


def test_result_is_a_private_writable_copy(vector: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vector.astype(np.float32))
    out = load_embedding(buf.getvalue())
    assert out.flags.writeable and out.flags.c_contiguous and out.flags.owndata


def test_dimension_argument(vector: np.ndarray) -> None:
    small = vector[:10]
    out = load_embedding(pickle.dumps(small.tolist()), dimension=10)
    assert out.shape == (10,)
    np.testing.assert_allclose(out, small, rtol=1e-6)
    with pytest.raises(InputError):
        load_embedding(pickle.dumps(small.tolist()))


# --- code execution through pickles --------------------------------------------------------------


class _TouchFile:
    """Unpickling this with plain pickle.loads creates a file (the classic pickle exploit)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _OpenFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _WritePathlib:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "owned"))


class _Eval:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w').close() or [1.0] * {DIM}",))


class _CustomVector:
    """A harmless class, but a class nonetheless: not a plain vector."""

    def __init__(self) -> None:
        self.values = [1.0] * DIM


@pytest.mark.parametrize("exploit", [_TouchFile, _OpenFile, _WritePathlib, _Eval], ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, exploit: type, protocol: int) -> None:
    target = tmp_path / "pwned"
    data = pickle.dumps(exploit(target), protocol=protocol)
    with pytest.raises(InputError, match="only a list or numpy array"):
        load_embedding(data, "enrolled.pkl")
    assert not target.exists()


def test_exploit_hidden_inside_a_list_runs_nothing(tmp_path: Path) -> None:
    # the payload is the 100th item of an otherwise valid vector
    target = tmp_path / "pwned"
    items: list = [0.5] * DIM
    items[100] = _TouchFile(target)
    with pytest.raises(InputError):
        load_embedding(pickle.dumps(items, protocol=2))
    assert not target.exists()


def test_exploit_via_copyreg_extension_is_refused(tmp_path: Path) -> None:
    # EXT2 opcodes look a global up in copyreg's registry: that path must go through find_class too
    import copyreg

    target = tmp_path / "pwned"
    code = 0xABCD
    command = f"touch {target}".encode()
    data = (
        b"\x80\x02\x83" + code.to_bytes(2, "little")
        + b"X" + len(command).to_bytes(4, "little") + command + b"\x85R."
    )
    copyreg.add_extension(os.system.__module__, "system", code)  # registered, as an attack would need
    try:
        with pytest.raises(InputError, match="system"):
            load_embedding(data)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert not target.exists()


@pytest.mark.parametrize(
    "obj",
    [
        {"embedding": [1.0] * DIM},
        {i: 1.0 for i in range(DIM)},
        set(range(1, DIM + 1)),
        "1.0 " * DIM,
        b"\x00" * DIM * 4,
        3.14,
        None,
    ],
    ids=["dict", "int_dict", "set", "str", "bytes", "scalar", "none"],
)
def test_pickle_of_other_builtin_types_is_refused(obj: object) -> None:
    with pytest.raises(InputError):
        load_embedding(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize(
    "obj",
    [_CustomVector(), eval, print, np.random.default_rng(0), np.float64(1.0).__class__],
    ids=["custom_class", "builtins.eval", "builtins.print", "numpy_generator", "numpy_type"],
)
def test_pickle_of_other_globals_is_refused(obj: object) -> None:
    with pytest.raises(InputError):
        load_embedding(pickle.dumps(obj, protocol=4))


def test_pickle_refers_to_numpy_loading_helpers_is_refused(tmp_path: Path) -> None:
    # numpy.load with allow_pickle defaults and numpy.lib.format helpers are globals like any other
    target = tmp_path / "x.npy"
    data = b"\x80\x02cnumpy\nsave\nq\x00X" + len(str(target)).to_bytes(4, "little") + str(target).encode()
    data += b"]\x86R."
    with pytest.raises(InputError, match="numpy.save"):
        load_embedding(data)
    assert not target.exists()


def test_crafted_reconstruct_shape_does_not_allocate() -> None:
    # _reconstruct(ndarray, (10**8,), 'b') would ask numpy for 100 MB before anything is checked
    data = (
        b"\x80\x02cnumpy._core.multiarray\n_reconstruct\n"
        b"cnumpy\nndarray\n"
        b"J\x00\xe1\xf5\x05\x85"  # (100_000_000,)
        b"C\x01b\x87R."
    )
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            load_embedding(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_pickle_cannot_call_ndarray_directly() -> None:
    # ndarray((100_000_000,)) through REDUCE: the class itself is never handed out
    data = b"\x80\x02cnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85\x85R."
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            load_embedding(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_pickle_codec_other_than_latin1_is_refused() -> None:
    # protocols 0-2 rebuild array bytes with _codecs.encode(text, 'latin1'); other codecs are refused
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(InputError, match="latin-1"):
        load_embedding(data)


def test_persistent_id_is_refused() -> None:
    with pytest.raises(InputError):
        load_embedding(b"\x80\x02X\x03\x00\x00\x00abcQ.")


# --- wrong contents ------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _all_formats(obj: np.ndarray) -> dict[str, bytes]:
    return {
        "pickle_list": pickle.dumps(obj.tolist(), protocol=2),
        "pickle_array": pickle.dumps(obj, protocol=4),
        "pickle_array_p0": pickle.dumps(obj, protocol=0),
        "npy": _npy(obj),
        "json": json.dumps(obj.tolist()).encode(),
    }


@pytest.mark.parametrize("size", [0, 1, 191, 193, 256, 512])
def test_wrong_dimension_is_refused(size: int) -> None:
    values = np.linspace(0.1, 1.0, size)
    for name, data in _all_formats(values).items():
        # protocol 0 writes an empty array's data as builtins.bytes(), a global refused as such
        with pytest.raises(InputError, match="expected" if size else "expected|bytes"):
            load_embedding(data)


@pytest.mark.parametrize("shape", [(2, DIM), (DIM, 1), (1, 1, DIM), (12, 16)])
def test_wrong_shape_is_refused(shape: tuple[int, ...]) -> None:
    values = np.linspace(0.1, 1.0, int(np.prod(shape))).reshape(shape)
    for name, data in _all_formats(values).items():
        with pytest.raises(InputError):
            load_embedding(data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(vector: np.ndarray, bad: float) -> None:
    values = vector.copy()
    values[7] = bad
    formats = _all_formats(values)
    # Python's json writes NaN/Infinity literals, which json.loads accepts again
    for name, data in formats.items():
        with pytest.raises(InputError, match="non-finite"):
            load_embedding(data)


def test_float64_overflowing_float32_is_refused(vector: np.ndarray) -> None:
    values = vector.copy()
    values[3] = 1e300
    with pytest.raises(InputError, match="non-finite"):
        load_embedding(pickle.dumps(values))


def test_all_zeros_is_refused() -> None:
    for name, data in _all_formats(np.zeros(DIM)).items():
        with pytest.raises(InputError, match="zeros"):
            load_embedding(data)


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.0] * DIM, dtype=object),
        np.array(["1.0"] * DIM),
        np.array([b"1.0"] * DIM),
        np.ones(DIM, dtype=bool),
        np.ones(DIM, dtype=np.complex64),
        np.zeros(DIM, dtype=[("a", "f4")]),
        np.array(["2020-01-01"] * DIM, dtype="datetime64[D]"),
    ],
    ids=["object", "str", "bytes", "bool", "complex", "structured", "datetime"],
)
def test_non_numeric_arrays_are_refused(array: np.ndarray) -> None:
    with pytest.raises(InputError, match="numbers"):
        load_embedding(pickle.dumps(array, protocol=4))
    with pytest.raises(InputError):
        load_embedding(_npy(array))


def test_object_npy_is_never_unpickled(tmp_path: Path) -> None:
    # an object .npy carries a pickle: numpy would run it with allow_pickle=True
    target = tmp_path / "pwned"
    data = _npy(np.array([_TouchFile(target)] * DIM, dtype=object))
    with pytest.raises(InputError):
        load_embedding(data, "enrolled.npy")
    assert not target.exists()


@pytest.mark.parametrize(
    "payload",
    [
        [True] * DIM,
        ["1.0"] * DIM,
        [None] * DIM,
        [[1.0, 2.0]] * (DIM // 2),
        [1.0] * (DIM - 1) + ["x"],
        {"vector": [1.0] * DIM},
        {"embedding": "1.0"},
        [],
        {},
    ],
    ids=["bools", "strings", "nulls", "pairs", "one_string", "wrong_key", "string_field", "empty_list", "empty_obj"],
)
def test_bad_json_contents_are_refused(payload: object) -> None:
    with pytest.raises(InputError):
        load_embedding(json.dumps(payload).encode(), "enrolled.json")


@pytest.mark.parametrize(
    "data",
    [
        b"[1.0, 2.0",
        b"{not json}",
        b"[" * 100_000 + b"]" * 100_000,
        b"[\xff\xfe]",
    ],
    ids=["truncated", "not_json", "deep_nesting", "bad_utf8"],
)
def test_malformed_json_is_refused(data: bytes) -> None:
    with pytest.raises(InputError):
        load_embedding(data)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(InputError, match="empty"):
        load_embedding(b"", "enrolled.pkl")


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_refused(seed: int) -> None:
    data = np.random.default_rng(seed).bytes(int(np.random.default_rng(seed).integers(1, 4096)))
    with pytest.raises(InputError):
        load_embedding(data)


@pytest.mark.parametrize("prefix", [b"\x80\x04", b"\x93NUMPY", b"(lp0\n", b"]q\x00("])
def test_random_bytes_behind_a_magic_are_refused(prefix: bytes) -> None:
    for seed in range(10):
        with pytest.raises(InputError):
            load_embedding(prefix + np.random.default_rng(seed).bytes(2000))


def test_truncated_files_are_refused(vector: np.ndarray) -> None:
    for name, data in _all_formats(vector).items():
        for cut in (1, len(data) // 2, len(data) - 1):
            with pytest.raises(InputError):
                load_embedding(data[:cut])


def test_text_file_is_refused() -> None:
    with pytest.raises(InputError):
        load_embedding(b"hello, this is my voice print\n" * 10, "embedding.txt")


def test_too_large_input_is_refused_before_parsing() -> None:
    # valid JSON, but over the size cap: refused for its size, not its contents
    data = b"[" + b" " * MAX_EMBEDDING_BYTES + b"1.0]"
    with pytest.raises(InputError, match="limit"):
        load_embedding(data)


def test_npy_header_claiming_huge_shape_does_not_allocate() -> None:
    header = np.lib.format.header_data_from_array_1_0(np.zeros(DIM, dtype=np.float64))
    header["shape"] = (10**9,)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(b"\x00" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="expected"):
            load_embedding(buf.getvalue(), "enrolled.npy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(InputError):
        load_embedding("[1.0]")  # type: ignore[arg-type]


# --- what reading a pickle costs ------------------------------------------------------------------
def test_a_pickle_of_more_opcodes_than_a_vector_needs_is_refused_before_it_is_read(monkeypatch) -> None:
    """Pickles are read by pickle's Python unpickler (a memo that is a dict, 5954be2), 40 times
    slower than the C one: a 1 MB pickle of 1-byte opcodes (MARK, NONE, POP) held a pool thread
    1.2 s, against 0.03 s before, and was refused only afterwards (not a vector). A pickled
    vector needs at most some 17 opcodes a value (a list of numpy scalars), so one of many more
    than that is refused from its opcodes, and its scan stops there."""
    import pickletools

    import shared.embedding_file as embedding_file

    def never(self):  # noqa: ANN001
        raise AssertionError("the pickle was unpickled")

    monkeypatch.setattr(embedding_file._VectorUnpickler, "load", never)
    scanned = 0
    genops = pickletools.genops

    def counted(data):  # noqa: ANN001
        nonlocal scanned
        for op in genops(data):
            scanned += 1
            yield op

    monkeypatch.setattr(pickletools, "genops", counted)
    for bomb in (b"\x80\x02" + b"N0" * 200_000 + b"N.", b"(" * 400_000 + b"l."):
        scanned = 0
        with pytest.raises(InputError, match="opcodes"):
            load_embedding(bomb, "e.pkl")
        assert scanned < 20_000, scanned


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("dimension", [DIM, 4096])
def test_the_most_opcodes_a_pickled_vector_has_are_read(protocol: int, dimension: int) -> None:
    # a list of numpy scalars: the most opcodes a value of the ways clients pickle a vector
    vector = np.random.default_rng(dimension).standard_normal(dimension)
    for value in ([np.float64(x) for x in vector], [np.float16(x) for x in vector], [vector.tolist()]):
        out = load_embedding(pickle.dumps(value, protocol=protocol), "e.pkl", dimension=dimension)
        assert out.shape == (dimension,)
