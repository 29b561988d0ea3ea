"""Latency for the API to accept a 1-minute upload and enqueue it (POST /jobs/diarize → 202).

    python bench/api_latency.py                 # starts a local API (no worker) on Redis DB 14
    python bench/api_latency.py --url http://host:8000 --n 100
    python bench/api_latency.py --idempotent     # ... each submission with its own Idempotency-Key

Measures the accept path only (upload streamed to storage, job record, Celery send); the jobs are
cancelled afterwards so nothing is left queued.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from _local import local_service, minute_of_speech


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def run(base: str, n: int, audio: Path, idempotent: bool = False) -> None:
    data = audio.read_bytes()
    latencies: list[float] = []
    job_ids: list[str] = []
    with httpx.Client(base_url=base, timeout=60) as http:
        http.post("/jobs/diarize", files={"file": (audio.name, data, "audio/wav")})  # warm-up, not counted
        for _ in range(n):
            # a fresh key each: what a client that makes its retries safe sends (claimed, fingerprinted, confirmed)
            headers = {"Idempotency-Key": str(uuid.uuid4())} if idempotent else {}
            started = time.perf_counter()
            r = http.post("/jobs/diarize", files={"file": (audio.name, data, "audio/wav")}, headers=headers)
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 202, r.text
            job_ids.append(r.json()["job_id"])
        for job in http.get("/jobs", params={"status": "queued", "limit": 1000}).json()["jobs"]:
            http.post(f"/jobs/{job['job_id']}/cancel")
    ms = [x * 1000 for x in latencies]
    print(f"upload: {len(data) / 1e6:.2f} MB WAV, 60.0 s of audio; {n} sequential submissions"
          + (", each with an Idempotency-Key" if idempotent else ""))
    print(f"accept+enqueue latency ms: p50={percentile(ms, 50):.1f} p99={percentile(ms, 99):.1f} "
          f"mean={statistics.mean(ms):.1f} min={min(ms):.1f} max={max(ms):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running API; default: start one locally")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--idempotent", action="store_true", help="send each submission with its own Idempotency-Key")
    parser.add_argument("--redis-db", type=int, default=14, help="the local API's Redis database (flushed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audio = minute_of_speech(Path(tmp))
        if args.url:
            run(args.url, args.n, audio, args.idempotent)
        else:
            with local_service(with_worker=False, redis_db=args.redis_db) as base:
                run(base, args.n, audio, args.idempotent)


if __name__ == "__main__":
    main()
