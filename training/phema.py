"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Section 3 and Appendix C): track a few power-function EMAs while training, then build the
EMA of any other length afterwards as a least-squares combination of their stored snapshots.

A power-function EMA with exponent gamma averages the weights seen up to time t with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (Eq. 1-2). Its length is stated as the
profile's standard deviation relative to t, sigma_rel (Eq. 3). Time is counted in training images,
so the update is theta_hat <- beta theta_hat + (1 - beta) theta with beta = (1 - batch / t)^(gamma + 1).
The command line that rebuilds an EMA from a run is `python -m training.tools.phema`.
"""

import copy
import os

import numpy as np
import torch

from fdm.io.network_files import load_network_file, save_snapshot
from torch_utils.errors import UserError
from training.checkpoint.names import PHEMA_NAME, list_files, phema_name

#----------------------------------------------------------------------------
# sigma_rel <-> gamma (Eq. 3): sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

def std_from_gamma(gamma):
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))

def gamma_from_std(sigma_rel):
    """The exponent whose profile has relative std sigma_rel: the real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2 (Eq. 3 expanded).
    sigma_rel must lie in (0, sqrt(1/12)]; sqrt(1/12) is gamma = 0, the plain average."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel <= np.sqrt(1 / 12) * (1 + 1e-12):
        raise ValueError(f'a post-hoc EMA std must lie in (0, {np.sqrt(1 / 12):.4f}), got {sigma_rel:g}')
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return max(float(real.max()), 0.0)  # the root on the gamma >= 0 branch (std falls as gamma grows)

def power_beta(gamma, cur_nimg, batch_size):
    """beta of the step that brings the images seen to cur_nimg (the first step gives beta = 0:
    the EMA starts as a copy of the weights, as its profile over [0, t] requires)."""
    return (1 - batch_size / cur_nimg) ** (gamma + 1)

#----------------------------------------------------------------------------
# Reconstruction (Appendix C.1): a profile p_r is approximated by sum_i x_i p_i, minimising
# integral (sum_i x_i p_i - p_r)^2 dtau. The normal equations A x = b need only the inner
# products of two power profiles, which have a closed form.

def profile_inner(gamma_a, t_a, gamma_b, t_b):
    """integral over tau of p_a(tau) p_b(tau), with p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]."""
    t = np.minimum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) * t ** (gamma_a + gamma_b + 1)
        / ((gamma_a + gamma_b + 1) * t_a ** (gamma_a + 1) * t_b ** (gamma_b + 1)))

def solve_weights(stored, target):
    """Least-squares weights x [K] of the stored profiles for the target profile.
    stored: [(gamma_i, t_i)] of the K stored EMA snapshots; target: (gamma_r, t_r).
    Times are rescaled by the largest so that the powers stay in range."""
    gammas = np.array([g for g, _ in stored], dtype=np.float64)
    scale = max(max(t for _, t in stored), target[1])
    times = np.array([t for _, t in stored], dtype=np.float64) / scale
    gamma_r, t_r = float(target[0]), float(target[1]) / scale
    A = profile_inner(gammas[:, None], times[:, None], gammas[None, :], times[None, :])  # [K, K]
    b = profile_inner(gammas, times, gamma_r, t_r)                                         # [K]
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return x

def combine(pairs):
    """sum_i x_i theta_i over (state dict, x_i) pairs with the same keys, streamed (one state dict in
    memory at a time); float64 accumulation, floating tensors come back in their own dtype, other
    tensors (integer buffers) are taken from the last pair, the newest."""
    acc, last = None, None
    for sd, x in pairs:
        if acc is None:
            acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in sd.items() if torch.is_floating_point(v)}
        for k in acc:
            acc[k] += float(x) * sd[k].detach().cpu().to(torch.float64)
        last = sd
    return {k: acc[k].to(v.dtype) if k in acc else v.detach().cpu().clone() for k, v in last.items()}

#----------------------------------------------------------------------------
# The tracked EMAs during training.

class PowerEMAs:
    """Power-function EMAs of a network's parameters and buffers, one per relative std. The
    network's tensors are looked up once: its parameters are updated in place (optimizer steps,
    load_state_dict), so the step pays two multi-tensor kernels per std and no lookups."""
    def __init__(self, net, stds):
        self.stds = [float(s) for s in stds]
        self.gammas = [gamma_from_std(s) for s in self.stds]
        current = net.state_dict()  # detached views of the live tensors
        self.emas = [{k: v.detach().clone() for k, v in current.items()} for _ in self.stds]
        self._floats = [k for k, v in current.items() if torch.is_floating_point(v)]
        self._others = [k for k, v in current.items() if not torch.is_floating_point(v)]
        self._sources = [current[k] for k in self._floats]
        self._other_sources = [current[k] for k in self._others]

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """After the step that brought the images seen to cur_nimg."""
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_beta(gamma, cur_nimg, batch_size)
            torch._foreach_lerp_([ema[k] for k in self._floats], self._sources, 1 - beta)
            if self._others:
                torch._foreach_copy_([ema[k] for k in self._others], self._other_sources)

    def state_dict(self):
        return dict(stds=list(self.stds), emas=[{k: v.detach().cpu().clone() for k, v in ema.items()} for ema in self.emas])

    def load_state_dict(self, state):
        if [float(s) for s in state['stds']] != self.stds:
            raise ValueError(f'the state tracks post-hoc EMA stds {state["stds"]}, this run {self.stds}')
        emas = state['emas']
        # All checked before anything is copied; copy_ alone would broadcast a tensor of another shape.
        if not isinstance(emas, list) or len(emas) != len(self.emas) or not all(isinstance(e, dict) for e in emas):
            raise ValueError(f'the post-hoc EMA state does not hold {len(self.emas)} profiles')
        for ema, stored in zip(self.emas, emas):
            for k, v in ema.items():
                if not isinstance(stored.get(k), torch.Tensor) or stored[k].shape != v.shape:
                    raise ValueError(f'the post-hoc EMA state has no tensor {k} of shape {list(v.shape)}')
        for ema, stored in zip(self.emas, emas):
            for k, v in ema.items():
                v.copy_(stored[k])

#----------------------------------------------------------------------------
# Files: with each network snapshot, one snapshot per tracked std (phema-<step>-<std>.pt, named
# by training.checkpoint.names), an ordinary network file whose 'extra' says which profile it holds.

def save_phema_snapshots(run_dir, phema, ema, cur_nimg, **snapshot_kwargs):
    module = copy.deepcopy(ema)
    for std, gamma, state in zip(phema.stds, phema.gammas, phema.emas):
        module.load_state_dict(state)
        save_snapshot(os.path.join(run_dir, phema_name(cur_nimg, std)), module,
            extra=dict(phema=dict(std=std, gamma=gamma, cur_nimg=int(cur_nimg))), **snapshot_kwargs)

def reconstruct(run_dir, std, out, kimg=None, log=print):
    """Write to `out` the snapshot of the power-function EMA of relative std `std` at `kimg` (default:
    the newest stored profiles), as the least-squares combination of the stored ones up to then."""
    # In training order (old whole-kimg names included), so the last one used is the newest.
    paths = [os.path.join(run_dir, name) for _nimg, name in list_files(run_dir, PHEMA_NAME)] \
        if os.path.isdir(run_dir) else []
    if not paths:
        raise UserError(f'{run_dir}: no phema-*.pt snapshots; train with --phema-std to store post-hoc EMA profiles')
    profiles = []
    for path in paths:  # first pass: which profile each file holds
        info = (load_network_file(path).get('extra') or {}).get('phema')
        if not isinstance(info, dict) or not {'gamma', 'cur_nimg'} <= set(info):
            raise UserError(f'{path}: not a post-hoc EMA snapshot (no profile in its description); remove it from {run_dir}')
        profiles.append((float(info['gamma']), float(info['cur_nimg'])))
    t_r = max(t for _, t in profiles) if kimg is None else kimg * 1000
    used = [(path, profile) for path, profile in zip(paths, profiles) if profile[1] <= t_r]
    if not used:
        raise UserError(f'no post-hoc EMA profile stored at or before {kimg} kimg in {run_dir}')
    try:
        gamma_r = gamma_from_std(std)
    except ValueError as err:
        raise UserError(str(err)) from None
    weights = solve_weights([profile for _, profile in used], (gamma_r, t_r))
    log(f'Combining {len(used)} stored profiles into sigma_rel {std:g} (gamma {gamma_r:.3f}) at {t_r / 1000:g} kimg...')
    # Second pass, one file in memory at a time (two reads in all: the weights need every profile first).
    loaded = {}
    def stream():
        for (path, _), x in zip(used, weights):
            loaded['last'] = load_network_file(path)
            yield loaded['last']['ema'].state_dict(), x
    state = combine(stream())
    last = loaded['last']
    last['ema'].load_state_dict(state)
    save_snapshot(out, last['ema'], loss_fn=last['loss_fn'], augment_pipe=last['augment_pipe'],
        dataset_kwargs=last['dataset_kwargs'], extra=dict(phema_reconstruction=dict(std=std, gamma=gamma_r,
        cur_nimg=t_r, sources=[os.path.basename(p) for p, _ in used], weights=[float(x) for x in weights])))
    return weights

#----------------------------------------------------------------------------
