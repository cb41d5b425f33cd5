"""Dataset conversion (training/data/sources.py, training/data/writer.py, and the
dataset_tool.py command line) on tiny fake sources (CIFAR-10 tarball, MNIST idx, folders, zips)
written inside each test; every result is read back with training/data/dataset.py's ImageFolderDataset."""

import _codecs

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.data import writer as dataset_writer
from training.data.dataset import ImageFolderDataset
from torch_utils.errors import OptionError
from training.data.sources import parse_resolution
from training.data.writer import convert_dataset

#----------------------------------------------------------------------------
# Helpers.

def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)

def noise(shape, seed, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)

def run(*args):
    return CliRunner().invoke(dataset_tool.main, [str(arg) for arg in args])

def read_zip(path):
    """-> (names in archive order, {name: decoded PIL image}, parsed dataset.json, ZipInfo list)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        images = {}
        for name in names:
            if name.endswith('.png'):
                with PIL.Image.open(io.BytesIO(z.read(name))) as img:
                    img.load()
                    images[name] = img
        return names, images, json.loads(z.read('dataset.json')), z.infolist()

def pixels(img):
    return np.array(img)

def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert 'Traceback' not in result.output and result.exception is not None and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if 'Error: ' in line]
    assert len(errors) == 1 and errors[0].startswith('Error: '), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]

def png_is_stored(png):
    """True if the first IDAT holds a zlib stream at level 0 whose first block is stored."""
    idat = png[png.index(b'IDAT') + 4:]
    return idat[0] == 0x78 and (idat[1] >> 6) == 0 and ((idat[2] >> 1) & 3) == 0

#----------------------------------------------------------------------------
# Fake CIFAR-10: the real batches are Python 2 pickles (protocol 2) whose strings, including the
# array bytes, are 8-bit str opcodes and whose arrays name numpy.core.multiarray._reconstruct.
# Python 3 at protocol 2 writes every bytes object as _codecs.encode(str, 'latin1') instead.

class _Python2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack('<i', n) + obj)
        self.memoize(obj)
    dispatch[bytes] = _save_py2_str

def pickle_batch(obj, style):
    if style == 'py2':
        buf = io.BytesIO()
        _Python2Pickler(buf, protocol=2).dump(obj)
        raw = buf.getvalue().replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
        assert b'cnumpy.core.multiarray\n_reconstruct' in raw and b'_codecs' not in raw
        return raw
    if style == 'py3-2-bytes-keys': # re-pickled after pickle.load(encoding='bytes'), as the CIFAR-10 page loads it
        obj = {key.encode(): value.encode() if isinstance(value, str) else
            [v.encode() for v in value] if key == 'filenames' else value for key, value in obj.items()}
    raw = pickle.dumps(obj, protocol=int(style[4])) # 'py3-2', 'py3-4' or 'py3-5' (numpy >= 2 names)
    assert (b'c_codecs\nencode' in raw) == style.startswith('py3-2')
    return raw

def write_tar(path, members):
    with tarfile.open(path, 'w:gz') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)

def make_cifar(folder, per_batch=2, style='py2', batches=range(1, 6)):
    """-> (path, images [N, 32, 32, 3], labels); batch b holds images with labels (b + i) % 10."""
    os.makedirs(folder, exist_ok=True)
    members, images, labels = {}, [], []
    for b in batches:
        data = noise([per_batch, 3072], seed=b)
        batch_labels = [(b + i) % 10 for i in range(per_batch)]
        batch = {'batch_label': f'training batch {b} of 5', 'labels': batch_labels, 'data': data,
            'filenames': [f'img_{b}_{i}.png' for i in range(per_batch)]}
        members[f'cifar-10-batches-py/data_batch_{b}'] = pickle_batch(batch, style)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch_labels
    test_batch = {'labels': [0], 'data': np.zeros([1, 3072], np.uint8)}
    members['cifar-10-batches-py/test_batch'] = pickle_batch(test_batch, style)
    members['cifar-10-batches-py/readme.html'] = b'<html></html>'
    path = write_tar(os.path.join(folder, 'cifar-10-python.tar.gz'), members)
    return path, np.concatenate(images), labels

def make_mnist(folder, num=5, with_labels=True):
    os.makedirs(folder, exist_ok=True)
    images = noise([num, 28, 28], seed=7, low=1) # no zeros, so the padding is recognisable
    labels = np.arange(num, dtype=np.uint8) % 10
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz'), 'wb') as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack('>3I', num, 28, 28) + images.tobytes())
    if with_labels:
        with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz'), 'wb') as f:
            f.write(bytes([0, 0, 8, 1]) + struct.pack('>I', num) + labels.tobytes())
    return os.path.join(folder, 'train-images-idx3-ubyte.gz'), images, labels.tolist()

#----------------------------------------------------------------------------
# CIFAR-10.

@pytest.mark.parametrize('style', ['py2', 'py3-2', 'py3-2-bytes-keys', 'py3-4', 'py3-5'])
def test_cifar10_to_zip(tmp_path, style):
    source, images, labels = make_cifar(tmp_path / 'downloads' / 'cifar10', style=style)
    dest = tmp_path / 'datasets' / 'cifar10-32x32.zip' # datasets/ does not exist yet
    result = run(f'--source={source}', f'--dest={dest}')
    assert result.exit_code == 0, result.output
    names, decoded, meta, infos = read_zip(dest)
    expected_names = [f'00000/img{i:08d}.png' for i in range(10)]
    assert names == expected_names + ['dataset.json'] # dataset.json written last, test_batch ignored
    assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
    with zipfile.ZipFile(dest) as z:
        assert png_is_stored(z.read(expected_names[0]))
    for i, name in enumerate(expected_names):
        assert decoded[name].mode == 'RGB' and decoded[name].size == (32, 32)
        np.testing.assert_array_equal(pixels(decoded[name]), images[i])
    assert meta == {'labels': [[name, label] for name, label in zip(expected_names, labels)]}
    assert sorted(os.listdir(tmp_path / 'datasets')) == ['cifar10-32x32.zip'] # no temporary left

    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 10 and ds.image_shape == [3, 32, 32] and ds.label_dim == max(labels) + 1
    image, onehot = ds[3]
    np.testing.assert_array_equal(image, images[3].transpose(2, 0, 1))
    assert onehot.argmax() == labels[3]
    ds.close()

def test_cifar10_max_images_spans_batches(tmp_path):
    source, images, labels = make_cifar(tmp_path)
    assert convert_dataset(source, tmp_path / 'out.zip', max_images=3).num_images == 3
    names, decoded, meta, _ = read_zip(tmp_path / 'out.zip')
    assert names[:-1] == [f'00000/img{i:08d}.png' for i in range(3)]
    np.testing.assert_array_equal(pixels(decoded['00000/img00000002.png']), images[2]) # first image of batch 2
    assert [label for _, label in meta['labels']] == labels[:3]

# Protocol 2 as well as 4: allowing _codecs.encode for protocol 2's bytes must not let anything else in.
@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('attack', ['os.system', 'builtins.exec', 'builtins.eval', '_codecs.decode'])
def test_cifar10_malicious_pickle_is_refused_without_running(tmp_path, attack, protocol):
    marker = tmp_path / 'pwned'
    class Payload:
        def __reduce__(self):
            if attack == 'os.system':
                return (os.system, (f'touch {marker}',))
            if attack == '_codecs.decode':
                return (_codecs.decode, (b'x', 'latin1'))
            code = f'open({str(marker)!r}, "w").close()'
            return (exec, (code,)) if attack == 'builtins.exec' else (eval, (f'exec({code!r})',))
    good = {'labels': [0], 'data': np.zeros([1, 3072], np.uint8)}
    evil = {'labels': [0], 'data': Payload()}
    members = {f'cifar-10-batches-py/data_batch_{b}': pickle.dumps(evil if b == 2 else good, protocol=protocol) for b in range(1, 6)}
    source = write_tar(tmp_path / 'cifar-10-python.tar.gz', members)
    dest = tmp_path / 'out' / 'cifar.zip'
    result = run('--source', source, '--dest', dest)
    assert_one_line_error(result, 'data_batch_2', 'refusing to unpickle')
    # The error names the global as the pickle wrote it: os.system is posix.system on Linux, and
    # protocol 2 writes builtins as __builtin__.
    written = {'os.system': ['posix.system', 'os.system'], '_codecs.decode': ['_codecs.decode']}.get(attack,
        [attack, attack.replace('builtins.', '__builtin__.')])
    assert any(f'asks to load {name},' in result.stderr for name in written), result.stderr
    assert not marker.exists()
    assert not (tmp_path / 'out').exists()

# _codecs.encode is allowed only as protocol 2 uses it (a latin1 str to bytes), not as a general codec call.
def test_cifar10_codecs_encode_with_another_codec_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (_codecs.encode, ('text', 'rot13'))
    members = {f'cifar-10-batches-py/data_batch_{b}': pickle.dumps({'labels': [0], 'data': Payload()}, protocol=2) for b in range(1, 6)}
    source = write_tar(tmp_path / 'cifar-10-python.tar.gz', members)
    assert_one_line_error(run('--source', source, '--dest', tmp_path / 'out' / 'cifar.zip'), 'data_batch_1', 'latin1', 'refusing to unpickle')
    assert not (tmp_path / 'out').exists()

def test_cifar10_bad_archives(tmp_path):
    source, _, _ = make_cifar(tmp_path / 'a', batches=range(1, 5))
    assert_one_line_error(run('--source', source, '--dest', tmp_path / 'out' / 'x.zip'), "no member 'cifar-10-batches-py/data_batch_5'")
    os.makedirs(tmp_path / 'b')
    (tmp_path / 'b' / 'cifar-10-python.tar.gz').write_bytes(b'not a gzip file')
    assert_one_line_error(run('--source', tmp_path / 'b' / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out' / 'x.zip'), 'Cannot read')
    members = {f'cifar-10-batches-py/data_batch_{b}': pickle.dumps({'labels': [0], 'data': np.zeros([1, 10], np.uint8)}) for b in range(1, 6)}
    source = write_tar(tmp_path / 'cifar-10-python.tar.gz', members)
    assert_one_line_error(run('--source', source, '--dest', tmp_path / 'out' / 'x.zip'), "no uint8 'data' array")
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
# MNIST.

@pytest.mark.parametrize('with_labels', [True, False])
def test_mnist_padded_to_32(tmp_path, with_labels):
    source, images, labels = make_mnist(tmp_path / 'mnist', with_labels=with_labels)
    dest = tmp_path / 'mnist.zip'
    summary = convert_dataset(source, dest)
    assert (summary.num_images, summary.resolution, summary.channels, summary.class_folders) == (5, 32, 1, None)
    assert (summary.labels, summary.label_dim) == (('classes', max(labels) + 1) if with_labels else (None, 0))
    assert summary.dest == str(dest)
    _names, decoded, meta, _ = read_zip(dest)
    first = decoded['00000/img00000000.png']
    assert first.mode == 'L' and first.size == (32, 32)
    array = pixels(first)
    np.testing.assert_array_equal(array[2:30, 2:30], images[0])
    assert array[:2].max() == 0 and array[30:].max() == 0 and array[:, :2].max() == 0 and array[:, 30:].max() == 0
    ds = ImageFolderDataset(dest, use_labels=with_labels)
    assert ds.image_shape == [1, 32, 32]
    if with_labels:
        assert [label for _, label in meta['labels']] == labels
        assert [ds.get_details(i).raw_label for i in range(5)] == labels
    else:
        assert meta == {'labels': None}
    ds.close()

#----------------------------------------------------------------------------
# Folders and zips.

def test_folder_class_subfolders_to_folder(tmp_path):
    src = tmp_path / 'afhq'
    write_png(src / 'dog' / 'b.png', noise([8, 8, 3], 1))
    write_png(src / 'cat' / 'a.png', noise([8, 8, 3], 2))
    write_png(src / 'wild' / 'deeper' / 'c.png', noise([8, 8, 3], 3)) # labelled by its top-level folder
    write_png(src / 'cat' / 'b.png', noise([8, 8, 3], 4))
    (src / 'cat' / 'notes.txt').write_text('not an image')
    dest = tmp_path / 'out'
    dest.mkdir() # an existing empty folder is accepted
    result = run('--source', src, '--dest', dest)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ['afhq', 'out'] # no temporary sibling left
    # The closing summary, after the progress bar: what was written, each class folder's label, where.
    assert result.stdout.splitlines()[-3:] == ['4 images, 8x8, 3 channels, labels: 3 classes',
        'classes from folders: cat -> 0, dog -> 1, wild -> 2', f'written to {dest}']
    meta = json.loads((dest / 'dataset.json').read_text())
    # Sorted sources: cat/a, cat/b, dog/b, wild/deeper/c -> classes cat=0, dog=1, wild=2.
    assert meta == {'labels': [[f'00000/img{i:08d}.png', label] for i, label in enumerate([0, 0, 1, 2])]}
    with PIL.Image.open(dest / '00000' / 'img00000002.png') as img:
        assert img.mode == 'RGB'
        np.testing.assert_array_equal(pixels(img), noise([8, 8, 3], 1))
    ds = ImageFolderDataset(dest, use_labels=True)
    assert [ds.get_details(i).raw_label for i in range(4)] == [0, 0, 1, 2] and ds.label_dim == 3

@pytest.mark.parametrize('layout', ['one-subfolder', 'root-image'])
def test_folder_without_class_labels(tmp_path, layout):
    src = tmp_path / 'src'
    write_png(src / 'only' / 'a.png', noise([8, 8], 1))
    write_png(src / ('only' if layout == 'one-subfolder' else 'second') / 'b.png', noise([8, 8], 2))
    if layout == 'root-image':
        write_png(src / 'c.png', noise([8, 8], 3)) # an image outside any class folder has no label
    summary = convert_dataset(src, tmp_path / 'out.zip')
    _names, decoded, meta, _ = read_zip(tmp_path / 'out.zip')
    assert meta == {'labels': None}
    assert {img.mode for img in decoded.values()} == {'L'}
    assert (summary.labels, summary.class_folders) == (None, None)
    assert summary.lines()[0] == f'{2 if layout == "one-subfolder" else 3} images, 8x8, 1 channel, no labels'

def test_folder_labels_from_dataset_json(tmp_path):
    src = tmp_path / 'src'
    for i, name in enumerate(['x/1.png', 'x/2.png', 'y/3.png']):
        write_png(src / name, noise([4, 4, 3], i))
    (src / 'dataset.json').write_text(json.dumps({'labels': [['y/3.png', [0.5, 1.5]], ['x/1.png', [1, 2]], ['x/2.png', [3, 4]]]}))
    summary = convert_dataset(src, tmp_path / 'out.zip')
    assert summary.lines()[0] == '3 images, 4x4, 3 channels, labels: vectors of 2 numbers' and summary.class_folders is None
    _names, _decoded, meta, _ = read_zip(tmp_path / 'out.zip')
    assert [label for _, label in meta['labels']] == [[1, 2], [3, 4], [0.5, 1.5]]
    ds = ImageFolderDataset(tmp_path / 'out.zip', use_labels=True)
    np.testing.assert_array_equal(ds.get_label(2), np.float32([0.5, 1.5]))
    ds.close()
    # One image without a label makes the whole dataset unlabelled.
    (src / 'dataset.json').write_text(json.dumps({'labels': [['x/1.png', 1], ['x/2.png', 2]]}))
    assert convert_dataset(src, tmp_path / 'out2.zip').labels is None
    assert read_zip(tmp_path / 'out2.zip')[2] == {'labels': None}
    # Class indices that do not follow the folders: classes, but no folder -> class line.
    (src / 'dataset.json').write_text(json.dumps({'labels': [['x/1.png', 0], ['x/2.png', 1], ['y/3.png', 1]]}))
    summary = convert_dataset(src, tmp_path / 'out3.zip')
    assert (summary.labels, summary.label_dim, summary.class_folders) == ('classes', 2, None)

def test_zip_source_with_labels(tmp_path):
    src = tmp_path / 'src.zip'
    with zipfile.ZipFile(src, 'w') as z:
        for i, name in enumerate(['b/img.png', 'a/img.jpg.png', 'a/z.png']):
            buf = io.BytesIO()
            PIL.Image.fromarray(noise([16, 16, 3], i)).save(buf, format='png')
            z.writestr(name, buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [['a/z.png', 5], ['b/img.png', 6], ['a/img.jpg.png', 7]]}))
        z.writestr('readme.txt', 'ignored')
    convert_dataset(src, tmp_path / 'out.zip', resolution='8,8')
    names, decoded, meta, _ = read_zip(tmp_path / 'out.zip')
    assert names == [f'00000/img{i:08d}.png' for i in range(3)] + ['dataset.json']
    assert [label for _, label in meta['labels']] == [7, 5, 6] # sorted: a/img.jpg.png, a/z.png, b/img.png
    assert {img.size for img in decoded.values()} == {(8, 8)}
    ds = ImageFolderDataset(tmp_path / 'out.zip', use_labels=True)
    assert [ds.get_details(i).raw_label for i in range(3)] == [7, 5, 6]
    ds.close()

def test_names_after_one_thousand(tmp_path):
    src = tmp_path / 'src'
    for i in range(1002):
        write_png(src / f'{i:04d}.png', np.full([1, 1], i % 256, np.uint8))
    convert_dataset(src, tmp_path / 'out.zip')
    names = read_zip(tmp_path / 'out.zip')[0]
    assert names[999:1003] == ['00000/img00000999.png', '00001/img00001000.png', '00001/img00001001.png', 'dataset.json']

#----------------------------------------------------------------------------
# Transforms and max-images.

def test_resize_without_transform(tmp_path):
    src = tmp_path / 'src'
    big = noise([16, 16], 5)
    write_png(src / 'a.png', big)
    result = run('--source', src, '--dest', tmp_path / 'out.zip', '--resolution=8x8')
    assert result.exit_code == 0, result.output
    img = read_zip(tmp_path / 'out.zip')[1]['00000/img00000000.png']
    assert img.mode == 'L' and img.size == (8, 8) # grayscale stays grayscale without a transform
    expected = PIL.Image.fromarray(big).resize((8, 8), PIL.Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(pixels(img), pixels(expected))

def test_center_crop(tmp_path):
    src = tmp_path / 'src'
    wide = np.tile(np.arange(12, dtype=np.uint8)[None, :] * 20, (8, 1)) # 12 wide, 8 tall, columns 0, 20, ..., 220
    tall = noise([20, 10, 3], 6)
    write_png(src / 'a.png', wide)
    write_png(src / 'b.png', tall)
    convert_dataset(src, tmp_path / 'out.zip', transform='center-crop', resolution=(8, 8))
    decoded = read_zip(tmp_path / 'out.zip')[1]
    first, second = decoded['00000/img00000000.png'], decoded['00000/img00000001.png']
    assert first.mode == second.mode == 'RGB' and first.size == second.size == (8, 8)
    np.testing.assert_array_equal(pixels(first), np.repeat(wide[:, 2:10, None], 3, axis=2)) # central 8 columns, gray -> RGB
    expected = PIL.Image.fromarray(tall[5:15]).resize((8, 8), PIL.Image.Resampling.LANCZOS) # central 10 rows
    np.testing.assert_array_equal(pixels(second), pixels(expected))

def test_center_crop_wide_pads_black_and_skips_small_images(tmp_path):
    src = tmp_path / 'src'
    wide = noise([8, 16, 3], 8, low=100) # 16 wide, 8 tall, bright
    write_png(src / 'a.png', wide)
    write_png(src / 'b.png', noise([6, 6, 3], 9)) # narrower than 8: skipped
    write_png(src / 'c.png', wide)
    result = run('--source', src, '--dest', tmp_path / 'out.zip', '--transform=center-crop-wide', '--resolution=8x4')
    assert result.exit_code == 0, result.output
    names, decoded, _meta, _ = read_zip(tmp_path / 'out.zip')
    assert names == ['00000/img00000000.png', '00000/img00000002.png', 'dataset.json'] # skipped image keeps index 1
    array = pixels(decoded['00000/img00000000.png'])
    assert array.shape == (8, 8, 3)
    # Band of round(8 * 8 / 16) = 4 central rows, resized to 8x4, on rows 2..5 of a black 8x8 canvas.
    expected = PIL.Image.fromarray(wide[2:6]).resize((8, 4), PIL.Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(array[2:6], pixels(expected))
    assert array[:2].max() == 0 and array[6:].max() == 0 and array[2:6].min() > 0
    ds = ImageFolderDataset(tmp_path / 'out.zip')
    assert len(ds) == 2 and ds.image_shape == [3, 8, 8]
    ds.close()

def test_max_images_on_folder(tmp_path):
    src = tmp_path / 'src'
    for i in range(4):
        write_png(src / f'{i}.png', noise([4, 4, 3], i))
    result = run('--source', src, '--dest', tmp_path / 'out.zip', '--max-images', 2)
    assert result.exit_code == 0, result.output
    names, decoded, _meta, _ = read_zip(tmp_path / 'out.zip')
    assert names == ['00000/img00000000.png', '00000/img00000001.png', 'dataset.json']
    np.testing.assert_array_equal(pixels(decoded['00000/img00000001.png']), noise([4, 4, 3], 1))

def test_resolution_parsing():
    assert parse_resolution('64x32') == (64, 32)
    assert parse_resolution('64,32') == (64, 32)
    for bad in ['64', '64x', 'x64', '0x8', '8x-8', 'abc']:
        with pytest.raises(OptionError):
            parse_resolution(bad)

#----------------------------------------------------------------------------
# Errors: one line, and nothing left behind (the destination lives in tmp_path/out, which the
# tool creates if needed and must remove again on failure).

@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / 'src'
    write_png(src / 'a.png', noise([8, 8, 3], 0))
    return src

def _source_case(tmp_path, case):
    """-> (source, extra arguments, expected message fragment)."""
    src = tmp_path / 'src'
    if case == 'missing-source':
        return tmp_path / 'nope', [], 'does not exist'
    if case == 'unknown-type':
        (tmp_path / 'data.tar.gz').write_bytes(b'x')
        return tmp_path / 'data.tar.gz', [], 'unknown source type; expected a folder, a .zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or sklearn-digits'
    if case == 'lmdb':
        os.makedirs(tmp_path / 'bedroom_train_lmdb')
        return tmp_path / 'bedroom_train_lmdb', [], 'LSUN LMDB'
    if case == 'empty-folder':
        os.makedirs(src)
        return src, [], 'No image files found'
    if case == 'not-a-zip':
        (tmp_path / 'bad.zip').write_bytes(b'garbage')
        return tmp_path / 'bad.zip', [], 'as a zip file'
    if case == 'not-square':
        write_png(src / 'a.png', noise([8, 16, 3], 0))
        return src, [], "first image 'a.png' is 16x8, not square"
    if case == 'not-power-of-two':
        write_png(src / 'a.png', noise([12, 12, 3], 0))
        return src, [], 'not a power-of-two'
    if case == 'mismatch':
        write_png(src / 'a.png', noise([8, 8, 3], 0))
        write_png(src / 'b.png', noise([8, 8, 3], 1))
        write_png(src / 'c.png', noise([8, 8], 2))
        return src, [], "Image 'c.png' is 8x8 with 1 channel but the first image is 8x8 with 3 channels"
    if case == 'size-mismatch':
        write_png(src / 'a.png', noise([8, 8, 3], 0))
        write_png(src / 'b.png', noise([4, 4, 3], 1))
        return src, [], "Image 'b.png' is 4x4 with 3 channels but the first image is 8x8 with 3 channels; all images must match, pass"
    if case == 'alpha':
        write_png(src / 'a.png', noise([8, 8, 4], 0))
        return src, [], "'a.png' has Pillow mode 'RGBA'"
    if case == 'corrupt-image':
        write_png(src / 'a.png', noise([8, 8, 3], 0))
        (src / 'b.png').write_bytes(b'\x89PNG broken')
        return src, [], "Cannot read image 'b.png'"
    if case == 'transform-without-resolution':
        write_png(src / 'a.png', noise([8, 8, 3], 0))
        return src, ['--transform=center-crop'], 'needs an output size'
    if case == 'all-skipped':
        write_png(src / 'a.png', noise([4, 4, 3], 0))
        return src, ['--transform=center-crop-wide', '--resolution=8x4'], 'too small'
    if case == 'bad-dataset-json':
        write_png(src / 'a.png', noise([8, 8, 3], 0))
        (src / 'dataset.json').write_text('{"labels": 3}')
        return src, [], 'dataset.json'
    raise AssertionError(case)

@pytest.mark.parametrize('case', ['missing-source', 'unknown-type', 'lmdb', 'empty-folder', 'not-a-zip', 'not-square',
    'not-power-of-two', 'mismatch', 'size-mismatch', 'alpha', 'corrupt-image', 'transform-without-resolution', 'all-skipped', 'bad-dataset-json'])
@pytest.mark.parametrize('dest_kind', ['zip', 'folder'])
def test_errors_leave_nothing_behind(tmp_path, case, dest_kind):
    source, extra, fragment = _source_case(tmp_path, case)
    dest = tmp_path / 'out' / ('result.zip' if dest_kind == 'zip' else 'result')
    assert_one_line_error(run('--source', source, '--dest', dest, *extra), fragment)
    assert not (tmp_path / 'out').exists()

def test_existing_destinations_are_refused(tmp_path, image_folder):
    existing = tmp_path / 'existing.zip'
    existing.write_bytes(b'keep me')
    assert_one_line_error(run('--source', image_folder, '--dest', existing), 'already exists')
    assert existing.read_bytes() == b'keep me'
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'x.txt').write_text('keep me')
    assert_one_line_error(run('--source', image_folder, '--dest', full), 'is not empty')
    assert os.listdir(full) == ['x.txt']
    assert_one_line_error(run('--source', image_folder, '--dest', full / 'x.txt'), 'existing file')
    assert_one_line_error(run('--source', image_folder, '--dest='), '--dest is empty')
    assert sorted(os.listdir(tmp_path)) == ['existing.zip', 'full', 'src']

def test_bad_resolution_is_a_usage_error(tmp_path, image_folder):
    result = run('--source', image_folder, '--dest', tmp_path / 'out.zip', '--resolution=64')
    assert result.exit_code == 2 and 'WxH' in result.stderr and 'Traceback' not in result.output
    assert not (tmp_path / 'out.zip').exists()

@pytest.mark.parametrize('dest_name', ['result.zip', 'result'])
def test_interrupt_midway_leaves_nothing_behind(tmp_path, monkeypatch, dest_name):
    src = tmp_path / 'src'
    for i in range(3):
        write_png(src / f'{i}.png', noise([4, 4, 3], i))
    calls = []
    real = dataset_writer._png_bytes
    def crash_on_third(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image)
    monkeypatch.setattr(dataset_writer, '_png_bytes', crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(src, tmp_path / 'out' / dest_name)
    assert len(calls) == 3 and not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
