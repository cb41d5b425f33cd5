"""Fast Diffusion Model (FDM, Wu et al. 2023): the method, in one small package.

- `momentum`: the momentum input scaling s(sigma), the one thing FDM changes in the network.
- `schedules`: sigma(t) for VP, the iDDPM table, EDM time steps.
- `preconditioning`: D(x; sigma) for VP, VE, iDDPM, EDM and FDM-VP/VE/EDM.
- `loss`: VP, VE and EDM losses with FDM's loss-weight warmup.
- `samplers`, `dpm_solver`: EDM Heun, EDM's ablation sampler, DPM-Solver++ (one signature).
- `networks`: the U-Nets F that the preconditioners wrap (DDPM++, NCSN++, ADM).
- `io`: network files: our safe snapshot format (.pt, .safetensors) and reference EDM/FDM pickles, read without running them.
"""

from fdm.momentum import momentum_scale
from fdm.preconditioning import (PRECOND_CLASSES, EDMPrecond, FDM_EDMPrecond, FDM_VEPrecond, FDM_VPPrecond,
    IgnoredOptionWarning, Precond, VEPrecond, VPPrecond, build_precond, iDDPMPrecond)
from fdm.loss import EDMLoss, VELoss, VPLoss, build_loss, warmup_clamp
from fdm.samplers import SAMPLERS, PerSeedGenerator, ablation_sampler, edm_sampler
from fdm.dpm_solver import dpm_solver_sampler
from fdm.io.network_files import CheckpointError, load_network, load_network_file, save_snapshot

__all__ = [
    'momentum_scale', 'Precond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond', 'FDM_VPPrecond',
    'FDM_VEPrecond', 'FDM_EDMPrecond', 'PRECOND_CLASSES', 'build_precond', 'IgnoredOptionWarning',
    'VPLoss', 'VELoss', 'EDMLoss', 'build_loss', 'warmup_clamp', 'edm_sampler', 'ablation_sampler', 'dpm_solver_sampler',
    'SAMPLERS', 'PerSeedGenerator',
    'CheckpointError', 'load_network', 'load_network_file', 'save_snapshot',
]
