"""Small inputs that claim huge sizes, and special files: each is refused up front with one line,
at a cost that follows the file, not its claims (training/data/dataset.py, training/data/sources.py,
fdm/loss.py). Children that could exhaust memory run under an address-space limit; children that
could hang run under a timeout."""

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from conftest import ROOT, one_line_error, run_train_cli, write_image_zip
from fdm.loss import warmup_clamp
from training.data.dataset import MAX_CLASSES, MAX_IMAGE_PIXELS, DatasetError, ImageFolderDataset

MEMORY_LIMIT = 3 << 30  # importing torch and the dataset code maps about 1.5 GiB of address space

#----------------------------------------------------------------------------
# Helpers: tiny PNGs, a PNG that is only a header, a zip written member by member.

def png(width=8, height=8, seed=0):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, [height, width, 3], dtype=np.uint8)).save(buf, format='PNG')
    return buf.getvalue()

# A PNG whose header announces width x height RGB pixels but holds almost no data: what a reader
# learns from the header costs nothing, decoding it would need width * height * 3 bytes.
def png_header(width, height):
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')

# Deflate data for `count` x 16 MiB of spaces, built from one compressed block repeated: ~4 GiB costs 4 MB.
def deflated_spaces(count):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b' ' * (1 << 24)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * count + compressor.flush(), count << 24

# A zip of (name, method, raw bytes, uncompressed size, crc) members, written by hand so that a
# member can claim (and hold) gigabytes that were never compressed here.
def write_raw_zip(path, members):
    local, central = b'', b''
    for name, method, raw, size, crc in members:
        header = struct.pack('<HHHHHIIIHH', 20, 0, method, 0, 0x21, crc, len(raw), size, len(name), 0)
        central += b'PK\x01\x02' + struct.pack('<H', 20) + header + struct.pack('<HHHII', 0, 0, 0, 0, len(local)) + name.encode()
        local += b'PK\x03\x04' + header + name.encode() + raw
    end = b'PK\x05\x06' + struct.pack('<HHHHIIH', 0, 0, len(members), len(members), len(central), len(local), 0)
    with open(path, 'wb') as f:
        f.write(local + central + end)
    return str(path)

def stored(name, data):
    return name, zipfile.ZIP_STORED, data, len(data), zlib.crc32(data)

def image_members(count=4):
    return [stored(f'img{i}.png', png(seed=i)) for i in range(count)]

def labels_json(labels):
    return json.dumps(dict(labels=labels)).encode()

def run_limited(args, timeout=60):
    """A script in a child process, under MEMORY_LIMIT and a timeout -> (exit status, output)."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS='1'))
    return result.returncode, result.stdout + result.stderr

def assert_one_line(status, output, *words):
    lines = [line for line in output.splitlines() if line.startswith('Error')]
    assert status == 1 and len(lines) == 1 and 'Traceback' not in output, output[-2000:]
    assert all(word in lines[0] for word in words), lines[0]

#----------------------------------------------------------------------------
# dataset.json that claims (and decompresses to) gigabytes: refused from its size.

def test_dataset_json_larger_than_the_dataset_needs_is_refused(tmp_path):
    raw, size = deflated_spaces(4)  # 64 MiB of spaces, then nothing: the file is not even JSON
    path = write_raw_zip(tmp_path / 'bomb.zip', image_members() + [('dataset.json', zipfile.ZIP_DEFLATED, raw, size, 0)])
    with pytest.raises(DatasetError, match='dataset.json .* is 67,108,864 bytes, more than'):
        ImageFolderDataset(path, use_labels=True)
    result = CliRunner().invoke(dataset_tool.main, ['--source', path, '--dest', str(tmp_path / 'out.zip')])
    assert result.exit_code == 1 and 'more than' in result.output and not os.path.exists(tmp_path / 'out.zip')

@pytest.mark.slow
@pytest.mark.parametrize('kind', ['zip', 'dir'])
@pytest.mark.parametrize('tool', ['train.py', 'dataset_tool.py'])
def test_gigabyte_dataset_json_costs_nothing(tmp_path, kind, tool):
    if kind == 'zip':  # 4 GiB in 4 MB
        raw, size = deflated_spaces(255)
        data = write_raw_zip(tmp_path / 'bomb.zip', image_members() + [('dataset.json', zipfile.ZIP_DEFLATED, raw, size, 0)])
    else:  # a sparse 5 GiB file
        data = tmp_path / 'bomb'
        data.mkdir()
        for name, _method, raw, _size, _crc in image_members():
            (data / name).write_bytes(raw)
        with open(data / 'dataset.json', 'wb') as f:
            f.truncate(5 << 30)
    args = ['-n', '--outdir', tmp_path / 'runs', '--data', data, '--cond=1'] if tool == 'train.py' else \
        ['--source', data, '--dest', tmp_path / 'out.zip']
    assert_one_line(*run_limited([tool, *args]), 'dataset.json', 'bytes, more than')

# Labels of 3 million entries fit in a small dataset.json of a large dataset: refused while parsing.
def test_label_vector_longer_than_the_class_limit_is_refused(tmp_path):
    long_label = [0] * (MAX_CLASSES + 1)
    labels = [['img0.png', long_label]] + [[f'img{i}.png', i] for i in range(1, 4)]
    path = write_raw_zip(tmp_path / 'long.zip', image_members() + [stored('dataset.json', labels_json(labels))])
    with pytest.raises(DatasetError, match="label of 'img0.png' .* 100,001 numbers, more than 100,000"):
        ImageFolderDataset(path, use_labels=True)
    result = CliRunner().invoke(dataset_tool.main, ['--source', path, '--dest', str(tmp_path / 'out.zip')])
    assert result.exit_code == 1 and '100,001 numbers' in result.output

#----------------------------------------------------------------------------
# Image sizes come from the headers, before any pixel is decoded.

def test_image_of_another_size_is_refused_at_open_naming_it(tmp_path):
    members = [stored(f'img{i:02d}.png', png(17, 17, seed=i)) for i in range(16)] + [stored('img99.png', png_header(9000, 9000))]
    with pytest.raises(DatasetError, match=r"'img99.png' has shape \[3, 9000, 9000\]"):
        ImageFolderDataset(write_raw_zip(tmp_path / 'mixed.zip', members))

# An image replaced after the dataset was opened (or never checked: a subset) is refused from
# its header when it is loaded; decoding this one would fail differently, or take 243 MB.
@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_image_of_another_size_is_refused_before_decoding(tmp_path, kind):
    folder = tmp_path / 'data'
    folder.mkdir()
    for i in range(4):
        (folder / f'img{i}.png').write_bytes(png(17, 17, seed=i))
    path = folder
    if kind == 'zip':
        path = tmp_path / 'data.zip'
        with zipfile.ZipFile(path, 'w') as z:
            for i in range(3):
                z.writestr(f'img{i}.png', png(17, 17, seed=i))
            z.writestr('img3.png', png_header(9000, 9000))
        dataset = ImageFolderDataset(path, max_size=3, random_seed=5)  # a subset that skips img3.png
        dataset._raw_idx[0] = 3  # as if the subset had drawn it
    else:
        dataset = ImageFolderDataset(path)
        (folder / 'img3.png').write_bytes(png_header(9000, 9000))
    idx = [int(i) for i in dataset._raw_idx].index(3)
    with pytest.raises(DatasetError, match="'img3.png' .* it is 9000x9000 but the dataset's images are 17x17"):
        dataset[idx]

def test_dataset_tool_refuses_images_beyond_the_pixel_limit_before_decoding(tmp_path):
    folder = tmp_path / 'src'
    folder.mkdir()
    (folder / 'a.png').write_bytes(png(32, 32))
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # just over: Pillow itself only warns up to twice the limit
    (folder / 'b.png').write_bytes(png_header(side, side))
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(folder), '--dest', str(tmp_path / 'out.zip'), '--resolution=16x16'])
    assert result.exit_code == 1 and f"'b.png': it is {side}x{side}, more than the 89,478,485 pixels" in result.output, result.output
    assert not os.path.exists(tmp_path / 'out.zip')

#----------------------------------------------------------------------------
# A FIFO (or device) named like an image or dataset.json is refused by name, never opened:
# opening a FIFO waits for a writer that never comes.

@pytest.mark.slow
@pytest.mark.parametrize('fifo', ['img9.png', 'dataset.json'])
@pytest.mark.parametrize('tool', ['train.py', 'fid.py', 'dataset_tool.py'])
def test_fifo_in_an_image_folder_is_refused_without_hanging(tmp_path, tool, fifo):
    folder = tmp_path / 'data'
    folder.mkdir()
    for name, _method, raw, _size, _crc in image_members():
        (folder / name).write_bytes(raw)
    os.mkfifo(folder / fifo)
    args = dict(zip(['train.py', 'fid.py', 'dataset_tool.py'], [
        ['-n', '--outdir', tmp_path / 'runs', '--data', folder, '--cond=1'],
        ['ref', '--data', folder, '--dest', tmp_path / 'ref.npz', '--detector=digits'],
        ['--source', folder, '--dest', tmp_path / 'out.zip']]))[tool]
    if tool == 'fid.py' and fifo == 'dataset.json':
        pytest.skip('fid.py never reads labels')
    assert_one_line(*run_limited([tool, *args]), f"'{fifo}'", 'FIFO')
    assert not os.path.exists(tmp_path / 'out.zip') and not os.path.exists(tmp_path / 'ref.npz')

@pytest.mark.slow
def test_fifo_as_the_source_archive_is_refused(tmp_path):
    os.mkfifo(tmp_path / 'cifar-10-python.tar.gz')
    status, output = run_limited(['dataset_tool.py', '--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'o.zip'])
    assert_one_line(status, output, 'FIFO')

#----------------------------------------------------------------------------
# The warmup clamp: the same values as the step-by-step product, and bounded memory for any setting.

@pytest.mark.parametrize('warmup_ite', [1, 7, 200, 1000])
def test_warmup_clamp_is_the_running_product(warmup_ite):
    ratio, value, expected = 100 ** (1 / warmup_ite), 5.0, []
    while value < 500:
        expected.append(value)
        value *= ratio
    got = [warmup_clamp(step, warmup_ite) for step in range(3000)]
    assert got == expected + [None] * (3000 - len(expected))

def test_warmup_below_one_step_clamps_only_the_first():
    assert warmup_clamp(0, 0.001) == 5.0 and warmup_clamp(1, 0.001) is None and warmup_clamp(0, 0.5) == 5.0

# The loss takes warmup_ite as given (its table has about warmup_ite entries); the bound is an
# option range, refused in one line before anything is built.
@pytest.mark.parametrize('warmup_ite', ['1e9', 'nan', 'inf', '-3'])
def test_unbounded_warmup_is_refused_as_an_option(tmp_path, warmup_ite):
    line = one_line_error(run_train_cli('--outdir', tmp_path, '--data', write_image_zip(tmp_path / 'd.zip'),
        f'--warmup_ite={warmup_ite}', '--dry-run'))
    assert '--warmup_ite' in line, line

#----------------------------------------------------------------------------
