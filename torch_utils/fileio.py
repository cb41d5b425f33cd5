"""Files that are never seen half-written, and the envelope every file of ours carries.

One writer for everything this code saves (snapshots, training states, PNGs, JSON, npz,
detector weights): the bytes go to a temporary file in the destination folder, are flushed
to the disk, and the file is renamed over the destination, so a crash or a full disk leaves
either the previous file or the complete new one. The file gets the permissions the umask
gives, like any file the user makes (mkstemp alone would make it private).

The envelope is a dict {'format': name, 'version': int, ..., 'sha256': digest} loaded with
torch.load(weights_only=True); check_envelope says in one line what is wrong with one.
"""

import hashlib
import json
import math
import os
import tempfile

import torch

from torch_utils.errors import UserError

class FileError(UserError):
    """A file that cannot be read or written; the message says which, why, and what to do."""

#----------------------------------------------------------------------------
# The umask, read once (reading it means setting it; doing so later could race with threads).

def _read_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

_UMASK = _read_umask()

# The rename reaches the disk only with the folder's entry; not every file system can sync a folder.
def fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

class _ErrorRecordingFile:
    """A file that remembers the OSError of a failed write: torch.save and PIL report one as
    their own exception ("unexpected pos"), and the user needs the real cause."""
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)

def atomic_write(path, write, durable=True):
    """Call write(f) on a binary file that becomes `path` only once it is complete.

    durable: fsync the file and its folder, so the new file survives a power cut. Generated
    PNGs pass False: fifty thousand fsyncs cost minutes, and a sample lost to a power cut is
    regenerated from its seed; the rename still means no reader ever sees half an image.
    Raises FileError naming the file for any failed write; the previous file is then unchanged.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # The temporary name says what it is for and does not end in the destination's suffix,
    # so a leftover of a killed process is recognisable and no image-folder scan picks it up.
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.tmp-{os.path.basename(path)}-', suffix='.part')
    except OSError as err:
        raise FileError(f'cannot write {path} ({err.strerror}); check that the folder exists and is writable') from None
    recorder = None
    try:
        with os.fdopen(fd, 'wb') as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            recorder = _ErrorRecordingFile(f)
            write(recorder)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(folder)
    except Exception as err:
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if not isinstance(cause, OSError):
            raise
        raise FileError(f'cannot write {path} ({cause.strerror or cause}); any previous version of it is '
            'unchanged; free disk space or fix permissions, then try again') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_save(obj, path):
    """torch.save(obj) to `path` through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))

def jsonable(value):
    """Strict JSON has no infinity or NaN: such floats are written as the strings 'inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

def write_json(path, obj, durable=True):
    """obj as indented JSON (non-finite floats as strings) through atomic_write."""
    text = json.dumps(jsonable(obj), indent=2) + '\n'
    atomic_write(path, lambda f: f.write(text.encode('utf-8')), durable=durable)

#----------------------------------------------------------------------------
# Digests: what a file's 'sha256' field holds.

def tensors_digest(tensors):
    """SHA-256 over names, dtypes, shapes and bytes of a flat {name: tensor} dict."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()

def nested_digest(obj):
    """SHA-256 over nested dicts, lists and tuples of tensors and plain values (dict keys sorted)."""
    h = hashlib.sha256()
    _update_digest(h, obj)
    return h.hexdigest()

def _update_digest(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f'D{len(obj)};'.encode())
        for key in sorted(obj, key=repr):
            h.update(f'{key!r}='.encode())
            _update_digest(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f'L{len(obj)};'.encode())
        for value in obj:
            _update_digest(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f'{type(obj).__name__}:{obj!r};'.encode())
    else:
        raise TypeError(f'cannot digest {type(obj).__name__}')

#----------------------------------------------------------------------------
# Reading an envelope.

def load_plain(f, name, remedy, error=FileError):
    """torch.load(weights_only=True) of a path or file: tensors and plain containers only, so
    opening the file can never run code. Any failure is one `error` naming the file."""
    try:
        return torch.load(f, map_location='cpu', weights_only=True)
    except Exception as err:
        raise error(f'{name}: cannot be read ({type(err).__name__}: {" ".join(str(err).split())[:200]}); '
            f'the file is damaged or truncated, {remedy}') from None

def check_envelope(data, format_name, versions, name, kind, remedy, error=FileError):
    """The header of a loaded file: a dict of format `format_name` at one of `versions`.
    kind names the expected file for the message ('an FDM network snapshot')."""
    if not isinstance(data, dict) or data.get('format') != format_name:
        raise error(f'{name}: not {kind}; {remedy}')
    if data.get('version') not in versions:
        raise error(f'{name}: {kind} of format version {data.get("version")!r} is not supported (this code reads '
            f'version {", ".join(str(v) for v in versions)}); use the code that wrote it')
    return data

def check_digest(expected, actual, name, remedy, error=FileError):
    if expected != actual:
        raise error(f'{name}: checksum mismatch, the file is damaged; {remedy}')
