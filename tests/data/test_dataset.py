"""ImageFolderDataset and InfiniteSampler on tiny datasets written inside each test."""

import io
import itertools
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.data.dataset import DatasetError, ImageFolderDataset, InfiniteSampler

# Written out of order and nested, so the sorted relative paths are
# a/img1.png, a/img10.png, b/img2.png, c.png.
NAMES = ['c.png', 'a/img10.png', 'b/img2.png', 'a/img1.png']
SORTED = sorted(NAMES)

def make_image(seed, res=8, channels=3):
    rng = np.random.default_rng(seed)
    shape = [res, res] if channels == 1 else [res, res, channels]
    return rng.integers(0, 256, size=shape, dtype=np.uint8)

def png_bytes(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png')
    return buf.getvalue()

# {relative path: bytes} -> a folder or an uncompressed zip under tmp_path.
def write_dataset(tmp_path, files, kind, name='data'):
    if kind == 'dir':
        root = tmp_path / name
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        root.mkdir(exist_ok=True)
        return str(root)
    path = tmp_path / f'{name}.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return str(path)

# The standard 4-image dataset; arrays keyed by relative path.
def standard(tmp_path, kind, labels=None, channels=3):
    arrays = {name: make_image(i, channels=channels) for i, name in enumerate(NAMES)}
    files = {name: png_bytes(a) for name, a in arrays.items()}
    if labels is not None:
        files['dataset.json'] = json.dumps(dict(labels=labels)).encode()
    return write_dataset(tmp_path, files, kind), arrays

def as_chw(array):
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

#----------------------------------------------------------------------------
# Reading.

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_reads_sorted_uint8_chw(tmp_path, kind):
    path, arrays = standard(tmp_path, kind)
    ds = ImageFolderDataset(path)
    assert len(ds) == 4 and ds.name == 'data'
    assert ds.image_shape == [3, 8, 8] and ds.num_channels == 3 and ds.resolution == 8
    assert not ds.has_labels and ds.label_shape == [0] and ds.label_dim == 0
    for idx, name in enumerate(SORTED):
        image, label = ds[idx]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, as_chw(arrays[name]))
        assert label.dtype == np.float32 and label.shape == (0,)

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_grayscale_is_one_channel(tmp_path, kind):
    path, arrays = standard(tmp_path, kind, channels=1)
    ds = ImageFolderDataset(path, resolution=8)
    image, _ = ds[0]
    assert ds.image_shape == [1, 8, 8]
    np.testing.assert_array_equal(image[0], arrays[SORTED[0]])

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_class_labels_are_one_hot(tmp_path, kind):
    classes = {'a/img1.png': 0, 'a/img10.png': 4, 'b/img2.png': 1, 'c.png': 4}
    path, _ = standard(tmp_path, kind, labels=[[name, c] for name, c in classes.items()])
    ds = ImageFolderDataset(path, use_labels=True)
    assert ds.has_labels and ds.has_onehot_labels and ds.label_shape == [5] and ds.label_dim == 5
    for idx, name in enumerate(SORTED):
        label = ds.get_label(idx)
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, np.eye(5, dtype=np.float32)[classes[name]])
        np.testing.assert_array_equal(ds[idx][1], label)

def test_vector_labels_are_float32(tmp_path):
    vectors = {name: [i * 0.5, -i] for i, name in enumerate(NAMES)}
    path, _ = standard(tmp_path, 'dir', labels=[[name, v] for name, v in vectors.items()])
    ds = ImageFolderDataset(path, use_labels=True)
    assert ds.has_labels and not ds.has_onehot_labels and ds.label_shape == [2]
    for idx, name in enumerate(SORTED):
        np.testing.assert_array_equal(ds.get_label(idx), np.float32(vectors[name]))

def test_labels_ignored_without_use_labels(tmp_path):
    path, _ = standard(tmp_path, 'zip', labels=[[name, 1] for name in NAMES])
    ds = ImageFolderDataset(path)
    assert not ds.has_labels and ds[0][1].shape == (0,)

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_xflip_appends_mirrored_copies(tmp_path, kind):
    path, _ = standard(tmp_path, kind, labels=[[name, i] for i, name in enumerate(NAMES)])
    plain = ImageFolderDataset(path, use_labels=True)
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert len(ds) == 8
    for idx in range(4):
        image, label = plain[idx]
        np.testing.assert_array_equal(ds[idx][0], image)
        np.testing.assert_array_equal(ds[idx + 4][0], image[:, :, ::-1])
        np.testing.assert_array_equal(ds[idx + 4][1], label)
        assert ds.get_details(idx + 4).xflip and not ds.get_details(idx).xflip

def test_max_size_is_a_seeded_sorted_subset_before_xflip(tmp_path):
    files = {f'{i:02d}.png': png_bytes(make_image(i)) for i in range(20)}
    path = write_dataset(tmp_path, files, 'dir')
    def raw(ds):
        return [ds.get_details(i).raw_idx for i in range(len(ds))]
    a = ImageFolderDataset(path, max_size=6, random_seed=3)
    b = ImageFolderDataset(path, max_size=6, random_seed=3 + 2**31) # seed is taken mod 2^31
    c = ImageFolderDataset(path, max_size=6, random_seed=4)
    expected = np.arange(20)
    np.random.RandomState(3).shuffle(expected)
    assert raw(a) == raw(b) == sorted(expected[:6].tolist())
    assert raw(c) != raw(a)
    flipped = ImageFolderDataset(path, max_size=6, random_seed=3, xflip=True)
    assert len(flipped) == 12 and raw(flipped) == raw(a) * 2
    assert raw(ImageFolderDataset(path, max_size=50)) == list(range(20)) # no truncation, no shuffle
    np.testing.assert_array_equal(a[0][0], as_chw(make_image(raw(a)[0])))

def test_cache_keeps_decoded_images(tmp_path):
    path, _ = standard(tmp_path, 'dir')
    cached, uncached = ImageFolderDataset(path, cache=True), ImageFolderDataset(path)
    first = cached[0][0]
    os.remove(os.path.join(path, SORTED[0]))
    np.testing.assert_array_equal(cached[0][0], first) # served from memory
    with pytest.raises(DatasetError, match=r"Cannot decode image 'a/img1\.png'"):
        uncached[0] # the file really is gone

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_pickle_round_trip_after_use(tmp_path, kind):
    path, _ = standard(tmp_path, kind)
    ds = ImageFolderDataset(path, xflip=True, cache=True)
    expected = [ds[i][0] for i in range(len(ds))] # opens the zip, fills the cache
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cache == {}
    for i in range(len(ds)):
        np.testing.assert_array_equal(clone[i][0], expected[i])

def test_dataloader_workers_read_the_zip(tmp_path):
    path, _ = standard(tmp_path, 'zip')
    ds = ImageFolderDataset(path)
    expected = np.stack([ds[i][0] for i in range(len(ds))]) # parent has the zip open before fork
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    images = torch.cat([batch[0] for batch in loader]).numpy()
    np.testing.assert_array_equal(images, expected)

#----------------------------------------------------------------------------
# User errors: one line that names the problem.

def check_error(match, *args, **kwargs):
    with pytest.raises(DatasetError, match=match) as info:
        ImageFolderDataset(*args, **kwargs)
    assert '\n' not in str(info.value)
    return str(info.value)

def test_missing_path(tmp_path):
    check_error('does not exist', str(tmp_path / 'nope'))

def test_not_a_folder_or_zip(tmp_path):
    (tmp_path / 'data.tar').write_bytes(b'x')
    check_error('neither a folder nor a .zip', str(tmp_path / 'data.tar'))

def test_broken_zip(tmp_path):
    (tmp_path / 'data.zip').write_bytes(b'this is not a zip')
    check_error('as a zip file', str(tmp_path / 'data.zip'))

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_no_images(tmp_path, kind):
    path = write_dataset(tmp_path, {'readme.txt': b'hello', 'dataset.json': b'{"labels": null}'}, kind)
    check_error('No image files', path)

def test_non_square(tmp_path):
    path = write_dataset(tmp_path, {'a.png': png_bytes(np.zeros([8, 6, 3], np.uint8))}, 'dir')
    check_error(r"'a\.png'.*6x8 \(WxH\).*square", path)

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_mixed_sizes_name_the_file_and_both_shapes(tmp_path, kind):
    files = {'a.png': png_bytes(make_image(0)), 'b.png': png_bytes(make_image(1)), 'c.png': png_bytes(make_image(2, res=16))}
    check_error(r"'c\.png' has shape \[3, 16, 16\].*'a\.png' has \[3, 8, 8\]", write_dataset(tmp_path, files, kind))

def test_mixed_channels(tmp_path):
    files = {'a.png': png_bytes(make_image(0)), 'b.png': png_bytes(make_image(1, channels=1))}
    check_error(r"'b\.png' has shape \[1, 8, 8\].*'a\.png' has \[3, 8, 8\]", write_dataset(tmp_path, files, 'dir'))

def test_wrong_resolution(tmp_path):
    path, _ = standard(tmp_path, 'zip')
    check_error('8x8 but resolution 16', path, resolution=16)

def test_palette_image_is_refused(tmp_path):
    buf = io.BytesIO()
    PIL.Image.fromarray(make_image(0)).convert('P').save(buf, format='png')
    check_error(r"'a\.png'.*mode 'P'", write_dataset(tmp_path, {'a.png': buf.getvalue()}, 'dir'))

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_unreadable_image_is_named(tmp_path, kind):
    files = {'a.png': png_bytes(make_image(0)), 'bad.png': b'\x00garbage, not an image'}
    check_error(r"Cannot read image 'bad\.png'", write_dataset(tmp_path, files, kind))

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_truncated_image_fails_when_loaded(tmp_path, kind):
    # The header is intact (construction succeeds); the pixel data is cut short.
    files = {'a.png': png_bytes(make_image(0)), 'b.png': png_bytes(make_image(1))[:80]}
    ds = ImageFolderDataset(write_dataset(tmp_path, files, kind))
    ds[0]
    with pytest.raises(DatasetError, match=r"Cannot decode image 'b\.png'"):
        ds[1]

def test_labels_requested_without_dataset_json(tmp_path):
    path, _ = standard(tmp_path, 'dir')
    message = check_error('no dataset.json', path, use_labels=True)
    assert '--cond=0' in message

def test_labels_requested_but_null(tmp_path):
    path = write_dataset(tmp_path, {'a.png': png_bytes(make_image(0)), 'dataset.json': b'{"labels": null}'}, 'zip')
    check_error(r'"labels": null.*--cond=0', path, use_labels=True)

@pytest.mark.parametrize('text, match', [
    (b'{"labels": [["a.png", 0]', 'not valid JSON'),
    (b'[["a.png", 0]]', 'must be an object with a "labels" key'),
    (b'{"labels": {"a.png": 0}}', 'list of \\[relative path, label\\] pairs'),
    (b'{"labels": [["a.png", 0, 1]]}', 'list of \\[relative path, label\\] pairs'),
    (b'{"labels": [["a.png", "cat"]]}', 'integer class indices'),
    (b'{"labels": [["a.png", -1]]}', 'non-negative'),
])
def test_malformed_dataset_json(tmp_path, text, match):
    path = write_dataset(tmp_path, {'a.png': png_bytes(make_image(0)), 'dataset.json': text}, 'dir')
    check_error(match, path, use_labels=True)

def test_ragged_label_vectors(tmp_path):
    labels = [['a.png', [1.0, 2.0]], ['b.png', [1.0]]]
    files = {'a.png': png_bytes(make_image(0)), 'b.png': png_bytes(make_image(1)), 'dataset.json': json.dumps(dict(labels=labels)).encode()}
    check_error('equal-length', write_dataset(tmp_path, files, 'dir'), use_labels=True)

def test_labels_missing_for_some_images(tmp_path):
    path, _ = standard(tmp_path, 'zip', labels=[['a/img1.png', 0], ['c.png', 1]])
    check_error(r"no label for 2 of 4 images \(first: 'a/img10\.png'\)", path, use_labels=True)

#----------------------------------------------------------------------------
# InfiniteSampler.

def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))

def test_sampler_is_deterministic_and_in_range():
    a = take(InfiniteSampler(13, seed=5), 200)
    assert a == take(InfiniteSampler(13, seed=5), 200)
    assert a != take(InfiniteSampler(13, seed=6), 200)
    assert all(isinstance(i, int) and 0 <= i < 13 for i in a)
    assert set(a) == set(range(13))
    assert a[:13] != list(range(13))

def test_sampler_without_shuffle_cycles_in_order():
    assert take(InfiniteSampler(5, shuffle=False), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]

def test_sampler_accepts_a_dataset(tmp_path):
    path, _ = standard(tmp_path, 'dir')
    ds = ImageFolderDataset(path, xflip=True)
    assert take(InfiniteSampler(ds, seed=1), 50) == take(InfiniteSampler(8, seed=1), 50)

def test_sampler_ranks_stride_one_global_sequence():
    full = take(InfiniteSampler(11, seed=2), 300)
    for rank in range(3):
        assert take(InfiniteSampler(11, rank=rank, num_replicas=3, seed=2), 100) == full[rank::3]

def test_sampler_resumes_exactly_from_state_dict():
    full = take(InfiniteSampler(17, seed=9), 500)
    first = InfiniteSampler(17, seed=9)
    it = iter(first)
    head = [next(it) for _ in range(123)]
    state = first.state_dict()
    assert state['position'] == 123
    json.dumps(state) # storable in a checkpoint as-is
    resumed = InfiniteSampler(17, seed=9)
    resumed.load_state_dict(state)
    assert head + take(resumed, 377) == full

def test_sampler_resumes_every_rank_from_images_seen():
    full = take(InfiniteSampler(10, seed=4, window_size=0.3), 600)
    cur_nimg = 3 * 57 # each of 3 ranks consumed 57 indices
    for rank in range(3):
        resumed = InfiniteSampler(10, rank=rank, num_replicas=3, seed=4, window_size=0.3, start_index=cur_nimg)
        assert take(resumed, 50) == full[cur_nimg + rank::3][:50]

def test_sampler_rejects_state_of_another_dataset():
    state = InfiniteSampler(17, seed=9).state_dict()
    with pytest.raises(ValueError, match='same dataset and seed'):
        InfiniteSampler(18, seed=9).load_state_dict(state)
