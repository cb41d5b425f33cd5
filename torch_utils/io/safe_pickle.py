"""Unpickling of files made by others (the reference codebases' network and detector pickles,
the CIFAR-10 python batches) without running anything they contain.

Such pickles store every object as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose meta holds the object's
*source code*, class name and state. `restricted_load` maps that call to a plain
`PersistentRecord` (the source is never executed), allows tensors and a handful of harmless
containers and numpy values, and refuses every other global with an error naming it. `restricted_load(f, ARRAY_GLOBALS)`
reads plain numpy data (dicts, lists, strings, bytes and arrays) and nothing else.

Nothing a file does outlives its load, and nothing it builds can make numpy or torch read
memory they do not own: each load gets its own wrappers of the allowed functions, BUILD
(setting an object's state) works only on the few kinds of object the load itself created,
a numpy dtype is a plain numeric scalar type whose state never reaches numpy, and a tensor
must be dense (a stride-0 view of a few bytes would stand for gigabytes).

`restricted_load_torch_zip` reads a `torch.save` file (the reference's training states) with the
same unpickler: its storages are the only persistent ids allowed, each exactly the bytes its
zip member holds, of a storage type from a short list; the zip is checked before anything is read.
"""

import _compat_pickle
import collections
import importlib
import io
import os
import pickle
import re
import sys
import types
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils.io.files import is_dense

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
# numpy values: only plain numeric scalar dtypes. A pickle makes a dtype as numpy.dtype(typestr)
# and then sets its state (byte order, fields, flags) with BUILD; numpy trusts that state (a
# field offset past the end of the item is read at .item()), so the state goes to a
# _DtypeRequest instead, and a real dtype is made from the checked request when data needs it.

PLAIN_DTYPES = {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8'}

class _DtypeRequest:
    """numpy.dtype(typestr) as the pickle asked for it, with the state BUILD gives it."""
    def __init__(self, typestr, align=False, copy=True):
        if typestr not in PLAIN_DTYPES or not all(v in (0, 1) for v in (align, copy)):
            raise UnsafePickleError(f'refusing numpy dtype {typestr!r}: only plain numeric scalars '
                f'({", ".join(sorted(PLAIN_DTYPES))}) occur in these files')
        self.typestr, self.byteorder = typestr, '='

    # numpy's dtype state: (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata]).
    def set_state(self, state):
        plain = (None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4) and state[1] in '<>|='
                and state[2:8] == plain and state[8:] in ((), (None,))):
            raise UnsafePickleError(f'refusing a numpy dtype {self.typestr!r} with a structured, subarray or object state')
        self.byteorder = state[1]

    def resolve(self):
        dtype = np.dtype(self.typestr)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in '<>' else dtype

# A function, so that the pickle cannot allocate a request with NEWOBJ and skip the checks.
def _numpy_dtype(typestr, align=False, copy=True):
    return _DtypeRequest(typestr, align, copy)

def _dtype_of(request):
    if not isinstance(request, _DtypeRequest):
        raise UnsafePickleError('refusing numpy data without a numpy.dtype from the file')
    return request.resolve()

def _numpy_scalar(request, data=None):
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('refusing a numpy scalar that is not plain numeric data')
    return np.frombuffer(data, dtype=_dtype_of(request), count=1)[0]

class _ArrayClass:
    """What numpy.ndarray names in a pickle: an argument of _reconstruct, never called (with a
    buffer and an object dtype, numpy would take bytes of the file for object pointers)."""
    def __call__(self, *args, **kwargs):
        raise UnsafePickleError('refusing to call numpy.ndarray, which a pickle of plain arrays never does')

# Protocols <= 4 write an array as _reconstruct(ndarray, (0,), b'b'), then BUILD with its
# (version, shape, dtype, is_fortran, bytes); only that empty start is made here.
def _numpy_reconstruct(subtype, shape, typecode):
    if not isinstance(subtype, _ArrayClass) or shape != (0,) or typecode not in (b'b', 'b'):
        raise UnsafePickleError('refusing a numpy array that is not a plain numpy.ndarray')
    return _numpy_private('multiarray', '_reconstruct')(np.ndarray, (0,), b'b')

def _set_array_state(array, state):
    if isinstance(state, tuple) and len(state) == 4:
        state = (1,) + state
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple) and state[3] in (0, 1)
            and all(type(n) is int and n >= 0 for n in state[1]) and isinstance(state[4], (bytes, bytearray, str))):
        raise UnsafePickleError('refusing a numpy array state that is not (shape, dtype, order, bytes)')
    version, shape, request, is_fortran, raw = state
    dtype = _dtype_of(request)
    raw = raw.encode('latin1') if isinstance(raw, str) else raw  # a Python 2 str, read with latin1
    size = 1
    for n in shape:
        size *= n
    if size * dtype.itemsize != len(raw):
        raise UnsafePickleError(f'refusing a numpy array of shape {list(shape)} with {len(raw)} bytes of data')
    array.__setstate__((version, shape, dtype, is_fortran, raw))

# Protocol 5 writes an array as _frombuffer(buffer, dtype, shape, order).
def _numpy_frombuffer(buffer, request, shape, order):
    return _numpy_private('numeric', '_frombuffer')(buffer, _dtype_of(request), shape, order)

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

#----------------------------------------------------------------------------
# Tensors: torch's own rebuilders, called with checked arguments; a tensor must be dense, so that
# its elements are bytes of the file (which is what the digests and size budgets count).

def _load_storage_bytes(data):
    # The reference's `torch.storage._load_from_bytes` is a nested torch.load; we do it with
    # weights_only so the nested pickle is restricted too.
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)

def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.TypedStorage) or backward_hooks or metadata:
        raise UnsafePickleError('refusing a tensor that is not plain data (no storage, or with hooks or metadata)')
    tensor = torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
        collections.OrderedDict())
    if not is_dense(tensor):
        raise UnsafePickleError(f'refusing a tensor of shape {list(tensor.shape)} that is not stored densely '
            f'(strides {list(tensor.stride())})')
    return tensor

def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise UnsafePickleError('refusing a parameter that is not a plain tensor')
    return torch.nn.Parameter(data, bool(requires_grad))

#----------------------------------------------------------------------------
# The allow-list. Functions here are wrapped anew for every load (see _fresh); classes and torch
# dtypes are not, and BUILD never applies to them.

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
ARRAY_GLOBALS[('numpy', 'ndarray')] = _ArrayClass
for _module in ['numpy.core', 'numpy._core']:
    ARRAY_GLOBALS[(f'{_module}.multiarray', '_reconstruct')] = _numpy_reconstruct
    ARRAY_GLOBALS[(f'{_module}.numeric', '_frombuffer')] = _numpy_frombuffer

# The reference's network and detector pickles: persistence records, tensors and containers.
ALLOWED_GLOBALS = dict(_PLAIN_GLOBALS)
ALLOWED_GLOBALS.update({
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
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

# What one load sees of an allowed global: a new wrapper of each function (a file that sets
# __defaults__ or __dict__ on what it is given changes only this load's wrapper), a new
# _ArrayClass token, and the classes and torch dtypes themselves.
def _fresh(target):
    if target is _ArrayClass:
        return _ArrayClass()
    if isinstance(target, types.FunctionType):
        return lambda *args, **kwargs: target(*args, **kwargs)
    return target

# The objects whose state BUILD may set, all made by the load itself (none of these types is
# reachable otherwise): how to apply the state to each. A dict subclass's own attributes, as
# pickles of EasyDict and OrderedDict carry them, are plain entries of its __dict__.
def _set_instance_dict(inst, state):
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]
    if state is not None and not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise UnsafePickleError(f'refusing the state of a {type(inst).__name__}, which is not a dict of attributes')
    vars(inst).update(state or {})

_BUILD = {
    PersistentRecord: PersistentRecord.__setstate__,
    PlainObject: PlainObject.__setstate__,
    _DtypeRequest: _DtypeRequest.set_state,
    np.ndarray: _set_array_state,
    dnnlib.EasyDict: _set_instance_dict,
    collections.OrderedDict: _set_instance_dict,
}

class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes are a table we can change, unlike the C one's)
    with find_class on the allow-list, BUILD limited to _BUILD, and persistent ids only for the
    storages of a torch.save zip (`archive`), none otherwise."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, allowed, encoding, archive=None):
        super().__init__(f, encoding=encoding)
        self.allowed = {key: _fresh(target) for key, target in allowed.items()}
        if archive is not None:  # this load's own storage-type tokens
            self.allowed.update({('torch', name): _StorageType(name, dtype) for name, dtype in STORAGE_TYPES.items()})
        self.archive = archive

    # Protocols < 3 write Python 2 names (__builtin__.set); they are looked up as Python 3 names,
    # as pickle does, and named in errors as the file wrote them.
    def find_class(self, module, name):
        target = self.allowed.get((module, name))
        if target is None and self.proto < 3:
            target = self.allowed.get(_compat_pickle.NAME_MAPPING.get((module, name),
                (_compat_pickle.IMPORT_MAPPING.get(module, module), name)))
        if target is None:
            raise ForbiddenGlobalError(f'refusing to load: the pickle references {module}.{name}, which such a file '
                'never needs (it could run code)', f'{module}.{name}')
        return target

    def persistent_load(self, pid):
        if self.archive is None:
            raise UnsafePickleError('refusing to load: the pickle uses persistent ids, which these files do not')
        return self.archive.storage(pid)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        apply = _BUILD.get(type(inst))
        if apply is None:
            raise UnsafePickleError(f'refusing to load: the pickle sets the state of a {type(inst).__name__}, '
                'which these files never do')
        apply(inst, state)
    dispatch[pickle.BUILD[0]] = load_build

def restricted_load(f, allowed=ALLOWED_GLOBALS, encoding='ASCII'):
    """Unpickle with an allow-list (ALLOWED_GLOBALS or ARRAY_GLOBALS). Raises UnsafePickleError
    (ForbiddenGlobalError for a refused global) for anything outside it or a bad record, and lets
    other exceptions (damaged or truncated data) through for the caller to word. encoding:
    how Python 2 8-bit strings are decoded ('latin1' keeps numpy array bytes intact)."""
    return _RestrictedUnpickler(f, allowed, encoding).load()

#----------------------------------------------------------------------------
# torch.save files: a zip of <folder>/data.pkl and <folder>/data/<key>, the raw bytes of each
# storage, which data.pkl names by ('storage', storage type, key, location, numel). Storages are
# read to the CPU whatever their location.

STORAGE_TYPES = dict(FloatStorage=torch.float32, DoubleStorage=torch.float64, HalfStorage=torch.float16,
    BFloat16Storage=torch.bfloat16, LongStorage=torch.int64, IntStorage=torch.int32, ShortStorage=torch.int16,
    CharStorage=torch.int8, ByteStorage=torch.uint8, BoolStorage=torch.bool)

class _StorageType:
    """What torch.FloatStorage etc. name in data.pkl: the dtype of a persistent id, never called."""
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f'refusing to call torch.{self.name}, which a torch.save file never does')

class _TorchZip:
    """The members of a torch.save zip, checked before any is read: stored uncompressed, in one
    folder, no path tricks, each and all together no larger than the file; a storage is exactly
    the bytes of its member, and each is read once."""
    def __init__(self, zf, file_size):
        infos = zf.infolist()
        names = [info.filename for info in infos]
        tops = {name.split('/')[0] for name in names}
        if len(tops) != 1 or len(set(names)) != len(names):
            raise UnsafePickleError('not a torch.save file (its members are not in exactly one folder, once each)')
        for info in infos:
            parts = info.filename.split('/')
            if len(parts) < 2 or any(part in ('', '.', '..') for part in parts) or '\\' in info.filename:
                raise UnsafePickleError(f'refusing a torch.save member named {info.filename!r}')
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.compress_size != info.file_size:
                raise UnsafePickleError(f'refusing the compressed or encrypted torch.save member {info.filename!r}')
            if info.file_size > file_size:
                raise UnsafePickleError(f'the torch.save member {info.filename!r} claims more bytes than the file has')
        if sum(info.file_size for info in infos) > file_size:
            raise UnsafePickleError('the torch.save members claim more bytes than the file has')
        self.zf, self.top, self.members = zf, tops.pop(), set(names)
        if f'{self.top}/data.pkl' not in self.members:
            raise UnsafePickleError('not a torch.save file (no data.pkl)')
        byteorder = self.read('byteorder') if f'{self.top}/byteorder' in self.members else b'little'
        if byteorder.decode('ascii', 'replace') != sys.byteorder:
            raise UnsafePickleError(f'refusing a torch.save file of byte order {byteorder[:16]!r} on a '
                f'{sys.byteorder}-endian machine')
        self.storages = {}

    def read(self, name):
        return self.zf.read(f'{self.top}/{name}')

    def storage(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and re.fullmatch(r'[0-9A-Za-z_]{1,64}', pid[2]) and isinstance(pid[3], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise UnsafePickleError('refusing a persistent id that is not a torch storage (storage, type, key, location, numel)')
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            if f'{self.top}/data/{key}' not in self.members:
                raise UnsafePickleError(f'the torch.save file has no storage {key!r}')
            raw = bytearray(self.read(f'data/{key}'))
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise UnsafePickleError(f'storage {key!r} holds {len(raw)} bytes, not {numel} elements of {storage_type.dtype}')
            untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
            self.storages[key] = (storage_type.dtype, numel,
                torch.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True))
        dtype, size, storage = self.storages[key]
        if (dtype, size) != (storage_type.dtype, numel):
            raise UnsafePickleError(f'storage {key!r} is named with two different types or sizes')
        return storage

def restricted_load_torch_zip(path):
    """Load a torch.save file with the allow-list of restricted_load (storages come from the zip).
    Raises UnsafePickleError for what the allow-list or the zip checks refuse, and lets other
    exceptions (a damaged zip or pickle) through for the caller to word."""
    with open(path, 'rb') as f, zipfile.ZipFile(f) as zf:
        archive = _TorchZip(zf, os.fstat(f.fileno()).st_size)
        return _RestrictedUnpickler(io.BytesIO(archive.read('data.pkl')), ALLOWED_GLOBALS, 'ASCII', archive).load()

#----------------------------------------------------------------------------
