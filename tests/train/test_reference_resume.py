"""train.py --resume from a reference (EDM/FDM) training state: a torch.save of the live network
as persistence records and Adam's state, with the EMA in the network-snapshot pickle beside it.
Read without running anything; the continuation equals resuming from our own state."""

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

from conftest import one_line_error, run_train_cli
from fdm.io.network_files import CheckpointError
from helpers import write_reference_pickle, write_reference_training_state
from torch_utils.io.safe_pickle import UnsafePickleError, restricted_load_torch_zip
from helpers import assert_same_state, loop_config
from helpers import run_loop
from training.checkpoint.training_state import find_resume_state, load_training_state

# 10 steps of 100 images: the state is at exactly 1000 images, so the reference name's kimg * 1000
# is our cur_nimg and the step count follows (1000 // 100).
BATCH = 100

def config(data, total_kimg, **overrides):
    return loop_config(data, total_kimg=total_kimg, batch_size=BATCH, batch_gpu=50, kimg_per_tick=1, snapshot_ticks=1,
        state_dump_ticks=1, **overrides)

# Adam's param_groups as torch 1.12 (the reference's) wrote them, without the keys newer torch added.
NEWER_ADAM_KEYS = ('differentiable', 'fused', 'decoupled_weight_decay')

def as_older_torch(optimizer_state):
    groups = [{k: v for k, v in g.items() if k not in NEWER_ADAM_KEYS} for g in optimizer_state['param_groups']]
    return dict(optimizer_state, param_groups=groups)

# A run of 10 steps; its net, EMA and Adam state written as the reference writes them.
@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from conftest import write_image_zip
    root = tmp_path_factory.mktemp('ref')
    data = write_image_zip(root / 'tiny.zip')
    os.makedirs(root / 'ours')
    first = run_loop(run_dir=str(root / 'ours'), **config(data, 1.0))
    ours = root / 'ours' / 'training-state-000001.pt'
    os.makedirs(root / 'ref')
    write_reference_pair(root / 'ref', first['net'], first['ema'], as_older_torch(load_training_state(str(ours))['optimizer']))
    return dict(root=root, data=data, ours=ours, ref=root / 'ref' / 'training-state-000001.pt', first=first)

def write_reference_pair(folder, net, ema, optimizer_state, kimg='000001', **kwargs):
    write_reference_training_state(folder / f'training-state-{kimg}.pt', net, optimizer_state, **kwargs)
    write_reference_pickle(folder / f'network-snapshot-{kimg}.pkl', ema)

def test_reference_state_reads_as_our_state(runs):
    with pytest.warns(UserWarning, match='data order, the tick counter and the non-finite gradient count restart'):
        path, state = find_resume_state(str(runs['ref']), batch_size=BATCH, seed=7)
    ours = load_training_state(str(runs['ours']))
    assert path == str(runs['ref'])
    assert (state['cur_nimg'], state['step'], state['cur_tick'], state['tick_start_nimg'], state['seed']) == (1000, 10, 0, 1000, 7)
    assert_same_state(ours['net'], state['net'])
    assert_same_state(ours['ema'], state['ema'])
    assert_same_state(ours['optimizer']['state'][3], state['optimizer']['state'][3])
    assert as_older_torch(ours['optimizer'])['param_groups'] == state['optimizer']['param_groups']

def test_reference_state_resumes_as_our_own(runs, tmp_path):
    # 2 more steps from our state and from the reference pair, with the same seed: bit-identical
    # (the older Adam groups get torch's defaults, which are ours).
    results = {}
    for kind in ('ours', 'ref'):
        os.makedirs(tmp_path / kind)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore' if kind == 'ref' else 'error')
            results[kind] = run_loop(run_dir=str(tmp_path / kind), **config(runs['data'], 1.2, resume_state=str(runs[kind])))
        results[kind]['state'] = load_training_state(str(tmp_path / kind / 'training-state-000001_200.pt'))
    ours, ref = results['ours'], results['ref']
    assert ours['cur_nimg'] == ref['cur_nimg'] == 1200 and ours['step'] == ref['step'] == 12
    assert_same_state(ours['net'].state_dict(), ref['net'].state_dict())
    assert_same_state(ours['ema'].state_dict(), ref['ema'].state_dict())
    a, b = ours['state']['optimizer'], ref['state']['optimizer']
    assert a['param_groups'] == b['param_groups'] and a['state'].keys() == b['state'].keys()
    for index in a['state']:
        assert_same_state(a['state'][index], b['state'][index])
    # The network did move in those 2 steps, so the equality means something.
    assert not torch.equal(ours['net'].model.enc['8x8_conv'].weight, runs['first']['net'].model.enc['8x8_conv'].weight)

def test_train_py_resumes_a_reference_run_directory_and_says_what_differs(runs, tmp_path):
    result = run_train_cli('--outdir', tmp_path / 'out', '--data', runs['data'], '--resume', runs['ref'].parent, '-n')
    assert result.exit_code == 0, result.output
    assert 'reference EDM/FDM training state' in result.output and 'data order' in result.output
    assert '"resume_state":' in result.output and not (tmp_path / 'out').exists()

def test_a_forbidden_global_is_refused_and_runs_nothing(runs, tmp_path):
    marker = tmp_path / 'marker'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    torch.save(dict(net=Evil(), optimizer_state={}), tmp_path / 'training-state-000001.pt')
    write_reference_pickle(tmp_path / 'network-snapshot-000001.pkl', runs['first']['ema'])
    line = one_line_error(run_train_cli('--outdir', tmp_path / 'out', '--data', runs['data'],
        '--resume', tmp_path / 'training-state-000001.pt'))
    assert 'os.system' in line or 'posix.system' in line
    assert not marker.exists() and not (tmp_path / 'out').exists()

def test_a_missing_snapshot_is_one_line_naming_it(runs, tmp_path):
    write_reference_training_state(tmp_path / 'training-state-000001.pt', runs['first']['net'], {})
    line = one_line_error(run_train_cli('--outdir', tmp_path / 'out', '--data', runs['data'],
        '--resume', tmp_path / 'training-state-000001.pt'))
    assert 'network-snapshot-000001.pkl' in line and not (tmp_path / 'out').exists()

def test_a_damaged_reference_state_is_one_line(runs, tmp_path):
    raw = runs['ref'].read_bytes()
    write_reference_pickle(tmp_path / 'network-snapshot-000001.pkl', runs['first']['ema'])
    for damaged in (raw[: len(raw) // 2], raw[:3000] + bytes(1000) + raw[4000:]):
        (tmp_path / 'training-state-000001.pt').write_bytes(damaged)
        line = one_line_error(run_train_cli('--outdir', tmp_path / 'out', '--data', runs['data'],
            '--resume', tmp_path / 'training-state-000001.pt'))
        assert 'training-state-000001.pt' in line and not (tmp_path / 'out').exists()

def test_a_parameter_order_other_than_ours_is_one_error(runs, tmp_path):
    # The reference's Adam state indexes parameters in parameters() order: another order is refused.
    def reverse(state):
        if len(state.get('_parameters') or ()) > 1:
            state['_parameters'] = OrderedDict(reversed(state['_parameters'].items()))
        return state
    write_reference_pair(tmp_path, runs['first']['net'], runs['first']['ema'], {}, edit_state=reverse)
    with pytest.raises(CheckpointError, match='parameter order of FDM_EDMPrecond differs from ours') as err:
        find_resume_state(str(tmp_path / 'training-state-000001.pt'), batch_size=BATCH, seed=7)
    assert '\n' not in str(err.value)

def test_a_wrong_adam_state_is_one_error(runs, tmp_path):
    write_reference_pair(tmp_path, runs['first']['net'], runs['first']['ema'], dict(state={}, param_groups=[dict(params=[0, 0])]))
    with pytest.raises(CheckpointError, match='optimizer'):
        find_resume_state(str(tmp_path / 'training-state-000001.pt'), batch_size=BATCH, seed=7)

#----------------------------------------------------------------------------
# The zip reader of safe_pickle: bounded, inside one folder, storages of exactly their size.

def rewrite_zip(src, dst, rename=lambda name: name, change=lambda name, data: data):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(rename(info.filename), change(info.filename, zin.read(info.filename)))
    return dst

def test_torch_zip_reader_matches_torch_load(tmp_path):
    data = dict(a=torch.nn.Parameter(torch.arange(6.).reshape(2, 3)), b=torch.arange(3), c=torch.ones(2, 2).t(),
        d=[torch.tensor(3.5, dtype=torch.float64), (1, None, 'x')])
    torch.save(data, tmp_path / 'x.pt')
    got = restricted_load_torch_zip(tmp_path / 'x.pt')
    assert isinstance(got['a'], torch.nn.Parameter) and got['d'][1] == (1, None, 'x')
    for key in ('a', 'b', 'c'):
        assert torch.equal(got[key], data[key]) and got[key].dtype == data[key].dtype

@pytest.mark.parametrize('case', ['escape', 'two_folders', 'short_storage', 'long_storage', 'deflated', 'no_pickle'])
def test_torch_zip_reader_refuses_tricks(tmp_path, case):
    torch.save(dict(a=torch.arange(6.)), tmp_path / 'x.pt')
    path = tmp_path / 'y.pt'
    if case == 'escape':
        rewrite_zip(tmp_path / 'x.pt', path, rename=lambda n: n.replace('x/data/0', 'x/../data/0'))
    elif case == 'two_folders':
        rewrite_zip(tmp_path / 'x.pt', path, rename=lambda n: n.replace('x/byteorder', 'y/byteorder'))
    elif case in ('short_storage', 'long_storage'):
        rewrite_zip(tmp_path / 'x.pt', path, change=lambda n, d: (d[:-4] if case == 'short_storage' else d + d)
            if n == 'x/data/0' else d)
    elif case == 'deflated':
        with zipfile.ZipFile(tmp_path / 'x.pt') as zin, zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info.filename))
    else:
        rewrite_zip(tmp_path / 'x.pt', path, rename=lambda n: n.replace('data.pkl', 'other.pkl'))
    with pytest.raises(UnsafePickleError):
        restricted_load_torch_zip(path)

def test_torch_zip_reader_reads_gpu_storages_to_the_cpu(tmp_path):
    # A reference state saved on a GPU names its storages' location cuda:0.
    torch.save(dict(a=torch.arange(6.)), tmp_path / 'x.pt')
    cpu, cuda = b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0'
    rewrite_zip(tmp_path / 'x.pt', tmp_path / 'y.pt', change=lambda n, d: d.replace(cpu, cuda) if n == 'x/data.pkl' else d)
    with zipfile.ZipFile(tmp_path / 'y.pt') as zf:
        assert cuda in zf.read('x/data.pkl')
    got = restricted_load_torch_zip(tmp_path / 'y.pt')['a']
    assert got.device.type == 'cpu' and torch.equal(got, torch.arange(6.))

def test_torch_zip_reader_refuses_storage_types_outside_the_list(tmp_path):
    torch.save(dict(a=torch.zeros(2, dtype=torch.complex64)), tmp_path / 'x.pt')
    with pytest.raises(UnsafePickleError, match='ComplexFloatStorage'):
        restricted_load_torch_zip(tmp_path / 'x.pt')

def test_plain_restricted_load_still_refuses_persistent_ids():
    from torch_utils.io.safe_pickle import restricted_load
    import io
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda obj: 'x' if obj == 'p' else None
    pickler.dump(['p'])
    buf.seek(0)
    with pytest.raises(UnsafePickleError, match='persistent'):
        restricted_load(buf)
