"""Train diffusion models: EDM, VP, VE (and iDDPM) and their FDM versions.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --precond=fdm_edm --warmup_ite=200

Without torchrun it trains in one process, on the GPU if there is one, else on the CPU.
"""

import contextlib
import json
import os
import sys
import warnings

import click

from torch_utils import distributed
from torch_utils.cli.compile_modes import COMPILE_MODES
from torch_utils.errors import UserError, one_line
from torch_utils.cli.options import option_type
from training.config import TRAIN_RANGES, parse_cres, setup_training_config
from training.run_dir import next_run_dir, open_run_dir

#----------------------------------------------------------------------------

# --cres as a click type: a bad list is a usage error naming the option.
def parse_int_list(s):
    try:
        return parse_cres(s)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

# A numeric option's click type: the range setup_training_config checks too (NaN never passes).
def _number(name):
    return option_type(TRAIN_RANGES[name])

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(['vp', 've', 'edm', 'iddpm', 'fdm_edm', 'fdm_vp', 'fdm_ve']), default='fdm_edm', show_default=True)

# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=_number('duration'), default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=_number('batch'), default=512, show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=_number('batch_gpu'))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=_number('cbase'))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=_number('lr'), default=10e-4, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=_number('ema'), default=0.5, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=_number('dropout'), default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=_number('augment'), default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--lr_rampup', help='Learning rate ramp-up', metavar='MIMG', type=_number('lr_rampup'), default=10, show_default=True)
@click.option('--warmup_ite', help='FDM loss-weight warmup length in steps', metavar='FLOAT', type=_number('warmup_ite'), default=None)
@click.option('--fdm_multiplier', '--fdm_multipler', 'fdm_multiplier', help='FDM momentum multiplier m', metavar='FLOAT', type=_number('fdm_multiplier'), default=2.0, show_default=True)

# Performance-related.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--precision', help='fp32 is exact (the reference); tf32 and bf16 (autocast) are faster on GPUs', type=click.Choice(['fp32', 'tf32', 'bf16']), default='fp32', show_default=True)
@click.option('--compile', 'compile', help='torch.compile the network', is_flag=True)
@click.option('--compile-mode', 'compile_mode', help='torch.compile mode; reduce-overhead and max-autotune use CUDA graphs  [default: default]', type=click.Choice(COMPILE_MODES))
@click.option('--channels-last', help='Channels-last memory format', is_flag=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=_number('ls'), default=1, show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--data-on-device', 'data_on_device', help='Keep the whole dataset on the GPU (same images, same order)  [default: auto, when it takes under 10% of GPU memory]', type=click.Choice(['auto', 'on', 'off']), default='auto')
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=_number('workers'), default=8, show_default=True)

# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=_number('tick'), default=50, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=_number('snap'), default=200, show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=_number('dump'), default=500, show_default=True)
@click.option('--grid-images', help='Sample grid PNG size per snapshot (0 = none)', metavar='INT', type=_number('grid_images'), default=64, show_default=True)
@click.option('--phema-std', 'phema_std', help='Post-hoc EMA: relative stds of the EMA profiles to store (EDM2: 0.050,0.100)  [default: off]', metavar='LIST', type=str)
@click.option('--tensorboard', help='Also write the statistics of each tick to <run>/runs for TensorBoard', is_flag=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=_number('seed'))
@click.option('--transfer', help='Transfer learning from network file', metavar='PT|PKL|URL', type=str)
@click.option('--resume', help='Resume from training state file or run directory', metavar='PT|DIR', type=str)
@click.option('--timeout', help='Seconds a process waits for the others before it stops with an error', metavar='SEC', type=_number('timeout'), default=1800, show_default=True)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
@click.pass_context
def main(ctx, dry_run, timeout, **opts):
    """Train a diffusion model (EDM/VP/VE or their FDM versions)."""
    explicit = {name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    with _stop_on_lost_process(timeout):
        if not dry_run:
            distributed.init(timeout_s=timeout)
        _train(dry_run, opts, explicit)

def _train(dry_run, opts, explicit):
    world_size = distributed.get_world_size() if not dry_run else int(os.environ.get('WORLD_SIZE', '1'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            c, run = setup_training_config(**opts, world_size=world_size, explicit=explicit)
        except UserError as err:
            raise click.ClickException(one_line(err)) from None
    warning_lines = [f'Warning: {w.message}' for w in caught]
    if dry_run:
        click.echo('\n'.join(warning_lines + [json.dumps(c, indent=2), 'Dry run; exiting.']))
        return

    run_dir = run.outdir if run.nosubdir else next_run_dir(run.outdir, run.desc)
    rank0 = distributed.get_rank() == 0
    try:
        with open_run_dir(run_dir, run.nosubdir, c) if rank0 else contextlib.nullcontext([]) as notes:
            if rank0:
                print(f'Output directory: {run_dir}')
                print('\n'.join(notes + warning_lines + [json.dumps(c, indent=2)]))  # in the log too: what resume skipped
            from training.training_loop import training_loop  # imported late: a heavy import, after the option checks
            training_loop(run_dir=run_dir, dataset=run.dataset, resume=run.state, transferred=run.transferred, **c)
    except UserError as err:
        raise click.ClickException(one_line(err)) from None
    distributed.shutdown()

#----------------------------------------------------------------------------

# A dead or hung process makes a collective fail (a closed connection, or --timeout): every
# surviving process says so and exits at once, instead of holding the allocation. os._exit,
# because tearing down a broken process group can itself hang.
@contextlib.contextmanager
def _stop_on_lost_process(timeout):
    try:
        yield
    except Exception as err:
        message = distributed.lost_process_message(err, timeout)
        if message is None:
            raise
        click.echo(f'Error: {message}', err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
