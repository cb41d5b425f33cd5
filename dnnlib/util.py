"""Attribute dicts, integer-list syntax, whole-line appends and the log tee."""

import os
import stat
import re
import sys

#----------------------------------------------------------------------------
# A dict whose keys are also attributes; reference pickles store dataset
# options as `dnnlib.util.EasyDict`, so the name must stay importable.

class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

#----------------------------------------------------------------------------

# '1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10], for --seeds and --cres. Entries below `minimum`,
# empty ranges and lists longer than `max_items` raise ValueError (checked before expanding, so
# a typo like 0-999999999 cannot exhaust memory).

def parse_int_list(s, minimum=0, max_items=None, too_many='', maximum=None):
    if isinstance(s, (list, tuple, range)):
        return list(s)
    out = []
    for part in str(s).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise ValueError(f'{s!r} is not a list of non-negative integers and ranges like "1,2,5-10"')
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f'the range {lo}-{hi} in {s!r} is empty; write the smaller number first')
        if lo < minimum:
            raise ValueError(f'{part.strip()!r} in {s!r} has a number below {minimum}; use integers >= {minimum}')
        if maximum is not None and hi > maximum:
            raise ValueError(f'{part.strip()!r} in {s!r} has a number above {maximum}; use integers <= {maximum}')
        if max_items is not None and len(out) + hi - lo + 1 > max_items:
            raise ValueError(f'{s!r} has more than {max_items:,} entries{too_many}')
        out.extend(range(lo, hi + 1))
    return out

# The inverse, [0, 1, 2, 7, 9, 10] -> '0-2,7,9-10': runs of consecutive integers become 'a-b'.
def format_int_list(values):
    parts, values = [], list(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f'{values[i]}-{values[j]}')
        i = j + 1
    return ','.join(parts)

# All of `data` at the end of the file open (O_APPEND) as `fd`, or none of it: a write cut short
# by a full disk or a file-size limit is undone by truncating back, then its OSError raised.
def append_whole(fd, data):
    size = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise

# Copy everything written to stdout/stderr into a log file (appending, each write whole), so
# log.txt holds what the user saw. When the file cannot be written (a full disk), the write
# raises `error` once, naming the file, and the tee goes on to the terminal only: reporting
# the failure must not fail again.
class Logger:
    def __init__(self, file_name, file_mode='a', error=OSError):
        self.file_name, self.error = file_name, error
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if 'a' in file_mode else os.O_TRUNC)
        # Never through a symbolic link (nothing outside the run folder is written), and never
        # blocking on a FIFO: only a regular file is logged to.
        flags |= getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_NONBLOCK', 0)
        try:
            self.fd = os.open(file_name, flags, 0o666)
        except OSError as err:
            raise error(f'cannot write {file_name} ({err.strerror}); free disk space or fix permissions, or remove '
                'it if it is a symbolic link') from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise error(f'cannot write {file_name}: it is not a regular file; remove it')
        os.set_blocking(self.fd, True)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = _Tee(self.stdout, self)
        sys.stderr = _Tee(self.stderr, self)

    def write(self, text):
        if self.fd is None:
            return
        try:
            append_whole(self.fd, text.encode('utf-8'))
        except OSError as err:
            self._close_file()
            raise self.error(f'cannot write {self.file_name} ({err.strerror}); it ends with the last complete '
                'message; free disk space or fix permissions, then resume the run') from None

    def _close_file(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self._close_file()

class _Tee:
    def __init__(self, stream, logger):
        self.stream, self.logger = stream, logger

    def write(self, text):
        self.stream.write(text)
        try:
            self.logger.write(text)
        except Exception:
            if not text.endswith('\n'):
                self.stream.write('\n')  # the error message then starts a line of its own
            raise

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)

#----------------------------------------------------------------------------
