"""Helpers shared by the training tests (test_train, test_fast_training, test_cuda_training):
the tiny loop configuration, a state comparison, a small network and the reference sanitiser.
Not a test module: pytest collects nothing here."""

import torch

from training.config import start_of
from training.training_loop import training_loop

# The loop on a config made here, with its starting point read as train.py reads it.
def run_loop(run_dir, **config):
    return training_loop(run_dir=str(run_dir), start=start_of(config), **config)

# A tiny network and schedule for the loop; augmentation, dropout, warmup and gradient
# accumulation are all on, so that every source of randomness and state is exercised.
def loop_config(data, total_kimg=0.048, **overrides):
    c = dict(
        dataset_kwargs=dict(path=data, use_labels=True, xflip=True, cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='FDM_EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0.1, augment_dim=9, fdm_multiplier=2.0),
        loss_kwargs=dict(class_name='EDMLoss', warmup_ite=5),
        optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=dict(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1),
        seed=7, batch_size=8, batch_gpu=4, total_kimg=total_kimg, ema_halflife_kimg=0.02, lr_rampup_kimg=0.016,
        kimg_per_tick=0.016, snapshot_ticks=2, state_dump_ticks=1, grid_images=0, device='cpu',
    )
    c.update(overrides)
    return c

def assert_same_state(a, b):
    assert list(a) == list(b)  # zip below would stop at the shorter one
    for (ka, va), (kb, vb) in zip(a.items(), b.items()):
        assert ka == kb and torch.equal(va, vb), ka

#----------------------------------------------------------------------------
# A small plain network whose last layer gets no gradient, for the gradient-buffer kernels.

def small_net(channels_last=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.Linear(5, 2))
    net[5].requires_grad_(True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net

def backward(net, seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 3, 4, 4)
    net[:5](x).square().sum().backward()  # the last Linear gets no gradient: it must stay None

# The reference's per-tensor replacement, written out independently.
def reference_sanitize(grads):
    count = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return [torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5) for g in grads], count
