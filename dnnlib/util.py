"""Attribute dicts, integer-list syntax and the log tee."""

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

def parse_int_list(s, minimum=0, max_items=None, too_many=''):
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

# Copy everything written to stdout/stderr into a log file (appending, line-buffered),
# so log.txt holds what the user saw, tracebacks included.
class Logger:
    def __init__(self, file_name, file_mode='a'):
        self.file = open(file_name, file_mode, buffering=1)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = _Tee(self.stdout, self.file)
        sys.stderr = _Tee(self.stderr, self.file)

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()

class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        if not self.file.closed:
            self.file.write(text)

    def flush(self):
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)

#----------------------------------------------------------------------------
