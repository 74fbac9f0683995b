"""Input pipeline: loaders, deterministic batches, augmentation, errors."""

import collections
import dataclasses
import io
import json
import os
import pathlib
import zipfile

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from twa_jax.training import input_pipeline as ip
from twa_jax.training import models

# Real CIFAR-10 as packed JPEGs (see its README): CI keeps it beside the
# checkout; TWA_CIFAR10_DIR points elsewhere (e.g. a worktree's runs).
CIFAR10_DIR = pathlib.Path(os.environ.get(
    "TWA_CIFAR10_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    / "cifar10"))
CIFAR10_TRAIN, CIFAR10_TEST = 5000, 1000  # decoded prefixes (~2 s, not ~15 s)


def _config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def _indexed_dataset(n=50, hw=8, augmentation="cifar") -> ip.Dataset:
  """Random uint8 images whose label is their index (to trace examples)."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
  y = np.arange(n, dtype=np.int32)
  return ip.Dataset("indexed", x, y, x[:7], y[:7], n,
                    np.zeros(3, np.float32), np.ones(3, np.float32),
                    augmentation)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> pathlib.Path:
  rng = np.random.default_rng(1)
  offsets = np.array([100, 50, 20], np.uint8)  # distinct channel means
  path = tmp_path_factory.mktemp("npz") / "tiny.npz"
  np.savez(path,
           x_train=(rng.integers(0, 100, (300, 32, 32, 3)) + offsets
                    ).astype(np.uint8),
           y_train=rng.integers(0, 5, 300), x_test=rng.integers(
               0, 256, (40, 32, 32, 3), dtype=np.uint8),
           y_test=rng.integers(0, 5, 40))
  return path


def _labels(batches) -> list[np.ndarray]:
  return [b["label"] for b in batches]


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _epoch(ds: ip.Dataset, batch_size: int, **kwargs) -> list[dict]:
  """The first epoch of `train_iterator`."""
  return _take(ip.train_iterator(ds, batch_size, **kwargs),
               ip.steps_per_epoch(ds, batch_size))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------ loaders


def test_digits():
  ds = ip.load_dataset(_config(name="digits"))
  assert (ds.num_train, ds.num_test, ds.num_classes) == (1437, 360, 10)
  assert ds.input_shape == (8, 8, 1) and ds.augmentation == "none"
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  again = ip.load_dataset(_config(name="digits"))
  np.testing.assert_array_equal(ds.x_test, again.x_test)  # fixed split
  assert set(np.unique(ds.y_test)) == set(range(10))
  # No augmentation, no rescaling: batches are the stored [0, 1] pixels.
  batch = next(ip.train_iterator(ds, 32, seed=0))
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  rows = {ds.x_train[i].tobytes(): ds.y_train[i] for i in range(ds.num_train)}
  for image, label in zip(batch["image"], batch["label"]):
    assert rows[image.tobytes()] == label


def test_npz_loads_prefixes_and_normalizes(npz_path):
  ds = ip.load_dataset(_config(name="npz", path=str(npz_path),
                               train_size=200, test_size=30))
  assert (ds.name, ds.num_train, ds.num_test) == ("tiny", 200, 30)
  assert ds.num_classes == 5 and ds.augmentation == "cifar"
  assert ds.input_shape == (32, 32, 3) and ds.x_train.dtype == np.uint8
  with np.load(npz_path) as arrays:
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"][:200])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"][:30])
  # Per-channel normalization: an unaugmented epoch has mean 0 and std 1.
  images = np.concatenate([b["image"] for b in _epoch(
      ds, 50, seed=0, augment=False)]).astype(np.float64)
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  np.testing.assert_allclose(ds.mean, [149.5, 99.5, 69.5], atol=0.5)


def test_npz_errors(tmp_path, npz_path):
  missing = tmp_path / "absent.npz"
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    ip.load_dataset(_config(name="npz", path=str(missing)))
  partial = tmp_path / "partial.npz"
  np.savez(partial, x_train=np.zeros((4, 2)), y_train=np.zeros(4, int))
  with pytest.raises(ValueError,
                     match=r"partial.npz: missing array\(s\) x_test, y_test "
                     r"\(has: x_train, y_train\)"):
    ip.load_dataset(_config(name="npz", path=str(partial)))
  ragged = tmp_path / "ragged.npz"
  np.savez(ragged, x_train=np.zeros((4, 2)), y_train=np.zeros(3, int),
           x_test=np.zeros((2, 2)), y_test=np.zeros(2, int))
  with pytest.raises(ValueError, match="x_train"):
    ip.load_dataset(_config(name="npz", path=str(ragged)))
  float_labels = tmp_path / "float_labels.npz"
  np.savez(float_labels, x_train=np.zeros((4, 2)), y_train=np.zeros(4),
           x_test=np.zeros((2, 2)), y_test=np.zeros(2, int))
  with pytest.raises(ValueError, match="y_train.*integer"):
    ip.load_dataset(_config(name="npz", path=str(float_labels)))
  with pytest.raises(ValueError, match="config.path"):
    ip.load_dataset(_config(name="npz"))
  with pytest.raises(ValueError, match="config.train_size=301"):
    ip.load_dataset(_config(name="npz", path=str(npz_path), train_size=301))
  with pytest.raises(ValueError, match="config.test_size"):
    ip.load_dataset(_config(name="npz", path=str(npz_path), test_size=0))
  with pytest.raises(ValueError, match="config.augmentation.*'mixup'"):
    ip.load_dataset(_config(name="npz", path=str(npz_path),
                            augmentation="mixup"))


def test_npz_flat_features_are_not_augmented(tmp_path):
  path = tmp_path / "features.npz"
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.normal(3.0, 2.0, (64, 5)).astype(np.float32),
           y_train=np.arange(64) % 3, x_test=np.zeros((8, 5), np.float32),
           y_test=np.arange(8) % 3)
  ds = ip.load_dataset(_config(name="npz", path=str(path)))
  assert ds.augmentation == "none" and ds.input_shape == (5,)
  with pytest.raises(ValueError, match="needs HWC images"):
    ip.load_dataset(_config(name="npz", path=str(path), augmentation="cifar"))
  images = np.concatenate([b["image"] for b in _epoch(ds, 16, seed=0)])
  np.testing.assert_allclose(images.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.std(0), 1.0, atol=1e-5)


def test_fields_the_named_dataset_ignores_are_errors(npz_path):
  # A path with the default name trained on digits and exited 0.
  with pytest.raises(ValueError, match=r"config.path=.*tiny.npz.* read only "
                     r"with config.name='npz', but config.name='digits'"):
    ip.load_dataset(_config(name="digits", path=str(npz_path)))
  with pytest.raises(ValueError, match="config.path=.*config.name='cifar10'"):
    ip.load_dataset(_config(name="cifar10", path=str(npz_path)))
  for field, value in (("data_dir", "/data"), ("download", True),
                       ("in_memory", True)):
    with pytest.raises(ValueError, match=f"config.{field}=.*TFDS.*'npz'"):
      ip.load_dataset(_config(name="npz", path=str(npz_path),
                              **{field: value}))
  with pytest.raises(ValueError, match="config.data_dir=.*'digits'"):
    ip.load_dataset(_config(name="digits", data_dir="/data"))
  ds = ip.load_dataset(_config(name="npz", path=str(npz_path), download=False,
                               data_dir=None))
  assert ds.name == "tiny"


def _save_npz(path, x_train, y_train, x_test, y_test) -> str:
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=y_test)
  return str(path)


def test_empty_splits_are_errors(tmp_path):
  images = np.zeros((6, 16, 16, 3), np.uint8)
  no_test = _save_npz(tmp_path / "no_test.npz", images, np.arange(6),
                      images[:0], np.zeros(0, int))
  with pytest.raises(ValueError,
                     match=r"no_test.npz: the test split is empty"):
    ip.load_dataset(_config(name="npz", path=no_test))
  no_train = _save_npz(tmp_path / "no_train.npz", images[:0],
                       np.zeros(0, int), images, np.arange(6))
  with pytest.raises(ValueError,
                     match=r"no_train.npz: the train split is empty"):
    ip.load_dataset(_config(name="npz", path=no_train))
  full = _save_npz(tmp_path / "full.npz", images, np.arange(6), images,
                   np.arange(6))
  for field in ("train_size", "test_size"):
    with pytest.raises(ValueError,
                       match=f"config.{field}: must be a positive integer"):
      ip.load_dataset(_config(name="npz", path=full, **{field: 0}))
  with tfds.testing.mock_data(num_examples=0):
    with pytest.raises(ValueError,
                       match="'cifar10': the train split under .* is empty"):
      ip.load_dataset(_config(name="cifar10", data_dir="/nonexistent"))


def test_grayscale_images_get_a_channel_axis(tmp_path):
  rng = np.random.default_rng(0)
  path = _save_npz(tmp_path / "mnist_like.npz",
                   rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                   np.arange(40) % 10,
                   rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
                   np.arange(8) % 10)
  ds = ip.load_dataset(_config(name="npz", path=path))
  assert ds.input_shape == (28, 28, 1) and ds.x_test.shape == (8, 28, 28, 1)
  assert ds.mean.shape == ds.std.shape == (1,)
  with np.load(path) as arrays:
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
  # cnn7 raised ZeroDivisionError on these inputs without the channel axis
  # (in shape inference, which `eval_shape` runs without compiling).
  model = models.create_model("cnn7", ds.num_classes)
  batch = next(ip.train_iterator(ds, 8, seed=0))
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      batch["image"])
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, batch["image"])
  assert logits.shape == (8, 10)


def test_bad_inputs_are_errors(tmp_path):
  labels = np.arange(4)
  nchw = _save_npz(tmp_path / "nchw.npz", np.zeros((4, 3, 32, 32), np.uint8),
                   labels, np.zeros((4, 3, 32, 32), np.uint8), labels)
  with pytest.raises(ValueError, match=r"nchw.npz: x_train \(4, 3, 32, 32\) "
                     r"looks channels-first.*NHWC"):
    ip.load_dataset(_config(name="npz", path=nchw))
  five_d = _save_npz(tmp_path / "five_d.npz", np.zeros((4, 2, 2, 2, 2)),
                     labels, np.zeros((4, 2, 2, 2, 2)), labels)
  with pytest.raises(ValueError, match=r"five_d.npz: x_train \(4, 2, 2, 2, 2\)"
                     r".*\(N, D\) features or \(N, H, W\[, C\]\) images"):
    ip.load_dataset(_config(name="npz", path=five_d))
  words = np.array([["a"], ["b"], ["c"], ["d"]])
  text = _save_npz(tmp_path / "text.npz", words, labels, words, labels)
  with pytest.raises(ValueError, match="text.npz: x_train must hold integers "
                     "or floats, got <U1"):
    ip.load_dataset(_config(name="npz", path=text))
  features = np.ones((4, 3), np.float32)
  features[2, 1] = np.nan
  nan = _save_npz(tmp_path / "nan.npz", np.ones((4, 3)), labels, features,
                  labels)
  with pytest.raises(ValueError, match="nan.npz: x_test holds NaN"):
    ip.load_dataset(_config(name="npz", path=nan))


def test_unreadable_npz_files_are_named(tmp_path, npz_path):
  def load(path):
    return ip.load_dataset(_config(name="npz", path=str(path)))

  empty = tmp_path / "empty.npz"
  empty.touch()
  with pytest.raises(ValueError, match="empty.npz: the file is empty"):
    load(empty)  # was EOFError
  data = npz_path.read_bytes()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated.npz: a truncated or damaged "
                     "zip archive"):
    load(truncated)  # was BadZipFile
  text = tmp_path / "text.npz"
  text.write_text("x_train,y_train\n1,2\n")
  with pytest.raises(ValueError, match="text.npz: not a zip archive"):
    load(text)  # was a "pickled data" message
  single = tmp_path / "single.npz"
  with open(single, "wb") as f:
    np.save(f, np.zeros((4, 2)))
  with pytest.raises(ValueError, match="single.npz: a single .npy array"):
    load(single)
  objects = tmp_path / "objects.npz"
  np.savez(objects, x_train=np.array([[1], [2, 3]], dtype=object),
           y_train=np.arange(2), x_test=np.zeros((2, 1)), y_test=np.arange(2))
  with pytest.raises(ValueError,
                     match="objects.npz: array x_train cannot be read"):
    load(objects)
  # A damaged member inside an intact archive: its CRC check fails.
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(data)
  with zipfile.ZipFile(damaged) as archive:
    info = archive.getinfo("x_test.npy")
  raw = bytearray(data)
  start = info.header_offset + 30 + len(info.filename) + info.file_size // 2
  raw[start] ^= 0xFF
  damaged.write_bytes(bytes(raw))
  with pytest.raises(ValueError,
                     match="damaged.npz: array x_test cannot be read"):
    load(damaged)
  # A damaged central directory behind an intact end record.
  directory = tmp_path / "directory.npz"
  raw = bytearray(data)
  raw[data.rindex(b"PK\x01\x02")] ^= 0xFF
  directory.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="directory.npz: not a readable .npz "
                     "file.*central directory"):
    load(directory)


@pytest.fixture(scope="session")
def cifar10_npz(tmp_path_factory) -> pathlib.Path:
  """The first images of real CIFAR-10's splits, decoded once into an `.npz`.

  Decodes the packed JPEGs of `CIFAR10_DIR` as its README describes them
  (`{split}_jpeg` blob, `{split}_offsets`, `{split}_labels`).
  """
  packed_path = CIFAR10_DIR / "cifar10_jpeg.npz"
  if not packed_path.is_file():
    pytest.skip(f"real CIFAR-10 absent: no {packed_path} (CI has it in "
                "../shared/data/cifar10 beside the checkout; or set "
                "TWA_CIFAR10_DIR)")
  arrays = {}
  with np.load(packed_path) as packed:
    for split, n in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
      blob, offsets = packed[f"{split}_jpeg"], packed[f"{split}_offsets"]
      arrays[f"x_{split}"] = np.stack([
          np.asarray(Image.open(io.BytesIO(
              blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
          for i in range(n)])
      arrays[f"y_{split}"] = packed[f"{split}_labels"][:n]
  path = tmp_path_factory.mktemp("cifar10") / "cifar10.npz"
  np.savez(path, **arrays)
  return path


def test_real_cifar10_npz(cifar10_npz):
  ds = ip.load_dataset(_config(name="npz", path=str(cifar10_npz),
                               test_size=CIFAR10_TEST // 2))
  assert (ds.num_train, ds.num_test, ds.num_classes) == (
      CIFAR10_TRAIN, CIFAR10_TEST // 2, 10)
  assert ds.augmentation == "cifar" and ds.input_shape == (32, 32, 3)
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  # The README's per-channel statistics of the full training set.
  np.testing.assert_allclose(ds.mean / 255, [0.491, 0.482, 0.447], atol=0.01)
  np.testing.assert_allclose(ds.std / 255, [0.245, 0.243, 0.261], atol=0.01)
  assert np.bincount(ds.y_train, minlength=10).min() > 400  # balanced prefix
  batch = next(ip.train_iterator(ds, 128, seed=0))
  assert batch["image"].shape == (128, 32, 32, 3)
  assert np.isfinite(batch["image"]).all()
  # The test split, normalized with the training statistics, is centred.
  test = np.concatenate([b["image"][b["mask"]]
                         for b in ip.eval_batches(ds, "test", 128)])
  assert test.shape == (CIFAR10_TEST // 2, 32, 32, 3)
  np.testing.assert_allclose(test.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(test.std(axis=(0, 1, 2)), 1.0, atol=0.05)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
    ip.load_dataset(_config(name="no_such_set", data_dir="/nonexistent"))
  with pytest.raises(ValueError, match="config.name"):
    ip.load_dataset(_config(data_dir="/nonexistent"))


def test_tfds_not_prepared_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"'cifar10'.*{tmp_path}"):
    ip.load_dataset(_config(name="cifar10", data_dir=str(tmp_path)))


# --------------------------------------------------------------------- TFDS


def test_tfds_cifar10_in_memory_with_mock_data():
  with tfds.testing.mock_data(num_examples=24):
    ds = ip.load_dataset(_config(name="cifar10", data_dir="/nonexistent",
                                 train_size=20))
  assert isinstance(ds.x_train, np.ndarray) and ds.x_train.dtype == np.uint8
  assert ds.x_train.shape == (20, 32, 32, 3) and ds.num_test == 24
  assert ds.num_classes == 10 and ds.augmentation == "cifar"
  assert ds.y_train.dtype == np.int32 and ds.y_train.max() < 10
  batch = next(ip.train_iterator(ds, 8, seed=0))
  assert batch["image"].shape == (8, 32, 32, 3)


def test_tfds_imagenet_lazy_with_mock_data():
  with tfds.testing.mock_data(num_examples=20):
    ds = ip.load_dataset(_config(name="imagenet2012", data_dir="/nonexistent"))
    with pytest.raises(ValueError, match="in_memory"):
      ip.load_dataset(_config(name="imagenet2012", data_dir="/nonexistent",
                              in_memory=True))
  assert isinstance(ds.x_train, ip.SourceColumn) and ds.x_train.ragged
  assert ds.num_classes == 1000 and ds.augmentation == "imagenet"
  assert ds.input_shape == (224, 224, 3)
  # Images of varying sizes come out as 224 x 224 crops.
  sizes = {image.shape for image in ds.x_train[np.arange(6)]}
  assert len(sizes) > 1
  # JPEGs decoded per example; in grain worker processes, the same batches.
  first = _take(ip.train_iterator(ds, 4, seed=3), 7)
  workers = ip.train_iterator(ds, 4, seed=3, workers=2)
  again = _take(workers, 7)
  workers.close()
  assert first[0]["image"].shape == (4, 224, 224, 3)
  _assert_same_batches(first, again)
  assert sorted(np.concatenate(_labels(first[:5]))) == sorted(
      ds.y_train[np.arange(20)])
  test = list(ip.eval_batches(ds, "test", 8))
  assert [b["image"].shape[0] for b in test] == [8, 8, 8]
  assert [b["mask"].sum() for b in test] == [8, 8, 4]
  np.testing.assert_array_equal(
      np.concatenate([b["label"][b["mask"]] for b in test]),
      ds.y_test[np.arange(20)])
  train_part, holdout = ip.holdout_split(ds, 0.25, seed=0)
  assert isinstance(holdout.x_train, ip.SourceColumn)
  assert (train_part.num_train, holdout.num_train) == (15, 5)
  assert not set(train_part.x_train.indices) & set(holdout.x_train.indices)


# ------------------------------------------------------------------ batches


def test_batches_are_deterministic_per_seed_and_epoch():
  ds = _indexed_dataset()
  spe = ip.steps_per_epoch(ds, 8)
  assert spe == 6  # remainder dropped
  a = _take(ip.train_iterator(ds, 8, seed=0), 3 * spe)
  _assert_same_batches(a, _take(ip.train_iterator(ds, 8, seed=0), 3 * spe))
  epochs = [np.concatenate(_labels(a[e * spe:(e + 1) * spe]))
            for e in range(3)]
  for labels in epochs:
    assert len(set(labels)) == 48  # each example at most once per epoch
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  other_seed = _take(ip.train_iterator(ds, 8, seed=1), spe)
  assert not np.array_equal(epochs[0], np.concatenate(_labels(other_seed)))
  # Each example's augmentation is drawn anew every epoch.
  seen = {}
  for batch in a:
    for image, label in zip(batch["image"], batch["label"]):
      seen.setdefault(int(label), []).append(image)
  twice = [images for images in seen.values() if len(images) > 1]
  assert twice and any(not np.array_equal(*images[:2]) for images in twice)


@pytest.mark.parametrize("augmentation", ["cifar", "none"])
def test_global_batches_do_not_depend_on_process_count(augmentation):
  ds = _indexed_dataset(n=70, augmentation=augmentation)
  steps = 2 * ip.steps_per_epoch(ds, 16) + 1  # into a third epoch
  single = _take(ip.train_iterator(ds, 16, seed=5), steps)
  for count in (2, 4):
    shares = [_take(ip.train_iterator(ds, 16, seed=5, process_index=p,
                                      process_count=count), steps)
              for p in range(count)]
    for step, batch in enumerate(single):
      for p, share in enumerate(shares):
        local = share[step]
        assert local["label"].shape == (16 // count,)
        # Process p holds positions p::count of the global batch (its
        # augmentation draws differ: they depend on the process).
        np.testing.assert_array_equal(local["label"],
                                      batch["label"][p::count])
        if augmentation == "none":
          np.testing.assert_array_equal(local["image"],
                                        batch["image"][p::count])


class _CountingSource:
  """Records (dicts) of a list; counts the reads of each index."""

  def __init__(self, records):
    self.records = records
    self.reads = collections.Counter()

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads[i] += 1
    return self.records[i]


def _lazy_indexed_dataset(n=64) -> ip.Dataset:
  """`_indexed_dataset` read from a counting source, as TFDS splits are."""
  arrays = _indexed_dataset(n)
  source = _CountingSource([{"image": x, "label": y} for x, y in
                            zip(arrays.x_train, arrays.y_train)])
  x = ip.SourceColumn(source, "image", (8, 8, 3))
  y = ip.SourceColumn(source, "label", ())
  return dataclasses.replace(arrays, x_train=x, y_train=y)


def test_each_process_reads_only_its_share():
  ds = _lazy_indexed_dataset()
  assert ip.steps_per_epoch(ds, 8) == 8
  iterator = ip.train_iterator(ds, 8, seed=2, process_index=1,
                               process_count=2)
  taken = np.concatenate(_labels(_take(iterator, 2)))
  reads = dict(ds.x_train.source.reads)
  # The global batches the reads can reach (the 2 taken plus those
  # prefetched), from a second source.
  reference = _lazy_indexed_dataset()
  window = _take(ip.train_iterator(reference, 8, seed=2), 8)
  share = {int(i) for b in window for i in b["label"][1::2]}
  assert set(taken) <= set(reads) <= share
  assert set(reads.values()) == {1}  # one read per example (image + label)


def test_state_restores_mid_epoch_and_across_epochs():
  ds = _indexed_dataset()
  spe = ip.steps_per_epoch(ds, 8)
  reference = _take(ip.train_iterator(ds, 8, seed=4, process_index=1,
                                      process_count=2), 4 * spe)
  for cut in (3, spe, spe + 4):
    first = ip.train_iterator(ds, 8, seed=4, process_index=1,
                              process_count=2)
    _take(first, cut)
    state = json.loads(json.dumps(first.get_state()))
    resumed = ip.train_iterator(ds, 8, seed=4, process_index=1,
                                process_count=2)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2 * spe), reference[cut:cut + 2 * spe])


def test_worker_processes_yield_the_same_batches_and_state():
  ds = _indexed_dataset()
  reference = _take(ip.train_iterator(ds, 8, seed=6), 10)
  first = ip.train_iterator(ds, 8, seed=6, workers=2)
  _assert_same_batches(_take(first, 7), reference[:7])
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = ip.train_iterator(ds, 8, seed=6, workers=2)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), reference[7:])
  resumed.close()


def test_random_crop_flip_is_a_padded_window():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (200, 6, 5, 3), dtype=np.uint8)
  out = ip.random_crop_flip(images, np.random.default_rng(1), pad=2)
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  found = []
  for i in range(len(images)):
    matches = [(top, left, flip)
               for top in range(5) for left in range(5) for flip in (0, 1)
               if np.array_equal(
                   out[i], (padded[i, top:top + 6, left:left + 5][:, ::-1]
                            if flip else padded[i, top:top + 6, left:left + 5]))]
    assert len(matches) == 1, i
    found.append(matches[0])
  tops, lefts, flips = np.array(found).T
  assert set(tops) == set(lefts) == set(range(5))  # every offset occurs
  assert 0.35 < flips.mean() < 0.65
  unpadded = ip.random_crop_flip(images, np.random.default_rng(5), pad=0)
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(unpadded, images)]
  kept = [np.array_equal(o, x) for o, x in zip(unpadded, images)]
  assert all(np.logical_xor(flipped, kept)) and 0 < sum(flipped) < 200


def test_augmentation_is_applied_only_in_training():
  ds = _indexed_dataset(hw=16)
  plain = next(ip.train_iterator(ds, 16, seed=0, augment=False))
  np.testing.assert_array_equal(plain["image"],
                                ds.x_train[plain["label"]].astype(np.float32))
  augmented = next(ip.train_iterator(ds, 16, seed=0))
  np.testing.assert_array_equal(augmented["label"], plain["label"])
  assert not np.array_equal(augmented["image"], plain["image"])
  assert augmented["image"].shape == plain["image"].shape


def test_imagenet_transforms():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  sliver = rng.integers(0, 256, (10, 1000, 3), dtype=np.uint8)
  evaluated = ip._imagenet_transform([wide, sliver], None)
  assert evaluated.shape == (2, 224, 224, 3) and evaluated.dtype == np.uint8
  # Evaluation: resize the short side to 256, take the centre 224.
  flat = np.full((300, 400, 3), 7, np.uint8)
  flat[:, :200] = 200
  centre = ip._imagenet_transform([flat], None)[0]
  assert (centre[:, :100] == 200).all() and (centre[:, -100:] == 7).all()
  trained = ip._imagenet_transform([wide, sliver], np.random.default_rng(1))
  assert trained.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(
      trained, ip._imagenet_transform([wide, sliver], np.random.default_rng(1)))
  # A left-right ramp: flipped crops decrease along the width.
  ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None],
                         (256, 256, 3)).copy()
  crops = ip._imagenet_transform([ramp] * 40, np.random.default_rng(2))
  slope = np.sign(crops[:, 112, -1, 0].astype(int) - crops[:, 112, 0, 0])
  assert 5 < (slope < 0).sum() < 35 and (slope != 0).all()


def test_eval_batches_cover_the_split_in_order():
  ds = _indexed_dataset()
  full = list(ip.eval_batches(ds, "train", 16))
  assert [b["image"].shape for b in full] == [(16, 8, 8, 3)] * 4
  assert [b["mask"].sum() for b in full] == [16, 16, 16, 2]
  np.testing.assert_array_equal(
      np.concatenate([b["label"][b["mask"]] for b in full]), ds.y_train)
  np.testing.assert_array_equal(  # the evaluation transform: no augmentation
      np.concatenate([b["image"][b["mask"]] for b in full]), ds.x_train)
  last = full[-1]
  assert last["mask"].dtype == bool and not last["mask"][2:].any()
  assert not last["image"][2:].any() and not last["label"][2:].any()
  # Two processes: the same number of batches, each half of every global
  # batch (positions p::2), padding included.
  shares = [list(ip.eval_batches(ds, "test", 4, process_index=p,
                                 process_count=2)) for p in range(2)]
  single = list(ip.eval_batches(ds, "test", 4))
  assert len(shares[0]) == len(shares[1]) == len(single) == 2
  for step, batch in enumerate(single):
    for p in range(2):
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(shares[p][step][key],
                                      batch[key][p::2])
  # A process whose share of the last batch is all padding.
  [blank] = ip.eval_batches(ds, "test", 8, process_index=7, process_count=8)
  assert not blank["mask"].any() and not blank["image"].any()
  np.testing.assert_array_equal(single[1]["mask"], [True, True, True, False])
  np.testing.assert_array_equal(single[1]["label"][:3], ds.y_test[4:])
  with pytest.raises(ValueError, match="'valid'"):
    next(ip.eval_batches(ds, "valid", 4))
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by "
                     "process_count 4"):
    ip.eval_batches(ds, "test", 6, process_index=0, process_count=4)


def test_holdout_split_is_disjoint_and_deterministic():
  ds = _indexed_dataset()
  train, holdout = ip.holdout_split(ds, 0.2, seed=0)
  assert (train.num_train, holdout.num_train) == (40, 10)
  assert not set(train.y_train) & set(holdout.y_train)
  assert set(train.y_train) | set(holdout.y_train) == set(range(50))
  np.testing.assert_array_equal(holdout.x_train, ds.x_train[holdout.y_train])
  assert holdout.num_test == ds.num_test and holdout.mean is ds.mean
  np.testing.assert_array_equal(
      holdout.y_train, ip.holdout_split(ds, 0.2, seed=0)[1].y_train)
  assert not np.array_equal(
      holdout.y_train, ip.holdout_split(ds, 0.2, seed=1)[1].y_train)
  for fraction in (0.0, 1.0, 0.001):
    with pytest.raises(ValueError, match="fraction"):
      ip.holdout_split(ds, fraction, seed=0)


def test_batch_errors():
  ds = _indexed_dataset()
  with pytest.raises(ValueError, match="batch_size 51 exceeds"):
    ip.steps_per_epoch(ds, 51)
  with pytest.raises(ValueError, match="batch_size"):
    ip.steps_per_epoch(ds, 0)
  with pytest.raises(ValueError, match="batch_size 51 exceeds"):
    ip.train_iterator(ds, 51, seed=0)
  with pytest.raises(ValueError, match="seed must be non-negative"):
    ip.train_iterator(ds, 8, seed=-1)
  with pytest.raises(ValueError, match="batch_size 10 is not divisible by "
                     "process_count 4"):
    ip.train_iterator(ds, 10, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index 2 must be in \[0, "
                     r"process_count=2\)"):
    ip.train_iterator(ds, 8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="workers"):
    ip.train_iterator(ds, 8, seed=0, workers=-1)
