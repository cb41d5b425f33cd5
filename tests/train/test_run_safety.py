"""Output paths checked before any work, appends that fail whole, and runs that cannot trample
each other: one run folder, one train.py; --desc stays inside --outdir; a run that fails before
training leaves no empty folder."""

import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import dataset_tool
import fid
import generate
import training.data.writer
from conftest import ROOT, one_line_error, run_train_cli, write_image_zip
from fdm.io.network_files import save_snapshot
from torch_utils.io import files as fileio

def tiny_args(out, data, *extra, steps=2):
    return ['--outdir', str(out), '--data', data, '--cond=1', '--cbase=8', '--cres=1', '--batch=8',
        f'--duration={steps * 8 / 1e6}', '--tick=0.008', '--workers=0', '--seed=3', '--grid-images=0',
        '--warmup_ite=10', *extra]

def listing(folder):
    return sorted(os.listdir(folder))

#----------------------------------------------------------------------------
# 1. The one destination check: nothing is created, and each bad path is one sentence.

def test_check_destination(tmp_path):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'dir').mkdir()
    fileio.check_destination(tmp_path / 'new' / 'deeper' / 'out.png', '--grid')  # folders that can be made
    fileio.check_destination(tmp_path / 'dir', '--outdir', folder=True)
    fileio.check_destination(tmp_path / 'file', '--grid')  # replaced atomically
    fileio.check_destination(tmp_path / 'file', 'log.txt', append=True)
    cases = [((tmp_path / 'dir', '--grid'), "--grid '.*dir' is a folder, not a file"),
        ((tmp_path / 'file', '--outdir', True), "--outdir '.*file' is a file, not a folder"),
        ((tmp_path / 'file' / 'sub' / 'g.png', '--grid'), "--grid '.*g.png' lies below '.*file', which is a file"),
        (('', '--dest'), '--dest is empty')]
    for args, message in cases:
        with pytest.raises(fileio.FileError, match=message):
            fileio.check_destination(*args)
    assert listing(tmp_path) == ['dir', 'file'] and listing(tmp_path / 'dir') == []

#----------------------------------------------------------------------------
# 2. Each script checks its outputs before the expensive work.

@pytest.fixture
def net_file(tmp_path, make_tiny_net):
    path = tmp_path / 'net.pt'
    save_snapshot(str(path), make_tiny_net(label_dim=0))
    return str(path)

@pytest.mark.parametrize('case', ['grid-below-file', 'grid-is-folder', 'outdir-below-file', 'outdir-is-file'])
def test_generate_checks_outputs_before_sampling(tmp_path, net_file, case):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'folder').mkdir()
    outdir, grid = tmp_path / 'out', tmp_path / 'g.png'
    outdir, grid, fragment = {
        'grid-below-file': (outdir, tmp_path / 'file' / 'g.png', "--grid '.*' lies below"),
        'grid-is-folder': (outdir, tmp_path / 'folder', "--grid '.*folder' is a folder"),
        'outdir-below-file': (tmp_path / 'file' / 'out', grid, "--outdir '.*' lies below"),
        'outdir-is-file': (tmp_path / 'file', grid, "--outdir '.*file' is a file")}[case]
    result = CliRunner().invoke(generate.main, ['--network', net_file, '--outdir', str(outdir), '--grid', str(grid),
        '--seeds', '0-1', '--steps', '2', '--device', 'cpu'])
    assert re.search(fragment, one_line_error(result)), result.output
    assert 'Generating' not in result.output  # nothing sampled
    assert not (tmp_path / 'out').exists() and listing(tmp_path / 'folder') == []

def test_fid_ref_checks_dest_before_reading_images(tmp_path):
    (tmp_path / 'file').write_text('x')
    data = write_image_zip(tmp_path / 'data.zip', num_classes=0)
    # No detector exists: the destination must be refused before the detector is even looked at.
    result = CliRunner().invoke(fid.main, ['ref', '--data', data, '--dest', str(tmp_path / 'file' / 'ref.npz'),
        '--detector', str(tmp_path / 'no-detector.pt'), '--workers', '0'])
    assert "--dest '" in one_line_error(result) and 'which is a file' in one_line_error(result), result.output
    assert listing(tmp_path) == ['data.zip', 'file']

@pytest.mark.parametrize('name', ['out.zip', 'out'])
def test_dataset_tool_checks_dest_before_reading_the_source(tmp_path, monkeypatch, name):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'src').mkdir()
    opened = []
    monkeypatch.setattr(training.data.writer, 'open_source', lambda *args: opened.append(args) or (0, []))
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'file' / name)])
    assert 'which is a file, not a folder' in one_line_error(result)
    assert opened == [] and listing(tmp_path) == ['file', 'src']

#----------------------------------------------------------------------------
# 3. train.py: a folder where a run file goes is refused before anything is written; a full
#    disk during an append leaves no partial line and stops the run with one line.

@pytest.mark.parametrize('name', ['log.txt', 'stats.jsonl', 'samples-000000.png', 'network-snapshot-000000.pt'])
def test_folder_in_place_of_a_run_file_is_refused_before_training(tmp_path, tiny_zip, name):
    run = tmp_path / 'run'
    os.makedirs(run / name)
    message = one_line_error(run_train_cli(*tiny_args(run, tiny_zip, '--nosubdir', '--grid-images=4')))
    assert name in message and 'is a folder' in message
    assert listing(run) == [name]  # no options, no log, no snapshot, no lock

def _train_with_file_limit(run, data, limit, *extra):
    set_limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    proc = subprocess.run([sys.executable, 'train.py', *tiny_args(run, data, '--nosubdir', *extra)], cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, preexec_fn=set_limit, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error')]
    assert proc.returncode == 1 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stdout + proc.stderr
    return errors[0]

@pytest.mark.slow
@pytest.mark.parametrize('name', ['stats.jsonl', 'log.txt'])
def test_full_disk_during_an_append_leaves_whole_lines(tmp_path, tiny_zip, name):
    # The file already fills the quota but for a few hundred bytes; the next long line does not fit.
    run, limit = tmp_path / 'run', 256 * 1024
    os.makedirs(run)
    pad = json.dumps({'pad': 'x' * 1000}) + '\n'
    before = pad * ((limit - 2000) // len(pad))
    before += json.dumps({'pad': 'x' * (limit - 100 - len(before) - 12)}) + '\n'  # 100 bytes left
    assert len(before) == limit - 100
    (run / name).write_text(before)
    error = _train_with_file_limit(run, tiny_zip, limit)
    assert f'{run / name} (File too large)' in error
    after = (run / name).read_text()
    assert after.startswith(before) and after.endswith('\n')  # whole lines only
    if name == 'stats.jsonl':
        assert after == before and not list(run.glob('training-state-*'))  # stopped at the first tick's line
    assert not list(run.glob('.tmp-*'))

#----------------------------------------------------------------------------
# 4. Runs that would trample each other or the file system.

@pytest.mark.slow
def test_second_train_into_a_live_run_folder_fails_fast(tmp_path, tiny_zip):
    run = tmp_path / 'run'
    first = subprocess.Popen([sys.executable, 'train.py', *tiny_args(run, tiny_zip, '--nosubdir', '--dump=1', steps=100000)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not list(run.glob('training-state-*.pt')):
            assert time.time() < deadline and first.poll() is None, 'the first run did not start'
            time.sleep(0.2)
        # What the live run may be writing at this moment: a temporary file the second must not touch.
        (run / '.tmp-network-snapshot-000123.pt-abc.part').write_bytes(b'being written')
        start = time.time()
        message = one_line_error(run_train_cli(*tiny_args(run, tiny_zip, '--nosubdir', '--resume', run)))
        assert time.time() - start < 10
        assert f'another train.py is using {run} (pid {first.pid}); wait for it or choose another --outdir' in message
        assert (run / '.tmp-network-snapshot-000123.pt-abc.part').exists()
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()

@pytest.mark.parametrize('desc', ['../escape', 'a/b', '.hidden', 'sp ace'])
def test_desc_must_stay_inside_outdir(tmp_path, tiny_zip, desc):
    message = one_line_error(run_train_cli(*tiny_args(tmp_path / 'runs', tiny_zip, '--desc', desc)))
    assert '--desc' in message
    assert listing(tmp_path) == ['tiny.zip']

@pytest.mark.parametrize('case', ['missing', 'not-a-network', 'channels', 'width', 'seed'])
def test_failed_start_leaves_no_run_folder(tmp_path, tiny_zip, make_tiny_net, case):
    runs = tmp_path / 'runs'
    os.makedirs(runs)
    if case in ('missing', 'not-a-network', 'channels', 'width'):
        path = tmp_path / 'net.pt'
        if case == 'not-a-network':
            path.write_bytes(b'PK\x03\x04 not a network')
        elif case == 'channels':  # a 1-channel network onto 3-channel data
            save_snapshot(str(path), make_tiny_net(img_channels=1, label_dim=4, channel_mult=[1], attn_resolutions=[]))
        elif case == 'width':  # the same images, another --cbase
            save_snapshot(str(path), make_tiny_net(label_dim=4, model_channels=16, channel_mult=[1], attn_resolutions=[]))
        extra, fragment = ('--transfer', path), dict(missing='no such file', channels='1-channel', width='does not fit',
            **{'not-a-network': 'net.pt'})[case]
    else:
        first = run_train_cli(*tiny_args(tmp_path / 'first', tiny_zip, '--nosubdir'))
        assert first.exit_code == 0, first.output
        extra, fragment = ('--resume', tmp_path / 'first', '--seed=4'), 'seed 3'
    message = one_line_error(run_train_cli(*tiny_args(runs, tiny_zip), *extra))  # a later --seed wins
    assert fragment in message, message
    assert listing(runs) == []

#----------------------------------------------------------------------------
