"""The user's own run folders, damaged but not adversarial: a FIFO, symbolic link or folder under
a name of ours is refused in one line before training (never waited on, written through or
found after a tick), nothing outside the run folder is changed, and a training state whose Adam
values are damaged is skipped for the intact older one, as a truncated one is."""

import os

import pytest
import torch

from conftest import one_line_error, run_train_cli
from fdm.io.network_files import CheckpointError
from torch_utils.io import download
from torch_utils.io.files import FileError, append_line, load_plain
from training import run_dir as run_dir_lib
from training.checkpoint.names import recorded_nimg
from training.checkpoint.reference_state import is_reference_state
from training.checkpoint.training_state import find_resume_state, load_training_state, save_training_state
from helpers import within

def tiny_args(out, data, *extra):
    return ['--outdir', str(out), '--nosubdir', '--data', data, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        '--duration=0.000016', '--tick=0.008', '--workers=0', '--seed=3', '--grid-images=0', '--warmup_ite=10', *extra]

# A small but complete training state (a Linear layer after one Adam step); edit(fields) damages it
# before it is saved, so that its digest still matches.
def write_state(path, cur_nimg, edit=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    fields = dict(cur_nimg=cur_nimg, step=cur_nimg // 8, cur_tick=1, tick_start_nimg=cur_nimg, nonfinite_total=0, seed=3,
        net=net.state_dict(), ema={k: v.clone() for k, v in net.state_dict().items()}, optimizer=optimizer.state_dict())
    if edit is not None:
        edit(fields)
    save_training_state(str(path), **fields)
    return str(path)

#----------------------------------------------------------------------------
# Every reader of ours opens by name only a regular file: a FIFO is refused, never waited on.

def test_a_fifo_state_in_a_run_folder_is_skipped_for_the_older_state(tmp_path):
    older = write_state(tmp_path / 'training-state-000000_008.pt', 8)
    os.mkfifo(tmp_path / 'training-state-000000_016.pt')
    with within(10), pytest.warns(UserWarning, match='skipping .*training-state-000000_016.pt is not a regular file'):
        path, state = find_resume_state(str(tmp_path))
    assert path == older and state['cur_nimg'] == 8
    with within(10), pytest.raises(CheckpointError, match='is not a regular file'):
        find_resume_state(str(tmp_path / 'training-state-000000_016.pt'))  # --resume=FILE

def test_readers_by_name_refuse_a_fifo(tmp_path, monkeypatch):
    fifo = str(tmp_path / 'network-snapshot-000000.pt')
    os.mkfifo(fifo)
    monkeypatch.setenv('FDM_CACHE_DIR', str(tmp_path / 'cache'))
    url = 'https://example.com/weights.pt'
    os.makedirs(os.path.dirname(download.cache_path(url)))
    with open(download.cache_path(url), 'wb') as f:
        f.write(b'weights')
    os.mkfifo(download.cache_path(url) + '.sha256')
    with within(10):
        assert recorded_nimg(fifo) is None
        with pytest.raises(FileError, match='is not a regular file'):
            load_plain(fifo, 'snapshot', 'use another')
        with pytest.raises(FileError, match='is not a regular file'):
            download.file_sha256(fifo)
        assert download.recorded_sha256(url) is None
    os.mkfifo(tmp_path / 'training-state-000000.pt')
    with within(10):
        assert not is_reference_state(str(tmp_path / 'training-state-000000.pt'))

#----------------------------------------------------------------------------
# Nothing outside the run folder is changed: a file of ours that is a symbolic link to a user's
# file is refused before anything is written, and the in-place writes never follow one.

USER_TEXT = b'the user\'s own notes\nwith no final newline'

@pytest.mark.parametrize('name', ['.lock', 'stats.jsonl', 'log.txt'])
def test_a_run_never_writes_through_a_symlink(tmp_path, tiny_zip, name):
    run, outside = tmp_path / 'run', tmp_path / 'notes.txt'
    outside.write_bytes(USER_TEXT)
    run.mkdir()
    os.symlink(outside, run / name)
    line = one_line_error(run_train_cli(*tiny_args(run, tiny_zip)))
    assert f"'{run / name}' is a symbolic link where the run writes a file" in line
    assert outside.read_bytes() == USER_TEXT and os.listdir(run) == [name]

def test_in_place_writes_refuse_a_symlink_or_fifo(tmp_path):
    outside = tmp_path / 'notes.txt'
    outside.write_bytes(USER_TEXT)
    run = tmp_path / 'run'
    run.mkdir()
    os.symlink(outside, run / 'stats.jsonl')
    os.symlink(outside, run / '.lock')
    with pytest.raises(FileError, match='stats.jsonl: it is a symbolic link'):
        append_line(str(run / 'stats.jsonl'), '{}\n')
    with pytest.raises(FileError, match='stats.jsonl: it is a symbolic link'):
        run_dir_lib.tidy_interrupted_run(str(run))
    with pytest.raises(FileError, match='.lock: it is a symbolic link'):
        run_dir_lib.lock_run_dir(str(run))
    assert outside.read_bytes() == USER_TEXT
    os.remove(run / '.lock')
    os.mkfifo(run / '.lock')
    with within(10), pytest.raises(FileError, match='.lock: it is not a regular file'):
        run_dir_lib.lock_run_dir(str(run))

#----------------------------------------------------------------------------
# Every output is checked before training: an entry under one of the run's names that it cannot
# write (a FIFO, a symbolic link, a file where TensorBoard's folder goes) is one line, at once.

@pytest.mark.parametrize('case', ['fifo-snapshot', 'symlinked-phema', 'tensorboard-file'])
def test_every_output_is_checked_before_training(tmp_path, tiny_zip, case):
    run = tmp_path / 'run'
    run.mkdir()
    (tmp_path / 'elsewhere.pt').write_bytes(b'a file of the user')
    name, extra, problem = {
        'fifo-snapshot': ('network-snapshot-000000_016.pt', (), 'is not a regular file (a FIFO, socket or device) where '
            'the run writes a file'),
        'symlinked-phema': ('phema-000000_016-0.050.pt', ('--phema-std=0.050',), 'is a symbolic link where the run '
            'writes a file'),
        'tensorboard-file': ('runs', ('--tensorboard',), 'is a file where the run writes a folder of its own')}[case]
    if case == 'fifo-snapshot':
        os.mkfifo(run / name)
    elif case == 'symlinked-phema':
        os.symlink(tmp_path / 'elsewhere.pt', run / name)
    else:
        (run / name).write_text('not a folder')
    result = run_train_cli(*tiny_args(run, tiny_zip, *extra))
    assert f"'{run / name}' {problem}; remove it or choose another --outdir" in one_line_error(result)
    assert 'Training for' not in result.output and os.listdir(run) == [name]

#----------------------------------------------------------------------------
# A newer state whose Adam values are damaged (with a matching digest: written so, not flipped) is
# skipped with a warning for the intact older one, before anything is restored.

def _nan_moment(fields):
    fields['optimizer']['state'][0]['exp_avg'][0, 0] = float('nan')

def _huge_step(fields):
    fields['optimizer']['state'][1]['step'] = 10**400  # torch.load gives it back as a Python int

def _negative_second_moment(fields):
    fields['optimizer']['state'][1]['exp_avg_sq'][0] = -1.0

@pytest.mark.parametrize('edit, message', [
    (_nan_moment, "Adam's exp_avg for parameter 0 holds non-finite values"),
    (_huge_step, r"Adam's step for parameter 1 is 10000000000000000000\.\.\., not a count of steps"),
    (_negative_second_moment, "Adam's exp_avg_sq for parameter 1 holds non-finite values or values below zero")],
    ids=['nan-moment', 'huge-step', 'negative-second-moment'])
def test_a_state_with_damaged_adam_values_is_skipped(tmp_path, edit, message):
    older = write_state(tmp_path / 'training-state-000000_008.pt', 8)
    newer = write_state(tmp_path / 'training-state-000000_016.pt', 16, edit)
    with pytest.raises(CheckpointError, match=f'training-state-000000_016.pt: {message}; resume from an earlier state'):
        load_training_state(newer)
    with pytest.warns(UserWarning, match=f'skipping training-state-000000_016.pt: {message}'):
        path, state = find_resume_state(str(tmp_path))
    assert path == older and state['cur_nimg'] == 8

#----------------------------------------------------------------------------
