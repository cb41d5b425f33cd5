"""Feature statistics for FID: (mu, Sigma) of detector features, the Frechet distance between two
such Gaussians, and the reference's npz files that hold them.

Features are accumulated as float64 sums so that torchrun's ranks can simply add them:
mu = sum f / n, Sigma = (sum f f^T - n mu mu^T) / (n - 1) (the unbiased covariance).
"""

import contextlib
import os
import re
import time
import warnings
import zipfile

import numpy as np
import scipy
import scipy.linalg
import torch
import tqdm

from torch_utils import distributed as dist
from torch_utils.errors import UserError
from torch_utils.fileio import atomic_write
from torch_utils.download import download_cached

class FIDError(UserError):
    """A problem with the user's inputs to an FID; the message says what is wrong and what to do."""

#----------------------------------------------------------------------------
# Statistics and the Frechet distance.

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

# (major, minor): sqrtm's signature changed in SciPy 1.16.
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

# min, mean and sample standard deviation (ddof=1) of several FIDs: the three-seed-range summary.
def summarize(fids):
    fids = np.asarray(fids, dtype=np.float64)
    std = float(fids.std(ddof=1)) if fids.size > 1 else 0.0
    return float(fids.min()), float(fids.mean()), std

def rate(num, start):
    """'N images in T s (R img/s)' since `start` (time.perf_counter()); the stats end in a host copy,
    so the device has finished by the time this is called."""
    elapsed = time.perf_counter() - start
    return f'{num} images in {elapsed:.1f} s ({num / max(elapsed, 1e-9):.0f} img/s)'

#----------------------------------------------------------------------------
# Statistics files: an npz with mu (float64 [D]) and sigma (float64 [D, D]), as the reference
# writes them, so its published fid-refs/*.npz work here too.

def save_stats(path, mu, sigma):
    """Write the npz (creating its folder) through atomic_write: a reader never sees half a reference."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    atomic_write(path, lambda f: np.savez(f, **arrays))

def load_stats(path_or_url):
    """(mu, sigma) from a statistics npz (path or URL), checked; no pickles are ever loaded."""
    try:
        local = download_cached(path_or_url)
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

# A reference is only comparable with features of the detector that made it.
def check_dims(detector, mu, ref):
    if mu.shape[0] != detector.feature_dim:
        raise FIDError(f"reference '{ref}' has {mu.shape[0]}-dimensional statistics but the detector "
            f"'{detector.name}' gives {detector.feature_dim} features; use a reference made with the same detector")

#----------------------------------------------------------------------------
# Features.

# The detector's numerics must not depend on the generator's --precision (generate.py's fp32
# switches TF32 off globally): `calc` on PNGs and `gen` in memory must give the same features
# on a GPU. Both run the detector with PyTorch's default switches (TF32 for convolutions, not
# for matmuls), the setting `calc` has always had. Setting them costs no device work.
@contextlib.contextmanager
def detector_numerics():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

class FeatureSums:
    """Running count, sum f and sum f f^T of detector features, float64 on the detector's device.
    Nothing here waits for the device: the count comes from host-side shapes."""
    def __init__(self, detector):
        self.detector = detector
        self.count = 0
        self.sum_f = torch.zeros([detector.feature_dim], dtype=torch.float64, device=detector.device)
        self.sum_ff = torch.zeros([detector.feature_dim] * 2, dtype=torch.float64, device=detector.device)

    def add(self, images):
        """uint8 images [N, C, H, W], ideally already on the detector's device."""
        with detector_numerics():
            features = self.detector(images).to(torch.float64)  # [N, D]
        self.count += features.shape[0]
        self.sum_f += features.sum(dim=0)
        self.sum_ff.addmm_(features.T, features)  # float64 keeps the sums exact enough to add across ranks

    def stats(self):
        """(mu, sigma) over all ranks: the sums are added across torchrun's processes."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.sum_f.device)
        if dist.is_distributed():
            for t in (count, self.sum_f, self.sum_ff):
                torch.distributed.all_reduce(t)
        return stats_from_sums(count.item(), self.sum_f.cpu().numpy(), self.sum_ff.cpu().numpy())

def compute_stats(dataset, detector, batch=64, workers=3, progress=True):
    """(mu, sigma) of the detector features of every image of a Dataset of (uint8 [C, H, W], label);
    under torchrun each rank takes every world-th image and the float64 sums are added across ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    # Workers decode PNGs while the device runs the detector; pinned batches let the uint8
    # copy overlap with the previous batch's work. The images travel as uint8 (a quarter of
    # float32) and the detector converts them on the device.
    cuda = detector.device.type == 'cuda'
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers, pin_memory=cuda,
        prefetch_factor=(4 if workers > 0 else None))
    sums = FeatureSums(detector)
    for images, _labels in tqdm.tqdm(loader, unit='batch', disable=(rank != 0 or not progress)):
        sums.add(images.to(detector.device, non_blocking=True))
    return sums.stats()

#----------------------------------------------------------------------------
