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

from torch_utils.io.files import (FileError, atomic_save, check_digest, check_envelope, load_plain, nested_digest,
    tensors_digest, tree_error)
from torch_utils.io.safe_pickle import PersistentRecord, PlainObject, UnsafePickleError, restricted_load
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
    try:
        description = json.loads(description_json)
        class_name, init_kwargs = description['ema']['class_name'], description['ema']['init_kwargs']
        if not isinstance(class_name, str) or not isinstance(init_kwargs, dict):
            raise TypeError('class_name or init_kwargs has the wrong type')
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise CheckpointError(f'{name}: the network description in the snapshot is damaged ({type(err).__name__}: {err}); '
            'use another snapshot') from None
    ema = rebuild_network(class_name, init_kwargs, tensors, name)
    return dict(description, ema=ema)

def rebuild_network(class_name, init_kwargs, state, name):
    _check_tensors(state, name)
    _check_image_kwargs(init_kwargs, name)
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

# The network is sampled at the resolution the file states: latents of [batch, C, 32768, 32768]
# are 12 GB an image. Bound what no real network exceeds (EDM's largest is 64x64), and require
# a resolution the U-Net can halve at each of its levels.
IMAGE_LIMITS = dict(img_resolution=(1, 4096), img_channels=(1, 4), label_dim=(0, 100000))

def _check_image_kwargs(init_kwargs, name):
    for key, (lo, hi) in IMAGE_LIMITS.items():
        value = init_kwargs.get(key, lo)
        if type(value) is not int or not lo <= value <= hi:
            raise CheckpointError(f'{name}: the stored {key}={value!r} is outside {lo}..{hi}; the file is damaged '
                'or not a network snapshot of this code')
    levels = init_kwargs.get('channel_mult')
    if isinstance(levels, (list, tuple)) and levels and init_kwargs.get('img_resolution', 1) % (1 << min(len(levels) - 1, 13)):
        raise CheckpointError(f'{name}: the stored img_resolution={init_kwargs["img_resolution"]} cannot be halved '
            f'{len(levels) - 1} times by the U-Net; the file is damaged or not a network snapshot of this code')

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
                return build_precond(class_name, **init_kwargs)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f'{name}: cannot rebuild {class_name} from the stored arguments ({err})') from None

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
    out = {}
    non_persistent = set(state.get('_non_persistent_buffers_set') or ())
    for group in ['_parameters', '_buffers']:
        for key, value in (state.get(group) or {}).items():
            if value is not None and key not in non_persistent:
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f'{prefix}{key} is not a tensor')
                out[prefix + key] = value.detach()
    for key, child in (state.get('_modules') or {}).items():
        if isinstance(child, (PersistentRecord, PlainObject)):
            out.update(record_tensors(child, f'{prefix}{key}.'))
        elif child is not None:
            raise CheckpointError(f'{prefix}{key} is not a module record')
    return out

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
        ema_desc = record_description(data['ema'])
        tensors = record_tensors(data['ema'])
        loss_desc = record_description(data.get('loss_fn'))
        augment_desc = record_description(data.get('augment_pipe'))
        dataset_kwargs = _plain(data['dataset_kwargs']) if data.get('dataset_kwargs') is not None else None
    except CheckpointError as err:
        raise CheckpointError(f'{name}: {err}') from None
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as err:  # a tree of the wrong shape
        raise CheckpointError(f'{name}: not an EDM/FDM network snapshot (unexpected structure: '
            f'{type(err).__name__}: {err})') from None
    ema = rebuild_network(ema_desc['class_name'], ema_desc['init_kwargs'], tensors, name)
    return dict(ema=ema, loss_fn=loss_desc, augment_pipe=augment_desc, dataset_kwargs=dataset_kwargs, extra=None)

#----------------------------------------------------------------------------
# One entry point for users.

def load_network_file(path_or_url, name=None):
    """Everything in a network file (ours or a reference pickle), as a dict; see load_snapshot."""
    name = name or os.path.basename(str(path_or_url))
    try:
        local = download_cached(path_or_url)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    if is_safetensors(local):
        return _from_description(*read_safetensors(local, name, error=CheckpointError), name)
    with open(local, 'rb') as f:
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
