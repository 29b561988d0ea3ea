"""The operator's dashboard and alert rules query only metrics the service really exposes.

Read against the /metrics of the test session's API after a real job (GPU series are declared by
api/metrics.py and reported only by workers on a GPU, so they are taken from its declaration).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import WORKER_GAUGES
from tests.conftest import wait_for_job

MONITORING = Path(__file__).resolve().parents[1] / "docker" / "monitoring"
METRIC = re.compile(r"\baudio_analysis_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exposed(client, utterance) -> tuple[set[str], str]:
    job = client.post("/jobs/embedding", files={"file": (utterance.name, utterance.read_bytes(), "audio/wav")}).json()
    wait_for_job(client, job["job_id"])
    # read once: a job's counts and histograms are written in its end's transaction (JobStore.finish)
    text = client.get("/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    names |= {name for name, _, _ in WORKER_GAUGES}
    return names, text


def test_dashboard_and_alerts_query_existing_metrics(client, utterances) -> None:
    names, text = _exposed(client, utterances["spk1"][0])
    # the per-audio-hour histogram saw the job: 1 s of work per few seconds of audio is hundreds
    # of seconds per audio hour on this CPU, never zero
    per_hour = [line for line in text.splitlines()
                if line.startswith('audio_analysis_job_seconds_per_audio_hour_count{kind="embedding"}')]
    assert per_hour and float(per_hour[0].split()[-1]) >= 1

    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "audio-analysis.json").read_text())
    assert dashboard["uid"] == "audio-analysis" and dashboard["panels"]
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(METRIC.findall(target["expr"]))
    # what the issue asks the dashboard to show
    assert {"audio_analysis_queue_depth", "audio_analysis_jobs", "audio_analysis_job_seconds_per_audio_hour_bucket",
            "audio_analysis_worker_gpu_utilization_percent", "audio_analysis_worker_gpu_memory_used_bytes",
            "audio_analysis_jobs_finished_total", "audio_analysis_webhook_deliveries_total"} <= queried

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert {"QueueKeepsGrowing", "WorkerHeartbeatLost", "WebhookWorkerHeartbeatLost", "NoWorkers",
            "JobFailureRateHigh"} <= set(alerts)
    for rule in alerts.values():
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical")
        queried |= set(METRIC.findall(rule["expr"]))
    assert queried - names == set()

    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_from_the_repository(service_env) -> None:
    compose = yaml.safe_load((MONITORING.parents[1] / "docker-compose.yml").read_text())
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "audio-analysis.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == "./docker/monitoring/grafana/dashboards"
    assert "./docker/monitoring/alerts.yml" in " ".join(prometheus["volumes"])
