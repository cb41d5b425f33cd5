"""A run folder holds one run: rerunning train.py on it continues the run or is refused naming
the options that differ, --resume=RUN alone takes the run's options, and the end of a run and an
interruption say where the results are and how to go on."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, one_line_error, run_train_cli

# train.py on the tiny dataset: 8 images per step, a tick (and a snapshot and state) every step.
def tiny_args(out, data, *extra, steps=2):
    return ['--outdir', str(out), '--nosubdir', '--data', data, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        f'--duration={steps * 8 / 1e6}', '--tick=0.008', '--snap=1', '--dump=1', '--workers=0', '--seed=3',
        '--grid-images=0', '--warmup_ite=10', *extra]

def digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
        if not name.startswith('.')}

def newest_state(folder):
    names = [n for n in os.listdir(folder) if n.startswith('training-state-')]
    return torch.load(folder / max(names, key=lambda n: os.path.getmtime(folder / n)), weights_only=True)

#----------------------------------------------------------------------------

def test_rerun_continues_and_keeps_the_first_runs_results(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    assert run_train_cli(*tiny_args(run, tiny_zip, steps=2)).exit_code == 0
    first = digests(run)
    result = run_train_cli(*tiny_args(run, tiny_zip, steps=4))  # the same command, longer
    assert result.exit_code == 0, result.output
    assert f'Resuming from "{run}' in result.output and '(16 images seen)' in result.output
    after = digests(run)
    for name, digest in first.items():  # results are never rewritten; the logs only grow
        if name.startswith(('network-snapshot-', 'training-state-')):
            assert after[name] == digest, name
    assert newest_state(run)['cur_nimg'] == 32
    log = (run / 'log.txt').read_text()
    assert log.count('Training done in') == 2

def test_rerun_with_other_options_is_refused_naming_them(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    assert run_train_cli(*tiny_args(run, tiny_zip)).exit_code == 0
    before = digests(run)
    line = one_line_error(run_train_cli(*tiny_args(run, tiny_zip, '--cbase=16', '--lr=0.002')))
    assert f'{run} holds a run with other options: --cbase 16 (the run: 8); --lr 0.002 (the run: 0.001)' in line
    assert digests(run) == before

def test_resume_alone_continues_bit_for_bit(tmp_path, tiny_zip):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert run_train_cli(*tiny_args(straight, tiny_zip, steps=4)).exit_code == 0
    assert run_train_cli(*tiny_args(resumed, tiny_zip, steps=2)).exit_code == 0
    result = run_train_cli('--resume', str(resumed), '--duration=0.000032')  # its options from command.json
    assert result.exit_code == 0, result.output
    a, b = newest_state(straight), newest_state(resumed)
    assert a['cur_nimg'] == b['cur_nimg'] == 32
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    first = newest_state(resumed)
    assert not all(torch.equal(first['net'][n], torch.zeros_like(first['net'][n])) for n in first['net'])

def test_resume_alone_refuses_a_fixed_option(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    assert run_train_cli(*tiny_args(run, tiny_zip)).exit_code == 0
    before = digests(run)
    line = one_line_error(run_train_cli('--resume', str(run), '--cbase=16'))
    assert '--cbase cannot change when a run continues (the run has --cbase 8)' in line
    assert digests(run) == before

def test_a_run_killed_before_its_first_state_starts_over_as_itself(tmp_path, tiny_zip):
    # The first state comes a tick after the first snapshot: a run killed between them has only a
    # snapshot. Rerun, it starts over with its seed and writes that snapshot again, the same.
    run = tmp_path / 'run'
    assert run_train_cli(*tiny_args(run, tiny_zip)).exit_code == 0
    for name in os.listdir(run):
        if name.startswith('training-state-'):
            os.remove(run / name)
    snapshots = {n: torch.load(run / n, weights_only=True) for n in os.listdir(run) if n.startswith('network-snapshot-')}
    assert snapshots
    for name in snapshots:  # so that what is compared below was written again by the rerun
        os.remove(run / name)
    result = run_train_cli(*tiny_args(run, tiny_zip))
    assert result.exit_code == 0 and 'Resuming' not in result.output, result.output
    for name, before in snapshots.items():
        after = torch.load(run / name, weights_only=True)
        assert all(torch.equal(before['ema'][k], after['ema'][k]) for k in before['ema']), name

def test_end_of_run_summary(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    result = run_train_cli(*tiny_args(run, tiny_zip))
    assert 'Training done in' in result.output and '16 images seen (2 steps), final loss' in result.output
    assert f'python generate.py --network={run}/network-snapshot-' in result.output
    assert f'python train.py --resume={run} --duration=MIMG' in result.output
    command = json.loads((run / 'command.json').read_text())
    assert command['options']['cbase'] == 8 and command['options']['seed'] == 3

@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_interruption_says_where_the_last_state_is(tmp_path, tiny_zip, sig):
    run = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'train.py', *tiny_args(run, tiny_zip, steps=100000)], cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not any(n.startswith('training-state-') for n in os.listdir(run)) if run.exists() else True:
            assert time.time() < deadline and proc.poll() is None, 'the run did not start'
            time.sleep(0.2)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-2000:]
    assert 'the last complete training state is' in output and f'python train.py --resume={run}' in output
    assert 'Interrupted at' in (run / 'log.txt').read_text()

# The snapshot grid is a preview: whole rows of classes, and its time apart from the maintenance.
def test_snapshot_grid_fills_whole_rows_and_is_timed_apart(tmp_path, tiny_zip):
    import PIL.Image
    from conftest import tiny_denoiser
    from training.evaluation.snapshot_grid import save_sample_grid
    net = tiny_denoiser(label_dim=10)
    assert save_sample_grid(tmp_path / 'g.png', net, 64, 'cpu') == 60  # 6 rows of 10 classes, no blank cells
    assert PIL.Image.open(tmp_path / 'g.png').size == ((10 * 9 - 1) * 6, (6 * 9 - 1) * 6)  # 1-px gaps, x6 to >= 512
    run = tmp_path / 'run'
    result = run_train_cli(*[a if a != '--grid-images=0' else '--grid-images=4' for a in tiny_args(run, tiny_zip, steps=3)])
    ticks = [line for line in result.output.splitlines() if line.startswith('tick ')]
    assert len(ticks) == 3 and 'grid ' not in ticks[0] and all('grid ' in line for line in ticks[1:]), ticks
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert stats[0]['Timing/grid_sec']['mean'] == 0 and stats[1]['Timing/grid_sec']['mean'] > 0

# CPU threads: the idle cores now, at least one, shared among the processes of the machine.
def test_cpu_threads_follow_the_idle_cores():
    from torch_utils.distributed import cpu_threads
    assert [cpu_threads(2, load) for load in (0.0, 0.4, 1.0, 1.6, 7.0)] == [2, 2, 1, 1, 1]
    assert cpu_threads(16, 0.2) == 16 and cpu_threads(16, 0.2, local_processes=2) == 8 and cpu_threads(2, 0, 4) == 1

# README and docs/training.md list exactly the options a resumed run may change.
def test_docs_list_the_resumable_options():
    import re
    from training.config import RESUMABLE_OPTIONS
    expected = {'--' + name.replace('_', '-') for name in RESUMABLE_OPTIONS}
    for page, start, end in [('README.md', 'beside it only', 'may change'),
            (os.path.join('docs', 'training.md'), 'Beside `--resume` only these options may change', 'Any other option')]:
        text = ' '.join(open(os.path.join(ROOT, page), encoding='utf-8').read().split())
        part = text[text.index(start):]
        listed = set(re.findall(r'`(--[a-z0-9-]+)`', part[:part.index(end, len(start))]))
        assert listed - {'--outdir', '--resume'} == expected, (page, listed ^ expected)
