"""Train diffusion models: EDM, VP, VE (and iDDPM) and their FDM versions.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --precond=fdm_edm --warmup_ite=200

Without torchrun it trains in one process, on the GPU if there is one, else on the CPU.
"""

import contextlib
import inspect
import json
import os
import signal
import sys
import time
import warnings

import click

from torch_utils import distributed
from torch_utils.cli.compile_modes import COMPILE_MODES
from torch_utils.errors import UserError, one_line
from torch_utils.cli.options import option_type
from training.config import (COMMAND_FILE, MAX_DEFAULT_WORKERS, TRAIN_RANGES, check_continues_run, parse_cres, run_folder_options,
    setup_training_config)
from training.run_dir import check_run_dir, describe_end, describe_interruption, next_run_dir, open_run_dir, output_folders

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

# One home for every default: setup_training_config's signature (and distributed.init's for
# --timeout). The options default to None, and only those given reach the config.
DEFAULTS = {name: p.default for name, p in inspect.signature(setup_training_config).parameters.items()}
DEFAULTS['timeout'] = inspect.signature(distributed.init).parameters['timeout_s'].default

def _help(text, name):
    value = DEFAULTS[name]
    if name == 'workers':
        return f'{text}  [default: {MAX_DEFAULT_WORKERS}, at most the CPU count]'
    return f'{text}  [default: {value:g}]' if isinstance(value, float) else f'{text}  [default: {value}]'

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--outdir', help='Where to save the results  [required, except with --resume: then the run\'s own folder]', metavar='DIR', type=str)
@click.option('--data', help='Path to the dataset  [required, except with --resume or in a run folder: the run\'s]', metavar='ZIP|DIR', type=str)
@click.option('--cond', help=_help('Train class-conditional model', 'cond'), metavar='BOOL', type=bool)
@click.option('--arch', help=_help('Network architecture', 'arch'), type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']))
@click.option('--precond', help=_help('Preconditioning & loss function', 'precond'), type=click.Choice(['vp', 've', 'edm', 'iddpm', 'fdm_edm', 'fdm_vp', 'fdm_ve']))

# Hyperparameters.
@click.option('--duration', help=_help('Training duration', 'duration'), metavar='MIMG', type=_number('duration'))
@click.option('--batch', help=_help('Total batch size', 'batch'), metavar='INT', type=_number('batch'))
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=_number('batch_gpu'))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=_number('cbase'))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--lr', help=_help('Learning rate', 'lr'), metavar='FLOAT', type=_number('lr'))
@click.option('--ema', help=_help('EMA half-life', 'ema'), metavar='MIMG', type=_number('ema'))
@click.option('--dropout', help=_help('Dropout probability', 'dropout'), metavar='FLOAT', type=_number('dropout'))
@click.option('--augment', help=_help('Augment probability', 'augment'), metavar='FLOAT', type=_number('augment'))
@click.option('--xflip', help=_help('Enable dataset x-flips', 'xflip'), metavar='BOOL', type=bool)
@click.option('--lr_rampup', help=_help('Learning rate ramp-up', 'lr_rampup'), metavar='MIMG', type=_number('lr_rampup'))
@click.option('--warmup_ite', help='FDM loss-weight warmup length in steps', metavar='FLOAT', type=_number('warmup_ite'))
@click.option('--fdm_multiplier', '--fdm_multipler', 'fdm_multiplier', help=_help('FDM momentum multiplier m', 'fdm_multiplier'), metavar='FLOAT', type=_number('fdm_multiplier'))

# Performance-related.
@click.option('--fp16', help=_help('Enable mixed-precision training', 'fp16'), metavar='BOOL', type=bool)
@click.option('--precision', help=_help('fp32 is exact (the reference); tf32 and bf16 (autocast) are faster on GPUs', 'precision'), type=click.Choice(['fp32', 'tf32', 'bf16']))
@click.option('--compile', 'compile', help='torch.compile the network', is_flag=True)
@click.option('--compile-mode', 'compile_mode', help='torch.compile mode; reduce-overhead and max-autotune use CUDA graphs  [default: default]', type=click.Choice(COMPILE_MODES))
@click.option('--channels-last', help='Channels-last memory format', is_flag=True)
@click.option('--ls', help=_help('Loss scaling', 'ls'), metavar='FLOAT', type=_number('ls'))
@click.option('--bench', help=_help('Enable cuDNN benchmarking', 'bench'), metavar='BOOL', type=bool)
@click.option('--data-on-device', 'data_on_device', help='Keep the whole dataset on the GPU (same images, same order)  [default: auto, when it takes under 10% of GPU memory]', type=click.Choice(['auto', 'on', 'off']))
@click.option('--cache', help=_help('Cache dataset in CPU memory', 'cache'), metavar='BOOL', type=bool)
@click.option('--workers', help=_help('DataLoader worker processes', 'workers'), metavar='INT', type=_number('workers'))

# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help=_help('How often to print progress', 'tick'), metavar='KIMG', type=_number('tick'))
@click.option('--snap', help=_help('How often to save snapshots', 'snap'), metavar='TICKS', type=_number('snap'))
@click.option('--dump', help=_help('How often to dump state', 'dump'), metavar='TICKS', type=_number('dump'))
@click.option('--grid-images', help=_help('Sample grid PNG size per snapshot (0 = none)', 'grid_images'), metavar='INT', type=_number('grid_images'))
@click.option('--phema-std', 'phema_std', help='Post-hoc EMA: relative stds of the EMA profiles to store (EDM2: 0.050,0.100)  [default: off]', metavar='LIST', type=str)
@click.option('--tensorboard', help='Also write the statistics of each tick to <run>/runs for TensorBoard', is_flag=True)
@click.option('--metrics', help='Score each snapshot while training: fid, fd-digits or fd-dinov2 (a comma list, or none)  [default: none]', metavar='LIST', type=str)
@click.option('--metric-ref', 'metric_ref', help='Reference statistics of --metrics (fid.py ref), one per metric', metavar='NPZ[,NPZ]', type=str)
@click.option('--metric-images', 'metric_images', help=_help('Images per metric, seeds 0..N-1 (fewer than 50,000 bias FID upwards)', 'metric_images'), metavar='INT', type=_number('metric_images'))
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=_number('seed'))
@click.option('--transfer', help='Transfer learning from network file', metavar='PT|PKL|URL', type=str)
@click.option('--resume', help='Resume from training state file or run directory (alone: with the run\'s options, in its folder)', metavar='PT|DIR', type=str)
@click.option('--timeout', help=_help('Seconds a process waits for the others before it stops with an error', 'timeout'), metavar='SEC', type=_number('timeout'))
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
@click.pass_context
def main(ctx, dry_run, timeout, **opts):
    """Train a diffusion model (EDM/VP/VE or their FDM versions)."""
    explicit = {name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    timeout = DEFAULTS['timeout'] if timeout is None else timeout
    opts = {name: value for name, value in opts.items() if value is not None}
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops the run as Ctrl-C does
    with _stop_on_lost_process(timeout):
        if not dry_run:
            distributed.init(timeout_s=timeout)
        _train(dry_run, opts, explicit)

def _train(dry_run, opts, explicit):
    world_size = distributed.get_world_size() if not dry_run else int(os.environ.get('WORLD_SIZE', '1'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            opts, previous = run_folder_options(opts, explicit)
            c, run = setup_training_config(**opts, world_size=world_size, explicit=explicit)
            check_continues_run(c, previous, in_place=run.nosubdir and previous is not None
                and os.path.abspath(previous['folder']) == os.path.abspath(run.outdir))
        except UserError as err:
            raise click.ClickException(one_line(err)) from None
    warning_lines = [f'Warning: {w.message}' for w in caught]
    run_dir = run.outdir if run.nosubdir else next_run_dir(run.outdir, run.desc)
    if dry_run:
        try:
            check_run_dir(run_dir, run.nosubdir, output_folders(c))
        except UserError as err:
            raise click.ClickException(one_line(err)) from None
        action = 'continue the run in' if run.start.state is not None and run.nosubdir else 'write to'
        click.echo('\n'.join(warning_lines + [json.dumps(c, indent=2), f'Would {action} {run_dir}.', 'Dry run; exiting.']))
        return

    # Every option as this run resolved it (defaults filled in): what --resume=RUN alone reuses.
    names = [p.name for p in main.params if p.name not in ('dry_run', 'timeout')]
    command = dict(argv=sys.argv[1:], options={name: opts.get(name, DEFAULTS.get(name)) for name in names} | dict(seed=c.seed))
    rank0 = distributed.get_rank() == 0
    start_time = time.time()
    try:
        with open_run_dir(run_dir, run.nosubdir, c, {COMMAND_FILE: command}) if rank0 else contextlib.nullcontext([]) as notes:
            if rank0:
                print(f'Output directory: {run_dir}')
                print('\n'.join(notes + warning_lines + [json.dumps(c, indent=2)]))  # in the log too: what resume skipped
            from training.training_loop import training_loop  # imported late: a heavy import, after the option checks
            try:
                result = training_loop(run_dir=run_dir, start=run.start, **c)
            except KeyboardInterrupt:
                if rank0:
                    print(describe_interruption(run_dir), flush=True)  # in log.txt too
                raise SystemExit(130) from None
            if rank0:
                print(describe_end(run_dir, result, time.time() - start_time, c), flush=True)
    except UserError as err:
        raise click.ClickException(one_line(err)) from None
    distributed.shutdown()

def _interrupt(_signum, _frame):
    raise KeyboardInterrupt

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
