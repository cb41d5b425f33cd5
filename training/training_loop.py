"""The training loop: DDP, gradient accumulation, EMA, ticks, snapshots and exact resume.

The signature of `training_loop` is the configuration schema (`name = default, # meaning`);
`training.config.setup_training_config` builds its arguments and train.py writes them to
training_options.json. What the run starts from (the dataset, a verified training state or
transferred weights) is read once, before the run folder exists, and handed over as `start`
(`training.config.Start`), with the metrics scored at each snapshot (train.py --metrics). The step
itself is `training.train_step.training_step`. Everything the next step depends on is in the
training-state file (`CheckpointIO`), and the randomness of step k on rank r comes from a generator
seeded with (seed, rank, k), so an interrupted run resumed from any state file continues bit for
bit as if it had never stopped.
"""

import copy
import inspect
import json
import os
import time
import types

import numpy as np
import psutil
import torch

from fdm.io.network_files import save_snapshot
from fdm.loss import build_loss
from fdm.preconditioning import build_precond
from torch_utils import distributed
from torch_utils import precision as precision_lib
from torch_utils.io.files import append_line
from torch_utils.tensorboard import open_writer, write_stats
from torch_utils.training_stats import StatsCollector
from training.augment import AugmentPipe
from training.checkpoint.names import snapshot_files, snapshot_name, state_name
from training.checkpoint.starting_point import load_transfer
from training.checkpoint.training_state import CheckpointIO, Progress
from training.config import batch_split
from training.data.dataset import training_batches
from training.evaluation.snapshot_grid import save_sample_grid
from training.phema import PowerEMAs, save_phema_snapshots
from training.run_dir import check_free_space
from training.train_step import Run, flatten_gradients, make_optimizer, training_step

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory.
    start               = None,     # What the run starts from (training.config.Start): the dataset, a state, weights.
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
):
    c = types.SimpleNamespace(**{k: v for k, v in locals().items() if k not in ('run_dir', 'start')})
    start_time = time.time()
    device = torch.device(device) if device is not None else distributed.device()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    precision_lib.configure(precision, device)  # fp32: TF32 off, as the reference
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
    batch_gpu, num_rounds = batch_split(batch_size, batch_gpu, world)
    dataset, progress = start.dataset, Progress()
    if start.state is not None:
        progress.cur_nimg = start.state['cur_nimg']  # the batches continue from here

    distributed.print0('Loading dataset...')
    next_batch = training_batches(dataset, progress.cur_nimg, seed, batch_gpu, device, data_on_device, rank, world,
        **data_loader_kwargs)

    distributed.print0('Constructing network...')
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)  # the same initial network on every rank
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net = build_precond(**network_kwargs, **interface).train().requires_grad_(True).to(device, memory_format=memory_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(net.parameters(), device, precision, **optimizer_kwargs)
    if start.transferred is not None:
        distributed.print0(f'Loading network weights from "{transfer}"...')
        load_transfer(net, ema, start.transferred, transfer)
        c.ema_rampup_ratio = None  # transferred weights are already good: no EMA warm-up
    phema = PowerEMAs(net, phema_stds) if phema_stds else None
    checkpoint = CheckpointIO(progress, net, ema, optimizer, phema)
    if start.state is not None:
        distributed.print0(f'Resuming from "{start.state_path}" ({start.state["cur_nimg"]} images seen)...')
        checkpoint.restore(start.state, start.state_path)
    ddp, model = _wrap(net, device, compile)
    run = Run(net=net, model=model, ema=ema, optimizer=optimizer, loss_fn=build_loss(**loss_kwargs), next_batch=next_batch,
        stats=StatsCollector(device), progress=progress, device=device, num_rounds=num_rounds,
        batch_per_process=batch_size // world, rank=rank, ddp=(ddp if ddp is not net else None),
        augment_pipe=(AugmentPipe(**augment_kwargs) if augment_kwargs else None), phema=phema, memory_format=memory_format)

    total_nimg = int(round(total_kimg * 1000))
    if start.state is not None and progress.cur_nimg >= total_nimg:  # resumed from the final state: nothing left to do
        distributed.print0(f'Training already complete ({progress.cur_nimg} of {total_nimg} images); exiting.')
        return dict(net=net, ema=ema, cur_nimg=progress.cur_nimg, step=progress.step)
    if rank == 0:
        check_free_space(run_dir, net, snapshot=snapshot_ticks is not None, state=state_dump_ticks is not None)
    distributed.print0(f'Training for {total_kimg} kimg from {progress.cur_nimg} images, {num_rounds} '
        f'accumulation round(s) of {batch_gpu} per process, {world} process(es) on {device.type}'
        + (f' ({torch.get_num_threads()} CPU thread(s) each)...' if device.type == 'cpu' else '...'))
    if start.metrics is not None:
        distributed.print0(f'Scoring {start.metrics.describe()}')

    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    grid_time = 0.0  # seconds of the last snapshot's sample grid, reported apart from the maintenance
    process_steps = 0
    board = open_writer(os.path.join(run_dir, 'runs')) if tensorboard and rank == 0 else None
    try:
        while True:
            lr = training_step(run, c)
            if process_steps == 0:
                _after_first_step(net, ddp, compile, device, tick_start_time)
            process_steps += 1
            done = progress.cur_nimg >= total_nimg or (max_steps is not None and process_steps >= max_steps)

            # Maintenance once per tick: snapshot and its metrics, the progress line, the training state.
            if not done and progress.cur_tick != 0 and progress.cur_nimg < progress.tick_start_nimg + kimg_per_tick * 1000:
                continue
            tick_end_time = time.time()
            tick, next_grid_time, scores = progress.cur_tick, 0.0, None
            if snapshot_ticks is not None and (done or tick % snapshot_ticks == 0):
                distributed.check_ranks_agree(net.parameters())
                if rank == 0:
                    next_grid_time = _save_snapshots(run_dir, run, c)
                if start.metrics is not None:  # after the file, whose digest keys the results
                    scores = _score_snapshot(run_dir, run, start.metrics)
            loss = _report_tick(run_dir, run, lr, total_nimg, dict(start=start_time, tick_start=tick_start_time,
                tick_end=tick_end_time, maintenance=maintenance_time - grid_time, grid=grid_time), board, scores)
            grid_time = next_grid_time  # reported with the next tick, in whose maintenance it falls
            progress.cur_tick += 1
            progress.tick_start_nimg = progress.cur_nimg  # a resumed run starts a new tick exactly here
            if state_dump_ticks is not None and (done or (tick % state_dump_ticks == 0 and tick != 0)) and rank == 0:
                checkpoint.save(os.path.join(run_dir, state_name(progress.cur_nimg)), seed)  # one name per step
            distributed.barrier()
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time - (scores['seconds'] if scores else 0.0)  # metrics: apart
            if done:
                break
    finally:
        if board is not None:
            board.close()

    return dict(net=net, ema=ema, cur_nimg=progress.cur_nimg, step=progress.step, loss=loss)

#----------------------------------------------------------------------------
# Setup.

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
# Once per tick: the progress line, a stats.jsonl entry, snapshot (and its metrics) and training state.

# Returns the tick's mean loss. times: wall-clock seconds of the run's start, this tick's start and end, and the maintenance
# (snapshots, states) between the previous tick and this one. scores: _score_snapshot's metrics of this tick's snapshot.
def _report_tick(run_dir, run, lr, total_nimg, times, board=None, scores=None):
    world, progress, device = distributed.get_world_size(), run.progress, run.device
    start_time, tick_start_time, tick_end_time = times['start'], times['tick_start'], times['tick_end']
    maintenance_time, grid_time = times['maintenance'], times['grid']
    results = run.stats.collect()
    nonfinite_tick = int(round(results['Train/nonfinite_grads']['mean'] * results['Train/nonfinite_grads']['num'] / world))
    progress.nonfinite_total += nonfinite_tick
    tick_images = progress.cur_nimg - progress.tick_start_nimg
    tick_time = tick_end_time - tick_start_time
    remaining = max(total_nimg - progress.cur_nimg, 0)
    metrics = scores['values'] if scores else {}
    fields = [
        f'tick {progress.cur_tick:<5d}', f'kimg {progress.cur_nimg / 1e3:<9.3f}', f'loss {results["Loss/loss"]["mean"]:<8.4f}',
        *[f'{name.split("/", 1)[1]} {value:<8.3f}' for name, value in metrics.items()],
        f'time {_format_time(tick_end_time - start_time):<12s}', f'sec/tick {tick_time:<7.1f}',
        f'img/s {tick_images / max(tick_time, 1e-9):<8.1f}',
        f'eta {_format_time(remaining / max(tick_images, 1) * tick_time):<10s}',
        f'maintenance {maintenance_time:<6.1f}', *([f'grid {grid_time:<6.1f}'] if grid_time else []),
        *([f'metrics {scores["seconds"]:<6.1f}'] if scores else []),
        f'cpumem {psutil.Process().memory_info().rss / 2**30:<5.2f}',
    ]
    if device.type == 'cuda':
        fields.append(f'gpumem {torch.cuda.max_memory_allocated(device) / 2**30:<5.2f}')
        torch.cuda.reset_peak_memory_stats(device)
    fields.append(f'nonfinite {nonfinite_tick}')
    distributed.print0(' '.join(fields), flush=True)
    if distributed.get_rank() == 0:
        entry = dict(results, timestamp=time.time())
        entry.update({'Progress/tick': _stat(progress.cur_tick), 'Progress/kimg': _stat(progress.cur_nimg / 1e3),
            'Progress/lr': _stat(lr), 'Timing/sec_per_tick': _stat(tick_time), 'Timing/maintenance_sec': _stat(maintenance_time),
            'Timing/grid_sec': _stat(grid_time),
            'Timing/img_per_sec': _stat(tick_images / max(tick_time, 1e-9)),
            'Train/nonfinite_grads_total': _stat(progress.nonfinite_total)})
        if scores:
            entry.update({name: _stat(value) for name, value in metrics.items()})
            entry['Timing/metrics_sec'] = _stat(scores['seconds'])
        # Appended, one whole line per tick (a full disk stops the run, the file unchanged); a kill
        # leaves at most half a line, which train.py clears on resume.
        append_line(os.path.join(run_dir, 'stats.jsonl'), json.dumps(entry) + '\n')
        if board is not None:
            write_stats(board, entry, progress.cur_nimg)
    return results['Loss/loss']['mean']

# The snapshot holds the EMA network; with it the sample grid and the post-hoc EMA profiles.
# Returns the seconds the grid took.
def _save_snapshots(run_dir, run, c):
    cur_nimg = run.progress.cur_nimg
    extra = dict(cur_nimg=cur_nimg, step=run.progress.step)
    kwargs = dict(loss_fn=run.loss_fn, augment_pipe=run.augment_pipe, dataset_kwargs=c.dataset_kwargs)
    files = snapshot_files(run_dir, cur_nimg, grid=bool(c.grid_images), stds=run.phema.stds if run.phema is not None else ())
    save_snapshot(files['snapshot'], run.ema, extra=extra, **kwargs)
    if run.phema is not None:
        save_phema_snapshots(run_dir, run.phema, run.ema, cur_nimg, **kwargs)
    grid_start = time.time()
    if c.grid_images:
        save_sample_grid(files['grid'], run.ema, c.grid_images, run.device)
    return time.time() - grid_start if c.grid_images else 0.0

# The metrics of the snapshot just written (every rank samples its share of the images) and their seconds,
# which the tick line reports with the values, apart from the maintenance.
def _score_snapshot(run_dir, run, metrics):
    metrics_start = time.time()
    cur_nimg = run.progress.cur_nimg
    values = metrics.evaluate(run_dir, os.path.join(run_dir, snapshot_name(cur_nimg)), run.ema, cur_nimg)
    return dict(values=values, seconds=time.time() - metrics_start)

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

#----------------------------------------------------------------------------
