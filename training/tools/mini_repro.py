"""The paper's claim in miniature: does momentum (FDM) train faster than its baseline?

Trains EDM vs EDM-FDM, VP vs VP-FDM and VE vs VE-FDM on the embedded digits with identical
seeds, networks and budget, scores FD-digits at each snapshot while training (as train.py
--metrics=fd-digits: fid.py gen's images, so `python -m training.tools.tables kimg` reproduces and
reuses every number), and writes a Markdown table shaped like the paper's (FD vs training images,
one column per method), the numbers as JSON, and a PNG plot of the curves.

    python -m training.tools.mini_repro --outdir=mini-repro --kimg=200 --evals=4   # a GPU: minutes
    python -m training.tools.mini_repro --outdir=mini-repro --smoke                # CPU check
"""

import os
import time

import click
import torch

from torch_utils import distributed

from fdm.methods import TITLES
from torch_utils.io.files import atomic_write, write_json
from torch_utils.cli.options import Range, option_type
from training.tools import digits_pipeline as dp
from training.evaluation import plots
from training.evaluation import tables
from training.config import TRAIN_RANGES

METHODS = ['edm', 'fdm_edm', 'vp', 'fdm_vp', 've', 'fdm_ve']

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Output directory', metavar='DIR', type=str, default='mini-repro', show_default=True)
@click.option('--kimg', help='Training budget per method (thousands of images)', metavar='KIMG', type=option_type(Range(min=0, min_open=True)), default=200, show_default=True)
@click.option('--evals', help='FD-digits evaluations per run, evenly spaced (and one after the first step)', metavar='INT', type=option_type(Range(min=1, integer=True)), default=4, show_default=True)
@click.option('--metric-images', 'metric_images', help='Images of each FD-digits (seeds 0..N-1, as fid.py gen)', metavar='INT', type=option_type(TRAIN_RANGES['metric_images']), default=1000, show_default=True)
@click.option('--methods', help='Comma-separated subset of ' + ','.join(METHODS), metavar='LIST', type=str, default=','.join(METHODS), show_default=True)
@click.option('--seed', help='Seed shared by all runs', metavar='INT', type=option_type(TRAIN_RANGES['seed']), default=0, show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=option_type(TRAIN_RANGES['batch']), default=128, show_default=True)
@click.option('--smoke', help='Tiny budget, for a CPU check of the whole procedure', is_flag=True)
def main(outdir, kimg, evals, metric_images, methods, seed, batch, smoke):
    """Train baseline/FDM pairs on the digits and tabulate FD-digits against training images."""
    methods = [m.strip() for m in methods.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.ClickException(f'unknown method(s) {unknown}; choose from {",".join(METHODS)}')
    if smoke:
        kimg, evals, metric_images, batch = 1, 2, 10, 64
    distributed.configure_cpu_threads()  # on a CPU: the idle cores, not one thread per core
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    start = time.time()
    data, ref = dp.prepare_data(outdir, device)
    results = {}
    for m in methods:
        run_dir = os.path.join(outdir, f'run-{m}')
        dp.train(data, run_dir, precond=m, total_kimg=kimg, seed=seed, batch=batch, ticks=evals, snapshots=evals,
            device=device, ref=ref, metric_images=metric_images)
        # The table's rows are the evenly spaced snapshots; the one after the first step is left out.
        results[m] = {k: fd for k, fd in dp.fd_curve(run_dir).items() if k >= 0.5 * kimg / evals}
        click.echo(f'{TITLES[m]}: ' + ', '.join(f'{k:g} kimg FD-digits {fd:.3f}' for k, fd in results[m].items()))
    table = tables.markdown_table('Training images (kimg)', [TITLES[m] for m in methods],
        {TITLES[m]: results[m] for m in methods})
    header = (f'FD-digits (lower is better) of class-conditional models on the digits, {metric_images} samples each '
        f'(seeds 0-{metric_images - 1}, as fid.py gen), EDM Heun sampler with 18 steps; budget {kimg:g} kimg, batch {batch}, '
        f'seed {seed}, {device}, {time.time() - start:.0f} s in all.\n\n')
    atomic_write(os.path.join(outdir, 'results.md'), lambda f: f.write((header + table).encode('utf-8')))
    write_json(os.path.join(outdir, 'results.json'), {m: {str(k): v for k, v in r.items()} for m, r in results.items()})
    click.echo('\n' + header + table)
    try:
        plots.line_plots([('FD-digits', {TITLES[m]: results[m].items() for m in methods})], os.path.join(outdir, 'results.png'),
            'training images (kimg)', size=(640, 420), dashed=[TITLES[m] for m in methods if m.startswith('fdm_')])
        click.echo(f'Wrote {os.path.join(outdir, "results.md")}, results.json and results.png')
    except plots.PlotError as err:
        click.echo(f'Wrote {os.path.join(outdir, "results.md")} and results.json; results.png not drawn: {err}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
