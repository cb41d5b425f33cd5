"""Convert image folders, zips, CIFAR-10 and MNIST archives into the dataset layout that
training/dataset.py reads (facts sheet section 8):

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64

The output is an uncompressed zip (or a new folder) of PNGs named 00000/img00000000.png, ...
plus dataset.json with the labels. It appears under its final name only once complete.
"""

import contextlib
import functools
import gzip
import importlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
import struct
import tarfile
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

#----------------------------------------------------------------------------
# A problem with the user's source, destination or options: one sentence saying what to do.

class DatasetToolError(Exception):
    pass

def _one_line(err):
    return ' '.join(f'{type(err).__name__}: {err}'.split())

#----------------------------------------------------------------------------
# File names Pillow can open (save-only formats such as .pdf excluded), as the reader does.

@functools.lru_cache(maxsize=None)
def _image_extensions():
    PIL.Image.init()
    return frozenset(ext for ext, fmt in PIL.Image.EXTENSION.items() if fmt in PIL.Image.OPEN)

def _is_image_name(name):
    return os.path.splitext(name)[1].lower() in _image_extensions()

# Decode one image file to uint8 [H, W] (grayscale) or [H, W, 3] (RGB).
def _decode_image(open_file, name):
    try:
        with open_file() as f, PIL.Image.open(f) as img:
            if img.mode in ('P', '1'): # palette and 1-bit images have an obvious 8-bit equivalent
                img = img.convert('RGB' if img.mode == 'P' else 'L')
            mode = img.mode
            if mode in ('L', 'RGB'):
                return np.array(img)
    except Exception as err:
        raise DatasetToolError(f"Cannot read image '{name}' ({_one_line(err)}); replace or delete that file.") from None
    raise DatasetToolError(f"Image '{name}' has Pillow mode '{mode}', but only 8-bit grayscale (L) and RGB images are supported; "
        'convert it (e.g. drop the alpha channel) and run again.')

# dataset.json of a source -> {relative path: label}, or None when it says "labels": null.
def _parse_labels_json(f, where):
    try:
        data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetToolError(f'{where} is not valid JSON ({_one_line(err)}); fix it or delete it.') from None
    labels = data.get('labels', False) if isinstance(data, dict) else False
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in labels):
        raise DatasetToolError(f'{where} must be {{"labels": [[relative path, label], ...]}} or {{"labels": null}}; fix it or delete it.')
    return {name.replace('\\', '/'): label for name, label in labels}

#----------------------------------------------------------------------------
# Sources. Each returns (number of images, iterator of (name for messages, image, label or None)),
# already cut to max_images; problems found while listing are raised before anything is written.

# A folder, walked recursively. Labels: its dataset.json, else the index of the sorted top-level
# folder an image sits in, when there are several such folders and no image sits at the top.
def open_image_folder(path, max_images=None):
    fnames = sorted(os.path.relpath(os.path.join(root, fname), start=path).replace(os.sep, '/')
        for root, _dirs, files in os.walk(path) for fname in files if _is_image_name(fname))
    if not fnames:
        raise DatasetToolError(f"No image files found in folder '{path}'; point --source at a folder of images Pillow can read (e.g. .png, .jpg).")
    json_path = os.path.join(path, 'dataset.json')
    if os.path.isfile(json_path):
        with open(json_path, 'rb') as f:
            label_of = _parse_labels_json(f, f"dataset.json in '{path}'") or {}
    else:
        class_names = sorted({fname.split('/')[0] for fname in fnames if '/' in fname})
        nested = all('/' in fname for fname in fnames)
        class_of = {name: idx for idx, name in enumerate(class_names)} if nested and len(class_names) > 1 else {}
        label_of = {fname: class_of[fname.split('/')[0]] for fname in fnames if class_of}
    fnames = fnames[:max_images]

    def iterate():
        for fname in fnames:
            image = _decode_image(lambda: open(os.path.join(path, fname), 'rb'), fname)
            yield fname, image, label_of.get(fname)
    return len(fnames), iterate()

# A .zip of images; labels from the dataset.json at its root.
def open_image_zip(path, max_images=None):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetToolError(f"Cannot read '{path}' as a zip file ({_one_line(err)}); check the download.") from None
    names = sorted(name for name in archive.namelist() if not name.endswith('/') and _is_image_name(name))
    if not names:
        archive.close()
        raise DatasetToolError(f"No image files found in '{path}'; the zip must contain images Pillow can read (e.g. .png, .jpg).")
    label_of = {}
    if 'dataset.json' in archive.namelist():
        with archive.open('dataset.json') as f:
            label_of = _parse_labels_json(f, f"dataset.json in '{path}'") or {}
    names = names[:max_images]

    def iterate():
        with archive:
            for name in names:
                yield name, _decode_image(lambda: archive.open(name), name), label_of.get(name)
    return len(names), iterate()

#----------------------------------------------------------------------------
# CIFAR-10 python batches are pickles. Unpickling can call any importable function, so only the
# globals that rebuild a numpy array are resolved (the original files need the first three);
# anything else, os.system included, is refused before it is ever looked up.

def _numpy_private(name):
    module = 'multiarray' if name == '_reconstruct' else 'numeric'
    try:
        return getattr(importlib.import_module(f'numpy._core.{module}'), name) # numpy >= 2
    except ImportError:
        return getattr(importlib.import_module(f'numpy.core.{module}'), name) # numpy 1.x

class _ForbiddenGlobal(pickle.UnpicklingError):
    pass

class _ArrayOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ('numpy', 'ndarray'): lambda: np.ndarray,
        ('numpy', 'dtype'): lambda: np.dtype,
        ('numpy.core.multiarray', '_reconstruct'): lambda: _numpy_private('_reconstruct'), # the original files (Python 2)
        ('numpy._core.multiarray', '_reconstruct'): lambda: _numpy_private('_reconstruct'), # protocol <= 4, numpy >= 2
        ('numpy.core.numeric', '_frombuffer'): lambda: _numpy_private('_frombuffer'), # protocol 5, numpy 1.x
        ('numpy._core.numeric', '_frombuffer'): lambda: _numpy_private('_frombuffer'), # protocol 5, numpy >= 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise _ForbiddenGlobal(f'{module}.{name}')
        return self._ALLOWED[(module, name)]()

    def persistent_load(self, pid):
        raise _ForbiddenGlobal(f'persistent id {pid!r}')

# One data_batch_N member -> (uint8 [N, H, W, C] images, list of N labels), checked.
def _load_cifar_batch(tar, info, where):
    if not info.isfile():
        raise DatasetToolError(f'{where} is not a regular file; download cifar-10-python.tar.gz again.')
    with tar.extractfile(info) as f:
        try:
            batch = _ArrayOnlyUnpickler(f, encoding='latin1').load()
        except _ForbiddenGlobal as err:
            raise DatasetToolError(f'{where} asks to load {err}, which a CIFAR-10 batch never contains; refusing to unpickle it '
                '(the file may be malicious), download cifar-10-python.tar.gz again from the official site.') from None
        except Exception as err:
            raise DatasetToolError(f'{where} is not a readable pickle ({_one_line(err)}); download cifar-10-python.tar.gz again.') from None
    data = batch.get('data') if isinstance(batch, dict) else None
    labels = batch.get('labels') if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        raise DatasetToolError(f"{where} has no uint8 'data' array of shape [N, 3072]; download cifar-10-python.tar.gz again.")
    if not (isinstance(labels, list) and len(labels) == data.shape[0] and all(type(x) is int and 0 <= x < 10 for x in labels)):
        raise DatasetToolError(f"{where} has no list of {data.shape[0]} 'labels' in 0..9; download cifar-10-python.tar.gz again.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels # [N, 3072] => [N, C, H, W] => [N, H, W, C]

# cifar-10-python.tar.gz: the 50000 training images of data_batch_1..5 (test_batch is not used),
# read in one pass over the archive (looking members up by name would decompress it repeatedly).
def open_cifar10(path, max_images=None):
    members = [f'cifar-10-batches-py/data_batch_{batch}' for batch in range(1, 6)]
    batches = {}
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for info in tar:
                if info.name in members:
                    batches[info.name] = _load_cifar_batch(tar, info, f"'{info.name}' in '{path}'")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DatasetToolError(f"Cannot read '{path}' as a .tar.gz archive ({_one_line(err)}); download cifar-10-python.tar.gz again.") from None
    missing = [member for member in members if member not in batches]
    if missing:
        raise DatasetToolError(f"'{path}' has no member '{missing[0]}'; download cifar-10-python.tar.gz again.")
    images = np.concatenate([batches[member][0] for member in members])[:max_images]
    labels = [label for member in members for label in batches[member][1]]

    def iterate():
        for idx, image in enumerate(images):
            yield f'CIFAR-10 training image {idx}', image, labels[idx]
    return len(images), iterate()

#----------------------------------------------------------------------------
# MNIST idx files: magic (0, 0, type 0x08 = uint8, number of dimensions), big-endian uint32 sizes, data.

def _read_idx(path, ndim):
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetToolError(f"Cannot read '{path}' as a gzip file ({_one_line(err)}); download it again.") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DatasetToolError(f"'{path}' is not a {ndim}-dimensional uint8 idx file; download it again.")
    shape = struct.unpack(f'>{ndim}I', raw[4:header])
    if len(raw) != header + int(np.prod(shape)):
        raise DatasetToolError(f"'{path}' holds {len(raw) - header} bytes of data, not the {int(np.prod(shape))} its header announces; download it again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)

# train-images-idx3-ubyte.gz, zero-padded to 32x32; labels from train-labels-idx1-ubyte.gz beside it, if there.
def open_mnist(path, max_images=None):
    images = _read_idx(path, ndim=3)
    pad_h, pad_w = 32 - images.shape[1], 32 - images.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise DatasetToolError(f"'{path}' holds {images.shape[2]}x{images.shape[1]} images, larger than the 32x32 they are padded to; is it really MNIST?")
    images = np.pad(images, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)])
    labels = [None] * len(images)
    labels_path = os.path.join(os.path.dirname(path), 'train-labels-idx1-ubyte.gz')
    if os.path.isfile(labels_path):
        labels = _read_idx(labels_path, ndim=1).tolist()
        if len(labels) != len(images):
            raise DatasetToolError(f"'{labels_path}' has {len(labels)} labels but '{path}' has {len(images)} images; download both again.")
    images = images[:max_images]

    def iterate():
        for idx, image in enumerate(images):
            yield f'MNIST training image {idx}', image, labels[idx]
    return len(images), iterate()

#----------------------------------------------------------------------------
# The embedded default: the UCI handwritten digits that ship inside scikit-learn (1,797
# grayscale 8x8 images, values 0..16, 10 classes). Nothing is downloaded.

DIGITS_SOURCE = 'sklearn-digits'

def open_sklearn_digits(max_images=None):
    try:
        from sklearn.datasets import load_digits  # optional: only this source needs scikit-learn
    except ImportError:
        raise DatasetToolError(f"--source={DIGITS_SOURCE} needs scikit-learn; install it with 'pip install scikit-learn'.") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)[:max_images]  # [N, 8, 8]
    labels = digits.target.astype(int).tolist()

    def iterate():
        for idx, image in enumerate(images):
            yield f'digit {idx}', image, labels[idx]
    return len(images), iterate()

#----------------------------------------------------------------------------
# Pick the reader from what the source is and how it is named.

def open_source(source, max_images=None):
    if source == DIGITS_SOURCE:
        return open_sklearn_digits(max_images)
    if not os.path.exists(source):
        raise DatasetToolError(f"Source '{source}' does not exist; check the --source path.")
    if os.path.isdir(source):
        if os.path.basename(os.path.normpath(source)).endswith('_lmdb'):
            raise DatasetToolError(f"'{source}' looks like an LSUN LMDB folder, which this codebase does not read (it needs lmdb and OpenCV); "
                'export its images to a folder and pass that folder as --source.')
        return open_image_folder(source, max_images)
    basename = os.path.basename(source)
    if basename == 'cifar-10-python.tar.gz':
        return open_cifar10(source, max_images)
    if basename == 'train-images-idx3-ubyte.gz':
        return open_mnist(source, max_images)
    if basename.lower().endswith('.zip'):
        return open_image_zip(source, max_images)
    raise DatasetToolError(f"'{source}': unknown source type; expected a folder, a .zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or sklearn-digits.")

#----------------------------------------------------------------------------
# Transforms: uint8 [H, W] or [H, W, C] -> uint8 image, or None to skip the image.

def parse_resolution(text):
    """'64x64' or '64,64' -> (width, height)."""
    match = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise DatasetToolError(f"Resolution '{text}' is not of the form WxH or W,H with positive integers, e.g. 64x64.")
    return int(match.group(1)), int(match.group(2))

def _lanczos(image, width, height):
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.array(PIL.Image.fromarray(image).resize((width, height), PIL.Image.Resampling.LANCZOS))

def _to_rgb(image):
    return np.repeat(image[:, :, np.newaxis], 3, axis=2) if image.ndim == 2 else image

# Central square of side min(H, W), as RGB, resized to W x H.
def center_crop(image, width, height):
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return _lanczos(_to_rgb(image[top : top + side, left : left + side]), width, height)

# Central band of round(W*h/w) full-width rows, resized to W x H and centred vertically on a
# black W x W canvas, as in the reference; images narrower than W or with too short a band are skipped.
def center_crop_wide(image, width, height):
    h, w = image.shape[:2]
    band = int(np.round(width * h / w))
    if w < width or band < height:
        return None
    top = (h - band) // 2
    image = _lanczos(_to_rgb(image[top : top + band]), width, height)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    top = (width - height) // 2
    canvas[top : top + height] = image
    return canvas

def make_transform(transform=None, resolution=None):
    if transform is not None and resolution is None:
        raise DatasetToolError(f'--transform={transform} needs an output size; add --resolution, e.g. --resolution=64x64.')
    if transform == 'center-crop-wide' and resolution[0] < resolution[1]:
        raise DatasetToolError(f'--transform=center-crop-wide needs a resolution at least as wide as it is tall, got {resolution[0]}x{resolution[1]}.')
    if transform is None:
        return (lambda image: image) if resolution is None else (lambda image: _lanczos(image, *resolution))
    if transform == 'center-crop':
        return lambda image: center_crop(image, *resolution)
    if transform == 'center-crop-wide':
        return lambda image: center_crop_wide(image, *resolution)
    raise DatasetToolError(f"Unknown transform '{transform}'; use center-crop or center-crop-wide.")

#----------------------------------------------------------------------------
# Destination: yields write(name, bytes) into a hidden temporary zip or folder next to `dest`,
# which is renamed to `dest` only when the block completes; on any error it is deleted.

def _make_parent_dirs(path):
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    for folder in reversed(made):
        os.mkdir(folder)
    return made

# Refuse an empty path, an existing zip and a non-empty folder; returns (absolute path, is zip).
def check_dest(dest):
    if not dest:
        raise DatasetToolError('--dest is empty; pass an output .zip path or a new folder.')
    dest = os.path.abspath(dest)
    is_zip = dest.lower().endswith('.zip')
    if is_zip and os.path.exists(dest):
        raise DatasetToolError(f"Destination '{dest}' already exists; delete it or choose another --dest.")
    if not is_zip and os.path.exists(dest) and not os.path.isdir(dest):
        raise DatasetToolError(f"Destination '{dest}' is an existing file; pass a .zip path or a new or empty folder.")
    if not is_zip and os.path.isdir(dest) and os.listdir(dest):
        raise DatasetToolError(f"Destination folder '{dest}' is not empty; delete its contents or choose another --dest.")
    return dest, is_zip

@contextlib.contextmanager
def open_dest(dest):
    dest, is_zip = check_dest(dest)
    parent = os.path.dirname(dest)
    try:
        made_dirs = _make_parent_dirs(parent)
    except OSError as err:
        raise DatasetToolError(f"Cannot create the folder of '{dest}' ({_one_line(err)}); check the --dest path.") from None
    # Created without tempfile so that the result gets the usual permissions, not 0600/0700.
    tmp = os.path.join(parent, f'.{os.path.basename(dest)}.{secrets.token_hex(4)}.tmp')
    try:
        if is_zip:
            with open(tmp, 'xb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as archive:
                yield archive.writestr
            if os.path.exists(dest):
                raise DatasetToolError(f"Destination '{dest}' appeared while writing; delete it or choose another --dest.")
            os.replace(tmp, dest)
        else:
            os.mkdir(tmp)
            def write(name, data):
                path = os.path.join(tmp, *name.split('/'))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, 'wb') as f:
                    f.write(data)
            yield write
            try:
                if os.path.isdir(dest):
                    os.rmdir(dest) # empty: checked above, and rmdir refuses otherwise
                os.rename(tmp, dest)
            except OSError as err:
                raise DatasetToolError(f"Cannot move the finished dataset to '{dest}' ({_one_line(err)}); make sure it is a new or empty folder.") from None
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        for folder in made_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise

#----------------------------------------------------------------------------
# The first image fixes the shape: square, power-of-two side, 1 or 3 channels; the others must match.

def _describe(image):
    channels = 1 if image.ndim == 2 else image.shape[2]
    return f'{image.shape[1]}x{image.shape[0]} with {channels} channel{"s" if channels > 1 else ""}'

def _check_shape(image, name, first):
    if first is not None:
        if image.shape[:2] != first.shape[:2]:
            raise DatasetToolError(f"Image '{name}' is {_describe(image)} but the first image is {_describe(first)}; "
                'all images must match, pass e.g. --resolution=64x64 (and --transform=center-crop for non-square images).')
        if image.shape != first.shape:
            raise DatasetToolError(f"Image '{name}' is {_describe(image)} but the first image is {_describe(first)}; "
                'all images must match, convert it or pass --transform=center-crop, which makes every image RGB.')
        return
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    if width != height:
        raise DatasetToolError(f"The first image '{name}' is {width}x{height}, not square; pass a square --resolution such as 64x64, "
            'with --transform=center-crop if the images are not square.')
    if width & (width - 1):
        raise DatasetToolError(f"The first image '{name}' is {width}x{height}, not a power-of-two size; pass e.g. --resolution=64x64.")
    if channels not in (1, 3):
        raise DatasetToolError(f"The first image '{name}' has {channels} channels; only grayscale (1) or RGB (3) images are supported.")

def _png_bytes(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format='png', compress_level=0, optimize=False) # mode L or RGB
    return buf.getvalue()

#----------------------------------------------------------------------------
# The whole conversion, callable from tests; returns the number of images written.

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None):
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    transform_image = make_transform(transform, resolution)
    check_dest(dest) # before reading the source, which can take a while
    num_images, items = open_source(source, max_images)
    labels = [] # [[archive name, label or None], ...]
    first = None
    # tqdm as a context manager ends the progress line before an error message is printed.
    with open_dest(dest) as write, tqdm(items, total=num_images, unit='img') as progress:
        for idx, (name, image, label) in enumerate(progress):
            image = transform_image(image)
            if image is None:
                continue # too small for center-crop-wide; its index stays unused
            _check_shape(image, name, first)
            first = image if first is None else first
            archive_name = f'{idx // 1000:05d}/img{idx:08d}.png'
            write(archive_name, _png_bytes(image))
            labels.append([archive_name, label])
        if not labels:
            raise DatasetToolError(f"Every image of '{source}' was too small for --transform={transform} at {resolution[0]}x{resolution[1]}; "
                'pick a smaller --resolution.')
        all_labelled = all(label is not None for _name, label in labels)
        write('dataset.json', json.dumps({'labels': labels if all_labelled else None}).encode())
    return len(labels)

#----------------------------------------------------------------------------

def _resolution_option(_ctx, _param, value):
    try:
        return None if value is None else parse_resolution(value)
    except DatasetToolError as err:
        raise click.BadParameter(str(err)) from None

@click.command()
@click.option('--source', help='Folder, .zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, or sklearn-digits (embedded)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output .zip, or a new or empty folder', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Read at most this many input images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Crop before resizing (needs --resolution)', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output size, e.g. 64x64', metavar='WxH', type=str, callback=_resolution_option)
def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into the zip (or folder) of PNGs that train.py and fid.py read.

    \b
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64
    """
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except DatasetToolError as err:
        raise click.ClickException(str(err)) from None

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
