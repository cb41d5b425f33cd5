"""Numeric precision of network evaluations: one option for training, sampling and benchmarks.

- fp32: exact IEEE float32 everywhere, TF32 off (the reference's setting, bit-compatible);
- tf32: float32 storage, TF32 tensor cores for matmuls and convolutions (CUDA);
- bf16 / fp16: autocast of the network to bfloat16 / float16; parameters, optimizer state,
  the preconditioner's skip connection and the sampler state stay in float32/float64.
"""

import contextlib

import torch

PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16')
AUTOCAST_DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16)

#----------------------------------------------------------------------------

def check(precision):
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    return precision

def configure(precision, device):
    """Set the global TF32 switches for this precision (only CUDA has them)."""
    check(precision)
    if torch.device(device).type == 'cuda':
        allow = precision != 'fp32'
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

def autocast(precision, device):
    """Context in which the network runs at this precision; a no-op for fp32/tf32."""
    check(precision)
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])

#----------------------------------------------------------------------------
