"""Post-hoc EMA reconstruction: build the EMA of any length from the power-function EMA profiles
that train.py --phema-std stored (the method is in training/phema.py).

    python -m training.tools.phema --run=training-runs/00000-... --std=0.07 --out=network-phema-0.070.pt
"""

import click

from torch_utils.errors import UserError, one_line
from torch_utils.cli.options import option_type
from training.phema import KIMG_RANGE, STD_RANGE, reconstruct

#----------------------------------------------------------------------------

@click.command()
@click.option('--run', 'run_dir', help='Run directory with phema-*.pt snapshots', metavar='DIR', required=True)
@click.option('--std', help='Relative std of the EMA to build, e.g. 0.07', metavar='FLOAT', type=option_type(STD_RANGE), required=True)
@click.option('--kimg', help='Training time of the EMA, one at which profiles were stored  [default: the newest]', metavar='KIMG', type=option_type(KIMG_RANGE))
@click.option('--out', help='Network snapshot to write', metavar='PT', required=True)
def main(run_dir, std, kimg, out):
    """Post-hoc EMA: build the EMA of any length from the profiles stored by train.py --phema-std.

    \b
    python -m training.tools.phema --run=training-runs/00000-... --std=0.07 --out=network-phema-0.070.pt
    """
    try:
        reconstruct(run_dir, std, out, kimg=kimg, log=click.echo)
    except UserError as err:
        raise click.ClickException(one_line(err)) from None
    click.echo(f'Wrote {out}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
