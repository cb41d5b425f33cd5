"""Shared fixtures: tiny datasets written inside the test, tiny denoisers, the exact Gaussian
denoiser, and the command-line helpers. Test modules use these through fixtures and never
import one another."""

import io
import math
import json
import os
import socket
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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

def tiny_denoiser(name='FDM_EDMPrecond', img_resolution=8, img_channels=3, label_dim=4, model_channels=8,
        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0, wake=0.05, seed=0, **kwargs):
    """A seeded tiny denoiser in eval mode. wake: noise added to every parameter, so that the
    zero-initialised output layers are not zero and F (hence the sampler) matters; 0 leaves
    the initialisation as it is. iDDPMPrecond gets the DhariwalUNet, as in the reference."""
    import warnings
    from fdm.preconditioning import IgnoredOptionWarning, build_precond
    kwargs.setdefault('model_type', 'DhariwalUNet' if name == 'iDDPMPrecond' else 'SongUNet')
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', IgnoredOptionWarning)
        net = build_precond(name, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
            attn_resolutions=list(attn_resolutions), dropout=dropout, **kwargs)
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
