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
import stat
import tempfile

import torch

import dnnlib
from torch_utils.errors import FileError

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

# Ctrl-C or SIGTERM in the middle of torch.save: its zip writer's cleanup then fails on the half-
# written archive ("unexpected pos ..."), and that error hides the interruption the caller must see
# (train.py exits 130 with where the last complete state is). The interruption is what happened.
def _interrupt_behind(err):
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__context__
    return None

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
        interrupt = _interrupt_behind(err)
        if interrupt is not None:
            raise interrupt from None
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if not isinstance(cause, OSError):
            raise
        raise FileError(f'cannot write {path} ({cause.strerror or cause}); any previous version of it is '
            'unchanged; free disk space or fix permissions, then try again') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

# Every output path is checked before the work that makes it, so a bad one costs nothing and
# leaves nothing: the check creates no folder and leaves no file.
def check_destination(path, what, folder=False, append=False, remedy=None):
    """Raise a one-line FileError unless `path` can be written: a file (or with folder=True a folder
    to write into) whose missing parent folders can be made in the nearest existing one, which
    must be a writable folder. append: an existing entry must also open for appending, as a
    regular file of its own (open_in_place).
    what: the option or file named in the message (e.g. '--grid')."""
    remedy = remedy or f'choose another {what}'
    path = os.fspath(path)
    if not path:
        raise FileError(f'{what} is empty; give a path')
    if os.path.isdir(path) and not folder:
        raise FileError(f"{what} '{path}' is a folder, not a file; {remedy}")
    if os.path.exists(path) and not os.path.isdir(path) and folder:
        raise FileError(f"{what} '{path}' is a file, not a folder; {remedy}")
    existing = path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileError(f"{what} '{path}' lies below '{existing}', which is a file, not a folder; {remedy}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.tmp-write-test-', suffix='.part')
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise FileError(f"cannot write to {what} '{path}' ({err.strerror}); {remedy}") from None
    if append and os.path.lexists(path):
        os.close(open_in_place(path, os.O_WRONLY | os.O_APPEND, remedy))

# A file changed in place (appended to, truncated, locked) is the one write that a symbolic link
# would carry out of its folder, and the one open that a FIFO would block: both are refused.
# (Whole files go through atomic_write, whose rename replaces a link and never follows it.)
def open_in_place(path, flags, remedy):
    """os.open(path, flags) for a change in place, as a file descriptor; a one-line FileError naming
    `path` and `remedy` if it is a symbolic link or anything but a regular file (O_CREAT makes it)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as err:
        problem = entry_problem(path)
        raise FileError(f'cannot write {path}: it {problem}; {remedy}' if problem else
            f'cannot write {path} ({err.strerror}); {remedy}') from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileError(f'cannot write {path}: it {entry_problem(path) or "is not a regular file"}; {remedy}')
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise

def entry_problem(path):
    """None for a regular file or nothing at `path`; else what is there instead, for a message:
    'is a symbolic link', 'is a folder' or 'is not a regular file (a FIFO, socket or device)'."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        return 'is a symbolic link'
    if stat.S_ISDIR(mode):
        return 'is a folder'
    return None if stat.S_ISREG(mode) else 'is not a regular file (a FIFO, socket or device)'

def append_line(path, line):
    """Append one line of text to `path` (made if missing) whole or not at all: a full disk leaves
    the file as it was, and the error is one FileError naming the file."""
    fd = open_in_place(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        'make it a writable file of its own, then resume the run')
    try:
        dnnlib.util.append_whole(fd, line.encode('utf-8'))
    except OSError as err:
        raise FileError(f'cannot write {path} ({err.strerror or err}); it ends with its last complete line; free disk '
            'space or fix permissions, then resume the run') from None
    finally:
        os.close(fd)

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

# Every file read by name goes through open_regular: a FIFO, a device or a folder put where a
# file belongs would otherwise hang the open or the read, or be read without end.
def open_regular(path, remedy, error=FileError, follow_symlinks=True):
    """Open `path` for reading in binary mode; raise a one-line `error` naming the file and `remedy`
    unless it is a regular file (a symlink to one is followed unless follow_symlinks=False)."""
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0)  # a FIFO must not block the open
    if not follow_symlinks:
        flags |= getattr(os, 'O_NOFOLLOW', 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise error(f'cannot read {path} ({err.strerror}); {remedy}') from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f'{path} is not a regular file; {remedy}')
        if hasattr(os, 'set_blocking'):
            os.set_blocking(fd, True)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise

# A small JSON file of the user's own (a run folder's options): a regular file, at most max_bytes,
# an object; anything else is one line naming the file and `remedy`.
def read_json_bounded(path, max_bytes, remedy):
    with open_regular(path, remedy) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise FileError(f'cannot read {path} ({err.strerror}); {remedy}') from None
    if len(data) > max_bytes:
        raise FileError(f'{path} is larger than {max_bytes:,} bytes; it is not what this code wrote, {remedy}')
    return loads_bounded(data, path, remedy)

MAX_JSON_DEPTH = 32  # our JSON nests at most 4 levels (training_options.json)
MAX_JSON_INT_DIGITS = 20  # any count of ours fits in 64 bits

def _bounded_int(text):
    if len(text.lstrip('-')) > MAX_JSON_INT_DIGITS:
        raise ValueError(f'an integer of {len(text)} digits')
    return int(text)

def _json_depth_error(obj):
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f'nested deeper than {MAX_JSON_DEPTH} levels'
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return None

# The one parser of JSON that this code reads back (options, records, stats lines, snapshot
# descriptions): integers bounded to 20 digits and nesting to MAX_JSON_DEPTH, so a damaged or
# hostile file cannot turn a later computation into a traceback or an unbounded cost.
def loads_bounded(data, name, remedy, kind=dict, error=FileError):
    """Parse JSON `data` (str or bytes); raise a one-line `error` naming `name` and `remedy` unless
    it is valid, within the bounds and of type `kind` (None: any)."""
    try:
        obj = json.loads(data, parse_int=_bounded_int)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        why = str(err) if 'integer of' in str(err) else type(err).__name__
        raise error(f'{name} is not valid JSON ({why}); {remedy}') from None
    problem = _json_depth_error(obj)
    if problem is None and kind is not None and not isinstance(obj, kind):
        problem = f'not a JSON {"object" if kind is dict else kind.__name__}'
    if problem is not None:
        raise error(f'{name} is {problem}; {remedy}')
    return obj

def write_json(path, obj, durable=True):
    """obj as indented JSON (non-finite floats as strings) through atomic_write."""
    text = json.dumps(jsonable(obj), indent=2) + '\n'
    atomic_write(path, lambda f: f.write(text.encode('utf-8')), durable=durable)

#----------------------------------------------------------------------------
# Digests: what a file's 'sha256' field holds. A loaded file is first checked with tree_error:
# the digest reads every element of every tensor, and a file must not make that cost more
# than the bytes it stores, nor nest deeper than a digest can recurse.

MAX_DEPTH = 64  # far more nesting than any of our files (a training state has 5 levels)
MAX_VALUES = 10**6  # values in one file (a training state of a CIFAR-10 network: a few thousand)

def is_dense(t):
    """True if t's elements occupy distinct storage slots without gaps, in any dimension order
    (row-major, channels-last, transposed): a stride-0 or overlapping view stands for more
    elements than it stores."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True

def stored_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`: what a file really holds of them."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = max(storages.get((s.device, s.data_ptr()), 0), s.nbytes())
    return sum(storages.values())

def tree_error(obj, max_depth=MAX_DEPTH, max_values=MAX_VALUES):
    """None, or why a loaded tree of dicts, lists and tensors must not be digested or used:
    nested deeper than max_depth (or cyclic), more than max_values values (counting a value
    each time it is reached, as a digest does), a tensor that is not dense, or tensors that
    claim more bytes than their storages hold (one storage reached through many views)."""
    tensors, pending, count = [], [(obj, 0)], 0
    while pending:
        node, depth = pending.pop()
        count += 1
        if depth > max_depth or count > max_values:
            return f'more than {max_depth} levels of nesting or {max_values} values'
        if isinstance(node, torch.Tensor):
            if not is_dense(node):
                return f'a tensor of shape {list(node.shape)} is not stored densely (strides {list(node.stride())})'
            tensors.append(node)
        elif isinstance(node, dict):
            pending += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, (list, tuple)):
            pending += [(v, depth + 1) for v in node]
    claimed, stored = sum(t.numel() * t.element_size() for t in tensors), stored_bytes(tensors)
    if claimed > stored:
        return f'its tensors claim {claimed} bytes but their storages hold {stored}'
    return None

def tensors_digest(tensors):
    """SHA-256 over names, dtypes, shapes and bytes of a flat {name: tensor} dict."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()

def nested_digest(obj):
    """SHA-256 over nested dicts, lists and tuples of tensors and plain values (dict keys sorted);
    ValueError beyond MAX_DEPTH levels."""
    h = hashlib.sha256()
    _update_digest(h, obj, 0)
    return h.hexdigest()

def _update_digest(h, obj, depth):
    if depth > MAX_DEPTH:
        raise ValueError(f'containers nested more than {MAX_DEPTH} levels deep')
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f'D{len(obj)};'.encode())
        for key in sorted(obj, key=repr):
            h.update(f'{key!r}='.encode())
            _update_digest(h, obj[key], depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f'L{len(obj)};'.encode())
        for value in obj:
            _update_digest(h, value, depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f'{type(obj).__name__}:{obj!r};'.encode())
    else:
        raise TypeError(f'cannot digest {type(obj).__name__}')

#----------------------------------------------------------------------------
# Reading an envelope.

def load_plain(f, name, remedy, error=FileError):
    """A torch.save file (path or open file) of tensors and plain containers, read by the allow-list
    unpickler: opening it can never run code, and its cost is bounded by its size (torch.load's own
    unpickler, even with weights_only=True, spends minutes on a dict of keys with colliding hashes).
    Any failure is one `error` naming the file."""
    from torch_utils.io.safe_pickle import restricted_load_torch_zip  # safe_pickle imports this module
    if isinstance(f, (str, os.PathLike)):
        with open_regular(f, remedy, error=error) as opened:
            return load_plain(opened, name, remedy, error)
    try:
        return restricted_load_torch_zip(f)
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
