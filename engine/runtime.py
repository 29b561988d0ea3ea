"""How torch's CPU threads behave; imported before torch by every module that runs models.

torch's wheels use GNU OpenMP, whose idle threads spin for a while before sleeping. When another
process holds a core (the API, a second worker, a browser, CI), the spinning threads and the
thread doing the work take turns on too few cores, and every parallel region waits for a
descheduled thread: segmentation's LSTM measured 36 ms per chunk on an idle 2-core machine and
680-950 ms with one busy-looping process beside it; with passive waiting, 70-80 ms under the same
load. Passive waiting is the default here; an operator who owns the whole machine can set
``OMP_WAIT_POLICY=ACTIVE``. libgomp reads it once, when torch is first imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
