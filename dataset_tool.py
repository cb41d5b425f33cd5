"""Convert image folders, zips, CIFAR-10 and MNIST archives into the dataset layout that
training/data/dataset.py reads:

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64

The output is an uncompressed zip (or a new folder) of PNGs named 00000/img00000000.png, ...
plus dataset.json with the labels. It appears under its final name only once complete, and a
summary follows: images, resolution, channels, labels (and the class of each subfolder), destination.
The readers live in training/data/sources.py, the writer in training/data/writer.py.
"""

import click

from torch_utils.errors import OptionError, UserError
from torch_utils.cli.options import Range, option_type
from training.data.sources import parse_resolution
from training.data.writer import convert_dataset

#----------------------------------------------------------------------------

def _resolution_option(_ctx, _param, value):
    try:
        return None if value is None else parse_resolution(value)
    except OptionError as err:
        raise click.BadParameter(str(err)) from None

@click.command()
@click.option('--source', help='Folder, .zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, or sklearn-digits (embedded)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output .zip, or a new or empty folder', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Read at most this many input images', metavar='INT', type=option_type(Range(min=1, integer=True)))
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
        summary = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except UserError as err:
        raise click.ClickException(str(err)) from None
    for line in summary.lines():
        click.echo(line)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
