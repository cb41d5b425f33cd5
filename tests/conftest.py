"""Shared fixtures: tiny datasets written inside the test."""

import io
import json
import os
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
