"""The name under which reference (EDM/FDM) pickles reconstruct their objects.

Reference network pickles store every module as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose `meta` carries
the source code of the module and the object's state; the reference executes
that source on load. We never do: `fdm.load_network` reads such files with a
restricted unpickler that maps this name to a plain record. This function
exists so that an ordinary `pickle.load` of such a file, with this package on
the path, fails loudly instead of running the embedded code.
"""

def _reconstruct_persistent_obj(meta):
    raise RuntimeError('this is a reference EDM/FDM network pickle; load it with fdm.load_network(path), '
        'which never executes the source code embedded in the file')
