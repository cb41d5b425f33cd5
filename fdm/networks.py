"""U-Net backbones of EDM and FDM: DDPM++ / NCSN++ (SongUNet) and ADM (DhariwalUNet).

Module names, shapes, buffers, initialisation and the forward pass match the
reference networks, so that released state_dicts load with strict=True and give
the same outputs. Parameters stay fp32; every layer runs in its input's dtype.
"""

import math

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Random weights scaled as in Glorot (xavier) or He (kaiming) initialisation.

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Unknown init_mode "{mode}"; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal.')

#----------------------------------------------------------------------------
# Fully connected layer; the fp32 weights are cast to the input's dtype on the fly.

class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x

#----------------------------------------------------------------------------
# 2-D convolution with optional FIR up/down-sampling by 2; kernel=0 only resamples.

class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d can upsample or downsample, not both.')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # [1, 1, k, k], sums to 1
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in, c_out = self.in_channels, self.out_channels

        if self.fused_resample and self.up and w is not None:
            # Upsample, then convolve; the two paddings together keep the output at 2H x 2W.
            x = F.conv_transpose2d(x, (4 * f).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Convolve with the filter's padding added, then blur and decimate without padding.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([c_out, 1, 1, 1]), groups=c_out, stride=2)
        else:
            if self.up:  # depthwise; 4f because each output pixel receives a quarter of the taps
                x = F.conv_transpose2d(x, (4 * f).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x

#----------------------------------------------------------------------------
# Group normalisation with at least min_channels_per_group channels per group.

class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Self-attention over pixels, a = v softmax(k^T q / sqrt(c)), evaluated in fp32 as in the reference.

def attention_op(q, k, v):
    # q, k, v: [N * heads, c, HW] -> [N * heads, c, HW]; sdpa wants [batch, HW, c].
    dtype = q.dtype
    q, k, v = (t.to(torch.float32).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v)  # default scale is 1/sqrt(c)
    return a.transpose(1, 2).to(dtype)

#----------------------------------------------------------------------------
# Residual block with a noise-embedding modulation and optional self-attention.

class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channel_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None else out_channels // channel_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)  # [N, C or 2C, 1, 1]
        if self.adaptive_scale:  # ADM: h = silu(shift + norm1(h) * (scale + 1))
            scale, shift = params.chunk(chunks=2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:  # DDPM++ / NCSN++: h = silu(norm1(h + e))
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale

        if self.num_heads:
            N, C, H, W = h.shape
            # qkv channels are interleaved per channel: out channel = (head * C/heads + c) * 3 + {q, k, v}.
            qkv = self.qkv(self.norm2(h)).reshape(N * self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = qkv.unbind(2)  # each [N * heads, C/heads, HW]
            a = attention_op(q, k, v).reshape(N, C, H, W)
            h = (self.proj(a) + h) * self.skip_scale
        return h

#----------------------------------------------------------------------------
# Transformer sinusoidal embedding of the noise level: [cos(x f), sin(x f)], f_i = (1/max_positions)^(i/(N/2 - endpoint)).

class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))  # [N, half]
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Random Fourier features of the noise level (NCSN++): [cos(2 pi f x), sin(2 pi f x)], f ~ N(0, scale^2).

class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))  # [N, num_channels / 2]
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Classifier-free-guidance style label dropout: zero whole rows with probability p, only in training.

def drop_labels(labels, p, training, batch_size):
    if not (training and p):
        return labels
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)

# A conditional network needs labels; the preconditioner supplies zeros when the user gives none.
def check_labels(class_labels, label_dim):
    if label_dim and class_labels is None:
        raise ValueError(f'This network is class-conditional (label_dim={label_dim}); pass class_labels of shape [N, {label_dim}].')

#----------------------------------------------------------------------------
# The start of one decoder level, the same in DDPM++/NCSN++ and ADM: the bottleneck pair
# (`in0` with attention, `in1`) at the deepest level, an upsampling block (`up`) elsewhere.

def add_decoder_head(dec, res, deepest, channels, block_kwargs):
    if deepest:
        dec[f'{res}x{res}_in0'] = UNetBlock(channels, channels, attention=True, **block_kwargs)
        dec[f'{res}x{res}_in1'] = UNetBlock(channels, channels, **block_kwargs)
    else:
        dec[f'{res}x{res}_up'] = UNetBlock(channels, channels, up=True, **block_kwargs)

#----------------------------------------------------------------------------
# DDPM++ and NCSN++ U-Net of Song et al., "Score-Based Generative Modeling through SDEs" (ICLR 2021).

class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1]):
        if embedding_type not in ['positional', 'fourier']:
            raise ValueError(f'Unknown embedding_type "{embedding_type}"; use positional or fourier.')
        if encoder_type not in ['standard', 'skip', 'residual']:
            raise ValueError(f'Unknown encoder_type "{encoder_type}"; use standard, skip or residual.')
        if decoder_type not in ['standard', 'skip']:
            raise ValueError(f'Unknown decoder_type "{decoder_type}"; use standard or skip.')
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ labels, augmentation labels) -> embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; the names (and their order) are the reference's state_dict keys.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder, deepest level first; each block consumes one skip connection.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            add_decoder_head(self.dec, res, level == len(channel_mult) - 1, cout, block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        check_labels(class_labels, self.label_dim)
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training, x.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder; aux carries the downsampled network input for the skip/residual encoders.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; aux accumulates the output image (across levels for the skip decoder).
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM U-Net of Dhariwal and Nichol, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS 2021).

class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))  # PyTorch's default
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channel_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network; map_label = N(0, 1) rows, i.e. a learned class embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder, deepest level first.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            add_decoder_head(self.dec, res, level == len(channel_mult) - 1, cout, block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        check_labels(class_labels, self.label_dim)
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training, x.shape[0]))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# The --arch presets of the reference train.py; dropout, augment_dim and label_dim are added by training/config.py.

ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# Preconditioners look the U-Net class up here by its model_type name.
NETWORK_CLASSES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

#----------------------------------------------------------------------------
