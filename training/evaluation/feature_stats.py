"""Feature statistics for FID: (mu, Sigma) of detector features, the Frechet distance between two
such Gaussians, and the reference's npz files that hold them.

Features are accumulated as float64 sums so that torchrun's ranks can simply add them:
mu = sum f / n, Sigma = (sum f f^T - n mu mu^T) / (n - 1) (the unbiased covariance).
"""

import contextlib
import io
import json
import os
import time
import zipfile
import zlib

import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from torch_utils.errors import EvaluationError, describe_exception
from torch_utils.io.files import atomic_write, open_regular
from torch_utils.io.download import download_cached
from torch_utils.io.safe_pickle import ARRAY_GLOBALS, UnsafePickleError, restricted_load

#----------------------------------------------------------------------------
# Statistics and the Frechet distance.

def stats_from_sums(n, sum_f, sum_ff):
    """(mu [D], sigma [D, D]) as float64 numpy arrays from the count, sum f and sum f f^T."""
    n = float(n)
    if n < 2:
        raise EvaluationError(f'need at least 2 images for a covariance, got {int(n)}')
    sum_f = np.asarray(sum_f, dtype=np.float64)
    sum_ff = np.asarray(sum_ff, dtype=np.float64)
    mu = sum_f / n
    sigma = (sum_ff - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma

# A factor F with S = F F^T of a covariance S (of its symmetric part): F = V sqrt(W) from its
# eigendecomposition, where the eigenvalues below n * eps * the largest, rounding noise around exact
# zeros, and any negative ones are 0.
def _psd_factor(sigma):
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    w = np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0), w, 0)
    return v * np.sqrt(w)

# tr sqrtm(S1 S2) as the nuclear norm of F1^T F2: S1 S2 = F1 F1^T F2 F2^T has the eigenvalues of
# (F1^T F2)(F1^T F2)^T, the squared singular values of F1^T F2. This takes no square root of a
# non-symmetric matrix, nor of the product's eigenvalues, whose small ones are rounding noise that
# a square root magnifies. Statistics of fewer images than features are singular: there
# pytorch-fid's formula (scipy.linalg.sqrtm of S1 @ S2) loses digits or fails, and this stays
# exact; on full-rank statistics the two agree to 1e-12 relative, and on ill-conditioned ones
# this is the closer to the exact value (tests/evaluation/test_fid.py).
def _trace_sqrt_product(sigma1, sigma2):
    return np.linalg.svd(_psd_factor(sigma1).T @ _psd_factor(sigma2), compute_uv=False).sum()

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017, Equation 6)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, mu2, sigma1, sigma2))
    try:
        fid = float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2)
            - 2 * _trace_sqrt_product(sigma1, sigma2))
    except np.linalg.LinAlgError:  # eigh of infinite values
        fid = np.nan
    if not np.isfinite(fid):
        raise EvaluationError('the FID is not finite: the statistics hold infinite or NaN values, or values too '
            'large for float64; compute them again from the images')
    return fid

# min, mean and sample standard deviation (ddof=1) of several FIDs: the three-seed-range summary.
def summarize(fids):
    fids = np.asarray(fids, dtype=np.float64)
    std = float(fids.std(ddof=1)) if fids.size > 1 else 0.0
    return float(fids.min()), float(fids.mean()), std

def rate(num, start):
    """'N images in T s (R img/s)' since `start` (time.perf_counter()); the stats end in a host copy,
    so the device has finished by the time this is called. Below one image a second the rate reads
    's/img'; a run too short to time (under 0.1 s) gets no rate."""
    elapsed = time.perf_counter() - start
    text = f'{num} images in {elapsed:.1f} s'
    if elapsed < 0.1 or num == 0:
        return text
    per_second = num / elapsed
    if per_second < 1:
        return f'{text} ({elapsed / num:.1f} s/img)'
    return f'{text} ({per_second:.0f} img/s)' if per_second >= 10 else f'{text} ({per_second:.1f} img/s)'

#----------------------------------------------------------------------------
# Statistics files: an npz with mu (float64 [D]) and sigma (float64 [D, D]), as the reference
# writes them, so its published fid-refs/*.npz work here too. Ours add `inputs`: a JSON text (a
# plain unicode array, read without pickles) saying what the statistics were made from. Readers
# that take mu and sigma by name, ours and the reference's, pass over it.

def save_stats(path, mu, sigma, inputs=None):
    """Write the npz (creating its folder) through atomic_write: a reader never sees half a reference.
    inputs: a JSON-able dict recorded with the statistics (see read_inputs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    if inputs is not None:
        arrays['inputs'] = np.array(json.dumps(inputs, sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))

MAX_INPUTS_CHARS = 1 << 16  # a record is a few hundred characters

def read_inputs(path):
    """The `inputs` dict save_stats recorded in a statistics npz; None if it has none. ValueError
    (and the zip and npy readers' errors) for a file that is not a readable npz."""
    with zipfile.ZipFile(path) as z:
        if 'inputs.npy' not in z.namelist():
            return None
        shape, dtype, _size = _array_header(z, 'inputs.npy')
        if shape != () or dtype.kind != 'U' or dtype.itemsize > 4 * MAX_INPUTS_CHARS:
            raise ValueError(f'inputs is {dtype} {list(shape)}, not a JSON text')
        record = json.loads(str(_read_array(z, 'inputs.npy')))
    if not isinstance(record, dict):
        raise ValueError('inputs is not a JSON object')
    return record

# What a statistics file may claim, checked on the .npy headers before any array is read: a
# header can claim any shape, and a deflated member can expand a thousandfold. Inception gives
# 2048 features; 16384 keeps sigma within 2 GiB. Real statistics barely compress, so a member
# above 64 MiB that expands more than 100 times is not one.
MAX_FEATURE_DIM = 16384
MAX_EXPANSION = 100
SMALL_MEMBER = 64 << 20

def _array_header(z, member):
    """(shape, dtype, header size) of a .npy member of an open zip, reading only its header."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f'{member} has .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0')
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran_order, dtype = read_header(f)
        return shape, dtype, f.tell()

def _check_arrays(z, path):
    """Refuse, from the headers alone, arrays that are not plain floats mu [D] and sigma [D, D]
    with 1 <= D <= MAX_FEATURE_DIM and exactly the data their headers describe."""
    remedy = 'make the reference with "fid.py ref"'
    headers = {key: _array_header(z, f'{key}.npy') for key in ('mu', 'sigma')}
    for key, (shape, dtype, _size) in headers.items():
        if dtype.kind != 'f' or dtype.itemsize not in (4, 8):
            raise EvaluationError(f'{path}: {key} holds {dtype} values, not float32 or float64; {remedy}')
    (mu_shape, _, _), (sigma_shape, _, _) = headers['mu'], headers['sigma']
    if len(mu_shape) != 1 or tuple(sigma_shape) != (mu_shape[0],) * 2:
        raise EvaluationError(f'{path}: mu {list(mu_shape)} and sigma {list(sigma_shape)} are not [D] and [D, D]; {remedy}')
    if not 1 <= mu_shape[0] <= MAX_FEATURE_DIM:
        raise EvaluationError(f'{path}: {mu_shape[0]} features, not 1 to {MAX_FEATURE_DIM}; {remedy}')
    for key, (shape, dtype, header_size) in headers.items():
        info = z.getinfo(f'{key}.npy')
        if info.file_size != header_size + int(np.prod(shape)) * dtype.itemsize:
            raise EvaluationError(f'{path}: {key} holds {info.file_size - header_size} bytes of data but its header describes '
                f'{list(shape)} {dtype}; the file is damaged, {remedy}')
        if info.file_size > SMALL_MEMBER and info.file_size > MAX_EXPANSION * info.compress_size:
            raise EvaluationError(f'{path}: {key} expands from {info.compress_size} compressed bytes to {info.file_size}, '
                f'which real statistics never do; {remedy}')

# An array of a member that _check_arrays has passed: its allocation is what the file holds.
def _read_array(z, member):
    with z.open(member) as f:
        return np.lib.format.read_array(f, allow_pickle=False)

def _read_stats_npz(f, path):
    """(mu, sigma) of an npz (an open file); nothing is allocated that the headers have not shown to fit the file."""
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
            if 'mu.npy' not in names or 'sigma.npy' not in names:
                keys = sorted(n[:-4] if n.endswith('.npy') else n for n in names)
                raise EvaluationError(f'{path}: has no "mu" and "sigma" arrays (found {keys}); '
                    'make the reference with "fid.py ref"')
            _check_arrays(z, path)
            return tuple(_read_array(z, f'{key}.npy').astype(np.float64, copy=False) for key in ('mu', 'sigma'))
    except EvaluationError:
        raise
    except (OSError, ValueError, EOFError, TypeError, NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error) as err:
        raise EvaluationError(f'{path}: cannot be read as a statistics npz ({type(err).__name__}: {err}); '
            'the file is damaged or not a reference, make it again with "fid.py ref"') from None

# EDM2's reference statistics (calculate_metrics.py, e.g. dataset-refs/img512.pkl) are a pickle of
# {'num_images': n, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}} with numpy arrays, about
# 40 MB. It is read whole (no claimed length can make the reader allocate more than the file) with
# the allow-list of plain numpy data, so nothing in it runs.
MAX_STATS_PICKLE_BYTES = 1 << 30  # two metrics of 8192 features

def _read_stats_pickle(f, path):
    """{metric: (mu, sigma)} of an EDM2 statistics pickle (an open file), each checked as an npz's arrays are."""
    remedy = 'use EDM2\'s published statistics or make the reference with "fid.py ref"'
    if os.fstat(f.fileno()).st_size > MAX_STATS_PICKLE_BYTES:
        raise EvaluationError(f'{path}: larger than {MAX_STATS_PICKLE_BYTES >> 20} MiB, which statistics never are; {remedy}')
    data = f.read()
    try:
        tree = restricted_load(io.BytesIO(data), ARRAY_GLOBALS)
    except UnsafePickleError as err:
        raise EvaluationError(f'{path}: {err}') from None
    except Exception as err:  # whatever damaged data makes the unpickler raise
        raise EvaluationError(f'{path}: cannot be read as a statistics pickle ({describe_exception(err)}); '
            f'the file is damaged or not a reference, {remedy}') from None
    entries = {k: v for k, v in tree.items() if isinstance(v, dict)} if isinstance(tree, dict) else {}
    if not entries or not all(isinstance(k, str) for k in entries):
        raise EvaluationError(f'{path}: holds a {type(tree).__name__} without statistics, not EDM2\'s '
            f'{{metric: {{"mu", "sigma"}}}}; {remedy}')
    reference = {}
    for metric, entry in entries.items():
        mu, sigma = entry.get('mu'), entry.get('sigma')
        if not all(isinstance(a, np.ndarray) and a.dtype.kind == 'f' and a.dtype.itemsize in (4, 8) for a in (mu, sigma)):
            raise EvaluationError(f'{path}: {metric!r} has no float32 or float64 arrays "mu" and "sigma"; {remedy}')
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2 or not 1 <= mu.shape[0] <= MAX_FEATURE_DIM:
            raise EvaluationError(f'{path}: {metric!r} has mu {list(mu.shape)} and sigma {list(sigma.shape)}, not [D] and '
                f'[D, D] with 1 <= D <= {MAX_FEATURE_DIM}; {remedy}')
        reference[metric] = mu.astype(np.float64), sigma.astype(np.float64)
    return reference

def load_reference(path_or_url):
    """Every set of statistics in a reference file (path or URL), checked: {None: (mu, sigma)} for an
    npz (ours, EDM's), {metric: (mu, sigma)} for an EDM2 pickle ('fid', 'fd_dinov2'). The content
    decides which it is; no pickle runs anything."""
    try:
        local = download_cached(path_or_url)
    except (FileNotFoundError, IOError) as err:
        raise EvaluationError(f'reference statistics {err}') from None
    with open_regular(local, 'give a statistics file (fid.py ref)', error=EvaluationError) as f:
        pickled = f.read(1) == b'\x80'  # a pickle of protocol 2 or later; an npz is a zip ('PK')
        f.seek(0)
        reference = _read_stats_pickle(f, path_or_url) if pickled else {None: _read_stats_npz(f, path_or_url)}
    for mu, sigma in reference.values():
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise EvaluationError(f'{path_or_url}: contains NaN or infinite values; make the reference again')
    return reference

def pick_stats(reference, metric, path):
    """(mu, sigma) for `metric` from load_reference's result: an npz's one set (check_dims tells a wrong
    detector), an EDM2 pickle's entry named `metric` (None = 'fid', as EDM2 reads an npz)."""
    if None in reference:
        return reference[None]
    metric = metric or 'fid'
    if metric not in reference:
        raise EvaluationError(f"{path}: holds statistics of {', '.join(map(repr, sorted(reference)))} but not of "
            f"{metric!r}, this detector's; use a reference made with the same detector")
    return reference[metric]

def load_stats(path_or_url, metric=None):
    """(mu, sigma) from a statistics npz or EDM2 pickle (path or URL), checked; metric: the entry of a
    pickle to read ('fid', 'fd_dinov2'; a Detector's `metric`), None = 'fid'; an npz has one."""
    return pick_stats(load_reference(path_or_url), metric, path_or_url)

# A reference is only comparable with features of the detector that made it.
def check_dims(detector, mu, ref):
    if mu.shape[0] != detector.feature_dim:
        raise EvaluationError(f"reference '{ref}' has {mu.shape[0]}-dimensional statistics but the detector "
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
    # Rank 0's bar counts the images of all ranks. Every rank's share is rank 0's or one fewer, in batches
    # of `batch`, so each step but the last scores world x batch images; the last adds the rest.
    with tqdm.tqdm(total=len(dataset), unit='img', disable=(rank != 0 or not progress)) as bar:
        for images, _labels in loader:
            sums.add(images.to(detector.device, non_blocking=True))
            bar.update(min(len(images) * world, bar.total - bar.n))
    return sums.stats()

#----------------------------------------------------------------------------
