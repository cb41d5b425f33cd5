"""Generate images with a trained EDM/FDM network.

    python generate.py --network=network-snapshot-200000.pt --outdir=out --seeds=0-49999 --solver=dpm
    torchrun --standalone --nproc_per_node=8 generate.py --network=... --outdir=out --seeds=0-49999

Each image depends only on its seed and the network: per-seed random generators make it the
same whatever the batch size or the number of processes (up to the last bits of float rounding
on a CPU, whose kernels depend on the batch shape). Without torchrun it runs in one process, on
the GPU if there is one, else on the CPU. The work is done by training/evaluation/generation.py.

What decides the images goes to OUTDIR/generate_options.json before the first image. Rerunning
the same command continues a killed run: only the seeds whose PNGs are missing are made, and the
folder ends as an uninterrupted run leaves it. A folder of other images (another network, sampler
setting, seed list, class, layout, precision or device type) is refused and left as it is.
"""

import click

from torch_utils import precision as precision_lib
from torch_utils.cli.compile_modes import COMPILE_MODES
from torch_utils.cli.command import run_command
from torch_utils.cli.options import Range, option_type
from training.evaluation.generation import GRID_MIN_WIDTH, SAMPLER_CHOICES, SAMPLER_DEFAULTS, SAMPLER_RANGES, generate, parse_seeds

#----------------------------------------------------------------------------

# A numeric option's click type: the range select_sampler checks too (NaN never passes).
def _number(name):
    return option_type(SAMPLER_RANGES[name])

# The defaults live in the library (generate's signature, SAMPLER_DEFAULTS): an option left out is
# None here and not passed on, and its help states the library's default. The float options take
# the library's value as their click default instead: click reads it as a float, as
# generate_options.json has always recorded them (rho 7.0, not 7).

@click.command()
@click.option('--network', 'network', help='Network snapshot (ours or a reference .pkl)', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save the output images (the same command again continues it)', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)  [default: 0-63]', metavar='LIST', type=parse_seeds)
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=_number('class_idx'), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size  [default: 64 on a CPU, 512 on a GPU (32x32)]', metavar='INT', type=_number('max_batch_size'))

@click.option('--steps', 'num_steps', help=f'Number of sampling steps  [default: {SAMPLER_DEFAULTS["num_steps"]}]', metavar='INT', type=_number('num_steps'))
@click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT', type=_number('sigma_min'))
@click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT', type=_number('sigma_max'))
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=_number('rho'), default=SAMPLER_DEFAULTS['rho'], show_default=True)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=_number('S_churn'), default=SAMPLER_DEFAULTS['S_churn'], show_default=True)
@click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=_number('S_min'), default=SAMPLER_DEFAULTS['S_min'], show_default=True)
@click.option('--S_max', 'S_max', help='Stoch. max noise level (inf: no limit)', metavar='FLOAT', type=_number('S_max'), default=SAMPLER_DEFAULTS['S_max'], show_default=True)
@click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=_number('S_noise'), default=SAMPLER_DEFAULTS['S_noise'], show_default=True)

@click.option('--solver', help='Sampler  [default: edm, or heun with --disc/--schedule/--scaling]', type=click.Choice(SAMPLER_CHOICES['solver']))
@click.option('--disc', help='Ablate time step discretization {t_i}', type=click.Choice(SAMPLER_CHOICES['disc']))
@click.option('--schedule', help='Ablate noise schedule sigma(t)', type=click.Choice(SAMPLER_CHOICES['schedule']))
@click.option('--scaling', help='Ablate signal scaling s(t)', type=click.Choice(SAMPLER_CHOICES['scaling']))
@click.option('--dpm-order', 'dpm_order', help='DPM-Solver++ order  [default: 3]', metavar='INT', type=_number('dpm_order'))
@click.option('--dpm-method', 'dpm_method', help='DPM-Solver++ method  [default: singlestep]', type=click.Choice(SAMPLER_CHOICES['dpm_method']))
@click.option('--dpm-skip', 'dpm_skip', help='DPM-Solver++ time steps  [default: logSNR]', type=click.Choice(SAMPLER_CHOICES['dpm_skip']))

@click.option('--grid', help='Also save all images as one grid PNG (outside --outdir)', metavar='PNG', type=str)
@click.option('--grid-width', 'grid_width', help=f'Upscale the grid (nearest neighbour) to at least this width; 0 = native size  [default: {GRID_MIN_WIDTH}]', metavar='PIXELS', type=option_type(Range(min=0, max=65536, integer=True)))
@click.option('--device', help='Device  [default: this rank\'s GPU, else cpu]', metavar='DEVICE', type=str)
@click.option('--precision', help='Network precision: fp32 is exact (the reference); tf32, bf16, fp16 are faster on GPUs  [default: fp32]',
    type=click.Choice(list(precision_lib.PRECISIONS)))
@click.option('--compile', 'compile', help='torch.compile the network for a fixed batch shape (faster after a slow first batch)', is_flag=True)
@click.option('--compile-mode', 'compile_mode', help='torch.compile mode; the last two use CUDA graphs  [default: default]',
    type=click.Choice(list(COMPILE_MODES)))
def main(**opts):
    """Generate random images using the EDM sampler, its ablations, or DPM-Solver++.

    \b
    # 64 images, EDM Heun sampler, 18 steps (35 network evaluations each)
    python generate.py --outdir=out --network=network-snapshot-200000.pt
    \b
    # FDM's DPM-Solver++ (order 3, singlestep), 50k images on 8 GPUs
    torchrun --standalone --nproc_per_node=8 generate.py --outdir=out --seeds=0-49999 --subdirs \\
        --network=network-snapshot-200000.pt --solver=dpm --steps=18
    \b
    # Fast on a GPU: bf16 network, compiled (approximate, not the reference's exact images)
    python generate.py --outdir=out --seeds=0-49999 --subdirs --network=network-snapshot-200000.pt \\
        --precision=bf16 --compile
    """
    run_command(generate, **{name: value for name, value in opts.items() if value is not None})

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
