"""The API dying in the middle of a submission (run by tests/test_queued_records.py: ``python -m
tests._interrupted_submit_api <api.serve options>``).

What is simulated is only the death itself (a host lost, an OOM kill, a deploy's SIGKILL) at one
point, which ``INTERRUPT_SUBMIT`` names: ``before-send``, once the job's record is written and
before its queue message is sent; ``after-send``, once the message is sent and before the client
is answered. ``api.dispatch.send_job`` exits the process there instead of (or right after)
sending. Uvicorn, the app, Redis, the storage and the broker are real.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import api.dispatch

_send = api.dispatch.send_job


def _die_before_sending(*_args: Any, **_kwargs: Any) -> None:
    os._exit(1)


def _die_after_sending(*args: Any, **kwargs: Any) -> None:
    _send(*args, **kwargs)
    os._exit(1)


api.dispatch.send_job = {"before-send": _die_before_sending,
                         "after-send": _die_after_sending}[os.environ["INTERRUPT_SUBMIT"]]

if __name__ == "__main__":
    from api.serve import main

    main(sys.argv[1:])
