"""Reading a client's stored enrollment embedding (the ``embedding`` part of ``/compare_embedding``).

Clients keep the vector however they like: historically ``pickle.dump`` of a list or a numpy
array, sometimes ``np.save`` or the JSON body of our own ``/embedding`` endpoint. The bytes come
from outside the service, so nothing in them may run code or make us allocate much:

* the format is told from the content (magic bytes), never trusted from the file name;
* ``.npy`` headers are checked (shape, dtype) before any data is read, and never with pickles;
* pickles go through :class:`_VectorUnpickler`, whose ``find_class`` hands out only our own
  stand-ins for the few numpy names a pickled array uses; they check the dtype (plain numbers
  only), shape and data length before numpy builds anything, and numpy's own ``__setstate__``
  never runs on pickle data. Any other global (``os.system``, ``builtins.eval``, a custom
  class...) is refused before it is imported, let alone called;
* whatever comes out must be exactly ``dimension`` finite numbers, not all zero.

Anything wrong raises :class:`~shared.errors.InputError` (HTTP 422).
"""

from __future__ import annotations

import _codecs
import io
import json
import math
import numbers
import pickle
import pickletools
from typing import Any, Callable

import numpy as np

from shared.errors import InputError

# a 192-float embedding is a few KB in any of these formats; 1 MiB leaves room for verbose JSON
MAX_EMBEDDING_BYTES = 1024 * 1024
# .npy headers are short; numpy's own default cap is 10 000
_MAX_NPY_HEADER = 10_000
_NPY_MAGIC = b"\x93NUMPY"
# integer vectors are odd but harmless; bool, complex, str, bytes, object, void, datetime are not
_NUMERIC_KINDS = frozenset("fiu")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles of arrays use it (their raw buffer as latin-1 text).

    Only latin-1 of a ``str`` is allowed: other codecs (zlib, bz2, ...) have no business here.
    """
    if not isinstance(obj, str) or encoding.replace("_", "-").lower() not in {"latin1", "latin-1"}:
        raise InputError("embedding pickle uses a codec other than latin-1")
    return _codecs.encode(obj, "latin1", errors)


class _NdarrayToken:
    """Handed out for ``numpy.ndarray``: a pickle needs the class only as ``_reconstruct``'s argument.

    Giving out the real class would let a pickle call ``numpy.ndarray((10**10,))`` directly.
    """


# more than any embedding has; bounds what a pickle may make us allocate
_MAX_PICKLED_ELEMENTS = 4096
# numpy's __reduce__ state of a plain (non-structured, non-subarray) dtype:
# (version, byteorder, subarray, names, fields, elsize, alignment, flags)
_DTYPE_STATE_LEN = 8


class _DtypeSpec:
    """Stands for ``numpy.dtype(spec, align, copy)`` in a pickle; only plain numeric dtypes.

    numpy itself never sees a dtype state from the pickle: an object dtype rebuilt by numpy with
    a crafted array state corrupts memory (a 216-byte pickle segfaulted the API), so the type is
    checked from its short spec string here, before anything is built, and of the state only
    the byte order is used.
    """

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not 0 < len(spec) <= 8:
            raise InputError("embedding pickle declares a dtype that is not a plain numeric type")
        try:
            dtype = np.dtype(spec)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"embedding pickle declares an unknown dtype {spec!r}") from exc
        _check_dtype(dtype)
        self.dtype: np.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == _DTYPE_STATE_LEN and state[0] in (3, 4)
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)):
            raise InputError("embedding pickle holds a dtype state other than a plain numeric type's")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _resolve_dtype(value: Any) -> np.dtype:
    if isinstance(value, _DtypeSpec):
        return value.dtype
    raise InputError("embedding pickle declares an array type that is not a plain numeric dtype")


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not (isinstance(shape, tuple) and len(shape) <= 2
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= _MAX_PICKLED_ELEMENTS for n in shape)):
        raise InputError("embedding pickle declares an array shape that is not a vector")
    if math.prod(shape) > _MAX_PICKLED_ELEMENTS:
        raise InputError("embedding pickle declares an array far larger than an embedding")
    return shape


def _array_from_bytes(raw: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    # object arrays carry a list here instead of bytes: refused, as are bytes of the wrong length
    if not isinstance(raw, (bytes, bytearray)):
        raise InputError("embedding pickle holds array data that is not raw numbers")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise InputError("embedding pickle's array data does not match its declared shape")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


class _ArraySpec:
    """What ``_reconstruct`` returns: filled by the pickle's BUILD (``__setstate__``) after checks.

    The real array is made with ``np.frombuffer`` from bytes whose length was checked against the
    declared numeric dtype and small shape; numpy's own ``ndarray.__setstate__`` never runs.
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise InputError("embedding pickle holds an array state numpy does not write")
        if len(state) == 5:
            version, *rest = state
            if version != 1 or isinstance(version, bool):
                raise InputError("embedding pickle holds an array state numpy does not write")
            state = tuple(rest)
        shape, dtype, fortran, raw = state
        if not isinstance(fortran, bool):
            raise InputError("embedding pickle holds an array state numpy does not write")
        self.array = _array_from_bytes(raw, _resolve_dtype(dtype), _check_shape(shape), fortran)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _ArraySpec:
    """Stands for numpy's ``_reconstruct``: plain arrays only, nothing allocated yet.

    numpy pickles always pass shape ``(0,)`` and dtype ``b'b'``, and set the real shape, dtype and
    data afterwards through ``__setstate__`` (see :class:`_ArraySpec`).
    """
    if subtype is not _NdarrayToken:
        raise InputError("embedding pickle rebuilds something other than a numpy array")
    if not isinstance(shape, tuple) or not isinstance(dtype, (bytes, str, _DtypeSpec)):
        raise InputError("embedding pickle rebuilds an array in a way numpy does not write")
    return _ArraySpec()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Stands for numpy's protocol-5 ``_frombuffer``, with the same checks as :class:`_ArraySpec`."""
    if order not in ("C", "F"):
        raise InputError("embedding pickle rebuilds an array in a way numpy does not write")
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytes(buffer.raw())
    return _array_from_bytes(buffer, _resolve_dtype(dtype), _check_shape(shape), order == "F")


def _scalar(dtype: Any, raw: Any = None) -> Any:
    """Stands for numpy's ``scalar`` (np.float32/64 items of a list): numeric, from exact bytes."""
    resolved = _resolve_dtype(dtype)
    return _array_from_bytes(raw, resolved, (1,), False)[0]


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): _NdarrayToken,
        ("numpy", "dtype"): _DtypeSpec,
        ("_codecs", "encode"): _latin1_encode,
    }
    # pickles written by numpy 1.x name numpy.core, those by numpy 2.x numpy._core; both must load.
    # Every entry is our own stand-in: no numpy callable is ever handed to the unpickler.
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = _reconstruct  # protocols 0-4
        table[(f"{package}.multiarray", "scalar")] = _scalar  # np.float32/64 items of a list
        table[(f"{package}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    return table


# pickle's own Python implementation, not the C one: the C unpickler keeps its memo as an array
# that a PUT opcode's index grows to twice that index, zero-filled at once, so a 9-byte pickle
# (LONG_BINPUT 10**8) took 1.6 GB and 0.9 s of the API's CPU before anything was checked, and
# one naming 2**30 asked for 16 GB. The Python one keeps its memo in a dict, an entry per PUT;
# it reads an embedding's pickle (1 KB) in 0.03 ms, the largest allowed (1 MB) in 0.13-0.15 s
class _VectorUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler that can rebuild a list of floats or a numpy array, and nothing else."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise InputError(
                f"embedding pickle refers to {module}.{name}; only a list or numpy array of floats is accepted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise InputError("embedding pickle uses persistent ids, which are not accepted")


# Opcodes that build a dict or a set. A pickled vector has neither (a list or an array of numbers,
# whose states are tuples), and their keys are hashed as they are inserted: integers that hash
# alike (multiples of 2**61 - 1) make each insertion compare with every key before it, so 40,000
# such keys (519 KB) held the C unpickler, and with it the GIL and the whole API, 10.8 s.
_HASHING = frozenset({"EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET"})
# Opcodes that store the stack's top in the memo at an index of the pickle's choosing. A pickler
# numbers its memo from 0, an entry per PUT of at least 2 bytes; a larger index (a PUT's text may
# name an integer of thousands of digits, hashing alike as above) is no pickler's.
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
# Opcodes a pickle may have per value of the vector, and besides. The Python unpickler (above)
# takes some 0.8 us an opcode, 30 times the C one, and this scan 0.4 us: a 1 MB pickle of 1-byte
# opcodes (MARK, NONE, POP) held a pool thread 1.2 s, against 0.03 s with the C unpickler alone,
# to be refused afterwards as no vector. A pickled vector has at most some 17 a value (a list of
# numpy scalars), so a 192-value one is read in a few ms at worst.
_OPCODES_PER_VALUE = 32
_OPCODES_BESIDES = 256


def _check_opcodes(data: bytes, dimension: int) -> None:
    """Refuse, from its opcodes alone (nothing built), a pickle that builds a dict or a set,
    memoises at an index past its own length, or has more opcodes than a vector of ``dimension``
    values needs: what no pickled vector holds, and what costs far more than its bytes."""
    most = _OPCODES_PER_VALUE * min(dimension, _MAX_PICKLED_ELEMENTS) + _OPCODES_BESIDES
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if count >= most:
                raise InputError(f"embedding pickle has over {most} opcodes, more than a vector of {dimension} "
                                 "numbers needs")
            if opcode.name in _HASHING:
                raise InputError("embedding pickle builds a mapping or a set; only a list or numpy array of "
                                 "numbers is accepted")
            if opcode.name in _MEMO_PUTS and not 0 <= arg < len(data):
                raise InputError("embedding pickle stores a value at a memo index no pickler writes")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed opcode or argument: the caller's bytes
        raise InputError(f"embedding is not a readable pickle ({exc.__class__.__name__})") from exc


def _from_pickle(data: bytes, dimension: int) -> Any:
    _check_opcodes(data, dimension)
    try:
        return _VectorUnpickler(io.BytesIO(data)).load()
    except InputError:
        raise
    # a corrupt pickle can fail in many ways (UnpicklingError, EOFError, ValueError, struct.error,
    # MemoryError from a bogus length, TypeError from a wrong call...): all are the caller's bytes
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"embedding is not a readable pickle ({exc.__class__.__name__})") from exc


def _from_npy(data: bytes, dimension: int) -> np.ndarray:
    fmt = np.lib.format
    fh = io.BytesIO(data)
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh, max_header_size=_MAX_NPY_HEADER)
        else:
            raise InputError(f".npy format version {version} is not supported")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"embedding is not a readable .npy file ({exc.__class__.__name__})") from exc
    # numpy preallocates the whole declared shape when reading from memory: check it first, as
    # Python ints. An int64 product raised OverflowError (a 500) for a dimension past 2**63, and
    # wrapped round for one past it in all: (64, 2**58 + 3) counted as the 192 values expected
    if any(d < 0 for d in shape) or math.prod(shape) != dimension:
        raise InputError(f"stored embedding has shape {tuple(shape)}; {dimension} values are expected")
    _check_dtype(dtype)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"embedding is not a readable .npy file ({exc.__class__.__name__})") from exc


def _json_int(text: str) -> float:
    # a 4000-digit integer parses, then overflows float64 later (OverflowError, a 500): refuse it
    # as the caller's mistake while it is still text
    if len(text.lstrip("-")) > 308:
        raise InputError("embedding JSON holds an integer too large for a number")
    return float(int(text))


# Commas a JSON embedding may hold: a vector of ``dimension`` numbers has dimension - 1, and a
# voiceprint document besides a few keys and a label of at most 200 characters. Counted before it
# is parsed: 500,000 zeros in 1 MB ("[0,0,...]") held the GIL, and so every request of the API,
# 0.5-0.6 s while json read them one Python call each, only to be refused as not 192 values.
_COMMAS_BESIDES = 256


def check_json_size(data: bytes, dimension: int) -> None:
    """Refuse, from a count of its commas (nothing parsed), JSON holding far more values than a
    vector of ``dimension`` numbers and a voiceprint's few fields."""
    most = 2 * dimension + _COMMAS_BESIDES
    if data.count(b",") > most:
        raise InputError(f"embedding JSON holds far more values than a vector of {dimension} numbers "
                         f"(over {most} commas)")


def _from_json(data: bytes, dimension: int) -> Any:
    check_json_size(data, dimension)
    try:
        obj = json.loads(data.decode("utf-8-sig"), parse_int=_json_int)
    # RecursionError: deeply nested brackets
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"embedding is not valid JSON ({exc.__class__.__name__})") from exc
    if isinstance(obj, dict):
        if "embedding" not in obj:
            raise InputError('embedding JSON object has no "embedding" field')
        obj = obj["embedding"]
    return obj


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise InputError(f"stored embedding must hold numbers, not {dtype}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but a vector of booleans is not an embedding
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _to_vector(obj: Any, dimension: int) -> np.ndarray:
    """Turn a decoded object into a (dimension,) float32 vector, or refuse it."""
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise InputError("embedding pickle rebuilds an array without its data")
        obj = obj.array
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        array = obj
    elif isinstance(obj, (list, tuple)):
        # a batch of one row ([[...]], as .tolist() of a (1, d) array gives); one level only
        if len(obj) == 1 and isinstance(obj[0], (list, tuple)):
            obj = obj[0]
        if not all(_is_number(v) for v in obj):
            raise InputError("stored embedding must be a flat list of numbers")
        try:
            array = np.asarray(obj, dtype=np.float64)
        except OverflowError as exc:  # a huge Python int pickled in a list
            raise InputError("stored embedding holds a number too large for a float") from exc
    else:
        raise InputError(
            f"stored embedding must be a list or array of numbers, not {type(obj).__name__}"
        )
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (dimension,):
        raise InputError(f"stored embedding has shape {array.shape}; {dimension} values are expected")
    with np.errstate(over="ignore", invalid="ignore"):
        vector = np.array(array, dtype=np.float32)  # always a copy: never a view on client bytes
    # checked after the cast: a finite float64 such as 1e300 overflows float32 to infinity
    if not np.all(np.isfinite(vector)):
        raise InputError("stored embedding holds non-finite values (NaN or infinity)")
    if not np.any(vector):
        raise InputError("stored embedding is all zeros")
    return vector


def load_embedding(data: bytes, filename: str | None = None, *, dimension: int = 192,
                   allow_pickle: bool = True) -> np.ndarray:
    """Decode a stored embedding (.npy, JSON or a pickled vector) into a ``(dimension,)`` float32 array.

    ``filename`` is only used in messages: the format is detected from the content.
    ``allow_pickle=False`` (voiceprint imports) takes .npy and JSON only.
    """
    label = f"embedding file {filename!r}" if filename else "embedding file"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{label} must be bytes")
    data = bytes(data)
    if not data:
        raise InputError(f"{label} is empty")
    if len(data) > MAX_EMBEDDING_BYTES:
        raise InputError(f"{label} is {len(data)} bytes; the limit is {MAX_EMBEDDING_BYTES}")

    if data.startswith(_NPY_MAGIC):
        return _to_vector(_from_npy(data, dimension), dimension)
    # JSON may come with a UTF-8 byte-order mark or leading whitespace
    stripped = data.removeprefix(b"\xef\xbb\xbf").lstrip()
    if stripped[:1] in (b"[", b"{"):
        return _to_vector(_from_json(data, dimension), dimension)
    if not allow_pickle:
        raise InputError(f"{label} is neither .npy nor JSON (pickles are not accepted here)")
    # protocol 2+ pickles start with PROTO (\x80); protocols 0 and 1 have no header at all, so
    # anything else is tried as a pickle too: the restricted unpickler makes that safe
    return _to_vector(_from_pickle(data, dimension), dimension)
