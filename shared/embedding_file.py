"""Reading a client's stored enrollment embedding (the ``embedding`` part of ``/compare_embedding``).

Clients keep the vector however they like: historically ``pickle.dump`` of a list or a numpy
array, sometimes ``np.save`` or the JSON body of our own ``/embedding`` endpoint. The bytes come
from outside the service, so nothing in them may run code or make us allocate much:

* the format is told from the content (magic bytes), never trusted from the file name;
* ``.npy`` headers are checked (shape, dtype) before any data is read, and never with pickles;
* pickles go through :class:`_VectorUnpickler`, whose ``find_class`` hands out only the few numpy
  callables that rebuild a plain array; any other global (``os.system``, ``builtins.eval``, a
  custom class...) is refused before it is imported, let alone called;
* whatever comes out must be exactly ``dimension`` finite numbers, not all zero.

Anything wrong raises :class:`~shared.errors.InputError` (HTTP 422).
"""

from __future__ import annotations

import _codecs
import io
import json
import numbers
import pickle
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


def _numpy_core() -> Any:
    # numpy 2 moved the internals to numpy._core and keeps numpy.core as a deprecated alias
    return getattr(np, "_core", None) or np.core


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


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``, for plain arrays only and always empty.

    numpy pickles always pass shape ``(0,)`` and set the real shape and data afterwards through
    ``__setstate__``, which checks the data length; a crafted shape could otherwise allocate
    gigabytes here.
    """
    if subtype is not _NdarrayToken:
        raise InputError("embedding pickle rebuilds something other than a numpy array")
    return _numpy_core().multiarray._reconstruct(np.ndarray, (0,), dtype)


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    core = _numpy_core()
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): _NdarrayToken,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # pickles written by numpy 1.x name numpy.core, those by numpy 2.x numpy._core; both must load
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = _reconstruct  # protocols 0-4
        table[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar  # np.float32/64 items of a list
        table[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5
    return table


class _VectorUnpickler(pickle.Unpickler):
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


def _from_pickle(data: bytes) -> Any:
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
    # numpy preallocates the whole declared shape when reading from memory: check it first
    if int(np.prod(shape, dtype=np.int64)) != dimension:
        raise InputError(f"stored embedding has shape {tuple(shape)}; {dimension} values are expected")
    _check_dtype(dtype)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"embedding is not a readable .npy file ({exc.__class__.__name__})") from exc


def _from_json(data: bytes) -> Any:
    try:
        obj = json.loads(data.decode("utf-8-sig"))
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
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        array = obj
    elif isinstance(obj, (list, tuple)):
        # a batch of one row ([[...]], as .tolist() of a (1, d) array gives); one level only
        if len(obj) == 1 and isinstance(obj[0], (list, tuple)):
            obj = obj[0]
        if not all(_is_number(v) for v in obj):
            raise InputError("stored embedding must be a flat list of numbers")
        array = np.asarray(obj, dtype=np.float64)
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


def load_embedding(data: bytes, filename: str | None = None, *, dimension: int = 192) -> np.ndarray:
    """Decode a stored embedding (.npy, JSON or a pickled vector) into a ``(dimension,)`` float32 array.

    ``filename`` is only used in messages: the format is detected from the content.
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
        return _to_vector(_from_json(data), dimension)
    # protocol 2+ pickles start with PROTO (\x80); protocols 0 and 1 have no header at all, so
    # anything else is tried as a pickle too: the restricted unpickler makes that safe
    return _to_vector(_from_pickle(data), dimension)
