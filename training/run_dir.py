"""The run directory: its name, the checks before anything is written to it, the lock that keeps
a second train.py out, what an interrupted run left there, training_options.json and log.txt."""

import contextlib
import fcntl
import json
import os
import re
import shutil
import time

import dnnlib
from torch_utils.io.files import FileError, atomic_write, check_destination, entry_problem, open_in_place, write_json
from training.checkpoint import names

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

# Every file a run writes, by name: a folder, FIFO or symbolic link in the place of one would fail a
# write mid-run, block it, or carry it out of the folder.
RUN_FILE = re.compile(r'^(training_options\.json|command\.json|log\.txt|stats\.jsonl|\.lock)$')
TENSORBOARD_DIR = 'runs'  # --tensorboard's event files
STEP_FILES = (names.SNAPSHOT_NAME, names.STATE_NAME, names.GRID_NAME, names.PHEMA_NAME)
OWN_FILES = {'training_options.json', 'command.json', 'log.txt', '.lock'}  # what a run has written before its first tick

# The run folder of rank 0 for the run's life: checked (before anything is written, so a bad
# --outdir fails at once), made, locked, and tidied. json_files: {name: object} written beside training_options.json. The context is the notes for the log (see
# tidy_interrupted_run); log.txt tees stdout and stderr inside it. A run that fails before it
# has written more than its options and log removes the folder again, if it made it.
@contextlib.contextmanager
def open_run_dir(run_dir, nosubdir, options, json_files=None):
    check_run_dir(run_dir, nosubdir, output_folders(options))
    created = not os.path.exists(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise FileError(f'cannot write to {run_dir} ({err.strerror}); choose a writable --outdir') from None
    lock, logger = None, None
    try:
        lock = lock_run_dir(run_dir)
        notes = tidy_interrupted_run(run_dir) if nosubdir else []
        write_training_options(run_dir, options)
        for name, content in (json_files or {}).items():
            write_json(os.path.join(run_dir, name), content)
        logger = dnnlib.util.Logger(os.path.join(run_dir, 'log.txt'), error=FileError)
        yield notes
    except BaseException:
        if logger is not None:
            logger.close()
            logger = None
        if created and lock is not None:
            remove_if_unused(run_dir)
        raise
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            os.close(lock)

# The folders a run of these training options writes into, inside its run folder.
def output_folders(options):
    return [names.EVALUATIONS_DIR] + ([TENSORBOARD_DIR] if options.get('tensorboard') else [])

# Nothing is written yet: --outdir can be written, and every entry under a name the run writes is
# what the run can write: its files and each step's files a regular file, `folders` (the ones it
# writes into: output_folders) a folder of its own. Else one line naming the entry.
def check_run_dir(run_dir, nosubdir, folders=()):
    if not nosubdir and os.path.exists(run_dir):
        raise FileError(f'{run_dir} already exists; choose another --outdir')
    check_destination(run_dir, '--outdir', folder=True, remedy='choose a writable --outdir')
    if not os.path.isdir(run_dir):
        return
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name in folders:
            own = os.path.isdir(path) and not os.path.islink(path)
            problem, writes = (None if own else entry_problem(path) or 'is a file'), 'a folder of its own'
        elif RUN_FILE.match(name) or any(p.match(name) for p in STEP_FILES):
            problem, writes = entry_problem(path), 'a file'
        else:
            continue
        if problem is not None:
            raise FileError(f"'{path}' {problem} where the run writes {writes}; remove it or choose another --outdir")
    for name in ['log.txt', 'stats.jsonl']:
        check_destination(os.path.join(run_dir, name), name, append=True, remedy='fix it or choose another --outdir')

# One train.py per run folder: a second one would delete the first's temporary files and
# interleave its files. An exclusive lock on run_dir/.lock, held until the returned descriptor
# is closed (the system releases it when the process dies); the file names the holder's pid.
def lock_run_dir(run_dir):
    path = os.path.join(run_dir, '.lock')
    fd = open_in_place(path, os.O_RDWR | os.O_CREAT, 'remove it or choose a writable --outdir')
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode('ascii', 'replace').strip() or 'unknown'
        os.close(fd)
        raise FileError(f'another train.py is using {run_dir} (pid {holder}); wait for it or choose another --outdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    return fd

# Only when the folder holds nothing but what this run wrote before failing: never a user's file.
def remove_if_unused(run_dir):
    present = set(os.listdir(run_dir))
    if present <= OWN_FILES:
        for name in present:
            os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)

# A run killed mid-write leaves temporary files (never a damaged result) and perhaps half a
# stats.jsonl line; clear both before writing into the same folder again. Returns what it did.
def tidy_interrupted_run(run_dir):
    leftovers = sorted(name for name in os.listdir(run_dir) if (name.startswith('.tmp-') or
        name == 'training_options.json.tmp') and os.path.isfile(os.path.join(run_dir, name)))
    for name in leftovers:
        os.remove(os.path.join(run_dir, name))
    stats = os.path.join(run_dir, 'stats.jsonl')
    if os.path.lexists(stats):
        with os.fdopen(open_in_place(stats, os.O_RDWR, 'remove it or choose another --outdir'), 'rb+') as f:
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
# Free space for a few more snapshots and states, else a warning before training starts (a full
# disk fails one write cleanly, see atomic_save, but it stops the run).
def check_free_space(run_dir, net, snapshot=True, state=True, count=3):
    tensors, params = list(net.state_dict().values()), list(net.parameters())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    record = 320  # bytes a torch.save zip spends on each tensor besides its data
    snapshot_bytes = nbytes(tensors) + record * len(tensors)  # the EMA network
    state_bytes = 2 * nbytes(tensors) + 2 * nbytes(params) + record * (2 * len(tensors) + 3 * len(params))  # net, EMA, Adam
    per_save = snapshot * snapshot_bytes + state * state_bytes
    free = shutil.disk_usage(run_dir).free
    if free < count * per_save:
        print(f'Warning: only {free / 2**20:.1f} MiB free in {run_dir}, but each snapshot and training state take '
            f'about {per_save / 2**20:.1f} MiB; free space or choose another --outdir, or the run will stop at a '
            'failed write (earlier files stay intact)', flush=True)
    return free, per_save

#----------------------------------------------------------------------------
# What the user reads at the end of a run, or when it is interrupted: where its results are and
# the commands that use them.

def newest_file(run_dir, pattern):
    """The file of run_dir named by `pattern` (training/checkpoint/names.py) of the latest step, or None."""
    found = [name for _nimg, name in names.list_files(run_dir, pattern) if name.endswith('.pt')]
    return os.path.join(run_dir, found[-1]) if found else None

def describe_end(run_dir, result, seconds, c):
    snapshot = newest_file(run_dir, names.SNAPSHOT_NAME)
    state = newest_file(run_dir, names.STATE_NAME)
    loss = result.get('loss')
    lines = [f'Training done in {_format_seconds(seconds)}: {result["cur_nimg"]:,} images seen ({result["step"]:,} steps)'
        + (f', final loss {loss:.4f}.' if loss is not None else '.')]
    lines.append(f'Newest snapshot: {snapshot or "none (--snap)"}; newest training state: {state or "none (--dump)"}')
    if snapshot is not None:
        samples = os.path.join(run_dir, 'samples-50k')
        name = os.path.splitext(os.path.basename(c['dataset_kwargs']['path']))[0]
        lines += ['Sample 50,000 images:', f'  python generate.py --network={snapshot} --outdir={samples} --seeds=0-49999 --subdirs',
            'Score them against the dataset\'s statistics (python fid.py ref --data=DATASET --dest=REF.npz makes them):',
            f'  python fid.py calc --images={samples} --ref=fid-refs/{name}.npz']
    if state is not None:
        lines.append(f'Train further: python train.py --resume={run_dir} --duration=MIMG')
    return '\n'.join(lines)

def describe_interruption(run_dir):
    state = newest_file(run_dir, names.STATE_NAME)
    where = (f'the last complete training state is {state}; continue the run with:\n  python train.py --resume={run_dir}'
        if state is not None else 'no training state was written yet (--dump); the run starts over when rerun')
    return f'Interrupted at {time.strftime("%Y-%m-%d %H:%M:%S")}; {where}'

def _format_seconds(seconds):
    s = int(round(seconds))
    return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s' if s >= 3600 else f'{s // 60}m {s % 60:02d}s'

#----------------------------------------------------------------------------
