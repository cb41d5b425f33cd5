"""The names of a run's files (training/checkpoint/names.py): one per step, in training order, the
reference's at whole kimg; runs of fractional ticks keep every snapshot and state and resume from
the newest; older whole-kimg names are still read; a write never replaces another step's file."""

import os
import random
import shutil

import pytest
import torch

from fdm.io.network_files import load_network_file, save_snapshot
from helpers import assert_same_state, loop_config, run_loop
from torch_utils.errors import FileError
from training.checkpoint.names import (GRID_NAME, PHEMA_NAME, SNAPSHOT_NAME, STATE_NAME, grid_name, list_files, nimg_of,
    phema_name, snapshot_files, snapshot_name, state_name)
from training.checkpoint.training_state import CheckpointIO, Progress, find_resume_state, load_training_state
from training.evaluation.tables import list_snapshots

#----------------------------------------------------------------------------
# The rule.

KINDS = [(snapshot_name, SNAPSHOT_NAME), (state_name, STATE_NAME), (grid_name, GRID_NAME),
    (lambda n: phema_name(n, 0.05), PHEMA_NAME)]

def test_names_are_the_references_at_whole_kimg_and_unique_between():
    assert snapshot_name(0) == 'network-snapshot-000000.pt'
    assert snapshot_name(200_000) == 'network-snapshot-000200.pt'
    assert state_name(1000) == 'training-state-000001.pt' and grid_name(5000) == 'samples-000005.png'
    assert phema_name(3000, 0.1) == 'phema-000003-0.100.pt'
    assert snapshot_name(32) == 'network-snapshot-000000_032.pt'
    assert snapshot_name(544) == 'network-snapshot-000000_544.pt'
    assert state_name(1024) == 'training-state-000001_024.pt' and grid_name(999_500) == 'samples-000999_500.png'
    assert phema_name(1, 0.05) == 'phema-000000_001-0.050.pt'
    assert snapshot_name(2000, 'pkl') == 'network-snapshot-000002.pkl'

def test_names_sort_in_training_order_and_parse_back():
    rng = random.Random(0)
    steps = [0, 1, 8, 16, 32, 40, 500, 544, 999, 1000, 1001, 1024, 1500, 1999, 2000, 2001, 10_000, 999_500,
        1_000_000, 1_000_024, 200_000_000, 999_999_999] + [rng.randrange(10**9) for _ in range(300)]
    steps = sorted(set(steps))
    for name_of, pattern in KINDS:
        names = [name_of(n) for n in steps]
        assert len(set(names)) == len(names)
        shuffled = names[:]
        rng.shuffle(shuffled)
        assert sorted(shuffled) == names  # string order is training order
        assert [nimg_of(pattern.match(name)) for name in names] == steps
    # The case a '.' would get wrong: 0.032 kimg after 0 kimg and before 1 kimg.
    assert sorted(['network-snapshot-000001.pt', 'network-snapshot-000000_032.pt', 'network-snapshot-000000.pt']) == [
        'network-snapshot-000000.pt', 'network-snapshot-000000_032.pt', 'network-snapshot-000001.pt']

def test_parser_reads_old_names_and_nothing_else():
    assert nimg_of(SNAPSHOT_NAME.match('network-snapshot-000200.pkl')) == 200_000  # the reference's
    assert nimg_of(STATE_NAME.match('training-state-5.pt')) == 5000
    for name in ['training-state-000000_000.pt', 'training-state-000000_32.pt', 'training-state-000000.032.pt',
            'training-state-000000_0320.pt', 'training-state-.pt', '.tmp-training-state-000001.pt-x.part']:
        assert STATE_NAME.match(name) is None, name

def test_readers_order_by_the_images_in_the_name(tmp_path):
    for name in ['network-snapshot-000001.pt', 'network-snapshot-000000_032.pt', 'network-snapshot-000000.pt',
            'network-snapshot-000001.pkl', 'network-snapshot-000002_500.pt', 'network-snapshot-5.pt', 'samples-000000.png']:
        (tmp_path / name).write_bytes(b'')
    assert [n for n, _ in list_files(tmp_path, SNAPSHOT_NAME)] == [0, 32, 1000, 1000, 2500, 5000]
    listed = list_snapshots(str(tmp_path))  # the tables: kimg from the name, ours rather than the reference .pkl
    assert [kimg for kimg, _ in listed] == [0, 0.032, 1, 2.5, 5]
    assert [os.path.basename(p) for _, p in listed][2] == 'network-snapshot-000001.pt'

#----------------------------------------------------------------------------
# In the loop: ticks of 16 images (two steps of 8), a snapshot every tick, a state every tick but
# the first. Under whole-kimg names all of them were one file each, the last one written.

def files(run_dir, pattern):
    return [(n, os.path.join(run_dir, name)) for n, name in list_files(run_dir, pattern)]

def config(data, total_kimg, **overrides):
    return loop_config(data, total_kimg=total_kimg, snapshot_ticks=1, grid_images=2, **overrides)

def test_fractional_ticks_keep_every_file_and_resume_from_the_newest(tmp_path, tiny_zip, one_thread):
    for name in ('a', 'b1', 'b2'):
        os.makedirs(tmp_path / name)
    straight = run_loop(tmp_path / 'a', **config(tiny_zip, 0.064), phema_stds=[0.05, 0.1])
    ticks = [8, 24, 40, 56, 64]  # the first step, three full ticks, and the end
    snapshots = files(tmp_path / 'a', SNAPSHOT_NAME)
    assert [n for n, _ in snapshots] == ticks
    for n, path in snapshots:
        assert load_network_file(path)['extra']['cur_nimg'] == n
    assert [n for n, _ in files(tmp_path / 'a', GRID_NAME)] == ticks
    assert [n for n, _ in files(tmp_path / 'a', PHEMA_NAME)] == [n for n in ticks for _std in (0.05, 0.1)]
    states = files(tmp_path / 'a', STATE_NAME)
    assert [n for n, _ in states] == ticks[1:]
    assert [load_training_state(path)['cur_nimg'] for _, path in states] == ticks[1:]

    # 40 images, then a resume from that folder: its newest state (of 24 and 40) goes on to 64, bit for bit.
    run_loop(tmp_path / 'b1', **config(tiny_zip, 0.040), phema_stds=[0.05, 0.1])
    path, state = find_resume_state(str(tmp_path / 'b1'))
    assert os.path.basename(path) == 'training-state-000000_040.pt' and state['cur_nimg'] == 40
    resumed = run_loop(tmp_path / 'b2', **config(tiny_zip, 0.064, resume_state=str(tmp_path / 'b1')),
        phema_stds=[0.05, 0.1])
    assert resumed['cur_nimg'] == straight['cur_nimg'] == 64
    assert_same_state(straight['net'].state_dict(), resumed['net'].state_dict())
    assert_same_state(straight['ema'].state_dict(), resumed['ema'].state_dict())
    assert [n for n, _ in files(tmp_path / 'b2', SNAPSHOT_NAME)] == [56, 64]
    # The network changed over the resumed ticks, so the equality means something.
    at_40 = load_network_file(tmp_path / 'a' / 'network-snapshot-000000_040.pt')['ema'].state_dict()
    assert not all(torch.equal(v, straight['ema'].state_dict()[k]) for k, v in at_40.items())

    # A folder of the older names, where the last state of a tick overwrote the others
    # (training-state-000000.pt holding 40 images), still resumes, to the same weights.
    os.makedirs(tmp_path / 'old')
    shutil.copy(tmp_path / 'b1' / 'training-state-000000_040.pt', tmp_path / 'old' / 'training-state-000000.pt')
    shutil.copy(tmp_path / 'b1' / 'network-snapshot-000000_040.pt', tmp_path / 'old' / 'network-snapshot-000000.pt')
    path, state = find_resume_state(str(tmp_path / 'old'))
    assert os.path.basename(path) == 'training-state-000000.pt' and state['cur_nimg'] == 40
    assert list_snapshots(str(tmp_path / 'old'))[0][0] == 0  # the tables list it too (kimg by the name)
    again = run_loop(tmp_path / 'old', **config(tiny_zip, 0.064, resume_state=str(tmp_path / 'old')),
        phema_stds=[0.05, 0.1])
    assert_same_state(straight['net'].state_dict(), again['net'].state_dict())
    # Mixed old and new names: the newest by the images seen.
    assert os.path.basename(find_resume_state(str(tmp_path / 'old'))[0]) == 'training-state-000000_064.pt'

#----------------------------------------------------------------------------
# Another step's file is never replaced; the same step's file is.

def tiny_snapshot(path, cur_nimg, make_tiny_net):
    save_snapshot(path, make_tiny_net('EDMPrecond', label_dim=0), extra=dict(cur_nimg=cur_nimg, step=1))

def test_snapshot_files_refuse_another_steps_file(tmp_path, make_tiny_net):
    # The older names called the snapshot at 1024 images network-snapshot-000001.pt: not the step at 1000.
    old = tmp_path / 'network-snapshot-000001.pt'
    tiny_snapshot(old, 1024, make_tiny_net)
    before = old.read_bytes()
    with pytest.raises(FileError, match=r"network-snapshot-000001.pt holds the training step at 1,024 images, not this "
            r"one at 1,000 .*move it out of"):
        snapshot_files(str(tmp_path), 1000)
    assert old.read_bytes() == before
    # The same step may be written again (a resumed run repeats the ticks after its state).
    tiny_snapshot(old, 1000, make_tiny_net)
    assert snapshot_files(str(tmp_path), 1000, grid=True)['snapshot'] == str(old)
    # A grid records no step: its snapshot's stands for it; without one it is refused.
    (tmp_path / 'samples-000001.png').write_bytes(b'png')
    snapshot_files(str(tmp_path), 1000, grid=True)
    (tmp_path / 'samples-000002.png').write_bytes(b'png')
    with pytest.raises(FileError, match='samples-000002.png exists but does not say which training step'):
        snapshot_files(str(tmp_path), 2000, grid=True)
    # A post-hoc EMA profile of another step, and a file that is not ours.
    tiny_snapshot(tmp_path / 'phema-000003-0.050.pt', 3500, make_tiny_net)  # records the step in extra.cur_nimg
    with pytest.raises(FileError, match='phema-000003-0.050.pt holds the training step at 3,500'):
        snapshot_files(str(tmp_path), 3000, stds=[0.05])
    (tmp_path / 'network-snapshot-000004.pt').write_bytes(b'not a snapshot')
    with pytest.raises(FileError, match='network-snapshot-000004.pt exists but does not say'):
        snapshot_files(str(tmp_path), 4000)

def test_state_save_refuses_another_steps_state(tmp_path):
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(net.parameters())
    path = str(tmp_path / state_name(1000))
    CheckpointIO(Progress(cur_nimg=1024, step=4), net, ema, optimizer).save(path, seed=0)  # as the older names did
    before = open(path, 'rb').read()
    with pytest.raises(FileError, match=r'training-state-000001.pt holds the training step at 1,024 images'):
        CheckpointIO(Progress(cur_nimg=1000, step=3), net, ema, optimizer).save(path, seed=0)
    assert open(path, 'rb').read() == before
    CheckpointIO(Progress(cur_nimg=1024, step=4), net, ema, optimizer).save(path, seed=1)  # the same step: replaced
    assert load_training_state(path)['seed'] == 1

def test_the_loop_stops_before_replacing_another_steps_snapshot(tmp_path, tiny_zip, one_thread):
    # A file of another step (here copied by hand) where the first snapshot goes: the loop stops
    # with the one-line error, the file intact.
    os.makedirs(tmp_path / 'a')
    run_loop(tmp_path / 'a', **config(tiny_zip, 0.024))
    os.makedirs(tmp_path / 'b')
    planted = tmp_path / 'b' / 'network-snapshot-000000_008.pt'
    shutil.copy(tmp_path / 'a' / 'network-snapshot-000000_024.pt', planted)
    before = planted.read_bytes()
    with pytest.raises(FileError, match=r'network-snapshot-000000_008.pt holds the training step at 24 images, not '
            r'this one at 8'):
        run_loop(tmp_path / 'b', **config(tiny_zip, 0.024))
    assert planted.read_bytes() == before and not (tmp_path / 'b' / 'samples-000000_008.png').exists()

#----------------------------------------------------------------------------
