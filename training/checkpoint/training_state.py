"""The training-state file: everything the next optimizer step depends on, so that a resumed
run continues bit for bit. Plain data in our file envelope (torch.load(weights_only=True)),
written atomically, with a SHA-256 over all of it; read once, by `find_resume_state`, which
also takes the reference's training states (training.checkpoint.reference_state) in the same shape.
"""

import dataclasses
import math
import os
import warnings

import torch

from fdm.io.network_files import CheckpointError
from torch_utils.io.files import atomic_save, check_digest, check_envelope, load_plain, nested_digest, tree_error
from training.checkpoint.names import STATE_NAME, check_step, list_files

STATE_FORMAT = 'fdm-training-state'
STATE_VERSION = 2  # 2: with a SHA-256 over everything in the file
MAX_NIMG = 10**12  # images: far more than any run (EDM's longest, ImageNet-64, is 2.5e9); steps too
COUNTER_LIMITS = dict(cur_nimg=MAX_NIMG, step=MAX_NIMG, cur_tick=MAX_NIMG, tick_start_nimg=MAX_NIMG,
    nonfinite_total=2**63, seed=2**64)
REMEDY = 'resume from an earlier state'

#----------------------------------------------------------------------------
# --resume takes a file or a run directory; a kill can leave the newest state of a directory
# damaged, so the newest one that verifies is taken and each one skipped is named. Newest: the
# most images seen by the name (training.checkpoint.names), old whole-kimg names included.

def find_resume_state(path, batch_size=None, seed=None, draw_seed=None):
    """(state file, its verified contents): `path` itself, or the newest valid state in a run directory.
    A reference state's step is its images // batch_size, its seed `seed` or else draw_seed()."""
    read = lambda file: _read_state(file, batch_size, seed, draw_seed)
    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise CheckpointError(f'{path}: no such file; --resume takes a training-state-*.pt file or a run directory')
        return path, read(path)  # anything but a regular file is refused as it is opened
    found = list_files(path, STATE_NAME)
    if not found:
        raise CheckpointError(f'{path}: no training-state-*.pt in this directory; pass a state file or a run directory that has one')
    for _nimg, name in reversed(found):
        try:
            return os.path.join(path, name), read(os.path.join(path, name))
        except CheckpointError as err:
            warnings.warn(f'skipping {err}', UserWarning)
    raise CheckpointError(f'{path}: none of its {len(found)} training-state files is valid; '
        'resume from a run directory or file that has an intact state')

# Ours, or the reference's (imported here: that reader builds on this module).
def _read_state(path, batch_size, seed, draw_seed):
    from training.checkpoint.reference_state import is_reference_state, read_reference_state
    if is_reference_state(path):
        return read_reference_state(path, batch_size, seed, draw_seed)
    return load_training_state(path)

# Version 1 (before the checksum) is still read; every part is checked, so a file that lacks one
# fails here (and find_resume_state takes an older one) and not in the middle of restoring the optimizer.
def load_training_state(path):
    """A training state, checked: complete, of a known version, every field of the type and
    range the training loop needs, and (version 2) matching its SHA-256."""
    name = os.path.basename(path)
    state = load_plain(path, name, REMEDY, error=CheckpointError)
    check_envelope(state, STATE_FORMAT, (1, STATE_VERSION), name, 'an FDM training state',
        '--resume takes a training-state-*.pt file written by this code', error=CheckpointError)
    error = state_error(state)
    if error is not None:
        raise CheckpointError(f'{name}: {error}; {REMEDY}')
    digest = state.pop('sha256', None)
    if state['version'] >= 2:
        try:
            actual = nested_digest(state)
        except (TypeError, ValueError, RecursionError) as err:
            raise CheckpointError(f'{name}: holds something other than plain data ({err}); {REMEDY}') from None
        check_digest(digest, actual, name, REMEDY, error=CheckpointError)
    return state

# Every check of a state is here, before the run folder or the network exists, so that a damaged
# state in a run directory is skipped for an older one; restoring it checks only what needs the
# network (Adam's moments against the parameters' shapes, see load_optimizer_state).
def state_error(state):
    """None, or why a state (ours or the reference's, read) cannot be resumed: its fields
    (_fields_error), its cost (tree_error), then Adam's values (adam_error)."""
    return _fields_error(state) or tree_error(state) or adam_error(state['optimizer']['state'])

# The fields as the loop uses them: counters are ints in range and consistent; net and ema are
# {name: tensor} of the same names and shapes; the optimizer is Adam's
# {'state': {index: {name: tensor or number}}, 'param_groups': [{'params': [index, ...], ...}]}.
def _fields_error(state):
    wrong = [key for key, hi in COUNTER_LIMITS.items() if type(state.get(key)) is not int or not 0 <= state[key] < hi]
    wrong += [key for key in ('net', 'ema', 'optimizer') if not isinstance(state.get(key), dict)]
    if wrong:
        return f'incomplete training state (no valid {", ".join(wrong)})'
    if state['step'] > state['cur_nimg'] or state['tick_start_nimg'] > state['cur_nimg']:
        return 'inconsistent counters (more steps than images, or a tick that starts after the last image)'
    shapes = {}
    for key in ('net', 'ema'):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[key].items()):
            return f'{key} is not a dict of named tensors'
        shapes[key] = {k: v.shape for k, v in state[key].items()}
    if shapes['net'] != shapes['ema']:
        return 'net and ema differ in tensor names or shapes'
    optimizer = state['optimizer']
    groups, entries = optimizer.get('param_groups'), optimizer.get('state')
    if set(optimizer) != {'state', 'param_groups'} or not isinstance(groups, list) or not isinstance(entries, dict):
        return 'the optimizer state is not {"state": dict, "param_groups": list}'
    if not all(isinstance(g, dict) and isinstance(g.get('params'), list) and all(type(i) is int for i in g['params'])
            for g in groups):
        return 'an optimizer parameter group has no list of parameter indices'
    plain = (type(None), bool, int, float, str)
    if not all(isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))
            for g in groups for v in g.values()):
        return 'an optimizer parameter group holds something other than numbers, flags and names'
    params = [i for g in groups for i in g['params']]
    if len(set(params)) != len(params) or not all(0 <= i < len(state['net']) for i in params):
        return 'the optimizer names a parameter twice or one the network does not have'
    params = set(params)
    if not all(i in params and isinstance(v, dict) and all(isinstance(k, str) and (isinstance(x, torch.Tensor)
            or type(x) in (int, float)) for k, x in v.items()) for i, v in entries.items()):
        return 'the optimizer state has an entry that is not {name: tensor or number} of a known parameter'
    return None

def save_training_state(path, **fields):
    state = dict(format=STATE_FORMAT, version=STATE_VERSION, **fields)
    atomic_save(dict(state, sha256=nested_digest(state)), path)

#----------------------------------------------------------------------------
# The counters a training state records besides the tensors.

@dataclasses.dataclass
class Progress:
    cur_nimg: int = 0           # images seen
    step: int = 0               # optimizer steps taken
    cur_tick: int = 0           # ticks completed
    tick_start_nimg: int = 0    # cur_nimg when the current tick began
    nonfinite_total: int = 0    # non-finite gradient elements replaced so far

#----------------------------------------------------------------------------
# Everything a resume needs, by name (EDM2's CheckpointIO): the counters, the network, its EMA,
# Adam and the post-hoc EMA profiles. One save writes them all; one restore puts a verified state
# (find_resume_state) back into the live objects.

class CheckpointIO:
    def __init__(self, progress, net, ema, optimizer, phema=None):
        self.progress, self.net, self.ema, self.optimizer, self.phema = progress, net, ema, optimizer, phema

    def save(self, path, seed):
        check_step(path, self.progress.cur_nimg)  # never over another step's state
        fields = dataclasses.asdict(self.progress)
        fields.update(seed=seed, net=self.net.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict())
        if self.phema is not None:
            fields.update(phema=self.phema.state_dict())
        save_training_state(path, **fields)

    def restore(self, state, path):
        name = os.path.basename(path)
        try:
            self.net.load_state_dict(state['net'])
            self.ema.load_state_dict(state['ema'])
            load_optimizer_state(self.optimizer, state['optimizer'], name)
            if self.phema is not None:
                if state.get('phema') is None:
                    raise CheckpointError(f'{name} was written without --phema-std, so the post-hoc EMA profiles since '
                        'the start cannot be recovered; resume without --phema-std, or start a new run')
                self.phema.load_state_dict(state['phema'])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f'{name} does not fit the configured network '
                f'({str(err).strip().splitlines()[0][:200]}); resume with the options of the run that wrote it') from None
        for f in dataclasses.fields(Progress):
            setattr(self.progress, f.name, state[f.name])

#----------------------------------------------------------------------------
# Adam from a training state: its moments and step counts, checked against the live parameters.

def load_optimizer_state(optimizer, saved, name):
    """Adam's moments and step counts from a training state `name` (its values checked by
    state_error); its settings (betas, eps, the fused or foreach implementation) stay the run's own.
    torch's load_state_dict would take the stored settings too (a bf16 GPU run's fused Adam in an
    fp32 resume, a damaged file's NaN betas), and maps moments to parameters by position without
    checking their shapes (a tensor of another size would fail in the middle of the first step, not
    as a file error)."""
    settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        params = group['params']
        group.clear()
        group.update(own, params=params)
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                if key != 'step' and value.shape != p.shape:
                    raise CheckpointError(f"{name}: Adam's {key} for parameter {i} is shape {list(value.shape)} where "
                        f'the network has shape {list(p.shape)}; the file is damaged or from another network, '
                        'resume from an earlier state')

# What Adam's state can be checked for without the network: a step count is a whole number in
# range (a Python int of any size survives torch.load, so it is bounded before any conversion);
# a moment is a tensor of finite values, a second moment has none below zero (its square root is
# the denominator: one NaN there spreads to every weight it touches).
def adam_error(entries):
    """None, or what is wrong with the values of Adam's state {parameter index: {name: value}}."""
    for i, entry in entries.items():
        for key, value in entry.items():
            problem = _step_problem(value) if key == 'step' else _moment_problem(key, value)
            if problem is not None:
                return f"Adam's {key} for parameter {i} {problem}"
    return None

def _step_problem(value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return f'has shape {list(value.shape)}, not one count'
        value = value.item()
    count = int(value) if type(value) is float and math.isfinite(value) and value.is_integer() else value
    if type(count) is int and 0 <= count < MAX_NIMG:
        return None
    shown = repr(value)
    return f'is {shown if len(shown) <= 24 else shown[:20] + "..."}, not a count of steps'

def _moment_problem(key, value):
    if not isinstance(value, torch.Tensor):
        return f'is the number {value!r:.24}, not a tensor'
    if not torch.isfinite(value).all() or (key.endswith('_sq') and (value < 0).any()):
        return 'holds non-finite values' + (' or values below zero' if key.endswith('_sq') else '')
    return None

#----------------------------------------------------------------------------
