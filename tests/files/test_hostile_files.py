"""Hostile files, built by hand: pickles that set the state of what the allow-list hands them or
build unsafe numpy dtypes, and snapshots and training states that are well-formed but lie
(a flipped description, stride-0 tensors, deep nesting, fields of the wrong type or size)."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import fdm
from conftest import ROOT
from fdm.io.network_files import FORMAT_NAME, CheckpointError, load_network_file, save_snapshot
from helpers import (FALSE, NONE, TRUE, assembled, attributes, guarded_objects, op_build, op_bytes, op_call, op_dict,
    op_dtype, op_global, op_int, op_tuple, op_unicode, write_reference_pickle)
from torch_utils.io.files import nested_digest, tensors_digest
from torch_utils.io.safe_pickle import ARRAY_GLOBALS, UnsafePickleError, restricted_load
from training.checkpoint.training_state import find_resume_state, load_training_state, save_training_state

# A tiny denoiser without attention: its tensors do not depend on img_resolution.
@pytest.fixture(scope='module')
def net(make_tiny_net):
    return make_tiny_net(attn_resolutions=(), wake=0.01)

def write(path, data):
    path.write_bytes(data)
    return path

def tensors(module):
    return {k: v.clone() for k, v in module.state_dict().items()}

#----------------------------------------------------------------------------
# 1. What a pickle does to the globals it is given must not outlive its load: BUILD on a
#    function, a class or a torch dtype is refused, and only this load's wrappers could change.

# Restores anything a hostile load changed (on the code before the fix), so no other test suffers.
@pytest.fixture
def guarded():
    before = {id(obj): (obj, attributes(obj)) for obj in guarded_objects()}
    yield before
    for obj, (defaults, kwdefaults, attrs) in before.values():
        if attributes(obj) != (defaults, kwdefaults, attrs):
            if hasattr(obj, '__defaults__'):
                obj.__defaults__, obj.__kwdefaults__ = defaults, kwdefaults
            for key in set(vars(obj)) - set(attrs) - {'__slotnames__'}:
                delattr(obj, key)
            for key, value in attrs.items():
                if vars(obj).get(key) is not value and not key.startswith('__'):
                    setattr(obj, key, value)

NEG = op_dict((op_unicode('neg'), TRUE))
HOSTILE_BUILDS = {
    # metadata=None -> {'neg': True}: every tensor torch rebuilds afterwards would be negated.
    'tensor-defaults': op_build(op_global('torch._utils', '_rebuild_tensor_v2'),
        op_tuple(NONE, op_dict((op_unicode('__defaults__'), op_tuple(NEG))))),
    'function-dict': op_build(op_global('torch_utils.persistence', '_reconstruct_persistent_obj'),
        op_dict((op_unicode('marker'), op_int(1)))),
    'kwdefaults': op_build(op_global('torch._utils', '_rebuild_parameter'),
        op_tuple(NONE, op_dict((op_unicode('__kwdefaults__'), op_dict((op_unicode('x'), op_int(1))))))),
    'class-attribute': op_build(op_global('dnnlib.util', 'EasyDict'), op_tuple(NONE, op_dict((op_unicode('marker'), op_int(1))))),
    'numpy-dtype': op_build(op_global('numpy', 'dtype'), op_tuple(NONE, op_dict((op_unicode('marker'), op_int(1))))),
}

@pytest.mark.parametrize('case', sorted(HOSTILE_BUILDS))
def test_state_set_on_an_allowed_global_does_not_outlive_the_load(tmp_path, net, guarded, case):
    write_reference_pickle(tmp_path / 'ref.pkl', net)
    save_snapshot(tmp_path / 'snap.pt', net)
    before = [tensors(load_network_file(tmp_path / name)['ema']) for name in ['ref.pkl', 'snap.pt']]
    hostile = write(tmp_path / 'hostile.pkl', assembled(op_dict((op_unicode('ema'), HOSTILE_BUILDS[case]))))
    with pytest.raises(CheckpointError):
        load_network_file(hostile)
    changed = [repr(obj) for obj, attrs in guarded.values() if attributes(obj) != attrs]
    assert not changed, f'the hostile file changed {changed}'
    for name, expected in zip(['ref.pkl', 'snap.pt'], before):
        after = tensors(load_network_file(tmp_path / name)['ema'])
        assert after.keys() == expected.keys() and all(torch.equal(after[k], expected[k]) for k in expected), name

#----------------------------------------------------------------------------
# 2. numpy dtypes: only plain numeric scalars; a dtype state never reaches numpy.

PLAIN_STATE = lambda order, flags=0, elsize=-1, names=NONE, fields=NONE: op_tuple(op_int(3), op_unicode(order), NONE, names,
    fields, op_int(elsize), op_int(-1 if elsize == -1 else 1), op_int(flags))
OOB_DTYPE = op_dtype('V8', PLAIN_STATE('|', elsize=8, names=op_tuple(op_unicode('a')),
    fields=op_dict((op_unicode('a'), op_tuple(op_dtype('f8'), op_int(2**40))))))  # a field 1 TiB past the item
OBJECT_DTYPE = op_dtype('V8', PLAIN_STATE('|', elsize=8, flags=0x3f))  # flags that say "holds object pointers"
OBJECT_FIELD_DTYPE = op_dtype('V8', PLAIN_STATE('|', elsize=8, names=op_tuple(op_unicode('a')),
    fields=op_dict((op_unicode('a'), op_tuple(OBJECT_DTYPE, op_int(0))))))
EMPTY_ARRAY = op_call('numpy.core.multiarray', '_reconstruct', op_global('numpy', 'ndarray'), op_tuple(op_int(0)), op_bytes(b'b'))
HOSTILE_NUMPY = {
    'out-of-bounds-field-scalar': op_call('numpy.core.multiarray', 'scalar', OOB_DTYPE, op_bytes(b'\0' * 8)),
    'object-field-array': op_call('numpy.core.numeric', '_frombuffer', op_bytes(b'A' * 8), OBJECT_FIELD_DTYPE,
        op_tuple(op_int(1)), op_unicode('C')),
    'object-flags-array': op_build(EMPTY_ARRAY, op_tuple(op_int(1), op_tuple(op_int(1)), OBJECT_DTYPE, FALSE, op_bytes(b'A' * 8))),
    'subarray-dtype': op_call('numpy.core.multiarray', 'scalar', op_dtype('V8', op_tuple(op_int(3), op_unicode('|'),
        op_tuple(op_dtype('f8'), op_tuple(op_int(2**20))), NONE, NONE, op_int(8), op_int(1), op_int(0))), op_bytes(b'\0' * 8)),
    'array-larger-than-its-data': op_build(EMPTY_ARRAY, op_tuple(op_int(1), op_tuple(op_int(2**20)), op_dtype('f8'), FALSE,
        op_bytes(b'\0' * 8))),
    'array-called-directly': op_call('numpy', 'ndarray', op_tuple(op_int(1)), op_unicode('O'), op_bytes(b'A' * 8)),
}

@pytest.mark.parametrize('case', sorted(HOSTILE_NUMPY))
def test_unsafe_numpy_values_are_refused(case):
    with pytest.raises(UnsafePickleError):
        restricted_load(io.BytesIO(assembled(HOSTILE_NUMPY[case])), ARRAY_GLOBALS, encoding='latin1')

def test_plain_numpy_values_still_load():
    values = dict(data=np.arange(12, dtype=np.uint8).reshape(3, 4), big=np.arange(3, dtype='>i4'), x=np.float64(0.5),
        flags=np.array([True, False]), half=np.ones(2, np.float16))
    for protocol in [2, 4, 5]:
        raw = pickle.dumps(values, protocol=protocol)
        loaded, expected = restricted_load(io.BytesIO(raw), ARRAY_GLOBALS), pickle.loads(raw)
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), (protocol, key)

def run_script(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
        timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))

def assert_one_line_error(proc):
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len([line for line in lines if line.startswith('Error')]) == 1 and 'Traceback' not in proc.stderr, lines
    return next(line for line in lines if line.startswith('Error'))

# generate.py used to crash with a segmentation fault (exit -11) reading the field at .item().
def test_generate_refuses_a_dtype_with_an_out_of_bounds_field(tmp_path):
    meta = op_dict((op_unicode('type'), op_unicode('class')), (op_unicode('version'), op_int(6)),
        (op_unicode('class_name'), op_unicode('EDMPrecond')), (op_unicode('state'), op_dict((op_unicode('_init_kwargs'),
        op_dict((op_unicode('img_resolution'), HOSTILE_NUMPY['out-of-bounds-field-scalar']))))))
    record = op_call('torch_utils.persistence', '_reconstruct_persistent_obj', meta)
    write(tmp_path / 'hostile.pkl', assembled(op_dict((op_unicode('ema'), record))))
    error = assert_one_line_error(run_script('generate.py', '--network', 'hostile.pkl', '--outdir', 'out', '--seeds', '0',
        cwd=tmp_path))
    assert 'numpy dtype' in error and not (tmp_path / 'out').exists()

def test_dataset_tool_refuses_a_cifar_batch_with_an_object_field(tmp_path):
    batch = assembled(op_dict((op_unicode('data'), HOSTILE_NUMPY['object-field-array']), (op_unicode('labels'), b']')))
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        for i in range(1, 6):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(batch)
            tar.addfile(info, io.BytesIO(batch))
    error = assert_one_line_error(run_script('dataset_tool.py', '--source', 'cifar-10-python.tar.gz', '--dest', 'out.zip', cwd=tmp_path))
    assert 'numpy dtype' in error and not (tmp_path / 'out.zip').exists()

#----------------------------------------------------------------------------
# 3. Our snapshots: the digest covers the description; version 1 files still load.

def test_snapshot_digest_covers_the_description(tmp_path, make_tiny_net):
    save_snapshot(tmp_path / 'snap.pt', make_tiny_net('EDMPrecond', sigma_data=0.5))
    raw = (tmp_path / 'snap.pt').read_bytes()
    pos = raw.index(b'"sigma_data": 0.5')
    flipped = bytearray(raw)
    flipped[pos + len(b'"sigma_data": 0.')] ^= 0x02  # one bit: 0.5 -> 0.7
    write(tmp_path / 'flipped.pt', bytes(flipped))
    with pytest.raises(CheckpointError, match='damaged'):  # the zip's CRC sees the flip first
        fdm.load_network(tmp_path / 'flipped.pt')
    # The same change written as a valid zip (the old digest kept): the digest sees it.
    data = torch.load(tmp_path / 'snap.pt', weights_only=True)
    data['description'] = data['description'].replace('"sigma_data": 0.5', '"sigma_data": 0.7')
    torch.save(data, tmp_path / 'changed.pt')
    with pytest.raises(CheckpointError, match='checksum mismatch'):
        fdm.load_network(tmp_path / 'changed.pt')

def test_snapshots_are_version_2_and_deterministic_and_version_1_still_loads(tmp_path, net):
    save_snapshot(tmp_path / 'a.pt', net)
    save_snapshot(tmp_path / 'b.pt', net)
    assert (tmp_path / 'a.pt').read_bytes() == (tmp_path / 'b.pt').read_bytes()
    data = torch.load(tmp_path / 'a.pt', weights_only=True)
    assert data['version'] == 2
    torch.save(dict(data, version=1, sha256=tensors_digest(data['ema'])), tmp_path / 'v1.pt')
    loaded = tensors(load_network_file(tmp_path / 'v1.pt')['ema'])
    assert all(torch.equal(loaded[k], v) for k, v in tensors(net).items())

# A version 1 snapshot by hand: the description is not covered by its digest.
def v1_snapshot(path, tensors_, description, digest=True):
    torch.save(dict(format=FORMAT_NAME, version=1, description=description, ema=tensors_,
        sha256=tensors_digest(tensors_) if digest else 'none'), path)
    return path

def describe(net, **changes):
    return json.dumps(dict(ema=dict(class_name=type(net).__name__, init_kwargs=dict(net.init_kwargs, **changes))))

# 2^40 float32 elements in 4 bytes: the digest used to materialise them (or fail with a traceback).
def stride0(numel=2**40):
    return torch.zeros(1).expand(numel)

def test_snapshot_with_a_stride0_tensor_is_refused_before_digesting(tmp_path, net):
    state = dict(tensors(net), extra=stride0())
    with pytest.raises(CheckpointError, match='not stored densely'):
        load_network_file(v1_snapshot(tmp_path / 'snap.pt', state, describe(net), digest=False))
    state = dict(tensors(net))
    shared = torch.zeros(1000)
    state.update({f'view{i}': shared[:] for i in range(100)})  # one storage, a hundred times
    with pytest.raises(CheckpointError, match='claim'):
        load_network_file(v1_snapshot(tmp_path / 'shared.pt', state, describe(net)))

# Its 2^40 elements used to count toward the construction budget of the network it describes.
def test_reference_pickle_with_a_stride0_tensor_is_refused(tmp_path, net):
    net = net.__class__(**net.init_kwargs)
    net.model.register_buffer('inflated', stride0(), persistent=True)
    write_reference_pickle(tmp_path / 'ref.pkl', net)
    with pytest.raises(CheckpointError, match='not stored densely'):
        load_network_file(tmp_path / 'ref.pkl')

def test_deeply_nested_description_is_one_error(tmp_path, net):
    path = v1_snapshot(tmp_path / 'deep.pt', tensors(net), '[' * 100000 + ']' * 100000)
    with pytest.raises(CheckpointError, match='description in the snapshot is damaged'):
        load_network_file(path)

@pytest.mark.parametrize('changes', [dict(img_resolution=32768), dict(img_resolution=7), dict(img_resolution=0),
    dict(img_resolution=8.0), dict(img_channels=5), dict(label_dim=-1)], ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_network_descriptions_beyond_any_real_network_are_refused(tmp_path, net, changes):
    with pytest.raises(CheckpointError, match=next(iter(changes))):
        load_network_file(v1_snapshot(tmp_path / 'snap.pt', tensors(net), describe(net, **changes)))

def test_reference_pickle_of_a_huge_resolution_is_refused(tmp_path, net):
    net = net.__class__(**net.init_kwargs)
    net.init_kwargs['img_resolution'] = 32768
    write_reference_pickle(tmp_path / 'ref.pkl', net)
    with pytest.raises(CheckpointError, match='img_resolution=32768'):
        load_network_file(tmp_path / 'ref.pkl')

#----------------------------------------------------------------------------
# 4. Training states: every field checked; a newer state that fails is skipped for an older one.

@pytest.fixture(scope='module')
def valid_fields(make_tiny_net):
    net = make_tiny_net(attn_resolutions=(), label_dim=0, wake=0.01)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 3, 8, 8), torch.ones(1)).sum().backward()
    optimizer.step()
    return dict(cur_nimg=8, step=1, cur_tick=1, tick_start_nimg=8, nonfinite_total=0, seed=0, net=net.state_dict(),
        ema=tensors(net), optimizer=optimizer.state_dict())

def deep(levels):
    node = []
    for _ in range(levels):
        node = [node]
    return node

# Each case: a change to a valid state, and the phrase of the check that must refuse it (its own
# check, not an earlier one it happens to trip).
BAD_FIELDS = {
    'cur_nimg-float': (lambda f: dict(cur_nimg=8.0), 'no valid cur_nimg'),
    'cur_nimg-string': (lambda f: dict(cur_nimg='8'), 'no valid cur_nimg'),
    'cur_nimg-bool': (lambda f: dict(cur_nimg=True, step=1, tick_start_nimg=0), 'no valid cur_nimg'),
    'cur_nimg-negative': (lambda f: dict(cur_nimg=-8), 'no valid cur_nimg'),
    'cur_nimg-1e13': (lambda f: dict(cur_nimg=10**13, tick_start_nimg=10**13), 'no valid cur_nimg'),
    'step-beyond-images': (lambda f: dict(step=9), 'inconsistent counters'),
    'seed-negative': (lambda f: dict(seed=-1), 'no valid seed'),
    'optimizer-groups-not-a-list': (lambda f: dict(optimizer=dict(f['optimizer'], param_groups=5)),
        'the optimizer state is not'),
    'optimizer-extra-key': (lambda f: dict(optimizer=dict(f['optimizer'], x=1)), 'the optimizer state is not'),
    'optimizer-entry-not-a-dict': (lambda f: dict(optimizer=dict(f['optimizer'], state={0: 5})), 'an entry that is not'),
    'optimizer-unknown-parameter': (lambda f: dict(optimizer=dict(f['optimizer'],
        param_groups=[dict(f['optimizer']['param_groups'][0], params=[10**6])])), 'one the network does not have'),
    'net-not-tensors': (lambda f: dict(net={'a': 5}), 'net is not a dict of named tensors'),
    'ema-other-shapes': (lambda f: dict(ema={k: v[:1] for k, v in f['ema'].items()}), 'differ in tensor names or shapes'),
    'deep-list': (lambda f: dict(optimizer=dict(f['optimizer'], param_groups=[dict(f['optimizer']['param_groups'][0],
        betas=deep(2000))])), 'other than numbers, flags and names'),
    'stride0-tensor': (lambda f: dict(net=dict(f['net'], **{k: torch.zeros(1).expand(v.shape) for k, v in f['net'].items()
        if v.numel() > 1})), 'not stored densely'),  # the right shapes, one stored element each
}

@pytest.mark.parametrize('case', sorted(BAD_FIELDS))
def test_resume_skips_a_state_with_a_wrong_field(tmp_path, valid_fields, case):
    save_training_state(tmp_path / 'training-state-000000.pt', **valid_fields)
    change, refusal = BAD_FIELDS[case]
    state = dict(format='fdm-training-state', version=2, **change(valid_fields))
    state.update({k: v for k, v in valid_fields.items() if k not in state})
    try:  # the digest our writer would give it, where there is one
        state['sha256'] = nested_digest(state)
    except (RecursionError, RuntimeError, ValueError):  # too deep, or too large to materialise
        state['sha256'] = 'none'
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)  # the pickler recurses once per level of the deep list
    try:
        torch.save(state, tmp_path / 'training-state-000001.pt')
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError) as info:
        load_training_state(str(tmp_path / 'training-state-000001.pt'))
    assert refusal in str(info.value), str(info.value)
    with pytest.warns(UserWarning, match='skipping training-state-000001.pt'):
        chosen, state = find_resume_state(str(tmp_path))
    assert os.path.basename(chosen) == 'training-state-000000.pt' and state['cur_nimg'] == 8

#----------------------------------------------------------------------------
