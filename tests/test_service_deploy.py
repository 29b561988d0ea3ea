"""Docker cannot run here: check the compose file and Dockerfiles against the repository instead."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {f"AUDIO_ANALYSIS_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
# variables read by something other than Settings, on purpose
# images of other projects (their own settings, no project code)
THIRD_PARTY = {"redis", "prometheus", "grafana", "minio", "minio-init"}
OTHER_ENV = {"CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "HF_TOKEN",
             "FLOWER_BASIC_AUTH", "PYTORCH_CUDA_ALLOC_CONF",
             # boto3's own credential variables (the S3 storage backend)
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) with line continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _check_command(argv: list[str]) -> None:
    """Every module or file a command names exists in the repository."""
    if argv[0] == "celery":
        app = argv[argv.index("-A") + 1]
        assert (ROOT / (app.replace(".", "/") + ".py")).is_file(), app
        assert argv[argv.index("-A") + 2] in ("worker", "flower")
    elif argv[:2] == ["python", "-m"]:
        module = argv[2]
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file(), module
        assert "__main__" in path.read_text(), f"{module} cannot be run with -m"
    elif argv[0] == "uvicorn":
        module, _, attr = argv[1].partition(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file(), module
        assert re.search(rf"^{attr}\s*=", path.read_text(), re.M), f"{argv[1]} has no {attr}"
    else:
        raise AssertionError(f"unexpected command {argv}")


def test_services_exist(compose):
    services = compose["services"]
    assert {"redis", "api", "worker-gpu0", "worker-cpu", "webhooks", "flower"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    for name, service in services.items():
        if name not in THIRD_PARTY:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            _check_command(service["command"])


def test_environment_uses_real_settings(compose):
    for name, service in compose["services"].items():
        if name in THIRD_PARTY:
            continue
        for key in service.get("environment", {}):
            assert key in SETTINGS_ENV | OTHER_ENV, f"{name}: {key} is not a Settings field"
        if name != "redis":
            assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_gpu_workers_are_pinned_one_job_at_a_time(compose):
    gpu = {n: s for n, s in compose["services"].items() if n.startswith("worker-gpu")}
    assert gpu
    seen_devices = set()
    for name, service in gpu.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        seen_devices.add(device["device_ids"][0])
        # the container sees only its reserved GPU, as device 0
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
        # asked for, not "auto": without its GPU the worker reports a load_error instead of
        # running on the CPU unnoticed (tests/test_worker_device.py)
        assert Settings(device=service["environment"]["AUDIO_ANALYSIS_DEVICE"]).device == "cuda:0"
        cmd = service["command"]
        assert cmd[cmd.index("--concurrency") + 1] == "1"
        # the queue the API sends to inside the stack: compose's env, else the setting's default
        # (not Settings(): the process env of a test session may name a test queue)
        api_env = compose["services"]["api"]["environment"]
        queue = api_env.get("AUDIO_ANALYSIS_QUEUE_NAME", Settings.model_fields["queue_name"].default)
        assert cmd[cmd.index("-Q") + 1] == queue
    assert len(seen_devices) == len(gpu), "two workers reserve the same GPU"
    cpu = compose["services"]["worker-cpu"]
    assert cpu["environment"]["AUDIO_ANALYSIS_DEVICE"] == "cpu"


def test_api_and_workers_share_upload_storage(compose):
    services = compose["services"]
    for name in ("api", "worker-gpu0", "worker-gpu1", "worker-cpu"):
        storage_dir = services[name]["environment"]["AUDIO_ANALYSIS_STORAGE_DIR"]
        assert f"uploads:{storage_dir}" in services[name]["volumes"], name
    assert "uploads" in compose["volumes"] and "redis-data" in compose["volumes"]
    # the webhook worker and flower never read audio
    assert "volumes" not in services["webhooks"] and "volumes" not in services["flower"]


def test_flower_asks_for_a_login_and_listens_on_loopback(compose):
    flower = compose["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfiles_copy_existing_paths_and_set_real_settings(name):
    instructions = _dockerfile(name)
    for instr, args in instructions:
        if instr == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
        if instr == "ENV":
            for key in re.findall(r"([A-Z_][A-Z0-9_]*)=", args):
                assert key in SETTINGS_ENV | OTHER_ENV, f"{name}: ENV {key} is not a Settings field"
        if instr == "CMD":
            _check_command(__import__("json").loads(args))
    assert ("USER", "app") in instructions
    # an init as PID 1: a prefork pool process that dies leaves its header check's fork server and
    # resource tracker to PID 1, and celery (or python) there never reaps them: zombies pile up
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in instructions
    assert any(instr == "RUN" and "install" in args and "tini" in args for instr, args in instructions)


def test_worker_image_bakes_production_models():
    text = (ROOT / "Dockerfile.worker").read_text()
    assert "AUDIO_ANALYSIS_MODEL_PROFILE=${MODEL_PROFILE}" in text and "ARG MODEL_PROFILE=production" in text
    assert "AUDIO_ANALYSIS_MODEL_DIR=/models" in text
    assert "python scripts/fetch_models.py --out /models" in text
    # the token stays in the build stage that downloads; the final stage copies only weights
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "HF_TOKEN" not in final_stage and "COPY --from=models /models /models" in final_stage


def test_fetch_models_script_exists():
    if not (ROOT / "scripts" / "fetch_models.py").is_file():
        pytest.skip("scripts/fetch_models.py not written yet (another engineer owns it)")
    assert "--out" in (ROOT / "scripts" / "fetch_models.py").read_text()


# what the API image must not carry (distribution names, PEP 503-normalised)
TORCH_SIDE = ("torch", "torchaudio", "torchcodec", "pyannote", "speechbrain", "senko", "lightning")


def _dist(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def _torch_side(names: set[str]) -> set[str]:
    return {n for n in names if any(n == h or n.startswith(h + "-") for h in TORCH_SIDE)}


def _requirements(extras: set[str]) -> set[str]:
    """Distributions `pip install '.[extras]'` asks for: base dependencies plus the extras,
    following self-references like ``audio-analysis[api,worker]``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_dist(r) for r in project["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if _dist(req) == _dist(project["name"]):
                todo += [e.strip() for e in req[req.index("[") + 1:req.index("]")].split(",")]
            else:
                names.add(_dist(req))
    return names


def _installed_extras(name: str) -> set[str]:
    """Extras of the project (``.`` / ``.[a,b]``) that the Dockerfile's pip installs name."""
    extras: set[str] = set()
    found = False
    for instr, args in _dockerfile(name):
        if instr == "RUN" and "pip install" in args:
            for token in shlex.split(args):
                if token == "." or token.startswith(".["):
                    found = True
                    if "[" in token:
                        extras |= {e.strip() for e in token[2:-1].split(",")}
    assert found, f"{name} never installs the project"
    return extras


def _copied(name: str) -> set[str]:
    out = set()
    for instr, args in _dockerfile(name):
        if instr == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            out |= {s.rstrip("/") for s in sources}
    return out


def test_base_and_api_dependencies_carry_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _torch_side({_dist(r) for r in project["dependencies"]}), "base dependencies pull in torch"
    assert not _torch_side(_requirements({"api"})), "the api extra pulls in torch"
    # the worker extra does carry the engine's stack, and `all` is a superset of each extra
    assert {"torch", "torchaudio", "pyannote-audio", "speechbrain", "senko"} <= _requirements({"worker"})
    assert _requirements({"api", "worker", "cli"}) == _requirements({"all"})


def test_api_image_installs_no_torch():
    for instr, args in _dockerfile("Dockerfile.api"):
        if instr == "RUN":
            assert not re.search(r"torch|pyannote|speechbrain|senko", args, re.I), f"Dockerfile.api: RUN {args}"
    extras = _installed_extras("Dockerfile.api")
    assert "api" in extras and not _torch_side(_requirements(extras)), extras
    copied = _copied("Dockerfile.api")
    # worker/: Flower and the webhook-delivery worker run `celery -A worker.celery_app` here
    assert {"shared", "api", "worker"} <= copied and not copied & {"engine", "cli", "evaluation"}, copied


def test_worker_image_has_the_engine():
    extras = _installed_extras("Dockerfile.worker")
    assert "worker" in extras or "all" in extras, extras
    assert {"shared", "worker", "engine", "scripts"} <= _copied("Dockerfile.worker")


def test_two_workers_can_share_a_card(compose):
    """The shared-gpu profile: both workers reserve GPU 0 and each keeps to its memory share."""
    shared = {n: s for n, s in compose["services"].items() if n.startswith("shared-gpu0")}
    assert len(shared) == 2
    fractions = []
    for service in shared.values():
        assert service["profiles"] == ["shared-gpu"]
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == ["0"]
        env = service["environment"]
        fractions.append(Settings(gpu_memory_fraction=env["AUDIO_ANALYSIS_GPU_MEMORY_FRACTION"]).gpu_memory_fraction)
        assert "expandable_segments" in env["PYTORCH_CUDA_ALLOC_CONF"]
    assert sum(fractions) <= 1.0
    # the seed template's build argument name still works
    dockerfile = (ROOT / "Dockerfile.worker").read_text()
    assert "ARG HF_TOKEN_BUILD" in dockerfile and "ARG HF_TOKEN=${HF_TOKEN_BUILD}" in dockerfile


def test_s3_profile_wires_storage_to_minio(compose):
    services = compose["services"]
    assert services["minio"]["profiles"] == services["minio-init"]["profiles"] == ["s3"]
    for name in ("api", "worker-gpu0", "webhooks"):
        env = services[name]["environment"]
        assert Settings.model_fields["storage_backend"].annotation  # a real setting
        assert env["AUDIO_ANALYSIS_STORAGE_BACKEND"].startswith("${AUDIO_ANALYSIS_STORAGE_BACKEND:-local}")
        assert env["AUDIO_ANALYSIS_S3_ENDPOINT_URL"].endswith("http://minio:9000}")
    bucket = services["api"]["environment"]["AUDIO_ANALYSIS_S3_BUCKET"].split(":-")[1].rstrip("}")
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])


def _host_ip(port: str | int) -> str | None:
    """The host address a short-syntax port mapping binds; None: every interface."""
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None


def test_only_the_api_is_published_beyond_this_host(compose):
    """Flower, Prometheus, Grafana and MinIO's console have no login of their own or one an
    operator sets up; Prometheus and Grafana (with its built-in admin:admin) listened on every
    interface. Redis, without a password, is published nowhere."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if name == "api":
                continue
            assert _host_ip(port) == "127.0.0.1", f"{name} publishes {port} on every interface"
    assert "ports" not in compose["services"]["redis"]


def test_grafana_and_minio_never_keep_their_default_logins(compose):
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # from the environment, never a fixed value; the container refuses to start without it
    guards = {"grafana": ["GF_SECURITY_ADMIN_PASSWORD"], "minio": ["MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"]}
    for name, variables in guards.items():
        service = compose["services"][name]
        script = service["entrypoint"][2]
        for variable in variables:
            assert re.fullmatch(r"\$\{[A-Z_]+:-\}", service["environment"][variable]), (name, variable)
            assert f'[ -n "$${variable}" ]' in script and "exit 1" in script, (name, variable)
        assert script.rstrip().split("; ")[-1].startswith("exec "), name


def test_no_optional_service_requires_a_variable(compose):
    """Compose interpolates every service before it picks the active profiles, so one
    ``${VAR:?}`` in the monitoring or s3 profile made a plain ``docker compose up`` fail with
    "required variable ... is missing a value" (docker/compose#11977). The default services'
    own secrets (webhook secret, Flower's login) stay required on purpose."""
    def required(service: dict) -> set[str]:
        return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", yaml.safe_dump(service)))

    default = set().union(*(required(s) for s in compose["services"].values() if not s.get("profiles")))
    assert default  # the webhook secret: the check below would pass on a file it cannot read
    for name, service in compose["services"].items():
        if service.get("profiles"):
            assert required(service) <= default, (name, required(service) - default)


def test_containers_get_no_privileges_and_a_memory_limit(compose):
    for name, service in compose["services"].items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged") and not service.get("cap_add"), name
        assert service.get("mem_limit") or service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"), name
        if name not in THIRD_PARTY:
            # the project's images run as their own user (USER app) and need no capability
            assert service.get("cap_drop") == ["ALL"], name
    # the services that read no audio write nothing but temporary files
    for name in ("webhooks", "flower"):
        service = compose["services"][name]
        assert service.get("read_only") is True and any(t.startswith("/tmp") for t in service["tmpfs"]), name


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", size.strip().lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_redis_refuses_writes_before_its_container_is_killed(compose):
    """With a memory limit and no maxmemory, a Redis that fills up is OOM-killed (and every
    client with it); with maxmemory under the limit it refuses writes, which the API answers 503."""
    service = compose["services"]["redis"]
    command = service["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"  # never drop voiceprints
    assert _bytes(command[command.index("--maxmemory") + 1]) <= _bytes(service["mem_limit"]) // 2
