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

Nor can a file make a load cost more than its size accounts for: every load has one budget of
memory (see _Budget), dict keys, set items and memo indices are of kinds whose hashes a file
cannot make collide, and tuples nest at most MAX_TUPLE_DEPTH deep (hash() of a deeper one can
crash the interpreter). A storage pickled inside a pickle is read by the same unpickler, on the
same budget.
"""

import _compat_pickle
import collections
import importlib
import io
import os
import pickle
import re
import struct
import sys
import types
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils.io.files import is_dense, open_regular

class UnsafePickleError(Exception):
    """A pickle that needs something outside the allow-list or the budget, or is malformed."""

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
        self.class_name = meta.get('class_name')
        if not isinstance(self.class_name, str):  # str() of whatever the file put there could cost anything
            raise UnsafePickleError('the persistence record has no class name')
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
        if not (isinstance(typestr, str) and typestr in PLAIN_DTYPES and all(v in (0, 1) for v in (align, copy))):
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

# The reference's `torch.storage._load_from_bytes(data)` is a nested torch.load of one storage.
# torch's unpickler would know nothing of the load's budget, so each load binds this name to its
# own reader (_RestrictedUnpickler.storage_from_bytes, see _fresh); this function is never called.
def _load_storage_bytes(data):
    raise UnsafePickleError('a pickled storage is read by the load that finds it')

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
# _ArrayClass token, its own storage reader, and the classes and torch dtypes themselves.
def _fresh(target, load):
    if target is _ArrayClass:
        return _ArrayClass()
    if target is _load_storage_bytes:
        return lambda data: load.storage_from_bytes(data)
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

#----------------------------------------------------------------------------
# What a load may cost. A small file can keep an unpickler busy or fill the memory: a dict whose
# keys' hashes collide is quadratic to build (150,000 ints k * (2**61 - 1), all of hash 0, are a
# 2 MB pickle that took minutes), and one-byte opcodes that each make an empty set and a memo
# entry cost over a hundred times their size in memory. Hence one budget per load, and keys of
# kinds whose hashes a file cannot choose.

# The reference's files make up to 26 bytes of objects per byte of their structure (a training
# state's data.pkl, protocol 2, which memoises every object), 3 per byte of tensor data.
BUDGET_PER_BYTE = 32  # bytes of objects a load may make per byte of pickle read so far ...
BUDGET_FLOOR = 64 << 20  # ... and this many more
OPCODE_COST = 8  # every opcode: a stack slot, and its time

class _Budget:
    """The memory a load has made (objects, container and memo entries, what the allowed functions
    return and what they are given to work through) against BUDGET_FLOOR + BUDGET_PER_BYTE times the
    bytes of pickle read so far. No opcode takes time out of proportion to its charge, so the time
    of a load is bounded by the file too. Nested loads (storages inside the pickle) share it."""
    def __init__(self):
        self.read = self.spent = 0
        self.limit = BUDGET_FLOOR  # the allowance when last computed; it only grows

    def charge(self, nbytes):
        self.spent += nbytes
        if self.spent > self.limit:
            self.limit = BUDGET_FLOOR + BUDGET_PER_BYTE * self.read
            if self.spent > self.limit:
                raise UnsafePickleError(f'refusing to load: its first {self.read:,} bytes make over {self.limit:,} '
                    'bytes of objects, far more than any file of this kind (it may be built to exhaust memory)')

class _MeteredFile:
    """The file as the unpickler reads it, counting its bytes into the budget."""
    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def read(self, n):
        data = self.f.read(n)
        self.budget.read += len(data)
        return data

    def readline(self):
        line = self.f.readline()
        self.budget.read += len(line)
        return line

# The bytes of memory an object holds itself, not what it refers to (charged when that is made).
# A tensor or storage counts its Python object only: its data is charged where it is made.
def _footprint(obj):
    kind = type(obj)  # the exact types a load makes (isinstance would cost more than the rest)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return 64 + 16 * obj.dim()  # its sizes and strides
    if kind is torch.TypedStorage or kind is torch.UntypedStorage:
        return 64
    return sys.getsizeof(obj)

# Dict keys and set items: str and bytes, which CPython hashes with a key drawn at start-up
# (SipHash), and ints in [0, MAX_INT_KEY), which hash to themselves: each has a slot of its own in
# a table of MAX_INT_KEY slots or more, and a smaller table bounds any probe sequence, so whatever
# keys and order a file chooses, a lookup costs at most a few thousand probes. Any other key (a
# large int, a float, a tuple, a frozenset) has a hash a file can choose, and keys of one hash make
# a dict quadratic to build (hash() of a deeply nested tuple even crashes the interpreter). The
# reference's files key dicts by names and by parameter indices (Adam's state), a few hundred.
MAX_INT_KEY = 4096
MAX_TUPLE_DEPTH = 64  # the reference's files nest tuples 2 deep (the sizes in a tensor's arguments)

def _check_keys(keys):
    for key in keys:
        if not (type(key) in (str, bytes) or (type(key) is int and 0 <= key < MAX_INT_KEY)):
            what = f'an int outside 0..{MAX_INT_KEY - 1}' if type(key) is int else f'a {type(key).__name__}'
            raise UnsafePickleError(f'refusing to load: a dict key or set item is {what}; these files key their '
                'dicts by names and small parameter indices')

# Opcodes that push an object they make, which is charged its footprint. The others push an object
# that exists (from the memo or the allow-list, or DUP), change one (charged where they are
# overridden below), or push nothing.
_MAKERS = {op[0] for op in (pickle.INT, pickle.BININT, pickle.BININT1, pickle.BININT2, pickle.LONG, pickle.LONG1,
    pickle.LONG4, pickle.FLOAT, pickle.BINFLOAT, pickle.STRING, pickle.BINSTRING, pickle.SHORT_BINSTRING,
    pickle.BINBYTES, pickle.SHORT_BINBYTES, pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.UNICODE, pickle.BINUNICODE,
    pickle.SHORT_BINUNICODE, pickle.BINUNICODE8, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
    pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.LIST, pickle.DICT, pickle.FROZENSET,
    pickle.READONLY_BUFFER)}

def _metered(load, makes):
    def step(self):
        load(self)
        budget = self.budget  # _Budget.charge, inlined: this runs for every opcode
        budget.spent += OPCODE_COST + _footprint(self.stack[-1]) if makes else OPCODE_COST
        if budget.spent > budget.limit:
            budget.charge(0)
    return step

_DICTS = (dict, collections.OrderedDict, dnnlib.EasyDict)

class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes are a table we can change, unlike the C one's)
    with find_class on the allow-list, BUILD limited to _BUILD, persistent ids only for the
    storages of a torch.save (`archive`), none otherwise, every call and every filling of a
    container checked, and every opcode charged to the load's budget."""
    dispatch = dict(pickle._Unpickler.dispatch)

    # A nested load (a storage pickled inside the pickle) reads bytes that its parent has counted,
    # and spends its parent's budget.
    def __init__(self, f, allowed, encoding, archive=None, budget=None):
        self.budget = budget or _Budget()
        super().__init__(f if budget else _MeteredFile(f, self.budget), encoding=encoding)
        self.allowed = {key: _fresh(target, self) for key, target in allowed.items()}
        if archive is not None:  # this load's own storage-type tokens
            self.allowed.update({('torch', name): _StorageType(name, dtype) for name, dtype in STORAGE_TYPES.items()})
        self.archive = archive
        self.tuple_depths = {}

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
        self.budget.charge(_footprint(state) + (sum(map(_footprint, state)) if type(state) is tuple else 0))
        apply(inst, state)
    dispatch[pickle.BUILD[0]] = load_build

    # Every call (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST). The arguments are a tuple, as a pickler
    # writes them (f(*x) of a tensor would make an object per element). A set or dict is made empty
    # and filled by the opcodes that check keys, or from a list of checked items, as protocol 2
    # writes a set. A call is charged what it is given to work through and what it returns.
    def call(self, func, args, kwargs=None, new=False):
        if type(args) is not tuple or not (kwargs is None or type(kwargs) is dict):
            raise UnsafePickleError('refusing to load: a call whose arguments are not a tuple, which no pickler writes')
        kwargs = kwargs or {}
        self.budget.charge(sum(map(_footprint, args)) + sum(map(_footprint, kwargs.values())))
        if isinstance(func, type) and issubclass(func, (set, frozenset, dict)) and (args or kwargs):
            if issubclass(func, dict) or kwargs or len(args) != 1 or type(args[0]) not in (list, tuple):
                raise UnsafePickleError(f'refusing to load: the pickle makes a {func.__name__} from arguments, '
                    'which these files never do')
            _check_keys(args[0])
        result = func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        self.budget.charge(_footprint(result))
        return result

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args, new=True)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args, kwargs, new=True)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # OBJ and INST (protocols 0 and 1) end here, and call as pickle does.
    def _instantiate(self, klass, args):
        new = not args and isinstance(klass, type) and not hasattr(klass, '__getinitargs__')
        self.append(self.call(klass, tuple(args), new=new))

    # SETITEM(S), APPEND(S) and ADDITEMS fill only the kind of container a pickler fills with them
    # (on anything else they would call whatever its append or add is, even an allowed function
    # stored in an EasyDict), keys checked first; each is charged what the container grows by.
    def fill(self, target, kinds, keys, load):
        if type(target) not in kinds:
            raise UnsafePickleError(f'refusing to load: the pickle adds items to a {type(target).__name__}, '
                'which these files never do')
        _check_keys(keys)
        before = sys.getsizeof(target)
        load(self)
        self.budget.charge(max(sys.getsizeof(target) - before, 0))

    def below_mark(self):
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def load_setitem(self):
        self.fill(self.stack[-3] if len(self.stack) >= 3 else None, _DICTS, self.stack[-2:-1],
            pickle._Unpickler.load_setitem)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        self.fill(self.below_mark(), _DICTS, self.stack[::2], pickle._Unpickler.load_setitems)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_append(self):
        self.fill(self.stack[-2] if len(self.stack) >= 2 else None, (list,), (), pickle._Unpickler.load_append)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        self.fill(self.below_mark(), (list,), (), pickle._Unpickler.load_appends)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_additems(self):
        self.fill(self.below_mark(), (set,), self.stack, pickle._Unpickler.load_additems)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_dict(self):
        _check_keys(self.stack[::2])  # key, value, key, value, ... since the mark
        pickle._Unpickler.load_dict(self)
    dispatch[pickle.DICT[0]] = load_dict

    def load_frozenset(self):
        _check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    # hash() of a tuple recurses through the tuples in it without the interpreter's depth check:
    # one nested 200,000 deep (a 200 KB pickle) crashes whatever caller hashes it. Tuples nest at
    # most MAX_TUPLE_DEPTH deep; the depth of each tuple that holds tuples is kept (with the tuple,
    # so that its id stays its own).
    def check_tuple(self):
        t = self.stack[-1]
        depth = 1 + max((self.tuple_depths.get(id(x), (x, 1))[1] for x in t if type(x) is tuple), default=0)
        if depth > MAX_TUPLE_DEPTH:
            raise UnsafePickleError(f'refusing to load: tuples nested more than {MAX_TUPLE_DEPTH} deep, which these '
                'files never hold')
        if depth > 1:
            before = sys.getsizeof(self.tuple_depths)
            self.tuple_depths[id(t)] = (t, depth)
            self.budget.charge(sys.getsizeof(self.tuple_depths) - before + 64)  # and the entry's tuple

    def load_tuple(self):
        pickle._Unpickler.load_tuple(self)
        self.check_tuple()
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self):
        pickle._Unpickler.load_tuple1(self)
        self.check_tuple()
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self):
        pickle._Unpickler.load_tuple2(self)
        self.check_tuple()
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self):
        pickle._Unpickler.load_tuple3(self)
        self.check_tuple()
    dispatch[pickle.TUPLE3[0]] = load_tuple3

    def load_mark(self):
        pickle._Unpickler.load_mark(self)
        self.budget.charge(64)  # a new stack, and a slot of the metastack
    dispatch[pickle.MARK[0]] = load_mark

    # A pickler numbers its memo entries 0, 1, 2, ... in order, so an index is at most the count so
    # far, and the memo's int keys never collide.
    def memoize(self, index):
        if not 0 <= index <= len(self.memo):
            raise UnsafePickleError('refusing to load: a memo index out of order, which no pickler writes')
        before = sys.getsizeof(self.memo)
        self.memo[index] = self.stack[-1]
        self.budget.charge(sys.getsizeof(self.memo) - before + 32)  # and the int of its key

    def load_put(self):
        self.memoize(int(self.readline()[:-1]))
    dispatch[pickle.PUT[0]] = load_put

    def load_binput(self):
        self.memoize(self.read(1)[0])
    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self):
        self.memoize(struct.unpack('<I', self.read(4))[0])
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_memoize(self):
        self.memoize(len(self.memo))
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    # bytearray(n) would fill the n bytes the file claims before reading them: read them first.
    def load_bytearray8(self):
        size, = struct.unpack('<Q', self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError('the pickle ends inside a bytearray')
        self.append(bytearray(data))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    dispatch = {code: _metered(load, code in _MAKERS) for code, load in dispatch.items()}

    def nested_load(self, f, archive):
        return _RestrictedUnpickler(f, {}, 'ASCII', archive, self.budget).load()

    # torch.storage._load_from_bytes(data): a torch.save of one storage, as a pickled tensor holds it
    # (the legacy format) or in the zip format, read with this load's unpickler and budget.
    def storage_from_bytes(self, data):
        if type(data) is not bytes:
            raise UnsafePickleError('refusing a pickled storage that is not bytes')
        self.budget.charge(len(data))  # the storage it becomes, which is no larger
        if data[:4] == b'PK\x03\x04':
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                archive = _TorchZip(zf, len(data))
                storage = self.nested_load(io.BytesIO(archive.read('data.pkl')), archive)
        else:
            storage = _read_legacy_storage(io.BytesIO(data), self.nested_load)
        if not isinstance(storage, torch.TypedStorage):
            raise UnsafePickleError('refusing a pickled storage that holds something else')
        return storage

def restricted_load(f, allowed=ALLOWED_GLOBALS, encoding='ASCII'):
    """Unpickle with an allow-list (ALLOWED_GLOBALS or ARRAY_GLOBALS), within the budget of
    _Budget. Raises UnsafePickleError (ForbiddenGlobalError for a refused global) for anything
    outside the allow-list or the budget, or a bad record, and lets other exceptions (damaged or
    truncated data) through for the caller to word. encoding: how Python 2 8-bit strings are
    decoded ('latin1' keeps numpy array bytes intact)."""
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
        storage_type, key, numel = _storage_id(pid)
        if key not in self.storages:
            if f'{self.top}/data/{key}' not in self.members:
                raise UnsafePickleError(f'the torch.save file has no storage {key!r}')
            raw = bytearray(self.read(f'data/{key}'))
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise UnsafePickleError(f'storage {key!r} holds {len(raw)} bytes, not {numel} elements of {storage_type.dtype}')
            self.storages[key] = (storage_type.dtype, numel, _typed_storage(raw, storage_type.dtype))
        dtype, size, storage = self.storages[key]
        if (dtype, size) != (storage_type.dtype, numel):
            raise UnsafePickleError(f'storage {key!r} is named with two different types or sizes')
        return storage

# ('storage', storage type, key, location, numel) -> (storage type, key, numel), or a refusal.
def _storage_id(pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and re.fullmatch(r'[0-9A-Za-z_]{1,64}', pid[2]) and isinstance(pid[3], str)
            and type(pid[4]) is int and pid[4] >= 0):
        raise UnsafePickleError('refusing a persistent id that is not a torch storage (storage, type, key, location, numel)')
    return pid[1], pid[2], pid[4]

def _typed_storage(raw, dtype):
    untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
    return torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

def restricted_load_torch_zip(path_or_file):
    """Load a torch.save file (a path, or a binary file open at its start) with the allow-list of
    restricted_load (storages come from the zip), within the unpickler's budget. Raises
    UnsafePickleError for what the allow-list, the budget or the zip checks refuse (and for a path
    that is not a regular file), and lets other exceptions (a damaged zip or pickle) through for
    the caller to word."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open_regular(path_or_file, 'give a torch.save file', error=UnsafePickleError) as f:
            return restricted_load_torch_zip(f)
    f = path_or_file
    start = f.tell()
    size = f.seek(0, os.SEEK_END) - start
    f.seek(start)
    with zipfile.ZipFile(f) as zf:
        archive = _TorchZip(zf, size)
        return _RestrictedUnpickler(io.BytesIO(archive.read('data.pkl')), ALLOWED_GLOBALS, 'ASCII', archive).load()

# A pickled storage in the legacy torch.save format (torch.save before torch 1.6, and what
# pickling a tensor still writes): pickles of the magic number, the protocol version and the
# system's byte order, then of the object (here one storage, the persistent id
# ('storage', type, key, location, numel, None)) and of the list of storage keys; then the
# storage as its numel (int64, little-endian) and its bytes.
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001

class _LegacyStorageId:
    """The persistent id of the one storage a legacy pickle of a storage names."""
    def __init__(self):
        self.id = None

    def storage(self, pid):
        if self.id is not None or not (isinstance(pid, tuple) and len(pid) == 6 and pid[5] is None):
            raise UnsafePickleError('refusing a pickled storage that is not one plain storage')
        self.id = _storage_id(pid[:5])
        return self

def _read_legacy_storage(f, load):
    ids = _LegacyStorageId()
    magic, protocol, info = load(f, ids), load(f, ids), load(f, ids)
    if not (type(magic) is int and magic == LEGACY_MAGIC and type(protocol) is int and protocol == LEGACY_PROTOCOL
            and type(info) is dict and info.get('little_endian') is (sys.byteorder == 'little')):
        raise UnsafePickleError('refusing a pickled storage that is not a torch.save of this byte order')
    if load(f, ids) is not ids or load(f, ids) != [ids.id[1]]:
        raise UnsafePickleError('refusing a pickled storage that is not one plain storage')
    storage_type, _key, numel = ids.id
    header, raw = f.read(8), bytearray(f.read())
    if len(header) != 8 or struct.unpack('<q', header)[0] != numel or len(raw) != numel * storage_type.dtype.itemsize:
        raise UnsafePickleError(f'the pickled storage does not hold exactly {numel} elements of {storage_type.dtype}')
    return _typed_storage(raw, storage_type.dtype)

#----------------------------------------------------------------------------
