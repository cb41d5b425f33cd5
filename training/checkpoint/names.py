"""The names of a run's files that are written at a training step: network snapshots, sample
grids, training states and post-hoc EMA profiles. The one home of the naming rule, its parser
(which every reader uses), and the check that a write never replaces another step's file.

The step is the number of images seen, cur_nimg. At a whole kimg the name is the reference's,
`network-snapshot-000200.pt`; otherwise the images beyond the whole kimg follow after an
underscore, `network-snapshot-000000_032.pt` (32 images) or `network-snapshot-000001_024.pt`
(1024 images). So every step has a name of its own, and up to 999,999 kimg the names sort in
training order: at the same whole kimg the reference's name has '.' or '-' where the longer one
has '_', which sorts after both. (A '.' would sort 000000.032.pt before 000000.pt.) Readers
still order by the parsed number, never by the string.
"""

import os
import re
import stat

import torch

from torch_utils.errors import FileError
from torch_utils.io.files import loads_bounded

# Whole kimg, then optionally the images beyond it (never _000: that step has the reference's name).
STEP = r'(?P<kimg>\d+)(?:_(?P<images>(?!000)\d{3}))?'
SNAPSHOT_NAME = re.compile(rf'^network-snapshot-{STEP}\.(?P<ext>pt|pkl)$')  # .pkl: the reference's snapshots
STATE_NAME = re.compile(rf'^training-state-{STEP}\.pt$')
GRID_NAME = re.compile(rf'^samples-{STEP}\.png$')
PHEMA_NAME = re.compile(rf'^phema-{STEP}-(?P<std>\d+\.\d+)\.pt$')
EVALUATIONS_DIR = 'evaluations'  # train.py --metrics: the run's own result cache, which the kimg table reads

#----------------------------------------------------------------------------
# Step -> name, name -> step.

def step_name(cur_nimg):
    """'000200' at 200,000 images (the reference's {kimg:06d}), '000000_032' at 32, '000001_024' at 1024."""
    kimg, images = divmod(int(cur_nimg), 1000)
    return f'{kimg:06d}' + (f'_{images:03d}' if images else '')

def snapshot_name(cur_nimg, ext='pt'):
    return f'network-snapshot-{step_name(cur_nimg)}.{ext}'

def state_name(cur_nimg):
    return f'training-state-{step_name(cur_nimg)}.pt'

def grid_name(cur_nimg):
    return f'samples-{step_name(cur_nimg)}.png'

def phema_name(cur_nimg, std):
    return f'phema-{step_name(cur_nimg)}-{std:.3f}.pt'

def nimg_of(match):
    """Images seen at the step of a file name matched by one of the patterns above."""
    return int(match['kimg']) * 1000 + int(match['images'] or 0)

def list_files(folder, pattern):
    """[(images seen, name)] of the files in `folder` whose names match `pattern`, in training order
    (the same step: by name, so a reference .pkl comes before our .pt)."""
    return sorted((nimg_of(m), name) for name in os.listdir(folder) if (m := pattern.match(name)))

#----------------------------------------------------------------------------
# A write never replaces another step's file. Names are unique per step now, but a run folder
# written under the older whole-kimg names (or touched by hand) can hold, under the name of this
# step, a file of another one.

def recorded_nimg(path):
    """The images seen that one of our .pt files records (a training state's cur_nimg, a snapshot's
    extra.cur_nimg, a post-hoc EMA profile's extra.phema.cur_nimg), or None if it records none or
    cannot be read. The tensors are mapped, not read, so this costs little even for a large state
    (mapping needs the path, not an opened file: a FIFO or folder of that name is refused first)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        data = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        if type(data.get('cur_nimg')) is int:
            return data['cur_nimg']
        extra = loads_bounded(data['description'], path, 'not ours').get('extra') or {}
        value = extra.get('cur_nimg', (extra.get('phema') or {}).get('cur_nimg'))
    except Exception:  # not one of our files, or damaged: it records nothing we can trust
        return None
    return value if type(value) is int else None

def _recorded(path):
    return recorded_nimg(path) if os.path.isfile(path) else None

def check_step(path, cur_nimg, recorded=...):
    """Raise a one-line FileError if `path` exists and holds a step other than cur_nimg, or does not
    say which it holds; the same step's file may be replaced (a resumed run writes it again).
    recorded: the step that stands for this file's, when another file records it (a sample grid
    records nothing; its snapshot does); by default what `path` itself records."""
    if not os.path.lexists(path):
        return
    if recorded is ...:
        recorded = _recorded(path)
    if recorded == cur_nimg:
        return
    folder = os.path.dirname(path) or '.'
    if recorded is None:
        raise FileError(f'{path} exists but does not say which training step it holds, so the step at {cur_nimg:,} '
            f'images will not replace it; move it out of {folder}, then resume the run')
    raise FileError(f'{path} holds the training step at {recorded:,} images, not this one at {cur_nimg:,} (it was '
        f'named by the older whole-kimg rule); move it out of {folder}, then resume the run')

def snapshot_files(run_dir, cur_nimg, grid=False, stds=()):
    """The files a snapshot at cur_nimg writes, every one checked by check_step before any is written:
    dict(snapshot=path, grid=path or None, phema=[path per std])."""
    snapshot = os.path.join(run_dir, snapshot_name(cur_nimg))
    files = dict(snapshot=snapshot, grid=os.path.join(run_dir, grid_name(cur_nimg)) if grid else None,
        phema=[os.path.join(run_dir, phema_name(cur_nimg, std)) for std in stds])
    recorded = _recorded(snapshot)  # read once: the snapshot's record stands for its grid too
    check_step(snapshot, cur_nimg, recorded)
    if grid:
        check_step(files['grid'], cur_nimg, recorded)
    for path in files['phema']:
        check_step(path, cur_nimg)
    return files

#----------------------------------------------------------------------------
