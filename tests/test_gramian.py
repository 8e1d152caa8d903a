"""The Gramian route (``mtx.train.step.unit_gram`` / ``weighted_gradient``) against the
stacks route (``group_gradients``): the same Gram matrix, the same update.

Tiny T5 on 8 fake CPU devices; the stacks route is the reference (its Gram matrix is
``mtl.gram`` of the [G, *param] stacks, tests/test_step.py checks the stacks against
plain ``jax.grad``).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_step import CONFIG, LENGTHS, MODEL_INPUTS, assert_trees_close, task_major_batch

from mtx import mtl, parallel
from mtx.errors import UserError
from mtx.model import T5, layers
from mtx.runtime import params as params_lib
from mtx.train import build as build_lib
from mtx.train import settings as settings_lib
from mtx.train import state as state_lib
from mtx.train import step

GROUP_OF_TASK = (0, 0, 1)
POD = {"data": 2, "fsdp": 2, "tensor": 2}
DEEP = dataclasses.replace(CONFIG, num_encoder_layers=2, num_decoder_layers=2)


def _setup(mesh_shape, scan, config=DEEP):
  devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
  mesh = parallel.make_mesh(mesh_shape, devices)
  model = T5(dataclasses.replace(config, scan_layers=scan))
  boxed, abstract = params_lib.abstract_params(model, *LENGTHS)
  p_shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = params_lib.init_params(model, 0, *LENGTHS, p_shardings)
  return mesh, model, abstract, p_shardings, params


def _one_step(route, method, scan=True, config=DEEP, unit_axes=None):
  """(new params, metrics) of one SGD step with ``method`` on ``route`` on the POD mesh,
  built as ``build_train_step`` builds it (pod layout, logical rules, jit with
  shardings): the Gramian route's units over data x fsdp, the stacks' over data,
  unless ``unit_axes`` says otherwise."""
  if unit_axes is None:
    spread = route == "gramian"
    unit_axes = parallel.SPREAD_UNIT_AXES if spread else parallel.UNIT_AXES
  mesh, model, abstract, p_shardings, params = _setup(POD, scan, config)
  batch = task_major_batch(GROUP_OF_TASK, seed=3)
  cfg = step.StepConfig(
    num_tasks=len(GROUP_OF_TASK),
    group_of_task=GROUP_OF_TASK,
    task_grads=True,
    z_loss=1e-4,
    task_grads_route=route,
    unit_axes=unit_axes,
  )
  optimizer = optax.sgd(0.5)
  transforms = mtl.ensure_aggregator((method,))
  fn = step.make_train_step(model, optimizer, transforms, cfg, p_shardings)
  state = state_lib.make_state(params, optimizer, optax.chain(*transforms).init, 0)
  s_shardings = state_lib.state_shardings(
    jax.eval_shape(lambda s: s, state), abstract, p_shardings, mesh
  )
  b_shardings = {
    k: parallel.batch_sharding(mesh, v.ndim, unit_axes) for k, v in batch.items()
  }
  jitted = build_lib.jit_step_fn(fn, mesh, cfg.rules, s_shardings, b_shardings)
  new_state, metrics = jitted(state, jax.device_put(batch, b_shardings))
  return jax.tree.map(np.asarray, new_state), jax.tree.map(np.asarray, metrics)


def _assert_same_step(got, want):
  assert_trees_close(got[0]["params"], want[0]["params"], rtol=2e-5)
  for key in ("group_grad_norm", "group_grad_cos", "group_weights", "task_loss_sums"):
    np.testing.assert_allclose(got[1][key], want[1][key], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(got[1]["grad_norm"], want[1]["grad_norm"], rtol=2e-5)
  assert got[1]["conflict_frac"] == want[1]["conflict_frac"]


# Slow (default-suite time); the model-level check below stays in the default suite.
@pytest.mark.slow
def test_pcgrad_gramian_route_gives_the_stacks_update_on_a_pod_mesh():
  """PCGrad, scanned layers (one per stack: the taps run inside nn.scan's body),
  (data, fsdp, tensor) = (2, 2, 2): same params after one step, same group gradient
  norms, cosines and weights. The Gramian route runs whole units per device (4 units
  over data x fsdp, as ``build_train_step`` lays them out), the stacks route units
  over data with their rows over fsdp."""
  one_layer = dict(scan=True, config=CONFIG)
  _assert_same_step(
    _one_step("gramian", mtl.pcgrad(), **one_layer),
    _one_step("stacks", mtl.pcgrad(), **one_layer),
  )


@pytest.mark.slow
def test_gramian_route_with_minimal_remat_gives_the_same_update():
  """Remat 'minimal' (weight matmuls saved, the rest recomputed in both backward
  passes through the one forward pass) changes nothing in the update."""
  remat = dict(scan=True, config=dataclasses.replace(CONFIG, remat_policy="minimal"))
  _assert_same_step(
    _one_step("gramian", mtl.pcgrad(), **remat),
    _one_step("stacks", mtl.pcgrad(), **remat),
  )


def test_minimal_remat_saves_weight_matmuls_with_a_unit_axis_not_attention():
  """The Gramian route's per-unit weights (``taps``) give weight matmuls a unit batch
  dimension; 'minimal' still saves them (so that route keeps the plain step's
  activations: T5-XXL on 1 x 256, 8.48 GiB against 8.42), and never attention's."""
  policy = layers.REMAT_POLICIES["minimal"]
  dot = jax.lax.dot_general_p
  assert policy(dot, dimension_numbers=(((2,), (0,)), ((), ())))  # x @ W
  assert policy(dot, dimension_numbers=(((3,), (1,)), ((0,), (0,))))  # per unit
  assert not policy(dot, dimension_numbers=(((3,), (3,)), ((0, 2), (0, 2))))  # bqhd,bkhd
  assert not policy(jax.lax.exp_p)


@pytest.mark.slow
def test_gramian_route_with_units_over_data_only_gives_the_same_update():
  """The Gramian route in the stacks route's layout (units over data, rows over fsdp)
  is the same update too: the taps follow the unit axes in the rules."""
  one_layer = dict(scan=True, config=CONFIG)
  _assert_same_step(
    _one_step("gramian", mtl.pcgrad(), unit_axes=parallel.UNIT_AXES, **one_layer),
    _one_step("stacks", mtl.pcgrad(), **one_layer),
  )


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize(
  "method",
  [mtl.mgda, mtl.upgrad, lambda: mtl.nash_mtl(2), mtl.cagrad],
  ids=["mgda", "upgrad", "nash_mtl", "cagrad"],
)
def test_solver_methods_give_the_same_update_on_both_routes(method, scan):
  _assert_same_step(
    _one_step("gramian", method(), scan=scan), _one_step("stacks", method(), scan=scan)
  )


@pytest.mark.slow
def test_unit_gram_equals_the_gram_matrix_of_the_stacks_unscanned_and_scanned():
  """``group_gram(unit_gram)`` is ``mtl.gram`` of ``group_gradients``' stacks, with and
  without ``nn.scan`` over layers (taps inside the scan body), on a data=2 x fsdp=2
  mesh."""
  for scan in (False, True):
    mesh, model, _, p_shardings, params = _setup({"data": 2, "fsdp": 2}, scan)
    batch = task_major_batch(GROUP_OF_TASK, seed=1)
    cfg = step.StepConfig(
      num_tasks=3, group_of_task=GROUP_OF_TASK, task_grads=True, z_loss=1e-4
    )

    def both(p, b, key):
      counts = step.token_counts(cfg, b) @ step.group_matrix(cfg)
      stacks, _ = step.group_gradients(model, cfg, p, b, counts, key, p_shardings)
      units, _ = step.unit_gram(model, cfg, p, b, counts, key, p_shardings)
      return mtl.gram(stacks), step.group_gram(units, b["unit_task"], cfg.num_groups)

    with mesh, nn.logical_axis_rules(list(cfg.rules)):
      want, got = jax.jit(both)(params, batch, jax.random.key(0))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())


def test_one_forward_two_backward_passes_give_the_gram_matrix_and_weighted_gradient():
  """``gramian_gradient`` with whole units per device (4 units on data=2 x fsdp=2,
  spread): its unit Gram matrix is ``mtl.gram`` of the stacks' per-unit sums, and its
  gradient for weights w is ``sum_g w_g`` of the stacks, per leaf."""
  mesh, model, _, p_shardings, params = _setup({"data": 2, "fsdp": 2}, True, CONFIG)
  batch = task_major_batch(GROUP_OF_TASK, seed=2)
  cfg = step.StepConfig(
    num_tasks=3,
    group_of_task=GROUP_OF_TASK,
    task_grads=True,
    z_loss=1e-4,
    unit_axes=parallel.SPREAD_UNIT_AXES,
  )
  w = jnp.asarray([0.7, 1.3])

  def both(p, b, key):
    counts = step.token_counts(cfg, b) @ step.group_matrix(cfg)
    stacks, _ = step.group_gradients(model, cfg, p, b, counts, key, p_shardings)
    grads, _, gram = step.gramian_gradient(
      model, cfg, p, b, counts, key, p_shardings, lambda g, sums: (w, g)
    )
    want = jax.tree.map(lambda s: jnp.tensordot(w, s, 1), stacks)
    return grads, want, step.group_gram(gram, b["unit_task"], 2), mtl.gram(stacks)

  with mesh, nn.logical_axis_rules(list(cfg.rules)):
    grads, want, gram, want_gram = jax.jit(both)(params, batch, jax.random.key(0))
  assert_trees_close(grads, want, rtol=2e-5)
  np.testing.assert_allclose(
    gram, want_gram, rtol=2e-5, atol=1e-6 * np.abs(want_gram).max()
  )


def test_the_model_without_gram_probes_is_unchanged_and_taps_leave_logits_alone():
  """No 'gram_probe' collection: the params are used as before (bit-identical logits);
  with probes the forward pass is the identity on the params too."""
  model = T5(CONFIG)
  rows = {
    k: v.reshape((-1,) + v.shape[2:]) for k, v in task_major_batch(GROUP_OF_TASK).items()
  }
  inputs = {k: rows[k] for k in MODEL_INPUTS}
  params = model.init(jax.random.key(0), **inputs)["params"]
  plain = model.apply({"params": params}, **inputs)
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, **inputs))(params))
  assert "custom_vjp" not in jaxpr
  probe = jax.tree.map(lambda _: jnp.zeros((4,), jnp.float32), nn.unbox(params))
  tapped = model.apply({"params": params, "gram_probe": probe}, **inputs)
  np.testing.assert_array_equal(np.asarray(tapped), np.asarray(plain))


def test_gram_route_refuses_masked_and_takes_the_rest():
  assert mtl.gram_route_refusal((mtl.masked(mtl.pcgrad(), "encoder/"),)) is not None
  assert mtl.gram_route_refusal((mtl.gradnorm(2, mask="encoder/"),)) is not None
  for t in (mtl.pcgrad(), mtl.mgda(), mtl.gradnorm(2), mtl.nash_mtl(2), mtl.sum_tasks()):
    assert mtl.gram_route_refusal((t,)) is None


def test_auto_route_takes_the_gramian_when_the_stacks_would_crowd_the_device():
  """'auto': stacks while they fit a quarter of the device (or up to 16 groups when the
  memory is unknown); 'gramian' asked for with grad accumulation is a one-sentence
  UserError; methods the Gramian route cannot run stay on the stacks."""
  choose = build_lib.choose_task_grads_route
  auto = settings_lib.StepSettings()
  pcgrad = (mtl.pcgrad(),)
  gib = 2**30
  assert choose(auto, pcgrad, 32, 40 * gib, 95 * gib) == "gramian"
  assert choose(auto, pcgrad, 32, 4 * gib, 95 * gib) == "stacks"
  assert choose(auto, pcgrad, 32, 4 * gib, None) == "gramian"
  assert choose(auto, pcgrad, 8, 4 * gib, None) == "stacks"
  # Units that the stacks route would pad over fsdp devices: the Gramian route.
  assert choose(auto, pcgrad, 8, 1 * gib, 95 * gib, padding=4.0) == "gramian"
  assert choose(auto, pcgrad, 8, 1 * gib, 95 * gib, padding=1.0) == "stacks"
  masked = (mtl.masked(mtl.pcgrad(), "encoder/"),)
  assert choose(auto, masked, 32, 40 * gib, 95 * gib) == "stacks"
  assert choose(auto, masked, 8, 1 * gib, 95 * gib, padding=4.0) == "stacks"
  accum = settings_lib.StepSettings(task_grads_route="gramian", grad_accum_steps=2)
  with pytest.raises(UserError, match="grad_accum_steps > 1") as e:
    choose(accum, pcgrad, 8, 0, None)
  assert len(str(e.value).splitlines()) == 1
  assert (
    choose(dataclasses.replace(accum, task_grads_route="auto"), pcgrad, 64, 1, None)
    == "stacks"
  )


def test_pure_fsdp_mesh_takes_the_gramian_route_with_whole_units_per_device():
  """data=1 x fsdp=8, batch 8: the stacks route's units (one per group, rows over 8
  fsdp devices) would be padded, so 'auto' takes the Gramian route and spreads its
  units over data x fsdp (8 units of one row, one per device); asked for, the stacks
  route keeps units over data (and pads them, with a warning), and so does the
  Gramian route when a set UNITS does not divide over the devices."""
  import tiny_mixture  # noqa: F401  # lazy: registers the "tiny" mixture

  data = settings_lib.DataSettings(
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    batch_size=8,
  )
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])

  def build(route, run_data=data):
    step_settings = settings_lib.StepSettings(
      model_config=dataclasses.replace(CONFIG, vocab_size=0),
      mtl_transforms=(mtl.pcgrad,),
      task_grads_route=route,
    )
    return build_lib.build_train_step(run_data, step_settings, mesh=mesh)

  auto = build("auto")
  assert auto.step_config.task_grads_route == "gramian"
  assert auto.step_config.unit_axes == parallel.SPREAD_UNIT_AXES
  assert (auto.layout.units, auto.layout.rows_per_unit) == (8, 1)
  assert auto.batch_axes == ("data", "fsdp")
  assert build_lib.unit_padding(auto.layout, mesh) == 8.0  # were they over data only
  stacks = build("stacks")
  assert stacks.step_config.unit_axes == parallel.UNIT_AXES
  assert stacks.batch_axes == ("data",)
  assert build_lib.unit_padding(stacks.layout, mesh) > 1
  # A UNITS that cannot give each device whole units: the Gramian route over data.
  two = build("gramian", dataclasses.replace(data, units=2))
  assert two.step_config.unit_axes == parallel.UNIT_AXES
  assert two.layout.units == 2
