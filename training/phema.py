"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Section 3 and Appendix C): track a few power-function EMAs while training, then build the
EMA of any other length afterwards as a least-squares combination of their stored snapshots.

A power-function EMA with exponent gamma averages the weights seen up to time t with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (Eq. 1-2). Its length is stated as the
profile's standard deviation relative to t, sigma_rel (Eq. 3). Time is counted in training images,
so the update is theta_hat <- beta theta_hat + (1 - beta) theta with beta = (1 - batch / t)^(gamma + 1).
The command line that rebuilds an EMA from a run is `python -m training.tools.phema`.
"""

import bisect
import collections
import copy
import math
import os
import reprlib

import numpy as np
import torch

from fdm.io.network_files import CheckpointError, load_network_file, save_snapshot
from torch_utils.cli.options import Range
from torch_utils.errors import FileError, OptionError
from training.checkpoint.names import PHEMA_NAME, list_files, phema_name
from training.checkpoint.training_state import MAX_NIMG

# sigma_rel, for train.py --phema-std and the reconstruction's --std alike. Below 0.001 two stds
# would share a file name (3 decimals) and gamma exceeds 1000; above sqrt(1/12) = 0.2887, the
# plain average (gamma = 0), the exponent turns negative and the first steps weigh the most.
STD_RANGE = Range(min=0.001, max=0.288)
KIMG_RANGE = Range(min=0, max=MAX_NIMG // 1000, min_open=True)  # the reconstruction's --kimg

#----------------------------------------------------------------------------
# sigma_rel <-> gamma (Eq. 3): sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

def std_from_gamma(gamma):
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))

def gamma_from_std(sigma_rel):
    """The exponent whose profile has relative std sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2 (Eq. 3 expanded).
    sigma_rel must lie in STD_RANGE (OptionError otherwise), where gamma runs from 997 to 0.014."""
    STD_RANGE.check('post-hoc EMA std', sigma_rel)
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())

MAX_GAMMA = math.ceil(gamma_from_std(STD_RANGE.min))  # what a stored profile may hold

def power_beta(gamma, cur_nimg, batch_size):
    """beta of the step that brings the images seen to cur_nimg (the first step gives beta = 0:
    the EMA starts as a copy of the weights, as its profile over [0, t] requires)."""
    return (1 - batch_size / cur_nimg) ** (gamma + 1)

#----------------------------------------------------------------------------
# Reconstruction (Appendix C.1): a profile p_r is approximated by sum_i x_i p_i, minimising
# integral (sum_i x_i p_i - p_r)^2 dtau. The normal equations A x = b need only the inner
# products of two power profiles, which have a closed form.

def profile_inner(gamma_a, t_a, gamma_b, t_b):
    """integral over tau of p_a(tau) p_b(tau), with p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]:
    (gamma_a + 1) (gamma_b + 1) r / ((gamma_a + gamma_b + 1) max(t_a, t_b)), r the ratio of the earlier
    time to the later raised to the later profile's gamma (a power of a number <= 1: no overflow)."""
    later_gamma = np.where(t_a < t_b, gamma_b, gamma_a)
    r = (np.minimum(t_a, t_b) / np.maximum(t_a, t_b)) ** later_gamma
    return (gamma_a + 1) * (gamma_b + 1) * r / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))

def solve_weights(stored, target):
    """Weights x [K] of the stored profiles for the target profile: the least-squares solution,
    normalised to sum 1 as in EDM2 (the result is an average, so a constant comes back as itself).
    stored: [(gamma_i, t_i)] of the K stored EMA snapshots; target: (gamma_r, t_r)."""
    gammas = np.array([g for g, _ in stored], dtype=np.float64)
    times = np.array([t for _, t in stored], dtype=np.float64) / target[1]  # only ratios of times matter
    gamma_r = float(target[0])
    A = profile_inner(gammas[:, None], times[:, None], gammas[None, :], times[None, :])  # [K, K]
    b = profile_inner(gammas, times, gamma_r, 1.0)                                          # [K]
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return x / x.sum()

def combine(pairs):
    """sum_i x_i theta_i over (tensors, x_i) pairs, tensors a dict of floating tensors with the same
    names and shapes in every pair, streamed (one dict in memory at a time); accumulated in float64
    and returned in each tensor's dtype."""
    acc = None
    for tensors, x in pairs:
        if acc is None:
            acc = {k: (torch.zeros(v.shape, dtype=torch.float64), v.dtype) for k, v in tensors.items()}
        for k, (total, _dtype) in acc.items():
            total += float(x) * tensors[k].detach().cpu().to(torch.float64)
    return {k: total.to(dtype) for k, (total, dtype) in acc.items()}

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

# A stored profile: its time and exponent, its file, and '[shape] dtype' of each parameter by name.
Profile = collections.namedtuple('Profile', ['cur_nimg', 'gamma', 'path', 'parameters'])

# Which profile a stored file holds, read from its description ('extra.phema', written above). The
# file may come from elsewhere: the fields are checked here, once, with exact comparisons (NaN fails
# them; an integer too large for a float is compared, never converted).
def read_profile(path):
    """The Profile a file holds; CheckpointError (one line) if it holds none or a damaged one."""
    data = load_network_file(path)
    extra = data.get('extra')
    info = extra.get('phema') if isinstance(extra, dict) else None
    if not isinstance(info, dict):
        raise CheckpointError(f'{path}: not a post-hoc EMA profile (its description has no extra.phema); '
            'move it out of the run directory')
    gamma, cur_nimg = info.get('gamma'), info.get('cur_nimg')
    if type(gamma) not in (int, float) or not 0 <= gamma <= MAX_GAMMA:
        problem = f'gamma {reprlib.repr(gamma)} is not a number in 0..{MAX_GAMMA}'
    elif type(cur_nimg) is not int or not 1 <= cur_nimg <= MAX_NIMG:
        problem = f'cur_nimg {reprlib.repr(cur_nimg)} is not an integer in 1..{MAX_NIMG}'
    else:
        parameters = {k: f'{list(v.shape)} {v.dtype}' for k, v in data['ema'].named_parameters()}
        return Profile(cur_nimg, float(gamma), path, parameters)
    raise CheckpointError(f'{path}: the post-hoc EMA profile it describes is damaged ({problem}); '
        'move it out of the run directory')

def reconstruct(run_dir, std, out, kimg=None, log=print):
    """Write to `out` the snapshot of the power-function EMA of relative std `std` at `kimg`, a time at
    which profiles were stored (default: the newest), as the least-squares combination of the profiles
    stored up to then. As in EDM2, the parameters are combined and the buffers copied from the newest."""
    gamma_r = gamma_from_std(std)
    KIMG_RANGE.check('kimg', kimg)
    names = list_files(run_dir, PHEMA_NAME) if os.path.isdir(run_dir) else []
    if not names:
        raise FileError(f'{run_dir}: no phema-*.pt snapshots; train with --phema-std to store post-hoc EMA profiles')
    # First pass: which profile each file holds, in the order of the times they record (the older
    # whole-kimg names can sort otherwise), so the last one used is the newest.
    profiles = sorted((read_profile(os.path.join(run_dir, name)) for _nimg, name in names), key=lambda p: p.cur_nimg)
    times = sorted({p.cur_nimg for p in profiles})
    t_r = times[-1] if kimg is None else round(kimg * 1000)
    if t_r not in times:
        i = bisect.bisect(times, t_r)
        nearest = ' or '.join(kimg_of(t) for t in times[max(i - 1, 0):i + 1])
        raise OptionError(f'--kimg={kimg}: no post-hoc EMA profiles were stored at {t_r:,} images in {run_dir}; '
            f'pass a time at which they were, the nearest being {nearest} kimg')
    used = [p for p in profiles if p.cur_nimg <= t_r]
    newest = used[-1]
    for p in used:
        if p.parameters != newest.parameters:
            key = next(k for k in sorted(p.parameters.keys() | newest.parameters.keys())
                if p.parameters.get(k) != newest.parameters.get(k))
            raise CheckpointError(f'{p.path}: its parameter {key} is {p.parameters.get(key) or "absent"}, in '
                f'{os.path.basename(newest.path)} {newest.parameters.get(key) or "absent"}; it holds another '
                f'network, move it out of {run_dir}')
    weights = solve_weights([(p.gamma, p.cur_nimg) for p in used], (gamma_r, t_r))
    log(f'Combining {len(used)} stored profiles into sigma_rel {std:g} (gamma {gamma_r:.3f}) at {kimg_of(t_r)} kimg...')
    # Second pass, one file in memory at a time (two reads in all: the weights need every profile
    # first); the newest comes last and is kept, its buffers as they are.
    snapshot = None
    def stream():
        nonlocal snapshot
        for p, x in zip(used, weights):
            snapshot = load_network_file(p.path)
            yield dict(snapshot['ema'].named_parameters()), x
    combined = combine(stream())
    with torch.no_grad():
        for k, v in snapshot['ema'].named_parameters():
            v.copy_(combined[k])
    save_snapshot(out, snapshot['ema'], loss_fn=snapshot['loss_fn'], augment_pipe=snapshot['augment_pipe'],
        dataset_kwargs=snapshot['dataset_kwargs'], extra=dict(phema_reconstruction=dict(std=std, gamma=gamma_r,
        cur_nimg=t_r, sources=[os.path.basename(p.path) for p in used], weights=[float(x) for x in weights])))
    return weights

def kimg_of(cur_nimg):
    """Images as kimg, exactly: '200', '0.048', '12345.678'."""
    return f'{cur_nimg / 1000:.3f}'.rstrip('0').rstrip('.')

#----------------------------------------------------------------------------
