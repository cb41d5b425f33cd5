"""The embedded default, end to end and offline: the UCI digits (shipped inside scikit-learn)
-> a dataset zip -> a small class-conditional model (with its FD-digits curve, scored at each
snapshot while it trains) -> samples -> FD-digits and class accuracy.

Shared by the quick-start demo (`python -m training.tools.demo`) and the miniature reproduction of
the paper's claim (`python -m training.tools.mini_repro`).
"""

import math
import os

import numpy as np
import torch

from fdm.io.network_files import load_network
from fdm.methods import METHODS, method_kwargs
from fdm.samplers import PerSeedGenerator, edm_sampler
from training.evaluation import digits
from training.evaluation import feature_stats
from torch_utils.io.files import write_json
from training.evaluation.inception import load_detector
from training.data.dataset import ImageFolderDataset
from training.data.sources import DIGITS_SOURCE
from training.data.writer import convert_dataset
from training.evaluation.generation import GRID_MIN_WIDTH, make_grid, save_png, to_uint8
from training.evaluation.snapshot_metrics import open_metrics
from training.evaluation.tables import read_stats
from training.config import start_of
from training.training_loop import training_loop

RESOLUTION = 16

# A small SongUNet (DDPM++ layout) sized for 16x16 digits on a CPU: ~1.75M parameters.
NETWORK = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=32, channel_mult=[1, 2, 2], num_blocks=2,
    attn_resolutions=[8], dropout=0.1)
# Adam's learning rate, and FDM's warmup (steps) and momentum multiplier, for every digits run.
LR, WARMUP_ITE, FDM_MULTIPLIER = 1e-3, 200, 2.0

# The methods the digits pipeline trains: the three baseline/FDM pairs (iDDPM has no FDM version).
PRECONDS = [m for m in METHODS if m != 'iddpm']

#----------------------------------------------------------------------------

def prepare_data(outdir, device):
    """The digits zip and its FD-digits reference statistics (made once, then reused)."""
    data = os.path.join(outdir, 'datasets', f'digits-{RESOLUTION}x{RESOLUTION}.zip')
    if not os.path.isfile(data):
        convert_dataset(DIGITS_SOURCE, data, resolution=(RESOLUTION, RESOLUTION))
    ref = os.path.join(outdir, 'fid-refs', f'digits-{RESOLUTION}x{RESOLUTION}.npz')
    if not os.path.isfile(ref):
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        detector = load_detector('digits', device=device)
        mu, sigma = feature_stats.compute_stats(ImageFolderDataset(data), detector, workers=0, progress=False)
        feature_stats.save_stats(ref, mu, sigma)
    return data, ref

def train(data, run_dir, precond='fdm_edm', total_kimg=100, seed=0, batch=64, ticks=10, snapshots=1, device=None,
        ref=None, metric_images=None):
    """Train a class-conditional model: `ticks` progress lines, `snapshots` evenly spaced snapshots
    (plus the one after the first step); with metric_images, each snapshot's FD-digits against the
    statistics `ref` on that many images, as train.py --metrics=fd-digits (see fd_curve)."""
    if ticks % snapshots:
        raise ValueError(f'ticks={ticks} must be a multiple of snapshots={snapshots}')
    os.makedirs(run_dir, exist_ok=True)
    network_kwargs, loss_kwargs = method_kwargs(precond, WARMUP_ITE, FDM_MULTIPLIER)
    network_kwargs = dict(class_name=network_kwargs.pop('class_name'), **NETWORK, **network_kwargs)
    config = dict(
        dataset_kwargs=dict(path=data, use_labels=True, xflip=False, cache=True, resolution=RESOLUTION),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
        optimizer_kwargs=dict(lr=LR, betas=[0.9, 0.999], eps=1e-8), augment_kwargs=None, seed=seed,
        batch_size=batch, total_kimg=total_kimg, ema_halflife_kimg=total_kimg / 20, lr_rampup_kimg=total_kimg / 50,
        kimg_per_tick=total_kimg / ticks, snapshot_ticks=ticks // snapshots, state_dump_ticks=None, grid_images=0, device=device)
    write_json(os.path.join(run_dir, 'training_options.json'), dict(config, device=None if device is None else str(device)))
    start = start_of(config)
    start.metrics = open_metrics('fd-digits', ref, metric_images) if metric_images else None
    return training_loop(run_dir=run_dir, start=start, **config)

def fd_curve(run_dir):
    """{kimg: FD-digits} that train(..., metric_images=N) recorded at each snapshot (stats.jsonl)."""
    entries = read_stats(os.path.join(run_dir, 'stats.jsonl'))
    return {kimg: e['Metrics/fd-digits']['mean'] for kimg, e in entries.items() if 'Metrics/fd-digits' in e}

@torch.no_grad()
def sample(net, per_class=50, num_steps=18, device='cpu', batch=250):
    """uint8 images [10 * per_class, 1, R, R] for seeds 0.., class = seed % 10; and the classes."""
    seeds = list(range(10 * per_class))
    classes = torch.tensor(seeds) % net.label_dim
    out = []
    for part in np.array_split(np.array(seeds), max(math.ceil(len(seeds) / batch), 1)):
        rnd = PerSeedGenerator(device, part.tolist())
        latents = rnd.randn([len(part), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = torch.eye(net.label_dim, device=device)[classes[part]]
        x = edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=num_steps)
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(out), classes

def evaluate(images, classes, ref, device='cpu'):
    """FD-digits of uint8 images against the reference statistics, and class accuracy."""
    detector = load_detector('digits', device=device)
    features = torch.cat([detector(b).to(torch.float64) for b in images.split(256)])
    f = features.cpu().numpy()
    mu, sigma = feature_stats.stats_from_sums(len(f), f.sum(0), f.T @ f)
    fd = feature_stats.frechet_distance(mu, sigma, *feature_stats.load_stats(ref))
    return float(fd), digits.class_accuracy(images, classes, device=device)

def save_grid(images, path, min_width=GRID_MIN_WIDTH):
    """Grid PNG of `sample`'s images: one column per class, up to 10 rows, upscaled to min_width."""
    rows = min(len(images) // 10, 10)
    order = [c + 10 * r for r in range(rows) for c in range(10)]  # seed = class + 10 * row
    save_png(make_grid(to_uint8(images[order].to(torch.float32) / 127.5 - 1), 10, min_width), path)

def evaluate_snapshot(path, ref, per_class, device, num_steps=18):
    net = load_network(path, device=device)
    images, classes = sample(net, per_class=per_class, num_steps=num_steps, device=device)
    return (*evaluate(images, classes, ref, device), images, classes)

#----------------------------------------------------------------------------
