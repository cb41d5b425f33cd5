"""The body of every command line: the process group around it and its errors as one line."""

import click

from torch_utils import distributed
from torch_utils.errors import UserError, one_line

def run_command(fn, *args, **kwargs):
    """A command line's body: join torchrun's process group (if any), run fn, show a UserError as one
    click error line, and always leave the group (an undestroyed gloo group can abort the process at exit)."""
    distributed.init()
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        raise click.ClickException(one_line(err)) from None
    finally:
        distributed.shutdown()
