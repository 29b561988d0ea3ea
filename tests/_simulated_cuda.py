"""A CUDA device simulated on the CPU, for the engine's GPU code paths on a machine without a GPU.

This project's CI machines have no GPU, and a lent card is rare and short, so the code the engine
runs only when ``device.type == "cuda"`` (batches kept on the device, segmentation batches of 256,
the recording uploaded once, CAM++ eager instead of traced, pinned copies, ``torch.cuda`` calls)
would otherwise first run on a customer's card. Under :func:`simulated_cuda`:

- a tensor "on cuda:0" is a wrapper (:class:`SimulatedCudaTensor`) whose ``device`` says
  ``cuda:0`` and whose data is a CPU tensor; every operation on it runs on the CPU;
- CUDA's device rules are enforced the way CUDA enforces them: an operation mixing a device
  tensor and a host tensor (other than a 0-dim one, or an index) fails with CUDA's message, and
  ``.numpy()`` of a device tensor fails as on a GPU; ``.cpu()`` / ``.to("cpu")`` bring it back;
- ``torch.cuda``'s functions the engine calls answer as for one idle card.

What it cannot show: speed, memory, cuDNN's or cuBLAS's numerics, asynchrony (every operation
here is synchronous), and TorchScript on the device (tracing needs real tensors; the engine runs
CAM++ eager on a GPU anyway). ``tests/test_engine_gpu.py`` checks those on a lent card.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("cuda", 0)
_T = torch.Tensor

# calls CUDA runs with host tensors among device ones: copies between devices, and indexing a
# device tensor with host indices (torch moves them); every other call with a host tensor of one
# dimension or more next to a device tensor fails, as it does on a card
_CROSS_DEVICE = {_T.to, _T.cuda, _T.cpu, _T.copy_, _T.__getitem__, _T.__setitem__, _T.pin_memory, _T.numpy,
                 _T.__array__,
                 torch._has_compatible_shallow_copy_type}
# in-place calls that change a tensor's shape: the wrapper's shape would no longer be its data's
_RESHAPING = {_T.resize_, _T.resize_as_, _T.set_, _T.unsqueeze_, _T.squeeze_, _T.t_, _T.transpose_,
              _T.as_strided_, _T.swapdims_, _T.swapaxes_}
# ... of which these only re-view the same data, and are answered with a new wrapper
_SELF_RESHAPING = {_T.unsqueeze_, _T.squeeze_, _T.t_, _T.transpose_, _T.swapdims_, _T.swapaxes_}


class SimulatedCudaTensor(torch.Tensor):
    """A tensor that says it is on ``cuda:0`` and keeps its data in a CPU tensor (``elem``).

    Every torch call that gets one is answered by :func:`_call` at the Python level (torch's
    ``__torch_function__``), before torch's C++ bindings would set the CUDA device, which needs a
    driver: the call runs on the CPU with the data, and its tensors come back wrapped."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "SimulatedCudaTensor":
        assert elem.device.type == "cpu" and not isinstance(elem, SimulatedCudaTensor), type(elem)
        if type(elem) is not torch.Tensor:  # a Parameter, say: the wrapper holds the plain data
            with torch._C.DisableTorchFunctionSubclass():
                elem = elem.as_subclass(torch.Tensor)
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"simulated CUDA: {func} reached torch's dispatcher with a wrapper")


def _is_device(value: Any) -> bool:
    return isinstance(value, SimulatedCudaTensor)


def _names_cuda(device: Any) -> bool:
    if isinstance(device, torch.Tensor):
        return _is_device(device)
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return False


def _names_cpu(device: Any) -> bool:
    if isinstance(device, torch.Tensor):
        return not _is_device(device)
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cpu"
    return False


def _host(device: Any) -> Any:
    """The host's counterpart of a device argument."""
    if isinstance(device, SimulatedCudaTensor):
        return device.elem
    return torch.device("cpu") if _names_cuda(device) else device


def _call(func, args, kwargs):
    getter = getattr(func, "__self__", None)  # a property's __get__: a new bound object each time
    if getter is _T.device and _is_device(args[0]):
        return DEVICE
    if getter is _T.is_cuda and _is_device(args[0]):
        return True
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    on_device = [t for t in tensors if _is_device(t)]
    if on_device and func not in _CROSS_DEVICE:
        host = [t for t in tensors if not _is_device(t) and t.dim() > 0]
        if host:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                f"(simulated CUDA: {getattr(func, '__name__', func)} with a host tensor of shape "
                f"{tuple(host[0].shape)})"
            )
    if on_device and func in _RESHAPING:
        if func in _SELF_RESHAPING and _is_device(args[0]):
            # the data takes its new shape; a new wrapper carries it (``x = x.unsqueeze_(1)``, as
            # code writes it: code that kept using the old object would see its old shape)
            func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
            return SimulatedCudaTensor(args[0].elem)
        raise NotImplementedError(f"simulated CUDA: {func.__name__} on a device tensor")
    if func in (_T.numpy, _T.__array__) and on_device:
        # torch's own message on a card
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")
    if func is _T.pin_memory:
        return args[0]  # pinned host memory is host memory here
    to_device = func is _T.cuda or _names_cuda(kwargs.get("device"))
    to_host = func is _T.cpu or _names_cpu(kwargs.get("device"))
    if func is _T.to:
        to_device = to_device or any(_names_cuda(a) for a in args[1:])
        to_host = to_host or any(_names_cpu(a) for a in args[1:])
        args = (args[0], *(_host(a) for a in args[1:]))
    if func is _T.cuda:
        func, args, kwargs = _T.clone, args[:1], {}
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _host(kwargs["device"])}
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}
    wrappers = {id(t.elem): t for t in on_device}
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if to_host or not (on_device or to_device):
        return out
    if func is _T.to and not to_device and isinstance(out, torch.Tensor) and id(out) in wrappers:
        return wrappers[id(out)]  # .to(dtype) with nothing to change returns the tensor itself

    def wrap(value: Any) -> Any:
        # an in-place call returns its own (wrapped) self; anything else computed is on the device
        same = wrappers.get(id(value))  # not ``or``: a tensor of several values has no truth value
        return same if same is not None else _to_card(value)

    return tree_map(wrap, out)


def _to_card(value: Any) -> Any:
    """A host tensor's data on the card (anything else as it is)."""
    if isinstance(value, torch.Tensor) and not _is_device(value):
        return SimulatedCudaTensor(value)
    return value


_REAL_VMAP = torch.vmap


def _vmap(func, *args, **kwargs):
    mapped = _REAL_VMAP(func, *args, **kwargs)

    def run(*inputs, **named):
        on_card = any(_is_device(t) for t in tree_leaves((inputs, named)))
        out = mapped(*tree_map(_unwrap, inputs), **tree_map(_unwrap, named))
        return tree_map(_to_card, out) if on_card else out

    return run


def _unwrap(value: Any) -> Any:
    return value.elem if isinstance(value, SimulatedCudaTensor) else value


class _Mode(TorchFunctionMode):
    """Sees the calls on host tensors too: factories and copies asked for ``device="cuda"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _call(func, args, kwargs or {})


class _Props:
    name = "Simulated CUDA device (CPU)"
    total_memory = 80 * 2**30
    major, minor = 9, 0
    multi_processor_count = 132
    uuid = "GPU-00000000-0000-0000-0000-000000000000"


@contextlib.contextmanager
def simulated_cuda() -> Iterator[None]:
    """One simulated card, ``cuda:0``, for the block, in this thread (torch's function modes are
    per thread: a tensor already on the card works in any thread, a new one is made here)."""
    patches = [
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.is_initialized", lambda: True),
        mock.patch("torch.cuda._lazy_init", lambda: None),
        mock.patch("torch.cuda.synchronize", lambda device=None: None),
        mock.patch("torch.cuda.empty_cache", lambda: None),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.set_device", lambda device: None),
        mock.patch("torch.cuda.memory_allocated", lambda device=None: 0),
        mock.patch("torch.cuda.memory_reserved", lambda device=None: 0),
        mock.patch("torch.cuda.max_memory_allocated", lambda device=None: 0),
        mock.patch("torch.cuda.max_memory_reserved", lambda device=None: 0),
        mock.patch("torch.cuda.reset_peak_memory_stats", lambda device=None: None),
        mock.patch("torch.cuda.set_per_process_memory_fraction", lambda fraction, device=None: None),
        mock.patch("torch.cuda.mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30)),
        mock.patch("torch.cuda.get_device_properties", lambda device=None: _Props()),
        mock.patch("torch.cuda.get_device_name", lambda device=None: _Props.name),
        # LSTM.flatten_parameters packs a card's weights for cuDNN (a CUDA-only operator) when
        # cuDNN accepts them; unpacked, the LSTM runs the same
        mock.patch("torch.backends.cudnn.is_acceptable", lambda tensor: False),
        # torch.vmap batches its function's operations in C++ (functorch), past the Python level
        # where a wrapper is seen: mapped over the data, the result back on the card
        mock.patch("torch.vmap", _vmap),
    ]
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    # Module.to assigns a moved parameter's data to the old Parameter object (``param.data =``),
    # which keeps a plain Parameter around the wrapper's storage; overwritten, the module holds the
    # wrapper itself (a Parameter by ``_is_param``)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(_Mode())
            yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def on_device(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is on the simulated card."""
    return _is_device(tensor)


_installed: list[contextlib.ExitStack] = []


def install() -> None:
    """The simulation for the rest of this thread's life (a worker process's pool process)."""
    if not _installed:
        stack = contextlib.ExitStack()
        stack.enter_context(simulated_cuda())
        _installed.append(stack)


_thread_start = threading.Thread._bootstrap_inner


def _bootstrap_inner_with_mode(self: threading.Thread) -> None:
    """A thread's start, with the function mode on for its life (the patched ``torch.cuda``
    functions are module attributes, which every thread sees already). Popped before the thread
    ends: a thread that exits with a Python mode on torch's per-thread stack aborts the process
    ("terminate called without an active exception")."""
    mode = _Mode()
    mode.__enter__()
    try:
        _thread_start(self)
    finally:
        mode.__exit__(None, None, None)


def install_process() -> None:
    """The simulation for the rest of this process: this thread and every thread started after
    (a factory asked for ``device="cuda"`` in a decoding thread or a pool's lane reaches the card,
    as it would on a real one). For tests/simulated_cuda_site/sitecustomize.py."""
    install()
    threading.Thread._bootstrap_inner = _bootstrap_inner_with_mode  # type: ignore[method-assign]
