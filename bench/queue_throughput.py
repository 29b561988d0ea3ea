"""Sustained job throughput: N concurrent clients each submitting short embedding jobs and
waiting for them; checks every job reaches a terminal state.

    python bench/queue_throughput.py                      # local API + one CPU worker, Redis DB 14
    python bench/queue_throughput.py --url http://host:8000 --clients 8 --jobs 200
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from _local import UTTERANCES, local_service

TERMINAL = ("succeeded", "failed", "cancelled")


def run(base: str, clients: int, jobs: int, timeout_s: float) -> None:
    files = sorted(UTTERANCES.glob("*.wav"))
    payloads = [(f.name, f.read_bytes()) for f in files]
    outcomes: Counter[str] = Counter()
    engine_s: list[float] = []
    submitted = 0
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s

    def client(index: int) -> None:
        nonlocal submitted
        with httpx.Client(base_url=base, timeout=30) as http:
            while True:
                with lock:
                    if submitted >= jobs:
                        return
                    submitted += 1
                    n = submitted
                name, data = payloads[n % len(payloads)]
                r = http.post("/jobs/embedding", files={"file": (name, data, "audio/wav")})
                if r.status_code != 202:
                    with lock:
                        outcomes[f"rejected_{r.status_code}"] += 1
                    continue
                job_id = r.json()["job_id"]
                status = "lost"
                while time.monotonic() < deadline:
                    record = http.get(f"/jobs/{job_id}").json()
                    status = record["status"]
                    if status in TERMINAL:
                        if record.get("result"):
                            with lock:
                                engine_s.append(record["result"]["processing_time"])
                        break
                    time.sleep(0.05)
                else:
                    status = "lost"
                with lock:
                    outcomes[status] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    completed = sum(outcomes[s] for s in TERMINAL)
    lost = jobs - completed
    print(f"clients={clients} jobs submitted={submitted} completed={completed} lost={lost} "
          f"outcomes={dict(outcomes)}")
    print(f"wall={wall:.1f}s throughput={outcomes['succeeded'] / wall:.2f} jobs/s (succeeded), "
          f"{completed / wall:.2f} jobs/s (terminal)")
    if engine_s:
        # the worker runs jobs one at a time: the gap to 1/engine time is queue + API overhead
        mean = sum(engine_s) / len(engine_s)
        print(f"engine time per job: mean={mean:.3f}s -> ceiling {1 / mean:.2f} jobs/s for one worker; "
              f"overhead per job={max(0.0, wall / max(1, completed) - mean) * 1000:.0f} ms")
    if lost:
        raise SystemExit(f"{lost} job(s) never reached a terminal state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running API with workers; default: start one locally")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.url:
        run(args.url, args.clients, args.jobs, args.timeout)
    else:
        with local_service(with_worker=True) as base:
            run(base, args.clients, args.jobs, args.timeout)


if __name__ == "__main__":
    main()
