"""Preconditioned denoisers D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

One design (EDM, Karras et al. 2022, Eq. 7 and Table 1): a `Precond` owns the U-Net F
and the forward pass; each schedule (VP, VE, iDDPM, EDM) only supplies its four
coefficients and sigma range. FDM (Wu et al. 2023) changes one thing: c_in becomes
the momentum scaling s(sigma) (`fdm.momentum`), which `MomentumPrecond` mixes into
any schedule. The class names of the reference codebases (`EDMPrecond`,
`FDM_EDMPrecond`, ...) are kept because checkpoints and users refer to them.

Every class is constructed with keyword arguments only, exactly as the reference
train.py does: `img_resolution, img_channels, label_dim=0, use_fp16=False,
model_type=...`, the schedule parameters listed in the class's `defaults`, and any
other keyword goes to the U-Net (`fdm.networks`).
"""

import warnings

import torch

from fdm.momentum import momentum_scale
from fdm.schedules import SIGMA_MAX, SIGMA_MIN, SIGMA_RANGES, iddpm_sigmas, nearest_index, vp_sigma, vp_sigma_inv, vp_sigma_range
from fdm.networks import NETWORK_CLASSES  # F itself: the U-Nets are machinery, shared with EDM, not FDM's method

#----------------------------------------------------------------------------
# Raised (as a warning) for an option that the chosen preconditioner ignores.

class IgnoredOptionWarning(UserWarning):
    pass

#----------------------------------------------------------------------------
# The shared preconditioner: holds F and evaluates D; subclasses give coefficients().

class Precond(torch.nn.Module):
    defaults = {}                   # schedule parameters and their reference defaults
    default_model_type = 'SongUNet'
    out_channels_per_image_channel = 1

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type=None, **kwargs):
        super().__init__()
        model_type = model_type or self.default_model_type
        params = {name: kwargs.pop(name, value) for name, value in self.defaults.items()}
        # Everything needed to rebuild this object, JSON-serialisable (checkpoints store it).
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            use_fp16=use_fp16, model_type=model_type, **params, **kwargs)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        for name, value in params.items():
            setattr(self, name, value)
        self.setup_schedule()
        self.model = self.build_model(img_resolution, img_channels, label_dim, model_type=model_type, **kwargs)

    @classmethod
    def build_model(cls, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type=None, **kwargs):
        """The U-Net alone, from the preconditioner's constructor arguments (its schedule parameters
        left out): the constructor's own, and the one training.config builds on the meta device to
        check the options' structure before a run starts."""
        model_type = model_type or cls.default_model_type
        if model_type not in NETWORK_CLASSES:
            raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(NETWORK_CLASSES)}')
        kwargs = {name: value for name, value in kwargs.items() if name not in cls.defaults}
        return NETWORK_CLASSES[model_type](img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels * cls.out_channels_per_image_channel, label_dim=label_dim, **kwargs)

    def setup_schedule(self):
        """Derive schedule constants (sigma_min, sigma_max, tables) from the parameters."""

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [N, 1, 1, 1]."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Snap sigma to a value the network was trained on (only iDDPM has a discrete set)."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:  # unconditional use of a conditional net: the zero label broadcasts
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.reshape(-1)
        if c_noise.numel() == 1:  # one sigma for the whole batch
            c_noise = c_noise.expand(x.shape[0])
        F_x = self.model((c_in * x).to(dtype), c_noise, class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):  # autocast picks its own dtypes
            raise RuntimeError(f'{type(self.model).__name__} returned {F_x.dtype}, expected {dtype}')
        F_x = F_x[:, :self.img_channels]  # iDDPM's extra (variance) channels are unused
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

#----------------------------------------------------------------------------
# Variance preserving (Song et al. 2021): sigma(t) = sqrt(e^{beta_d t^2/2 + beta_min t} - 1).

class VPPrecond(Precond):
    defaults = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)

    def setup_schedule(self):
        self.sigma_min, self.sigma_max = vp_sigma_range(self.beta_d, self.beta_min, self.epsilon_t)

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# Variance exploding (Song et al. 2021): geometric sigma in [0.02, 100].

class VEPrecond(Precond):
    defaults = dict(zip(('sigma_min', 'sigma_max'), SIGMA_RANGES['ve']))

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# Improved DDPM (Nichol & Dhariwal 2021): a discrete table of M+1 sigmas; the U-Net
# predicts 2C channels of which the first C are the noise.

class iDDPMPrecond(Precond):
    defaults = dict(C_1=0.001, C_2=0.008, M=1000)
    default_model_type = 'DhariwalUNet'
    out_channels_per_image_channel = 2

    def setup_schedule(self):
        self.register_buffer('u', iddpm_sigmas(self.C_1, self.C_2, self.M))
        self.sigma_min = float(self.u[self.M - 1])
        self.sigma_max = float(self.u[0])

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - nearest_index(sigma, self.u).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return self.u.to(sigma.device)[nearest_index(sigma, self.u)].to(sigma.dtype)

#----------------------------------------------------------------------------
# EDM (Karras et al. 2022, Table 1): unit-variance input and target for data of std sigma_data.

class EDMPrecond(Precond):
    defaults = dict(sigma_min=0, sigma_max=float('inf'), sigma_data=0.5)
    default_model_type = 'DhariwalUNet'  # as NVlabs/edm; the FDM fork defaults to SongUNet

    def coefficients(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# FDM: any schedule with c_in replaced by the momentum scaling s(sigma). Put it before
# the schedule class in the bases: FDM_XPrecond(MomentumPrecond, XPrecond).

class MomentumPrecond(Precond):
    momentum_defaults = dict(fdm_beta_d=19.9, fdm_beta_min=0.1, fdm_multiplier=1.0)
    uses_multiplier = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.uses_multiplier and self.fdm_multiplier != 1:
            warnings.warn(f'{type(self).__name__} ignores fdm_multiplier={self.fdm_multiplier} '
                '(as the reference FDM-VE does; released VE-FDM checkpoints depend on it)', IgnoredOptionWarning)

    def momentum_multiplier(self):
        return self.fdm_multiplier if self.uses_multiplier else 1.0

    def coefficients(self, sigma):
        c_skip, c_out, _, c_noise = super().coefficients(sigma)
        c_in = momentum_scale(sigma, self.sigma_min, self.sigma_max,
            self.fdm_beta_min, self.fdm_beta_d, self.momentum_multiplier())
        return c_skip, c_out, c_in, c_noise

class FDM_VPPrecond(MomentumPrecond, VPPrecond):
    defaults = dict(VPPrecond.defaults, **MomentumPrecond.momentum_defaults)

class FDM_VEPrecond(MomentumPrecond, VEPrecond):
    defaults = dict(VEPrecond.defaults, **MomentumPrecond.momentum_defaults)
    uses_multiplier = False  # the reference uses e^{-beta}(1 + beta) here whatever the multiplier

class FDM_EDMPrecond(MomentumPrecond, EDMPrecond):
    defaults = dict(EDMPrecond.defaults, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **MomentumPrecond.momentum_defaults)
    default_model_type = 'SongUNet'

#----------------------------------------------------------------------------
# Name -> class, for checkpoints and the --precond table (fdm.methods).

PRECOND_CLASSES = {cls.__name__: cls for cls in [VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond,
    FDM_VPPrecond, FDM_VEPrecond, FDM_EDMPrecond]}

def precond_class(class_name):
    """The preconditioner class of a class name, bare or dotted as the reference stores it."""
    name = class_name.rsplit('.', 1)[-1]
    if name not in PRECOND_CLASSES:
        raise ValueError(f'unknown preconditioner class {class_name!r}; expected one of {sorted(PRECOND_CLASSES)}')
    return PRECOND_CLASSES[name]

def build_precond(class_name, **init_kwargs):
    """Construct a preconditioner (and its U-Net) from its class name and constructor kwargs."""
    return precond_class(class_name)(**init_kwargs)

#----------------------------------------------------------------------------
