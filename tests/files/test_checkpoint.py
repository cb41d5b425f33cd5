"""Snapshots: our format round trip, reference pickles read without running them, damaged files."""

import functools
import http.server
import io
import os
import pickle
import threading

import pytest
import torch
from click.testing import CliRunner

import fdm
from fdm.io.network_files import CheckpointError, load_network_file, save_snapshot
from training.tools.convert import main as convert_main
from fdm.preconditioning import PRECOND_CLASSES
from helpers import MARKER_SOURCE, write_reference_pickle

# The tiny denoiser with augmentation labels; wake makes every tensor distinctive (zero-initialised layers included).
@pytest.fixture(scope='module')
def tiny(make_tiny_net):
    return functools.partial(make_tiny_net, augment_dim=9, wake=0.01)

def outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.eye(4)[[0, 2]]
    aug = torch.randn(2, 9, generator=g)
    return net(x, torch.tensor([0.5, 20.0]), labels, augment_labels=aug)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PRECOND_CLASSES))
def test_snapshot_round_trip_is_exact(tmp_path, name, tiny):
    net = tiny(name)
    save_snapshot(tmp_path / 'snap.pt', net)
    loaded = fdm.load_network(tmp_path / 'snap.pt')
    assert type(loaded) is type(net) and not loaded.training
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(outputs(net), outputs(loaded))
    # Plain data only: the safe loader of torch reads it.
    torch.load(tmp_path / 'snap.pt', weights_only=True)

@pytest.mark.parametrize('name', sorted(PRECOND_CLASSES))
def test_reference_pickle_loads(tmp_path, name, tiny):
    net = tiny(name)
    marker = tmp_path / 'marker'
    write_reference_pickle(tmp_path / 'ref.pkl', net, module_src=MARKER_SOURCE.format(path=str(marker)))
    data = load_network_file(tmp_path / 'ref.pkl')
    assert type(data['ema']) is type(net)
    assert torch.equal(outputs(net), outputs(data['ema'].eval()))
    assert data['loss_fn'] == dict(class_name='EDMLoss', init_kwargs=dict(warmup_ite=100.0))
    assert data['dataset_kwargs']['resolution'] == 8
    assert not marker.exists()  # the embedded source was never executed

def test_reference_pickle_never_runs_embedded_source_or_unknown_classes(tmp_path, tiny):
    marker = tmp_path / 'marker'
    write_reference_pickle(tmp_path / 'evil.pkl', tiny(), module_src=MARKER_SOURCE.format(path=str(marker)),
        class_name='Backdoor')
    with pytest.raises(CheckpointError, match="unknown preconditioner class 'Backdoor'"):
        fdm.load_network(tmp_path / 'evil.pkl')
    assert not marker.exists()

def test_plain_unpickling_of_reference_file_refuses(tmp_path, tiny):
    write_reference_pickle(tmp_path / 'ref.pkl', tiny())
    with open(tmp_path / 'ref.pkl', 'rb') as f, pytest.raises(RuntimeError, match='fdm.load_network'):
        pickle.load(f)

class Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)

def test_pickle_reducing_to_os_system_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(dict(ema=Evil(f'touch {marker}')), f, protocol=4)
    with pytest.raises(CheckpointError, match=r'(posix|nt|os)\.system'):
        fdm.load_network(tmp_path / 'evil.pkl')
    assert not marker.exists()

def test_nested_storage_pickle_is_restricted_too(tmp_path):
    # A storage payload is itself a torch.save pickle; a malicious one must not run either.
    marker = tmp_path / 'marker'
    inner = io.BytesIO()
    pickle.dump(Evil(f'touch {marker}'), inner, protocol=2)

    class EvilStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (inner.getvalue(),)

    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(dict(ema=EvilStorage()), f, protocol=4)
    with pytest.raises(CheckpointError):
        fdm.load_network(tmp_path / 'evil.pkl')
    assert not marker.exists()

#----------------------------------------------------------------------------
# Damaged files.

def test_corrupted_and_truncated_snapshots(tmp_path, tiny):
    save_snapshot(tmp_path / 'snap.pt', tiny())
    raw = (tmp_path / 'snap.pt').read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match='damaged or truncated'):
        fdm.load_network(tmp_path / 'trunc.pt')
    # Flip bits inside the largest tensor's payload.
    data = torch.load(tmp_path / 'snap.pt', weights_only=True)
    name = max(data['ema'], key=lambda k: data['ema'][k].numel())
    needle = data['ema'][name].numpy().tobytes()[:64]
    pos = raw.index(needle)
    bad = raw[:pos] + bytes(b ^ 0xFF for b in raw[pos:pos + 16]) + raw[pos + 16:]
    (tmp_path / 'bad.pt').write_bytes(bad)
    with pytest.raises(CheckpointError, match='damaged'):
        fdm.load_network(tmp_path / 'bad.pt')

def test_truncated_reference_pickle(tmp_path, tiny):
    write_reference_pickle(tmp_path / 'ref.pkl', tiny())
    raw = (tmp_path / 'ref.pkl').read_bytes()
    (tmp_path / 'trunc.pkl').write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(CheckpointError, match='damaged or truncated'):
        fdm.load_network(tmp_path / 'trunc.pkl')

def test_not_a_network_file(tmp_path):
    (tmp_path / 'x.txt').write_text('hello')
    with pytest.raises(CheckpointError, match='neither'):
        fdm.load_network(tmp_path / 'x.txt')
    with pytest.raises(CheckpointError, match='no such file'):
        fdm.load_network(tmp_path / 'missing.pkl')

#----------------------------------------------------------------------------
# URLs are downloaded once into the cache; the converter writes our format.

def test_load_from_url_uses_cache(tmp_path, monkeypatch, tiny):
    save_snapshot(tmp_path / 'snap.pt', tiny())
    monkeypatch.setenv('FDM_CACHE_DIR', str(tmp_path / 'cache'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/snap.pt'
        a = fdm.load_network(url)
        os.remove(tmp_path / 'snap.pt')  # the second load must come from the cache
        b = fdm.load_network(url)
    finally:
        server.shutdown()
    assert torch.equal(outputs(a), outputs(b))
    cached = os.listdir(tmp_path / 'cache' / 'downloads')
    assert len([name for name in cached if not name.endswith('.sha256')]) == 1  # the file (and its digest record)

def test_convert_command(tmp_path, tiny):
    net = tiny('FDM_VEPrecond', fdm_multiplier=2.0)
    write_reference_pickle(tmp_path / 'ref.pkl', net)
    result = CliRunner().invoke(convert_main, [str(tmp_path / 'ref.pkl'), str(tmp_path / 'out.pt')])
    assert result.exit_code == 0, result.output
    converted = load_network_file(tmp_path / 'out.pt')
    assert torch.equal(outputs(net), outputs(converted['ema']))
    assert converted['ema'].init_kwargs['fdm_multiplier'] == 2.0
    assert converted['extra']['converted_from'] == 'ref.pkl'
    result = CliRunner().invoke(convert_main, [str(tmp_path / 'ref.pkl'), str(tmp_path / 'out.pt')])
    assert result.exit_code != 0 and 'exists' in result.output

#----------------------------------------------------------------------------
