"""generate.py's output folder: a rerun of a killed run makes only the missing seeds, and the
finished folder equals an uninterrupted run's byte for byte; a folder of other images is refused
in one line and left exactly as it was."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import generate
from conftest import ROOT, free_port, one_line_error
from fdm.io.network_files import save_snapshot
from training.evaluation import generation

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

@pytest.fixture(scope='module')
def nets(tmp_path_factory, make_tiny_net):
    """Two conditional tiny networks of other weights, as snapshot files."""
    folder = tmp_path_factory.mktemp('nets')
    paths = []
    for seed in (0, 1):
        path = str(folder / f'net{seed}.pt')
        save_snapshot(path, make_tiny_net(seed=seed).requires_grad_(False))
        paths.append(path)
    return paths

def run(*args):
    return CliRunner().invoke(generate.main, [str(a) for a in args] + ['--device', 'cpu'])

def sha256(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()

def snapshot(folder):
    """{relative path: (SHA-256, inode, mtime)} of every file below `folder`: a file rewritten, even with
    the same bytes, gets a new inode (the writer renames a new file over it)."""
    found = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (sha256(path), st.st_ino, st.st_mtime_ns)
    return found

class Killed(Exception):
    pass

REAL_GENERATE_BATCH = generation.generate_batch

def spy_batches(monkeypatch, kill_at=None):
    """Record the seeds of every batch generate_batch samples; raise Killed at call `kill_at` (0-based)."""
    calls = []
    def spy(*args, **kwargs):
        if len(calls) == kill_at:
            raise Killed()
        calls.append(list(args[3]))
        return REAL_GENERATE_BATCH(*args, **kwargs)
    monkeypatch.setattr(generation, 'generate_batch', spy)
    return calls

#----------------------------------------------------------------------------
# Resuming.

def test_a_killed_run_is_finished_by_rerunning_the_command(nets, tmp_path, monkeypatch):
    opts = ['--network', nets[0], '--seeds', '0-11', '--batch', 3, '--steps', 2, '--S_churn', 10]
    assert run(*opts, '--outdir', tmp_path / 'whole').exit_code == 0
    whole = snapshot(tmp_path / 'whole')

    # Killed while sampling the third batch: the first two batches are on disk. Seed 4 is removed
    # too, as if the kill had come between two PNGs of the second batch.
    calls = spy_batches(monkeypatch, kill_at=2)
    result = run(*opts, '--outdir', tmp_path / 'resumed')
    assert isinstance(result.exception, Killed) and calls == [[0, 1, 2], [3, 4, 5]]
    os.remove(tmp_path / 'resumed' / '000004.png')
    before = snapshot(tmp_path / 'resumed')
    assert sorted(before) == ['000000.png', '000001.png', '000002.png', '000003.png', '000005.png', 'generate_options.json']

    # The rerun samples the batches of an uninterrupted run that miss a seed, and writes only the
    # missing PNGs: the others keep their inode and mtime.
    calls = spy_batches(monkeypatch)
    result = run(*opts, '--outdir', tmp_path / 'resumed')
    assert result.exit_code == 0, result.output
    assert calls == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert '5 of 12 images are already in' in result.output and 'generating the other 7' in result.output
    after = snapshot(tmp_path / 'resumed')
    assert {name: after[name] for name in before} == before
    # The finished folder: the uninterrupted run's bytes, generate_options.json included.
    assert {name: digest for name, (digest, _, _) in after.items()} == {name: digest for name, (digest, _, _) in whole.items()}

    # Once complete, a rerun samples nothing and changes nothing.
    calls = spy_batches(monkeypatch)
    result = run(*opts, '--outdir', tmp_path / 'resumed')
    assert result.exit_code == 0 and calls == [] and 'All 12 images are already in' in result.output
    assert snapshot(tmp_path / 'resumed') == after

def test_another_batch_size_resumes_too(nets, tmp_path, monkeypatch):
    # --batch changes at most the float rounding of a few pixels, so it is not a difference; the
    # folder's generate_options.json stays that of the run that began it.
    opts = ['--network', nets[0], '--outdir', tmp_path, '--seeds', '0-3', '--steps', 2]
    assert run(*opts, '--batch', 2).exit_code == 0
    options = (tmp_path / 'generate_options.json').read_bytes()
    png3 = (tmp_path / '000003.png').read_bytes()
    os.remove(tmp_path / '000003.png')
    calls = spy_batches(monkeypatch)
    result = run(*opts, '--batch', 4)
    assert result.exit_code == 0, result.output
    assert calls == [[0, 1, 2, 3]] and (tmp_path / 'generate_options.json').read_bytes() == options
    assert json.loads(options)['max_batch_size'] == 2
    # Sampled in a batch of 4 instead of 2: equal up to the CPU kernels' rounding (one level at most).
    assert np.abs(np.asarray(PIL.Image.open(tmp_path / '000003.png')).astype(int) - np.asarray(PIL.Image.open(io.BytesIO(png3)))).max() <= 1

def test_damaged_pngs_are_made_again(nets, tmp_path):
    # PNGs are not fsynced: after a power cut one may be empty or cut short. Only whole ones count.
    assert run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-4', '--steps', 2).exit_code == 0
    whole = (tmp_path / '000001.png').read_bytes()
    (tmp_path / '000001.png').write_bytes(whole[:len(whole) // 2])
    (tmp_path / '000002.png').write_bytes(b'')
    (tmp_path / '000003.png').write_bytes(bytes(len(whole)))  # zeros, as a lost write may leave
    assert generation.saved_seeds(str(tmp_path), [0, 1, 2, 3, 4, 9], False).tolist() == [True, False, False, False, True, False]
    assert run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-4', '--steps', 2).exit_code == 0
    assert (tmp_path / '000001.png').read_bytes() == whole
    assert generation.saved_seeds(str(tmp_path), range(5), False).all()

@pytest.mark.slow
def test_two_processes_resume_a_folder(nets, tmp_path):
    # torchrun-style: rank 0 lists the folder and both ranks sample the batches of an uninterrupted
    # two-process run that miss a seed (here [0, 1] on rank 0 and [5] on rank 1); no PNG is written twice.
    opts = ['--network', nets[0], '--seeds', '0-5', '--steps', 2, '--batch', 2]
    assert run(*opts, '--outdir', tmp_path / 'one').exit_code == 0
    assert run(*opts, '--outdir', tmp_path / 'two').exit_code == 0
    for seed in (1, 5):
        os.remove(tmp_path / 'two' / f'{seed:06d}.png')
    before = snapshot(tmp_path / 'two')
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'generate.py'), *map(str, opts), '--outdir',
            str(tmp_path / 'two'), '--device', 'cpu'], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert '4 of 6 images are already in' in outputs[0] and 'already in' not in outputs[1]  # rank 0 speaks
    after = snapshot(tmp_path / 'two')
    assert {name: after[name] for name in before} == before and sorted(after) == sorted(snapshot(tmp_path / 'one'))
    # Seed 1 comes from the batch [0, 1] as in one process: the same bytes. Seed 5 from a batch of
    # one ([4, 5] in one process): equal up to the CPU kernels' rounding (one level at most).
    assert after['000001.png'][0] == sha256(tmp_path / 'one' / '000001.png')
    pixels = [np.asarray(PIL.Image.open(tmp_path / d / '000005.png')).astype(int) for d in ('one', 'two')]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1

#----------------------------------------------------------------------------
# Refusals: one line naming what differs, and not one file changed.

# A folder of seeds 0-3 made by net0 with EDM Heun, 2 steps, random classes, fp32 on the CPU.
@pytest.fixture(scope='module')
def made(nets, tmp_path_factory):
    folder = tmp_path_factory.mktemp('made') / 'out'
    assert run('--network', nets[0], '--outdir', folder, '--seeds', '0-3', '--steps', 2).exit_code == 0
    return folder

REMEDY = 'choose another --outdir or delete it'

@pytest.mark.parametrize('case', ['network', 'steps', 'solver', 'seeds', 'class', 'subdirs', 'precision', 'two'])
def test_a_folder_of_other_images_is_refused_and_unchanged(nets, made, tmp_path, case):
    out = tmp_path / 'out'
    shutil.copytree(made, out)
    before = snapshot(out)
    changed, expected = {
        'network': ({'--network': nets[1]}, f'another network (sha256 {sha256(nets[0])[:12]}.., this run {sha256(nets[1])[:12]}..)'),
        'steps': ({'--steps': 3}, 'other sampler settings (num_steps 2, this run 3)'),
        'solver': ({'--solver': 'dpm'}, 'another sampler (edm, this run dpm)'),
        'seeds': ({'--seeds': '0-7'}, 'other seeds (0-3, this run 0-7)'),
        'class': ({'--class': 2}, 'another class (random, this run 2)'),
        'subdirs': ({'--subdirs': None}, 'another layout (no --subdirs, this run --subdirs)'),
        'precision': ({'--precision': 'bf16'}, 'another precision (fp32, this run bf16)'),
        'two': ({'--steps': 3, '--class': 1}, 'other sampler settings (num_steps 2, this run 3) and another class (random, this run 1)'),
    }[case]
    opts = {'--network': nets[0], '--seeds': '0-3', '--steps': 2, **changed}
    result = run('--outdir', out, *[x for name, value in opts.items() for x in ([name] if value is None else [name, value])])
    remedy = f'rerun with --seeds=0-3 to complete it, or {REMEDY}' if case == 'seeds' else REMEDY
    assert one_line_error(result) == f"Error: --outdir '{out}' holds images of {expected}; {remedy}"
    assert 'Generating' not in result.output
    assert snapshot(out) == before

def test_the_device_type_counts(nets, made, tmp_path):
    # CUDA and CPU generators draw different noise: a folder made on a GPU is not continued on the CPU.
    out = tmp_path / 'out'
    shutil.copytree(made, out)
    options = json.loads((out / 'generate_options.json').read_text())
    (out / 'generate_options.json').write_text(json.dumps(dict(options, device='cuda')))
    before = snapshot(out)
    result = run('--network', nets[0], '--outdir', out, '--seeds', '0-3', '--steps', 2)
    assert one_line_error(result) == f"Error: --outdir '{out}' holds images of another device type (cuda, this run cpu); {REMEDY}"
    assert snapshot(out) == before

def test_folders_that_cannot_be_matched_are_refused(nets, made, tmp_path):
    opts = ['--network', nets[0], '--seeds', '0-3', '--steps', 2]
    # Images without generate_options.json (a folder of another program, or copied by hand).
    foreign = tmp_path / 'foreign'
    shutil.copytree(made, foreign)
    os.remove(foreign / 'generate_options.json')
    before = snapshot(foreign)
    assert one_line_error(run(*opts, '--outdir', foreign)) == (f"Error: --outdir '{foreign}' holds images but no "
        f"generate_options.json, so what made them is unknown; {REMEDY}")
    assert snapshot(foreign) == before
    # generate_options.json of an older version, without the network's digest.
    older = tmp_path / 'older'
    shutil.copytree(made, older)
    options = json.loads((older / 'generate_options.json').read_text())
    del options['network_sha256']
    (older / 'generate_options.json').write_text(json.dumps(options))
    before = snapshot(older)
    assert one_line_error(run(*opts, '--outdir', older)) == (f"Error: --outdir '{older}' holds a generate_options.json "
        f"without the network's digest (from an older version), so its images cannot be matched to this run; {REMEDY}")
    assert snapshot(older) == before
    # A damaged generate_options.json.
    damaged = tmp_path / 'damaged'
    shutil.copytree(made, damaged)
    (damaged / 'generate_options.json').write_text('{"network": ')
    before = snapshot(damaged)
    message = one_line_error(run(*opts, '--outdir', damaged))
    assert message.startswith(f"Error: --outdir '{damaged}': its generate_options.json cannot be read (JSONDecodeError: ")
    assert message.endswith(REMEDY) and snapshot(damaged) == before

def test_options_are_recorded_before_the_first_image(nets, tmp_path, monkeypatch):
    # Killed on the first batch: the folder holds generate_options.json only, naming the network by
    # its digest; another run into it is refused, the same one proceeds.
    spy_batches(monkeypatch, kill_at=0)
    assert isinstance(run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-3', '--steps', 2).exception, Killed)
    assert os.listdir(tmp_path) == ['generate_options.json']
    options = json.loads((tmp_path / 'generate_options.json').read_text())
    assert options['network_sha256'] == sha256(nets[0]) and options['network'] == nets[0]
    assert (options['sampler'], options['seeds'], options['class_idx'], options['subdirs'], options['precision'], options['device']) == (
        'edm', '0-3', None, False, 'fp32', 'cpu')
    monkeypatch.undo()
    result = run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-5', '--steps', 2)
    assert one_line_error(result) == (f"Error: --outdir '{tmp_path}' holds the generate_options.json of other seeds "
        f"(0-3, this run 0-5); rerun with --seeds=0-3 to complete it, or {REMEDY}")
    assert run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-3', '--steps', 2).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ['000000.png', '000001.png', '000002.png', '000003.png', 'generate_options.json']

def test_a_network_passed_as_an_object_is_named_by_its_parameters(nets, tmp_path, make_tiny_net):
    net = make_tiny_net(seed=0).requires_grad_(False)
    generation.generate(net, tmp_path, seeds=range(2), num_steps=1, device='cpu', verbose=False)
    generation.generate(make_tiny_net(seed=0), tmp_path, seeds=range(2), num_steps=1, device='cpu', verbose=False)
    with pytest.raises(generation.EvaluationError, match='holds images of another network'):
        generation.generate(make_tiny_net(seed=1), tmp_path, seeds=range(2), num_steps=1, device='cpu', verbose=False)

#----------------------------------------------------------------------------
# The progress bar counts images.

def test_progress_bar_counts_images(nets, tmp_path):
    result = run('--network', nets[0], '--outdir', tmp_path, '--seeds', '0-6', '--batch', 3, '--steps', 1)
    assert result.exit_code == 0, result.output
    assert '7/7' in result.stderr and 'img' in result.stderr and 'batch' not in result.stderr
