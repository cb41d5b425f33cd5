"""One optimizer step and its kernels: per-step seeds, gradients in few buffers, non-finite
gradients replaced, the multi-tensor EMA, Adam, and the lr / EMA schedules of EDM.

Everything here stays on the device (no host synchronisation), so that the training loop and
the benchmark (`training.tools.benchmark`) time the same step.
"""

import contextlib
import math

import numpy as np
import torch

from fdm.io.network_files import CheckpointError
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

def load_optimizer_state(optimizer, saved, name):
    """Adam's moments and step counts from a training state `name`; its settings (betas, eps, the
    fused or foreach implementation) stay the run's own. torch's load_state_dict would take the
    stored settings too (a bf16 GPU run's fused Adam in an fp32 resume, a damaged file's NaN betas),
    and maps moments to parameters by position without checking their shapes (a tensor of another
    size would fail in the middle of the first step, not as a file error)."""
    settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        params = group['params']
        group.clear()
        group.update(own, params=params)
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                problem = _moment_problem(key, value, p)
                if problem is not None:
                    raise CheckpointError(f"{name}: Adam's {key} for parameter {i} {problem}; the file is damaged "
                        'or from another network, resume from an earlier state')

def _moment_problem(key, value, p):
    """None, or what is wrong with Adam's stored `key` of parameter p: a step count is a whole
    number >= 0; a moment has p's shape and finite values, a second moment none below zero (its
    square root is the denominator: one NaN there spreads to every weight it touches)."""
    if key == 'step':
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return f'has shape {list(value.shape)}, not one count'
            value = value.item()
        if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
            return f'is {value!r}, not a count of steps'
        return None
    if not isinstance(value, torch.Tensor) or value.shape != p.shape:
        got = f'shape {list(value.shape)}' if isinstance(value, torch.Tensor) else f'the number {value!r}'
        return f'is {got} where the network has shape {list(p.shape)}'
    if not torch.isfinite(value).all() or (key == 'exp_avg_sq' and (value < 0).any()):
        return 'holds non-finite values' + (' or values below zero' if key == 'exp_avg_sq' else '')
    return None

#----------------------------------------------------------------------------
# One optimizer step: accumulation rounds (DDP syncs only on the last), the lr, non-finite
# gradients replaced and counted, Adam. Everything stays on the device: no host synchronisation.

def optimizer_step(net, model, optimizer, loss_fn, next_batch, stats, step, lr, num_rounds, batch_gpu_total, device,
        ddp=None, augment_pipe=None, precision='fp32', memory_format=torch.contiguous_format, loss_scaling=1):
    optimizer.zero_grad(set_to_none=False)  # in place: keeps flattened / bucket-view gradients
    for round_idx in range(num_rounds):
        images, labels = next_batch()
        # uint8 [N, C, H, W] -> float32 in [-1, 1]
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
