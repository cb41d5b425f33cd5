"""Shared fixtures: tiny datasets written inside the test."""

import io
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
