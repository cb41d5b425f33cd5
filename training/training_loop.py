"""The training loop: DDP, gradient accumulation, EMA, ticks, snapshots and exact resume.

The signature of `training_loop` is the configuration schema (`name = default, # meaning`);
train.py builds its arguments and writes them to training_options.json. Everything the next
step depends on is in the training-state file, and the randomness of step k on rank r comes
from a generator seeded with (seed, rank, k), so an interrupted run resumed from any state
file continues bit for bit as if it had never stopped.
"""

import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import time
import warnings

import numpy as np
import psutil
import torch

from fdm.checkpoint import CheckpointError, atomic_save, load_network_file, nested_digest, save_snapshot
from fdm.loss import build_loss
from fdm.preconditioning import build_precond
from torch_utils import distributed
from torch_utils import precision as precision_lib
from torch_utils.training_stats import StatsCollector
from training.augment import AugmentPipe
from training.dataset import DeviceBatches, ImageFolderDataset, InfiniteSampler, dataset_nbytes
from training.snapshot_grid import save_sample_grid

STATE_FORMAT = 'fdm-training-state'
STATE_VERSION = 2  # 2: with a SHA-256 over everything in the file
DEVICE_DATA_FRACTION = 0.1  # auto data_on_device: the dataset's pixels take at most this share of GPU memory

#----------------------------------------------------------------------------
# Seed of step k on rank r: independent streams, reproducible from (seed, rank, k) alone.

def step_seed(seed, rank, step):
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] % (1 << 63))

#----------------------------------------------------------------------------
# Gradients in few contiguous buffers, so that per-step work on "all gradients" is a handful of
# kernels instead of two per parameter tensor (DDPM++ has ~400). DDP with gradient_as_bucket_view
# already keeps them in its buckets; a single process gets one buffer per (device, dtype) from
# flatten_gradients after its first backward (parameters that got no gradient keep None).

def flatten_gradients(params):
    """Move the existing .grad of `params` into one buffer per (device, dtype), as views with the
    parameters' own strides (fused optimizers need matching layouts). Values are unchanged; from
    now on zero the gradients in place (zero_grad(set_to_none=False)) to keep the views."""
    groups = {}
    for p in params:
        if p.grad is not None and not p.grad.is_sparse and _dense(p):
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(p.numel() for p in members), device=device, dtype=dtype)
        offset = 0
        for p in members:
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p.grad)
            p.grad = view
            offset += p.numel()

# Elements packed without gaps (row-major or channels-last): the tensor spans exactly numel() slots.
def _dense(t):
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))

def gradient_buffers(grads):
    """1-D tensors that together hold exactly the elements of `grads`: the whole storage where a
    set of gradients tiles it (flattened or DDP buckets), else each gradient on its own."""
    by_storage = {}
    for g in grads:
        by_storage.setdefault((g.device, g.untyped_storage().data_ptr()), []).append(g)
    buffers = []
    for members in by_storage.values():
        storage = members[0].untyped_storage()
        dtype = members[0].dtype
        tiles = (all(g.dtype == dtype and _dense(g) for g in members)
            and sum(g.numel() for g in members) * members[0].element_size() == storage.nbytes())
        if tiles:
            numel = storage.nbytes() // members[0].element_size()
            buffers.append(torch.empty(0, dtype=dtype, device=members[0].device).set_(storage, 0, (numel,)))
        else:
            buffers.extend(g.reshape(-1) if g.is_contiguous() else g for g in members)
    return buffers

#----------------------------------------------------------------------------
# Non-finite gradients are replaced in place as the reference does (NaN -> 0, +-inf -> +-1e5),
# so that one bad batch does not end a run of days; the count (a device tensor, no host
# synchronisation) goes into the statistics so that it is seen.

def sanitize_gradients(params):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros([], dtype=torch.int64)
    count = torch.zeros([], dtype=torch.int64, device=grads[0].device)
    for buffer in gradient_buffers(grads):
        # x - x is 0 where x is finite and NaN where it is not: two passes over the buffer, where
        # torch.isfinite alone takes four (it is composed of ==, abs and !=).
        count += torch.count_nonzero(buffer - buffer)
        torch.nan_to_num(buffer, nan=0, posinf=1e5, neginf=-1e5, out=buffer)
    return count

#----------------------------------------------------------------------------
# EMA of the parameters (buffers are constant), written as the reference's
# p_ema = lerp(p_net, p_ema, beta) for bit-compatibility, with multi-tensor kernels.

@torch.no_grad()
def update_ema(ema_params, net_params, beta):
    ema_params, net_params = list(ema_params), list(net_params)  # no_grad: nothing to detach
    torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))

#----------------------------------------------------------------------------
# Adam; the fused CUDA kernel is faster but not bit-identical to the reference's: fast modes only.

def make_optimizer(params, device, precision, **adam_kwargs):
    fused = torch.device(device).type == 'cuda' and precision != 'fp32'
    return torch.optim.Adam(params, **adam_kwargs, **(dict(fused=True) if fused else {}))

#----------------------------------------------------------------------------
# One optimizer step: accumulation rounds (DDP syncs only on the last), the lr, non-finite
# gradients replaced and counted, Adam. Everything stays on the device: no host synchronisation.

def optimizer_step(net, model, optimizer, loss_fn, next_batch, stats, step, lr, num_rounds, batch_gpu_total, device,
        ddp=None, augment_pipe=None, precision='fp32', memory_format=torch.contiguous_format, loss_scaling=1):
    optimizer.zero_grad(set_to_none=False)  # in place: keeps flattened / bucket-view gradients
    for round_idx in range(num_rounds):
        images, labels = next_batch()
        images = images.to(device, non_blocking=True).to(torch.float32, memory_format=memory_format) / 127.5 - 1
        labels = labels.to(device, non_blocking=True)
        sync = round_idx == num_rounds - 1
        with (ddp.no_sync() if (ddp is not None and not sync) else contextlib.nullcontext()):
            with precision_lib.autocast(precision, device):
                loss = loss_fn(net=model, images=images, labels=labels, augment_pipe=augment_pipe, step=step)
            stats.report('Loss/loss', loss)
            loss.sum().mul(loss_scaling / batch_gpu_total).backward()
    for group in optimizer.param_groups:
        group['lr'] = lr
    stats.report('Train/nonfinite_grads', sanitize_gradients(net.parameters()))
    optimizer.step()

#----------------------------------------------------------------------------
# Learning rate and EMA as functions of the images seen (EDM's schedule).

def learning_rate(lr, cur_nimg, lr_rampup_kimg):
    if lr_rampup_kimg > 0:
        return lr * min(cur_nimg / (lr_rampup_kimg * 1000), 1)
    return lr

def ema_beta(batch_size, cur_nimg, ema_halflife_kimg, ema_rampup_ratio):
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

#----------------------------------------------------------------------------
# Training state files: plain data for torch.load(weights_only=True), written atomically.

STATE_NAME = re.compile(r'^training-state-(\d+)\.pt$')
STATE_KEYS = dict(cur_nimg=int, step=int, cur_tick=int, tick_start_nimg=int, nonfinite_total=int, seed=int, net=dict,
    ema=dict, optimizer=dict)

def find_resume_state(path):
    """A state file, or the newest *valid* one in a run directory (a warning names each one skipped)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f'{path}: no such file; --resume takes a training-state-*.pt file or a run directory')
        return path
    found = sorted((int(m.group(1)), name) for name in os.listdir(path) if (m := STATE_NAME.match(name)))
    if not found:
        raise CheckpointError(f'{path}: no training-state-*.pt in this directory; pass a state file or a run directory that has one')
    for _kimg, name in reversed(found):
        try:
            load_training_state(os.path.join(path, name))
            return os.path.join(path, name)
        except CheckpointError as err:
            warnings.warn(f'skipping {err}', UserWarning)
    raise CheckpointError(f'{path}: none of its {len(found)} training-state files is valid; '
        'resume from a run directory or file that has an intact state')

def load_training_state(path):
    """A training state, checked: complete, of a known version, and (version 2) matching its SHA-256."""
    name = os.path.basename(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise CheckpointError(f'{name}: cannot be read ({type(err).__name__}: {" ".join(str(err).split())[:200]}); '
            'the file is damaged or truncated, resume from an earlier state') from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise CheckpointError(f'{name}: not an FDM training state; --resume takes a training-state-*.pt file written by this code')
    if state.get('version') not in (1, STATE_VERSION):
        raise CheckpointError(f'{name}: training-state version {state.get("version")} is not supported; use the code that wrote it')
    wrong = [key for key, kind in STATE_KEYS.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise CheckpointError(f'{name}: incomplete training state (no valid {", ".join(wrong)}); resume from an earlier state')
    digest = state.pop('sha256', None)
    if state['version'] >= 2 and digest != nested_digest(state):
        raise CheckpointError(f'{name}: checksum mismatch, the file is damaged; resume from an earlier state')
    return state

def save_training_state(path, **fields):
    state = dict(format=STATE_FORMAT, version=STATE_VERSION, **fields)
    atomic_save(dict(state, sha256=nested_digest(state)), path)

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
    resume_state        = None,     # Training state file to resume from, None = fresh start.
    transfer            = None,     # Network file whose weights start the training, None = random init.
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    device              = None,     # Device, None = this rank's GPU, else the CPU.
    precision           = 'fp32',   # Network precision: fp32 (exact, the reference), tf32 or bf16 (autocast).
    channels_last       = False,    # Keep the network and images in channels-last memory format?
    compile             = False,    # torch.compile the network: False, True or a mode ('reduce-overhead': CUDA graphs).
    data_on_device      = None,     # Keep the whole dataset on the device? None = on CUDA when it fits easily.
    max_steps           = None,     # Stop after this many optimizer steps of this process (tests, kill drills).
):
    start_time = time.time()
    device = torch.device(device) if device is not None else distributed.device()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if precision == 'fp16':
        raise ValueError('--precision=fp16 is not supported for training; use --fp16=1 (the reference\'s mixed '
            'precision with loss scaling) or --precision=bf16')
    precision_lib.configure(precision, device)  # fp32: TF32 off, as the reference
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark

    # Batch split: batch = batch_gpu * rounds * world.
    batch_gpu_total = batch_size // world
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * num_accumulation_rounds * world:
        raise ValueError(f'--batch={batch_size} is not divisible by {world} GPUs x --batch-gpu={batch_gpu}; '
            'choose a batch that is a multiple of their product')

    # Data.
    distributed.print0('Loading dataset...')
    dataset = ImageFolderDataset(**dataset_kwargs)
    state = load_training_state(find_resume_state(resume_state)) if resume_state else None
    cur_nimg = state['cur_nimg'] if state else 0
    sampler = InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=seed, start_index=cur_nimg)
    if device.type == 'cuda':
        # auto: on the GPU when it takes little of it (10% of the card, half of what is free);
        # on: whenever half of the free memory holds it (the rest is for the training step).
        free, total = torch.cuda.mem_get_info(device)
        if data_on_device is None:
            data_on_device = dataset_nbytes(dataset) <= min(DEVICE_DATA_FRACTION * total, free / 2)
        elif data_on_device and dataset_nbytes(dataset) > free / 2:
            raise ValueError(f'--data-on-device=on: the dataset takes {dataset_nbytes(dataset) / 2**30:.2f} GiB of the '
                f'{free / 2**30:.1f} GiB of GPU memory that is free; use --data-on-device=auto or off')
    elif data_on_device is None:
        data_on_device = False  # a CPU run: worker processes decode while the step computes
    if data_on_device:
        distributed.print0(f'Keeping the dataset on the {device.type} ({dataset_nbytes(dataset) / 2**20:.1f} MiB)...')
        next_batch = DeviceBatches(dataset, sampler, batch_gpu, device, num_workers=data_loader_kwargs.get('num_workers', 0)).next
    else:
        next_batch = iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
            pin_memory=(device.type == 'cuda'), **data_loader_kwargs)).__next__

    # Network, loss, augmentation, optimizer. Initialisation is identical on every rank.
    distributed.print0('Constructing network...')
    torch.manual_seed(seed)
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net = build_precond(**{**network_kwargs, **interface}).train().requires_grad_(True).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    loss_fn = build_loss(**loss_kwargs)
    augment_pipe = AugmentPipe(**augment_kwargs) if augment_kwargs else None
    optimizer = make_optimizer(net.parameters(), device, precision, **optimizer_kwargs)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    step = 0
    cur_tick = 0
    tick_start_nimg = cur_nimg
    nonfinite_total = 0

    if transfer is not None:
        distributed.print0(f'Loading network weights from "{transfer}"...')
        weights = load_network_file(transfer)['ema'].state_dict()
        missing, unexpected = net.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(f'{transfer}: tensors {unexpected[:3]} do not exist in the configured network; '
                'check --arch/--precond/--cond against the transferred network')
        ema.load_state_dict(net.state_dict())
        ema_rampup_ratio = None  # transferred weights are already good: no EMA warm-up
    if state is not None:
        distributed.print0(f'Resuming from "{resume_state}" ({state["cur_nimg"]} images seen)...')
        if state['seed'] != seed:
            raise CheckpointError(f'{os.path.basename(resume_state)} was trained with seed {state["seed"]}, not {seed}; '
                'pass --seed with the original value to resume exactly')
        try:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f'{os.path.basename(resume_state)} does not fit the configured network '
                f'({str(err).strip().splitlines()[0][:200]}); resume with the options of the run that wrote it') from None
        step, cur_tick, tick_start_nimg = state['step'], state['cur_tick'], state['tick_start_nimg']
        nonfinite_total = state['nonfinite_total']

    ddp = net
    if distributed.is_distributed():
        # Buffers are constants, identical on every rank: no per-forward sync (newer torch names the option differently).
        no_buffer_sync = (dict(forward_sync_buffers=False) if 'forward_sync_buffers' in
            inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else dict(broadcast_buffers=False))
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
            gradient_as_bucket_view=True, **no_buffer_sync)
    # The first step includes the compile time (printed in the first tick's sec/tick).
    model = torch.compile(ddp, **({} if compile is True else dict(mode=compile))) if compile else ddp
    stats = StatsCollector(device)
    total_nimg = int(round(total_kimg * 1000))
    if state is not None and cur_nimg >= total_nimg:  # resumed from the final state: nothing left to do
        distributed.print0(f'Training already complete ({cur_nimg} of {total_nimg} images); exiting.')
        return dict(net=net, ema=ema, cur_nimg=cur_nimg, step=step)
    if rank == 0:
        check_free_space(run_dir, net, snapshot=snapshot_ticks is not None, state=state_dump_ticks is not None)
    distributed.print0(f'Training for {total_kimg} kimg from {cur_nimg} images, {num_accumulation_rounds} '
        f'accumulation round(s) of {batch_gpu} per process, {world} process(es) on {device.type}...')

    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    process_steps = 0
    while True:
        # One optimizer step; all randomness of this step comes from (seed, rank, step).
        torch.manual_seed(step_seed(seed, rank, step))
        lr = learning_rate(optimizer_kwargs['lr'], cur_nimg, lr_rampup_kimg)
        optimizer_step(net, model, optimizer, loss_fn, next_batch, stats, step=step, lr=lr,
            num_rounds=num_accumulation_rounds, batch_gpu_total=batch_gpu_total, device=device,
            ddp=(ddp if ddp is not net else None), augment_pipe=augment_pipe, precision=precision,
            memory_format=memory_format, loss_scaling=loss_scaling)
        if process_steps == 0:
            if ddp is net:
                flatten_gradients(net.parameters())
            if compile:  # one synchronisation, once: the compile time is worth knowing
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                distributed.print0(f'First step: {time.time() - tick_start_time:.1f} s, torch.compile included', flush=True)
        update_ema(ema.parameters(), net.parameters(), ema_beta(batch_size, cur_nimg, ema_halflife_kimg, ema_rampup_ratio))

        cur_nimg += batch_size
        step += 1
        process_steps += 1
        done = cur_nimg >= total_nimg or (max_steps is not None and process_steps >= max_steps)

        # Maintenance once per tick.
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue
        tick_end_time = time.time()
        results = stats.collect()
        nonfinite_tick = int(round(results['Train/nonfinite_grads']['mean'] * results['Train/nonfinite_grads']['num'] / world))
        nonfinite_total += nonfinite_tick
        tick_images = cur_nimg - tick_start_nimg
        tick_time = tick_end_time - tick_start_time
        remaining = max(total_nimg - cur_nimg, 0)
        fields = [
            f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.3f}', f'loss {results["Loss/loss"]["mean"]:<8.4f}',
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

        if rank == 0:
            entry = dict(results, timestamp=time.time())
            entry.update({'Progress/tick': _stat(cur_tick), 'Progress/kimg': _stat(cur_nimg / 1e3),
                'Progress/lr': _stat(lr), 'Timing/sec_per_tick': _stat(tick_time),
                'Timing/img_per_sec': _stat(tick_images / max(tick_time, 1e-9)),
                'Train/nonfinite_grads_total': _stat(nonfinite_total)})
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(entry) + '\n')

        # Snapshot (the EMA network) and training state.
        kimg_name = f'{cur_nimg // 1000:06d}'
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            _check_ranks_agree(net)
            if rank == 0:
                save_snapshot(os.path.join(run_dir, f'network-snapshot-{kimg_name}.pt'), ema, loss_fn=loss_fn,
                    augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs, extra=dict(cur_nimg=cur_nimg, step=step))
                if grid_images:
                    save_sample_grid(os.path.join(run_dir, f'samples-{kimg_name}.png'), ema, grid_images, device)
        if state_dump_ticks is not None and (done or (cur_tick % state_dump_ticks == 0 and cur_tick != 0)):
            if rank == 0:
                save_training_state(os.path.join(run_dir, f'training-state-{kimg_name}.pt'), cur_nimg=cur_nimg,
                    step=step, cur_tick=cur_tick + 1, tick_start_nimg=cur_nimg, nonfinite_total=nonfinite_total,
                    seed=seed, net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict())
        distributed.barrier()

        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    distributed.print0('Exiting...')
    return dict(net=net, ema=ema, cur_nimg=cur_nimg, step=step)

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
