"""Which detector files may run: a TorchScript detector is code (TorchScript's torch.from_file
alone creates and writes any file the user can), so fid.py runs one only if the user trusts it
(--trust-detector, load_detector(trust=True)), if its SHA-256 is on the built-in list, or if it
is the official NVIDIA file as downloaded over HTTPS and recorded in the cache."""

import io
import json
import pickle
import warnings
from typing import Tuple

import PIL.Image
import pytest
import requests
import torch
from click.testing import CliRunner

import fid
import torch_utils.persistence
from torch_utils.io import download
from training.evaluation import inception
from torch_utils.errors import one_line
from training.evaluation.inception import DetectorError, load_detector

#----------------------------------------------------------------------------
# Hostile detectors: TorchScript that creates a marker file with torch.from_file(shared=True),
# at load (__setstate__) or on the probe image (forward). Both return 4 features.

class WritesInForward(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        mark = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)  # creates the file
        return x.to(torch.float32).flatten(1)[:, :4] + mark[0].to(torch.float32) * 0  # used, so not optimised away

class WritesAtLoad(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.mark = torch.zeros(16, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path, self.training = state[0], state[1]
        self.mark = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.to(torch.float32).flatten(1)[:, :4]

# The archive torch.jit.save writes for a module.
def torchscript_bytes(module):
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit is deprecated; NVIDIA's detector is TorchScript nonetheless
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()

class _PersistentRecordWriter:
    """Pickles like a torch_utils.persistence object, as NVIDIA's inception-2015-12-05.pkl does."""
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (torch_utils.persistence._reconstruct_persistent_obj, (self.meta,))

# A detector pickle in the layout of NVIDIA's, with `archive` as its TorchScript.
def nvidia_style_pickle(archive):
    meta = dict(type='class', version=6, class_name='InceptionWrapper', module_src='class InceptionWrapper: pass\n',
        state=dict(training=False, _modules={}, _parameters={}, detector=archive))
    return pickle.dumps(_PersistentRecordWriter(meta), protocol=4)

@pytest.fixture(params=['forward', 'setstate'])
def hostile(request, tmp_path):
    """(detector file, marker path): a .pt whose code creates the marker when it runs."""
    marker = tmp_path / f'marker-{request.param}'
    module = WritesInForward(str(marker)) if request.param == 'forward' else WritesAtLoad(str(marker))
    path = tmp_path / 'detector.pt'
    path.write_bytes(torchscript_bytes(module))
    assert not marker.exists()
    return path, marker

#----------------------------------------------------------------------------
# Untrusted: refused before any of the file's code runs; trusted: it runs (its code included).

def test_untrusted_torchscript_is_refused_before_it_runs(hostile):
    path, marker = hostile
    with pytest.raises(DetectorError, match='--trust-detector') as err:
        load_detector(str(path))
    assert len(one_line(err.value)) == len(str(err.value)) and not marker.exists()
    detector = load_detector(str(path), trust=True)
    assert marker.exists() and detector.feature_dim == 4  # trusting a file means running its code

def test_untrusted_torchscript_inside_a_pickle_is_refused(hostile, tmp_path):
    path, marker = hostile
    pkl = tmp_path / 'inception-2015-12-05.pkl'
    pkl.write_bytes(nvidia_style_pickle(path.read_bytes()))
    with pytest.raises(DetectorError, match='--trust-detector'):
        load_detector(str(pkl))
    assert not marker.exists()
    assert load_detector(str(pkl), trust=True).feature_dim == 4 and marker.exists()

def test_cli_refuses_then_trusts(hostile, tmp_path):
    path, marker = hostile
    data = tmp_path / 'data'
    data.mkdir()
    for i in range(4):
        PIL.Image.new('RGB', (4, 4), (i * 40, 0, 0)).save(data / f'{i}.png')
    dest = tmp_path / 'ref.npz'
    result = CliRunner().invoke(fid.main, ['ref', '--data', str(data), '--dest', str(dest), '--detector', str(path), '--workers', '0'])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and '--trust-detector' in errors[0] and 'pytorch-fid' in errors[0], result.output
    assert not marker.exists() and not dest.exists()
    result = CliRunner().invoke(fid.main, ['ref', '--data', str(data), '--dest', str(dest), '--detector', str(path), '--workers', '0',
        '--trust-detector'])
    assert result.exit_code == 0, result.output
    assert marker.exists() and dest.exists()

def test_builtin_list_trusts_by_content(hostile, monkeypatch):
    path, marker = hostile
    monkeypatch.setattr(inception, 'TRUSTED_DETECTOR_SHA256', {download.file_sha256(path): 'a test file'})
    load_detector(str(path))
    assert marker.exists()

#----------------------------------------------------------------------------
# The official URL: the SHA-256 of the file as downloaded over HTTPS is recorded next to it in
# the cache, and the cached file is trusted while it matches that record. requests.get is
# replaced by a stand-in server; the "official" file is a hostile one, to see when it runs.

class FakeResponse:
    """What download_cached uses of a streamed requests response."""
    def __init__(self, body):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        return [self.body[i:i + chunk_size] for i in range(0, len(self.body), chunk_size)]

@pytest.fixture
def server(monkeypatch, tmp_path):
    """{url: body} served by requests.get; returns (files, list of fetched URLs)."""
    monkeypatch.setenv('FDM_CACHE_DIR', str(tmp_path / 'cache'))
    files, fetched = {}, []
    def get(url, stream=True, timeout=None):
        fetched.append(url)
        return FakeResponse(files[url])
    monkeypatch.setattr(requests, 'get', get)
    return files, fetched

def test_official_download_is_recorded_and_trusted(hostile, server):
    path, marker = hostile
    files, fetched = server
    body = nvidia_style_pickle(path.read_bytes())
    files[inception.NVIDIA_INCEPTION_URL] = body
    assert load_detector('nvidia', verbose=False).feature_dim == 4 and marker.exists()
    local = download.download_cached(inception.NVIDIA_INCEPTION_URL)
    record = json.loads(open(local + '.sha256').read())
    assert record == dict(url=inception.NVIDIA_INCEPTION_URL, sha256=download.file_sha256(local))
    assert fetched == [inception.NVIDIA_INCEPTION_URL]
    load_detector('nvidia', verbose=False)
    assert len(fetched) == 1  # cached and matching its record: not fetched again
    # A cached file that no longer matches its record is fetched again, never trusted as it is.
    with open(local, 'ab') as f:
        f.write(b'changed')
    load_detector('nvidia', verbose=False)
    assert len(fetched) == 2 and open(local, 'rb').read() == body
    # The very same bytes from another URL, or as a local copy, are not trusted.
    files['https://example.com/inception-2015-12-05.pkl'] = body
    marker.unlink()
    for spec in ['https://example.com/inception-2015-12-05.pkl', local]:
        with pytest.raises(DetectorError, match='--trust-detector'):
            load_detector(spec, verbose=False)
        assert not marker.exists()

def test_pytorch_fid_weights_and_digits_need_no_trust(tmp_path):
    torch.save(inception.FIDInceptionV3().state_dict(), tmp_path / 'pt_inception.pth')
    assert load_detector(str(tmp_path / 'pt_inception.pth')).feature_dim == 2048
    assert load_detector('digits').feature_dim == 64

#----------------------------------------------------------------------------
