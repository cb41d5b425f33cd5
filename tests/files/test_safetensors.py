"""Snapshots as .safetensors (fdm/io/safetensors_format.py): exact round trips from our snapshots and
from reference pickles, through the converter, and damaged or foreign files refused in one line."""

import json
import os

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import fdm
from fdm.io.network_files import CheckpointError, load_network_file, save_snapshot
from training.tools.convert import main as convert_main
from helpers import write_reference_pickle

def outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    labels = torch.eye(net.label_dim)[[0, 1]] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]), labels)

@pytest.fixture
def net(make_tiny_net):
    return make_tiny_net('FDM_EDMPrecond', augment_dim=9, wake=0.01)

def test_round_trip_is_exact(tmp_path, net):
    save_snapshot(tmp_path / 'net.pt', net, loss_fn=dict(class_name='EDMLoss', init_kwargs=dict(warmup_ite=200)),
        dataset_kwargs=dict(resolution=8), extra=dict(cur_nimg=1000))
    result = CliRunner().invoke(convert_main, [str(tmp_path / 'net.pt'), str(tmp_path / 'net.safetensors')])
    assert result.exit_code == 0, result.output
    pt, st = load_network_file(tmp_path / 'net.pt'), load_network_file(tmp_path / 'net.safetensors')
    assert {k: v for k, v in pt.items() if k not in ('ema', 'extra')} == {k: v for k, v in st.items() if k not in ('ema', 'extra')}
    assert st['extra']['converted_from'] == 'net.pt'
    a, b = pt['ema'].state_dict(), st['ema'].state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(outputs(net), outputs(fdm.load_network(tmp_path / 'net.safetensors')))
    # Anyone can read it without our code: plain tensors, the description as JSON metadata.
    tensors = safetensors.torch.load_file(str(tmp_path / 'net.safetensors'))
    assert torch.equal(tensors['model.enc.8x8_conv.weight'], a['model.enc.8x8_conv.weight'])
    with safetensors.safe_open(str(tmp_path / 'net.safetensors'), framework='pt') as f:
        assert json.loads(f.metadata()['description'])['ema']['class_name'] == 'FDM_EDMPrecond'

def test_reference_pickle_to_safetensors_gives_identical_outputs(tmp_path, net):
    write_reference_pickle(tmp_path / 'ref.pkl', net)
    result = CliRunner().invoke(convert_main, [str(tmp_path / 'ref.pkl'), str(tmp_path / 'ref.safetensors')])
    assert result.exit_code == 0, result.output
    converted = load_network_file(tmp_path / 'ref.safetensors')
    assert torch.equal(outputs(net), outputs(converted['ema'].eval()))
    assert converted['extra']['converted_from'] == 'ref.pkl'

def test_damaged_and_foreign_files_are_refused(tmp_path, net):
    save_snapshot(tmp_path / 'net.safetensors', net)
    raw = (tmp_path / 'net.safetensors').read_bytes()
    # A changed description (sigma_data 0.5 -> 0.7) is a checksum mismatch, not another network.
    assert raw.count(b'sigma_data\\": 0.5') == 1
    (tmp_path / 'flip.safetensors').write_bytes(raw.replace(b'sigma_data\\": 0.5', b'sigma_data\\": 0.7'))
    with pytest.raises(CheckpointError, match='checksum mismatch'):
        load_network_file(tmp_path / 'flip.safetensors')
    (tmp_path / 'trunc.safetensors').write_bytes(raw[:len(raw) - 100])
    with pytest.raises(CheckpointError, match='cannot be read as safetensors'):
        load_network_file(tmp_path / 'trunc.safetensors')
    safetensors.torch.save_file({'w': torch.zeros(3)}, str(tmp_path / 'foreign.safetensors'))
    with pytest.raises(CheckpointError, match='without an FDM network description'):
        load_network_file(tmp_path / 'foreign.safetensors')
    # A header that claims more than any network needs is refused before it is parsed.
    (tmp_path / 'huge.safetensors').write_bytes((1 << 40).to_bytes(8, 'little') + b'{' + b' ' * 64)
    with pytest.raises(CheckpointError, match='neither|header'):
        load_network_file(tmp_path / 'huge.safetensors')

def test_converter_refuses_to_overwrite(tmp_path, net):
    save_snapshot(tmp_path / 'net.pt', net)
    (tmp_path / 'out.safetensors').write_bytes(b'keep')
    result = CliRunner().invoke(convert_main, [str(tmp_path / 'net.pt'), str(tmp_path / 'out.safetensors')])
    assert result.exit_code == 1 and 'exists' in result.output
    assert (tmp_path / 'out.safetensors').read_bytes() == b'keep'
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp')]
