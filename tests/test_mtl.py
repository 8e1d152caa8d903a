"""Tests of mtx.mtl against independent NumPy/SciPy references."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from mtx import errors, mtl
from mtx.mtl import solvers

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.PRNGKey(0)


def _aggregate(tx, grads, *, params=None, steps=1, **extra):
  """Runs ``steps`` updates of ``tx`` on fixed per-task grads; last output."""
  if params is None:
    params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = None
  for _ in range(steps):
    out, state = update(grads, state, params, **extra)
  return out, state


def _conflicting(k, d, seed=0):
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(k, d))
  jac[1] = -0.7 * jac[0] + 0.3 * rng.normal(size=d)  # a sure conflict
  return jac


def _np_pcgrad(jac, orders, present=None):
  """PCGrad with explicit projections in parameter space (paper, Alg. 1)."""
  k = len(jac)
  present = np.ones(k, bool) if present is None else present
  out = []
  for i in range(k):
    if not present[i]:
      continue
    gi = jac[i].copy()
    for j in orders[i]:
      if j == i or not present[j]:
        continue
      dot = gi @ jac[j]
      if dot < 0:
        gi = gi - dot / (jac[j] @ jac[j]) * jac[j]
    out.append(gi)
  return np.sum(out, axis=0)


# ------------------------------------------------------------------ helpers


def test_gram_combine_and_diagnostics():
  jac = np.array([[1.0, 0.0], [-1.0, 1.0], [2.0, 2.0]])
  grads = {
    "a": jnp.asarray(jac[:, :1], jnp.float32),
    "b": jnp.asarray(jac[:, 1], jnp.float32),
  }
  np.testing.assert_allclose(mtl.gram(grads), jac @ jac.T, rtol=1e-6)
  out = mtl.combine(grads, jnp.array([1.0, 2.0, 0.5]))
  np.testing.assert_allclose(out["a"], [1.0 - 2.0 + 1.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 0.0 + 2.0 + 1.0, rtol=1e-6)
  diag = mtl.diagnostics(grads, jnp.array([True, True, True]))
  norms = np.linalg.norm(jac, axis=1)
  np.testing.assert_allclose(diag["grad_norm"], norms, rtol=1e-6)
  np.testing.assert_allclose(
    diag["grad_cos"], jac @ jac.T / np.outer(norms, norms), rtol=1e-5
  )
  # Pairs (0,1) cos<0, (0,2) >0, (1,2) = 0 -> 1 conflict of 3 pairs.
  np.testing.assert_allclose(diag["conflict_frac"], 1 / 3, rtol=1e-6)
  absent = mtl.diagnostics(grads, jnp.array([True, False, True]))
  assert absent["conflict_frac"] == 0.0
  assert absent["grad_norm"][1] == 0.0


# -------------------------------------------------------------------- PCGrad


def test_pcgrad_two_tasks_closed_form():
  jac = _conflicting(2, 5)
  g1, g2 = jac
  dot = g1 @ g2
  assert dot < 0
  expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
  out, _ = _aggregate(mtl.pcgrad(), jnp.asarray(jac, jnp.float32), key=KEY)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # No conflict: the plain sum.
  jac2 = np.abs(jac)
  out, _ = _aggregate(mtl.pcgrad(), jnp.asarray(jac2, jnp.float32), key=KEY)
  np.testing.assert_allclose(out, jac2.sum(0), rtol=1e-6)


def test_pcgrad_three_tasks_fixed_order_matches_projection_loop():
  rng = np.random.default_rng(3)
  jac = rng.normal(size=(3, 4))
  jac[2] = -(jac[0] + 0.5 * jac[1])  # conflicts with both
  gram = jnp.asarray(jac @ jac.T, jnp.float32)
  present = jnp.ones(3, bool)
  for orders in ([[1, 2, 0], [0, 2, 1], [0, 1, 2]], [[2, 1, 0], [2, 0, 1], [1, 0, 2]]):
    w_rows = solvers.pcgrad_coefficients(gram, present, jnp.array(orders))
    got = np.asarray(w_rows).sum(0) @ jac
    np.testing.assert_allclose(got, _np_pcgrad(jac, orders), rtol=1e-4, atol=1e-5)
  # The transform draws an order per task: its result is one of the 8.
  candidates = [
    _np_pcgrad(jac, [list(a), list(b), list(c)])
    for a, b, c in itertools.product(
      itertools.permutations([1, 2]),
      itertools.permutations([0, 2]),
      itertools.permutations([0, 1]),
    )
  ]
  assert len({tuple(np.round(c, 5)) for c in candidates}) > 1
  for seed in range(3):
    out, _ = _aggregate(
      mtl.pcgrad(), jnp.asarray(jac, jnp.float32), key=jax.random.PRNGKey(seed)
    )
    assert min(np.abs(np.asarray(out) - c).max() for c in candidates) < 1e-4


def test_pcgrad_absent_task_is_ignored_and_mean_reduction():
  jac = _conflicting(3, 6, seed=1)
  jac[2] = -10 * (jac[0] + jac[1])  # would conflict with both if present
  present = jnp.array([True, True, False])
  out, _ = _aggregate(
    mtl.pcgrad(), jnp.asarray(jac, jnp.float32), key=KEY, task_present=present
  )
  expected = _np_pcgrad(jac[:2], [[1], [0]])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  mean, _ = _aggregate(
    mtl.pcgrad(reduction="mean"),
    jnp.asarray(jac, jnp.float32),
    key=KEY,
    task_present=present,
  )
  np.testing.assert_allclose(mean, expected / 2, rtol=1e-5, atol=1e-6)
  # Without a key the transform folds its own from the step count.
  out_nokey, state = _aggregate(
    mtl.pcgrad(), jnp.asarray(jac, jnp.float32), task_present=present, steps=2
  )
  np.testing.assert_allclose(out_nokey, expected, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 2


# ---------------------------------------------------------------- MGDA etc.


def test_mgda_two_tasks_closed_form():
  for jac in (_conflicting(2, 5), np.array([[0.2, 0.1, 0.0], [3.0, 1.0, 1.0]])):
    g1, g2 = jac
    lam = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
    expected = lam * g1 + (1 - lam) * g2
    out, _ = _aggregate(mtl.mgda(), jnp.asarray(jac, jnp.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)


def _simplex_min(fun, k):
  res = scipy.optimize.minimize(
    fun,
    np.ones(k) / k,
    method="SLSQP",
    bounds=[(0, 1)] * k,
    constraints=({"type": "eq", "fun": lambda w: w.sum() - 1},),
    options={"ftol": 1e-12, "maxiter": 1000},
  )
  return res.fun


def test_mgda_and_cagrad_match_scipy_on_five_tasks():
  jac = _conflicting(5, 8, seed=4)
  gram = jac @ jac.T
  present = jnp.ones(5, bool)
  lam, stats = solvers.min_norm_weights(jnp.asarray(gram, jnp.float32), present)
  lam = np.asarray(lam)
  assert not stats.failed and stats.residual < 1e-5
  assert abs(lam.sum() - 1) < 1e-5 and lam.min() >= 0
  assert lam @ gram @ lam <= _simplex_min(lambda w: w @ gram @ w, 5) + 1e-5
  g0 = jac.mean(0)
  r = 0.4 * np.linalg.norm(g0)

  def objective(w):
    return (jac.T @ w) @ g0 + r * np.linalg.norm(jac.T @ w)

  coef, stats = solvers.cagrad_coefficients(jnp.asarray(gram, jnp.float32), present, 0.4)
  assert not stats.failed
  v = np.asarray(coef, np.float64) - 1 / 5  # d = g_0 + J^T v, v = r w / |g_w|
  w = v / v.sum()
  assert objective(w) <= _simplex_min(objective, 5) + 1e-5
  out, _ = _aggregate(mtl.cagrad(c=0.4), jnp.asarray(jac, jnp.float32))
  gw = jac.T @ w
  expected = (g0 + r / np.linalg.norm(gw) * gw) / (1 + 0.4**2)
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5)


def test_cagrad_c0_is_the_mean():
  jac = _conflicting(4, 7, seed=2)
  out, _ = _aggregate(mtl.cagrad(c=0.0), jnp.asarray(jac, jnp.float32))
  np.testing.assert_allclose(out, jac.mean(0), rtol=1e-5, atol=1e-6)


def test_imtl_g_projections_are_equal():
  jac = _conflicting(4, 10, seed=5)
  out, _ = _aggregate(mtl.imtl_g(), jnp.asarray(jac, jnp.float32))
  out = np.asarray(out, np.float64)
  units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  proj = units @ out
  np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
  alpha = np.linalg.lstsq(jac.T, out, rcond=None)[0]
  np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-3)


def test_upgrad_never_conflicts_and_matches_nnls():
  jac = _conflicting(4, 6, seed=6)
  jac[3] = -0.5 * jac[2] + 0.1 * jac[0]
  out, _ = _aggregate(mtl.upgrad(), jnp.asarray(jac, jnp.float32))
  out = np.asarray(out, np.float64)
  norms = np.linalg.norm(jac, axis=1)
  assert np.all(jac @ out >= -1e-4 * norms * np.linalg.norm(out))
  # Reference: w^(i) = e_i + x, x = argmin_{x>=0} |J^T x + g_i|.
  ws = []
  for i in range(4):
    x, _ = scipy.optimize.nnls(jac.T, -jac[i])
    ws.append(np.eye(4)[i] + x)
  expected = jac.T @ np.mean(ws, axis=0)
  np.testing.assert_allclose(out, expected, rtol=2e-3, atol=2e-4)
  # Without conflict UPGrad is the mean.
  easy = np.abs(jac)
  out, _ = _aggregate(mtl.upgrad(), jnp.asarray(easy, jnp.float32))
  np.testing.assert_allclose(out, easy.mean(0), rtol=1e-5)


def test_aligned_mtl_matches_svd_reference():
  jac = _conflicting(3, 6, seed=7)
  u, s, vt = np.linalg.svd(jac, full_matrices=False)
  aligned = s[-1] * u @ vt  # orthogonal rows with equal norms sigma_min
  np.testing.assert_allclose(aligned @ aligned.T, s[-1] ** 2 * np.eye(3), atol=1e-8)
  out, _ = _aggregate(mtl.aligned_mtl(), jnp.asarray(jac, jnp.float32))
  np.testing.assert_allclose(out, aligned.sum(0), rtol=1e-3, atol=1e-4)


def test_gradvac_zero_targets_is_pcgrad_then_lifts_to_target():
  jac = _conflicting(3, 5, seed=8)
  grads = jnp.asarray(jac, jnp.float32)
  pc, _ = _aggregate(mtl.pcgrad(), grads, key=KEY)
  gv, state = _aggregate(mtl.gradvac(3, beta=0.0), grads, key=KEY)
  np.testing.assert_allclose(gv, pc, rtol=1e-4, atol=1e-5)
  # Two tasks: the target becomes beta * cos, then a lower cos is lifted to it.
  g1, g2 = np.array([1.0, 0, 0, 0, 0]), np.array([1.0, 1.0, 0, 0, 0])
  cos0 = g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)
  tx = mtl.gradvac(2, beta=1.0)
  state = tx.init(jnp.zeros(5))
  _, state = tx.update(jnp.asarray([g1, g2], jnp.float32), state, key=KEY)
  np.testing.assert_allclose(state.targets, [[0, cos0], [cos0, 0]], rtol=1e-5)
  h1, h2 = np.array([1.0, 0.2, 0, 0, 0]), np.array([-0.5, 1.0, 0.3, 0, 0])
  phi = h1 @ h2 / np.linalg.norm(h1) / np.linalg.norm(h2)
  assert phi < cos0

  def lift(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    coef = (
      na
      * (cos0 * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - cos0**2))
      / (nb * np.sqrt(1 - cos0**2))
    )
    return a + coef * b

  out, _ = tx.update(jnp.asarray([h1, h2], jnp.float32), state, key=KEY)
  np.testing.assert_allclose(out, lift(h1, h2) + lift(h2, h1), rtol=1e-4)
  lifted = lift(h1, h2)
  np.testing.assert_allclose(
    lifted @ h2 / np.linalg.norm(lifted) / np.linalg.norm(h2), cos0, rtol=1e-6
  )


# ---------------------------------------------------------------- weightings


def test_uncertainty_weighting_gradient_on_log_variance():
  losses = np.array([2.0, 0.5, 1.0])
  s0 = np.array([0.3, -0.2, 0.0])
  lr = 0.1
  tx = mtl.uncertainty_weighting(3, lr=lr)
  state = mtl.UncertaintyState(log_vars=jnp.asarray(s0, jnp.float32))
  grads = jnp.ones((3, 2))
  present = jnp.array([True, True, False])
  out, new = tx.update(
    grads, state, task_losses=jnp.asarray(losses), task_present=present
  )

  def objective(s):  # sum_t 1/2 (exp(-s_t) L_t + s_t)
    return np.sum(0.5 * (np.exp(-s) * losses + s))

  eps = 1e-6
  num_grad = np.array(
    [(objective(s0 + eps * e) - objective(s0 - eps * e)) / (2 * eps) for e in np.eye(3)]
  )
  expected = np.where([True, True, False], s0 - lr * num_grad, s0)
  np.testing.assert_allclose(new.log_vars, expected, rtol=1e-5, atol=1e-6)
  w = np.where([True, True, False], 0.5 * np.exp(-s0), 0.0)
  np.testing.assert_allclose(out[:, 0], w, rtol=1e-6)


def test_static_dwa_and_rlw_weights():
  tx = mtl.static_weights([1.0, 2.0, 3.0])
  w, _ = tx.weights(
    tx.init(None),
    task_losses=jnp.ones(3),
    task_present=jnp.array([True, False, True]),
    key=None,
  )
  np.testing.assert_allclose(w, [1.0, 0.0, 3.0])

  tx = mtl.dwa(2, temperature=2.0)
  state = tx.init(None)
  history = [[1.0, 4.0], [0.5, 3.0], [0.4, 2.9]]
  for step, losses in enumerate(history):
    w, state = tx.weights(
      state, task_losses=jnp.asarray(losses), task_present=None, key=None
    )
    if step < 2:
      np.testing.assert_allclose(w, [1.0, 1.0])
  # At step t=2 the ratios use L(1)/L(0).
  r = np.array([0.5 / 1.0, 3.0 / 4.0]) / 2.0
  np.testing.assert_allclose(w, 2 * np.exp(r) / np.exp(r).sum(), rtol=1e-6)

  tx = mtl.rlw(3)
  present = jnp.array([True, False, True])
  w1, _ = tx.weights(
    tx.init(None), task_losses=None, task_present=present, key=jax.random.PRNGKey(1)
  )
  w2, _ = tx.weights(
    tx.init(None), task_losses=None, task_present=present, key=jax.random.PRNGKey(2)
  )
  np.testing.assert_allclose(w1.sum(), 1.0, rtol=1e-6)
  assert w1[1] == 0.0 and not np.allclose(w1, w2)


def _quadratic_losses(theta):
  """Two tasks with minima at (1, 0) and (0, 1), scales 1 and 10."""
  l1 = jnp.sum((theta - jnp.array([1.0, 0.0])) ** 2)
  l2 = 10.0 * jnp.sum((theta - jnp.array([0.0, 1.0])) ** 2)
  return jnp.stack([l1, l2])


def _train_quadratic(tx, steps):
  theta = jnp.array([-2.0, -3.0])
  state = tx.init(theta)

  def step(carry, key):
    theta, state = carry
    losses, jac = _quadratic_losses(theta), jax.jacrev(_quadratic_losses)(theta)
    upd, state = tx.update(jac, state, theta, task_losses=losses, key=key)
    return (optax.apply_updates(theta, upd), state), losses

  (theta, state), hist = jax.lax.scan(step, (theta, state), jax.random.split(KEY, steps))
  return np.asarray(hist), state


def test_famo_decreases_both_losses_in_balance():
  hist, state = _train_quadratic(
    optax.chain(mtl.famo(2), mtl.sum_tasks(), optax.adam(0.01)), 500
  )
  first, last = hist[0], hist[-1]
  assert np.all(last < 0.5 * first)
  # The logits moved, toward the task that improves more slowly.
  assert not np.allclose(state[0].logits, 0.0)


def test_nash_mtl_decreases_both_losses_and_solves_bargaining():
  hist, _ = _train_quadratic(optax.chain(mtl.nash_mtl(2), optax.sgd(0.01)), 300)
  assert np.all(hist[-1] < 0.5 * hist[0])
  jac = _conflicting(3, 6, seed=9)
  gram = jac @ jac.T
  # The paper's system G alpha = 1 / alpha on the raw Gram matrix: |d|^2 = k.
  alpha, stats = solvers.nash_weights(
    jnp.asarray(gram, jnp.float32), jnp.ones(3, bool), jnp.ones(3)
  )
  assert not stats.failed
  alpha = np.asarray(alpha, np.float64)
  np.testing.assert_allclose(alpha * (gram @ alpha), 1.0, rtol=1e-3)
  out, _ = _aggregate(mtl.nash_mtl(3), jnp.asarray(jac, jnp.float32))
  np.testing.assert_allclose(out, alpha @ jac, rtol=1e-3, atol=1e-5)
  # Invariant to rescaling a task's loss (the paper's Theorem 5.4 property).
  scaled = jac * np.array([[10.0], [1.0], [0.1]])
  out_scaled, _ = _aggregate(mtl.nash_mtl(3), jnp.asarray(scaled, jnp.float32))
  np.testing.assert_allclose(out_scaled, out, rtol=2e-3, atol=1e-5)
  # normalize=True solves it on G / |G|_F instead.
  alpha_n, stats = solvers.nash_weights(
    jnp.asarray(gram, jnp.float32), jnp.ones(3, bool), jnp.ones(3), normalize=True
  )
  gn = gram / np.linalg.norm(gram)
  assert not stats.failed
  np.testing.assert_allclose(
    np.asarray(alpha_n) * (gn @ np.asarray(alpha_n)), 1.0, rtol=1e-3
  )


def test_nash_mtl_update_every_reuses_weights():
  jac = _conflicting(2, 4, seed=10)
  tx = mtl.nash_mtl(2, update_every=3)
  state = tx.init(jnp.zeros(4))
  update = jax.jit(tx.update)
  seen = []
  for t in range(4):
    grads = jnp.asarray(jac, jnp.float32).at[0].multiply(1 + t)
    _, state = update(grads, state)
    seen.append(np.asarray(state.weights))
  np.testing.assert_allclose(seen[0], seen[1])
  np.testing.assert_allclose(seen[0], seen[2])
  assert not np.allclose(seen[2], seen[3])


def test_gradnorm_balances_gradient_norms():
  grads = {"a": jnp.asarray([[1.0, 0.0], [0.0, 10.0]]), "b": jnp.asarray([[5.0], [0.0]])}
  tx = mtl.gradnorm(2, lr=0.05, mask="a")
  out, state = _aggregate(tx, grads, steps=20, task_losses=jnp.array([1.0, 1.0]))
  w = np.asarray(state.weights)
  assert w[0] > 1.0 > w[1]
  np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-5)
  # The norms are taken on 'a' only; with 'b' too, task 0 would look balanced.
  _, state_all = _aggregate(
    mtl.gradnorm(2, lr=0.05), grads, steps=20, task_losses=jnp.array([1.0, 1.0])
  )
  assert state_all.weights[0] < w[0]
  assert out["b"].shape == (1,)


# ------------------------------------------------------------ the protocol


def test_needs_task_grads_and_cheap_path_equals_per_task_path():
  weightings = [
    mtl.uncertainty_weighting(3),
    mtl.dwa(3),
    mtl.static_weights([1.0, 0.5, 2.0]),
    mtl.famo(3),
    mtl.rlw(3),
  ]
  transforms = mtl.ensure_aggregator(weightings)
  assert mtl.kind(transforms[-1]) == mtl.AGGREGATOR
  assert not mtl.needs_task_grads(transforms)
  assert not mtl.needs_task_grads([mtl.mean_tasks()])
  assert mtl.needs_task_grads(weightings + [mtl.pcgrad()])
  assert mtl.needs_task_grads([optax.adam(1e-3)])

  rng = np.random.default_rng(11)
  jac = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  tx = optax.chain(*transforms)
  chain_state = tx.init(jnp.zeros(4))
  cheap_states = tx.init(jnp.zeros(4))
  for step in range(4):
    losses = jnp.asarray(rng.uniform(0.5, 2.0, size=3), jnp.float32)
    present = jnp.array([True, step != 2, True])
    key = jax.random.PRNGKey(step)
    out, chain_state = tx.update(
      jac, chain_state, task_losses=losses, task_present=present, key=key
    )
    w, cheap_states = mtl.combined_weights(
      transforms, cheap_states, task_losses=losses, task_present=present, key=key
    )
    np.testing.assert_allclose(out, w @ np.asarray(jac), rtol=1e-5, atol=1e-6)
    if step == 2:
      assert w[1] == 0.0
  for a, b in zip(
    jax.tree_util.tree_leaves(chain_state), jax.tree_util.tree_leaves(cheap_states)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _every_transform(k):
  return {
    "sum_tasks": mtl.sum_tasks(),
    "mean_tasks": mtl.mean_tasks(),
    "static_weights": mtl.static_weights([1.0] * k),
    "uncertainty_weighting": mtl.uncertainty_weighting(k),
    "dwa": mtl.dwa(k),
    "rlw": mtl.rlw(k),
    "famo": mtl.famo(k),
    "gradnorm": mtl.gradnorm(k),
    "pcgrad": mtl.pcgrad(),
    "mgda": mtl.mgda(),
    "cagrad": mtl.cagrad(),
    "imtl_g": mtl.imtl_g(),
    "gradvac": mtl.gradvac(k),
    "nash_mtl": mtl.nash_mtl(k),
    "nash_mtl_every_2": mtl.nash_mtl(k, update_every=2),
    "aligned_mtl": mtl.aligned_mtl(),
    "upgrad": mtl.upgrad(),
    "masked_pcgrad": mtl.masked(mtl.pcgrad(), "w"),
  }


def test_every_method_is_listed():
  assert set(mtl.METHODS) <= set(_every_transform(3))


@pytest.mark.parametrize("name", sorted(_every_transform(3)))
def test_chains_with_adam_under_jit(name):
  k = 3
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}
  rng = np.random.default_rng(12)
  grads = {
    "w": jnp.asarray(rng.normal(size=(k, 2, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(k, 3)), jnp.float32),
  }
  tx = optax.chain(*mtl.ensure_aggregator([_every_transform(k)[name]]), optax.adam(1e-2))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(2):
    updates, state = update(
      grads,
      state,
      params,
      task_losses=jnp.array([1.0, 2.0, 3.0]) / (1 + step),
      task_present=jnp.array([True, step == 0, True]),
      key=jax.random.key(step),
      unrelated_arg=1.0,
    )
    params = optax.apply_updates(params, updates)
  for leaf, ref in zip(
    jax.tree_util.tree_leaves(params),
    jax.tree_util.tree_leaves({"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}),
  ):
    assert leaf.shape == ref.shape
    assert np.all(np.isfinite(leaf))
  assert any(
    not np.allclose(a, b)
    for a, b in zip(
      jax.tree_util.tree_leaves(params),
      jax.tree_util.tree_leaves({"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}),
    )
  )


@pytest.mark.parametrize(
  "name",
  [
    "pcgrad",
    "mgda",
    "cagrad",
    "imtl_g",
    "gradvac",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "gradnorm",
    "mean_tasks",
  ],
)
def test_pytree_path_equals_flat_path(name):
  k = 3
  jac = _conflicting(k, 10, seed=13)
  tree = {
    "x": jnp.asarray(jac[:, :6].reshape(k, 3, 2), jnp.float32),
    "y": jnp.asarray(jac[:, 6:], jnp.float32),
  }
  extra = dict(task_losses=jnp.array([1.0, 2.0, 0.5]), key=KEY)
  out_tree, _ = _aggregate(_every_transform(k)[name], tree, steps=2, **extra)
  out_flat, _ = _aggregate(
    _every_transform(k)[name], jnp.asarray(jac, jnp.float32), steps=2, **extra
  )
  got = np.concatenate([np.ravel(out_tree["x"]), np.ravel(out_tree["y"])])
  np.testing.assert_allclose(got, out_flat, rtol=1e-4, atol=1e-6)


def test_masked_surgery_on_selected_leaves_sum_elsewhere():
  jac = _conflicting(2, 7, seed=14)
  grads = {
    "shared": {"kernel": jnp.asarray(jac[:, :4], jnp.float32)},
    "head": jnp.asarray(jac[:, 4:], jnp.float32),
  }
  only, _ = _aggregate(mtl.pcgrad(), grads["shared"]["kernel"], key=KEY)
  for mask in (
    "shared/",
    lambda path: path.startswith("shared"),
    {"shared": True, "head": False},
  ):
    out, _ = _aggregate(mtl.masked(mtl.pcgrad(), mask), grads, key=KEY)
    np.testing.assert_allclose(out["shared"]["kernel"], only, rtol=1e-6)
    np.testing.assert_allclose(out["head"], jac[:, 4:].sum(0), rtol=1e-6)
  with pytest.raises(errors.UserError, match="aggregator"):
    _aggregate(mtl.masked(mtl.rlw(2), "shared/"), grads, key=KEY)


# ------------------------------------------------------------------ gin files


def test_gin_files_bind_every_method():
  gin = pytest.importorskip("gin")
  import mtx.cli.configurables  # pylint: disable=g-import-not-at-top,unused-import

  @gin.configurable("mtl_test_probe")
  def probe(mtl_transforms):
    return mtl_transforms

  files = sorted((REPO / "gin_configs" / "mtl").glob("*.gin"))
  expected = {
    "sum",
    "mean",
    "static_weights",
    "uncertainty",
    "dwa",
    "rlw",
    "gradnorm",
    "famo",
    "pcgrad",
    "mgda",
    "cagrad",
    "imtl_g",
    "gradvac",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
  }
  assert {f.stem for f in files} == expected
  try:
    for path in files:
      gin.clear_config()
      text = path.read_text().replace(
        "train.mtl_transforms", "mtl_test_probe.mtl_transforms"
      )
      gin.parse_config(text + "\nmtl.static_weights.weights = [1.0, 1.0, 1.0]\n")
      # Gin files name factories; the trainer builds them with the number of tasks.
      from mtx.train import build as build_lib  # pylint: disable=g-import-not-at-top

      transforms = build_lib.build_transforms(probe(), 3)
      assert transforms and all(mtl.kind(t) for t in transforms), path.name
  finally:
    gin.clear_config()


# ------------------------------------------------------- the PCGrad toy (App. D)


def _toy_losses(theta):
  t1, t2 = theta[0], theta[1]
  l1 = 20.0 * jnp.log(jnp.maximum(jnp.abs(0.5 * t1 + jnp.tanh(t2)), 5e-6))
  l2 = 25.0 * jnp.log(jnp.maximum(jnp.abs(0.5 * t1 - jnp.tanh(t2) + 2.0), 5e-6))
  return jnp.stack([l1, l2])


def _toy_run(tx, steps, per_task):
  theta0 = jnp.array([0.5, -3.0])

  def step(carry, _):
    theta, state = carry
    if per_task:
      grads = jax.jacrev(_toy_losses)(theta)
    else:
      grads = jax.grad(lambda t: jnp.sum(_toy_losses(t)))(theta)
    upd, state = tx.update(grads, state, theta, task_losses=_toy_losses(theta))
    return (optax.apply_updates(theta, upd), state), None

  (theta, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
    (theta0, tx.init(theta0))
  )
  return np.asarray(theta)


def test_pcgrad_toy_escapes_the_valley_where_adam_stalls():
  steps = 500_000
  adam = _toy_run(optax.adam(1e-3), steps, per_task=False)
  pc = _toy_run(optax.chain(mtl.pcgrad(), optax.adam(1e-3)), steps, per_task=True)
  # Adam sits in task 1's valley (0.5 t1 + tanh t2 ~ 0) far from t1 = -2.
  assert adam[0] > 1.0 and adam[1] < -1.0
  # PCGrad reaches the joint optimum region: t1 ~ -2, tanh t2 ~ 1.
  assert abs(pc[0] + 2.0) < 0.1 and pc[1] > 3.0
  assert np.all(np.asarray(_toy_losses(pc)) < np.asarray(_toy_losses(adam)))
