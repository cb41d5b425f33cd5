"""Metrics at every snapshot while training (train.py --metrics, training/evaluation/snapshot_metrics.py):
the value recorded is fid.py gen's on that snapshot, the kimg table reuses it, a resumed run
continues the curve without computing it again, and a bad reference is refused before the run
folder exists. FD-digits on tiny networks, 16 (or 8) images per evaluation."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from conftest import free_port, one_line_error, run_train_cli, write_image_zip
from helpers import assert_same_state, join_gloo, loop_config
from training.config import start_of
from training.data.dataset import ImageFolderDataset
from training.evaluation import feature_stats
from training.evaluation import fid as evaluation
from training.evaluation import tables
from training.evaluation.inception import load_detector
from training.evaluation.snapshot_metrics import open_metrics
from training.tools import tables as tables_cli
from training.training_loop import training_loop

NUM_IMAGES = 16
STAT = 'Metrics/fd-digits'

def make_ref(data, path):
    mu, sigma = feature_stats.compute_stats(ImageFolderDataset(data), load_detector('digits'), workers=0, progress=False)
    feature_stats.save_stats(path, mu, sigma)
    return str(path)

def train(run_dir, data, metrics=None, **overrides):
    """The tiny loop, 4 steps of 8 images: ticks at 8, 24 and 32 images, snapshots at 8 and 32 (tick 0 and the last)."""
    c = loop_config(data, total_kimg=0.032, snapshot_ticks=2, state_dump_ticks=None, **overrides)
    start = start_of(c)
    start.metrics = metrics
    os.makedirs(run_dir, exist_ok=True)
    return training_loop(run_dir=str(run_dir), start=start, **c)

def stats_of(run_dir):
    return tables.read_stats(os.path.join(run_dir, 'stats.jsonl'))

class Board:
    """A TensorBoard writer that records its scalars."""
    def __init__(self, *_args, **_kwargs):
        self.scalars = []

    def add_scalar(self, name, value, global_step):
        self.scalars.append((name, value, global_step))

    def flush(self):
        pass

    def close(self):
        pass

# Generator calls of fid.py gen's computation: every FID computed rather than read from a cache.
@pytest.fixture
def count_evaluations(monkeypatch):
    calls = []
    real = evaluation.generated_stats
    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluation, 'generated_stats', counting)
    return calls

# One run with FD-digits at every snapshot (and TensorBoard on), shared by the first tests: its
# folder, dataset, reference, the loop's result, its output and the TensorBoard scalars.
@pytest.fixture(scope='module')
def scored_run(tmp_path_factory):
    import training.training_loop as loop
    folder = tmp_path_factory.mktemp('scored')
    data = write_image_zip(folder / 'tiny.zip')
    ref = make_ref(data, folder / 'ref.npz')
    board, output = Board(), io.StringIO()
    real_open_writer = loop.open_writer
    loop.open_writer, threads = (lambda _log_dir: board), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(output):
            result = train(folder / 'run', data, open_metrics('fd-digits', ref, NUM_IMAGES), tensorboard=True)
    finally:
        loop.open_writer = real_open_writer
        torch.set_num_threads(threads)
    return dict(run=str(folder / 'run'), data=data, ref=ref, result=result, output=output.getvalue(), board=board)

#----------------------------------------------------------------------------

def test_recorded_value_is_fid_py_gen_of_the_snapshot(scored_run, tmp_path, one_thread):
    run, ref = scored_run['run'], scored_run['ref']
    stats = stats_of(run)
    scored = {kimg: entry[STAT]['mean'] for kimg, entry in stats.items() if STAT in entry}
    assert sorted(stats) == [0.008, 0.024, 0.032] and sorted(scored) == [0.008, 0.032]
    for kimg, value in scored.items():
        snapshot = os.path.join(run, f'network-snapshot-000000_{round(kimg * 1000):03d}.pt')
        # fid.py gen's own computation with its defaults (18 Heun steps, batch 64, fp32), on the file:
        # the same images and features; only float rounding of another copy of the weights could differ.
        expected = evaluation.fid_of_network(snapshot, ref, list(range(NUM_IMAGES)), detector='digits')
        assert value == pytest.approx(expected, rel=1e-6, abs=1e-9), kimg
    assert len(set(scored.values())) == 2  # the network changed between snapshots: the equality means something
    # TensorBoard got the same values at the images seen.
    board = [(step, value) for name, value, step in scored_run['board'].scalars if name == STAT]
    assert board == [(round(k * 1000), v) for k, v in sorted(scored.items())]
    # Scoring changes nothing in the training (its own generators, precision switches restored).
    plain = train(tmp_path / 'plain', scored_run['data'])
    assert_same_state(plain['ema'].state_dict(), scored_run['result']['ema'].state_dict())

def test_tick_line_shows_the_metric_and_its_time(scored_run):
    ticks = [line for line in scored_run['output'].splitlines() if line.startswith('tick ')]
    stats = stats_of(scored_run['run'])
    assert len(ticks) == 3 and 'fd-digits' not in ticks[1] and 'metrics ' not in ticks[1], ticks  # no snapshot at tick 1
    for line, kimg in [(ticks[0], 0.008), (ticks[2], 0.032)]:
        value, seconds = stats[kimg][STAT]['mean'], stats[kimg]['Timing/metrics_sec']['mean']
        assert f'fd-digits {value:<8.3f}' in line and f'metrics {seconds:<6.1f}' in line and seconds > 0, line
    assert 'Timing/metrics_sec' not in stats[0.024]

def test_kimg_table_reuses_the_runs_evaluations(scored_run, tmp_path, count_evaluations, one_thread):
    out = tmp_path / 'table'
    r = CliRunner().invoke(tables_cli.main, ['kimg', scored_run['run'], '--ref', scored_run['ref'], '--detector', 'digits',
        '--seeds', f'0-{NUM_IMAGES - 1}', '--outdir', str(out)])
    assert r.exit_code == 0, r.output
    assert count_evaluations == [] and os.listdir(out / 'cache') == []  # nothing computed, nothing stored again
    cells = {c['row']: c['fid'] for c in json.loads((out / 'results.json').read_text())['cells']}
    stats = stats_of(scored_run['run'])
    assert cells == {kimg: entry[STAT]['mean'] for kimg, entry in stats.items() if STAT in entry}
    # Other seeds are another evaluation: computed by the table, into its own cache.
    r = CliRunner().invoke(tables_cli.main, ['kimg', scored_run['run'], '--kimg', '0.032', '--ref', scored_run['ref'],
        '--detector', 'digits', '--seeds', '0-3', '--outdir', str(out)])
    assert r.exit_code == 0, r.output
    assert len(count_evaluations) == 1 and len(os.listdir(out / 'cache')) == 1

#----------------------------------------------------------------------------
# Two gloo processes: each samples and extracts its share of the seeds; every rank gets rank 0's values.

def _scored_worker(rank, world, port, data, ref, run_dir, out):
    join_gloo(rank, world, port)
    import training.training_loop as loop
    seen = []
    real = loop._score_snapshot
    def recording(*args):
        scores = real(*args)
        seen.append(scores['values'])
        return scores
    loop._score_snapshot = recording
    train(run_dir, data, open_metrics('fd-digits', ref, NUM_IMAGES))
    with open(os.path.join(out, f'scores{rank}.json'), 'w') as f:
        json.dump(seen, f)
    torch.distributed.destroy_process_group()

@pytest.mark.slow
def test_two_processes_record_fid_py_gen_of_the_snapshot(scored_run, tmp_path, one_thread):
    os.makedirs(tmp_path / 'run')
    mp.start_processes(_scored_worker, args=(2, free_port(), scored_run['data'], scored_run['ref'], str(tmp_path / 'run'),
        str(tmp_path)), nprocs=2, start_method='spawn')
    ranks = [json.loads((tmp_path / f'scores{rank}.json').read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 2  # both snapshots, the same values on both ranks
    two = {kimg: entry[STAT]['mean'] for kimg, entry in stats_of(tmp_path / 'run').items() if STAT in entry}
    assert sorted(two) == [0.008, 0.032] and [v[STAT] for v in ranks[0]] == [two[k] for k in sorted(two)]
    # Each value is fid.py gen's on that snapshot in one process: the processes' shares of the seeds
    # (8 each, not one batch of 16) give the same images up to float rounding (measured: 2.3e-8 relative).
    for kimg, value in two.items():
        snapshot = str(tmp_path / 'run' / f'network-snapshot-000000_{round(kimg * 1000):03d}.pt')
        expected = evaluation.fid_of_network(snapshot, scored_run['ref'], list(range(NUM_IMAGES)), detector='digits')
        assert value == pytest.approx(expected, rel=1e-5), kimg

#----------------------------------------------------------------------------
# train.py: metrics turned on when a run is resumed, then the run resumed again from an older state.

def tiny_args(run, data, *extra, steps=4):
    """A tick and a snapshot every step of 8 images; a training state every 2 ticks and at the end."""
    return ['--outdir', str(run), '--nosubdir', '--data', data, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        f'--duration={steps * 8 / 1e6}', '--tick=0.008', '--snap=1', '--dump=2', '--workers=0', '--seed=3',
        '--grid-images=0', '--warmup_ite=10', *extra]

def test_resumed_run_continues_the_curve_without_recomputing(tmp_path, tiny_zip, count_evaluations, one_thread):
    run, ref = tmp_path / 'run', make_ref(tiny_zip, tmp_path / 'ref.npz')
    assert run_train_cli(*tiny_args(run, tiny_zip)).exit_code == 0
    assert count_evaluations == [] and not (run / 'evaluations').exists()
    # A kill after the last snapshot and before its state: resumed from 24 images, with metrics now on.
    (run / 'training-state-000000_032.pt').unlink()
    r = run_train_cli('--resume', run, '--metrics=fd-digits', f'--metric-ref={ref}', '--metric-images=8')
    assert r.exit_code == 0, r.output
    assert len(count_evaluations) == 1  # the snapshot at 32 images; the one at the resume point is not made again
    value = stats_of(run)[0.032][STAT]['mean']
    # The same again, with the run's own options (command.json now holds the metrics): found, not computed.
    (run / 'training-state-000000_032.pt').unlink()
    r = run_train_cli('--resume', run)
    assert r.exit_code == 0, r.output
    assert len(count_evaluations) == 1 and '1 of 1 evaluations found in' in r.output
    stats = stats_of(run)
    assert stats[0.032][STAT]['mean'] == value and STAT not in stats[0.024]
    assert sum(STAT in json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()) == 2

#----------------------------------------------------------------------------
# Refused before the run folder exists, in one line.

REFUSALS = [
    (['--metrics=fd-digits'], 'needs 1 --metric-ref file(s)'),
    (['--metrics=fd-digits', '--metric-ref={tmp}/missing.npz'], 'missing.npz'),
    (['--metrics=fd-digits', '--metric-ref={tmp}/wrong.npz'], "has 3-dimensional statistics but the detector 'digits' gives 64"),
    (['--metrics=fd-digits,fid', '--metric-ref={tmp}/ref.npz'], 'needs 2 --metric-ref file(s)'),
    (['--metrics=inception', '--metric-ref={tmp}/ref.npz'], 'give different metrics among fid, fd-digits, fd-dinov2'),
    (['--metrics=fd-digits', '--metric-ref={tmp}/ref.npz', '--metric-images=1'], '--metric-images'),
]

@pytest.mark.parametrize('extra, message', REFUSALS, ids=[m.split()[0] for _e, m in REFUSALS])
def test_bad_metric_options_are_refused_before_the_run_folder(tmp_path, tiny_zip, extra, message):
    make_ref(tiny_zip, tmp_path / 'ref.npz')
    feature_stats.save_stats(tmp_path / 'wrong.npz', np.zeros(3), np.eye(3))
    run = tmp_path / 'out' / 'run'
    line = one_line_error(run_train_cli(*tiny_args(run, tiny_zip, *[e.format(tmp=tmp_path) for e in extra])))
    assert message in line, line
    assert not (tmp_path / 'out').exists()
