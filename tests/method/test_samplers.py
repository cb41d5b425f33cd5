"""Samplers on Gaussian data, where the exact denoiser and the exact ODE solution are known
(conftest's gaussian_denoiser): EDM's Heun sampler, its ablations, DPM-Solver++, the time steps,
per-seed generators.

Data ~ N(0, s_d^2) gives D(x; sigma) = x s_d^2 / (s_d^2 + sigma^2), and the probability-flow
ODE carries x(sigma_a) to x(sigma_b) = x(sigma_a) sqrt(sigma_b^2 + s_d^2) / sqrt(sigma_a^2 + s_d^2).
"""

import inspect
import math

import numpy as np
import pytest
import torch

from fdm.dpm_solver import (dpm_solver_sampler, multistep_orders, multistep_update, singlestep_orders,
    singlestep_update, time_steps)
from fdm.samplers import (SAMPLERS, PerSeedGenerator, ablation_sampler, ablation_sigma_range, edm_sampler,
    sampler_nfe, sampler_settings, sampler_sigma_range)
from fdm.schedules import default_sigma_range, edm_sigma_steps

S_D = 0.5  # gaussian_denoiser's default data scale

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

@pytest.fixture(scope='module')
def exact_flow(gaussian_denoiser):
    return gaussian_denoiser().exact_flow

def latents(n=4, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def rel_error(x, exact):
    return ((x - exact).abs().max() / exact.abs().max()).item()

def per_seed_noise(seeds):
    return PerSeedGenerator('cpu', seeds).randn_like

#----------------------------------------------------------------------------
# EDM's Heun sampler (Algorithm 2 of Karras et al. 2022) and its time steps (Equation 5).

def test_heun_solves_gaussian_ode(gaussian_denoiser):
    latents = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = latents.double() * 80 * 0.5 / math.sqrt(80 ** 2 + 0.25)
    net = gaussian_denoiser()
    x0 = edm_sampler(net, latents, num_steps=18)
    assert net.calls == 2 * 18 - 1 and x0.dtype == torch.float64
    errors = [((edm_sampler(gaussian_denoiser(), latents, num_steps=n) - exact) / exact).abs().max().item() for n in (40, 80)]
    assert errors[1] < 3e-3  # measured 2.3e-3 relative at 80 steps
    assert 3.0 < errors[0] / errors[1] < 5.5  # Heun is second order: halving the step quarters the error

def test_time_steps():
    t = edm_sigma_steps(18, 0.002, 80, 7)
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(t[:-1].numpy(), expected, rtol=1e-14)
    assert t[-1] == 0 and t.dtype == torch.float64
    assert edm_sigma_steps(1, 0.002, 80).tolist() == [80.0, 0.0]  # the reference divides by zero here

def test_noise_drawn_every_step_and_churn(gaussian_denoiser):
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = []

    def counting_randn_like(x):
        draws.append(x.shape)
        return torch.randn_like(x)

    edm_sampler(gaussian_denoiser(), latents, randn_like=counting_randn_like, num_steps=5)
    assert len(draws) == 0  # S_churn = 0: every draw would be multiplied by 0, so none is made
    edm_sampler(gaussian_denoiser(), latents, randn_like=counting_randn_like, num_steps=5, S_churn=1)
    assert len(draws) == 5  # with churn, one draw per step as the reference

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return edm_sampler(gaussian_denoiser(), latents, randn_like=lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g),
            num_steps=10, **kw)

    det = run(0)
    assert torch.equal(det, run(1))  # without churn the noise is multiplied by zero
    a, b = run(0, S_churn=40), run(0, S_churn=40)
    assert torch.equal(a, b) and not torch.allclose(a, det)

def test_sigma_range_clamped_to_network(gaussian_denoiser):
    net = gaussian_denoiser(sigma_min=0.02, sigma_max=10.0)
    edm_sampler(net, torch.zeros(1, 1, 2, 2), num_steps=4, sigma_min=0.002, sigma_max=80)
    assert max(net.sigmas) == pytest.approx(10.0) and min(s for s in net.sigmas if s > 0) == pytest.approx(0.02)

#----------------------------------------------------------------------------
# The ablation sampler.

@pytest.mark.parametrize('num_steps', [1, 2, 7])
@pytest.mark.parametrize('S_churn', [0, 30])
def test_ablation_defaults_are_edm_sampler_bit_for_bit(num_steps, S_churn, gaussian_denoiser):
    x = latents().to(torch.float32)
    a = edm_sampler(gaussian_denoiser(), x, randn_like=per_seed_noise([1, 2, 3, 4]), num_steps=num_steps, S_churn=S_churn)
    b = ablation_sampler(gaussian_denoiser(), x, randn_like=per_seed_noise([1, 2, 3, 4]), num_steps=num_steps, S_churn=S_churn)
    assert torch.equal(a, b)

def test_ablation_defaults_are_edm_sampler_on_a_network(make_tiny_net):
    net = make_tiny_net().requires_grad_(False)
    x = PerSeedGenerator('cpu', [5, 6]).randn([2, 3, 8, 8])
    labels = torch.eye(4)[[1, 3]]
    kw = dict(num_steps=4, S_churn=20, S_min=0.05, S_max=50)
    a = edm_sampler(net, x, labels, randn_like=per_seed_noise([5, 6]), **kw)
    b = ablation_sampler(net, x, labels, randn_like=per_seed_noise([5, 6]), **kw)
    assert torch.equal(a, b)
    c = ablation_sampler(net, x, labels, randn_like=per_seed_noise([5, 6]), solver='euler', **kw)
    assert not torch.allclose(a, c)  # the network is not trivial: the solver matters

# (discretization, schedule, scaling): VP, VE, iDDPM and EDM samplers of Table 1, plus mixes.
ABLATIONS = [('vp', 'vp', 'vp'), ('ve', 've', 'none'), ('iddpm', 'linear', 'none'), ('edm', 'linear', 'none'),
    ('edm', 'vp', 'vp'), ('vp', 'linear', 'none')]

@pytest.mark.parametrize('disc,schedule,scaling', ABLATIONS)
def test_ablation_solves_gaussian_ode(disc, schedule, scaling, gaussian_denoiser, exact_flow):
    x = latents()
    sigma_max = ablation_sigma_range(gaussian_denoiser(), disc)[1]
    exact = exact_flow(x * sigma_max, sigma_max, 0)
    err = {}
    for solver in ('euler', 'heun'):
        err[solver] = [rel_error(ablation_sampler(gaussian_denoiser(), x, num_steps=n, solver=solver, discretization=disc,
            schedule=schedule, scaling=scaling), exact) for n in (32, 64)]
    # Measured: Euler ratios 1.9-2.4, Heun 3.9-5.1 (first and second order).
    assert 1.6 < err['euler'][0] / err['euler'][1] < 3.0
    assert 3.2 < err['heun'][0] / err['heun'][1] < 6.0
    assert err['heun'][1] < 0.05 and err['heun'][1] < err['euler'][1]

def test_ablation_alpha(gaussian_denoiser, exact_flow):
    # The second slope at 3/4 of the step (Algorithm 1's alpha) is still second order.
    x = latents()
    exact = exact_flow(x * 80, 80, 0)
    e = [rel_error(ablation_sampler(gaussian_denoiser(), x, num_steps=n, alpha=0.75), exact) for n in (32, 64)]
    assert 3.2 < e[0] / e[1] < 6.0  # measured 4.0

# EDM's default range (Table 1: sigma_min 0.002, sigma_max 80) from its one home: in edm_sampler's
# and DPM-Solver++'s signatures as the reference writes them (80 an integer, as generate_options.json
# records it), and where a sampler fills in a range left as None.
def test_default_sigma_range(gaussian_denoiser):
    for sampler in (edm_sampler, dpm_solver_sampler, edm_sigma_steps):
        params = inspect.signature(sampler).parameters
        assert (params['sigma_min'].default, params['sigma_max'].default) == (0.002, 80)
        assert type(params['sigma_max'].default) is int
    assert default_sigma_range() == (0.002, 80.0) and default_sigma_range('ve') == (0.02, 100.0)
    net = gaussian_denoiser()
    assert sampler_sigma_range('edm', net) == sampler_sigma_range('dpm', net) == (0.002, 80.0)
    assert sampler_sigma_range('dpm', gaussian_denoiser(sigma_max=10.0)) == (0.002, 80.0)  # DPM-Solver++ does not clamp
    assert sampler_sigma_range('edm', gaussian_denoiser(sigma_max=10.0)) == (0.002, 10.0)
    dpm_solver_sampler(net, latents(), num_steps=3, sigma_min=None, sigma_max=None)
    assert net.sigmas[0] == 80.0 and net.sigmas[-1] == 0.002
    with pytest.raises(ValueError, match='discretization'):
        default_sigma_range('cosine')

def test_ablation_sigma_ranges(gaussian_denoiser):
    vp_min = math.sqrt(math.exp(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3) - 1)  # sigma(1e-3), VP defaults
    vp_max = math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)  # sigma(1)
    net = gaussian_denoiser()
    assert ablation_sigma_range(net, 'vp') == pytest.approx((vp_min, vp_max), rel=1e-12)
    assert ablation_sigma_range(net, 've') == (0.02, 100)
    assert ablation_sigma_range(net, 'iddpm') == (0.002, 81)
    assert ablation_sigma_range(net, 'edm') == (0.002, 80)
    assert ablation_sigma_range(gaussian_denoiser(sigma_min=0.02, sigma_max=10.0), 'edm') == (0.02, 10)  # clamped to the network
    for disc, first in [('vp', vp_max), ('ve', 100), ('edm', 80)]:
        net = gaussian_denoiser()
        ablation_sampler(net, latents(), num_steps=5, discretization=disc)
        assert net.sigmas[0] == pytest.approx(first, rel=1e-9)
    net = gaussian_denoiser()  # iDDPM: the largest table entry below 81
    ablation_sampler(net, latents(), num_steps=5, discretization='iddpm')
    assert 70 < net.sigmas[0] <= 81

#----------------------------------------------------------------------------
# Network evaluations per image.

@pytest.mark.parametrize('num_steps', [1, 2, 3, 4, 5, 7, 18])
def test_nfe_counts(num_steps, gaussian_denoiser):
    cases = [('edm', {}, 2 * num_steps - 1), ('ablation', dict(solver='heun'), 2 * num_steps - 1),
        ('ablation', dict(solver='euler'), num_steps)]
    for order in (1, 2, 3):
        for method in ('singlestep', 'multistep'):
            for denoise in (True, False):
                cases.append(('dpm', dict(order=order, method=method, denoise_to_zero=denoise), num_steps))
    for name, kw, expected in cases:
        net = gaussian_denoiser()  # records every sigma it is called with
        SAMPLERS[name](net, latents(), num_steps=num_steps, **kw)
        assert len(net.sigmas) == expected == sampler_nfe(name, num_steps, **kw), (name, kw)

#----------------------------------------------------------------------------
# DPM-Solver++.

def test_dpm_order1_is_ddim(gaussian_denoiser):
    # DDIM on a geometric grid t_0 = 80 > ... > t_K = 0.002: x <- (t'/t) x + (1 - t'/t) D(x; t),
    # then D(x; 0.002). For Gaussian data each step multiplies x by a known scalar.
    K = 9
    t = [80 * (0.002 / 80) ** (i / K) for i in range(K + 1)]
    factor = 80.0
    for a, b in zip(t[:-1], t[1:]):
        factor *= b / a + (1 - b / a) * S_D ** 2 / (S_D ** 2 + a ** 2)
    factor *= S_D ** 2 / (S_D ** 2 + 0.002 ** 2)
    x = latents()
    for method in ('singlestep', 'multistep'):
        out = dpm_solver_sampler(gaussian_denoiser(), x, num_steps=K + 1, order=1, method=method)
        np.testing.assert_allclose(out.numpy(), (x * factor).numpy(), rtol=1e-12)

@pytest.mark.parametrize('order', [1, 2, 3])
def test_dpm_single_update_local_order(order, exact_flow):
    # One update from s to t = s e^{-h}: local error O(h^{order + 1}).
    x, s = latents(), 0.7
    den = lambda x, t: x * S_D ** 2 / (S_D ** 2 + t ** 2)
    r = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}[order]
    errs = []
    for h in (0.2, 0.1, 0.05):
        t = s * math.exp(-h)
        errs.append(rel_error(singlestep_update(den, x, s, t, order, *r), exact_flow(x, s, t)))
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(order + 0.7 < q < order + 1.3 for q in rates), rates  # measured 1.9/2.9/3.8

@pytest.mark.parametrize('order', [1, 2, 3])
def test_dpm_multistep_update_local_order(order, exact_flow):
    # History from the exact solution on a geometric grid; local error O(h^{order + 1}). (The
    # DPM-Solver reference code halves the D'' term of the 3rd-order update, which makes it
    # only 2nd order; ours is 3rd order.)
    x_T, T = latents(), 1.0
    den = lambda x, t: x * S_D ** 2 / (S_D ** 2 + t ** 2)
    errs = []
    for h in (0.1, 0.05, 0.025):
        times = [T * math.exp(-h * k) for k in range(order)]
        values = [den(exact_flow(x_T, T, u), u) for u in times]
        t = times[-1] * math.exp(-h)
        x = exact_flow(x_T, T, times[-1])
        errs.append(rel_error(multistep_update(x, times, values, t, order), exact_flow(x_T, T, t)))
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(order + 0.7 < q < order + 1.45 for q in rates), rates  # measured 2.0/3.0/4.3 (-> 4)

@pytest.mark.parametrize('method,order,steps,low,high', [
    ('singlestep', 1, (8, 16, 32), 0.8, 1.2), ('singlestep', 2, (8, 16, 32), 1.6, 2.3),
    ('singlestep', 3, (11, 23, 47), 2.6, 5.0),  # 3k+2 steps: all 3rd order but a final 2nd-order step
    ('multistep', 1, (8, 16, 32), 0.8, 1.2), ('multistep', 2, (16, 32, 64), 1.6, 2.3)])
def test_dpm_global_convergence(method, order, steps, low, high, gaussian_denoiser, exact_flow):
    # Solver only (no final denoising), sigma 5 -> 0.05 on the logSNR grid.
    x = latents()
    exact = exact_flow(x * 5, 5, 0.05)
    errs = [rel_error(dpm_solver_sampler(gaussian_denoiser(), x, num_steps=n, sigma_min=0.05, sigma_max=5,
        order=order, method=method, denoise_to_zero=False), exact) for n in steps]
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(low < q < high for q in rates), rates

def test_dpm_default_grid_not_clamped(gaussian_denoiser):
    # FDM's setting: 18 steps = 17 solver evaluations (orders 3,3,3,3,3,2 on a 6-interval
    # logSNR grid from 80 to 0.002) + D at 0.002; the network's own range is not applied.
    outer = [80 * (0.002 / 80) ** (k / 6) for k in range(7)]
    expected = []
    for k, order in enumerate([3, 3, 3, 3, 3, 2]):
        s, t = outer[k], outer[k + 1]
        expected += [s * (t / s) ** (j / order) for j in range(order)]
    expected.append(0.002)
    net = gaussian_denoiser(sigma_min=0.02, sigma_max=10.0)
    dpm_solver_sampler(net, latents(), num_steps=18)
    np.testing.assert_allclose(net.sigmas, expected, rtol=1e-12)
    assert net.sigmas[0] == 80 and net.sigmas[-1] == 0.002

def test_dpm_time_grids():
    np.testing.assert_allclose(time_steps('logSNR', 80, 0.002, 4), [80 * (0.002 / 80) ** (i / 4) for i in range(5)], rtol=1e-13)
    np.testing.assert_allclose(time_steps('time_uniform', 80, 0.002, 4), np.linspace(80, 0.002, 5), rtol=1e-13)
    np.testing.assert_allclose(time_steps('time_quadratic', 80, 0.002, 4),
        np.linspace(80 ** 0.5, 0.002 ** 0.5, 5) ** 2, rtol=1e-13)
    with pytest.raises(ValueError):
        time_steps('cosine', 80, 0.002, 4)

def test_dpm_order_schedules():
    # The "DPM-Solver-fast" table (DPM-Solver, Lu et al. 2022a): orders add up to the step count.
    assert singlestep_orders(17, 3) == [3, 3, 3, 3, 3, 2]
    assert singlestep_orders(16, 3) == [3, 3, 3, 3, 3, 1]
    assert singlestep_orders(15, 3) == [3, 3, 3, 3, 2, 1]
    assert singlestep_orders(3, 3) == [2, 1] and singlestep_orders(1, 3) == [1] and singlestep_orders(0, 3) == []
    assert singlestep_orders(5, 2) == [2, 2, 1] and singlestep_orders(3, 1) == [1, 1, 1]
    for n in range(30):
        assert sum(singlestep_orders(n, 3)) == n
    # Multistep: warm-up from order 1; lower final orders only below 10 steps (as the reference).
    assert multistep_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert multistep_orders(6, 3, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
    assert multistep_orders(12, 3) == [1, 2] + [3] * 10
    assert multistep_orders(2, 3) == [1, 1]

def test_dpm_draws_no_noise_and_checks_options(gaussian_denoiser):
    calls = []
    randn_like = lambda x: calls.append(1) or torch.randn_like(x)
    a = dpm_solver_sampler(gaussian_denoiser(), latents(), randn_like=randn_like, rho=3, S_churn=40)
    b = dpm_solver_sampler(gaussian_denoiser(), latents())
    assert not calls and torch.equal(a, b)  # deterministic; rho and churn ignored
    with pytest.raises(TypeError):
        dpm_solver_sampler(gaussian_denoiser(), latents(), sigma_mni=0.1)  # a typo is not silently ignored
    # Its options are checked where they enter (generation.select_sampler), not by the sampler.
    from torch_utils.errors import UserError
    from training.evaluation.generation import select_sampler
    for bad in [dict(dpm_order=4), dict(dpm_method='adaptive'), dict(dpm_skip='cosine'), dict(sigma_min=1, sigma_max=0.5),
            dict(sigma_min=100), dict(num_steps=0)]:
        with pytest.raises(UserError):
            select_sampler(solver='dpm', **bad)
    for bad in [dict(disc='cosine'), dict(schedule='cosine'), dict(scaling='cosine'), dict(solver='rk4')]:
        with pytest.raises(UserError, match='unknown --'):
            select_sampler(**bad)
    # One step: no solver step, only D at sigma_max (the reference crashes here).
    net = gaussian_denoiser()
    out = dpm_solver_sampler(net, latents(), num_steps=1)
    assert net.sigmas == [80]
    np.testing.assert_allclose(out.numpy(), (latents() * 80 * S_D ** 2 / (S_D ** 2 + 80 ** 2)).numpy(), rtol=1e-12)

#----------------------------------------------------------------------------
# Per-seed generators and the registry.

def test_per_seed_generator_is_batch_independent():
    a = PerSeedGenerator('cpu', [7, 8, 9])
    b = PerSeedGenerator('cpu', [9])
    xa = a.randn([3, 2, 4])
    xb = b.randn([1, 2, 4])
    assert torch.equal(xa[2], xb[0])
    ia, ib = a.randint(10, size=[3]), b.randint(10, size=[1])
    assert ia[2] == ib[0]
    na, nb = a.randn_like(torch.zeros(3, 5, dtype=torch.float64)), b.randn_like(torch.zeros(1, 5, dtype=torch.float64))
    assert na.dtype == torch.float64 and torch.equal(na[2], nb[0])
    # Same as one plain generator per seed, seeded modulo 2^32.
    g = torch.Generator().manual_seed(9)
    assert torch.equal(xb[0], torch.randn([2, 4], generator=g))
    assert torch.equal(PerSeedGenerator('cpu', [2 ** 32 + 9]).randn([1, 2, 4])[0], xb[0])
    with pytest.raises(ValueError):
        a.randn([2, 4])

def test_registry_and_settings():
    assert SAMPLERS == dict(edm=edm_sampler, ablation=ablation_sampler, dpm=dpm_solver_sampler)
    s = sampler_settings('dpm', num_steps=10)
    assert s['num_steps'] == 10 and s['order'] == 3 and s['method'] == 'singlestep' and s['skip_type'] == 'logSNR'
    s = sampler_settings('ablation', solver='euler')
    assert s['solver'] == 'euler' and s['discretization'] == 'edm' and s['alpha'] == 1

#----------------------------------------------------------------------------
