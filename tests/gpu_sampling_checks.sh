#!/usr/bin/env bash
# The sampling checks that need a GPU (about 8 minutes on one H100), self-contained: DDPM++
# cond. CIFAR-10 32x32 with random weights (same layers and FLOPs as the trained net), EDM
# Heun, 18 steps = 35 network evaluations per image. Summary in ${OUT:-gpu-out}/sampling.txt.
#     bash tests/gpu_sampling_checks.sh
#     SMALL=1 bash tests/gpu_sampling_checks.sh   # a smoke run of the script on a CPU
set -uo pipefail
export PYTHONUNBUFFERED=1
# A GPU check run without a GPU proves nothing: stop at once with one line saying so.
if [ -z "${SMALL:-}" ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$0: no CUDA GPU is available to torch (torch.cuda.is_available() is False); run these checks on a GPU machine (SMALL=1 runs a smoke run of the script on a CPU)." >&2
    exit 1
fi
out=${OUT:-gpu-out}
mkdir -p "$out"
summary="$out/sampling.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$summary"

# 1. No host sync per sampler step; every compile mode against eager; batch independence on CUDA.
python -m pytest -q -o addopts="" -p no:warnings tests/method/test_fast_sampling.py tests/evaluation/test_generate.py -k cuda \
    2>&1 | tail -5 | tee -a "$summary"

# 2. img/s of generate_batch (what generate.py runs per batch: per-seed latents, sampler,
#    uint8 copy to the host) after a warm-up batch; the first batch's time includes compiling.
#    Each fast path's images are compared with the exact fp32 path's (uint8 levels).
python - "${SMALL:-}" <<'PY' 2>&1 | tee -a "$summary"
import sys, time
import numpy as np, torch
from training.evaluation import generation as generate
from torch_utils import precision as precision_lib
from fdm.preconditioning import build_precond
from fdm.networks import ARCH_PRESETS
small = bool(sys.argv[1])
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
torch.manual_seed(0)
kwargs = dict(ARCH_PRESETS['ddpmpp'], augment_dim=9, dropout=0.13)
if small:
    kwargs.update(model_channels=16, channel_mult=[1, 2], attn_resolutions=[8])
net = build_precond('FDM_EDMPrecond', img_resolution=16 if small else 32, img_channels=3, label_dim=10, **kwargs)
with torch.no_grad():
    for p in net.parameters():  # EDM zero-initialises the output layers; F = 0 would make every path agree
        if p.ndim > 1 and p.abs().max() < 1e-3:
            p.normal_(0, p[0].numel() ** -0.5)
net = net.eval().requires_grad_(False).to(device)
batch = 8 if small else generate.auto_batch_size(device, net.img_resolution)
sampler_kwargs = dict(num_steps=3 if small else 18)
print(f'device {device}, batch {batch}, {sampler_kwargs["num_steps"]} steps, torch {torch.__version__}')

def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize()

def run(precision, mode, seeds):
    precision_lib.configure(precision, device)
    model = generate.compile_net(net, mode) if mode else net
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times, images = [], None
    for k in range(2):  # warm-up (and compilation), then the timed batch
        sync()
        start = time.perf_counter()
        out = generate.to_uint8(generate.generate_batch(model, 'edm', sampler_kwargs, seeds, device, precision=precision))
        times.append(time.perf_counter() - start)
        images = out if images is None else images
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    return images, times, peak

seeds = list(range(batch))
exact, times, peak = run('fp32', None, seeds)
print(f'| precision | compile | first batch s | img/s | peak GiB | levels off vs fp32: mean, max |')
print(f'| fp32 | - | {times[0]:.1f} | {batch / times[1]:.0f} | {peak:.1f} | 0, 0 |')
for precision, mode in [('tf32', None), ('bf16', None), ('bf16', 'default'), ('bf16', 'reduce-overhead'), ('fp32', 'default')]:
    try:
        images, times, peak = run(precision, mode, seeds)
    except Exception as err:
        print(f'| {precision} | {mode or "-"} | failed: {type(err).__name__}: {str(err).splitlines()[0][:200]} |')
        continue
    diff = np.abs(images.astype(int) - exact.astype(int))
    print(f'| {precision} | {mode or "-"} | {times[0]:.1f} | {batch / times[1]:.0f} | {peak:.1f} | {diff.mean():.3f}, {diff.max()} |')
PY

# 3. generate.py end to end with the fast options (includes start-up and compilation).
if [ -z "${SMALL:-}" ]; then
    python - <<'PY'
import torch
from fdm.io.network_files import save_snapshot
from fdm.preconditioning import build_precond
from fdm.networks import ARCH_PRESETS
torch.manual_seed(0)
net = build_precond('FDM_EDMPrecond', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
    **ARCH_PRESETS['ddpmpp'])
save_snapshot('gpu-data-sampling.pt', net)
PY
    start=$(date +%s.%N)
    python generate.py --network=gpu-data-sampling.pt --outdir="$out/gen-bf16-compile" --seeds=0-10239 \
        --precision=bf16 --compile > "$out/gen-bf16-compile.log" 2>&1
    end=$(date +%s.%N)
    grep -h 'First batch' "$out/gen-bf16-compile.log" | tee -a "$summary"
    python -c "print('generate.py --precision=bf16 --compile: 10240 images in %.1f s (with start-up)' % ($end - $start))" \
        | tee -a "$summary"
    rm -f gpu-data-sampling.pt
fi
