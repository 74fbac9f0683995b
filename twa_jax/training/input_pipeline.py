"""Datasets and batches: scikit-learn digits, `.npz` arrays and TFDS (no TF).

`load_dataset(config)` returns a `Dataset` of numpy arrays (NHWC images,
uint8 or float, or flat float features) or, for datasets whose images vary in
size (ImageNet), of `SourceColumn`s that read a TFDS data source on demand.
Batches come from grain pipelines over the examples: `train_iterator`
shuffles deterministically from (seed, epoch) and augments as in the paper,
epoch after epoch, with a checkpointable state; `eval_batches` walks a split
in order. Both shard each global batch over the processes. Batches are dicts
of numpy arrays: "image" (float32, normalized), "label" (int32) and, from
`eval_batches`, "mask" (bool, False on padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import pathlib
from typing import Any, Union
import zipfile
import zlib

from absl import flags
import grain
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
_READ_THREADS = 4  # grain threads reading (and transforming) in a process
_PREFETCH = 4  # batches prepared ahead (per worker process with workers)


class SourceColumn:
  """One feature of a TFDS split, read on demand (random access by index).

  `column[indices]` (an integer array) reads those examples: a list of arrays
  when their shapes vary, else one stacked array. `column.view(indices)` is a
  lazy subset.
  """

  def __init__(self, source: Sequence[dict[str, Any]], feature: str,
               feature_shape: tuple[int | None, ...],
               indices: np.ndarray | None = None):
    self.source = source
    self.feature = feature
    self.feature_shape = tuple(feature_shape)
    self.indices = (np.arange(len(source)) if indices is None
                    else np.asarray(indices, np.int64))

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def ragged(self) -> bool:
    return None in self.feature_shape

  def __getitem__(self, idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
    records = _read_records(self.source, self.indices[np.asarray(idx)])
    values = [np.asarray(r[self.feature]) for r in records]
    return values if self.ragged else np.stack(values)

  def view(self, idx: np.ndarray) -> SourceColumn:
    return SourceColumn(self.source, self.feature, self.feature_shape,
                        self.indices[np.asarray(idx)])


def _read_records(source: Sequence[dict[str, Any]],
                  indices: np.ndarray) -> list[dict[str, Any]]:
  """`source[i]` for each of `indices`, read (and decoded) in grain threads."""
  keys = grain.MapDataset.source(indices.tolist())
  return list(keys.map(source.__getitem__).to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS,
                        prefetch_buffer_size=4 * _READ_THREADS)))


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
    x = SourceColumn(source, "image", shape)
    y = SourceColumn(source, "label", ())
    if in_memory:
      if x.ragged:
        raise ValueError(f"config.in_memory: {name!r} images vary in size "
                         f"{shape}; they cannot be stacked in memory")
      x, y = _materialize(x, y)
    columns += [x, y]
  return tuple(columns), features["label"].num_classes


def _materialize(x: SourceColumn,
                 y: SourceColumn) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split into memory (each record once for both features)."""
  xs, ys = [], []
  for start in range(0, len(x), _CHUNK):
    records = _read_records(x.source, x.indices[start:start + _CHUNK])
    xs.append(np.stack([np.asarray(r[x.feature]) for r in records]))
    ys.append(np.asarray([r[y.feature] for r in records], np.int32))
  return np.concatenate(xs), np.concatenate(ys)


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


def train_iterator(dataset: Dataset, batch_size: int, *, seed: int,
                   augment: bool = True, process_index: int = 0,
                   process_count: int = 1,
                   workers: int = 0) -> grain.DatasetIterator:
  """Training batches over consecutive epochs, forever.

  A grain pipeline over the training examples' indices
  (`MapDataset.range`): shuffled (`shuffle`: epoch e's order is the
  permutation seeded with s + e, s drawn from `seed`, the same on every
  process), cut to `steps_per_epoch(dataset, batch_size)` global batches per
  epoch (the remainder is dropped), sharded, batched and repeated; then each
  batch is read (`_Read`: one gather from in-memory arrays, or the records
  of a TFDS source, decoded), augmented (`random_map`, seeded from `seed`,
  the process index and the step) and normalized. Global batch b is
  positions [b * batch_size, (b + 1) * batch_size) of the shuffled stream;
  this process takes its positions `process_index::process_count`, and
  reads only those examples. A global batch is thus the same set of examples
  for any `process_count`.

  The caller counts `steps_per_epoch` batches per epoch. `get_state()` of
  the iterator is a small JSON-serializable dict; `set_state` on a fresh
  iterator with the same arguments continues with the same batches.

  Args:
    dataset: the dataset.
    batch_size: global examples per step (over all processes).
    seed: non-negative data seed (order and augmentation).
    augment: apply the dataset's augmentation (else the evaluation transform).
    process_index: this process, in [0, process_count).
    process_count: processes sharing each global batch; must divide
      `batch_size`.
    workers: grain worker processes that read, decode and transform the
      batches (`mp_prefetch`); 0: this process (in threads). The batches do
      not depend on it.

  Returns:
    A grain iterator of {"image": float32 (batch_size // process_count,
    *input_shape), normalized, "label": int32 (batch_size // process_count,)}.

  Raises:
    ValueError: a bad seed, batch size, process index or count, or workers.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  steps = steps_per_epoch(dataset, batch_size)
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if workers < 0:
    raise ValueError(f"workers must be non-negative, got {workers}")
  shuffle_seed = _seed(seed, 0)
  order = grain.MapDataset.range(dataset.num_train).shuffle(seed=shuffle_seed)
  # One epoch of this process' batches of indices; grain's `repeat` carries
  # the epoch through the slices to `shuffle`.
  epoch = order[:steps * batch_size][process_index::process_count].batch(
      local, batch_fn=np.asarray)
  batches = epoch.repeat().map(_Read(dataset.x_train, dataset.y_train))
  transform = _Transform(dataset.augmentation)
  if augment and dataset.augmentation != "none":
    batches = batches.random_map(transform, seed=_seed(seed, 1, process_index))
  else:
    batches = batches.map(transform)
  batches = batches.map(functools.partial(_normalize_batch, mean=dataset.mean,
                                          std=dataset.std))
  it = batches.to_iter_dataset(_read_options())
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain's mp_prefetch reads its absl flags: outside absl's app.run
      # (tests, notebooks) they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=_PREFETCH))
  return iter(it)


def eval_batches(dataset: Dataset, split: str, batch_size: int, *,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """A split in order, in global batches padded to `batch_size`.

  The split is padded with blank rows (zero image and label, mask False) to
  whole global batches, so that a jitted step sees one shape and every
  process yields the same number of batches; this process yields the
  positions `process_index::process_count` of each global batch (with one
  process: the split in order). The evaluation transform is applied (no
  augmentation).

  Args:
    dataset: the dataset.
    split: "train" or "test".
    batch_size: global examples per batch (over all processes).
    process_index: this process, in [0, process_count).
    process_count: processes sharing each global batch; must divide
      `batch_size`.

  Returns:
    An iterator of {"image": float32, "label": int32, "mask": bool}, each of
    batch_size // process_count rows; mask marks the real examples.

  Raises:
    ValueError: an unknown split; a bad batch size, process index or count.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  local = _local_batch_size(batch_size, process_index, process_count)
  x, y = ((dataset.x_train, dataset.y_train) if split == "train"
          else (dataset.x_test, dataset.y_test))
  padded = -(-len(y) // batch_size) * batch_size
  batches = grain.MapDataset.range(padded)[process_index::process_count].batch(
      local, batch_fn=np.asarray).map(_Read(x, y, mask=True)).map(
          _Transform(dataset.augmentation)).map(functools.partial(
              _normalize_batch, mean=dataset.mean, std=dataset.std))
  return iter(batches.to_iter_dataset(_read_options()))


def _local_batch_size(batch_size: int, process_index: int,
                      process_count: int) -> int:
  """This process' share of a global batch, after checking the arguments."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, "
                     f"process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by "
                     f"process_count {process_count}")
  return batch_size // process_count


def _seed(*entropy: int) -> int:
  """A 32-bit grain seed drawn from the integers `entropy`."""
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=_PREFETCH)


class _Read(grain.transforms.Map):
  """Reads the examples of a batch of indices into a split.

  With `mask` (evaluation), indices past the split's end (padding) read the
  last example instead, and the batch's "mask" is False there. In-memory
  columns are gathered at once; lazy columns of one TFDS source are read
  once per example for both image and label.
  """

  def __init__(self, x: Column, y: Column, *, mask: bool = False):
    self.x, self.y, self.mask = x, y, mask
    self.one_read = (isinstance(x, SourceColumn)
                     and isinstance(y, SourceColumn) and x.source is y.source
                     and np.array_equal(x.indices, y.indices))

  def map(self, indices: np.ndarray) -> dict[str, Any]:
    real = indices < len(self.y)
    if self.mask:
      indices = np.minimum(indices, len(self.y) - 1)
    if self.one_read:
      records = _read_records(self.x.source, self.x.indices[indices])
      images = [np.asarray(r[self.x.feature]) for r in records]
      batch = {"image": images if self.x.ragged else np.stack(images),
               "label": np.asarray([r[self.y.feature] for r in records],
                                   np.int32)}
    else:
      batch = {"image": self.x[indices],
               "label": np.asarray(self.y[indices], np.int32)}
    if self.mask:
      batch["mask"] = real
    return batch


class _Transform(grain.transforms.RandomMap, grain.transforms.Map):
  """A dataset's transform of a batch's images, as a grain transform.

  `random_map` (training): the augmentation ("cifar": pad-4 crop + flip;
  "imagenet": random-resized crop + flip). `map` (evaluation): "imagenet"
  resizes and centre-crops; the others leave the images as they are.
  """

  def __init__(self, augmentation: str):
    self.augmentation = augmentation

  def random_map(self, batch: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    images = batch["image"]
    if self.augmentation == "cifar":
      images = random_crop_flip(images, rng)
    elif self.augmentation == "imagenet":
      images = _imagenet_transform(images, rng)
    return {**batch, "image": images}

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    if self.augmentation != "imagenet":
      return batch
    return {**batch, "image": _imagenet_transform(batch["image"], None)}


def _normalize_batch(batch: dict[str, Any], mean: np.ndarray,
                     std: np.ndarray) -> dict[str, np.ndarray]:
  """Normalizes the images; zeroes the rows a mask marks False."""
  out = {"image": normalize(batch["image"], mean, std),
         "label": batch["label"]}
  if "mask" in batch:
    out["mask"] = batch["mask"]
    out["image"][~out["mask"]] = 0.0
    out["label"][~out["mask"]] = 0
  return out


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

  The offsets and flips of the batch are drawn first; each window is then
  one slice copy into zeros (3x faster than one gather of the padded batch).
  """
  n, h, w = images.shape[:3]
  top = rng.integers(0, 2 * pad + 1, n) - pad
  left = rng.integers(0, 2 * pad + 1, n) - pad
  flip = rng.random(n) < 0.5
  out = np.zeros_like(images)
  for i, t, l in zip(range(n), top.tolist(), left.tolist()):
    out[i, max(0, -t):h - max(0, t), max(0, -l):w - max(0, l)] = (
        images[i, max(0, t):h + min(0, t), max(0, l):w + min(0, l)])
  out[flip] = out[flip, :, ::-1]
  return out


def _imagenet_transform(images: Sequence[np.ndarray],
                        rng: np.random.Generator | None) -> np.ndarray:
  """Random-resized crop + flip (rng given) or resize + centre crop, per image.

  The random draws come from `rng` up front, for the whole batch.
  """
  if rng is None:
    return np.stack([_resize_center_crop(image) for image in images])
  draws = rng.random((len(images), _CROP_ATTEMPTS, 4))
  flips = rng.random(len(images)) < 0.5
  return np.stack([_random_resized_crop(image, d, f)
                   for image, d, f in zip(images, draws, flips)])


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
