"""The paper's claim in miniature: does momentum (FDM) train faster than its baseline?

Trains EDM vs EDM-FDM, VP vs VP-FDM and VE vs VE-FDM on the embedded digits with identical
seeds, networks and budget, scores FD-digits at fixed training-image counts, and writes a
Markdown table shaped like the paper's (FD vs training images, one column per method),
the numbers as JSON, and a PNG plot of the curves.

    python -m training.tools.mini_repro --outdir=mini-repro --kimg=200 --evals=4   # a GPU: minutes
    python -m training.tools.mini_repro --outdir=mini-repro --smoke                # CPU check
"""

import os
import time

import click
import torch

from torch_utils import distributed
from torch_utils.errors import EvaluationError

from fdm.methods import TITLES
from training.evaluation.digits import WEIGHTS as DIGITS_WEIGHTS
from torch_utils.io.files import atomic_write, write_json
from torch_utils.cli.options import Range, option_type
from training.tools import digits_pipeline as dp
from training.evaluation import plots
from training.evaluation import tables
from training.config import TRAIN_RANGES

METHODS = ['edm', 'fdm_edm', 'vp', 'fdm_vp', 've', 'fdm_ve']

#----------------------------------------------------------------------------

# One evaluation per snapshot (but the one after the first step), through the tables' result
# cache in outdir/cache: a rerun on the same snapshots recomputes nothing.
def evaluate_runs(outdir, methods, ref, per_class, min_kimg, device):
    jobs, hashes = [], dict(reference_sha256=tables.file_sha256(ref), detector_sha256=tables.file_sha256(DIGITS_WEIGHTS))
    for m in methods:
        for _kimg, path in tables.list_snapshots(os.path.join(outdir, f'run-{m}')):
            snap = tables.inspect_snapshot(path)
            if snap['kimg'] < min_kimg:
                continue  # the snapshot after the first step
            key = dict(kind='fd-digits-balanced', snapshot_sha256=snap['sha256'], per_class=per_class, num_steps=18,
                **hashes)
            jobs.append(dict(key=key, images=10 * per_class, method=m, kimg=round(snap['kimg'], 3), path=path))
    def compute(job, advance):
        fd, accuracy, _, _ = dp.evaluate_snapshot(job['path'], ref, per_class, device)
        return dict(fd=fd, accuracy=accuracy)
    records = tables.run_jobs(jobs, compute, tables.ResultCache(os.path.join(outdir, 'cache')))
    results = {m: {} for m in methods}
    for job, record in zip(jobs, records):
        fd, accuracy = float(record['result']['fd']), float(record['result']['accuracy'])
        results[job['method']][job['kimg']] = fd
        click.echo(f'{TITLES[job["method"]]:8s} {job["kimg"]:8.3f} kimg: FD-digits {fd:.3f}, class accuracy {accuracy:.3f}')
    return results

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Output directory', metavar='DIR', type=str, default='mini-repro', show_default=True)
@click.option('--kimg', help='Training budget per method (thousands of images)', metavar='KIMG', type=option_type(Range(min=0, min_open=True)), default=200, show_default=True)
@click.option('--evals', help='FD-digits evaluations per run, evenly spaced', metavar='INT', type=option_type(Range(min=1, integer=True)), default=4, show_default=True)
@click.option('--per-class', help='Samples per class for each FD-digits', metavar='INT', type=option_type(Range(min=2, integer=True)), default=100, show_default=True)
@click.option('--methods', help='Comma-separated subset of ' + ','.join(METHODS), metavar='LIST', type=str, default=','.join(METHODS), show_default=True)
@click.option('--seed', help='Seed shared by all runs', metavar='INT', type=option_type(TRAIN_RANGES['seed']), default=0, show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=option_type(TRAIN_RANGES['batch']), default=128, show_default=True)
@click.option('--smoke', help='Tiny budget, for a CPU check of the whole procedure', is_flag=True)
def main(outdir, kimg, evals, per_class, methods, seed, batch, smoke):
    """Train baseline/FDM pairs on the digits and tabulate FD-digits against training images."""
    methods = [m.strip() for m in methods.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.ClickException(f'unknown method(s) {unknown}; choose from {",".join(METHODS)}')
    if smoke:
        kimg, evals, per_class, batch = 2, 2, 2, 64
    distributed.configure_cpu_threads()  # on a CPU: the idle cores, not one thread per core
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    start = time.time()
    data, ref = dp.prepare_data(outdir, device)
    for m in methods:
        dp.train(data, os.path.join(outdir, f'run-{m}'), precond=m, total_kimg=kimg, seed=seed, batch=batch, ticks=evals,
            snapshots=evals, device=device)
    try:
        results = evaluate_runs(outdir, methods, ref, per_class, 0.5 * kimg / evals, device)
    except EvaluationError as err:
        raise click.ClickException(str(err)) from None
    table = tables.markdown_table('Training images (kimg)', [TITLES[m] for m in methods],
        {TITLES[m]: results[m] for m in methods})
    header = (f'FD-digits (lower is better) of class-conditional models on the digits, {per_class * 10} samples each, '
        f'EDM Heun sampler with 18 steps; budget {kimg:g} kimg, batch {batch}, seed {seed}, {device}, '
        f'{time.time() - start:.0f} s in all.\n\n')
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
