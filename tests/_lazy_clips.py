"""``evaluation.speech.librispeech_clips``' pool, each clip decoded when its samples are first read.

A test that draws a few readers of the 249 (``many_talker_conversation(..., clips=...)``, which
picks by index) decoded and trimmed every one of them first: 13-15 s of a 2-core host, for the
two to eight it used. The same files in the same order, the same speaker ids, and the same
samples (read and trimmed as librispeech_clips does) once read.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from engine.audio import load_audio
from evaluation.speech import LIBRISPEECH, Clip, trim_silence


class LazyClip(Clip):
    """A :class:`Clip` (a frozen dataclass, hence ``object.__setattr__``) read on first use."""

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "speaker", Path(path).name.split("-")[0])
        object.__setattr__(self, "_path", path)

    @property
    def samples(self) -> np.ndarray:  # type: ignore[override]
        if "_samples" not in self.__dict__:
            object.__setattr__(self, "_samples", trim_silence(load_audio(self._path).float32()))
        return self.__dict__["_samples"]


def lazy_librispeech_clips(data_dir: str | os.PathLike = "../shared/data/speech") -> list[Clip]:
    return [LazyClip(path) for path in sorted(glob.glob(os.path.join(data_dir, LIBRISPEECH, "*.ogg")))]
