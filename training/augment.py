"""Non-leaking image augmentation with augmentation labels (EDM/FDM `AugmentPipe`, as in NVlabs/edm).

The transforms are those of Karras et al. 2020, "Training Generative Adversarial Networks
with Limited Data" (ADA), Appendix B: pixel blitting, then one combined geometric warp
(reflect padding, 2x sym6 upsampling, bilinear sampling, sym6 downsampling), then one
combined colour matrix. Each transform is applied to each image with probability
`multiplier * p`; the network is told what was done through a label vector, so it can learn
the clean distribution while seeing augmented images. All randomness comes from torch's
global generator on the images' device.
"""

import math

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Daubechies' least-asymmetric wavelet with 6 vanishing moments ("sym6"): the decomposition
# low-pass filter as tabulated by PyWavelets (`pywt.Wavelet('sym6').dec_lo`) and MATLAB
# (`wfilters('sym6')`). Orthonormal: sum = sqrt(2), sum of squares = 1, even shifts orthogonal.

SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)

#----------------------------------------------------------------------------
# Batched 3x3 homogeneous matrices [N, 3, 3] acting on (x, y, 1) with x to the right and
# y downwards, in pixels from the image centre.

def _affine(a, b, c, d, tx, ty):
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).reshape(-1, 3, 3)

def _translate(tx, ty):
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _affine(one, zero, zero, one, tx, ty)

def _scale(sx, sy):
    zero = torch.zeros_like(sx)
    return _affine(sx, zero, zero, sy, zero, zero)

def _rotate(theta):
    zero = torch.zeros_like(theta)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), zero, zero)

#----------------------------------------------------------------------------
# Separable 2x resampling with an orthonormal filter h (length K, K even). Sample k of the
# upsampled signal sits at position k/2 of the original: up[k] = sqrt2 * sum_j x[j] h[k - 2j + K/2 - 1],
# and down[i] = sum_k h[k - 2i + K/2 - 1] v[k] / sqrt2, so down(up(x)) == x exactly (the
# orthogonality of h at even shifts). Both act on dim 3 (W) then dim 2 (H).

def _upsample2x(x, h):
    C = x.shape[1]
    K = h.numel()
    w = (h * math.sqrt(2)).to(x.dtype).reshape(1, 1, 1, K).repeat(C, 1, 1, 1) # [C, 1, 1, K]
    x = F.conv_transpose2d(x, w, stride=(1, 2), padding=(0, K // 2 - 1), groups=C) # [N, C, H, 2W]
    x = F.conv_transpose2d(x, w.transpose(2, 3), stride=(2, 1), padding=(K // 2 - 1, 0), groups=C) # [N, C, 2H, 2W]
    return x

# Expects v to hold the upsampled-grid samples k = -(K/2 - 1) ... 2n + K/2 - 1 along each axis.
def _downsample2x(v, h):
    C = v.shape[1]
    K = h.numel()
    w = (h / math.sqrt(2)).to(v.dtype).reshape(1, 1, 1, K).repeat(C, 1, 1, 1)
    v = F.conv2d(v, w, stride=(1, 2), groups=C)
    v = F.conv2d(v, w.transpose(2, 3), stride=(2, 1), groups=C)
    return v

#----------------------------------------------------------------------------
# Warp images [N, C, H, W] so that output pixel x shows input position G_inv @ x (both in
# centred pixel coordinates). Padding, 2x upsampling, bilinear sampling at the output's 2x
# grid and 2x downsampling, so the bilinear step acts on an oversampled, alias-free image.

def _warp(images, G_inv):
    N, C, H, W = images.shape
    device, dtype = images.device, images.dtype
    h = torch.tensor(SYM6, dtype=torch.float32, device=device)
    K = h.numel()
    half = K // 2 - 1 # upsampled samples each output pixel needs on either side, minus one

    # Reflect-pad by the most reflection allows (W - 1, H - 1), not by what this batch's corners
    # reach: a pad that depends on the random matrices would need their values on the host, a
    # GPU->CPU synchronisation every training step. The samples the warp reads lie inside either
    # pad and reflection gives them the same values: only rounding differs (measured: 1.4e-5 at most
    # on [-1, 1] images at 32x32, against the data-dependent pad; a uint8 level is 7.8e-3).
    cx, cy = (W - 1) / 2, (H - 1) / 2
    pad_lo = pad_hi = [W - 1, H - 1]
    images = F.pad(images, [pad_lo[0], pad_hi[0], pad_lo[1], pad_hi[1]], mode='reflect')
    Hp, Wp = images.shape[2:]

    up = _upsample2x(images, h) # [N, C, 2Hp, 2Wp]

    # Output positions (centred pixels) of the upsampled-grid samples the downsampler needs.
    kx = torch.arange(-half, 2 * W + half, device=device, dtype=G_inv.dtype)
    ky = torch.arange(-half, 2 * H + half, device=device, dtype=G_inv.dtype)
    gy, gx = torch.meshgrid(ky / 2 - cy, kx / 2 - cx, indexing='ij')
    out_pts = torch.stack([gx, gy, torch.ones_like(gx)]).reshape(3, -1) # [3, Hs * Ws]
    in_pts = G_inv[:, :2, :] @ out_pts # [N, 2, Hs * Ws]

    # Input position -> index in `up` (2 * padded index) -> grid_sample's [-1, 1] range.
    ux = 2 * (in_pts[:, 0] + cx + pad_lo[0])
    uy = 2 * (in_pts[:, 1] + cy + pad_lo[1])
    grid = torch.stack([(2 * ux + 1) / (2 * Wp) - 1, (2 * uy + 1) / (2 * Hp) - 1], dim=-1)
    grid = grid.reshape(N, ky.numel(), kx.numel(), 2).to(dtype)
    warped = F.grid_sample(up, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _downsample2x(warped, h) # [N, C, H, W]

#----------------------------------------------------------------------------
# Rotation by theta [N] about the unit axis v [3] (Rodrigues), as a [N, 4, 4] homogeneous matrix.

def _rotate3d(v, theta):
    N = theta.shape[0]
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    cross = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=theta.dtype, device=theta.device)
    outer = torch.outer(v, v).to(device=theta.device, dtype=theta.dtype)
    R = c * torch.eye(3, device=theta.device) + s * cross + (1 - c) * outer
    M = torch.eye(4, device=theta.device).repeat(N, 1, 1)
    M[:, :3, :3] = R
    return M

#----------------------------------------------------------------------------

class AugmentPipe:
    def __init__(self, p=0,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1,
    ):
        self.init_kwargs = {key: float(value) for key, value in dict(p=p,
            xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int, translate_int_max=translate_int_max,
            scale=scale, rotate_frac=rotate_frac, aniso=aniso, translate_frac=translate_frac, scale_std=scale_std,
            rotate_frac_max=rotate_frac_max, aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
            brightness_std=brightness_std, contrast_std=contrast_std, hue_max=hue_max, saturation_std=saturation_std).items()}
        self.p                  = self.init_kwargs['p']                  # Overall multiplier of every probability.
        # Pixel blitting.
        self.xflip              = self.init_kwargs['xflip']              # Probability multiplier for x-flip.
        self.yflip              = self.init_kwargs['yflip']              # Probability multiplier for y-flip.
        self.rotate_int         = self.init_kwargs['rotate_int']         # Probability multiplier for rotation by k * 90 degrees.
        self.translate_int      = self.init_kwargs['translate_int']      # Probability multiplier for integer translation.
        self.translate_int_max  = self.init_kwargs['translate_int_max']  # Its range, relative to the image size.
        # Geometric transformations.
        self.scale              = self.init_kwargs['scale']              # Probability multiplier for isotropic scaling.
        self.rotate_frac        = self.init_kwargs['rotate_frac']        # Probability multiplier for arbitrary rotation.
        self.aniso              = self.init_kwargs['aniso']              # Probability multiplier for anisotropic scaling.
        self.translate_frac     = self.init_kwargs['translate_frac']     # Probability multiplier for fractional translation.
        self.scale_std          = self.init_kwargs['scale_std']          # Log2 std of isotropic scaling.
        self.rotate_frac_max    = self.init_kwargs['rotate_frac_max']    # Rotation range, 1 = full circle.
        self.aniso_std          = self.init_kwargs['aniso_std']          # Log2 std of anisotropic scaling.
        self.aniso_rotate_prob  = self.init_kwargs['aniso_rotate_prob']  # Probability of scaling along a rotated frame.
        self.translate_frac_std = self.init_kwargs['translate_frac_std'] # Std of fractional translation, relative to the image size.
        # Colour transformations.
        self.brightness         = self.init_kwargs['brightness']         # Probability multiplier for brightness.
        self.contrast           = self.init_kwargs['contrast']           # Probability multiplier for contrast.
        self.lumaflip           = self.init_kwargs['lumaflip']           # Probability multiplier for luma flip.
        self.hue                = self.init_kwargs['hue']                # Probability multiplier for hue rotation.
        self.saturation         = self.init_kwargs['saturation']         # Probability multiplier for saturation.
        self.brightness_std     = self.init_kwargs['brightness_std']     # Std of brightness offset.
        self.contrast_std       = self.init_kwargs['contrast_std']       # Log2 std of contrast.
        self.hue_max            = self.init_kwargs['hue_max']            # Hue rotation range, 1 = full circle.
        self.saturation_std     = self.init_kwargs['saturation_std']     # Log2 std of saturation.

    # Width of the label vector: entries of every enabled transform, in the order of __call__.
    @property
    def label_dim(self):
        widths = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2, translate_frac=2,
            brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
        return sum(width for name, width in widths.items() if getattr(self, name) > 0)

    def __repr__(self):
        return f'AugmentPipe({", ".join(f"{k}={v:g}" for k, v in self.init_kwargs.items())})'

    # Images [N, C, H, W] in [-1, 1] -> (augmented images, float32 labels [N, label_dim]).
    # Labels concatenate, per enabled transform: xflip bit; yflip bit; rotate_int bits
    # (k in {1, 2}, k in {2, 3}); translate_int (tx, ty) / (size * max); scale w; rotate_frac
    # (cos - 1, sin); aniso (w cos r, w sin r); translate_frac (wx, wy); brightness w;
    # contrast w; lumaflip bit; hue (cos - 1, sin); saturation w. A transform that was not
    # applied to an image contributes zeros.
    def __call__(self, images):
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Draw `value`, then keep it where a uniform draw falls below `prob` (zero elsewhere).
        def keep(value, prob, mask_shape=None):
            mask = torch.rand(mask_shape or value.shape, device=device) < prob
            return torch.where(mask, value, torch.zeros_like(value))

        # Pixel blitting: exact permutations of the pixels.
        if self.xflip > 0:
            w = keep(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip * self.p)
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = keep(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip * self.p)
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:
            if H != W:
                raise ValueError(f'rotate_int needs square images, got {H}x{W}')
            w = keep(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int * self.p)
            for k in (1, 2, 3): # counter-clockwise by k * 90 degrees
                images = torch.where(w == k, torch.rot90(images, k, dims=(2, 3)), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = keep(torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1, self.translate_int * self.p, [1, N, 1, 1, 1])
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64) # [N, 1, 1, 1]
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            # Source index with mirror reflection (period 2n - 2). As in the reference, the
            # content moves by +tx along x but by -ty along y.
            def mirror(i, n):
                return n - 1 - (n - 1 - i % (2 * n - 2)).abs()
            xs = mirror(torch.arange(W, device=device) - tx, W).expand(N, C, H, W)
            ys = mirror(torch.arange(H, device=device)[:, None] + ty, H).expand(N, C, H, W)
            images = images.gather(3, xs).gather(2, ys)
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # Geometric transformations, composed into one inverse matrix: output -> input.
        G_inv = None
        def then(M):
            return M if G_inv is None else G_inv @ M
        if self.scale > 0:
            w = keep(torch.randn([N], device=device), self.scale * self.p)
            s = w.mul(self.scale_std).exp2()
            G_inv = then(_scale(1 / s, 1 / s))
            labels += [w]
        if self.rotate_frac > 0:
            w = keep((torch.rand([N], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac * self.p)
            G_inv = then(_rotate(w))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * math.pi
            w = keep(w, self.aniso * self.p)
            r = keep(r, self.aniso_rotate_prob)
            s = w.mul(self.aniso_std).exp2()
            G_inv = then(_rotate(-r) @ _scale(1 / s, s) @ _rotate(r))
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = keep(torch.randn([2, N], device=device), self.translate_frac * self.p, [1, N])
            G_inv = then(_translate(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std)))
            labels += [w[0], w[1]]
        # Every image goes through the warp once any geometric transform is enabled, as in the
        # reference; for an image left alone the resampling is the identity up to rounding.
        if G_inv is not None:
            images = _warp(images, G_inv)

        # Colour transformations, composed into one [N, 4, 4] matrix acting on (r, g, b, 1).
        M = None
        I_4 = torch.eye(4, device=device)
        luma = torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=device) / math.sqrt(3)
        luma_outer = torch.outer(luma, luma) # projection onto the grey axis
        def after(T):
            return T if M is None else T @ M
        if self.brightness > 0:
            w = keep(torch.randn([N], device=device), self.brightness * self.p)
            T = I_4.repeat(N, 1, 1)
            T[:, :3, 3] = (w * self.brightness_std)[:, None]
            M = after(T)
            labels += [w]
        if self.contrast > 0:
            w = keep(torch.randn([N], device=device), self.contrast * self.p)
            c = w.mul(self.contrast_std).exp2()
            M = after(torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], dim=1)))
            labels += [w]
        if self.lumaflip > 0:
            w = keep(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p)
            M = after(I_4 - 2 * luma_outer * w) # mirror across the plane orthogonal to grey
            labels += [w]
        if self.hue > 0:
            w = keep((torch.rand([N], device=device) * 2 - 1) * (math.pi * self.hue_max), self.hue * self.p)
            M = after(_rotate3d(luma[:3], w))
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = keep(torch.randn([N, 1, 1], device=device), self.saturation * self.p)
            chroma = (I_4 - luma_outer) * w.mul(self.saturation_std).exp2()
            chroma[:, 3, 3] = 1 # keep the homogeneous coordinate
            M = after(luma_outer + chroma)
            labels += [w]
        if M is not None:
            M = M.to(images.dtype)
            flat = images.reshape(N, C, H * W)
            if C == 3:
                flat = M[:, :3, :3] @ flat + M[:, :3, 3:]
            elif C == 1: # treat grey as (v, v, v) and average the transformed channels
                M1 = M[:, :3, :].mean(dim=1, keepdim=True) # [N, 1, 4]
                flat = flat * M1[:, :, :3].sum(dim=2, keepdim=True) + M1[:, :, 3:]
            else:
                raise ValueError(f'colour augmentation needs 1 or 3 channels, got {C}')
            images = flat.reshape(N, C, H, W)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

#----------------------------------------------------------------------------
