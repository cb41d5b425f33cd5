"""Small infrastructure helpers: attribute dicts and cached URL access."""

from .util import EasyDict, open_url, cache_dir  # noqa: F401
