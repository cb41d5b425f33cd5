"""One optimizer step and its kernels: per-step seeds, gradients in few buffers, non-finite
gradients replaced, the multi-tensor EMA, Adam, and the lr / EMA schedules of EDM.

Everything here stays on the device (no host synchronisation), so that the training loop and
the benchmark (`training.tools.benchmark`) time the same step.
"""

import contextlib
import dataclasses

import numpy as np
import torch

from torch_utils import precision as precision_lib
from torch_utils.io.files import is_dense

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
        if p.grad is not None and not p.grad.is_sparse and is_dense(p):
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(p.numel() for p in members), device=device, dtype=dtype)
        offset = 0
        for p in members:
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p.grad)
            p.grad = view
            offset += p.numel()

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
        tiles = (all(g.dtype == dtype and is_dense(g) for g in members)
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
# What the loop and the step share: the live objects of a run and the shape of its batch.

@dataclasses.dataclass
class Run:
    net: torch.nn.Module                # the network being trained (its parameters)
    model: torch.nn.Module              # what the loss calls: net, its DDP wrapper, compiled or not
    ema: torch.nn.Module                # EMA of net's parameters (the snapshots)
    optimizer: torch.optim.Optimizer
    loss_fn: object                     # fdm.loss: (net, images, labels, augment_pipe, step) -> per-pixel loss
    next_batch: object                  # () -> (images uint8 [B, C, H, W], labels [B, label_dim])
    stats: object                       # torch_utils.training_stats.StatsCollector
    progress: object                    # training.checkpoint.training_state.Progress: images seen, steps
    device: torch.device
    num_rounds: int = 1                 # gradient accumulation rounds per step
    batch_per_process: int = 0          # images per step on this process (all rounds)
    rank: int = 0
    ddp: object = None                  # the DDP wrapper (syncs gradients on the last round), None in one process
    augment_pipe: object = None
    phema: object = None                # training.phema.PowerEMAs, None = no post-hoc EMA
    memory_format: torch.memory_format = torch.contiguous_format

#----------------------------------------------------------------------------
# One optimizer step: accumulation rounds (DDP syncs only on the last), learning rate,
# non-finite gradients replaced and counted, Adam, the EMA and the post-hoc EMA profiles. All
# randomness comes from (seed, rank, step), so a resumed run takes the same steps. c: the
# training_loop options (seed, batch_size, optimizer_kwargs, lr_rampup_kimg, ema_halflife_kimg,
# ema_rampup_ratio, loss_scaling, precision).

def training_step(run, c):
    """Returns the learning rate of the step."""
    p = run.progress
    torch.manual_seed(step_seed(c.seed, run.rank, p.step))
    run.optimizer.zero_grad(set_to_none=False)  # in place: keeps flattened / bucket-view gradients
    for round_idx in range(run.num_rounds):
        images, labels = run.next_batch()
        # uint8 [N, C, H, W] -> float32 in [-1, 1]
        images = images.to(run.device, non_blocking=True).to(torch.float32, memory_format=run.memory_format) / 127.5 - 1
        labels = labels.to(run.device, non_blocking=True)
        last = round_idx == run.num_rounds - 1
        with (run.ddp.no_sync() if (run.ddp is not None and not last) else contextlib.nullcontext()):
            with precision_lib.autocast(c.precision, run.device):
                loss = run.loss_fn(net=run.model, images=images, labels=labels, augment_pipe=run.augment_pipe, step=p.step)
            run.stats.report('Loss/loss', loss)
            loss.sum().mul(c.loss_scaling / run.batch_per_process).backward()
    lr = learning_rate(c.optimizer_kwargs['lr'], p.cur_nimg, c.lr_rampup_kimg)
    for group in run.optimizer.param_groups:
        group['lr'] = lr
    run.stats.report('Train/nonfinite_grads', sanitize_gradients(run.net.parameters()))
    run.optimizer.step()
    update_ema(run.ema.parameters(), run.net.parameters(),
        ema_beta(c.batch_size, p.cur_nimg, c.ema_halflife_kimg, c.ema_rampup_ratio))
    if run.phema is not None:
        run.phema.update(p.cur_nimg + c.batch_size, c.batch_size)
    p.cur_nimg += c.batch_size
    p.step += 1
    return lr

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
