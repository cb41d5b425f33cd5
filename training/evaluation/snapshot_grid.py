"""A PNG grid of samples from the EMA network, written with each snapshot so a user can
watch the model learn. Fixed seeds and classes, so grids of one run are comparable. It is a
preview, not an evaluation: 8 EDM Heun steps (15 network evaluations per image, against 35 for
generate.py's default), which on a CPU cost several times less and still show what the model
has learned; the training loop reports its time apart from the rest of the maintenance."""

import math

import torch

from fdm.samplers import edm_sampler
from training.evaluation.generation import GRID_MIN_WIDTH, make_grid, save_png, to_uint8

#----------------------------------------------------------------------------

@torch.no_grad()
def save_sample_grid(path, net, num_images, device, num_steps=8, seed=0, min_width=GRID_MIN_WIDTH):
    """Sample about `num_images` from `net` (class i % label_dim for image i) and save a grid PNG
    with one column per class, whole rows of classes (a square grid for unconditional nets),
    upscaled to min_width. Returns the number of images."""
    if 0 < net.label_dim <= num_images:
        num_images -= num_images % net.label_dim  # whole rows: no blank cells
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
    save_png(make_grid(to_uint8(images), gw, min_width), path)
    return num_images
