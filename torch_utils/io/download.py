"""Paths and URLs: a URL is downloaded once into the cache, through the one atomic writer, and
read from there afterwards; local paths and file:// URLs pass through. Next to each download,
`<file>.sha256` records its URL and the SHA-256 of the bytes received, so that a caller can tell
a cached file from one changed since (recorded_sha256)."""

import hashlib
import os
import re
import urllib.parse

from torch_utils.errors import FileError
from torch_utils.io.files import atomic_write, open_regular, read_json_bounded, write_json

#----------------------------------------------------------------------------
# Where downloads are kept: $FDM_CACHE_DIR, else ~/.cache/fdm.

def cache_dir(*parts):
    root = os.environ.get('FDM_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'fdm')
    return os.path.join(root, *parts)

def is_url(path):
    return re.match(r'^[a-z][a-z0-9+.-]*://', str(path)) is not None and not str(path).startswith('file://')

def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in chunks; FileError for anything but a regular file."""
    h = hashlib.sha256()
    with open_regular(path, 'give a regular file') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()

#----------------------------------------------------------------------------

# Where the download of `url` is kept; the md5 only makes a file name of the URL, it checks nothing.
def cache_path(url):
    name = re.sub(r'[^0-9a-zA-Z._-]+', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return cache_dir('downloads', f'{hashlib.md5(url.encode("utf-8")).hexdigest()}_{name}')

MAX_RECORD_BYTES = 1 << 16  # a record holds a URL and a digest

def recorded_sha256(url):
    """The SHA-256 recorded when `url` was downloaded into the cache, if the cached file still has
    it; None when it was never downloaded, has no record, or changed since."""
    dest = cache_path(url)
    try:
        record = read_json_bounded(dest + '.sha256', MAX_RECORD_BYTES, 'it is downloaded again')
        recorded = record.get('url') == url and record.get('sha256') == file_sha256(dest)
    except (OSError, FileError):  # missing, damaged, or not a regular file: no record
        return None
    return record['sha256'] if recorded else None

def download_cached(url, cache=True, timeout=60, verbose=True, verify=False):
    """The local path of a path or URL; a URL is fetched into the cache unless already there
    (with verify, unless already there and matching its record)."""
    if str(url).startswith('file://'):
        return urllib.parse.urlparse(url).path
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'{url}: no such file; give an existing path or an http(s) URL')
        return url
    dest = cache_path(url)
    if cache and os.path.isfile(dest) and (not verify or recorded_sha256(url) is not None):
        return dest
    import requests  # imported lazily: only needed when something is downloaded
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if verbose:
        print(f'Downloading {url} ...', flush=True)
    digest = hashlib.sha256()
    def write(f):
        for chunk in res.iter_content(chunk_size=1 << 20):
            digest.update(chunk)
            f.write(chunk)
    try:
        with requests.get(url, stream=True, timeout=timeout) as res:
            res.raise_for_status()
            atomic_write(dest, write)
    except requests.RequestException as err:
        raise IOError(f'could not download {url} ({err}); check the URL and the network, or download the file and pass its path') from None
    # Written after the file: a crash in between leaves a file without a record, which
    # verify fetches again.
    write_json(dest + '.sha256', dict(url=url, sha256=digest.hexdigest()))
    return dest
