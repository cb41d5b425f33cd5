"""A writer of reference EDM/FDM network pickles and an assembler of hand-made ones, for the
tests that read them (test_checkpoint, test_fuzz_network_files, test_hostile_files). Not a test module:
pytest collects nothing here."""

import collections
import pickle
import struct
import types

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from torch_utils.io import safe_pickle

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

