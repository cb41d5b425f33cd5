"""Datasets that cannot be trained on are refused before the run folder exists, in one line: images
larger than the largest network (training/data/dataset.py MAX_RESOLUTION, read from the first
header, so a 9000x9000 PNG of a few kilobytes is never decoded), and a resolution the chosen U-Net
cannot halve at each of its levels (training/config.py, with fdm/io/network_files.py's rule)."""

import struct
import zipfile
import zlib

import pytest

from conftest import one_line_error, run_train_cli, write_image_zip
from torch_utils.errors import OptionError
from training.config import setup_training_config
from training.data.dataset import MAX_RESOLUTION, DatasetError, ImageFolderDataset

# A black 8-bit grayscale PNG, compressed row by row: 9000x9000 is 81 MB of pixels in 80 kB.
def blank_png(width, height):
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    compressor, row = zlib.compressobj(9), b'\0' * (width + 1)  # filter byte 0, then the row
    pixels = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
        + chunk(b'IDAT', pixels) + chunk(b'IEND', b''))

def one_image_zip(path, side):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr('img0.png', blank_png(side, side))
    return str(path)

def test_images_larger_than_any_network_are_refused_from_the_header(tmp_path):
    assert ImageFolderDataset(one_image_zip(tmp_path / 'edge.zip', MAX_RESOLUTION)).resolution == MAX_RESOLUTION
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(one_image_zip(tmp_path / 'big.zip', MAX_RESOLUTION + 1))
    assert str(info.value).startswith(f"Image 'img0.png' in '{tmp_path / 'big.zip'}' is 4097x4097 (WxH), larger than the "
        '4096x4096 of the largest network trained here; shrink the images')

# A dry run reads the dataset as a run does (before this bound, a real run went on to allocate
# gigabytes for a network at 9000x9000, so this test never starts one).
def test_train_refuses_a_9000x9000_image(tmp_path):
    data = one_image_zip(tmp_path / 'bomb.zip', 9000)
    line = one_line_error(run_train_cli('-n', '--outdir', tmp_path / 'runs', '--data', data))
    assert 'is 9000x9000 (WxH), larger than the 4096x4096' in line
    assert not (tmp_path / 'runs').exists()

#----------------------------------------------------------------------------
# Each U-Net level halves the resolution and the decoder doubles it back: 17 -> 8 -> 17 cannot meet.
# The reference starts the run and fails in the first step.

@pytest.mark.parametrize('arch, cres, factor, examples', [('ddpmpp', None, 4, '16, 20'), ('adm', None, 8, '16, 24'),
    ('ddpmpp', [1, 2], 2, '16, 18')])
def test_a_resolution_the_unet_cannot_halve_is_refused(tmp_path, arch, cres, factor, examples):
    data = write_image_zip(tmp_path / 'odd.zip', num_images=2, resolution=17, num_classes=0)
    with pytest.raises(OptionError) as info:
        setup_training_config(data=data, outdir=str(tmp_path / 'runs'), arch=arch, cres=cres)
    assert f'must be a multiple of {factor} (e.g. {examples})' in str(info.value) and '\n' not in str(info.value)

def test_a_resolution_with_one_level_per_halving_is_accepted(tmp_path):
    data = write_image_zip(tmp_path / 'odd.zip', num_images=2, resolution=17, num_classes=0)
    c, _run = setup_training_config(data=data, outdir=str(tmp_path / 'runs'), cres=[1], workers=0)
    assert c.dataset_kwargs.resolution == 17 and c.network_kwargs.channel_mult == [1]

def test_train_refuses_17x17_before_the_run_folder(tmp_path):
    data = write_image_zip(tmp_path / 'odd.zip', num_images=8, resolution=17, num_classes=0)
    line = one_line_error(run_train_cli('--outdir', tmp_path / 'runs', '--data', data, '--cbase=8', '--cres=1,2',
        '--batch=8', '--duration=0.000016', '--workers=0', '--grid-images=0'))
    assert line == (f"Error: --data: '{data}' cannot be trained with --arch=ddpmpp --cres=1,2: 17x17 images do not fit "
        'a U-Net of 2 resolutions, which halves them at each level below the first: the resolution must be a multiple '
        'of 2 (e.g. 16, 18); resize it with dataset_tool.py --resolution, or give --cres fewer levels')
    assert not (tmp_path / 'runs').exists()
