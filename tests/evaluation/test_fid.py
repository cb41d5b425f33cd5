"""FID: statistics and the Frechet distance against closed forms, fid.py end to end on image folders
with a tiny stand-in detector (1 and 2 processes), user errors, and statistics files that claim
more than they hold. The detectors themselves: test_fid_detectors.py; images straight from a
network (fid.py gen, protocol --network): test_fid_network.py."""

import hashlib
import inspect
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib

import numpy as np
import pytest

import fid
from conftest import (ROOT, assert_one_line_exit_1, assert_user_error, fid_line, numpy_features, numpy_stats, one_line_error,
    run_fid_cli, run_fid_limited, write_and_features, write_folder, write_image_zip)
from training.evaluation import feature_stats
from torch_utils.errors import EvaluationError, one_line
from training.evaluation import fid as evaluation
from training.evaluation import generation
from training.data.dataset import DatasetError

#----------------------------------------------------------------------------
# Statistics and the Frechet distance.

def test_stats_from_sums_match_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(500, 6) @ rng.randn(6, 6) + rng.randn(6) * 3
    mu, sigma = feature_stats.stats_from_sums(len(x), x.sum(axis=0), x.T @ x)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-10, atol=1e-10)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64

def test_fid_of_identical_statistics_is_zero():
    rng = np.random.RandomState(1)
    a = rng.randn(32, 32)
    sigma = a @ a.T + 0.1 * np.eye(32)
    mu = rng.randn(32)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no DeprecationWarning from sqrtm's old `disp` API
        assert abs(feature_stats.frechet_distance(mu, sigma, mu, sigma)) < 1e-6

@pytest.mark.parametrize('rotate', [False, True])
def test_fid_matches_closed_form_for_commuting_covariances(rotate):
    # For S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T: FID = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.RandomState(2)
    d = 8
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    q = np.linalg.qr(rng.randn(d, d))[0] if rotate else np.eye(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert feature_stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)

def test_summarize_min_mean_sample_std():
    assert feature_stats.summarize([3.0, 1.0, 2.0]) == pytest.approx((1.0, 2.0, 1.0))

#----------------------------------------------------------------------------
# fid.py end to end with the tiny detector.

# The digest a reference records of an image folder, recomputed by hand: each image's name and the
# SHA-256 of its bytes, in name order.
def folder_sha256(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(f'{name}:{hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()};'.encode())
    return h.hexdigest()

def test_ref_and_calc_end_to_end(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 20, seed=0)
    other = write_folder(tmp_path / 'other', 16, seed=1)
    dest = tmp_path / 'refs' / 'data.npz'
    result = run_fid_cli('ref', '--data', data, '--dest', dest, '--detector', detector_file, '--workers', 0, '--batch', 6)
    assert result.exit_code == 0, result.output
    with np.load(dest, allow_pickle=False) as npz:  # as the reference reads it: no pickles, extra keys tolerated
        assert sorted(npz.keys()) == ['inputs', 'mu', 'sigma']
        mu, sigma, inputs = npz['mu'], npz['sigma'], json.loads(str(npz['inputs']))
    assert inputs == dict(data=os.path.abspath(data), data_sha256=folder_sha256(data), num_images=20, detector=detector_file,
        detector_sha256=hashlib.sha256(open(detector_file, 'rb').read()).hexdigest())
    assert mu.dtype == np.float64 and mu.shape == (12,) and sigma.shape == (12, 12)
    ref_mu, ref_sigma = numpy_stats(numpy_features(data))
    np.testing.assert_allclose(mu, ref_mu, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-7)
    assert not [n for n in os.listdir(dest.parent) if n != 'data.npz']  # no temporary file left behind

    # The same images: FID 0. Other images: the Frechet distance of the numpy statistics.
    result = run_fid_cli('calc', '--images', data, '--ref', dest, '--num', 20, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    last = fid_line(result)
    assert last == f"FID 0.000 from 20 images in '{data}' against '{dest}'"
    result = run_fid_cli('calc', '--images', other, '--ref', dest, '--num', 16, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    last = fid_line(result)
    expected = feature_stats.frechet_distance(*numpy_stats(numpy_features(other)), ref_mu, ref_sigma)
    assert last == f"FID {expected:.3f} from 16 images in '{other}' against '{dest}'"  # three decimals, always
    got = evaluation.fid_of_images(other, dest, num=16, workers=0, detector=detector_file, trust_detector=True)
    assert got == pytest.approx(expected, rel=1e-5)  # the printed value, unrounded

def test_calc_takes_seeded_subset(tmp_path, detector_file):
    # More images than --num: the subset is RandomState(seed).shuffle(arange(n))[:num].
    data = write_folder(tmp_path / 'data', 20, seed=3)
    dest = tmp_path / 'ref.npz'
    ref_mu, ref_sigma = numpy_stats(write_and_features(tmp_path / 'refimgs', 24))
    feature_stats.save_stats(dest, ref_mu, ref_sigma)
    order = np.arange(20)
    np.random.RandomState(7).shuffle(order)
    subset = numpy_features(data)[np.sort(order[:13])]
    expected = feature_stats.frechet_distance(*numpy_stats(subset), ref_mu, ref_sigma)
    result = run_fid_cli('calc', '--images', data, '--ref', dest, '--num', 13, '--seed', 7, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    assert fid_line(result) == f"FID {expected:.3f} from 13 images in '{data}' against '{dest}'"
    got = evaluation.fid_of_images(data, dest, num=13, seed=7, workers=0, detector=detector_file, trust_detector=True)
    assert got == pytest.approx(expected, rel=1e-5)

def test_protocol_prints_min_mean_std(tmp_path, detector_file):
    dirs = [write_folder(tmp_path / f'seeds{i}', 14, seed=20 + i) for i in range(3)]
    ref_mu, ref_sigma = numpy_stats(write_and_features(tmp_path / 'refimgs', 24))
    dest = tmp_path / 'ref.npz'
    feature_stats.save_stats(dest, ref_mu, ref_sigma)
    fids = [feature_stats.frechet_distance(*numpy_stats(numpy_features(d)), ref_mu, ref_sigma) for d in dirs]
    result = run_fid_cli('protocol', '--images', *dirs, '--ref', dest, '--num', 14, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith('FID ')] == [
        *(f"FID {f:.3f} from 14 images in '{d}'" for f, d in zip(fids, dirs)),
        f"FID min {min(fids):.3f}  mean {np.mean(fids):.3f}  std {np.std(fids, ddof=1):.3f}  over 3 seed ranges against '{dest}'"]
    got = evaluation.protocol_of_images(dirs, dest, num=14, workers=0, detector=detector_file, trust_detector=True)
    np.testing.assert_allclose(got, fids, rtol=1e-5)

def test_grayscale_zip_is_repeated_to_rgb(tmp_path, detector_file):
    # A zip of 1-channel images: the detector sees the gray values in all three channels.
    data = write_image_zip(tmp_path / 'gray.zip', num_images=14, channels=1, num_classes=0, seed=5)
    dest = tmp_path / 'gray.npz'
    assert run_fid_cli('ref', '--data', data, '--dest', dest, '--detector', detector_file, '--workers', 0).exit_code == 0
    folder = tmp_path / 'unzipped'
    with zipfile.ZipFile(data) as z:
        os.makedirs(folder)
        for name in sorted(n for n in z.namelist() if n.endswith('.png')):
            (folder / os.path.basename(name)).write_bytes(z.read(name))
    mu, sigma = feature_stats.load_stats(str(dest))
    ref_mu, ref_sigma = numpy_stats(numpy_features(folder))
    np.testing.assert_allclose(mu, ref_mu, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-7)

#----------------------------------------------------------------------------
# fid.py ref never overwrites: an existing --dest is the result if it records the same images and
# detector, and is refused otherwise; either way it is left as it was.

def file_state(path):
    st = os.stat(path)
    return open(path, 'rb').read(), st.st_ino, st.st_mtime_ns

def test_ref_keeps_an_existing_dest(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 20, seed=0)
    dest = tmp_path / 'data.npz'
    args = ['--dest', dest, '--detector', detector_file, '--workers', 0]
    assert run_fid_cli('ref', '--data', data, *args).exit_code == 0
    before = file_state(dest)
    remedy = 'delete it or choose another --dest'

    # The same images (also as a copy elsewhere: they are named by their bytes) and detector: nothing to do.
    copy = tmp_path / 'copy'
    shutil.copytree(data, copy)
    for images in (data, copy):
        result = run_fid_cli('ref', '--data', images, *args)
        assert result.exit_code == 0, result.output
        assert f"'{dest}' already holds the statistics of these 20 images with 'tiny-detector.pt'; nothing to do" in result.stdout
        assert 'Calculating' not in result.output and file_state(dest) == before

    # Other images, images changed in place, another detector: refused in one line.
    other = write_folder(tmp_path / 'other', 16, seed=1)
    assert one_line_error(run_fid_cli('ref', '--data', other, *args)) == (f"Error: --dest '{dest}' already holds statistics "
        f"of other images (20 in '{data}', this run 16 in '{other}'); {remedy}")
    write_folder(copy, 1, seed=5)  # 000000.png, other pixels
    assert one_line_error(run_fid_cli('ref', '--data', copy, *args)) == (f"Error: --dest '{dest}' already holds statistics "
        f"of other images (20 in '{data}', this run 20 in '{copy}'); {remedy}")
    write_folder(data, 1, seed=5)
    assert one_line_error(run_fid_cli('ref', '--data', data, *args)) == (f"Error: --dest '{dest}' already holds statistics "
        f"of other images (20 in '{data}', this run 20 in '{data}', whose files changed); {remedy}")
    result = run_fid_cli('ref', '--data', copy, '--dest', dest, '--detector', 'digits', '--workers', 0)
    assert one_line_error(result) == (f"Error: --dest '{dest}' already holds statistics of other images (20 in '{data}', "
        f"this run 20 in '{copy}') and another detector ({detector_file}, this run digits); {remedy}")
    assert file_state(dest) == before

def test_ref_refuses_a_dest_that_records_nothing(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 4)
    published = tmp_path / 'published.npz'  # as the reference's fid-refs are: mu and sigma only
    feature_stats.save_stats(published, np.zeros(12), np.eye(12))
    other = tmp_path / 'notes.npz'
    other.write_text('not a zip')
    for dest, why in [(published, 'does not record what it was made from (it was made elsewhere or by an older version)'),
            (other, 'is not a statistics file (BadZipFile: File is not a zip file)')]:
        before = file_state(dest)
        result = run_fid_cli('ref', '--data', data, '--dest', dest, '--detector', detector_file, '--workers', 0)
        assert one_line_error(result) == f"Error: --dest '{dest}' already exists and {why}; delete it or choose another --dest"
        assert file_state(dest) == before

#----------------------------------------------------------------------------
# How results and progress are shown.

def test_the_metric_is_named_for_its_detector(tmp_path):
    assert [evaluation.metric_name(d) for d in (None, 'nvidia', 'pytorch-fid', '/x/detector.pt', 'digits')] == [
        'FID', 'FID', 'FID', 'FID', 'FD-digits']
    data = write_folder(tmp_path / 'data', 80)  # more images than the 64 features: a full-rank covariance
    dest = tmp_path / 'digits.npz'
    assert run_fid_cli('ref', '--data', data, '--dest', dest, '--detector', 'digits', '--workers', 0).exit_code == 0
    result = run_fid_cli('calc', '--images', data, '--ref', dest, '--num', 80, '--detector', 'digits', '--workers', 0)
    assert result.exit_code == 0, result.output
    assert f"FD-digits 0.000 from 80 images in '{data}' against '{dest}'" in result.stdout.splitlines()

def test_progress_counts_images_and_rates_read_well(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 13)
    result = run_fid_cli('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', detector_file, '--workers', 0,
        '--batch', 4)
    assert result.exit_code == 0 and '13/13' in result.stderr and 'img' in result.stderr and 'batch' not in result.stderr
    now = time.perf_counter()
    assert feature_stats.rate(6, now) == '6 images in 0.0 s'  # too short to time: no rate
    assert feature_stats.rate(6, now - 20) == '6 images in 20.0 s (3.3 s/img)'
    assert feature_stats.rate(12, now - 2) == '12 images in 2.0 s (6.0 img/s)'
    assert feature_stats.rate(1000, now - 2) == '1000 images in 2.0 s (500 img/s)'

@pytest.mark.slow
def test_two_processes_give_the_same_statistics(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 13, seed=4)  # odd: the ranks get 7 and 6 images
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    assert run_fid_cli('ref', '--data', data, '--dest', one, '--detector', detector_file, '--workers', 0, '--batch', 4).exit_code == 0
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'fid.py', 'ref',
        '--data', data, '--dest', str(two), '--detector', detector_file, '--trust-detector', '--workers', '0', '--batch', '4']
    for _attempt in range(2):  # the free port torchrun picks can be taken by a neighbour before it binds it
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0 or 'address already in use' not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('Saved the statistics of 13 images') == 1  # rank 0 only
    mu1, sigma1 = feature_stats.load_stats(str(one))
    mu2, sigma2 = feature_stats.load_stats(str(two))
    # The ranks batch other images together, so a feature may round differently in float32 (features
    # in [0, 1]: one rounding is < 6e-8); measured difference 0. One image too many or too few would
    # move mu by ~0.02.
    np.testing.assert_allclose(mu2, mu1, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sigma2, sigma1, rtol=0, atol=1e-7)

# The options fid.py leaves out are None and take the library's defaults (the signatures of its
# commands' functions; steps=None: generate.py's); --help states those very defaults.
FID_COMMAND_FUNCTIONS = dict(ref=[evaluation.make_reference], calc=[evaluation.fid_of_images],
    gen=[evaluation.fid_of_network], protocol=[evaluation.protocol_of_network, evaluation.protocol_of_images])

def test_help_states_the_library_defaults():
    checked = []
    for command, functions in FID_COMMAND_FUNCTIONS.items():
        options = {param.name: param for param in fid.main.commands[command].params}
        for function in functions:
            for name, parameter in inspect.signature(function).parameters.items():
                if name in ('num', 'seed', 'solver', 'steps', 'precision', 'batch', 'workers') and name in options:
                    default = parameter.default
                    if name == 'steps' and default is None:
                        default = generation.select_sampler()[1]['num_steps']
                    assert options[name].help.endswith(f'  [default: {default}]'), (command, name, options[name].help)
                    assert not options[name].show_default  # left out: None, passed on as nothing
                    checked.append(f'{command} --{name}')
    assert len(checked) == 19, checked

#----------------------------------------------------------------------------
# User errors: one line each, naming what is wrong.

def test_fewer_images_than_num(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 5)
    dest = tmp_path / 'ref.npz'
    feature_stats.save_stats(dest, np.zeros(12), np.eye(12))
    assert_user_error(run_fid_cli('calc', '--images', data, '--ref', dest, '--num', 6, '--detector', detector_file),
        'found 5 images', '--num=6')

def test_mixed_sizes_and_channels_name_the_file(tmp_path, detector_file):
    sizes = write_folder(tmp_path / 'sizes', 4)
    write_folder(sizes, 1, resolution=16, start=4)
    channels = write_folder(tmp_path / 'channels', 4)
    write_folder(channels, 1, channels=1, start=4)
    for folder in [sizes, channels]:
        assert_user_error(run_fid_cli('ref', '--data', folder, '--dest', tmp_path / 'x.npz', '--detector', detector_file),
            '000004.png')
    assert not (tmp_path / 'x.npz').exists()

def test_undecodable_image(tmp_path, detector_file):
    # The header reads fine, the pixels do not: the error comes from the data loader.
    data = write_folder(tmp_path / 'data', 4, resolution=32)
    png = tmp_path / 'data' / '000002.png'
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    assert_user_error(run_fid_cli('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', detector_file, '--workers', 0),
        "Cannot decode image '000002.png'")
    # From a worker process the same error arrives wrapped in a traceback (PyTorch's ExceptionWrapper).
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "dataset.py", line 1, in f\ntraining.dataset.DatasetError: Cannot decode image \'000002.png\'; replace it.\n')
    assert one_line(wrapped) == "Cannot decode image '000002.png'; replace it."

def test_reference_of_another_dimension(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 4)
    dest = tmp_path / 'ref2048.npz'
    feature_stats.save_stats(dest, np.zeros(2048), np.eye(2048))
    assert_user_error(run_fid_cli('calc', '--images', data, '--ref', dest, '--num', 4, '--detector', detector_file),
        '2048-dimensional', 'gives 12 features')

def test_bad_reference_files(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 4)
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes(b'PK\x03\x04 this is not really a zip')
    wrong_keys = tmp_path / 'keys.npz'
    np.savez(wrong_keys, mean=np.zeros(3))
    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    cases = [(tmp_path / 'missing.npz', 'no such file'), (corrupt, 'cannot be read'), (wrong_keys, 'no "mu" and "sigma"'),
        (pickled, 'not float32 or float64')]
    for ref_path, fragment in cases:
        assert_user_error(run_fid_cli('calc', '--images', data, '--ref', ref_path, '--num', 4, '--detector', detector_file), fragment)

def test_missing_detector(tmp_path):
    data = write_folder(tmp_path / 'data', 4)
    assert_user_error(run_fid_cli('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', tmp_path / 'nope.pkl'),
        'no such file')

# Files that would make fid.py allocate more than they hold: a child process under an address-space
# limit (conftest's run_fid_limited) must stop with one line and status 1.
def npy_header(shape, descr='<f8'):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, dict(descr=descr, fortran_order=False, shape=shape))
    return buf.getvalue()

def deflated_zeros(header, blocks):
    """(raw deflate stream, crc32, size) of header + `blocks` x 16 MiB of zeros. After a full flush
    deflate starts afresh, so each block compresses to the same bytes: gigabytes in milliseconds."""
    block, c = bytes(16 << 20), zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    return head + body * blocks + c.flush(), crc, len(header) + blocks * len(block)

def write_deflated_zip(path, members):
    """A zip of {name: (raw deflate stream, crc32, size)}, written by hand (zipfile would compress)."""
    local, central = b'', b''
    for name, (data, crc, size) in members.items():
        n = name.encode()
        central += struct.pack('<4s6H3L5H2L', b'PK\x01\x02', 20, 20, 0, 8, 0, 0, crc, len(data), size, len(n), 0, 0, 0, 0, 0,
            len(local)) + n
        local += struct.pack('<4s5H3L2H', b'PK\x03\x04', 20, 0, 8, 0, 0, crc, len(data), size, len(n), 0) + n + data
    end = struct.pack('<4s4H2LH', b'PK\x05\x06', 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)

def test_statistics_claiming_huge_arrays_are_refused_before_allocation(tmp_path):
    # sigma's header claims 10^6 x 10^6 float64 (8 TB) and holds 16 bytes.
    path = tmp_path / 'claims.npz'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('mu.npy', npy_header((2,)) + bytes(16))
        z.writestr('sigma.npy', npy_header((10**6, 10**6)) + bytes(16))
    proc = run_fid_limited('calc', '--images', tmp_path / 'unused', '--ref', path, '--detector', 'digits')
    assert_one_line_exit_1(proc, str(path), '[1000000, 1000000]')

def test_statistics_zip_bomb_is_refused_before_decompression(tmp_path):
    # 2 GiB of zeros (a 16384 x 16384 sigma) in 2 MB of deflate: a valid npz that np.load would read.
    path, d = tmp_path / 'bomb.npz', 16384
    mu = npy_header((d,)) + bytes(8 * d)
    write_deflated_zip(path, {'mu.npy': (zlib.compress(mu, wbits=-15), zlib.crc32(mu), len(mu)),
        'sigma.npy': deflated_zeros(npy_header((d, d)), d * d * 8 // (16 << 20))})
    assert path.stat().st_size < 3 << 20
    proc = run_fid_limited('calc', '--images', tmp_path / 'unused', '--ref', path, '--detector', 'digits')
    assert_one_line_exit_1(proc, str(path), 'sigma expands from')

def test_statistics_headers_are_checked(tmp_path):
    # Each npz array's header must describe its data exactly, in plain float32/float64.
    cases = {
        'short': [('mu.npy', npy_header((3,)) + bytes(16)), ('sigma.npy', npy_header((3, 3)) + bytes(72))],
        'long': [('mu.npy', npy_header((3,)) + bytes(24)), ('sigma.npy', npy_header((3, 3)) + bytes(80))],
        'shape': [('mu.npy', npy_header((3,)) + bytes(24)), ('sigma.npy', npy_header((2, 2)) + bytes(32))],
        'int': [('mu.npy', npy_header((3,), '<i8') + bytes(24)), ('sigma.npy', npy_header((3, 3)) + bytes(72))],
        'empty': [('mu.npy', npy_header((0,)) + b''), ('sigma.npy', npy_header((0, 0)) + b'')],
    }
    for name, members in cases.items():
        path = tmp_path / f'{name}.npz'
        with zipfile.ZipFile(path, 'w') as z:
            for member, data in members:
                z.writestr(member, data)
        with pytest.raises(EvaluationError, match='make the reference'):
            feature_stats.load_stats(str(path))
    # Big-endian and float32 are plain floats too, read as float64.
    path = tmp_path / 'other-floats.npz'
    np.savez(path, mu=np.arange(3, dtype='>f8'), sigma=np.eye(3, dtype='<f4'))
    mu, sigma = feature_stats.load_stats(str(path))
    assert mu.dtype == sigma.dtype == np.float64 and mu.tolist() == [0, 1, 2] and np.array_equal(sigma, np.eye(3))

#----------------------------------------------------------------------------
# The Frechet distance of singular and ill-conditioned statistics (fewer images than features make
# the covariances singular), against values computed independently of scipy's sqrtm.

# S1 = A A^T and S2 = B B^T of integer 5 x 2 factors: S1 S2 has the nonzero eigenvalues of
# (B^T A)^T (B^T A), so tr sqrt(S1 S2) is the sum of the two singular values of C = B^T A, which
# is sqrt(||C||^2 + 2 |det C|). (sqrtm raised on the first two and was off by 1e-7 on the third.)
LOW_RANK_PAIRS = [
    ([[2, 1], [0, -1], [-1, 1], [3, 3], [0, 2]], [[0, 1], [-1, -2], [3, -1], [3, 1], [-2, 2]]),
    ([[-2, 3], [-2, 0], [2, 0], [-2, 0], [2, 0]], [[3, 0], [-3, 2], [0, 1], [-1, 2], [1, 3]]),
    ([[1, 2], [0, 1], [3, -1], [2, 2], [-1, 0]], [[2, 0], [1, 1], [0, 3], [1, -2], [1, 1]]),
]

@pytest.mark.parametrize('a, b', LOW_RANK_PAIRS)
def test_fid_of_low_rank_covariances_is_exact(a, b):
    a, b = np.array(a), np.array(b)
    mu1, mu2 = np.array([1, 0, -2, 3, 1]), np.array([0, 2, -1, 3, 0])  # ||mu1 - mu2||^2 = 7
    c = b.T @ a
    trace_sqrt = np.sqrt(float(np.square(c).sum() + 2 * abs(c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0])))
    expected = 7 + np.square(a).sum() + np.square(b).sum() - 2 * trace_sqrt
    s1, s2 = a @ a.T, b @ b.T
    assert feature_stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    # The eigenvalues of S1 S2 itself, whose zeros come out as rounding noise: a looser check.
    eig = np.linalg.eigvals((s1 @ s2).astype(np.float64))
    trace_sqrt_eig = np.sqrt(np.clip(eig.real, 0, None)).sum()
    assert expected == pytest.approx(7 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig, rel=1e-6)

def test_fid_of_commuting_low_rank_covariances():
    # S1 = Q diag(d1) Q^T, S2 = Q diag(d2) Q^T: tr sqrt(S1 S2) = sum sqrt(d1 d2), and the FID is
    # sum (sqrt(d1) - sqrt(d2))^2 = 1 + 9 + 0 + 16 + 1 + 2.25.
    d1, d2 = np.array([4, 9, 0, 0, 1, 0]), np.array([1, 0, 0, 16, 4, 2.25])
    q = np.linalg.qr(np.random.RandomState(3).randn(6, 6))[0]
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    assert feature_stats.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(29.25, rel=1e-12)

def random_statistics(d, n, seed, decay=0.0, exact=True):
    """Two sets of n random features of d dimensions (a spectrum falling by exp(-2 decay)), their
    (mu, sigma) each, and (if exact) the exact FID from the features, without forming a covariance
    product: tr sqrt(S1 S2) is the nuclear norm of R1 R2^T / (n - 1) for the QR factors R of the
    centred features."""
    rng = np.random.RandomState(seed)
    mix = np.linalg.qr(rng.randn(d, d))[0]
    f1, f2 = ((rng.randn(n, d) * np.exp(-decay * np.linspace(0, 1, d))) @ mix for _ in range(2))
    f2 = 1.1 * f2 + 0.05
    x1, x2 = f1 - f1.mean(axis=0), f2 - f2.mean(axis=0)
    s1, s2 = x1.T @ x1 / (n - 1), x2.T @ x2 / (n - 1)
    stats = (f1.mean(axis=0), s1, f2.mean(axis=0), s2)
    if not exact:
        return stats, None
    r1, r2 = np.linalg.qr(x1, mode='r'), np.linalg.qr(x2, mode='r')
    trace_sqrt = np.linalg.svd(r1 @ r2.T, compute_uv=False).sum() / (n - 1)
    return stats, np.square(stats[0] - stats[2]).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt

# pytorch-fid's formula: the trace of the real part of scipy's sqrtm of S1 S2.
def pytorch_fid_formula(mu1, s1, mu2, s2):
    import scipy.linalg
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        root = scipy.linalg.sqrtm(s1 @ s2)
    root = root[0] if isinstance(root, tuple) else root
    return np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real

@pytest.mark.parametrize('d', [64, 512])
def test_fid_of_full_rank_statistics_agrees_with_pytorch_fid(d):
    stats, exact = random_statistics(d, 2 * d, seed=d, exact=True)
    fid = feature_stats.frechet_distance(*stats)
    assert fid == pytest.approx(pytorch_fid_formula(*stats), rel=1e-10)
    assert exact is None or fid == pytest.approx(exact, rel=1e-12)

# Covariances of condition number 5e8 (their product: 2e17): scipy's sqrtm is off by 1.5e-8.
def test_fid_of_ill_conditioned_statistics():
    stats, exact = random_statistics(64, 400, seed=4, decay=10)
    assert feature_stats.frechet_distance(*stats) == pytest.approx(exact, rel=1e-12)
