"""A PNG grid of samples from the EMA network, written with each snapshot so a user can
watch the model learn. Fixed seeds and classes, so grids of one run are comparable."""

import math
import os
import tempfile

import numpy as np
import PIL.Image
import torch

from fdm.samplers import edm_sampler

#----------------------------------------------------------------------------
# Images [N, C, H, W] in [-1, 1] -> one uint8 grid of gw columns.

def images_to_grid(images, gw):
    n, c, h, w = images.shape
    gh = math.ceil(n / gw)
    images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()
    canvas = torch.zeros(c, gh * h, gw * w, dtype=torch.uint8)
    for i, img in enumerate(images):
        y, x = divmod(i, gw)
        canvas[:, y * h:(y + 1) * h, x * w:(x + 1) * w] = img
    canvas = canvas.permute(1, 2, 0).numpy()  # [H, W, C]
    return canvas[:, :, 0] if c == 1 else canvas

def save_png_atomic(array, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp-', suffix='.png')
    os.close(fd)
    try:
        PIL.Image.fromarray(np.ascontiguousarray(array)).save(tmp, format='PNG')
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

@torch.no_grad()
def save_sample_grid(path, net, num_images, device, num_steps=18, seed=0):
    """Sample `num_images` from `net` (class i % label_dim for image i) and save a grid PNG."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn([num_images, net.img_channels, net.img_resolution, net.img_resolution], generator=g).to(device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[torch.arange(num_images) % net.label_dim]
    # The sampler's own noise is unused without churn; a local generator keeps the
    # training RNG untouched.
    randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g).to(x.device)
    images = edm_sampler(net, latents, labels, randn_like=randn_like, num_steps=num_steps)
    gw = net.label_dim if 0 < net.label_dim <= num_images else max(int(math.sqrt(num_images)), 1)
    save_png_atomic(images_to_grid(images, gw), path)
