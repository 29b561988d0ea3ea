"""The Kubernetes manifests (deploy/k8s) agree with the settings, the compose file and each other.

No cluster runs here: the manifests are read as data and held to what the code and compose say
(setting names, images, commands, queues, ports, GPU limits, the KEDA trigger).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OTHER_ENV = {"REDIS_URL", "FLOWER_BASIC_AUTH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _container(doc: dict) -> dict:
    [container] = doc["spec"]["template"]["spec"]["containers"]
    return container


# what the operator's own Secret "audio-analysis" holds (deploy/k8s/config.yaml says how to make
# it), with values of the right shape for the settings to load
SECRET_KEYS = {
    "AUDIO_ANALYSIS_WEBHOOK_SECRET": "0123456789abcdef0123456789abcdef",
    "AUDIO_ANALYSIS_API_KEYS": '["a-key"]',
    "FLOWER_BASIC_AUTH": "admin:password",
}


def _config(docs) -> dict[str, str]:
    return {**docs[("ConfigMap", "audio-analysis")]["data"], **SECRET_KEYS}


def _pods(docs) -> dict[str, dict]:
    return {name: doc for (kind, name), doc in docs.items() if kind in ("Deployment", "StatefulSet")}


def test_every_variable_is_a_setting_and_the_config_loads(docs, monkeypatch) -> None:
    config = _config(docs)
    fields = {f"AUDIO_ANALYSIS_{name.upper()}" for name in Settings.model_fields}
    assert set(config) - fields - OTHER_ENV == set()
    import os

    # only the manifests' values: the test session's own AUDIO_ANALYSIS_* would win otherwise
    for key in [k for k in os.environ if k.startswith("AUDIO_ANALYSIS_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.storage_backend == "s3" and settings.s3_bucket  # several hosts: no shared disk
    assert settings.redis_url == "redis://redis:6379/0"
    for doc in docs.values():
        if doc["kind"] == "Deployment":
            for env in _container(doc).get("env", []):
                assert env["name"] in fields | OTHER_ENV, env


def test_images_and_commands_match_compose(docs, compose) -> None:
    pairs = {"api": "api", "worker-gpu": "worker-gpu0", "webhooks": "webhooks", "flower": "flower"}
    for deployment, service in pairs.items():
        container = _container(docs[("Deployment", deployment)])
        assert container["image"] == compose[service]["image"], deployment
        # args, not command: a command would replace the image's ENTRYPOINT, tini, which reaps
        # the orphans a dead pool process leaves (its header check's fork server)
        assert "command" not in container, deployment
        k8s, dc = container["args"], compose[service]["command"]
        # the same program and queue; host names and flags a proxy needs may differ
        assert k8s[:3] == dc[:3], deployment
        if "-Q" in dc:
            assert k8s[k8s.index("-Q") + 1] == dc[dc.index("-Q") + 1], deployment
        assert {"envFrom"} <= set(container), deployment


def test_gpu_workers_take_one_card_one_job_and_drain(docs) -> None:
    worker = docs[("Deployment", "worker-gpu")]
    container = _container(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "AUDIO_ANALYSIS_DEVICE", "value": "cuda:0"} in container["env"]
    command = container["args"]
    assert command[command.index("--concurrency") + 1] == "1" and "prefork" in command
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_a_worker_whose_main_process_hangs_is_restarted(docs) -> None:
    """Both worker Deployments keep a liveness file in a writable volume and are probed on it
    (tests/test_worker_lifecycle_gaps.py shows the probe failing for a frozen main process)."""
    for name in ("worker-gpu", "webhooks"):
        container = _container(docs[("Deployment", name)])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        path = env["AUDIO_ANALYSIS_WORKER_LIVENESS_FILE"]
        assert any(path.startswith(m["mountPath"].rstrip("/") + "/") for m in container["volumeMounts"]), name
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["python", "-m", "worker.alive"], (name, probe)
        # a probe that fails twice, 30 s apart, past the file's 60 s: a restart within about 2.5 min
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] <= 120, name


def test_keda_scales_the_workers_on_their_queue(docs) -> None:
    from shared.queue import queue_keys

    scaled = docs[("ScaledObject", "worker-gpu")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker-gpu"
    triggers = scaled["spec"]["triggers"]
    config = _config(docs)
    redis_url = urlsplit(config["REDIS_URL"])
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == f"{redis_url.hostname}:{redis_url.port}"
        assert trigger["metadata"]["databaseIndex"] == redis_url.path.lstrip("/")
        assert trigger["metadata"]["listLength"] == "1"
    queue = config["AUDIO_ANALYSIS_QUEUE_NAME"]
    # every priority list of the queue (fair ordering), and the HPA follows their sum, not the longest
    assert [t["metadata"]["listName"] for t in triggers] == queue_keys(queue)
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert modifiers["formula"].replace(" ", "").split("+") == [t["name"] for t in triggers]
    assert modifiers["target"] == "1" and modifiers["metricType"] == "AverageValue"
    command = _container(docs[("Deployment", "worker-gpu")])["args"]
    assert command[command.index("-Q") + 1] == queue
    assert scaled["spec"]["minReplicaCount"] >= 1 <= scaled["spec"]["maxReplicaCount"]


def test_services_reach_named_ports_and_redis_persists(docs) -> None:
    for (kind, name), doc in docs.items():
        if kind != "Service":
            continue
        selector = doc["spec"]["selector"]["app.kubernetes.io/name"]
        target = next(d for (k, _), d in docs.items() if k in ("Deployment", "StatefulSet")
                      and d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == selector)
        ports = {p["name"] for p in _container(target).get("ports", [])}
        assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports, name
    redis = docs[("StatefulSet", "redis")]
    assert "--appendonly" in _container(redis)["args"]
    assert redis["spec"]["volumeClaimTemplates"]
    api = docs[("Service", "api")]
    assert api["spec"]["ports"][0]["port"] == Settings.model_fields["api_port"].default


def test_no_credentials_ship_in_the_manifests(docs) -> None:
    """`kubectl apply -f deploy/k8s/` once created a Secret of placeholders: the API key
    "replace-me", Flower's admin:replace-me and a 40-character webhook secret that start-up let
    pass, the same in every cluster that applied the folder as it is."""
    assert not [name for (kind, name) in docs if kind == "Secret"]
    for doc in docs.values():
        assert not {"data", "stringData"} & set(doc) or doc["kind"] == "ConfigMap", doc["metadata"]["name"]
    secret_like = ("SECRET", "PASSWORD", "API_KEYS", "BASIC_AUTH", "TOKEN", "ACCESS_KEY")
    config = docs[("ConfigMap", "audio-analysis")]["data"]
    assert not [k for k in config if any(word in k for word in secret_like)]
    for name, doc in _pods(docs).items():
        for env in _container(doc).get("env", []):
            assert not any(word in env["name"] for word in secret_like), (name, env)
        # the project's pods still read the operator's Secret; the comment says how to create it
        if _container(doc)["image"].startswith("audio-analysis-"):
            assert {"secretRef": {"name": "audio-analysis"}} in _container(doc)["envFrom"], name
    text = (K8S / "config.yaml").read_text()
    assert "kubectl create secret generic audio-analysis" in text
    assert all(key in text for key in SECRET_KEYS)


def test_pods_run_unprivileged_on_a_read_only_root(docs) -> None:
    for name, doc in _pods(docs).items():
        pod = doc["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        container = _container(doc)
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False, name
        assert own["readOnlyRootFilesystem"] is True, name
        assert own["capabilities"]["drop"] == ["ALL"] and not own["capabilities"].get("add"), name
        assert not own.get("privileged"), name
        # what is written goes to a volume of bounded size: /tmp (spooled uploads, temporary
        # files) for every project image, the Redis data on its claim
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
        if container["image"].startswith("audio-analysis-"):
            assert "/tmp" in mounts, name
        for path, volume in mounts.items():
            if volume in claims:
                continue
            assert volumes[volume]["emptyDir"]["sizeLimit"], (name, path)


def test_every_container_has_a_memory_limit(docs) -> None:
    for name, doc in _pods(docs).items():
        limits = _container(doc)["resources"]["limits"]
        assert limits.get("memory"), name
        # the project's images write to emptyDirs: the pod's disk is capped too
        if _container(doc)["image"].startswith("audio-analysis-"):
            assert limits.get("ephemeral-storage"), name


def test_only_the_application_reaches_redis(docs) -> None:
    """Redis takes no password: a NetworkPolicy keeps other pods of the cluster away from it."""
    policies = [d for (kind, _), d in docs.items() if kind == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}]
    assert len(policies) == 1
    [policy] = policies
    assert "Ingress" in policy["spec"]["policyTypes"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    sources = rule["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "audio-analysis"}}} in sources
    for source in sources:
        # no ipBlock, no empty selector (which would admit every pod or namespace)
        assert set(source) <= {"podSelector", "namespaceSelector"} and all(source.values()), source
    # every pod that talks to Redis carries the label the policy admits
    for name, doc in _pods(docs).items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "audio-analysis", name
    # and KEDA, which reads the queue's length, from its namespace
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in sources


def test_redis_refuses_writes_before_its_pod_is_killed(docs) -> None:
    """As in compose: maxmemory at most half the memory limit (an AOF rewrite forks), noeviction."""
    [redis] = [d for (kind, _), d in docs.items() if kind == "StatefulSet" and _container(d)["name"] == "redis"]
    args, limit = _container(redis)["args"], _container(redis)["resources"]["limits"]["memory"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    gib = {"Gi": 1024, "Mi": 1}
    limit_mb = int(limit[:-2]) * gib[limit[-2:]]
    assert int(args[args.index("--maxmemory") + 1].removesuffix("gb")) * 1024 <= limit_mb // 2
