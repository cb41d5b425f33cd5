"""The quick start: the whole pipeline, offline, in one command, on the CPU or a GPU.

Builds the digits dataset (embedded in scikit-learn), trains a small class-conditional
EDM-FDM while scoring FD-digits at each snapshot (the curve FDM is about: FD against training
images), samples a grid (one column per class) and prints FD-digits and class accuracy.

    python -m training.tools.demo --outdir=demo-run            # ~6 minutes on 2 CPU cores
    python -m training.tools.demo --outdir=demo-run --smoke    # ~1 minute, for CI
"""

import os
import time

import click
import torch

from torch_utils import distributed
from torch_utils.io.files import write_json
from torch_utils.cli.options import Range, option_type
from training.tools import digits_pipeline as dp
from training.checkpoint.names import snapshot_name
from training.config import TRAIN_RANGES

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Where to put dataset, run and results', metavar='DIR', type=str, default='demo-run', show_default=True)
@click.option('--kimg', help='Training images (thousands)', metavar='KIMG', type=option_type(Range(min=0, min_open=True)), default=60, show_default=True)
@click.option('--precond', help='Preconditioner', type=click.Choice(sorted(dp.PRECONDS)), default='fdm_edm', show_default=True)
@click.option('--per-class', help='Samples per class to score', metavar='INT', type=option_type(Range(min=2, integer=True)), default=50, show_default=True)
@click.option('--metric-images', 'metric_images', help='Images of each FD-digits of the curve, scored at 6 snapshots while training', metavar='INT', type=option_type(TRAIN_RANGES['metric_images']), default=100, show_default=True)
@click.option('--seed', help='Training seed', metavar='INT', type=option_type(TRAIN_RANGES['seed']), default=0, show_default=True)
@click.option('--smoke', help='A short run (2 kimg, 10 samples per class, a curve of 2 points of 16 images) that checks the pipeline', is_flag=True)
def main(outdir, kimg, precond, per_class, metric_images, seed, smoke):
    """Train and evaluate a small class-conditional model on the embedded digits."""
    snapshots = 5  # and the one after the first step: 6 points on the curve
    if smoke:
        kimg, per_class, metric_images, snapshots = 2, 10, 16, 1
    distributed.configure_cpu_threads()  # on a CPU: the idle cores, not one thread per core
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    start = time.time()
    data, ref = dp.prepare_data(outdir, device)
    click.echo(f'Dataset {data}, FD-digits reference {ref}')
    run_dir = os.path.join(outdir, f'run-{precond}')
    result = dp.train(data, run_dir, precond=precond, total_kimg=kimg, seed=seed, snapshots=snapshots, device=device,
        ref=ref, metric_images=metric_images)
    curve = dp.fd_curve(run_dir)
    snapshot = os.path.join(run_dir, snapshot_name(result['cur_nimg']))  # the final one
    fd, accuracy, images, classes = dp.evaluate_snapshot(snapshot, ref, per_class, device)
    grid = os.path.join(outdir, 'samples.png')
    dp.save_grid(images, grid)
    results = dict(precond=precond, kimg=kimg, seed=seed, device=str(device), fd_digits=fd, class_accuracy=accuracy,
        num_samples=len(images), snapshot=snapshot, grid=grid, curve={str(k): v for k, v in curve.items()},
        curve_images=metric_images, seconds=round(time.time() - start, 1))
    write_json(os.path.join(outdir, 'results.json'), results)
    click.echo(f'\nFD-digits while training ({metric_images} images per point, seeds 0-{metric_images - 1} as fid.py gen; '
        'fewer images give higher values):\n      kimg  FD-digits')
    click.echo('\n'.join(f'{k:10.3f}  {v:9.3f}' for k, v in curve.items()))
    click.echo(f'\nFD-digits {fd:.3f} and class accuracy {accuracy:.3f} from {len(images)} samples '
        f'({precond}, {kimg:g} kimg, {results["seconds"]:.0f} s on {device}).')
    click.echo(f'Sample grid (one column per class): {grid}\nNetwork: {snapshot}\nScores: {os.path.join(outdir, "results.json")}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
