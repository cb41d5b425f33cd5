"""Network files: our safe snapshot format, and reference EDM/FDM pickles read without running them.

Our snapshot is a `torch.save` of plain data only: tensors, and a JSON description of how
to rebuild each object (class name and constructor kwargs). It loads with
`torch.load(weights_only=True)`, so opening it can never execute code, and carries a
SHA-256 over everything in it (version 2; version 1, still read, covered the tensors only)
so a truncated or corrupted file is detected.

A reference `network-snapshot-*.pkl` stores each module as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where meta holds the module's
*source code*, its class name, its `__dict__` and its constructor kwargs. We unpickle it
with an allow-list: that call becomes a plain record (the source is never executed),
tensors and a handful of harmless containers are allowed, and any other global (for
example `os.system`) is refused with an error naming it. The denoiser is then rebuilt
from our classes with the stored kwargs and its tensors loaded strictly by name.
"""

import json
import math
import os
import warnings

import numpy as np
import torch

from torch_utils.cli.options import Range
from torch_utils.io.files import (FileError, atomic_save, check_digest, check_envelope, load_plain, loads_bounded,
    nested_digest, open_regular, tensors_digest, tree_error)
from torch_utils.io.safe_pickle import PersistentRecord, PlainObject, UnsafePickleError, restricted_load
from fdm.networks import FourierEmbedding, GroupNorm, PositionalEmbedding, UNetBlock
from fdm.preconditioning import IgnoredOptionWarning, build_precond
from fdm.io.safetensors_format import is_safetensors, read_safetensors, write_safetensors
from torch_utils.io.download import download_cached

FORMAT_NAME = 'fdm-snapshot'
FORMAT_VERSION = 2  # 2: the SHA-256 covers the description too (1: the tensors only)

class CheckpointError(FileError):
    """A network or state file that cannot be used; the message says why and what to do."""

#----------------------------------------------------------------------------
# Our snapshot format.

def describe(obj):
    """{'class_name', 'init_kwargs'} of a rebuildable object (preconditioner, loss, augment pipe)."""
    if obj is None or isinstance(obj, dict):  # None, or already a description
        return obj
    return dict(class_name=type(obj).__name__, init_kwargs=dict(obj.init_kwargs))

def save_snapshot(path, ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None, extra=None):
    """Write a network snapshot: the EMA denoiser plus descriptions of how it was trained. A path
    ending in .safetensors gets the same content as safetensors (tensors, description in the metadata)."""
    state = {name: t.detach().cpu().clone() for name, t in ema.state_dict().items()}
    description = dict(
        ema=describe(ema),
        loss_fn=describe(loss_fn),
        augment_pipe=describe(augment_pipe),
        dataset_kwargs=dict(dataset_kwargs) if dataset_kwargs is not None else None,
        extra=extra,
    )
    if str(path).endswith('.safetensors'):
        write_safetensors(path, json.dumps(description), state)
        return
    data = dict(format=FORMAT_NAME, version=FORMAT_VERSION, description=json.dumps(description), ema=state)
    atomic_save(dict(data, sha256=nested_digest(data)), path)

def _read_snapshot(f, name):
    remedy = 'use another snapshot'
    data = load_plain(f, name, remedy, error=CheckpointError)
    check_envelope(data, FORMAT_NAME, (1, FORMAT_VERSION), name, 'an FDM network snapshot', 'pass a network-snapshot file',
        error=CheckpointError)
    tensors = data.get('ema')
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise CheckpointError(f'{name}: the snapshot holds no network tensors; the file is damaged, {remedy}')
    _check_tensors(tensors, name)
    content = {k: v for k, v in data.items() if k != 'sha256'}
    try:
        digest = tensors_digest(tensors) if data['version'] == 1 else nested_digest(content)
    except (TypeError, ValueError, RecursionError) as err:
        raise CheckpointError(f'{name}: the snapshot holds something other than plain data ({err}); {remedy}') from None
    check_digest(data.get('sha256'), digest, name, remedy, error=CheckpointError)
    return data

# Before anything reads all of their elements (a digest, a budget): dense tensors, each byte of
# which the file stores.
def _check_tensors(tensors, name):
    error = tree_error(tensors)
    if error is not None:
        raise CheckpointError(f'{name}: {error}; the file is damaged or not a network snapshot')

def load_snapshot(f, name='snapshot'):
    """Read one of our snapshots: {'ema': module, 'loss_fn', 'augment_pipe', 'dataset_kwargs', 'extra'}."""
    data = _read_snapshot(f, name)
    return _from_description(data['description'], data['ema'], name)

# The description (JSON) and tensors of a snapshot, .pt or .safetensors, -> the loaded snapshot.
def _from_description(description_json, tensors, name):
    remedy = 'the description in the snapshot is damaged, use another snapshot'
    if not isinstance(description_json, str):
        raise CheckpointError(f'{name}: the network description is a {type(description_json).__name__}, not JSON text; {remedy}')
    description = _checked_description(loads_bounded(description_json, f'{name}: the network description', remedy,
        error=CheckpointError), name)
    ema = rebuild_network(description['ema']['class_name'], description['ema']['init_kwargs'], tensors, name)
    return dict(description, ema=ema)

# The parts of a description, as save_snapshot writes them: the network, and the loss and
# augmentation pipe it was trained with (or null), each {"class_name": str, "init_kwargs": object};
# the dataset's options and `extra` are an object or null. A part left out is null.
DESCRIBED_OBJECTS = ('ema', 'loss_fn', 'augment_pipe')
DESCRIBED_OPTIONS = ('dataset_kwargs', 'extra')

def _checked_description(description, name):
    """{part: value} of a parsed description, every part of its shape, or one CheckpointError."""
    parts = {}
    for key in DESCRIBED_OBJECTS + DESCRIBED_OPTIONS:
        value = description.get(key)
        if key in DESCRIBED_OBJECTS:
            valid = (value is None and key != 'ema') or (isinstance(value, dict) and isinstance(value.get('class_name'), str)
                and isinstance(value.get('init_kwargs'), dict))
            shape = '{"class_name": ..., "init_kwargs": {...}}' + (' or null' if key != 'ema' else '')
        else:
            valid, shape = value is None or isinstance(value, dict), 'an object or null'
        if not valid:
            found = 'missing' if value is None else f'{_json_kind(value)} {_short(value)}'
            raise CheckpointError(f'{name}: the description in the snapshot is damaged (its "{key}" is {found}, not {shape}); '
                'use another snapshot')
        parts[key] = value
    return parts

def _json_kind(value):
    return {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean'}.get(type(value), 'a number')

def _short(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'

def rebuild_network(class_name, init_kwargs, state, name):
    _check_tensors(state, name)
    _check_init_kwargs(init_kwargs, name)
    net = _build_within_budget(class_name, init_kwargs, state, name)
    missing, unexpected = _compare_keys(net.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(f'{name}: tensors do not match {class_name}: missing {missing[:5]}, '
            f'unexpected {unexpected[:5]}; the file was not written by EDM/FDM or this code')
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{name}: tensor shapes do not match {class_name}: {str(err).splitlines()[-1].strip()}') from None
    return net

#----------------------------------------------------------------------------
# The valid range of every numeric constructor argument of the preconditioners
# (fdm/preconditioning.py) and U-Nets (fdm/networks.py). A network file states these values, and
# one outside its range is refused before anything is built: sigma_data=NaN gave black images,
# dropout=NaN a traceback, img_resolution=32768 latents of 12 GB an image. train.py's --dropout,
# --fdm-multiplier and --cbase take their ranges from here (training/config.py). The bounds are
# generous where nothing else sets them: EDM's largest network is 64x64 (its datasets 512x512);
# VP's sigma(1) = sqrt(e^(beta_d / 2 + beta_min) - 1) stays finite in float32 (below e^88);
# iDDPM builds its sigma table in a loop of M steps (the reference's M is 1000; 10,000 take 1.6 s
# on one CPU thread). Absent arguments take the constructor's defaults, which are valid.
NETWORK_RANGES = dict(
    # Every preconditioner.
    img_resolution=Range(min=1, max=4096, integer=True), img_channels=Range(min=1, max=4, integer=True),
    label_dim=Range(min=0, max=100_000, integer=True),
    # The schedules (VP, VE, iDDPM, EDM) and FDM's momentum scaling s(sigma).
    beta_d=Range(min=0, max=100, min_open=True), beta_min=Range(min=0, max=20),
    epsilon_t=Range(min=0, max=1, min_open=True, max_open=True), M=Range(min=2, max=10_000, integer=True),
    C_1=Range(min=0, max=1, min_open=True, max_open=True), C_2=Range(min=0, max=1),
    sigma_min=Range(min=0, max=1e5), sigma_max=Range(min=0, min_open=True, allow_inf=True),
    sigma_data=Range(min=0, max=100, min_open=True),
    fdm_beta_d=Range(min=0, max=100), fdm_beta_min=Range(min=0, max=100), fdm_multiplier=Range(min=0, max=100),
    # The U-Nets; a list argument has each of its entries in the range.
    model_channels=Range(min=1, max=4096, integer=True), channel_mult=Range(min=1, max=64, integer=True),
    channel_mult_emb=Range(min=1, max=64, integer=True), channel_mult_noise=Range(min=1, max=64, integer=True),
    num_blocks=Range(min=1, max=64, integer=True), attn_resolutions=Range(min=1, max=4096, integer=True),
    augment_dim=Range(min=0, max=1000, integer=True), dropout=Range(min=0, max=1), label_dropout=Range(min=0, max=1),
    resample_filter=Range(min=0, max=100, min_open=True),
)

# The list arguments and how many entries each may have: a channel multiplier per resolution
# (4096 halves 12 times), a 1-D FIR filter of a few taps.
LIST_LENGTHS = dict(channel_mult=(1, 13), attn_resolutions=(0, 13), resample_filter=(1, 8))

def _argument_problem(key, value):
    """None, or why `value` is no valid constructor argument `key` ('is not ...')."""
    bounds = NETWORK_RANGES[key]
    # An integer must be an int: a float would reach range() and tensor shapes.
    valid = lambda v: bounds.problem(v) is None and (type(v) is int or not bounds.integer)
    kind = 'integer' if bounds.integer else 'finite number' if not bounds.allow_inf else 'number'
    if key in LIST_LENGTHS:
        lo, hi = LIST_LENGTHS[key]
        if isinstance(value, (list, tuple)) and lo <= len(value) <= hi and all(valid(v) for v in value):
            return None
        return f'is not a list of {lo} to {hi} {kind}s in the range {bounds.describe()}'
    return None if valid(value) else f'is not {"an" if kind == "integer" else "a"} {kind} in the range {bounds.describe()}'

def resolution_problem(img_resolution, channel_mult):
    """None, or why a U-Net of these channel multipliers cannot take img_resolution x img_resolution
    images: each of its levels after the first halves the resolution, and the decoder doubles it
    back, so it must be a multiple of 2^(levels - 1)."""
    factor = 1 << (len(channel_mult) - 1)
    if img_resolution % factor == 0:
        return None
    lower, upper = img_resolution - img_resolution % factor, img_resolution - img_resolution % factor + factor
    return (f'{img_resolution}x{img_resolution} images do not fit a U-Net of {len(channel_mult)} resolutions, which halves '
        f'them at each level below the first: the resolution must be a multiple of {factor} '
        f'(e.g. {", ".join(str(r) for r in (lower, upper) if r > 0)})')

def structure_problem(model):
    """None, or why a U-Net built from arguments each within its range still cannot run. torch
    builds such a network and fails only in its first forward pass, on one of three rules:
    group normalisation needs its groups to divide the channels (EDM's GroupNorm takes
    min(32, C / 4) groups: 130 channels do not split into 32, 18 not into 4); the noise
    embeddings give num_channels / 2 cosines and as many sines, so an odd width leaves the next
    layer one input short; attention splits the channels evenly into its heads. Over every width
    from 1 to 20 (and 130) of the three U-Net families, with labels and augmentation, this
    verdict equals a real forward pass (tests/files/test_stored_values.py). Walking the
    modules costs nothing beside the build: the file readers check the network they built,
    training.config one built on the meta device."""
    for path, module in model.named_modules():
        if isinstance(module, GroupNorm):
            channels, groups = module.weight.shape[0], module.num_groups
            if groups < 1 or channels % groups:
                return f'its {path} normalises {channels} channels in {groups} groups, which do not divide them'
        if isinstance(module, (PositionalEmbedding, FourierEmbedding)) and module.num_channels % 2:
            return f'its {path} embeds the noise level in an odd number of channels ({module.num_channels})'
        if isinstance(module, UNetBlock) and module.num_heads and module.out_channels % module.num_heads:
            return f'its {path} splits {module.out_channels} channels into {module.num_heads} attention heads'
    return None

def _check_init_kwargs(init_kwargs, name):
    remedy = 'the file is damaged or not a network snapshot of this code'
    for key, value in init_kwargs.items():
        problem = _argument_problem(key, value) if key in NETWORK_RANGES else None
        if problem is not None:
            raise CheckpointError(f'{name}: the stored {key}={_short(value)} {problem}; {remedy}')
    sigma_min, sigma_max = init_kwargs.get('sigma_min'), init_kwargs.get('sigma_max')
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise CheckpointError(f'{name}: the stored sigma_min={sigma_min} is not below sigma_max={sigma_max}; {remedy}')
    resolution, levels = init_kwargs.get('img_resolution'), init_kwargs.get('channel_mult')
    problem = resolution_problem(resolution, levels) if resolution is not None and levels is not None else None
    if problem is not None:
        raise CheckpointError(f'{name}: the stored img_resolution={resolution} does not fit the stored channel_mult: '
            f'{problem}; {remedy}')

# The constructor arguments come from the file: build under a budget, so that they cannot make
# us build a network far larger than the file's tensors (minutes of initialisation, or all the
# memory) before the names and shapes are compared. The tensors passed _check_tensors, so their
# elements are bytes the file stores: a stride-0 view cannot raise the budget.
def _build_within_budget(class_name, init_kwargs, state, name):
    max_numel = 2 * sum(t.numel() for t in state.values()) + 2**20
    with warnings.catch_warnings():  # the file's own options are not the user's mistake
        warnings.simplefilter('ignore', IgnoredOptionWarning)
        try:
            with _ConstructionBudget(10 * len(state) + 1000, max_numel, name):
                net = build_precond(class_name, **init_kwargs)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f'{name}: cannot rebuild {class_name} from the stored arguments ({err})') from None
    problem = structure_problem(net.model)
    if problem is not None:
        raise CheckpointError(f'{name}: the stored arguments give a U-Net that cannot run: {problem}; '
            'the file is damaged or not a network snapshot of this code')
    return net

class _ConstructionBudget(torch.overrides.TorchFunctionMode):
    """Refuses, before allocating, a tensor of more than `max_numel` elements; and stops a
    constructor that registers more than `max_count` parameters, buffers and modules, or
    parameters and buffers of more than `max_numel` elements in all."""
    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}

    def __init__(self, max_count, max_numel, name):
        super().__init__()
        self.max_count, self.max_numel, self.name = max_count, max_numel, name
        self.count = self.numel = 0

    def _too_large(self):
        return CheckpointError(f'{self.name}: the stored constructor arguments describe a network far larger than '
            'the tensors in the file; the file is damaged or not a network snapshot')

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            size = kwargs.get('size', args[0] if len(args) == 1 or func is torch.full else args)
            size = size if isinstance(size, (list, tuple, torch.Size)) else [size]
            if all(isinstance(n, int) for n in size) and math.prod(max(n, 0) for n in size) > self.max_numel:
                raise self._too_large()
        return func(*args, **kwargs)

    def _registered(self, _module, _name, value):
        self.count += 1
        self.numel += value.numel() if isinstance(value, torch.Tensor) else 0
        if self.count > self.max_count or self.numel > self.max_numel:
            raise self._too_large()

    def __enter__(self):
        modules = torch.nn.modules.module
        self.handles = [modules.register_module_parameter_registration_hook(self._registered),
            modules.register_module_buffer_registration_hook(self._registered),
            modules.register_module_module_registration_hook(self._registered)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

def _compare_keys(expected, got):
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))

#----------------------------------------------------------------------------
# Reference pickles: a restricted unpickler. Only these globals may appear.

def read_reference_pickle(f, name='pickle'):
    """Unpickle a reference file with the allow-list; returns the raw tree of records."""
    try:
        return restricted_load(f)
    except (UnsafePickleError, CheckpointError) as err:
        raise CheckpointError(f'{name}: {err}; only EDM/FDM network pickles are accepted') from None
    except Exception as err:
        raise CheckpointError(f'{name}: cannot be read as an EDM/FDM network pickle '
            f'({type(err).__name__}: {err}); the file may be damaged or truncated') from None

def record_tensors(node, prefix=''):
    """Flatten a record tree's parameters and persistent buffers into {dotted name: tensor}."""
    state = node.state
    if not isinstance(state, dict):
        raise CheckpointError(f'{prefix or "the network"} is not a module record')
    out = {}
    non_persistent = set(_record_field(state, '_non_persistent_buffers_set', (set, frozenset, list, tuple), prefix))
    for group in ['_parameters', '_buffers']:
        for key, value in _record_field(state, group, dict, prefix).items():
            if value is not None and key not in non_persistent:
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f'{prefix}{key} is not a tensor')
                out[prefix + key] = value.detach()
    for key, child in _record_field(state, '_modules', dict, prefix).items():
        if isinstance(child, (PersistentRecord, PlainObject)):
            out.update(record_tensors(child, f'{prefix}{key}.'))
        elif child is not None:
            raise CheckpointError(f'{prefix}{key} is not a module record')
    return out

# A field of a module record: absent or None is empty; any other type than `kind` is a damaged file.
def _record_field(state, name, kind, prefix):
    value = state.get(name)
    if value is None:
        return {} if kind is dict else ()
    if not isinstance(value, kind):
        raise CheckpointError(f'{prefix}{name} of the network record is a {type(value).__name__}, not what a module holds')
    return value

def _plain(value):
    """Convert record attributes (numpy scalars, EasyDicts, tuples) to JSON-friendly values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise CheckpointError(f'unexpected {type(value).__name__} among constructor arguments')

def record_description(record):
    if record is None:
        return None
    if not isinstance(record, PersistentRecord):
        raise CheckpointError('expected a persistent object record')
    if record.version != 6:
        raise CheckpointError(f'{record.class_name} is a persistence record of version {record.version}, not 6')
    if record.state.get('_init_args'):
        raise CheckpointError(f'{record.class_name} was built with positional arguments, which we cannot map')
    return dict(class_name=record.class_name, init_kwargs=_plain(record.state.get('_init_kwargs') or {}))

def load_reference_pickle(f, name='pickle'):
    """Read a reference EDM/FDM `network-snapshot-*.pkl`: same keys as `load_snapshot`."""
    data = read_reference_pickle(f, name)
    if not isinstance(data, dict) or not isinstance(data.get('ema'), PersistentRecord):
        raise CheckpointError(f'{name}: not an EDM/FDM network snapshot (expected a dict with an "ema" network)')
    try:
        description = dict(ema=record_description(data['ema']), loss_fn=record_description(data.get('loss_fn')),
            augment_pipe=record_description(data.get('augment_pipe')),
            dataset_kwargs=_plain(data['dataset_kwargs']) if data.get('dataset_kwargs') is not None else None)
        tensors = record_tensors(data['ema'])
    except CheckpointError as err:
        raise CheckpointError(f'{name}: {err}') from None
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as err:  # a tree of the wrong shape
        raise CheckpointError(f'{name}: not an EDM/FDM network snapshot (unexpected structure: '
            f'{type(err).__name__}: {err})') from None
    description = _checked_description(description, name)
    ema = rebuild_network(description['ema']['class_name'], description['ema']['init_kwargs'], tensors, name)
    return dict(description, ema=ema)

#----------------------------------------------------------------------------
# One entry point for users.

def load_network_file(path_or_url, name=None):
    """Everything in a network file (ours or a reference pickle), as a dict; see load_snapshot."""
    name = name or os.path.basename(str(path_or_url))
    try:
        local = download_cached(path_or_url)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    with open_regular(local, 'pass a network snapshot (.pt, .safetensors or an EDM/FDM .pkl)', error=CheckpointError) as f:
        if is_safetensors(f):
            return _from_description(*read_safetensors(local, name, error=CheckpointError), name)
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(b'PK'):  # torch.save zip container: ours
            return load_snapshot(f, name)
        if magic[:1] == b'\x80':  # a plain pickle: the reference format
            return load_reference_pickle(f, name)
    raise CheckpointError(f'{name}: neither an FDM snapshot (.pt or .safetensors) nor an EDM/FDM network pickle')

def load_network(path_or_url, device='cpu'):
    """The EMA denoiser from a snapshot (ours or EDM/FDM's .pkl), in eval mode, no gradients."""
    net = load_network_file(path_or_url)['ema']
    return net.eval().requires_grad_(False).to(device)

def convert_reference_pickle(src, dst):
    """Rewrite any network file (a reference pickle, or one of ours) as our .pt snapshot or, for a DST
    ending in .safetensors, as safetensors; returns what was loaded."""
    data = load_network_file(src)
    save_snapshot(dst, data['ema'], loss_fn=data['loss_fn'], augment_pipe=data['augment_pipe'],
        dataset_kwargs=data['dataset_kwargs'], extra=dict(converted_from=os.path.basename(str(src))))
    return data

#----------------------------------------------------------------------------
