"""Losses, the FDM warmup, and the EDM Heun sampler."""

import math

import numpy as np
import pytest
import torch

from fdm.loss import EDMLoss, VELoss, VPLoss, warmup_clamp
from fdm.samplers import edm_sampler
from fdm.schedules import edm_sigma_steps

#----------------------------------------------------------------------------
# Warmup: the reference's stateful loop, re-implemented here as the oracle.

def reference_clamps(warmup_ite, calls):
    clamp_cur, step, out = 5.0, 100 ** (1 / warmup_ite), []
    for _ in range(calls):
        if clamp_cur < 500:
            out.append(clamp_cur)
            clamp_cur *= step
        else:
            out.append(None)
    return out

@pytest.mark.parametrize('warmup_ite', [1, 7, 200, 400, 1000])
def test_warmup_matches_reference_sequence(warmup_ite):
    expected = reference_clamps(warmup_ite, warmup_ite + 5)
    assert [warmup_clamp(k, warmup_ite) for k in range(warmup_ite + 5)] == expected

def test_warmup_counts():
    # 200 clamps 201 steps (float rounding leaves 5 * r^200 just under 500); 400 clamps 400.
    assert sum(warmup_clamp(k, 200) is not None for k in range(1000)) == 201
    assert sum(warmup_clamp(k, 400) is not None for k in range(1000)) == 400
    assert warmup_clamp(0, 50) == 5.0
    assert warmup_clamp(10**9, 50) is None
    assert warmup_clamp(0, None) is None and warmup_clamp(0, 0) is None

def test_warmup_is_a_function_of_step():
    # Asking out of order, or twice, changes nothing: there is no hidden state.
    a = [warmup_clamp(k, 30) for k in (17, 3, 17, 0, 29)]
    b = [warmup_clamp(k, 30) for k in (17, 3, 17, 0, 29)]
    assert a == b and a[0] == a[2]
    assert a[0] == pytest.approx(5 * 100 ** (17 / 30), rel=1e-12)

#----------------------------------------------------------------------------
# Losses with a stand-in denoiser that returns a constant: loss = w (c - y)^2.

class ConstantNet:
    def __init__(self, c):
        self.c = c
        self.seen = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.seen.append(sigma)
        return torch.full_like(x, self.c)

def test_edm_loss_weight_and_clamp():
    images = torch.zeros(64, 1, 2, 2)
    torch.manual_seed(0)
    net = ConstantNet(1.0)
    loss = EDMLoss(warmup_ite=10)(net, images, step=0)  # clamp 5
    sigma = net.seen[0].flatten()
    w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    np.testing.assert_allclose(loss[:, 0, 0, 0].numpy(), w.clamp(max=5).numpy(), rtol=1e-6)
    torch.manual_seed(0)
    net = ConstantNet(1.0)
    loss = EDMLoss(warmup_ite=10)(net, images, step=10)  # warmup over
    np.testing.assert_allclose(loss[:, 0, 0, 0].numpy(), w.numpy(), rtol=1e-6)
    assert (w > 5).any()  # the clamp was actually exercised

def test_loss_sigma_distributions():
    torch.manual_seed(1)
    n = 20000
    s = EDMLoss().sample_sigma(n, 'cpu').log()
    assert abs(s.mean().item() + 1.2) < 0.03 and abs(s.std().item() - 1.2) < 0.03
    s = VELoss().sample_sigma(n, 'cpu')
    assert s.min() >= 0.02 and s.max() <= 100
    assert abs(s.log().mean().item() - 0.5 * (math.log(0.02) + math.log(100))) < 0.05
    s = VPLoss().sample_sigma(n, 'cpu')
    assert s.min() >= 0.0009 and s.max() <= 152.17

def test_loss_draw_order_is_sigma_then_noise():
    # Same seed, same draws: sigma first, then the noise; a loss is reproducible.
    images = torch.randn(4, 3, 4, 4)
    for loss_cls in (EDMLoss, VPLoss, VELoss):
        torch.manual_seed(3)
        a = loss_cls()(ConstantNet(0.0), images)
        torch.manual_seed(3)
        b = loss_cls()(ConstantNet(0.0), images)
        assert torch.equal(a, b)

#----------------------------------------------------------------------------
# Sampler on Gaussian data, where the exact denoiser and the ODE solution are known:
# data ~ N(0, s_d^2) gives D(x; sigma) = x s_d^2 / (s_d^2 + sigma^2), and the probability
# flow ODE maps x(sigma_max) to x(0) = x(sigma_max) s_d / sqrt(sigma_max^2 + s_d^2).

class GaussianDenoiser:
    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, s_d=0.5):
        self.s_d = s_d
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return x * self.s_d ** 2 / (self.s_d ** 2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)

def test_heun_solves_gaussian_ode():
    latents = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = latents.double() * 80 * 0.5 / math.sqrt(80 ** 2 + 0.25)
    net = GaussianDenoiser()
    x0 = edm_sampler(net, latents, num_steps=18)
    assert net.calls == 2 * 18 - 1 and x0.dtype == torch.float64
    errors = [((edm_sampler(GaussianDenoiser(), latents, num_steps=n) - exact) / exact).abs().max().item() for n in (40, 80)]
    assert errors[1] < 3e-3  # measured 2.3e-3 relative at 80 steps
    assert 3.0 < errors[0] / errors[1] < 5.5  # Heun is second order: halving the step quarters the error

def test_time_steps():
    t = edm_sigma_steps(18, 0.002, 80, 7)
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(t[:-1].numpy(), expected, rtol=1e-14)
    assert t[-1] == 0 and t.dtype == torch.float64
    assert edm_sigma_steps(1, 0.002, 80).tolist() == [80.0, 0.0]  # the reference divides by zero here
    with pytest.raises(ValueError):
        edm_sigma_steps(0)

def test_noise_drawn_every_step_and_churn():
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = []

    def counting_randn_like(x):
        draws.append(x.shape)
        return torch.randn_like(x)

    edm_sampler(GaussianDenoiser(), latents, randn_like=counting_randn_like, num_steps=5)
    assert len(draws) == 0  # S_churn = 0: every draw would be multiplied by 0, so none is made
    edm_sampler(GaussianDenoiser(), latents, randn_like=counting_randn_like, num_steps=5, S_churn=1)
    assert len(draws) == 5  # with churn, one draw per step as the reference

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return edm_sampler(GaussianDenoiser(), latents, randn_like=lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g), num_steps=10, **kw)

    det = run(0)
    assert torch.equal(det, run(1))  # without churn the noise is multiplied by zero
    a, b = run(0, S_churn=40), run(0, S_churn=40)
    assert torch.equal(a, b) and not torch.allclose(a, det)

def test_sigma_range_clamped_to_network():
    class Narrow(GaussianDenoiser):
        sigma_min, sigma_max = 0.02, 10.0
        seen = []

        def __call__(self, x, sigma, class_labels=None):
            self.seen.append(float(sigma))
            return super().__call__(x, sigma, class_labels)

    net = Narrow()
    edm_sampler(net, torch.zeros(1, 1, 2, 2), num_steps=4, sigma_min=0.002, sigma_max=80)
    assert max(net.seen) == pytest.approx(10.0) and min(s for s in net.seen if s > 0) == pytest.approx(0.02)

#----------------------------------------------------------------------------
