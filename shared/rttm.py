"""RTTM output (the NIST format pyannote.metrics and dscore read)."""

from __future__ import annotations

from typing import Iterable, Protocol


class _Turn(Protocol):
    start: float
    end: float
    speaker: str


def to_rttm(turns: Iterable[_Turn], uri: str = "audio") -> str:
    uri = uri.replace(" ", "_") or "audio"
    lines = [
        f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
        for t in turns
    ]
    return "".join(lines)
