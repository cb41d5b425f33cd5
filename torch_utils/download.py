"""Paths and URLs: a URL is downloaded once into the cache, through the one atomic writer, and
read from there afterwards; local paths and file:// URLs pass through."""

import contextlib
import hashlib
import os
import re
import urllib.parse

from torch_utils.fileio import atomic_write

#----------------------------------------------------------------------------
# Where downloads are kept: $FDM_CACHE_DIR, else ~/.cache/fdm.

def cache_dir(*parts):
    root = os.environ.get('FDM_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'fdm')
    return os.path.join(root, *parts)

def is_url(path):
    return re.match(r'^[a-z][a-z0-9+.-]*://', str(path)) is not None and not str(path).startswith('file://')

#----------------------------------------------------------------------------

def download_cached(url, cache=True, timeout=60, verbose=True):
    """The local path of a path or URL; a URL is fetched into the cache unless already there."""
    if str(url).startswith('file://'):
        return urllib.parse.urlparse(url).path
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'{url}: no such file; give an existing path or an http(s) URL')
        return url
    name = re.sub(r'[^0-9a-zA-Z._-]+', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()  # a file name for the URL, not a security check
    dest = cache_dir('downloads', f'{digest}_{name}')
    if cache and os.path.isfile(dest):
        return dest
    import requests  # imported lazily: only needed when something is downloaded
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if verbose:
        print(f'Downloading {url} ...', flush=True)
    try:
        with requests.get(url, stream=True, timeout=timeout) as res:
            res.raise_for_status()
            atomic_write(dest, lambda f: [f.write(chunk) for chunk in res.iter_content(chunk_size=1 << 20)])
    except requests.RequestException as err:
        raise IOError(f'could not download {url} ({err}); check the URL and the network, or download the file and pass its path') from None
    return dest

@contextlib.contextmanager
def open_url(url, cache=True, verbose=True):
    """Open a path or URL for binary reading; URLs are downloaded once into the cache."""
    with open(download_cached(url, cache=cache, verbose=verbose), 'rb') as f:
        yield f
