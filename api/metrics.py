"""Prometheus metrics. Job figures are read from Redis at scrape time, so every API replica
reports the same numbers whichever process ran the job."""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.jobs import DURATION_BUCKETS, PER_AUDIO_HOUR_BUCKETS, JobStore
from shared.kinds import KIND_NAMES
from shared.queue import queue_depth
from shared.settings import Settings

log = logging.getLogger(__name__)


class JobCollector(Collector):
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a scrape during a Redis outage reports what it can
            log.exception("metrics collection failed")

    def _collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("audio_analysis_jobs", "Jobs known to the service by state", labels=["state"])
        for state, count in self.store.count_by_status().items():
            by_state.add_metric([state], count)
        yield by_state

        finished = CounterMetricFamily(
            "audio_analysis_jobs_finished", "Jobs that reached a terminal state", labels=["kind", "status"]
        )
        for (kind, status), count in sorted(self.store.finished_counts().items()):
            finished.add_metric([kind, status], count)
        yield finished

        yield _histogram("audio_analysis_job_duration_seconds", "Run time of succeeded jobs (worker side)",
                         DURATION_BUCKETS, self.store.duration_histogram)
        yield _histogram("audio_analysis_job_seconds_per_audio_hour",
                         "Run time of succeeded jobs per hour of their audio (600x real time = 6 s)",
                         PER_AUDIO_HOUR_BUCKETS, self.store.per_audio_hour_histogram)

        hooks = CounterMetricFamily(
            "audio_analysis_webhook_deliveries", "Webhook delivery attempts by outcome (retrying = will be retried)",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.store.webhook_counts().items()):
            hooks.add_metric([outcome], count)
        yield hooks

        refused = CounterMetricFamily(
            "audio_analysis_quota_refusals", "Submissions refused 429 by their tenant's quota, by the limit crossed",
            labels=["limit"],
        )
        for limit, count in sorted(self.store.quota_refusals().items()):
            refused.add_metric([limit], count)
        yield refused

        depth = GaugeMetricFamily("audio_analysis_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue in (self.settings.queue_name, self.settings.webhook_queue_name):
            # every priority list of the queue (fair ordering puts a tenant's backlog in lists
            # of their own): the queue's own list alone missed all but each tenant's first job
            depth.add_metric([queue], queue_depth(self.store.redis, queue))
        yield depth

        workers = self.store.workers()
        # the webhook workers (no models) heartbeat too: counted apart, so that "no worker runs
        # jobs" (alerts.yml's NoWorkers) is not hidden by a webhook worker alive beside none
        runs_jobs = sum(1 for w in workers if w.get("loads_models", True) is not False)
        yield GaugeMetricFamily("audio_analysis_workers", "Workers that run jobs, with a live heartbeat",
                                value=runs_jobs)
        yield GaugeMetricFamily("audio_analysis_webhook_workers",
                                "Workers that only deliver webhooks (no models), with a live heartbeat",
                                value=len(workers) - runs_jobs)
        yield from worker_metrics(workers)


# per-worker readings from the heartbeats (worker/telemetry.py): (metric, help, telemetry key)
WORKER_GAUGES = (
    ("audio_analysis_worker_rss_bytes", "Resident memory of the worker process", "rss_bytes"),
    ("audio_analysis_worker_cpu_percent", "CPU use of the worker process (100 = one core)", "cpu_percent"),
    ("audio_analysis_worker_model_load_seconds", "Time the worker took to load its models", "model_load_s"),
    ("audio_analysis_worker_jobs_running", "Jobs the worker process is running", "jobs_running"),
    ("audio_analysis_worker_jobs_done", "Jobs the worker process ran since it started", "jobs_done"),
    # GPU series: only workers on a GPU report them
    ("audio_analysis_worker_gpu_utilization_percent", "GPU utilization of the worker's card (NVML)",
     "gpu_utilization_percent"),
    ("audio_analysis_worker_gpu_memory_used_bytes", "Memory used on the worker's card, all processes (NVML)",
     "gpu_memory_used_bytes"),
    ("audio_analysis_worker_gpu_memory_total_bytes", "Memory of the worker's card (NVML)", "gpu_memory_total_bytes"),
    ("audio_analysis_worker_gpu_torch_allocated_bytes", "Memory torch holds allocated in the worker process",
     "gpu_torch_allocated_bytes"),
)


_ROLE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def worker_label(name: str) -> str:
    """A worker's ``worker`` label: its role (the Celery node name before ``@``: ``gpu0``,
    ``cpu``, ``webhooks``) and the first 8 hex digits of the SHA-256 of its whole name.

    Not the name: that is ``<role>@<host>:<pid>``, and /metrics is open without a key (Prometheus
    scrapes it) while /health shows host names to callers with a key only. The digest keeps one
    series per worker process, as the name did, in a label of bounded length; an operator with a
    key matches it to a name of /health's ``workers``."""
    role = name.split("@", 1)[0] if "@" in name else ""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{role if _ROLE.match(role) else 'worker'}-{digest}"


def worker_metrics(workers: list[dict]) -> Iterator[Metric]:
    for name, help_text, key in WORKER_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=["worker", "device"])
        for worker in workers:
            value = (worker.get("telemetry") or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                family.add_metric([worker_label(str(worker.get("worker"))), str(worker.get("model_device") or "none")],
                                  float(value))
        if family.samples:
            yield family


def _histogram(name: str, help_text: str, bounds: tuple[float, ...],
               read: Callable[[str], dict[str, float]]) -> HistogramMetricFamily:
    """A per-kind histogram kept in Redis as le:<bound>/count/sum (shared/jobs.py)."""
    family = HistogramMetricFamily(name, help_text, labels=["kind"])
    for kind in KIND_NAMES:
        hist = read(kind)
        if not hist:
            continue
        buckets = [(str(b), hist.get(f"le:{b}", 0.0)) for b in bounds]
        buckets.append(("+Inf", hist.get("count", 0.0)))
        family.add_metric([kind], buckets, sum_value=hist.get("sum", 0.0))
    return family


def build_registry(store: JobStore, settings: Settings) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobCollector(store, settings))
    latency = Histogram(
        "audio_analysis_http_request_duration_seconds", "API request latency", ["method", "route", "status"],
        registry=registry,
    )
    return registry, latency
