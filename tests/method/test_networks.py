"""Tests of fdm/networks.py against the reference NVlabs/edm networks (layout, counts, init, forward)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fdm.networks import (ARCH_PRESETS, NETWORK_CLASSES, Conv2d, DhariwalUNet, FourierEmbedding,
                               PositionalEmbedding, SongUNet, UNetBlock, attention_op, weight_init)

#----------------------------------------------------------------------------
# Helpers.

def build_preset(arch, img_resolution=32, label_dim=0, augment_dim=0, **overrides):
    # As train.py does it, but on the meta device so that nothing is allocated.
    kwargs = dict(ARCH_PRESETS[arch], dropout=0.13, **overrides)
    cls = NETWORK_CLASSES[kwargs.pop('model_type')]
    with torch.device('meta'):
        return cls(img_resolution=img_resolution, in_channels=3, out_channels=3,
                   label_dim=label_dim, augment_dim=augment_dim, **kwargs)

def num_params(net):
    return sum(p.numel() for p in net.parameters())

TINY = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8])
TINY_DDPMPP = dict(TINY, label_dim=4, augment_dim=9)
TINY_NCSNPP = dict(TINY_DDPMPP, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1])
TINY_SKIP = dict(TINY_DDPMPP, encoder_type='skip', decoder_type='skip')
# ADM has one attention head per 64 channels, so it needs 64 channels to have attention at all.
TINY_ADM = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=64, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], label_dim=4, augment_dim=9)

def tiny_inputs(n=2, res=16, label_dim=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([n, 3, res, res], generator=g)
    noise_labels = torch.randn([n], generator=g)
    class_labels = F.one_hot(torch.arange(n) % label_dim, label_dim).float()
    augment_labels = torch.randn([n, 9], generator=g)
    return x, noise_labels, class_labels, augment_labels

def randomize_(net, seed=0):
    # Replace the (partly zero) init with generic values so that every term of the forward pass matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            is_norm_gain = 'norm' in name and name.endswith('weight')
            p.copy_((1 if is_norm_gain else 0) + 0.2 * torch.randn(p.shape, generator=g))
    return net

def uniform_bound(w, mode):
    k2 = w[0, 0].numel() if w.ndim == 4 else 1
    fan_in, fan_out = w.shape[1] * k2, w.shape[0] * k2
    return math.sqrt(6 / (fan_in + fan_out)) if mode == 'xavier' else math.sqrt(1 / fan_in)

#----------------------------------------------------------------------------
# Parameter and buffer counts measured on the reference classes (NVlabs/edm).

@pytest.mark.parametrize('arch, res, label_dim, augment_dim, channel_mult, expected', [
    ('ddpmpp', 32, 10, 9, None, 55_735_299),
    ('ddpmpp', 32, 0, 0, None, 55_732_739),
    ('ncsnpp', 32, 10, 9, None, 56_400_643),
    ('ncsnpp', 32, 0, 0, None, 56_395_523),
    ('ddpmpp', 64, 0, 9, [1, 2, 2, 2], 61_805_571),
    ('ncsnpp', 64, 0, 9, [1, 2, 2, 2], 62_761_091),
    ('adm', 64, 1000, 0, None, 295_899_267),
])
def test_parameter_counts(arch, res, label_dim, augment_dim, channel_mult, expected):
    overrides = {} if channel_mult is None else dict(channel_mult=channel_mult)
    net = build_preset(arch, res, label_dim, augment_dim, **overrides)
    assert num_params(net) == expected

@pytest.mark.parametrize('arch, res, label_dim, expected', [('ddpmpp', 32, 0, 32), ('ncsnpp', 32, 0, 288), ('adm', 64, 1000, 48)])
def test_buffer_counts(arch, res, label_dim, expected):
    net = build_preset(arch, res, label_dim)
    assert sum(b.numel() for b in net.buffers()) == expected
    assert all(name.endswith(('resample_filter', 'freqs')) for name, _ in net.named_buffers())

def test_ncsnpp_state_dict_size():
    assert len(build_preset('ncsnpp', 32, 10, 9).state_dict()) == 434

def test_cifar_ddpmpp_module_order():
    net = build_preset('ddpmpp', 32, 10, 9)
    blocks = lambda res, n: [f'{res}x{res}_block{i}' for i in range(n)]
    assert list(net.enc.keys()) == (['32x32_conv'] + blocks(32, 4) + ['16x16_down'] + blocks(16, 4)
                                    + ['8x8_down'] + blocks(8, 4))
    assert list(net.dec.keys()) == (['8x8_in0', '8x8_in1'] + blocks(8, 5) + ['16x16_up'] + blocks(16, 5)
                                    + ['32x32_up'] + blocks(32, 5) + ['32x32_aux_norm', '32x32_aux_conv'])
    top = [name for name, _ in net.named_children()]
    assert top == ['map_noise', 'map_label', 'map_augment', 'map_layer0', 'map_layer1', 'enc', 'dec']
    assert net.enc['32x32_conv'].weight.shape == (128, 3, 3, 3)  # model_channels, not x channel_mult[0]
    # Attention: encoder blocks at 16x16, decoder only the last 16x16 block, and 8x8_in0.
    with_attn = sorted(name[:-len('.qkv')] for name, _ in net.named_modules() if name.endswith('.qkv'))
    assert with_attn == ['dec.16x16_block4', 'dec.8x8_in0'] + [f'enc.16x16_block{i}' for i in range(4)]
    assert net.map_label.weight.shape == (128, 10) and net.map_augment.bias is None

def test_group_norm_settings():
    # eps 1e-6 in every SongUNet norm, 1e-5 in every DhariwalUNet norm; groups = min(32, C // 4).
    for arch, eps in [('ddpmpp', 1e-6), ('ncsnpp', 1e-6), ('adm', 1e-5)]:
        norms = [m for name, m in build_preset(arch).named_modules()
                 if name.split('.')[-1].endswith(('norm0', 'norm1', 'norm2', 'norm'))]
        assert len(norms) > 50 and all(m.eps == eps for m in norms), arch
        assert all(m.num_groups == min(32, m.weight.shape[0] // 4) for m in norms)
    with torch.device('meta'):
        assert UNetBlock(8, 12, emb_channels=4).norm1.num_groups == 3

def test_ncsnpp_aux_residual():
    net = build_preset('ncsnpp', 32, 10, 9)
    keys = list(net.enc.keys())
    assert keys[keys.index('16x16_down') + 1] == '16x16_aux_residual'
    assert keys[keys.index('8x8_down') + 1] == '8x8_aux_residual'
    assert net.enc['16x16_aux_residual'].weight.shape == (256, 3, 3, 3)
    assert net.enc['8x8_aux_residual'].weight.shape == (256, 256, 3, 3)
    assert net.map_noise.freqs.shape == (128,)  # noise_channels / 2 = 128 * 2 / 2
    assert net.map_layer0.weight.shape == (512, 256)

def test_adm_layout():
    net = build_preset('adm', 64, 1000)
    top = [name for name, _ in net.named_children()]
    assert top == ['map_noise', 'map_layer0', 'map_layer1', 'map_label', 'enc', 'dec', 'out_norm', 'out_conv']
    assert net.enc['64x64_conv'].weight.shape == (192, 3, 3, 3)
    assert list(net.enc['32x32_down'].skip.state_dict().keys()) == ['resample_filter']  # kernel-0 skip
    assert net.enc['32x32_block0'].num_heads == 384 // 64
    assert net.map_label.bias is None and net.map_label.weight.shape == (768, 1000)

#----------------------------------------------------------------------------
# Resampling filters.

def test_resample_filter_values():
    conv = Conv2d(4, 4, kernel=3, down=True)
    assert torch.equal(conv.resample_filter, torch.full([1, 1, 2, 2], 0.25))
    assert 'resample_filter' in conv.state_dict()
    f = torch.tensor([1., 3., 3., 1.])
    conv = Conv2d(4, 4, kernel=3, up=True, resample_filter=[1, 3, 3, 1])
    assert torch.allclose(conv.resample_filter, torch.outer(f, f)[None, None] / 64)
    assert 'resample_filter' not in Conv2d(4, 4, kernel=3).state_dict()

def test_resampling_matches_pooling_and_nearest():
    # With the [1,1] filter, down is a 2x2 mean and up is nearest-neighbour replication.
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(Conv2d(3, 3, kernel=0, down=True)(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(Conv2d(3, 3, kernel=0, up=True)(x), F.interpolate(x, scale_factor=2, mode='nearest'), atol=1e-6)
    # [1,3,3,1] keeps a constant image constant away from the border, at the right size.
    ones = torch.ones(1, 2, 8, 8)
    down = Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1])(ones)
    up = Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(ones)
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1)) and torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1))

def test_fused_down_is_conv_then_filter():
    torch.manual_seed(0)
    conv = Conv2d(3, 5, kernel=3, down=True, fused_resample=True)
    x = torch.randn(2, 3, 8, 8)
    expected = F.avg_pool2d(F.conv2d(x, conv.weight, conv.bias, padding=1), 2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    # [1,3,3,1]: 3x3 conv with padding 1 + 1, then the 4x4 filter at stride 2 without padding.
    fused = randomize_(Conv2d(3, 5, kernel=3, down=True, fused_resample=True, resample_filter=[1, 3, 3, 1]))
    f = torch.tensor([1., 3., 3., 1.])
    f = (torch.outer(f, f) / 64).expand(5, 1, 4, 4)
    expected = F.conv2d(F.conv2d(x, fused.weight, padding=2), f, groups=5, stride=2) + fused.bias[:, None, None]
    assert fused(x).shape == (2, 5, 4, 4) and torch.allclose(fused(x), expected, atol=1e-5)

#----------------------------------------------------------------------------
# Initialisation.

@pytest.mark.parametrize('mode, std', [
    ('xavier_uniform', math.sqrt(2 / 500)), ('xavier_normal', math.sqrt(2 / 500)),
    ('kaiming_uniform', math.sqrt(1 / 300)), ('kaiming_normal', math.sqrt(1 / 300)),
])
def test_weight_init_formulas(mode, std):
    torch.manual_seed(0)
    w = weight_init([200, 300], mode=mode, fan_in=300, fan_out=200)
    assert w.shape == (200, 300)
    assert abs(w.std().item() / std - 1) < 0.02 and abs(w.mean().item()) < 0.02 * std
    if mode.endswith('uniform'):
        bound = std * math.sqrt(3)
        assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
    with pytest.raises(ValueError):
        weight_init([2], mode='orthogonal', fan_in=1, fan_out=1)

def test_song_init():
    torch.manual_seed(0)
    net = SongUNet(**dict(TINY_DDPMPP, model_channels=32))
    for name, p in net.named_parameters():
        if 'norm' in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith('weight') else torch.zeros_like(p)), name
        elif name.endswith('bias'):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            scale = 1e-5 if name.endswith(('conv1.weight', 'proj.weight', 'aux_conv.weight')) else 1
            scale = math.sqrt(0.2) if name.endswith('qkv.weight') else scale
            bound = scale * uniform_bound(p, 'xavier')
            assert bound * 0.9 < p.abs().max() <= bound * (1 + 1e-6), name

def test_adm_init():
    torch.manual_seed(0)
    net = DhariwalUNet(**dict(TINY_ADM, label_dim=1000))
    zero = ('conv1.', 'proj.', 'out_conv.', 'map_augment.')
    for name, p in net.named_parameters():
        if name.startswith('map_label'):
            assert abs(p.std().item() - 1) < 0.01 and abs(p.mean().item()) < 0.01  # N(0, 1)
        elif any(z in name for z in zero):
            assert torch.count_nonzero(p) == 0, name
        elif 'norm' in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith('weight') else torch.zeros_like(p)), name
        else:  # U(+-1/sqrt(fan_in)) for weight and bias alike
            weight = dict(net.named_parameters())[name.rsplit('.', 1)[0] + '.weight']
            bound = uniform_bound(weight, 'kaiming')
            assert bound * 0.5 < p.abs().max() <= bound * (1 + 1e-6), name

#----------------------------------------------------------------------------
# Attention and the UNetBlock forward, against formulas written out here.

def naive_attention(q, k, v):
    # The reference: w = softmax_k(q^T k / sqrt(c)), a = v w^T, with q, k, v as [B, c, HW].
    w = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    return torch.einsum('nqk,nck->ncq', w, v)

def test_attention_op_matches_naive():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 8, 20).unbind(0)
    assert torch.allclose(attention_op(q, k, v), naive_attention(q, k, v), atol=1e-6)
    half = attention_op(q.half(), k.half(), v.half())
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), naive_attention(q, k, v), atol=2e-3)

def group_norm(x, norm, eps):
    return F.group_norm(x, min(32, x.shape[1] // 4), norm.weight, norm.bias, eps)

def naive_block_attention(block, h, heads, eps, skip_scale):
    N, C, H, W = h.shape
    qkv = F.conv2d(group_norm(h, block.norm2, eps), block.qkv.weight, block.qkv.bias)
    qkv = qkv.reshape(N, heads, C // heads, 3, H * W)  # out channel = (head * C/heads + c) * 3 + j
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    w = (torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(C // heads)).softmax(dim=-1)
    a = torch.einsum('nhqk,nhck->nhcq', w, v).reshape(N, C, H, W)
    return (F.conv2d(a, block.proj.weight, block.proj.bias) + h) * skip_scale

def test_song_block_matches_formula():
    # DDPM++ block: down, in != out, resample_proj, attention, h = silu(norm1(h + e)).
    torch.manual_seed(0)
    block = UNetBlock(8, 16, emb_channels=12, down=True, attention=True, num_heads=1, skip_scale=math.sqrt(0.5),
                      eps=1e-6, resample_proj=True, adaptive_scale=False).eval()
    randomize_(block)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    h = F.conv2d(F.avg_pool2d(F.silu(group_norm(x, block.norm0, 1e-6)), 2), block.conv0.weight, block.conv0.bias, padding=1)
    e = emb @ block.affine.weight.T + block.affine.bias
    h = F.silu(group_norm(h + e[:, :, None, None], block.norm1, 1e-6))
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    h = (h + F.conv2d(F.avg_pool2d(x, 2), block.skip.weight, block.skip.bias)) / math.sqrt(2)
    expected = naive_block_attention(block, h, heads=1, eps=1e-6, skip_scale=math.sqrt(0.5))
    assert torch.allclose(block(x, emb), expected, atol=1e-5)

def test_adm_block_matches_formula():
    # ADM block: up, in == out (the skip only resamples), two heads, h = silu(shift + norm1(h) (scale + 1)).
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=12, up=True, attention=True, channel_per_head=8).eval()
    assert block.num_heads == 2 and block.skip.weight is None
    randomize_(block)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 12)
    h = F.interpolate(F.silu(group_norm(x, block.norm0, 1e-5)), scale_factor=2, mode='nearest')
    h = F.conv2d(h, block.conv0.weight, block.conv0.bias, padding=1)
    scale, shift = (emb @ block.affine.weight.T + block.affine.bias)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(shift + group_norm(h, block.norm1, 1e-5) * (scale + 1))
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1) + F.interpolate(x, scale_factor=2, mode='nearest')
    expected = naive_block_attention(block, h, heads=2, eps=1e-5, skip_scale=1)
    assert torch.allclose(block(x, emb), expected, atol=1e-5)

#----------------------------------------------------------------------------
# Embeddings and the mapping networks.

def test_embeddings():
    x = torch.tensor([0.5, -2.0, 3.0])
    f = torch.tensor([1e-4 ** (i / 3) for i in range(4)])  # endpoint: the last frequency is 1/max_positions
    assert torch.allclose(PositionalEmbedding(8, endpoint=True)(x), torch.cat([(x[:, None] * f).cos(), (x[:, None] * f).sin()], 1))
    f = torch.tensor([1e-4 ** (i / 4) for i in range(4)])
    assert torch.allclose(PositionalEmbedding(8)(x), torch.cat([(x[:, None] * f).cos(), (x[:, None] * f).sin()], 1))
    torch.manual_seed(0)
    fourier = FourierEmbedding(8)
    assert fourier.freqs.shape == (4,) and fourier.freqs.std() > 4  # N(0, 16^2)
    arg = 2 * math.pi * x[:, None] * fourier.freqs
    assert torch.allclose(fourier(x), torch.cat([arg.cos(), arg.sin()], 1), atol=1e-5)

def capture_input(module):
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    return seen

def test_song_mapping():
    torch.manual_seed(0)
    net = SongUNet(**TINY_DDPMPP).eval()
    x, sigma, labels, aug = tiny_inputs()
    layer0_in, block_emb = capture_input(net.map_layer0), capture_input(net.enc['16x16_block0'].affine)
    net(x, sigma, labels, aug)
    arg = torch.outer(sigma, 1e-4 ** (torch.arange(8) / 7))  # noise_channels 16, endpoint=True
    expected = torch.cat([arg.sin(), arg.cos()], 1)  # halves swapped
    expected = expected + (labels * 2) @ net.map_label.weight.T + net.map_label.bias + aug @ net.map_augment.weight.T
    assert torch.allclose(layer0_in[0], expected, atol=1e-5)
    emb = F.silu(net.map_layer1(F.silu(net.map_layer0(expected))))
    assert torch.allclose(block_emb[0], emb, atol=1e-5)

def test_adm_mapping():
    torch.manual_seed(0)
    net = DhariwalUNet(**TINY_ADM).eval()
    randomize_(net)
    x, sigma, labels, aug = tiny_inputs(res=8)
    layer0_in, block_emb = capture_input(net.map_layer0), capture_input(net.enc['8x8_block0'].affine)
    net(x, sigma, labels, aug)
    arg = torch.outer(sigma, 1e-4 ** (torch.arange(32) / 32))
    expected = torch.cat([arg.cos(), arg.sin()], 1) + aug @ net.map_augment.weight.T
    assert torch.allclose(layer0_in[0], expected, atol=1e-5)
    emb = F.silu(net.map_layer1(F.silu(net.map_layer0(expected))) + labels @ net.map_label.weight.T)
    assert torch.allclose(block_emb[0], emb, atol=1e-4)

def record(net, names):
    # name -> (first input, output) of the named submodules in the next forward pass.
    seen = {}
    for name in names:
        hook = lambda module, args, out, name=name: seen.__setitem__(name, (args[0], out))
        net.get_submodule(name).register_forward_hook(hook)
    return seen

def test_song_residual_encoder():
    # x = skip = aux = (x + aux_residual(aux)) / sqrt(2), with aux starting as the network input.
    net = randomize_(SongUNet(**TINY_NCSNPP)).eval()
    x = tiny_inputs()[0]
    seen = record(net, ['enc.8x8_down', 'enc.8x8_aux_residual', 'enc.8x8_block0', 'dec.8x8_block1'])
    net(*tiny_inputs())
    assert torch.equal(seen['enc.8x8_aux_residual'][0], x)
    mixed = (seen['enc.8x8_down'][1] + seen['enc.8x8_aux_residual'][1]) / math.sqrt(2)
    assert torch.allclose(seen['enc.8x8_block0'][0], mixed)
    assert torch.allclose(seen['dec.8x8_block1'][0][:, -16:], mixed)  # the pushed skip is the mixed one

def test_song_skip_encoder_and_decoder():
    net = randomize_(SongUNet(**TINY_SKIP)).eval()
    assert list(net.enc.keys()) == ['16x16_conv', '16x16_block0', '8x8_down', '8x8_aux_down', '8x8_aux_skip', '8x8_block0']
    assert list(net.dec.keys()) == ['8x8_in0', '8x8_in1', '8x8_block0', '8x8_block1', '8x8_aux_norm', '8x8_aux_conv',
                                    '16x16_up', '16x16_block0', '16x16_block1', '16x16_aux_up', '16x16_aux_norm', '16x16_aux_conv']
    assert net.enc['8x8_aux_down'].weight is None and net.enc['8x8_aux_skip'].weight.shape == (16, 3, 1, 1)
    assert net.dec['16x16_aux_up'].weight is None and net.dec['8x8_aux_conv'].weight.shape == (3, 32, 3, 3)
    x = tiny_inputs()[0]
    names = ['enc.8x8_down', 'enc.8x8_aux_skip', 'enc.8x8_block0', 'dec.8x8_aux_conv', 'dec.16x16_aux_up', 'dec.16x16_aux_conv']
    seen = record(net, names)
    out = net(*tiny_inputs())
    assert torch.allclose(seen['enc.8x8_aux_skip'][0], F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(seen['enc.8x8_block0'][0], seen['enc.8x8_down'][1] + seen['enc.8x8_aux_skip'][1])
    assert torch.equal(seen['dec.16x16_aux_up'][0], seen['dec.8x8_aux_conv'][1])
    assert torch.allclose(out, seen['dec.16x16_aux_conv'][1] + seen['dec.16x16_aux_up'][1])

#----------------------------------------------------------------------------
# Whole tiny networks.

@pytest.mark.parametrize('cls, kwargs', [(SongUNet, TINY_DDPMPP), (SongUNet, TINY_NCSNPP), (SongUNet, TINY_SKIP),
                                         (DhariwalUNet, TINY_ADM)], ids=['ddpmpp', 'ncsnpp', 'skip', 'adm'])
def test_tiny_forward_backward(cls, kwargs):
    torch.manual_seed(0)
    net = cls(**kwargs).eval()
    res = kwargs['img_resolution']
    x, sigma, labels, aug = tiny_inputs(res=res)
    x.requires_grad_(True)
    out = net(x, sigma, labels, aug)
    assert out.shape == (2, 3, res, res) and out.dtype == torch.float32
    assert torch.equal(out, net(x, sigma, labels, aug))
    if cls is DhariwalUNet:  # the zero-initialised output conv would block every gradient
        assert torch.count_nonzero(out) == 0
        randomize_(net)
        out = net(x, sigma, labels, aug)
    out.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0

def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = randomize_(SongUNet(**TINY_NCSNPP), seed=1).eval()
    torch.manual_seed(1)
    b = SongUNet(**TINY_NCSNPP).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    inputs = tiny_inputs()
    assert torch.equal(a(*inputs), b(*inputs))

def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = randomize_(SongUNet(**dict(TINY_DDPMPP, dropout=0.5)))
    inputs = tiny_inputs()
    net.eval()
    assert torch.equal(net(*inputs), net(*inputs))
    net.train()
    assert not torch.allclose(net(*inputs), net(*inputs))
    no_dropout = randomize_(SongUNet(**dict(TINY_DDPMPP, dropout=0)))
    assert torch.allclose(no_dropout.train()(*inputs), no_dropout.eval()(*inputs))

@pytest.mark.parametrize('cls, kwargs', [(SongUNet, TINY_DDPMPP), (DhariwalUNet, TINY_ADM)], ids=['song', 'adm'])
def test_label_dropout(cls, kwargs):
    # label_dropout=1 drops every row in training, and none in eval.
    torch.manual_seed(0)
    net = randomize_(cls(**dict(kwargs, dropout=0, label_dropout=1)))
    x, sigma, labels, aug = tiny_inputs(res=kwargs['img_resolution'])
    zeros = torch.zeros_like(labels)
    net.train()
    assert torch.equal(net(x, sigma, labels, aug), net(x, sigma, zeros, aug))
    net.eval()
    with_labels = net(x, sigma, labels, aug)
    assert not torch.allclose(with_labels, net(x, sigma, zeros, aug))
    # Partial dropout: each sample's output matches either its labelled or its unlabelled output.
    net.label_dropout = 0.5
    x, sigma, labels, aug = tiny_inputs(n=16, res=kwargs['img_resolution'])
    kept, dropped = net(x, sigma, labels, aug), net(x, sigma, torch.zeros_like(labels), aug)
    net.train()
    out = net(x, sigma, labels, aug)
    is_kept = [torch.allclose(o, k, atol=1e-6) for o, k in zip(out, kept)]
    is_dropped = [torch.allclose(o, d, atol=1e-6) for o, d in zip(out, dropped)]
    assert all(k != d for k, d in zip(is_kept, is_dropped)) and any(is_kept) and any(is_dropped)

def test_mixed_precision():
    # fp16 activations with fp32 parameters, close to the fp32 result.
    torch.manual_seed(0)
    net = randomize_(SongUNet(**TINY_NCSNPP)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if 'norm' not in name:
                p.mul_(0.5)
    inputs = tiny_inputs()
    ref = net(*inputs)
    out = net(inputs[0].half(), *inputs[1:])
    assert out.dtype == torch.float16 and all(p.dtype == torch.float32 for p in net.parameters())
    assert (out.float() - ref).abs().max() < 2e-2 * ref.abs().max()

def test_errors_and_meta_device():
    for bad in [dict(embedding_type='learned'), dict(encoder_type='fancy'), dict(decoder_type='residual')]:
        with pytest.raises(ValueError):
            SongUNet(**dict(TINY, **bad))
    with pytest.raises(ValueError):
        SongUNet(**TINY_DDPMPP)(*tiny_inputs()[:2], None)
    net = build_preset('ncsnpp')
    assert all(t.is_meta for t in net.state_dict().values())

#----------------------------------------------------------------------------
