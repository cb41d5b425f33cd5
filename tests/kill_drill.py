"""Kill drill: SIGKILL a small CPU training run at random moments, resume it each time, and check
that its final weights equal those of an uninterrupted run with the same seed.

    python tests/kill_drill.py --kills 20

The run is driven exactly as a user would: `python train.py ... --outdir=RUN --nosubdir`, then
after each kill the same command with `--resume=RUN`. A tick is one step, and every tick writes
a snapshot and a training state. Each kill aims at a random moment of start-up (importing,
loading the state), at a random moment of training, or at the moment a snapshot or state
write has begun (the parent sees its temporary file appear; the training code has no hook).
Where it really landed is read from what it left behind: a temporary file of an interrupted
write names the file being written. After every kill, every complete file in the run
directory must load and pass its checksum. tests/train/test_reliability.py runs a short version.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import click

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _path in (ROOT, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from conftest import write_image_zip  # noqa: E402
from fdm.io.network_files import CheckpointError, load_network_file  # noqa: E402
from training.checkpoint.names import STATE_NAME, list_files  # noqa: E402
from training.checkpoint.training_state import load_training_state  # noqa: E402

#----------------------------------------------------------------------------
# One training process, watched line by line.

class Trainer:
    def __init__(self, args, log_path):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        self.log = open(log_path, 'a')
        self.started = time.time()
        self.training = threading.Event()  # set once the first step is about to run
        self.lines = []
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py')] + args, cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.log.write(line)
            if line.startswith('Training for') or line.startswith('Training already complete'):
                self.training.set()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()

    def wait(self, timeout=None):
        code = self.proc.wait(timeout)
        self.reader.join()
        self.log.close()
        return code

    def resumed_from(self):
        for line in self.lines:
            m = re.match(r'Resuming from "(.*)" \((\d+) images seen\)', line)
            if m:
                return int(m.group(2))
        return None

    def ticks(self):
        return sum(1 for line in self.lines if line.startswith('tick '))

#----------------------------------------------------------------------------

def train_args(data, run_dir, steps, seed, resume):
    batch = 8
    args = [f'--outdir={run_dir}', '--nosubdir', f'--data={data}', '--cond=1', '--arch=ddpmpp', '--cbase=16',
        '--cres=1,2', f'--batch={batch}', f'--duration={steps * batch / 1e6}', f'--tick={batch / 1e3}', '--snap=1',
        '--dump=1', '--workers=0', f'--seed={seed}', '--warmup_ite=10', '--lr_rampup=0.00004', '--grid-images=0']
    return args + ([f'--resume={run_dir}'] if resume else [])

def has_state(run_dir):
    return os.path.isdir(run_dir) and any(STATE_NAME.match(name) for name in os.listdir(run_dir))

def temporary_files(run_dir):
    return {name for name in os.listdir(run_dir) if name.startswith('.tmp-')} if os.path.isdir(run_dir) else set()

def where_it_landed(leftovers, training_started):
    """What the killed process was doing, from the temporary file it left (if any)."""
    for prefix, place in [('.tmp-training-state-', 'state dump'), ('.tmp-network-snapshot-', 'snapshot write')]:
        if any(name.startswith(prefix) for name in leftovers):
            return place
    if any(name.endswith('.png') for name in leftovers):
        return 'sample grid write'
    return 'step' if training_started else 'start-up/resume'

def damaged_files(run_dir):
    """Complete (renamed) files that do not load: must stay empty whatever the kill interrupted."""
    bad = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        try:
            if STATE_NAME.match(name):
                load_training_state(path)
            elif name.startswith('network-snapshot-'):
                load_network_file(path)
        except CheckpointError as err:
            bad.append(f'{name}: {err}')
    return bad

def final_state(run_dir):
    _nimg, name = list_files(run_dir, STATE_NAME)[-1]  # the most images seen: every tick has a state of its own
    return load_training_state(os.path.join(run_dir, name))

def same_tensors(a, b):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b

#----------------------------------------------------------------------------

# What each kill aims at, with its weight: a random moment of start-up or of training, or the
# moment a temporary file of a snapshot or state write appears in the run directory (the
# parent watches the folder; no hook in the training code).
AIMS = {'start-up': 1, 'step': 3, 'snapshot write': 3, 'state dump': 3}
WRITE_PREFIX = {'snapshot write': '.tmp-network-snapshot-', 'state dump': '.tmp-training-state-'}

def wait_for_write(life, run_dir, prefix, earlier, timeout=60):
    """Return as soon as a new temporary file starting with `prefix` exists (or the process ended)."""
    deadline = time.time() + timeout
    while life.proc.poll() is None and time.time() < deadline:
        if any(name.startswith(prefix) for name in temporary_files(run_dir) - earlier):
            return
        time.sleep(0.0005)

def run_drill(workdir, kills=20, steps=None, seed=0, max_delay=0.6, aims=AIMS, rng_seed=0, echo=print):
    """Returns a summary dict; `rows` holds one entry per kill."""
    start = time.time()
    rng = random.Random(rng_seed)
    steps = steps or max(24, 5 * kills)
    data = write_image_zip(os.path.join(workdir, 'data.zip'), num_images=16, resolution=8)
    ref_dir, run_dir = os.path.join(workdir, 'reference'), os.path.join(workdir, 'killed')

    # The uninterrupted run.
    ref = Trainer(train_args(data, ref_dir, steps, seed, resume=False), os.path.join(workdir, 'reference.log'))
    if ref.wait(timeout=600) != 0:
        raise RuntimeError(f'the reference run failed:\n{"".join(ref.lines[-20:])}')
    echo(f'reference run: {steps} steps in {time.time() - ref.started:.1f} s')

    rows, restarts_without_state, damaged = [], 0, []
    while len(rows) < kills:
        resume = has_state(run_dir)
        restarts_without_state += not resume
        earlier_leftovers = temporary_files(run_dir)  # the new process removes them, unless killed first
        life = Trainer(train_args(data, run_dir, steps, seed, resume), os.path.join(workdir, 'killed.log'))
        aim = rng.choices(list(aims), weights=list(aims.values()))[0]
        if aim == 'start-up':
            time.sleep(rng.uniform(0, 2.0))  # while importing, loading the state, replaying the sampler
        elif aim == 'step':
            life.training.wait(timeout=120)
            time.sleep(rng.uniform(0, max_delay))
        else:
            life.training.wait(timeout=120)
            time.sleep(rng.uniform(0, max_delay))  # not always the first write
            wait_for_write(life, run_dir, WRITE_PREFIX[aim], earlier_leftovers)
        if life.proc.poll() is not None:
            code = life.wait()
            if code != 0:
                raise RuntimeError(f'the training process failed (exit {code}):\n{"".join(life.lines[-20:])}')
            echo('the run finished before all kills landed; use more --steps')
            break
        training_started = life.training.is_set()
        life.kill()
        landed = where_it_landed(temporary_files(run_dir) - earlier_leftovers, training_started)
        row = dict(kill=len(rows) + 1, alive_s=time.time() - life.started, aim=aim, landed=landed,
            resumed_from=life.resumed_from() if resume else None, ticks=life.ticks())
        rows.append(row)
        damaged += [f'after kill {row["kill"]}: {msg}' for msg in damaged_files(run_dir)]
        start_point = ('fresh start, no state yet' if not resume else 'resuming, killed before it said from where'
            if row['resumed_from'] is None else f'resumed from {row["resumed_from"]} images')
        echo(f'kill {row["kill"]:3d}: after {row["alive_s"]:5.2f} s, aimed at {aim:<14s} landed in {landed:<17s} ({start_point}; '
            f'{row["ticks"]} ticks done)')

    # The last life runs to the end.
    last = Trainer(train_args(data, run_dir, steps, seed, resume=has_state(run_dir)), os.path.join(workdir, 'killed.log'))
    if last.wait(timeout=600) != 0:
        raise RuntimeError(f'the final resumed run failed:\n{"".join(last.lines[-20:])}')
    a, b = final_state(ref_dir), final_state(run_dir)
    identical = all(same_tensors(a[key], b[key]) for key in ['net', 'ema', 'optimizer', 'cur_nimg', 'step'])
    landed = {}
    for row in rows:
        landed[row['landed']] = landed.get(row['landed'], 0) + 1
    return dict(kills=len(rows), resumes=len(rows) + 1 - restarts_without_state, fresh_restarts=restarts_without_state,
        steps=steps, final_step=b['step'], landed=landed, damaged=damaged, identical=identical, rows=rows,
        wall_s=time.time() - start)

def format_summary(s):
    lines = ['', f'{"kill":>4}  {"alive (s)":>9}  {"aimed at":<14}  {"landed in":<17}  {"resumed from (images)":>21}  {"ticks":>5}']
    for r in s['rows']:
        lines.append(f'{r["kill"]:>4}  {r["alive_s"]:>9.2f}  {r["aim"]:<14}  {r["landed"]:<17}  '
            f'{"-" if r["resumed_from"] is None else r["resumed_from"]:>21}  {r["ticks"]:>5}')
    lines += ['',
        f'kills survived:           {s["kills"]}',
        f'resumes:                  {s["resumes"]} (and {s["fresh_restarts"]} fresh start(s) where no state existed yet)',
        f'kills by place:           {", ".join(f"{k} {v}" for k, v in sorted(s["landed"].items()))}',
        f'damaged complete files:   {len(s["damaged"])}',
        f'steps:                    {s["final_step"]} of {s["steps"]}',
        f'final weights identical:  {"yes" if s["identical"] else "NO"} (net, EMA and optimizer state vs. an uninterrupted run)',
        f'wall time:                {s["wall_s"]:.1f} s']
    return '\n'.join(lines)

#----------------------------------------------------------------------------

@click.command()
@click.option('--kills', help='Number of SIGKILLs', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--steps', help='Training steps of the run  [default: max(24, 5 x kills)]', type=click.IntRange(min=2))
@click.option('--seed', help='Training seed', type=int, default=0, show_default=True)
@click.option('--rng-seed', help='Seed of the kill moments', type=int, default=0, show_default=True)
@click.option('--max-delay', help='Latest kill after training starts, seconds', type=float, default=0.6, show_default=True)
@click.option('--workdir', help='Keep the runs here instead of a temporary folder', type=str)
def main(kills, steps, seed, rng_seed, max_delay, workdir):
    """SIGKILL a CPU training run again and again, resume it, compare with an uninterrupted run."""
    tmp = None
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix='kill-drill-')
    os.makedirs(workdir, exist_ok=True)
    try:
        summary = run_drill(workdir, kills=kills, steps=steps, seed=seed, max_delay=max_delay, rng_seed=rng_seed)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo(format_summary(summary))
    if not summary['identical'] or summary['damaged'] or summary['kills'] < kills:
        raise SystemExit(1)

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
