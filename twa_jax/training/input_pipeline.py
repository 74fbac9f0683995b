"""Datasets and batches: scikit-learn digits, `.npz` arrays and TFDS (no TF).

`load_dataset(config)` returns a `Dataset` of numpy arrays (NHWC images,
uint8 or float, or flat float features) or, for datasets whose images vary in
size (ImageNet), of `SourceColumn`s that read a TFDS data source on demand.
`train_batches` shuffles deterministically from (seed, epoch) and augments as
in the paper, in a background thread; `eval_batches` walks a split in order.
Batches are dicts of numpy arrays: "image" (float32, normalized), "label"
(int32) and, from `eval_batches`, "mask" (bool, False on padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import concurrent.futures
import dataclasses
import functools
import os
import pathlib
import queue
import threading
from typing import Any, Union
import zipfile
import zlib

import numpy as np
from PIL import Image

AUGMENTATIONS = ("none", "cifar", "imagenet")
CIFAR_PAD = 4  # pixels of zero padding before the random crop
IMAGENET_RESIZE = 256  # evaluation: shorter side resized to this ...
IMAGENET_CROP = 224  # ... then centre-cropped; training: random-resized crop
_RESIZED_CROP_SCALE = (0.08, 1.0)
_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_STATS_MAX_LAZY = 1024  # images sampled for the normalization of a lazy split
_CHUNK = 4096


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """Threads for record reads and per-image transforms (PIL releases the GIL)."""
  return concurrent.futures.ThreadPoolExecutor(
      max_workers=min(32, 2 * (os.cpu_count() or 1)),
      thread_name_prefix="twa_input")


class _RecordReader:
  """Reads records of a random-access source in parallel; caches the last read.

  The cache lets the image and label columns of one batch share one read.
  """

  def __init__(self, source: Sequence[dict[str, Any]]):
    self.source = source
    self._lock = threading.Lock()
    self._last: tuple[bytes, list[dict[str, Any]]] | None = None

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    key = indices.tobytes()
    with self._lock:
      if self._last is not None and self._last[0] == key:
        return self._last[1]
    records = list(_pool().map(self.source.__getitem__, indices.tolist()))
    with self._lock:
      self._last = (key, records)
    return records


class SourceColumn:
  """One feature of a TFDS split, read on demand (random access by index).

  `column[indices]` (an integer array) reads those examples: a list of arrays
  when their shapes vary, else one stacked array. `column.view(indices)` is a
  lazy subset.
  """

  def __init__(self, reader: _RecordReader, feature: str,
               feature_shape: tuple[int | None, ...],
               indices: np.ndarray | None = None):
    self.reader = reader
    self.feature = feature
    self.feature_shape = tuple(feature_shape)
    self.indices = (np.arange(len(reader.source)) if indices is None
                    else np.asarray(indices, np.int64))

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def ragged(self) -> bool:
    return None in self.feature_shape

  def __getitem__(self, idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
    records = self.reader.read(self.indices[np.asarray(idx)])
    values = [np.asarray(r[self.feature]) for r in records]
    return values if self.ragged else np.stack(values)

  def view(self, idx: np.ndarray) -> SourceColumn:
    return SourceColumn(self.reader, self.feature, self.feature_shape,
                        self.indices[np.asarray(idx)])


Column = Union[np.ndarray, SourceColumn]


def _subset(column: Column, idx: np.ndarray) -> Column:
  return column.view(idx) if isinstance(column, SourceColumn) else column[idx]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held in memory (or read on demand).

  Attributes:
    name: dataset name.
    x_train, y_train, x_test, y_test: inputs (NHWC images, uint8 or float, or
      flat float features; or `SourceColumn`s) and integer labels.
    num_classes: number of classes.
    mean, std: per-channel (last axis) normalization, in stored units:
      a batch is `(x - mean) / std`.
    augmentation: "none", "cifar" (pad-4 random crop + flip) or "imagenet"
      (random-resized crop 224 + flip; evaluation resize 256 + centre 224).
  """
  name: str
  x_train: Column
  y_train: Column
  x_test: Column
  y_test: Column
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  augmentation: str

  @property
  def num_train(self) -> int:
    return len(self.y_train)

  @property
  def num_test(self) -> int:
    return len(self.y_test)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one model input (without the batch axis)."""
    if self.augmentation == "imagenet":
      return (IMAGENET_CROP, IMAGENET_CROP, len(self.mean))
    if isinstance(self.x_train, SourceColumn):
      return self.x_train.feature_shape
    return tuple(self.x_train.shape[1:])


# ----------------------------------------------------------------- loading


def _field(config: Any, name: str, default: Any = None) -> Any:
  value = getattr(config, name, default)
  return default if value is None else value


def load_dataset(config: Any) -> Dataset:
  """Loads the dataset a config names.

  Args:
    config: fields `name` ("digits", "npz" or a TFDS name such as "cifar10",
      "cifar100", "imagenet2012"), `data_dir` (TFDS), `path` (npz with arrays
      x_train, y_train, x_test, y_test; images NHWC, or NHW grayscale, which
      gets a channel axis); optional `train_size` / `test_size` (keep a
      prefix), `download` (let TFDS download and prepare; default False),
      `in_memory` (TFDS: default True unless image sizes vary),
      `augmentation` (default by input: "cifar" for images of 16 to 64
      pixels, "imagenet" above or for varying sizes, else "none").

  Returns:
    The `Dataset`, normalization computed on its training inputs.

  Raises:
    ValueError: unknown dataset or augmentation; a field the named dataset
      does not read (`path` without name "npz", `data_dir`, `download` or
      `in_memory` without a TFDS name); an empty split; a file that is not a
      readable `.npz` of the four arrays; bad shapes, sizes or labels.
    FileNotFoundError: missing npz file or unprepared TFDS data.
  """
  source = _field(config, "name")
  if not source:
    raise ValueError("config.name: missing dataset name")
  _check_source_fields(config, source)
  if source == "digits":
    name, columns, num_classes = "digits", _load_digits(), 10
  elif source == "npz":
    path = _field(config, "path")
    if not path:
      raise ValueError("config.path: the .npz file is required for name='npz'")
    columns = _load_npz(path)
    name, num_classes = pathlib.Path(path).stem, None
  else:
    name = source
    columns, num_classes = _load_tfds(
        name, _field(config, "data_dir"), bool(_field(config, "download", False)),
        _field(config, "in_memory"))
  x_train, y_train, x_test, y_test = columns
  x_train, y_train = _prefix(x_train, y_train, _field(config, "train_size"),
                             "train_size")
  x_test, y_test = _prefix(x_test, y_test, _field(config, "test_size"),
                           "test_size")
  if num_classes is None:
    num_classes = _infer_num_classes(y_train, y_test)
  shape = (x_train.feature_shape if isinstance(x_train, SourceColumn)
           else tuple(x_train.shape[1:]))
  augmentation = _field(config, "augmentation") or _default_augmentation(shape)
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"config.augmentation: unknown {augmentation!r}; "
                     f"known: {', '.join(AUGMENTATIONS)}")
  if augmentation != "none" and len(shape) != 3:
    raise ValueError(f"config.augmentation={augmentation!r} needs HWC images; "
                     f"{name!r} inputs have shape {shape}")
  if source == "digits":  # already in [0, 1]
    mean, std = np.zeros(1, np.float32), np.ones(1, np.float32)
  else:
    mean, std = _channel_stats(x_train)
  return Dataset(name, x_train, y_train, x_test, y_test, num_classes,
                 mean, std, augmentation)


_TFDS_FIELDS = ("data_dir", "download", "in_memory")


def _check_source_fields(config: Any, source: str) -> None:
  """Rejects a set field that the dataset `source` would silently ignore."""
  path = _field(config, "path")
  if path and source != "npz":
    raise ValueError(
        f"config.path={path!r} is read only with config.name='npz', but "
        f"config.name={source!r}: set config.name='npz' to train on that "
        "file, or unset config.path")
  if source in ("digits", "npz"):
    for field in _TFDS_FIELDS:
      value = _field(config, field)
      if value:
        raise ValueError(
            f"config.{field}={value!r} is read only for TFDS datasets, but "
            f"config.name={source!r}; unset config.{field}")


def _load_digits() -> tuple[np.ndarray, ...]:
  """scikit-learn's digits, 8x8x1 in [0, 1]; fixed stratified 1437/360 split."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=360, random_state=0, stratify=y)
  return x_train, y_train, x_test, y_test


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path: str) -> tuple[np.ndarray, ...]:
  """The checked arrays of an `.npz` file; NHW images get a channel axis."""
  path = pathlib.Path(path)
  arrays = _read_npz(path)
  splits = {}
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:  # (N, H, W) grayscale images
      x = x[..., None]
    if x.ndim not in (2, 4) or y.ndim != 1 or len(x) != len(y):
      raise ValueError(
          f"{path}: x_{split} {x.shape} and y_{split} {y.shape} must be "
          "(N, D) features or (N, H, W[, C]) images, and (N,) labels")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] > 4:
      raise ValueError(
          f"{path}: x_{split} {x.shape} looks channels-first (N, C, H, W); "
          "images must be NHWC: store np.moveaxis(x, 1, -1)")
    if not len(y):
      raise ValueError(f"{path}: the {split} split is empty (x_{split} "
                       f"{x.shape}, y_{split} {y.shape})")
    if not (np.issubdtype(x.dtype, np.integer)
            or np.issubdtype(x.dtype, np.floating)):
      raise ValueError(f"{path}: x_{split} must hold integers or floats, "
                       f"got {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      raise ValueError(f"{path}: x_{split} holds NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{path}: y_{split} must hold integer labels, "
                       f"got {y.dtype}")
    if y.min() < 0:
      raise ValueError(f"{path}: y_{split} has negative labels")
    splits[split] = x, y.astype(np.int32)
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"{path}: x_train {x_train.shape} and x_test "
                     f"{x_test.shape} differ in example shape")
  return x_train, y_train, x_test, y_test


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads the arrays `_NPZ_ARRAYS` of an `.npz` file, naming what is wrong."""
  if not path.is_file():
    raise FileNotFoundError(f"npz dataset file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(6)
  hint = ("write it with np.savez(path, x_train=..., y_train=..., x_test=..., "
          "y_test=...)")
  if not head:
    raise ValueError(f"{path}: the file is empty, not an .npz archive; {hint}")
  if head == b"\x93NUMPY":
    raise ValueError(f"{path}: a single .npy array, not an .npz archive of "
                     f"{', '.join(_NPZ_ARRAYS)}; {hint}")
  if not zipfile.is_zipfile(path):
    what = ("a truncated or damaged zip archive" if head.startswith(b"PK")
            else "not a zip archive")
    raise ValueError(f"{path}: {what}, not a readable .npz file; {hint}")
  try:
    npz = np.load(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e}); {hint}") from e
  with npz:
    missing = [n for n in _NPZ_ARRAYS if n not in npz.files]
    if missing:
      raise ValueError(f"{path}: missing array(s) {', '.join(missing)} "
                       f"(has: {', '.join(npz.files) or 'none'})")
    arrays = {}
    for name in _NPZ_ARRAYS:
      try:
        arrays[name] = npz[name]
      except (OSError, ValueError, EOFError, zipfile.BadZipFile,
              zlib.error) as e:
        raise ValueError(f"{path}: array {name} cannot be read ({e})") from e
  return arrays


def _load_tfds(name: str, data_dir: str | None, download: bool,
               in_memory: bool | None) -> tuple[tuple[Column, ...], int]:
  """A TFDS dataset through `tfds.data_source` (array_record; TF not needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {name!r}: not 'digits', 'npz' or a "
                     "registered TFDS dataset") from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' and 'label' "
                     f"features: {list(features)}")
  splits = builder.info.splits
  test_split = ("validation" if "validation" in splits and "test" not in splits
                else "test")
  try:
    sources = tfds.data_source(name, split=["train", test_split],
                               data_dir=data_dir, download=download)
  except Exception as e:
    if builder.is_prepared():
      raise
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared (array_record) under "
        f"{builder.data_dir}; prepare it with `tfds build {name} "
        "--file_format=array_record` or set config.download=True") from e
  shape = tuple(features["image"].shape)
  if in_memory is None:
    in_memory = None not in shape
  columns = []
  for split, source in zip(("train", test_split), sources):
    if not len(source):
      raise ValueError(f"TFDS dataset {name!r}: the {split} split under "
                       f"{builder.data_dir} is empty")
    reader = _RecordReader(source)
    x = SourceColumn(reader, "image", shape)
    y = SourceColumn(reader, "label", ())
    if in_memory:
      if x.ragged:
        raise ValueError(f"config.in_memory: {name!r} images vary in size "
                         f"{shape}; they cannot be stacked in memory")
      x, y = _materialize(x, y)
    columns += [x, y]
  return tuple(columns), features["label"].num_classes


def _materialize(x: SourceColumn,
                 y: SourceColumn) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = [], []
  for start in range(0, len(x), _CHUNK):
    idx = np.arange(start, min(start + _CHUNK, len(x)))
    xs.append(x[idx])
    ys.append(y[idx])
  return np.concatenate(xs), np.concatenate(ys).astype(np.int32)


def _prefix(x: Column, y: Column, size: int | None,
            field: str) -> tuple[Column, Column]:
  if size is None:
    return x, y
  if (not isinstance(size, (int, np.integer)) or isinstance(size, bool)
      or size < 1):
    raise ValueError(f"config.{field}: must be a positive integer, got {size!r}")
  if size > len(y):
    raise ValueError(f"config.{field}={size} exceeds the {len(y)} examples "
                     "available")
  idx = np.arange(size)
  return _subset(x, idx), _subset(y, idx)


def _infer_num_classes(*labels: np.ndarray) -> int:
  return max(int(y.max()) for y in labels) + 1


def _default_augmentation(shape: tuple[int | None, ...]) -> str:
  if len(shape) != 3:
    return "none"
  if None in shape or max(shape[:2]) > 64:
    return "imagenet"
  return "cifar" if min(shape[:2]) >= 16 else "none"


def _channel_stats(x: Column) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (last axis) mean and std in stored units, float64 sums.

  In-memory arrays use every training input; lazy columns the first
  `_STATS_MAX_LAZY` images.
  """
  total = total_sq = count = 0
  num = len(x) if isinstance(x, np.ndarray) else min(len(x), _STATS_MAX_LAZY)
  for start in range(0, num, _CHUNK):
    idx = np.arange(start, min(start + _CHUNK, num))
    chunk = x[idx]
    pixels = np.concatenate([np.reshape(v, (-1, v.shape[-1])) for v in chunk]
                            if isinstance(chunk, list)
                            else [chunk.reshape(-1, chunk.shape[-1])])
    pixels = pixels.astype(np.float64)
    total = total + pixels.sum(axis=0)
    total_sq = total_sq + np.square(pixels).sum(axis=0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  std = np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def holdout_split(dataset: Dataset, fraction: float,
                  seed: int) -> tuple[Dataset, Dataset]:
  """Splits the training set into disjoint (train, holdout) parts (for TWA-v).

  Both parts keep the test split and the normalization of `dataset`; the
  holdout examples are the holdout part's training split (evaluate them with
  `eval_batches(holdout, "train", ...)`).

  Args:
    dataset: the dataset.
    fraction: share of the training set held out, in (0, 1).
    seed: selects the held-out examples.

  Returns:
    (train_part, holdout_part), each in the original index order.
  """
  n = dataset.num_train
  k = int(round(n * fraction)) if 0 < fraction < 1 else 0
  if not 0 < k < n:
    raise ValueError(f"holdout fraction {fraction} of {n} training examples "
                     "leaves an empty part; it must be in (0, 1)")
  perm = np.random.default_rng(seed).permutation(n)
  parts = []
  for idx in (np.sort(perm[k:]), np.sort(perm[:k])):
    parts.append(dataclasses.replace(
        dataset, x_train=_subset(dataset.x_train, idx),
        y_train=_subset(dataset.y_train, idx)))
  return parts[0], parts[1]


# ----------------------------------------------------------------- batches


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  """Number of full training batches in one epoch (the remainder is dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  steps = dataset.num_train // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {dataset.num_train} "
                     f"training examples of {dataset.name!r}")
  return steps


def train_batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int,
                  augment: bool = True, start_step: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled, augmented training batches (remainder dropped).

  The order depends only on (seed, epoch) and each batch's augmentation only
  on (seed, epoch, step), so a resumed run sees the same batches.

  Args:
    dataset: the dataset.
    batch_size: examples per batch.
    seed: non-negative data seed.
    epoch: non-negative epoch index.
    augment: apply the dataset's augmentation (else the evaluation transform).
    start_step: skip the first batches (resume inside an epoch).
    prefetch: batches prepared ahead in a background thread (0: none).

  Yields:
    {"image": float32 (batch_size, *input_shape), "label": int32 (batch_size,)}.
  """
  steps = steps_per_epoch(dataset, batch_size)
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got {seed}, {epoch}")
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} outside [0, {steps}]")
  order = np.random.default_rng([seed, epoch, 0]).permutation(dataset.num_train)

  def batch(step: int) -> dict[str, np.ndarray]:
    idx = order[step * batch_size:(step + 1) * batch_size]
    rng = np.random.default_rng([seed, epoch, 1, step]) if augment else None
    return _batch(dataset, dataset.x_train, dataset.y_train, idx, rng)

  return _prefetch(map(batch, range(start_step, steps)), prefetch)


def eval_batches(dataset: Dataset, split: str, batch_size: int, *,
                 pad: bool = False,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """A split in order, in batches, with the evaluation transform.

  Args:
    dataset: the dataset.
    split: "train" or "test".
    batch_size: examples per batch.
    pad: pad the last batch to `batch_size` (zeros, mask False) so that a
      jitted step sees one shape; else the last batch is smaller.
    prefetch: batches prepared ahead in a background thread (0: none).

  Yields:
    {"image": float32, "label": int32, "mask": bool}; mask marks the real
    examples.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  x, y = ((dataset.x_train, dataset.y_train) if split == "train"
          else (dataset.x_test, dataset.y_test))

  def batch(start: int) -> dict[str, np.ndarray]:
    idx = np.arange(start, min(start + batch_size, len(y)))
    out = _batch(dataset, x, y, idx, None)
    out["mask"] = np.ones(len(idx), bool)
    if pad and len(idx) < batch_size:
      out = {k: np.concatenate([v, np.zeros((batch_size - len(v),) + v.shape[1:],
                                            v.dtype)])
             for k, v in out.items()}
    return out

  return _prefetch(map(batch, range(0, len(y), batch_size)), prefetch)


def _batch(dataset: Dataset, x: Column, y: Column, idx: np.ndarray,
           rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """Gathers, transforms (augmenting when `rng` is given) and normalizes."""
  images = x[idx]
  if dataset.augmentation == "imagenet":
    images = _imagenet_transform(images, rng)
  elif dataset.augmentation == "cifar" and rng is not None:
    images = random_crop_flip(images, rng)
  return {"image": normalize(images, dataset.mean, dataset.std),
          "label": np.asarray(y[idx], np.int32)}


def normalize(images: np.ndarray, mean: np.ndarray,
              std: np.ndarray) -> np.ndarray:
  """(images - mean) / std per channel (last axis), as float32."""
  out = images.astype(np.float32)
  out -= mean.astype(np.float32)
  out *= (1.0 / std).astype(np.float32)
  return out


def random_crop_flip(images: np.ndarray, rng: np.random.Generator,
                     pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pads by `pad`, crops back to size at random and flips half (NHWC).

  One vectorized gather for the whole batch: the crop offsets and flips are
  folded into per-example row and column indices.
  """
  n, h, w = images.shape[:3]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = rng.integers(0, 2 * pad + 1, n)
  left = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  cols = np.where(flip[:, None], np.arange(w)[::-1], np.arange(w)) + left[:, None]
  rows = top[:, None] + np.arange(h)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _imagenet_transform(images: Sequence[np.ndarray],
                        rng: np.random.Generator | None) -> np.ndarray:
  """Random-resized crop + flip (rng given) or resize + centre crop, per image.

  The random draws come from `rng` up front, so the result does not depend
  on the order in which the thread pool runs the images.
  """
  n = len(images)
  if rng is None:
    fn = _resize_center_crop
    args = [()] * n
  else:
    fn = _random_resized_crop
    draws = rng.random((n, _CROP_ATTEMPTS, 4))
    flips = rng.random(n) < 0.5
    args = list(zip(draws, flips))
  return np.stack(list(_pool().map(lambda a: fn(a[0], *a[1]),
                                   zip(images, args))))


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(image)
  return out[..., None] if channels == 1 else out


def _random_resized_crop(image: np.ndarray, draws: np.ndarray,
                         flip: bool) -> np.ndarray:
  """torchvision's RandomResizedCrop(224) + horizontal flip, from uniforms."""
  h, w = image.shape[:2]
  log_lo, log_hi = np.log(_RESIZED_CROP_RATIO)
  for u_scale, u_ratio, u_top, u_left in draws:
    area = h * w * (_RESIZED_CROP_SCALE[0]
                    + u_scale * (_RESIZED_CROP_SCALE[1] - _RESIZED_CROP_SCALE[0]))
    ratio = np.exp(log_lo + u_ratio * (log_hi - log_lo))
    cw = int(round(np.sqrt(area * ratio)))
    ch = int(round(np.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(u_top * (h - ch + 1))
      left = int(u_left * (w - cw + 1))
      break
  else:  # fall back to a centre crop of clamped aspect ratio
    ratio = w / h
    if ratio < _RESIZED_CROP_RATIO[0]:
      cw, ch = w, int(round(w / _RESIZED_CROP_RATIO[0]))
    elif ratio > _RESIZED_CROP_RATIO[1]:
      ch, cw = h, int(round(h * _RESIZED_CROP_RATIO[1]))
    else:
      cw, ch = w, h
    ch, cw = min(ch, h), min(cw, w)
    top, left = (h - ch) // 2, (w - cw) // 2
  out = _to_pil(image).resize((IMAGENET_CROP, IMAGENET_CROP),
                              Image.Resampling.BILINEAR,
                              box=(left, top, left + cw, top + ch))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return _from_pil(out, image.shape[-1])


def _resize_center_crop(image: np.ndarray) -> np.ndarray:
  """Shorter side to 256 (bilinear), then the centre 224 x 224."""
  h, w = image.shape[:2]
  scale = IMAGENET_RESIZE / min(h, w)
  nh, nw = max(IMAGENET_RESIZE, int(h * scale)), max(IMAGENET_RESIZE,
                                                     int(w * scale))
  out = _to_pil(image).resize((nw, nh), Image.Resampling.BILINEAR)
  top, left = (nh - IMAGENET_CROP) // 2, (nw - IMAGENET_CROP) // 2
  out = out.crop((left, top, left + IMAGENET_CROP, top + IMAGENET_CROP))
  return _from_pil(out, image.shape[-1])


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _prefetch(items: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs `items` ahead in a daemon thread through a queue of `size` slots.

  Errors in the producer re-raise in the consumer; closing the consumer
  (e.g. `break`) stops the producer.
  """
  if size <= 0:
    yield from items
    return
  slots: queue.Queue[Any] = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        slots.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for item in items:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Raised(e))

  thread = threading.Thread(target=produce, daemon=True,
                            name="twa_input_prefetch")
  thread.start()
  try:
    while True:
      item = slots.get()
      if item is _END:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
