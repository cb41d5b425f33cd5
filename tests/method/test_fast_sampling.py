"""The fast sampling paths against their exact counterparts: churn planned on the host (no
per-step host sync, needless noise draws skipped), padded batches, torch.compile, and the
automatic batch size."""

import json
import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from fdm.io.network_files import save_snapshot
from fdm.dpm_solver import dpm_solver_sampler
from fdm.preconditioning import iDDPMPrecond
from fdm.samplers import (PerSeedGenerator, _ablation_schedule, _ablation_sigma_steps, ablation_sampler,
    ablation_sigma_range, edm_sampler)
from fdm.schedules import edm_sigma_steps, iddpm_sigmas
from torch_utils.cli.compile_modes import COMPILE_MODES
from training.evaluation import generation

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

@pytest.fixture(scope='module')
def tiny_net(make_tiny_net):
    """The conditional 8x8 denoiser; tiny_net(channel_mult=(1,), ...) for other sizes."""
    return lambda **kwargs: make_tiny_net(**kwargs).requires_grad_(False)

# D for data ~ N(0, 1/4), with sigma snapped to the iDDPM table exactly as iDDPMPrecond does,
# so that a churned t_hat can round back to t_cur.
class TableDenoiser:
    u = iddpm_sigmas()
    sigma_min, sigma_max = float(u[-2]), float(u[0])
    round_sigma = iDDPMPrecond.round_sigma

    def __call__(self, x, sigma, class_labels=None):
        return x * 0.25 / (0.25 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)

class CountingNoise:
    def __init__(self, seeds):
        self.rnd, self.draws = PerSeedGenerator('cpu', seeds), 0

    def __call__(self, x):
        self.draws += 1
        return self.rnd.randn_like(x)

#----------------------------------------------------------------------------
# The sampler loops as they were before the fast path (and as the reference writes them):
# gamma decided by comparing device tensors, noise drawn at every step.

def reference_edm_sampler(net, latents, class_labels, randn_like, num_steps, S_churn=0, S_min=0,
        S_max=float('inf'), S_noise=1):
    t_steps = edm_sigma_steps(num_steps, max(0.002, net.sigma_min), min(80, net.sigma_max), 7, net.round_sigma)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

def reference_ablation_sampler(net, latents, randn_like, num_steps, discretization, schedule, scaling,
        S_churn=0, S_min=0, S_max=float('inf')):
    sigma_min, sigma_max = ablation_sigma_range(net, discretization)
    vp_beta_d = 2 * (math.log(sigma_min ** 2 + 1) / 1e-3 - math.log(sigma_max ** 2 + 1)) / (1e-3 - 1)
    vp_beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    sigma, sigma_deriv, sigma_inv = _ablation_schedule(schedule, vp_beta_d, vp_beta_min)
    s = (lambda t: 1 / (1 + sigma(t) ** 2).sqrt()) if scaling == 'vp' else (lambda t: torch.ones_like(t))
    s_deriv = (lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)) if scaling == 'vp' else (lambda t: torch.zeros_like(t))
    slope = lambda x, t: sigma_deriv(t) * (x - s(t) * net(x / s(t), sigma(t)).to(torch.float64)) / sigma(t) \
        + s_deriv(t) / s(t) * x
    sigma_steps = _ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, 7, 1e-3,
        (vp_beta_d, vp_beta_min), (0.001, 0.008, 1000), latents.device)
    t_steps = sigma_inv(torch.as_tensor(net.round_sigma(sigma_steps), dtype=torch.float64))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        sigma_cur = sigma(t_cur)
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0
        t_hat = sigma_inv(torch.as_tensor(net.round_sigma(sigma_cur + gamma * sigma_cur), dtype=torch.float64))
        x_hat = s(t_hat) / s(t_cur) * x_cur \
            + (sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() * s(t_hat) * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        if i == num_steps - 1:
            x_next = x_hat + h * d_cur
            continue
        d_prime = slope(x_hat + h * d_cur, t_next)
        x_next = x_hat + h * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#----------------------------------------------------------------------------
# EDM sampler: bit for bit the reference loop; draws only while they can matter.

def edm_sigmas(n):
    # Eq. 5 with sigma 0.002..80, rho 7, computed independently of fdm.schedules.
    return [(80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)]

@pytest.mark.parametrize('churn', [dict(), dict(S_churn=40), dict(S_churn=40, S_min=5, S_max=50),
    dict(S_churn=40, S_max=1), dict(S_churn=40, S_noise=1.007), dict(S_churn=40, S_min=100)])
def test_edm_sampler_is_the_reference_loop(churn, tiny_net):
    seeds, n = [3, 7, 11], 6
    net, labels = tiny_net(), torch.eye(4)[[0, 2, 3]]
    latents = PerSeedGenerator('cpu', seeds).randn([3, 3, 8, 8])
    fast, ref = CountingNoise(seeds), CountingNoise(seeds)
    a = edm_sampler(net, latents, labels, randn_like=fast, num_steps=n, **churn)
    b = reference_edm_sampler(net, latents, labels, ref, n, **churn)
    assert torch.equal(a, b)
    # Draws up to the last churned step: sigma_i is decreasing, so that is the number of
    # sigma_i >= S_min (when some sigma_i <= S_max); none without churn.
    sigmas = edm_sigmas(n)
    churned = [i for i, s in enumerate(sigmas) if churn.get('S_min', 0) <= s <= churn.get('S_max', math.inf)]
    expected = churned[-1] + 1 if churn.get('S_churn', 0) and churned else 0
    assert (fast.draws, ref.draws) == (expected, n)
    if 'S_min' in churn and churn['S_min'] == 5:
        assert expected == 3  # sigma = 80, 24.4, 5.84, 0.965, 0.085, 0.002

@pytest.mark.parametrize('S_churn', [0, 0.3, 2])
def test_edm_sampler_with_rounded_sigmas(S_churn):
    # iDDPM's table: a small gamma can round t_hat back to t_cur, where no noise is needed.
    seeds = [0, 1]
    latents = PerSeedGenerator('cpu', seeds).randn([2, 1, 4, 4]).to(torch.float64)
    fast, ref = CountingNoise(seeds), CountingNoise(seeds)
    a = edm_sampler(TableDenoiser(), latents, randn_like=fast, num_steps=8, S_churn=S_churn)
    b = reference_edm_sampler(TableDenoiser(), latents, None, ref, 8, S_churn=S_churn)
    assert torch.equal(a, b) and fast.draws <= ref.draws == 8
    assert (fast.draws == 0) == (S_churn == 0)

@pytest.mark.parametrize('disc,schedule,scaling', [('edm', 'linear', 'vp'), ('iddpm', 'linear', 'none'),
    ('vp', 'vp', 'vp'), ('ve', 've', 'none')])
@pytest.mark.parametrize('churn', [dict(), dict(S_churn=30, S_min=0.5, S_max=20)])
def test_ablation_sampler_is_the_reference_loop(disc, schedule, scaling, churn):
    seeds = [4, 5]
    latents = PerSeedGenerator('cpu', seeds).randn([2, 1, 4, 4]).to(torch.float64)
    fast, ref = CountingNoise(seeds), CountingNoise(seeds)
    a = ablation_sampler(TableDenoiser(), latents, randn_like=fast, num_steps=5, discretization=disc,
        schedule=schedule, scaling=scaling, **churn)
    b = reference_ablation_sampler(TableDenoiser(), latents, ref, 5, disc, schedule, scaling, **churn)
    assert torch.equal(a, b)
    # VP/VE schedules: sigma^-1(sigma(t)) need not be t, so every step still draws. Linear:
    # the sigmas are 80.2, 18.9, 3.15, 0.276, 0.0064 (edm) or 80.2, 2.37, 1.00, 0.423, 0.0064
    # (iddpm); the last in [0.5, 20] is step 2, so 3 draws.
    assert ref.draws == 5 and fast.draws == (5 if schedule != 'linear' else (3 if churn else 0))

#----------------------------------------------------------------------------
# Padded batches and torch.compile.

def test_padded_batch_gives_the_same_images(tiny_net):
    # Churn, so that the per-step noise matters; a conditional net, so the class draw does too.
    # Batches of 2, 5 and 3 images run other CPU convolution kernels, whose float32 sums round
    # differently: measured max |difference| 2.7e-5 on these float64 images (3.1117 vs 3.1116 on
    # other processors), against ~1 between different seeds. Allowed: 1e-3.
    net, kw = tiny_net(), dict(num_steps=3, S_churn=10)
    plain = generation.generate_batch(net, 'edm', kw, [5, 6], 'cpu')
    padded = generation.generate_batch(net, 'edm', kw, [5, 6], 'cpu', pad_to=5)
    other = generation.generate_batch(net, 'edm', kw, [6, 9, 9], 'cpu')  # (a batch of one takes other CPU kernels)
    assert padded.shape == plain.shape == (2, 3, 8, 8)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-3)
    torch.testing.assert_close(other[0], plain[1], rtol=0, atol=1e-3)
    assert (plain[0] - plain[1]).abs().max() > 0.1  # the seeds do differ, far beyond the tolerance
    assert torch.equal(generation.generate_batch(net, 'edm', kw, [5, 6], 'cpu'), plain)  # same shape: bit for bit

@pytest.mark.slow
def test_compiled_sampling_matches_eager(tmp_path, tiny_net):
    # Inductor on the CPU fuses and reorders float32 operations: measured differences 5e-7 on
    # the denoiser (|D| <= 1) and 2.7e-5 on the float64 images after 5 evaluations; the
    # uint8 images were identical. Tolerances: 1e-4 and at most one level on a few pixels.
    net = tiny_net(channel_mult=(1,), attn_resolutions=())  # small: the first compile takes ~40 s
    compiled = generation.compile_net(net)
    assert compiled.model is not net.model and net.model is compiled.model._orig_mod
    assert not isinstance(net.model, torch._dynamo.eval_frame.OptimizedModule)  # net itself untouched
    kw = dict(num_steps=3, S_churn=10)
    eager = generation.generate_batch(net, 'edm', kw, [0, 1, 2], 'cpu')
    fast = generation.generate_batch(compiled, 'edm', kw, [0, 1, 2], 'cpu')
    assert (fast - eager).abs().max() < 1e-4 and not torch.equal(eager, generation.generate_batch(net, 'edm',
        dict(num_steps=3), [0, 1, 2], 'cpu'))
    short = generation.generate_batch(compiled, 'edm', kw, [1, 2], 'cpu', pad_to=3)  # same shape, no recompile
    assert (short - eager[1:]).abs().max() < 1e-4

    # End to end: seeds 0-4 in batches of 3 and 2, the second padded to 3.
    shapes = []
    real_generate_batch = generation.generate_batch
    def spy(*args, **kwargs):
        shapes.append((len(args[3]), kwargs['pad_to']))
        return real_generate_batch(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, 'generate_batch', spy)
        s = generation.generate(net, str(tmp_path / 'c'), seeds=range(5), max_batch_size=3, device='cpu',
            compile=True, num_steps=3, S_churn=10, verbose=False)
    generation.generate(net, str(tmp_path / 'e'), seeds=range(5), max_batch_size=3, device='cpu', num_steps=3,
        S_churn=10, verbose=False)
    assert shapes == [(3, 3), (2, 3)] and s['compile'] is True and s['compile_mode'] == 'default'
    read = lambda d: np.stack([np.asarray(PIL.Image.open(generation.image_path(str(d), i))) for i in range(5)]).astype(int)
    diff = np.abs(read(tmp_path / 'c') - read(tmp_path / 'e'))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01

#----------------------------------------------------------------------------
# The automatic batch size, and errors.

def test_auto_batch_size(tmp_path, tiny_net):
    assert generation.auto_batch_size('cpu', 32) == generation.auto_batch_size('cpu', 512) == 64
    assert generation.auto_batch_size('cuda', 32) == 512 and generation.auto_batch_size('cuda', 8) == 8192
    assert generation.auto_batch_size('cuda', 64) == 128 and generation.auto_batch_size('cuda', 256) == 64
    net = tiny_net()
    s = generation.generate(net, str(tmp_path / 'a'), seeds=[0], device='cpu', num_steps=1, verbose=False)
    assert s['max_batch_size'] == 64 and s['batch_auto'] is True and s['compile'] is False
    written = json.loads((tmp_path / 'a' / 'generate_options.json').read_text())
    assert written['max_batch_size'] == 64 and written['batch_auto'] is True
    s = generation.generate(net, str(tmp_path / 'b'), seeds=[0], max_batch_size=5, device='cpu', num_steps=1,
        verbose=False)
    assert s['max_batch_size'] == 5 and s['batch_auto'] is False

@pytest.fixture(scope='module')
def net_file(tmp_path_factory, tiny_net):
    path = str(tmp_path_factory.mktemp('net') / 'net.pt')
    save_snapshot(path, tiny_net())
    return path

def run(*args):
    return CliRunner().invoke(generate.main, [str(a) for a in args] + ['--device', 'cpu'])

def test_out_of_memory_is_a_one_line_error(net_file, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(generation, 'generate_batch', out_of_memory)
    r = run('--network', net_file, '--outdir', tmp_path, '--seeds', '0-9', '--batch', 10)
    assert r.exit_code == 1 and 'Traceback' not in r.output
    assert r.output.strip().splitlines()[-1] == 'Error: out of memory on cpu at --batch 10; lower --batch (e.g. --batch 5)'

def test_compile_options(net_file, tmp_path):
    r = run('--network', net_file, '--outdir', tmp_path, '--compile-mode', 'reduce-overhead')
    assert r.exit_code == 1 and '--compile-mode applies only with --compile' in r.output
    r = run('--network', net_file, '--outdir', tmp_path, '--compile', '--compile-mode', 'fastest')
    assert r.exit_code == 2 and 'fastest' in r.output

#----------------------------------------------------------------------------
# On a GPU: the sampler loops make no host sync per step, and every compile mode matches eager.

def count_syncs(fn):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('sampler,kw', [(edm_sampler, dict()), (edm_sampler, dict(S_churn=10)),
    (ablation_sampler, dict(solver='euler', discretization='vp', schedule='vp', scaling='vp')),
    (dpm_solver_sampler, dict()), (dpm_solver_sampler, dict(method='multistep'))])
def test_no_host_sync_per_step_on_cuda(sampler, kw, tiny_net):
    net = tiny_net().cuda()
    latents, labels = torch.randn(4, 3, 8, 8, device='cuda'), torch.eye(4, device='cuda')
    noise = PerSeedGenerator('cuda', range(4)).randn_like
    syncs = [count_syncs(lambda: sampler(net, latents, labels, randn_like=noise, num_steps=n, **kw)) for n in (3, 9)]
    assert syncs[0] == syncs[1] <= 2, syncs  # a constant set-up cost, nothing per step

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('mode', COMPILE_MODES[:2])
def test_compile_modes_match_eager_on_cuda(mode, tiny_net):
    net = tiny_net().cuda()
    kw = dict(num_steps=4, S_churn=10)
    eager = generation.generate_batch(net, 'edm', kw, range(6), 'cuda')
    compiled = generation.compile_net(net, mode)
    for _ in range(2):  # CUDA graphs: recorded on one call, replayed on the next
        fast = generation.generate_batch(compiled, 'edm', kw, range(6), 'cuda')
        assert (fast - eager).abs().max() < 1e-3
