#!/usr/bin/env bash
# The checks that need a GPU, in parts small enough for one device call each (at most 10 minutes):
#     bash tests/gpu_checks.sh equiv bench curves   # first priority, about 9 minutes on one H100
#     bash tests/gpu_checks.sh sampling             # tests/gpu_sampling_checks.sh, about 8 minutes
#     bash tests/gpu_checks.sh fid                  # tests/gpu_fid_checks.sh, about 5 minutes
#     bash tests/gpu_checks.sh generate mini        # generate.py end to end, the 200-kimg miniature reproduction
# `curves` and `mini` need the digits dataset, made on a CPU machine (the GPU machine may lack
# scikit-learn) and carried along:
#     python dataset_tool.py --source=sklearn-digits --dest=gpu-data/datasets/digits-16x16.zip --resolution=16x16
# Logs go to ${OUT:-gpu-out}/, one short summary to summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
# A GPU check run without a GPU proves nothing: stop at once with one line saying so.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$0: no CUDA GPU is available to torch (torch.cuda.is_available() is False); run these checks on a GPU machine." >&2
    exit 1
fi
out=${OUT:-gpu-out}
mkdir -p "$out" gpu-data
summary="$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$summary"
parts=${*:-equiv bench curves}

for part in $parts; do
case $part in
equiv)  # Fast paths against their exact counterparts on CUDA; no host sync inside a training step.
    python -m pytest -q -p no:cacheprovider tests/train/test_cuda_training.py tests/train/test_precision.py 2>&1 | tail -15 | tee -a "$summary"
    ;;
bench)  # The benchmark's default configuration (DDPM++ cond. CIFAR-10 FDM-EDM, batch 128 per GPU), one table per setting.
    for args in "--precision=fp32" "--precision=tf32" "--precision=bf16 --channels-last" \
            "--precision=bf16 --channels-last --compile" "--precision=bf16 --channels-last --compile --compile-mode=reduce-overhead"; do
        echo "== benchmark $args" | tee -a "$out/benchmark.md"
        timeout 240 python -m training.tools.benchmark $args 2>&1 | tail -14 | tee -a "$out/benchmark.md"
    done
    grep -E "^== |img/s|peak memory|utilisation|first training" "$out/benchmark.md" >> "$summary"
    ;;
curves)  # bf16 against fp32: training loss of the same seed over 300 steps, per 50-step tick (digits, small net, batch 128).
    for p in fp32 bf16; do
        python train.py --outdir="$out/curve-$p" --nosubdir --data=gpu-data/datasets/digits-16x16.zip --cond=1 \
            --arch=ddpmpp --cbase=64 --cres=1,2 --batch=128 --duration=${CURVE_MIMG:-0.0384} --tick=${CURVE_TICK:-6.4} --snap=1000 --dump=1000 \
            --workers=2 --seed=0 --lr=2e-4 --lr_rampup=0 --warmup_ite=200 --precision=$p --grid-images=0 \
            > "$out/curve-$p.log" 2>&1
    done
    python - "$out" <<'PY' | tee -a "$summary"
import json, sys
out = sys.argv[1]
ticks = {p: [json.loads(l) for l in open(f'{out}/curve-{p}/stats.jsonl')] for p in ('fp32', 'bf16')}
for a, b in zip(ticks['fp32'], ticks['bf16']):
    la, lb = a['Loss/loss']['mean'], b['Loss/loss']['mean']
    print(f"loss up to {a['Progress/kimg']['mean']:.1f} kimg: fp32 {la:.4f}  bf16 {lb:.4f}  ({100 * (lb / la - 1):+.2f}%)  "
        f"img/s fp32 {a['Timing/img_per_sec']['mean']:.0f} bf16 {b['Timing/img_per_sec']['mean']:.0f}")
PY
    ;;
sampling)
    OUT="$out" bash tests/gpu_sampling_checks.sh
    ;;
fid)
    OUT="$out" bash tests/gpu_fid_checks.sh
    ;;
generate)  # generate.py end to end: 4,096 images of a random-weight DDPM++ CIFAR-10 net, 18 steps.
    python - <<'PY'
from fdm.io.network_files import save_snapshot
from fdm.preconditioning import build_precond
from fdm.networks import ARCH_PRESETS
net = build_precond('FDM_EDMPrecond', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
    **ARCH_PRESETS['ddpmpp'])
save_snapshot('gpu-data/ddpmpp-cifar-random.pt', net)
PY
    for args in "--precision=fp32" "--precision=bf16 --compile"; do
        rm -rf "$out/gen"  # generate.py refuses a folder of other settings (and would skip seeds already there)
        start=$(date +%s.%N)
        python generate.py --network=gpu-data/ddpmpp-cifar-random.pt --outdir="$out/gen" --seeds=0-4095 --steps=18 \
            $args > "$out/gen.log" 2>&1
        end=$(date +%s.%N)
        python -c "print('generate.py $args: 4096 images in %.1f s = %.1f img/s (start-up and compile included)' % ($end - $start, 4096 / ($end - $start)))" | tee -a "$summary"
    done
    ;;
mini)  # The paper's claim in miniature, 200 kimg per method.
    mkdir -p "$out/mini/datasets" && cp gpu-data/datasets/digits-16x16.zip "$out/mini/datasets/"
    timeout 590 python -m training.tools.mini_repro --outdir="$out/mini" --kimg=200 --evals=4 > "$out/mini.log" 2>&1
    cat "$out/mini/results.md" >> "$summary" 2>/dev/null
    ;;
*)
    echo "unknown part '$part'; parts: equiv bench curves sampling fid generate mini" >&2; exit 2
    ;;
esac
done
cat "$summary"
