"""Training images read from a folder or a zip, and the endless, resumable index sampler that feeds them.

The dataset returns (uint8 image [C, H, W], float32 label) pairs exactly as the EDM/FDM
`ImageFolderDataset` does (NVlabs/edm training/data/dataset.py); anything wrong with the user's files
is reported as a one-line `DatasetError` that says what to do. The file conventions (which names
are images, how one is opened, what dataset.json holds) are shared with the converter
(training/data/sources.py), so both accept the same files.
"""

import functools
import json
import os
import stat
import types
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch

from fdm.io.network_files import NETWORK_RANGES
from torch_utils.errors import FileError, describe_exception
from torch_utils.io.files import open_regular

#----------------------------------------------------------------------------
# A problem with the user's data; the message is one sentence that ends with what to do.

MAX_CLASSES = NETWORK_RANGES['label_dim'].max  # one-hot labels beyond the largest label_dim are a broken dataset.json

class DatasetError(FileError):
    pass

#----------------------------------------------------------------------------
# The file conventions shared with the converter.

# File names Pillow can decode: extensions registered to a format that has an *opener*
# (PIL.Image.EXTENSION also lists save-only formats such as .pdf).
@functools.lru_cache(maxsize=None)
def image_extensions():
    PIL.Image.init()
    return frozenset(ext for ext, fmt in PIL.Image.EXTENSION.items() if fmt in PIL.Image.OPEN)

def is_image_name(name):
    return os.path.splitext(name)[1].lower() in image_extensions()

# Images larger than this are refused from their header, before any pixel is decoded: it is
# Pillow's own decompression-bomb threshold (about 9459 x 9459), where Pillow only warns.
MAX_IMAGE_PIXELS = 89_478_485

# Open one image with Pillow and return use(image); a failure in either becomes one line,
# "{what} (Type: message); replace or delete that file.", raised as `error`. Image.open reads only
# the header, so the size is checked before use() decodes: at most MAX_IMAGE_PIXELS, and exactly
# `size` (width, height) when given.
def read_image(open_file, use, what, error=DatasetError, size=None):
    try:
        with open_file() as f:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)  # refused below instead
                img = PIL.Image.open(f)
            with img:
                width, height = img.size
                if width * height <= MAX_IMAGE_PIXELS and (size is None or tuple(size) == img.size):
                    return use(img)
    except Exception as err:
        raise error(f'{what} ({describe_exception(err)}); replace or delete that file.') from None
    if size is not None and tuple(size) != (width, height):
        raise error(f'{what}: it is {width}x{height} but the dataset\'s images are {size[0]}x{size[1]}; '
            'replace or delete that file, or convert it with dataset_tool.py.')
    raise error(f'{what}: it is {width}x{height}, more than the {MAX_IMAGE_PIXELS:,} pixels read here; '
        'shrink it (or delete it) and run again.')

# A folder's files, walked recursively, as '/'-separated paths relative to it. Images and the
# top-level dataset.json must be regular files (or links to one): opening a FIFO waits forever
# for a writer, and a device never ends, so either is refused by name without being opened.
def list_folder(path, error=DatasetError):
    names = []
    for root, _dirs, files in os.walk(path):
        for fname in files:
            name = os.path.relpath(os.path.join(root, fname), start=path).replace(os.sep, '/')
            if is_image_name(fname) or name == 'dataset.json':
                try:
                    mode = os.stat(os.path.join(root, fname)).st_mode
                except OSError:
                    mode = stat.S_IFREG  # a dangling link: reported when it is opened
                if not stat.S_ISREG(mode):
                    kind = 'a FIFO' if stat.S_ISFIFO(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'not a regular file'
                    raise error(f"'{name}' in '{path}' is {kind}, not a file that can be read; remove it or replace it with a regular file.")
            names.append(name)
    return names

# dataset.json holds about 40 bytes per image ([path, class index]); this many per image, plus
# 1 MiB, leaves room for long paths and short label vectors, and bounds what is read and parsed
# by the dataset's size, whatever the file (or a zip header) claims.
LABELS_BYTES_PER_IMAGE = 256
LABELS_BYTES_EXTRA = 1 << 20

# dataset.json -> {relative path: label}, or None for "labels": null. open_file: its reader;
# declared_size: its size on disk or in the zip header, checked before reading, and the read
# stops one byte past the limit in case the declaration lies. `remedy` ends the message for a
# file that is not JSON at all. Labels are class indices, null, or lists of at most MAX_CLASSES numbers.
def parse_labels_json(open_file, declared_size, num_images, where, remedy, error=DatasetError):
    limit = LABELS_BYTES_PER_IMAGE * num_images + LABELS_BYTES_EXTRA
    data = b''
    if declared_size <= limit:
        with open_file() as f:
            data = f.read(limit + 1)
    if declared_size > limit or len(data) > limit:
        raise error(f'{where} is {max(declared_size, len(data)):,} bytes, more than the {limit:,} that labels of {num_images:,} images '
            f'can take; it is not a labels file, {remedy}.')
    try:
        data = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise error(f'{where} is not valid JSON ({describe_exception(err)}); {remedy}.') from None
    if not isinstance(data, dict) or 'labels' not in data:
        raise error(f'{where} must be an object with a "labels" key; write {{"labels": [[relative path, label], ...]}}.')
    labels = data['labels']
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in labels):
        raise error(f'"labels" in {where} must be a list of [relative path, label] pairs; fix the file.')
    for name, label in labels:
        if isinstance(label, list) and len(label) > MAX_CLASSES:
            raise error(f"The label of '{name}' in {where} is a list of {len(label):,} numbers, more than {MAX_CLASSES:,} classes; "
                'use a class index or a shorter label vector.')
    return {name.replace('\\', '/'): label for name, label in labels}

# The largest side of a training image: that of the largest network a snapshot may describe
# (EDM's datasets go to 512x512). Checked from the first header, so that a highly compressed
# 9000x9000 PNG (a few hundred bytes in a zip) is refused before a pixel is decoded.
MAX_RESOLUTION = NETWORK_RANGES['img_resolution'].max

# Pillow modes that decode to uint8 arrays, and their channel counts. Palette ('P'), 1-bit,
# 16-bit and float images are refused rather than silently fed to training as raw numbers.
_MODE_CHANNELS = {'L': 1, 'LA': 2, 'RGB': 3, 'RGBA': 4}

#----------------------------------------------------------------------------
# A folder (walked recursively) or a .zip of images, with optional labels from dataset.json.

class ImageFolderDataset(torch.utils.data.Dataset):
    def __init__(self,
        path,               # Folder or .zip holding the images (and optionally dataset.json).
        resolution  = None, # Expected H == W; None = accept what the data has.
        use_labels  = False,# Return the labels of dataset.json instead of empty vectors.
        max_size    = None, # Use a seeded random subset of at most this many images.
        xflip       = False,# Append a mirrored copy of every image (doubles the length).
        random_seed = 0,    # Seed of the max_size subset.
        cache       = False,# Keep decoded images in memory (per process).
    ):
        self._path = os.fspath(path)
        self._use_labels = bool(use_labels)
        self._cache_enabled = bool(cache)
        self._cache = {}
        self._zipfile = None
        self._zip_pid = None

        # List the files.
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = set(list_folder(self._path))
        elif os.path.isfile(self._path) and self._path.lower().endswith('.zip'):
            self._type = 'zip'
            self._all_fnames = {name for name in self._get_zipfile().namelist() if not name.endswith('/')}
        elif not os.path.exists(self._path):
            raise DatasetError(f"Dataset path '{self._path}' does not exist; pass a folder of images or a .zip made by dataset_tool.py.")
        else:
            raise DatasetError(f"Dataset path '{self._path}' is neither a folder nor a .zip file; pass a folder of images or a .zip made by dataset_tool.py.")
        self._image_fnames = sorted(name for name in self._all_fnames if is_image_name(name))
        if len(self._image_fnames) == 0:
            raise DatasetError(f"No image files found in '{self._path}'; it must contain images Pillow can read (e.g. .png, .jpg), for example as written by dataset_tool.py.")

        # Seeded subset; the reference shuffles only when it actually truncates.
        self._raw_idx = np.arange(len(self._image_fnames), dtype=np.int64)
        if max_size is not None:
            if int(max_size) < 1:
                raise DatasetError(f'max_size must be at least 1, got {max_size}; pass a positive number of images or None.')
            if self._raw_idx.size > max_size:
                np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
                self._raw_idx = np.sort(self._raw_idx[:int(max_size)])

        # Validate shapes from the file headers only: Image.open() parses the header without
        # decoding pixels (about 30 us per PNG inside a zip, i.e. ~2 s for 50k images, vs. a full
        # decode that grows with the resolution). Pixels are checked again when each image is loaded.
        self._raw_shape = [len(self._image_fnames)] + list(self._check_headers(self._raw_idx))
        if resolution is not None and self._raw_shape[2:] != [resolution, resolution]:
            raise DatasetError(f"Images in '{self._path}' are {self._raw_shape[3]}x{self._raw_shape[2]} but resolution {resolution} was requested; "
                f'drop the resolution option or rebuild the dataset with dataset_tool.py --resolution={resolution}x{resolution}.')

        # Labels: [raw images] int64 class indices or [raw images, dim] float32 vectors.
        if self._use_labels:
            self._raw_labels = self._load_raw_labels()
        else:
            self._raw_labels = np.zeros([len(self._image_fnames), 0], dtype=np.float32)

        # The mirrored copy follows the unmirrored one: [raw_idx, raw_idx].
        self._num_unique = int(self._raw_idx.size)
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # The zip is opened lazily and again in every process: a handle inherited through fork
    # shares its file offset with the parent, and open handles cannot be pickled.
    def _get_zipfile(self):
        if self._zipfile is None or self._zip_pid != os.getpid():
            f = open_regular(self._path, 'pass a folder of images or a .zip made by dataset_tool.py', error=DatasetError)
            try:
                self._zipfile = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, NotImplementedError, UnicodeDecodeError, RuntimeError) as err:
                f.close()
                raise DatasetError(f"Cannot read '{self._path}' as a zip file ({describe_exception(err)}); recreate it with dataset_tool.py.") from None
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open_regular(os.path.join(self._path, fname), 'replace it with a regular file', error=DatasetError)
        return self._get_zipfile().open(fname, 'r')

    # Bytes of a file as the folder or the zip's directory declares them (nothing is read).
    def _file_size(self, fname):
        if self._type == 'dir':
            return os.stat(os.path.join(self._path, fname)).st_size
        return self._get_zipfile().getinfo(fname).file_size

    # [C, H, W] of one image from its header, without decoding the pixels.
    def _header_shape(self, fname):
        mode, (width, height) = read_image(lambda: self._open_file(fname), lambda img: (img.mode, img.size),
            f"Cannot read image '{fname}' in '{self._path}'")
        if mode not in _MODE_CHANNELS:
            raise DatasetError(f"Image '{fname}' in '{self._path}' has Pillow mode '{mode}', not 8-bit L/LA/RGB/RGBA; convert it to 8-bit grayscale or RGB.")
        return [_MODE_CHANNELS[mode], height, width]

    # Shape shared by the selected images; the first one sets it and must be square.
    def _check_headers(self, raw_indices):
        first_fname = first_shape = None
        for raw_idx in raw_indices:
            fname = self._image_fnames[raw_idx]
            shape = self._header_shape(fname)
            if first_shape is None:
                first_fname, first_shape = fname, shape
                if max(shape[1:]) > MAX_RESOLUTION:
                    raise DatasetError(f"Image '{fname}' in '{self._path}' is {shape[2]}x{shape[1]} (WxH), larger than the "
                        f'{MAX_RESOLUTION}x{MAX_RESOLUTION} of the largest network trained here; shrink the images, e.g. with '
                        'dataset_tool.py --resolution=512x512.')
                if shape[1] != shape[2]:
                    raise DatasetError(f"Image '{fname}' in '{self._path}' is {shape[2]}x{shape[1]} (WxH) but training needs square images; "
                        'crop them, e.g. with dataset_tool.py --transform=center-crop.')
            elif shape != first_shape:
                raise DatasetError(f"Image '{fname}' has shape {shape} (C, H, W) but the first image '{first_fname}' has {first_shape}; "
                    'all images must share one size and channel count, convert them with dataset_tool.py.')
        return first_shape

    # Decoded pixels of one raw image as uint8 [C, H, W].
    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        image = read_image(lambda: self._open_file(fname), np.array, f"Cannot decode image '{fname}' in '{self._path}'",
            size=self._raw_shape[:1:-1])  # (W, H), checked from the header before decoding
        if image.ndim == 2:
            image = image[:, :, np.newaxis] # HW => HWC
        image = image.transpose(2, 0, 1) # HWC => CHW
        if image.dtype != np.uint8 or list(image.shape) != self._raw_shape[1:]:
            raise DatasetError(f"Image '{fname}' decodes to {image.dtype} {list(image.shape)} but the dataset is uint8 {self._raw_shape[1:]}; "
                'convert it like the other images.')
        return image

    # dataset.json -> int64 [N] class indices or float32 [N, dim] vectors, in image order.
    def _load_raw_labels(self):
        where = f"dataset.json in '{self._path}'"
        if 'dataset.json' not in self._all_fnames:
            raise DatasetError(f"Labels were requested but '{self._path}' has no dataset.json; add one with "
                '{"labels": [[relative path, label], ...]} or train unconditionally (--cond=0).')
        try:
            by_name = parse_labels_json(lambda: self._open_file('dataset.json'), self._file_size('dataset.json'),
                len(self._image_fnames), where, 'fix it or regenerate the dataset with dataset_tool.py')
        except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as err:
            raise DatasetError(f'Cannot read {where} ({describe_exception(err)}); the zip is damaged, recreate it with dataset_tool.py.') from None
        if by_name is None:
            raise DatasetError(f'Labels were requested but {where} says "labels": null (the dataset has no labels); '
                'add labels or train unconditionally (--cond=0).')
        missing = [fname for fname in self._image_fnames if fname not in by_name]
        if missing:
            raise DatasetError(f"{where} has no label for {len(missing)} of {len(self._image_fnames)} images (first: '{missing[0]}'); "
                'label every image or train unconditionally (--cond=0).')
        try:
            values = np.array([by_name[fname] for fname in self._image_fnames])
        except ValueError:
            values = None # ragged
        if values is not None and values.ndim == 1 and values.dtype.kind in 'iu':
            if values.min() < 0:
                raise DatasetError(f'Class labels in {where} must be non-negative integers, found {values.min()}; fix the file.')
            if values.max() >= MAX_CLASSES:
                raise DatasetError(f'Class label {values.max()} in {where} implies more than {MAX_CLASSES:,} classes; '
                    'use class indices 0..N-1.')
            return values.astype(np.int64)
        if values is not None and values.ndim == 2 and values.dtype.kind in 'iuf':
            return values.astype(np.float32)
        raise DatasetError(f'Labels in {where} must be integer class indices or equal-length lists of numbers; fix the file.')

    # Release the zip handle of this process (a new one is opened on the next read).
    def close(self):
        if self._zipfile is not None and self._zip_pid == os.getpid():
            handle = self._zipfile.fp  # a zip opened from a file object leaves that file open
            self._zipfile.close()
            if handle is not None:
                handle.close()
        self._zipfile = None
        self._zip_pid = None

    # Pickled for DataLoader workers: no file handle, and each process builds its own cache.
    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None, _cache={})

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cache.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache_enabled:
                self._cache[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    # One-hot float32 for class indices, the stored vector otherwise, [0] without labels.
    def get_label(self, idx):
        label = self._raw_labels[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    # Where item idx comes from: raw image index, whether it is the mirrored copy, raw label.
    def get_details(self, idx):
        return types.SimpleNamespace(raw_idx=int(self._raw_idx[idx]), xflip=bool(self._xflip[idx] != 0),
            raw_label=self._raw_labels[self._raw_idx[idx]].copy())

    # Properties as in the reference; image_shape and label_shape are lists ([C, H, W], [dim]).
    @property
    def name(self):
        return os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]

    # Items 0..U-1 are the selected images; with xflip, item U + i is item i mirrored.
    @property
    def num_unique_images(self):
        return self._num_unique

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._raw_labels.dtype == np.int64:
            return [int(self._raw_labels.max()) + 1]
        return list(self._raw_labels.shape[1:])

    @property
    def label_dim(self):
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._raw_labels.dtype == np.int64

#----------------------------------------------------------------------------
# Dataset indices forever: a seeded permutation that keeps being re-shuffled by swapping each
# visited slot with a random slot up to `window` places behind it, so there are no epoch
# boundaries; rank r takes global steps r, r + R, r + 2R, ... (same sequence as the reference).
#
# Positions count *global* steps, i.e. images consumed by all ranks together, so a training
# run resumes exactly with `start_index=cur_nimg` (or load_state_dict) on every rank. Only the
# training loop knows cur_nimg: a DataLoader prefetches, so the sampler itself runs ahead.

class InfiniteSampler(torch.utils.data.Sampler):
    _CHUNK = 4096 # random swap offsets drawn per numpy call (the stream equals one call per step)

    def __init__(self, dataset_or_len, rank=0, num_replicas=1, shuffle=True, seed=0, window_size=0.5, start_index=0):
        num_items = dataset_or_len if isinstance(dataset_or_len, (int, np.integer)) else len(dataset_or_len)
        if num_items < 1:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}')
        if not 0 <= window_size <= 1 or start_index < 0:
            raise ValueError(f'need 0 <= window_size <= 1 and start_index >= 0, got {window_size}, {start_index}')
        super().__init__()
        self.num_items = int(num_items)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.window_size = float(window_size)
        self.start_index = int(start_index) # global step where every new iterator begins
        self.position = self.start_index    # global step after the last index handed out

    # What defines the sequence; a saved position is only meaningful for the same values.
    def _identity(self):
        return dict(num_items=self.num_items, shuffle=self.shuffle, seed=self.seed, window_size=self.window_size)

    def state_dict(self):
        return dict(self._identity(), position=self.position)

    def load_state_dict(self, state):
        saved = {key: state.get(key) for key in self._identity()}
        if saved != self._identity():
            raise ValueError(f'sampler state was saved for {saved}, not {self._identity()}; use the same dataset and seed to resume')
        self.start_index = self.position = int(state['position'])

    def __iter__(self):
        order = np.arange(self.num_items)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        order = order.tolist() # Python lists swap several times faster than numpy arrays
        n = len(order)

        # Replay the swaps of the steps before start_index: ~0.12 us per step, ~25 s at 200M images.
        step = 0
        while step < self.start_index and window >= 2:
            count = min(self._CHUNK * 64, self.start_index - step)
            for offset in rnd.randint(window, size=count).tolist():
                i = step % n
                j = (i - offset) % n
                order[i], order[j] = order[j], order[i]
                step += 1
        step = self.start_index

        while True:
            offsets = rnd.randint(window, size=self._CHUNK).tolist() if window >= 2 else [0] * self._CHUNK
            for offset in offsets:
                i = step % n
                if step % self.num_replicas == self.rank:
                    self.position = step + 1
                    yield order[i]
                j = (i - offset) % n
                order[i], order[j] = order[j], order[i]
                step += 1

#----------------------------------------------------------------------------
# Bytes of the decoded pixels of a dataset's distinct images (mirrored copies are made on the fly).
def dataset_nbytes(dataset):
    return dataset.num_unique_images * int(np.prod(dataset.image_shape))

#----------------------------------------------------------------------------
# The whole dataset as uint8 [N, C, H, W] on the device, batches gathered there in the order of
# an InfiniteSampler: the same images and labels, in the same order, as
# DataLoader(dataset, sampler=sampler, batch_size=batch_size), without worker processes or a
# host-to-device copy of pixels per step (CIFAR-10 is 150 MiB; one H100 holds 80 GiB).

class DeviceBatches:
    def __init__(self, dataset, sampler, batch_size, device, num_workers=0):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._indices = iter(sampler)
        # Items 0..U-1 are the distinct images; with xflip, item U + i is item i mirrored.
        unique = dataset.num_unique_images
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(unique)), batch_size=256,
            num_workers=num_workers)
        images, labels = zip(*loader)
        self.images = torch.cat(images).to(self.device)  # [U, C, H, W] uint8
        self.labels = torch.cat(labels).to(self.device)  # [U, label_dim] float32
        self.num_unique = unique
        self.mirrored = len(dataset) > unique

    def next(self):
        """-> (images uint8 [B, C, H, W], labels [B, label_dim]) on the device."""
        index = torch.tensor([next(self._indices) for _ in range(self.batch_size)], dtype=torch.int64)
        if self.device.type == 'cuda':
            index = index.pin_memory()  # an asynchronous copy: the host does not wait for the GPU
        index = index.to(self.device, non_blocking=True)
        rows = index % self.num_unique
        images, labels = self.images[rows], self.labels[rows]
        if self.mirrored:
            images = torch.where((index >= self.num_unique)[:, None, None, None], images.flip(3), images)
        return images, labels

#----------------------------------------------------------------------------
# The training batches of this rank from images seen onwards: a DataLoader, or with
# data_on_device the whole dataset in device memory (same images, same order). auto (None): on
# a GPU when it takes little of it (10% of the card, half of what is free); on: whenever half
# of the free memory holds it (the rest is for the training step).

DEVICE_DATA_FRACTION = 0.1

def training_batches(dataset, cur_nimg, seed, batch_gpu, device, data_on_device, rank, world, **loader_kwargs):
    """A function that returns the next (images uint8 [B, C, H, W], labels [B, label_dim])."""
    sampler = InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=seed, start_index=cur_nimg)
    nbytes = dataset_nbytes(dataset)
    if device.type == 'cuda':
        free, total = torch.cuda.mem_get_info(device)
        if data_on_device is None:
            data_on_device = nbytes <= min(DEVICE_DATA_FRACTION * total, free / 2)
        elif data_on_device and nbytes > free / 2:
            raise DatasetError(f'--data-on-device=on: the dataset takes {nbytes / 2**30:.2f} GiB of the '
                f'{free / 2**30:.1f} GiB of GPU memory that is free; use --data-on-device=auto or off')
    elif data_on_device is None:
        data_on_device = False  # a CPU run: worker processes decode while the step computes
    if data_on_device:
        if rank == 0:
            print(f'Keeping the dataset on the {device.type} ({nbytes / 2**20:.1f} MiB)...')
        return DeviceBatches(dataset, sampler, batch_gpu, device, num_workers=loader_kwargs.get('num_workers', 0)).next
    return iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
        pin_memory=(device.type == 'cuda'), **loader_kwargs)).__next__

#----------------------------------------------------------------------------
