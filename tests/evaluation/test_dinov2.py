"""FD-DINOv2: our DINOv2 ViT-L/14 (layers against explicit computations, the official state-dict
layout, the position-embedding interpolation), EDM2's preprocessing, the checked reading of the
weights file, the detector in fid.py, and EDM2's statistics pickles."""

import io
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F

from conftest import assert_user_error, run_fid_cli, write_folder
from torch_utils.errors import EvaluationError
from training.evaluation import dinov2, feature_stats
from training.evaluation import fid as evaluation
from training.evaluation import inception
from training.evaluation.inception import DINOV2_URL, DetectorError, load_detector

TINY = dict(patch_size=14, dim=8, depth=2, num_heads=2, pos_grid=4, mlp_ratio=4)

def tiny_vit(seed=0, **overrides):
    """A tiny DINOv2ViT with every parameter random (LayerNorms and LayerScales included)."""
    torch.manual_seed(seed)
    vit = dinov2.build(dict(TINY, **overrides))
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return vit.eval()

@pytest.fixture
def tiny_official(monkeypatch):
    """The loader's configuration made tiny (the real one is 300M parameters), so that whole files
    go through load_detector in milliseconds."""
    monkeypatch.setattr(dinov2, 'VITL14', dict(TINY))

#----------------------------------------------------------------------------
# The layers, against computations written out here in float64 numpy.

def explicit_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """softmax(q k^T / sqrt(d)) v per head; q, k, v are the thirds of the qkv projection, heads its consecutive slices."""
    n, t, d = x.shape
    hd = d // heads
    qkv = x @ qkv_w.T + qkv_b  # [N, T, 3D]
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    out = np.zeros_like(x)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        logits = q[..., s] @ np.swapaxes(k[..., s], 1, 2) / math.sqrt(hd)  # [N, T, T]
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        out[..., s] = (weights / weights.sum(-1, keepdims=True)) @ v[..., s]
    return out @ proj_w.T + proj_b

def explicit_layer_norm(x, w, b):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w + b  # DINOv2's eps

def explicit_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))  # the exact GELU, not the tanh one

def numpy_params(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}

def test_attention_matches_explicit_softmax():
    block = tiny_vit().blocks[0]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    p = numpy_params(block.attn)
    expected = explicit_attention(x.double().numpy(), p['qkv.weight'], p['qkv.bias'], p['proj.weight'], p['proj.bias'], 2)
    with torch.no_grad():
        got = block.attn(x)
    assert np.abs(got.double().numpy() - expected).max() < 1e-5  # float32 against float64

def test_block_is_prenorm_layerscaled_attention_and_gelu_mlp():
    block = tiny_vit(seed=2).blocks[1]
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(3)) * 0.003  # variance ~1e-5: LayerNorm's eps shows
    p, xd = numpy_params(block), x.double().numpy()
    h = xd + p['ls1.gamma'] * explicit_attention(explicit_layer_norm(xd, p['norm1.weight'], p['norm1.bias']),
        p['attn.qkv.weight'], p['attn.qkv.bias'], p['attn.proj.weight'], p['attn.proj.bias'], 2)
    hidden = explicit_gelu(explicit_layer_norm(h, p['norm2.weight'], p['norm2.bias']) @ p['mlp.fc1.weight'].T + p['mlp.fc1.bias'])
    expected = h + p['ls2.gamma'] * (hidden @ p['mlp.fc2.weight'].T + p['mlp.fc2.bias'])
    with torch.no_grad():
        got = block(x)
    assert np.abs(got.double().numpy() - expected).max() < 1e-4

def test_layerscale_multiplies_by_gamma():
    ls = dinov2.LayerScale(4)
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    x = torch.randn(2, 3, 4)
    assert torch.equal(ls(x), x * torch.tensor([1.0, -2.0, 0.5, 0.0]))
    # Both branches go through a LayerScale: with both gammas zero the block is the identity.
    block = tiny_vit().blocks[0]
    with torch.no_grad():
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        assert torch.equal(block(x.repeat(1, 1, 2)), x.repeat(1, 1, 2))

def test_feature_is_the_final_norm_class_token():
    vit = tiny_vit()
    x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(4))  # a 2x3 grid of 14x14 patches
    with torch.no_grad():
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [2, 6, 8], row by row
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + dinov2.interpolate_pos_embed(vit.pos_embed, (2, 3))
        for block in vit.blocks:
            tokens = block(tokens)
        expected = F.layer_norm(tokens, [8], vit.norm.weight, vit.norm.bias, eps=1e-6)[:, 0]
        assert torch.allclose(vit(x), expected, atol=1e-6)

#----------------------------------------------------------------------------
# The position embedding: as learned on its own grid; elsewhere DINOv2's bicubic interpolation
# with scale factor (h + 0.1) / M, which is not the same as asking for the size.

def test_pos_embed_is_unchanged_on_its_own_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert dinov2.interpolate_pos_embed(pos, (4, 4)) is pos

def test_pos_embed_interpolation_matches_dinov2():
    pos = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(5))
    got = dinov2.interpolate_pos_embed(pos, (3, 6))
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(3.1 / 4, 6.1 / 4), mode='bicubic', antialias=False, align_corners=False)
    assert got.shape == (1, 1 + 18, 8) and torch.equal(got[:, :1], pos[:, :1])
    assert torch.allclose(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 18, 8), atol=1e-6)
    # The offset moves the samples: asking for the size instead gives other values.
    by_size = F.interpolate(grid, size=(3, 6), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 18, 8)
    assert (got[:, 1:] - by_size).abs().max() > 1e-3

def test_pos_embed_interpolation_keeps_rows_and_constants():
    # An embedding that depends on the row only still does after interpolation to 5 rows of 7: the
    # grid is taken row by row and the height scales the rows. A constant stays the constant.
    rows = torch.arange(4.0).repeat_interleave(4)  # patch (i, j) -> i
    pos = torch.cat([torch.full([1], -1.0), rows])[None, :, None].repeat(1, 1, 3)  # [1, 17, 3]
    out = dinov2.interpolate_pos_embed(pos, (5, 7))[0, 1:].reshape(5, 7, 3)
    assert torch.allclose(out, out[:, :1], atol=1e-6) and out[0, 0, 0] < out[-1, 0, 0]
    const = dinov2.interpolate_pos_embed(torch.full([1, 17, 3], 0.25), (6, 2))
    assert torch.allclose(const, torch.full([1, 13, 3], 0.25), atol=1e-6)

#----------------------------------------------------------------------------
# The official layout: dinov2_vitl14_pretrain.pth's names and shapes, written from the published
# architecture (patch 14, width 1024, 24 blocks, MLP 4096, a 37x37 position grid plus the class token).

def official_vitl14_shapes():
    d = 1024
    shapes = {'cls_token': (1, 1, d), 'pos_embed': (1, 1370, d), 'mask_token': (1, d),
        'patch_embed.proj.weight': (d, 3, 14, 14), 'patch_embed.proj.bias': (d,)}
    for i in range(24):
        for name, shape in [('norm1.weight', (d,)), ('norm1.bias', (d,)), ('attn.qkv.weight', (3 * d, d)),
                ('attn.qkv.bias', (3 * d,)), ('attn.proj.weight', (d, d)), ('attn.proj.bias', (d,)), ('ls1.gamma', (d,)),
                ('norm2.weight', (d,)), ('norm2.bias', (d,)), ('mlp.fc1.weight', (4 * d, d)), ('mlp.fc1.bias', (4 * d,)),
                ('mlp.fc2.weight', (d, 4 * d)), ('mlp.fc2.bias', (d,)), ('ls2.gamma', (d,))]:
            shapes[f'blocks.{i}.{name}'] = shape
    shapes.update({'norm.weight': (d,), 'norm.bias': (d,)})
    return shapes

def test_vitl14_state_dict_is_the_official_layout():
    state = dinov2.build(device='meta').state_dict()  # no memory for 300M parameters
    assert {k: tuple(v.shape) for k, v in state.items()} == official_vitl14_shapes()
    assert len(state) == 5 + 24 * 14 + 2
    # 304.4M parameters: ViT-L/14 as published (304M), with the 1370-token position embedding.
    assert sum(v.numel() for v in state.values()) == 304_368_640

#----------------------------------------------------------------------------
# EDM2's preprocessing, written out: bicubic antialiased resize of the float 0..255 values to
# 224x224, /255, ImageNet mean and std per channel.

def test_preprocess_is_edm2s():
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randint(0, 256, [2, 3, 300, 24]).astype(np.uint8))  # antialiasing shows in the height
    x = F.interpolate(images.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True) / 255
    for c, (mean, std) in enumerate(zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        x[:, c] = (x[:, c] - mean) / std
    got = dinov2.preprocess(images)
    assert got.shape == (2, 3, 224, 224) and torch.allclose(got, x, atol=1e-6)
    assert got.min() < -2.2  # the bicubic overshoot below 0 is kept, as in EDM2 (no clamping)

#----------------------------------------------------------------------------
# The detector: a torch.save state dict recognised by its content, read with weights_only, and
# loaded only if its names and shapes are exactly the configuration's.

def save(obj, path):
    torch.save(obj, path)
    return str(path)

def test_tiny_dinov2_through_the_detector_interface(tmp_path, tiny_official):
    vit = tiny_vit()
    detector = load_detector(save(vit.state_dict(), tmp_path / 'tiny.pth'))
    assert detector.metric == 'fd_dinov2' and detector.feature_dim == 8 and detector.name == 'tiny.pth'
    rgb = torch.randint(0, 256, [3, 3, 20, 12], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = detector(rgb)
    with torch.no_grad():
        expected = vit(dinov2.preprocess(rgb))
    assert features.shape == (3, 8) and features.dtype == torch.float32 and torch.allclose(features, expected, atol=1e-5)
    # Grayscale is scored as RGB with three equal channels, as the Inception detectors score it.
    assert torch.allclose(detector(rgb[:, :1]), detector(rgb[:, :1].repeat(1, 3, 1, 1)), atol=1e-6)
    assert evaluation.metric_name(detector) == 'FD-DINOv2' and evaluation.metric_name('dinov2') == 'FD-DINOv2'

def test_official_alias_downloads_once_and_must_be_dinov2(tmp_path, monkeypatch, tiny_official):
    monkeypatch.setenv('FDM_CACHE_DIR', str(tmp_path / 'cache'))
    bodies = {DINOV2_URL: open(save(tiny_vit().state_dict(), tmp_path / 'w.pth'), 'rb').read()}
    fetched = []
    class Response(io.BytesIO):
        def raise_for_status(self):
            pass
        def iter_content(self, chunk_size):
            return iter(lambda: self.read(chunk_size), b'')
    def get(url, stream=True, timeout=None):
        fetched.append(url)
        return Response(bodies[url])
    monkeypatch.setattr(requests, 'get', get)
    assert load_detector('dinov2', verbose=False).feature_dim == 8
    assert load_detector('dinov2', verbose=False).metric == 'fd_dinov2' and fetched == [DINOV2_URL]
    # From the official URL only DINOv2 weights are accepted, whatever else the file might be.
    shutil.rmtree(tmp_path / 'cache')
    bodies[DINOV2_URL] = open(save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'o.pth'), 'rb').read()
    with pytest.raises(DetectorError, match='not a DINOv2 ViT-L/14 state dict: cls_token is missing'):
        load_detector('dinov2', verbose=False)

def refusal(path):
    with pytest.raises(DetectorError) as info:
        load_detector(path, verbose=False)
    message = str(info.value)
    assert '\n' not in message and message.startswith(os.path.basename(path)), message
    return message

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))

def test_files_that_are_not_dinov2_weights_are_refused_in_one_line(tmp_path, tiny_official):
    good = tiny_vit().state_dict()
    renamed = dict(good)
    renamed['blocks.0.ls1.scale'] = renamed.pop('blocks.0.ls1.gamma')
    reshaped = dict(good, pos_embed=torch.zeros(1, 1 + 25, 8))
    integer = dict(good, **{'norm.bias': torch.zeros(8, dtype=torch.int64)})
    extra = dict(good, register_tokens=torch.zeros(1, 4, 8))
    cases = {'renamed': (renamed, 'not a DINOv2 ViT-L/14 state dict: blocks.0.ls1.gamma is missing'),
        'reshaped': (reshaped, 'not a DINOv2 ViT-L/14 state dict: pos_embed is [1, 26, 8], expected [1, 17, 8]'),
        'integer': (integer, 'norm.bias is a torch.int64 tensor, not a dense floating-point tensor'),
        'extra': (extra, "'register_tokens' is not a parameter of the network"),
        'list': ([good['pos_embed']], 'holds a list, not a state dict of tensors'),
        'value': (dict(good, note='hi'), "'note' is a str, not a tensor")}
    for name, (obj, fragment) in cases.items():
        assert fragment in refusal(save(obj, tmp_path / f'{name}.pth'))
    # Code in the pickle never runs: weights_only refuses the global, in a torch.save zip or a plain pickle.
    marker = tmp_path / 'ran'
    code = save(dict(good, x=RunsCode(marker)), tmp_path / 'code.pth')
    assert 'refusing to load: the pickle references posix.system' in refusal(code)
    (tmp_path / 'code.pkl').write_bytes(pickle.dumps({'pos_embed': RunsCode(marker)}, protocol=2))
    assert 'refusing to load: the pickle references posix.system' in refusal(str(tmp_path / 'code.pkl'))
    assert not marker.exists()
    # A FIFO in the file's place is refused, not waited on.
    os.mkfifo(tmp_path / 'fifo.pth')
    with pytest.raises(DetectorError, match='not a regular file'):
        inception.read_state_dict(str(tmp_path / 'fifo.pth'), 'fifo.pth')

#----------------------------------------------------------------------------
# EDM2's statistics pickle {'num_images', 'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}}: read with
# the allow-list of plain numpy data, the entry chosen by the detector's metric.

def edm2_stats(path, protocol=4, **entries):
    stats = dict(num_images=100, **{k: dict(mu=mu, sigma=sigma) for k, (mu, sigma) in entries.items()})
    with open(path, 'wb') as f:
        pickle.dump(stats, f, protocol=protocol)
    return str(path)

def gaussian(dim, seed):
    rng = np.random.RandomState(seed)
    a = rng.randn(dim, dim)
    return rng.randn(dim), a @ a.T / dim + np.eye(dim)

@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_edm2_pickle_gives_the_detectors_entry(tmp_path, protocol):
    fid_stats, dino_stats = gaussian(6, 0), gaussian(4, 1)
    path = edm2_stats(tmp_path / 'img512.pkl', protocol, fid=fid_stats, fd_dinov2=dino_stats)
    for metric, expected in [('fd_dinov2', dino_stats), ('fid', fid_stats), (None, fid_stats)]:
        mu, sigma = feature_stats.load_stats(path, metric)
        assert mu.dtype == sigma.dtype == np.float64 and np.array_equal(mu, expected[0]) and np.array_equal(sigma, expected[1])
    with pytest.raises(EvaluationError, match="holds statistics of 'fd_dinov2', 'fid' but not of 'fd_digits'"):
        feature_stats.load_stats(path, 'fd_digits')
    # An npz holds one set, whatever the metric (the feature dimension is checked against the detector).
    feature_stats.save_stats(tmp_path / 'ref.npz', *dino_stats)
    assert np.array_equal(feature_stats.load_stats(str(tmp_path / 'ref.npz'), 'fd_dinov2')[1], dino_stats[1])

def test_bad_edm2_pickles_are_refused_in_one_line(tmp_path, monkeypatch):
    marker = tmp_path / 'ran'
    (tmp_path / 'code.pkl').write_bytes(pickle.dumps({'fid': {'mu': RunsCode(marker)}}))
    cases = {'code.pkl': 'refusing to load: the pickle references posix.system',
        edm2_stats(tmp_path / 'shape.pkl', fd_dinov2=(np.zeros(3), np.eye(4))): "'fd_dinov2' has mu [3] and sigma [4, 4]",
        edm2_stats(tmp_path / 'int.pkl', fid=(np.zeros(3, dtype=np.int64), np.eye(3))): 'no float32 or float64 arrays',
        edm2_stats(tmp_path / 'nan.pkl', fid=(np.full(2, np.nan), np.eye(2))): 'NaN or infinite',
        edm2_stats(tmp_path / 'empty.pkl'): 'without statistics',
    }
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([np.zeros(2)]))
    (tmp_path / 'cut.pkl').write_bytes(pickle.dumps({'fid': {'mu': np.zeros(300)}})[:-40])
    cases.update({'list.pkl': 'holds a list without statistics', 'cut.pkl': 'cannot be read as a statistics pickle'})
    for path, fragment in cases.items():
        path = str(tmp_path / path) if not os.path.isabs(path) else path
        with pytest.raises(EvaluationError) as info:
            feature_stats.load_stats(path, 'fid')
        assert fragment in str(info.value) and '\n' not in str(info.value), str(info.value)
    assert not marker.exists()
    # The whole file is read before unpickling, so its size is bounded first.
    monkeypatch.setattr(feature_stats, 'MAX_STATS_PICKLE_BYTES', 1000)
    with pytest.raises(EvaluationError, match='larger than'):
        feature_stats.load_stats(edm2_stats(tmp_path / 'big.pkl', fid=gaussian(20, 0)))

#----------------------------------------------------------------------------
# fid.py with --detector naming DINOv2 weights: results read "FD-DINOv2", against our npz or EDM2's pickle.

def test_fid_py_scores_fd_dinov2(tmp_path, tiny_official):
    weights = save(tiny_vit().state_dict(), tmp_path / 'tiny.pth')
    data = write_folder(tmp_path / 'data', 12)
    npz = tmp_path / 'ref.npz'
    assert run_fid_cli('ref', '--data', data, '--dest', npz, '--detector', weights, '--workers', 0).exit_code == 0
    mu, sigma = feature_stats.load_stats(str(npz))
    assert mu.shape == (8,)
    # EDM2's pickle, whose 'fid' entry (2048-d) would fail the dimension check if it were picked.
    pkl = edm2_stats(tmp_path / 'edm2.pkl', fid=gaussian(2048, 0), fd_dinov2=(mu + 1, sigma))
    result = run_fid_cli('calc', '--images', data, '--ref', pkl, '--num', 12, '--detector', weights, '--workers', 0)
    assert result.exit_code == 0, result.output
    assert f"FD-DINOv2 8.000 from 12 images in '{data}' against '{pkl}'" in result.stdout.splitlines()  # ||1||^2 over 8 features
    # The digits detector has no entry in EDM2's pickle: one line, before any image is scored.
    assert_user_error(run_fid_cli('calc', '--images', data, '--ref', pkl, '--num', 12, '--detector', 'digits'),
        "not of 'fd_digits'")

#----------------------------------------------------------------------------
