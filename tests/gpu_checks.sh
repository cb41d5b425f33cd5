#!/usr/bin/env bash
# The checks that need a GPU, in one run (about 10 minutes on one H100). Prepare on a CPU
# machine first (the GPU machine may lack scikit-learn and network access):
#     python dataset_tool.py --source=sklearn-digits --dest=gpu-data/datasets/digits-16x16.zip --resolution=16x16
# then run this with gpu-data/ carried along. Logs go to ${OUT:-gpu-out}/.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

# 1. Throughput table, reference-equivalent configuration (DDPM++ cond. CIFAR-10, batch 128).
for args in "--precision=fp32" "--precision=tf32" "--precision=bf16 --channels-last" "--precision=bf16 --channels-last --compile"; do
    echo "== benchmark $args" | tee -a "$out/benchmark.md"
    timeout 300 python -m training.benchmark $args 2>&1 | tee -a "$out/benchmark.md"
done

# 2. generate.py: 1,024 images from DDPM++ CIFAR-10 (random weights), 18 steps, timed.
python - <<'PY'
import torch
from fdm.checkpoint import save_snapshot
from fdm.preconditioning import build_precond
from training.networks import ARCH_PRESETS
net = build_precond('FDM_EDMPrecond', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
    **ARCH_PRESETS['ddpmpp'])
save_snapshot('gpu-data/ddpmpp-cifar-random.pt', net)
PY
for p in fp32 bf16; do
    start=$(date +%s.%N)
    python generate.py --network=gpu-data/ddpmpp-cifar-random.pt --outdir="$out/gen-$p" --seeds=0-1023 --batch=1024 \
        --steps=18 --precision=$p > "$out/gen-$p.log" 2>&1
    end=$(date +%s.%N)
    python -c "print('generate.py $p: 1024 images in %.1f s = %.1f img/s (incl. start-up)' % ($end - $start, 1024 / ($end - $start)))" | tee -a "$out/summary.txt"
done

# 3. bf16 against fp32: training loss curves of the same seed over 300 steps (digits, small net).
for p in fp32 bf16; do
    python train.py --outdir="$out/curve-$p" --nosubdir --data=gpu-data/datasets/digits-16x16.zip --cond=1 \
        --arch=ddpmpp --cbase=64 --cres=1,2 --batch=128 --duration=0.0384 --tick=0.128 --snap=1000 --dump=1000 \
        --workers=2 --seed=0 --lr=2e-4 --lr_rampup=0 --warmup_ite=200 --precision=$p --grid-images=0 > "$out/curve-$p.log" 2>&1
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
curves = {p: [json.loads(l)['Loss/loss']['mean'] for l in open(f'{out}/curve-{p}/stats.jsonl')] for p in ('fp32', 'bf16')}
with open(f'{out}/summary.txt', 'a') as f:
    for i, (a, b) in enumerate(zip(curves['fp32'], curves['bf16'])):
        print(f'loss tick {i}: fp32 {a:.4f} bf16 {b:.4f} ({100 * (b / a - 1):+.1f}%)', file=f)
PY

# 4. The miniature reproduction on the digits.
mkdir -p "$out/mini/datasets" && cp gpu-data/datasets/digits-16x16.zip "$out/mini/datasets/"
timeout 600 python -m training.mini_repro --outdir="$out/mini" --kimg=200 --evals=4 > "$out/mini.log" 2>&1
cp "$out/mini/results.md" "$out/mini-results.md" 2>/dev/null

cat "$out/summary.txt" "$out/mini-results.md" 2>/dev/null
