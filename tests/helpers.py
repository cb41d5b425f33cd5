"""Helpers shared by the tests, beside the fixtures of conftest.py: the tiny training-loop
configuration and the loop run on it, a state comparison, a small network and the reference's
gradient sanitiser; and a writer of the reference's file formats (network pickles and training
states of NVlabs/edm's torch_utils.persistence), for the readers' tests. Not a test module."""

import collections
import contextlib
import pickle
import signal
import struct
import types

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from torch_utils.io import safe_pickle
from training.config import start_of
from training.training_loop import training_loop

#----------------------------------------------------------------------------
# The training loop on tiny configurations.

# The loop on a config made here, with its starting point read as train.py reads it.
def join_gloo(rank, world, port):
    """A spawned test process joins a CPU process group of `world` on localhost:port, one thread each."""
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)

def run_loop(run_dir, **config):
    return training_loop(run_dir=str(run_dir), start=start_of(config), **config)

# A tiny network and schedule for the loop; augmentation, dropout, warmup and gradient
# accumulation are all on, so that every source of randomness and state is exercised.
def loop_config(data, total_kimg=0.048, **overrides):
    c = dict(
        dataset_kwargs=dict(path=data, use_labels=True, xflip=True, cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='FDM_EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0.1, augment_dim=9, fdm_multiplier=2.0),
        loss_kwargs=dict(class_name='EDMLoss', warmup_ite=5),
        optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=dict(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1),
        seed=7, batch_size=8, batch_gpu=4, total_kimg=total_kimg, ema_halflife_kimg=0.02, lr_rampup_kimg=0.016,
        kimg_per_tick=0.016, snapshot_ticks=2, state_dump_ticks=1, grid_images=0, device='cpu',
    )
    c.update(overrides)
    return c

def assert_same_state(a, b):
    assert list(a) == list(b)  # zip below would stop at the shorter one
    for (ka, va), (kb, vb) in zip(a.items(), b.items()):
        assert ka == kb and torch.equal(va, vb), ka

#----------------------------------------------------------------------------
# A small plain network whose last layer gets no gradient, for the gradient-buffer kernels.

def small_net(channels_last=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.Linear(5, 2))
    net[5].requires_grad_(True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net

def backward(net, seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 3, 4, 4)
    net[:5](x).square().sum().backward()  # the last Linear gets no gradient: it must stay None

# The reference's per-tensor replacement, written out independently.
def reference_sanitize(grads):
    count = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return [torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5) for g in grads], count

#----------------------------------------------------------------------------
# A writer of the reference format (torch_utils.persistence of NVlabs/edm): every module except
# the torch containers reduces to _reconstruct_persistent_obj(meta) with its source and state.

MARKER_SOURCE = "open({path!r}, 'w').write('pwned')\n"

class ReferenceFormatPickler(pickle.Pickler):
    def __init__(self, f, top, module_src='', top_class_name=None, protocol=4):
        super().__init__(f, protocol=protocol)
        self.top = top
        self.module_src = module_src
        self.top_class_name = top_class_name or type(top).__name__

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__ != 'torch.nn.modules.container':
            state = dict(obj.__dict__)
            state.pop('init_kwargs', None)  # ours, not the reference's
            state['_init_args'] = ()
            state['_init_kwargs'] = dict(obj.init_kwargs) if obj is self.top else {}
            if obj is self.top:
                state['sigma_data'] = np.float64(0.5)  # numpy scalars occur in real files
            return self.record(self.top_class_name if obj is self.top else type(obj).__name__, state)
        if isinstance(obj, FakeLoss):
            return self.record('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, clamp_cur=np.float64(37.5),
                _init_args=(), _init_kwargs=dict(warmup_ite=np.float64(100.0))))
        return NotImplemented

    def record(self, class_name, state):
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=class_name, state=state)
        return persistence._reconstruct_persistent_obj, (meta,)

class FakeLoss:
    pass

def write_reference_pickle(path, net, module_src='', class_name=None):
    with open(path, 'wb') as f:
        ReferenceFormatPickler(f, net, module_src, class_name).dump(dict(ema=net, loss_fn=FakeLoss(), augment_pipe=None,
            dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip', resolution=8)))

# A reference training state: torch.save (a zip of data.pkl and storage files, pickle protocol 2)
# of {net: the live network as persistence records, optimizer_state}, as the reference's loop
# dumps it. torch.save subclasses the given module's Pickler to add the storage ids; `edit_state`
# may change each module's state (a test reorders parameters with it).
def write_reference_training_state(path, net, optimizer_state, edit_state=None):
    class Pickler(ReferenceFormatPickler):
        def __init__(self, f, protocol=2):
            super().__init__(f, net, protocol=protocol)

        def record(self, class_name, state):
            return super().record(class_name, edit_state(state) if edit_state else state)
    torch.save(dict(net=net, optimizer_state=optimizer_state), path, pickle_module=types.SimpleNamespace(__name__="pickle", Pickler=Pickler))

#----------------------------------------------------------------------------
# Hand-assembled pickles (protocol 2 opcodes), for the files no pickler writes: state set on a
# global, numpy dtypes with hostile states, tensors with hostile strides.

def op_unicode(text):
    raw = text.encode('utf-8', 'surrogatepass')
    return b'X' + struct.pack('<I', len(raw)) + raw

def op_bytes(data):
    return b'B' + struct.pack('<I', len(data)) + data

def op_int(n):
    return b'J' + struct.pack('<i', n) if -2**31 <= n < 2**31 else b'\x8a\x08' + struct.pack('<q', n)

def op_global(module, name):
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'

def op_tuple(*items):
    return b'(' + b''.join(items) + b't'

def op_dict(*pairs):
    return b'}' + (b'(' + b''.join(k + v for k, v in pairs) + b'u' if pairs else b'')

def op_call(module, name, *args):
    return op_global(module, name) + op_tuple(*args) + b'R'

def op_build(obj, state):
    """obj with BUILD(state) applied: a dict updates __dict__, (None, dict) sets attributes."""
    return obj + state + b'b'

NONE, TRUE, FALSE = b'N', b'\x88', b'\x89'

def op_dtype(typestr, state=None):
    """numpy.dtype(typestr) with a dtype __setstate__ state (default: that of a plain scalar)."""
    state = state or op_tuple(op_int(3), op_unicode('<'), NONE, NONE, NONE, op_int(-1), op_int(-1), op_int(0))
    return op_build(op_call('numpy', 'dtype', op_unicode(typestr), FALSE, TRUE), state)

def assembled(body):
    return b'\x80\x02' + body + b'.'

#----------------------------------------------------------------------------
# What a hostile load must leave as it was: everything a file can name, and torch's own
# rebuilders behind them.

def guarded_objects():
    objects = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch._utils._rebuild_tensor,
        dnnlib.EasyDict, collections.OrderedDict, safe_pickle.PersistentRecord, safe_pickle.PlainObject]
    return objects + list(safe_pickle.ALLOWED_GLOBALS.values()) + list(safe_pickle.ARRAY_GLOBALS.values())

# (__slotnames__ is copyreg's cache, set on a class the first time one of its objects is pickled.)
def attributes(obj):
    return (getattr(obj, '__defaults__', None), getattr(obj, '__kwdefaults__', None),
        {k: v for k, v in vars(obj).items() if k != '__slotnames__'} if hasattr(obj, '__dict__') else None)

#----------------------------------------------------------------------------
# Opening a FIFO for reading blocks until a writer comes: a reader that does so fails here instead
# (with an exception that no reader's `except Exception` takes for a damaged file).
class Blocked(BaseException):
    pass

@contextlib.contextmanager
def within(seconds):
    def expire(*_):
        raise Blocked(f'still blocked after {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
