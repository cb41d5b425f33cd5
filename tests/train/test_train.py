"""train.py and the training loop on CPU: files, exact resume, two gloo processes, bad input."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import fdm
import train
from conftest import free_port, one_line_error, run_train_cli, write_image_zip
from helpers import assert_same_state, join_gloo, loop_config
from helpers import run_loop

#----------------------------------------------------------------------------

def test_cli_one_tick_writes_every_file(tmp_path, tiny_zip):
    args = ['--outdir', str(tmp_path / 'runs'), '--data', tiny_zip, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        '--duration=0.000008', '--tick=0.008', '--workers=0', '--seed=3', '--grid-images=4', '--warmup_ite=10']
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / 'runs').iterdir()
    assert run_dir.name == '00000-tiny-cond-ddpmpp-fdm_edm-gpus1-batch8-fp32'
    names = set(os.listdir(run_dir))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000000_008.pt',
        'training-state-000000_008.pt', 'samples-000000_008.png'} <= names  # 8 images: 0.008 kimg
    assert not [n for n in names if n.startswith('.tmp')]  # no leftovers of atomic writes
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['seed'] == 3 and options['network_kwargs']['fdm_multiplier'] == 2.0
    stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    assert np.isfinite(stats[-1]['Loss/loss']['mean']) and stats[-1]['Train/nonfinite_grads']['mean'] == 0
    assert 'tick 0' in (run_dir / 'log.txt').read_text()
    net = fdm.load_network(run_dir / 'network-snapshot-000000_008.pt')
    assert type(net).__name__ == 'FDM_EDMPrecond' and net.label_dim == 4
    assert PIL.Image.open(run_dir / 'samples-000000_008.png').size == ((4 * 9 - 1) * 15, 8 * 15)  # a column per class, 1-px gaps, x15 to >= 512 wide

def test_resume_is_bit_exact(tmp_path, tiny_zip):
    # 6 steps straight, against 3 steps, then a resume for the other 3.
    os.makedirs(tmp_path / 'a')
    straight = run_loop(run_dir=str(tmp_path / 'a'), **loop_config(tiny_zip, total_kimg=0.048))
    os.makedirs(tmp_path / 'b1')
    run_loop(run_dir=str(tmp_path / 'b1'), **loop_config(tiny_zip, total_kimg=0.024))
    os.makedirs(tmp_path / 'b2')
    resumed = run_loop(run_dir=str(tmp_path / 'b2'),
        **loop_config(tiny_zip, total_kimg=0.048, resume_state=str(tmp_path / 'b1')))
    assert resumed['cur_nimg'] == straight['cur_nimg'] == 48 and resumed['step'] == 6
    assert_same_state(straight['net'].state_dict(), resumed['net'].state_dict())
    assert_same_state(straight['ema'].state_dict(), resumed['ema'].state_dict())
    # And the network did change, so the comparison means something.
    first = run_loop(run_dir=str(tmp_path / 'b1'), **loop_config(tiny_zip, total_kimg=0.008))
    assert not torch.equal(first['net'].model.enc['8x8_conv'].weight, straight['net'].model.enc['8x8_conv'].weight)

def _gloo_worker(rank, world, port, data, run_dir, out):
    join_gloo(rank, world, port)
    result = run_loop(run_dir=run_dir, **loop_config(data, total_kimg=0.032))
    torch.save(result['net'].state_dict(), os.path.join(out, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()

@pytest.mark.slow
def test_two_gloo_processes_hold_identical_weights(tmp_path, tiny_zip):
    os.makedirs(tmp_path / 'run')
    mp.start_processes(_gloo_worker, args=(2, free_port(), tiny_zip, str(tmp_path / 'run'), str(tmp_path)),
        nprocs=2, start_method='spawn')
    a = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    b = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    assert_same_state(a, b)
    assert (tmp_path / 'run' / 'network-snapshot-000000_032.pt').exists()

#----------------------------------------------------------------------------
# Bad input: one line that says what is wrong, no traceback, nothing started.

def test_bad_inputs(tmp_path, tiny_zip):
    out = str(tmp_path / 'runs')
    assert 'does not exist' in one_line_error(run_train_cli('--outdir', out, '--data', str(tmp_path / 'nope.zip'), '-n'))
    os.makedirs(tmp_path / 'empty')
    assert 'no image files' in one_line_error(run_train_cli('--outdir', out, '--data', str(tmp_path / 'empty'), '-n')).lower()
    os.makedirs(tmp_path / 'rect')
    PIL.Image.new('RGB', (8, 6)).save(tmp_path / 'rect' / 'a.png')
    assert 'square' in one_line_error(run_train_cli('--outdir', out, '--data', str(tmp_path / 'rect'), '-n'))
    os.makedirs(tmp_path / 'mixed')
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'mixed' / 'a.png')
    PIL.Image.new('RGB', (16, 16)).save(tmp_path / 'mixed' / 'b.png')
    assert 'b.png' in one_line_error(run_train_cli('--outdir', out, '--data', str(tmp_path / 'mixed'), '-n'))
    unlabeled = write_image_zip(tmp_path / 'unlabeled.zip', num_classes=0)
    assert '--cond' in one_line_error(run_train_cli('--outdir', out, '--data', unlabeled, '--cond=1', '-n'))
    assert 'divisible' in one_line_error(run_train_cli('--outdir', out, '--data', tiny_zip, '--batch=10', '--batch-gpu=4', '-n'))
    assert 'cannot be combined' in one_line_error(run_train_cli('--outdir', out, '--data', tiny_zip, '--resume', tiny_zip,
        '--transfer', tiny_zip, '-n'))
    assert 'training-state' in one_line_error(run_train_cli('--outdir', out, '--data', tiny_zip, '--resume', str(tmp_path / 'empty'), '-n'))
    assert not os.path.exists(out)

def test_dry_run_options_and_warnings(tiny_zip, tmp_path):
    result = run_train_cli('--outdir', str(tmp_path), '--data', tiny_zip, '--precond=edm', '--warmup_ite=100', '--fdm_multipler=1', '-n')
    assert result.exit_code == 0, result.output
    assert 'Warning: --warmup_ite has no effect with --precond=edm' in result.output
    assert 'Warning: --fdm_multiplier has no effect with --precond=edm' in result.output
    config = json.loads(result.output[result.output.index('{'):result.output.rindex('}') + 1])
    assert config['network_kwargs']['class_name'] == 'EDMPrecond' and 'warmup_ite' not in config['loss_kwargs']
    assert config['lr_rampup_kimg'] == 10000 and config['ema_halflife_kimg'] == 500 and config['batch_size'] == 512
    result = run_train_cli('--outdir', str(tmp_path), '--data', tiny_zip, '--precond=fdm_vp', '--fdm_multipler=1', '-n')
    config = json.loads(result.output[result.output.index('{'):result.output.rindex('}') + 1])
    assert config['network_kwargs']['fdm_multiplier'] == 1.0 and config['loss_kwargs']['class_name'] == 'VPLoss'
    assert isinstance(config['seed'], int)  # drawn without CUDA and recorded
    result = run_train_cli('--outdir', str(tmp_path), '--data', tiny_zip, '--precond=fdm_ve', '--fdm_multiplier=2', '-n')
    assert 'Warning: --fdm_multiplier has no effect with --precond=fdm_ve' in result.output

#----------------------------------------------------------------------------

def test_nonfinite_gradients_are_replaced_and_counted():
    from training.train_step import sanitize_gradients
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    a.grad = torch.tensor([1.0, float('nan'), float('inf'), -float('inf')])
    b.grad = torch.tensor([[2.0, 3.0], [float('nan'), 4.0]])
    assert sanitize_gradients([a, b, c]).item() == 4
    assert a.grad.tolist() == [1.0, 0.0, 1e5, -1e5]
    assert b.grad.tolist() == [[2.0, 3.0], [0.0, 4.0]]
    assert sanitize_gradients([a, b, c]).item() == 0  # now all finite
