#!/usr/bin/env bash
# The FID checks that need a GPU (about 5 minutes on one H100), self-contained: the device has
# no network and the real detectors (~95 MB) exceed what can be carried, so the detector is our
# pytorch-fid Inception-v3 with random weights (the same layers and FLOPs as the real one) and
# the images are random. Logs go to ${OUT:-gpu-out}/fid-*.log, a summary to fid-summary.txt.
#     bash tests/gpu_fid_checks.sh            # N=50000 images for the timing
#     SMALL=1 bash tests/gpu_fid_checks.sh    # a smoke run of the script on a CPU (N=64 G=4)
set -uo pipefail
export PYTHONUNBUFFERED=1
# A GPU check run without a GPU proves nothing: stop at once with one line saying so.
if [ -z "${SMALL:-}" ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$0: no CUDA GPU is available to torch (torch.cuda.is_available() is False); run these checks on a GPU machine (SMALL=1 runs a smoke run of the script on a CPU)." >&2
    exit 1
fi
out=${OUT:-gpu-out}
n=${N:-$([ -n "${SMALL:-}" ] && echo 64 || echo 50000)}   # images for the timing
g=${G:-$([ -n "${SMALL:-}" ] && echo 4 || echo 512)}       # generated images for the equality check
data=gpu-data-fid
mkdir -p "$out" "$data"
summary="$out/fid-summary.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$summary"

# Inputs: a random-weight detector file, N random 32x32 PNGs in a stored zip, a small random network.
python - "$data" "$n" <<'PY'
import io, sys, zipfile
import numpy as np, PIL.Image, torch
from training.evaluation.inception import FIDInceptionV3
from fdm.io.network_files import save_snapshot
from fdm.preconditioning import build_precond
from fdm.networks import ARCH_PRESETS
data, n = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
inception = FIDInceptionV3()
for layer in inception.modules():  # He init keeps the signal alive through 90 layers (the default one shrinks it to ~1e-8)
    if isinstance(layer, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')
torch.save(inception.state_dict(), f'{data}/random-inception.pth')
rng = np.random.RandomState(0)
with zipfile.ZipFile(f'{data}/random-32x32.zip', 'w', compression=zipfile.ZIP_STORED) as z:
    for i in range(n):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.randint(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(buf, format='PNG')
        z.writestr(f'{i // 1000:05d}/img{i:08d}.png', buf.getvalue())
net = build_precond('FDM_EDMPrecond', img_resolution=32, img_channels=3, label_dim=0, dropout=0, **ARCH_PRESETS['ddpmpp'])
save_snapshot(f'{data}/ddpmpp-random.pt', net)
PY
det="$data/random-inception.pth"

# 1. Target: features of 50,000 32x32 images from disk in under 60 s ("Features of ... img/s" line).
for args in "--batch=64 --workers=3" "--batch=250 --workers=8" "--batch=500 --workers=12"; do
    rm -f "$out/random-ref.npz"  # fid.py ref keeps an existing file of the same inputs instead of recomputing
    python fid.py ref --data="$data/random-32x32.zip" --dest="$out/random-ref.npz" --detector="$det" $args \
        > "$out/fid-ref.log" 2>&1
    echo "ref $args: $(grep '^Features of' "$out/fid-ref.log")" | tee -a "$summary"
done

# 2. Host synchronisations per batch in compute_stats: 8 batches should add none (the final
#    copies of the statistics are the only expected ones).
python - "$data" "$det" "$n" <<'PY' 2>&1 | tee -a "$summary"
import sys, warnings, torch
from training.evaluation.feature_stats import compute_stats
from training.evaluation.inception import load_detector
from training.data.dataset import ImageFolderDataset
data, det_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = 'cuda' if torch.cuda.is_available() else 'cpu'
det = load_detector(det_path, device=device, verbose=False)
dataset = ImageFolderDataset(f'{data}/random-32x32.zip', max_size=min(2000, n))
compute_stats(dataset, det, batch=250, workers=4, progress=False)  # warm-up (cuDNN, allocator)
if device == 'cuda':
    torch.cuda.set_sync_debug_mode('warn')
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    compute_stats(dataset, det, batch=250, workers=4, progress=False)
syncs = [str(w.message).splitlines()[0] for w in caught if 'synchroniz' in str(w.message).lower()]
print(f'compute_stats over {-(-len(dataset) // 250)} batches: {len(syncs)} synchronising calls', *sorted(set(syncs)), sep='\n  ')
PY

# 3. gen in memory == generate.py PNGs + calc, on the GPU, fp32 and bf16 (same batch partition).
for p in fp32 bf16; do
    python generate.py --network="$data/ddpmpp-random.pt" --outdir="$out/fid-pngs-$p" --seeds=0-$((g - 1)) --subdirs --batch=256 \
        --steps=4 --precision=$p > "$out/fid-generate-$p.log" 2>&1
    calc=$(python fid.py calc --images="$out/fid-pngs-$p" --ref="$out/random-ref.npz" --num=$g --batch=256 --detector="$det" \
        2> "$out/fid-calc-$p.log" | grep '^FID ' | awk '{print $2}')
    gen=$(python fid.py gen --network="$data/ddpmpp-random.pt" --seeds=0-$((g - 1)) --batch=256 --steps=4 --precision=$p \
        --ref="$out/random-ref.npz" --detector="$det" 2> "$out/fid-gen-$p.log" | grep '^FID ' | awk '{print $2}')
    echo "$p: calc on PNGs $calc, gen in memory $gen ($([ "$calc" = "$gen" ] && echo equal || echo DIFFERENT))" | tee -a "$summary"
done
