"""The training loop: DDP, gradient accumulation, EMA, ticks, snapshots and exact resume.

The signature of `training_loop` is the configuration schema (`name = default, # meaning`);
`training.config.setup_training_config` builds its arguments and train.py writes them to
training_options.json. Everything the next step depends on is in the training-state file
(`training.checkpoint.training_state`), and the randomness of step k on rank r comes from a generator
seeded with (seed, rank, k) (`training.train_step.step_seed`), so an interrupted run resumed
from any state file continues bit for bit as if it had never stopped.
"""

import copy
import dataclasses
import inspect
import json
import os
import shutil
import time

import numpy as np
import psutil
import torch

from fdm.io.network_files import CheckpointError, save_snapshot
from fdm.loss import build_loss
from fdm.preconditioning import build_precond
from torch_utils import distributed
from torch_utils import precision as precision_lib
from torch_utils.io.files import append_line
from torch_utils.tensorboard import open_writer, write_stats
from torch_utils.training_stats import StatsCollector
from training.augment import AugmentPipe
from training.config import ConfigError, batch_split
from training.data.dataset import DeviceBatches, ImageFolderDataset, InfiniteSampler, dataset_nbytes
from training.phema import PowerEMAs, save_phema_snapshots
from training.evaluation.snapshot_grid import save_sample_grid
from training.train_step import (ema_beta, flatten_gradients, learning_rate, load_optimizer_state, make_optimizer,
    optimizer_step, step_seed, update_ema)
from training.checkpoint.starting_point import check_resume_seed, read_transfer
from training.checkpoint.training_state import find_resume_state, save_training_state

DEVICE_DATA_FRACTION = 0.1  # auto data_on_device: the dataset's pixels take at most this share of GPU memory

#----------------------------------------------------------------------------
# The counters a training state records besides the tensors.

@dataclasses.dataclass
class Progress:
    cur_nimg: int = 0           # images seen
    step: int = 0               # optimizer steps taken
    cur_tick: int = 0           # ticks completed
    tick_start_nimg: int = 0    # cur_nimg when the current tick began
    nonfinite_total: int = 0    # non-finite gradient elements replaced so far

    @classmethod
    def of_state(cls, state):
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory.
    dataset_kwargs      = {},       # Options for ImageFolderDataset.
    data_loader_kwargs  = {},       # Options for torch.utils.data.DataLoader.
    network_kwargs      = {},       # Preconditioner class_name and constructor kwargs.
    loss_kwargs         = {},       # Loss class_name and constructor kwargs.
    optimizer_kwargs    = {},       # Adam options (lr, betas, eps).
    augment_kwargs      = None,     # AugmentPipe options, None = no augmentation.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size for one training iteration.
    batch_gpu           = None,     # Limit batch size per GPU, None = no limit.
    total_kimg          = 200000,   # Training duration, measured in thousands of training images.
    ema_halflife_kimg   = 500,      # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg      = 10000,    # Learning rate ramp-up duration.
    loss_scaling        = 1,        # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots, None = disable.
    state_dump_ticks    = 500,      # How often to dump training state, None = disable.
    grid_images         = 64,       # Sample grid PNG written with each snapshot, 0 = none.
    resume_state        = None,     # Training state file (or run directory) to resume from, None = fresh start.
    transfer            = None,     # Network file whose weights start the training, None = random init.
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    device              = None,     # Device, None = this rank's GPU, else the CPU.
    precision           = 'fp32',   # Network precision: fp32 (exact, the reference), tf32 or bf16 (autocast).
    channels_last       = False,    # Keep the network and images in channels-last memory format?
    compile             = False,    # torch.compile the network: False, True or a mode ('reduce-overhead': CUDA graphs).
    data_on_device      = None,     # Keep the whole dataset on the device? None = on CUDA when it fits easily.
    tensorboard         = False,    # Also write each tick's statistics to run_dir/runs for TensorBoard (rank 0)?
    phema_stds          = None,     # Post-hoc EMA (EDM2): relative stds of the power-function EMAs to keep, None = off.
    max_steps           = None,     # Stop after this many optimizer steps of this process (tests, kill drills).
    dataset             = None,     # The dataset opened by setup_training_config, None = open dataset_kwargs here.
    resume              = None,     # The state read from resume_state by setup_training_config, None = read it here.
    transferred         = None,     # The weights read from transfer by setup_training_config, None = read them here.
):
    start_time = time.time()
    device = torch.device(device) if device is not None else distributed.device()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    precision_lib.configure(precision, device)  # fp32: TF32 off, as the reference
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
    batch_gpu, num_accumulation_rounds = batch_split(batch_size, batch_gpu, world)

    distributed.print0('Loading dataset...')
    dataset = dataset if dataset is not None else ImageFolderDataset(**dataset_kwargs)
    if resume is None and resume_state is not None:
        resume_state, resume = find_resume_state(resume_state, batch_size=batch_size, seed=seed)
    progress = Progress.of_state(resume) if resume is not None else Progress()
    next_batch = _batches(dataset, progress.cur_nimg, seed, batch_gpu, device, data_on_device, data_loader_kwargs)

    distributed.print0('Constructing network...')
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net, ema = _networks(network_kwargs, dataset, seed, device, memory_format)
    loss_fn = build_loss(**loss_kwargs)
    augment_pipe = AugmentPipe(**augment_kwargs) if augment_kwargs else None
    optimizer = make_optimizer(net.parameters(), device, precision, **optimizer_kwargs)
    if transfer is not None:
        _transfer_weights(net, ema, transfer, dataset, transferred)
        ema_rampup_ratio = None  # transferred weights are already good: no EMA warm-up
    phema = PowerEMAs(net, phema_stds) if phema_stds else None
    if resume is not None:
        _restore(net, ema, optimizer, resume, resume_state, seed, phema)
    ddp, model = _wrap(net, device, compile)

    stats = StatsCollector(device)
    total_nimg = int(round(total_kimg * 1000))
    if resume is not None and progress.cur_nimg >= total_nimg:  # resumed from the final state: nothing left to do
        distributed.print0(f'Training already complete ({progress.cur_nimg} of {total_nimg} images); exiting.')
        return dict(net=net, ema=ema, cur_nimg=progress.cur_nimg, step=progress.step)
    if rank == 0:
        check_free_space(run_dir, net, snapshot=snapshot_ticks is not None, state=state_dump_ticks is not None)
    distributed.print0(f'Training for {total_kimg} kimg from {progress.cur_nimg} images, {num_accumulation_rounds} '
        f'accumulation round(s) of {batch_gpu} per process, {world} process(es) on {device.type}...')

    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    process_steps = 0
    board = open_writer(os.path.join(run_dir, 'runs')) if tensorboard and rank == 0 else None
    try:
        while True:
            # One optimizer step; all randomness of this step comes from (seed, rank, step).
            torch.manual_seed(step_seed(seed, rank, progress.step))
            lr = learning_rate(optimizer_kwargs['lr'], progress.cur_nimg, lr_rampup_kimg)
            optimizer_step(net, model, optimizer, loss_fn, next_batch, stats, step=progress.step, lr=lr,
                num_rounds=num_accumulation_rounds, batch_gpu_total=batch_size // world, device=device,
                ddp=(ddp if ddp is not net else None), augment_pipe=augment_pipe, precision=precision,
                memory_format=memory_format, loss_scaling=loss_scaling)
            if process_steps == 0:
                _after_first_step(net, ddp, compile, device, tick_start_time)
            update_ema(ema.parameters(), net.parameters(),
                ema_beta(batch_size, progress.cur_nimg, ema_halflife_kimg, ema_rampup_ratio))
            if phema is not None:
                phema.update(progress.cur_nimg + batch_size, batch_size)
            progress.cur_nimg += batch_size
            progress.step += 1
            process_steps += 1
            done = progress.cur_nimg >= total_nimg or (max_steps is not None and process_steps >= max_steps)

            # Maintenance once per tick.
            if not done and progress.cur_tick != 0 and progress.cur_nimg < progress.tick_start_nimg + kimg_per_tick * 1000:
                continue
            tick_end_time = time.time()
            _report_tick(run_dir, stats, progress, lr, total_nimg, device, start_time, tick_start_time, tick_end_time,
                maintenance_time, board)
            _save(run_dir, progress, done, snapshot_ticks, state_dump_ticks, grid_images, net, ema, optimizer, loss_fn,
                augment_pipe, dataset_kwargs, seed, device, phema)
            progress.cur_tick += 1
            progress.tick_start_nimg = progress.cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            if done:
                break
    finally:
        if board is not None:
            board.close()

    distributed.print0('Exiting...')
    return dict(net=net, ema=ema, cur_nimg=progress.cur_nimg, step=progress.step)

#----------------------------------------------------------------------------
# Setup.

# The batches of this rank, from images seen onwards: a DataLoader, or with data_on_device the
# whole dataset in device memory (same images, same order).
def _batches(dataset, cur_nimg, seed, batch_gpu, device, data_on_device, data_loader_kwargs):
    sampler = InfiniteSampler(dataset, rank=distributed.get_rank(), num_replicas=distributed.get_world_size(), seed=seed,
        start_index=cur_nimg)
    nbytes = dataset_nbytes(dataset)
    if device.type == 'cuda':
        # auto: on the GPU when it takes little of it (10% of the card, half of what is free);
        # on: whenever half of the free memory holds it (the rest is for the training step).
        free, total = torch.cuda.mem_get_info(device)
        if data_on_device is None:
            data_on_device = nbytes <= min(DEVICE_DATA_FRACTION * total, free / 2)
        elif data_on_device and nbytes > free / 2:
            raise ConfigError(f'--data-on-device=on: the dataset takes {nbytes / 2**30:.2f} GiB of the '
                f'{free / 2**30:.1f} GiB of GPU memory that is free; use --data-on-device=auto or off')
    elif data_on_device is None:
        data_on_device = False  # a CPU run: worker processes decode while the step computes
    if data_on_device:
        distributed.print0(f'Keeping the dataset on the {device.type} ({nbytes / 2**20:.1f} MiB)...')
        return DeviceBatches(dataset, sampler, batch_gpu, device, num_workers=data_loader_kwargs.get('num_workers', 0)).next
    return iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
        pin_memory=(device.type == 'cuda'), **data_loader_kwargs)).__next__

# The network for the dataset's shape, initialised identically on every rank, and its EMA copy.
def _networks(network_kwargs, dataset, seed, device, memory_format):
    torch.manual_seed(seed)
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net = build_precond(**{**network_kwargs, **interface}).train().requires_grad_(True).to(device)
    net = net.to(memory_format=memory_format)
    return net, copy.deepcopy(net).eval().requires_grad_(False)

# --transfer: a network file's weights start the training (tensors it lacks keep their initialisation).
def _transfer_weights(net, ema, transfer, dataset, weights=None):
    distributed.print0(f'Loading network weights from "{transfer}"...')
    weights = weights if weights is not None else read_transfer(transfer, dataset)
    try:
        _missing, unexpected = net.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise CheckpointError(f'{transfer} does not fit the configured network ({str(err).strip().splitlines()[-1][:200]}); '
            'check --arch/--precond/--cbase/--cres against the transferred network') from None
    if unexpected:
        raise CheckpointError(f'{transfer}: tensors {unexpected[:3]} do not exist in the configured network; '
            'check --arch/--precond/--cond against the transferred network')
    ema.load_state_dict(net.state_dict())

# --resume: network, EMA and Adam as the state file has them (its counters are in Progress).
def _restore(net, ema, optimizer, state, path, seed, phema=None):
    name = os.path.basename(path)
    distributed.print0(f'Resuming from "{path}" ({state["cur_nimg"]} images seen)...')
    check_resume_seed(state, name, seed)  # setup_training_config checked it already; direct callers too
    try:
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        load_optimizer_state(optimizer, state['optimizer'], name)
        if phema is not None:
            if state.get('phema') is None:
                raise CheckpointError(f'{name} was written without --phema-std, so the post-hoc EMA profiles since '
                    'the start cannot be recovered; resume without --phema-std, or start a new run')
            phema.load_state_dict(state['phema'])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f'{name} does not fit the configured network '
            f'({str(err).strip().splitlines()[0][:200]}); resume with the options of the run that wrote it') from None

# (the DDP wrapper or the network itself, what the loss calls: that, compiled or not).
def _wrap(net, device, compile):
    ddp = net
    if distributed.is_distributed():
        # Buffers are constants, identical on every rank: no per-forward sync (newer torch names the option differently).
        no_buffer_sync = (dict(forward_sync_buffers=False) if 'forward_sync_buffers' in
            inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else dict(broadcast_buffers=False))
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
            gradient_as_bucket_view=True, **no_buffer_sync)
    # The first step includes the compile time (printed in the first tick's sec/tick).
    model = torch.compile(ddp, **({} if compile is True else dict(mode=compile))) if compile else ddp
    return ddp, model

# After the first backward: gradients into one buffer (DDP has its buckets), and the compile time.
def _after_first_step(net, ddp, compile, device, start):
    if ddp is net:
        flatten_gradients(net.parameters())
    if compile:  # one synchronisation, once: the compile time is worth knowing
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        distributed.print0(f'First step: {time.time() - start:.1f} s, torch.compile included', flush=True)

#----------------------------------------------------------------------------
# Once per tick: the progress line, a stats.jsonl entry, snapshot and training state.

def _report_tick(run_dir, stats, progress, lr, total_nimg, device, start_time, tick_start_time, tick_end_time,
        maintenance_time, board=None):
    world = distributed.get_world_size()
    results = stats.collect()
    nonfinite_tick = int(round(results['Train/nonfinite_grads']['mean'] * results['Train/nonfinite_grads']['num'] / world))
    progress.nonfinite_total += nonfinite_tick
    tick_images = progress.cur_nimg - progress.tick_start_nimg
    tick_time = tick_end_time - tick_start_time
    remaining = max(total_nimg - progress.cur_nimg, 0)
    fields = [
        f'tick {progress.cur_tick:<5d}', f'kimg {progress.cur_nimg / 1e3:<9.3f}', f'loss {results["Loss/loss"]["mean"]:<8.4f}',
        f'time {_format_time(tick_end_time - start_time):<12s}', f'sec/tick {tick_time:<7.1f}',
        f'img/s {tick_images / max(tick_time, 1e-9):<8.1f}',
        f'eta {_format_time(remaining / max(tick_images, 1) * tick_time):<10s}',
        f'maintenance {maintenance_time:<6.1f}', f'cpumem {psutil.Process().memory_info().rss / 2**30:<5.2f}',
    ]
    if device.type == 'cuda':
        fields.append(f'gpumem {torch.cuda.max_memory_allocated(device) / 2**30:<5.2f}')
        torch.cuda.reset_peak_memory_stats(device)
    fields.append(f'nonfinite {nonfinite_tick}')
    distributed.print0(' '.join(fields), flush=True)
    if distributed.get_rank() == 0:
        entry = dict(results, timestamp=time.time())
        entry.update({'Progress/tick': _stat(progress.cur_tick), 'Progress/kimg': _stat(progress.cur_nimg / 1e3),
            'Progress/lr': _stat(lr), 'Timing/sec_per_tick': _stat(tick_time),
            'Timing/img_per_sec': _stat(tick_images / max(tick_time, 1e-9)),
            'Train/nonfinite_grads_total': _stat(progress.nonfinite_total)})
        # Appended, one whole line per tick (a full disk stops the run, the file unchanged); a kill
        # leaves at most half a line, which train.py clears on resume.
        append_line(os.path.join(run_dir, 'stats.jsonl'), json.dumps(entry) + '\n')
        if board is not None:
            write_stats(board, entry, progress.cur_nimg)

# The snapshot holds the EMA network; the state, written after the tick, makes the resumed run
# start a new tick exactly where this one ended.
def _save(run_dir, progress, done, snapshot_ticks, state_dump_ticks, grid_images, net, ema, optimizer, loss_fn,
        augment_pipe, dataset_kwargs, seed, device, phema=None):
    rank, tick = distributed.get_rank(), progress.cur_tick
    kimg_name = f'{progress.cur_nimg // 1000:06d}'
    if snapshot_ticks is not None and (done or tick % snapshot_ticks == 0):
        _check_ranks_agree(net)
        if rank == 0:
            save_snapshot(os.path.join(run_dir, f'network-snapshot-{kimg_name}.pt'), ema, loss_fn=loss_fn,
                augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs,
                extra=dict(cur_nimg=progress.cur_nimg, step=progress.step))
            if grid_images:
                save_sample_grid(os.path.join(run_dir, f'samples-{kimg_name}.png'), ema, grid_images, device)
            if phema is not None:
                save_phema_snapshots(run_dir, kimg_name, phema, ema, progress.cur_nimg, loss_fn=loss_fn,
                    augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)
    if state_dump_ticks is not None and (done or (tick % state_dump_ticks == 0 and tick != 0)) and rank == 0:
        save_training_state(os.path.join(run_dir, f'training-state-{kimg_name}.pt'), cur_nimg=progress.cur_nimg,
            step=progress.step, cur_tick=tick + 1, tick_start_nimg=progress.cur_nimg,
            nonfinite_total=progress.nonfinite_total, seed=seed, net=net.state_dict(), ema=ema.state_dict(),
            optimizer=optimizer.state_dict(), **(dict(phema=phema.state_dict()) if phema is not None else {}))
    distributed.barrier()

#----------------------------------------------------------------------------
# Free space for a few more snapshots and states, else a warning before training starts (a full
# disk fails one write cleanly, see atomic_save, but it stops the run).
def check_free_space(run_dir, net, snapshot=True, state=True, count=3):
    tensors, params = list(net.state_dict().values()), list(net.parameters())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    record = 320  # bytes a torch.save zip spends on each tensor besides its data
    snapshot_bytes = nbytes(tensors) + record * len(tensors)  # the EMA network
    state_bytes = 2 * nbytes(tensors) + 2 * nbytes(params) + record * (2 * len(tensors) + 3 * len(params))  # net, EMA, Adam
    per_save = snapshot * snapshot_bytes + state * state_bytes
    free = shutil.disk_usage(run_dir).free
    if free < count * per_save:
        print(f'Warning: only {free / 2**20:.1f} MiB free in {run_dir}, but each snapshot and training state take '
            f'about {per_save / 2**20:.1f} MiB; free space or choose another --outdir, or the run will stop at a '
            'failed write (earlier files stay intact)', flush=True)
    return free, per_save

def _stat(value):
    return dict(num=1, mean=float(value), std=0.0)

def _format_time(seconds):
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h'

# Every rank must hold the same weights; a silent divergence would corrupt the run.
def _check_ranks_agree(net):
    if not distributed.is_distributed():
        return
    digest = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(digest) for _ in range(distributed.get_world_size())]
    torch.distributed.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError('ranks hold different network weights; the distributed run is inconsistent')

#----------------------------------------------------------------------------
