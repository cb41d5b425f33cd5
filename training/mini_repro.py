"""The paper's claim in miniature: does momentum (FDM) train faster than its baseline?

Trains EDM vs EDM-FDM, VP vs VP-FDM and VE vs VE-FDM on the embedded digits with identical
seeds, networks and budget, scores FD-digits at fixed training-image counts, and writes a
Markdown table shaped like the paper's (FD vs training images, one column per method),
the numbers as JSON, and a PNG plot of the curves.

    python -m training.mini_repro --outdir=mini-repro --kimg=200 --evals=4   # a GPU: minutes
    python -m training.mini_repro --outdir=mini-repro --smoke                # CPU check
"""

import json
import math
import os
import time

import click
import PIL.Image
import PIL.ImageDraw
import torch

from fdm.methods import TITLES
from torch_utils.fileio import atomic_write, write_json
from training import digits_pipeline as dp

METHODS = ['edm', 'fdm_edm', 'vp', 'fdm_vp', 've', 'fdm_ve']
COLOURS = dict(edm=(31, 119, 180), fdm_edm=(174, 199, 232), vp=(214, 39, 40), fdm_vp=(255, 152, 150),
    ve=(44, 160, 44), fdm_ve=(152, 223, 138))

#----------------------------------------------------------------------------

def markdown_table(results, methods):
    kimgs = sorted({k for m in methods for k in results[m]})
    lines = ['| Training images (kimg) | ' + ' | '.join(TITLES[m] for m in methods) + ' |',
        '|---:|' + '---:|' * len(methods)]
    for k in kimgs:
        cells = [f'{results[m][k]:.2f}' if k in results[m] else '' for m in methods]
        lines.append(f'| {k:g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'

def plot_curves(results, methods, path, size=(640, 420)):
    """FD-digits (log scale) against kimg, one line per method; drawn with PIL alone."""
    w, h = size
    left, right, top, bottom = 60, 130, 20, 40
    img = PIL.Image.new('RGB', size, 'white')
    draw = PIL.ImageDraw.Draw(img)
    points = [(k, v) for m in methods for k, v in results[m].items() if v > 0 and math.isfinite(v)]
    if not points:
        atomic_write(path, lambda f: img.save(f, format='PNG'))
        return
    x0, x1 = 0, max(k for k, _ in points)
    y0, y1 = math.log10(min(v for _, v in points)), math.log10(max(v for _, v in points))
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 > y0 else (y0 - 0.5, y1 + 0.5)
    to_px = lambda k, v: (left + (k - x0) / max(x1 - x0, 1e-9) * (w - left - right),
        h - bottom - (math.log10(v) - y0) / (y1 - y0) * (h - top - bottom))
    draw.rectangle([left, top, w - right, h - bottom], outline='black')
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for mant in (1, 2, 5):
            v = mant * 10 ** e
            if y0 <= math.log10(v) <= y1:
                _, y = to_px(0, v)
                draw.line([left - 4, y, left, y], fill='black')
                draw.text((4, y - 6), f'{v:g}', fill='black')
    for k in sorted({k for k, _ in points}):
        x, _ = to_px(k, 10 ** y0)
        draw.line([x, h - bottom, x, h - bottom + 4], fill='black')
        draw.text((x - 10, h - bottom + 8), f'{k:g}', fill='black')
    draw.text((w // 2 - 60, h - 16), 'training images (kimg)', fill='black')
    draw.text((4, 2), 'FD-digits (log)', fill='black')
    for i, m in enumerate(methods):
        series = sorted((k, v) for k, v in results[m].items() if v > 0 and math.isfinite(v))
        xy = [to_px(k, v) for k, v in series]
        dash = m.startswith('fdm_')
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[m], width=3 if dash else 2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[m])
        draw.line([w - right + 10, top + 12 + 18 * i, w - right + 30, top + 12 + 18 * i], fill=COLOURS[m], width=3)
        draw.text((w - right + 36, top + 6 + 18 * i), TITLES[m], fill='black')
    atomic_write(path, lambda f: img.save(f, format='PNG'))

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Output directory', metavar='DIR', type=str, default='mini-repro', show_default=True)
@click.option('--kimg', help='Training budget per method (thousands of images)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--evals', help='FD-digits evaluations per run, evenly spaced', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--per-class', help='Samples per class for each FD-digits', metavar='INT', type=click.IntRange(min=2), default=100, show_default=True)
@click.option('--methods', help='Comma-separated subset of ' + ','.join(METHODS), metavar='LIST', type=str, default=','.join(METHODS), show_default=True)
@click.option('--seed', help='Seed shared by all runs', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--smoke', help='Tiny budget, for a CPU check of the whole procedure', is_flag=True)
def main(outdir, kimg, evals, per_class, methods, seed, batch, smoke):
    """Train baseline/FDM pairs on the digits and tabulate FD-digits against training images."""
    methods = [m.strip() for m in methods.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.ClickException(f'unknown method(s) {unknown}; choose from {",".join(METHODS)}')
    if smoke:
        kimg, evals, per_class, batch = 2, 2, 2, 64  # snapshot names count whole kimg
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    start = time.time()
    data, ref = dp.prepare_data(outdir, device)
    results = {}
    for m in methods:
        run_dir = os.path.join(outdir, f'run-{m}')
        dp.train(data, run_dir, precond=m, total_kimg=kimg, seed=seed, batch=batch, ticks=evals, snapshots=evals, device=device)
        results[m] = {}
        for name in sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-')):
            snap = torch.load(os.path.join(run_dir, name), map_location='cpu', weights_only=True)
            k = json.loads(snap['description'])['extra']['cur_nimg'] / 1000
            if k < 0.5 * kimg / evals:
                continue  # the snapshot after the first step
            fd, accuracy, _, _ = dp.evaluate_snapshot(os.path.join(run_dir, name), ref, per_class, device)
            results[m][round(k, 3)] = fd
            click.echo(f'{TITLES[m]:8s} {k:8.3f} kimg: FD-digits {fd:.3f}, class accuracy {accuracy:.3f}')
    table = markdown_table(results, methods)
    header = (f'FD-digits (lower is better) of class-conditional models on the digits, {per_class * 10} samples each, '
        f'EDM Heun sampler with 18 steps; budget {kimg:g} kimg, batch {batch}, seed {seed}, {device}, '
        f'{time.time() - start:.0f} s in all.\n\n')
    atomic_write(os.path.join(outdir, 'results.md'), lambda f: f.write((header + table).encode('utf-8')))
    write_json(os.path.join(outdir, 'results.json'), {m: {str(k): v for k, v in r.items()} for m, r in results.items()})
    plot_curves(results, methods, os.path.join(outdir, 'results.png'))
    click.echo('\n' + header + table)
    click.echo(f'Wrote {os.path.join(outdir, "results.md")}, results.json and results.png')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
