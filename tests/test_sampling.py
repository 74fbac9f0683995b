"""Tests for twa_jax.sampling.SamplingSchedule."""

import numpy as np
import pytest

from twa_jax.sampling import SamplingSchedule


def _sampled(schedule, num_steps):
  return [s for s in range(num_steps + 1) if schedule.should_sample(s)]


@pytest.mark.parametrize("schedule", [
    SamplingSchedule(per_epoch=1, steps_per_epoch=391),
    SamplingSchedule(every_steps=391),
])
def test_once_per_epoch_cifar(schedule):
  steps = _sampled(schedule, 100 * 391)
  assert len(steps) == 101  # the paper: epochs 0..100 with the initial one
  assert steps == [391 * e for e in range(101)]


def test_five_per_epoch_imagenet():
  spe = 1251
  schedule = SamplingSchedule(per_epoch=5, steps_per_epoch=spe,
                              include_initial=False)
  steps = _sampled(schedule, 60 * spe)
  assert len(steps) == 300
  per_epoch = np.bincount([(s - 1) // spe for s in steps])
  assert per_epoch.tolist() == [5] * 60
  gaps = np.diff([0] + steps)
  assert gaps.min() >= spe // 5 and gaps.max() <= -(-spe // 5)
  assert all(spe * e in steps for e in range(1, 61))  # each epoch's end
  with_initial = SamplingSchedule(per_epoch=5, steps_per_epoch=spe)
  assert _sampled(with_initial, 60 * spe) == [0] + steps


def test_per_epoch_equals_steps_per_epoch_samples_every_step():
  schedule = SamplingSchedule(per_epoch=7, steps_per_epoch=7,
                              include_initial=False)
  assert _sampled(schedule, 21) == list(range(1, 22))


def test_numpy_integer_step():
  schedule = SamplingSchedule(every_steps=4)
  assert schedule.should_sample(np.int64(8))
  assert not schedule.should_sample(np.int32(9))


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"every_steps": 2, "per_epoch": 1, "steps_per_epoch": 5}, "exactly one"),
    ({"every_steps": 0}, "every_steps must be a positive integer"),
    ({"every_steps": 2.5}, "every_steps must be a positive integer"),
    ({"every_steps": True}, "every_steps must be a positive integer"),
    ({"per_epoch": 5}, "needs steps_per_epoch"),
    ({"per_epoch": -1, "steps_per_epoch": 5}, "per_epoch must be"),
    ({"per_epoch": 6, "steps_per_epoch": 5}, "exceeds steps_per_epoch"),
    ({"every_steps": 3, "steps_per_epoch": 5}, "only used with per_epoch"),
    ({"every_steps": 3, "include_initial": 1}, "include_initial must be"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingSchedule(**kwargs)


@pytest.mark.parametrize("step", [-1, 1.0, "3", None])
def test_bad_step(step):
  with pytest.raises(ValueError, match="non-negative integer"):
    SamplingSchedule(every_steps=2).should_sample(step)
