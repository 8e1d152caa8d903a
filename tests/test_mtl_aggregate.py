"""mtl.aggregate (the step's per-task route), its task weights, and TAG affinity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtx import mtl
from mtx.mtl import base

K = 3


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(K, 10))
  jac[1] = -0.8 * jac[0] + 0.3 * rng.normal(size=10)  # a conflict
  return {
    "w": jnp.asarray(jac[:, :6].reshape(K, 3, 2), jnp.float32),
    "b": jnp.asarray(jac[:, 6:], jnp.float32),
  }


def _chains():
  """One chain per code path of aggregate (the Gram methods share theirs)."""
  return {
    "sum": [mtl.sum_tasks()],
    "pcgrad": [mtl.pcgrad()],
    "gradvac": [mtl.gradvac(K)],
    "nash_every_2_then_clip": [
      mtl.nash_mtl(K, update_every=2),
      optax.clip_by_global_norm(1.0),
    ],
    "gradnorm": [mtl.gradnorm(K)],
    "uw_then_pcgrad": [mtl.uncertainty_weighting(K), mtl.pcgrad()],
    "rlw_then_masked_mgda": [mtl.rlw(K), mtl.masked(mtl.mgda(), "w")],
    "masked_all_uw_imtl_g": [
      mtl.masked([mtl.uncertainty_weighting(K), mtl.imtl_g()], None)
    ],
  }


def _flat(tree, keys=("b", "w")):
  return np.concatenate([np.ravel(tree[k]) for k in keys if k in tree])


@pytest.mark.slow
def test_aggregate_equals_chain_and_its_weights_reproduce_the_update():
  grads = _grads()
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)
  steps = [
    dict(
      task_losses=jnp.array([1.0, 2.0, 0.5]),
      task_present=jnp.array([True, True, True]),
      key=jax.random.PRNGKey(0),
    ),
    dict(
      task_losses=jnp.array([0.8, 1.0, 0.7]),
      task_present=jnp.array([True, False, True]),
      key=jax.random.PRNGKey(1),
    ),
  ]
  for name, transforms in _chains().items():
    tx = optax.chain(*transforms)
    chain_state = agg_state = tx.init(params)
    chain_update = jax.jit(tx.update)
    agg_update = jax.jit(
      lambda s, g, p, t=transforms, **e: mtl.aggregate(t, s, g, p, **e)
    )
    for extra in steps:
      want, chain_state = chain_update(grads, chain_state, params, **extra)
      got, agg_state, info = agg_update(agg_state, grads, params, **extra)
      np.testing.assert_allclose(
        _flat(got), _flat(want), rtol=2e-4, atol=1e-6, err_msg=name
      )
      for a, b in zip(
        jax.tree_util.tree_leaves(agg_state), jax.tree_util.tree_leaves(chain_state)
      ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=name)
      assert "weights" in info, name
      w = np.asarray(info["weights"])
      assert w[~np.asarray(extra["task_present"])].tolist() == [0.0] * int(
        np.sum(~np.asarray(extra["task_present"]))
      ), name
      if name.endswith("clip"):
        continue  # clipping rescales the combination after the aggregator
      # masked(mgda, 'w'): the weights are those of the surgery on 'w'.
      keys = ("w",) if name.endswith("masked_mgda") else ("b", "w")
      combined = mtl.combine(grads, jnp.asarray(w))
      np.testing.assert_allclose(
        _flat(got, keys), _flat(combined, keys), rtol=2e-4, atol=1e-5, err_msg=name
      )
  diag = mtl.diagnostics(grads, steps[1]["task_present"])
  for key in ("grad_norm", "grad_cos", "conflict_frac"):
    np.testing.assert_allclose(info[key], diag[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "transforms, grams",
  [
    (lambda: [mtl.pcgrad()], 1),
    (lambda: [mtl.uncertainty_weighting(K), mtl.nash_mtl(K)], 1),
    (lambda: [mtl.masked(mtl.upgrad(), None)], 1),
    (lambda: [mtl.masked(mtl.pcgrad(), "w")], 2),  # surgery sees 'w' only
  ],
)
def test_one_gram_matrix_per_step(transforms, grams, monkeypatch):
  calls = []
  real = base.gram
  monkeypatch.setattr(base, "gram", lambda g: calls.append(1) or real(g))
  transforms = transforms()
  grads = _grads(1)
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)
  state = optax.chain(*transforms).init(params)
  jax.jit(lambda s, g: mtl.aggregate(transforms, s, g, params, task_losses=jnp.ones(K)))(
    state, grads
  )
  assert len(calls) == grams


def test_masked_builds_inner_factories_with_num_tasks_from_gin():
  gin = pytest.importorskip("gin")
  import mtx.cli.configurables  # pylint: disable=g-import-not-at-top,unused-import
  from mtx.train import build as build_lib  # pylint: disable=g-import-not-at-top

  @gin.configurable("mtl_masked_probe")
  def probe(mtl_transforms):
    return mtl_transforms

  try:
    gin.clear_config()
    gin.parse_config(
      "mtl_masked_probe.mtl_transforms = [@mtl.masked]\n"
      "mtl.masked.inner = [@mtl.dwa, @mtl.gradvac]\n"
      "mtl.masked.mask = 'w'\n"
    )
    transforms = build_lib.build_transforms(probe(), K)
  finally:
    gin.clear_config()
  grads = _grads(2)
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)
  state = optax.chain(*transforms).init(params)
  assert state[0][1].targets.shape == (K, K)  # gradvac got num_tasks
  out, _, info = jax.jit(
    lambda s, g: mtl.aggregate(
      transforms, s, g, params, task_losses=jnp.ones(K), key=jax.random.key(0)
    )
  )(state, grads)
  assert out["w"].shape == (3, 2) and info["weights"].shape == (K,)


def test_tag_affinity_closed_form_on_quadratics():
  # L_j(theta) = 1/2 |theta - c_j|^2 + 1, so g_i = theta - c_i.
  c = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
  theta = np.array([0.3, -0.4])
  lr = 0.25

  def loss_fn(params):
    d = params["t"][None, :] - jnp.asarray(c, jnp.float32)
    return 0.5 * jnp.sum(d * d, axis=1) + 1.0

  grads = {"t": jnp.asarray(theta[None, :] - c, jnp.float32)}
  params = {"t": jnp.asarray(theta, jnp.float32)}
  z = np.asarray(jax.jit(lambda p, g: mtl.tag_affinity(loss_fn, p, g, lr))(params, grads))
  before = 0.5 * np.sum((theta - c) ** 2, axis=1) + 1.0
  want = np.zeros((3, 3))
  for i in range(3):
    moved = theta - lr * (theta - c[i])
    after = 0.5 * np.sum((moved - c) ** 2, axis=1) + 1.0
    want[i] = 1.0 - after / before
  np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.diag(z) > 0)  # a step on a task lowers its own loss
  present = jnp.array([True, False, True])
  z = np.asarray(mtl.tag_affinity(loss_fn, params, grads, lr, task_present=present))
  assert np.all(z[1] == 0) and np.all(z[:, 1] == 0)
  np.testing.assert_allclose(
    z[np.ix_([0, 2], [0, 2])], want[np.ix_([0, 2], [0, 2])], rtol=1e-5
  )
  names = mtl.affinity_metrics(["a", "b", "c"], want)
  assert names["tag/a/b"] == pytest.approx(want[0, 1]) and len(names) == 6
