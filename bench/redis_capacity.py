"""Where Redis becomes the limit: job life cycles per second through the real job store.

    python bench/redis_capacity.py --workers 1 2 4 8 16 --jobs 2000     # Redis DB 13 of REDIS_URL

Each simulated worker thread runs what a worker does to Redis for one job, with no model work:
the API's record creation and the Celery message (publish, then a blocking pop, as kombu does
on Redis), the worker's lease, "running", 20 progress reports (a diarization reports about that
many), "succeeded", the finished-job counters and histograms. Prints jobs/s (bounded here by the
Python clients, which share this machine's cores), Redis commands per job (INFO commandstats) and
Redis's own CPU time per job (INFO cpu): Redis executes commands on one thread, so one core
divided by that time is the rate where Redis, not the workers, becomes the limit. Divide by the jobs/s one GPU worker
needs (audio-hours per hour / audio-hours per job) to see how many workers one Redis carries.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.jobs import SUCCEEDED, JobRecord, JobStore, new_job_id  # noqa: E402
from shared.settings import Settings  # noqa: E402

PROGRESS_REPORTS = 20


def one_job(store: JobStore, queue: str, lease_s: int = 30) -> None:
    job_id = new_job_id()
    store.create(JobRecord(job_id=job_id, kind="diarize", files={"file": f"{job_id}/file"}, queue=queue))
    store.redis.lpush(queue, job_id)
    store.redis.brpop([queue], timeout=5)
    lease = store.key("job", job_id, "lease")
    store.redis.set(lease, "bench", nx=True, ex=lease_s)
    store.mark_running(job_id)
    for i in range(PROGRESS_REPORTS):
        store.set_progress(job_id, (i + 1) / PROGRESS_REPORTS, "embeddings")
        if i % 7 == 0:
            store.redis.expire(lease, lease_s)  # the lease refresh
    store.finish(job_id, SUCCEEDED, result={"audio_duration": 3600.0}, attempt=1)
    store.redis.delete(lease)


def commands(client: redis.Redis) -> int:
    return sum(int(v["calls"]) for k, v in client.info("commandstats").items() if k.startswith("cmdstat_"))


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(url: str, workers: int, jobs: int) -> tuple[float, float, float]:
    settings = Settings(redis_url=url, redis_key_prefix="aa-bench")
    queue = "aa-bench-queue"
    per_thread = jobs // workers
    stores = [JobStore(redis.Redis.from_url(url, decode_responses=True), settings) for _ in range(workers)]
    before = commands(stores[0].redis)
    cpu_before = redis_cpu_s(stores[0].redis)
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: [one_job(s, queue) for _ in range(per_thread)]) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    calls = commands(stores[0].redis) - before
    cpu = redis_cpu_s(stores[0].redis) - cpu_before
    for key in stores[0].redis.scan_iter(match="aa-bench*", count=1000):
        stores[0].redis.delete(key)
    done = per_thread * workers
    return done / elapsed, calls / done, cpu / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    print(f"Redis {args.redis}; {PROGRESS_REPORTS} progress reports per job; Python threads as workers")
    for n in args.workers:
        rate, per_job, cpu_per_job = run(args.redis, n, args.jobs)
        # Redis runs commands on one thread: its CPU time per job bounds the rate it can serve
        print(f"  {n:3d} workers: {rate:7.0f} job life cycles/s here, {per_job:5.1f} Redis commands and "
              f"{cpu_per_job * 1e3:.2f} ms of Redis CPU per job -> Redis saturates near {1 / cpu_per_job:,.0f} jobs/s")


if __name__ == "__main__":
    main()
