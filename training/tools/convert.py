"""Convert a network file: a reference EDM/FDM pickle (or one of our snapshots) into our safe
snapshot format, or into .safetensors (tensors, with the network description in the metadata).

    python -m training.tools.convert network-snapshot-200000.pkl network-snapshot-200000.pt
    python -m training.tools.convert network-snapshot-200000.pt network-snapshot-200000.safetensors
"""

import os

import click

from fdm.io.network_files import convert_reference_pickle
from torch_utils.errors import UserError, one_line

#----------------------------------------------------------------------------

@click.command()
@click.argument('src')
@click.argument('dst', type=click.Path(dir_okay=False))
def main(src, dst):
    """Read SRC (a path or URL: an EDM/FDM .pkl, or our .pt/.safetensors) without executing it and write DST
    (.safetensors by its extension, else our .pt format)."""
    if os.path.exists(dst):
        raise click.ClickException(f'{dst} exists; choose another output path or remove it first')
    try:
        data = convert_reference_pickle(src, dst)
    except UserError as err:  # a bad source, or a failed write of DST
        raise click.ClickException(one_line(err)) from None
    net = data['ema']
    n = sum(p.numel() for p in net.parameters())
    click.echo(f'Wrote {dst}: {type(net).__name__} ({type(net.model).__name__}, {n:,} parameters)')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
