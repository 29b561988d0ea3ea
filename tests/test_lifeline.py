"""The worker, the API and Flower that `audio-analysis up` (cli.launcher.Stack) starts end when the
launcher is killed outright, instead of running on orphaned (shared/lifeline.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil

from cli.launcher import PROJECT_ROOT, wait_until

LAUNCHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cli.launcher import Stack, free_port
    stack = Stack(log_dir=Path(sys.argv[1]))
    worker = stack.start_worker(queues=["audio-lifeline-test"], name="lifeline")
    api = stack.start_api("127.0.0.1", free_port())
    print(worker.pid, api.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_children_of_a_launcher_killed_outright_end_with_it(service_env, tmp_path):
    """A launcher SIGKILLed (the OOM killer, a CI runner cancelling a run) left its worker and
    API running: they sit in sessions of their own so that Ctrl-C reaches the launcher alone.
    Such a worker kept consuming its queue with a storage directory nobody else read, and the
    next run on that Redis lost jobs to it. Now each ends by its own stop (SIGTERM) within
    seconds of its parent's death."""
    env = {k: v for k, v in os.environ.items()}
    env["AUDIO_ANALYSIS_WORKER_LOAD_MODELS"] = "false"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=PROJECT_ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2, pids
        worker_log = tmp_path / "lifeline.log"
        wait_until(lambda: worker_log.exists() and "ready." in worker_log.read_text(errors="replace"), 120,
                   "the launcher's worker", launcher)
        assert all(_alive(pid) for pid in pids)

        launcher.kill()
        launcher.wait(10)
        killed = time.monotonic()
        wait_until(lambda: not any(_alive(pid) for pid in pids), 60, "the orphaned worker and API to end")
        # by their own SIGTERM (the worker's warm shutdown), not the SIGKILL after the grace
        assert time.monotonic() - killed < 25
        assert "is gone: stopping" in worker_log.read_text(errors="replace")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in pids:
            if _alive(pid):
                psutil.Process(pid).kill()
