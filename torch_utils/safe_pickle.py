"""Unpickling of files made by others (the reference codebases' network and detector pickles,
the CIFAR-10 python batches) without running anything they contain.

Such pickles store every object as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose meta holds the object's
*source code*, class name and state. `restricted_load` maps that call to a plain
`PersistentRecord` (the source is never executed), allows tensors and a handful of harmless
containers and numpy values, and refuses every other global with an error naming it. `restricted_load(f, ARRAY_GLOBALS)`
reads plain numpy data (dicts, lists, strings, bytes and arrays) and nothing else.
"""

import collections
import importlib
import io
import pickle

import numpy as np
import torch

import dnnlib

class UnsafePickleError(Exception):
    """A pickle that needs something outside the allow-list, or is malformed."""

class ForbiddenGlobalError(UnsafePickleError):
    """A pickle that names a global outside the allow-list; `global_name` says which."""
    def __init__(self, message, global_name):
        super().__init__(message)
        self.global_name = global_name

#----------------------------------------------------------------------------
# What the reference's records and containers become.

class PersistentRecord:
    """`_reconstruct_persistent_obj(meta)`, as data: class name, version and state, never executed."""
    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class':
            raise UnsafePickleError('unsupported persistence record (expected type "class")')
        self.class_name = str(meta.get('class_name'))
        self.version = meta.get('version')
        self.state = meta.get('state') or {}
        if not isinstance(self.state, dict):
            raise UnsafePickleError(f'the record of {self.class_name} has no state dict')

    def __setstate__(self, state):  # a real record is complete when made; nothing may change it later
        raise UnsafePickleError('unexpected state applied to a persistence record')

# A function, not the class: the pickle may only call it (REDUCE), never allocate a bare
# record with NEWOBJ and skip the checks of __init__.
def _reconstruct_persistent_obj(meta):
    return PersistentRecord(meta)

class PlainObject:
    """A torch container module (ModuleDict etc.) pickled the ordinary way: keep its state."""
    state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

#----------------------------------------------------------------------------
# The allow-list.

def _load_storage_bytes(data):
    # The reference's `torch.storage._load_from_bytes` is a nested torch.load; we do it with
    # weights_only so the nested pickle is restricted too.
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)

def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('refusing a numpy scalar that is not plain numeric data')
    return np.frombuffer(data, dtype=dtype, count=1)[0]

def _numpy_dtype(*args, **kwargs):
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise UnsafePickleError('refusing a numpy object dtype')
    return dtype

def _codecs_encode(text, encoding='latin1'):
    # Pickle protocol 2 stores bytes as _codecs.encode(str, 'latin1'); nothing else is allowed.
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise UnsafePickleError('refusing _codecs.encode with anything but a latin1 string')
    return text.encode('latin1')

# numpy's private array rebuilders live in numpy._core from numpy 2 on, in numpy.core before.
def _numpy_private(module, name):
    try:
        return getattr(importlib.import_module(f'numpy._core.{module}'), name)
    except ImportError:
        return getattr(importlib.import_module(f'numpy.core.{module}'), name)

# Protocols <= 4 rebuild an array as _reconstruct(ndarray, shape, dtype) and then set its state;
# only a plain ndarray may be the class made.
def _numpy_reconstruct(subtype, *args):
    if subtype is not np.ndarray:
        raise UnsafePickleError('refusing a numpy array of a class other than numpy.ndarray')
    return _numpy_private('multiarray', '_reconstruct')(subtype, *args)

# Protocol 5 rebuilds an array from its buffer; the dtype came through _numpy_dtype.
def _numpy_frombuffer(*args):
    return _numpy_private('numeric', '_frombuffer')(*args)

# Plain values that both kinds of file may hold: bytes as protocol 2 writes them, numpy dtypes
# and scalars.
_PLAIN_GLOBALS = {
    ('_codecs', 'encode'): _codecs_encode,
    ('numpy', 'dtype'): _numpy_dtype,
}
for _module in ['numpy.core.multiarray', 'numpy._core.multiarray']:
    _PLAIN_GLOBALS[(_module, 'scalar')] = _numpy_scalar

# Plain data with numpy arrays (the CIFAR-10 batches, as written by Python 2 and 3, numpy 1 and 2).
ARRAY_GLOBALS = dict(_PLAIN_GLOBALS)
ARRAY_GLOBALS[('numpy', 'ndarray')] = np.ndarray
for _module in ['numpy.core', 'numpy._core']:
    ARRAY_GLOBALS[(f'{_module}.multiarray', '_reconstruct')] = _numpy_reconstruct
    ARRAY_GLOBALS[(f'{_module}.numeric', '_frombuffer')] = _numpy_frombuffer

# The reference's network and detector pickles: persistence records, tensors and containers.
ALLOWED_GLOBALS = dict(_PLAIN_GLOBALS)
ALLOWED_GLOBALS.update({
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('torch', 'device'): torch.device,
})
for _name in ['ModuleDict', 'ModuleList', 'Sequential']:
    ALLOWED_GLOBALS[('torch.nn.modules.container', _name)] = PlainObject
for _name in ['float16', 'float32', 'float64', 'bfloat16', 'int64', 'int32', 'uint8', 'bool']:
    ALLOWED_GLOBALS[('torch', _name)] = getattr(torch, _name)

class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, allowed, encoding):
        super().__init__(f, encoding=encoding)
        self.allowed = allowed

    def find_class(self, module, name):
        target = self.allowed.get((module, name))
        if target is None:
            raise ForbiddenGlobalError(f'refusing to load: the pickle references {module}.{name}, which such a file '
                'never needs (it could run code)', f'{module}.{name}')
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError('refusing to load: the pickle uses persistent ids, which these files do not')

def restricted_load(f, allowed=ALLOWED_GLOBALS, encoding='ASCII'):
    """Unpickle with an allow-list (ALLOWED_GLOBALS or ARRAY_GLOBALS). Raises UnsafePickleError
    (ForbiddenGlobalError for a refused global) for anything outside it or a bad record, and lets
    other exceptions (damaged or truncated data) through for the caller to word. encoding:
    how Python 2 8-bit strings are decoded ('latin1' keeps numpy array bytes intact)."""
    return _RestrictedUnpickler(f, allowed, encoding).load()

#----------------------------------------------------------------------------
