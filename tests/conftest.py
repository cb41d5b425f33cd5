"""Shared fixtures: tiny datasets written inside the test, tiny denoisers, the exact Gaussian
denoiser, the command-line helpers, FID's stand-in detector and image folders, and the fuzzing
settings. Test modules use these through fixtures and never import one another."""

import functools
import io
import math
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests choose their thread counts themselves (the one_thread fixture, OMP_NUM_THREADS in
# subprocesses): the command lines' automatic choice from the load average would differ from
# one test to the next, and with it the last bits of float results that tests compare.
os.environ.setdefault('OMP_NUM_THREADS', str(torch.get_num_threads()))

def write_image_zip(path, num_images=16, resolution=8, channels=3, num_classes=4, seed=0):
    """A dataset zip in the reference layout, with dataset.json labels if num_classes."""
    rng = np.random.RandomState(seed)
    labels = []
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(num_images):
            shape = (resolution, resolution, channels) if channels > 1 else (resolution, resolution)
            img = (rng.rand(*shape) * 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format='PNG')
            name = f'{i // 1000:05d}/img{i:08d}.png'
            z.writestr(name, buf.getvalue())
            labels.append([name, i % num_classes] if num_classes else None)
        if num_classes:
            z.writestr('dataset.json', json.dumps(dict(labels=labels)))
    return str(path)

@pytest.fixture
def tiny_zip(tmp_path):
    return write_image_zip(tmp_path / 'tiny.zip')

@pytest.fixture
def one_thread():
    # The test machine is shared: one intra-op thread is far faster than two contended ones.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# A TCP port nobody listens on now, for a MASTER_PORT (another process may still take it first).
def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

# train.py in this process; its result for one_line_error.
def run_train_cli(*args):
    from click.testing import CliRunner
    import train
    return CliRunner().invoke(train.main, [str(a) for a in args])

def one_line_error(result):
    """The single 'Error' line of a failed command, which must print no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and 'Traceback' not in result.output, result.output
    return lines[0]

#----------------------------------------------------------------------------
# Tiny denoisers: a real preconditioner around a U-Net of a few channels (8x8 images).

def tiny_denoiser(name='FDM_EDMPrecond', img_resolution=8, img_channels=3, label_dim=4, wake=0.05, seed=0, **kwargs):
    """A seeded tiny denoiser in eval mode. wake: noise added to every parameter, so that the
    zero-initialised output layers are not zero and F (hence the sampler) matters; 0 leaves
    the initialisation as it is. iDDPMPrecond gets the DhariwalUNet, as in the reference. kwargs:
    the network's options; a U-Net of 8 channels at two resolutions, attention at 4x4, unless given."""
    import warnings
    from fdm.preconditioning import IgnoredOptionWarning, build_precond
    kwargs = dict(dict(model_type='DhariwalUNet' if name == 'iDDPMPrecond' else 'SongUNet', model_channels=8,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0), **kwargs)
    kwargs.update(channel_mult=list(kwargs['channel_mult']), attn_resolutions=list(kwargs['attn_resolutions']))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', IgnoredOptionWarning)
        net = build_precond(name, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **kwargs)
    if wake:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * wake)
    return net.eval()

@pytest.fixture(scope='session')
def make_tiny_net():
    """The tiny_denoiser factory: make_tiny_net(label_dim=0, img_channels=1, ...)."""
    return tiny_denoiser

#----------------------------------------------------------------------------
# Data ~ N(0, s_d^2) has the exact denoiser D(x; sigma) = x s_d^2 / (s_d^2 + sigma^2), and the
# probability flow ODE maps x(sigma_a) to x(sigma_b) = x(sigma_a) sqrt(sigma_b^2 + s_d^2) / sqrt(sigma_a^2 + s_d^2).

class GaussianDenoiser:
    """The exact denoiser of N(0, s_d^2) data, recording the sigma of every call."""
    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, s_d=0.5, sigma_min=None, sigma_max=None):
        self.s_d = s_d
        self.sigmas = []
        if sigma_min is not None:
            self.sigma_min = sigma_min
        if sigma_max is not None:
            self.sigma_max = sigma_max

    @property
    def calls(self):
        return len(self.sigmas)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def exact_flow(self, x, sigma_a, sigma_b):
        return x * math.sqrt(sigma_b ** 2 + self.s_d ** 2) / math.sqrt(sigma_a ** 2 + self.s_d ** 2)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return x * self.s_d ** 2 / (self.s_d ** 2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)

@pytest.fixture(scope='session')
def gaussian_denoiser():
    """The GaussianDenoiser class: gaussian_denoiser(s_d=0.5, sigma_min=..., sigma_max=...)."""
    return GaussianDenoiser

#----------------------------------------------------------------------------
# FID (tests/test_fid*.py): image folders and a tiny TorchScript detector with the reference calling
# convention (uint8 images, return_features=True). Its 12 features are the 2x2 average pools of each
# channel in [0, 1], which the tests recompute independently with numpy.

class TinyDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.to(torch.float32) / 255, 2).flatten(1)

def tiny_detector_bytes():
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit is deprecated; NVIDIA's detector is TorchScript nonetheless
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyDetector()), buf)
    return buf.getvalue()

@pytest.fixture
def detector_file(tmp_path):
    path = tmp_path / 'tiny-detector.pt'
    path.write_bytes(tiny_detector_bytes())
    return str(path)

def write_folder(path, num, resolution=8, channels=3, seed=0, start=0):
    rng = np.random.RandomState(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(start, start + num):
        shape = (resolution, resolution, channels) if channels > 1 else (resolution, resolution)
        PIL.Image.fromarray(rng.randint(0, 256, size=shape).astype(np.uint8)).save(os.path.join(path, f'{i:06d}.png'))
    return str(path)

def numpy_features(folder):
    """[N, 12] features of the tiny detector, from the PNGs in sorted order, by plain numpy."""
    feats = []
    for name in sorted(os.listdir(folder)):
        img = np.asarray(PIL.Image.open(os.path.join(folder, name)), dtype=np.float64) / 255
        img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img  # grayscale as RGB
        h, w, c = img.shape
        pooled = img.reshape(2, h // 2, 2, w // 2, c).mean(axis=(1, 3))  # [2, 2, C]
        feats.append(pooled.transpose(2, 0, 1).reshape(-1))  # channel-major like flatten(1) of NCHW
    return np.stack(feats)

def numpy_stats(features):
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)

def write_and_features(folder, num):
    return numpy_features(write_folder(folder, num, seed=11))

def run_fid_cli(*args):
    """fid.py with these arguments. A --detector here is the test's own TorchScript file (or a
    hostile pickle, refused all the same), so it is trusted (tests/evaluation/test_detector_policy.py)."""
    from click.testing import CliRunner
    import fid
    args = [str(a) for a in args]
    return CliRunner().invoke(fid.main, args + (['--trust-detector'] if '--detector' in args else []))

def fid_line(result):
    """The last line of the command's output that reports an FID (tqdm's bar goes to stderr)."""
    return [line for line in result.stdout.splitlines() if line.startswith("FID ")][-1]

def assert_user_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    message = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(message) == 1, result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]
    return message[0]

# Files that would make fid.py allocate more than they hold: a child process under an address-space
# limit must stop with one line and status 1 (measured: a valid tiny `calc` runs within 1 GiB).
ADDRESS_SPACE_LIMIT = 3 << 30

def run_fid_limited(*args):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'fid.py', *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, preexec_fn=limit)

def assert_one_line_exit_1(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith('Error:'), proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

#----------------------------------------------------------------------------
# Fuzzing (tests/test_fuzz*.py): each test runs FDM_FUZZ_EXAMPLES examples (default 100, a fixed,
# derandomized sequence so CI is reproducible; setting the variable also randomizes them).

FUZZ_EXAMPLES = int(os.environ.get('FDM_FUZZ_EXAMPLES', '100'))
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize='FDM_FUZZ_EXAMPLES' not in os.environ,
    report_multiple_bugs=False, suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])

# No hang: an example that runs longer than this fails instead of stalling the suite.
EXAMPLE_LIMIT_S = 60

def no_hang(fn):
    @functools.wraps(fn)
    def bounded(*args, **kwargs):
        def expire(*_):
            raise TimeoutError(f'one example ran for more than {EXAMPLE_LIMIT_S} s')
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, EXAMPLE_LIMIT_S)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return bounded

# Byte-level damage to a valid file: overwritten, inserted and deleted bytes, then perhaps a truncation.
@st.composite
def damaged(draw, raw):
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(['set', 'set', 'xor', 'insert', 'delete']))
        if op == 'set' and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 'xor' and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 'insert':
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos:pos + draw(st.integers(1, 16))]
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)

@pytest.fixture(scope='module')
def fuzz_dir(tmp_path_factory):
    """One folder per fuzzing module, shared by its examples (each overwrites its own files)."""
    return tmp_path_factory.mktemp('fuzz')

def write_file(path, data):
    with open(path, 'wb') as f:
        f.write(data)
    return str(path)
