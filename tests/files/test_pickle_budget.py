"""What unpickling a file from others may cost (torch_utils/io/safe_pickle.py): dict keys, set
items and memo indices whose hashes a file could make collide are refused before they are hashed,
and every load, storages pickled inside it included, has one memory budget proportional to the
bytes it has read. Each hostile case here took seconds to minutes, or a hundred times its size in
memory or more, before; now it is refused at once, with a one-line UnsafePickleError.
"""

import io
import pickle
import struct
import time
import tracemalloc
import zipfile

import pytest
import torch

from fdm.io.network_files import CheckpointError, load_network_file
from helpers import (NONE, assembled, op_bytes, op_call, op_dict, op_global, op_int, op_tuple, op_unicode,
    write_reference_pickle, write_reference_training_state)
from torch_utils.io import safe_pickle
from torch_utils.io.safe_pickle import MAX_INT_KEY, UnsafePickleError, restricted_load, restricted_load_torch_zip

P = 2**61 - 1  # CPython hashes an int n to n mod P (keeping its sign), so every k * P hashes to 0

def op_long(n):  # LONG1: an int of any size
    raw = n.to_bytes(n.bit_length() // 8 + 1, 'little', signed=True)
    return b'\x8a' + bytes([len(raw)]) + raw

def load(data):
    return restricted_load(io.BytesIO(data))

def peak_memory(fn):
    """The peak of Python's allocations while fn runs (an exception it raises is returned)."""
    tracemalloc.start()
    try:
        fn()
        outcome = None
    except Exception as err:
        outcome = err
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, outcome

#----------------------------------------------------------------------------
# Colliding keys: 20,000 took 5 s as one dict before (150,000: 12 minutes); every place a pickle
# can put a key refuses the first such key.

N = 20_000
KEYS = [op_long(k * P) for k in range(1, N + 1)]
COLLIDING = {
    'setitems': b'}(' + b''.join(k + NONE for k in KEYS) + b'u',
    'dict': b'(' + b''.join(k + NONE for k in KEYS) + b'd',
    'additems': b'\x8f(' + b''.join(KEYS) + b'\x90',
    'frozenset': b'(' + b''.join(KEYS) + b'\x91',
    'set-of-a-list': op_global('builtins', 'set') + b'](' + b''.join(KEYS) + b'e\x85R',  # protocol 2's set
    'memo-indices': NONE + b''.join(b'p' + str(k * P).encode() + b'\n' for k in range(1, N + 1)),
    'storage-inside': op_call('torch.storage', '_load_from_bytes',  # torch.load read these before
        op_bytes(assembled(b'}(' + b''.join(k + NONE for k in KEYS) + b'u'))),
}

def test_the_colliding_keys_collide():
    assert {hash(k * P) for k in range(1, 100)} == {0}

@pytest.mark.parametrize('case', sorted(COLLIDING))
def test_colliding_keys_are_refused_at_once(case):
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError, match='dict key or set item is an int outside|memo index') as info:
        load(assembled(COLLIDING[case]))
    assert time.perf_counter() - start < 0.5
    assert '\n' not in str(info.value)

# Other keys whose hash a file chooses: floats, tuples, frozensets. Names and parameter indices load.
@pytest.mark.parametrize('key', [b'G' + struct.pack('>d', 0.5), op_tuple(op_int(1), op_int(2)),
    b'(' + op_int(1) + b'\x91', NONE, b'\x88', op_int(-1), op_int(MAX_INT_KEY)], ids=['float', 'tuple', 'frozenset',
    'none', 'bool', 'negative', 'large-int'])
def test_keys_of_other_kinds_are_refused(key):
    with pytest.raises(UnsafePickleError, match='dict key or set item'):
        load(assembled(b'}' + key + NONE + b's'))

# hash() of a tuple nested 300,000 deep (a 300 KB pickle) crashed the interpreter, as a dict key
# here or in whatever hashed it after the load (a network's set of non-persistent buffer names).
@pytest.mark.parametrize('case', ['key', 'buffer-names'])
def test_deeply_nested_tuples_are_refused_before_anything_hashes_them(tmp_path, case):
    deep = b')' + b'\x85' * 300_000
    if case == 'key':
        with pytest.raises(UnsafePickleError, match='tuples nested more than 64 deep'):
            load(assembled(b'}' + deep + NONE + b's'))
        return
    state = op_dict((op_unicode('_non_persistent_buffers_set'), b'](' + deep + b'e'), (op_unicode('_parameters'), b'}'))
    meta = op_dict((op_unicode('type'), op_unicode('class')), (op_unicode('version'), op_int(6)),
        (op_unicode('class_name'), op_unicode('EDMPrecond')), (op_unicode('state'), state))
    record = op_call('torch_utils.persistence', '_reconstruct_persistent_obj', meta)
    path = tmp_path / 'deep.pkl'
    path.write_bytes(assembled(op_dict((op_unicode('ema'), record))))
    with pytest.raises(CheckpointError, match='tuples nested more than 64 deep'):
        load_network_file(path)

def test_names_and_parameter_indices_load():
    value = {'a': 1, b'b': 2, 0: 3, MAX_INT_KEY - 1: 4}
    assert load(pickle.dumps(dict(d=value, s={'x', 0}), protocol=2)) == dict(d=value, s={'x', 0})

def test_memo_index_out_of_order_is_refused():
    with pytest.raises(UnsafePickleError, match='memo index'):
        load(assembled(NONE + b'r' + struct.pack('<I', 70_000)))  # LONG_BINPUT into an empty memo

#----------------------------------------------------------------------------
# Memory: a stream of one-byte opcodes that each make an empty container (and a memo entry) cost
# 70 to 160 times its size before its refusal at the end; now the budget stops it early.

UNITS = {'set+memo': b'\x8f\x94', 'mixed+memo': b'}\x94]\x94)\x94\x8f\x94', 'marks': b'(', 'dicts': b'}'}

@pytest.mark.parametrize('unit', sorted(UNITS))
def test_empty_containers_stop_at_the_budget(monkeypatch, unit):
    monkeypatch.setattr(safe_pickle, 'BUDGET_FLOOR', 1 << 20)
    data = b'\x80\x04' + UNITS[unit] * ((2 << 20) // len(UNITS[unit])) + op_global('os', 'system') + b'.'  # 2 MB
    f = io.BytesIO(data)
    peak, err = peak_memory(lambda: restricted_load(f))
    assert isinstance(err, UnsafePickleError) and 'bytes of objects' in str(err), err
    assert f.tell() < len(data) // 16  # not at the global at its end
    assert peak < 2 * len(data)  # the floor (1 MB) and 32 bytes per byte read; it was 70 to 300 MB

def test_empty_containers_with_the_real_budget():
    data = b'\x80\x04' + b'\x8f\x94' * (3 << 20) + op_global('os', 'system') + b'.'  # 6 MB
    f = io.BytesIO(data)
    with pytest.raises(UnsafePickleError, match='bytes of objects'):
        restricted_load(f)
    assert f.tell() < 1 << 20  # about 64 MB of objects, where the whole file made 1.35 GB

# A bytearray is filled only with the bytes the file has, not the size it claims.
def test_bytearray_claiming_more_than_the_file_holds():
    peak, err = peak_memory(lambda: load(b'\x80\x05\x96' + struct.pack('<Q', 256 << 20) + b'.'))
    assert isinstance(err, pickle.UnpicklingError) and peak < 1 << 20

# Calls and container opcodes cannot fill a container around the key checks.
@pytest.mark.parametrize('case', ['ordereddict-of-pairs', 'easydict-extend', 'args-not-a-tuple'])
def test_containers_are_filled_only_by_checked_opcodes(case):
    pair = op_tuple(op_long(P), NONE)
    body = {
        'ordereddict-of-pairs': op_global('collections', 'OrderedDict') + b'](' + pair + b'e\x85R',
        'easydict-extend': op_call('dnnlib.util', 'EasyDict') + b'(' + op_unicode('extend')
            + op_global('builtins', 'set') + b'u(' + op_long(P) + b'e',  # APPENDS would call its 'extend': set
        'args-not-a-tuple': op_global('builtins', 'frozenset') + b']R',
    }[case]
    with pytest.raises(UnsafePickleError, match='from arguments|adds items to a EasyDict|not a tuple'):
        load(assembled(body))

# What an allowed function is given is charged, so a memoised list passed to it again and again
# costs its size each time: 10,000 frozensets of a list of 100,000 items are a 350 KB pickle.
def test_repeated_calls_on_a_memoised_argument_are_charged(monkeypatch):
    monkeypatch.setattr(safe_pickle, 'BUDGET_FLOOR', 1 << 20)
    items = b'](' + op_unicode('a') + b'\x94' + b'h\x00' * 100_000 + b'e\x85\x94'  # (['a'] * 100_001,): memo 1
    data = assembled(items + b'(' + (op_global('builtins', 'frozenset') + b'h\x01R') * 10_000 + b'l')
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError, match='bytes of objects'):
        load(data)
    assert time.perf_counter() - start < 1

#----------------------------------------------------------------------------
# The files of the reference load on the per-byte budget, with a floor of 64 KB for the first
# opcodes (a pickle's structure makes up to 26 bytes of objects per byte).

def test_reference_files_load_within_the_budget(monkeypatch, tmp_path, make_tiny_net):
    monkeypatch.setattr(safe_pickle, 'BUDGET_FLOOR', 64 << 10)
    net = make_tiny_net(augment_dim=9)
    write_reference_pickle(tmp_path / 'net.pkl', net)
    with open(tmp_path / 'net.pkl', 'rb') as f:
        assert isinstance(restricted_load(f)['ema'], safe_pickle.PersistentRecord)
    params = list(net.parameters())  # Adam's state_dict: the state of each parameter, keyed by its index
    state = {i: dict(step=torch.tensor(1.0), exp_avg=p.detach().clone(), exp_avg_sq=p.detach().square())
        for i, p in enumerate(params)}
    adam = dict(state=state, param_groups=[dict(lr=1e-3, betas=(0.9, 0.999), params=list(range(len(params))))])
    write_reference_training_state(tmp_path / 'state.pt', net, adam)
    state = restricted_load_torch_zip(tmp_path / 'state.pt')
    assert sorted(state['optimizer_state']['state']) == list(range(len(params)))

# A storage pickled inside a pickle, in either torch.save format, is read by the same unpickler;
# the legacy format's numel and bytes must agree.
@pytest.mark.filterwarnings('ignore:TypedStorage is deprecated')
@pytest.mark.parametrize('zip_format', [False, True])
def test_pickled_storage_is_read_by_the_unpickler(zip_format):
    buf = io.BytesIO()
    torch.save(torch.arange(5, dtype=torch.float64).storage(), buf, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue())) == zip_format
    storage = load(assembled(op_call('torch.storage', '_load_from_bytes', op_bytes(buf.getvalue()))))
    assert storage.dtype == torch.float64 and list(storage) == [0, 1, 2, 3, 4]

@pytest.mark.filterwarnings('ignore:TypedStorage is deprecated')
@pytest.mark.parametrize('damage', ['cut', 'numel'])
def test_legacy_storage_must_hold_its_numel(damage):
    buf = io.BytesIO()
    torch.save(torch.arange(5, dtype=torch.float64).storage(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    data_at = len(raw) - 5 * 8 - 8  # numel (int64), then 5 float64
    assert struct.unpack('<q', raw[data_at:data_at + 8]) == (5,)
    raw = raw[:-8] if damage == 'cut' else raw[:data_at] + struct.pack('<q', 1 << 40) + raw[data_at + 8:]
    with pytest.raises(UnsafePickleError, match='exactly 5 elements'):
        load(assembled(op_call('torch.storage', '_load_from_bytes', op_bytes(raw))))

#----------------------------------------------------------------------------

# Our own files (training states, snapshots) are read by the same unpickler: torch.load's, even
# with weights_only=True, spent 4.7 s on 20,000 int keys of one hash and minutes on 150,000.
def test_our_files_are_read_within_the_budget(tmp_path):
    from torch_utils.io.files import load_plain
    from torch_utils.errors import FileError
    torch.save(dict(format='fdm-training-state', state={k * (2**61 - 1): 0 for k in range(20000)}), tmp_path / 'state.pt')
    start = time.perf_counter()
    with pytest.raises(FileError, match=r'state\.pt: cannot be read .*; the file is damaged'):
        load_plain(tmp_path / 'state.pt', 'state.pt', 'resume from an earlier state')
    assert time.perf_counter() - start < 2.0  # measured: 0.04 s
    torch.save(dict(a=torch.arange(3), b=[1, 2.5, 'x'], c={0: torch.ones(2)}), tmp_path / 'plain.pt')
    loaded = load_plain(tmp_path / 'plain.pt', 'plain.pt', 'remedy')
    assert torch.equal(loaded['a'], torch.arange(3)) and loaded['b'] == [1, 2.5, 'x'] and torch.equal(loaded['c'][0], torch.ones(2))
