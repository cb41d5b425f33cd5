"""Process groups that work under torchrun and as one plain process, on GPU or CPU."""

import contextlib
import datetime
import os
import re
import time

import torch
import torch.distributed as dist

from torch_utils.errors import EvaluationError, OptionError, UserError, describe_exception

#----------------------------------------------------------------------------
# Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
# MASTER_ADDR, ...). NCCL when CUDA is present, gloo otherwise. A plain process (no
# WORLD_SIZE) runs alone without any group, so nothing needs a free port or a GPU.
# timeout_s bounds every wait on the other processes (rendezvous, collectives, barriers): a
# process that died or hangs makes the others fail after at most that long instead of hanging.

def init(backend=None, timeout_s=1800):
    configure_cpu_threads()
    if dist.is_available() and dist.is_initialized():
        return
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 and 'MASTER_ADDR' not in os.environ:
        return
    if backend is None:
        backend = 'nccl' if torch.cuda.is_available() and dist.is_nccl_available() else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))

#----------------------------------------------------------------------------
# CPU threads. torch runs one thread per core; where other processes keep cores busy, every
# parallel kernel then waits for a thread the system has descheduled. Measured on 2 cores with
# a competing process, the digits demo's network: training 73 img/s with one thread against 9
# with two, EDM sampling 7.6 against 0.4 img/s. So a CPU process takes the cores that are idle
# now (at least one), shared among this machine's processes; OMP_NUM_THREADS, when set, is the
# user's choice and is kept. Idle now: measured over a quarter second from /proc/stat, not the
# 1-minute load average, which still counts work that ended a minute ago (the full demo right
# after a test run took 14 minutes on one thread of an idle machine).

def cpu_threads(cores, load, local_processes=1):
    return max(1, min(cores, round(cores - load)) // max(local_processes, 1))

# Cores busy over the next `seconds`, from the system's CPU time counters (Linux); elsewhere the
# 1-minute load average.
def _busy_cores(cores, seconds=0.25):
    def sample():
        with open('/proc/stat', encoding='ascii') as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # all, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))

_chosen_threads = []  # decided once per process: every command in it then computes alike

def configure_cpu_threads():
    """Set torch's thread count for a CPU run (see above); returns it, or None when left alone."""
    if 'OMP_NUM_THREADS' in os.environ or torch.cuda.is_available() or not hasattr(os, 'getloadavg'):
        return None
    if not _chosen_threads:
        cores = os.cpu_count() or 1
        _chosen_threads.append(cpu_threads(cores, _busy_cores(cores), int(os.environ.get('LOCAL_WORLD_SIZE', '1'))))
    torch.set_num_threads(_chosen_threads[0])
    return _chosen_threads[0]

# Gloo reports a peer that died as a closed or reset connection and a peer that hangs as a
# timed-out operation, both as plain RuntimeErrors; NCCL and the rendezvous store raise DistError.
_LOST_PEER = re.compile(r'connection (closed|reset|refused)|broken pipe|end of file|socket closed', re.I)
_TIMED_OUT = re.compile(r'time(d)? ?out', re.I)

def lost_process_message(err, timeout_s):
    """A one-line explanation if `err` means that another process died or hung, else None."""
    text = ' '.join(str(err).split())
    world = get_world_size() if is_distributed() else int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1 or not (isinstance(err, getattr(dist, 'DistError', ())) or (isinstance(err, RuntimeError) and
            (_LOST_PEER.search(text) or _TIMED_OUT.search(text) or 'gloo' in text.lower() or 'nccl' in text.lower()))):
        return None
    who = f'process {get_rank() if is_distributed() else os.environ.get("RANK", "?")} of {world}'
    if _TIMED_OUT.search(text):
        cause = f'another process did not respond within --timeout={timeout_s} s (it hangs, or is slower than that)'
    elif _LOST_PEER.search(text):
        cause = 'another process died (its connection closed)'
    else:
        cause = 'communication with the other processes failed'
    detail = text if len(text) <= 300 else text[:300] + '...'
    return (f'{who}: {cause}; stopping instead of waiting. Check the other processes\' logs, then resume with '
        f'--resume=<run dir>. ({detail})')

def is_distributed():
    return dist.is_available() and dist.is_initialized()

def get_rank():
    return dist.get_rank() if is_distributed() else 0

def get_world_size():
    return dist.get_world_size() if is_distributed() else 1

# The one reader of --device: a device this machine lacks is refused in one line before any work
# (torch would fail later, on the first tensor moved there, with a traceback).
def device(requested=None):
    """This rank's device: `requested` (a --device such as 'cpu', 'cuda' or 'cuda:1') if this
    machine has it, else OptionError; by default its GPU under torchrun with CUDA, else the CPU."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        return torch.device('cpu')
    try:
        chosen = torch.device(requested)
    except (RuntimeError, TypeError):
        raise OptionError(f'--device {requested!r} is not a device; use cpu, cuda or cuda:N') from None
    if chosen.type == 'cpu':
        return chosen
    count = _device_count(chosen.type)
    if count == 0:
        raise OptionError(f'--device {requested}: this machine has no {chosen.type} device that torch '
            f'{torch.__version__} can use; use --device cpu, or leave --device out (a GPU if there is one, else the CPU)')
    if chosen.index is not None and chosen.index >= count:
        raise OptionError(f'--device {requested}: this machine has {count} {chosen.type} device(s), '
            f'{chosen.type}:0 to {chosen.type}:{count - 1}; choose one of them')
    return chosen

# Devices of one type that torch can use here: CUDA GPUs, or those of the accelerator torch was built for (MPS, XPU).
def _device_count(kind):
    if kind == 'cuda':
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, 'accelerator') else None
    return torch.accelerator.device_count() if accelerator is not None and accelerator.type == kind else 0

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

def barrier():
    if is_distributed():
        dist.barrier()

# Rank 0 first, the others after it (e.g. rank 0 downloads into the cache that the others then
# read). Rank 0 releases the others even when its own work fails, so nobody waits for --timeout.
@contextlib.contextmanager
def rank0_first():
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()

def shutdown():
    if is_distributed():
        dist.destroy_process_group()

# Every rank must hold the same weights; a silent divergence would corrupt the run.
def check_ranks_agree(params):
    if not is_distributed():
        return
    digest = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [torch.zeros_like(digest) for _ in range(get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError('ranks hold different network weights; the distributed run is inconsistent')

# Rank 0 decides (a folder check, a list of work) and every rank acts on its decision.
def on_rank0(fn):
    """fn()'s result on rank 0, handed to every rank; an error on rank 0 is raised on every rank, so
    that none waits for a rank that has stopped."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as err:
            error = err
    if is_distributed():
        holder = [(result, None if error is None else (error if isinstance(error, UserError) else
            EvaluationError(f'rank 0 failed: {describe_exception(error)}')))]
        dist.broadcast_object_list(holder, src=0)
        result, shared = holder[0]
        error = error or shared
    if error is not None:
        raise error
    return result

#----------------------------------------------------------------------------
