"""FID's detectors: pytorch-fid's Inception-v3 layout, weights and pooling, and the restricted
reading of NVIDIA's detector pickle (its source is never run; other globals are refused)."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import training.evaluation.inception as inception_module
import torch_utils.persistence
from conftest import assert_user_error, run_fid_cli, tiny_detector_bytes, write_folder
from training.evaluation.inception import DetectorError, FIDInceptionV3, load_detector

#----------------------------------------------------------------------------
# pytorch-fid's Inception-v3. The expected layout is torchvision's Inception3 as printed by
# PyTorch 1.5 / torchvision 0.6 (GaiusCjl/pneumoniaCTImageClassification, resultRecord.md), without
# AuxLogits and with 1008 classes, because pytorch-fid's fid_inception_v3() builds
# inception_v3(num_classes=1008, aux_logits=False) and loads pt_inception-2015-12-05-6726825d.pth
# into it strictly (mseitzer/pytorch-fid, src/pytorch_fid/inception.py). Convs have no bias;
# each is followed by BatchNorm (weight, bias, running_mean, running_var, num_batches_tracked).

def _a(i, pool):
    return [('branch1x1', i, 64, 1, 1), ('branch5x5_1', i, 48, 1, 1), ('branch5x5_2', 48, 64, 5, 5),
        ('branch3x3dbl_1', i, 64, 1, 1), ('branch3x3dbl_2', 64, 96, 3, 3), ('branch3x3dbl_3', 96, 96, 3, 3),
        ('branch_pool', i, pool, 1, 1)]

def _c(c7):
    return [('branch1x1', 768, 192, 1, 1), ('branch7x7_1', 768, c7, 1, 1), ('branch7x7_2', c7, c7, 1, 7),
        ('branch7x7_3', c7, 192, 7, 1), ('branch7x7dbl_1', 768, c7, 1, 1), ('branch7x7dbl_2', c7, c7, 7, 1),
        ('branch7x7dbl_3', c7, c7, 1, 7), ('branch7x7dbl_4', c7, c7, 7, 1), ('branch7x7dbl_5', c7, 192, 1, 7),
        ('branch_pool', 768, 192, 1, 1)]

def _e(i):
    return [('branch1x1', i, 320, 1, 1), ('branch3x3_1', i, 384, 1, 1), ('branch3x3_2a', 384, 384, 1, 3),
        ('branch3x3_2b', 384, 384, 3, 1), ('branch3x3dbl_1', i, 448, 1, 1), ('branch3x3dbl_2', 448, 384, 3, 3),
        ('branch3x3dbl_3a', 384, 384, 1, 3), ('branch3x3dbl_3b', 384, 384, 3, 1), ('branch_pool', i, 192, 1, 1)]

PYTORCH_FID_CONVS = {
    'Conv2d_1a_3x3': [('', 3, 32, 3, 3)], 'Conv2d_2a_3x3': [('', 32, 32, 3, 3)], 'Conv2d_2b_3x3': [('', 32, 64, 3, 3)],
    'Conv2d_3b_1x1': [('', 64, 80, 1, 1)], 'Conv2d_4a_3x3': [('', 80, 192, 3, 3)],
    'Mixed_5b': _a(192, 32), 'Mixed_5c': _a(256, 64), 'Mixed_5d': _a(288, 64),
    'Mixed_6a': [('branch3x3', 288, 384, 3, 3), ('branch3x3dbl_1', 288, 64, 1, 1), ('branch3x3dbl_2', 64, 96, 3, 3),
        ('branch3x3dbl_3', 96, 96, 3, 3)],
    'Mixed_6b': _c(128), 'Mixed_6c': _c(160), 'Mixed_6d': _c(160), 'Mixed_6e': _c(192),
    'Mixed_7a': [('branch3x3_1', 768, 192, 1, 1), ('branch3x3_2', 192, 320, 3, 3), ('branch7x7x3_1', 768, 192, 1, 1),
        ('branch7x7x3_2', 192, 192, 1, 7), ('branch7x7x3_3', 192, 192, 7, 1), ('branch7x7x3_4', 192, 192, 3, 3)],
    'Mixed_7b': _e(1280), 'Mixed_7c': _e(2048),
}

def expected_pytorch_fid_shapes():
    shapes = {}
    for block, convs in PYTORCH_FID_CONVS.items():
        for name, cin, cout, kh, kw in convs:
            prefix = f'{block}.{name}.' if name else f'{block}.'
            shapes[prefix + 'conv.weight'] = (cout, cin, kh, kw)
            for key in ['weight', 'bias', 'running_mean', 'running_var']:
                shapes[prefix + 'bn.' + key] = (cout,)
            shapes[prefix + 'bn.num_batches_tracked'] = ()
    shapes['fc.weight'] = (1008, 2048)
    shapes['fc.bias'] = (1008,)
    return shapes

@pytest.fixture(scope='module')
def inception():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a wrong load would show
        for name, buf in net.named_buffers():
            if name.endswith('running_mean'):
                buf.normal_(0, 0.1)
            elif name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
    return net

def test_fid_inception_layout_matches_pytorch_fid(inception):
    got = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert got == expected_pytorch_fid_shapes()
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with AuxLogits).
    # Without AuxLogits (98,560 + 2,459,136 + 769,000) and with 1008 classes (+8 * 2049): 23,850,960.
    assert sum(p.numel() for p in inception.parameters()) == 27161264 - 3326696 + 8 * 2049

def test_fid_inception_features_and_weight_round_trip(inception, tmp_path):
    # The zip format of today, and the legacy format without BatchNorm step counters.
    state = inception.state_dict()
    torch.save(state, tmp_path / 'new.pth')
    old = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save(old, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    for name in ['old.pth', 'new.pth']:
        detector = load_detector(str(tmp_path / name), device='cpu')
        assert isinstance(detector.net, FIDInceptionV3) and detector.feature_dim == 2048
        loaded = detector.net.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # One forward (a 299x299 pass costs seconds on a CPU): any image size in, [N, 2048] out.
    images = torch.randint(0, 256, [2, 3, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = detector(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()

def test_fid_inception_uses_tensorflow_pooling(inception):
    # TF's average pooling ignores the zero padding: a constant stays constant up to the border.
    ones = torch.ones([1, 2, 5, 5])
    assert torch.equal(inception_module._tf_avg_pool(ones), ones)
    assert not torch.equal(F.avg_pool2d(ones, 3, stride=1, padding=1), ones)  # PyTorch's default would not
    # The last block max-pools (pytorch-fid's FIDInceptionE_2), the one before average-pools (E_1).
    assert (inception.Mixed_7b.pool, inception.Mixed_7c.pool) == ('avg', 'max')

def test_fid_inception_rejects_wrong_weights(tmp_path, inception):
    state = dict(inception.state_dict())
    state['fc.weight'] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / 'shape.pth')
    with pytest.raises(DetectorError, match='fc.weight'):
        load_detector(str(tmp_path / 'shape.pth'))
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(DetectorError, match='missing'):
        load_detector(str(tmp_path / 'other.pth'))

#----------------------------------------------------------------------------
# NVIDIA's detector pickle: the persistence record is read as data, never executed, and any
# other global is refused before it can run.

class _PersistentRecordWriter:
    """Pickles like a torch_utils.persistence object: _reconstruct_persistent_obj(meta)."""
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (torch_utils.persistence._reconstruct_persistent_obj, (self.meta,))

class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))

def test_nvidia_format_pickle_loads_without_running_its_source(tmp_path):
    marker = tmp_path / 'pwned'
    meta = dict(type='class', version=6, class_name='InceptionWrapper',
        module_src=f'open({str(marker)!r}, "w").write("pwned")\nclass InceptionWrapper: pass\n',
        state=dict(training=False, _modules={}, _parameters={}, detector=tiny_detector_bytes()))
    path = tmp_path / 'inception.pkl'
    path.write_bytes(pickle.dumps(_PersistentRecordWriter(meta), protocol=4))
    detector = load_detector(str(path), trust=True)  # trusts the TorchScript inside; the pickle's source is never run
    assert not marker.exists()
    images = torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8)
    assert detector.feature_dim == 12
    torch.testing.assert_close(detector(images), F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1))

def test_pickle_without_torchscript_is_refused(tmp_path):
    meta = dict(type='class', version=6, class_name='SomethingElse', module_src='', state=dict(weights=torch.zeros(3)))
    path = tmp_path / 'other.pkl'
    path.write_bytes(pickle.dumps(_PersistentRecordWriter(meta), protocol=4))
    with pytest.raises(DetectorError, match='expected one TorchScript module .*SomethingElse.*found 0'):
        load_detector(str(path))

def test_pickle_calling_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(_RunsCommand(f'touch {marker}'), protocol=4))
    with pytest.raises(DetectorError, match=r'(posix|os|nt)\.system'):
        load_detector(str(path))
    assert not marker.exists()
    # The same through the command line: a one-line error, nothing run.
    data = write_folder(tmp_path / 'data', 4)
    assert_user_error(run_fid_cli('ref', '--data', data, '--dest', tmp_path / 'x.npz', '--detector', path), 'system')
    assert not marker.exists()
