"""The paper's tables from one command (training/evaluation/tables.py; its command line is
training/tools/tables.py): shape, values equal to fid.py gen, the result cache across a killed run,
NFE -> steps, one-line errors, and the plots."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

pytest.importorskip('matplotlib')

import fid
from conftest import ROOT, one_line_error, write_image_zip
from fdm.io.network_files import save_snapshot
from torch_utils.errors import EvaluationError
from training.evaluation import feature_stats
from training.evaluation.inception import load_detector
from training.evaluation import fid as evaluation
from training.evaluation import plots
from training.evaluation import tables
from training.tools import tables as tables_cli
from training.data.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# Two tiny runs (EDM and EDM-FDM, snapshots at 1 and 2 kimg) and an FD-digits reference.

def make_run(folder, class_name, make_tiny_net, kimgs=(1, 2), seed=0):
    folder.mkdir()
    for k, kimg in enumerate(kimgs):
        net = make_tiny_net(class_name, label_dim=0, seed=seed + k)
        save_snapshot(folder / f'network-snapshot-{kimg:06d}.pt', net, extra=dict(cur_nimg=kimg * 1000 + 24, step=k))
    (folder / 'training_options.json').write_text(json.dumps(dict(network_kwargs=dict(class_name=class_name))))
    return str(folder)

@pytest.fixture
def runs(tmp_path, make_tiny_net):
    return [make_run(tmp_path / 'run-edm', 'EDMPrecond', make_tiny_net, seed=0),
        make_run(tmp_path / 'run-fdm', 'FDM_EDMPrecond', make_tiny_net, seed=10)]

@pytest.fixture
def ref(tmp_path):
    data = write_image_zip(tmp_path / 'ref.zip', num_images=80, resolution=8, num_classes=0)
    mu, sigma = feature_stats.compute_stats(ImageFolderDataset(data), load_detector('digits'), workers=0, progress=False)
    feature_stats.save_stats(tmp_path / 'ref.npz', mu, sigma)
    return str(tmp_path / 'ref.npz')

SCORING = ['--detector', 'digits', '--seeds', '0-5', '--batch', '4']

def invoke(*args):
    return CliRunner().invoke(tables_cli.main, [str(a) for a in args])

def cells(outdir):
    return json.loads((outdir / 'results.json').read_text())['cells']

# Pixels within a small distance of a line colour (antialiased edges are left out).
def colour_pixels(png, colour):
    rgb = np.asarray(PIL.Image.open(png).convert('RGB')).astype(int)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=2) < 40).sum())

def assert_lines(png, count, size):
    assert PIL.Image.open(png).format == 'PNG' and PIL.Image.open(png).size == size
    for i in range(count):
        assert colour_pixels(png, plots.COLOURS[i]) > 150, f'no line in colour {i}'
    assert colour_pixels(png, plots.COLOURS[count]) < 20  # and no further line

#----------------------------------------------------------------------------

def test_kimg_table_equals_fid_py_gen(tmp_path, runs, ref):
    out = tmp_path / 'out'
    r = invoke('kimg', *runs, '--kimg', '1,2', '--steps', 2, '--ref', ref, *SCORING, '--outdir', out, '--plot-size', '640x400')
    assert r.exit_code == 0, r.output
    table = (out / 'results.md').read_text()
    assert '| Training images (kimg) | EDM | EDM-FDM |\n|---:|---:|---:|\n| 1 | ' in table and '\n| 2 | ' in table
    got = {(c['column'], c['row']): c for c in cells(out)}
    assert sorted(got) == [('EDM', 1.0), ('EDM', 2.0), ('EDM-FDM', 1.0), ('EDM-FDM', 2.0)]
    for (column, row), cell in got.items():
        run = runs[['EDM', 'EDM-FDM'].index(column)]
        snapshot = os.path.join(run, f'network-snapshot-{int(row):06d}.pt')
        assert cell['snapshot'] == snapshot and cell['snapshot_sha256'] == tables.file_sha256(snapshot)
        assert cell['snapshot_kimg'] == row + 0.024 and cell['nfe'] == 3 and cell['seeds'] == ['0-5']
        # fid.py gen's own computation, same seeds and batch: the same number exactly.
        assert cell['fid'] == evaluation.fid_of_network(snapshot, ref, list(range(6)), steps=2, batch=4, detector='digits')
        assert f'{cell["fid"]:.2f}' in table
    # And through fid.py's command line (which prints three decimals, and names the metric of its detector).
    snapshot = got['EDM', 2.0]['snapshot']
    gen = CliRunner().invoke(fid.main, ['gen', '--network', snapshot, '--ref', ref, '--seeds', '0-5', '--steps', '2',
        '--batch', '4', '--detector', 'digits'])
    assert gen.exit_code == 0, gen.output
    assert f"FD-digits {got['EDM', 2.0]['fid']:.3f} from 6 images" in gen.output
    assert_lines(out / 'results.png', 2, (640, 400))

def test_every_snapshot_is_a_row_of_the_images_it_has_seen(tmp_path, runs, ref):
    r = invoke('kimg', runs[0], '--steps', 1, '--ref', ref, *SCORING, '--outdir', tmp_path / 'out')
    assert r.exit_code == 0, r.output
    assert sorted(c['row'] for c in cells(tmp_path / 'out')) == [1.024, 2.024]

def test_three_seed_protocol(tmp_path, runs, ref):
    r = invoke('kimg', runs[0], '--kimg', 2, '--steps', 1, '--protocol', 3, '--ref', ref, *SCORING, '--outdir', tmp_path / 'out')
    assert r.exit_code == 0, r.output
    [cell] = cells(tmp_path / 'out')
    snapshot = os.path.join(runs[0], 'network-snapshot-000002.pt')
    expected = [evaluation.fid_of_network(snapshot, ref, list(range(3 * k, 3 * k + 3)), steps=1, batch=4, detector='digits')
        for k in range(3)]
    assert cell['fids'] == expected and cell['seeds'] == ['0-2', '3-5', '6-8']
    assert cell['fid'] == cell['min'] == min(expected) and cell['mean'] == pytest.approx(np.mean(expected))
    assert cell['std'] == pytest.approx(np.std(expected, ddof=1))

def test_killed_table_recomputes_nothing_stored(tmp_path, runs, ref, monkeypatch):
    real = evaluation.generated_stats
    calls = []
    def counting(*args, **kwargs):
        calls.append(1)
        if kill_after is not None and len(calls) > kill_after:
            raise KeyboardInterrupt  # the process dies during its second evaluation
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluation, 'generated_stats', counting)
    kwargs = dict(kimg=[1, 2], seeds=range(6), steps=2, batch=4, detector='digits', progress=False)
    kill_after = 1
    with pytest.raises(KeyboardInterrupt):
        tables.fid_vs_training(runs, str(tmp_path / 'out'), ref, **kwargs)
    assert len(os.listdir(tmp_path / 'out' / 'cache')) == 1 and not (tmp_path / 'out' / 'results.md').exists()
    calls.clear()
    kill_after = None
    first = tables.fid_vs_training(runs, str(tmp_path / 'out'), ref, **kwargs)
    assert len(calls) == 3  # the stored one is not computed again
    calls.clear()
    again = tables.fid_vs_training(runs, str(tmp_path / 'out'), ref, **kwargs)
    assert calls == [] and [c['fid'] for c in again['cells']] == [c['fid'] for c in first['cells']]
    # Other settings are other results: a new seed range computes all four again.
    tables.fid_vs_training(runs, str(tmp_path / 'out'), ref, **dict(kwargs, seeds=range(1, 7)))
    assert len(calls) == 4

@pytest.mark.slow
def test_sigkill_then_rerun_resumes(tmp_path, runs, ref):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'training.tools.tables', 'kimg', *runs, '--kimg=1,2', '--steps=6', '--ref', ref, *SCORING,
        '--outdir', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    results = lambda: [n for n in os.listdir(out / 'cache') if n.endswith('.json')] if (out / 'cache').is_dir() else []
    with open(tmp_path / 'log.txt', 'wb') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not results():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / 'log.txt').read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stored = len(results())
    # Besides the stored results, at most the temporary file of a write the kill interrupted.
    assert 1 <= stored < 4 and all(n.startswith('.tmp-') for n in os.listdir(out / 'cache') if not n.endswith('.json'))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'{stored} of 4 evaluations found in' in done.stdout and len(results()) == 4

def test_nfe_gives_the_step_counts():
    assert [tables.steps_for_nfe('edm', n) for n in (25, 49, 79)] == [13, 25, 40]
    assert [tables.steps_for_nfe('dpm', n) for n in (25, 49, 79)] == [25, 49, 79]
    assert tables.steps_for_nfe('euler', 10) == 10 and tables.steps_for_nfe('heun', 35) == 18
    with pytest.raises(EvaluationError, match='only odd NFE are possible; use 23 or 25'):
        tables.steps_for_nfe('edm', 24)

def test_nfe_tables(tmp_path, runs, ref):
    snapshots = [os.path.join(run, 'network-snapshot-000002.pt') for run in runs]
    out = tmp_path / 'out'
    r = invoke('nfe', *snapshots, '--nfe', '3,5', '--solver', 'edm,dpm', '--ref', ref, *SCORING, '--outdir', out)
    assert r.exit_code == 0, r.output
    got = {(c['solver'], c['column'], c['row']): c for c in cells(out)}
    assert len(got) == 8
    for (solver, _column, nfe), cell in got.items():
        assert cell['nfe'] == nfe and cell['num_steps'] == {'edm': (nfe + 1) // 2, 'dpm': nfe}[solver]
    text = (out / 'results.md').read_text()
    assert text.count('| NFE | EDM | EDM-FDM |') == 2 and 'EDM Heun sampler (3 NFE = 2 steps, 5 NFE = 3 steps)' in text
    assert 'DPM-Solver++ sampler (3 NFE = 3 steps, 5 NFE = 5 steps)' in text
    # The EDM cell at 3 NFE is fid.py gen with 2 steps.
    assert got['edm', 'EDM', 3]['fid'] == evaluation.fid_of_network(snapshots[0], ref, list(range(6)), steps=2, batch=4,
        detector='digits')
    assert_lines(out / 'results.png', 2, (800, 500))
    line = one_line_error(invoke('nfe', *snapshots, '--nfe', '4', '--ref', ref, *SCORING, '--outdir', tmp_path / 'o2'))
    assert 'only odd NFE' in line and not (tmp_path / 'o2').exists()

def test_damaged_or_missing_snapshots_are_one_line_errors(tmp_path, runs, ref):
    out = tmp_path / 'out'
    args = ['--steps', 2, '--ref', ref, *SCORING, '--outdir', out]
    line = one_line_error(invoke('kimg', *runs, '--kimg', '1,50', *args))
    assert runs[0] in line and 'no snapshot within 5% of 50 kimg' in line
    line = one_line_error(invoke('kimg', *runs, tmp_path / 'nowhere', *args))
    assert 'nowhere: no such run folder' in line
    damaged = os.path.join(runs[1], 'network-snapshot-000002.pt')
    data = open(damaged, 'rb').read()
    open(damaged, 'wb').write(data[:len(data) // 2])
    line = one_line_error(invoke('kimg', *runs, '--kimg', '1,2', *args))
    assert damaged in line and 'damaged' in line
    line = one_line_error(invoke('nfe', tmp_path / 'nope.pt', '--nfe', 3, '--ref', ref, *SCORING, '--outdir', out))
    assert 'nope.pt: no such snapshot file' in line
    assert not out.exists()  # nothing written for a table that cannot be made

def test_without_matplotlib_tables_are_written_and_curves_say_what_to_install(tmp_path, runs, ref, monkeypatch):
    for module in ('matplotlib.figure', 'matplotlib.backends.backend_agg'):  # None in sys.modules: the import fails
        monkeypatch.setitem(sys.modules, module, None)
    r = invoke('kimg', runs[0], '--kimg', 1, '--steps', 1, '--ref', ref, *SCORING, '--outdir', tmp_path / 'out')
    assert r.exit_code == 0, r.output
    assert 'results.png not drawn' in r.output and 'pip install matplotlib' in r.output
    assert (tmp_path / 'out' / 'results.md').exists() and not (tmp_path / 'out' / 'results.png').exists()
    write_stats(runs[0], [(0.064, 1.0)])
    assert 'pip install matplotlib' in one_line_error(invoke('curves', runs[0], '--out', tmp_path / 'c.png'))

#----------------------------------------------------------------------------
# Training curves: stats.jsonl as the training loop writes it (see _report_tick).

def write_stats(run, points, tail=''):
    with open(os.path.join(run, 'stats.jsonl'), 'w') as f:
        for kimg, loss in points:
            f.write(json.dumps({'Loss/loss': dict(num=64.0, mean=loss, std=0.1), 'timestamp': 0.0,
                'Progress/kimg': dict(num=1, mean=kimg, std=0.0), 'Progress/lr': dict(num=1, mean=1e-3, std=0.0)}) + '\n')
        f.write(tail)

def test_curves_count_a_repeated_tick_once(tmp_path, runs):
    # A resume from the state at 1.088 kimg repeats the ticks after it; the later lines win.
    write_stats(runs[0], [(0.064, 1.5), (1.088, 1.2), (2.112, 1.0), (2.112, 0.9), (3.136, 0.8)], tail='{"Loss/lo')
    write_stats(runs[1], [(0.064, 1.4), (1.088, 1.1), (2.112, 0.7)])
    entries = tables.read_stats(os.path.join(runs[0], 'stats.jsonl'))
    assert sorted(entries) == [0.064, 1.088, 2.112, 3.136] and entries[2.112]['Loss/loss']['mean'] == 0.9
    out = tmp_path / 'curves.png'
    r = invoke('curves', *runs, '--stat', 'Loss/loss', '--stat', 'Progress/lr', '--out', out, '--plot-size', '500x600')
    assert r.exit_code == 0, r.output
    assert_lines(out, 2, (500, 600))
    line = one_line_error(invoke('curves', *runs, '--stat', 'Loss/nope', '--out', tmp_path / 'x.png'))
    assert 'Loss/nope' in line and 'Loss/loss' in line and not (tmp_path / 'x.png').exists()

@pytest.mark.slow
def test_curves_of_a_real_tiny_run(tmp_path, tiny_zip, one_thread):
    from helpers import loop_config
    from helpers import run_loop
    run = tmp_path / 'run'
    run.mkdir()
    run_loop(run_dir=str(run), **loop_config(tiny_zip))
    out = tmp_path / 'curves.png'
    assert tables.training_curves([str(run)], str(out), stats=('Loss/loss',)) == ['run']
    assert_lines(out, 1, (800, 500))

#----------------------------------------------------------------------------
