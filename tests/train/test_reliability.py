"""Faults: kills at random moments, damaged files, resume from the newest valid state, a dead or
hung process in a 2-process gloo run, unwritable and full output folders."""

import copy
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch

import fdm.io.network_files
import torch_utils.io.files
import training.run_dir
from conftest import ROOT, free_port, one_line_error, run_train_cli
from fdm.io.network_files import CheckpointError
from kill_drill import run_drill
from torch_utils.io.files import FileError, atomic_save, nested_digest
from training.checkpoint.training_state import find_resume_state, load_training_state

def tiny_args(out, data, *extra, duration_steps=2):
    return ['--outdir', str(out), '--data', data, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        f'--duration={duration_steps * 8 / 1e6}', '--tick=0.008', '--workers=0', '--seed=3', '--grid-images=0',
        '--warmup_ite=10', *extra]

#----------------------------------------------------------------------------
# 1. SIGKILL at random moments, resume, and end with the weights of an uninterrupted run
#    (the short version of `python tests/kill_drill.py --kills 20`).

@pytest.mark.slow
def test_kill_drill_short(tmp_path):
    aims = {'step': 1, 'snapshot write': 1, 'state dump': 1}
    summary = run_drill(str(tmp_path), kills=3, steps=12, max_delay=0.2, aims=aims, rng_seed=1, echo=lambda _: None)
    assert summary['kills'] == 3 and summary['final_step'] == 12
    assert summary['damaged'] == []
    assert summary['identical']

#----------------------------------------------------------------------------
# 2. Damaged files are detected at load; --resume on a run directory takes the newest valid state.

@pytest.fixture
def state_file(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    result = run_train_cli(*tiny_args(run, tiny_zip, '--nosubdir'))
    assert result.exit_code == 0, result.output
    return run / 'training-state-000000_016.pt'

def test_damaged_training_states_are_detected(tmp_path, state_file):
    raw = state_file.read_bytes()
    state = load_training_state(str(state_file))
    assert state['version'] == 2 and state['step'] == 2
    (tmp_path / 'truncated.pt').write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match='truncated.pt: cannot be read .* damaged or truncated'):
        load_training_state(str(tmp_path / 'truncated.pt'))
    # Flip bits in the payload of the largest tensor: the zip's CRC sees it.
    name, tensor = max(state['optimizer']['state'][0].items(), key=lambda kv: kv[1].numel())
    needle = tensor.numpy().tobytes()[:64]
    pos = raw.index(needle)
    (tmp_path / 'flipped.pt').write_bytes(raw[:pos] + bytes(b ^ 0x55 for b in raw[pos:pos + 8]) + raw[pos + 8:])
    with pytest.raises(CheckpointError, match='flipped.pt: cannot be read .*CRC.* damaged'):
        load_training_state(str(tmp_path / 'flipped.pt'))
    # The same change in a valid zip (the old digest kept): the checksum sees it.
    changed = copy.deepcopy(state)
    changed['optimizer']['state'][0][name].view(-1)[:2] += 1
    torch.save(changed, tmp_path / 'changed.pt')
    with pytest.raises(CheckpointError, match='changed.pt: checksum mismatch'):
        load_training_state(str(tmp_path / 'changed.pt'))
    # A complete-load check too: a file that lacks a part fails even with a matching digest.
    partial = {k: v for k, v in state.items() if k != 'optimizer'}
    torch.save(dict(partial, sha256=nested_digest(partial)), tmp_path / 'partial.pt')
    with pytest.raises(CheckpointError, match='incomplete training state .*optimizer'):
        load_training_state(str(tmp_path / 'partial.pt'))
    # States written before the checksum existed (version 1) still load.
    torch.save(dict(state, version=1), tmp_path / 'v1.pt')
    assert load_training_state(str(tmp_path / 'v1.pt'))['step'] == 2

def test_damaged_snapshot_description_is_detected(tmp_path, state_file):
    snap = state_file.parent / 'network-snapshot-000000_016.pt'
    data = torch.load(snap, weights_only=True)
    torch.save(dict(data, description=data['description'][:-5]), tmp_path / 'snap.pt')
    with pytest.raises(CheckpointError, match='description in the snapshot is damaged|snap.pt: checksum mismatch'):
        fdm.io.network_files.load_network_file(tmp_path / 'snap.pt')

def test_resume_takes_newest_valid_state_and_names_the_skipped(tmp_path, tiny_zip, state_file):
    run = state_file.parent
    raw = state_file.read_bytes()
    os.rename(state_file, run / 'training-state-000001.pt')
    (run / 'training-state-000002.pt').write_bytes(raw[:len(raw) - 100])           # truncated
    torch.save(dict(torch.load(run / 'training-state-000001.pt', weights_only=True), format='fdm-training-stat!'),
        run / 'training-state-000003.pt')  # a valid zip of something else
    # What a kill leaves besides: half a temporary file and half a stats line; both are cleared.
    (run / '.tmp-training-state-000004.pt-x1y2.part').write_bytes(raw[:1000])
    with open(run / 'stats.jsonl', 'a') as f:
        f.write('{"Loss/loss": {"num": 8, "me')
    result = run_train_cli(*tiny_args(run, tiny_zip, '--nosubdir', '--resume', str(run), duration_steps=3))
    assert result.exit_code == 0, result.output
    assert 'Removed 1 temporary file(s) of an interrupted run: .tmp-training-state-000004.pt-x1y2.part' in result.output
    assert not list(run.glob('.tmp-*'))
    assert [json.loads(line)['Progress/kimg']['mean'] for line in open(run / 'stats.jsonl')] == [0.008, 0.016, 0.024]
    assert 'Warning: skipping training-state-000003.pt' in result.output  # of another format: taken for a reference state
    assert 'Warning: skipping training-state-000002.pt: cannot be read' in result.output
    assert f'Resuming from "{run / "training-state-000001.pt"}" (16 images seen)' in result.output
    assert 'skipping training-state-000003.pt' in (run / 'log.txt').read_text()  # the log keeps it too
    assert load_training_state(str(run / 'training-state-000000_024.pt'))['step'] == 3
    # Nothing valid left: a clear error instead of a fresh start.
    for name in ['training-state-000000_024.pt', 'training-state-000001.pt']:
        (run / name).write_bytes(b'PK\x03\x04 not a state')
    with pytest.warns(UserWarning, match='skipping'), pytest.raises(CheckpointError, match='none of its 4 training-state files is valid'):
        find_resume_state(str(run))

# torch loads Adam's moments by position without checking their shapes; a state whose moments do not
# fit the network is refused in one line before the first step, and the file is left as it was.
def test_resume_refuses_adam_moments_of_another_shape(tmp_path, tiny_zip, state_file):
    state = torch.load(state_file, weights_only=True)
    moments = state['optimizer']['state'][0]
    moments['exp_avg'] = moments['exp_avg'].flatten()[:1].clone()
    state.pop('sha256')
    torch.save(dict(state, sha256=nested_digest(state)), state_file)  # a consistent file, digest included
    before = state_file.read_bytes()
    line = one_line_error(run_train_cli(*tiny_args(state_file.parent, tiny_zip, '--nosubdir', '--resume', str(state_file),
        duration_steps=3)))
    assert "training-state-000000_016.pt: Adam's exp_avg for parameter 0 is shape [1] where the network has shape" in line
    assert 'resume from an earlier state' in line and state_file.read_bytes() == before

def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_zip, state_file):
    run = state_file.parent
    before = state_file.read_bytes()
    result = run_train_cli(*tiny_args(run, tiny_zip, '--nosubdir', '--resume', str(run)))
    assert result.exit_code == 0, result.output
    assert 'Training already complete (16 of 16 images)' in result.output
    assert state_file.read_bytes() == before

#----------------------------------------------------------------------------
# 4. A dead or hung process: the survivor stops with an error naming the cause, in bounded time.
#    Two gloo processes run train.py; rank 1 dies (os._exit) or hangs at the start of step 3.

FAULTY = '''
import os, sys, time
sys.path.insert(0, {root!r})
import training.train_step as loop
fault, mark = sys.argv[1], sys.argv[2]
step_seed = loop.step_seed
def faulty_step_seed(seed, rank, step):
    if rank == 1 and step == 3:
        with open(mark, 'w') as f:
            f.write(repr(time.time()))
        if fault == 'die':
            os._exit(3)
        time.sleep(3600)
    return step_seed(seed, rank, step)
loop.step_seed = faulty_step_seed
import train
train.main(sys.argv[3:])
'''

@pytest.mark.slow
@pytest.mark.parametrize('fault, timeout', [('die', 120), ('hang', 5)])
def test_survivor_stops_when_its_peer_dies_or_hangs(tmp_path, tiny_zip, fault, timeout):
    port, mark = free_port(), str(tmp_path / 'fault-time')
    args = tiny_args(tmp_path / 'run', tiny_zip, '--nosubdir', f'--timeout={timeout}', duration_steps=20)
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
            WORLD_SIZE='2', OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, '-c', FAULTY.format(root=ROOT), fault, mark, *args], env=env,
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    survivor, peer = procs
    try:
        out, err = survivor.communicate(timeout=timeout + 90)
        exited = time.time()
    finally:
        peer.kill()
        peer.communicate()
    took = exited - float(open(mark).read())
    errors = [line for line in err.splitlines() if line.startswith('Error')]
    print(f'\n{fault}: the surviving rank exited {took:.2f} s after its peer {"died" if fault == "die" else "hung"} '
        f'(--timeout={timeout}): {errors[:1]}')
    assert survivor.returncode == 1, out + err
    assert len(errors) == 1 and 'Traceback' not in err, err
    if fault == 'die':
        assert 'process 0 of 2: another process died' in errors[0]
        assert took < 15  # detected from the closed connection, long before the timeout
    else:
        assert f'process 0 of 2: another process did not respond within --timeout={timeout} s' in errors[0]
        assert timeout - 1 < took < timeout + 15

#----------------------------------------------------------------------------
# 5. Unwritable or full output folders: reported before training; a failed write damages nothing.

def test_unwritable_outdir_is_reported_before_training(tmp_path, tiny_zip):
    (tmp_path / 'file').write_text('x')
    message = one_line_error(run_train_cli(*tiny_args(tmp_path / 'file' / 'runs', tiny_zip)))
    assert 'which is a file, not a folder; choose a writable --outdir' in message
    if os.geteuid() != 0:  # root ignores permissions
        os.makedirs(tmp_path / 'locked')
        os.chmod(tmp_path / 'locked', 0o500)
        try:
            assert 'Permission denied' in one_line_error(run_train_cli(*tiny_args(tmp_path / 'locked', tiny_zip, '--nosubdir')))
        finally:
            os.chmod(tmp_path / 'locked', 0o700)
    assert not list(tmp_path.glob('**/training-state-*'))

def test_low_free_space_is_reported_before_training(tmp_path, tiny_zip, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(training.run_dir.shutil, 'disk_usage', lambda path: usage._replace(free=2**17))
    result = run_train_cli(*tiny_args(tmp_path / 'run', tiny_zip, '--nosubdir', duration_steps=1))
    assert result.exit_code == 0, result.output
    warning = result.output.index('Warning: only 0.1 MiB free in')
    assert warning < result.output.index('tick 0')
    # The estimate is honest: one snapshot plus one state, as actually written (within 10%).
    run = tmp_path / 'run'
    written = sum(os.path.getsize(run / name) for name in ['network-snapshot-000000_008.pt', 'training-state-000000_008.pt'])
    _free, estimate = training.run_dir.check_free_space(str(run), fdm.load_network(run / 'network-snapshot-000000_008.pt'))
    assert 0.9 < estimate / written < 1.1

class FailingFile:
    """The file atomic_write opens, failing with `error` once more than 100 bytes are written."""
    def __init__(self, f, error):
        self.f, self.error, self.written = f, error, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 100:
            raise self.error
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

def failing_write(tmp_path, monkeypatch, error):
    """atomic_save over a complete state.pt with writes failing after 100 bytes; the state file's
    bytes before it, for the caller to compare after the expected exception."""
    atomic_save(dict(x=torch.arange(10)), tmp_path / 'state.pt')
    real_fdopen = os.fdopen
    monkeypatch.setattr(torch_utils.io.files.os, 'fdopen', lambda *a, **k: FailingFile(real_fdopen(*a, **k), error))
    return (tmp_path / 'state.pt').read_bytes()

def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    # A disk that fills up after 100 bytes.
    before = failing_write(tmp_path, monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(FileError, match=r'cannot write .*state.pt \(No space left on device\); any previous version'):
        atomic_save(dict(x=torch.zeros(10000)), tmp_path / 'state.pt')
    assert (tmp_path / 'state.pt').read_bytes() == before
    assert os.listdir(tmp_path) == ['state.pt']

def test_an_interrupted_write_is_the_interruption(tmp_path, monkeypatch):
    # Ctrl-C inside torch.save: its zip writer's cleanup fails on the half-written archive, and that
    # RuntimeError hid the KeyboardInterrupt (train.py printed a traceback and exited 1, not 130).
    before = failing_write(tmp_path, monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        atomic_save(dict(x=torch.zeros(10000)), tmp_path / 'state.pt')
    assert (tmp_path / 'state.pt').read_bytes() == before
    assert os.listdir(tmp_path) == ['state.pt']

def test_training_stops_cleanly_when_a_write_fails(tmp_path, tiny_zip, state_file):
    # A real failed write: a file-size limit (as a full quota would) in a resumed train.py.
    run = state_file.parent
    before = state_file.read_bytes()
    limit = len(before) // 2  # the snapshot fits, the training state does not
    assert os.path.getsize(run / 'network-snapshot-000000_016.pt') < limit
    set_limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    proc = subprocess.run([sys.executable, 'train.py', *tiny_args(run, tiny_zip, '--nosubdir', '--resume', str(run),
        duration_steps=3)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
        preexec_fn=set_limit, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'training-state-000000_024.pt (File too large); any previous version of it is unchanged' in errors[0]
    assert state_file.read_bytes() == before
    assert load_training_state(str(state_file))['step'] == 2
    assert not [name for name in os.listdir(run) if name.startswith('.tmp-')]

#----------------------------------------------------------------------------
