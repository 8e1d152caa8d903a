"""The mtl protocol as a user meets it: the two transform types and list order."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtx import errors, mtl

K = 3
KINDS = {
  "sum_tasks": mtl.AGGREGATOR,
  "mean_tasks": mtl.AGGREGATOR,
  "static_weights": mtl.WEIGHTING,
  "uncertainty_weighting": mtl.WEIGHTING,
  "dwa": mtl.WEIGHTING,
  "rlw": mtl.WEIGHTING,
  "famo": mtl.WEIGHTING,
  "gradnorm": mtl.AGGREGATOR,
  "pcgrad": mtl.AGGREGATOR,
  "mgda": mtl.AGGREGATOR,
  "cagrad": mtl.AGGREGATOR,
  "imtl_g": mtl.AGGREGATOR,
  "gradvac": mtl.AGGREGATOR,
  "nash_mtl": mtl.AGGREGATOR,
  "aligned_mtl": mtl.AGGREGATOR,
  "upgrad": mtl.AGGREGATOR,
}
NEITHER = "neither an mtx.mtl weighting nor an aggregator"


def _method(name):
  if name == "static_weights":
    return mtl.static_weights([1.0, 0.5, 2.0])
  return mtl.build(mtl.METHODS[name], K)


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(K, 10))
  jac[1] = -0.8 * jac[0] + 0.3 * rng.normal(size=10)  # a conflict
  return {
    "w": jnp.asarray(jac[:, :6].reshape(K, 3, 2), jnp.float32),
    "b": jnp.asarray(jac[:, 6:], jnp.float32),
  }


def _params(grads):
  return jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)


EXTRA = {
  "task_losses": jnp.array([1.0, 2.0, 0.5]),
  "task_present": jnp.array([True, False, True]),
  "key": jax.random.PRNGKey(3),
}


def _close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# Module-level functions, so that transforms built from them pickle.
def _init(params):
  del params
  return mtl.EmptyState()


def _half_weights(state, *, task_losses=None, task_present=None, key=None):
  del task_losses, key
  return 0.5 * jnp.asarray(task_present, jnp.float32), state


def _first_task(
  updates,
  state,
  params=None,
  *,
  gram_matrix=None,
  task_losses=None,
  task_present=None,
  key=None,
):
  del params, gram_matrix, task_losses, task_present, key
  c = jnp.zeros((K,), jnp.float32).at[0].set(1.0)
  return mtl.combine(updates, c), state, c


def test_every_method_is_exactly_one_type_with_its_kind():
  assert set(KINDS) == set(mtl.METHODS)
  for name in mtl.METHODS:
    t = _method(name)
    assert isinstance(t, optax.GradientTransformationExtraArgs), name
    assert isinstance(t, mtl.Weighting) != isinstance(t, mtl.Aggregator), name
    assert mtl.kind(t) == KINDS[name], name
    assert len(t) == 2  # optax.chain unpacks (init, update) pairs
  assert mtl.kind(mtl.masked(mtl.pcgrad(), "w")) == mtl.AGGREGATOR
  assert mtl.kind(optax.adam(1e-3)) is None
  # A chain of mtl transforms is a plain optax transform: its kind is gone.
  assert mtl.kind(optax.chain(mtl.uncertainty_weighting(K))) is None


@pytest.mark.parametrize(
  "items, position",
  [
    (lambda: [optax.chain(mtl.uncertainty_weighting(K))], 0),
    (lambda: [optax.chain(mtl.uncertainty_weighting(K), mtl.pcgrad())], 0),
    (lambda: [optax.scale(2.0)], 0),
    (lambda: [mtl.dwa(K), optax.scale(2.0), mtl.pcgrad()], 1),
  ],
)
def test_a_transform_of_neither_kind_before_the_aggregator_is_refused(items, position):
  with pytest.raises(
    ValueError,
    match=f"mtl transform {position} .*{NEITHER}"
    r".*pass the mtl transforms themselves.*optax\.chain"
    ".*after the aggregator",
  ) as info:
    mtl.ensure_aggregator(items())
  assert isinstance(info.value, errors.UserError)
  message = str(info.value)
  assert "\n" not in message and message.count(". ") == 0  # one sentence


def test_aggregate_refuses_what_ensure_aggregator_refuses():
  grads = _grads()
  transforms = (optax.scale(2.0), mtl.pcgrad())
  state = optax.chain(*transforms).init(_params(grads))
  with pytest.raises(ValueError, match=NEITHER):
    mtl.aggregate(transforms, state, grads, _params(grads), **EXTRA)
  with pytest.raises(ValueError, match=f"inner transform 0 .*{NEITHER}"):
    mtl.masked(optax.scale(2.0), "w")
  with pytest.raises(ValueError, match="without an aggregator"):
    mtl.masked([mtl.dwa(K)], "w")


def test_weighting_or_second_aggregator_after_the_aggregator_is_refused():
  with pytest.raises(
    ValueError, match="mtl transform 1 is a loss weighting placed after an aggregator"
  ):
    mtl.ensure_aggregator([mtl.pcgrad(), mtl.uncertainty_weighting(K)])
  with pytest.raises(
    ValueError, match="mtl transform 2 is an aggregator placed after aggregator 1"
  ):
    mtl.ensure_aggregator([mtl.rlw(K), mtl.pcgrad(), mtl.sum_tasks()])


def test_plain_optax_after_the_aggregator_is_kept_and_aggregate_equals_chain():
  transforms = (
    mtl.uncertainty_weighting(K),
    mtl.pcgrad(),
    optax.clip_by_global_norm(0.5),
    optax.scale(-0.1),
  )
  assert mtl.ensure_aggregator(transforms) == transforms
  grads = _grads(1)
  params = _params(grads)
  tx = optax.chain(*transforms)
  chain_state = agg_state = tx.init(params)
  for _ in range(2):
    want, chain_state = jax.jit(tx.update)(grads, chain_state, params, **EXTRA)
    got, agg_state, info = jax.jit(
      lambda s, g: mtl.aggregate(transforms, s, g, params, **EXTRA)
    )(agg_state, grads)
    _close(got, want)
    _close(agg_state, chain_state)
  assert info["weights"].shape == (K,) and info["weights"][1] == 0.0


def test_copies_pickles_and_pytree_maps_keep_the_kind():
  for name in mtl.METHODS:
    t = _method(name)
    for c in (
      copy.copy(t),
      copy.deepcopy(t),
      jax.tree_util.tree_map(lambda f: f, t),
      t._replace(init=t.init),
    ):
      assert type(c) is type(t) and mtl.kind(c) == KINDS[name], name
      assert c.weights is t.weights, name
      if isinstance(t, mtl.Aggregator):
        assert c.aggregate is t.aggregate, name
  assert copy.copy(t) == t and jax.tree_util.tree_map(lambda f: f, t) == t
  with pytest.raises(ValueError, match="init and update only"):
    mtl.pcgrad()._replace(aggregate=_first_task)

  grads = _grads(2)
  weighting = mtl.Weighting(_init, _half_weights)
  aggregator = mtl.Aggregator(_init, _first_task)
  for t in (weighting, aggregator):
    back = pickle.loads(pickle.dumps(t))
    assert type(back) is type(t) and mtl.kind(back) == mtl.kind(t)
    _close(
      back.update(grads, back.init(None), **EXTRA)[0],
      t.update(grads, t.init(None), **EXTRA)[0],
    )
  # A user's Weighting: update is derived from its weights.
  out, _ = weighting.update(grads, weighting.init(None), **EXTRA)
  _close(
    out,
    jax.tree_util.tree_map(
      lambda g: g * jnp.asarray([0.5, 0.0, 0.5]).reshape((K,) + (1,) * (g.ndim - 1)),
      grads,
    ),
  )
  assert not mtl.needs_task_grads([weighting, mtl.sum_tasks()])
  assert mtl.needs_task_grads([weighting, aggregator])


def test_user_chain_of_an_aggregator_and_an_optimizer_takes_extra_args():
  grads = _grads(3)
  params = _params(grads)
  tx = optax.chain(mtl.pcgrad(), optax.sgd(0.1))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(
    grads, state, params, task_losses=EXTRA["task_losses"], key=EXTRA["key"]
  )
  surgery, _ = mtl.pcgrad().update(
    grads, mtl.pcgrad().init(params), params, key=EXTRA["key"]
  )
  _close(updates, jax.tree_util.tree_map(lambda g: -0.1 * g, surgery))
  assert state[0].count == 1


def test_shape_errors_are_value_errors():
  assert issubclass(errors.UserError, ValueError)
  bad = {"w": jnp.ones((K, 2)), "b": jnp.ones((K + 1, 2))}
  tx = mtl.pcgrad()
  with pytest.raises(ValueError, match="same leading task axis"):
    tx.update(bad, tx.init(None))
  tx = mtl.uncertainty_weighting(K)
  with pytest.raises(ValueError, match="task_losses has shape"):
    tx.update(_grads(), tx.init(None), task_losses=jnp.ones(K + 1))
