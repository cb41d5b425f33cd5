"""Fast paths of the training step against their plain counterparts, bit for bit on the CPU:
flattened gradients, sanitising per buffer, the multi-tensor EMA, the dataset on the device."""

import copy
import os

import pytest
import torch

from conftest import write_image_zip
from helpers import assert_same_state, backward, loop_config, reference_sanitize, small_net
from training.data.dataset import DeviceBatches, ImageFolderDataset, InfiniteSampler
from fdm.io.network_files import CheckpointError
from training.checkpoint.training_state import adam_error, load_optimizer_state
from training.train_step import flatten_gradients, gradient_buffers, make_optimizer, sanitize_gradients, update_ema
from helpers import run_loop

@pytest.mark.parametrize('channels_last', [False, True])
def test_flattened_gradients_keep_values_and_sanitise_as_the_reference(channels_last):
    net = small_net(channels_last)
    backward(net, 1)
    before = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    flatten_gradients(net.parameters())
    params = [p for p in net.parameters() if p.grad is not None]
    assert net[5].weight.grad is None and len(params) == 6
    assert all(torch.equal(p.grad, before[n]) for n, p in net.named_parameters() if p.grad is not None)
    assert all(p.grad.stride() == p.stride() for p in params)  # fused optimizers need equal layouts
    assert len(gradient_buffers([p.grad for p in params])) == 1  # one buffer for all gradients

    # Autograd accumulates into the views after an in-place zero: values equal a fresh backward.
    for p in params:
        p.grad.zero_()
    backward(net, 2)
    fresh = small_net(channels_last)
    backward(fresh, 2)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, [p for p in fresh.parameters() if p.grad is not None]))
    assert len(gradient_buffers([p.grad for p in params])) == 1

    # Non-finite values: same replacement and count as per tensor.
    params[0].grad[0, 0, 0, :3] = torch.tensor([float('nan'), float('inf'), -float('inf')])
    params[3].grad[5] = float('nan')
    params[4].grad[0, 0] = -float('inf')
    expected, expected_count = reference_sanitize([p.grad.clone() for p in params])
    count = sanitize_gradients(net.parameters())
    assert int(count) == expected_count == 5
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    assert params[0].grad[0, 0, 0, :3].tolist() == [0, 1e5, -1e5]

def test_gradient_buffers_fall_back_to_each_tensor():
    base = torch.zeros(10)
    a, b = base[:4], base[5:]  # a gap at 4: they do not tile the storage
    c = torch.ones(3)
    buffers = gradient_buffers([a, b, c])
    assert sorted(t.numel() for t in buffers) == [3, 4, 5]
    whole = torch.zeros(9)
    assert [t.numel() for t in gradient_buffers([whole[:4], whole[4:].view(5, 1)])] == [9]

def test_update_ema_equals_the_reference_formula():
    torch.manual_seed(0)
    net = [torch.randn(5, 3), torch.randn(7).to(torch.float32), torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)]
    ema = [torch.randn_like(p) for p in net]
    for beta in (0.0, 0.3, 0.5, 0.999, 1.0):
        expected = [p.lerp(e, beta) for p, e in zip(net, ema)]
        update_ema(ema, net, beta)
        assert all(torch.equal(e, x) for e, x in zip(ema, expected))

# A state's moments and step counts are loaded; its Adam settings are not (torch's own loader
# would take them: here the NaN betas, the eps and the implementation flag of a damaged file).
def test_optimizer_state_brings_moments_not_settings():
    net = small_net()
    written = make_optimizer(net.parameters(), 'cpu', 'fp32', lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    backward(net, seed=0)
    written.step()
    saved = copy.deepcopy(written.state_dict())  # state_dict() shares the live moments
    saved['param_groups'][0].update(betas=(float('nan'), 2.0), eps=-1.0, foreach=True, weight_decay=1e6, extra='x')
    resumed_net = small_net()
    resumed = make_optimizer(resumed_net.parameters(), 'cpu', 'fp32', lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    before = {k: v for k, v in resumed.param_groups[0].items() if k != 'params'}
    load_optimizer_state(resumed, saved, 'state.pt')
    after = {k: v for k, v in resumed.param_groups[0].items() if k != 'params'}
    assert after == before and resumed.param_groups[0]['params'] == list(resumed_net.parameters())
    pairs = [(p, q) for p, q in zip(net.parameters(), resumed_net.parameters()) if p in written.state]
    assert len(pairs) == 6 and len(resumed.state) == 6  # all but the last Linear, which got no gradient
    for p, q in pairs:
        for key in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(written.state[p][key], resumed.state[q][key]), key
    saved = copy.deepcopy(written.state_dict())
    saved['state'][2]['exp_avg_sq'] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"state.pt: Adam's exp_avg_sq for parameter 2 is shape \[3\] where the network has shape \[8, 8, 1, 1\]"):
        load_optimizer_state(make_optimizer(small_net().parameters(), 'cpu', 'fp32', lr=1e-3), saved, 'state.pt')
    for key, value, problem in [('step', torch.tensor(-1.0), 'is -1.0, not a count of steps'),
            ('step', torch.tensor(1.5), 'is 1.5, not a count of steps'),
            ('exp_avg', torch.full((8, 3, 3, 3), float('nan')), 'holds non-finite values'),
            ('exp_avg_sq', torch.full((8, 3, 3, 3), -1.0), 'holds non-finite values or values below zero')]:
        saved = copy.deepcopy(written.state_dict())
        saved['state'][0][key] = value
        assert adam_error(saved['state']) == f"Adam's {key} for parameter 0 {problem}"

def test_device_batches_equal_the_data_loader(tmp_path):
    path = write_image_zip(tmp_path / 'd.zip', num_images=11, num_classes=3)
    dataset = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert dataset.num_unique_images == 11 and len(dataset) == 22
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=InfiniteSampler(dataset, seed=5, start_index=40), batch_size=4))
    device_batches = DeviceBatches(dataset, InfiniteSampler(dataset, seed=5, start_index=40), 4, 'cpu')
    for _ in range(12):
        (a_img, a_lab), (b_img, b_lab) = next(loader), device_batches.next()
        assert a_img.dtype == b_img.dtype == torch.uint8 and torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    # The 48 items compared include mirrored ones (index >= 11), so the flip path was checked too.
    indices = iter(InfiniteSampler(dataset, seed=5, start_index=40))
    assert any(next(indices) >= 11 for _ in range(48))

def test_training_with_the_dataset_on_the_device_is_identical(tmp_path, tiny_zip):
    # 6 steps through the data loader, against 3 steps with the dataset on the device and a resume for 3 more.
    os.makedirs(tmp_path / 'loader')
    loader = run_loop(run_dir=str(tmp_path / 'loader'), **loop_config(tiny_zip, total_kimg=0.048, data_on_device=False))
    os.makedirs(tmp_path / 'device')
    run_loop(run_dir=str(tmp_path / 'device'), **loop_config(tiny_zip, total_kimg=0.024, data_on_device=True))
    os.makedirs(tmp_path / 'resumed')
    device = run_loop(run_dir=str(tmp_path / 'resumed'), **loop_config(tiny_zip, total_kimg=0.048, data_on_device=True,
        resume_state=str(tmp_path / 'device')))
    assert loader['step'] == device['step'] == 6
    assert_same_state(loader['net'].state_dict(), device['net'].state_dict())
    assert_same_state(loader['ema'].state_dict(), device['ema'].state_dict())

def test_train_py_opens_the_dataset_and_reads_the_resume_state_once(tmp_path, tiny_zip, monkeypatch):
    # The option check opens the dataset and reads the state; the loop is handed both.
    import training.config
    import training.checkpoint.training_state
    from conftest import run_train_cli
    opened, loads = [], []
    original_init, original_load = ImageFolderDataset.__init__, training.checkpoint.training_state.load_plain
    monkeypatch.setattr(ImageFolderDataset, '__init__', lambda self, *a, **k: opened.append(a) or original_init(self, *a, **k))
    monkeypatch.setattr(training.checkpoint.training_state, 'load_plain', lambda *a, **k: loads.append(a) or original_load(*a, **k))
    args = ['--outdir', tmp_path / 'run', '--nosubdir', '--data', tiny_zip, '--cond=1', '--cbase=8', '--cres=1',
        '--batch=8', '--tick=0.008', '--workers=0', '--grid-images=0', '--seed=3']
    assert run_train_cli(*args, '--duration=0.000008').exit_code == 0
    assert len(opened) == 1 and loads == []
    result = run_train_cli(*args, '--duration=0.000016', '--resume', tmp_path / 'run')
    assert result.exit_code == 0, result.output
    assert len(opened) == 2 and len(loads) == 1

def test_compile_and_data_options_reach_the_loop(tiny_zip):
    from torch_utils.errors import OptionError
    from training.config import setup_training_config
    c, _ = setup_training_config(tiny_zip, compile=True, compile_mode='reduce-overhead', data_on_device='on')
    assert c.compile == 'reduce-overhead' and c.data_on_device is True
    c, _ = setup_training_config(tiny_zip)
    assert c.compile is False and c.data_on_device is None  # auto: on CUDA when the dataset fits
    with pytest.raises(OptionError, match='--compile-mode applies only with --compile'):
        setup_training_config(tiny_zip, compile_mode='max-autotune')
