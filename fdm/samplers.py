"""Samplers: pure functions that turn noise into images with a denoiser D(x; sigma).

All share one signature, `sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
num_steps=..., sigma_min=..., sigma_max=..., **options)`: `latents` is unit-variance noise
[N, C, H, W], `randn_like` draws any further noise (pass a per-seed generator's version to
make each image depend only on its seed; see PerSeedGenerator), and the result is float64
images in ~[-1, 1]. The default sigma range (0.002..80, or the ablation's discretisation's)
lives in `fdm.schedules`. `SAMPLERS` maps names to them:

- `edm`: EDM's Heun sampler (Karras et al. 2022, Algorithm 2), 2N - 1 evaluations.
- `ablation`: EDM's generalised sampler (Euler/Heun x VP/VE/iDDPM/EDM time steps x schedules
  x scalings, Table 1); with its defaults it is `edm`, bit for bit.
- `dpm`: DPM-Solver++ (Lu et al. 2022) as FDM uses it, N evaluations (`fdm.dpm_solver`).
"""

import inspect
import math

import torch

from fdm.dpm_solver import dpm_solver_sampler
from fdm.schedules import SIGMA_MAX, SIGMA_MIN, default_sigma_range, edm_sigma_steps, iddpm_sigmas, vp_sigma, vp_sigma_inv

#----------------------------------------------------------------------------
# Algorithm 2's churn, planned on the host before the loop: gamma_i = min(S_churn / N,
# sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0. `sigmas` are the device values the
# loop uses; one transfer here replaces a GPU->CPU sync per step (a comparison of a device
# tensor with a Python float). Also returns how many leading steps must draw noise: the
# reference draws at every step, but once no later step has t_hat != t_cur, every further
# draw is multiplied by sqrt(t_hat^2 - t_cur^2) = 0 and the generator is not used again, so
# those draws are skipped (with S_churn = 0: all of them) without changing any image.
# Draws before the last churned step stay, even where gamma = 0, so that a per-seed
# generator stays in step with the reference. `linear`: sigma(t) = t, so t_hat = t_cur
# exactly when round_sigma(sigma_i (1 + gamma_i)) = sigma_i; otherwise (VP/VE schedules,
# where sigma^-1(sigma(t)) need not be t) every step draws.

def churn_plan(sigmas, round_sigma, num_steps, S_churn, S_min, S_max, S_noise, linear=True):
    """-> (gamma per step, number of leading steps that draw noise)."""
    sigmas = sigmas.tolist()
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= sigma <= S_max else 0 for sigma in sigmas]
    if not linear or not math.isfinite(S_noise):  # 0 * inf is nan: the reference's result
        return gammas, len(sigmas)
    # sigma + gamma sigma and round_sigma on the host: the same IEEE float64 operations as on
    # the device (round_sigma is an identity or a nearest-entry lookup), so the same t_hat.
    t_hat = round_sigma(torch.tensor([s + g * s for s, g in zip(sigmas, gammas)], dtype=torch.float64))
    changed = [i for i, (t, s) in enumerate(zip(torch.as_tensor(t_hat).tolist(), sigmas)) if t != s]
    return gammas, (changed[-1] + 1 if changed else 0)

#----------------------------------------------------------------------------
# EDM stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method with
# optional churn; S_churn = 0 gives the deterministic Algorithm 1. State in float64.
# Cost: 2 N - 1 network evaluations.

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
        sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    # The sigma range can only shrink to what the network supports.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)
    gammas, noisy_steps = churn_plan(t_steps[:-1], net.round_sigma, num_steps, S_churn, S_min, S_max, S_noise)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Churn: raise the noise level to t_hat = t_cur (1 + gamma) by adding fresh noise
        # (drawn as the reference does up to the last step where it matters; see churn_plan).
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gammas[i] * t_cur), dtype=torch.float64)
        if i < noisy_steps:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:  # t_hat = t_cur from here on: the noise term would be 0
            x_hat = x_cur

        # Euler step from t_hat to t_next.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun (2nd-order) correction, except on the last step, which ends at sigma = 0.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next

#----------------------------------------------------------------------------
# EDM's generalised sampler (Karras et al. 2022, Algorithms 1 and 2 with the design choices of
# Table 1), used to reproduce the VP / VE / iDDPM samplers and the ablations of Sec. 3:
#   solver:         'euler' (1st order) or 'heun' (2nd order, alpha = position of the second
#                   evaluation as a fraction of the step, Algorithm 1)
#   discretization: time steps of 'vp', 've', 'iddpm' or 'edm' (Table 1, "time steps")
#   schedule:       sigma(t) = sqrt(e^{beta_d t^2/2 + beta_min t} - 1) ('vp'), sqrt(t) ('ve'), t ('linear')
#   scaling:        s(t) = 1 / sqrt(1 + sigma(t)^2) ('vp') or 1 ('none')
# It integrates the ODE dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x / s; sigma)
# (Eq. 4), with Algorithm 2's churn. With heun/edm/linear/none it is edm_sampler, bit for bit.

def ablation_sigma_range(net, discretization='edm', sigma_min=None, sigma_max=None, epsilon_s=1e-3):
    """The sigma range the ablation sampler uses: the discretization's default where none is
    given (fdm.schedules.default_sigma_range), then clamped to the network's range."""
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    return max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)

# vp_betas: (beta_d, beta_min) of VP's sigma(t); iddpm: (C_1, C_2, M) of iDDPM's table.
def _ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, vp_betas, iddpm, device):
    # Table 1, "time steps", as noise levels sigma_0 > ... > sigma_{N-1}; N = 1 gives [sigma_max].
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    if discretization == 'vp':
        return vp_sigma(1 + frac * (epsilon_s - 1), *vp_betas)
    if discretization == 've':
        return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** frac).sqrt()
    if discretization == 'iddpm':
        # The float32 table the iDDPM preconditioner uses, restricted to the range; indices
        # floor(j0 + (M - 1 - j0) / (N - 1) i + 1/2) as a rounded fraction of the table.
        u = iddpm_sigmas(*iddpm).to(device=device, dtype=torch.float64)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        scale = (len(u) - 1) / (num_steps - 1) if num_steps > 1 else 0
        return u[(scale * i).round().to(torch.int64)]
    if discretization == 'edm':
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)[:-1]
    raise ValueError(f"unknown discretization {discretization!r}; expected 'vp', 've', 'iddpm' or 'edm'")

def _ablation_schedule(schedule, vp_beta_d, vp_beta_min):
    # (sigma(t), sigma'(t), sigma^-1(sigma)) for Table 1's "schedule" row.
    if schedule == 'vp':
        sigma = lambda t: vp_sigma(t, vp_beta_d, vp_beta_min)
        sigma_deriv = lambda t: 0.5 * (vp_beta_min + vp_beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda s: vp_sigma_inv(s, vp_beta_d, vp_beta_min)
    elif schedule == 've':
        sigma = lambda t: t.sqrt()
        sigma_deriv = lambda t: 0.5 / t.sqrt()
        sigma_inv = lambda s: s ** 2
    elif schedule == 'linear':
        sigma = lambda t: t
        sigma_deriv = lambda t: torch.ones_like(t)
        sigma_inv = lambda s: s
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected 'vp', 've' or 'linear'")
    return sigma, sigma_deriv, sigma_inv

def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
        sigma_min=None, sigma_max=None, rho=7, solver='heun', discretization='edm', schedule='linear',
        scaling='none', epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
        S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    sigma_min, sigma_max = ablation_sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s)

    # VP constants chosen so that sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max:
    # beta_d eps^2/2 + beta_min eps = ln(sigma_min^2 + 1), beta_d/2 + beta_min = ln(sigma_max^2 + 1).
    vp_beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    sigma, sigma_deriv, sigma_inv = _ablation_schedule(schedule, vp_beta_d, vp_beta_min)
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    else:
        s = lambda t: torch.ones_like(t)
        s_deriv = lambda t: torch.zeros_like(t)

    # dx/dt, written so that linear/none evaluates exactly as edm_sampler's (x - D) / t.
    def slope(x, t):
        denoised = net(x / s(t), sigma(t), class_labels).to(torch.float64)
        return sigma_deriv(t) * (x - s(t) * denoised) / sigma(t) + s_deriv(t) / s(t) * x

    sigma_steps = _ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s,
        (vp_beta_d, vp_beta_min), (C_1, C_2, M), latents.device)
    t_steps = sigma_inv(torch.as_tensor(net.round_sigma(sigma_steps), dtype=torch.float64))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    # sigma(t_i) per step as the loop needs it; churn_plan brings them to the host once.
    sigma_cur_steps = [sigma(t) for t in t_steps[:-1]]
    gammas, noisy_steps = churn_plan(torch.stack(sigma_cur_steps), net.round_sigma, num_steps, S_churn,
        S_min, S_max, S_noise, linear=(schedule == 'linear'))

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Churn (Algorithm 2): raise the noise level to sigma(t_hat) = sigma(t_cur) (1 + gamma).
        # Noise is drawn as edm_sampler draws it (see churn_plan). The clip guards against a
        # tiny negative variance from rounding in sigma_inv(sigma(t)).
        sigma_cur = sigma_cur_steps[i]
        t_hat = sigma_inv(torch.as_tensor(net.round_sigma(sigma_cur + gammas[i] * sigma_cur), dtype=torch.float64))
        if i < noisy_steps:
            x_hat = s(t_hat) / s(t_cur) * x_cur \
                + (sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur)
        else:  # linear schedule, t_hat = t_cur: the scale is s(t)/s(t) = 1 and the noise term 0
            x_hat = x_cur

        # Euler step; the last step (to t = 0) is always Euler.
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
            continue

        # Heun: a second slope at t_hat + alpha h, mixed with weights 1 - 1/(2 alpha), 1/(2 alpha).
        t_prime = t_next if alpha == 1 else t_hat + alpha * h  # alpha = 1: t_next exactly, no rounding
        x_prime = x_hat + alpha * h * d_cur
        d_prime = slope(x_prime, t_prime)
        x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

    return x_next

#----------------------------------------------------------------------------
# Per-seed random numbers: one generator per image, and every draw for a batch is the stack
# of each image's own draw. An image then depends only on its seed (and the network), not on
# the batch it shares or the number of processes. Seeds are taken modulo 2^32.

class PerSeedGenerator:
    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size):
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f'the first dimension must be the number of seeds ({len(self.generators)}), got {list(size)}')

    def randn(self, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randint(high, size[1:], generator=g, **kwargs) for g in self.generators])

#----------------------------------------------------------------------------
# Registry: name -> sampler function (one signature, see the module docstring).

SAMPLERS = dict(edm=edm_sampler, ablation=ablation_sampler, dpm=dpm_solver_sampler)

def sampler_nfe(name, num_steps, solver='heun', **kwargs):
    """Network evaluations per image: Heun 2N - 1 (its last step is Euler), Euler N, DPM-Solver++ N."""
    if name == 'edm' or (name == 'ablation' and solver == 'heun'):
        return 2 * num_steps - 1
    if name in ('ablation', 'dpm'):
        return num_steps
    raise ValueError(f'unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}')

def sampler_sigma_range(name, net, sigma_min=None, sigma_max=None, discretization='edm', epsilon_s=1e-3, **kwargs):
    """(sigma_min, sigma_max) a sampler actually uses for this network: EDM and the ablation
    sampler clamp to the network's range, DPM-Solver++ does not."""
    if name == 'edm':  # EDM's range is the ablation sampler's with EDM time steps
        return ablation_sigma_range(net, 'edm', sigma_min, sigma_max)
    if name == 'ablation':
        return ablation_sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    if name == 'dpm':
        default_min, default_max = default_sigma_range('edm')
        return default_min if sigma_min is None else sigma_min, default_max if sigma_max is None else sigma_max
    raise ValueError(f'unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}')

def sampler_settings(name, **kwargs):
    """All keyword settings a sampler runs with: its defaults updated by kwargs (for logs)."""
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
        and p.name not in ('class_labels', 'randn_like')}
    return {**defaults, **kwargs}

#----------------------------------------------------------------------------
