"""The FDM momentum input scaling s(sigma) (Wu et al. 2023).

FDM replaces the preconditioner's input scale c_in with the critically damped
factor s(sigma) = e^{-m beta(t)} (1 + m beta(t)), where beta(t) = beta_min t + beta_d t^2 / 2
and t = (sigma - sigma_min) / (sigma_max - sigma_min) is a *linear* normalisation of
sigma over the preconditioner's own range (not the VP time). s(sigma_min) = 1 and s
falls towards 0 at sigma_max, so a noisy input is damped towards zero.
"""

import torch

#----------------------------------------------------------------------------

def momentum_scale(sigma, sigma_min, sigma_max, beta_min=0.1, beta_d=19.9, multiplier=1.0):
    """s(sigma) = e^{-m beta(t)} (1 + m beta(t)); elementwise on a tensor of sigmas."""
    sigma = torch.as_tensor(sigma)
    t = (sigma - sigma_min) / (sigma_max - sigma_min)
    m_beta = multiplier * (beta_min * t + 0.5 * beta_d * t ** 2)
    return torch.exp(-m_beta) * (1 + m_beta)

#----------------------------------------------------------------------------
