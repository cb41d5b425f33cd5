"""The one error type the command lines show to the user, and how they show it.

Every library error that a user can fix (a bad option, a damaged or hostile file, a full disk)
derives from UserError; its message says what is wrong and what to do. Each top-level script
turns a UserError into a one-line click error and lets anything else (a bug) raise.
"""

import re

class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

class OptionError(UserError, ValueError):
    """An option, or a combination of options, that cannot work; the message says what to change."""

class FileError(UserError):
    """A file that cannot be read or written; the message says which, why, and what to do."""

class EvaluationError(UserError):
    """Images that cannot be generated or scored as asked (generate.py, fid.py, the tables)."""

def describe_exception(err):
    """'TypeName: message' on one line, for wrapping a third-party error into our message."""
    return ' '.join(f'{type(err).__name__}: {err}'.split())

def one_line(err):
    """The message of `err` as one line. An error raised in a DataLoader worker arrives wrapped in
    the worker's traceback, whose last line is 'module.SomeError: message'; that line is kept."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) == 1:
        return lines[0]
    return re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1])
