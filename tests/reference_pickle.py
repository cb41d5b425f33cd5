"""A writer of reference EDM/FDM network pickles, for the tests that read them (test_checkpoint,
test_fuzz). Not a test module: pytest collects nothing here."""

import pickle

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

# A writer of the reference format (torch_utils.persistence of NVlabs/edm): every module except
# the torch containers reduces to _reconstruct_persistent_obj(meta) with its source and state.

MARKER_SOURCE = "open({path!r}, 'w').write('pwned')\n"

class ReferenceFormatPickler(pickle.Pickler):
    def __init__(self, f, top, module_src='', top_class_name=None):
        super().__init__(f, protocol=4)
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
