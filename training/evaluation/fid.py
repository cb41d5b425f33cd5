"""FID of image folders and of networks: fid.py's commands as functions.

`fid_of_network` (and `protocol_of_network`) score images straight from the sampler, quantised
to uint8 exactly as generate.py saves them, so they give the FID of the PNGs without writing
them. The statistics themselves live in training/evaluation/feature_stats.py.
"""

import os
import time

import torch

from torch_utils.errors import EvaluationError
import tqdm

from torch_utils import distributed as dist, precision as precision_lib
from training.evaluation.feature_stats import (FeatureSums, check_dims, compute_stats, frechet_distance, load_stats,
    rate, save_stats, summarize)
from torch_utils.io.files import check_destination
from training.evaluation.inception import load_detector
from training.evaluation import generation
from training.data.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# Inputs: images, the detector, the generating network.

def open_images(path, num=None, seed=0):
    """The images to score: all of them, or a seeded random subset of `num` (an error if fewer)."""
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise EvaluationError(f"found {len(dataset)} images in '{path}' but --num={num}; generate more images or lower --num")
    if dataset.num_channels not in (1, 3):
        raise EvaluationError(f"images in '{path}' have {dataset.num_channels} channels; FID needs grayscale or RGB images")
    return dataset

def open_detector(spec, device=None, trust=False):
    """The detector, downloaded by rank 0 first so that the ranks do not race for the cache;
    trust: run a TorchScript detector's code even if it is not a known official file."""
    with dist.rank0_first():
        return load_detector(spec, device=device or dist.device(), verbose=(dist.get_rank() == 0), trust=trust)

def open_generator(network, device, precision='fp32', class_idx=None, compile_mode=None, **sampler_options):
    """(net, sampler name, sampler kwargs) chosen as generate.py chooses them; its errors are its own.
    compile_mode: the net's U-Net compiled as generate.py --compile does."""
    sampler_name, sampler_kwargs, _ignored = generation.select_sampler(**sampler_options)
    net, _name = generation.load_net(network, device, log=dist.print0)
    if net.img_channels not in (1, 3):
        raise EvaluationError(f"--network {network} makes {net.img_channels}-channel images; FID needs grayscale or RGB images")
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise EvaluationError(f'--class {class_idx} does not exist: the network has {net.label_dim} classes'
            + ('; drop --class' if not net.label_dim else f', 0..{net.label_dim - 1}'))
    precision_lib.configure(precision, device)  # the TF32 switches generate.py would set
    if compile_mode is not None:
        net = generation.compile_net(net, compile_mode)
    return net, sampler_name, sampler_kwargs

# --outdir of gen/protocol, created before any image is generated so a bad path costs no work.
def make_outdir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise EvaluationError(f"cannot create --outdir '{path}' ({err.strerror}); choose a writable folder") from None

#----------------------------------------------------------------------------
# Images straight from the sampler. generation.to_uint8 is the very quantisation generate.py
# applies before writing its (lossless) PNGs, so these images, and hence their features, are
# those of the PNGs. Its copy to the host waits for the batch, but a batch costs tens of
# network evaluations, against which one synchronisation is nothing.

def generated_batches(net, sampler, seeds, device, batch=64, class_idx=None, precision='fp32', progress=True,
        fixed_shape=False):
    """(seeds, uint8 images [N, C, H, W] on the CPU) for this rank's share of the seeds; sampler: (name, kwargs)
    of generation.select_sampler; fixed_shape (a compiled net): short batches are padded as generate.py pads them."""
    sampler_name, sampler_kwargs = sampler
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [b for b in generation.rank_batches(seeds, batch, rank, world) if b]
    pad_to = max((len(b) for b in batches), default=0) if fixed_shape else None
    for batch_seeds in tqdm.tqdm(batches, unit='batch', disable=(rank != 0 or not progress)):
        images = generation.generate_batch(net, sampler_name, sampler_kwargs, batch_seeds, device, class_idx, precision,
            pad_to=pad_to)
        yield batch_seeds, torch.from_numpy(generation.to_uint8(images)).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]

def generated_stats(net, sampler, seeds, detector, batch=64, class_idx=None, precision='fp32', outdir=None,
        progress=True, fixed_shape=False):
    """(mu, sigma) of the features of the images of `seeds`, shared among torchrun's ranks as
    generate.py shares them; with `outdir` the PNGs are written too (as generate.py --subdirs)."""
    sums = FeatureSums(detector)
    for batch_seeds, images in generated_batches(net, sampler, seeds, detector.device, batch, class_idx, precision,
            progress, fixed_shape):
        if outdir is not None:
            make_outdir(outdir)  # once per batch is cheap, and reports an unwritable folder before any work is lost
            generation.save_images(images.permute(0, 2, 3, 1).numpy(), batch_seeds, outdir, subdirs=True)
        sums.add(images.to(detector.device))
    return sums.stats()

def calc_fid(dataset, ref_stats, detector, batch=64, workers=3, progress=True):
    """FID of the images of a dataset (see open_images) against reference (mu, sigma)."""
    mu, sigma = compute_stats(dataset, detector, batch=batch, workers=workers, progress=progress)
    return frechet_distance(mu, sigma, *ref_stats)

#----------------------------------------------------------------------------
# fid.py's commands: each prints what it does on rank 0 and returns its result.

def make_reference(data, dest, detector=None, batch=64, workers=3, trust_detector=False):
    """fid.py ref: write the statistics (mu, sigma) of every image of a dataset to `dest`."""
    if os.path.isdir(dest):
        raise EvaluationError(f"--dest '{dest}' is a folder; give the path of the .npz file to write")
    check_destination(dest, '--dest')  # before the images and the detector are read
    dataset = open_images(data)
    det = open_detector(detector, trust=trust_detector)
    dist.print0(f"Calculating statistics of {len(dataset)} images in '{data}' with '{det.name}'...")
    start = time.perf_counter()
    mu, sigma = compute_stats(dataset, det, batch=batch, workers=workers)
    dist.print0(f'Features of {rate(len(dataset), start)}')
    if dist.get_rank() == 0:
        save_stats(dest, mu, sigma)
    dist.print0(f"Saved the statistics of {len(dataset)} images to '{dest}'")
    return mu, sigma

def fid_of_images(images, ref_path, num=50000, seed=0, batch=64, workers=3, detector=None, trust_detector=False):
    """fid.py calc: the FID of `num` images of a folder or zip (a seeded subset if it has more)."""
    ref_stats = load_stats(ref_path)
    dataset = open_images(images, num=num, seed=seed)  # checked before the detector is fetched
    det = open_detector(detector, trust=trust_detector)
    check_dims(det, ref_stats[0], ref_path)
    dist.print0(f"Calculating features of {len(dataset)} images in '{images}' with '{det.name}'...")
    start = time.perf_counter()
    fid = calc_fid(dataset, ref_stats, det, batch=batch, workers=workers)
    dist.print0(f'Features of {rate(len(dataset), start)}')
    dist.print0(f"FID {fid:g} from {len(dataset)} images in '{images}' against '{ref_path}'")
    return fid

def fid_of_network(network, ref_path, seeds, class_idx=None, solver='edm', steps=None, precision='fp32', outdir=None,
        batch=64, detector=None, compile_mode=None, trust_detector=False):
    """fid.py gen: the FID of the images of `seeds`, generated in memory (and saved to `outdir` if given).
    steps: None is generate.py's default (generation.SAMPLER_DEFAULTS)."""
    if len(seeds) < 2:
        raise EvaluationError(f'--seeds gives {len(seeds)} image; a covariance needs at least 2, e.g. --seeds=0-49999')
    ref_stats = load_stats(ref_path)
    det = open_detector(detector, trust=trust_detector)
    check_dims(det, ref_stats[0], ref_path)
    if outdir is not None:
        make_outdir(outdir)
    net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, class_idx, compile_mode,
        solver=solver, num_steps=steps)
    dist.print0(f"Generating {len(seeds)} images and their features with '{det.name}'...")
    start = time.perf_counter()
    mu, sigma = generated_stats(net, (sampler_name, sampler_kwargs), seeds, det, batch=batch, class_idx=class_idx,
        precision=precision, outdir=outdir, fixed_shape=compile_mode is not None)
    dist.print0(f'Generated and scored {rate(len(seeds), start)}')
    fid = frechet_distance(mu, sigma, *ref_stats)
    dist.print0(f"FID {fid:g} from {len(seeds)} images generated by '{network}' against '{ref_path}'")
    return fid

# The three-seed-range protocol: min, mean and std of the FIDs of seeds 0..num-1, num..2num-1, 2num..3num-1.

def _print_summary(fids, ref_path):
    lo, mean, std = summarize(fids)
    dist.print0(f"FID min {lo:g}  mean {mean:g}  std {std:g}  over {len(fids)} seed ranges against '{ref_path}'")
    return lo, mean, std

def protocol_of_network(network, ref_path, num=50000, solver='edm', steps=None, precision='fp32', outdir=None, batch=64,
        detector=None, compile_mode=None, trust_detector=False):
    """fid.py protocol --network: the three seed ranges generated in memory (saved to OUTDIR/seeds-A-B
    if `outdir`); returns the three FIDs. steps: None is generate.py's default."""
    if 3 * num > generation.MAX_SEEDS:  # before any work: the seed lists are materialised per range
        raise EvaluationError(f'--num={num} asks for {3 * num} seeds, more than the {generation.MAX_SEEDS} a run may take; '
            f'use --num <= {generation.MAX_SEEDS // 3}')
    ref_stats = load_stats(ref_path)
    det = open_detector(detector, trust=trust_detector)
    check_dims(det, ref_stats[0], ref_path)
    if outdir is not None:
        make_outdir(outdir)
    net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, compile_mode=compile_mode,
        solver=solver, num_steps=steps)
    fids = []
    for seeds in [range(k * num, (k + 1) * num) for k in range(3)]:
        name = f'seeds-{seeds[0]}-{seeds[-1]}'
        folder = os.path.join(outdir, name) if outdir is not None else None
        mu, sigma = generated_stats(net, (sampler_name, sampler_kwargs), seeds, det, batch=batch,
            precision=precision, outdir=folder, fixed_shape=compile_mode is not None)
        fids.append(frechet_distance(mu, sigma, *ref_stats))
        dist.print0(f"FID {fids[-1]:g} from {num} images " + (f"in '{folder}'" if folder else f"of {name}"))
    _print_summary(fids, ref_path)
    return fids

def protocol_of_images(images, ref_path, num=50000, seed=0, batch=64, workers=3, detector=None, trust_detector=False):
    """fid.py protocol --images: the FIDs of three folders made by generate.py."""
    ref_stats = load_stats(ref_path)
    datasets = [open_images(path, num=num, seed=seed) for path in images]
    det = open_detector(detector, trust=trust_detector)
    check_dims(det, ref_stats[0], ref_path)
    fids = []
    for path, dataset in zip(images, datasets):
        fids.append(calc_fid(dataset, ref_stats, det, batch=batch, workers=workers))
        dist.print0(f"FID {fids[-1]:g} from {len(dataset)} images in '{path}'")
    _print_summary(fids, ref_path)
    return fids

#----------------------------------------------------------------------------
