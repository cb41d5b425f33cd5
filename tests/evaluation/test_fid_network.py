"""FID of images straight from the sampler: fid.py gen and protocol --network against generate.py's
PNGs (bit for bit where the batches match), in one and two processes, compiled and eager, and
their user errors."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import (ROOT, assert_one_line_exit_1, assert_user_error, fid_line, numpy_features, numpy_stats,
    run_fid_cli, run_fid_limited, write_and_features)
from training.evaluation import feature_stats
from training.evaluation.inception import load_detector
from training.evaluation import fid as evaluation
from training.evaluation import generation
from training.data.dataset import ImageFolderDataset

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
        for batch_seeds, images in evaluation.generated_batches(net, (sampler_name, sampler_kwargs), seeds, 'cpu', batch=batch,
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
    in_memory = evaluation.generated_stats(net, (sampler_name, sampler_kwargs), seeds, detector, batch=4, progress=False)
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
    result = run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--steps', 2, '--batch', 4,
        '--detector', detector_file, '--outdir', out)
    assert result.exit_code == 0, result.output
    # The FID of generate.py's PNGs, computed by numpy: printed with three decimals, and returned unrounded.
    expected = feature_stats.frechet_distance(*numpy_stats(numpy_features(tmp_path / 'pngs' / '000000')), *feature_stats.load_stats(str(ref)))
    assert fid_line(result) == f"FID {expected:.3f} from 6 images generated by '{network}' against '{ref}'"
    value = evaluation.fid_of_network(network, ref, list(range(6)), steps=2, batch=4, detector=detector_file, trust_detector=True)
    assert value == pytest.approx(expected, rel=1e-5)
    # Then by fid.py calc. calc scores the 6 PNGs in one batch, gen in two of 3: the features may round
    # differently in float32 (the digits CNN: 1.5e-7 relative between batch sizes; this detector: measured 0).
    calc = evaluation.fid_of_images(tmp_path / 'pngs', ref, num=6, workers=0, detector=detector_file, trust_detector=True)
    assert calc == pytest.approx(value, rel=1e-6)
    # --outdir: generate.py --subdirs' files, pixel for pixel.
    assert png_names(out) == png_names(tmp_path / 'pngs') == [f'000000/{s:06d}.png' for s in range(6)]
    for name in png_names(out):
        assert torch.equal(read_png(out / name), read_png(tmp_path / 'pngs' / name)), name
    assert not [n for n in os.listdir(out / '000000') if not n.endswith('.png')]  # no temporary files left
    # gen records its folder as generate.py does: generate.py with the same settings finds it complete.
    before = {name: os.stat(out / name).st_ino for name in png_names(out)}
    generation.generate(network, out, seeds=range(6), subdirs=True, num_steps=2, max_batch_size=4, device='cpu', verbose=False)
    assert {name: os.stat(out / name).st_ino for name in png_names(out)} == before

@pytest.mark.slow
def test_gen_two_processes_match_one(tmp_path, detector_file, tiny_setup, one_thread):
    # --batch 2 gives the batches [0, 1], [2, 3], [4, 5], [6] in one process and the same ones split
    # between two: with one thread each, the same arithmetic; only the sums add in another order.
    network, ref = tiny_setup
    one = run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '0-6', '--steps', 2, '--batch', 2, '--detector', detector_file)
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
    assert lines[0] == fid_line(one)  # to the three decimals printed (one image more or less moves it by ~0.1)

def test_gen_user_errors(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    args = ['--steps', 2, '--detector', detector_file]
    assert_user_error(run_fid_cli('gen', '--network', network, '--seeds', '0-5', *args), "Missing option '--ref'")
    assert_user_error(run_fid_cli('gen', '--network', tmp_path / 'nope.pt', '--ref', ref, '--seeds', '0-5', *args), 'no such file')
    feature_stats.save_stats(tmp_path / 'ref2048.npz', np.zeros(2048), np.eye(2048))
    assert_user_error(run_fid_cli('gen', '--network', network, '--ref', tmp_path / 'ref2048.npz', '--seeds', '0-5', *args),
        '2048-dimensional', 'gives 12 features')
    assert_user_error(run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '3', *args), 'at least 2')
    assert_user_error(run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--class', 1, *args), 'drop --class')
    assert_user_error(run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '5-1', *args), 'empty')
    (tmp_path / 'a-file').write_text('')
    assert_user_error(run_fid_cli('gen', '--network', network, '--ref', ref, '--seeds', '0-5', '--outdir', tmp_path / 'a-file', *args),
        'cannot create --outdir')

def test_protocol_generates_the_three_seed_ranges_from_a_network(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    out = tmp_path / 'gen'
    result = run_fid_cli('protocol', '--network', network, '--outdir', out, '--num', 3, '--steps', 2,
        '--ref', ref, '--detector', detector_file, '--workers', 0)
    assert result.exit_code == 0, result.output
    dirs = [out / 'seeds-0-2', out / 'seeds-3-5', out / 'seeds-6-8']
    assert [png_names(d) for d in dirs] == [[f'000000/{s:06d}.png' for s in range(k * 3, k * 3 + 3)] for k in range(3)]
    assert [line.split()[5:] for line in result.stdout.splitlines() if line.startswith('FID ')][:3] == [
        ['in', f"'{d}'"] for d in dirs]
    again = run_fid_cli('protocol', '--images', *dirs, '--ref', ref, '--num', 3, '--detector', detector_file, '--workers', 0)
    assert fid_line(again) == fid_line(result)
    # Without --outdir nothing is written and the numbers are the same.
    in_memory = run_fid_cli('protocol', '--network', network, '--num', 3, '--steps', 2, '--ref', ref, '--detector', detector_file)
    assert in_memory.exit_code == 0, in_memory.output
    assert fid_line(in_memory) == fid_line(result)
    assert "from 3 images of seeds-3-5" in in_memory.stdout
    assert run_fid_cli('protocol', '--ref', ref).exit_code != 0  # neither --images nor --network
    assert run_fid_cli('protocol', '--images', *dirs, '--outdir', out, '--ref', ref).exit_code != 0  # --outdir needs --network

def test_gen_and_protocol_refuse_a_folder_of_other_images(tmp_path, detector_file, tiny_setup):
    # Their --outdir is claimed as generate.py --subdirs claims one, before any image: a folder of
    # other settings is refused in one line, and nothing is written anywhere.
    network, ref = tiny_setup
    made = tmp_path / 'out' / 'seeds-3-5'  # protocol --num 3's second folder, made with 3 steps
    generation.generate(network, made, seeds=range(3, 6), subdirs=True, num_steps=3, device='cpu', verbose=False)
    state = lambda: {(root, name): os.stat(os.path.join(root, name)).st_mtime_ns for root, _, names in os.walk(tmp_path / 'out')
        for name in names}
    before = state()
    message = f"--outdir '{made}' holds images of other sampler settings (num_steps 3, this run 2); choose another --outdir or delete it"
    args = ['--steps', 2, '--ref', ref, '--detector', detector_file]
    assert_user_error(run_fid_cli('gen', '--network', network, '--seeds', '3-5', '--outdir', made, *args)) == f'Error: {message}'
    assert_user_error(run_fid_cli('protocol', '--network', network, '--num', 3, '--outdir', tmp_path / 'out', *args)) == f'Error: {message}'
    assert state() == before and sorted(os.listdir(tmp_path / 'out')) == ['seeds-3-5']  # seeds-0-2 was not begun

def test_protocol_num_is_bounded_by_the_seed_cap(tmp_path, tiny_setup):
    # 3 x 10^9 seeds would be materialised before the first image; refused before any work.
    network, _ref = tiny_setup
    ref = tmp_path / 'ref64.npz'
    feature_stats.save_stats(ref, np.zeros(64), np.eye(64))
    proc = run_fid_limited('protocol', '--network', network, '--num', 10**9, '--steps', 2, '--ref', ref, '--detector', 'digits')
    assert_one_line_exit_1(proc, '--num=1000000000', f'--num <= {generation.MAX_SEEDS // 3}')

@pytest.mark.slow
def test_gen_compiled_matches_eager(tmp_path, detector_file, tiny_setup):
    network, ref = tiny_setup
    args = ['--network', network, '--ref', ref, '--seeds', '0-4', '--steps', 2, '--batch', 4, '--detector', detector_file]
    kwargs = dict(steps=2, batch=4, detector=detector_file, trust_detector=True)
    eager = evaluation.fid_of_network(network, ref, list(range(5)), **kwargs)
    compiled = evaluation.fid_of_network(network, ref, list(range(5)), compile_mode='default', **kwargs)  # batches of 4 and 1, the 1 padded to 4
    # Inductor's kernels round differently from eager ones (images within 2.7e-5, PNGs identical in
    # generate.py's tests); the FID must then agree to float32 feature rounding.
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert_user_error(run_fid_cli('gen', *args, '--compile-mode', 'reduce-overhead'), '--compile-mode applies only with --compile')
