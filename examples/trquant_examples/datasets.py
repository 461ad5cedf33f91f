"""In-memory image datasets for examples and benchmarks: digits, (Fashion-)MNIST, CIFAR-10/100.

Every loader returns a :class:`Dataset` of numpy arrays: float32 NHWC images in
[0, 1] and int32 labels. Nothing is downloaded:

* ``digits`` is scikit-learn's ``load_digits()`` (1,797 8x8 images shipped inside
  the scikit-learn wheel), split into train and test here;
* ``fashion-mnist`` and ``mnist`` read the four standard IDX files (gzipped or not);
* ``cifar10`` and ``cifar100`` read the standard "python version" pickles.

The directory holding the files is given as ``data_dir`` (the scripts' ``--data-dir``)
or through the environment variable ``TRQUANT_DATA_DIR``, which may point at the folder
holding the files or at its parent (``$TRQUANT_DATA_DIR/fashion-mnist`` is found too).

:func:`batches` yields shuffled (optionally augmented) mini-batches of numpy arrays.

    from trquant_examples import datasets
    dataset = datasets.normalize(datasets.load_dataset("fashion-mnist", data_dir="path/to/dir"))
    rng = np.random.default_rng(0)
    for images, labels in datasets.batches(dataset.train_images, dataset.train_labels, 128, rng=rng):
      ...
"""

import dataclasses
import gzip
import os
import pathlib
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
    "AUGMENTATIONS", "DATASET_NAMES", "DATA_DIR_ENV", "Dataset", "batches", "load_cifar",
    "load_dataset", "load_digits", "load_mnist_idx", "normalize", "random_crop", "read_idx",
    "resolve_data_dir",
]

DATA_DIR_ENV = "TRQUANT_DATA_DIR"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_FILES = ("train", "test")
CIFAR10_SUBFOLDER = "cifar-10-batches-py"
CIFAR100_SUBFOLDER = "cifar-100-python"

# name -> (files the directory must hold, standard subfolders the archive unpacks into)
_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fashion-mnist": (tuple(IDX_FILES.values()), ()),
    "mnist": (tuple(IDX_FILES.values()), ()),
    "cifar10": (CIFAR10_FILES, (CIFAR10_SUBFOLDER,)),
    "cifar100": (CIFAR100_FILES, (CIFAR100_SUBFOLDER,)),
}
DATASET_NAMES = ("digits",) + tuple(_LAYOUTS)

AUGMENTATIONS = ("crop", "crop_flip")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test split of images (float32, NHWC) and labels (int32)."""

  name: str
  train_images: np.ndarray = dataclasses.field(repr=False)
  train_labels: np.ndarray = dataclasses.field(repr=False)
  test_images: np.ndarray = dataclasses.field(repr=False)
  test_labels: np.ndarray = dataclasses.field(repr=False)
  num_classes: int

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{self.name}: {split} images must be (N, H, W, C) and labels (N,), got "
            f"{images.shape} and {labels.shape}")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(
          f"{self.name}: train and test images differ in shape: "
          f"{self.train_images.shape[1:]} vs {self.test_images.shape[1:]}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of one image."""
    return tuple(self.train_images.shape[1:])

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, train={len(self.train_images)}, "
            f"test={len(self.test_images)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})")


# ---------------------------------------------------------------------------------------
# Locating the files
# ---------------------------------------------------------------------------------------


def _find_file(directory: pathlib.Path, file_name: str) -> pathlib.Path | None:
  """``directory/file_name``, or for a ``.gz`` name its uncompressed twin; None if neither."""
  candidates = [file_name]
  if file_name.endswith(".gz"):
    candidates.append(file_name[:-len(".gz")])
  for candidate in candidates:
    path = directory / candidate
    if path.is_file():
      return path
  return None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None,
                     name: str,
                     expected_files: Sequence[str] | None = None) -> pathlib.Path:
  """The folder holding dataset ``name``'s files.

  The base folder is ``data_dir`` if given, else ``$TRQUANT_DATA_DIR``. The files may
  lie in it, in its ``name`` subfolder (``$TRQUANT_DATA_DIR/fashion-mnist``), or in the
  standard subfolder of the archive (``cifar-10-batches-py``, ``cifar-100-python``).
  ``expected_files`` defaults to the files of the known dataset ``name``; a ``.gz`` name
  is also found uncompressed. Raises FileNotFoundError, naming the files, if none holds them.
  """
  layout_files, subfolders = _LAYOUTS.get(name, ((), ()))
  files = tuple(expected_files) if expected_files is not None else layout_files
  wanted = ", ".join(files) if files else "its files"
  if any(file_name.endswith(".gz") for file_name in files):
    wanted += " (gzipped or not)"
  hint = f"pass --data-dir DIR or set {DATA_DIR_ENV} to the folder holding {wanted}"

  if data_dir is not None and str(data_dir):
    base = pathlib.Path(data_dir).expanduser()
    source = f"data_dir {str(base)!r}"
  elif os.environ.get(DATA_DIR_ENV):
    base = pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser()
    source = f"{DATA_DIR_ENV}={str(base)!r}"
  else:
    raise FileNotFoundError(f"No data directory given for {name!r}: {hint}.")

  candidates = [base, base / name]
  for subfolder in subfolders:
    candidates += [base / subfolder, base / name / subfolder]
  for candidate in candidates:
    if candidate.is_dir() and all(_find_file(candidate, f) is not None for f in files):
      return candidate
  searched = ", ".join(str(candidate) for candidate in candidates)
  raise FileNotFoundError(
      f"{name!r} not found from {source} (searched {searched}): {hint}.")


# ---------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------


def load_digits(test_size: int = 397, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits in [0, 1], shuffled with ``seed``; the last ``test_size`` are test."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  if not 0 < test_size < len(images):
    raise ValueError(f"test_size must be in [1, {len(images) - 1}], got {test_size}")
  order = np.random.default_rng(seed).permutation(len(images))
  images, labels = images[order], labels[order]
  split = len(images) - test_size
  return Dataset("digits", images[:split], labels[:split], images[split:], labels[split:],
                 num_classes=10)


# ---------------------------------------------------------------------------------------
# IDX files: MNIST, Fashion-MNIST
# ---------------------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path) -> bytes:
  """The (decompressed, if gzipped) content of ``path``; ValueError on a broken gzip file."""
  raw = path.read_bytes()
  if raw[:2] != b"\x1f\x8b":  # not gzip: an uncompressed file, whatever its name
    return raw
  try:
    return gzip.decompress(raw)
  except (gzip.BadGzipFile, EOFError, zlib.error) as err:
    raise ValueError(f"{path.name}: corrupt or truncated gzip file ({err})") from err


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
  """The uint8 array stored in the IDX file ``path``, checking its magic number and size."""
  path = pathlib.Path(path)
  content = _read_bytes(path)
  if len(content) < 4:
    raise ValueError(f"{path.name}: too short for an IDX header ({len(content)} bytes)")
  (found_magic,) = struct.unpack(">I", content[:4])
  if found_magic != magic:
    raise ValueError(f"{path.name}: bad IDX magic number {found_magic}, expected {magic}")
  ndim = magic & 0xFF
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    raise ValueError(f"{path.name}: truncated IDX header ({len(content)} bytes)")
  shape = struct.unpack(f">{ndim}I", content[4:header_size])
  expected_size = header_size + int(np.prod(shape, dtype=np.int64))
  if len(content) != expected_size:
    raise ValueError(
        f"{path.name}: {len(content)} bytes, but the header's shape {shape} needs "
        f"{expected_size} (truncated or corrupt file)")
  return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_idx_split(directory: pathlib.Path, images_file: str,
                    labels_file: str) -> tuple[np.ndarray, np.ndarray]:
  images_path = _find_file(directory, images_file)
  labels_path = _find_file(directory, labels_file)
  images = read_idx(images_path, IDX_IMAGES_MAGIC)
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise ValueError(
        f"{labels_path.name} holds {len(labels)} labels but {images_path.name} holds "
        f"{len(images)} images")
  if len(labels) and labels.max() > 9:
    raise ValueError(f"{labels_path.name}: label {labels.max()} outside 0..9")
  return (images.astype(np.float32) / np.float32(255.0))[..., None], labels.astype(np.int32)


def load_mnist_idx(data_dir: str | os.PathLike[str] | None,
                   name: str = "fashion-mnist") -> Dataset:
  """MNIST or Fashion-MNIST from the four standard IDX files: float32 (N, 28, 28, 1) in [0, 1]."""
  directory = resolve_data_dir(data_dir, name, expected_files=tuple(IDX_FILES.values()))
  train_images, train_labels = _load_idx_split(
      directory, IDX_FILES["train_images"], IDX_FILES["train_labels"])
  test_images, test_labels = _load_idx_split(
      directory, IDX_FILES["test_images"], IDX_FILES["test_labels"])
  return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes=10)


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# ---------------------------------------------------------------------------------------


def _load_cifar_file(path: pathlib.Path, label_key: bytes,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, 32, 32, 3) float32 in [0, 1] and int32 labels of one CIFAR pickle."""
  # The CIFAR archives are pickles: only load files from a source you trust.
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
    raise ValueError(f"{path.name}: not a readable CIFAR pickle ({err})") from err
  if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
    found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"{path.name}: expected a dict with keys b'data' and {label_key!r}, "
                     f"found {found}")
  pixels = np.asarray(batch[b"data"])
  labels = np.asarray(batch[label_key])
  if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
    raise ValueError(f"{path.name}: b'data' must be uint8 (N, 3072), got {pixels.dtype} "
                     f"{pixels.shape}")
  if labels.shape != (len(pixels),):
    raise ValueError(f"{path.name}: {labels.shape} labels for {len(pixels)} images")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{path.name}: labels outside 0..{num_classes - 1}")
  # Each row is channel-major: 1024 red, then 1024 green, then 1024 blue values.
  images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  images = np.ascontiguousarray(images).astype(np.float32) / np.float32(255.0)
  return images, labels.astype(np.int32)


def load_cifar(data_dir: str | os.PathLike[str] | None, num_classes: int = 10) -> Dataset:
  """CIFAR-10 or CIFAR-100 (fine labels) from the python pickles: float32 (N, 32, 32, 3) in [0, 1]."""
  if num_classes == 10:
    name, train_files, test_file, label_key = "cifar10", CIFAR10_FILES[:-1], "test_batch", b"labels"
  elif num_classes == 100:
    name, train_files, test_file, label_key = "cifar100", ("train",), "test", b"fine_labels"
  else:
    raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
  directory = resolve_data_dir(data_dir, name)
  train = [_load_cifar_file(directory / f, label_key, num_classes) for f in train_files]
  test_images, test_labels = _load_cifar_file(directory / test_file, label_key, num_classes)
  if len(train) == 1:
    train_images, train_labels = train[0]
  else:
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
  return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes)


# ---------------------------------------------------------------------------------------
# Entry point, normalisation, batching
# ---------------------------------------------------------------------------------------


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Dataset ``name`` (one of DATASET_NAMES); ``data_dir`` is ignored for ``digits``."""
  if name == "digits":
    return load_digits()
  if name in ("fashion-mnist", "mnist"):
    return load_mnist_idx(data_dir, name=name)
  if name == "cifar10":
    return load_cifar(data_dir, num_classes=10)
  if name == "cifar100":
    return load_cifar(data_dir, num_classes=100)
  raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _channel_mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std over (N, H, W), accumulated in float64 chunk by chunk."""
  count = images.shape[0] * images.shape[1] * images.shape[2]
  if count == 0:
    raise ValueError("cannot normalize with an empty train split")
  total = np.zeros(images.shape[-1])
  for start in range(0, len(images), chunk):
    total += images[start:start + chunk].sum(axis=(0, 1, 2), dtype=np.float64)
  mean = total / count
  squares = np.zeros(images.shape[-1])
  for start in range(0, len(images), chunk):
    centred = images[start:start + chunk] - mean
    squares += np.einsum("nhwc,nhwc->c", centred, centred)
  return mean, np.sqrt(squares / count)


def normalize(dataset: Dataset) -> Dataset:
  """A copy of ``dataset`` with each channel standardised by the train split's mean and std.

  A channel that is constant on the train split is only centred.
  """
  mean, std = _channel_mean_std(dataset.train_images)
  std = np.where(std > 0, std, 1.0)
  mean, std = mean.astype(np.float32), std.astype(np.float32)
  return dataclasses.replace(
      dataset,
      train_images=(dataset.train_images - mean) / std,
      test_images=(dataset.test_images - mean) / std,
  )


def random_crop(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4,
                flip: bool = False) -> np.ndarray:
  """Crops of each zero-padded image at a random offset, mirrored left-right at random if ``flip``."""
  n, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  top = rng.integers(0, 2 * padding + 1, size=n)
  left = rng.integers(0, 2 * padding + 1, size=n)
  rows = top[:, None] + np.arange(height)  # (n, height)
  columns = np.arange(width)
  if flip:
    mirrored = rng.random(n) < 0.5
    columns = np.where(mirrored[:, None], columns[::-1], columns)  # (n, width)
  columns = left[:, None] + columns
  return padded[np.arange(n)[:, None, None], rows[:, :, None], columns[:, None, :]]


def batches(images: np.ndarray,
            labels: np.ndarray,
            batch_size: int,
            *,
            rng: np.random.Generator | None = None,
            drop_last: bool = True,
            augment: str | None = None,
            padding: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (images, labels) batches, shuffled if ``rng`` is given.

  ``drop_last`` drops the final batch if it is smaller than ``batch_size`` (so an epoch
  with fewer than ``batch_size`` examples yields nothing). ``augment`` is None, ``"crop"``
  (random crop of the image zero-padded by ``padding`` pixels) or ``"crop_flip"`` (the
  same, then a left-right flip with probability 1/2); augmenting needs ``rng``.
  """
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
    raise ValueError(f"batch_size must be an int, got {batch_size!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if rng is not None and not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
  if augment is not None:
    if augment not in AUGMENTATIONS:
      raise ValueError(f"augment must be None or one of {AUGMENTATIONS}, got {augment!r}")
    if rng is None:
      raise ValueError(f"augment={augment!r} needs an rng")
    if images.ndim != 4:
      raise ValueError(f"augment={augment!r} needs (N, H, W, C) images, got {images.shape}")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
      raise ValueError(f"padding must be an int >= 0, got {padding!r}")

  num_examples = len(images)
  order = rng.permutation(num_examples) if rng is not None else np.arange(num_examples)
  stop = num_examples - num_examples % batch_size if drop_last else num_examples
  for start in range(0, stop, batch_size):
    indices = order[start:start + batch_size]
    batch_images = images[indices]
    if augment is not None:
      batch_images = random_crop(batch_images, rng, padding=padding,
                                 flip=augment == "crop_flip")
    yield batch_images, labels[indices]
