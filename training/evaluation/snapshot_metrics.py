"""FID, FD-digits or FD-DINOv2 of the EMA network at every snapshot, while training (train.py
--metrics): FDM's claim is a curve of FID against training images, and this draws it as the run goes.

Each evaluation is exactly `fid.py gen` on the snapshot just written: seeds 0..N-1, each seed's
class drawn from its own generator, fid.py gen's default sampler (EDM Heun, 18 steps), batch 64,
fp32, every process sampling its share of the seeds. It goes through the result cache of
training/evaluation/tables.py, in the run's own evaluations/ folder and under the very key that
`python -m training.tools.tables kimg RUN --seeds=0-(N-1)` gives the same evaluation, so the
table reuses it and the two never disagree, and a resumed run that writes a snapshot again (the
same bytes: training resumes exactly) finds its result there instead of computing it again.

The references and detectors are read and checked once, before training starts
(training.config), so a bad --metric-ref costs no run folder. Fewer images give a biased FID,
higher than the 50,000-image FIDs of the paper; compare runs at the same --metric-images.
"""

import os

from torch_utils import distributed as dist
from torch_utils import precision as precision_lib
from torch_utils.errors import OptionError, UserError, one_line
from torch_utils.io.download import file_sha256
from training.evaluation import tables
from training.evaluation.generation import SAMPLER_DEFAULTS
from training.evaluation.inception import Detector

# Each metric's detector (a fid.py --detector value; None: NVIDIA's Inception-v3, FID itself).
METRIC_DETECTORS = {'fid': None, 'fd-digits': 'digits', 'fd-dinov2': 'dinov2'}

# What decides the images and their score: fid.py gen's defaults, so that its command (and the
# tables' defaults) reproduce and reuse every number.
SOLVER, STEPS, BATCH, PRECISION = 'edm', SAMPLER_DEFAULTS['num_steps'], 64, 'fp32'

#----------------------------------------------------------------------------

class SnapshotMetrics:
    """The opened scorers of --metrics: {metric: (detector, reference (mu, sigma), provenance)} as
    tables.open_scoring gives them, scored on seeds 0..num_images-1. training_precision: the TF32
    switches the training runs with, set again after each evaluation (which samples in fp32)."""
    def __init__(self, scorers, num_images, training_precision='fp32'):
        self.scorers, self.seeds, self.training_precision = scorers, list(range(num_images)), training_precision

    def describe(self):
        """One line for the log: what is scored, on which images, against what."""
        scored = ', '.join(f"{info['metric']} (reference {info['reference']})" for _det, _ref, info in self.scorers.values())
        return (f'{scored} of each snapshot: {len(self.seeds)} images (seeds 0-{len(self.seeds) - 1}), '
            f'{tables.SOLVER_TITLES[SOLVER]} {STEPS} steps, as fid.py gen')

    def evaluate(self, run_dir, snapshot_path, net, cur_nimg):
        """{'Metrics/<metric>': value} of the snapshot just written, on every rank; each value read
        from run_dir/evaluations if it was computed before, else computed (by every rank) and stored there."""
        device = next(net.parameters()).device
        snapshot = dict(path=snapshot_path, sha256=dist.on_rank0(lambda: file_sha256(snapshot_path)), kimg=cur_nimg / 1000)
        cache = tables.ResultCache(os.path.join(run_dir, tables.RUN_EVALUATIONS))
        precision_lib.configure(PRECISION, device)
        try:
            records = {}
            for name, (det, ref_stats, info) in self.scorers.items():
                if det.device != device:  # opened on this rank's default device, the loop may train elsewhere
                    det = Detector(det.net, det.name, device, det.call_kwargs, det.feature_dim, det.metric)
                    self.scorers[name] = (det, ref_stats, info)
                jobs = tables.fid_jobs(snapshot, SOLVER, STEPS, [self.seeds], info, BATCH, PRECISION)
                compute = tables.fid_compute(det, ref_stats, BATCH, PRECISION, net=net)
                records[name] = tables.run_jobs(jobs, compute, cache, progress=False)[0]
        finally:
            precision_lib.configure(self.training_precision, device)
        # Rank 0 holds every record (the others only those they computed): its values go to all.
        return dist.on_rank0(lambda: {f'Metrics/{name}': float(r['result']['fid']) for name, r in records.items()})

#----------------------------------------------------------------------------
# train.py's --metrics, --metric-ref and --metric-images, checked and opened before training starts.

def _items(value):
    return [v.strip() for v in (value.split(',') if isinstance(value, str) else value) if str(v).strip()]

def open_metrics(metrics, refs, num_images, training_precision='fp32'):
    """SnapshotMetrics for `metrics` ('fid', 'fd-digits', 'fd-dinov2', or a comma list of them) against
    `refs` (one statistics file per metric, in the same order); every reference and detector read and
    checked here. None when metrics is None or 'none'."""
    if metrics is None or metrics == 'none':
        return None
    names = _items(metrics)
    unknown = [n for n in names if n not in METRIC_DETECTORS]
    if not names or unknown or len(set(names)) != len(names):
        raise OptionError(f'--metrics={metrics!r}: give different metrics among {", ".join(METRIC_DETECTORS)}, '
            'comma-separated (or none)')
    paths = _items(refs) if refs is not None else []
    if len(paths) != len(names):
        raise OptionError(f'--metrics={",".join(names)} needs {len(names)} --metric-ref file(s), one per metric in the '
            f'same order, got {len(paths)}; make each with: python fid.py ref --data=DATASET --dest=REF.npz '
            '[--detector=digits|dinov2]')
    scorers = {}
    for name, ref in zip(names, paths):
        try:
            scorers[name] = tables.open_scoring(ref, METRIC_DETECTORS[name])
        except UserError as err:
            raise OptionError(f'--metrics={name} --metric-ref={ref}: {one_line(err)}') from None
    return SnapshotMetrics(scorers, num_images, training_precision)

#----------------------------------------------------------------------------
