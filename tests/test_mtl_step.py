"""The mtl method inside the trainer: task weights of aggregators and TAG affinity."""

import math
import os

import jax
import numpy as np
import pytest
import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)
from loop_helpers import TINY, loop_train

from mtx import mtl
from mtx.errors import UserError
from mtx.runtime import metrics_writer
from mtx.train import optim

PAIRS = ("tag/tiny_copy/tiny_rev", "tag/tiny_rev/tiny_copy")
WEIGHTS = ("mtl/weight/tiny_copy", "mtl/weight/tiny_rev")


def _train(model_dir, devices, mesh_shape=None, transforms=(), steps=4, **kw):
  loop_train(
    model_dir=str(model_dir),
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    train_steps=steps,
    batch_size=8,
    model_config=TINY,
    mtl_transforms=transforms,
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-2,
    mesh_shape=mesh_shape,
    log_period=1,
    checkpoint_period=0,
    devices=devices,
    print_param_table=False,
    tensorboard=False,
    units=4,
    **kw,
  )
  return [r for r in metrics_writer.read_metrics(str(model_dir)) if "loss" in r]


@pytest.mark.slow  # default-suite time; TAG and the weights are logged in CI's slow step
def test_aggregator_weights_and_tag_affinity_are_logged(tmp_path):
  rows = _train(
    tmp_path / "run",
    jax.devices()[:1],
    transforms=(mtl.nash_mtl(2),),
    tag_affinity_period=2,
  )
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    # Nash-MTL's alpha solves G alpha = 1 / alpha: positive, logged every step.
    assert all(r[k] > 0 and math.isfinite(r[k]) for k in WEIGHTS), r
    assert "grad_cos/tiny_copy/tiny_rev" in r
    # The solve's report: its worst residual and no failed solve in the period.
    assert r["mtl/solver_residual"] < 1e-4 and r["mtl/solver_failures"] == 0, r
  # TAG every 2 steps: logged at steps 2 and 4 only, for both ordered pairs.
  assert [r["step"] for r in rows if PAIRS[0] in r] == [2, 4]
  for r in rows[1::2]:
    assert all(math.isfinite(r[k]) and abs(r[k]) < 1 for k in PAIRS), r


@pytest.mark.slow
def test_tag_forces_per_group_route_and_matches_one_device(tmp_path):
  """A sum run with TAG takes the per-group route; 8 devices give 1 device's numbers."""
  one = _train(tmp_path / "one", jax.devices()[:1], tag_affinity_period=1, steps=2)
  many = _train(
    tmp_path / "many",
    jax.devices(),
    {"data": 2, "fsdp": 2, "tensor": 2},
    tag_affinity_period=1,
    steps=2,
  )
  for a, b in zip(one, many):
    assert a[WEIGHTS[0]] == b[WEIGHTS[0]] == 1.0  # sum: weight 1 per present group
    for k in PAIRS + ("grad_cos/tiny_copy/tiny_rev",):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-6)
  # To first order Z[a, b] = lr <g_a, g_b> / L_b: the sign of the gradient cosine.
  for r in one:
    assert np.sign(r[PAIRS[0]]) == np.sign(r["grad_cos/tiny_copy/tiny_rev"])


def test_bad_tag_settings_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="tag_affinity_period"):
    _train(tmp_path / "bad", jax.devices()[:1], tag_affinity_period=-1, steps=1)
  assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")
