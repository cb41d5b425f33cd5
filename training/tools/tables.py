"""The paper's tables from one command each: FID against training images, FID against NFE, and
training curves (the computations and their result cache are in training/evaluation/tables.py).

    python -m training.tools.tables kimg RUN_DIR... --kimg=50000,100000,150000,200000 --ref=REF.npz --outdir=DIR
    python -m training.tools.tables nfe SNAPSHOT... --nfe=25,49,79 --solver=edm,dpm --ref=REF.npz --outdir=DIR
    python -m training.tools.tables curves RUN_DIR... --stat=Loss/loss --out=training-curves.png
"""

import math
import re

import click

import dnnlib
from torch_utils import precision as precision_lib
from torch_utils.cli.command import run_command
from torch_utils.cli.options import Range, option_type
from training.evaluation import generation
from training.evaluation import tables

#----------------------------------------------------------------------------
# Option parsers: each turns its text into the value the library takes, or one usage error.

def _float_list(ctx, param, value):
    if value is None or value == 'all':
        return None
    try:
        out = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'{value!r} is not "all" or a list of numbers like 50000,100000') from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise click.BadParameter(f'{value!r}: give positive numbers of kimg, e.g. 50000,100000')
    return sorted(set(out))

# --nfe: at most generate.py's step bound, since DPM-Solver++ makes one network evaluation per step.
NFE_RANGE = Range(min=1, max=generation.MAX_STEPS, integer=True)

# --protocol N: three seed ranges of N images, within the seeds one run may take (as fid.py protocol --num).
PROTOCOL_RANGE = Range(min=2, max=generation.MAX_SEEDS // 3, integer=True)

def _nfe_list(ctx, param, value):
    try:
        out = sorted(set(dnnlib.util.parse_int_list(value, minimum=1, max_items=1000)))
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    problem = next((NFE_RANGE.problem(n) for n in out if NFE_RANGE.problem(n) is not None), None)
    if problem is not None:
        raise click.BadParameter(f'{problem}; give network evaluations per image like 25,49,79')
    return out

def _solvers(ctx, param, value):
    out = [s.strip() for s in value.split(',') if s.strip()]
    wrong = [s for s in out if s not in tables.SOLVER_TITLES]
    if not out or wrong:
        raise click.BadParameter(f'{value!r}: give solvers among {",".join(tables.SOLVER_TITLES)}')
    return out

def _size(ctx, param, value):
    m = re.fullmatch(r'(\d+)x(\d+)', value)
    if not m or not all(64 <= int(v) <= 8000 for v in m.groups()):
        raise click.BadParameter(f'{value!r}: give WIDTHxHEIGHT in pixels, each 64..8000, e.g. 800x500')
    return int(m.group(1)), int(m.group(2))

def _scoring_options(fn):
    options = [
        click.option('--ref', 'ref', help='Reference statistics (fid.py ref)', metavar='NPZ|URL', required=True),
        click.option('--outdir', help='Where results.md/json/png and the cache go', metavar='DIR', required=True),
        click.option('--seeds', help='Seeds of each FID', metavar='LIST', type=generation.parse_seeds, default='0-49999', show_default=True),
        click.option('--protocol', 'protocol_num', help='Instead: three seed ranges of N images, minimum (and mean, std) as fid.py protocol', metavar='N', type=option_type(PROTOCOL_RANGE)),
        click.option('--batch', help='Maximum batch size per GPU', metavar='INT', type=option_type(Range(min=1, integer=True)), default=64, show_default=True),
        click.option('--precision', help='Network precision while sampling', type=click.Choice(list(precision_lib.PRECISIONS)), default='fp32', show_default=True),
        click.option('--detector', help='Feature detector as in fid.py: URL, path, "nvidia", "pytorch-fid" or "digits"', metavar='URL|PATH'),
        click.option('--trust-detector', 'trust_detector', help='Run a TorchScript --detector file that is not a known official one (as fid.py)', is_flag=True),
        click.option('--plot-size', 'plot_size', help='results.png size in pixels', metavar='WxH', callback=_size, default='800x500', show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

@click.group()
def main():
    """The paper's tables: FID against training images, FID against NFE, training curves."""

@main.command()
@click.argument('runs', nargs=-1, required=True, metavar='RUN_DIR...')
@click.option('--kimg', help='Training durations (kimg), or "all" snapshots', metavar='LIST|all', callback=_float_list, default='all', show_default=True)
@click.option('--tolerance', help='Largest relative distance of a snapshot from its --kimg', metavar='FLOAT', type=option_type(Range(min=0)), default=0.05, show_default=True)
@click.option('--solver', help='Sampler, as in generate.py', type=click.Choice(list(tables.SOLVER_TITLES)), default='edm', show_default=True)
@click.option('--steps', help='Sampling steps', metavar='INT', type=option_type(generation.SAMPLER_RANGES['num_steps']), default=18, show_default=True)
@_scoring_options
def kimg(runs, kimg, tolerance, solver, steps, **kwargs):
    """FID against training images: one column per run, one row per duration."""
    run_command(tables.fid_vs_training, list(runs), kimg=kimg, tolerance=tolerance, solver=solver, steps=steps, **kwargs)

@main.command()
@click.argument('networks', nargs=-1, required=True, metavar='SNAPSHOT...')
@click.option('--nfe', help='Network evaluations per image', metavar='LIST', callback=_nfe_list, default='25,49,79', show_default=True)
@click.option('--solver', 'solvers', help='Samplers, one table each', metavar='LIST', callback=_solvers, default='edm,dpm', show_default=True)
@_scoring_options
def nfe(networks, nfe, solvers, **kwargs):
    """FID against NFE: one table per solver, one column per network, one row per NFE."""
    run_command(tables.fid_vs_nfe, list(networks), nfe=nfe, solvers=solvers, **kwargs)

@main.command()
@click.argument('runs', nargs=-1, required=True, metavar='RUN_DIR...')
@click.option('--stat', 'stats', help='Statistic of stats.jsonl (repeatable)', metavar='NAME', multiple=True, default=['Loss/loss'], show_default=True)
@click.option('--out', help='The PNG to write', metavar='PNG', default='training-curves.png', show_default=True)
@click.option('--plot-size', 'plot_size', help='Size in pixels', metavar='WxH', callback=_size, default='800x500', show_default=True)
def curves(runs, stats, out, plot_size):
    """Training curves: statistics of stats.jsonl against training images, runs overlaid."""
    run_command(tables.training_curves, list(runs), out, stats=stats, plot_size=plot_size)
    click.echo(f'Wrote {out}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
