"""Speech written in the compressed formats users upload, through FFmpeg's encoders (PyAV)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np


def encode(samples: np.ndarray, rate: int, *, container: str, codec: str, bit_rate: int | None = None,
           path: Path | None = None, options: dict[str, str] | None = None) -> bytes:
    """``samples`` ((frames,) or (frames, channels) float32) encoded with ``codec`` in ``container``
    (e.g. "mp4"/"aac", "adts"/"aac", "mp3"/"libmp3lame"); written to ``path`` too when given.
    ``options``: the encoder's own (``{"dtx": "1"}``: AMR's discontinuous transmission, as phones
    send it)."""
    data = samples.reshape(len(samples), -1)
    layout = "mono" if data.shape[1] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options or {})
        if bit_rate:
            stream.bit_rate = bit_rate
        step = 4608
        for start in range(0, len(data), step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[start : start + step].T, dtype=np.float32),
                                               format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()
