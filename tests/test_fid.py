"""FID: statistics and the Frechet distance against closed forms, fid.py end to end with a tiny
stand-in detector (1 and 2 processes), user errors, pytorch-fid's Inception layout, and the
restricted reading of NVIDIA's detector pickle."""

import io
import os
import pickle
import resource
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fid
import training.evaluation.inception as inception_module
import torch_utils.persistence
from conftest import ROOT, write_image_zip
from training.evaluation import feature_stats
from torch_utils.errors import one_line
from training.evaluation.inception import DetectorError, FIDInceptionV3, load_detector
from training.evaluation import fid as evaluation
from training.evaluation import generation
from training.data.dataset import DatasetError, ImageFolderDataset

#----------------------------------------------------------------------------
# Helpers: image folders and a tiny TorchScript detector with the reference calling convention
# (uint8 images, return_features=True). Its 12 features are the 2x2 average pools of each
# channel in [0, 1], which the tests recompute independently with numpy.

class TinyDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.to(torch.float32) / 255, 2).flatten(1)

def tiny_detector_bytes():
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit is deprecated; NVIDIA's detector is TorchScript nonetheless
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyDetector()), buf)
    return buf.getvalue()

@pytest.fixture
def detector_file(tmp_path):
    path = tmp_path / 'tiny-detector.pt'
    path.write_bytes(tiny_detector_bytes())
    return str(path)

def write_folder(path, num, resolution=8, channels=3, seed=0, start=0):
    rng = np.random.RandomState(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(start, start + num):
        shape = (resolution, resolution, channels) if channels > 1 else (resolution, resolution)
        PIL.Image.fromarray(rng.randint(0, 256, size=shape).astype(np.uint8)).save(os.path.join(path, f'{i:06d}.png'))
    return str(path)

def numpy_features(folder):
    """[N, 12] features of the tiny detector, from the PNGs in sorted order, by plain numpy."""
    feats = []
    for name in sorted(os.listdir(folder)):
        img = np.asarray(PIL.Image.open(os.path.join(folder, name)), dtype=np.float64) / 255
        img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img  # grayscale as RGB
        h, w, c = img.shape
        pooled = img.reshape(2, h // 2, 2, w // 2, c).mean(axis=(1, 3))  # [2, 2, C]
        feats.append(pooled.transpose(2, 0, 1).reshape(-1))  # channel-major like flatten(1) of NCHW
    return np.stack(feats)

def numpy_stats(features):
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)

def invoke(*args):
    """fid.py with these arguments. A --detector here is the test's own TorchScript file (or a
    hostile pickle, refused all the same), so it is trusted (tests/test_detector_policy.py)."""
    args = [str(a) for a in args]
    return CliRunner().invoke(fid.main, args + (['--trust-detector'] if '--detector' in args else []))

def fid_line(result):
    """The last line of the command's output that reports an FID (tqdm's bar goes to stderr)."""
    return [line for line in result.stdout.splitlines() if line.startswith("FID ")][-1]

def assert_user_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    message = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(message) == 1, result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]
    return message[0]

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

def test_sqrtm_old_scipy_api(monkeypatch):
    # SciPy < 1.16: sqrtm(a, disp=False) returns (root, error estimate) and prints nothing.
    calls = []
    def old_sqrtm(a, disp=True):
        calls.append(disp)
        return (np.sqrt(a), 0.0) if disp is False else np.sqrt(a)
    monkeypatch.setattr(feature_stats, '_scipy_version', lambda: (1, 15))
    monkeypatch.setattr(feature_stats.scipy.linalg, 'sqrtm', old_sqrtm)
    np.testing.assert_allclose(feature_stats.sqrtm_real(np.diag([4.0, 9.0])), np.diag([2.0, 3.0]))
    assert calls == [False]

def test_summarize_min_mean_sample_std():
    assert feature_stats.summarize([3.0, 1.0, 2.0]) == pytest.approx((1.0, 2.0, 1.0))

#----------------------------------------------------------------------------
# fid.py end to end with the tiny detector.

def test_ref_and_calc_end_to_end(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 20, seed=0)
    other = write_folder(tmp_path / 'other', 16, seed=1)
    dest = tmp_path / 'refs' / 'data.npz'
    result = invoke('ref', '--data', data, '--dest', dest, '--detector', detector_file, '--workers', 0, '--batch', 6)
    assert result.exit_code == 0, result.output
    with np.load(dest, allow_pickle=False) as npz:
        assert sorted(npz.keys()) == ['mu', 'sigma']
        mu, sigma = npz['mu'], npz['sigma']
    assert mu.dtype == np.float64 and mu.shape == (12,) and sigma.shape == (12, 12)
    ref_mu, ref_sigma = numpy_stats(numpy_features(data))
    np.testing.assert_allclose(mu, ref_mu, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-7)
    assert not [n for n in os.listdir(dest.parent) if n != 'data.npz']  # no temporary file left behind

    # The same images: FID 0. Other images: the Frechet distance of the numpy statistics.
    result = invoke('calc', '--images', data, '--ref', dest, '--num', 20, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    last = fid_line(result)
    assert abs(float(last.split()[1])) < 1e-6 and '20 images' in last and str(dest) in last
    result = invoke('calc', '--images', other, '--ref', dest, '--num', 16, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    last = fid_line(result)
    expected = feature_stats.frechet_distance(*numpy_stats(numpy_features(other)), ref_mu, ref_sigma)
    assert float(last.split()[1]) == pytest.approx(expected, rel=1e-5)
    assert last == f"FID {float(last.split()[1]):g} from 16 images in '{other}' against '{dest}'"

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
    result = invoke('calc', '--images', data, '--ref', dest, '--num', 13, '--seed', 7, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    last = fid_line(result)
    assert float(last.split()[1]) == pytest.approx(expected, rel=1e-5) and '13 images' in last

def write_and_features(folder, num):
    return numpy_features(write_folder(folder, num, seed=11))

def test_protocol_prints_min_mean_std(tmp_path, detector_file):
    dirs = [write_folder(tmp_path / f'seeds{i}', 14, seed=20 + i) for i in range(3)]
    ref_mu, ref_sigma = numpy_stats(write_and_features(tmp_path / 'refimgs', 24))
    dest = tmp_path / 'ref.npz'
    feature_stats.save_stats(dest, ref_mu, ref_sigma)
    fids = [feature_stats.frechet_distance(*numpy_stats(numpy_features(d)), ref_mu, ref_sigma) for d in dirs]
    result = invoke('protocol', '--images', *dirs, '--ref', dest, '--num', 14, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    words = fid_line(result).split()
    assert words[:2] == ['FID', 'min'] and words[3] == 'mean' and words[5] == 'std'
    np.testing.assert_allclose([float(words[2]), float(words[4]), float(words[6])],
        [min(fids), np.mean(fids), np.std(fids, ddof=1)], rtol=1e-5)

def test_grayscale_zip_is_repeated_to_rgb(tmp_path, detector_file):
    # A zip of 1-channel images: the detector sees the gray values in all three channels.
    data = write_image_zip(tmp_path / 'gray.zip', num_images=14, channels=1, num_classes=0, seed=5)
    dest = tmp_path / 'gray.npz'
    assert invoke('ref', '--data', data, '--dest', dest, '--detector', detector_file, '--workers', 0).exit_code == 0
    folder = tmp_path / 'unzipped'
    with zipfile.ZipFile(data) as z:
        os.makedirs(folder)
        for name in sorted(n for n in z.namelist() if n.endswith('.png')):
            (folder / os.path.basename(name)).write_bytes(z.read(name))
    mu, sigma = feature_stats.load_stats(str(dest))
    ref_mu, ref_sigma = numpy_stats(numpy_features(folder))
    np.testing.assert_allclose(mu, ref_mu, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-7)

@pytest.mark.slow
def test_two_processes_give_the_same_statistics(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 13, seed=4)  # odd: the ranks get 7 and 6 images
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    assert invoke('ref', '--data', data, '--dest', one, '--detector', detector_file, '--workers', 0, '--batch', 4).exit_code == 0
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

#----------------------------------------------------------------------------
# User errors: one line each, naming what is wrong.

def test_fewer_images_than_num(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 5)
    dest = tmp_path / 'ref.npz'
    feature_stats.save_stats(dest, np.zeros(12), np.eye(12))
    assert_user_error(invoke('calc', '--images', data, '--ref', dest, '--num', 6, '--detector', detector_file),
        'found 5 images', '--num=6')

def test_mixed_sizes_and_channels_name_the_file(tmp_path, detector_file):
    sizes = write_folder(tmp_path / 'sizes', 4)
    write_folder(sizes, 1, resolution=16, start=4)
    channels = write_folder(tmp_path / 'channels', 4)
    write_folder(channels, 1, channels=1, start=4)
    for folder in [sizes, channels]:
        assert_user_error(invoke('ref', '--data', folder, '--dest', tmp_path / 'x.npz', '--detector', detector_file),
            '000004.png')
    assert not (tmp_path / 'x.npz').exists()

def test_undecodable_image(tmp_path, detector_file):
    # The header reads fine, the pixels do not: the error comes from the data loader.
    data = write_folder(tmp_path / 'data', 4, resolution=32)
    png = tmp_path / 'data' / '000002.png'
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    assert_user_error(invoke('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', detector_file, '--workers', 0),
        "Cannot decode image '000002.png'")
    # From a worker process the same error arrives wrapped in a traceback (PyTorch's ExceptionWrapper).
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "dataset.py", line 1, in f\ntraining.dataset.DatasetError: Cannot decode image \'000002.png\'; replace it.\n')
    assert one_line(wrapped) == "Cannot decode image '000002.png'; replace it."

def test_reference_of_another_dimension(tmp_path, detector_file):
    data = write_folder(tmp_path / 'data', 4)
    dest = tmp_path / 'ref2048.npz'
    feature_stats.save_stats(dest, np.zeros(2048), np.eye(2048))
    assert_user_error(invoke('calc', '--images', data, '--ref', dest, '--num', 4, '--detector', detector_file),
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
        assert_user_error(invoke('calc', '--images', data, '--ref', ref_path, '--num', 4, '--detector', detector_file), fragment)

def test_missing_detector(tmp_path):
    data = write_folder(tmp_path / 'data', 4)
    assert_user_error(invoke('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', tmp_path / 'nope.pkl'),
        'no such file')

# Files that would make fid.py allocate more than they hold: a child process under an address-space
# limit must stop with one line and status 1 (measured: a valid tiny `calc` runs within 1 GiB).
ADDRESS_SPACE_LIMIT = 3 << 30

def run_limited(*args):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'fid.py', *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, preexec_fn=limit)

def assert_one_line_exit_1(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith('Error:'), proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

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
    proc = run_limited('calc', '--images', tmp_path / 'unused', '--ref', path, '--detector', 'digits')
    assert_one_line_exit_1(proc, str(path), '[1000000, 1000000]')

def test_statistics_zip_bomb_is_refused_before_decompression(tmp_path):
    # 2 GiB of zeros (a 16384 x 16384 sigma) in 2 MB of deflate: a valid npz that np.load would read.
    path, d = tmp_path / 'bomb.npz', 16384
    mu = npy_header((d,)) + bytes(8 * d)
    write_deflated_zip(path, {'mu.npy': (zlib.compress(mu, wbits=-15), zlib.crc32(mu), len(mu)),
        'sigma.npy': deflated_zeros(npy_header((d, d)), d * d * 8 // (16 << 20))})
    assert path.stat().st_size < 3 << 20
    proc = run_limited('calc', '--images', tmp_path / 'unused', '--ref', path, '--detector', 'digits')
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
        with pytest.raises(feature_stats.FIDError, match='make the reference'):
            feature_stats.load_stats(str(path))
    # Big-endian and float32 are plain floats too, read as float64.
    path = tmp_path / 'other-floats.npz'
    np.savez(path, mu=np.arange(3, dtype='>f8'), sigma=np.eye(3, dtype='<f4'))
    mu, sigma = feature_stats.load_stats(str(path))
    assert mu.dtype == sigma.dtype == np.float64 and mu.tolist() == [0, 1, 2] and np.array_equal(sigma, np.eye(3))

#----------------------------------------------------------------------------
# pytorch-fid's Inception-v3. The expected layout is torchvision's Inception3 as printed by
# PyTorch 1.5 / torchvision 0.6 (GaiusCjl/pneumoniaCTImageClassification, resultRecord.md), without
# AuxLogits and with 1008 classes, because pytorch-fid's fid_inception_v3() builds
# inception_v3(num_classes=1008, aux_logits=False) and loads pt_inception-2015-12-05-6726825d.pth
# into it strictly (mseitzer/pytorch-fid, src/pytorch_fid/inception.py). Convs have no bias;
# each is followed by BatchNorm (weight, bias, running_mean, running_var, num_batches_tracked).

def _a(i, pool):
    return [('branch1x1', i, 64, 1, 1), ('branch5x5_1', i, 48, 1, 1), ('branch5x5_2', 48, 64, 5, 5),
        ('branch3x3dbl_1', i, 64, 1, 1), ('branch3x3dbl_2', 64, 96, 3, 3), ('branch3x3dbl_3', 96, 96, 3, 3),
        ('branch_pool', i, pool, 1, 1)]

def _c(c7):
    return [('branch1x1', 768, 192, 1, 1), ('branch7x7_1', 768, c7, 1, 1), ('branch7x7_2', c7, c7, 1, 7),
        ('branch7x7_3', c7, 192, 7, 1), ('branch7x7dbl_1', 768, c7, 1, 1), ('branch7x7dbl_2', c7, c7, 7, 1),
        ('branch7x7dbl_3', c7, c7, 1, 7), ('branch7x7dbl_4', c7, c7, 7, 1), ('branch7x7dbl_5', c7, 192, 1, 7),
        ('branch_pool', 768, 192, 1, 1)]

def _e(i):
    return [('branch1x1', i, 320, 1, 1), ('branch3x3_1', i, 384, 1, 1), ('branch3x3_2a', 384, 384, 1, 3),
        ('branch3x3_2b', 384, 384, 3, 1), ('branch3x3dbl_1', i, 448, 1, 1), ('branch3x3dbl_2', 448, 384, 3, 3),
        ('branch3x3dbl_3a', 384, 384, 1, 3), ('branch3x3dbl_3b', 384, 384, 3, 1), ('branch_pool', i, 192, 1, 1)]

PYTORCH_FID_CONVS = {
    'Conv2d_1a_3x3': [('', 3, 32, 3, 3)], 'Conv2d_2a_3x3': [('', 32, 32, 3, 3)], 'Conv2d_2b_3x3': [('', 32, 64, 3, 3)],
    'Conv2d_3b_1x1': [('', 64, 80, 1, 1)], 'Conv2d_4a_3x3': [('', 80, 192, 3, 3)],
    'Mixed_5b': _a(192, 32), 'Mixed_5c': _a(256, 64), 'Mixed_5d': _a(288, 64),
    'Mixed_6a': [('branch3x3', 288, 384, 3, 3), ('branch3x3dbl_1', 288, 64, 1, 1), ('branch3x3dbl_2', 64, 96, 3, 3),
        ('branch3x3dbl_3', 96, 96, 3, 3)],
    'Mixed_6b': _c(128), 'Mixed_6c': _c(160), 'Mixed_6d': _c(160), 'Mixed_6e': _c(192),
    'Mixed_7a': [('branch3x3_1', 768, 192, 1, 1), ('branch3x3_2', 192, 320, 3, 3), ('branch7x7x3_1', 768, 192, 1, 1),
        ('branch7x7x3_2', 192, 192, 1, 7), ('branch7x7x3_3', 192, 192, 7, 1), ('branch7x7x3_4', 192, 192, 3, 3)],
    'Mixed_7b': _e(1280), 'Mixed_7c': _e(2048),
}

def expected_pytorch_fid_shapes():
    shapes = {}
    for block, convs in PYTORCH_FID_CONVS.items():
        for name, cin, cout, kh, kw in convs:
            prefix = f'{block}.{name}.' if name else f'{block}.'
            shapes[prefix + 'conv.weight'] = (cout, cin, kh, kw)
            for key in ['weight', 'bias', 'running_mean', 'running_var']:
                shapes[prefix + 'bn.' + key] = (cout,)
            shapes[prefix + 'bn.num_batches_tracked'] = ()
    shapes['fc.weight'] = (1008, 2048)
    shapes['fc.bias'] = (1008,)
    return shapes

@pytest.fixture(scope='module')
def inception():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a wrong load would show
        for name, buf in net.named_buffers():
            if name.endswith('running_mean'):
                buf.normal_(0, 0.1)
            elif name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
    return net

def test_fid_inception_layout_matches_pytorch_fid(inception):
    got = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert got == expected_pytorch_fid_shapes()
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with AuxLogits).
    # Without AuxLogits (98,560 + 2,459,136 + 769,000) and with 1008 classes (+8 * 2049): 23,850,960.
    assert sum(p.numel() for p in inception.parameters()) == 27161264 - 3326696 + 8 * 2049

def test_fid_inception_features_and_weight_round_trip(inception, tmp_path):
    # The zip format of today, and the legacy format without BatchNorm step counters.
    state = inception.state_dict()
    torch.save(state, tmp_path / 'new.pth')
    old = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save(old, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    for name in ['old.pth', 'new.pth']:
        detector = load_detector(str(tmp_path / name), device='cpu')
        assert isinstance(detector.net, FIDInceptionV3) and detector.feature_dim == 2048
        loaded = detector.net.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # One forward (a 299x299 pass costs seconds on a CPU): any image size in, [N, 2048] out.
    images = torch.randint(0, 256, [2, 3, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = detector(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()

def test_fid_inception_uses_tensorflow_pooling(inception):
    # TF's average pooling ignores the zero padding: a constant stays constant up to the border.
    ones = torch.ones([1, 2, 5, 5])
    assert torch.equal(inception_module._tf_avg_pool(ones), ones)
    assert not torch.equal(F.avg_pool2d(ones, 3, stride=1, padding=1), ones)  # PyTorch's default would not
    # The last block max-pools (pytorch-fid's FIDInceptionE_2), the one before average-pools (E_1).
    assert (inception.Mixed_7b.pool, inception.Mixed_7c.pool) == ('avg', 'max')

def test_fid_inception_rejects_wrong_weights(tmp_path, inception):
    state = dict(inception.state_dict())
    state['fc.weight'] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / 'shape.pth')
    with pytest.raises(DetectorError, match='fc.weight'):
        load_detector(str(tmp_path / 'shape.pth'))
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(DetectorError, match='missing'):
        load_detector(str(tmp_path / 'other.pth'))

#----------------------------------------------------------------------------
# NVIDIA's detector pickle: the persistence record is read as data, never executed, and any
# other global is refused before it can run.

class _PersistentRecordWriter:
    """Pickles like a torch_utils.persistence object: _reconstruct_persistent_obj(meta)."""
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (torch_utils.persistence._reconstruct_persistent_obj, (self.meta,))

class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))

def test_nvidia_format_pickle_loads_without_running_its_source(tmp_path):
    marker = tmp_path / 'pwned'
    meta = dict(type='class', version=6, class_name='InceptionWrapper',
        module_src=f'open({str(marker)!r}, "w").write("pwned")\nclass InceptionWrapper: pass\n',
        state=dict(training=False, _modules={}, _parameters={}, detector=tiny_detector_bytes()))
    path = tmp_path / 'inception.pkl'
    path.write_bytes(pickle.dumps(_PersistentRecordWriter(meta), protocol=4))
    detector = load_detector(str(path), trust=True)  # trusts the TorchScript inside; the pickle's source is never run
    assert not marker.exists()
    images = torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8)
    assert detector.feature_dim == 12
    torch.testing.assert_close(detector(images), F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1))

def test_pickle_without_torchscript_is_refused(tmp_path):
    meta = dict(type='class', version=6, class_name='SomethingElse', module_src='', state=dict(weights=torch.zeros(3)))
    path = tmp_path / 'other.pkl'
    path.write_bytes(pickle.dumps(_PersistentRecordWriter(meta), protocol=4))
    with pytest.raises(DetectorError, match='expected one TorchScript module .*SomethingElse.*found 0'):
        load_detector(str(path))

def test_pickle_calling_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(_RunsCommand(f'touch {marker}'), protocol=4))
    with pytest.raises(DetectorError, match=r'(posix|os|nt)\.system'):
        load_detector(str(path))
    assert not marker.exists()
    # The same through the command line: a one-line error, nothing run.
    data = write_folder(tmp_path / 'data', 4)
    assert_user_error(invoke('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', path), 'system')
    assert not marker.exists()

#----------------------------------------------------------------------------
# Images straight from the sampler: fid.py gen and protocol --network. A tiny denoiser (8x8,
# 8 channels, 2 sampling steps) stands in for a trained network.

@pytest.fixture(scope='module')
def tiny_network(make_tiny_net):
    """tiny_network(path, img_channels=3, label_dim=0): an untrained tiny snapshot at path."""
    def save(path, img_channels=3, label_dim=0):
        from fdm.io.network_files import save_snapshot
        save_snapshot(path, make_tiny_net(img_channels=img_channels, label_dim=label_dim, wake=0))
        return str(path)
    return save

def read_png(path):
    """uint8 [C, H, W] of a PNG, grayscale as one channel."""
    array = np.array(PIL.Image.open(path))  # a writable copy for torch
    return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)

def png_names(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder)
        for f in files if f.endswith('.png'))

@pytest.mark.parametrize('img_channels', [1, 3])
def test_in_memory_images_and_features_equal_those_of_the_pngs(tmp_path, img_channels, tiny_network):
    network = tiny_network(tmp_path / 'net.pt', img_channels)
    seeds = list(range(7))
    generation.generate(network, tmp_path / 'pngs', seeds=seeds, max_batch_size=4, num_steps=2, device='cpu', verbose=False)
    net, sampler_name, sampler_kwargs = evaluation.open_generator(network, 'cpu', num_steps=2)
    def in_memory(batch):
        got = {}
        for batch_seeds, images in evaluation.generated_batches(net, sampler_name, sampler_kwargs, seeds, 'cpu', batch=batch,
                progress=False):
            assert images.dtype == torch.uint8 and images.shape[1:] == (img_channels, 8, 8)
            got.update(zip(batch_seeds, images))
        assert sorted(got) == seeds
        return torch.stack([got[seed] for seed in seeds]).to(torch.int16)
    pngs = torch.stack([read_png(tmp_path / 'pngs' / f'{seed:06d}.png') for seed in seeds]).to(torch.int16)
    # The same batches as generate.py (4 and 3): the same arithmetic, the very PNGs.
    assert torch.equal(in_memory(4), pngs)
    # Batches of 3: per-seed generators make the images independent of the batching, up to the CPU
    # kernels' rounding (measured: float images within 4.8e-7, PNGs identical; allowed one level).
    assert (in_memory(3) - pngs).abs().max() <= 1
    # Hence the same statistics through a real convolutional detector. Both paths split the 7 images
    # into batches of 4 and 3 and add in the same order, so the float64 sums agree bit for bit.
    detector = load_detector('digits')
    from_pngs = feature_stats.compute_stats(ImageFolderDataset(tmp_path / 'pngs'), detector, batch=4, workers=0, progress=False)
    in_memory = evaluation.generated_stats(net, sampler_name, sampler_kwargs, seeds, detector, batch=4, progress=False)
    for a, b in zip(from_pngs, in_memory):
        np.testing.assert_array_equal(a, b)

@pytest.fixture
def tiny_setup(tmp_path, detector_file, tiny_network):
    """(network, reference npz) with the reference made from random images by numpy."""
    ref_mu, ref_sigma = numpy_stats(write_and_features(tmp_path / 'refimgs', 24))
    feature_stats.save_stats(tmp_path / 'ref.npz', ref_mu, ref_sigma)
    return tiny_network(tmp_path / 'net.pt'), tmp_path / 'ref.npz'

def test_gen_end_to_end_equals_generate_then_calc(tmp_path, detector_file, tiny_setup):
    # generate.py with gen's --batch 4 (two batches of 3): the same arithmetic, so the same images.
    network, ref = tiny_setup
    generation.generate(network, tmp_path / 'pngs', seeds=range(6), subdirs=True, num_steps=2, max_batch_size=4,
        device='cpu', verbose=False)
    out = tmp_path / 'saved'
    result = invoke('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--steps', 2, '--batch', 4,
        '--detector', detector_file, '--outdir', out)
    assert result.exit_code == 0, result.output
    line = fid_line(result)
    value = float(line.split()[1])
    assert np.isfinite(value) and line == f"FID {value:g} from 6 images generated by '{network}' against '{ref}'"
    # The FID of generate.py's PNGs, computed by numpy; then by fid.py calc (other batches: float64 rounding only).
    expected = feature_stats.frechet_distance(*numpy_stats(numpy_features(tmp_path / 'pngs' / '000000')), *feature_stats.load_stats(str(ref)))
    assert value == pytest.approx(expected, rel=1e-5)
    # calc scores the 6 PNGs in one batch, gen in two of 3: the features may round differently in
    # float32 (the digits CNN: 1.5e-7 relative between batch sizes; this detector: measured 0).
    calc = invoke('calc', '--images', tmp_path / 'pngs', '--ref', ref, '--num', 6, '--detector', detector_file, '--workers', 0)
    assert float(fid_line(calc).split()[1]) == pytest.approx(value, rel=1e-6)
    # --outdir: generate.py --subdirs' files, pixel for pixel.
    assert png_names(out) == png_names(tmp_path / 'pngs') == [f'000000/{s:06d}.png' for s in range(6)]
    for name in png_names(out):
        assert torch.equal(read_png(out / name), read_png(tmp_path / 'pngs' / name)), name
    assert not [n for n in os.listdir(out / '000000') if not n.endswith('.png')]  # no temporary files left

@pytest.mark.slow
def test_gen_two_processes_match_one(tmp_path, detector_file, tiny_setup, one_thread):
    # --batch 2 gives the batches [0, 1], [2, 3], [4, 5], [6] in one process and the same ones split
    # between two: with one thread each, the same arithmetic; only the sums add in another order.
    network, ref = tiny_setup
    one = invoke('gen', '--network', network, '--ref', ref, '--seeds', '0-6', '--steps', 2, '--batch', 2, '--detector', detector_file)
    assert one.exit_code == 0, one.output
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'fid.py', 'gen',
        '--network', network, '--ref', str(ref), '--seeds', '0-6', '--steps', '2', '--batch', '2', '--detector', detector_file,
        '--trust-detector']
    for _attempt in range(2):  # the free port torchrun picks can be taken by a neighbour before it binds it
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0 or 'address already in use' not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith('FID ')]
    assert len(lines) == 1  # rank 0 only
    assert float(lines[0].split()[1]) == pytest.approx(float(fid_line(one).split()[1]), rel=1e-9)

def test_gen_user_errors(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    args = ['--steps', 2, '--detector', detector_file]
    assert_user_error(invoke('gen', '--network', network, '--seeds', '0-5', *args), "Missing option '--ref'")
    assert_user_error(invoke('gen', '--network', tmp_path / 'nope.pt', '--ref', ref, '--seeds', '0-5', *args), 'no such file')
    feature_stats.save_stats(tmp_path / 'ref2048.npz', np.zeros(2048), np.eye(2048))
    assert_user_error(invoke('gen', '--network', network, '--ref', tmp_path / 'ref2048.npz', '--seeds', '0-5', *args),
        '2048-dimensional', 'gives 12 features')
    assert_user_error(invoke('gen', '--network', network, '--ref', ref, '--seeds', '3', *args), 'at least 2')
    assert_user_error(invoke('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--class', 1, *args), 'drop --class')
    assert_user_error(invoke('gen', '--network', network, '--ref', ref, '--seeds', '5-1', *args), 'empty')
    (tmp_path / 'a-file').write_text('')
    assert_user_error(invoke('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--outdir', tmp_path / 'a-file', *args),
        'cannot create --outdir')

def test_protocol_generates_the_three_seed_ranges_from_a_network(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    out = tmp_path / 'gen'
    result = invoke('protocol', '--network', network, '--outdir', out, '--num', 3, '--steps', 2,
        '--ref', ref, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    dirs = [out / 'seeds-0-2', out / 'seeds-3-5', out / 'seeds-6-8']
    assert [png_names(d) for d in dirs] == [[f'000000/{s:06d}.png' for s in range(k * 3, k * 3 + 3)] for k in range(3)]
    assert [line.split()[5:] for line in result.stdout.splitlines() if line.startswith('FID ')][:3] == [
        ['in', f"'{d}'"] for d in dirs]
    again = invoke('protocol', '--images', *dirs, '--ref', ref, '--num', 3, '--detector', detector_file, '--workers', 0)
    assert fid_line(again) == fid_line(result)
    # Without --outdir nothing is written and the numbers are the same.
    in_memory = invoke('protocol', '--network', network, '--num', 3, '--steps', 2, '--ref', ref, '--detector', detector_file)
    assert in_memory.exit_code == 0, in_memory.output
    assert fid_line(in_memory) == fid_line(result)
    assert "from 3 images of seeds-3-5" in in_memory.stdout
    assert invoke('protocol', '--ref', ref).exit_code != 0  # neither --images nor --network
    assert invoke('protocol', '--images', *dirs, '--outdir', out, '--ref', ref).exit_code != 0  # --outdir needs --network

def test_protocol_num_is_bounded_by_the_seed_cap(tmp_path, tiny_setup):
    # 3 x 10^9 seeds would be materialised before the first image; refused before any work.
    network, _ref = tiny_setup
    ref = tmp_path / 'ref64.npz'
    feature_stats.save_stats(ref, np.zeros(64), np.eye(64))
    proc = run_limited('protocol', '--network', network, '--num', 10**9, '--steps', 2, '--ref', ref, '--detector', 'digits')
    assert_one_line_exit_1(proc, '--num=1000000000', f'--num <= {generation.MAX_SEEDS // 3}')

@pytest.mark.slow
def test_gen_compiled_matches_eager(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    args = ['--network', network, '--ref', ref, '--seeds', '0-4', '--steps', 2, '--batch', 4, '--detector', detector_file]
    eager = invoke('gen', *args)
    compiled = invoke('gen', *args, '--compile')  # batches of 4 and 1, the 1 padded to 4 for the fixed shape
    assert eager.exit_code == 0 and compiled.exit_code == 0, eager.output + compiled.output
    # Inductor's kernels round differently from eager ones (images within 2.7e-5, PNGs identical in
    # generate.py's tests); the FID must then agree to float32 feature rounding.
    assert float(fid_line(compiled).split()[1]) == pytest.approx(float(fid_line(eager).split()[1]), rel=1e-4)
    assert_user_error(invoke('gen', *args, '--compile-mode', 'reduce-overhead'), '--compile-mode applies only with --compile')
