"""The training-state file: everything the next optimizer step depends on, so that a resumed
run continues bit for bit. Plain data in our file envelope (torch.load(weights_only=True)),
written atomically, with a SHA-256 over all of it; read once, by `find_resume_state`.
"""

import os
import re
import warnings

from fdm.checkpoint import CheckpointError
from torch_utils.fileio import atomic_save, check_digest, check_envelope, load_plain, nested_digest

STATE_FORMAT = 'fdm-training-state'
STATE_VERSION = 2  # 2: with a SHA-256 over everything in the file
STATE_NAME = re.compile(r'^training-state-(\d+)\.pt$')
STATE_KEYS = dict(cur_nimg=int, step=int, cur_tick=int, tick_start_nimg=int, nonfinite_total=int, seed=int, net=dict,
    ema=dict, optimizer=dict)
REMEDY = 'resume from an earlier state'

#----------------------------------------------------------------------------
# --resume takes a file or a run directory; a kill can leave the newest state of a directory
# damaged, so the newest one that verifies is taken and each one skipped is named.

def find_resume_state(path):
    """(state file, its verified contents): `path` itself, or the newest valid state in a run directory."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f'{path}: no such file; --resume takes a training-state-*.pt file or a run directory')
        return path, load_training_state(path)
    found = sorted((int(m.group(1)), name) for name in os.listdir(path) if (m := STATE_NAME.match(name)))
    if not found:
        raise CheckpointError(f'{path}: no training-state-*.pt in this directory; pass a state file or a run directory that has one')
    for _kimg, name in reversed(found):
        try:
            return os.path.join(path, name), load_training_state(os.path.join(path, name))
        except CheckpointError as err:
            warnings.warn(f'skipping {err}', UserWarning)
    raise CheckpointError(f'{path}: none of its {len(found)} training-state files is valid; '
        'resume from a run directory or file that has an intact state')

# Version 1 (before the checksum) is still read; every part is checked, so a file that lacks one
# fails here and not in the middle of restoring the optimizer.
def load_training_state(path):
    """A training state, checked: complete, of a known version, and (version 2) matching its SHA-256."""
    name = os.path.basename(path)
    state = load_plain(path, name, REMEDY, error=CheckpointError)
    check_envelope(state, STATE_FORMAT, (1, STATE_VERSION), name, 'an FDM training state',
        '--resume takes a training-state-*.pt file written by this code', error=CheckpointError)
    wrong = [key for key, kind in STATE_KEYS.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise CheckpointError(f'{name}: incomplete training state (no valid {", ".join(wrong)}); {REMEDY}')
    digest = state.pop('sha256', None)
    if state['version'] >= 2:
        check_digest(digest, nested_digest(state), name, REMEDY, error=CheckpointError)
    return state

def save_training_state(path, **fields):
    state = dict(format=STATE_FORMAT, version=STATE_VERSION, **fields)
    atomic_save(dict(state, sha256=nested_digest(state)), path)

#----------------------------------------------------------------------------
