"""The paper's tables: FID against training images, FID against NFE, and training curves. Their
command line is training/tools/tables.py:

    python -m training.tools.tables kimg RUN_DIR... --kimg=50000,100000,150000,200000 --ref=REF.npz --outdir=DIR
    python -m training.tools.tables nfe SNAPSHOT... --nfe=25,49,79 --solver=edm,dpm --ref=REF.npz --outdir=DIR
    python -m training.tools.tables curves RUN_DIR... --stat=Loss/loss --out=training-curves.png

Each evaluation (one snapshot, sampler, seed range, detector and reference) is stored in
OUTDIR/cache/ the moment it is done, keyed by the snapshot's SHA-256 and those settings, so a
rerun computes only what is missing and a killed run loses at most the evaluation in progress.
Under torchrun every evaluation is shared among the processes (as fid.py gen shares it) and
rank 0 writes the files: results.md (the table in the paper's shape), results.json (every
number with its provenance) and results.png (with matplotlib installed).
"""

import datetime
import hashlib
import json
import math
import numbers
import os
import time

import tqdm

import dnnlib
from fdm.io.network_files import load_network_file
from fdm.methods import METHODS, TITLES
from fdm.samplers import sampler_nfe, sampler_settings
from torch_utils import distributed as dist
from training.evaluation.digits import WEIGHTS as DIGITS_WEIGHTS
from torch_utils.io.download import download_cached, file_sha256
from torch_utils.errors import EvaluationError, FileError, UserError, one_line
from training.evaluation.feature_stats import frechet_distance, load_reference, summarize
from torch_utils.io.files import jsonable, write_json, atomic_write, loads_bounded, open_regular, read_json_bounded
from training.evaluation import fid as evaluation
from training.evaluation import generation
from training.evaluation import plots
from training.checkpoint.names import EVALUATIONS_DIR, SNAPSHOT_NAME, list_files, nimg_of

SOLVER_TITLES = dict(edm='EDM Heun', dpm='DPM-Solver++', euler='Euler (EDM ablation)', heun='Heun (EDM ablation)')

#----------------------------------------------------------------------------
# Snapshots: which files a run holds, and each one checked before any evaluation starts.

CLASS_TO_PRECOND = {precond_class: name for name, (precond_class, _loss) in METHODS.items()}

def list_snapshots(run_dir):
    """[(kimg from the file name, path)] of a run folder (names of training.checkpoint.names,
    000000_032 is 0.032 kimg), oldest first; ours (.pt) rather than a reference pickle (.pkl) of the same kimg."""
    if not os.path.isdir(run_dir):
        raise EvaluationError(f'{run_dir}: no such run folder; give the folders train.py made')
    found = {}
    for nimg, name in list_files(run_dir, SNAPSHOT_NAME):  # of one step: .pkl, then .pt, which replaces it
        found[nimg / 1000] = os.path.join(run_dir, name)
    if not found:
        raise EvaluationError(f'{run_dir}: no network-snapshot-*.pt or .pkl files; train longer or give another folder')
    return sorted(found.items())

def pick_snapshots(run_dir, targets, tolerance=0.05):
    """{target kimg: path} of the snapshot nearest to each target, which must lie within
    `tolerance` (relative) of it; targets None: every snapshot, keyed by its file name's kimg."""
    snapshots = list_snapshots(run_dir)
    if targets is None:
        return {kimg: path for kimg, path in snapshots}
    picked = {}
    for target in targets:
        kimg, path = min(snapshots, key=lambda s: abs(s[0] - target))
        if abs(kimg - target) > tolerance * target:
            raise EvaluationError(f'{run_dir}: no snapshot within {tolerance:.0%} of {target:g} kimg (the nearest is '
                f'{os.path.basename(path)}); drop that --kimg, raise --tolerance, or train longer')
        picked[target] = path
    return picked

def inspect_snapshot(path):
    """The snapshot read end to end (format, checksum, network) before any work is spent on it:
    dict(path, sha256, kimg (images seen / 1000, where recorded), class_name, precond, title)."""
    if not os.path.isfile(path):
        raise EvaluationError(f'{path}: no such snapshot file; give a network-snapshot-*.pt or .pkl')
    try:
        data = load_network_file(path, name=path)
        sha256 = file_sha256(path)
    except OSError as err:
        raise EvaluationError(f'{path}: cannot be read ({err.strerror}); check the file and its permissions') from None
    class_name = type(data['ema']).__name__
    extra = data.get('extra') if isinstance(data.get('extra'), dict) else {}
    m = SNAPSHOT_NAME.match(os.path.basename(path))
    kimg = extra['cur_nimg'] / 1000 if isinstance(extra.get('cur_nimg'), int) else (nimg_of(m) / 1000 if m else None)
    precond = CLASS_TO_PRECOND.get(class_name)
    return dict(path=path, sha256=sha256, kimg=kimg, class_name=class_name, precond=precond,
        title=TITLES.get(precond, class_name))

# Column labels as the paper's tables name the methods; a repeated one gets its folder's or file's name.
#----------------------------------------------------------------------------
# The result cache and the evaluation loop.

def canonical(key):
    """The key as it reads back from JSON (tuples as lists, infinities as strings)."""
    return json.loads(json.dumps(jsonable(key), sort_keys=True))

MAX_JSON_BYTES = 1 << 20  # a cache record (a key, a few numbers, a date) or a run's training_options.json: a few kB

def result_error(result, metrics=()):
    """None, or what is wrong with an evaluation's result: a dict of metric values (FID, accuracy),
    each a finite number >= 0, holding at least `metrics`."""
    if not isinstance(result, dict) or not result:
        return 'no result'
    missing = [name for name in metrics if name not in result]
    if missing:
        return f'no {", ".join(missing)}'
    for name, value in result.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return f'{name} = {value!r:.40}, not a finite number >= 0'
    return None

# What fid_cell and the tables read of a record, besides its result.
def record_error(record, key, metrics=()):
    if record.get('key') != key:
        return 'the record of another evaluation'
    seconds, world_size = record.get('seconds'), record.get('world_size')
    if not isinstance(record.get('date'), str) or type(world_size) is not int or not 1 <= world_size <= 2**20 \
            or type(seconds) not in (int, float) or not 0 <= seconds < math.inf:
        return 'no valid date, seconds or world_size'
    return result_error(record.get('result'), metrics)

RUN_EVALUATIONS = EVALUATIONS_DIR  # a run folder's own cache: train.py --metrics writes it, the kimg table reads it

class ResultCache:
    """One small JSON per finished evaluation, named by the SHA-256 of its key, written to `folder`
    and looked up there and then in `read_also` (the runs' evaluations/ folders). `computed`
    counts the results stored by this process."""
    def __init__(self, folder, read_also=()):
        self.folder, self.read_also, self.computed = folder, tuple(read_also), 0

    def path(self, key, folder=None):
        name = hashlib.sha256(json.dumps(canonical(key), sort_keys=True).encode()).hexdigest() + '.json'
        return os.path.join(self.folder if folder is None else folder, name)

    # The file that holds key's record: the first of the folders that has one, else where it is written.
    def find(self, key):
        held = [path for path in (self.path(key, f) for f in self.read_also) if os.path.lexists(path)]
        return self.path(key) if os.path.lexists(self.path(key)) or not held else held[0]

    def get(self, key, metrics=()):
        """The stored record of `key`, or None: missing, or damaged (said in one line) and so computed
        again. Every value is checked here, before it can enter a table."""
        path = self.find(key)
        if not os.path.lexists(path):
            return None
        try:
            record = read_json_bounded(path, MAX_JSON_BYTES, 'it is computed again')
        except FileError as err:
            print(f'Warning: {one_line(err)}', flush=True)
            return None
        problem = record_error(record, canonical(key), metrics)
        if problem is not None:
            print(f'Warning: {path} is damaged ({problem}); it is computed again', flush=True)
            return None
        return record

    def put(self, key, record):
        os.makedirs(self.folder, exist_ok=True)
        write_json(self.path(key), dict(record, key=canonical(key)))
        self.computed += 1

def run_jobs(jobs, compute, cache, progress=True):
    """The record of each job (dict with 'key' and 'images'): read from the cache, or
    compute(job, advance) -> result dict, stored at once by rank 0. advance(n) moves the bar
    (images, over the whole table) as the evaluation proceeds. Other ranks get None for the
    cached jobs (only rank 0 writes the outputs)."""
    rank = dist.get_rank()
    records = [cache.get(job['key'], job.get('metrics', ())) for job in jobs] if rank == 0 else [None] * len(jobs)
    # Rank 0's list, so that every process runs the same evaluations even if they see the folder differently.
    todo = dist.on_rank0(lambda: [i for i, record in enumerate(records) if record is None])
    if rank == 0 and len(todo) < len(jobs):
        print(f'{len(jobs) - len(todo)} of {len(jobs)} evaluations found in {", ".join((cache.folder, *cache.read_also))}',
            flush=True)
    bar = tqdm.tqdm(total=sum(jobs[i]['images'] for i in todo), unit='img', disable=(rank != 0 or not progress),
        dynamic_ncols=True)
    try:
        for i in todo:
            left = [jobs[i]['images']]
            def advance(n, left=left):
                n = min(n, left[0])
                left[0] -= n
                bar.update(n)
            start = time.time()
            result = compute(jobs[i], advance)
            problem = result_error(result, jobs[i].get('metrics', ()))
            if problem is not None:  # never stored, never tabulated
                raise EvaluationError(f'an evaluation ({json.dumps(canonical(jobs[i]["key"]))[:300]}) gave {problem}; '
                    'check the network it evaluated')
            advance(left[0])
            records[i] = dict(result=result, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                seconds=round(time.time() - start, 3), world_size=dist.get_world_size(), key=canonical(jobs[i]['key']))
            if rank == 0:
                cache.put(jobs[i]['key'], records[i])
    finally:
        bar.close()
    dist.barrier()
    return records

#----------------------------------------------------------------------------
# FID evaluations: the detector and reference checked once, then fid.py gen's computation per job.

def open_scoring(ref, detector=None, trust_detector=False):
    """(detector, reference (mu, sigma), provenance of both), everything checked before any work."""
    reference = load_reference(ref)
    det = evaluation.open_detector(detector, trust=trust_detector)
    ref_stats = evaluation.reference_stats(reference, det, ref)  # the detector's entry (EDM2's pickles hold two)
    ref_file = download_cached(ref, verbose=False)  # local paths and file:// URLs pass through
    spec = detector or 'nvidia'
    det_file = DIGITS_WEIGHTS if spec == 'digits' else spec if os.path.isfile(spec) else None
    info = dict(metric=evaluation.metric_name(det), detector=spec, detector_name=det.name,
        detector_sha256=file_sha256(det_file) if det_file else None, reference=ref, reference_sha256=file_sha256(ref_file))
    return det, ref_stats, info

class _CountingDetector:
    """The detector, moving the table's progress bar by each batch it scores (times the number of
    processes: rank 0 scores its share)."""
    def __init__(self, detector, advance):
        self.detector, self.advance = detector, advance

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def __call__(self, images):
        self.advance(len(images) * dist.get_world_size())
        return self.detector(images)

def seed_ranges(seeds, protocol_num=None):
    """The seed lists of one cell: `seeds`, or the protocol's 0..n-1, n..2n-1, 2n..3n-1."""
    if protocol_num is not None:
        return [list(range(k * protocol_num, (k + 1) * protocol_num)) for k in range(3)]
    seeds = list(seeds)
    if len(seeds) < 2:
        raise EvaluationError(f'--seeds gives {len(seeds)} image; an FID needs at least 2, e.g. --seeds=0-49999')
    return [seeds]

def sampler_of(solver, steps):
    """(sampler name, kwargs, NFE) as generate.py and fid.py gen choose them for --solver/--steps."""
    name, kwargs, _ignored = generation.select_sampler(solver=solver, num_steps=steps)
    return name, kwargs, sampler_nfe(name, **kwargs)

def steps_for_nfe(solver, nfe):
    """The step count at which `solver` makes exactly `nfe` network evaluations per image: EDM
    Heun 2N - 1 (its last step is Euler), DPM-Solver++ and Euler N."""
    heun = sampler_of(solver, 2)[2] == 3  # two Heun steps cost three evaluations
    steps = (nfe + 1) // 2 if heun else nfe
    if sampler_of(solver, steps)[2] != nfe:
        raise EvaluationError(f'--nfe {nfe}: the {SOLVER_TITLES[solver]} sampler makes 2N-1 network evaluations with N '
            f'steps, so only odd NFE are possible; use {nfe - 1} or {nfe + 1}')
    return steps

def fid_jobs(snapshot, solver, steps, ranges, info, batch, precision):
    """One job per seed range: the settings that decide the FID form its key."""
    name, kwargs, nfe = sampler_of(solver, steps)
    jobs = []
    for seeds in ranges:
        key = dict(kind='fid', snapshot_sha256=snapshot['sha256'], solver=solver, sampler=name,
            sampler_kwargs=sampler_settings(name, **kwargs), seeds=dnnlib.util.format_int_list(seeds), batch=batch,
            precision=precision, detector=info['detector'], detector_sha256=info['detector_sha256'],
            reference_sha256=info['reference_sha256'])
        jobs.append(dict(key=key, images=len(seeds), seeds=seeds, snapshot=snapshot, solver=solver, num_steps=steps,
            nfe=nfe, metrics=('fid',)))
    return jobs

def fid_compute(det, ref_stats, batch, precision, net=None):
    """compute(job, advance) for run_jobs: exactly fid.py gen's images, features and distance.
    Consecutive jobs of one snapshot (its seed ranges, solvers, NFE) share one loaded network.
    net: the network of the snapshot every job names, already in memory (the training loop's
    EMA network), None = loaded from the snapshot file."""
    loaded = {}

    def compute(job, advance):
        path = job['snapshot']['path']
        if net is None and loaded.get('path') != path:
            try:
                loaded.update(path=path, net=evaluation.open_generator(path, det.device, precision)[0])
            except UserError as err:
                raise EvaluationError(f"{path}: {one_line(err)}") from None
        sampler_name, sampler_kwargs, _nfe = sampler_of(job['solver'], job['num_steps'])
        mu, sigma = evaluation.generated_stats(loaded['net'] if net is None else net, (sampler_name, sampler_kwargs),
            job['seeds'], _CountingDetector(det, advance), batch=batch, precision=precision, progress=False)
        return dict(fid=float(frechet_distance(mu, sigma, *ref_stats)))
    return compute

#----------------------------------------------------------------------------
# Cells, tables and files.

def markdown_table(row_title, columns, results, fmt='{:.2f}'):
    """A Markdown table: one row per key of any results[column], one column per entry of `columns`;
    a missing value is an empty cell."""
    rows = sorted({row for column in columns for row in results.get(column, {})})
    lines = [f'| {row_title} | ' + ' | '.join(columns) + ' |', '|---:|' + '---:|' * len(columns)]
    for row in rows:
        cells = [fmt.format(results[c][row]) if row in results.get(c, {}) else '' for c in columns]
        lines.append(f'| {row:g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'

def fid_cell(jobs, records, info):
    """One cell: its FID (the minimum over the protocol's three seed ranges) and where it came from."""
    fids = [float(r['result']['fid']) for r in records]
    job = jobs[0]
    cell = dict(fid=min(fids), snapshot=job['snapshot']['path'], snapshot_sha256=job['snapshot']['sha256'],
        snapshot_kimg=job['snapshot']['kimg'], network=job['snapshot']['class_name'], solver=job['solver'],
        sampler_kwargs=job['key']['sampler_kwargs'], num_steps=job['num_steps'], nfe=job['nfe'],
        seeds=[j['key']['seeds'] for j in jobs], num_images=[j['images'] for j in jobs], batch=job['key']['batch'],
        precision=job['key']['precision'], **info, dates=[r['date'] for r in records],
        seconds=[r['seconds'] for r in records], world_sizes=[r['world_size'] for r in records])
    if len(fids) == 3:
        lo, mean, std = summarize(fids)
        cell.update(fids=fids, min=lo, mean=mean, std=std)
    return cell

def write_outputs(outdir, text, data, panels, xlabel, plot_size, dashed=()):
    """results.md, results.json and (with matplotlib) results.png; returns the PNG's path, or None
    after a one-line message saying what to install."""
    atomic_write(os.path.join(outdir, 'results.md'), lambda f: f.write(text.encode('utf-8')))
    write_json(os.path.join(outdir, 'results.json'), data)
    png = os.path.join(outdir, 'results.png')
    try:
        plots.line_plots(panels, png, xlabel, size=plot_size, dashed=dashed)
    except plots.PlotError as err:
        print(f'results.png not drawn: {err}')
        return None
    return png

def _evaluate_cells(cells, det, ref_stats, info, outdir, batch, precision, progress, read_also=()):
    """{cell id: cell dict} of [(cell id, jobs)] through the cache in outdir (on rank 0; None elsewhere),
    which also finds the records of the folders `read_also`. The folder is made only now, after every
    input has been checked."""
    if dist.get_rank() == 0:
        try:
            os.makedirs(os.path.join(outdir, 'cache'), exist_ok=True)
        except OSError as err:
            raise EvaluationError(f'cannot create --outdir {outdir} ({err.strerror}); choose a writable folder') from None
    dist.barrier()
    cache = ResultCache(os.path.join(outdir, 'cache'), read_also)
    flat = [job for _cell_id, jobs in cells for job in jobs]
    records = run_jobs(flat, fid_compute(det, ref_stats, batch, precision), cache, progress)
    out, i = {}, 0
    for cell_id, jobs in cells:
        out[cell_id] = fid_cell(jobs, records[i:i + len(jobs)], info) if dist.get_rank() == 0 else None
        i += len(jobs)
    return out

# The line above a table: what is measured, on how many images, against what.
def _header(what, ranges, info, protocol):
    images = f'{len(ranges[0])} images per FID'
    seeds = ', '.join(dnnlib.util.format_int_list(s) for s in ranges)
    rule = 'minimum over three seed ranges' if protocol else 'one seed range'
    return (f'{what} (lower is better): {images} (seeds {seeds}; {rule}), detector {info["detector"]}, '
        f'reference {info["reference"]}.\n\n')

#----------------------------------------------------------------------------
# The three tables.

def fid_vs_training(runs, outdir, ref, kimg=None, seeds=range(50000), protocol_num=None, solver='edm', steps=18,
        batch=64, precision='fp32', detector=None, tolerance=0.05, plot_size=(800, 500), progress=True,
        trust_detector=False):
    """FID of the snapshots nearest to each training duration (kimg; None: every snapshot), one
    column per run. Returns the results.json data."""
    picked = [pick_snapshots(run, kimg, tolerance) for run in runs]
    snaps = [{row: inspect_snapshot(path) for row, path in p.items()} for p in picked]
    if kimg is None:  # every snapshot: rows are the images each one has seen
        snaps = [{s['kimg']: s for s in per_run.values()} for per_run in snaps]
    titles = [next(iter(s.values()))['title'] for s in snaps]
    labels = plots.legend_labels(titles, runs)
    ranges = seed_ranges(seeds, protocol_num)
    _name, _kwargs, nfe = sampler_of(solver, steps)
    det, ref_stats, info = open_scoring(ref, detector, trust_detector)
    cells = [((label, row), fid_jobs(snap, solver, steps, ranges, info, batch, precision))
        for label, per_run in zip(labels, snaps) for row, snap in per_run.items()]
    # What train.py --metrics computed while training is in each run's own folder.
    done = _evaluate_cells(cells, det, ref_stats, info, outdir, batch, precision, progress,
        read_also=[os.path.join(run, RUN_EVALUATIONS) for run in runs])
    if dist.get_rank() != 0:
        return None
    rows = sorted({row for _label, row in done})
    mimg = all(row >= 1000 for row in rows)
    scale, unit = (1000, 'Mimg') if mimg else (1, 'kimg')
    results = {label: {row / scale: cell['fid'] for (lab, row), cell in done.items() if lab == label} for label in labels}
    text = (_header(f'{info["metric"]} against training images, {SOLVER_TITLES[solver]} sampler, {steps} steps = {nfe} NFE', ranges,
        info, protocol_num) + markdown_table(f'Training images ({unit})', labels, results))
    data = dict(table='fid-vs-training-images', unit=unit, columns=[dict(label=l, run=r, title=t)
        for l, r, t in zip(labels, runs, titles)], rows=[row / scale for row in rows],
        cells=[dict(column=label, row=row / scale, target_kimg=row, **cell) for (label, row), cell in done.items()])
    dashed = [l for l, t in zip(labels, titles) if t.endswith('-FDM')]
    png = write_outputs(outdir, text, data, [(info['metric'], {l: results[l].items() for l in labels})],
        f'training images ({unit})', plot_size, dashed)
    print(text, end='')
    return dict(data, png=png)

def fid_vs_nfe(networks, outdir, ref, nfe=(25, 49, 79), solvers=('edm', 'dpm'), seeds=range(50000), protocol_num=None,
        batch=64, precision='fp32', detector=None, plot_size=(800, 500), progress=True, trust_detector=False):
    """FID of each network at each NFE, one table per solver (rows NFE, columns networks)."""
    steps = {(solver, n): steps_for_nfe(solver, n) for solver in solvers for n in nfe}
    snaps = [inspect_snapshot(path) for path in networks]
    labels = plots.legend_labels([s['title'] for s in snaps], networks)
    ranges = seed_ranges(seeds, protocol_num)
    det, ref_stats, info = open_scoring(ref, detector, trust_detector)
    cells = [((solver, label, n), fid_jobs(snap, solver, steps[solver, n], ranges, info, batch, precision))
        for solver in solvers for label, snap in zip(labels, snaps) for n in nfe]
    done = _evaluate_cells(cells, det, ref_stats, info, outdir, batch, precision, progress)
    if dist.get_rank() != 0:
        return None
    text = _header(f'{info["metric"]} against the number of network evaluations (NFE)', ranges, info, protocol_num)
    panels = []
    for solver in solvers:
        results = {label: {n: done[solver, label, n]['fid'] for n in nfe} for label in labels}
        counts = ', '.join(f'{n} NFE = {steps[solver, n]} steps' for n in nfe)
        text += f'{SOLVER_TITLES[solver]} sampler ({counts}):\n\n' + markdown_table('NFE', labels, results) + '\n'
        panels.append((f'{info["metric"]}, {SOLVER_TITLES[solver]}', {label: results[label].items() for label in labels}))
    data = dict(table='fid-vs-nfe', solvers=list(solvers), nfe=list(nfe), columns=[dict(label=l, network=p, title=s['title'])
        for l, p, s in zip(labels, networks, snaps)],
        cells=[dict(column=label, row=n, **cell) for (_solver, label, n), cell in done.items()])
    dashed = [l for l, s in zip(labels, snaps) if s['title'].endswith('-FDM')]
    png = write_outputs(outdir, text, data, panels, 'network evaluations per image (NFE)', plot_size, dashed)
    print(text, end='')
    return dict(data, png=png)

def read_stats(path):
    """{kimg: entry} of a stats.jsonl: a line that a resume repeated counts once (the later one wins);
    a last line cut short by a kill is skipped. A damaged line is one EvaluationError naming it."""
    remedy = 'give run folders that train.py wrote'
    try:
        with open_regular(path, remedy, error=EvaluationError) as f:
            data = f.read()
    except OSError as err:
        raise EvaluationError(f'{path}: cannot be read ({err.strerror}); {remedy}') from None
    lines = data.split(b'\n')
    if lines and lines[-1].strip():
        lines = lines[:-1]  # a kill can leave half a line at the end
    entries = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry = loads_bounded(line, f'{path}: line {number}', 'the file is damaged', error=EvaluationError)
        kimg = _stat_value(entry, 'Progress/kimg')
        if kimg is None or not math.isfinite(kimg):
            raise EvaluationError(f'{path}: line {number} is not a stats.jsonl entry of train.py; the file is damaged')
        entries[kimg] = entry
    return entries

# A statistic's value in one entry: the tick's mean (training_stats), or a plain number.
def _stat_value(entry, stat):
    value = entry.get(stat)
    value = value.get('mean') if isinstance(value, dict) else value
    return float(value) if isinstance(value, (int, float)) else None

# The method's title from training_options.json (a few kB); a run without one (or without the
# network's class) is named by its folder.
def _run_title(run_dir):
    path = os.path.join(run_dir, 'training_options.json')
    options = {}
    if os.path.lexists(path):
        try:
            options = read_json_bounded(path, MAX_JSON_BYTES, 'restore it, or remove it to name the run by its folder')
        except FileError as err:
            raise EvaluationError(one_line(err)) from None
    network = options.get('network_kwargs')
    class_name = network.get('class_name') if isinstance(network, dict) else None
    if not isinstance(class_name, str):
        return os.path.basename(os.path.normpath(run_dir))
    return TITLES.get(CLASS_TO_PRECOND.get(class_name), class_name)

def training_curves(runs, out, stats=('Loss/loss',), plot_size=(800, 500)):
    """training-curves.png: each statistic of stats.jsonl against training images, runs overlaid."""
    per_run = []
    for run in runs:
        if not os.path.lexists(os.path.join(run, 'stats.jsonl')):  # anything but a file: read_stats says what
            raise EvaluationError(f'{run}: no stats.jsonl; give run folders that train.py wrote')
        per_run.append(read_stats(os.path.join(run, 'stats.jsonl')))
    known = sorted({k for entries in per_run for e in entries.values() for k in e if _stat_value(e, k) is not None})
    for stat in stats:
        if stat not in known:
            raise EvaluationError(f'--stat {stat}: not in stats.jsonl; choose from {", ".join(known)}')
    labels = plots.legend_labels([_run_title(r) for r in runs], runs)
    panels = [(stat, {label: [(k, _stat_value(e, stat)) for k, e in entries.items() if _stat_value(e, stat) is not None]
        for label, entries in zip(labels, per_run)}) for stat in stats]
    plots.line_plots(panels, out, 'training images (kimg)', size=plot_size,
        dashed=[l for l in labels if l.split(' (')[0].endswith('-FDM')])
    return labels

#----------------------------------------------------------------------------
