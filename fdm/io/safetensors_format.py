"""Network snapshots as .safetensors, the format of the Hugging Face ecosystem (and of k-diffusion's
releases): tensors only, with our JSON description of the network in the file's metadata.

Reading one cannot run code by construction (the format has no objects, only a JSON header and
raw tensor bytes, parsed by the safetensors library). The metadata holds the same description
our .pt snapshots hold, and a SHA-256 over description and tensors, so a damaged file is refused.
"""

import os

import safetensors
import safetensors.torch

from torch_utils.io.files import FileError, atomic_write, nested_digest, open_regular

FORMAT_NAME = 'fdm-snapshot'
FORMAT_VERSION = '1'
MAX_HEADER_BYTES = 64 << 20  # the JSON header of a network this code can build is far smaller

def is_safetensors(f):
    """Whether an open binary file starts as a safetensors file: an 8-byte little-endian header
    length, then '{'. Reads from the start and leaves the file there."""
    f.seek(0)
    head = f.read(9)
    f.seek(0)
    if len(head) < 9 or head[8:9] != b'{':
        return False
    return 0 < int.from_bytes(head[:8], 'little') <= os.fstat(f.fileno()).st_size - 8

def write_safetensors(path, description, tensors):
    """description: the JSON string of our snapshot; tensors: {name: tensor} of the denoiser."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    metadata = dict(format=FORMAT_NAME, version=FORMAT_VERSION, description=description,
        sha256=nested_digest(dict(description=description, ema=tensors)))
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))

def read_safetensors(path, name, error=FileError):
    """(description JSON string, {name: tensor}) of a file written by write_safetensors, checked."""
    remedy = 'the file is damaged or not a network snapshot; use another file'
    with open_regular(path, remedy, error=error) as f:  # safe_open takes a path: refuse a FIFO or a folder first
        header_bytes = int.from_bytes(f.read(8), 'little')
    if header_bytes > MAX_HEADER_BYTES:
        raise error(f'{name}: a safetensors header of {header_bytes} bytes is not a network snapshot; {remedy}')
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise error(f'{name}: cannot be read as safetensors ({type(err).__name__}: {" ".join(str(err).split())[:200]}); '
            f'{remedy}') from None
    if metadata.get('format') != FORMAT_NAME or 'description' not in metadata:
        raise error(f'{name}: a safetensors file without an FDM network description in its metadata; convert a '
            'snapshot with "python -m training.tools.convert SRC DST.safetensors"')
    if metadata.get('version') != FORMAT_VERSION:
        raise error(f'{name}: FDM safetensors version {metadata.get("version")!r} is not supported (this code reads '
            f'version {FORMAT_VERSION}); use the code that wrote it')
    if metadata.get('sha256') != nested_digest(dict(description=metadata['description'], ema=tensors)):
        raise error(f'{name}: checksum mismatch, the file is damaged; use another file')
    return metadata['description'], tensors  # the snapshot loader parses and checks the description
