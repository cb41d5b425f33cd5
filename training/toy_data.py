"""An embedded toy dataset, so the whole pipeline runs offline: coloured shapes on a plain
background, 4 classes (disc, square, ring, cross), written as a standard dataset zip.

    python -m training.toy_data --dest=datasets/shapes-16x16.zip --resolution=16 --num=2048
"""

import io
import json
import os
import tempfile
import zipfile

import click
import numpy as np
import PIL.Image

CLASSES = ['disc', 'square', 'ring', 'cross']

#----------------------------------------------------------------------------
# One image [R, R, 3] uint8 of class `label`, with random colour, size and position.

def draw_shape(rng, label, resolution):
    yy, xx = np.mgrid[:resolution, :resolution] + 0.5
    radius = rng.uniform(0.22, 0.38) * resolution
    cy, cx = rng.uniform(radius, resolution - radius, size=2)
    dy, dx = yy - cy, xx - cx
    if label == 0:
        mask = dy ** 2 + dx ** 2 <= radius ** 2
    elif label == 1:
        mask = np.maximum(abs(dy), abs(dx)) <= radius * 0.85
    elif label == 2:
        mask = abs(np.sqrt(dy ** 2 + dx ** 2) - radius * 0.75) <= radius * 0.25
    else:
        mask = (np.minimum(abs(dy), abs(dx)) <= radius * 0.3) & (np.maximum(abs(dy), abs(dx)) <= radius)
    background = rng.uniform(0, 80, size=3)
    colour = rng.uniform(120, 255, size=3)
    image = np.where(mask[..., None], colour, background)
    return image.round().clip(0, 255).astype(np.uint8)

def write_toy_dataset(dest, resolution=16, num=2048, seed=0):
    """Write `num` images with class labels to the zip `dest` (atomically)."""
    rng = np.random.RandomState(seed)
    labels = []
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix='.tmp-', suffix='.zip')
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
            for idx in range(num):
                label = idx % len(CLASSES)
                buf = io.BytesIO()
                PIL.Image.fromarray(draw_shape(rng, label, resolution)).save(buf, format='PNG', compress_level=0)
                name = f'{idx // 1000:05d}/img{idx:08d}.png'
                z.writestr(name, buf.getvalue())
                labels.append([name, label])
            z.writestr('dataset.json', json.dumps(dict(labels=labels)))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

#----------------------------------------------------------------------------

@click.command()
@click.option('--dest', help='Output zip', metavar='ZIP', type=str, required=True)
@click.option('--resolution', help='Image size', metavar='INT', type=click.IntRange(min=8), default=16, show_default=True)
@click.option('--num', help='Number of images', metavar='INT', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def main(dest, resolution, num, seed):
    """Write the embedded toy dataset (coloured shapes, 4 classes) as a dataset zip."""
    if resolution & (resolution - 1):
        raise click.ClickException(f'--resolution={resolution} must be a power of two (the networks halve it per level)')
    write_toy_dataset(dest, resolution, num, seed)
    click.echo(f'Wrote {num} images of {resolution}x{resolution} ({", ".join(CLASSES)}) to {dest}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
