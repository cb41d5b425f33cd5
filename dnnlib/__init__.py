"""Small helpers that know nothing of torch: attribute dicts, integer lists, the log tee."""

from .util import EasyDict  # noqa: F401
