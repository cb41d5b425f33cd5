"""Feature detectors: NVIDIA's and pytorch-fid's Inception-v3 for FID, DINOv2 ViT-L/14 for FD-DINOv2.

The two Inceptions are the TensorFlow Inception graph of 2015-12-05 (the one FID was defined
with), ported to PyTorch twice:

- NVIDIA's `inception-2015-12-05.pkl` (StyleGAN3, EDM, FDM). The reference opens it with a
  plain `pickle.load` and calls it on uint8 images with `return_features=True` for 2048
  pool3 features; the TorchScript model inside (the same as StyleGAN2-ADA's
  `inception-2015-12-05.pt`) resizes and normalises by itself. We read the pickle with an
  allow-list (anything that could run Python code is refused, naming the global), expecting
  the TorchScript archive as bytes in the state of a `torch_utils.persistence` record. The bare
  `.pt` file is accepted too. TorchScript is code: it runs when the archive is loaded
  (`__setstate__`) and on every batch (`forward`), and its operators alone can create and
  write files (`torch.from_file(..., shared=True)`). So it is loaded only from a file we can
  vouch for (see `check_trusted`): the official pickle as downloaded over HTTPS from its URL,
  a file whose SHA-256 is in TRUSTED_DETECTOR_SHA256, or any file the caller trusts
  (`trust=True`, fid.py's --trust-detector).
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a state dict for torchvision's
  Inception3 layout with four TF-specific blocks. `FIDInceptionV3` below is our own
  implementation of that network (no torchvision); the file is read with
  `torch.load(weights_only=True)`.

DINOv2's `dinov2_vitl14_pretrain.pth` (EDM2's FD-DINOv2) is a state dict too, read the same way
and loaded into our own ViT (training/evaluation/dinov2.py) once its names and shapes are exactly
those of ViT-L/14. Every file is opened by name through open_regular.

`load_detector(spec, device)` returns a `Detector`: call it with uint8 images [N, C, H, W]
in 0..255 (C = 1 or 3) to get float32 features [N, feature_dim]; its `metric` says what they
measure ('fid', 'fd_dinov2', 'fd_digits': the names of EDM2's statistics pickles).
"""

import io
import os
import pickle
import re
import warnings
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from torch_utils.errors import FileError
from torch_utils.io.files import open_regular
from torch_utils.io.safe_pickle import PersistentRecord, PlainObject, UnsafePickleError, restricted_load
from torch_utils.io.download import download_cached, file_sha256

NVIDIA_INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
PYTORCH_FID_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
ALIASES = {'nvidia': NVIDIA_INCEPTION_URL, 'pytorch-fid': PYTORCH_FID_URL, 'dinov2': DINOV2_URL}
WEIGHTS_FILES = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or DINOv2's dinov2_vitl14_pretrain.pth"

class DetectorError(FileError):
    """A detector file that cannot be used; the message says why and what to do."""

#----------------------------------------------------------------------------
# The common interface: uint8 images in, float32 features out.

class Detector:
    def __init__(self, net, name, device, call_kwargs=None, feature_dim=None, metric='fid'):
        self.net = net.eval().to(device)  # run under no_grad below; ScriptModules lack requires_grad_
        self.name = name
        self.metric = metric  # the statistics it gives: 'fid' (Inception), 'fd_dinov2', 'fd_digits'
        self.device = torch.device(device)
        self.call_kwargs = dict(call_kwargs or {})
        if feature_dim is None:  # a TorchScript module: ask it, with one black image
            feature_dim = self(torch.zeros([1, 3, 64, 64], dtype=torch.uint8)).shape[1]
        self.feature_dim = int(feature_dim)

    def __call__(self, images):
        """uint8 [N, 1 or 3, H, W] in 0..255 -> float32 [N, feature_dim]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DetectorError(f'the detector takes uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}')
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])  # grayscale as RGB, as the reference does
        with torch.no_grad():
            features = self.net(images.to(self.device), **self.call_kwargs)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise DetectorError(f'{self.name}: the detector returned {got} instead of features [N, D]')
        return features.to(torch.float32)

#----------------------------------------------------------------------------
# pytorch-fid's Inception-v3, layer names and shapes as in torchvision's Inception3 (without
# the auxiliary classifier, 1008 classes) so that its state dict loads strictly by name.

class ConvBN(nn.Module):
    """Conv without bias, BatchNorm with TensorFlow's eps 1e-3, ReLU (torchvision's BasicConv2d)."""
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

# TensorFlow's 3x3/1 average pooling divides by the number of real (unpadded) pixels.
def _tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class FIDInceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches; TF average pooling."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], dim=1)  # [N, 224 + pool_features, 35, 35]

class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (unchanged from torchvision)."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)  # [N, 480 + in_channels, 17, 17]

class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions; TF average pooling."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in [self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5]:
            c = layer(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], dim=1)  # [N, 768, 17, 17]

class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (unchanged from torchvision)."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in [self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4]:
            b = layer(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)  # [N, 512 + in_channels, 8, 8]

class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions. pool='avg' is pytorch-fid's FIDInceptionE_1 (TF
    average pooling); pool='max' is FIDInceptionE_2: the TF graph max-pools in the last block."""
    def __init__(self, in_channels, pool):
        super().__init__()
        if pool not in ('avg', 'max'):
            raise ValueError(f'pool must be "avg" or "max", got {pool!r}')
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        pooled = _tf_avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], dim=1)  # [N, 2048, 8, 8]

class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: uint8-range images [N, 3, H, W] -> pool3 features [N, 2048]."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool='avg')
        self.Mixed_7c = FIDInceptionE(2048, pool='max')
        self.fc = nn.Linear(2048, 1008)  # the TF classifier (1008 classes); in the file, unused for FID

    def forward(self, images):
        # pytorch-fid feeds ToTensor() images in [0, 1], resizes them bilinearly to 299x299 and
        # maps them to [-1, 1]; uint8 / 255 is the same float32 value as ToTensor gives.
        x = images.to(torch.float32) / 255
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        for block in [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]:
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [N, 2048, 8, 8] -> [N, 2048]

def fid_inception_from_state(state, name):
    """FIDInceptionV3 with the weights of a pytorch-fid state dict (see read_state_dict), checked strictly by name and shape."""
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = dict(state)
    for key in expected:  # files from PyTorch < 0.4.1 lack BatchNorm's step counter, which inference never reads
        if key.endswith('.num_batches_tracked') and key not in state:
            state[key] = expected[key].clone()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DetectorError(f'{name}: not pytorch-fid Inception weights: missing {missing[:3]}, unexpected {unexpected[:3]} '
            f'({len(missing)} and {len(unexpected)} in all)')
    wrong = [f'{k} {list(state[k].shape)} (expected {list(v.shape)})' for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise DetectorError(f'{name}: tensor shapes do not match pytorch-fid\'s Inception: {wrong[0]}')
    net.load_state_dict(state, strict=True)
    return net

def _first_line(err):
    return (str(err).strip().splitlines() or [''])[0]

#----------------------------------------------------------------------------
# State-dict files (pytorch-fid's Inception, DINOv2): torch.load with weights_only, which builds
# tensors and plain containers only and refuses any other global, so nothing in the file runs.

def read_state_dict(path, name):
    """The dict of tensors in a torch.save file (zip or legacy format); one DetectorError otherwise."""
    remedy = f'pass {WEIGHTS_FILES}'
    with open_detector_file(path) as f:
        try:
            state = torch.load(f, map_location='cpu', weights_only=True)
        except Exception as err:
            # weights_only's refusal starts with advice to load without it; what matters is the global.
            refused = re.search(r'GLOBAL ([\w.]+)', str(err)) if str(err).startswith('Weights only load failed') else None
            if refused:
                raise DetectorError(f'{name}: refusing to load: the pickle references {refused.group(1)}, which a weights '
                    f'file never needs (it could run code); {remedy}') from None
            raise DetectorError(f'{name}: cannot be read as a weights file ({type(err).__name__}: {_first_line(err)}); '
                f'{remedy}') from None
    if not isinstance(state, dict):
        raise DetectorError(f'{name}: holds a {type(state).__name__}, not a state dict of tensors; {remedy}')
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DetectorError(f'{name}: {key!r} is a {type(value).__name__}, not a tensor: not a state dict of tensors; '
                f'{remedy}')
    return state

def is_dinov2_state(state):
    """DINOv2 weights name a class token and a position embedding; Inception's never do."""
    return 'cls_token' in state or 'pos_embed' in state

def load_dinov2(state, name):
    """The FD-DINOv2 network (training/evaluation/dinov2.py) with the weights of a state dict, checked
    to be exactly ViT-L/14's names and shapes; a one-line DetectorError naming the first difference."""
    from training.evaluation import dinov2  # the ViT is built only when asked for
    try:
        return dinov2.from_state_dict(state)
    except ValueError as err:
        raise DetectorError(f'{name}: not a DINOv2 ViT-L/14 state dict: {err}; pass dinov2_vitl14_pretrain.pth '
            '(--detector=dinov2 downloads it)') from None

#----------------------------------------------------------------------------
# NVIDIA's detector pickle, read with an allow-list of globals. A persistence record
# (`torch_utils.persistence._reconstruct_persistent_obj(meta)`) becomes a plain record whose
# `module_src` is dropped unread; tensors, containers and harmless numpy values are allowed.

def read_detector_pickle(f, name='pickle'):
    """Unpickle a detector pickle with the allow-list; returns the raw tree of records."""
    try:
        return restricted_load(f)
    except UnsafePickleError as err:
        raise DetectorError(f'{name}: {err}') from None
    except Exception as err:
        raise DetectorError(f'{name}: cannot be read as a detector pickle ({type(err).__name__}: {_first_line(err)}); '
            'the file may be damaged or truncated, delete it and download it again') from None

def is_torchscript_archive(data_or_path):
    """True for a `torch.jit.save` archive (bytes or a path): a zip with code/ and constants.pkl,
    unlike a `torch.save` zip, which holds data.pkl and data/ only."""
    if isinstance(data_or_path, (bytes, bytearray)):
        if bytes(data_or_path[:4]) != b'PK\x03\x04':
            return False
        return _zip_is_torchscript(io.BytesIO(data_or_path))
    with open_detector_file(data_or_path) as f:
        return _zip_is_torchscript(f)

def _zip_is_torchscript(f):
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith('/constants.pkl') for n in names) and any('/code/' in n for n in names)

# Every detector file is opened through this: a FIFO or a folder in its place is one error, not a hang.
def open_detector_file(path):
    return open_regular(path, 'give a detector file, or --detector=nvidia, pytorch-fid, dinov2 or digits',
        error=DetectorError)

def _find_archives(node, seen):
    """Every TorchScript archive (bytes) anywhere in an unpickled tree."""
    if id(node) in seen:
        return []
    seen.add(id(node))
    if isinstance(node, (bytes, bytearray)):
        return [bytes(node)] if is_torchscript_archive(node) else []
    if isinstance(node, (PersistentRecord, PlainObject)):
        return _find_archives(node.state, seen)
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in _find_archives(k, seen) + _find_archives(v, seen)]
    if isinstance(node, (list, tuple, set, frozenset)):
        return [a for v in node for a in _find_archives(v, seen)]
    return []

def _describe(node):
    return node.class_name if isinstance(node, PersistentRecord) else type(node).__name__

def _load_torchscript(data_or_path, name):
    """The TorchScript module of an archive (bytes) or a .pt file (a path)."""
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is how the detector was shipped
            warnings.simplefilter('ignore', DeprecationWarning)
            if isinstance(data_or_path, (bytes, bytearray)):
                return torch.jit.load(io.BytesIO(data_or_path), map_location='cpu')
            with open_detector_file(data_or_path) as f:
                return torch.jit.load(f, map_location='cpu')
    except DetectorError:
        raise
    except Exception as err:
        raise DetectorError(f'{name}: the TorchScript module cannot be loaded ({type(err).__name__}: {_first_line(err)})') from None

def torchscript_in_pickle(path, name=None):
    """The TorchScript archive (bytes) inside NVIDIA's detector pickle, without running the pickle's code."""
    name = name or os.path.basename(str(path))
    with open_detector_file(path) as f:
        tree = read_detector_pickle(f, name)
    try:
        archives = _find_archives(tree, set())
    except RecursionError:
        raise DetectorError(f'{name}: the pickle is nested too deeply to be a detector') from None
    if len(archives) != 1:
        raise DetectorError(f'{name}: expected one TorchScript module in the pickle (a {_describe(tree)}), found '
            f'{len(archives)}; pass the TorchScript inception-2015-12-05.pt or pytorch-fid weights with --detector')
    return archives[0]

#----------------------------------------------------------------------------
# Which TorchScript may run. SHA-256 of detector files known to be official ones, which run
# without trust=True. It starts empty: we have no verified copy of NVIDIA's files to hash, and
# the official pickle is trusted through the record of its download instead. Add a hash only
# after checking it against the file published by its authors.

TRUSTED_DETECTOR_SHA256 = {}

def check_trusted(local, name, trust=False, official=False):
    """Refuse, before any of it runs, a TorchScript detector file that nobody vouched for.
    official: `local` is the official download, just checked against its record by download_cached."""
    if trust or official:  # the bytes received over HTTPS from the official URL, unchanged
        return
    digest = file_sha256(local)
    if digest in TRUSTED_DETECTOR_SHA256:
        return
    raise DetectorError(f'{name}: this TorchScript detector runs code from the file (which can create and change files), '
        f'and the file (SHA-256 {digest[:16]}...) is not a known official detector; pass --trust-detector if you trust '
        'the file and its source, or use --detector=nvidia (downloaded from its official URL) or --detector=pytorch-fid')

#----------------------------------------------------------------------------
# One entry point: a URL, a path or an alias ('nvidia', 'pytorch-fid', 'dinov2', 'digits'); the
# file's content, not its name, decides how it is read.

_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)

def load_detector(spec=None, device='cpu', verbose=True, trust=False):
    """A `Detector` from a URL/path/alias; None = NVIDIA's Inception pickle (downloaded once into the cache).
    trust: run a TorchScript file's code even if check_trusted cannot vouch for the file."""
    if spec == 'digits':  # the small classifier of the embedded digits dataset (FD-digits)
        from training.evaluation import digits
        return Detector(digits.load_classifier(), 'digits', device, dict(return_features=True), digits.FEATURE_DIM,
            metric='fd_digits')
    spec = ALIASES.get(spec or 'nvidia', spec)
    name = os.path.basename(str(spec))
    official = spec == NVIDIA_INCEPTION_URL  # the one file whose TorchScript runs without trust
    try:  # an official download is fetched again unless the cached file matches its record
        local = download_cached(spec, verbose=verbose, verify=spec in (NVIDIA_INCEPTION_URL, DINOV2_URL))
    except (FileNotFoundError, IOError) as err:
        raise DetectorError(f'detector {err}') from None
    with open_detector_file(local) as f:
        head = f.read(64)
    call_kwargs, feature_dim, metric = {}, None, 'fid'
    # inception-2015-12-05.pt, or any TorchScript called the same way
    if head.startswith(b'PK\x03\x04') and is_torchscript_archive(local):
        check_trusted(local, name, trust, official)
        net, call_kwargs = _load_torchscript(local, name), dict(return_features=True)
    elif head.startswith(b'PK\x03\x04') or head.startswith(_LEGACY_TORCH_MAGIC):  # torch.save: a state dict
        state = read_state_dict(local, name)
        if spec == DINOV2_URL or is_dinov2_state(state):
            net, metric = load_dinov2(state, name), 'fd_dinov2'
            feature_dim = net.vit.dim
        else:
            net, feature_dim = fid_inception_from_state(state, name), 2048
    elif head[:1] == b'\x80':  # a plain pickle: NVIDIA's detector
        archive = torchscript_in_pickle(local, name)
        check_trusted(local, name, trust, official)
        net, call_kwargs = _load_torchscript(archive, name), dict(return_features=True)
    else:
        raise DetectorError(f'{name}: not a detector file (NVIDIA inception-2015-12-05.pkl/.pt, {WEIGHTS_FILES})')
    try:
        return Detector(net, name, device, call_kwargs, feature_dim, metric)
    except DetectorError:
        raise
    except Exception as err:
        raise DetectorError(f'{name}: the detector fails on a test image ({type(err).__name__}: {_first_line(err)})') from None

#----------------------------------------------------------------------------
