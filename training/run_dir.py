"""The run directory: its name, a check that it can be written, what an interrupted run left
there, and training_options.json."""

import json
import os
import re

from torch_utils.fileio import FileError, atomic_write

#----------------------------------------------------------------------------
# Next free run directory: 1 + the largest leading number among existing subdirectories.

def next_run_dir(outdir, desc):
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = re.match(r'^\d+', name)
            if m and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(m.group()))
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

# Made and test-written before training starts, so that a bad --outdir fails at once. Returns
# what was tidied (see tidy_interrupted_run), for the log.
def prepare_run_dir(run_dir, nosubdir):
    if not nosubdir and os.path.exists(run_dir):
        raise FileError(f'{run_dir} already exists; choose another --outdir')
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, '.write-test')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as err:
        raise FileError(f'cannot write to {run_dir} ({err.strerror}); choose a writable --outdir') from None
    return tidy_interrupted_run(run_dir) if nosubdir else []

# A run killed mid-write leaves temporary files (never a damaged result) and perhaps half a
# stats.jsonl line; clear both before writing into the same folder again. Returns what it did.
def tidy_interrupted_run(run_dir):
    leftovers = sorted(name for name in os.listdir(run_dir) if (name.startswith('.tmp-') or
        name == 'training_options.json.tmp') and os.path.isfile(os.path.join(run_dir, name)))
    for name in leftovers:
        os.remove(os.path.join(run_dir, name))
    stats = os.path.join(run_dir, 'stats.jsonl')
    if os.path.isfile(stats):
        with open(stats, 'rb+') as f:
            data = f.read()
            if data and not data.endswith(b'\n'):
                f.truncate(data.rfind(b'\n') + 1)
    return [f'Removed {len(leftovers)} temporary file(s) of an interrupted run: {", ".join(leftovers)}'] if leftovers else []

# The options as train.py has always written them (indent 2, no final newline), so that a
# resumed or repeated run's file compares equal byte for byte.
def write_training_options(run_dir, c):
    text = json.dumps(c, indent=2)
    atomic_write(os.path.join(run_dir, 'training_options.json'), lambda f: f.write(text.encode('utf-8')))

#----------------------------------------------------------------------------
