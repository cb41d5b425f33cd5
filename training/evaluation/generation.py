"""Generating images with a trained denoiser: generate.py's work as functions, shared with fid.py
(which scores the images in memory) and the snapshot grids of the training loop.

Each image depends only on its seed and the network: per-seed random generators make it the same
whatever the batching or the number of processes (in exact arithmetic; a CPU's float kernels may
differ in the last bits between batch shapes). Seeds are split among torchrun's ranks as the
reference splits them.

An output folder holds the images of one run: generate_options.json, written before any image,
records what decides them, and a rerun of the same command makes only the seeds whose PNGs are
missing, in the batches of an uninterrupted run. A folder of other images is refused.
"""

import concurrent.futures
import copy
import json
import math
import os
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from fdm.io.network_files import CheckpointError, load_network
from fdm.schedules import SIGMA_MAX, SIGMA_MIN
from fdm.samplers import SAMPLERS, PerSeedGenerator, sampler_nfe, sampler_settings, sampler_sigma_range
from torch_utils import distributed, precision as precision_lib
from torch_utils.cli.compile_modes import resolve_compile_mode
from torch_utils.errors import EvaluationError, describe_exception
from torch_utils.io.files import atomic_write, check_destination, jsonable, nested_digest, open_regular, write_json
from torch_utils.cli.options import Range, check_options
from torch_utils.io.download import download_cached, file_sha256, is_url
from training.data.dataset import is_image_name

#----------------------------------------------------------------------------
# --seeds of generate.py and fid.py: '1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10].

MAX_SEEDS = 10_000_000  # a typo like 0-999999999 would otherwise exhaust memory before anything runs

def parse_seeds(s):
    """Non-negative integers, at most MAX_SEEDS of them; a click option type (BadParameter otherwise)."""
    try:
        return dnnlib.util.parse_int_list(s, minimum=0, max_items=MAX_SEEDS, too_many='; split the job into several seed ranges')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

#----------------------------------------------------------------------------
# Which sampler the options select, and its keyword arguments.
# --solver dpm: DPM-Solver++; --solver euler|heun or any of --disc/--schedule/--scaling:
# EDM's ablation sampler; otherwise (--solver edm or nothing) EDM's Heun sampler.

# The defaults of the common options are edm_sampler's (the reference's signature): 18 steps,
# rho 7, no churn. The sigma range stays None here: its default depends on the sampler and the
# ablation's time steps (fdm.schedules.default_sigma_range).
SAMPLER_DEFAULTS = {name: value for name, value in sampler_settings('edm').items()
    if name in ('num_steps', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')}

# The valid range of each sampler option, checked here and by the click types of generate.py,
# fid.py and the tables (training/tools/tables.py). Steps: at most MAX_STEPS, ten times the 1000
# of DDPM's ancestral sampler and more than any convergence study of EDM or FDM uses; --steps=1e10
# allocated all the memory for its time steps. sigma: the noise levels the networks know end at
# 80 (EDM), 100 (VE), 152 (VP) and ~2e4 (iDDPM's u_0), and DPM-Solver++ does not clamp to the
# network's range, so 1e-6..1e5 is generous;
# sigma_max=1e30 gave black images. rho: sigma^(1/rho) must stay finite in float64.
# S_max=inf means no upper limit on the noise levels that get churn.
MAX_STEPS = 10_000

SAMPLER_RANGES = dict(
    num_steps=Range(min=1, max=MAX_STEPS, integer=True), sigma_min=Range(min=1e-6, max=1e5), sigma_max=Range(min=1e-6, max=1e5),
    rho=Range(min=0.1, max=1000), S_churn=Range(min=0), S_min=Range(min=0), S_max=Range(min=0, allow_inf=True),
    S_noise=Range(min=0, max=10), dpm_order=Range(min=1, max=3, integer=True), class_idx=Range(min=0, integer=True),
    max_batch_size=Range(min=1, integer=True))

# The choices of each named sampler option (generate.py's and fid.py's click choices too). The
# samplers themselves take these values as given.
SAMPLER_CHOICES = dict(solver=('edm', 'dpm', 'euler', 'heun'), disc=('vp', 've', 'iddpm', 'edm'),
    schedule=('vp', 've', 'linear'), scaling=('vp', 'none'), dpm_method=('singlestep', 'multistep'),
    dpm_skip=('logSNR', 'time_uniform', 'time_quadratic'))

def select_sampler(solver=None, disc=None, schedule=None, scaling=None, dpm_order=None, dpm_method=None,
        dpm_skip=None, num_steps=None, sigma_min=None, sigma_max=None, rho=None, S_churn=None, S_min=None,
        S_max=None, S_noise=None):
    """-> (sampler name in SAMPLERS, its kwargs, list of options it ignores). None: the default
    (SAMPLER_DEFAULTS, or the sampler's sigma range)."""
    check_options(SAMPLER_RANGES, locals())
    for name, choices in SAMPLER_CHOICES.items():
        if locals()[name] not in (None, *choices):
            raise EvaluationError(f"unknown --{name.replace('_', '-')} {locals()[name]!r}; expected one of {', '.join(choices)}")
    given = dict(num_steps=num_steps, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    num_steps, rho, S_churn, S_min, S_max, S_noise = (SAMPLER_DEFAULTS[k] if v is None else v for k, v in given.items())
    range_kwargs = {k: v for k, v in dict(sigma_min=sigma_min, sigma_max=sigma_max).items() if v is not None}
    common = dict(num_steps=num_steps, **range_kwargs, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    ablation = {k: v for k, v in dict(discretization=disc, schedule=schedule, scaling=scaling).items() if v is not None}
    dpm = {k: v for k, v in dict(order=dpm_order, method=dpm_method, skip_type=dpm_skip).items() if v is not None}

    if solver == 'dpm':
        if ablation:
            raise EvaluationError('--disc/--schedule/--scaling select the EDM ablation sampler and do not combine with '
                '--solver dpm; drop them, or use --solver euler or heun')
        edm_only = dict(rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
        ignored = [f'--{k}' for k, v in edm_only.items() if v != SAMPLER_DEFAULTS[k]]
        lo, hi = (SIGMA_MIN if sigma_min is None else sigma_min), (SIGMA_MAX if sigma_max is None else sigma_max)
        if not lo < hi:
            raise EvaluationError(f'--solver dpm needs sigma_min < sigma_max, got {lo:g} and {hi:g}; '
                'change --sigma_min or --sigma_max')
        return 'dpm', dict(num_steps=num_steps, **range_kwargs, **dpm), ignored
    if dpm:
        raise EvaluationError('--dpm-order/--dpm-method/--dpm-skip apply only to --solver dpm')
    if solver in ('euler', 'heun') or ablation:
        if solver == 'edm':
            raise EvaluationError('--disc/--schedule/--scaling select the EDM ablation sampler; use them with '
                '--solver euler or heun (or without --solver), not --solver edm')
        return 'ablation', dict(common, solver=solver or 'heun', **ablation), []
    return 'edm', common, []

#----------------------------------------------------------------------------
# Batches as the reference splits them: ceil(n / (batch W)) W near-equal parts of the seed
# list, and rank r takes parts r, r + W, ... (some may be empty).

def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    num_batches = math.ceil(len(seeds) / (max_batch_size * world_size)) * world_size
    parts = torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)
    return [part.tolist() for part in parts[rank::world_size]]

#----------------------------------------------------------------------------
# Image files: the one quantisation, grid tiler and PNG writer of generate.py, fid.py and the
# training loop's snapshot grids.

def image_path(outdir, seed, subdirs=False):
    """outdir/[{seed - seed % 1000:06d}/]{seed:06d}.png"""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')

# Float images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], as the reference rounds them.
def to_uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_png(array, path):
    """uint8 [H, W, C] -> PNG; one channel is saved as grayscale (mode L). Not fsynced: a PNG lost
    to a power cut is made again from its seed, and the rename still hides half-written files."""
    array = np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda f: PIL.Image.fromarray(array).save(f, format='PNG'), durable=False)

GRID_MIN_WIDTH = 512  # grids of 16x16 or 32x32 samples are upscaled to at least this width to be judged by eye
GRID_GAP = 1  # native pixels of background between cells: without them, columns of similar images read as stripes
GRID_BACKGROUND = 255  # white: visible against the dark backgrounds of digits and most photographs

def make_grid(images, gw=None, min_width=0):
    """uint8 images [N, H, W, C] -> one grid [k (gh (H + GRID_GAP) - GRID_GAP), k (gw (W + GRID_GAP) - GRID_GAP), C],
    row by row on a GRID_BACKGROUND sheet (empty cells stay blank); gw columns (default: a roughly square
    grid, ceil(sqrt(N))); k: the smallest whole factor, nearest-neighbour, that makes it at least
    min_width wide (k = 1 keeps the native size). Pixels are only repeated."""
    n, h, w, c = images.shape
    gw = gw or math.ceil(math.sqrt(n))
    gh = math.ceil(n / gw)
    sy, sx = h + GRID_GAP, w + GRID_GAP  # one cell and the gap after it
    grid = np.full([gh * sy - GRID_GAP, gw * sx - GRID_GAP, c], GRID_BACKGROUND, dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = divmod(i, gw)
        grid[y * sy:y * sy + h, x * sx:x * sx + w] = image
    k = max(1, math.ceil(min_width / grid.shape[1]))
    return grid.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else grid

def save_images(images, batch_seeds, outdir, subdirs):
    """uint8 images [N, H, W, C] -> one PNG per seed."""
    for seed, image in zip(batch_seeds, images):
        path = image_path(outdir, seed, subdirs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(image, path)

def _read_png(path):
    with open_regular(path, 'generate the images again', error=EvaluationError) as f:
        return np.asarray(PIL.Image.open(f))

# Read the saved images back (any rank may have written them) and tile them into one PNG.
def save_grid(outdir, seeds, subdirs, path, min_width=GRID_MIN_WIDTH):
    images = np.stack([_read_png(image_path(outdir, s, subdirs)) for s in seeds])
    images = images[..., None] if images.ndim == 3 else images  # grayscale -> [N, H, W, 1]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(make_grid(images, min_width=min_width), path)

#----------------------------------------------------------------------------
# Latents, labels and the per-step noise for one batch, in the reference's order: each
# seed's generator draws its latents [C, H, W], then (conditional nets) its class index,
# then the sampler's noise. --class overrides the label but the index is still drawn.
# pad_to: sample that many images (copies of the last seed fill the batch) and return the
# first len(batch_seeds), so that a compiled network always sees one batch shape. Per-seed
# generators keep the returned images independent of the padding (up to the CPU kernels'
# rounding, which may depend on the batch shape).

@torch.no_grad()
def generate_batch(net, sampler_name, sampler_kwargs, batch_seeds, device, class_idx=None, precision='fp32',
        pad_to=None):
    batch_seeds = list(batch_seeds)
    seeds = batch_seeds + batch_seeds[-1:] * ((pad_to or 0) - len(batch_seeds))
    rnd = PerSeedGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        index = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        class_labels = torch.eye(net.label_dim, device=device)[index]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    sampler = SAMPLERS[sampler_name]
    # Autocast touches only the network's matmuls/convolutions; the sampler state stays float64.
    with precision_lib.autocast(precision, device):
        images = sampler(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return images[:len(batch_seeds)]

#----------------------------------------------------------------------------
# Speed: torch.compile of the network, the automatic batch size.

def compile_net(net, mode='default'):
    """The denoiser with its U-Net F (net.model) compiled for fixed shapes. The preconditioner
    around F (a few scalar operations per call) stays eager. A shallow copy: the parameters are
    shared, and `net` itself is left uncompiled."""
    compiled = copy.copy(net)
    compiled._modules = dict(net._modules)  # copy.copy shares this table; assigning .model would edit net's
    # F's output needs no clone under CUDA graphs (which overwrite it on the next replay):
    # the preconditioner turns it into a new tensor, c_skip x + c_out F, before the next call.
    compiled.model = torch.compile(net.model, mode=mode, dynamic=False)
    return compiled

def auto_batch_size(device, img_resolution):
    """--batch default: 64 on a CPU (the reference's); on a GPU, 512 images of 32x32 or the
    same number of pixels at higher resolutions, at least 64."""
    if torch.device(device).type != 'cuda':
        return 64
    return max(64, 512 * 32 ** 2 // img_resolution ** 2)

def _out_of_memory(err):
    # torch.compile may wrap the CUDA error in its own exception; look along the chain.
    while err is not None:
        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
        err = err.__cause__ or err.__context__
    return False

#----------------------------------------------------------------------------
# Load the denoiser, rank 0 first (it may download into the cache that the others then read).

def load_net(network, device, log=print):
    """-> (net, name). `network` is a path, a URL, or an already loaded denoiser."""
    if isinstance(network, torch.nn.Module):
        return network.eval().requires_grad_(False).to(device), type(network).__name__
    name = str(network)
    if not is_url(name) and not name.startswith('file://') and not os.path.isfile(name):
        raise EvaluationError(f'--network {name}: no such file; give a network snapshot (.pt/.pkl) or a URL')
    with distributed.rank0_first():
        log(f'Loading network from "{name}"...')
        try:
            net = load_network(name, device)
        except (CheckpointError, OSError) as err:
            raise EvaluationError(f'--network: {err}') from None
    return net, name

# Everything that decides the images, as written to generate_options.json.
def describe_run(net, network_name, sampler_name, sampler_kwargs, ignored, seeds, class_idx, **extra):
    try:
        sigma_min, sigma_max = (float(v) for v in sampler_sigma_range(sampler_name, net, **sampler_kwargs))
        nfe = sampler_nfe(sampler_name, **sampler_kwargs)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if not 0 < sigma_min < sigma_max:
        raise EvaluationError(f'the noise range is empty: sigma {sigma_min:g}..{sigma_max:g} (after clamping to '
            f'the network\'s {net.sigma_min:g}..{net.sigma_max:g}); give --sigma_min below --sigma_max')
    return jsonable(dict(
        network=network_name,
        solver=sampler_kwargs['solver'] if sampler_name == 'ablation' else sampler_name,
        sampler=sampler_name, sampler_function=SAMPLERS[sampler_name].__name__,
        sampler_kwargs=sampler_settings(sampler_name, **sampler_kwargs), ignored_options=ignored,
        num_steps=sampler_kwargs['num_steps'], nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max,
        num_seeds=len(seeds), seeds=dnnlib.util.format_int_list(seeds), class_idx=class_idx, label_dim=net.label_dim,
        img_resolution=net.img_resolution, img_channels=net.img_channels, **extra, torch_version=torch.__version__))

#----------------------------------------------------------------------------
# The output folder: what made its images (generate_options.json, written before the first image)
# and which seeds it already holds. Rank 0 decides and tells the others (distributed.on_rank0), so that all
# ranks make the same seeds even if they see the folder differently.

OPTIONS_FILE = 'generate_options.json'

# What decides the images, as generate_options.json records it, and how a refusal names each. Left
# out: what changes at most the float rounding of a few pixels (--batch, the number of processes,
# --compile, the torch version) and what changes no image (--grid, the network's path or URL).
# The device type counts: CUDA and CPU generators draw different noise for the same seed.
IMAGE_IDENTITY = dict(network_sha256='another network', solver='another sampler', sampler_kwargs='other sampler settings',
    seeds='other seeds', class_idx='another class', subdirs='another layout', precision='another precision',
    device='another device type')

def network_digest(network):
    """SHA-256 of the network file (of a URL's download in the cache); for a network passed as an
    object, of its class name and parameters."""
    if isinstance(network, torch.nn.Module):
        return nested_digest(dict(cls=type(network).__name__, state=dict(network.state_dict())))
    return file_sha256(download_cached(str(network), verbose=False))

def _shown(key, value):
    if key == 'network_sha256' and isinstance(value, str):
        return value[:12]
    if key == 'class_idx':
        return 'random' if value is None else value
    if key == 'subdirs':
        return '--subdirs' if value else 'no --subdirs'
    return value

def _differences(recorded, settings):
    """How the images a folder records differ from those of `settings`, one phrase per setting."""
    found = []
    for key, what in IMAGE_IDENTITY.items():
        old, new = recorded.get(key), json.loads(json.dumps(jsonable(settings[key])))
        if old == new or (key == 'sampler_kwargs' and recorded.get('solver') != settings['solver']):
            continue  # another sampler has other settings: naming the sampler says it
        if key == 'sampler_kwargs' and isinstance(old, dict):
            detail = '; '.join(f'{k} {old.get(k)}, this run {new.get(k)}' for k in sorted(set(old) | set(new), key=str)
                if old.get(k) != new.get(k))
        elif key == 'network_sha256':
            detail = f'sha256 {_shown(key, old)}.., this run {_shown(key, new)}..'
        else:
            detail = f'{_shown(key, old)}, this run {_shown(key, new)}'
        found.append(f'{what} ({detail})')
    return found

def _holds_images(folder):
    return any(is_image_name(name) for _root, _dirs, files in os.walk(folder) for name in files)

def check_outdir(outdir, settings, what='--outdir'):
    """Whether `outdir` may receive the images `settings` describe (describe_run's dict): True if it is
    new or holds neither images nor generate_options.json (the file is then to be written), False if
    its generate_options.json records the same images. Otherwise one EvaluationError naming what differs."""
    remedy = f'choose another {what} or delete it'
    path = os.path.join(outdir, OPTIONS_FILE)
    if not os.path.lexists(path):
        if os.path.isdir(outdir) and _holds_images(outdir):
            raise EvaluationError(f"{what} '{outdir}' holds images but no {OPTIONS_FILE}, so what made them is unknown; {remedy}")
        return True
    try:
        with open_regular(path, remedy, error=EvaluationError) as f:
            recorded = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{what} '{outdir}': its {OPTIONS_FILE} cannot be read ({describe_exception(err)}); {remedy}") from None
    if not isinstance(recorded, dict) or 'network_sha256' not in recorded:
        raise EvaluationError(f"{what} '{outdir}' holds a {OPTIONS_FILE} without the network's digest (from an older "
            f"version), so its images cannot be matched to this run; {remedy}")
    differences = _differences(recorded, settings)
    if differences:
        held = 'images' if _holds_images(outdir) else f'the {OPTIONS_FILE}'
        if [d.split(' (')[0] for d in differences] == [IMAGE_IDENTITY['seeds']]:
            remedy = f"rerun with --seeds={recorded['seeds']} to complete it, or {remedy}"
        raise EvaluationError(f"{what} '{outdir}' holds {held} of {' and '.join(differences)}; {remedy}")
    return False

def claim_outdir(outdir, settings, what='--outdir'):
    """check_outdir, then make the folder and its generate_options.json (a folder of the same images
    keeps the file of the run that began it)."""
    if check_outdir(outdir, settings, what):
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as err:
            raise EvaluationError(f'cannot write to {what} {outdir} ({err.strerror}); choose a writable folder') from None
        write_json(os.path.join(outdir, OPTIONS_FILE), settings)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the empty IEND chunk and its CRC: the last 12 bytes of every PNG

def _is_whole_png(path):
    # The writer renames only complete files, but PNGs are not fsynced: after a power cut a file
    # may be empty or cut short. Either fails this test and is made again.
    try:
        with open_regular(path, 'it is made again', error=EvaluationError) as f:  # a FIFO is not a PNG
            head = f.read(len(PNG_SIGNATURE))
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except (OSError, EvaluationError):
        return False

def saved_seeds(outdir, seeds, subdirs):
    """bool [len(seeds)]: whose PNG the folder already holds, whole. Each folder is listed once."""
    listings = {}
    done = np.zeros(len(seeds), dtype=bool)
    for i, seed in enumerate(seeds):
        path = image_path(outdir, seed, subdirs)
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        done[i] = name in listings[folder] and _is_whole_png(path)
    return done

# This rank's batches, those of an uninterrupted run (the same shapes, hence the same arithmetic and
# images), each with the seeds still missing; and the images still missing at each step over all
# ranks, for a progress bar that counts everyone's images. Batches are split by position in the
# seed list, so a seed listed twice is handled as two images, as before.
def resume_plan(seeds, done, max_batch_size, rank=0, world_size=1):
    positions = list(range(len(seeds)))
    parts = [rank_batches(positions, max_batch_size, r, world_size) for r in range(world_size)]  # every rank's share
    plan = [([seeds[i] for i in part], [seeds[i] for i in part if not done[i]]) for part in parts[rank]]
    per_step = [sum(len(part) - int(done[part].sum()) for part in step) for step in zip(*parts)]  # ranks share a length
    return plan, per_step

#----------------------------------------------------------------------------
# The sampling loop of one rank. A thread writes one batch's PNGs while the device samples the
# next (the main thread waits in to_uint8's copy, which releases the GIL).

# plan, per_step: resume_plan's; run: what generate() resolved (device, class_idx, precision, pad_to,
# max_batch_size, compile_mode, log). The bar (rank 0) counts the images of all ranks.
def _sample_to_pngs(net, sampler_name, sampler_kwargs, plan, per_step, outdir, subdirs, run, progress):
    device, class_idx, precision, pad_to = run.device, run.class_idx, run.precision, run.pad_to
    max_batch_size, compile_mode, log = run.max_batch_size, run.compile_mode, run.log
    bar = tqdm.tqdm(total=sum(per_step), unit='img', disable=not progress)
    with bar, concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        written, first = None, True
        for (batch_seeds, todo), step_images in zip(plan, per_step):
            if todo:
                start = time.perf_counter()
                try:
                    images = to_uint8(generate_batch(net, sampler_name, sampler_kwargs, batch_seeds, device, class_idx,
                        precision, pad_to=pad_to))
                except RuntimeError as err:
                    if _out_of_memory(err):
                        raise EvaluationError(f'out of memory on {device} at --batch {max_batch_size}; lower --batch '
                            f'(e.g. --batch {max(max_batch_size // 2, 1)})') from None
                    if compile_mode and isinstance(err, torch._dynamo.exc.BackendCompilerFailed):
                        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        raise EvaluationError(f'--compile failed ({first_line}); run without --compile') from None
                    raise
                if first and compile_mode:
                    log(f'First batch, including compilation: {time.perf_counter() - start:.1f} s')
                first = False
                if written is not None:
                    written.result()  # a write error surfaces here; at most one batch waits in memory
                missing = set(todo)
                keep = [i for i, seed in enumerate(batch_seeds) if seed in missing]  # saved PNGs stay as they are
                written = writer.submit(save_images, images[keep], [batch_seeds[i] for i in keep], outdir, subdirs)
            bar.update(step_images)
        if written is not None:
            written.result()

#----------------------------------------------------------------------------
# The whole of generate.py as a function (tests call it). Returns this run's settings, those that
# outdir/generate_options.json records (a resumed folder keeps the file of the run that began it).

def generate(network, outdir, seeds=range(64), subdirs=False, class_idx=None, max_batch_size=None, device=None,
        grid=None, precision='fp32', verbose=True, compile=False, compile_mode=None, grid_width=GRID_MIN_WIDTH,
        **sampler_options):
    seeds = list(seeds)
    if not seeds:
        raise EvaluationError('--seeds is empty; give seeds like 0-63')
    check_options(SAMPLER_RANGES, dict(class_idx=class_idx, max_batch_size=max_batch_size))
    try:
        compile_mode = resolve_compile_mode(compile, compile_mode)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if grid is not None and os.path.commonpath([os.path.abspath(grid), os.path.abspath(outdir)]) == os.path.abspath(outdir):
        raise EvaluationError(f'--grid {grid} lies inside --outdir, where fid.py would count it as a sample; '
            'put the grid somewhere else')
    check_destination(outdir, '--outdir', folder=True)  # before the network is read: a bad path costs nothing
    if grid is not None:
        check_destination(grid, '--grid')
    sampler_name, sampler_kwargs, ignored = select_sampler(**sampler_options)
    device = distributed.device(device)
    precision_lib.configure(precision, device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    log = (lambda *args: print(*args, flush=True)) if (verbose and rank == 0) else (lambda *args: None)

    net, network_name = load_net(network, device, log)
    if class_idx is not None and not net.label_dim:
        raise EvaluationError(f'--class {class_idx} given, but the network is unconditional (label_dim 0); drop --class')
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise EvaluationError(f'--class {class_idx} is out of range; this network has classes 0..{net.label_dim - 1}')
    if ignored:
        log(f'Warning: {", ".join(ignored)} do not apply to --solver dpm and are ignored')
    batch_auto = max_batch_size is None
    if batch_auto:
        max_batch_size = auto_batch_size(device, net.img_resolution)
    # Rank 0 digests the network, checks or claims the folder and lists the seeds it holds.
    def claim():
        settings = describe_run(net, network_name, sampler_name, sampler_kwargs, ignored, seeds, class_idx,
            network_sha256=network_digest(network), max_batch_size=max_batch_size, batch_auto=batch_auto,
            world_size=world_size, subdirs=subdirs, grid=grid, device=device.type, precision=precision,
            compile=compile_mode is not None, compile_mode=compile_mode)
        claim_outdir(outdir, settings)
        return settings, saved_seeds(outdir, seeds, subdirs)
    settings, done = distributed.on_rank0(claim)
    log(f'Sampler: {settings["solver"]} ({settings["sampler_function"]}), {settings["num_steps"]} steps, '
        f'{settings["nfe"]} network evaluations per image, sigma {settings["sigma_min"]:g}..{settings["sigma_max"]:g}')
    if done.all():
        log(f'All {len(seeds)} images are already in "{outdir}"')
    elif done.any():
        log(f'{int(done.sum())} of {len(seeds)} images are already in "{outdir}"; generating the other {int((~done).sum())}...')
    else:
        log(f'Generating {len(seeds)} images to "{outdir}"...')

    # Every batch goes through the same sampler (the FDM reference used DPM only for the first).
    # The batches are those of an uninterrupted run; those whose seeds are all saved are skipped.
    # Compiled, every batch is padded to this rank's largest one: one shape, one compilation.
    plan, per_step = resume_plan(seeds, done, max_batch_size, rank, world_size)
    pad_to = max((len(b) for b, _todo in plan), default=0) if compile_mode else None
    if compile_mode and not done.all():
        net = compile_net(net, compile_mode)
        log(f'Compiling the network (torch.compile mode {compile_mode}, batch {pad_to}) on the first batch...')
    run = dnnlib.EasyDict(device=device, class_idx=class_idx, precision=precision, pad_to=pad_to,
        max_batch_size=max_batch_size, compile_mode=compile_mode, log=log)
    _sample_to_pngs(net, sampler_name, sampler_kwargs, plan, per_step, outdir, subdirs, run,
        progress=(rank == 0 and verbose))

    distributed.barrier()
    if grid is not None and rank == 0:
        save_grid(outdir, seeds, subdirs, grid, min_width=grid_width)
        log(f'Grid of {len(seeds)} images saved to "{grid}"')
    log('Done.')
    return settings

#----------------------------------------------------------------------------
