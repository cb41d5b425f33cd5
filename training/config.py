"""From train.py options to the arguments of `training_loop`: a plain function tests can call.

The presets reproduce the reference train.py (EDM, and FDM's additions): the same options,
defaults and derived values, so the paper's commands mean what they meant there.
"""

import os
import re
import warnings
import zipfile
import zlib

import dnnlib
from fdm.preconditioning import PRECOND_BY_OPTION
from torch_utils.compile_modes import resolve_compile_mode
from training.dataset import DatasetError, ImageFolderDataset
from training.networks import ARCH_PRESETS

class ConfigError(Exception):
    """An option combination that cannot work; the message says what to change."""

# Options that only some preconditioners use: option -> the --precond values that use it.
PRECOND_SPECIFIC = dict(warmup_ite={'fdm_vp', 'fdm_ve', 'fdm_edm'}, fdm_multiplier={'fdm_vp', 'fdm_edm'})

# The reference's augmentation for --augment=p: every ADA transform but colour, x-flips always.
AUGMENT_TRANSFORMS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

# Loss of each --precond (iDDPM is trained like VP but on its discrete sigma table).
LOSS_BY_PRECOND = dict(vp='VPLoss', fdm_vp='VPLoss', ve='VELoss', fdm_ve='VELoss', edm='EDMLoss', fdm_edm='EDMLoss',
    iddpm='iDDPMLoss')

#----------------------------------------------------------------------------

def setup_training_config(data, outdir='training-runs', cond=False, arch='ddpmpp', precond='fdm_edm', duration=200,
        batch=512, batch_gpu=None, cbase=None, cres=None, lr=10e-4, ema=0.5, dropout=0.13, augment=0.12, xflip=False,
        fp16=False, ls=1, bench=True, cache=True, workers=8, desc=None, nosubdir=False, tick=50, snap=200, dump=500,
        seed=None, transfer=None, resume=None, lr_rampup=10, warmup_ite=None, fdm_multiplier=2.0,
        grid_images=64, precision='fp32', compile=False, compile_mode=None, channels_last=False, data_on_device='auto', world_size=1, explicit=()):
    """Returns (config for training_loop, run description). `explicit`: options the user set."""
    c = dnnlib.EasyDict()

    # Dataset: opened here so that a bad path or format fails before anything starts.
    c.dataset_kwargs = dnnlib.EasyDict(path=data, use_labels=cond, xflip=xflip, cache=cache)
    try:
        dataset = ImageFolderDataset(**c.dataset_kwargs)
    except DatasetError as err:
        raise ConfigError(str(err)) from None
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, UnicodeError, EOFError, OSError, zlib.error) as err:
        # Errors of a damaged zip that the reader does not translate yet (zipfile raises all of these).
        raise ConfigError(f"Cannot read dataset '{data}' ({' '.join(str(err).split())}); it is damaged or not a "
            'dataset, recreate it with dataset_tool.py.') from None
    c.dataset_kwargs.resolution = dataset.resolution
    c.dataset_kwargs.max_size = len(dataset)
    if cond and not dataset.has_labels:
        raise ConfigError(f'--cond=1 needs labels, but {data} has no dataset.json labels; add them or use --cond=0')
    c.data_loader_kwargs = dnnlib.EasyDict(num_workers=workers)
    if workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, persistent_workers=True)

    # Network: architecture preset, then the options that override it.
    if arch not in ARCH_PRESETS:
        raise ConfigError(f'--arch={arch} is not one of {sorted(ARCH_PRESETS)}')
    if precond not in PRECOND_BY_OPTION:
        raise ConfigError(f'--precond={precond} is not one of {sorted(PRECOND_BY_OPTION)}')
    c.network_kwargs = dnnlib.EasyDict(class_name=PRECOND_BY_OPTION[precond], **ARCH_PRESETS[arch])
    if cbase is not None:
        c.network_kwargs.model_channels = cbase
    if cres is not None:
        c.network_kwargs.channel_mult = list(cres)
    c.network_kwargs.update(dropout=dropout, use_fp16=fp16)
    if augment > 0:
        c.network_kwargs.augment_dim = 9

    # Loss, with FDM's warmup for the FDM preconditioners only (as the reference).
    c.loss_kwargs = dnnlib.EasyDict(class_name=LOSS_BY_PRECOND[precond])
    if precond.startswith('fdm_'):
        c.loss_kwargs.warmup_ite = warmup_ite
        if precond != 'fdm_ve':  # FDM-VE ignores the multiplier (warned below if given)
            c.network_kwargs.fdm_multiplier = fdm_multiplier
    for option, users in PRECOND_SPECIFIC.items():
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
        raise ConfigError(f'--precision={precision} is not available for training; use fp32, tf32 or bf16 '
            '(or --fp16=1, the reference\'s mixed precision)')
    if fp16 and precision == 'bf16':
        raise ConfigError('--fp16=1 and --precision=bf16 are two mixed-precision modes; choose one')
    c.precision = precision
    try:
        c.compile = resolve_compile_mode(compile, compile_mode) or False
    except ValueError as err:
        raise ConfigError(str(err)) from None
    c.channels_last = channels_last
    if data_on_device not in ('auto', 'on', 'off'):
        raise ConfigError(f'--data-on-device={data_on_device} is not one of auto, on, off')
    c.data_on_device = dict(auto=None, on=True, off=False)[data_on_device]
    c.kimg_per_tick = tick
    c.snapshot_ticks = snap
    c.state_dump_ticks = dump
    c.grid_images = grid_images
    c.seed = seed

    bg = batch // world_size
    if batch % world_size != 0 or (batch_gpu is not None and batch_gpu < bg and bg % batch_gpu != 0):
        raise ConfigError(f'--batch={batch} is not divisible by {world_size} GPU(s) x --batch-gpu={batch_gpu}; '
            'choose a batch that is a multiple of their product')

    # Starting point.
    if transfer is not None and resume is not None:
        raise ConfigError('--transfer and --resume cannot be combined; --resume continues a run, --transfer starts a new one')
    c.transfer = transfer
    c.resume_state = None
    if resume is not None:
        from training.training_loop import find_resume_state  # noqa: keeps train.py --help fast
        c.resume_state = find_resume_state(resume)

    # Run directory name, as the reference: {id}-{dataset}-{cond}-{arch}-{precond}-gpus{W}-batch{B}-{dtype}[-{desc}].
    desc_str = f'{dataset.name}-{"cond" if cond else "uncond"}-{arch}-{precond}-gpus{world_size}-batch{batch}-{"fp16" if fp16 else "fp32"}'
    if desc is not None:
        desc_str += f'-{desc}'
    return c, dict(outdir=outdir, desc=desc_str, nosubdir=nosubdir)

#----------------------------------------------------------------------------
# Next free run directory: 1 + the largest leading number among existing subdirectories.

def next_run_dir(outdir, desc):
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = re.match(r'^\d+', name)
            if m and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(m.group()))
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

#----------------------------------------------------------------------------
