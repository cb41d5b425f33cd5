"""AugmentPipe: identities, exact pixel blits, and label meanings measured on synthetic images."""

import json
import math

import numpy as np
import pytest
import torch

from training.augment import SYM6, AugmentPipe, _warp

PRESET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # train.py with --augment

def random_images(n=8, c=3, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([n, c, res, res], generator=g) * 2 - 1

# Gaussian blobs [N, C, res, res] with covariance diag(sx^2, sy^2) about the image centre.
def blob(n, res=32, sx=3.0, sy=3.0, c=1):
    pos = torch.arange(res, dtype=torch.float64) - (res - 1) / 2
    y, x = torch.meshgrid(pos, pos, indexing='ij')
    image = torch.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2)).float()
    return image.expand(n, c, res, res).clone()

# Centroid (x, y) and covariance [[xx, xy], [xy, yy]] per image, in centred pixel units.
def moments(images):
    res = images.shape[-1]
    pos = torch.arange(res, dtype=torch.float64) - (res - 1) / 2
    y, x = torch.meshgrid(pos, pos, indexing='ij')
    w = images[:, 0].double().clamp(min=0)
    total = w.sum(dim=(1, 2))
    mx, my = (w * x).sum(dim=(1, 2)) / total, (w * y).sum(dim=(1, 2)) / total
    dx, dy = x - mx[:, None, None], y - my[:, None, None]
    cov = lambda a, b: (w * a * b).sum(dim=(1, 2)) / total
    return mx, my, cov(dx, dx), cov(dx, dy), cov(dy, dy)

def run(seed=0, images=None, **kwargs):
    torch.manual_seed(seed)
    return AugmentPipe(**kwargs)(random_images() if images is None else images)

#----------------------------------------------------------------------------

def test_sym6_is_an_orthonormal_wavelet_with_six_vanishing_moments():
    h = np.array(SYM6, dtype=np.float64)
    assert h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    for shift in range(0, 6):
        assert np.dot(h[: len(h) - 2 * shift], h[2 * shift:]) == pytest.approx(float(shift == 0), abs=1e-9)
    g = h[::-1] * (-1) ** np.arange(len(h)) # the matching high-pass filter
    k = np.arange(len(h), dtype=np.float64)
    for m in range(6):
        assert abs(np.dot(k ** m, g)) < 1e-6 * max(1.0, (k ** m).sum())

def test_no_transform_enabled_returns_input_and_empty_labels():
    x = random_images()
    y, labels = run(images=x, p=1)
    assert torch.equal(y, x) and labels.shape == (8, 0)

def test_preset_at_p0_is_identity_with_zero_labels():
    x = random_images()
    y, labels = run(images=x, p=0, **PRESET)
    assert labels.shape == (8, 9) and labels.dtype == torch.float32 and torch.all(labels == 0)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0) # resampling without a transform is the identity

def test_xflip_only_flips_exactly_where_labelled():
    x = random_images(n=32)
    y, labels = run(images=x, p=1, xflip=1)
    flipped = labels[:, 0] == 1
    assert labels.shape == (32, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])

def test_yflip_and_rotate_int_are_exact_and_labelled():
    x = random_images(n=32)
    y, labels = run(images=x, p=1, yflip=1, rotate_int=1)
    assert labels.shape == (32, 3)
    bits_to_k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(32):
        k = bits_to_k[(int(labels[i, 1]), int(labels[i, 2]))]
        seen.add(k)
        expected = x[i].flip(1) if labels[i, 0] == 1 else x[i]
        assert torch.equal(y[i], torch.rot90(expected, k, dims=(1, 2)))
    assert seen == {0, 1, 2, 3}

def test_translate_int_moves_content_with_reflection():
    x = random_images(n=16)
    y, labels = run(images=x, p=1, translate_int=1)
    tx = (labels[:, 0] * 16 * 0.125).round().long().tolist()
    ty = (labels[:, 1] * 16 * 0.125).round().long().tolist()
    assert any(tx) and any(ty) and max(map(abs, tx + ty)) <= 2
    padded = np.pad(x.numpy(), [(0, 0), (0, 0), (2, 2), (2, 2)], mode='reflect')
    for i in range(16): # content moves by +tx along x and by -ty along y (the reference's convention)
        expected = padded[i, :, 2 + ty[i]: 2 + ty[i] + 16, 2 - tx[i]: 2 - tx[i] + 16]
        np.testing.assert_array_equal(y[i].numpy(), expected)

def test_warp_by_whole_pixels_shifts_content():
    x = random_images(n=2, res=16)
    G_inv = torch.eye(3).repeat(2, 1, 1)
    G_inv[:, 0, 2], G_inv[:, 1, 2] = -3, 2 # output(x, y) = input(x - 3, y + 2)
    y = _warp(x, G_inv)
    torch.testing.assert_close(y[:, :, :14, 3:], x[:, :, 2:, :13], atol=1e-4, rtol=0)

def test_translate_frac_label_is_shift_over_eighth_of_size():
    x = blob(16, sx=2.5, sy=2.5)
    y, labels = run(images=x, p=1, translate_frac=1)
    mx, my, *_ = moments(y)
    tx, ty = labels[:, 0] * 0.125 * 32, labels[:, 1] * 0.125 * 32
    inside = (tx.abs() < 7) & (ty.abs() < 7) # blob well inside the frame
    assert inside.sum() >= 10
    torch.testing.assert_close(mx[inside], tx[inside].double(), atol=0.05, rtol=0)
    torch.testing.assert_close(my[inside], ty[inside].double(), atol=0.05, rtol=0)

# 64x64 so that zooming out does not bring the mirror images of the blob (reflect padding) into view.
def test_scale_label_w_means_scale_2_pow_0p2w():
    x = blob(16, res=64, sx=3.0, sy=3.0)
    y, labels = run(images=x, p=1, scale=1)
    _, _, xx, _, yy = moments(y)
    measured = torch.sqrt((xx + yy) / 2) / 3.0
    torch.testing.assert_close(measured, (2 ** (0.2 * labels[:, 0])).double(), rtol=0.02, atol=0)
    assert labels[:, 0].abs().max() > 0.5

def test_rotate_frac_label_gives_the_angle():
    x = blob(16, sx=4.0, sy=1.5)
    y, labels = run(images=x, p=1, rotate_frac=1)
    theta = torch.atan2(labels[:, 1], labels[:, 0] + 1).double()
    _, _, xx, xy, yy = moments(y)
    axis = 0.5 * torch.atan2(2 * xy, xx - yy) # major axis, x right / y down
    diff = torch.remainder(axis + theta + math.pi / 2, math.pi) - math.pi / 2 # content turns by -theta
    assert diff.abs().max() < 0.02
    assert theta.abs().max() > 1.5

def test_aniso_label_gives_the_stretch():
    x = blob(16, res=64, sx=3.0, sy=3.0)
    y, labels = run(images=x, p=1, aniso=1, aniso_rotate_prob=0)
    assert torch.all(labels[:, 1] == 0) # r = 0: the label is (w, 0)
    _, _, xx, _, yy = moments(y)
    s = (2 ** (0.2 * labels[:, 0])).double()
    torch.testing.assert_close(torch.sqrt(xx) / 3.0, s, rtol=0.02, atol=0)
    torch.testing.assert_close(torch.sqrt(yy) / 3.0, 1 / s, rtol=0.02, atol=0)

def test_aniso_in_a_rotated_frame_keeps_the_stretch_magnitude():
    x = blob(16, res=64, sx=3.0, sy=3.0)
    y, labels = run(images=x, p=1, aniso=1, aniso_rotate_prob=1)
    _, _, xx, xy, yy = moments(y)
    half_trace, det = (xx + yy) / 2, xx * yy - xy ** 2
    root = torch.sqrt(half_trace ** 2 - det)
    ratio = ((half_trace + root) / (half_trace - root)) ** 0.25 # = 2^(0.2|w|)
    torch.testing.assert_close(ratio, (2 ** (0.2 * labels.norm(dim=1))).double(), rtol=0.02, atol=0)

def test_brightness_and_contrast_labels():
    x = random_images()
    y, labels = run(images=x, p=1, brightness=1)
    torch.testing.assert_close(y, x + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1))
    y, labels = run(images=x, p=1, contrast=1)
    torch.testing.assert_close(y, x * 2 ** (0.5 * labels[:, 0].reshape(-1, 1, 1, 1)))

def test_hue_and_saturation_keep_grey_and_lumaflip_negates_it():
    grey = random_images(c=1).expand(8, 3, 16, 16).contiguous()
    for kwargs in [dict(hue=1), dict(saturation=1)]:
        y, labels = run(images=grey, p=1, **kwargs)
        assert labels.abs().sum() > 0
        torch.testing.assert_close(y, grey, atol=1e-5, rtol=0)
    y, labels = run(images=grey, p=1, lumaflip=1)
    sign = 1 - 2 * labels[:, 0].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(y, grey * sign, atol=1e-5, rtol=0)

def test_deterministic_under_manual_seed():
    pipe = AugmentPipe(p=0.5, **PRESET, brightness=1, hue=1)
    x = random_images()
    torch.manual_seed(7)
    a = pipe(x)
    torch.manual_seed(7)
    b = pipe(x)
    torch.manual_seed(8)
    c = pipe(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])

def test_train_preset_runs_and_stays_finite():
    pipe = AugmentPipe(p=0.12, **PRESET)
    assert pipe.label_dim == 9
    x = random_images(n=64)
    y, labels = run(images=x, p=0.12, **PRESET)
    assert y.shape == x.shape and labels.shape == (64, 9)
    assert torch.isfinite(y).all() and torch.isfinite(labels).all() and y.abs().max() < 3
    assert set(labels[:, 0].tolist()) == {0.0, 1.0} # xflip 1e8 * p >= 1: a fair coin for every image
    assert (labels[:, 2] == 0).sum() > 32 # scale applied with probability 0.12
    for c in (1, 3):
        y, _ = run(images=random_images(n=4, c=c), p=1, **PRESET, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
        assert torch.isfinite(y).all()

def test_label_width_matches_enabled_transforms():
    for kwargs, width in [(dict(), 0), (dict(xflip=1), 1), (dict(rotate_int=1, hue=1), 4), (PRESET, 9),
            (dict(PRESET, translate_int=1, brightness=1, contrast=1, lumaflip=1, saturation=1), 15)]:
        pipe = AugmentPipe(p=1, **kwargs)
        assert pipe.label_dim == width
        torch.manual_seed(0)
        assert pipe(random_images(n=2))[1].shape == (2, width)

def test_init_kwargs_rebuild_the_same_pipe():
    pipe = AugmentPipe(p=0.12, **PRESET)
    kwargs = json.loads(json.dumps(pipe.init_kwargs))
    assert kwargs['p'] == 0.12 and kwargs['xflip'] == 1e8 and kwargs['translate_frac_std'] == 0.125
    twin = AugmentPipe(**kwargs)
    x = random_images()
    torch.manual_seed(3)
    a = pipe(x)
    torch.manual_seed(3)
    b = twin(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
