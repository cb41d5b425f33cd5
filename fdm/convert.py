"""Convert a reference EDM/FDM network pickle into our safe snapshot format.

    python -m fdm.convert network-snapshot-200000.pkl network-snapshot-200000.pt
"""

import os

import click

from fdm.checkpoint import convert_reference_pickle
from torch_utils.errors import UserError, one_line

#----------------------------------------------------------------------------

@click.command()
@click.argument('src')
@click.argument('dst', type=click.Path(dir_okay=False))
def main(src, dst):
    """Read SRC (a path or URL to an EDM/FDM .pkl) without executing it and write DST."""
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
