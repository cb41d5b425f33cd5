"""Unpickling of files made by the reference codebases (network and detector pickles) without
running anything they contain.

Such pickles store every object as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose meta holds the object's
*source code*, class name and state. `restricted_load` maps that call to a plain
`PersistentRecord` (the source is never executed), allows tensors and a handful of harmless
containers and numpy values, and refuses every other global with an error naming it.
"""

import collections
import io
import pickle

import numpy as np
import torch

import dnnlib

class UnsafePickleError(Exception):
    """A pickle that needs something outside the allow-list, or is malformed."""

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

ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _codecs_encode,
    ('numpy', 'dtype'): _numpy_dtype,
    ('torch', 'device'): torch.device,
}
for _module in ['numpy.core.multiarray', 'numpy._core.multiarray']:
    ALLOWED_GLOBALS[(_module, 'scalar')] = _numpy_scalar
for _name in ['ModuleDict', 'ModuleList', 'Sequential']:
    ALLOWED_GLOBALS[('torch.nn.modules.container', _name)] = PlainObject
for _name in ['float16', 'float32', 'float64', 'bfloat16', 'int64', 'int32', 'uint8', 'bool']:
    ALLOWED_GLOBALS[('torch', _name)] = getattr(torch, _name)

class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f'refusing to load: the pickle references {module}.{name}, which such a file '
                'never needs (it could run code)')
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError('refusing to load: the pickle uses persistent ids, which these files do not')

def restricted_load(f):
    """Unpickle with the allow-list. Raises UnsafePickleError for a refused global or a bad
    record, and lets other exceptions (damaged or truncated data) through for the caller to word."""
    return _RestrictedUnpickler(f).load()

#----------------------------------------------------------------------------
