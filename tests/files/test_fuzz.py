"""Fuzzing the data and options users hand in: the only acceptable failure is a clear error.

Dataset zips, folders and dataset.json (through train.py, then every item as training reads it),
FID reference .npz files, the --seeds/--cres list syntax, and pickles built to cost more than their
size. Network files (reference pickles, our snapshots and training states):
test_fuzz_network_files.py. A crash with a traceback or a hang fails a test.

Each test runs FDM_FUZZ_EXAMPLES examples (default 100, a fixed, derandomized sequence so CI
is reproducible); setting the variable also randomizes the examples, for long runs:

    FDM_FUZZ_EXAMPLES=5000 python -m pytest tests/files/test_fuzz.py tests/files/test_fuzz_network_files.py --hypothesis-show-statistics
"""

import io
import json
import os
import shutil
import struct
import tracemalloc
from unittest import mock

import click
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import train
from conftest import damaged, fuzz, no_hang, write_file, write_image_zip
from torch_utils.errors import EvaluationError
from torch_utils.io import safe_pickle
from training.evaluation.feature_stats import load_stats, save_stats
from training.config import MAX_LIST_ITEMS, parse_cres
from training.data.dataset import DatasetError, ImageFolderDataset
from training.evaluation.generation import parse_seeds

#----------------------------------------------------------------------------
# Datasets: train.py either accepts the data (and then every item reads, or fails with a
# DatasetError as training would report it) or prints one clean error line.

def check_dataset(path, out, cond):
    result = CliRunner().invoke(train.main, ['--outdir', str(out), '--data', str(path), f'--cond={int(cond)}',
        '--seed=0', '-n'])
    if result.exit_code != 0:
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        lines = [line for line in result.output.splitlines() if line.startswith('Error')]
        assert len(lines) == 1 and 'Traceback' not in result.output, result.output
        return
    dataset = ImageFolderDataset(path, use_labels=cond)
    try:
        for idx in range(len(dataset)):
            image, label = dataset[idx]
            assert image.dtype == np.uint8 and list(image.shape) == dataset.image_shape
            assert label.shape == tuple(dataset.label_shape)
    except DatasetError:
        pass
    finally:
        dataset.close()

@pytest.fixture(scope='module')
def valid_zip(fuzz_dir):
    path = write_image_zip(fuzz_dir / 'valid.zip', num_images=4, resolution=8)
    return open(path, 'rb').read()

@fuzz
@given(data=st.data(), cond=st.booleans())
@no_hang
def test_fuzz_dataset_zip(fuzz_dir, valid_zip, data, cond):
    path = write_file(fuzz_dir / 'damaged.zip', data.draw(damaged(valid_zip)))
    check_dataset(path, fuzz_dir / 'runs', cond)

def png_bytes(mode, width, height, seed):
    if mode == 'I;16':
        img = PIL.Image.new(mode, (width, height), seed % 7)
    else:
        rnd = np.random.RandomState(seed)
        channels = {'1': 1, 'L': 1, 'P': 1, 'LA': 2, 'RGB': 3, 'RGBA': 4}[mode]
        arr = (rnd.rand(height, width, channels) * 255).astype(np.uint8)
        img = PIL.Image.fromarray(arr[:, :, 0] if channels == 1 else arr, 'L' if channels == 1 else None).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()

file_contents = st.one_of(
    st.builds(png_bytes, st.sampled_from(['RGB', 'RGB', 'L', 'RGBA', 'LA', 'P', '1', 'I;16']),
        st.integers(1, 10), st.integers(1, 10), st.integers(0, 100)),
    st.builds(lambda b, n: b[:n], st.builds(png_bytes, st.just('RGB'), st.just(8), st.just(8), st.integers(0, 9)),
        st.integers(0, 200)),
    st.binary(max_size=64),
    st.builds(lambda v: json.dumps(v).encode(), st.recursive(st.none() | st.integers() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=10)),
)

@fuzz
@given(files=st.dictionaries(st.sampled_from(['a.png', 'b.png', 'sub/c.png', 'sub/deeper/d.PNG', 'e.jpg', '.f.png',
    'g.bmp', 'dataset.json', 'notes.txt', 'h.gif']), file_contents, min_size=1, max_size=5), cond=st.booleans())
@no_hang
def test_fuzz_dataset_folder(fuzz_dir, files, cond):
    folder = fuzz_dir / 'folder'
    shutil.rmtree(folder, ignore_errors=True)
    for name, content in files.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        write_file(folder / name, content)
    check_dataset(folder, fuzz_dir / 'runs', cond)

label_values = st.one_of(st.integers(-3, 12), st.integers(-2**70, 2**70), st.sampled_from([99999, 100000, 2**31, 2**40]),
    st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3), st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2)), max_size=4),
    st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
image_names = ['a.png', 'b.png', 'sub/c.png']
label_entries = st.lists(st.one_of(
    st.tuples(st.sampled_from(image_names + ['sub\\c.png', 'x.png', '']), label_values).map(list),
    st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3), st.none(), st.integers()), max_size=5)
dataset_json = st.one_of(
    st.builds(lambda labels: json.dumps(dict(labels=labels)), label_entries),
    st.builds(lambda label: json.dumps(dict(labels=[[n, label] for n in image_names])), label_values),
    st.builds(lambda v: json.dumps(v), st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(['labels', 'x']), c, max_size=2), max_leaves=8)),
    st.text(max_size=30),
)

@pytest.fixture(scope='module')
def image_folder(fuzz_dir):
    folder = fuzz_dir / 'labelled'
    os.makedirs(folder / 'sub')
    for i, name in enumerate(image_names):
        write_file(folder / name, png_bytes('RGB', 8, 8, i))
    return folder

@fuzz
@given(text=dataset_json, prefix=st.one_of(st.just(b''), st.just(b'\xef\xbb\xbf'), st.binary(max_size=3)))
@no_hang
def test_fuzz_dataset_json(fuzz_dir, image_folder, text, prefix):
    write_file(image_folder / 'dataset.json', prefix + text.encode('utf-8', 'surrogatepass'))
    check_dataset(image_folder, fuzz_dir / 'runs', cond=True)

# training/data/dataset.py is not ours: these are what fuzzing found there, for its owner. train.py
# turns each into a clear error already (see check_dataset).
READER_DAMAGE = ['zip-version-17-in-directory', 'bad-crc-dataset-json', 'utf8-flag-bad-name']

def damaged_zip(valid_zip, damage):
    raw = bytearray(valid_zip)
    central = raw.index(b'PK\x01\x02')  # the first central directory entry
    if damage == 'zip-version-17-in-directory':
        raw[central + 6:central + 8] = struct.pack('<H', 170)  # "version needed to extract": 17.0
    elif damage == 'bad-crc-dataset-json':
        pos = raw.index(b'"labels"')
        raw[pos + 1] ^= 0x20  # "labels" -> "Labels": the stored CRC no longer matches
    else:
        raw[central + 9] |= 0x08  # flag bit 11 (UTF-8 name), with a name that is not UTF-8
        raw[central + 46] = 0xff
    return bytes(raw)

@pytest.mark.parametrize('damage', READER_DAMAGE)
def test_known_dataset_reader_escapes(fuzz_dir, valid_zip, damage):
    path = write_file(fuzz_dir / f'{damage}.zip', damaged_zip(valid_zip, damage))
    with pytest.raises(DatasetError):
        ImageFolderDataset(path, use_labels=True)

@pytest.mark.parametrize('damage', READER_DAMAGE)
def test_known_dataset_reader_escapes_are_clean_errors_in_train_py(fuzz_dir, valid_zip, damage):
    path = write_file(fuzz_dir / f'{damage}.zip', damaged_zip(valid_zip, damage))
    check_dataset(path, fuzz_dir / 'runs', cond=True)

def test_known_dataset_reader_huge_label(fuzz_dir, image_folder):
    # A class index of 2^40 would make get_label allocate a 4 TiB one-hot vector.
    write_file(image_folder / 'dataset.json', json.dumps(dict(labels=[[n, 2**40] for n in image_names])).encode())
    with pytest.raises(DatasetError, match='classes'):
        ImageFolderDataset(image_folder, use_labels=True)

#----------------------------------------------------------------------------
# FID reference statistics (training.evaluation.feature_stats.load_stats, read-only here).

@pytest.fixture(scope='module')
def valid_npz(fuzz_dir):
    save_stats(fuzz_dir / 'ref.npz', np.arange(4.0), np.eye(4))
    return (fuzz_dir / 'ref.npz').read_bytes()

# load_stats lets zipfile's NotImplementedError (an unsupported compression method or
# "encrypted" flag in a damaged member header) and RuntimeError (encrypted member) escape; see
# test_known_npz_escapes. Any other escape fails this test.
@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_fid_npz_damaged(fuzz_dir, valid_npz, data):
    path = write_file(fuzz_dir / 'damaged.npz', data.draw(damaged(valid_npz)))
    try:
        mu, sigma = load_stats(path)
    except EvaluationError:
        return
    assert mu.ndim == 1 and sigma.shape == (mu.size, mu.size) and np.isfinite(sigma).all()

npz_arrays = st.one_of(
    st.builds(lambda shape, dtype: np.ones(shape, dtype=dtype), st.lists(st.integers(0, 5), max_size=3),
        st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.uint8, np.bool_, np.complex64, 'U3', 'S2', 'M8[s]', 'V4'])),
    st.builds(lambda v: np.array(v, dtype=object), st.lists(st.integers(), max_size=3)),
    st.builds(lambda shape, fill: np.full(shape, fill), st.lists(st.integers(1, 4), max_size=2), st.sampled_from([np.nan, np.inf, 1e308])),
)  # structured dtypes: see test_known_npz_escape_structured_dtype

@fuzz
@given(arrays=st.dictionaries(st.sampled_from(['mu', 'sigma', 'mu', 'sigma', 'x', 'arr_0']), npz_arrays, max_size=3))
@no_hang
def test_fuzz_fid_npz_arrays(fuzz_dir, arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = write_file(fuzz_dir / 'arrays.npz', buf.getvalue())
    try:
        mu, sigma = load_stats(path)
    except EvaluationError:
        return
    assert mu.dtype == np.float64 and mu.ndim == 1 and sigma.shape == (mu.size, mu.size)

def test_known_npz_escape_structured_dtype(fuzz_dir):
    buf = io.BytesIO()
    np.savez(buf, mu=np.zeros(2), sigma=np.zeros(2, dtype=[('a', 'f8'), ('b', 'i4')]))
    path = write_file(fuzz_dir / 'structured.npz', buf.getvalue())
    with pytest.raises(EvaluationError):
        load_stats(path)

def npz_with_flags(valid_npz, flag_bits=0, method=None):
    """The valid npz with its first member's central directory entry changed (flags, compression method)."""
    data = bytearray(valid_npz)
    entry = data.index(b'PK\x01\x02')
    data[entry + 8:entry + 10] = struct.pack('<H', struct.unpack('<H', data[entry + 8:entry + 10])[0] | flag_bits)
    if method is not None:
        data[entry + 10:entry + 12] = struct.pack('<H', method)
    return bytes(data)

@pytest.mark.parametrize('flags, method', [(1 << 6, None), (1 << 5, None), (0, 99), (1, None)],
    ids=['strong-encryption-flag', 'patched-data-flag', 'compression-99', 'encrypted-member'])
def test_known_npz_escapes(fuzz_dir, valid_npz, flags, method):
    path = write_file(fuzz_dir / 'flags.npz', npz_with_flags(valid_npz, flags, method))
    with pytest.raises(EvaluationError):
        load_stats(path)

#----------------------------------------------------------------------------
# The --seeds (generate.py) and --cres (train.py) list syntax: a list, or an error (then train.py refuses it too).

def reference_int_list(text):
    out = []
    for part in text.split(','):
        lo, _, hi = part.strip().partition('-')
        out += list(range(int(lo), int(hi or lo) + 1))
    return out

list_syntax = st.one_of(
    st.text(alphabet=st.sampled_from('0123456789,- \t\n+x.e_'), max_size=14),
    st.text(max_size=10),
    st.lists(st.tuples(st.integers(0, 300), st.one_of(st.none(), st.integers(0, 300)), st.sampled_from(['', ' '])),
        min_size=1, max_size=4).map(lambda parts: ','.join(f'{s}{a}{s}' if b is None else f'{a}{s}-{s}{b}' for a, b, s in parts)),
)

@fuzz
@given(text=list_syntax)
@no_hang
def test_fuzz_seeds_syntax(text):
    try:
        seeds = parse_seeds(text)
    except click.BadParameter:
        return
    assert seeds == reference_int_list(text)

@fuzz
@given(text=st.one_of(list_syntax, st.builds(lambda a, b: f'{a}-{b}', st.integers(0, 2**64), st.integers(0, 2**64))))
@no_hang
def test_fuzz_cres_syntax(fuzz_dir, valid_zip, text):
    try:
        cres = parse_cres(text)
    except ValueError:
        cres = None
    else:
        assert cres == reference_int_list(text) and 1 <= len(cres) <= MAX_LIST_ITEMS and 1 <= min(cres) <= max(cres) <= 64
    path = fuzz_dir / 'valid.zip'
    if not path.exists():
        write_file(path, valid_zip)
    result = CliRunner().invoke(train.main, ['--outdir', str(fuzz_dir / 'runs'), '--data', str(path), f'--cres={text}', '-n'])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    # The 8x8 images halve at each of the U-Net's levels below the first: at most 4 levels.
    assert (result.exit_code == 0) == (cres is not None and len(cres) <= 4), result.output

#----------------------------------------------------------------------------
# Pickles built to cost more than their size (torch_utils/io/safe_pickle.py): keys of every kind
# (colliding ints among them), memo entries and references to them, blocks of thousands of cheap
# opcodes, calls on memoised arguments. The only outcomes: a load within the budget, whose peak
# memory is at most twice the allowance, or the one-line UnsafePickleError.

FLOOR = 256 << 10  # the budget's floor for these small pickles
P = 2**61 - 1  # every k * P hashes to 0

def op_long(n):
    raw = n.to_bytes(n.bit_length() // 8 + 1, 'little', signed=True)
    return b'\x8a' + bytes([len(raw)]) + raw

def op_get(index):
    return b'j' + struct.pack('<I', index)  # LONG_BINGET

@st.composite
def pickled_keys(draw, memo):
    kind = draw(st.sampled_from(['str', 'bytes', 'int', 'int', 'colliding', 'float', 'tuple', 'none', 'ref']))
    if kind == 'ref' and memo[0]:
        return op_get(draw(st.integers(0, memo[0] - 1)))
    if kind == 'str':
        raw = draw(st.text(max_size=4)).encode('utf-8', 'surrogatepass')
        return b'\x8c' + bytes([len(raw)]) + raw
    if kind == 'bytes':
        raw = draw(st.binary(max_size=4))
        return b'C' + bytes([len(raw)]) + raw
    if kind == 'colliding':
        return op_long(draw(st.integers(1, 10**6)) * P)
    if kind == 'float':
        return b'G' + struct.pack('>d', draw(st.floats(allow_nan=False)))
    if kind == 'tuple':
        return b'K\x01K\x02\x86'
    if kind == 'none':
        return b'N'
    return op_long(draw(st.integers(-2, safe_pickle.MAX_INT_KEY + 2)))

# One value's opcodes (they push exactly one object); memo[0] counts the memo entries so far.
@st.composite
def pickled_values(draw, memo, depth=0):
    kinds = ['key', 'key', 'dict', 'list', 'set', 'tuple', 'block'] if depth < 3 else ['key']
    kind = draw(st.sampled_from(kinds))
    keys = lambda: b''.join(draw(st.lists(pickled_keys(memo), max_size=draw(st.sampled_from([4, 400])))))
    values = lambda: b''.join(draw(st.lists(pickled_values(memo, depth + 1), max_size=4)))
    if kind == 'key':
        out = draw(pickled_keys(memo))
    elif kind == 'dict':
        count = draw(st.integers(0, 4))
        items = b''.join(draw(pickled_keys(memo)) + draw(pickled_values(memo, depth + 1)) for _ in range(count))
        out = draw(st.sampled_from([b'}(' + items + b'u', b'(' + items + b'd']))
    elif kind == 'list':
        out = b'](' + values() + b'e'
    elif kind == 'set':
        style = draw(st.sampled_from(['additems', 'frozenset', 'call']))
        out = {'additems': b'\x8f(' + keys() + b'\x90', 'frozenset': b'(' + keys() + b'\x91',
            'call': b'cbuiltins\nset\n](' + keys() + b'e\x85R'}[style]
    elif kind == 'tuple':
        out = b'(' + values() + b't'
    else:  # a list of thousands of cheap opcodes: empty containers, references, calls on a memoised value
        pieces = [b'\x8f', b'}', b']', b')', b'N', b'\x8f\x94']
        if memo[0]:
            index = draw(st.integers(0, memo[0] - 1))
            pieces += [op_get(index), b'cbuiltins\nfrozenset\n' + op_get(index) + b'\x85R']
        piece, count = draw(st.sampled_from(pieces)), draw(st.integers(1, 20_000))
        memo[0] += count if piece == b'\x8f\x94' else 0
        out = b'(' + piece * count + b'l'
    if draw(st.booleans()):
        out += b'\x94'  # MEMOIZE
        memo[0] += 1
    return out

@fuzz
@given(data=st.data())
@no_hang
def test_fuzz_pickle_cost(data):
    raw = b'\x80\x04' + data.draw(pickled_values([0])) + b'.'
    f = io.BytesIO(raw)
    with mock.patch.object(safe_pickle, 'BUDGET_FLOOR', FLOOR):
        tracemalloc.start()
        try:
            safe_pickle.restricted_load(f)
        except safe_pickle.UnsafePickleError as err:
            assert '\n' not in str(err)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak <= 2 * (FLOOR + safe_pickle.BUDGET_PER_BYTE * len(raw)), (peak, len(raw))

#----------------------------------------------------------------------------
