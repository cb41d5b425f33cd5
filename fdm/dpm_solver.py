"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") for the EDM noise schedule, the sampler FDM's generate.py calls `dpm`.

EDM's schedule has alpha_t = 1 and sigma_t = t, so the half log-SNR is lambda = -ln t. In
data-prediction form the probability-flow ODE has the exact solution (the exponential-integrator form DPM-Solver++ builds on)

    x_t = (t / s) x_s + t * integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda; lambda) d lambda.

Expanding the denoiser D in a Taylor series in lambda around lambda_s, each term integrates in
closed form. With h = lambda_t - lambda_s and D', D'' derivatives in lambda:

    x_t = (t / s) x_s - phi_1 D + h phi_2 D' - h^2 phi_3 D'' + O(h^4),
    phi_1 = expm1(-h),  phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2.

Order k keeps k terms and replaces the derivatives by differences of D: at intermediate points
inside the step (singlestep, Runge-Kutta-like) or at earlier steps (multistep, Adams-like).

All arithmetic is float64; the time grid is computed in float64 too (the reference uses float32
times, so values agree to about 1e-7, not bit for bit).
"""

import math

import torch

from fdm.schedules import SIGMA_MAX, SIGMA_MIN

IGNORED_OPTIONS = ('rho', 'S_churn', 'S_min', 'S_max', 'S_noise')  # EDM sampler options that mean nothing here

#----------------------------------------------------------------------------
# Time grids: n + 1 times from t_start down to t_end.

def time_steps(skip_type, t_start, t_end, n):
    """'logSNR': uniform in lambda = -ln t (a geometric grid); 'time_uniform': uniform in t;
    'time_quadratic': uniform in sqrt(t). Returns a list of Python floats."""
    if n == 0:
        return [float(t_start)]
    frac = [i / n for i in range(1, n)]
    if skip_type == 'logSNR':
        lam_start, lam_end = -math.log(t_start), -math.log(t_end)
        inner = [math.exp(-(lam_start + f * (lam_end - lam_start))) for f in frac]
    elif skip_type == 'time_uniform':
        inner = [t_start + f * (t_end - t_start) for f in frac]
    elif skip_type == 'time_quadratic':
        inner = [(math.sqrt(t_start) + f * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2 for f in frac]
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; expected 'logSNR', 'time_uniform' or 'time_quadratic'")
    return [float(t_start)] + inner + [float(t_end)]  # exact end points

# "DPM-Solver-fast" (the first DPM-Solver paper, Lu et al. 2022a): spend exactly `steps`
# evaluations on singlestep updates of order <= `order`, ending with the lower orders.
def singlestep_orders(steps, order):
    if order == 1 or steps == 0:
        return [1] * steps
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 3:
        k = steps // 3 + 1  # number of outer steps
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    raise ValueError(f'order must be 1, 2 or 3, got {order}')

# Multistep: the first steps lack history and use lower orders; with lower_order_final the
# last steps do too, but (as in the reference) only when there are fewer than 10 steps.
def multistep_orders(steps, order, lower_order_final=True):
    orders = []
    for i in range(steps):
        k = min(order, i + 1)
        if lower_order_final and steps < 10:
            k = min(k, steps - i)
        orders.append(k)
    return orders

#----------------------------------------------------------------------------
# One singlestep update from time s to time t (DPM-Solver++ Algorithm 1 for order 2; the
# data-prediction form of DPM-Solver-3 for order 3). r1 < r2 place the intermediate points
# at lambda_s + r h. Costs `order` evaluations of D.

def singlestep_update(denoise, x, s, t, order, r1=None, r2=None):
    h = math.log(s / t)  # lambda_t - lambda_s
    phi_1 = math.expm1(-h)
    D_s = denoise(x, s)
    if order == 1:  # DDIM
        return (t / s) * x - phi_1 * D_s

    s1 = s * math.exp(-r1 * h)
    x_s1 = (s1 / s) * x - math.expm1(-r1 * h) * D_s
    D_s1 = denoise(x_s1, s1)
    if order == 2:  # D' ~ (D_s1 - D_s) / (r1 h), folded into phi_1 (paper's DPM-Solver++(2S))
        return (t / s) * x - phi_1 * ((1 - 0.5 / r1) * D_s + (0.5 / r1) * D_s1)

    # Order 3: a second-order step to s2 gives D_s2; with r2 = 2/3 the final first-difference
    # term also matches the D'' term to leading order.
    s2 = s * math.exp(-r2 * h)
    phi_2_s2 = math.expm1(-r2 * h) / (r2 * h) + 1
    x_s2 = (s2 / s) * x - math.expm1(-r2 * h) * D_s + (r2 / r1) * phi_2_s2 * (D_s1 - D_s)
    D_s2 = denoise(x_s2, s2)
    phi_2 = phi_1 / h + 1
    return (t / s) * x - phi_1 * D_s + (1 / r2) * phi_2 * (D_s2 - D_s)

# One multistep update from times[-1] to t using the denoiser values at the last `order`
# times (DPM-Solver++ Algorithm 2 for order 2). No evaluation of D.
def multistep_update(x, times, values, t, order):
    s = times[-1]
    h = math.log(s / t)
    phi_1 = math.expm1(-h)
    D_0 = values[-1]
    if order == 1:
        return (t / s) * x - phi_1 * D_0

    r0 = math.log(times[-2] / s) / h  # h_0 / h, h_0 = lambda_s - lambda_prev
    D1_0 = (D_0 - values[-2]) / r0  # ~ h D' (backward difference)
    if order == 2:
        return (t / s) * x - phi_1 * D_0 - 0.5 * phi_1 * D1_0

    # Order 3: divided differences over three points give h D' and h^2 D'' at s.
    r1 = math.log(times[-3] / times[-2]) / h
    D1_1 = (values[-2] - values[-3]) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)  # ~ h D'
    D2 = 2 * (D1_0 - D1_1) / (r0 + r1)  # ~ h^2 D''
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return (t / s) * x - phi_1 * D_0 + phi_2 * D1 - phi_3 * D2

#----------------------------------------------------------------------------
# The sampler, with the settings of FDM's generate.py as defaults: order 3, singlestep,
# logSNR grid, final denoising. num_steps network evaluations in total: num_steps - 1 for the
# solver from sigma_max to sigma_min, plus one final D(x; sigma_min) ("denoise to zero").
#
# Unlike edm_sampler, [sigma_min, sigma_max] is NOT clamped to the network's range and
# round_sigma is not applied (the reference's behaviour; FDM-EDM nets train on 0.002..80, which
# are the defaults, fdm.schedules' SIGMA_MIN..SIGMA_MAX; None means them too). No noise is drawn,
# so randn_like and rho/S_churn/S_min/S_max/S_noise are accepted for the common sampler signature
# and ignored.

def dpm_solver_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
        sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, order=3, method='singlestep', skip_type='logSNR',
        lower_order_final=True, denoise_to_zero=True, **ignored):
    unknown = sorted(set(ignored) - set(IGNORED_OPTIONS))
    if unknown:
        raise TypeError(f'dpm_solver_sampler() got unexpected options {unknown}')
    sigma_min = float(SIGMA_MIN if sigma_min is None else sigma_min)
    sigma_max = float(SIGMA_MAX if sigma_max is None else sigma_max)

    def denoise(x, t):
        # A fill kernel, not as_tensor: as_tensor copies the Python float from the host, a
        # blocking transfer on every evaluation. Same float64 value either way.
        sigma = torch.full([], t, dtype=torch.float64, device=x.device)
        return net(x, sigma, class_labels).to(torch.float64)

    steps = num_steps - 1 if denoise_to_zero else num_steps
    x = latents.to(torch.float64) * sigma_max
    t_cur = sigma_max

    if method == 'singlestep':
        orders = singlestep_orders(steps, order)
        if skip_type == 'logSNR':  # outer steps uniform in lambda (as the DPM-Solver paper)
            outer = time_steps(skip_type, sigma_max, sigma_min, len(orders))
        else:  # a grid of `steps` intervals, grouped `order` at a time
            grid = time_steps(skip_type, sigma_max, sigma_min, steps)
            ends = [0]
            for k in orders:
                ends.append(ends[-1] + k)
            outer = [grid[j] for j in ends]
        for k, s, t in zip(orders, outer[:-1], outer[1:]):
            inner = time_steps(skip_type, s, t, k)  # intermediate points of this step
            h = math.log(s / t)
            r = [math.log(s / u) / h for u in inner[1:-1]]
            x = singlestep_update(denoise, x, s, t, k, *r)
            t_cur = t
    else:
        grid = time_steps(skip_type, sigma_max, sigma_min, steps)
        orders = multistep_orders(steps, order, lower_order_final)
        times, values = [], []
        for i, k in enumerate(orders):
            times.append(grid[i])
            values.append(denoise(x, grid[i]))
            times, values = times[-3:], values[-3:]  # order <= 3 needs at most three
            x = multistep_update(x, times, values, grid[i + 1], k)
            t_cur = grid[i + 1]

    if denoise_to_zero:  # the first-order step from t_cur to sigma = 0 is D itself
        x = denoise(x, t_cur)
    return x

#----------------------------------------------------------------------------
