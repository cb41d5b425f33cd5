"""Training losses (EDM, Karras et al. 2022, Table 1 and Sec. 5) with FDM's loss-weight warmup.

Each loss returns the per-element weighted squared error w(sigma) (D(y + n; sigma) - y)^2,
not reduced. FDM (Wu et al. 2023) clamps w from above during a warmup: the clamp starts
at 5 and grows by 100^(1/warmup_ite) per step until it reaches 500, after which w is
used unclamped. Here the clamp is a pure function of the optimizer step, so gradient
accumulation and resuming cannot change it (the reference keeps it as mutable state that
advances once per loss call on each GPU and restarts on resume).
"""

import functools
import math

import numpy as np
import torch

from fdm.schedules import SIGMA_RANGES, iddpm_sigmas, vp_sigma

#----------------------------------------------------------------------------
# The warmup clamp at optimizer step `step` (0-based), or None once the warmup is over.
# Values are the running product 5 * r * r * ... in float64, i.e. exactly the sequence the
# reference produces call by call, so one accumulation round per step reproduces it. The table
# has about warmup_ite entries, so train.py bounds warmup_ite by MAX_WARMUP_ITE: 1e6 steps (8 MB)
# exceed the 200 Mimg default at batch 256 (781k steps).

WARMUP_CLAMP_START = 5.0
WARMUP_CLAMP_END = 500.0
MAX_WARMUP_ITE = 1e6

@functools.lru_cache(maxsize=4)
def _warmup_table(warmup_ite):
    ratio = 100 ** (1 / warmup_ite) if warmup_ite >= 1 else math.inf  # below 1: over 100 (or overflow), one entry
    values = [WARMUP_CLAMP_START]
    while len(values) < 2 * MAX_WARMUP_ITE:  # never reached for a valid warmup_ite: a guard, not a limit
        nxt = values[-1] * ratio
        if nxt >= WARMUP_CLAMP_END:
            break
        values.append(nxt)
    return np.array(values, dtype=np.float64)

def warmup_clamp(step, warmup_ite):
    """Upper bound on the loss weight at this optimizer step, or None (no clamp)."""
    if not warmup_ite:
        return None
    table = _warmup_table(float(warmup_ite))
    return float(table[step]) if 0 <= step < len(table) else None

#----------------------------------------------------------------------------
# Shared body: sample sigma and weight, augment, add noise, denoise, weight the error.

class DenoisingLoss:
    def __init__(self, warmup_ite=None):
        self.warmup_ite = warmup_ite

    def sample_sigma(self, n, device):
        """Training noise levels, shape [n, 1, 1, 1]."""
        raise NotImplementedError

    def weight(self, sigma):
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None, step=0):
        sigma = self.sample_sigma(images.shape[0], images.device)
        weight = self.weight(sigma)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        clamp = warmup_clamp(step, self.warmup_ite)
        if clamp is not None:
            weight = weight.clamp(max=clamp)
        return weight * ((D_yn - y) ** 2)

    @property
    def init_kwargs(self):
        return dict(vars(self))

#----------------------------------------------------------------------------
# VP: t ~ U(epsilon_t, 1), sigma = sigma(t), weight 1/sigma^2.

class VPLoss(DenoisingLoss):
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, warmup_ite=None):
        super().__init__(warmup_ite)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sample_sigma(self, n, device):
        rnd_uniform = torch.rand([n, 1, 1, 1], device=device)
        return vp_sigma(1 + rnd_uniform * (self.epsilon_t - 1), self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# VE: log sigma ~ U(log sigma_min, log sigma_max), weight 1/sigma^2.

class VELoss(DenoisingLoss):
    def __init__(self, sigma_min=SIGMA_RANGES['ve'][0], sigma_max=SIGMA_RANGES['ve'][1], warmup_ite=None):
        super().__init__(warmup_ite)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, n, device):
        rnd_uniform = torch.rand([n, 1, 1, 1], device=device)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# EDM: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

class EDMLoss(DenoisingLoss):
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, warmup_ite=None):
        super().__init__(warmup_ite)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n, device):
        rnd_normal = torch.randn([n, 1, 1, 1], device=device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

#----------------------------------------------------------------------------
# iDDPM (not in the reference's train.py): sigma uniform over the discrete table u_0..u_{M-1},
# weight 1/sigma^2, i.e. the epsilon-prediction loss of Nichol & Dhariwal's "simple" objective.

class iDDPMLoss(DenoisingLoss):
    def __init__(self, C_1=0.001, C_2=0.008, M=1000, warmup_ite=None):
        super().__init__(warmup_ite)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self._u = iddpm_sigmas(C_1, C_2, M)

    def sample_sigma(self, n, device):
        j = torch.randint(0, self.M, [n], device=device)
        return self._u.to(device)[j].reshape(n, 1, 1, 1)

    def weight(self, sigma):
        return 1 / sigma ** 2

    @property
    def init_kwargs(self):
        return dict(C_1=self.C_1, C_2=self.C_2, M=self.M, warmup_ite=self.warmup_ite)

#----------------------------------------------------------------------------

LOSS_CLASSES = {cls.__name__: cls for cls in [VPLoss, VELoss, EDMLoss, iDDPMLoss]}

def build_loss(class_name, **init_kwargs):
    name = class_name.rsplit('.', 1)[-1]
    if name not in LOSS_CLASSES:
        raise ValueError(f'unknown loss class {class_name!r}; expected one of {sorted(LOSS_CLASSES)}')
    return LOSS_CLASSES[name](**init_kwargs)

#----------------------------------------------------------------------------
