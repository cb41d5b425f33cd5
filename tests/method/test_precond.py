"""Preconditioners and the momentum scaling against independently computed values."""

import functools
import math
import warnings

import numpy as np
import pytest
import torch

import fdm
from fdm.momentum import momentum_scale
from fdm.preconditioning import PRECOND_CLASSES

# The tiny denoiser's options, for the tests that construct a class directly (to see its warnings).
TINY = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.0)

# The tiny denoiser as initialised (no wake), unconditional unless a test gives label_dim.
@pytest.fixture(scope='module')
def tiny(make_tiny_net):
    return functools.partial(make_tiny_net, label_dim=0, wake=0)

#----------------------------------------------------------------------------
# s(sigma): sample values measured on the reference sail-sg/FDM code.

@pytest.mark.parametrize('sigma, expected', [(10, 0.9548), (20, 0.6291), (40, 0.03798), (80, 3.935e-8)])
def test_fdm_edm_scale_m2(sigma, expected, tiny):
    net = tiny('FDM_EDMPrecond', fdm_multiplier=2.0)
    _, _, c_in, _ = net.coefficients(torch.tensor(float(sigma)).reshape(1, 1, 1, 1))
    assert c_in.item() == pytest.approx(expected, rel=1e-3)

@pytest.mark.parametrize('sigma, expected', [(40, 0.5150), (100, 4.772e-4)])
def test_fdm_ve_scale_ignores_multiplier(sigma, expected):
    with pytest.warns(fdm.IgnoredOptionWarning, match='ignores fdm_multiplier'):
        net = PRECOND_CLASSES['FDM_VEPrecond'](fdm_multiplier=2.0, **TINY)
    _, _, c_in, _ = net.coefficients(torch.tensor(float(sigma)).reshape(1, 1, 1, 1))
    assert c_in.item() == pytest.approx(expected, rel=1e-3)

def test_fdm_ve_default_multiplier_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter('error', fdm.IgnoredOptionWarning)
        PRECOND_CLASSES['FDM_VEPrecond'](**TINY)

def test_momentum_scale_formula():
    sigma = np.array([0.002, 0.5, 3.0, 25.0, 80.0])
    t = (sigma - 0.002) / (80 - 0.002)
    beta = 0.1 * t + 0.5 * 19.9 * t ** 2
    expected = np.exp(-1.5 * beta) * (1 + 1.5 * beta)
    got = momentum_scale(torch.tensor(sigma), 0.002, 80, 0.1, 19.9, 1.5).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == pytest.approx(1.0)

#----------------------------------------------------------------------------
# Coefficients of every class against numpy float64 formulas (EDM Table 1).

def vp_sigma_inv(s, beta_d=19.9, beta_min=0.1):
    # In float32 like the reference: ln(1 + sigma^2) loses ~1% at sigma = 0.002, and checkpoints
    # were trained with exactly that c_noise.
    s = s.astype(np.float32)
    return ((np.sqrt(np.float32(beta_min ** 2) + np.float32(2 * beta_d) * np.log(np.float32(1) + s ** 2)) - np.float32(beta_min))
        / np.float32(beta_d)).astype(np.float64)

def expected_coefficients(name, s, net):
    sd = 0.5
    edm = (sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2), np.log(s) / 4)
    vp = (np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1), 999 * vp_sigma_inv(s))
    ve = (np.ones_like(s), s, np.ones_like(s), np.log(0.5 * s))
    base = dict(EDMPrecond=edm, FDM_EDMPrecond=edm, VPPrecond=vp, FDM_VPPrecond=vp, VEPrecond=ve, FDM_VEPrecond=ve)[name]
    if name.startswith('FDM'):
        m = 1.0 if name == 'FDM_VEPrecond' else net.fdm_multiplier
        t = (s - net.sigma_min) / (net.sigma_max - net.sigma_min)
        beta = m * (0.1 * t + 0.5 * 19.9 * t ** 2)
        base = (base[0], base[1], np.exp(-beta) * (1 + beta), base[3])
    return base

@pytest.mark.parametrize('name', ['VPPrecond', 'VEPrecond', 'EDMPrecond', 'FDM_VPPrecond', 'FDM_VEPrecond', 'FDM_EDMPrecond'])
def test_coefficients(name, tiny):
    net = tiny(name, **({'fdm_multiplier': 2.0} if name in ('FDM_EDMPrecond', 'FDM_VPPrecond') else {}))
    s = np.array([0.002, 0.05, 0.7, 4.0, 30.0, 79.0])
    got = net.coefficients(torch.tensor(s, dtype=torch.float32).reshape(-1, 1, 1, 1))
    for g, e in zip(got, expected_coefficients(name, s, net)):
        np.testing.assert_allclose(g.flatten().double().numpy(), e, rtol=2e-5, atol=1e-6)

def test_sigma_ranges(tiny):
    assert tiny('VPPrecond').sigma_min == 0.0009765625  # float32 quirk of the reference, kept
    assert tiny('VPPrecond').sigma_max == pytest.approx(152.16698, rel=1e-6)
    assert (tiny('VEPrecond').sigma_min, tiny('VEPrecond').sigma_max) == (0.02, 100)
    assert (tiny('FDM_EDMPrecond').sigma_min, tiny('FDM_EDMPrecond').sigma_max) == (0.002, 80)
    assert (tiny('EDMPrecond').sigma_min, tiny('EDMPrecond').sigma_max) == (0, math.inf)
    assert tiny('FDM_VPPrecond').sigma_min == 0.0009765625
    net = tiny('iDDPMPrecond')
    assert net.sigma_min == pytest.approx(0.0064223, rel=1e-4)
    assert net.sigma_max == pytest.approx(20291.17, rel=1e-6)
    assert net.u.shape == (1001,) and 'u' in net.state_dict()

def test_iddpm_round_sigma_and_c_noise(tiny):
    net = tiny('iDDPMPrecond')
    u = net.u.double().numpy()
    s = np.array([0.01, 0.3, 2.0, 150.0])
    idx = np.abs(s[:, None] - u[None, :]).argmin(1)
    np.testing.assert_allclose(net.round_sigma(torch.tensor(s)).numpy(), u[idx], rtol=1e-7)
    _, _, _, c_noise = net.coefficients(torch.tensor(s, dtype=torch.float32).reshape(-1, 1, 1, 1))
    np.testing.assert_array_equal(c_noise.flatten().numpy(), 999 - idx)

#----------------------------------------------------------------------------
# Forward: D = c_skip x + c_out F(c_in x; c_noise), labels, dtypes.

@pytest.mark.parametrize('name', sorted(PRECOND_CLASSES))
def test_forward_composition(name, tiny):
    net = tiny(name, label_dim=4).eval()
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.3, 7.0])
    labels = torch.eye(4)[[1, 3]]
    D = net(x, sigma, labels)
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma.reshape(-1, 1, 1, 1))
    F = net.model(c_in * x, c_noise.flatten(), class_labels=labels)[:, :3]
    torch.testing.assert_close(D, c_skip * x + c_out * F, rtol=1e-6, atol=1e-6)
    assert D.dtype == torch.float32 and D.shape == x.shape

def test_missing_labels_mean_zero_label(tiny):
    net = tiny('FDM_EDMPrecond', label_dim=4).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x, 1.0), net(x, torch.full([2], 1.0), torch.zeros(2, 4)))

def test_interface_attributes(tiny):
    net = tiny('FDM_EDMPrecond', label_dim=10)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 3, 10)
    assert isinstance(net.round_sigma(0.5), torch.Tensor)
    assert net.init_kwargs['fdm_multiplier'] == 1.0 and net.init_kwargs['model_type'] == 'SongUNet'
    assert all(k.startswith('model.') for k in net.state_dict())

def test_unknown_model_type():
    with pytest.raises(ValueError, match='unknown model_type'):
        PRECOND_CLASSES['EDMPrecond'](model_type='Nope', **TINY)

#----------------------------------------------------------------------------
