"""Import pyannote.audio the way a private, offline service needs it.

- pyannote.audio 4 sends usage telemetry to a remote endpoint by default; recordings handled
  here are customers' data, so it is switched off unless the operator opts in.
- torchcodec (pyannote's own file decoder) needs system FFmpeg libraries; we always hand pyannote
  decoded waveforms (engine.audio does the decoding), so its import warning is noise.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(?s).*torchcodec is not installed correctly")
    import pyannote.audio  # noqa: F401,E402
