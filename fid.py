"""Frechet Inception Distance (FID): reference statistics, the FID of a folder of images,
and the three-seed-range protocol.

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out/seeds0 --ref=fid-refs/cifar10-32x32.npz
    python fid.py protocol --images out/seeds0 out/seeds1 out/seeds2 --ref=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=net.pt --seeds=0-49999 --ref=fid-refs/cifar10-32x32.npz

`gen` (and `protocol --network`) score images straight from the sampler, quantised to uint8
exactly as generate.py saves them, so they give the FID of the PNGs without writing them.
Results read "FID 2.345" (three decimals; "FD-digits" with --detector=digits). `ref` never
overwrites: an existing --dest made from the same images and detector is kept as the result,
any other is refused.
Without torchrun everything runs in one process, on the GPU if there is one, else on the CPU.
The work is done by training/evaluation/fid.py and training/evaluation/feature_stats.py.
"""

import click

from torch_utils import precision as precision_lib
from torch_utils.cli.compile_modes import COMPILE_MODES, resolve_compile_mode
from torch_utils.cli.command import run_command
from training.evaluation import fid as evaluation
from torch_utils.cli.options import Range, option_type
from training.evaluation.generation import SAMPLER_CHOICES, SAMPLER_DEFAULTS, SAMPLER_RANGES, parse_seeds

#----------------------------------------------------------------------------
# Command line.

# fid.py's own numeric options (the sampler's ranges are training/evaluation/generation.py's); seeds are taken mod 2^31.
FID_RANGES = dict(workers=Range(min=0, integer=True), batch=Range(min=1, integer=True), num=Range(min=2, integer=True),
    seed=Range(min=0, integer=True))

# The defaults live in the library (training/evaluation/fid.py's signatures, SAMPLER_DEFAULTS): an option
# left out is None and not passed on; its help states the library's default.
def given(**options):
    return {name: value for name, value in options.items() if value is not None}

# --detector and --trust-detector: a TorchScript detector is code, run only from a file we can vouch for or the user trusts.
def detector_option(fn):
    fn = click.option('--trust-detector', 'trust_detector', is_flag=True,
        help='Run a TorchScript --detector file that is not a known official one (its code runs: only for files you trust)')(fn)
    return click.option('--detector', help='Feature detector: URL, path, "nvidia", "pytorch-fid", "dinov2" (FD-DINOv2) or "digits"  [default: NVIDIA Inception]',
        metavar='URL|PATH', type=str, default=None)(fn)
workers_option = click.option('--workers', help='Data loader processes per GPU  [default: 3]', metavar='INT', type=option_type(FID_RANGES['workers']))
batch_option = click.option('--batch', help='Maximum batch size per GPU  [default: 64]', metavar='INT', type=option_type(FID_RANGES['batch']))

steps_option = click.option('--steps', help=f'Sampling steps  [default: {SAMPLER_DEFAULTS["num_steps"]}]', metavar='INT',
    type=option_type(SAMPLER_RANGES['num_steps']))
def compile_options(fn):
    fn = click.option('--compile-mode', 'compile_mode', help='torch.compile mode; reduce-overhead and max-autotune use CUDA graphs  [default: default]',
        type=click.Choice(COMPILE_MODES))(fn)
    return click.option('--compile', 'compile_net', help='torch.compile the network while sampling (one batch shape)', is_flag=True)(fn)

def resolve_compile(compile_net, compile_mode):
    try:
        return resolve_compile_mode(compile_net, compile_mode)
    except ValueError as err:
        raise click.UsageError(str(err)) from None

precision_option = click.option('--precision', help='Network precision while sampling (the detector is unaffected)  [default: fp32]',
    type=click.Choice(list(precision_lib.PRECISIONS)))

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID).

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of 50000 generated images, on 8 GPUs
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    \b
    # The same straight from the network, without writing PNGs
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=net.pt --seeds=0-49999 --ref=fid-refs/cifar10-32x32.npz
    """

@main.command()
@click.option('--data', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@batch_option
@workers_option
@detector_option
def ref(data, dest, batch, workers, detector, trust_detector):
    """Write the reference statistics (mu, sigma) of all images of a dataset.

    An existing --dest is kept: as the result if it was made from the same images with the same
    detector, otherwise the command stops without computing anything.
    """
    run_command(evaluation.make_reference, data, dest, detector, **given(batch=batch, workers=workers), trust_detector=trust_detector)

@main.command()
@click.option('--images', help='Folder or zip of generated images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images to use  [default: 50000]', metavar='INT', type=option_type(FID_RANGES['num']))
@click.option('--seed', help='Random seed of the image subset  [default: 0]', metavar='INT', type=option_type(FID_RANGES['seed']))
@batch_option
@workers_option
@detector_option
def calc(images, ref_path, num, seed, batch, workers, detector, trust_detector):
    """Calculate the FID of a folder of images against reference statistics."""
    run_command(evaluation.fid_of_images, images, ref_path, **given(num=num, seed=seed, batch=batch, workers=workers),
        detector=detector, trust_detector=trust_detector)

@main.command()
@click.option('--network', help='Network snapshot (ours or a reference .pkl)', metavar='PT|PKL|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 0-49999)', metavar='LIST', type=parse_seeds, default='0-49999', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=option_type(SAMPLER_RANGES['class_idx']), default=None)
@click.option('--solver', help='Sampler, as in generate.py  [default: edm]', type=click.Choice(SAMPLER_CHOICES['solver']))
@steps_option
@precision_option
@click.option('--outdir', help='Also save the PNGs here (as generate.py --subdirs)', metavar='DIR', type=str)
@batch_option
@detector_option
@compile_options
def gen(network, ref_path, seeds, class_idx, solver, steps, precision, outdir, batch, detector, trust_detector, compile_net,
        compile_mode):
    """FID of images generated on the fly (no PNGs unless --outdir).

    The images are those generate.py would save for the same seeds and sampler options, so the
    FID equals that of "generate.py" followed by "fid.py calc": bit for bit in one process when both use the same
    --batch; with another --batch, float rounding (which depends on the batch shape) may move a few pixels by one level.
    """
    compile_mode = resolve_compile(compile_net, compile_mode)
    run_command(evaluation.fid_of_network, network, ref_path, seeds, class_idx=class_idx,
        **given(solver=solver, steps=steps, precision=precision, batch=batch), outdir=outdir, detector=detector,
        compile_mode=compile_mode, trust_detector=trust_detector)

@main.command()
@click.option('--images', help='The three image folders (seeds 0-49999, 50000-99999, 100000-149999)',
    metavar='DIR DIR DIR', type=str, nargs=3, default=None)
@click.option('--network', help='Or: generate the three seed ranges from this network', metavar='PT|PKL|URL', type=str)
@click.option('--outdir', help='With --network: also save the three image folders here', metavar='DIR', type=str)
@click.option('--solver', help='With --network: sampler  [default: edm]', type=click.Choice(['edm', 'dpm']))
@click.option('--steps', help=f'With --network: sampling steps  [default: {SAMPLER_DEFAULTS["num_steps"]}]', metavar='INT', type=option_type(SAMPLER_RANGES['num_steps']))
@precision_option
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images per folder  [default: 50000]', metavar='INT', type=option_type(FID_RANGES['num']))
@click.option('--seed', help='Random seed of the image subsets  [default: 0]', metavar='INT', type=option_type(FID_RANGES['seed']))
@batch_option
@workers_option
@detector_option
@compile_options
def protocol(images, network, outdir, solver, steps, precision, ref_path, num, seed, batch, workers, detector, trust_detector,
        compile_net, compile_mode):
    """FID of one network over three seed ranges: min, mean and std.

    Either pass --network: the seed ranges 0..num-1, num..2num-1, 2num..3num-1 (with --num=50000
    the usual 0-49999, 50000-99999, 100000-149999) are generated and scored in memory, and with
    --outdir also saved to OUTDIR/seeds-A-B; or generate the three folders with generate.py and
    pass them as --images.
    """
    if (images is None) == (network is None) or (outdir is not None and network is None):
        raise click.UsageError('give either --images DIR DIR DIR, or --network (and optionally --outdir)')
    compile_mode = resolve_compile(compile_net, compile_mode)
    if compile_mode is not None and network is None:
        raise click.UsageError('--compile applies only with --network (it compiles the sampling network)')
    if network is not None:
        run_command(evaluation.protocol_of_network, network, ref_path,
            **given(num=num, solver=solver, steps=steps, precision=precision, batch=batch), outdir=outdir,
            detector=detector, compile_mode=compile_mode, trust_detector=trust_detector)
    else:
        run_command(evaluation.protocol_of_images, images, ref_path, **given(num=num, seed=seed, batch=batch, workers=workers),
            detector=detector, trust_detector=trust_detector)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
