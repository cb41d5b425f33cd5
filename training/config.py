"""From train.py options to the arguments of `training_loop`: a plain function tests can call.

The presets reproduce the reference train.py (EDM, and FDM's additions): the same options,
defaults and derived values, so the paper's commands mean what they meant there. Every option
is checked here, once, before anything starts; the dataset and the resume state are read
here, once, and handed to the training loop.
"""

import dataclasses
import json
import os
import re
import secrets
import warnings
import zipfile
import zlib

import torch

import dnnlib
from fdm.loss import MAX_WARMUP_ITE
from fdm.methods import METHOD_SPECIFIC_OPTIONS, METHODS, method_kwargs
from torch_utils import distributed
from torch_utils.cli.compile_modes import resolve_compile_mode
from torch_utils.errors import FileError, OptionError
from torch_utils.io.files import read_json_bounded
from torch_utils.cli.options import Range, check_options
from training.data.dataset import ImageFolderDataset
from fdm.networks import ARCH_PRESETS
from fdm.io.network_files import LIST_LENGTHS, NETWORK_RANGES, resolution_problem, structure_problem
from fdm.preconditioning import precond_class
from training.phema import gamma_from_std
from training.checkpoint.starting_point import check_resume_seed, read_transfer
from training.checkpoint.names import STATE_NAME, list_files
from training.checkpoint.training_state import find_resume_state

MAX_DEFAULT_WORKERS = 8  # --workers when not given: this many, at most the CPU count
MAX_LIST_ITEMS = LIST_LENGTHS['channel_mult'][1]  # --cres: one multiplier per resolution, as a network file may state
MAX_METRIC_IMAGES = 100_000  # --metric-images: twice the paper's 50,000; more is a typo

# The valid range of every numeric option of train.py; train.py's click types and
# setup_training_config check the same ranges. Learning rates above 1 only ever diverge with Adam.
# The options that set a network's constructor arguments take the range a network file's value
# must have (fdm/io/network_files.py), so that every trained snapshot loads.
TRAIN_RANGES = dict(
    duration=Range(min=0, min_open=True), batch=Range(min=1, integer=True), batch_gpu=Range(min=1, integer=True),
    cbase=NETWORK_RANGES['model_channels'], lr=Range(min=0, max=1, min_open=True), ema=Range(min=0),
    dropout=NETWORK_RANGES['dropout'], augment=Range(min=0, max=1), lr_rampup=Range(min=0, max=1000),
    warmup_ite=Range(min=0, max=MAX_WARMUP_ITE, min_open=True), fdm_multiplier=NETWORK_RANGES['fdm_multiplier'],
    ls=Range(min=0, min_open=True),
    workers=Range(min=0, integer=True), tick=Range(min=0, min_open=True), snap=Range(min=1, integer=True),
    dump=Range(min=1, integer=True), grid_images=Range(min=0, integer=True),
    metric_images=Range(min=2, max=MAX_METRIC_IMAGES, integer=True),
    seed=Range(min=0, max=2**31 - 1, integer=True), timeout=Range(min=1, integer=True))

# The reference's augmentation for --augment=p: every ADA transform but colour, x-flips always.
AUGMENT_TRANSFORMS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

#----------------------------------------------------------------------------

def check_network_structure(network_kwargs, dataset, arch, cbase):
    """The U-Net of these options, built on the meta device and checked as a network file's is:
    --cbase=130 builds, and would fail in the first step."""
    kwargs = {k: v for k, v in network_kwargs.items() if k != 'class_name'}
    try:
        with warnings.catch_warnings(), torch.device('meta'):  # no memory; the options' warnings come from the loop's build
            warnings.simplefilter('ignore')
            model = precond_class(network_kwargs.class_name).build_model(img_resolution=dataset.resolution,
                img_channels=dataset.num_channels, label_dim=dataset.label_dim, **kwargs)
    except Exception as err:  # options within their ranges that still make no network
        raise OptionError(f'--arch={arch} with these options cannot be built ({err}); choose a smaller --cbase or --cres') from None
    problem = structure_problem(model)
    if problem is not None:
        width = f'--cbase={cbase}' if cbase is not None else 'its channel count'
        presets = ', '.join(f'{name} {preset["model_channels"]}' for name, preset in ARCH_PRESETS.items())
        raise OptionError(f'--arch={arch} with {width} gives a U-Net that cannot run: {problem}; choose a --cbase '
            f'that is a multiple of 64 (the presets: {presets})')

def setup_training_config(data=None, outdir='training-runs', cond=False, arch='ddpmpp', precond='fdm_edm', duration=200.0,
        batch=512, batch_gpu=None, cbase=None, cres=None, lr=10e-4, ema=0.5, dropout=0.13, augment=0.12, xflip=False,
        fp16=False, ls=1.0, bench=True, cache=True, workers=None, desc=None, nosubdir=False, tick=50.0, snap=200, dump=500,
        seed=None, transfer=None, resume=None, lr_rampup=10.0, warmup_ite=None, fdm_multiplier=2.0,
        grid_images=64, precision='fp32', compile=False, compile_mode=None, channels_last=False, data_on_device='auto',
        phema_std=None, tensorboard=False, metrics=None, metric_ref=None, metric_images=50000, world_size=1, explicit=()):
    """train.py's options, with their defaults (the one home of each), to the training config.
    Returns (config for training_loop, run). run: outdir, desc and nosubdir of the run directory,
    and `start`, what the run starts from (read once, here). `explicit`: the options the user set."""
    check_options(TRAIN_RANGES, locals())
    if data is None:
        raise OptionError('--data is missing; give the dataset zip or folder (or --resume=RUN to continue a run)')
    c = dnnlib.EasyDict()

    # Dataset: opened here so that a bad path or format fails before anything starts.
    c.dataset_kwargs = dnnlib.EasyDict(path=data, use_labels=cond, xflip=xflip, cache=cache)
    dataset = open_dataset(c.dataset_kwargs)
    c.dataset_kwargs.resolution = dataset.resolution
    c.dataset_kwargs.max_size = len(dataset)
    if cond and not dataset.has_labels:
        raise OptionError(f'--cond=1 needs labels, but {data} has no dataset.json labels; add them or use --cond=0')
    if workers is None:  # the reference's 8, but never more processes than CPUs to run them
        workers = min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    c.data_loader_kwargs = dnnlib.EasyDict(num_workers=workers)
    if workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, persistent_workers=True)

    # Network: architecture preset, then the options that override it.
    if arch not in ARCH_PRESETS:
        raise OptionError(f'--arch={arch} is not one of {sorted(ARCH_PRESETS)}')
    if precond not in METHODS:
        raise OptionError(f'--precond={precond} is not one of {sorted(METHODS)}')
    method_network_kwargs, method_loss_kwargs = method_kwargs(precond, warmup_ite, fdm_multiplier)
    c.network_kwargs = dnnlib.EasyDict(class_name=method_network_kwargs.pop('class_name'), **ARCH_PRESETS[arch])
    if cbase is not None:
        c.network_kwargs.model_channels = cbase
    if cres is not None:
        c.network_kwargs.channel_mult = list(cres)
    problem = resolution_problem(dataset.resolution, c.network_kwargs.channel_mult)
    if problem is not None:  # the reference starts and fails in the first step's decoder
        levels = '' if cres is None else ' --cres=' + ','.join(str(m) for m in cres)
        raise OptionError(f"--data: '{data}' cannot be trained with --arch={arch}{levels}: {problem}; resize it with "
            'dataset_tool.py --resolution, or give --cres fewer levels')
    c.network_kwargs.update(dropout=dropout, use_fp16=fp16)
    if augment > 0:
        c.network_kwargs.augment_dim = 9

    # Loss, with FDM's warmup for the FDM methods only, and the multiplier for FDM-VP/EDM (as the reference).
    c.loss_kwargs = dnnlib.EasyDict(method_loss_kwargs)
    c.network_kwargs.update(method_network_kwargs)  # after the options above: the reference's key order
    check_network_structure(c.network_kwargs, dataset, arch, cbase)
    for option, users in METHOD_SPECIFIC_OPTIONS.items():
        if option in explicit and precond not in users:
            warnings.warn(f'--{option} has no effect with --precond={precond}', UserWarning)

    c.augment_kwargs = None
    if augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(p=augment, **AUGMENT_TRANSFORMS)

    # Optimisation and schedule.
    c.optimizer_kwargs = dnnlib.EasyDict(lr=lr, betas=[0.9, 0.999], eps=1e-8)
    # Fractional kimg allowed (the reference truncates to whole kimg, minimum 1), for short runs.
    c.total_kimg = duration * 1000
    c.ema_halflife_kimg = int(ema * 1000)
    c.lr_rampup_kimg = lr_rampup * 1000
    c.batch_size = batch
    c.batch_gpu = batch_gpu
    c.loss_scaling = ls
    c.cudnn_benchmark = bench
    if precision not in ('fp32', 'tf32', 'bf16'):
        raise OptionError(f'--precision={precision} is not available for training; use fp32, tf32 or bf16 '
            '(or --fp16=1, the reference\'s mixed precision)')
    if fp16 and precision == 'bf16':
        raise OptionError('--fp16=1 and --precision=bf16 are two mixed-precision modes; choose one')
    c.precision = precision
    try:
        c.compile = resolve_compile_mode(compile, compile_mode) or False
    except ValueError as err:
        raise OptionError(str(err)) from None
    c.channels_last = channels_last
    if data_on_device not in ('auto', 'on', 'off'):
        raise OptionError(f'--data-on-device={data_on_device} is not one of auto, on, off')
    c.data_on_device = dict(auto=None, on=True, off=False)[data_on_device]
    c.kimg_per_tick = tick
    c.snapshot_ticks = snap
    c.state_dump_ticks = dump
    c.grid_images = grid_images
    # Post-hoc EMA profiles (EDM2's pair is 0.050,0.100) and the live TensorBoard view: both off by
    # default, and then absent from the config, which stays as it was.
    if phema_std:
        c.phema_stds = parse_phema_stds(phema_std)
    if tensorboard:
        c.tensorboard = True
    c.seed = seed
    batch_split(batch, batch_gpu, world_size)

    # Starting point.
    c.transfer = transfer
    c.resume_state = resume
    start = read_start(dataset, resume, transfer, batch, seed)
    # Seed: the user's, the resumed run's, or a fresh random one shared by all ranks.
    if c.seed is None:
        c.seed = start.state['seed'] if start.state is not None else random_seed()
    if start.state is not None:
        c.resume_state = start.state_path

    # Run directory name, as the reference: {id}-{dataset}-{cond}-{arch}-{precond}-gpus{W}-batch{B}-{dtype}[-{desc}].
    # --desc is one plain name, so that the run folder stays inside --outdir.
    if desc is not None and (not re.fullmatch(r'[A-Za-z0-9._-]*', desc) or desc.startswith('.')):
        raise OptionError(f'--desc {desc!r} may hold only letters, digits, ".", "_" and "-", and may not start with '
            '"."; the run folder must stay inside --outdir')
    desc_str = f'{dataset.name}-{"cond" if cond else "uncond"}-{arch}-{precond}-gpus{world_size}-batch{batch}-{"fp16" if fp16 else "fp32"}'
    if desc is not None:
        desc_str += f'-{desc}'

    # Metrics at every snapshot (--metrics): the references and detectors read and checked last (a
    # detector may be downloaded), kept for the loop. Imported here: their modules cost half a
    # second, which train.py --help need not pay.
    if metrics is not None:
        from training.evaluation.snapshot_metrics import open_metrics
        start.metrics = open_metrics(metrics, metric_ref, metric_images, precision)
    elif 'metric_ref' in explicit:
        warnings.warn('--metric-ref has no effect without --metrics', UserWarning)
    return c, dnnlib.EasyDict(outdir=outdir, desc=desc_str, nosubdir=nosubdir, start=start)

#----------------------------------------------------------------------------
# A run folder is one run. Rerunning train.py on a folder that holds a run (--nosubdir) continues
# it from its newest valid state, and --resume=RUN_OR_STATE alone takes the run's options from
# its command.json; either way the fixed options must be the run's own, and only these may change.

RESUMABLE_OPTIONS = ('duration', 'tick', 'snap', 'dump', 'workers', 'batch_gpu', 'precision', 'compile',
    'compile_mode', 'channels_last', 'bench', 'data_on_device', 'cache', 'grid_images', 'tensorboard', 'fp16',
    'metrics', 'metric_ref', 'metric_images')

# The entries of training_options.json that those options (or the resume itself) set.
_RESUMABLE_KEYS = ('total_kimg', 'kimg_per_tick', 'snapshot_ticks', 'state_dump_ticks', 'data_loader_kwargs', 'batch_gpu',
    'precision', 'compile', 'channels_last', 'cudnn_benchmark', 'data_on_device', 'dataset_kwargs.cache', 'grid_images',
    'tensorboard', 'network_kwargs.use_fp16', 'resume_state', 'transfer')

# The option behind each fixed entry of training_options.json, to name what differs.
_OPTION_OF_KEY = {'dataset_kwargs.path': 'data', 'dataset_kwargs.use_labels': 'cond', 'dataset_kwargs.xflip': 'xflip',
    'network_kwargs.class_name': 'precond', 'loss_kwargs.class_name': 'precond', 'network_kwargs.model_channels': 'cbase',
    'network_kwargs.channel_mult': 'cres', 'network_kwargs.dropout': 'dropout', 'network_kwargs.augment_dim': 'augment',
    'augment_kwargs': 'augment', 'network_kwargs.fdm_multiplier': 'fdm_multiplier', 'loss_kwargs.warmup_ite': 'warmup_ite',
    'optimizer_kwargs.lr': 'lr', 'ema_halflife_kimg': 'ema', 'lr_rampup_kimg': 'lr_rampup', 'batch_size': 'batch',
    'loss_scaling': 'ls', 'seed': 'seed', 'phema_stds': 'phema_std'}

COMMAND_FILE = 'command.json'  # the options a run was started with, all of them (defaults filled in)
MAX_OPTIONS_BYTES = 1 << 20     # training_options.json and command.json are a few kB

def _flatten(c, prefix=''):
    out = {}
    for key, value in c.items():
        if isinstance(value, dict) and f'{prefix}{key}' not in _RESUMABLE_KEYS and f'{prefix}{key}' != 'augment_kwargs':
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out

def _read_json(path):
    return read_json_bounded(path, MAX_OPTIONS_BYTES, remedy='restore it, or choose another --outdir')

def differing_options(stored, c):
    """The fixed options in which config c differs from a run's stored training_options.json, as
    ['--cbase 16 (the run: 32)', ...] ([] when c continues that run)."""
    a, b = _flatten(stored), _flatten(c)
    keys = [k for k in sorted(set(a) | set(b)) if k not in _RESUMABLE_KEYS and a.get(k) != b.get(k)]
    named = {}
    for key in keys:
        option = _OPTION_OF_KEY.get(key, 'arch' if key.startswith('network_kwargs.') else key)
        named.setdefault(option, f'--{option} {json.dumps(b.get(key))} (the run: {json.dumps(a.get(key))})')
    return list(named.values())

def run_folder_options(opts, explicit):
    """train.py's options for a folder that holds a run: (options, the run) where the run is None or
    dict(folder=..., options=its training_options.json or None, ours=has command.json). --nosubdir
    into a run folder continues it (resume from it, its seed); --resume without --data takes the
    options of the run it names from its command.json, overridden only by RESUMABLE_OPTIONS."""
    opts = dict(opts)
    outdir, resume = opts.get('outdir'), opts.get('resume')
    source = None
    if resume is not None:
        if not os.path.exists(resume):
            raise OptionError(f'--resume {resume}: no such training state or run folder; check the path')
        source = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
        if outdir is None:  # in place: the run's own folder
            opts.update(outdir=source, nosubdir=True)
    elif outdir is not None and opts.get('nosubdir') and os.path.isfile(os.path.join(outdir, 'training_options.json')):
        source = outdir
    if source is None:
        if outdir is None:
            raise OptionError('--outdir is missing; give the folder to train into (or --resume=RUN to continue a run in place)')
        return opts, None
    options_path = os.path.join(source, 'training_options.json')
    run = dict(folder=source, options=_read_json(options_path) if os.path.isfile(options_path) else None,
        ours=os.path.isfile(os.path.join(source, COMMAND_FILE)))
    if opts.get('data') is None:
        command = os.path.join(source, COMMAND_FILE)
        if not run['ours']:
            raise OptionError(f'{source} has no {COMMAND_FILE} to take the run\'s options from (a run of an older '
                'version or of the reference); give its options (--data, --cond, --arch, ...) with --resume')
        stored = _read_json(command).get('options')
        if not isinstance(stored, dict):
            raise FileError(f'{command} holds no options; restore it, or give the run\'s options with --resume')
        fixed = sorted(name for name in explicit if name not in RESUMABLE_OPTIONS + ('outdir', 'nosubdir', 'resume', 'desc')
            and opts.get(name) != stored.get(name))
        if fixed:
            raise OptionError(f'--{", --".join(fixed)} cannot change when a run continues (the run has '
                + ', '.join(f'--{n} {json.dumps(stored.get(n))}' for n in fixed) + '); drop them, or start a new run')
        opts = {**{k: v for k, v in stored.items() if v is not None}, **opts}
    if opts.get('seed') is None and run['options'] is not None:
        seed = run['options'].get('seed')
        opts['seed'] = seed if isinstance(seed, int) else None
    if resume is None and list_files(source, STATE_NAME):  # a rerun continues from the newest valid state;
        opts['resume'] = source                          # without one it starts over, with the run's seed
    if opts.get('resume') is not None and 'transfer' not in explicit:
        opts.pop('transfer', None)  # the state supersedes the weights the run started from
    return opts, run

def check_continues_run(c, run, in_place):
    """Refuse a config whose fixed options differ from the run it continues, naming each: always in
    the run's own folder, and for a --resume elsewhere when the run is ours (it has command.json;
    a reference run's options are written in the reference's own terms)."""
    if run is None or run['options'] is None or not (in_place or run['ours']):
        return
    differ = differing_options(run['options'], c)
    if differ:
        raise OptionError(f'{run["folder"]} holds a run with other options: {"; ".join(differ)}; rerun with the run\'s '
            'options (or --resume=RUN alone), or choose another --outdir')

#----------------------------------------------------------------------------
# What a run starts from, read once before the run folder exists: the opened dataset, and the
# verified training state (--resume) or the weights (--transfer) it begins with. A mismatch
# found here costs no run folder.

@dataclasses.dataclass
class Start:
    dataset: ImageFolderDataset
    state: dict = None          # a verified training state, None = not resuming
    state_path: str = None      # the file it came from (--resume may name a run directory)
    transferred: dict = None    # {name: tensor} of --transfer, None = random initialisation
    metrics: object = None      # training.evaluation.snapshot_metrics.SnapshotMetrics of --metrics, None = off

def open_dataset(dataset_kwargs):
    try:
        return ImageFolderDataset(**dataset_kwargs)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, UnicodeError, EOFError, OSError, zlib.error) as err:
        # Errors of a damaged zip that the reader does not translate yet (zipfile raises all of these).
        raise FileError(f"Cannot read dataset '{dataset_kwargs['path']}' ({' '.join(str(err).split())}); it is "
            'damaged or not a dataset, recreate it with dataset_tool.py.') from None

# seed: None draws one for a reference state, which records none.
def read_start(dataset, resume=None, transfer=None, batch_size=None, seed=None):
    if transfer is not None and resume is not None:
        raise OptionError('--transfer and --resume cannot be combined; --resume continues a run, --transfer starts a new one')
    start = Start(dataset)
    if resume is not None:
        start.state_path, start.state = find_resume_state(resume, batch_size=batch_size, seed=seed, draw_seed=random_seed)
        if seed is not None:  # else the run takes the state's seed
            check_resume_seed(start.state, start.state_path, seed)
    if transfer is not None:
        start.transferred = read_transfer(transfer, dataset)
    return start

def start_of(c):
    """The Start of a training_loop config made elsewhere (tests, tools): its dataset opened, its
    resume_state or transfer read and checked, as setup_training_config does."""
    return read_start(open_dataset(c['dataset_kwargs']), c.get('resume_state'), c.get('transfer'), c['batch_size'],
        c['seed'])

#----------------------------------------------------------------------------

def parse_phema_stds(s):
    """--phema-std: relative stds such as '0.050,0.100' (or a list), each in training.phema.STD_RANGE,
    which the reconstruction's --std shares (gamma_from_std checks it)."""
    try:
        stds = [float(part) for part in (s.split(',') if isinstance(s, str) else s) if str(part).strip()]
    except (TypeError, ValueError):
        raise OptionError(f'--phema-std={s!r} is not a list of numbers such as 0.050,0.100') from None
    if not stds or len(stds) > 8 or len({f'{std:.3f}' for std in stds}) != len(stds):
        raise OptionError(f'--phema-std={s!r}: give one to eight different relative stds (to 3 decimals), such as 0.050,0.100')
    for std in stds:
        try:
            gamma_from_std(std)
        except ValueError as err:
            raise OptionError(f'--phema-std: {err}') from None
    return stds

# --cres: at most MAX_LIST_ITEMS channel multipliers, each in the range a network file's
# channel_mult has (ValueError otherwise).
def parse_cres(s):
    bounds = NETWORK_RANGES['channel_mult']
    return dnnlib.util.parse_int_list(s, minimum=bounds.min, maximum=bounds.max, max_items=MAX_LIST_ITEMS,
        too_many='; give one channel multiplier per resolution')

#----------------------------------------------------------------------------
# Batch split: batch = batch_gpu * rounds * world. Returns (images per step and process, rounds).

def batch_split(batch, batch_gpu, world_size):
    per_process = batch // world_size
    used = per_process if batch_gpu is None or batch_gpu > per_process else batch_gpu
    rounds = per_process // max(used, 1)
    if batch != used * rounds * world_size:
        raise OptionError(f'--batch={batch} is not divisible by {world_size} GPU(s) x --batch-gpu={batch_gpu}; '
            'choose a batch that is a multiple of their product')
    return used, rounds

# A fresh seed, drawn on rank 0 and broadcast, so that every rank initialises the same network.
def random_seed():
    seed = torch.tensor([secrets.randbelow(2**31)], dtype=torch.int64)
    if distributed.is_distributed():
        seed = seed.to(distributed.device() if torch.distributed.get_backend() == 'nccl' else 'cpu')
        torch.distributed.broadcast(seed, src=0)
    return int(seed.item())

#----------------------------------------------------------------------------
