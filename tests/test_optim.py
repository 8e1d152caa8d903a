"""Tests for mtx.train.optim: schedules' values, optimizers under jit, clipping."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtx.errors import UserError
from mtx.train import optim


def test_rsqrt_schedule_is_constant_during_warmup_then_decays():
  schedule = optim.rsqrt_schedule(base_lr=1.0, warmup_steps=10000)
  for step, want in [
    (0, 0.01),
    (5000, 0.01),
    (10000, 0.01),
    (40000, 0.005),
    (1000000, 0.001),
  ]:
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(40000)), 0.005, rtol=1e-6)


def test_warmup_cosine_schedule_values():
  schedule = optim.warmup_cosine_schedule(
    peak_lr=1e-3, warmup_steps=100, total_steps=1100, end_lr_ratio=0.1
  )
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(schedule(50), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 1e-3, rtol=1e-5)
  # Half-way through the decay: end + (peak - end) * (1 + cos(pi / 2)) / 2.
  np.testing.assert_allclose(schedule(600), 1e-4 + 9e-4 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(schedule(1100), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(5000), 1e-4, rtol=1e-5)


def test_learning_rate_fn_names_and_errors():
  np.testing.assert_allclose(optim.learning_rate_fn("constant", base_lr=0.3)(7), 0.3)
  np.testing.assert_allclose(
    optim.learning_rate_fn("rsqrt", warmup_steps=100)(400), 0.05, rtol=1e-6
  )
  np.testing.assert_allclose(
    optim.learning_rate_fn("warmup_cosine", base_lr=2.0, warmup_steps=10, total_steps=20)(
      10
    ),
    2.0,
    rtol=1e-6,
  )
  with pytest.raises(UserError, match="total_steps"):
    optim.learning_rate_fn("warmup_cosine")
  with pytest.raises(UserError, match="rsqrt.*did you mean"):
    optim.learning_rate_fn("rsqrtt")
  with pytest.raises(UserError, match="warmup_steps"):
    optim.rsqrt_schedule(warmup_steps=0)
  with pytest.raises(UserError, match="warmup_steps"):
    optim.warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=10)


def test_unknown_optimizer_lists_valid_names():
  with pytest.raises(UserError, match="adafactor, adamw"):
    optim.make_optimizer("sgd")


def _params():
  return {
    "embed": jnp.arange(256 * 128, dtype=jnp.float32).reshape(256, 128) / 1e4,
    "scale": jnp.ones((128,), jnp.float32),
  }


def _grads(params):
  return jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizer_steps_under_jit(name):
  params = _params()
  tx = optim.make_optimizer(name, optim.rsqrt_schedule(warmup_steps=10))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state

  new_params, state = step(params, state)
  new_params, state = step(new_params, state)
  for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    assert np.all(np.isfinite(new))
    assert np.all(np.asarray(new) < np.asarray(old))  # Positive grads: params go down.


def test_adafactor_is_factored_without_momentum():
  params = _params()
  state = optim.make_optimizer("adafactor", 0.01).init(params)
  factored = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row"))
    if hasattr(s, "v_row")
  ]
  assert len(factored) == 1
  # The 256x128 matrix keeps a row and a column vector, not a full second moment.
  assert {factored[0].v_row["embed"].shape, factored[0].v_col["embed"].shape} == {
    (256,),
    (128,),
  }
  assert factored[0].v["embed"].shape == (1,)
  num_floats = sum(x.size for x in jax.tree.leaves(state))
  assert num_floats < 256 * 128  # No momentum buffer the size of params.


def test_adafactor_update_is_clipped_and_scaled_by_parameter_rms():
  # One 1-D parameter: not factored; the first update is -lr * rms(param) * sign(g)
  # after block-RMS clipping at 1.0 (the normalized update has RMS 1).
  params = {"w": jnp.full((4,), 2.0)}
  tx = optim.make_optimizer("adafactor", 0.1)
  updates, _ = tx.update(
    {"w": jnp.array([1.0, -1.0, 3.0, -3.0])}, tx.init(params), params
  )
  np.testing.assert_allclose(
    updates["w"], -0.1 * 2.0 * np.array([1, -1, 1, -1]), rtol=1e-4
  )


def test_clip_grad_norm_is_applied_first():
  params = {"w": jnp.zeros((3,))}
  grads = {"w": jnp.array([3.0, 4.0, 0.0])}
  # A huge eps makes AdamW's first update -lr * m_hat / eps = -lr * g / eps, so the
  # update shows the gradient that reached AdamW: clipped to norm 1 first.
  tx = optim.make_optimizer("adamw", 1.0, clip_grad_norm=1.0, eps=1e8)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -np.array([0.6, 0.8, 0.0]) / 1e8, rtol=1e-4)
  with pytest.raises(UserError, match="clip_grad_norm"):
    optim.make_optimizer("adamw", 1.0, clip_grad_norm=-1.0)


def test_no_clipping_by_default():
  tx = optim.make_optimizer("adamw", 1.0, eps=1e8)
  params = {"w": jnp.zeros((3,))}
  updates, _ = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -np.array([3.0, 4.0, 0.0]) / 1e8, rtol=1e-4)


def test_weight_decay_skips_vectors():
  params = {"m": jnp.ones((2, 2)), "v": jnp.ones((2,))}
  tx = optim.make_optimizer("adamw", 1.0, weight_decay=0.1, eps=1e30)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["m"], -0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["v"], np.zeros((2,)), atol=1e-12)


def test_as_schedule_turns_a_float_into_a_schedule():
  schedule = optim.as_schedule(0.25)
  assert math.isclose(float(schedule(123)), 0.25)
  assert optim.as_schedule(schedule) is schedule


def test_a_warmup_longer_than_a_short_run_is_cut_to_a_tenth_of_it(caplog):
  # The demo's 100 warmup steps with --gin.TRAIN_STEPS=60: a smoke run must just work.
  with caplog.at_level(logging.WARNING, logger="mtx.train.optim"):
    schedule = optim.learning_rate_fn(
      "warmup_cosine", base_lr=1.0, warmup_steps=100, total_steps=60
    )
  assert "warming up for 6 steps" in caplog.text
  assert len(caplog.records) == 1
  np.testing.assert_allclose(schedule(3), 0.5, rtol=1e-6)
  np.testing.assert_allclose(schedule(6), 1.0, rtol=1e-6)
  assert float(schedule(59)) < float(schedule(30)) < 1.0
