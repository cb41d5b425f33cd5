"""What dataset_tool.py reads and how it reshapes it: image folders and zips, the CIFAR-10
python tarball, MNIST idx files and the embedded scikit-learn digits, and the crops and
resizes applied before the images are written (training/data/writer.py).

Every source returns (number of images, iterator of (name for messages, uint8 image [H, W] or
[H, W, C], label or None)); problems found while listing are raised before anything is written.
"""

import gzip
import os
import re
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import PIL.Image

from torch_utils.errors import OptionError, describe_exception
from torch_utils.io.files import open_regular
from torch_utils.io.safe_pickle import ARRAY_GLOBALS, ForbiddenGlobalError, UnsafePickleError, restricted_load
from training.data.dataset import DatasetError, is_image_name, list_folder, parse_labels_json, read_image


# Palette and 1-bit images have an obvious 8-bit equivalent; other modes than L and RGB
# (alpha, 16-bit, float) are refused. -> (mode, uint8 [H, W] or [H, W, 3], or None if refused).
def _to_array(img):
    if img.mode in ('P', '1'):
        img = img.convert('RGB' if img.mode == 'P' else 'L')
    return img.mode, (np.array(img) if img.mode in ('L', 'RGB') else None)

def _decode_image(open_file, name):
    mode, image = read_image(open_file, _to_array, f"Cannot read image '{name}'", error=DatasetError)
    if image is None:
        raise DatasetError(f"Image '{name}' has Pillow mode '{mode}', but only 8-bit grayscale (L) and RGB images are supported; "
            'convert it (e.g. drop the alpha channel) and run again.')
    return image

def _labels_of(open_file, declared_size, num_images, where):
    return parse_labels_json(open_file, declared_size, num_images, where, 'fix it or delete it', error=DatasetError)

# A file of the source opened by name: a regular file, or one DatasetError (a FIFO would block).
def _open(path):
    return open_regular(path, 'replace it with a regular file', error=DatasetError)

#----------------------------------------------------------------------------
# Image folders and zips.

# A folder, walked recursively. Labels: its dataset.json, else the index of the sorted top-level
# folder an image sits in, when there are several such folders and no image sits at the top.
def open_image_folder(path, max_images=None):
    names = list_folder(path, error=DatasetError)
    fnames = sorted(name for name in names if is_image_name(name))
    if not fnames:
        raise DatasetError(f"No image files found in folder '{path}'; point --source at a folder of images Pillow can read (e.g. .png, .jpg).")
    json_path = os.path.join(path, 'dataset.json')
    if 'dataset.json' in names:
        label_of = _labels_of(lambda: _open(json_path), os.stat(json_path).st_size, len(fnames), f"dataset.json in '{path}'") or {}
    else:
        class_names = sorted({fname.split('/')[0] for fname in fnames if '/' in fname})
        nested = all('/' in fname for fname in fnames)
        class_of = {name: idx for idx, name in enumerate(class_names)} if nested and len(class_names) > 1 else {}
        label_of = {fname: class_of[fname.split('/')[0]] for fname in fnames if class_of}
    fnames = fnames[:max_images]

    def iterate():
        for fname in fnames:
            image = _decode_image(lambda: _open(os.path.join(path, fname)), fname)
            yield fname, image, label_of.get(fname)
    return len(fnames), iterate()

# A .zip of images; labels from the dataset.json at its root.
def open_image_zip(path, max_images=None):
    f = _open(path)
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError) as err:
        f.close()
        raise DatasetError(f"Cannot read '{path}' as a zip file ({describe_exception(err)}); check the download.") from None
    names = sorted(name for name in archive.namelist() if not name.endswith('/') and is_image_name(name))
    if not names:
        archive.close()
        f.close()
        raise DatasetError(f"No image files found in '{path}'; the zip must contain images Pillow can read (e.g. .png, .jpg).")
    label_of = {}
    if 'dataset.json' in archive.namelist():
        label_of = _labels_of(lambda: archive.open('dataset.json'), archive.getinfo('dataset.json').file_size, len(names),
            f"dataset.json in '{path}'") or {}
    names = names[:max_images]

    def iterate():
        with f, archive:
            for name in names:
                yield name, _decode_image(lambda: archive.open(name), name), label_of.get(name)
    return len(names), iterate()

#----------------------------------------------------------------------------
# CIFAR-10 python batches are pickles, and unpickling can call any importable function: they
# are read with the allow-list of torch_utils/io/safe_pickle.py, which rebuilds dicts, lists,
# strings, bytes and numpy arrays and refuses anything else (os.system included) unresolved.

# A batch written by Python 2 has str keys; one re-pickled after pickle.load(encoding='bytes')
# (as the CIFAR-10 page suggests) has bytes keys. Both are read.
def _field(batch, key):
    return batch.get(key, batch.get(key.encode())) if isinstance(batch, dict) else None

# One data_batch_N member -> (uint8 [N, H, W, C] images, list of N labels), checked.
def _load_cifar_batch(tar, info, where):
    if not info.isfile():
        raise DatasetError(f'{where} is not a regular file; download cifar-10-python.tar.gz again.')
    with tar.extractfile(info) as f:
        try:
            batch = restricted_load(f, ARRAY_GLOBALS, encoding='latin1')
        except ForbiddenGlobalError as err:
            raise DatasetError(f'{where} asks to load {err.global_name}, which a CIFAR-10 batch never contains; refusing to unpickle it '
                '(the file may be malicious), download cifar-10-python.tar.gz again from the official site.') from None
        except UnsafePickleError as err:
            raise DatasetError(f'{where} is not plain data ({err}); refusing to unpickle it (the file may be malicious), '
                'download cifar-10-python.tar.gz again from the official site.') from None
        except Exception as err:
            raise DatasetError(f'{where} is not a readable pickle ({describe_exception(err)}); download cifar-10-python.tar.gz again.') from None
    data, labels = _field(batch, 'data'), _field(batch, 'labels')
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        raise DatasetError(f"{where} has no uint8 'data' array of shape [N, 3072]; download cifar-10-python.tar.gz again.")
    if not (isinstance(labels, list) and len(labels) == data.shape[0] and all(type(x) is int and 0 <= x < 10 for x in labels)):
        raise DatasetError(f"{where} has no list of {data.shape[0]} 'labels' in 0..9; download cifar-10-python.tar.gz again.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels # [N, 3072] => [N, C, H, W] => [N, H, W, C]

# cifar-10-python.tar.gz: the 50000 training images of data_batch_1..5 (test_batch is not used),
# read in one pass over the archive (looking members up by name would decompress it repeatedly).
def open_cifar10(path, max_images=None):
    members = [f'cifar-10-batches-py/data_batch_{batch}' for batch in range(1, 6)]
    batches = {}
    try:
        with _open(path) as f, tarfile.open(fileobj=f, mode='r:gz') as tar:
            for info in tar:
                if info.name in members:
                    batches[info.name] = _load_cifar_batch(tar, info, f"'{info.name}' in '{path}'")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"Cannot read '{path}' as a .tar.gz archive ({describe_exception(err)}); download cifar-10-python.tar.gz again.") from None
    missing = [member for member in members if member not in batches]
    if missing:
        raise DatasetError(f"'{path}' has no member '{missing[0]}'; download cifar-10-python.tar.gz again.")
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
        with _open(path) as f, gzip.open(f, 'rb') as unzipped:
            raw = unzipped.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"Cannot read '{path}' as a gzip file ({describe_exception(err)}); download it again.") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DatasetError(f"'{path}' is not a {ndim}-dimensional uint8 idx file; download it again.")
    shape = struct.unpack(f'>{ndim}I', raw[4:header])
    if len(raw) != header + int(np.prod(shape)):
        raise DatasetError(f"'{path}' holds {len(raw) - header} bytes of data, not the {int(np.prod(shape))} its header announces; download it again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)

# train-images-idx3-ubyte.gz, zero-padded to 32x32; labels from train-labels-idx1-ubyte.gz beside it, if there.
def open_mnist(path, max_images=None):
    images = _read_idx(path, ndim=3)
    pad_h, pad_w = 32 - images.shape[1], 32 - images.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise DatasetError(f"'{path}' holds {images.shape[2]}x{images.shape[1]} images, larger than the 32x32 they are padded to; is it really MNIST?")
    images = np.pad(images, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)])
    labels = [None] * len(images)
    labels_path = os.path.join(os.path.dirname(path), 'train-labels-idx1-ubyte.gz')
    if os.path.isfile(labels_path):
        labels = _read_idx(labels_path, ndim=1).tolist()
        if len(labels) != len(images):
            raise DatasetError(f"'{labels_path}' has {len(labels)} labels but '{path}' has {len(images)} images; download both again.")
    images = images[:max_images]

    def iterate():
        for idx, image in enumerate(images):
            yield f'MNIST training image {idx}', image, labels[idx]
    return len(images), iterate()

#----------------------------------------------------------------------------
# The UCI handwritten digits that ship inside scikit-learn (1,797 grayscale 8x8 images, values
# 0..16, 10 classes): uint8 [N, 8, 8] scaled to 0..255 and a list of N int labels. Nothing is
# downloaded; raises ImportError without scikit-learn (an optional extra).

def load_sklearn_digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    return images, digits.target.astype(int).tolist()

# The embedded default: the scikit-learn digits (load_sklearn_digits above). Nothing is downloaded.

DIGITS_SOURCE = 'sklearn-digits'

def open_sklearn_digits(max_images=None):
    try:
        images, labels = load_sklearn_digits()
    except ImportError:
        raise DatasetError(f"--source={DIGITS_SOURCE} needs scikit-learn; install it with 'pip install scikit-learn'.") from None
    images = images[:max_images]

    def iterate():
        for idx, image in enumerate(images):
            yield f'digit {idx}', image, labels[idx]
    return len(images), iterate()

#----------------------------------------------------------------------------
# Pick the reader from what the source is and how it is named.

def open_source(source, max_images=None):
    source = os.fspath(source)
    if source == DIGITS_SOURCE:
        return open_sklearn_digits(max_images)
    if not os.path.exists(source):
        raise DatasetError(f"Source '{source}' does not exist; check the --source path.")
    if os.path.isdir(source):
        if os.path.basename(os.path.normpath(source)).endswith('_lmdb'):
            raise DatasetError(f"'{source}' looks like an LSUN LMDB folder, which this codebase does not read (it needs lmdb and OpenCV); "
                'export its images to a folder and pass that folder as --source.')
        return open_image_folder(source, max_images)
    if not os.path.isfile(source):
        raise DatasetError(f"Source '{source}' is neither a folder nor a regular file (a FIFO or a device cannot be read as a dataset); "
            'pass a folder or an archive file.')
    basename = os.path.basename(source)
    if basename == 'cifar-10-python.tar.gz':
        return open_cifar10(source, max_images)
    if basename == 'train-images-idx3-ubyte.gz':
        return open_mnist(source, max_images)
    if basename.lower().endswith('.zip'):
        return open_image_zip(source, max_images)
    raise DatasetError(f"'{source}': unknown source type; expected a folder, a .zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or sklearn-digits.")

#----------------------------------------------------------------------------
# Transforms: uint8 [H, W] or [H, W, C] -> uint8 image, or None to skip the image.

def parse_resolution(text):
    """'64x64' or '64,64' -> (width, height)."""
    match = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise OptionError(f"Resolution '{text}' is not of the form WxH or W,H with positive integers, e.g. 64x64.")
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
        raise OptionError(f'--transform={transform} needs an output size; add --resolution, e.g. --resolution=64x64.')
    if transform == 'center-crop-wide' and resolution[0] < resolution[1]:
        raise OptionError(f'--transform=center-crop-wide needs a resolution at least as wide as it is tall, got {resolution[0]}x{resolution[1]}.')
    if transform is None:
        return (lambda image: image) if resolution is None else (lambda image: _lanczos(image, *resolution))
    if transform == 'center-crop':
        return lambda image: center_crop(image, *resolution)
    if transform == 'center-crop-wide':
        return lambda image: center_crop_wide(image, *resolution)
    raise OptionError(f"Unknown transform '{transform}'; use center-crop or center-crop-wide.")

#----------------------------------------------------------------------------
