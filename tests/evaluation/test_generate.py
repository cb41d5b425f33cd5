"""generate.py end to end with tiny networks: files, seeds -> images, solvers, errors.

Images are compared bit for bit only where they come from batches of the same shapes in one
process (then the arithmetic is the same); across batch sizes or processes the CPU's float
kernels may round differently, so there the PNGs may differ by one level on a few pixels."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
from conftest import ROOT, free_port
from fdm.io.network_files import save_snapshot
from fdm.samplers import ablation_sampler, dpm_solver_sampler, edm_sampler
from training.evaluation import generation

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

@pytest.fixture(scope='module')
def nets(tmp_path_factory, make_tiny_net):
    folder = tmp_path_factory.mktemp('nets')
    out = {}
    for name, label_dim, channels in [('cond', 4, 3), ('uncond', 0, 1)]:
        net = make_tiny_net(label_dim=label_dim, img_channels=channels).requires_grad_(False)
        path = str(folder / f'{name}.pt')
        save_snapshot(path, net)
        out[name], out[name + '_net'] = path, net
    return out

def run(*args, ok=True):
    args = [str(a) for a in args]
    if '--device' not in args:
        args += ['--device', 'cpu']  # the expected images below use CPU generators
    result = CliRunner().invoke(generate.main, args)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def read_png(path):
    return np.asarray(PIL.Image.open(path))

def read_images(outdir, seeds, subdirs=False):
    return np.stack([read_png(generation.image_path(str(outdir), s, subdirs)) for s in seeds])

# Batch sizes and processes change only the float rounding: measured max |difference| 1.5e-4 on
# the float64 images (PNG levels are 1/127.5 = 7.8e-3 apart), and no PNG differed. Allowed: one
# level on at most 5% of the values; a wrong seed or draw order changes nearly all of them.
def assert_same_up_to_rounding(a, b):
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())

# The expected images, re-deriving the reference's draw order with plain generators: per
# seed, latents [C, H, W], then (conditional) a class index, then the sampler's noise.
# batch: sample the seeds in batches of that size (as generate.py --batch in one process).
def expected_images(net, seeds, sampler, class_idx=None, batch=None, **kwargs):
    if batch is not None:
        return np.concatenate([expected_images(net, b, sampler, class_idx, **kwargs)
            for b in generation.rank_batches(seeds, batch)])
    gens = [torch.Generator().manual_seed(s % 2 ** 32) for s in seeds]
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    labels = None
    if net.label_dim:
        index = [int(torch.randint(net.label_dim, [1], generator=g)) for g in gens]
        labels = torch.eye(net.label_dim)[[class_idx if class_idx is not None else i for i in index]]
    randn_like = lambda x: torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, generator=g) for g in gens])
    with torch.no_grad():
        images = sampler(net, latents, labels, randn_like=randn_like, **kwargs)
    images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images[..., 0] if net.img_channels == 1 else images

#----------------------------------------------------------------------------

def test_file_names_and_subdirs(nets, tmp_path):
    run('--network', nets['cond'], '--outdir', tmp_path / 'a', '--seeds', '998-1001', '--steps', 2, '--subdirs')
    names = sorted(os.path.relpath(os.path.join(d, f), tmp_path / 'a') for d, _, fs in os.walk(tmp_path / 'a') for f in fs)
    assert names == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png',
        'generate_options.json']
    run('--network', nets['cond'], '--outdir', tmp_path / 'b', '--seeds', '3,1000', '--steps', 2)
    assert sorted(os.listdir(tmp_path / 'b')) == ['000003.png', '001000.png', 'generate_options.json']
    image = PIL.Image.open(tmp_path / 'b' / '001000.png')
    assert image.mode == 'RGB' and image.size == (8, 8)

def test_images_are_the_seeds_and_independent_of_batch_size(nets, tmp_path):
    # With churn, the per-step noise matters too. Batch 2 vs 3 split the seeds differently.
    opts = ['--network', nets['cond'], '--seeds', '0-4', '--steps', 3, '--S_churn', 10]
    run(*opts, '--outdir', tmp_path / 'b2', '--batch', 2)
    run(*opts, '--outdir', tmp_path / 'b3', '--batch', 3)
    a, b = read_images(tmp_path / 'b2', range(5)), read_images(tmp_path / 'b3', range(5))
    assert_same_up_to_rounding(a, b)
    for images, batch in [(a, 2), (b, 3)]:  # the same batches: the same arithmetic, bit for bit
        expected = expected_images(nets['cond_net'], list(range(5)), edm_sampler, batch=batch, num_steps=3, S_churn=10)
        assert np.array_equal(images, expected)
    plain = expected_images(nets['cond_net'], list(range(5)), edm_sampler, batch=2, num_steps=3)
    assert np.abs(a.astype(int) - plain).max() > 1  # the churn noise did matter

def test_dpm_applies_to_every_batch(nets, tmp_path):
    # The FDM reference ran DPM-Solver++ only on each rank's first batch; seeds 2 and 3 form the
    # second batch here and must come from DPM-Solver++ too.
    run('--network', nets['cond'], '--outdir', tmp_path, '--seeds', '0-3', '--batch', 2, '--steps', 4, '--solver', 'dpm')
    got = read_images(tmp_path, [2, 3])
    dpm = expected_images(nets['cond_net'], [2, 3], dpm_solver_sampler, num_steps=4)
    edm = expected_images(nets['cond_net'], [2, 3], edm_sampler, num_steps=4)
    assert np.array_equal(got, dpm) and not np.array_equal(got, edm)
    assert np.array_equal(read_images(tmp_path, [0, 1]), expected_images(nets['cond_net'], [0, 1], dpm_solver_sampler, num_steps=4))

def test_dpm_variants_and_ablation(nets, tmp_path):
    run('--network', nets['cond'], '--outdir', tmp_path / 'm', '--seeds', '0-2', '--steps', 5, '--solver', 'dpm',
        '--dpm-order', 2, '--dpm-method', 'multistep', '--dpm-skip', 'time_uniform')
    expected = expected_images(nets['cond_net'], [0, 1, 2], dpm_solver_sampler, num_steps=5, order=2,
        method='multistep', skip_type='time_uniform')
    assert np.array_equal(read_images(tmp_path / 'm', [0, 1, 2]), expected)
    run('--network', nets['cond'], '--outdir', tmp_path / 'e', '--seeds', '0-2', '--steps', 3, '--solver', 'euler',
        '--disc', 've', '--schedule', 've')
    expected = expected_images(nets['cond_net'], [0, 1, 2], ablation_sampler, num_steps=3, solver='euler',
        discretization='ve', schedule='ve')
    assert np.array_equal(read_images(tmp_path / 'e', [0, 1, 2]), expected)

def test_class_option(nets, tmp_path):
    # The class index is still drawn (and discarded) with --class: with churn, skipping the
    # draw would shift every later noise sample.
    run('--network', nets['cond'], '--outdir', tmp_path / 'c', '--seeds', '0-3', '--steps', 3, '--S_churn', 10, '--class', 2)
    got = read_images(tmp_path / 'c', range(4))
    assert np.array_equal(got, expected_images(nets['cond_net'], list(range(4)), edm_sampler, class_idx=2, num_steps=3, S_churn=10))
    random_class = expected_images(nets['cond_net'], list(range(4)), edm_sampler, num_steps=3, S_churn=10)
    assert not np.array_equal(got, random_class)

def test_class_errors(nets, tmp_path):
    r = run('--network', nets['cond'], '--outdir', tmp_path, '--class', 4, ok=False)
    assert r.exit_code == 1 and 'out of range' in r.output and '0..3' in r.output
    r = run('--network', nets['uncond'], '--outdir', tmp_path, '--class', 0, ok=False)
    assert r.exit_code == 1 and 'unconditional' in r.output

def test_grayscale_unconditional(nets, tmp_path):
    run('--network', nets['uncond'], '--outdir', tmp_path, '--seeds', '5-7', '--steps', 2, '--batch', 2)
    image = PIL.Image.open(tmp_path / '000005.png')
    assert image.mode == 'L' and image.size == (8, 8)
    assert np.array_equal(read_images(tmp_path, [5, 6, 7]),
        expected_images(nets['uncond_net'], [5, 6, 7], edm_sampler, batch=2, num_steps=2))

def test_options_json(nets, tmp_path):
    strict = lambda path: json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f'non-JSON {c}'))
    run('--network', nets['cond'], '--outdir', tmp_path / 'd', '--seeds', '0-2,7', '--steps', 4, '--solver', 'dpm',
        '--sigma_max', 40, '--class', 1)
    s = strict(tmp_path / 'd' / 'generate_options.json')
    assert s['solver'] == 'dpm' and s['sampler_function'] == 'dpm_solver_sampler'
    assert s['num_steps'] == 4 and s['nfe'] == 4 and s['sigma_min'] == 0.002 and s['sigma_max'] == 40
    assert s['sampler_kwargs']['order'] == 3 and s['sampler_kwargs']['method'] == 'singlestep'
    assert s['num_seeds'] == 4 and s['seeds'] == '0-2,7' and s['class_idx'] == 1 and s['label_dim'] == 4
    assert s['network'] == nets['cond'] and s['world_size'] == 1
    run('--network', nets['cond'], '--outdir', tmp_path / 'e', '--seeds', 0, '--steps', 3)
    s = strict(tmp_path / 'e' / 'generate_options.json')
    assert s['solver'] == 'edm' and s['nfe'] == 5 and s['sampler_kwargs']['S_max'] == 'inf'
    assert (s['sigma_min'], s['sigma_max']) == (0.002, 80)  # the FDM-EDM net's range
    run('--network', nets['cond'], '--outdir', tmp_path / 'f', '--seeds', 0, '--steps', 3, '--solver', 'euler', '--sigma_max', 500)
    s = strict(tmp_path / 'f' / 'generate_options.json')
    assert s['solver'] == 'euler' and s['sampler'] == 'ablation' and s['nfe'] == 3 and s['sigma_max'] == 80  # clamped

def test_make_grid_native_and_upscaled():
    # 5 images of 4x6 in 2 columns: 3 rows of cells 4x6 with one white pixel between cells (none
    # around the grid), 14 x 13 in all; the sixth cell stays blank.
    images = np.random.RandomState(0).randint(0, 256, [5, 4, 6, 1]).astype(np.uint8)
    native = generation.make_grid(images, gw=2)
    assert native.shape == (3 * 4 + 2, 2 * 6 + 1, 1)
    for i, image in enumerate(images):
        y, x = divmod(i, 2)
        assert np.array_equal(native[5 * y:5 * y + 4, 7 * x:7 * x + 6], image), i
    assert (native[[4, 9]] == 255).all() and (native[:, 6] == 255).all()  # the gaps
    assert (native[10:, 7:] == 255).all()  # the empty cell
    assert np.array_equal(generation.make_grid(images, gw=2, min_width=13), native)  # already wide enough
    big = generation.make_grid(images, gw=2, min_width=27)  # 13 -> 39: the factor is 3
    assert big.shape == (42, 39, 1) and np.array_equal(big[::3, ::3], native)
    assert np.array_equal(big, native.repeat(3, axis=0).repeat(3, axis=1))

def test_grid(nets, tmp_path):
    run('--network', nets['cond'], '--outdir', tmp_path / 'o', '--seeds', '0-4', '--steps', 2, '--grid', tmp_path / 'g.png')
    upscaled = read_png(tmp_path / 'g.png')
    # 3 columns, 2 rows of 8x8 with 1-pixel gaps (26 x 17), repeated 20 times (the smallest factor reaching 512 pixels wide).
    assert upscaled.shape == (17 * 20, 26 * 20, 3)
    grid = upscaled[::20, ::20]
    assert np.array_equal(grid.repeat(20, axis=0).repeat(20, axis=1), upscaled)  # nearest: pixels only repeated
    images = read_images(tmp_path / 'o', range(5))
    for i, image in enumerate(images):
        y, x = divmod(i, 3)
        assert np.array_equal(grid[9 * y:9 * y + 8, 9 * x:9 * x + 8], image)
    assert (grid[8] == 255).all() and (grid[:, [8, 17]] == 255).all()  # white gaps between the cells
    assert (grid[9:, 18:] == 255).all()  # the empty sixth cell
    run('--network', nets['cond'], '--outdir', tmp_path / 'n', '--seeds', '0-4', '--steps', 2, '--grid', tmp_path / 'n.png',
        '--grid-width', 0)
    assert np.array_equal(read_png(tmp_path / 'n.png'), grid)  # --grid-width=0: the native size
    r = run('--network', nets['cond'], '--outdir', tmp_path / 'o', '--grid', tmp_path / 'o' / 'g.png', ok=False)
    assert r.exit_code == 1 and 'inside --outdir' in r.output

# Every file is written through a temporary file; it must still get the umask's permissions, the
# same for samples as for snapshots (a bare mkstemp would leave it owner-only, 0o600). A fresh
# process with umask 027 (group-readable, a common cluster setting), since the umask is read once.
UMASK_SCRIPT = """
import sys
import numpy as np
from fdm import load_network, save_snapshot
from training.evaluation.feature_stats import save_stats
from training.evaluation.generation import generate
from training.evaluation.snapshot_grid import save_sample_grid
network, out = sys.argv[1:]
generate(network, out + '/images', seeds=range(2), subdirs=True, num_steps=1, grid=out + '/grid.png', device='cpu', verbose=False)
net = load_network(network)
save_sample_grid(out + '/snapshot-grid.png', net, 4, 'cpu', num_steps=1)
save_snapshot(out + '/network-snapshot.pt', net)
save_stats(out + '/stats.npz', np.zeros(2), np.eye(2))
"""

def test_files_get_the_umask_permissions(nets, tmp_path):
    proc = subprocess.run([sys.executable, '-c', UMASK_SCRIPT, nets['cond'], str(tmp_path)], cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS='1'), preexec_fn=lambda: os.umask(0o027), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = ['images/generate_options.json', 'images/000000/000000.png', 'images/000000/000001.png', 'grid.png',
        'snapshot-grid.png', 'network-snapshot.pt', 'stats.npz']
    assert {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in files} == {name: '0o640' for name in files}

@pytest.mark.parametrize('args,message', [
    (['--network', '{tmp}/missing.pt'], 'no such file'),
    (['--seeds', '1,a'], 'not a list of non-negative integers'),
    (['--seeds', '5-2'], 'is empty'),
    (['--steps', '0'], '--steps'),
    (['--solver', 'dpm', '--disc', 'vp'], 'do not combine with --solver dpm'),
    (['--solver', 'edm', '--scaling', 'vp'], 'not --solver edm'),
    (['--dpm-order', '2'], 'only to --solver dpm'),
    (['--sigma_min', '5', '--sigma_max', '1'], 'noise range is empty'),
    (['--solver', 'bogus'], '--solver'),
])
def test_errors(nets, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if '--network' not in args:
        args += ['--network', nets['cond']]
    r = run(*args, '--outdir', tmp_path / 'out', ok=False)
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert 'Traceback' not in r.output and not isinstance(r.exception, (AssertionError, TypeError, ValueError))
    assert not os.path.exists(tmp_path / 'out' / '000000.png')

def test_damaged_network_file(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'PK\x03\x04 not really a zip')
    r = run('--network', bad, '--outdir', tmp_path / 'out', ok=False)
    assert r.exit_code == 1 and 'Error: --network' in r.output

def test_rank_batches():
    # The reference split: ceil(n / (batch W)) W parts; rank r takes parts r, r + W, ...
    seeds = list(range(10))
    assert generation.rank_batches(seeds, 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    r0, r1 = generation.rank_batches(seeds, 4, 0, 2), generation.rank_batches(seeds, 4, 1, 2)
    assert r0 == [[0, 1, 2], [6, 7]] and r1 == [[3, 4, 5], [8, 9]]  # parts of 3, 3, 2, 2
    for world in (1, 2, 3, 4):
        parts = [b for r in range(world) for b in generation.rank_batches(seeds, 3, r, world)]
        assert sorted(s for b in parts for s in b) == seeds and max(len(b) for b in parts) <= 3
    assert dnnlib.util.format_int_list([0, 1, 2, 7, 9, 10]) == '0-2,7,9-10'
    assert generation.parse_seeds('0-2,7,9-10') == [0, 1, 2, 7, 9, 10]

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_batch_independence(nets, tmp_path):
    # On the GPU the per-seed generators are CUDA generators; images still ignore the batching
    # (cuDNN may pick other kernels per batch size: equal up to rounding).
    opts = ['--network', nets['cond'], '--seeds', '0-4', '--steps', 3, '--S_churn', 10, '--device', 'cuda']
    run(*opts, '--outdir', tmp_path / 'b2', '--batch', 2)
    run(*opts, '--outdir', tmp_path / 'b5', '--batch', 5)
    assert_same_up_to_rounding(read_images(tmp_path / 'b2', range(5)), read_images(tmp_path / 'b5', range(5)))
    s = json.loads((tmp_path / 'b2' / 'generate_options.json').read_text())
    assert s['device'] == 'cuda'

@pytest.mark.slow
def test_two_processes_give_the_same_images(nets, tmp_path):
    # torchrun-style: two gloo ranks on the CPU split the seeds; every image is as in one process
    # (up to rounding: the ranks' batches are [0, 1], [3] and [2], [4], not [0, 1], [2, 3], [4]).
    run('--network', nets['cond'], '--outdir', tmp_path / 'one', '--seeds', '0-4', '--steps', 3, '--batch', 2, '--S_churn', 10)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'generate.py'), '--network', nets['cond'],
            '--outdir', str(tmp_path / 'two'), '--seeds', '0-4', '--steps', '3', '--batch', '2', '--S_churn', '10',
            '--device', 'cpu'], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert_same_up_to_rounding(read_images(tmp_path / 'two', range(5)), read_images(tmp_path / 'one', range(5)))
    s = json.loads((tmp_path / 'two' / 'generate_options.json').read_text())
    assert s['world_size'] == 2

#----------------------------------------------------------------------------
# The options generate.py leaves out are None and take the library's defaults (generate's signature,
# select_sampler's); --help states those very defaults. The float options keep the library's value
# as their click default (generate_options.json has always recorded them as floats, rho 7.0).

def test_help_states_the_library_defaults():
    options = {param.name: param for param in generate.main.params}
    signature = inspect.signature(generation.generate).parameters
    sampler_defaults = generation.select_sampler()[1]
    shown = dict(seeds=dnnlib.util.format_int_list(signature['seeds'].default), num_steps=sampler_defaults['num_steps'],
        grid_width=signature['grid_width'].default, precision=signature['precision'].default)
    for name, default in shown.items():
        assert options[name].help.endswith(f'  [default: {default}]') and not options[name].show_default, options[name].help
    for name in ['rho', 'S_churn', 'S_min', 'S_max', 'S_noise']:
        assert options[name].default == sampler_defaults[name] and options[name].show_default, name
    context = generate.main.make_context('generate', ['--network=n', '--outdir=o'])
    assert all(context.params[name] is None for name in shown) and context.params['rho'] == 7.0

#----------------------------------------------------------------------------

def test_absurd_seed_range_is_refused_before_allocating():
    import click
    with pytest.raises(click.BadParameter, match='more than'):
        generation.parse_seeds('0-999999999')
    assert len(generation.parse_seeds('0-49999')) == 50000
