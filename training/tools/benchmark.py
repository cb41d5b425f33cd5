"""Throughput benchmark: training img/s, sampling img/s, FID feature img/s, peak memory and
model FLOP utilisation, for one configuration and precision, printed as one Markdown table.

    python -m training.tools.benchmark                                  # the paper's CIFAR-10 DDPM++ on this GPU
    python -m training.tools.benchmark --precision=bf16 --compile
    python -m training.tools.benchmark --small                          # a tiny configuration for the CPU

Synthetic data: this measures the network, loss, optimizer, sampler and detector, not disk I/O.
"""

import contextlib
import copy
import os
import sys
import tempfile
import time
import warnings

import click
import psutil
import torch

import dnnlib
from fdm.loss import build_loss
from fdm.methods import METHODS, method_kwargs
from fdm.preconditioning import build_precond
from torch_utils import precision as precision_lib
from torch_utils.cli.compile_modes import COMPILE_MODES
from training.evaluation.feature_stats import FeatureSums
from training.evaluation.inception import Detector, FIDInceptionV3
from torch_utils.cli.options import Range, option_type
from torch_utils.training_stats import StatsCollector
from training.evaluation import generation
from training.augment import AugmentPipe
from training.config import AUGMENT_TRANSFORMS, TRAIN_RANGES
from fdm.networks import ARCH_PRESETS
from training.checkpoint.training_state import Progress
from training.train_step import Run, flatten_gradients, make_optimizer, training_step

#----------------------------------------------------------------------------

def count_forward_flops(net, x, sigma, labels, aug):
    """FLOPs of one forward pass (matmuls and convolutions), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, sigma, labels, augment_labels=aug)
    return counter.get_total_flops()

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def peak_memory_gib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30

@contextlib.contextmanager
def quiet_native_output():
    """Hold back what native code writes to stdout and stderr (torch's profiler, Kineto, prints
    lines such as 'profiler_start' straight to the file descriptors) and Python warnings; if the
    block fails, what was held back is shown before the error, since it may explain it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as held, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            os.dup2(held.fileno(), 1)
            os.dup2(held.fileno(), 2)
            yield
        except BaseException:
            os.dup2(saved[1], 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)

def count_launches(fn, device):
    """What one call of fn asks of the device, by torch's profiler: CUDA kernels, copies and
    fills on a GPU (each costs a launch; fewer, larger ones keep the GPU busy), top-level aten
    operators on a CPU."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with quiet_native_output():
        with profile(activities=activities) as prof:
            fn()
            synchronize(device)
        events = prof.events()
    if device.type == 'cuda':
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA), 'device kernels and copies'
    return sum(1 for e in events if e.name.startswith('aten::') and (e.cpu_parent is None
        or not e.cpu_parent.name.startswith('aten::'))), 'top-level aten operators'

def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters

#----------------------------------------------------------------------------

def build(arch, precond, resolution, cond, cbase, cres, device, channels_last):
    kwargs = dict(ARCH_PRESETS[arch], dropout=0.13, augment_dim=9)
    if cbase:
        kwargs['model_channels'] = cbase
    if cres:
        kwargs['channel_mult'] = cres
    network_kwargs, _ = method_kwargs(precond)
    net = build_precond(**network_kwargs, img_resolution=resolution, img_channels=3,
        label_dim=10 if cond else 0, **kwargs).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net

def bench_training(net, loss_fn, augment_pipe, batch, cond, device, precision, compile_mode, channels_last, iters):
    """img/s of the training loop's own step (training_step: flattened gradients, Adam, EMA) on synthetic
    uint8 images already on the device, and the time of the first step (it includes compiling)."""
    net = copy.deepcopy(net).train().requires_grad_(True)
    resolution = net.img_resolution
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, device=device)
    labels = torch.eye(10, device=device)[torch.randint(10, [batch], device=device)] if cond else torch.zeros([batch, 0], device=device)
    run = Run(net=net, model=(torch.compile(net, mode=compile_mode) if compile_mode else net),
        ema=copy.deepcopy(net).eval().requires_grad_(False),
        optimizer=make_optimizer(net.parameters(), device, precision, lr=1e-4, betas=(0.9, 0.999), eps=1e-8),
        loss_fn=loss_fn, next_batch=lambda: (images, labels), stats=StatsCollector(device), progress=Progress(),
        device=torch.device(device), batch_per_process=batch, augment_pipe=augment_pipe,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # The loop's options that the step reads: a constant lr, EDM's EMA ramp-up.
    options = dnnlib.EasyDict(seed=0, batch_size=batch, optimizer_kwargs=dict(lr=1e-4), lr_rampup_kimg=0,
        ema_halflife_kimg=500, ema_rampup_ratio=0.05, loss_scaling=1, precision=precision)

    def step():
        training_step(run, options)
        if run.progress.step == 1:
            flatten_gradients(net.parameters())

    compile_start = time.perf_counter()
    step()
    synchronize(device)
    first_step = time.perf_counter() - compile_start
    seconds = timed(step, device, warmup=2, iters=iters)
    launches = count_launches(step, device)
    run.stats.collect()  # the loss was accumulated on the device all along: read once, as per tick
    return batch / seconds, first_step, launches

def bench_sampling(net, batch, device, precision, compile_mode, num_steps, iters):
    """img/s of generate.py's own batch function (training.evaluation.generation): per-seed latents and noise, EDM Heun, float64 state."""
    net = copy.deepcopy(net).eval().requires_grad_(False)
    if compile_mode:
        net = generation.compile_net(net, compile_mode)
    sampler_name, sampler_kwargs, _ = generation.select_sampler(num_steps=num_steps)
    seeds = iter(range(10**9))

    def run():
        generation.generate_batch(net, sampler_name, sampler_kwargs, [next(seeds) for _ in range(batch)], device,
            precision=precision)

    seconds = timed(run, device, warmup=1, iters=iters)
    return batch / seconds

@torch.no_grad()
def bench_features(batch, resolution, device, iters):
    """img/s of fid.py's own feature accumulation (training.evaluation.feature_stats: Inception-v3 at fid.py's fixed numerics, float64
    sums), on uint8 images already on the device: the detector side of `fid.py calc/gen`."""
    net = FIDInceptionV3()  # the pytorch-fid network; random weights take the same time
    sums = FeatureSums(Detector(net, 'pytorch-fid Inception-v3 (random weights)', device, feature_dim=2048))
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, device=device)
    seconds = timed(lambda: sums.add(images), device, warmup=1, iters=iters)
    return batch / seconds

#----------------------------------------------------------------------------

POSITIVE_INT = option_type(Range(min=1, integer=True))

@click.command()
@click.option('--arch', type=click.Choice(sorted(ARCH_PRESETS)), default='ddpmpp', show_default=True)
@click.option('--precond', type=click.Choice(sorted(METHODS)), default='fdm_edm', show_default=True)
@click.option('--resolution', type=POSITIVE_INT, default=32, show_default=True)
@click.option('--cond', type=bool, default=True, show_default=True)
@click.option('--cbase', type=option_type(TRAIN_RANGES['cbase']), default=None)
@click.option('--cres', type=str, default=None, help='e.g. 1,2,2,2')
@click.option('--augment', help='Augmentation probability, as train.py', type=option_type(TRAIN_RANGES['augment']), default=0.12, show_default=True)
@click.option('--batch', help='Training batch per GPU', type=option_type(TRAIN_RANGES['batch_gpu']), default=128, show_default=True)
@click.option('--sample-batch', type=POSITIVE_INT, default=1024, show_default=True)
@click.option('--feature-batch', type=POSITIVE_INT, default=500, show_default=True)
@click.option('--sample-steps', type=POSITIVE_INT, default=18, show_default=True)
@click.option('--precision', type=click.Choice(list(precision_lib.PRECISIONS)), default='fp32', show_default=True)
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network (training and sampling)')
@click.option('--compile-mode', type=click.Choice(COMPILE_MODES), default='default',
    show_default=True, help='torch.compile mode; reduce-overhead uses CUDA graphs')
@click.option('--channels-last', is_flag=True)
@click.option('--iters', type=POSITIVE_INT, default=20, show_default=True)
@click.option('--peak-tflops', type=option_type(Range(min=0, min_open=True)), default=None, help='Peak FLOP/s of the device for MFU  [default: 790 on CUDA (H100 bf16 dense), none on CPU]')
@click.option('--small', is_flag=True, help='A tiny configuration that runs in seconds on a CPU')
@click.option('--device', type=str, default=None)
def main(arch, precond, resolution, cond, cbase, cres, augment, batch, sample_batch, feature_batch, sample_steps, precision,
        compile_net, compile_mode, channels_last, iters, peak_tflops, small, device):
    """Measure and print one table for a configuration."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if small:
        resolution, cbase, cres, batch, sample_batch, feature_batch, sample_steps, iters = 16, 16, '1,2', 8, 8, 4, 3, 2
    cres = [int(c) for c in cres.split(',')] if cres else None
    precision_lib.configure(precision, device)
    if peak_tflops is None and device.type == 'cuda':
        peak_tflops = 790.0
    torch.manual_seed(0)
    net = build(arch, precond, resolution, cond, cbase, cres, device, channels_last)
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.randn([1, 3, resolution, resolution], device=device)
    labels = torch.eye(10, device=device)[:1] if cond else None
    flops = count_forward_flops(net, x, torch.ones(1, device=device), labels, torch.zeros(1, 9, device=device))
    loss_fn = build_loss(**method_kwargs(precond, warmup_ite=200)[1])
    augment_pipe = AugmentPipe(p=augment, **AUGMENT_TRANSFORMS) if augment > 0 else None

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    compile_mode = compile_mode if compile_net else None
    train_ips, first_step, (launches, launch_kind) = bench_training(net, loss_fn, augment_pipe, batch, cond, device, precision, compile_mode,
        channels_last, iters)
    train_mem = peak_memory_gib(device)
    sample_ips = bench_sampling(net, sample_batch, device, precision, compile_mode, sample_steps, max(iters // 10, 1))
    feature_ips = bench_features(feature_batch, resolution, device, max(iters // 4, 1))
    nfe = 2 * sample_steps - 1
    mfu = (train_ips * 3 * flops / (peak_tflops * 1e12)) if peak_tflops else None

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    rows = [
        ('device', name), ('torch', torch.__version__),
        ('threads: torch / usable CPUs / all CPUs', f'{torch.get_num_threads()} / {usable} / {os.cpu_count()}'),
        ('configuration', f'{arch} {precond} {resolution}x{resolution} {"cond" if cond else "uncond"}, {n_params:,} parameters, '
            f'{flops / 1e9:.2f} GFLOP forward per image'),
        ('precision / compile mode / channels_last', f'{precision} / {compile_mode or "off"} / {channels_last}'),
        (f'training img/s (batch {batch}, augment {augment:g})', f'{train_ips:,.1f}'),
        ('first training step s (incl. compile)', f'{first_step:.1f}'),
        (f'{launch_kind} per training step (profiler)', f'{launches:,}'),
        ('peak memory GiB (training)', f'{train_mem:.2f}'),
        ('model FLOP utilisation (training)', f'{100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s' if mfu is not None else 'n/a (give --peak-tflops)'),
        (f'sampling img/s (EDM Heun, {nfe} NFE, batch {sample_batch})', f'{sample_ips:,.1f}'),
        (f'FID features img/s (Inception-v3 at fid.py\'s numerics, {resolution}x{resolution}, batch {feature_batch})', f'{feature_ips:,.1f}'),
    ]
    click.echo('| measure | value |\n|---|---|')
    for k, v in rows:
        click.echo(f'| {k} | {v} |')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
