"""trquant_examples.datasets: the in-memory dataset loaders, on small files the tests write themselves."""

import gzip
import itertools
import os
import pickle
import struct
import time

import numpy as np
import pytest

from trquant_examples import datasets as data

pytestmark = pytest.mark.integration  # `python -m pytest -m integration`

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
  """Tests see TRQUANT_DATA_DIR only where they set it (the real-data test reads it first)."""
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def test_digits_shapes_dtypes_range(digits):
  assert digits.name == "digits" and digits.num_classes == 10
  assert digits.train_images.shape == (1400, 8, 8, 1)
  assert digits.test_images.shape == (397, 8, 8, 1)
  assert digits.image_shape == (8, 8, 1)
  assert digits.train_labels.shape == (1400,) and digits.test_labels.shape == (397,)
  for images in (digits.train_images, digits.test_images):
    assert images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
  for labels in (digits.train_labels, digits.test_labels):
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))


def test_digits_split_is_a_partition_and_deterministic(digits):
  from sklearn import datasets
  original = datasets.load_digits()
  assert repr(digits) == ("Dataset(name='digits', train=1400, test=397, image_shape=(8, 8, 1), "
                          "num_classes=10)")
  images = np.concatenate([digits.train_images, digits.test_images])[..., 0] * 16
  # Same multiset of (image, label) pairs as scikit-learn's, in a shuffled order.
  ours = sorted(zip(map(bytes, images.round().astype(np.uint8)),
                    np.concatenate([digits.train_labels, digits.test_labels])))
  theirs = sorted(zip(map(bytes, original.images.astype(np.uint8)), original.target))
  assert ours == theirs
  assert not np.array_equal(np.concatenate([digits.train_labels, digits.test_labels]),
                            original.target)
  again = data.load_digits(seed=0)
  np.testing.assert_array_equal(again.train_images, digits.train_images)
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)
  other = data.load_digits(seed=1)
  assert not np.array_equal(other.train_labels, digits.train_labels)
  small = data.load_digits(test_size=100, seed=3)
  assert len(small.train_images) == 1697 and len(small.test_images) == 100
  for bad in (0, 1797, -5):
    with pytest.raises(ValueError, match="test_size"):
      data.load_digits(test_size=bad)


# ---------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------


def _idx_bytes(array, magic):
  array = np.asarray(array, dtype=np.uint8)
  return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def _write(path, content, compress):
  if compress:
    path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(content))
  else:
    path.write_bytes(content)
  return path


def _tiny_mnist():
  rng = np.random.default_rng(42)
  train_images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
  train_images[0, 3, 7] = 255
  train_images[0, 0, 0] = 0
  test_images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
  test_images[2, 27, 1] = 17
  train_labels = np.array([9, 0, 3, 3, 7], np.uint8)
  test_labels = np.array([1, 8, 2], np.uint8)
  return train_images, train_labels, test_images, test_labels


def _write_mnist(directory, compress=True, arrays=None):
  directory.mkdir(parents=True, exist_ok=True)
  arrays = arrays if arrays is not None else _tiny_mnist()
  magics = (2051, 2049, 2051, 2049)
  for name, array, magic in zip(IDX_NAMES, arrays, magics):
    _write(directory / name, _idx_bytes(array, magic), compress)
  return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_exact(tmp_path, compress):
  train_images, train_labels, test_images, test_labels = _write_mnist(tmp_path, compress)
  dataset = data.load_mnist_idx(tmp_path)
  assert dataset.name == "fashion-mnist" and dataset.num_classes == 10
  assert dataset.train_images.shape == (5, 28, 28, 1) and dataset.test_images.shape == (3, 28, 28, 1)
  assert dataset.train_images.dtype == np.float32 and dataset.train_labels.dtype == np.int32
  np.testing.assert_array_equal(dataset.train_images[..., 0], train_images / np.float32(255))
  np.testing.assert_array_equal(dataset.test_images[..., 0], test_images / np.float32(255))
  np.testing.assert_array_equal((dataset.train_images * 255).round().astype(np.uint8)[..., 0],
                                train_images)
  assert dataset.train_images[0, 3, 7, 0] == 1.0 and dataset.train_images[0, 0, 0, 0] == 0.0
  assert dataset.test_images[2, 27, 1, 0] == np.float32(17 / 255)
  np.testing.assert_array_equal(dataset.train_labels, train_labels)
  np.testing.assert_array_equal(dataset.test_labels, test_labels)
  mnist = data.load_dataset("mnist", tmp_path)
  assert mnist.name == "mnist"
  np.testing.assert_array_equal(mnist.test_images, dataset.test_images)


def test_idx_mixed_compression(tmp_path):
  arrays = _write_mnist(tmp_path, compress=True)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(arrays[3], 2049), compress=False)
  np.testing.assert_array_equal(data.load_mnist_idx(tmp_path).test_labels, arrays[3])


def _corrupt(directory, file_name, content):
  path = directory / file_name
  path.write_bytes(content)


def test_idx_wrong_magic(tmp_path):
  arrays = _write_mnist(tmp_path)
  _corrupt(tmp_path, "train-labels-idx1-ubyte.gz", gzip.compress(_idx_bytes(arrays[1], 2051)))
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
    data.load_mnist_idx(tmp_path)


def test_idx_images_with_label_magic(tmp_path):
  arrays = _write_mnist(tmp_path)
  _corrupt(tmp_path, "t10k-images-idx3-ubyte.gz", gzip.compress(_idx_bytes(arrays[2], 2049)))
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*magic"):
    data.load_mnist_idx(tmp_path)


def test_idx_truncated_payload(tmp_path):
  arrays = _write_mnist(tmp_path)
  content = _idx_bytes(arrays[0], 2051)[:-100]
  _corrupt(tmp_path, "train-images-idx3-ubyte.gz", gzip.compress(content))
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
    data.load_mnist_idx(tmp_path)


def test_idx_truncated_header(tmp_path):
  _write_mnist(tmp_path, compress=False)
  _corrupt(tmp_path, "t10k-images-idx3-ubyte", struct.pack(">II", 2051, 3))
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*header"):
    data.load_mnist_idx(tmp_path)
  _corrupt(tmp_path, "t10k-images-idx3-ubyte", b"\x00\x00")
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*header"):
    data.load_mnist_idx(tmp_path)


def test_idx_truncated_gzip_stream(tmp_path):
  arrays = _write_mnist(tmp_path)
  compressed = gzip.compress(_idx_bytes(arrays[0], 2051))
  _corrupt(tmp_path, "train-images-idx3-ubyte.gz", compressed[:len(compressed) // 2])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
    data.load_mnist_idx(tmp_path)


def test_idx_count_mismatch(tmp_path):
  arrays = list(_tiny_mnist())
  arrays[3] = arrays[3][:2]  # 3 test images, 2 test labels
  _write_mnist(tmp_path, arrays=arrays)
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*2 labels.*3 images"):
    data.load_mnist_idx(tmp_path)


def test_idx_label_out_of_range(tmp_path):
  arrays = list(_tiny_mnist())
  arrays[1] = np.array([9, 0, 3, 10, 7], np.uint8)
  _write_mnist(tmp_path, arrays=arrays)
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*label 10"):
    data.load_mnist_idx(tmp_path)


def test_missing_directory_or_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="TRQUANT_DATA_DIR") as info:
    data.load_mnist_idx(None)
  assert "--data-dir" in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)
  with pytest.raises(FileNotFoundError, match="TRQUANT_DATA_DIR"):
    data.load_mnist_idx(tmp_path / "does-not-exist")
  _write_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    data.load_mnist_idx(tmp_path)
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    data.load_cifar(tmp_path)


def test_env_var_resolution(tmp_path, monkeypatch):
  arrays = _write_mnist(tmp_path / "fashion-mnist")
  # The environment variable pointing at the files' folder, or at its parent.
  for value in (tmp_path / "fashion-mnist", tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(value))
    assert data.resolve_data_dir(None, "fashion-mnist") == tmp_path / "fashion-mnist"
    dataset = data.load_dataset("fashion-mnist")
    np.testing.assert_array_equal(dataset.train_labels, arrays[1])
  # An explicit data_dir wins over the variable, and also finds the name subfolder.
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "elsewhere"))
  assert data.resolve_data_dir(tmp_path, "fashion-mnist") == tmp_path / "fashion-mnist"
  with pytest.raises(FileNotFoundError, match="TRQUANT_DATA_DIR"):
    data.load_dataset("fashion-mnist")
  # No mnist/ subfolder: Fashion-MNIST is not passed off as MNIST.
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="'mnist'"):
    data.load_dataset("mnist")
  # Files directly in the folder take precedence over a name subfolder.
  direct = _write_mnist(tmp_path, arrays=[a[::-1].copy() for a in arrays])
  np.testing.assert_array_equal(data.load_dataset("fashion-mnist").train_labels, direct[1])


def test_load_dataset_unknown_name():
  with pytest.raises(ValueError, match="digits, fashion-mnist, mnist, cifar10, cifar100"):
    data.load_dataset("imagenet")
  assert data.load_dataset("digits").train_images.shape == (1400, 8, 8, 1)


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------


def _cifar_pixels(rng, n):
  return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path, batch):
  with open(path, "wb") as f:
    pickle.dump(batch, f)


def _write_cifar10(directory, sizes=(2, 3, 1, 2, 2), test_size=3):
  """Tiny CIFAR-10 pickles in the real format; returns the raw (N, 3072) pixels and labels."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(7)
  train_pixels, train_labels = [], []
  for i, size in enumerate(sizes, start=1):
    pixels = _cifar_pixels(rng, size)
    labels = [int(x) for x in rng.integers(0, 10, size)]
    # Like the real files: labels a list of ints, plus metadata keys.
    _dump(directory / f"data_batch_{i}", {
        b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
        b"data": pixels, b"filenames": [b"x.png"] * size})
    train_pixels.append(pixels)
    train_labels += labels
  test_pixels = _cifar_pixels(rng, test_size)
  test_labels = [int(x) for x in rng.integers(0, 10, test_size)]
  _dump(directory / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                   b"labels": test_labels, b"data": test_pixels})
  return np.concatenate(train_pixels), np.array(train_labels), test_pixels, np.array(test_labels)


def _check_cifar_pixels(images, pixels):
  """images[n, row, col, channel] == pixels[n, channel * 1024 + row * 32 + col] / 255."""
  assert images.shape == (len(pixels), 32, 32, 3) and images.dtype == np.float32
  assert images.flags.c_contiguous
  rng = np.random.default_rng(0)
  for n, row, col, channel in itertools.product(range(len(pixels)), (0, 5, 31), (0, 17, 31),
                                                 range(3)):
    assert images[n, row, col, channel] == np.float32(pixels[n, channel * 1024 + row * 32 + col]
                                                      / np.float32(255))
  for _ in range(50):
    n, row, col, channel = rng.integers(len(pixels)), *rng.integers(32, size=2), rng.integers(3)
    assert images[n, row, col, channel] * 255 == pytest.approx(
        pixels[n, channel * 1024 + row * 32 + col], abs=1e-4)


@pytest.mark.parametrize("subfolder", [None, "cifar-10-batches-py", "cifar10"])
def test_cifar10(tmp_path, subfolder):
  directory = tmp_path / subfolder if subfolder else tmp_path
  train_pixels, train_labels, test_pixels, test_labels = _write_cifar10(directory)
  dataset = data.load_cifar(tmp_path)
  assert dataset.name == "cifar10" and dataset.num_classes == 10
  assert dataset.image_shape == (32, 32, 3)
  assert len(dataset.train_images) == 10 and len(dataset.test_images) == 3
  _check_cifar_pixels(dataset.train_images, train_pixels)
  _check_cifar_pixels(dataset.test_images, test_pixels)
  assert dataset.train_labels.dtype == np.int32
  np.testing.assert_array_equal(dataset.train_labels, train_labels)
  np.testing.assert_array_equal(dataset.test_labels, test_labels)
  same = data.load_dataset("cifar10", tmp_path)
  np.testing.assert_array_equal(same.train_images, dataset.train_images)


def test_cifar_channel_major_placement(tmp_path):
  """One bright pixel per channel lands at its (row, col, channel), nowhere else."""
  _write_cifar10(tmp_path)
  pixels = np.zeros((1, 3072), np.uint8)
  pixels[0, 0 * 1024 + 2 * 32 + 5] = 200  # red at (2, 5)
  pixels[0, 1 * 1024 + 30 * 32 + 1] = 100  # green at (30, 1)
  pixels[0, 2 * 1024 + 7 * 32 + 31] = 255  # blue at (7, 31)
  _dump(tmp_path / "test_batch", {b"labels": [4], b"data": pixels})
  image = data.load_cifar(tmp_path).test_images[0]
  expected = np.zeros((32, 32, 3), np.float32)
  expected[2, 5, 0], expected[30, 1, 1], expected[7, 31, 2] = 200 / 255, 100 / 255, 1.0
  np.testing.assert_allclose(image, expected, rtol=0, atol=1e-7)
  assert image[7, 31, 2] == 1.0


@pytest.mark.parametrize("subfolder", [None, "cifar-100-python", "cifar100/cifar-100-python"])
def test_cifar100(tmp_path, subfolder):
  directory = tmp_path / subfolder if subfolder else tmp_path
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(3)
  train_pixels, test_pixels = _cifar_pixels(rng, 6), _cifar_pixels(rng, 4)
  train_fine, test_fine = [0, 99, 42, 7, 55, 99], [98, 1, 0, 63]
  _dump(directory / "train", {b"data": train_pixels, b"fine_labels": train_fine,
                              b"coarse_labels": [19, 0, 3, 1, 2, 19]})
  _dump(directory / "test", {b"data": test_pixels, b"fine_labels": test_fine,
                             b"coarse_labels": [18, 0, 4, 5]})
  dataset = data.load_dataset("cifar100", tmp_path)
  assert dataset.name == "cifar100" and dataset.num_classes == 100
  _check_cifar_pixels(dataset.train_images, train_pixels)
  _check_cifar_pixels(dataset.test_images, test_pixels)
  np.testing.assert_array_equal(dataset.train_labels, train_fine)
  np.testing.assert_array_equal(dataset.test_labels, test_fine)


def test_cifar_malformed(tmp_path):
  _write_cifar10(tmp_path)
  _dump(tmp_path / "data_batch_3", {b"data": _cifar_pixels(np.random.default_rng(0), 2),
                                    b"fine_labels": [1, 2]})
  with pytest.raises(ValueError, match=r"data_batch_3.*b'labels'"):
    data.load_cifar(tmp_path)
  _dump(tmp_path / "data_batch_3", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]})
  with pytest.raises(ValueError, match=r"data_batch_3.*3072"):
    data.load_cifar(tmp_path)
  _dump(tmp_path / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]})
  with pytest.raises(ValueError, match="data_batch_3"):
    data.load_cifar(tmp_path)
  _dump(tmp_path / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]})
  with pytest.raises(ValueError, match=r"data_batch_3.*0\.\.9"):
    data.load_cifar(tmp_path)
  (tmp_path / "data_batch_3").write_bytes(b"not a pickle at all")
  with pytest.raises(ValueError, match="data_batch_3"):
    data.load_cifar(tmp_path)
  with pytest.raises(ValueError, match="10 or 100"):
    data.load_cifar(tmp_path, num_classes=20)


# ---------------------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------------------


def test_normalize_per_channel():
  rng = np.random.default_rng(0)
  scale = np.array([0.1, 0.5, 2.0], np.float32)
  shift = np.array([0.2, -1.0, 5.0], np.float32)
  train = rng.normal(size=(300, 6, 5, 3)).astype(np.float32) * scale + shift
  test = rng.normal(size=(40, 6, 5, 3)).astype(np.float32) * scale + shift
  dataset = data.Dataset("toy", train, np.zeros(300, np.int32), test, np.zeros(40, np.int32), 2)
  normalized = data.normalize(dataset)
  assert normalized is not dataset and normalized.name == "toy"
  assert normalized.train_images.dtype == np.float32 and normalized.test_images.dtype == np.float32
  np.testing.assert_allclose(normalized.train_images.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(normalized.train_images.std(axis=(0, 1, 2)), 1, atol=1e-5)
  # The test split uses the train statistics, not its own.
  mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
  np.testing.assert_allclose(normalized.test_images, (test - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dataset.train_images, train)  # the input is left alone


def test_normalize_constant_channel_and_chunks(digits):
  images = np.ones((5000, 2, 2, 2), np.float32)  # more than one chunk of 4096
  images[:, :, :, 1] = np.arange(5000, dtype=np.float32)[:, None, None]
  dataset = data.Dataset("c", images, np.zeros(5000, np.int32), images[:3], np.zeros(3, np.int32), 1)
  normalized = data.normalize(dataset)
  np.testing.assert_array_equal(normalized.train_images[..., 0], 0.0)
  np.testing.assert_allclose(normalized.train_images[..., 1].mean(), 0, atol=1e-5)
  np.testing.assert_allclose(normalized.train_images[..., 1].std(), 1, atol=1e-5)
  normalized_digits = data.normalize(digits)
  assert abs(normalized_digits.train_images.mean()) < 1e-5
  assert abs(normalized_digits.train_images.std() - 1) < 1e-5


# ---------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------


def _indexed(n, shape=(4, 4, 1)):
  """Images whose every pixel holds the example's index, and labels equal to it."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *shape)).copy()
  return images, np.arange(n, dtype=np.int32)


def test_batches_cover_epoch_once_with_shuffling():
  images, labels = _indexed(23)
  rng = np.random.default_rng(0)
  epochs = []
  for _ in range(2):
    batch_list = list(data.batches(images, labels, 5, rng=rng, drop_last=False))
    assert [len(y) for _, y in batch_list] == [5, 5, 5, 5, 3]
    for x, y in batch_list:
      assert x.shape[1:] == (4, 4, 1) and x.dtype == np.float32
      np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images stay with their labels
    seen = np.concatenate([y for _, y in batch_list])
    np.testing.assert_array_equal(np.sort(seen), labels)
    assert not np.array_equal(seen, labels)
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])  # a fresh order each epoch
  ordered = np.concatenate([y for _, y in data.batches(images, labels, 5, drop_last=False)])
  np.testing.assert_array_equal(ordered, labels)  # no rng: original order


def test_batches_drop_last():
  images, labels = _indexed(23)
  batch_list = list(data.batches(images, labels, 5, rng=np.random.default_rng(1)))
  assert [len(y) for _, y in batch_list] == [5, 5, 5, 5]
  assert len(np.unique(np.concatenate([y for _, y in batch_list]))) == 20
  assert len(list(data.batches(images, labels, 23))) == 1
  assert list(data.batches(images, labels, 24)) == []
  assert len(list(data.batches(images, labels, 24, drop_last=False))) == 1


@pytest.mark.parametrize("augment", ["crop", "crop_flip"])
def test_batches_augmentation_is_a_shifted_crop(augment):
  rng = np.random.default_rng(0)
  images = rng.random((64, 6, 7, 2)).astype(np.float32) + 1.0  # nothing equals the zero padding
  labels = np.arange(64, dtype=np.int32)
  padding = 4
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets, flips, changed = set(), 0, 0
  for x, y in data.batches(images, labels, 16, rng=rng, augment=augment):
    assert x.shape == (16, 6, 7, 2) and x.dtype == np.float32
    for image, label in zip(x, y):
      matches = [(top, left, flip)
                 for top, left in itertools.product(range(2 * padding + 1), repeat=2)
                 for flip in ((False, True) if augment == "crop_flip" else (False,))
                 if np.array_equal(image, padded[label, top:top + 6, left:left + 7][:, ::-1]
                                   if flip else padded[label, top:top + 6, left:left + 7])]
      assert len(matches) == 1, (label, matches)
      top, left, flip = matches[0]
      offsets.add((top, left))
      flips += flip
      changed += not np.array_equal(image, images[label])
  assert changed > 48  # 1 in 81 crops is centred (and unflipped for half of those)
  assert len(offsets) > 30
  if augment == "crop_flip":
    assert 16 < flips < 48
  else:
    assert flips == 0


def test_batches_crop_flip_values_and_padding():
  rng = np.random.default_rng(5)
  images = rng.random((200, 8, 8, 3)).astype(np.float32) + 1.0
  labels = np.arange(200, dtype=np.int32)
  for x, y in data.batches(images, labels, 50, rng=rng, augment="crop_flip", padding=1):
    for image, label in zip(x, y):
      values = image[image != 0]
      # Every nonzero value comes from the source image; at most the 1-pixel border is padding.
      assert np.isin(values, images[label]).all()
      assert (image == 0).all(axis=-1).sum() <= 8 + 8 - 1
  # Without padding the crop is the whole image: each output is the image or its mirror.
  x, y = next(data.batches(images, labels, 200, rng=rng, augment="crop_flip", padding=0))
  mirrored = np.array([not np.array_equal(a, images[b]) for a, b in zip(x, y)])
  np.testing.assert_array_equal(x[mirrored], images[y[mirrored]][:, :, ::-1])
  np.testing.assert_array_equal(x[~mirrored], images[y[~mirrored]])
  assert 60 < mirrored.sum() < 140


def test_batches_bad_arguments():
  images, labels = _indexed(10)
  rng = np.random.default_rng(0)
  bad_calls = [
      dict(batch_size=0),
      dict(batch_size=-3),
      dict(batch_size=2.5),
      dict(batch_size=True),
      dict(batch_size=2, augment="flip", rng=rng),
      dict(batch_size=2, augment="crop_flip"),  # augmenting needs an rng
      dict(batch_size=2, augment="crop", rng=rng, padding=-1),
      dict(batch_size=2, rng=np.random.RandomState(0)),
  ]
  for kwargs in bad_calls:
    with pytest.raises(ValueError):
      list(data.batches(images, labels, **kwargs))
  with pytest.raises(ValueError, match="labels"):
    list(data.batches(images, labels[:-1], 2))
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    list(data.batches(images[..., 0], labels, 2, rng=rng, augment="crop"))


def test_dataset_validates_shapes():
  images = np.zeros((4, 2, 2, 1), np.float32)
  with pytest.raises(ValueError, match="train"):
    data.Dataset("x", images, np.zeros(3, np.int32), images, np.zeros(4, np.int32), 2)
  with pytest.raises(ValueError, match="differ"):
    data.Dataset("x", images, np.zeros(4, np.int32), np.zeros((4, 3, 2, 1), np.float32),
                 np.zeros(4, np.int32), 2)


# ---------------------------------------------------------------------------------------
# Real Fashion-MNIST, only where TRQUANT_DATA_DIR points at it
# ---------------------------------------------------------------------------------------

_REAL_DATA_DIR = os.environ.get("TRQUANT_DATA_DIR")


def test_real_fashion_mnist(monkeypatch):
  if not _REAL_DATA_DIR:
    pytest.skip("TRQUANT_DATA_DIR is not set")
  monkeypatch.setenv(data.DATA_DIR_ENV, _REAL_DATA_DIR)
  try:
    data.resolve_data_dir(None, "fashion-mnist")
  except FileNotFoundError as err:
    pytest.skip(f"no Fashion-MNIST files under TRQUANT_DATA_DIR: {err}")
  start = time.perf_counter()
  dataset = data.load_dataset("fashion-mnist")
  seconds = time.perf_counter() - start
  print(f"loaded real Fashion-MNIST in {seconds:.2f} s")
  assert dataset.train_images.shape == (60000, 28, 28, 1)
  assert dataset.test_images.shape == (10000, 28, 28, 1)
  assert dataset.train_images.dtype == np.float32
  assert dataset.train_images.min() == 0.0 and dataset.train_images.max() == 1.0
  for labels in (dataset.train_labels, dataset.test_labels):
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)
  assert dataset.train_images.mean() == pytest.approx(0.2860, abs=5e-4)
  assert dataset.test_images.mean() == pytest.approx(0.2868, abs=5e-4)
  normalized = data.normalize(dataset)
  assert abs(normalized.train_images.mean()) < 1e-4
  assert abs(normalized.train_images.std() - 1) < 1e-4
