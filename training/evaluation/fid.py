"""FID of image folders and of networks: fid.py's commands as functions.

`fid_of_network` (and `protocol_of_network`) score images straight from the sampler, quantised
to uint8 exactly as generate.py saves them, so they give the FID of the PNGs without writing
them. The statistics themselves live in training/evaluation/feature_stats.py.

Nothing is overwritten silently: `make_reference` records the dataset's and the detector's
digests in the statistics it writes and keeps an existing file only if it records the same; the
image folders of `gen` and `protocol --outdir` are claimed as generate.py claims its --outdir.
"""

import hashlib
import os
import time
import zipfile
import zlib

import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist, precision as precision_lib
from torch_utils.errors import EvaluationError, describe_exception
from training.evaluation.feature_stats import (FeatureSums, check_dims, compute_stats, frechet_distance, load_reference,
    load_stats, pick_stats, rate, read_inputs, save_stats, summarize)
from torch_utils.io.download import download_cached, file_sha256
from torch_utils.io.files import check_destination
from training.evaluation.digits import WEIGHTS as DIGITS_WEIGHTS
from training.evaluation.inception import ALIASES, DINOV2_URL, load_detector
from training.evaluation import generation
from training.data.dataset import ImageFolderDataset, is_image_name, list_folder

#----------------------------------------------------------------------------
# How results are printed: the metric a detector gives, with a fixed number of decimals.

DECIMALS = 3
METRIC_NAMES = {'fid': 'FID', 'fd_dinov2': 'FD-DINOv2', 'fd_digits': 'FD-digits'}  # by Detector.metric

def metric_name(detector=None):
    """The metric of a loaded Detector ('FID' for Inception, 'FD-DINOv2', 'FD-digits'); for a --detector
    value, the metric its alias or URL names ('FID' for a file, whose content decides once it is loaded)."""
    metric = getattr(detector, 'metric', None)
    if metric is None:
        spec = ALIASES.get(detector, detector)
        metric = 'fd_digits' if spec == 'digits' else 'fd_dinov2' if spec == DINOV2_URL else 'fid'
    return METRIC_NAMES[metric]

def decimals(value):
    """'2.345'; a value that rounds to zero is '0.000' (the distance of a set to itself can come out -1e-12)."""
    return f'{value if round(value, DECIMALS) != 0 else 0.0:.{DECIMALS}f}'

def score(detector, value):
    """'FID 2.345': the metric of `detector` (a Detector or a --detector value) and its value."""
    return f'{metric_name(detector)} {decimals(value)}'

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

# The reference is read (and checked) before any other work; which of its statistics apply is known
# once the detector is: an EDM2 pickle holds one set per metric, an npz one set.
def reference_stats(reference, detector, ref_path):
    """(mu, sigma) of `reference` (load_reference) for the detector's metric, of the detector's feature dimension."""
    mu, sigma = pick_stats(reference, detector.metric, ref_path)
    check_dims(detector, mu, ref_path)
    return mu, sigma

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

# gen's and protocol's image folders ({path: seeds}) are claimed as generate.py --subdirs claims its
# --outdir (the same generate_options.json), all before the first image: a folder of other images
# is refused at no cost, and one of the same images is written again.
def claim_outdirs(folders, net, network, sampler, device, class_idx=None, precision='fp32', batch=64, compile_mode=None):
    sampler_name, sampler_kwargs = sampler
    def claim():
        digest = generation.network_digest(network)
        settings = {folder: generation.describe_run(net, str(network), sampler_name, sampler_kwargs, [], seeds, class_idx,
            network_sha256=digest, max_batch_size=batch, batch_auto=False, world_size=dist.get_world_size(), subdirs=True,
            grid=None, device=torch.device(device).type, precision=precision, compile=compile_mode is not None,
            compile_mode=compile_mode) for folder, seeds in folders.items()}
        for folder, options in settings.items():
            generation.check_outdir(folder, options)
        for folder, options in settings.items():
            generation.claim_outdir(folder, options)
    dist.on_rank0(claim)

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
    plan, per_step = generation.resume_plan(seeds, np.zeros(len(seeds), dtype=bool), batch, rank, world)
    pad_to = max((len(b) for b, _todo in plan), default=0) if fixed_shape else None
    with tqdm.tqdm(total=len(seeds), unit='img', disable=(rank != 0 or not progress)) as bar:  # all ranks' images
        for (batch_seeds, _todo), step_images in zip(plan, per_step):
            if batch_seeds:
                images = generation.generate_batch(net, sampler_name, sampler_kwargs, batch_seeds, device, class_idx,
                    precision, pad_to=pad_to)
                yield batch_seeds, torch.from_numpy(generation.to_uint8(images)).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
            bar.update(step_images)

def generated_stats(net, sampler, seeds, detector, batch=64, class_idx=None, precision='fp32', outdir=None,
        progress=True, fixed_shape=False):
    """(mu, sigma) of the features of the images of `seeds`, shared among torchrun's ranks as
    generate.py shares them; with `outdir` the PNGs are written too (as generate.py --subdirs)."""
    sums = FeatureSums(detector)
    if outdir is not None:
        make_outdir(outdir)  # before any work, so an unwritable folder loses none
    for batch_seeds, images in generated_batches(net, sampler, seeds, detector.device, batch, class_idx, precision,
            progress, fixed_shape):
        if outdir is not None:
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
    """fid.py ref: write the statistics (mu, sigma) of every image of a dataset to `dest`, recording what
    they were made from. An existing `dest` is kept: if it records the same images and detector it is
    the result (and nothing is computed), otherwise the command is refused."""
    if os.path.isdir(dest):
        raise EvaluationError(f"--dest '{dest}' is a folder; give the path of the .npz file to write")
    check_destination(dest, '--dest')  # before the images and the detector are read
    recorded = existing_reference(dest) if os.path.lexists(dest) else None
    dataset = open_images(data)
    det = open_detector(detector, trust=trust_detector)
    inputs = dist.on_rank0(lambda: reference_inputs(data, len(dataset), detector))
    if recorded is not None:
        differences = _reference_differences(recorded, inputs)
        if differences:
            raise EvaluationError(f"--dest '{dest}' already holds statistics of {' and '.join(differences)}; "
                'delete it or choose another --dest')
        dist.print0(f"'{dest}' already holds the statistics of these {len(dataset)} images with '{det.name}'; nothing to do")
        return load_stats(dest)
    dist.print0(f"Calculating statistics of {len(dataset)} images in '{data}' with '{det.name}'...")
    start = time.perf_counter()
    mu, sigma = compute_stats(dataset, det, batch=batch, workers=workers)
    dist.print0(f'Features of {rate(len(dataset), start)}')
    if dist.get_rank() == 0:
        save_stats(dest, mu, sigma, inputs)
    dist.print0(f"Saved the statistics of {len(dataset)} images to '{dest}'")
    return mu, sigma

# What a reference is made from: the bytes of the dataset's images and of the detector's file. The
# dataset's path is recorded for the messages only: a moved copy holds the same images.

def dataset_sha256(path):
    """SHA-256 of a dataset: of its zip file, or of a folder's image files (names and contents, in name order)."""
    if not os.path.isdir(path):
        return file_sha256(path)
    h = hashlib.sha256()
    for name in sorted(n for n in list_folder(path) if is_image_name(n)):
        h.update(f'{name}:{file_sha256(os.path.join(path, name))};'.encode())
    return h.hexdigest()

def detector_sha256(detector=None):
    """SHA-256 of the file behind a --detector value (the digits classifier's weights; for a URL or an alias,
    its download in the cache, which loading the detector has made)."""
    if detector == 'digits':
        return file_sha256(DIGITS_WEIGHTS)
    return file_sha256(download_cached(ALIASES.get(detector or 'nvidia', detector), verbose=False))

def reference_inputs(data, num_images, detector=None):
    return dict(data=os.path.abspath(data), data_sha256=dataset_sha256(data), num_images=num_images,
        detector=detector or 'nvidia', detector_sha256=detector_sha256(detector))

def existing_reference(dest):
    """The inputs an existing statistics file records; one EvaluationError if it records none."""
    remedy = 'delete it or choose another --dest'
    try:
        recorded = read_inputs(dest)
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as err:
        raise EvaluationError(f"--dest '{dest}' already exists and is not a statistics file ({describe_exception(err)}); "
            f'{remedy}') from None
    if recorded is None:
        raise EvaluationError(f"--dest '{dest}' already exists and does not record what it was made from (it was made "
            f'elsewhere or by an older version); {remedy}')
    return recorded

def _reference_differences(recorded, inputs):
    found = []
    if (recorded.get('data_sha256'), recorded.get('num_images')) != (inputs['data_sha256'], inputs['num_images']):
        changed = ', whose files changed' if (recorded.get('data'), recorded.get('num_images')) == (inputs['data'],
            inputs['num_images']) else ''
        found.append(f"other images ({recorded.get('num_images')} in '{recorded.get('data')}', this run "
            f"{inputs['num_images']} in '{inputs['data']}'{changed})")
    if recorded.get('detector_sha256') != inputs['detector_sha256']:
        found.append(f"another detector ({recorded.get('detector')}, this run {inputs['detector']})")
    return found

def fid_of_images(images, ref_path, num=50000, seed=0, batch=64, workers=3, detector=None, trust_detector=False):
    """fid.py calc: the FID of `num` images of a folder or zip (a seeded subset if it has more)."""
    reference = load_reference(ref_path)
    dataset = open_images(images, num=num, seed=seed)  # checked before the detector is fetched
    det = open_detector(detector, trust=trust_detector)
    ref_stats = reference_stats(reference, det, ref_path)
    dist.print0(f"Calculating features of {len(dataset)} images in '{images}' with '{det.name}'...")
    start = time.perf_counter()
    fid = calc_fid(dataset, ref_stats, det, batch=batch, workers=workers)
    dist.print0(f'Features of {rate(len(dataset), start)}')
    dist.print0(f"{score(det, fid)} from {len(dataset)} images in '{images}' against '{ref_path}'")
    return fid

def fid_of_network(network, ref_path, seeds, class_idx=None, solver='edm', steps=None, precision='fp32', outdir=None,
        batch=64, detector=None, compile_mode=None, trust_detector=False):
    """fid.py gen: the FID of the images of `seeds`, generated in memory (and saved to `outdir` if given).
    steps: None is generate.py's default (generation.SAMPLER_DEFAULTS)."""
    if len(seeds) < 2:
        raise EvaluationError(f'--seeds gives {len(seeds)} image; a covariance needs at least 2, e.g. --seeds=0-49999')
    reference = load_reference(ref_path)
    det = open_detector(detector, trust=trust_detector)
    ref_stats = reference_stats(reference, det, ref_path)
    if outdir is not None:
        make_outdir(outdir)
    net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, class_idx, compile_mode,
        solver=solver, num_steps=steps)
    if outdir is not None:
        claim_outdirs({outdir: seeds}, net, network, (sampler_name, sampler_kwargs), det.device, class_idx, precision, batch,
            compile_mode)
    dist.print0(f"Generating {len(seeds)} images and their features with '{det.name}'...")
    start = time.perf_counter()
    mu, sigma = generated_stats(net, (sampler_name, sampler_kwargs), seeds, det, batch=batch, class_idx=class_idx,
        precision=precision, outdir=outdir, fixed_shape=compile_mode is not None)
    dist.print0(f'Generated and scored {rate(len(seeds), start)}')
    fid = frechet_distance(mu, sigma, *ref_stats)
    dist.print0(f"{score(det, fid)} from {len(seeds)} images generated by '{network}' against '{ref_path}'")
    return fid

# The three-seed-range protocol: min, mean and std of the FIDs of seeds 0..num-1, num..2num-1, 2num..3num-1.

def _print_summary(fids, ref_path, detector):
    lo, mean, std = summarize(fids)
    dist.print0(f"{metric_name(detector)} min {decimals(lo)}  mean {decimals(mean)}  std {decimals(std)}  "
        f"over {len(fids)} seed ranges against '{ref_path}'")
    return lo, mean, std

def protocol_of_network(network, ref_path, num=50000, solver='edm', steps=None, precision='fp32', outdir=None, batch=64,
        detector=None, compile_mode=None, trust_detector=False):
    """fid.py protocol --network: the three seed ranges generated in memory (saved to OUTDIR/seeds-A-B
    if `outdir`); returns the three FIDs. steps: None is generate.py's default."""
    if 3 * num > generation.MAX_SEEDS:  # before any work: the seed lists are materialised per range
        raise EvaluationError(f'--num={num} asks for {3 * num} seeds, more than the {generation.MAX_SEEDS} a run may take; '
            f'use --num <= {generation.MAX_SEEDS // 3}')
    reference = load_reference(ref_path)
    det = open_detector(detector, trust=trust_detector)
    ref_stats = reference_stats(reference, det, ref_path)
    if outdir is not None:
        make_outdir(outdir)
    net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, compile_mode=compile_mode,
        solver=solver, num_steps=steps)
    ranges = [range(k * num, (k + 1) * num) for k in range(3)]
    folders = {os.path.join(outdir, f'seeds-{r[0]}-{r[-1]}'): list(r) for r in ranges} if outdir is not None else {}
    if folders:
        claim_outdirs(folders, net, network, (sampler_name, sampler_kwargs), det.device, precision=precision, batch=batch,
            compile_mode=compile_mode)
    fids = []
    for seeds in ranges:
        name = f'seeds-{seeds[0]}-{seeds[-1]}'
        folder = os.path.join(outdir, name) if outdir is not None else None
        mu, sigma = generated_stats(net, (sampler_name, sampler_kwargs), seeds, det, batch=batch,
            precision=precision, outdir=folder, fixed_shape=compile_mode is not None)
        fids.append(frechet_distance(mu, sigma, *ref_stats))
        dist.print0(f"{score(det, fids[-1])} from {num} images " + (f"in '{folder}'" if folder else f"of {name}"))
    _print_summary(fids, ref_path, det)
    return fids

def protocol_of_images(images, ref_path, num=50000, seed=0, batch=64, workers=3, detector=None, trust_detector=False):
    """fid.py protocol --images: the FIDs of three folders made by generate.py."""
    reference = load_reference(ref_path)
    datasets = [open_images(path, num=num, seed=seed) for path in images]
    det = open_detector(detector, trust=trust_detector)
    ref_stats = reference_stats(reference, det, ref_path)
    fids = []
    for path, dataset in zip(images, datasets):
        fids.append(calc_fid(dataset, ref_stats, det, batch=batch, workers=workers))
        dist.print0(f"{score(det, fids[-1])} from {len(dataset)} images in '{path}'")
    _print_summary(fids, ref_path, det)
    return fids

#----------------------------------------------------------------------------
