"""Input pipeline throughput: grain against the previous hand-written one.

Issue 15. One run; the sides of each part alternate, their order rotating
every repeat (medians of the repeats, and of the per-repeat ratios):

  npz    CIFAR-10 from a decoded `.npz` (--data; --smoke: a small synthetic
         one), pad-4 crop + flip: images/s of
           grain     `input_pipeline.train_iterator` (in-process threads)
           previous  `train_batches` of the pipeline before issue 15 (commit
                     PREVIOUS, read with `git show` and imported from a
                     temporary file; a background thread)
  jpeg   the same kind of data as JPEGs (--jpeg: the packed CIFAR-10 JPEGs,
         the first --jpeg-train of each split; --smoke: the synthetic images
         encoded) in a TFDS-style array_record dataset written to a
         temporary directory (records serialized by the TFDS features,
         written with `array_record`, metadata by
         `tfds.folder_dataset.write_metadata`) and loaded lazily
         (`config.in_memory=False`) through `tfds.data_source`, so each
         example is read and JPEG-decoded in the pipeline: grain with
         workers 0 and 2 (`mp_prefetch`), previous (its thread pool)
  step   the cnn7 SGD step (`steps.make_train_step`, batch --batch) fed
         from grain's `train_iterator` on the npz data and on one cached
         batch (host arrays, as the loop passes them): seconds per step and
         their ratio (target: grain / cached <= 1.05), over --step-repeats

Each throughput block starts a fresh iterator, pulls --warmup batches
untimed (compilation, worker start, buffers filled and drained), then
times --batches batches. Step blocks run --steps steps on a long-lived
iterator (the pipeline works while the step runs, as in training; --steps
exceeds the batches it prefetches).

  python /work/shared/data/cifar10/decode.py /tmp/c10.npz
  python benchmarks/input_pipeline.py --data /tmp/c10.npz \
      --jpeg /work/shared/data/cifar10/cifar10_jpeg.npz
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from array_record.python import array_record_module
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from twa_jax.training import input_pipeline
from twa_jax.training import models
from twa_jax.training import steps

import common  # benchmarks/common.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREVIOUS = "34f7f2f"  # the last commit with the hand-written pipeline
JPEG_NAME = "cifar10_jpeg"


def parse_args(argv: list[str] | None = None):
  p = common.parser("input_pipeline", __doc__.split("\n\n")[0])
  p.set_defaults(repeats=5)
  p.add_argument("--data", help="decoded CIFAR-10 .npz (x_train, ...)")
  p.add_argument("--jpeg", help="packed CIFAR-10 JPEGs (cifar10_jpeg.npz)")
  p.add_argument("--jpeg-train", type=int, default=10000,
                 help="training JPEGs written to the array_record dataset")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--batches", type=int, default=30,
                 help="batches per timed throughput block")
  p.add_argument("--warmup", type=int, default=6,
                 help="untimed batches at the start of each block")
  p.add_argument("--steps", type=int, default=8,
                 help="training steps per timed step block")
  p.add_argument("--step-repeats", type=int, default=4)
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.batches, args.warmup, args.steps = 16, 4, 2, 2
    args.repeats, args.step_repeats, args.jpeg_train = 2, 2, 256
  elif not (args.data and args.jpeg):
    p.error("--data and --jpeg are required (or use --smoke)")
  return args


def previous_pipeline(directory: str):
  """The input_pipeline module of commit PREVIOUS, imported from `directory`."""
  source = subprocess.run(
      ["git", "-C", str(ROOT), "show",
       f"{PREVIOUS}:twa_jax/training/input_pipeline.py"],
      capture_output=True, text=True, check=True).stdout
  path = os.path.join(directory, "previous_input_pipeline.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("previous_input_pipeline",
                                                path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def synthetic(directory: str, n: int) -> tuple[str, list[bytes], np.ndarray]:
  """A small CIFAR-like `.npz` and its training images as JPEGs."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, n)
  path = os.path.join(directory, "synthetic.npz")
  np.savez(path, x_train=x, y_train=y, x_test=x[:64], y_test=y[:64])
  jpegs = []
  for image in x:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    jpegs.append(buffer.getvalue())
  return path, jpegs, y


def packed_jpegs(path: str, n: int) -> tuple[list[bytes], np.ndarray]:
  """The first `n` training JPEGs and labels of the packed CIFAR-10 file."""
  with np.load(path) as packed:
    blob, offsets = packed["train_jpeg"], packed["train_offsets"]
    labels = packed["train_labels"][:n]
    return [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(n)], labels


def write_tfds(data_dir: str, jpegs: list[bytes], labels: np.ndarray) -> None:
  """A TFDS-style array_record dataset JPEG_NAME of the JPEGs (train and a
  small test split)."""
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=10)})
  directory = os.path.join(data_dir, JPEG_NAME, "1.0.0")
  os.makedirs(directory)
  infos = []
  for split, count in (("train", len(jpegs)), ("test", min(256, len(jpegs)))):
    path = os.path.join(
        directory, f"{JPEG_NAME}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    size = 0
    for jpeg, label in zip(jpegs[:count], labels[:count]):
      record = features.serialize_example(
          {"image": io.BytesIO(jpeg), "label": int(label)})
      writer.write(record)
      size += len(record)
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[count],
                                     num_bytes=size))
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, split_infos=infos,
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      check_data=False)


def rotate(sides: dict[str, Callable[[], float]],
           repeats: int) -> dict[str, list[float]]:
  """`common.alternate` for sides that time themselves (return seconds)."""
  names = list(sides)
  times = {name: [] for name in names}
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      times[name].append(sides[name]())
  return times


def throughput_side(make: Callable[[], Iterator], args) -> Callable[[], float]:
  """A fresh iterator: --warmup batches untimed, then --batches timed."""

  def side() -> float:
    iterator = make()
    for _ in range(args.warmup):
      next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return seconds

  return side


def previous_batches(previous, dataset, batch_size: int) -> Iterator:
  """The previous pipeline's training batches, epoch after epoch."""
  for epoch in itertools.count():
    yield from previous.train_batches(dataset, batch_size, seed=0,
                                      epoch=epoch)


def throughput(sides: dict[str, Callable[[], Iterator]], args) -> dict:
  times = rotate({name: throughput_side(make, args)
                  for name, make in sides.items()}, args.repeats)
  images = args.batches * args.batch
  out = {name: {"images_per_s": images / common.median(t), "seconds": t}
         for name, t in times.items()}
  print({name: round(r["images_per_s"]) for name, r in out.items()},
        "images/s", flush=True)
  for name in times:
    if name != "previous":
      out[name]["vs_previous"] = 1.0 / common.ratio(times[name],
                                                    times["previous"])
  return out


class Trainer:
  """Steps of one jitted training step on batches of one source."""

  def __init__(self, step: Callable, state: steps.TrainState,
               batches: Iterator):
    self.step, self.state, self.batches = step, state, batches
    self.metrics = steps.new_metrics()

  def __call__(self, count: int):
    for _ in range(count):
      self.state, self.metrics = self.step(self.state, self.metrics,
                                           next(self.batches))
    return self.state


def step_ratio(dataset, args) -> dict:
  grain_batches = input_pipeline.train_iterator(dataset, args.batch, seed=0)
  cached = next(input_pipeline.train_iterator(dataset, args.batch, seed=1))
  model = models.create_model("cnn7", dataset.num_classes)
  tx = steps.base_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
  step = steps.make_train_step(model, tx)  # compiled once, for every side

  def state() -> steps.TrainState:
    variables = model.init(jax.random.PRNGKey(0), cached["image"],
                           train=False)
    return steps.TrainState.create(variables["params"],
                                   variables.get("batch_stats", {}), tx)

  trainers = {
      "cached": Trainer(step, state(), itertools.repeat(cached)),
      "grain": Trainer(step, state(), grain_batches),
  }
  times = common.alternate(
      {name: (lambda t=t: t(args.steps)) for name, t in trainers.items()},
      args.step_repeats)
  grain_batches.close()
  step_s = {name: common.median(t) / args.steps for name, t in times.items()}
  return {
      "step_s": step_s,
      "consumed_images_per_s": args.batch / step_s["cached"],
      "grain_over_cached": common.ratio(times["grain"], times["cached"]),
      "grain_over_cached_per_repeat": [
          g / c for g, c in zip(times["grain"], times["cached"])],
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  config = ml_collections.ConfigDict
  with tempfile.TemporaryDirectory() as tmp:
    previous = previous_pipeline(tmp)
    if args.smoke:
      npz, jpegs, labels = synthetic(tmp, args.jpeg_train)
    else:
      npz = args.data
      jpegs, labels = packed_jpegs(args.jpeg, args.jpeg_train)
    npz_config = config({"name": "npz", "path": npz})
    data = input_pipeline.load_dataset(npz_config)
    old_data = previous.load_dataset(npz_config)
    start = time.perf_counter()
    write_tfds(tmp, jpegs, labels)
    written_s = time.perf_counter() - start
    jpeg_config = config({"name": JPEG_NAME, "data_dir": tmp,
                          "in_memory": False})
    lazy = input_pipeline.load_dataset(jpeg_config)
    old_lazy = previous.load_dataset(jpeg_config)
    assert isinstance(lazy.x_train, input_pipeline.SourceColumn)
    train = input_pipeline.train_iterator
    report = {
        "benchmark": "input_pipeline",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "npz": throughput({
            "grain": lambda: train(data, args.batch, seed=0),
            "previous": lambda: previous_batches(previous, old_data,
                                                 args.batch),
        }, args),
        "jpeg": throughput({
            "grain_w0": lambda: train(lazy, args.batch, seed=0),
            "grain_w2": lambda: train(lazy, args.batch, seed=0, workers=2),
            "previous": lambda: previous_batches(previous, old_lazy,
                                                 args.batch),
        }, args),
        "jpeg_dataset": {"train_examples": len(jpegs),
                         "augmentation": lazy.augmentation,
                         "written_s": written_s},
        "step": step_ratio(data, args),
    }
  step = report["step"]
  report["npz"]["grain"]["headroom"] = (report["npz"]["grain"]["images_per_s"]
                                        / step["consumed_images_per_s"])
  rows = [{"part": part, "side": side, "images/s": r["images_per_s"],
           "vs previous (paired)": r.get("vs_previous", 1.0)}
          for part in ("npz", "jpeg") for side, r in report[part].items()]
  print(f"input_pipeline: batch {args.batch}, {args.batches} timed batches "
        f"per block, {args.repeats} repeats; jpeg: {len(jpegs)} examples "
        f"({lazy.augmentation} augmentation)")
  print(common.table(rows, ["part", "side", "images/s",
                            "vs previous (paired)"]))
  print(f"cnn7 step: {step['step_s']['cached']:.3f} s on a cached batch, "
        f"{step['step_s']['grain']:.3f} s fed by grain; grain / cached "
        f"{step['grain_over_cached']:.3f} (target <= 1.05); the step "
        f"consumes {step['consumed_images_per_s']:.0f} images/s, grain "
        f"delivers {report['npz']['grain']['headroom']:.0f}x that")
  common.write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
