"""The embedded default: digits dataset, FD-digits detector, demo pieces and the miniature reproduction."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip('sklearn')

import fid
from training.evaluation import digits
from training.evaluation.feature_stats import load_stats
from training.tools import digits_classifier
from training.tools import mini_repro
from training.data.dataset import ImageFolderDataset
from training.data.writer import convert_dataset

@pytest.mark.parametrize('resolution', [16, 32])
def test_digits_source(tmp_path, resolution):
    n = convert_dataset('sklearn-digits', str(tmp_path / 'd.zip'), resolution=(resolution, resolution)).num_images
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True)
    assert n == len(ds) == 1797 and ds.image_shape == [1, resolution, resolution] and ds.label_dim == 10
    # The first UCI digit is a 0 and the classes cycle 0..9 at the start of the set.
    assert [int(ds.get_label(i).argmax()) for i in range(10)] == list(range(10))

def test_committed_classifier_recognises_the_digits():
    images, labels = digits.digits_images()
    assert digits.class_accuracy(images, labels) > 0.99
    # Any resolution is accepted (resized to 16x16), e.g. 32x32 samples.
    big = torch.nn.functional.interpolate(images.float(), size=32, mode='nearest').to(torch.uint8)
    assert digits.class_accuracy(big, labels) > 0.95

# The classifier's command line scores the committed weights; without them, the error names the command that rebuilds them.
def test_classifier_command(tmp_path, monkeypatch):
    r = CliRunner().invoke(digits_classifier.main, [])
    assert r.exit_code == 0 and float(r.output.split('Accuracy on all digits: ')[1]) > 0.99, r.output
    monkeypatch.setattr(digits, 'WEIGHTS', str(tmp_path / 'missing.pt'))
    with pytest.raises(FileNotFoundError, match='python -m training.tools.digits_classifier --train'):
        digits.load_classifier()

def test_fd_digits_via_fid_py(tmp_path):
    convert_dataset('sklearn-digits', str(tmp_path / 'd.zip'), resolution=(16, 16))
    runner = CliRunner()
    r = runner.invoke(fid.main, ['ref', '--data', str(tmp_path / 'd.zip'), '--dest', str(tmp_path / 'ref.npz'),
        '--detector=digits', '--workers=0'])
    assert r.exit_code == 0, r.output
    mu, sigma = load_stats(str(tmp_path / 'ref.npz'))
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    r = runner.invoke(fid.main, ['calc', '--images', str(tmp_path / 'd.zip'), '--ref', str(tmp_path / 'ref.npz'),
        '--detector=digits', '--num=1797', '--workers=0'])
    assert r.exit_code == 0, r.output
    assert abs(float(r.output.split('FD-digits ')[1].split()[0])) < 1e-6  # the set against itself

@pytest.mark.slow
def test_mini_repro_smoke(tmp_path):
    r = CliRunner().invoke(mini_repro.main, ['--outdir', str(tmp_path), '--smoke', '--methods', 'edm,fdm_edm'])
    assert r.exit_code == 0, r.output
    table = (tmp_path / 'results.md').read_text()
    assert '| Training images (kimg) | EDM | EDM-FDM |' in table
    results = json.loads((tmp_path / 'results.json').read_text())
    assert set(results) == {'edm', 'fdm_edm'}
    assert all(np.isfinite(v) for r in results.values() for v in r.values()) and all(len(r) == 2 for r in results.values())
    assert (tmp_path / 'results.png').stat().st_size > 0
