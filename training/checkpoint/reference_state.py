"""--resume from a state dump of the reference codebases (NVlabs/edm, sail-sg/FDM).

The reference writes `training-state-<kimg>.pt`, a torch.save of {net: the live network, pickled
as persistence records; optimizer_state: Adam's state_dict}, and on resume takes the EMA from the
`network-snapshot-<kimg>.pkl` beside it and counts kimg * 1000 images seen. Both files are read
with the allow-list unpickler (nothing in them runs) and become a state of our shape
(training.checkpoint.training_state), which the loop restores as its own.

What the reference does not store starts afresh: the data order (the reference restarts its
sampler permutation; we continue ours from the images seen, in our order), the tick counter, the
non-finite gradient count, and the seed (--seed, or a fresh one). Weights, EMA, Adam and the
schedules of images seen and of steps continue exactly; the run is a faithful continuation,
not the one an uninterrupted reference run would have made.
"""

import os
import warnings
import zipfile

from fdm.io.network_files import CheckpointError, rebuild_network, record_description, record_tensors, load_reference_pickle
from torch_utils.io.files import open_regular
from torch_utils.io.safe_pickle import PersistentRecord, UnsafePickleError, restricted_load_torch_zip
from training.checkpoint.names import STATE_NAME, nimg_of, snapshot_name
from training.checkpoint.training_state import MAX_NIMG, STATE_FORMAT, state_error

REMEDY = 'resume from another state'

#----------------------------------------------------------------------------

# Which reader words the verdict on a file named training-state-*.pt: every state of ours is a
# torch.save whose pickle holds our format name, a reference state's never does. (Only a choice
# of reader: the reference reader refuses what it cannot read safely.)
def is_reference_state(path):
    if not STATE_NAME.match(os.path.basename(path)):
        return False
    try:
        with open_regular(path, REMEDY) as f, zipfile.ZipFile(f) as zf:
            pickles = [i for i in zf.infolist() if i.filename.count('/') == 1 and i.filename.endswith('/data.pkl')]
            size = os.fstat(f.fileno()).st_size
            return (len(pickles) == 1 and pickles[0].compress_type == zipfile.ZIP_STORED
                and pickles[0].file_size <= size and STATE_FORMAT.encode() not in zf.read(pickles[0]))
    except Exception:  # not a regular file or not a readable zip: our reader says why
        return False

def read_reference_state(path, batch_size, seed=None, draw_seed=None):
    """A reference training state and its snapshot -> our state: cur_nimg = kimg * 1000 as the
    reference counts it, step = cur_nimg // batch_size, the tick and non-finite counters at 0."""
    name = os.path.basename(path)
    m = STATE_NAME.match(name)
    cur_nimg = nimg_of(m)
    if cur_nimg >= MAX_NIMG:
        raise CheckpointError(f'{name}: {m["kimg"]} kimg is beyond any real run; {REMEDY}')
    snapshot = os.path.join(os.path.dirname(path), snapshot_name(cur_nimg, 'pkl'))
    if not os.path.lexists(snapshot):
        raise CheckpointError(f'{name} is a reference EDM/FDM training state, but {snapshot} (its EMA, written with '
            'it) is missing; put that file beside it, or resume from another state')
    net, optimizer = _read_pt(path, name)
    with open_regular(snapshot, REMEDY, error=CheckpointError) as f:
        ema = load_reference_pickle(f, os.path.basename(snapshot))['ema']
    seed = seed if seed is not None else draw_seed()
    state = dict(cur_nimg=cur_nimg, step=cur_nimg // batch_size, cur_tick=0, tick_start_nimg=cur_nimg, nonfinite_total=0,
        seed=seed, net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer)
    error = state_error(state)
    count = len(list(net.parameters()))
    if error is None and sorted(i for g in optimizer['param_groups'] for i in g['params']) != list(range(count)):
        error = f'the optimizer state does not cover the {count} parameters of the network once each'
    if error is not None:
        raise CheckpointError(f'{name}: {error}; {REMEDY}')
    warnings.warn(f'{name} is a reference EDM/FDM training state: its network, EMA and Adam state continue at '
        f'{cur_nimg} images (step {state["step"]}) with seed {seed}, but the data order, the tick counter and the '
        'non-finite gradient count restart, so the run differs from the one the reference would have continued',
        UserWarning)
    return state

# The network of the .pt, rebuilt from our classes (its tensors checked by name and shape), and
# Adam's state, whose parameter indices count parameters() of the file's network: ours must
# list the same parameters in the same order.
def _read_pt(path, name):
    try:
        data = restricted_load_torch_zip(path)
    except UnsafePickleError as err:
        raise CheckpointError(f'{name}: {err}; only EDM/FDM training states are accepted') from None
    except Exception as err:
        raise CheckpointError(f'{name}: cannot be read as an EDM/FDM training state ({type(err).__name__}: '
            f'{" ".join(str(err).split())[:200]}); the file is damaged or truncated, {REMEDY}') from None
    if not (isinstance(data, dict) and isinstance(data.get('net'), PersistentRecord)
            and isinstance(data.get('optimizer_state'), dict)):
        raise CheckpointError(f'{name}: neither an FDM training state nor an EDM/FDM one (a torch.save of net and '
            'optimizer_state); --resume takes a training-state-*.pt file of this code or of the reference')
    try:
        description, tensors = record_description(data['net']), record_tensors(data['net'])
    except CheckpointError as err:
        raise CheckpointError(f'{name}: {err}') from None
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise CheckpointError(f'{name}: not an EDM/FDM training state (unexpected structure: '
            f'{type(err).__name__}: {err})') from None
    net = rebuild_network(description['class_name'], description['init_kwargs'], tensors, name)
    ours = [key for key, _ in net.named_parameters()]
    known = set(ours)
    theirs = [key for key in tensors if key in known]
    if theirs != ours:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise CheckpointError(f'{name}: the parameter order of {description["class_name"]} differs from ours '
            f'({theirs[first]} where we have {ours[first]}), so its Adam state cannot be mapped; {REMEDY}')
    return net, data['optimizer_state']

#----------------------------------------------------------------------------
