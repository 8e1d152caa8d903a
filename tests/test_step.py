"""mtx.train.step's public pieces against plain ``jax.grad`` of losses written out here.

The reference losses follow the definitions in the step's docstring, without its code:
a token's loss is cross-entropy plus z-loss, a group's loss L_g is the sum of its target
tokens' losses over the whole batch divided by their number. Tiny T5, random examples
packed by ``mtx.data.packing`` into task-major units, two fake devices (data=2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mtx import mtl, parallel
from mtx.data import packing
from mtx.model import T5, T5Config
from mtx.runtime import params as params_lib
from mtx.train import build as build_lib
from mtx.train import state as state_lib
from mtx.train import step

CONFIG = T5Config(
  vocab_size=64,
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=1,
  num_decoder_layers=1,
)
LENGTHS = (12, 8)  # inputs, targets
ROWS = 2  # rows per unit
UNIT_GROUPS = (0, 1, 0, 1)  # the group each of the batch's 4 units holds
Z_LOSS = 1e-4
RTOL = 1e-5  # float32; the routes sum the same terms in another order
MODEL_INPUTS = (
  "encoder_input_tokens",
  "decoder_input_tokens",
  "encoder_segment_ids",
  "decoder_segment_ids",
  "encoder_positions",
  "decoder_positions",
)


@pytest.fixture(scope="module")
def tiny():
  """(model, params, param_shardings, mesh): a tiny T5 on a data=2 mesh."""
  mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
  model = T5(CONFIG)
  boxed, _ = params_lib.abstract_params(model, *LENGTHS)
  shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = params_lib.init_params(model, 0, *LENGTHS, shardings)
  return model, params, shardings, mesh


def task_major_batch(group_of_task, seed=0) -> dict:
  """Units of ROWS rows, unit u packed with random examples of group UNIT_GROUPS[u]'s
  tasks (picked at random), as the pipeline packs them; ``unit_task`` = UNIT_GROUPS."""
  rng = np.random.default_rng(seed)
  units = len(UNIT_GROUPS)
  flat = packing.empty_rows(units * ROWS, *LENGTHS)
  out = {k: v.reshape(units, ROWS, -1) for k, v in flat.items()}
  for u, g in enumerate(UNIT_GROUPS):
    tasks = [t for t, tg in enumerate(group_of_task) if tg == g]
    packer = packing.UnitPacker(ROWS, *LENGTHS, out={k: v[u] for k, v in out.items()})
    added = True
    while added:
      inputs = rng.integers(1, CONFIG.vocab_size, int(rng.integers(2, 6)))
      targets = rng.integers(1, CONFIG.vocab_size, int(rng.integers(2, 5)))
      added = packer.try_add(int(rng.choice(tasks)), inputs, targets)
  out["unit_task"] = np.asarray(UNIT_GROUPS, np.int32)
  return out


def flat_rows(batch: dict) -> dict:
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != "unit_task"}


def reference_token_losses(model, params, rows):
  """Cross-entropy + z-loss of every target token, f32[rows, length]."""
  logits = model.apply({"params": params}, **{k: rows[k] for k in MODEL_INPUTS})
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, rows["decoder_target_tokens"][..., None], -1)
  return log_z - target[..., 0] + Z_LOSS * log_z**2


def reference_group_losses(model, params, rows, group_of_task):
  """L_g: group g's summed token losses over its target tokens in ``rows``, f32[G]
  (0 for a group with no token)."""
  loss = reference_token_losses(model, params, rows)
  out = []
  for g in range(max(group_of_task) + 1):
    tasks = [t for t, tg in enumerate(group_of_task) if tg == g]
    mask = np.isin(rows["decoder_task_ids"], tasks) * rows["decoder_loss_weights"]
    n = mask.sum()
    out.append(jnp.sum(loss * mask) / n if n else jnp.zeros([], jnp.float32))
  return jnp.stack(out)


def config(group_of_task, **kw) -> step.StepConfig:
  return step.StepConfig(
    num_tasks=len(group_of_task), group_of_task=group_of_task, z_loss=Z_LOSS, **kw
  )


def group_counts(cfg, batch):
  return step.token_counts(cfg, batch) @ step.group_matrix(cfg)


def run_group_gradients(tiny, cfg, batch):
  model, params, shardings, mesh = tiny

  def fn(p, b, key):
    return step.group_gradients(model, cfg, p, b, group_counts(cfg, b), key, shardings)

  with mesh, nn.logical_axis_rules(list(cfg.rules)):
    return jax.jit(fn)(params, batch, jax.random.key(0))


def assert_trees_close(got, want, rtol=RTOL):
  """Leaf by leaf; the tolerance scales with each leaf's largest entry."""
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  got_leaves = jax.tree.leaves(got)
  assert len(got_leaves) == len(paths)
  for (path, w), g in zip(paths, got_leaves):
    w, g = np.asarray(w), np.asarray(g)
    assert g.shape == w.shape, jax.tree_util.keystr(path)
    np.testing.assert_allclose(
      g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize(
  "group_of_task",
  [pytest.param((0, 0, 1), marks=pytest.mark.slow), (0, 1, 2)],  # suite time
  ids=["two_groups_of_three_tasks", "three_groups_one_absent"],
)
def test_group_gradients_equal_per_group_grad_of_mean_loss(tiny, group_of_task):
  model, params, _, mesh = tiny
  cfg = config(group_of_task, task_grads=True)
  batch = task_major_batch(group_of_task)
  grads, sums = run_group_gradients(tiny, cfg, batch)

  rows = flat_rows(batch)
  with mesh, nn.logical_axis_rules(list(cfg.rules)):
    grad_of_group = jax.jit(
      jax.grad(lambda p, g: reference_group_losses(model, p, rows, group_of_task)[g])
    )
    for g in range(cfg.num_groups):
      want = grad_of_group(params, g)
      assert_trees_close(jax.tree.map(lambda x, g=g: x[g], grads), want)
    token_loss = reference_token_losses(model, params, rows)
  # The second result: loss sums per task (not per group), over the whole batch.
  want_sums = [
    np.sum(
      np.asarray(token_loss)
      * (rows["decoder_task_ids"] == t)
      * rows["decoder_loss_weights"]
    )
    for t in range(cfg.num_tasks)
  ]
  np.testing.assert_allclose(np.asarray(sums["loss"]), want_sums, rtol=RTOL)
  if group_of_task == (0, 1, 2):
    # Group 2 has no unit in this batch: its gradient is exactly zero, not NaN.
    assert all(np.all(np.asarray(x[2]) == 0) for x in jax.tree.leaves(grads))
  # The groups' gradients differ, so the comparison above is not between zeros.
  leaf = np.asarray(jax.tree.leaves(grads)[0])
  assert np.abs(leaf[0]).max() > 0 and not np.allclose(leaf[0], leaf[1])


@pytest.mark.slow  # suite time; test_train checks accumulation end to end in the default suite
def test_group_gradients_with_two_microbatches_equal_one(tiny):
  group_of_task = (0, 0, 1)
  batch = task_major_batch(group_of_task, seed=1)
  one = run_group_gradients(tiny, config(group_of_task, task_grads=True), batch)
  two = run_group_gradients(
    tiny, config(group_of_task, task_grads=True, grad_accum_steps=2), batch
  )
  assert_trees_close(two[0], one[0])
  for part in step.LOSS_PARTS:
    np.testing.assert_allclose(
      np.asarray(two[1][part]), np.asarray(one[1][part]), rtol=RTOL, atol=1e-6
    )


def numpy_task_sums(logits, rows, num_tasks, z_loss, label_smoothing):
  """The per-task sums of the loss and its parts, in float64 numpy from the logits."""
  logits = np.asarray(logits, np.float64)
  targets, weights = rows["decoder_target_tokens"], rows["decoder_loss_weights"]
  vocab = logits.shape[-1]
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
  log_z += logits.max(-1)
  log_p = logits - log_z[..., None]
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  # Label smoothing: cross-entropy against (1 - s) on the target, s / (V - 1) elsewhere,
  # minus that distribution's entropy.
  q = np.full(log_p.shape, label_smoothing / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1 - label_smoothing, -1)
  smoothed = -np.sum(q * log_p, -1) + np.sum(q * np.log(q), -1)
  z = z_loss * log_z**2
  correct = (np.argmax(logits, -1) == targets).astype(np.float64)
  parts = {"loss": smoothed + z, "cross_ent": nll, "z_loss": z, "correct": correct}
  return {
    name: np.array(
      [np.sum(v * weights * (rows["decoder_task_ids"] == t)) for t in range(num_tasks)]
    )
    for name, v in parts.items()
  }


@pytest.mark.parametrize("route", ["per_group", "one_gradient"])
def test_the_step_sums_cross_entropy_z_loss_and_correct_tokens_per_task(tiny, route):
  """The logs' cross_ent_loss/<task>, z_loss and accuracy/<task> against numpy."""
  model, params, shardings, mesh = tiny
  group_of_task = (0, 0, 1)
  cfg = step.StepConfig(
    num_tasks=3,
    group_of_task=group_of_task,
    z_loss=0.05,
    label_smoothing=0.1,
    task_grads=route == "per_group",
  )
  batch = task_major_batch(group_of_task, seed=3)
  rows = flat_rows(batch)
  if route == "per_group":
    _, sums = run_group_gradients(tiny, cfg, batch)
  else:
    transforms = mtl.ensure_aggregator(())
    state = optax.chain(*transforms).init(params)

    def fn(p, b, key):
      counts = group_counts(cfg, b)
      return step.one_gradient(model, cfg, transforms, p, state, b, counts, key, key)

    with mesh, nn.logical_axis_rules(list(cfg.rules)):
      sums = jax.jit(fn)(params, rows, jax.random.key(0))[1]
  with mesh, nn.logical_axis_rules(list(cfg.rules)):
    logits = model.apply({"params": params}, **{k: rows[k] for k in MODEL_INPUTS})
  want = numpy_task_sums(logits, rows, 3, cfg.z_loss, cfg.label_smoothing)
  assert want["correct"].sum() > 0 and want["z_loss"].min() > 0
  assert not np.allclose(want["loss"], want["cross_ent"] + want["z_loss"])  # smoothing
  for part in step.LOSS_PARTS:
    np.testing.assert_allclose(
      np.asarray(sums[part]), want[part], rtol=1e-4, err_msg=part
    )


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_one_gradient_equals_grad_of_weighted_sum_of_group_losses(tiny, grad_accum_steps):
  model, params, _, mesh = tiny
  group_of_task = (0, 0, 1)
  weights = [0.3, 1.7]
  cfg = config(group_of_task, grad_accum_steps=grad_accum_steps)
  transforms = mtl.ensure_aggregator((mtl.static_weights(weights),))
  mtl_state = optax.chain(*transforms).init(params)
  rows = flat_rows(task_major_batch(group_of_task, seed=2))

  def fn(p, b, key):
    return step.one_gradient(
      model, cfg, transforms, p, mtl_state, b, group_counts(cfg, b), key, key
    )

  def weighted(p):
    return jnp.asarray(weights) @ reference_group_losses(model, p, rows, group_of_task)

  with mesh, nn.logical_axis_rules(list(cfg.rules)):
    grads, _, w, _ = jax.jit(fn)(params, rows, jax.random.key(0))
    want = jax.jit(jax.grad(weighted))(params)
  np.testing.assert_allclose(np.asarray(w), weights, rtol=1e-6)
  assert_trees_close(grads, want)


def test_microbatches_take_every_mth_row():
  """The docstring's example: microbatch i holds rows i, i + m, ... (no row moves)."""
  out = step.microbatches({"x": jnp.arange(6), "y": jnp.arange(12).reshape(6, 2)}, 2)
  np.testing.assert_array_equal(out["x"], [[0, 2, 4], [1, 3, 5]])
  np.testing.assert_array_equal(out["y"][1], [[2, 3], [6, 7], [10, 11]])


def test_group_matrix_maps_tasks_to_groups_and_safe_div_zeroes_empty_groups():
  m = step.group_matrix(step.StepConfig(num_tasks=3, group_of_task=(0, 0, 1)))
  np.testing.assert_array_equal(m, [[1, 0], [1, 0], [0, 1]])
  np.testing.assert_array_equal(
    step.safe_div(jnp.array([3.0, 2.0]), jnp.array([2.0, 0.0])), [1.5, 0.0]
  )


def _one_pcgrad_step(mesh_shape, devices, group_of_task, batch):
  """(new params, metrics) of one PCGrad step built as ``build_train_step`` builds it:
  the pod layout (units over data, a unit's rows over fsdp, per-unit and per-group
  stacks split over fsdp x data), traced under the mesh and the logical rules."""
  mesh = parallel.make_mesh(mesh_shape, devices)
  model = T5(CONFIG)
  boxed, abstract = params_lib.abstract_params(model, *LENGTHS)
  p_shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = params_lib.init_params(model, 0, *LENGTHS, p_shardings)
  cfg = config(group_of_task, task_grads=True)
  optimizer = optax.sgd(0.5)
  transforms = mtl.ensure_aggregator((mtl.pcgrad(),))
  mtl_init = optax.chain(*transforms).init
  fn = step.make_train_step(model, optimizer, transforms, cfg, p_shardings)
  state = state_lib.make_state(params, optimizer, mtl_init, 0)
  s_shardings = state_lib.state_shardings(
    jax.eval_shape(lambda s: s, state), abstract, p_shardings, mesh
  )
  b_shardings = {
    k: parallel.batch_sharding(mesh, v.ndim, parallel.UNIT_AXES) for k, v in batch.items()
  }
  jitted = build_lib.jit_step_fn(fn, mesh, cfg.rules, s_shardings, b_shardings)
  new_state, metrics = jitted(state, jax.device_put(batch, b_shardings))
  return jax.tree.map(np.asarray, new_state["params"]), jax.tree.map(np.asarray, metrics)


def test_pcgrad_step_on_a_data_fsdp_tensor_mesh_equals_one_device():
  """The pod layout moves where the per-task gradients are computed and summed, not
  what they are: the update and the Gram diagnostics on (data, fsdp, tensor) =
  (2, 2, 2) equal those on one device, to float32 precision."""
  group_of_task = (0, 0, 1)
  batch = task_major_batch(group_of_task, seed=3)
  one = _one_pcgrad_step({"data": 1}, jax.devices()[:1], group_of_task, batch)
  pod = _one_pcgrad_step(
    {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), group_of_task, batch
  )
  assert_trees_close(pod[0], one[0])
  for key in ("group_grad_norm", "group_grad_cos", "task_loss_sums", "grad_norm"):
    np.testing.assert_allclose(pod[1][key], one[1][key], rtol=RTOL, atol=1e-6)
  assert one[1]["conflict_frac"] == pod[1]["conflict_frac"]


def test_pod_layout_shardings():
  """Units over data, rows over fsdp; the stacks split the fsdp-sharded dimension
  over data too, and the unit axis never reuses an axis a param already takes."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  kernel = jax.sharding.NamedSharding(mesh, P("fsdp", "tensor"))
  assert parallel.unit_batch_spec(3) == P(("data",), ("fsdp",), None)
  assert parallel.unit_stack_sharding(kernel).spec == P(("data",), "fsdp", "tensor")
  assert parallel.group_stack_sharding(kernel).spec == P(None, ("fsdp", "data"), "tensor")
  assert parallel.group_split_sharding(kernel).spec == P(("fsdp", "data"), "tensor")
  # A param on the unit axis is whole within a unit: units over data, the param not.
  on_data = jax.sharding.NamedSharding(mesh, P("data"))
  assert parallel.unit_stack_sharding(on_data).spec == P(("data",), None)
  rules = dict(parallel.rules_within_unit(parallel.DEFAULT_RULES))
  assert rules["activation_batch"] == ("fsdp",)
  assert parallel.unit_axes_in(tuple(rules.items())) == ("data",)
  # The Gramian route's units, spread over data x fsdp: whole units per device.
  spread = parallel.SPREAD_UNIT_AXES
  assert parallel.unit_batch_spec(3, spread) == P(("data", "fsdp"), None, None)
  assert parallel.unit_stack_sharding(kernel, spread).spec == P(
    ("data", "fsdp"), None, "tensor"
  )
  assert parallel.group_stack_sharding(kernel, spread).spec == P(
    None, ("fsdp", "data"), "tensor"
  )
  rules = parallel.rules_within_unit(parallel.DEFAULT_RULES, spread)
  assert dict(rules)["activation_batch"] is None
  assert parallel.unit_axes_in(rules) == spread
  # Default units: a multiple of the data axis whose rows divide evenly over fsdp.
  assert build_lib.default_units(7, 512, 16, 1, rows_over=16) == 16
  assert build_lib.default_units(3, 64, 2, 1, rows_over=8) == 4
