"""The training fast paths on CUDA against their plain counterparts (skipped without a GPU;
run by tests/gpu_checks.sh). The CPU versions of these checks are in test_fast_training.py."""

import copy
import os

import pytest
import torch

from conftest import write_image_zip
from helpers import assert_same_state, loop_config, reference_sanitize, small_net
from training.data.dataset import DeviceBatches, ImageFolderDataset, InfiniteSampler
from training.train_step import flatten_gradients, gradient_buffers, sanitize_gradients, update_ema
from helpers import run_loop

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

def test_multi_tensor_ema_equals_lerp_on_cuda():
    torch.manual_seed(0)
    net = [torch.randn(n, device='cuda') for n in (5, 1000, 70001)]
    ema = [torch.randn_like(p) for p in net]
    for beta in (0.3, 0.5, 0.9993):
        expected = [p.lerp(e, beta) for p, e in zip(net, ema)]
        update_ema(ema, net, beta)
        assert all(torch.equal(e, x) for e, x in zip(ema, expected))

@pytest.mark.parametrize('channels_last', [False, True])
def test_flattened_sanitize_on_cuda(channels_last):
    net = small_net(channels_last).cuda()
    torch.manual_seed(1)
    net[:5](torch.randn(3, 3, 4, 4, device='cuda')).square().sum().backward()
    flatten_gradients(net.parameters())
    params = [p for p in net.parameters() if p.grad is not None]
    assert len(gradient_buffers([p.grad for p in params])) == 1
    params[0].grad[0, 0, 0, :3] = torch.tensor([float('nan'), float('inf'), -float('inf')])
    expected, expected_count = reference_sanitize([p.grad.clone() for p in params])
    assert int(sanitize_gradients(net.parameters())) == expected_count == 3
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))

def test_device_batches_on_cuda_equal_the_data_loader(tmp_path):
    dataset = ImageFolderDataset(write_image_zip(tmp_path / 'd.zip', num_images=11, num_classes=3), use_labels=True, xflip=True)
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=InfiniteSampler(dataset, seed=5), batch_size=4))
    batches = DeviceBatches(dataset, InfiniteSampler(dataset, seed=5), 4, 'cuda')
    for _ in range(8):
        (a_img, a_lab), (b_img, b_lab) = next(loader), batches.next()
        assert b_img.is_cuda and torch.equal(a_img, b_img.cpu()) and torch.equal(a_lab, b_lab.cpu())

def test_training_on_cuda_with_the_dataset_on_the_device_is_identical(tmp_path, tiny_zip):
    results = []
    for on_device in (False, True):
        run_dir = tmp_path / f'run-{on_device}'
        os.makedirs(run_dir)
        results.append(run_loop(run_dir=str(run_dir), **loop_config(tiny_zip, total_kimg=0.024, device='cuda',
            data_on_device=on_device)))
    assert_same_state(results[0]['net'].state_dict(), results[1]['net'].state_dict())
    assert_same_state(results[0]['ema'].state_dict(), results[1]['ema'].state_dict())

def test_training_step_does_not_synchronise_with_the_host(tmp_path):
    # Everything between two ticks stays on the GPU: data, augmentation, loss, statistics, Adam, EMA.
    from fdm.loss import build_loss
    from fdm.preconditioning import build_precond
    from torch_utils.training_stats import StatsCollector
    from training.augment import AugmentPipe
    from training.config import AUGMENT_TRANSFORMS
    import dnnlib
    from training.checkpoint.training_state import Progress
    from training.train_step import Run, training_step
    dataset = ImageFolderDataset(write_image_zip(tmp_path / 'd.zip', num_images=16, num_classes=4), use_labels=True, xflip=True)
    batches = DeviceBatches(dataset, InfiniteSampler(dataset, seed=0), 8, 'cuda')
    c = loop_config('unused')
    torch.manual_seed(0)
    net = build_precond(**c['network_kwargs'], img_resolution=8, img_channels=3, label_dim=4).cuda().train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    run = Run(net=net, model=net, ema=ema, optimizer=optimizer, loss_fn=build_loss(**c['loss_kwargs']), next_batch=batches.next,
        stats=StatsCollector('cuda'), progress=Progress(), device=torch.device('cuda'), num_rounds=2, batch_per_process=16,
        augment_pipe=AugmentPipe(p=0.5, **AUGMENT_TRANSFORMS))
    options = dnnlib.EasyDict(c, precision='bf16', batch_size=16, lr_rampup_kimg=0, ema_rampup_ratio=0.05)
    training_step(run, options)  # warm-up: allocations, lazy init
    flatten_gradients(net.parameters())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(1, 4):
            training_step(run, options)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert run.stats.collect()['Loss/loss']['num'] == 4 * 16

def test_data_on_device_refuses_a_dataset_larger_than_free_memory(tmp_path, tiny_zip, monkeypatch, capsys):
    import training.data.dataset as data
    monkeypatch.setattr(data, 'dataset_nbytes', lambda dataset: 1 << 50)
    with pytest.raises(data.DatasetError, match='--data-on-device=on: the dataset takes'):
        run_loop(run_dir=str(tmp_path), **loop_config(tiny_zip, device='cuda', data_on_device=True))
    capsys.readouterr()
    auto = run_loop(run_dir=str(tmp_path), **loop_config(tiny_zip, total_kimg=0.008, device='cuda', data_on_device=None))
    assert auto['step'] == 1 and 'Keeping the dataset on the cuda' not in capsys.readouterr().out  # the loader, not the GPU
