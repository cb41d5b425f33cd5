"""Fuzzing the network files others hand in: the only acceptable failure is a clear error.

Reference pickles (damaged, and hand-assembled ones that call dangerous functions, set state on
what the allow-list hands out, or build hostile dtypes and tensor strides), our snapshots and
training states. A crash with a traceback, a hang, or code execution (a marker file appearing)
fails a test. The examples per test: FDM_FUZZ_EXAMPLES, as in test_fuzz.py.
"""

import io
import json
import copyreg
import functools
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import damaged, fuzz, no_hang, write_file
from fdm.io.network_files import FORMAT_NAME, CheckpointError, load_network_file, save_snapshot
from fdm.preconditioning import PRECOND_CLASSES
from helpers import (NONE, assembled, attributes, guarded_objects, op_build, op_bytes, op_call, op_dict, op_dtype,
    op_global, op_int, op_tuple, op_unicode, write_reference_pickle)
from torch_utils import persistence
from torch_utils.io.files import is_dense, tensors_digest
from torch_utils.io.safe_pickle import ALLOWED_GLOBALS, ARRAY_GLOBALS, restricted_load
from training.checkpoint.training_state import find_resume_state, load_training_state, save_training_state

# The tiny denoiser of the snapshot tests (augmentation labels; every tensor made distinctive).
@pytest.fixture(scope='module')
def tiny(make_tiny_net):
    return functools.partial(make_tiny_net, augment_dim=9, wake=0.01)

#----------------------------------------------------------------------------
# Reference pickles: damaged real ones, and hand-assembled ones that try to call something.

@pytest.fixture(scope='module')
def marker(fuzz_dir):
    return str(fuzz_dir / 'MARKER')

@pytest.fixture(scope='module')
def valid_reference_pickle(fuzz_dir, marker, tiny):
    # The embedded source would create the marker if it were ever executed.
    path = fuzz_dir / 'ref.pkl'
    write_reference_pickle(path, tiny(), module_src=f'open({marker!r}, "w").write("pwned")\n')
    return path.read_bytes()

def assert_only_checkpoint_error(path, marker):
    try:
        load_network_file(path)
    except CheckpointError as err:
        assert 'Traceback' not in str(err)
    finally:
        assert not os.path.exists(marker), 'code from the file was executed'

@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_reference_pickle_damaged(fuzz_dir, valid_reference_pickle, marker, data):
    path = write_file(fuzz_dir / 'damaged.pkl', data.draw(damaged(valid_reference_pickle)))
    assert_only_checkpoint_error(path, marker)

# Callables an attacker would reach for, each with arguments that would create the marker.
def dangerous_calls(marker):
    code = f'open({marker!r}, "w").write("pwned")'
    return [
        ('os', 'system', [f'touch {marker}']), ('posix', 'system', [f'touch {marker}']),
        ('subprocess', 'call', [f'touch {marker}']), ('subprocess', 'getoutput', [f'touch {marker}']),
        ('builtins', 'exec', [code]), ('builtins', 'eval', [code]), ('__builtin__', 'eval', [code]),
        ('builtins', 'open', [marker, 'w']), ('io', 'open', [marker, 'w']), ('pathlib', 'Path', [marker]),
        ('builtins', 'getattr', [marker, 'x']), ('builtins', '__import__', ['os']), ('importlib', 'import_module', ['os']),
        ('torch', 'load', [marker]), ('numpy', 'load', [marker]), ('pickle', 'loads', [code]),
        ('torch.serialization', 'load', [marker]), ('runpy', 'run_path', [marker]), ('code', 'InteractiveInterpreter', []),
        ('torch_utils.persistence', '_reconstruct_persistent_obj', [code]),
        ('collections', 'OrderedDict', [code]), ('numpy', 'dtype', ['O']), ('numpy', 'dtype', [code]),
        ('torch._utils', '_rebuild_tensor_v2', [code, 'x']), ('torch.storage', '_load_from_bytes', [code]),
        ('numpy.core.multiarray', 'scalar', [code]), ('builtins', 'set', [code]),
    ]

@st.composite
def assembled_pickle(draw, marker):
    module, name, args = draw(st.sampled_from(dangerous_calls(marker)))
    style = draw(st.sampled_from(['reduce', 'inst', 'obj', 'newobj', 'build']))
    arg_ops = b''.join(op_unicode(a) for a in args)
    if style == 'reduce':
        call = op_global(module, name) + b'(' + arg_ops + b'tR'
    elif style == 'inst':
        call = b'(' + arg_ops + b'i' + module.encode() + b'\n' + name.encode() + b'\n'
    elif style == 'obj':
        call = b'(' + op_global(module, name) + arg_ops + b'o'
    elif style == 'newobj':
        call = op_global(module, name) + b'(' + arg_ops + b't\x81'
    else:  # BUILD with a state dict on a global
        call = op_global(module, name) + b'}' + op_unicode('x') + op_unicode(args[0] if args else 'y') + b's' + b'b'
    depth = draw(st.integers(0, 3))
    for _ in range(depth):  # bury it in lists and dicts
        call = b'(' + call + b'l' if draw(st.booleans()) else b'}' + op_unicode('k') + call + b's'
    body = b'}' + op_unicode(draw(st.sampled_from(['ema', 'loss_fn', 'dataset_kwargs']))) + call + b's'
    if draw(st.booleans()):  # the same call as the payload of a nested storage pickle
        inner = b'\x80\x02' + call + b'.'
        payload = b'B' + struct.pack('<I', len(inner)) + inner  # BINBYTES
        body = b'}' + op_unicode('ema') + op_global('torch.storage', '_load_from_bytes') + b'(' + payload + b'tRs'
    return b'\x80\x02' + body + b'.'

@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_reference_pickle_calls_nothing(fuzz_dir, marker, data):
    path = write_file(fuzz_dir / 'assembled.pkl', data.draw(assembled_pickle(marker)))
    with pytest.raises(CheckpointError):
        load_network_file(path)
    assert not os.path.exists(marker), 'code from the file was executed'

# Found by fuzzing: a record allocated with NEWOBJ (skipping its checks), changed by BUILD,
# or holding a state that is not a dict.
@pytest.mark.parametrize('case', ['newobj', 'build', 'state-list'])
def test_reference_pickle_record_that_bypasses_its_checks(fuzz_dir, case):
    call = op_global('torch_utils.persistence', '_reconstruct_persistent_obj')
    meta = lambda extra=b'': b'}(' + op_unicode('type') + op_unicode('class') + op_unicode('version') + b'K\x06' + extra + b'u'
    record = {'newobj': call + b'(' + meta() + b't\x81',
        'build': call + b'(' + meta() + b'tR}' + op_unicode('state') + b']sb',
        'state-list': call + b'(' + meta(op_unicode('state') + b'](K\x01e') + b'tR'}[case]
    path = write_file(fuzz_dir / f'{case}.pkl', b'\x80\x02}' + op_unicode('ema') + record + b's.')
    with pytest.raises(CheckpointError):
        load_network_file(path)

# Record trees of the reference format with hostile shapes: states that are not dicts, modules
# that are not records, non-tensors among parameters, cycles, records built with NEWOBJ/BUILD.
class Record:  # pickles as the reference's _reconstruct_persistent_obj(meta)
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)

def Container(state=None):  # pickled by TreePickler as a torch ModuleDict: NEWOBJ, then BUILD with `state`
    node = torch.nn.ModuleDict()
    node.fuzz_state = state
    return node

class TreePickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.ModuleDict) and hasattr(obj, 'fuzz_state'):
            return copyreg.__newobj__, (torch.nn.ModuleDict,), obj.fuzz_state
        return NotImplemented

def cyclic_container():
    node = Container()
    node.fuzz_state = {'_modules': {'me': node}, '_parameters': {}}
    return node

def cyclic_list():
    node = []
    node.append(node)
    return node

STATE_KEYS = ['_parameters', '_buffers', '_modules', '_non_persistent_buffers_set', '_init_args', '_init_kwargs', 'x']
leaves = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.booleans(),
    st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=2)), st.builds(cyclic_container), st.builds(cyclic_list))
metas = lambda state: st.fixed_dictionaries(dict(type=st.sampled_from(['class', 'class', 'x']), version=st.sampled_from([6, 6, 5]),
    class_name=st.sampled_from(['EDMPrecond', 'FDM_EDMPrecond', 'SongUNet', 'Backdoor']), state=state))
record_trees = st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(STATE_KEYS), c, max_size=4),
    st.builds(Container, st.dictionaries(st.sampled_from(STATE_KEYS), c, max_size=3)), st.builds(Record, metas(c))), max_leaves=12)

@fuzz
@given(ema=st.one_of(st.builds(Record, metas(record_trees)), record_trees), extra=st.dictionaries(
    st.sampled_from(['loss_fn', 'augment_pipe', 'dataset_kwargs']), record_trees, max_size=2))
@no_hang
def test_fuzz_reference_pickle_record_trees(fuzz_dir, marker, ema, extra):
    buf = io.BytesIO()
    TreePickler(buf, protocol=2).dump(dict(ema=ema, **extra))
    path = write_file(fuzz_dir / 'tree.pkl', buf.getvalue())
    with pytest.raises(CheckpointError):
        load_network_file(path)

#----------------------------------------------------------------------------
# Hand-assembled pickles that set state (BUILD) on what the allow-list hands out, build numpy
# dtypes with any state, and tensors with any offset, size and stride. The only acceptable
# outcomes: an error, or plain data (numeric dtypes, dense tensors) that can be read in full;
# and in either case every allowed global is as it was (nothing outlives the load).

ALL_GLOBALS = sorted(set(ALLOWED_GLOBALS) | set(ARRAY_GLOBALS))
ATTRIBUTES = ['__defaults__', '__kwdefaults__', '__dict__', '__class__', '__code__', '__setstate__', '__getattr__',
    '__reduce_ex__', 'state', 'typestr', 'byteorder', 'marker']
small_ints = st.one_of(st.integers(-2, 9), st.sampled_from([-1, 2**31 - 1, 2**40, -2**40, 2**62]))
plain_values = st.one_of(small_ints.map(op_int), st.just(NONE), st.text(max_size=3).map(op_unicode),
    st.binary(max_size=9).map(op_bytes), st.sampled_from(ALL_GLOBALS).map(lambda g: op_global(*g)))

@st.composite
def build_states(draw):
    attrs = op_dict(*[(op_unicode(draw(st.sampled_from(ATTRIBUTES))), draw(plain_values))
        for _ in range(draw(st.integers(0, 2)))])
    return draw(st.sampled_from([attrs, op_tuple(NONE, attrs), op_tuple(attrs, attrs), op_tuple(), draw(plain_values)]))

@st.composite
def dtypes(draw, depth=0):
    typestr = draw(st.sampled_from(['f8', 'f4', 'u1', 'i8', 'b1', 'V8', 'V0', 'O', 'U3', 'S2', 'M8[s]', 'c16', 'f8x']))
    if draw(st.integers(0, 3)) == 0:
        return op_call('numpy', 'dtype', op_unicode(typestr), draw(plain_values), draw(plain_values))
    inner = lambda: draw(dtypes(depth + 1)) if depth < 2 else op_dtype('f8')
    subarray = draw(st.sampled_from(['none', 'shape'])) if depth < 2 else 'none'
    names = draw(st.booleans())
    state = op_tuple(op_int(draw(st.sampled_from([3, 4, 5]))), op_unicode(draw(st.sampled_from('<>|=x'))),
        op_tuple(inner(), op_tuple(*[op_int(draw(small_ints))])) if subarray == 'shape' else NONE,
        op_tuple(op_unicode('a')) if names else NONE,
        op_dict((op_unicode('a'), op_tuple(inner(), op_int(draw(small_ints))))) if names else NONE,
        op_int(draw(small_ints)), op_int(draw(small_ints)), op_int(draw(st.integers(0, 0x7f))))
    return op_build(op_call('numpy', 'dtype', op_unicode(typestr), b'\x89', b'\x88'), state)

@st.composite
def numpy_values(draw):
    dtype, raw = draw(dtypes()), op_bytes(draw(st.binary(max_size=24)))
    shape = op_tuple(*[op_int(draw(small_ints)) for _ in range(draw(st.integers(0, 2)))])
    module = draw(st.sampled_from(['numpy.core', 'numpy._core']))
    kind = draw(st.sampled_from(['scalar', 'frombuffer', 'reconstruct', 'ndarray']))
    if kind == 'scalar':
        return op_call(f'{module}.multiarray', 'scalar', dtype, raw)
    if kind == 'frombuffer':
        return op_call(f'{module}.numeric', '_frombuffer', raw, dtype, shape, op_unicode(draw(st.sampled_from('CFx'))))
    if kind == 'ndarray':
        return op_call('numpy', 'ndarray', shape, dtype, raw)
    empty = op_call(f'{module}.multiarray', '_reconstruct', op_global('numpy', 'ndarray'),
        draw(st.sampled_from([op_tuple(op_int(0)), shape])), draw(st.sampled_from([op_bytes(b'b'), op_unicode('b'), dtype])))
    return op_build(empty, op_tuple(op_int(1), shape, dtype, draw(plain_values), raw))

@st.composite
def tensor_values(draw):
    buf = io.BytesIO()
    torch.save(torch.arange(draw(st.integers(0, 6)), dtype=torch.float32).untyped_storage(), buf)
    storage = op_call('torch.storage', '_load_from_bytes', op_bytes(buf.getvalue()))
    dims = lambda: op_tuple(*[op_int(draw(small_ints)) for _ in range(draw(st.integers(0, 3)))])
    hooks = draw(st.sampled_from([op_call('collections', 'OrderedDict'), op_dict((op_unicode('h'), op_int(1))), NONE]))
    metadata = draw(st.sampled_from([b'', NONE, op_dict(), op_dict((op_unicode('neg'), b'\x88'))]))
    tensor = (op_global('torch._utils', '_rebuild_tensor_v2') + b'(' + draw(st.sampled_from([storage, op_int(1)]))
        + op_int(draw(small_ints)) + dims() + dims() + draw(st.sampled_from([b'\x88', b'\x89'])) + hooks + metadata + b'tR')
    if draw(st.booleans()):
        tensor = op_call('torch._utils', '_rebuild_parameter', tensor, b'\x89', hooks)
    return tensor

hostile_objects = st.one_of(
    st.builds(lambda g, state: op_build(op_global(*g), state), st.sampled_from(ALL_GLOBALS), build_states()),
    st.builds(op_build, st.one_of(numpy_values(), tensor_values()), build_states()),
    numpy_values(), tensor_values())

# Everything reachable in a loaded tree is plain: read it all (a bad dtype would read out of bounds here).
def read_everything(node, depth=0):
    if depth > 20:
        return
    if isinstance(node, (np.ndarray, np.generic)):
        assert node.dtype.kind in 'biuf' and node.dtype.fields is None and node.dtype.subdtype is None, node.dtype
        node.tolist()
    elif isinstance(node, torch.Tensor):
        assert is_dense(node), (node.shape, node.stride())
        node.sum()
    elif isinstance(node, dict):
        for key, value in node.items():
            read_everything(key, depth + 1)
            read_everything(value, depth + 1)
    elif isinstance(node, (list, tuple, set, frozenset)):
        for value in node:
            read_everything(value, depth + 1)

# A tensor as a reference pickle and as torch.save store it: both must load the same after any example.
@pytest.fixture(scope='module')
def guard_tensor():
    tensor = torch.linspace(-1, 1, 5)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    return tensor, pickle.dumps(dict(t=tensor), protocol=2), saved.getvalue()

@fuzz
@given(objects=st.lists(hostile_objects, min_size=1, max_size=3), allowed=st.sampled_from(['network', 'arrays']))
@no_hang
def test_fuzz_pickle_state_dtypes_and_strides(fuzz_dir, guard_tensor, objects, allowed):
    before = {id(obj): (obj, attributes(obj)) for obj in guarded_objects()}
    data = assembled(b'(' + b''.join(objects) + b'l')  # a list of them
    if allowed == 'network':
        with pytest.raises(CheckpointError):
            load_network_file(write_file(fuzz_dir / 'state.pkl', assembled(op_dict((op_unicode('ema'), data[2:-1])))))
    else:
        try:
            loaded = restricted_load(io.BytesIO(data), ARRAY_GLOBALS, encoding='latin1')
        except Exception:  # every caller words any exception as its own one-line error
            loaded = None
        read_everything(loaded)
    changed = [repr(obj) for obj, attrs in before.values() if attributes(obj) != attrs]
    assert not changed, f'the pickle changed {changed}'
    tensor, pickled, saved = guard_tensor
    assert torch.equal(restricted_load(io.BytesIO(pickled))['t'], tensor)
    assert torch.equal(torch.load(io.BytesIO(saved), weights_only=True), tensor)

#----------------------------------------------------------------------------
# Our snapshots and training states: damaged bytes, and well-formed files with hostile fields.

@pytest.fixture(scope='module')
def valid_snapshot(fuzz_dir, tiny):
    save_snapshot(fuzz_dir / 'snap.pt', tiny())
    return (fuzz_dir / 'snap.pt').read_bytes()

@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_snapshot_damaged(fuzz_dir, valid_snapshot, marker, data):
    path = write_file(fuzz_dir / 'damaged.pt', data.draw(damaged(valid_snapshot)))
    assert_only_checkpoint_error(path, marker)

# One tiny network of each class, built once (the strategy below draws among them).
@pytest.fixture(scope='module')
def tiny_nets(tiny):
    return {name: tiny(name, **(dict(fdm_multiplier=2.0) if name.startswith('FDM_V') else {})) for name in sorted(PRECOND_CLASSES)}

kwarg_values = st.one_of(st.integers(-3, 40), st.integers(-2**40, 2**40), st.floats(), st.booleans(), st.none(),
    st.text(max_size=4), st.lists(st.integers(-2, 9), max_size=6), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

@st.composite
def hostile_snapshot(draw, nets):
    name = draw(st.sampled_from(sorted(nets)))
    net = nets[name]
    kwargs = dict(net.init_kwargs)
    for key in draw(st.lists(st.sampled_from(sorted(kwargs) + ['num_blocks', 'bogus', 'attn_resolutions']), max_size=3)):
        kwargs[key] = draw(kwarg_values)
    class_name = draw(st.sampled_from([name, name, name, 'Backdoor', 'os.system', '', 'torch.nn.Linear']))
    tensors = {k: v.clone() for k, v in net.state_dict().items()}
    for key in draw(st.lists(st.sampled_from(sorted(tensors)), max_size=2)):
        change = draw(st.sampled_from(['drop', 'reshape', 'dtype', 'rename']))
        if change == 'drop':
            tensors.pop(key, None)
        elif change == 'reshape':
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
        elif change == 'dtype':
            tensors[key] = tensors.get(key, torch.zeros(1)).to(draw(st.sampled_from([torch.float16, torch.int64, torch.bool])))
        else:
            tensors[key + '.x'] = tensors.pop(key, torch.zeros(1))
    description = dict(ema=dict(class_name=class_name, init_kwargs=kwargs), loss_fn=None, augment_pipe=None,
        dataset_kwargs=None, extra=None)
    text = draw(st.one_of(st.just(json.dumps(description)), st.text(max_size=20),
        st.builds(json.dumps, st.recursive(st.none() | st.integers() | st.text(max_size=4),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(['ema', 'class_name', 'init_kwargs']), c, max_size=3),
            max_leaves=6))))
    obj = dict(format=draw(st.sampled_from([FORMAT_NAME, FORMAT_NAME, 'x'])), version=draw(st.sampled_from([1, 1, 2, '1'])),
        description=text, ema=tensors, sha256=tensors_digest(tensors) if draw(st.integers(0, 5)) else 'bad')
    if draw(st.integers(0, 5)) == 0:
        obj[draw(st.sampled_from(sorted(obj)))] = draw(st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2)))
    return obj

@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_snapshot_fields(fuzz_dir, tiny_nets, data):
    obj = data.draw(hostile_snapshot(tiny_nets))
    torch.save(obj, fuzz_dir / 'hostile.pt')
    try:
        net = load_network_file(fuzz_dir / 'hostile.pt')['ema']
    except CheckpointError:
        return
    # Accepted: then it is exactly the stored network.
    for key, value in net.state_dict().items():
        assert torch.equal(value, obj['ema'][key].to(value.dtype))

@pytest.fixture(scope='module')
def valid_state(fuzz_dir, tiny):
    net = tiny()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 3, 8, 8), torch.ones(1), torch.zeros(1, 4), augment_labels=torch.zeros(1, 9)).sum().backward()
    optimizer.step()
    save_training_state(fuzz_dir / 'state.pt', cur_nimg=8, step=1, cur_tick=1, tick_start_nimg=8, nonfinite_total=0,
        seed=0, net=net.state_dict(), ema={k: v.clone() for k, v in net.state_dict().items()}, optimizer=optimizer.state_dict())
    return (fuzz_dir / 'state.pt').read_bytes()

@pytest.mark.slow
@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_training_state_damaged(fuzz_dir, valid_state, data):
    raw = data.draw(damaged(valid_state))
    run_dir = fuzz_dir / 'run'
    os.makedirs(run_dir, exist_ok=True)
    write_file(run_dir / 'training-state-000000.pt', valid_state)
    write_file(run_dir / 'training-state-000001.pt', raw)
    try:
        load_training_state(str(run_dir / 'training-state-000001.pt'))
        damaged_is_valid = True
    except CheckpointError:
        damaged_is_valid = False
    # A run directory resumes from the damaged file only if it passed every check, else the intact one.
    with pytest.warns(UserWarning, match='skipping training-state-000001.pt') if not damaged_is_valid else _no_warning():
        chosen, _state = find_resume_state(str(run_dir))
    assert os.path.basename(chosen) == ('training-state-000001.pt' if damaged_is_valid else 'training-state-000000.pt')

class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

#----------------------------------------------------------------------------
