"""Frechet Inception Distance (FID): reference statistics, the FID of a folder of images,
and the three-seed-range protocol.

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out/seeds0 --ref=fid-refs/cifar10-32x32.npz
    python fid.py protocol --images out/seeds0 out/seeds1 out/seeds2 --ref=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=net.pt --seeds=0-49999 --ref=fid-refs/cifar10-32x32.npz

`gen` (and `protocol --network`) score images straight from the sampler, quantised to uint8
exactly as generate.py saves them, so they give the FID of the PNGs without writing them.
Without torchrun everything runs in one process, on the GPU if there is one, else on the CPU.
"""

import contextlib
import os
import re
import tempfile
import time
import warnings
import zipfile

import click
import numpy as np
import scipy
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist, precision as precision_lib
from torch_utils.compile_modes import COMPILE_MODES, resolve_compile_mode
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
    """(mu, sigma) of the detector features of every image; under torchrun each rank takes every
    world-th image and the float64 sums are added across ranks."""
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
# Images straight from the sampler. generate.to_uint8 is the very quantisation generate.py
# applies before writing its (lossless) PNGs, so these images, and hence their features, are
# those of the PNGs. Its copy to the host waits for the batch, but a batch costs tens of
# network evaluations, against which one synchronisation is nothing.

def generated_batches(net, sampler_name, sampler_kwargs, seeds, device, batch=64, class_idx=None, precision='fp32',
        progress=True, fixed_shape=False):
    """(seeds, uint8 images [N, C, H, W] on the CPU) for this rank's share of the seeds;
    fixed_shape (a compiled net): short batches are padded as generate.py pads them."""
    import generate  # noqa: only the generating paths need the sampler
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [b for b in generate.rank_batches(seeds, batch, rank, world) if b]
    pad_to = max((len(b) for b in batches), default=0) if fixed_shape else None
    for batch_seeds in tqdm.tqdm(batches, unit='batch', disable=(rank != 0 or not progress)):
        images = generate.generate_batch(net, sampler_name, sampler_kwargs, batch_seeds, device, class_idx, precision,
            pad_to=pad_to)
        yield batch_seeds, torch.from_numpy(generate.to_uint8(images)).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]

def make_outdir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise FIDError(f"cannot create --outdir '{path}' ({err.strerror}); choose a writable folder") from None

def generated_stats(net, sampler_name, sampler_kwargs, seeds, detector, batch=64, class_idx=None, precision='fp32',
        outdir=None, progress=True, fixed_shape=False):
    """(mu, sigma) of the features of the images of `seeds`, shared among torchrun's ranks as
    generate.py shares them; with `outdir` the PNGs are written too."""
    import generate  # noqa: only the generating paths need the sampler
    sums = FeatureSums(detector)
    for batch_seeds, images in generated_batches(net, sampler_name, sampler_kwargs, seeds, detector.device, batch,
            class_idx, precision, progress, fixed_shape):
        if outdir is not None:
            make_outdir(outdir)  # once per batch is cheap, and reports an unwritable folder before any work is lost
            generate.save_images(images.permute(0, 2, 3, 1).numpy(), batch_seeds, outdir, subdirs=True)  # generate.py's files
        sums.add(images.to(detector.device))
    return sums.stats()

#----------------------------------------------------------------------------

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

def open_generator(network, device, precision='fp32', class_idx=None, compile_mode=None, **sampler_options):
    """(net, sampler name, sampler kwargs) chosen as generate.py chooses them; its errors become FIDErrors.
    compile_mode: the net's U-Net compiled as generate.py --compile does."""
    import generate  # noqa: only the generating paths need the sampler
    try:
        sampler_name, sampler_kwargs, _ignored = generate.select_sampler(**sampler_options)
        net, _name = generate.load_net(network, device, dist.get_rank(), log=dist.print0)
    except generate.GenerateError as err:
        raise FIDError(str(err)) from None
    if net.img_channels not in (1, 3):
        raise FIDError(f"--network {network} makes {net.img_channels}-channel images; FID needs grayscale or RGB images")
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise FIDError(f'--class {class_idx} does not exist: the network has {net.label_dim} classes'
            + ('; drop --class' if not net.label_dim else f', 0..{net.label_dim - 1}'))
    precision_lib.configure(precision, device)  # the TF32 switches generate.py would set
    if compile_mode is not None:
        net = generate.compile_net(net, compile_mode)
    return net, sampler_name, sampler_kwargs

def calc_fid(dataset, ref_stats, detector, batch=64, workers=3, progress=True):
    """FID of the images of a dataset (see open_images) against reference (mu, sigma)."""
    mu, sigma = compute_stats(dataset, detector, batch=batch, workers=workers, progress=progress)
    return frechet_distance(mu, sigma, *ref_stats)

def summarize(fids):
    """min, mean and sample standard deviation (ddof=1) of several FIDs."""
    fids = np.asarray(fids, dtype=np.float64)
    std = float(fids.std(ddof=1)) if fids.size > 1 else 0.0
    return float(fids.min()), float(fids.mean()), std

def rate(num, start):
    """'N images in T s (R img/s)' since `start` (time.perf_counter()); the stats end in a host copy,
    so the device has finished by the time this is called."""
    elapsed = time.perf_counter() - start
    return f'{num} images in {elapsed:.1f} s ({num / max(elapsed, 1e-9):.0f} img/s)'

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

MAX_SEEDS = 10_000_000  # as generate.py: a typo like 0-999999999 would exhaust memory before anything runs

def parse_seeds(s):
    try:
        return dnnlib.util.parse_int_list(s, minimum=0, max_items=MAX_SEEDS, too_many='; split the job into several seed ranges')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

steps_option = click.option('--steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
def compile_options(fn):
    fn = click.option('--compile-mode', 'compile_mode', help='torch.compile mode; reduce-overhead and max-autotune use CUDA graphs  [default: default]',
        type=click.Choice(COMPILE_MODES))(fn)
    return click.option('--compile', 'compile_net', help='torch.compile the network while sampling (one batch shape)', is_flag=True)(fn)

def resolve_compile(compile_net, compile_mode):
    try:
        return resolve_compile_mode(compile_net, compile_mode)
    except ValueError as err:
        raise click.UsageError(str(err)) from None

precision_option = click.option('--precision', help='Network precision while sampling (the detector is unaffected)',
    type=click.Choice(list(precision_lib.PRECISIONS)), default='fp32', show_default=True)

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID).

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of 50000 generated images, on 8 GPUs
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    \b
    # The same straight from the network, without writing PNGs
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=net.pt --seeds=0-49999 --ref=fid-refs/cifar10-32x32.npz
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
        start = time.perf_counter()
        mu, sigma = compute_stats(dataset, det, batch=batch, workers=workers)
        dist.print0(f'Features of {rate(len(dataset), start)}')
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
        start = time.perf_counter()
        fid = calc_fid(dataset, ref_stats, det, batch=batch, workers=workers)
        dist.print0(f'Features of {rate(len(dataset), start)}')
        dist.print0(f"FID {fid:g} from {len(dataset)} images in '{images}' against '{ref_path}'")
    _run(run)

@main.command()
@click.option('--network', help='Network snapshot (ours or a reference .pkl)', metavar='PT|PKL|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 0-49999)', metavar='LIST', type=parse_seeds, default='0-49999', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--solver', help='Sampler, as in generate.py', type=click.Choice(['edm', 'dpm', 'euler', 'heun']), default='edm', show_default=True)
@steps_option
@precision_option
@click.option('--outdir', help='Also save the PNGs here (as generate.py --subdirs)', metavar='DIR', type=str)
@batch_option
@detector_option
@compile_options
def gen(network, ref_path, seeds, class_idx, solver, steps, precision, outdir, batch, detector, compile_net, compile_mode):
    """FID of images generated on the fly (no PNGs unless --outdir).

    The images are those generate.py would save for the same seeds and sampler options, so the
    FID equals that of "generate.py" followed by "fid.py calc" (in one process bit for bit when both use the same
    --batch, else up to float64 rounding of the sums).
    """
    compile_mode = resolve_compile(compile_net, compile_mode)

    def run():
        if len(seeds) < 2:
            raise FIDError(f'--seeds gives {len(seeds)} image; a covariance needs at least 2, e.g. --seeds=0-49999')
        ref_stats = load_stats(ref_path)
        det = open_detector(detector)
        check_dims(det, ref_stats[0], ref_path)
        if outdir is not None:
            make_outdir(outdir)
        net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, class_idx, compile_mode,
            solver=solver, num_steps=steps)
        dist.print0(f"Generating {len(seeds)} images and their features with '{det.name}'...")
        start = time.perf_counter()
        mu, sigma = generated_stats(net, sampler_name, sampler_kwargs, seeds, det, batch=batch, class_idx=class_idx,
            precision=precision, outdir=outdir, fixed_shape=compile_mode is not None)
        dist.print0(f'Generated and scored {rate(len(seeds), start)}')
        fid = frechet_distance(mu, sigma, *ref_stats)
        dist.print0(f"FID {fid:g} from {len(seeds)} images generated by '{network}' against '{ref_path}'")
    _run(run)

@main.command()
@click.option('--images', help='The three image folders (seeds 0-49999, 50000-99999, 100000-149999)',
    metavar='DIR DIR DIR', type=str, nargs=3, default=None)
@click.option('--network', help='Or: generate the three seed ranges from this network', metavar='PT|PKL|URL', type=str)
@click.option('--outdir', help='With --network: also save the three image folders here', metavar='DIR', type=str)
@click.option('--solver', help='With --network: sampler', type=click.Choice(['edm', 'dpm']), default='edm', show_default=True)
@click.option('--steps', help='With --network: sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@precision_option
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images per folder', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed of the image subsets', metavar='INT', type=int, default=0, show_default=True)
@batch_option
@workers_option
@detector_option
@compile_options
def protocol(images, network, outdir, solver, steps, precision, ref_path, num, seed, batch, workers, detector, compile_net,
        compile_mode):
    """FID of one network over three seed ranges: min, mean and std.

    Either pass --network: the seed ranges 0..num-1, num..2num-1, 2num..3num-1 (with --num=50000
    the usual 0-49999, 50000-99999, 100000-149999) are generated and scored in memory, and with
    --outdir also saved to OUTDIR/seeds-A-B; or generate the three folders with generate.py and
    pass them as --images.
    """
    if (images is None) == (network is None) or (outdir is not None and network is None):
        raise click.UsageError('give either --images DIR DIR DIR, or --network (and optionally --outdir)')
    compile_mode = resolve_compile(compile_net, compile_mode)
    if compile_mode is not None and network is None:
        raise click.UsageError('--compile applies only with --network (it compiles the sampling network)')

    def run():
        ref_stats = load_stats(ref_path)
        if network is not None:
            det = open_detector(detector)
            check_dims(det, ref_stats[0], ref_path)
            if outdir is not None:
                make_outdir(outdir)
            net, sampler_name, sampler_kwargs = open_generator(network, det.device, precision, compile_mode=compile_mode,
                solver=solver, num_steps=steps)
            ranges = [range(k * num, (k + 1) * num) for k in range(3)]
            names = [f'seeds-{seeds[0]}-{seeds[-1]}' for seeds in ranges]
            folders = [os.path.join(outdir, name) if outdir is not None else None for name in names]
            fids = []
            for seeds, name, folder in zip(ranges, names, folders):
                mu, sigma = generated_stats(net, sampler_name, sampler_kwargs, seeds, det, batch=batch,
                    precision=precision, outdir=folder, fixed_shape=compile_mode is not None)
                fids.append(frechet_distance(mu, sigma, *ref_stats))
                dist.print0(f"FID {fids[-1]:g} from {num} images " + (f"in '{folder}'" if folder else f"of {name}"))
        else:
            datasets = [open_images(path, num=num, seed=seed) for path in images]
            det = open_detector(detector)
            check_dims(det, ref_stats[0], ref_path)
            fids = []
            for path, dataset in zip(images, datasets):
                fids.append(calc_fid(dataset, ref_stats, det, batch=batch, workers=workers))
                dist.print0(f"FID {fids[-1]:g} from {len(dataset)} images in '{path}'")
        lo, mean, std = summarize(fids)
        dist.print0(f"FID min {lo:g}  mean {mean:g}  std {std:g}  over {len(fids)} seed ranges against '{ref_path}'")
    _run(run)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
