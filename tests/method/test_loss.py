"""Losses and the FDM warmup: the clamp schedule against the reference's stateful loop, the
loss weights and sigma distributions, and the draw order."""

import math

import numpy as np
import pytest
import torch

from fdm.loss import EDMLoss, VELoss, VPLoss, warmup_clamp

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
