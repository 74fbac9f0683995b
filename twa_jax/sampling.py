"""When to record a weight snapshot during training."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
  """Which optimizer steps to snapshot: every k steps or k times per epoch.

  `step` counts completed optimizer steps: step 0 holds the initial weights,
  step s the weights after s updates (so step e * steps_per_epoch ends epoch
  e). The paper's schedules:

  * CIFAR, once per epoch over 100 epochs with the initial weights:
    ``SamplingSchedule(per_epoch=1, steps_per_epoch=n)`` (or
    ``every_steps=n``) gives 101 snapshots over steps 0..100 n;
  * ImageNet, 5 times per epoch over 60 epochs:
    ``SamplingSchedule(per_epoch=5, steps_per_epoch=n, include_initial=False)``
    gives 300 snapshots (301 with the initial weights).

  Attributes:
    every_steps: sample every this many steps.
    per_epoch: sample this many times per epoch, uniformly: at the steps
      where floor(s * per_epoch / steps_per_epoch) increases, the last at the
      end of the epoch.
    steps_per_epoch: optimizer steps per epoch (required with `per_epoch`).
    include_initial: also sample step 0, the initial weights.
  """

  every_steps: int | None = None
  per_epoch: int | None = None
  steps_per_epoch: int | None = None
  include_initial: bool = True

  def __post_init__(self):
    if (self.every_steps is None) == (self.per_epoch is None):
      raise ValueError(
          "SamplingSchedule: give exactly one of every_steps and per_epoch; "
          f"got every_steps={self.every_steps!r}, "
          f"per_epoch={self.per_epoch!r}.")
    for name in ("every_steps", "per_epoch", "steps_per_epoch"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool)
                                or not isinstance(value, numbers.Integral)
                                or value < 1):
        raise ValueError(
            f"SamplingSchedule: {name} must be a positive integer, "
            f"got {value!r}.")
    if self.every_steps is not None and self.steps_per_epoch is not None:
      raise ValueError(
          "SamplingSchedule: steps_per_epoch is only used with per_epoch; "
          "with every_steps, leave it unset.")
    if self.per_epoch is not None:
      if self.steps_per_epoch is None:
        raise ValueError(
            "SamplingSchedule: per_epoch needs steps_per_epoch.")
      if self.per_epoch > self.steps_per_epoch:
        raise ValueError(
            f"SamplingSchedule: per_epoch={self.per_epoch} exceeds "
            f"steps_per_epoch={self.steps_per_epoch}; at most one snapshot "
            "per step.")
    if not isinstance(self.include_initial, bool):
      raise ValueError("SamplingSchedule: include_initial must be a bool, got "
                       f"{self.include_initial!r}.")

  def should_sample(self, step: int) -> bool:
    """Whether to snapshot the weights after `step` optimizer steps."""
    if (isinstance(step, bool) or not isinstance(step, numbers.Integral)
        or step < 0):
      raise ValueError(
          f"should_sample: step must be a non-negative integer, got {step!r}.")
    if step == 0:
      return self.include_initial
    if self.every_steps is not None:
      return step % self.every_steps == 0
    k, n = self.per_epoch, self.steps_per_epoch
    return step * k // n > (step - 1) * k // n
