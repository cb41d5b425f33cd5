"""Fast paths against their exact counterparts on small inputs (CPU: bf16 autocast)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fdm.io.network_files import save_snapshot
from torch_utils import precision
from training.evaluation.generation import generate

# 16 channels: the tiny net with weights of a trained scale (wake 0.05), so the network's output matters.
@pytest.fixture(scope='module')
def tiny_net(make_tiny_net):
    return make_tiny_net(model_channels=16)

def test_bf16_denoiser_close_to_fp32(tiny_net):
    net = tiny_net
    x = torch.randn(4, 3, 8, 8) * 5
    sigma = torch.tensor([0.01, 0.5, 5.0, 60.0])
    labels = torch.eye(4)
    exact = net(x, sigma, labels)
    with precision.autocast('bf16', 'cpu'):
        fast = net(x, sigma, labels)
    assert fast.dtype == torch.float32
    # Measured on this net: max |D_bf16 - D_fp32| / std(D_fp32) = 2.1e-3 (bf16 keeps 8 bits of mantissa).
    assert ((fast - exact).abs().max() / exact.std()).item() < 5e-2
    assert not torch.equal(fast, exact)  # the fast path really ran in bf16

def test_bf16_images_close_to_exact(tmp_path, tiny_net):
    save_snapshot(tmp_path / 'net.pt', tiny_net)
    for p in ('fp32', 'bf16'):
        generate(str(tmp_path / 'net.pt'), str(tmp_path / p), seeds=range(8), device='cpu', precision=p,
            verbose=False, num_steps=10)
    diffs = [np.abs(np.asarray(Image.open(tmp_path / 'fp32' / f'{s:06d}.png'), dtype=np.int16)
        - np.asarray(Image.open(tmp_path / 'bf16' / f'{s:06d}.png'), dtype=np.int16)) for s in range(8)]
    diffs = np.stack(diffs)
    # Measured here: mean |difference| 0.17 of 255 levels, max 1 (CPU, 10 steps); README states the bound.
    assert diffs.mean() < 2.0, diffs.mean()

def test_unknown_precision():
    with pytest.raises(ValueError, match='precision must be one of'):
        precision.autocast('fp8', 'cpu')

@pytest.mark.slow
def test_benchmark_runs_small_on_cpu():
    # A subprocess, so that what native code writes to the file descriptors (the profiler's lines) is seen too.
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'training.tools.benchmark', '--small', '--device=cpu', '--precision=bf16'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ['| measure | value |', '|---|---|'] and all(line.startswith('| ') for line in lines[2:])
    assert result.stderr == ''  # no profiler lines, no warnings
    rows = dict(line.strip('|').split('|')[:2] for line in lines[2:])
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert float(rows['training img/s (batch 8, augment 0.12)'].replace(',', '')) > 0
    assert float(rows['sampling img/s (EDM Heun, 5 NFE, batch 8)'].replace(',', '')) > 0
    assert int(rows['top-level aten operators per training step (profiler)'].replace(',', '')) > 100
    # The threads torch really uses (OMP_NUM_THREADS=1 above), then the CPUs.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert rows['threads: torch / usable CPUs / all CPUs'] == f'1 / {usable} / {os.cpu_count()}'

def test_bf16_and_channels_last_training_close_to_fp32(tmp_path, tiny_zip):
    from helpers import loop_config
    from helpers import run_loop
    losses = {}
    for name, extra in [('fp32', {}), ('bf16', dict(precision='bf16')), ('cl', dict(channels_last=True))]:
        os.makedirs(tmp_path / name)
        run_loop(run_dir=str(tmp_path / name), **loop_config(tiny_zip, total_kimg=0.032, kimg_per_tick=0.008, **extra))
        lines = (tmp_path / name / 'stats.jsonl').read_text().splitlines()
        losses[name] = np.array([json.loads(line)['Loss/loss']['mean'] for line in lines])  # one per step
    # Same seed, same batches and noise: the per-step losses agree (Adam amplifies tiny gradient
    # differences in the weights themselves, so the loss curve is the meaningful comparison).
    assert len(losses['bf16']) == len(losses['fp32']) == 4
    np.testing.assert_allclose(losses['bf16'], losses['fp32'], rtol=0.05)   # measured max 1.2e-2
    np.testing.assert_allclose(losses['cl'], losses['fp32'], rtol=1e-4)     # measured max 7.9e-6
    assert not np.array_equal(losses['bf16'], losses['fp32'])  # the fast path really ran
