"""Samplers: pure functions that turn noise into images with a denoiser D(x; sigma).

All share one signature, `sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
num_steps=..., sigma_min=..., sigma_max=..., **options)`: `latents` is unit-variance noise
[N, C, H, W], `randn_like` draws any further noise (pass a per-seed generator's version to
make each image depend only on its seed), and the result is float64 images in ~[-1, 1].
"""

import math

import torch

from fdm.schedules import edm_sigma_steps

#----------------------------------------------------------------------------
# EDM stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method with
# optional churn; S_churn = 0 gives the deterministic Algorithm 1. State in float64.
# Cost: 2 N - 1 network evaluations.

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
        sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    # The sigma range can only shrink to what the network supports.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Churn: raise the noise level to t_hat = t_cur (1 + gamma) by adding fresh noise.
        # The noise is drawn at every step, even when gamma = 0, so that a per-seed
        # generator stays in step with the reference.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

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

SAMPLERS = dict(edm=edm_sampler)

#----------------------------------------------------------------------------
