"""The dataset layout that training/data/dataset.py reads, written from any source of
training/data/sources.py: an uncompressed zip (or a new folder) of PNGs named
00000/img00000000.png, ... plus dataset.json with the labels, which appears under its final
name only once complete.
"""

import contextlib
import dataclasses
import io
import json
import os
import secrets
import shutil
import zipfile
from typing import Optional

import PIL.Image
from tqdm import tqdm

from torch_utils.errors import OptionError, describe_exception
from torch_utils.io.files import atomic_write, check_destination
from training.data.dataset import DatasetError
from training.data.sources import make_transform, open_source, parse_resolution

#----------------------------------------------------------------------------
# Destination: refused before the source is read if it would overwrite anything.

# Refuse an empty path, an existing zip and a non-empty folder; returns (absolute path, is zip).
def check_dest(dest):
    if not dest:
        raise OptionError('--dest is empty; pass an output .zip path or a new folder.')
    dest = os.path.abspath(dest)
    is_zip = dest.lower().endswith('.zip')
    if is_zip and os.path.exists(dest):
        raise DatasetError(f"Destination '{dest}' already exists; delete it or choose another --dest.")
    if not is_zip and os.path.exists(dest) and not os.path.isdir(dest):
        raise DatasetError(f"Destination '{dest}' is an existing file; pass a .zip path or a new or empty folder.")
    if not is_zip and os.path.isdir(dest) and os.listdir(dest):
        raise DatasetError(f"Destination folder '{dest}' is not empty; delete its contents or choose another --dest.")
    check_destination(dest, '--dest', folder=not is_zip)
    return dest, is_zip

# The missing folders above `path`, created top-down; returned so that a failure can remove them.
def _make_parent_dirs(path):
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    for folder in reversed(made):
        os.mkdir(folder)
    return made

# All of `files` ((name, bytes) pairs, in order) into one zip through atomic_write: members are
# stored uncompressed and stamped with the current time, as zipfile.writestr does.
def _write_zip(dest, files):
    count = 0
    def write(f):
        nonlocal count
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as archive:
            for name, data in files:
                archive.writestr(name, data)
                count += 1
        if os.path.exists(dest):
            raise DatasetError(f"Destination '{dest}' appeared while writing; delete it or choose another --dest.")
    atomic_write(dest, write)
    return count

# All of `files` into a hidden folder beside `dest`, renamed to `dest` at the end. The folder is
# the unit that appears, so the files in it are written plainly (no per-file temporary and
# rename, no fsync): a folder lost to a power cut is rebuilt by running the conversion again.
def _write_folder(dest, files):
    tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.{secrets.token_hex(4)}.tmp')
    os.mkdir(tmp) # os.mkdir, not tempfile: the folder gets the usual permissions, not 0700
    try:
        count = 0
        for name, data in files:
            path = os.path.join(tmp, *name.split('/'))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path, 'xb') as f:
                    f.write(data)
            except OSError as err:
                raise DatasetError(f"Cannot write '{name}' of '{dest}' ({describe_exception(err)}); free disk space "
                    'or check the --dest folder, then run the conversion again.') from None
            count += 1
        try:
            if os.path.isdir(dest):
                os.rmdir(dest) # empty: checked before, and rmdir refuses otherwise
            os.rename(tmp, dest)
        except OSError as err:
            raise DatasetError(f"Cannot move the finished dataset to '{dest}' ({describe_exception(err)}); make sure it is a new or empty folder.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count

# Write `files` to `dest` (a .zip or a folder); on any error, nothing of it is left behind,
# including the folders made for it. Returns the number of files written.
def write_files(dest, files):
    dest, is_zip = check_dest(dest)
    try:
        made_dirs = _make_parent_dirs(os.path.dirname(dest))
    except OSError as err:
        raise DatasetError(f"Cannot create the folder of '{dest}' ({describe_exception(err)}); check the --dest path.") from None
    try:
        return _write_zip(dest, files) if is_zip else _write_folder(dest, files)
    except BaseException:
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
            raise DatasetError(f"Image '{name}' is {_describe(image)} but the first image is {_describe(first)}; "
                'all images must match, pass e.g. --resolution=64x64 (and --transform=center-crop for non-square images).')
        if image.shape != first.shape:
            raise DatasetError(f"Image '{name}' is {_describe(image)} but the first image is {_describe(first)}; "
                'all images must match, convert it or pass --transform=center-crop, which makes every image RGB.')
        return
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    if width != height:
        raise DatasetError(f"The first image '{name}' is {width}x{height}, not square; pass a square --resolution such as 64x64, "
            'with --transform=center-crop if the images are not square.')
    if width & (width - 1):
        raise DatasetError(f"The first image '{name}' is {width}x{height}, not a power-of-two size; pass e.g. --resolution=64x64.")
    if channels not in (1, 3):
        raise DatasetError(f"The first image '{name}' has {channels} channels; only grayscale (1) or RGB (3) images are supported.")

# Stored (zlib level 0) PNGs: training decodes them many times, and the zip is not compressed either.
def _png_bytes(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format='png', compress_level=0, optimize=False) # mode L or RGB
    return buf.getvalue()

# (archive name, bytes) of every PNG and then dataset.json, checked as they are made; `written`
# receives the first image and the (source name, label) of every image, for the summary.
def _dataset_files(items, transform_image, describe_skip, written):
    labels = [] # [[archive name, label or None], ...]
    sources = [] # [(source name, label or None), ...]
    first = None
    for idx, (name, image, label) in enumerate(items):
        image = transform_image(image)
        if image is None:
            continue # too small for center-crop-wide; its index stays unused
        _check_shape(image, name, first)
        first = image if first is None else first
        archive_name = f'{idx // 1000:05d}/img{idx:08d}.png'
        yield archive_name, _png_bytes(image)
        labels.append([archive_name, label])
        sources.append((name, label))
    if not labels:
        raise DatasetError(describe_skip())
    written.update(first=first, sources=sources)
    all_labelled = all(label is not None for _name, label in labels)
    yield 'dataset.json', json.dumps({'labels': labels if all_labelled else None}).encode()

#----------------------------------------------------------------------------
# What a conversion wrote, as dataset_tool.py reports it at the end.

@dataclasses.dataclass
class DatasetSummary:
    dest: str               # absolute path of the zip or folder
    num_images: int
    resolution: int         # width = height
    channels: int           # 1 (grayscale) or 3 (RGB)
    labels: Optional[str]   # None, 'classes' (class indices), 'vectors' (dataset.json's label vectors) or 'other'
    label_dim: int          # classes (largest index + 1, as the dataset reader counts them) or vector length; else 0
    class_folders: Optional[dict] = None # {top-level folder: label} when a folder source's labels are its subfolders

    def lines(self):
        if self.labels == 'classes':
            labels = f'labels: {self.label_dim} classes'
        elif self.labels == 'vectors':
            labels = f'labels: vectors of {self.label_dim} numbers'
        elif self.labels == 'other':
            labels = 'labels from dataset.json that are neither class indices nor vectors of one length'
        else:
            labels = 'no labels'
        lines = [f'{self.num_images:,} images, {self.resolution}x{self.resolution}, '
            f'{self.channels} channel{"s" if self.channels > 1 else ""}, {labels}']
        if self.class_folders:
            lines.append('classes from folders: ' + ', '.join(f'{name} -> {label}' for name, label in self.class_folders.items()))
        lines.append(f'written to {self.dest}')
        return lines

# {top-level folder: label} when every image sits in a subfolder and each folder holds one label of
# its own (a folder source's class subfolders, or a dataset.json that agrees with them); else None.
def _class_folders(sources):
    folder_labels = {}
    for name, label in sources:
        if '/' not in name:
            return None
        folder_labels.setdefault(name.split('/')[0], set()).add(label)
    if any(len(labels) > 1 for labels in folder_labels.values()):
        return None
    mapping = {folder: labels.pop() for folder, labels in sorted(folder_labels.items(), key=lambda item: min(item[1]))}
    return mapping if len(set(mapping.values())) == len(mapping) > 1 else None

def _summarize(source, dest, written):
    image, sources = written['first'], written['sources'] # at least one image: _dataset_files raised otherwise
    labels = [label for _name, label in sources]
    is_index = lambda label: isinstance(label, int) and not isinstance(label, bool) and label >= 0
    kind, dim = None, 0
    if all(is_index(label) for label in labels):
        kind, dim = 'classes', max(labels) + 1
    elif all(isinstance(label, list) and len(label) == len(labels[0]) for label in labels):
        kind, dim = 'vectors', len(labels[0])
    elif all(label is not None for label in labels):
        kind = 'other'
    folders = _class_folders(sources) if kind == 'classes' and os.path.isdir(source) else None
    return DatasetSummary(dest=os.path.abspath(dest), num_images=len(sources), resolution=image.shape[1],
        channels=1 if image.ndim == 2 else image.shape[2], labels=kind, label_dim=dim, class_folders=folders)

#----------------------------------------------------------------------------
# The whole conversion, callable from tests; returns a DatasetSummary of what was written.

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None):
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    transform_image = make_transform(transform, resolution)
    check_dest(dest) # before reading the source, which can take a while
    num_images, items = open_source(source, max_images)
    describe_skip = lambda: (f"Every image of '{source}' was too small for --transform={transform} at {resolution[0]}x{resolution[1]}; "
        'pick a smaller --resolution.')
    written = {}
    # tqdm as a context manager ends the progress line before an error message is printed.
    with tqdm(items, total=num_images, unit='img') as progress:
        write_files(dest, _dataset_files(progress, transform_image, describe_skip, written))
    return _summarize(source, dest, written)

#----------------------------------------------------------------------------
