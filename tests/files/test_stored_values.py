"""The numbers a network file states (fdm/io/network_files.py NETWORK_RANGES): every constructor
argument of the preconditioner and its U-Net within its range, or one CheckpointError naming the
file and the argument, before anything is built; the description around the network of the shape
save_snapshot writes, or one line; and no reader by name waits on a FIFO.

The hostile snapshots here carry a valid digest: they are what a buggy tool or an attacker writes,
not damage, so only the value checks can refuse them."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from conftest import one_line_error
from fdm.io.network_files import FORMAT_NAME, FORMAT_VERSION, CheckpointError, load_network_file, save_snapshot
from helpers import ReferenceFormatPickler, write_reference_pickle, within
from torch_utils.errors import EvaluationError
from torch_utils.io.files import nested_digest
from training.evaluation.generation import check_outdir, saved_seeds
from training.tools.convert import main as convert_main

NAN, INF = float('nan'), float('inf')

# One tiny network of each family whose arguments are tested, built once.
@pytest.fixture(scope='module')
def nets(make_tiny_net):
    return {name: make_tiny_net(name, attn_resolutions=(), label_dim=0, wake=0.01)
        for name in ['EDMPrecond', 'FDM_EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond']}

def description(net, **changes):
    return dict(ema=dict(class_name=type(net).__name__, init_kwargs=dict(net.init_kwargs, **changes)), loss_fn=None,
        augment_pipe=None, dataset_kwargs=None, extra=None)

# A version 2 snapshot of `net`'s tensors with this description (a dict, or JSON text), digest and all.
def write_snapshot(path, net, described):
    text = described if isinstance(described, str) else json.dumps(described)
    data = dict(format=FORMAT_NAME, version=FORMAT_VERSION, description=text,
        ema={k: v.clone() for k, v in net.state_dict().items()})
    torch.save(dict(data, sha256=nested_digest(data)), path)
    return path

def refusal(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_network_file(path)
    message = str(info.value)
    assert message.startswith(f'{os.path.basename(path)}: ') and '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message

#----------------------------------------------------------------------------
# Every numeric constructor argument within its range. Each case loaded before (sigma_data=NaN as
# black images, dropout=NaN failing later), or failed in a message that did not name the argument.

BAD_ARGUMENTS = [
    ('EDMPrecond', dict(sigma_data=NAN)), ('EDMPrecond', dict(sigma_data=INF)), ('EDMPrecond', dict(sigma_data=-0.5)),
    ('EDMPrecond', dict(sigma_data=0)), ('EDMPrecond', dict(sigma_min=-1.0)), ('EDMPrecond', dict(sigma_max=NAN)),
    ('EDMPrecond', dict(sigma_data='0.5')), ('EDMPrecond', dict(sigma_data=True)),
    ('FDM_EDMPrecond', dict(fdm_multiplier=NAN)), ('FDM_EDMPrecond', dict(fdm_multiplier=-1.0)),
    ('FDM_EDMPrecond', dict(fdm_beta_d=INF)), ('FDM_EDMPrecond', dict(fdm_beta_min=NAN)),
    ('VPPrecond', dict(beta_d=NAN)), ('VPPrecond', dict(beta_d=0)), ('VPPrecond', dict(beta_min=-1.0)),
    ('VPPrecond', dict(epsilon_t=0)), ('VPPrecond', dict(M=1000.0)), ('VPPrecond', dict(M=10**9)),
    ('VEPrecond', dict(sigma_min=NAN)),
    ('iDDPMPrecond', dict(C_1=NAN)), ('iDDPMPrecond', dict(C_2=-1.0)),
    ('EDMPrecond', dict(dropout=NAN)), ('EDMPrecond', dict(dropout=2.0)), ('EDMPrecond', dict(label_dropout=NAN)),
    ('EDMPrecond', dict(model_channels=8.0)), ('EDMPrecond', dict(num_blocks=1.0)), ('EDMPrecond', dict(channel_mult=[1, '2'])),
    ('EDMPrecond', dict(channel_mult=7)), ('EDMPrecond', dict(attn_resolutions=[NAN])),
    ('EDMPrecond', dict(resample_filter=[1, NAN])), ('EDMPrecond', dict(channel_mult_emb=0)),
]

@pytest.mark.parametrize('name, changes', BAD_ARGUMENTS, ids=lambda c: c if isinstance(c, str) else
    '-'.join(f'{k}={v}' for k, v in c.items()))
def test_a_stored_argument_outside_its_range_is_refused(tmp_path, nets, name, changes):
    key = next(iter(changes))
    path = write_snapshot(tmp_path / 'snap.pt', nets[name], description(nets[name], **changes))
    refusal(path, f'the stored {key}=', 'in the range', 'not a network snapshot of this code')

def test_sigma_min_must_be_below_sigma_max(tmp_path, nets):
    # FDM's s(sigma) divides by sigma_max - sigma_min: equal bounds gave NaN inputs to the U-Net.
    net = nets['FDM_EDMPrecond']
    refusal(write_snapshot(tmp_path / 'snap.pt', net, description(net, sigma_min=80.0, sigma_max=80.0)),
        'sigma_min=80.0 is not below sigma_max=80.0')

def test_values_within_the_ranges_still_load(tmp_path, nets):
    # EDM's own defaults (sigma 0..inf, as JSON Infinity), and the ends of the ranges.
    net = nets['EDMPrecond']
    for i, changes in enumerate([dict(sigma_min=0, sigma_max=INF), dict(sigma_data=100, dropout=1, label_dropout=0)]):
        loaded = load_network_file(write_snapshot(tmp_path / f'{i}.pt', net, description(net, **changes)))['ema']
        assert all(getattr(loaded, k) == v for k, v in changes.items() if hasattr(loaded, k))
        assert loaded.init_kwargs == dict(net.init_kwargs, **changes)

def test_reference_pickle_and_safetensors_are_checked_alike(tmp_path, nets):
    net = nets['EDMPrecond']
    hostile = net.__class__(**dict(net.init_kwargs, sigma_data=np.float64(NAN)))
    hostile.load_state_dict(net.state_dict())
    write_reference_pickle(tmp_path / 'ref.pkl', hostile)
    refusal(tmp_path / 'ref.pkl', 'the stored sigma_data=nan')
    save_snapshot(tmp_path / 'snap.safetensors', hostile)
    refusal(tmp_path / 'snap.safetensors', 'the stored sigma_data=nan')

def test_generate_refuses_a_nan_sigma_data_instead_of_writing_black_images(tmp_path, nets):
    net = nets['EDMPrecond']
    write_snapshot(tmp_path / 'snap.pt', net, description(net, sigma_data=NAN))
    result = CliRunner().invoke(generate.main, ['--network', str(tmp_path / 'snap.pt'), '--outdir', str(tmp_path / 'out'),
        '--seeds', '0', '--steps', '2'])
    assert 'the stored sigma_data=nan' in one_line_error(result)
    assert not (tmp_path / 'out' / '000000.png').exists()

#----------------------------------------------------------------------------
# Arguments each within its range that still make no network: torch builds it and fails only in
# its first forward pass (a traceback from generate.py, not a line). The readers check the built
# U-Net's modules first (fdm/io/network_files.py structure_problem).

UNRUNNABLE = [
    (dict(model_channels=14), 'its enc.8x8_block0.norm0 normalises 14 channels in 3 groups, which do not divide them'),
    (dict(model_channels=5), 'its map_noise embeds the noise level in an odd number of channels (5)'),
    (dict(model_type='DhariwalUNet', model_channels=224, channel_mult=[1], attn_resolutions=[8]),
        'enc.8x8_block0 splits 224 channels into 3 attention heads'),
]

@pytest.mark.parametrize('changes, fragment', UNRUNNABLE, ids=['groupnorm', 'odd-embedding', 'heads'])
def test_a_network_that_cannot_run_is_refused_in_one_line(tmp_path, make_tiny_net, changes, fragment):
    net = make_tiny_net('EDMPrecond', label_dim=0, wake=0, **changes)  # torch builds it
    path = write_snapshot(tmp_path / 'snap.pt', net, description(net))
    refusal(path, 'the stored arguments give a U-Net that cannot run', fragment)
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'out'), '--seeds', '0'])
    assert 'cannot run' in one_line_error(result) and not (tmp_path / 'out' / '000000.png').exists()

@pytest.mark.slow
def test_the_structure_check_agrees_with_a_real_forward_pass(make_tiny_net):
    # Over every width from 1 to 20 channels (and 130), for each U-Net family, with labels and
    # augmentation: refused exactly when a real forward pass on the CPU fails or is not finite.
    from fdm.io.network_files import structure_problem
    families = dict(ddpmpp={}, ncsnpp=dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
        decoder_type='standard', resample_filter=[1, 3, 3, 1]), adm=dict(model_type='DhariwalUNet'))
    verdicts = {}
    for family, kwargs in families.items():
        for width in [*range(1, 21), 130]:
            changes = dict(kwargs, model_channels=width, augment_dim=2)
            net = make_tiny_net('EDMPrecond', label_dim=3, wake=0, **changes)
            try:
                with torch.no_grad():
                    y = net.model(torch.randn(2, 3, 8, 8), torch.randn(2), torch.randn(2, 3), torch.randn(2, 2))
                runs = bool(torch.isfinite(y).all())
            except Exception:
                runs = False
            verdicts[family, width] = (runs, structure_problem(net.model) is None)
    assert all(runs == accepted for runs, accepted in verdicts.values()), verdicts
    assert 10 < sum(runs for runs, _ in verdicts.values()) < len(verdicts) - 10  # both kinds are covered

#----------------------------------------------------------------------------
# The description around the network: each part of save_snapshot's shape, or one line; a part
# left out is null. The converter used to fail in a traceback on every one of these.

def convert(src, dst):
    return CliRunner().invoke(convert_main, [str(src), str(dst)])

BAD_PARTS = dict(loss_fn=['x', 5, [1], dict(class_name=3, init_kwargs={}), dict(class_name='EDMLoss')],
    augment_pipe=['x', dict(init_kwargs={})], dataset_kwargs=['abc', [1, 2], 3], extra=['x', [1]], ema=[None, 'x'])

@pytest.mark.parametrize('key, value', [(k, v) for k, values in BAD_PARTS.items() for v in values],
    ids=lambda v: json.dumps(v))
def test_a_description_part_of_the_wrong_shape_is_one_line(tmp_path, nets, key, value):
    net = nets['EDMPrecond']
    write_snapshot(tmp_path / 'snap.pt', net, dict(description(net), **{key: value}))
    line = one_line_error(convert(tmp_path / 'snap.pt', tmp_path / 'out.pt'))
    assert f'snap.pt: the description in the snapshot is damaged (its "{key}" is' in line, line
    assert not (tmp_path / 'out.pt').exists()

def test_a_description_without_its_optional_parts_converts(tmp_path, nets):
    net = nets['EDMPrecond']
    write_snapshot(tmp_path / 'snap.pt', net, dict(ema=description(net)['ema']))
    result = convert(tmp_path / 'snap.pt', tmp_path / 'out.pt')
    assert result.exit_code == 0, result.output
    converted = load_network_file(tmp_path / 'out.pt')
    assert (converted['loss_fn'], converted['augment_pipe'], converted['dataset_kwargs']) == (None, None, None)
    assert converted['extra'] == dict(converted_from='snap.pt')

def test_a_reference_pickle_with_dataset_kwargs_of_the_wrong_shape_is_one_line(tmp_path, nets):
    with open(tmp_path / 'ref.pkl', 'wb') as f:
        ReferenceFormatPickler(f, nets['EDMPrecond']).dump(dict(ema=nets['EDMPrecond'], dataset_kwargs=[1, 2]))
    line = one_line_error(convert(tmp_path / 'ref.pkl', tmp_path / 'out.pt'))
    assert 'ref.pkl: the description in the snapshot is damaged (its "dataset_kwargs" is a list [1, 2]' in line, line

def test_the_description_is_parsed_with_bounded_integers(tmp_path, nets):
    # json.loads would take a 10^30 anywhere in the description; loads_bounded refuses it.
    net = nets['EDMPrecond']
    text = json.dumps(description(net)).replace('"extra": null', '"extra": {"x": ' + '9' * 30 + '}')
    refusal(write_snapshot(tmp_path / 'snap.pt', net, text), 'the network description is not valid JSON (an integer of 30 digits)')

#----------------------------------------------------------------------------
# Readers by name open regular files only: a FIFO used to block the open for ever.

def test_a_fifo_is_never_waited_on(tmp_path):
    os.mkfifo(tmp_path / 'net.pt')
    (tmp_path / 'out').mkdir()
    os.mkfifo(tmp_path / 'out' / '000000.png')
    with within(10):
        with pytest.raises(CheckpointError, match='net.pt is not a regular file; pass a network snapshot'):
            load_network_file('file://' + str(tmp_path / 'net.pt'))
        assert saved_seeds(str(tmp_path / 'out'), [0], subdirs=False).tolist() == [False]  # made again
    os.remove(tmp_path / 'out' / '000000.png')
    os.mkfifo(tmp_path / 'out' / 'generate_options.json')
    with within(10), pytest.raises(EvaluationError, match='generate_options.json is not a regular file'):
        check_outdir(str(tmp_path / 'out'), {})

# A module record whose fields are not the containers a module holds (an empty tensor where the
# parameters' dict belongs was a RuntimeError from bool(tensor)) is one CheckpointError.
@pytest.mark.parametrize('field, value', [('_parameters', torch.zeros(0)), ('_buffers', [1]), ('_modules', 'x'),
    ('_non_persistent_buffers_set', 3)])
def test_module_record_fields_of_the_wrong_kind_are_refused(field, value):
    from types import SimpleNamespace
    from fdm.io.network_files import record_tensors
    with pytest.raises(CheckpointError, match=f'{field} of the network record is a'):
        record_tensors(SimpleNamespace(state={field: value}))
    assert record_tensors(SimpleNamespace(state={'_parameters': {'w': torch.ones(2)}, '_buffers': None})).keys() == {'w'}
