"""Frechet Inception Distance (FID): reference statistics, the FID of a folder of images,
and the three-seed-range protocol.

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out/seeds0 --ref=fid-refs/cifar10-32x32.npz
    python fid.py protocol --images out/seeds0 out/seeds1 out/seeds2 --ref=fid-refs/cifar10-32x32.npz

Without torchrun everything runs in one process, on the GPU if there is one, else on the CPU.
"""

import os
import re
import tempfile
import warnings
import zipfile

import click
import numpy as np
import scipy
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils.inception import DetectorError, load_detector
from training.dataset import DatasetError, ImageFolderDataset

class FIDError(Exception):
    """A problem with the user's inputs; the message says what is wrong and what to do."""

#----------------------------------------------------------------------------
# Statistics. Features are accumulated as float64 sums so that ranks can simply add them:
# mu = sum f / n, Sigma = (sum f f^T - n mu mu^T) / (n - 1) (the unbiased covariance).

def stats_from_sums(n, sum_f, sum_ff):
    """(mu [D], sigma [D, D]) as float64 numpy arrays from the count, sum f and sum f f^T."""
    n = float(n)
    if n < 2:
        raise FIDError(f'need at least 2 images for a covariance, got {int(n)}')
    sum_f = np.asarray(sum_f, dtype=np.float64)
    sum_ff = np.asarray(sum_ff, dtype=np.float64)
    mu = sum_f / n
    sigma = (sum_ff - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma

def _scipy_version():
    return tuple(int(x) for x in re.findall(r'\d+', scipy.__version__)[:2])

def sqrtm_real(a):
    """Real part of the principal matrix square root. SciPy < 1.16 needs disp=False to return
    (root, error) quietly; 1.16 deprecates disp and returns the root alone."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)  # near-singular products are expected
        if _scipy_version() >= (1, 16):
            root = scipy.linalg.sqrtm(a)
        else:
            root = scipy.linalg.sqrtm(a, disp=False)
    if isinstance(root, tuple):
        root = root[0]
    return np.real(root)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017, Equation 6)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, mu2, sigma1, sigma2))
    m = np.square(mu1 - mu2).sum()
    s = sqrtm_real(np.dot(sigma1, sigma2))
    fid = float(m + np.trace(sigma1 + sigma2 - 2 * s))
    if not np.isfinite(fid):
        raise FIDError('the FID is not finite: the covariance product has no usable square root; '
            'check that both statistics come from enough images (more images than feature dimensions)')
    return fid

#----------------------------------------------------------------------------
# Statistics files: an npz with mu (float64 [D]) and sigma (float64 [D, D]), as the reference
# writes them, so its published fid-refs/*.npz work here too.

def save_stats(path, mu, sigma):
    """Write the npz atomically: a temporary file in the same folder, renamed over the destination."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.npz')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_stats(path_or_url):
    """(mu, sigma) from a statistics npz (path or URL), checked; no pickles are ever loaded."""
    try:
        local = dnnlib.util.download_cached(path_or_url)
    except (FileNotFoundError, IOError) as err:
        raise FIDError(f'reference statistics {err}') from None
    try:
        with np.load(local, allow_pickle=False) as data:
            if 'mu' not in data or 'sigma' not in data:
                raise FIDError(f'{path_or_url}: has no "mu" and "sigma" arrays (found {sorted(data.keys())}); '
                    'make the reference with "fid.py ref"')
            mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
    except FIDError:
        raise
    except (OSError, ValueError, EOFError, TypeError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as err:
        raise FIDError(f'{path_or_url}: cannot be read as a statistics npz ({type(err).__name__}: {err}); '
            'the file is damaged or not a reference, make it again with "fid.py ref"') from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f'{path_or_url}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]; '
            'make the reference with "fid.py ref"')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f'{path_or_url}: contains NaN or infinite values; make the reference again')
    return mu, sigma

#----------------------------------------------------------------------------
# Images and features.

def open_images(path, num=None, seed=0):
    """The images to score: all of them, or a seeded random subset of `num` (an error if fewer)."""
    try:
        dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    except DatasetError as err:
        raise FIDError(str(err)) from None
    if num is not None and len(dataset) < num:
        raise FIDError(f"found {len(dataset)} images in '{path}' but --num={num}; generate more images or lower --num")
    if dataset.num_channels not in (1, 3):
        raise FIDError(f"images in '{path}' have {dataset.num_channels} channels; FID needs grayscale or RGB images")
    return dataset

def compute_stats(dataset, detector, batch=64, workers=3, progress=True):
    """(mu, sigma) of the detector features of every image; under torchrun each rank takes every
    world-th image and the float64 sums are added across ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers)
    dim, device = detector.feature_dim, detector.device
    count = torch.zeros([], dtype=torch.float64, device=device)
    sum_f = torch.zeros([dim], dtype=torch.float64, device=device)
    sum_ff = torch.zeros([dim, dim], dtype=torch.float64, device=device)
    for images, _labels in tqdm.tqdm(loader, unit='batch', disable=(rank != 0 or not progress)):
        features = detector(images).to(torch.float64)  # [N, D]
        count += features.shape[0]
        sum_f += features.sum(dim=0)
        sum_ff += features.T @ features
    if dist.is_distributed():
        for t in (count, sum_f, sum_ff):
            torch.distributed.all_reduce(t)
    return stats_from_sums(count.item(), sum_f.cpu().numpy(), sum_ff.cpu().numpy())

def open_detector(spec, device=None):
    """The detector, downloaded by rank 0 first so that the ranks do not race for the cache."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        detector = load_detector(spec, device=device or dist.device(), verbose=(dist.get_rank() == 0))
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    return detector

def check_dims(detector, mu, ref):
    if mu.shape[0] != detector.feature_dim:
        raise FIDError(f"reference '{ref}' has {mu.shape[0]}-dimensional statistics but the detector "
            f"'{detector.name}' gives {detector.feature_dim} features; use a reference made with the same detector")

def calc_fid(dataset, ref_stats, detector, batch=64, workers=3, progress=True):
    """FID of the images of a dataset (see open_images) against reference (mu, sigma)."""
    mu, sigma = compute_stats(dataset, detector, batch=batch, workers=workers, progress=progress)
    return frechet_distance(mu, sigma, *ref_stats)

def summarize(fids):
    """min, mean and sample standard deviation (ddof=1) of several FIDs."""
    fids = np.asarray(fids, dtype=np.float64)
    std = float(fids.std(ddof=1)) if fids.size > 1 else 0.0
    return float(fids.min()), float(fids.mean()), std

#----------------------------------------------------------------------------
# Command line.

def user_message(err):
    """One line for the user. An error raised in a DataLoader worker arrives as a traceback whose last
    line is 'module.SomeError: message'."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err).strip()
    return re.sub(r'^[\w.]+Error: ', '', lines[-1].strip())

def _run(fn):
    """Join torchrun's process group, run, and turn the user's mistakes into one-line click errors."""
    dist.init()
    try:
        return fn()
    except (FIDError, DatasetError, DetectorError) as err:
        raise click.ClickException(user_message(err)) from None
    finally:
        dist.shutdown()  # an undestroyed gloo group can abort the process at exit

detector_option = click.option('--detector', help='Feature detector: URL, path, "nvidia", "pytorch-fid" or "digits"  [default: NVIDIA Inception]',
    metavar='URL|PATH', type=str, default=None)
workers_option = click.option('--workers', help='Data loader processes per GPU', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
batch_option = click.option('--batch', help='Maximum batch size per GPU', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID).

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of 50000 generated images, on 8 GPUs
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    """

@main.command()
@click.option('--data', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@batch_option
@workers_option
@detector_option
def ref(data, dest, batch, workers, detector):
    """Write the reference statistics (mu, sigma) of all images of a dataset."""
    def run():
        if os.path.isdir(dest):
            raise FIDError(f"--dest '{dest}' is a folder; give the path of the .npz file to write")
        dataset = open_images(data)
        det = open_detector(detector)
        dist.print0(f"Calculating statistics of {len(dataset)} images in '{data}' with '{det.name}'...")
        mu, sigma = compute_stats(dataset, det, batch=batch, workers=workers)
        if dist.get_rank() == 0:
            save_stats(dest, mu, sigma)
        dist.print0(f"Saved the statistics of {len(dataset)} images to '{dest}'")
    _run(run)

@main.command()
@click.option('--images', help='Folder or zip of generated images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed of the image subset', metavar='INT', type=int, default=0, show_default=True)
@batch_option
@workers_option
@detector_option
def calc(images, ref_path, num, seed, batch, workers, detector):
    """Calculate the FID of a folder of images against reference statistics."""
    def run():
        ref_stats = load_stats(ref_path)
        dataset = open_images(images, num=num, seed=seed)  # checked before the detector is fetched
        det = open_detector(detector)
        check_dims(det, ref_stats[0], ref_path)
        dist.print0(f"Calculating features of {len(dataset)} images in '{images}' with '{det.name}'...")
        fid = calc_fid(dataset, ref_stats, det, batch=batch, workers=workers)
        dist.print0(f"FID {fid:g} from {len(dataset)} images in '{images}' against '{ref_path}'")
    _run(run)

@main.command()
@click.option('--images', help='The three image folders (seeds 0-49999, 50000-99999, 100000-149999)',
    metavar='DIR DIR DIR', type=str, nargs=3, default=None)
@click.option('--network', help='Or: generate the three seed ranges from this network first', metavar='PT|PKL|URL', type=str)
@click.option('--outdir', help='With --network: where the three image folders go', metavar='DIR', type=str)
@click.option('--solver', help='With --network: sampler', type=click.Choice(['edm', 'dpm']), default='edm', show_default=True)
@click.option('--steps', help='With --network: sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images per folder', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed of the image subsets', metavar='INT', type=int, default=0, show_default=True)
@batch_option
@workers_option
@detector_option
def protocol(images, network, outdir, solver, steps, ref_path, num, seed, batch, workers, detector):
    """FID of one network over three seed ranges: min, mean and std.

    Either pass --network and --outdir (the seed ranges 0..num-1, num..2num-1, 2num..3num-1 are
    generated into OUTDIR/seeds-A-B; with --num=50000 these are the usual 0-49999, 50000-99999,
    100000-149999), or generate the three folders with generate.py and pass them as --images.
    """
    if (images is None) == (network is None) or (network is not None and outdir is None):
        raise click.UsageError('give either --images DIR DIR DIR, or --network with --outdir')

    def run():
        nonlocal images
        if network is not None:
            import generate  # noqa: only this path samples
            images = []
            for k in range(3):
                seeds = range(k * num, (k + 1) * num)
                folder = os.path.join(outdir, f'seeds-{seeds[0]}-{seeds[-1]}')
                generate.generate(network, folder, seeds=seeds, subdirs=True, max_batch_size=batch, solver=solver,
                    num_steps=steps, verbose=(dist.get_rank() == 0))
                images.append(folder)
        ref_stats = load_stats(ref_path)
        datasets = [open_images(path, num=num, seed=seed) for path in images]
        det = open_detector(detector)
        check_dims(det, ref_stats[0], ref_path)
        fids = []
        for path, dataset in zip(images, datasets):
            fid = calc_fid(dataset, ref_stats, det, batch=batch, workers=workers)
            dist.print0(f"FID {fid:g} from {len(dataset)} images in '{path}'")
            fids.append(fid)
        lo, mean, std = summarize(fids)
        dist.print0(f"FID min {lo:g}  mean {mean:g}  std {std:g}  over {len(fids)} seed ranges against '{ref_path}'")
    _run(run)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
