"""DINOv2 ViT-L/14 (Oquab et al. 2023) as the feature detector of FD-DINOv2 (Stein et al. 2023),
the second metric of EDM2 (Karras et al. 2024).

Our own implementation of the network behind `dinov2_vitl14`, with the parameter names of the
official `dinov2_vitl14_pretrain.pth` so that the published weights load strictly by name (the
reference loads the network through torch.hub, which runs the hub repository's code; we only
read tensors). The feature is the network's default output, the class token after the final
LayerNorm (1024-d), of images preprocessed as EDM2 does (`preprocess`).

The architecture: 14x14 patches embedded by a strided convolution, a class token, a position
embedding learned for a 37x37 grid (518x518 images) and interpolated to the input's grid
(`interpolate_pos_embed`), 24 pre-norm blocks of 16-head attention and a GELU MLP (ratio 4), each
branch scaled by a learned per-channel LayerScale, LayerNorm with eps 1e-6 throughout; no
register tokens. Loading and checking the weights file is training/evaluation/inception.py's.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# dinov2_vitl14: patch 14, width 1024, 24 blocks of 16 heads, position embedding for 37x37 patches.
VITL14 = dict(patch_size=14, dim=1024, depth=24, num_heads=16, pos_grid=37, mlp_ratio=4)

RESOLUTION = 224  # EDM2 resizes every image to 224x224 (a 16x16 grid of patches)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # DINO's offset on the target grid in the position-embedding interpolation

#----------------------------------------------------------------------------
# EDM2's preprocessing (calculate_metrics.py, resize_mode='torch', its default).

def preprocess(images):
    """uint8 [N, 3, H, W] in 0..255 -> float32 [N, 3, 224, 224]: antialiased bicubic resize of the
    0..255 values (no rounding or clamping), then /255 and ImageNet's mean and std per channel."""
    x = F.interpolate(images.to(torch.float32), size=(RESOLUTION, RESOLUTION), mode='bicubic', antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std

#----------------------------------------------------------------------------
# The position embedding, learned for an M x M grid, on another grid. DINOv2 (as DINO before it)
# passes interpolate a scale factor (h + 0.1) / M rather than the size h: the output size is the
# same, floor(h + 0.1) = h, but the scale also sets where each output samples the input, so the
# offset changes the values and is kept for the published weights. Bicubic, not antialiased (the
# setting of the models without registers); the embedding is used as learned when the grid is M x M.

def interpolate_pos_embed(pos_embed, grid, offset=POS_OFFSET):
    """[1, 1 + M*M, D] -> [1, 1 + h*w, D] for a patch grid (h, w); the class token's entry is kept."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, D, M, M]
    patches = F.interpolate(patches.float(), scale_factor=((h + offset) / m, (w + offset) / m), mode='bicubic',
        antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, D, h, w] -> [1, h*w, D], row by row
    return torch.cat([pos_embed[:, :1], patches.to(pos_embed.dtype)], dim=1)

#----------------------------------------------------------------------------
# The layers, named as in the official state dict.

class PatchEmbed(nn.Module):
    """Non-overlapping patches, each projected to `dim` channels: [N, C, H, W] -> [N, dim, H/p, W/p]."""
    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)

class Attention(nn.Module):
    """Multi-head self-attention softmax(q k^T / sqrt(d)) v with one qkv projection (with bias).
    scaled_dot_product_attention computes the same product with a fused kernel that never holds
    the [N, heads, T, T] weights; it differs from the explicit product by float rounding only."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        # [N, T, 3D] -> 3 x [N, heads, T, D/heads]: q, k, v in that order, each split into heads.
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # heads back side by side: [N, T, D]

class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT's LayerScale)."""
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU

class Block(nn.Module):
    """Pre-norm transformer block, both residual branches scaled by LayerScale."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

#----------------------------------------------------------------------------

class DINOv2ViT(nn.Module):
    """DINOv2's vision transformer: normalised images [N, C, H, W] (H and W multiples of the patch
    size) -> the final-norm class token [N, dim]. VITL14 is dinov2_vitl14; tests build tiny ones."""
    def __init__(self, patch_size, dim, depth, num_heads, pos_grid, mlp_ratio=4, in_channels=3):
        super().__init__()
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # the learned values come from the weights file
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # replaces masked patches in training; in the file, unused here
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)  # [N, D, h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, D], patches row by row
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1 + h*w, D]
        x = x + interpolate_pos_embed(self.pos_embed, grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # LayerNorm acts per token: the class token's alone is the same

class DINOv2Features(nn.Module):
    """The FD-DINOv2 detector network: uint8 images [N, 3, H, W] -> features [N, dim] (EDM2's
    preprocessing, then the ViT)."""
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit(preprocess(images))

#----------------------------------------------------------------------------
# From a state dict: the names and shapes must be exactly those of the configuration (VITL14 for
# the official weights), checked before anything is loaded.

def build(config=None, device=None):
    """DINOv2ViT of a configuration (None = VITL14); device='meta' makes it without memory."""
    with torch.device(device or 'cpu'):
        return DINOv2ViT(**(config or VITL14))

def state_mismatch(state, config=None):
    """None if `state` (a dict) holds exactly the floating-point tensors of the configuration's
    state dict, by name and shape; otherwise the first difference, in words."""
    expected = build(config, device='meta').state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        return f'{missing[0]} is missing' + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f'{unexpected[0]!r} is not a parameter of the network' + (
            f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else '')
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or not value.dtype.is_floating_point:
            what = f'a {value.dtype} tensor' if isinstance(value, torch.Tensor) else type(value).__name__
            return f'{key} is {what}, not a dense floating-point tensor'
        if value.shape != ref.shape:
            return f'{key} is {list(value.shape)}, expected {list(ref.shape)}'
    return None

def from_state_dict(state, config=None):
    """DINOv2Features with the weights of a state dict; ValueError naming the first mismatch.
    The network is made on the meta device and takes the file's tensors as they are (as float32):
    no memory for random weights that would be overwritten at once."""
    problem = state_mismatch(state, config)
    if problem is not None:
        raise ValueError(problem)
    vit = build(config, device='meta')
    vit.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    return DINOv2Features(vit)

#----------------------------------------------------------------------------
