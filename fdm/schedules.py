"""Noise schedules: sigma(t) and its inverse for VP, the iDDPM sigma table, each time-step
discretisation's default sigma range (the one home of the samplers' 0.002..80), and the EDM
time-step discretisation. Pure functions of their arguments."""

import math

import torch

#----------------------------------------------------------------------------
# VP (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
# (EDM, Karras et al. 2022, Table 1).

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()

# Inverse of vp_sigma: t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d.
def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

# The VP sigma range [sigma(epsilon_t), sigma(1)], computed in float32 as the reference
# does (so sigma_min is 0.0009765625 rather than the exact 0.0010005).
def vp_sigma_range(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
    t = torch.tensor([epsilon_t, 1.0], dtype=torch.float32)
    sigma = vp_sigma(t, beta_d, beta_min)
    return float(sigma[0]), float(sigma[1])

#----------------------------------------------------------------------------
# iDDPM (Nichol & Dhariwal 2021) as a discrete sigma table u_0 > ... > u_M = 0:
# u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1),
# alpha_bar(j) = sin^2(pi j / (2 M (1 + C_2))) (EDM, Appendix C.3.4). float32 like the reference.

def iddpm_sigmas(C_1=0.001, C_2=0.008, M=1000):
    def alpha_bar(j):
        # float32 tensor arithmetic in this order reproduces the reference table bit for bit
        return (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=torch.float32)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u

# Index of the nearest entry of the table u for each sigma (ties go to the lower index).
def nearest_index(sigma, u):
    sigma = torch.as_tensor(sigma)
    dist = (sigma.to(torch.float32).reshape(-1, 1) - u.to(sigma.device).reshape(1, -1)).abs()
    return dist.argmin(dim=1).reshape(sigma.shape)

#----------------------------------------------------------------------------
# The default sigma range of each time-step discretisation (EDM, Karras et al. 2022, Table 1,
# "sigma_max, sigma_min"): VE 0.02..100, iDDPM 0.002..81 (u_{M-1}..u_0 rounded, as EDM rounds
# them), EDM 0.002..80, and VP sigma(epsilon_s)..sigma(1) with beta_d 19.9, beta_min 0.1.
# EDM's range is also the default of edm_sampler and DPM-Solver++ (SIGMA_MIN, SIGMA_MAX).
# Integers where the reference writes integers: they are recorded in generate_options.json.

SIGMA_RANGES = dict(ve=(0.02, 100), iddpm=(0.002, 81), edm=(0.002, 80))
SIGMA_MIN, SIGMA_MAX = SIGMA_RANGES['edm']

def default_sigma_range(discretization='edm', epsilon_s=1e-3):
    """(sigma_min, sigma_max) of Table 1 for 'vp', 've', 'iddpm' or 'edm' time steps, as floats."""
    if discretization == 'vp':
        sigmas = vp_sigma(torch.tensor([epsilon_s, 1.0], dtype=torch.float64))
    elif discretization in SIGMA_RANGES:
        sigmas = SIGMA_RANGES[discretization]
    else:
        raise ValueError(f"unknown discretization {discretization!r}; expected 'vp', 've', 'iddpm' or 'edm'")
    sigma_min, sigma_max = (float(v) for v in sigmas)
    return sigma_min, sigma_max

#----------------------------------------------------------------------------
# EDM time steps (Karras et al. 2022, Eq. 5), in float64, with sigma_N = 0 appended:
# sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
# N = 1 (where the reference divides by zero) gives the single step sigma_max -> 0.

def edm_sigma_steps(num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7, round_sigma=None, device=None):
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t), dtype=torch.float64, device=t.device)
    return torch.cat([t, torch.zeros_like(t[:1])])

#----------------------------------------------------------------------------
