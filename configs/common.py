"""Settings shared by the configs: one builder per kind of experiment.

Every config file calls one of these and changes what differs. The fields:

  name            label of the run (summary, table, default workdir).
  seed            model initialization and data order.
  phases          comma-separated subset of "sgd,swa,twa,surface,sweep,report",
                  run in that order.
  data            `twa_jax.training.input_pipeline.load_dataset` fields (name,
                  path, data_dir, train_size, test_size, augmentation,
                  download: let TFDS download and prepare the data) and
                  holdout_fraction: >0 replaces the test split by that share
                  of the training set (for tuning without touching test);
                  holdout_seed draws the held-out parts (this one and
                  TWA-v's), apart from `seed` so that runs with different
                  seeds hold out the same examples (soups need that).
  model           name and kwargs of `twa_jax.training.models.create_model`.
  sgd             the regular training run that records the trajectory:
                  optimizer ("sgd": momentum SGD with coupled weight decay as
                  in PyTorch; "adam": Adam with coupled weight decay;
                  "schedule_free_sgd": optax.contrib.schedule_free_sgd, a
                  baseline without averaging, momentum as its b1, best at a
                  constant lr (decay_at=()); the trajectory and its results
                  are its evaluation parameters), epochs,
                  batch_size, lr and its schedule ("step": times decay_factor
                  after each fraction decay_at of the epochs; "swa": the SWA
                  paper's constant, linear-to-swa_lr, constant schedule with
                  swa_start), ema_decay (EMA of the parameters, every step),
                  snapshots_per_epoch and include_initial (sampling),
                  init_from: where the run starts ("": from the seed's
                  initialization; else an orbax checkpoint directory, DIR
                  or DIR:STEP, or an .npz of the model's variables, e.g.
                  converted pretrained weights, to fine-tune from; formats
                  in `twa_jax.training.init_from`; checked against the
                  model before training).
  averaging       the snapshots SWA, EMA (its end) and TWA use: unit "epoch"
                  (snapshots taken after epochs start..end; 0 is the initial
                  weights) or "index" (the store's snapshots start..end), both
                  inclusive.
  twa             TWA training in the span of those snapshots: optimizer
                  ("sgd": `twa_jax.twa`, projected momentum SGD as in the
                  paper; "adam": `twa_jax.scale_by_subspace` around Adam),
                  epochs, lr, schedule as for sgd ("step" with decay_at,
                  decay_factor and linear_epochs: the last epochs decay
                  linearly to 0), weight_decay (lambda), start ("mean": head
                  stage; "last": tail stage), granularity of the coefficients
                  ("global": one per snapshot; "layer": one per snapshot and
                  layer; "leaf": one per snapshot and parameter leaf),
                  storage of the basis ("float32", "bfloat16", "int8",
                  "int4"), holdout_fraction (TWA-v: >0 holds that share of
                  the training set out of the sgd phase; the twa phase then
                  also trains the coefficients on it and reports both).
  surface         the surface phase's grid over the plane through SGD, SWA and
                  TWA: steps per axis, margin (share of the points' extent
                  added on each side), train_eval_size (training examples
                  for the train loss at each point; None: all).
  sweep           the sweep phase (the paper's Figure 3: how early can SGD
                  stop?): heads, the epochs k at which SWA and TWA (config.twa)
                  average the snapshots of epochs averaging.start..k, each
                  with its own TWA run (heads may be added between
                  invocations; finished ones are kept); budget_matched_sgd:
                  also train SGD from the start for each budget k + twa.epochs
                  with its schedule compressed (the same decay fractions).
  parallel        how the run spreads over devices and processes (every
                  phase is data-parallel over all devices of all processes,
                  see `twa_jax.training.parallel`): distributed (True: call
                  jax.distributed.initialize with coordinator_address,
                  num_processes and process_id; None ones are detected from
                  the cluster, e.g. SLURM or a TPU pod), workers (grain
                  worker processes per host that load and augment batches;
                  0: in the training process), basis_layout (the TWA basis
                  over several devices: "params", each device holds P's rows
                  of a slice of the parameters; "basis", each holds some of
                  its columns; see `twa_jax.basis_from_store`),
                  param_sharding (the training state over the devices:
                  "replicated", whole on every device; "fsdp", each leaf of
                  the parameters, optimizer state, EMA and batch statistics
                  split along the data axis on its largest dimension that
                  the device count divides, the others replicated, XLA
                  placing the collectives: for models whose state does not
                  fit one device). None of them
                  changes results beyond float32 reduction order.
  checkpoint_every_steps  also checkpoint every that many steps inside an
                  epoch (0: only after each epoch); a killed run resumes
                  from there with the same batches.
  eval_batch_size examples per evaluation batch.
  train_eval_size training examples used for the final train accuracy
                  (None: all).
  log_every_steps how often the progress bar fetches loss and accuracy.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  """Defaults of every field (the CIFAR head-stage values of the paper)."""
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  c.phases = "sgd,swa,twa,report"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.path = config_dict.placeholder(str)
  c.data.data_dir = config_dict.placeholder(str)
  c.data.train_size = config_dict.placeholder(int)
  c.data.test_size = config_dict.placeholder(int)
  c.data.augmentation = config_dict.placeholder(str)
  c.data.download = False
  c.data.holdout_fraction = 0.0
  c.data.holdout_seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"
  c.model.kwargs = ml_collections.ConfigDict()

  c.sgd = ml_collections.ConfigDict()
  c.sgd.optimizer = "sgd"
  c.sgd.epochs = 200
  c.sgd.batch_size = 128
  c.sgd.lr = 0.1
  c.sgd.momentum = 0.9
  c.sgd.nesterov = False
  c.sgd.weight_decay = 1e-4
  c.sgd.schedule = "step"
  c.sgd.decay_at = (0.5, 0.75)
  c.sgd.decay_factor = 0.1
  c.sgd.linear_epochs = 0
  c.sgd.swa_lr = 0.05
  c.sgd.swa_start = 0
  c.sgd.ema_decay = 0.999
  c.sgd.snapshots_per_epoch = 1
  c.sgd.include_initial = True
  c.sgd.init_from = ""

  c.averaging = ml_collections.ConfigDict()
  c.averaging.unit = "epoch"
  c.averaging.start = 0
  c.averaging.end = 100

  c.twa = ml_collections.ConfigDict()
  c.twa.optimizer = "sgd"
  c.twa.epochs = 10
  c.twa.lr = 2.0
  c.twa.momentum = 0.9
  c.twa.weight_decay = 1e-5
  c.twa.schedule = "step"
  c.twa.decay_at = (0.5, 0.75)
  c.twa.decay_factor = 0.1
  c.twa.linear_epochs = 0
  c.twa.start = "mean"
  c.twa.granularity = "global"
  c.twa.storage = "float32"
  c.twa.holdout_fraction = 0.0

  c.surface = ml_collections.ConfigDict()
  c.surface.steps = 11
  c.surface.margin = 0.2
  c.surface.train_eval_size = 5_000

  c.sweep = ml_collections.ConfigDict()
  c.sweep.heads = ()
  c.sweep.budget_matched_sgd = False

  c.parallel = ml_collections.ConfigDict()
  c.parallel.distributed = False
  c.parallel.coordinator_address = config_dict.placeholder(str)
  c.parallel.num_processes = config_dict.placeholder(int)
  c.parallel.process_id = config_dict.placeholder(int)
  c.parallel.workers = 0
  c.parallel.basis_layout = "params"
  c.parallel.param_sharding = "replicated"

  c.checkpoint_every_steps = 0
  c.eval_batch_size = 512
  c.train_eval_size = config_dict.placeholder(int)
  c.log_every_steps = 50
  return c


def cifar_head(dataset: str, model: str) -> ml_collections.ConfigDict:
  """Head stage, Table 3: SGD 200 epochs; TWA from epochs 0-100 (+10).

  SGD: batch 128, momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
  epochs 100 and 150, one snapshot after every epoch plus the initial weights.
  TWA: the 101 snapshots of epochs 0-100, started at their mean, 10 epochs
  at lr 2 divided by 10 at 50% and 75% of them (epochs 5 and 8, as the
  reference code rounds), lambda 1e-5.
  """
  c = base()
  c.name = f"{dataset}_{model}"
  c.data.name = dataset
  c.model.name = model
  return c


# The SWA setting of Table 1 (reference: the SWA code's train.py with
# --swa_start and --swa_lr): weight decay, epochs and first averaged epoch.
_TAIL = {
    "vgg16": dict(weight_decay=5e-4, epochs=300, swa_start=161),
    "preresnet164": dict(weight_decay=3e-4, epochs=225, swa_start=126),
}


def cifar_tail(dataset: str, model: str,
               swa_lr: float = 0.05) -> ml_collections.ConfigDict:
  """Tail stage, Table 1: SWA's schedule, then SWA against TWA on its tail.

  SGD: lr 0.1 held for the first half of `swa_start` epochs, decayed
  linearly to `swa_lr` by 90% of it and held there (the SWA paper's
  schedule); VGG16: weight decay 5e-4, 300 epochs, averaging epochs
  161-300; PreResNet-164: 3e-4, 225 epochs, 126-225. The paper runs
  swa_lr 0.05 and 0.10 (`--config.sgd.swa_lr=0.1`). TWA: 10 epochs at lr 2
  divided by 10 at 50% and 75%, lambda 5e-5, started from the last snapshot.
  """
  if model not in _TAIL:
    raise ValueError(f"no tail-stage setting for {model!r}; known: "
                     f"{', '.join(_TAIL)}")
  tail = _TAIL[model]
  c = cifar_head(dataset, model)
  c.name = f"{dataset}_{model}_tail"
  c.sgd.epochs = tail["epochs"]
  c.sgd.weight_decay = tail["weight_decay"]
  c.sgd.schedule = "swa"
  c.sgd.swa_start = tail["swa_start"]
  c.sgd.swa_lr = swa_lr
  c.averaging.start = tail["swa_start"]
  c.averaging.end = tail["epochs"]
  c.twa.weight_decay = 5e-5
  c.twa.start = "last"
  return c


def cifar_adam(dataset: str, model: str) -> ml_collections.ConfigDict:
  """Table A2: the head-stage setting with Adam as the base optimizer.

  SGD phase: Adam at lr 1e-3 with coupled weight decay 1e-4 (PyTorch's
  `Adam(weight_decay=...)`, as the reference training script), same epochs,
  decay steps and sampling. TWA: 5 epochs at lr 3 with projected momentum
  SGD (`twa_jax.twa`), as the reference TWA script, whose only optimizer is
  SGD whatever trained the trajectory: lr 3 is a step size for the
  parameters, not for Adam. `--config.twa.optimizer=adam` runs Adam on the
  averaging coefficients instead (`twa_jax.scale_by_subspace`; give it an
  Adam-sized lr).
  """
  c = cifar_head(dataset, model)
  c.name = f"{dataset}_{model}_adam"
  c.sgd.optimizer = "adam"
  c.sgd.lr = 1e-3
  c.twa.epochs = 5
  c.twa.lr = 3.0
  return c


_IMAGENET_SNAPSHOTS_PER_EPOCH = 5


def imagenet(model: str) -> ml_collections.ConfigDict:
  """ImageNet, Table 4: SGD 90 epochs; TWA (60 + 2) from epochs 0-60.

  SGD: batch 256, lr 0.1 divided by 10 every 30 epochs, weight decay 1e-4,
  5 snapshots per epoch plus the initial weights. TWA: the 301 snapshots of
  epochs 0-60 (300 taken during training and the initial weights, indices
  0-300), lambda 1e-5, started at their mean, 2 epochs: one at lr 0.3, one
  at 0.03 (the reference script's step schedule at E = 2). The separate
  "90 + 1" run is `imagenet_90_1`.
  """
  c = base()
  c.name = f"imagenet_{model}"
  c.data.name = "imagenet2012"
  c.model.name = model
  c.sgd.epochs = 90
  c.sgd.batch_size = 256
  c.sgd.decay_at = (1 / 3, 2 / 3)
  c.sgd.snapshots_per_epoch = _IMAGENET_SNAPSHOTS_PER_EPOCH
  c.averaging.end = 60
  c.twa.epochs = 2
  c.twa.lr = 0.3
  c.eval_batch_size = 256
  c.train_eval_size = 50_000
  c.parallel.workers = 8  # JPEG decoding and random-resized crops
  c.checkpoint_every_steps = 1000  # an epoch is 5,004 steps at batch 256
  return c


def imagenet_90_1(model: str) -> ml_collections.ConfigDict:
  """ImageNet, Table 5's "90 + 1": one TWA epoch on the snapshots of 60-90.

  The SGD run of `imagenet` (90 epochs); TWA on the 150 snapshots taken
  during epochs 61-90 (store indices 301-450: not the end-of-epoch-60 one,
  index 300, as the reference script's params 301-451), started at their
  mean, one epoch at lr 0.03 decaying linearly to 0, lambda 1e-5.
  """
  c = imagenet(model)
  c.name = f"imagenet_{model}_90_1"
  c.averaging.unit = "index"
  c.averaging.start = 60 * _IMAGENET_SNAPSHOTS_PER_EPOCH + 1
  c.averaging.end = 90 * _IMAGENET_SNAPSHOTS_PER_EPOCH
  c.twa.epochs = 1
  c.twa.lr = 0.03
  c.twa.decay_at = ()
  c.twa.linear_epochs = 1
  return c


def imagenet_pretrained(model: str, epochs: int) -> ml_collections.ConfigDict:
  """ImageNet, Table 2: SWA and TWA while fine-tuning a pretrained model.

  SGD starts from the parameters in `sgd.init_from` (for ResNet-50, the
  torchvision weights converted to this model's parameter tree) and runs
  `epochs` epochs (the paper: 1, 2, 5 or 10) at a constant lr 0.005, batch
  256, weight decay 1e-4, 5 snapshots per epoch, not the pretrained start
  itself; SWA and TWA average all 5 * `epochs` of them. TWA: the reference
  code's ImageNet tail recipe (its "90 + 1" run; the paper states no other
  for Table 2): started at the snapshots' mean, one epoch at lr 0.03
  decaying linearly to 0, lambda 1e-5.

  Args:
    model: the model name.
    epochs: fine-tuning epochs.

  Raises:
    ValueError: `epochs` is not a positive integer.
  """
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"fine-tuning epochs must be a positive integer, got "
                     f"{epochs!r}")
  c = imagenet_90_1(model)
  c.name = f"imagenet_{model}_pretrained_{epochs}ep"
  c.sgd.epochs = epochs
  c.sgd.lr = 0.005
  c.sgd.decay_at = ()
  c.sgd.include_initial = False
  c.averaging.unit = "epoch"
  c.averaging.start = 0
  c.averaging.end = epochs
  return c
