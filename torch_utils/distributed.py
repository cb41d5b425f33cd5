"""Process groups that work under torchrun and as one plain process, on GPU or CPU."""

import datetime
import os

import torch
import torch.distributed as dist

#----------------------------------------------------------------------------
# Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
# MASTER_ADDR, ...). NCCL when CUDA is present, gloo otherwise. A plain process (no
# WORLD_SIZE) runs alone without any group, so nothing needs a free port or a GPU.

def init(backend=None, timeout_s=1800):
    if dist.is_available() and dist.is_initialized():
        return
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 and 'MASTER_ADDR' not in os.environ:
        return
    if backend is None:
        backend = 'nccl' if torch.cuda.is_available() and dist.is_nccl_available() else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))

def is_distributed():
    return dist.is_available() and dist.is_initialized()

def get_rank():
    return dist.get_rank() if is_distributed() else 0

def get_world_size():
    return dist.get_world_size() if is_distributed() else 1

def device():
    """This rank's device: its GPU under torchrun with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device('cpu')

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

def barrier():
    if is_distributed():
        dist.barrier()

def shutdown():
    if is_distributed():
        dist.destroy_process_group()

#----------------------------------------------------------------------------
