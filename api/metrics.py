"""Prometheus metrics. Job figures are read from Redis at scrape time, so every API replica
reports the same numbers whichever process ran the job."""

from __future__ import annotations

import logging
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.jobs import DURATION_BUCKETS, JobStore
from shared.kinds import KIND_NAMES
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

        durations = HistogramMetricFamily(
            "audio_analysis_job_duration_seconds", "Run time of succeeded jobs (worker side)", labels=["kind"]
        )
        for kind in KIND_NAMES:
            hist = self.store.duration_histogram(kind)
            if not hist:
                continue
            buckets = [(str(b), hist.get(f"le:{b}", 0.0)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", hist.get("count", 0.0)))
            durations.add_metric([kind], buckets, sum_value=hist.get("sum", 0.0))
        yield durations

        depth = GaugeMetricFamily("audio_analysis_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue in (self.settings.queue_name, self.settings.webhook_queue_name):
            depth.add_metric([queue], self.store.redis.llen(queue))
        yield depth

        workers = self.store.workers()
        yield GaugeMetricFamily("audio_analysis_workers", "Workers with a live heartbeat", value=len(workers))


def build_registry(store: JobStore, settings: Settings) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobCollector(store, settings))
    latency = Histogram(
        "audio_analysis_http_request_duration_seconds", "API request latency", ["method", "route", "status"],
        registry=registry,
    )
    return registry, latency
