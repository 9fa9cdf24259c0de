#!/usr/bin/env bash
# The CUDA path, checked and timed on a machine with a GPU, in one run that leaves its figures in OUTDIR:
#
#     bench/cuda_check.sh OUTDIR [POSES]
#
# 1. the GPU and the torch build; 2. the model tests on CUDA (training under float16 autocast with GradScaler,
# the augmentation on the device, resuming, inference, Grad-CAM; the `gpu`-marked tests run instead of skipping);
# 3. bench/training_step.py, bench/inference_speed.py and bench/batching.py (the shipped bundle serving whole-chest
# studies in batches of 1, 4, 8 and 16 studies: images/s and seconds a batch) on CUDA; 4. a synth set of the shipped recipe's first
# POSES poses (default 100: its validation and test poses and 73 training poses, 48 images each) rendered on every
# CPU core, then the recipe's training command on it under bf16 autocast (the same data, seed and command as on a
# CPU, so epoch times and AUROCs compare), `evaluate --split test` and `predict --cam` on CUDA.
# Each step has a time limit, and the run goes on past a failed step (the tests past a failed test); OUTDIR/log.txt
# holds everything printed. PRECISION=auto trains under float16 autocast with GradScaler instead; STEPS="tests
# synth train" runs only those steps (default: all).
set -u
out=${1:?usage: bench/cuda_check.sh OUTDIR [POSES]}
poses=${2:-100}
mkdir -p "$out"
work=$(mktemp -d)
cores=$(nproc)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1

precision=${PRECISION:-bf16}
steps=${STEPS:-gpu tests training_step inference_speed batching synth train evaluate predict}

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, print its seconds and exit status
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ " $steps " == *" $name "* ]] || return 0
    echo "== $name ($(date -u +%T))"
    timeout "$limit" "$@"
    echo "== $name: rc $? in $((SECONDS - started)) s"
}

step gpu 30 bash -c 'nvidia-smi -L; python3 -c "import torch, monai; print(\"torch\", torch.__version__, \"cuda\",
torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported(),
\"monai\", monai.__version__)"'
step tests 150 python3 -m pytest -q -p no:cacheprovider --timeout 90 -rs \
    tests/integration/test_model_lifecycle.py tests/integration/test_predict.py
step training_step 60 python3 bench/training_step.py --arch small-resnet-map16 --repeat 6
step inference_speed 45 python3 bench/inference_speed.py \
    --configs small-resnet-map16:256,small-resnet-map16:384,resnet18:256 --images 512
step batching 60 python3 bench/batching.py --studies 32 --batches 1,4,8,16 --device cuda
step synth 150 python3 -m fracwatch synth --out "$work/synth" --poses "$poses" --per-pose 48 --seed 11 \
    --size 320 512 --no-dicom --workers "$cores"
step train 200 python3 -m fracwatch train "$work/synth" --out "$work/model" --arch small-resnet-map16 \
    --input-size 256 --crop 96 --crop-epochs 8 --context-crop 160 --context-epochs 3 --epochs 14 --patience 6 \
    --lr 3e-3 --val-every 4 --tile-spacing-mm 0.63 --tile-count-correction --precision "$precision" \
    --workers $((cores > 12 ? 12 : cores))
step evaluate 45 python3 -m fracwatch evaluate "$work/synth" --model "$work/model" --split test \
    --out "$work/evaluation" --workers 8 --json --device cuda
cp "$work/evaluation/"*.json "$out/" 2>/dev/null
cp "$work/model/model.json" "$out/" 2>/dev/null
mapfile -t sample < <(find "$work/synth" -name '*.png' | sort | head -4)
step predict 45 python3 -m fracwatch predict "${sample[@]}" --model "$work/model" --device cuda --json \
    --cam "$work/cam"
find "$work/cam" -name '*.png' | head -1 | xargs -r -I{} cp {} "$out/cam.png"
