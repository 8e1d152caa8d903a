"""The jitted train step: per-task losses, per-task gradients when needed, mtl, optimizer.

Two routes, chosen once from the mtl transforms (``mtx.mtl.needs_task_grads``):

* **one gradient** (sum, mean, static or learned loss weights): a forward pass gives the
  group losses L [G]; the weightings turn them into w [G]; one backward pass with
  cotangent w gives grad(sum_g w_g L_g). Same cost as a plain step.
* **per-group gradients** (PCGrad, MGDA, ...): the batch is task-major
  [units, rows_per_unit, length]; ``vmap(grad)`` over units (params unbatched) gives one
  gradient per unit at the FLOPs of one gradient, each unit's loss pre-scaled by
  1 / (its group's token count) so that a segment-sum over ``unit_task`` yields the
  gradient of every group's mean loss, [G, *param_shape], sharded like params and split
  over the data axis too. On a mesh the units go over "data" and each unit's rows over
  "fsdp" (``parallel.unit_batch_spec``), so a unit's gradient is computed FSDP-style by
  one data group; the stacks never hold a whole gradient per device (issue 15).
  On the Gramian route (``task_grads_route``) the units are spread over data x fsdp
  instead (``StepConfig.unit_axes``): each device runs whole units, so none is padded
  on a pure FSDP mesh, and only the Gram matrix of the unit gradients is formed.

Group loss L_g = (sum of token losses of group g) / (its target tokens in the global
batch), so a group's weight does not depend on how many units it got this step.

Gradient accumulation splits the batch into ``grad_accum_steps`` microbatches (rows b
with b % M == m, so each device keeps its own rows) and sums exactly the same quantities.
With M > 1 on the one-gradient route the losses for w come from an extra forward pass.

On the per-group route ``mtl.aggregate`` runs the mtl chain with one Gram matrix shared
by the method and the diagnostics, and reports the task weights the method applied; TAG's
inter-task affinity (``tag_affinity_period``) is measured there too, every N steps.

Frozen params. With ``StepConfig.trainable_params`` (a regex on param paths) the step
splits the params (``mtx.train.freeze``): every route, the mtl transforms and the
optimizer see the trainable subtree only, and the model is a ``freeze.FrozenBase`` that
merges the frozen subtree (closed over, never differentiated) back in. Per-task stacks,
Gram probes and surgery thus cover the trainable params only (adapters, say), and the
frozen ones leave the step bit-identical. Without it the program is the plain one.

Non-finite steps. A step whose task losses, gradient or update hold a NaN or an Inf
changes nothing: params, optimizer and mtl state keep their old values (a select, fused
into the update), while ``step`` still advances and ``nonfinite_steps`` counts it. The
optimizer's own step count therefore lags ``step`` by the skipped steps, as with
``optax.apply_if_finite``. Whether the run goes on or stops is the loop's choice
(``train.nonfinite_policy``); the device program is the same.

The pieces are public, pure functions of arrays and pytrees (``StepConfig`` is their
static, hashable configuration), so that tests and tools/bench.py can call or time them
apart:

    task_loss_sums      per task of some rows: sums of the loss and of its parts
                        (``LOSS_PARTS``), and target tokens, f32[k] each
    token_counts        target tokens per task of a batch, no model needed
    group_matrix        the task -> group one-hot matrix f32[k, G]
    safe_div            a / b, 0 where b is 0 (a group absent from the batch)
    microbatches        [N, ...] -> [M, N/M, ...], each device keeping its rows
    one_gradient        the one-gradient route
    group_gradients     the per-group route: f32[G, *param], one gradient per group
    sum_units_by_group  its per-unit gradients summed by group
    gramian_gradient    the Gramian route: the unit Gram matrix, the method's weights
                        from it, and their weighted gradient, without the stacks
    unit_gram           the unit Gram matrix alone (a check of the taps)
    make_train_step     the whole step; ``group_gradients_fn`` replaces the per-group
                        route (tools/bench.py passes ``jax.jacrev``'s, to compare)

``mtx.train.build.build_train_step`` is how the trainer, ``mtx compile`` and the bench
tools build and jit the step from a run's settings.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtx import mtl, parallel
from mtx.data import decoder_only
from mtx.model import losses, taps
from mtx.train import adapter_ids, freeze

# The per-task sums the routes return, one f32[k] each (``losses.token_losses``): the
# training loss (what the gradient is of) and, for the logs, the plain cross-entropy,
# the z-loss term and the correctly predicted tokens. Taken from the same forward pass
# as the gradient, so they cost k-sized sums only.
LOSS_PARTS = ("loss", "cross_ent", "z_loss", "correct")

MODEL_KEYS = (
  "encoder_input_tokens",
  "decoder_input_tokens",
  "encoder_segment_ids",
  "decoder_segment_ids",
  "encoder_positions",
  "decoder_positions",
)
# What a decoder-only model (``mtx.model.Llama``) reads from a batch without an encoder
# side; the loss features are the same.
DECODER_ONLY_KEYS = decoder_only.MODEL_FEATURES


def model_inputs(batch: dict) -> dict:
  """The model's keyword inputs from a batch: ``MODEL_KEYS`` for an encoder-decoder
  batch, ``DECODER_ONLY_KEYS`` for a decoder-only one (it has no encoder tokens)."""
  keys = MODEL_KEYS if "encoder_input_tokens" in batch else DECODER_ONLY_KEYS
  return {k: batch[k] for k in keys}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the step (hashable; part of the compiled program).

  Attributes:
    num_tasks: k, tasks in the mixture (task ids 0..k-1).
    group_of_task: group id of each task; G = max + 1 groups (mtl acts on groups).
    task_grads: True for the per-group gradient route (task-major batches).
    grad_accum_steps: microbatches per step.
    z_loss, label_smoothing: loss options.
    dropout: whether the model applies dropout in training.
    rules: logical-to-mesh axis rules.
    tag_affinity_period: every this many steps (per-group route), TAG's affinity
      f32[G, G] (``mtl.tag_affinity``) on the step's batch; 0 = never.
    tag_affinity_lr: its lookahead SGD learning rate; 0 = the schedule's at the step.
    inject_nonfinite_steps, inject_nonfinite_task: a testing aid: at these (1-based)
      steps the loss weights of task ``inject_nonfinite_task``'s target tokens become
      +Inf, so that task's loss and the gradient are non-finite (a step where the task
      has no tokens is left alone). Empty in real runs, and then not in the program.
    task_grads_route: how the per-group route gets what the mtl chain needs:
      "stacks" (``group_gradients``: the gradients, [G, *param]) or "gramian"
      (``gramian_gradient``: their Gram matrix from one backward pass, then a
      weighted backward pass through the same forward; needs ``grad_accum_steps`` 1
      and a chain that ``mtl.gram_route_refusal`` accepts).
    trainable_params: None (every param trains), or a regex on the '/'-joined param
      paths: only the params it matches are differentiated and updated; the others
      are frozen (``mtx.train.freeze``; the opt and mtl states cover the trainable
      ones only).
    adapter_ids: the model has per-task LoRA adapters: it gets per-token adapter ids,
      each token's task group (``mtx.train.adapter_ids``).
    unit_axes: the mesh axes the task-major units are split over: "data"
      (``parallel.UNIT_AXES``, their rows over fsdp), or every batch axis
      (``parallel.SPREAD_UNIT_AXES``, whole units per device: the Gramian route's).
  """

  num_tasks: int
  group_of_task: tuple
  task_grads: bool = False
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  dropout: bool = False
  rules: tuple = parallel.DEFAULT_RULES
  tag_affinity_period: int = 0
  tag_affinity_lr: float = 0.0
  inject_nonfinite_steps: tuple = ()
  inject_nonfinite_task: int = 0
  task_grads_route: str = "stacks"
  trainable_params: Optional[str] = None
  adapter_ids: bool = False
  unit_axes: tuple = parallel.UNIT_AXES

  @property
  def num_groups(self) -> int:
    return max(self.group_of_task) + 1


def task_loss_sums(model, cfg: StepConfig, params, batch, key, gram_probe=None):
  """Loss sums and target tokens per task of some packed rows.

  Args:
    model: the ``mtx.model.T5`` module, or a decoder-only ``mtx.model.Llama`` (then
      ``batch`` holds ``mtx.data.decoder_only`` features).
    cfg: the step's settings; uses ``num_tasks``, ``z_loss``, ``label_smoothing`` and
      ``dropout``.
    params: the model's params pytree.
    batch: int32 features [..., rows, length]: ``MODEL_KEYS`` and
      ``decoder_target_tokens``, ``decoder_loss_weights``, ``decoder_task_ids`` (the
      task id of every target token, -1 on padding; ``mtx.data.packing``).
    key: the dropout PRNG key (unused unless ``cfg.dropout``).
    gram_probe: None, or one probe per param leaf (``mtx.model.taps``): the model's
      params are then tapped, so that the probes' gradient holds Gram matrix rows.

  Returns:
    (sums, token_counts f32[k]): ``sums`` maps each of ``LOSS_PARTS`` to f32[k]: per
    task, the sum of its token values times ``decoder_loss_weights`` (``loss``: the
    cross-entropy plus z-loss and label smoothing as configured; ``cross_ent``, ``z_loss``
    and ``correct`` apart, see ``losses.token_losses``), and ``token_counts`` the sum of
    those weights. A task's mean loss over these rows is
    ``safe_div(sums["loss"], token_counts)``.
  """
  variables = {"params": params}
  if gram_probe is not None:
    variables[taps.GRAM_PROBE] = gram_probe
  inputs = model_inputs(batch)
  if cfg.adapter_ids:  # per-task adapters: each token's task group picks its adapter
    inputs.update(adapter_ids.batch_adapter_ids(batch, cfg.group_of_task))
  logits = model.apply(
    variables,
    **inputs,
    enable_dropout=cfg.dropout,
    rngs={"dropout": key},
  )
  tok = losses.token_losses(
    logits,
    batch["decoder_target_tokens"],
    z_loss=cfg.z_loss,
    label_smoothing=cfg.label_smoothing,
  )
  return losses.task_sums(
    tok, batch["decoder_task_ids"], batch["decoder_loss_weights"], cfg.num_tasks
  )


def microbatches(batch: dict, m: int) -> dict:
  """Splits every leaf [N, ...] into m microbatches [m, N/m, ...] (N divisible by m).

  Microbatch i takes rows b with b % m == i. The batch's leading axis is sharded over
  the data axes in contiguous blocks; a reshape to [N/m, m] keeps each row on its
  device, so accumulation moves no data (taking contiguous rows would).

      >>> microbatches({"x": jnp.arange(6)}, 2)["x"]
      Array([[0, 2, 4],
             [1, 3, 5]], dtype=int32)

  Args:
    batch: a pytree of arrays with the same leading size N.
    m: the number of microbatches (``StepConfig.grad_accum_steps``).

  Returns:
    The same pytree, each leaf [m, N/m, ...], ready for ``jax.lax.scan``.
  """

  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def group_matrix(cfg: StepConfig) -> jax.Array:
  """The task-to-group one-hot matrix f32[k, G]: row t is task t's group.

  Per-task sums [k] times it are per-group sums [G]. With ``group_of_task`` (0, 0, 1):
  ``[[1, 0], [1, 0], [0, 1]]``.
  """
  return jax.nn.one_hot(jnp.asarray(cfg.group_of_task), cfg.num_groups, dtype=jnp.float32)


def safe_div(a, b):
  """``a / b`` where ``b > 0``, else 0 (broadcasting).

  A group with no target tokens in the batch gets loss 0 and weight 0, not NaN.
  """
  return jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)


def token_counts(cfg: StepConfig, batch) -> jax.Array:
  """Target tokens per task, f32[k], in ``batch`` (of any shape); no model needed.

  Given the whole global batch, these are the denominators of the task losses, so a
  task's loss does not depend on how its rows were split among devices, units or
  microbatches. Per-group counts: ``token_counts(cfg, batch) @ group_matrix(cfg)``.

  Args:
    cfg: uses ``num_tasks``.
    batch: ``decoder_task_ids`` and ``decoder_loss_weights``, int [..., length].
  """
  onehot = jax.nn.one_hot(batch["decoder_task_ids"], cfg.num_tasks, dtype=jnp.float32)
  w = batch["decoder_loss_weights"].astype(jnp.float32)[..., None] * onehot
  return jnp.sum(w, axis=tuple(range(w.ndim - 1)))


def _inject_nonfinite(cfg: StepConfig, batch: dict, step: jax.Array) -> dict:
  """Testing aid: at the configured steps, one task's token loss weights become +Inf.

  The token counts are taken from the original batch, so the task's loss is +Inf (not
  Inf / Inf) and its gradient non-finite, as a real overflow would make them.
  """
  hit = jnp.any(step == jnp.asarray(cfg.inject_nonfinite_steps))
  w = batch["decoder_loss_weights"].astype(jnp.float32)
  bad = hit & (batch["decoder_task_ids"] == cfg.inject_nonfinite_task) & (w > 0)
  return dict(batch, decoder_loss_weights=jnp.where(bad, jnp.inf, w))


def _all_finite(*trees) -> jax.Array:
  """True iff every floating leaf of the trees is finite (one reduction per leaf)."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for t in trees
    for x in jax.tree.leaves(t)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _keep_if(ok: jax.Array, new, old):
  """``new`` where ``ok`` else ``old``, leaf by leaf (a select XLA fuses into the update)."""
  return jax.tree.map(
    lambda a, b: jax.lax.select(jnp.broadcast_to(ok, a.shape), a, b), new, old
  )


def one_gradient(
  model, cfg, transforms, params, mtl_state, batch, group_counts, dkey, mkey
):
  """The one-gradient route: grad of sum_g w_g L_g, with the weights w from the losses.

  L_g = (loss sum of group g's target tokens) / ``group_counts[g]``. The weights w [G]
  are the product of the mtl transforms' weights (``mtl.combined_weights``: a
  weighting's, such as static weights or FAMO, times the aggregator's) computed from L
  with no gradient through them, and the backward pass takes w as its cotangent: the
  cost of one plain gradient.
  With ``cfg.grad_accum_steps`` M > 1, a forward pass over the M microbatches gives L
  and w first, then a second pass accumulates the gradient of sum_g w_g L_g.

  Equivalently, for the w it returns (with ``gm = group_matrix(cfg)``)::

      grads == jax.grad(lambda p: w @ safe_div(
          task_loss_sums(model, cfg, p, batch, dkey)[0]["loss"] @ gm,
          group_counts))(params)

  Args:
    model, cfg, params: as for ``task_loss_sums``.
    transforms: the mtl transforms (a weighting, then an aggregator).
    mtl_state: their state (``optax.chain(*transforms).init(params)``).
    batch: flat features int32 [rows, length] (``task_loss_sums``' keys); rows divisible
      by M.
    group_counts: f32[G], target tokens per group in the global batch
      (``token_counts(cfg, batch) @ group_matrix(cfg)``).
    dkey: the dropout key (split among microbatches when M > 1).
    mkey: the mtl transforms' key (randomised weightings).

  Returns:
    (grads like params, task sums (``task_loss_sums``' dict of f32[k]), w f32[G], the
    new mtl state).
  """
  gm = group_matrix(cfg)
  m = cfg.grad_accum_steps

  def weights_for(group_losses):
    return mtl.combined_weights(
      transforms,
      mtl_state,
      task_losses=group_losses,
      task_present=group_counts > 0,
      key=mkey,
    )

  if m == 1:

    def group_losses(p):
      sums, _ = task_loss_sums(model, cfg, p, batch, dkey)
      return safe_div(sums["loss"] @ gm, group_counts), sums

    lg, vjp_fn, sums = jax.vjp(group_losses, params, has_aux=True)
    w, new_state = weights_for(jax.lax.stop_gradient(lg))
    (grads,) = vjp_fn(w.astype(lg.dtype))
    return grads, sums, w, new_state

  micro = microbatches(batch, m)
  keys = jax.random.split(dkey, m)

  def fwd(carry, xs):
    mb, key = xs
    sums, _ = task_loss_sums(model, cfg, params, mb, key)
    return jax.tree.map(jnp.add, carry, sums), None

  sums, _ = jax.lax.scan(fwd, zero_sums(cfg), (micro, keys))
  w, new_state = weights_for(safe_div(sums["loss"] @ gm, group_counts))
  scale = safe_div(w, group_counts)  # d/dp sum_g w_g S_g / N_g

  def bwd(acc, xs):
    mb, key = xs
    g = jax.grad(
      lambda p: task_loss_sums(model, cfg, p, mb, key)[0]["loss"] @ gm @ scale
    )(params)
    return jax.tree.map(jnp.add, acc, g), None

  grads, _ = jax.lax.scan(bwd, jax.tree.map(jnp.zeros_like, params), (micro, keys))
  return grads, sums, w, new_state


def zero_sums(cfg: StepConfig) -> dict:
  """Zeros shaped like ``task_loss_sums``' sums: f32[k] for each of ``LOSS_PARTS``."""
  return {part: jnp.zeros([cfg.num_tasks], jnp.float32) for part in LOSS_PARTS}


def sum_units_by_group(per_unit, unit_task, num_groups: int):
  """Per-unit gradients [U, *param] -> per-group sums [G, *param].

  ``out[g] = sum of per_unit[u] over the units u with unit_task[u] == g``, per leaf:
  with ``unit_task`` [0, 1, 0] and G 2, ``out[0] = per_unit[0] + per_unit[2]`` and
  ``out[1] = per_unit[1]``.

  Args:
    per_unit: a pytree of f32[U, *param_shape] leaves.
    unit_task: int32[U], the group id of each unit (ids outside [0, G) count nowhere).
    num_groups: G.

  A contraction with the one-hot unit-to-group matrix [G, U] rather than
  ``jax.ops.segment_sum``: XLA lowers segment_sum to a scatter, which on CPU is slower
  and keeps an extra copy of the stack alive (T5-small, k=8: 3.9 -> 2.6 GB per device,
  step 1.55x -> 1.34x of plain; tools/bench.py). HIGHEST precision keeps the sum exact
  in float32 on TPU/GPU (no bf16/TF32 passes); the unit axis is data-sharded, so the
  contraction ends in the same all-reduce a scatter would need.
  """
  onehot = jax.nn.one_hot(unit_task, num_groups, dtype=jnp.float32).T  # [G, U]
  return jax.tree.map(
    lambda g: jnp.tensordot(
      onehot.astype(g.dtype), g, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    per_unit,
  )


def _units_layout(x, param_shardings, unit_axes):
  """Task-major features [U, R, ...] laid out for the per-unit gradients: units over
  ``unit_axes``, each unit's rows over the other batch axes (fsdp, or none;
  ``parallel.unit_batch_spec``). The batch arrives with units over ``unit_axes``, so
  this is a local slice, no communication."""
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  sharding = jax.sharding.NamedSharding(mesh, parallel.unit_batch_spec(x.ndim, unit_axes))
  return jax.lax.with_sharding_constraint(x, sharding)


def group_gradients(model, cfg, params, batch, group_counts, dkey, param_shardings):
  """The per-group route: the gradient of every group's mean loss, stacked.

  ``grads[g] = jax.grad(L_g)(params)`` with L_g = (loss sum of group g's target
  tokens) / ``group_counts[g]`` (0 for a group with no tokens). The batch is task-major:
  unit u holds examples of group ``unit_task[u]`` only. ``vmap(grad)`` over units, with
  params unbatched, gives one gradient per unit for the FLOPs of one gradient; each
  unit's loss is pre-scaled by 1 / (its group's tokens), so that summing the units by
  group (``sum_units_by_group``) gives the groups' mean-loss gradients. With
  ``cfg.grad_accum_steps`` M > 1 the units are split into M microbatches
  (``microbatches``) and the group sums accumulated over them.

  Example, G 2 groups in U 4 units of R rows each::

      counts = token_counts(cfg, batch) @ group_matrix(cfg)   # f32[2]
      grads, sums = group_gradients(model, cfg, params, batch, counts, key,
                                    param_shardings)
      # batch["unit_task"] [0, 1, 0, 1]; every leaf of grads is [2, *param_shape]

  Args:
    model, cfg, params: as for ``task_loss_sums``.
    batch: int32 features [U, R, length] (``task_loss_sums``' keys) and ``unit_task``
      int32[U], the group id of each unit's examples (tasks are their own groups
      unless ``task_groups`` says otherwise); U divisible by M.
    group_counts: f32[G], target tokens per group in the global batch.
    dkey: the dropout key, split into one key per unit.
    param_shardings: the params' ``NamedSharding`` pytree; each group's gradient is
      sharded like its param and split over data too (``parallel.group_stack_sharding``;
      the group axis is not sharded).

  Returns:
    (grads: a params-like pytree of f32[G, *param_shape], task sums: ``task_loss_sums``'
    dict of f32[k]).
  """
  data, unit_scale, unit_keys = _unit_inputs(
    cfg, batch, group_counts, dkey, param_shardings
  )
  unit_task, unit_axes = batch["unit_task"], cfg.unit_axes
  m = cfg.grad_accum_steps

  def unit_objective(p, unit, scale, key):
    sums, _ = task_loss_sums(model, cfg, p, unit, key)
    return scale * jnp.sum(sums["loss"]), sums

  per_unit = jax.vmap(
    jax.grad(unit_objective, has_aux=True),
    in_axes=(None, 0, 0, 0),
    spmd_axis_name=unit_axes,
  )

  def chunk(p, units, scales, keys, tasks):
    with nn.logical_axis_rules(parallel.rules_within_unit(cfg.rules, unit_axes)):
      grads, sums = per_unit(p, units, scales, keys)
    # Each unit's gradient comes out sharded like its param (FSDP: reduce-scattered
    # over fsdp layer by layer), the unit axis over data; an all-to-all over data
    # then gives every device a slice of all units, so that summing them by group is
    # local (no G x params / fsdp partial sums to all-reduce).
    grads = jax.tree.map(
      lambda g, s: jax.lax.with_sharding_constraint(
        jax.lax.with_sharding_constraint(g, parallel.unit_stack_sharding(s, unit_axes)),
        parallel.group_stack_sharding(s, unit_axes),
      ),
      grads,
      param_shardings,
    )
    unit_sums = jax.tree.map(lambda x: x.sum(0), sums)
    return sum_units_by_group(grads, tasks, cfg.num_groups), unit_sums

  def constrain(grads):
    return jax.tree.map(
      lambda g, s: jax.lax.with_sharding_constraint(
        g, parallel.group_stack_sharding(s, unit_axes)
      ),
      grads,
      param_shardings,
    )

  if m == 1:
    grads, sums = chunk(params, data, unit_scale, unit_keys, unit_task)
    return constrain(grads), sums

  xs = microbatches(
    {"units": data, "scales": unit_scale, "keys": unit_keys, "groups": unit_task}, m
  )

  def body(carry, x):
    acc, acc_sums = carry
    g, s = chunk(params, x["units"], x["scales"], x["keys"], x["groups"])
    return (
      jax.tree.map(jnp.add, acc, constrain(g)),
      jax.tree.map(jnp.add, acc_sums, s),
    ), None

  zeros = constrain(
    jax.tree.map(lambda p: jnp.zeros((cfg.num_groups,) + p.shape, jnp.float32), params)
  )
  (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums(cfg)), xs)
  return grads, sums


def _unit_inputs(cfg, batch, group_counts, dkey, param_shardings):
  """(unit features in the units layout, scale f32[U] = 1 / (its group's tokens), one
  dropout key per unit): what both routes give each unit, so that they agree."""
  unit_task = batch["unit_task"]
  data = {
    k: _units_layout(v, param_shardings, cfg.unit_axes)
    for k, v in batch.items()
    if k != "unit_task"
  }
  scale = safe_div(1.0, group_counts)[unit_task]
  return data, scale, jax.random.split(dkey, unit_task.shape[0])


def unit_gram(model, cfg, params, batch, group_counts, dkey, param_shardings):
  """The Gramian route's first pass: the Gram matrix of the per-unit gradients, f32[U, U].

  ``out[u, v] = <P_u, P_v>`` summed over all params, with P_u the gradient of unit u's
  loss sum scaled by 1 / (its group's tokens), the per-unit gradient
  ``group_gradients`` sums by group, but without ever holding P: every param is tapped
  (``mtx.model.taps``) and ``vmap(grad)`` over units of the probes gives, per unit,
  its row of P P^T; per layer only that layer's per-unit gradients exist, transiently.
  The groups' Gram matrix is ``A P P^T A^T`` with the one-hot unit-to-group matrix A
  [G, U] (``group_gram``).

  Args, like ``group_gradients``'s (``cfg.grad_accum_steps`` must be 1: a Gram matrix
  of summed microbatch gradients needs cross terms between microbatches, that is,
  the gradients themselves).

  Returns:
    (unit Gram f32[U, U], task sums: ``task_loss_sums``' dict of f32[k]).
  """
  if cfg.grad_accum_steps != 1:
    raise ValueError("unit_gram needs grad_accum_steps 1 (see its docstring).")
  data, unit_scale, unit_keys = _unit_inputs(
    cfg, batch, group_counts, dkey, param_shardings
  )
  num_units = unit_scale.shape[0]
  probe = jax.tree.map(lambda _: jnp.zeros((num_units,), jnp.float32), params)

  def unit_objective(pr, unit, scale, key):
    sums, _ = task_loss_sums(model, cfg, params, unit, key, gram_probe=pr)
    return scale * jnp.sum(sums["loss"]), sums

  rows_fn = jax.vmap(
    jax.grad(unit_objective, has_aux=True),
    in_axes=(None, 0, 0, 0),
    spmd_axis_name=cfg.unit_axes,
  )
  with nn.logical_axis_rules(parallel.rules_within_unit(cfg.rules, cfg.unit_axes)):
    rows, sums = rows_fn(probe, data, unit_scale, unit_keys)
  gram = sum(jax.tree.leaves(rows), jnp.zeros((num_units, num_units), jnp.float32))
  return gram, jax.tree.map(lambda x: x.sum(0), sums)


def group_gram(unit_gram_matrix, unit_task, num_groups: int) -> jax.Array:
  """Unit Gram f32[U, U] -> group Gram f32[G, G]: ``A M A^T``, A [G, U] one-hot.

  With ``unit_task`` [0, 1, 0] the group-0 gradient is P_0 + P_2, so
  ``out[0, 0] = M[0,0] + M[0,2] + M[2,0] + M[2,2]``.
  """
  a = jax.nn.one_hot(unit_task, num_groups, dtype=jnp.float32).T
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(jnp.matmul(a, unit_gram_matrix, precision=hi), a.T, precision=hi)


def gramian_gradient(
  model, cfg, params, batch, group_counts, dkey, param_shardings, weights_fn
):
  """The Gramian route: one forward pass over the units, two backward passes through it.

  The forward pass is ``vmap`` over units of each unit's loss sum, with every param
  tapped (``mtx.model.taps``; one probe row f32[U] per unit and param). Its VJP is
  then taken twice, with the same residuals:

  1. with cotangent ``scale`` (1 / the unit's group tokens): the probes' cotangents
     are the rows of P P^T, the unit Gram matrix (``unit_gram``'s), P the per-unit
     gradients, which exist only one layer at a time; the params' cotangent is unused
     and XLA drops its computation;
  2. with cotangent ``w[group(u)] * scale_u``, w = ``weights_fn(unit Gram, task sums)``
     (the method's coefficients): the params' cotangent is
     ``sum_g w_g grad L_g``, the combined gradient; the probes' is dropped.

  So the route costs one forward and two backward passes (1.86x a plain step's FLOPs
  for T5-XXL with remat 'minimal') and holds one set of activations, and it equals
  ``sum_g w_g group_gradients(...)[g]`` to float32 summation order (same units,
  scales and dropout keys). The taps make each weight batched over units in the
  forward pass, one gathered copy per local unit; with one unit per device (the
  spread layout on a mesh at least as large as UNITS) that is the plain matmul. With
  several units per device the two passes each run their own forward pass instead
  (``unit_gram``, then ``weighted_gradient``): no per-unit weights, 2x the FLOPs.

  Args:
    model, cfg, params, batch, group_counts, dkey, param_shardings: as for
      ``group_gradients`` (``cfg.grad_accum_steps`` must be 1, ``unit_gram``).
    weights_fn: (unit Gram f32[U, U], task sums) -> (w f32[G], aux), traced inside.

  Returns:
    (the gradient, shaped and sharded like params; task sums: ``task_loss_sums``'
    dict of f32[k]; aux).
  """
  if cfg.grad_accum_steps != 1:
    raise ValueError("gramian_gradient needs grad_accum_steps 1 (see unit_gram).")
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  num_units = batch["unit_task"].shape[0]
  if num_units > math.prod(mesh.shape[a] for a in cfg.unit_axes):
    # Several units per device: per-unit weights would make every weight matmul a
    # small batched one (T5-small on one CPU device, 8 units: 3.3x the plain step,
    # against 2.2x with two forward passes, tools/bench.py), so each pass keeps its
    # own forward pass.
    gram, sums = unit_gram(model, cfg, params, batch, group_counts, dkey, param_shardings)
    w, aux = weights_fn(gram, sums)
    grads = weighted_gradient(
      model, cfg, params, batch, group_counts, w, dkey, param_shardings
    )
    return grads, sums, aux
  data, unit_scale, unit_keys = _unit_inputs(
    cfg, batch, group_counts, dkey, param_shardings
  )
  num_units = unit_scale.shape[0]
  probes = jax.tree.map(lambda _: jnp.zeros((num_units, num_units), jnp.float32), params)

  def unit_loss(pr, p, unit, key):
    sums, _ = task_loss_sums(model, cfg, p, unit, key, gram_probe=pr)
    return jnp.sum(sums["loss"]), sums

  per_unit = jax.vmap(unit_loss, in_axes=(0, None, 0, 0), spmd_axis_name=cfg.unit_axes)
  # The taps' backward passes are traced when vjp_fn is called: inside the rules too.
  with nn.logical_axis_rules(parallel.rules_within_unit(cfg.rules, cfg.unit_axes)):
    _, vjp_fn, sums = jax.vjp(
      lambda pr, p: per_unit(pr, p, data, unit_keys), probes, params, has_aux=True
    )
    sums = jax.tree.map(lambda x: x.sum(0), sums)
    rows, _ = vjp_fn(unit_scale)
    gram = sum(jax.tree.leaves(rows), jnp.zeros((num_units, num_units), jnp.float32))
    w, aux = weights_fn(gram, sums)
    coef = w.astype(jnp.float32)[batch["unit_task"]] * unit_scale
    _, grads = vjp_fn(coef)
  grads = jax.tree.map(jax.lax.with_sharding_constraint, grads, param_shardings)
  return grads, sums, aux


def weighted_gradient(
  model, cfg, params, batch, group_counts, group_weights, dkey, param_shardings
):
  """grad of sum_g w_g L_g over the task-major batch, in a forward pass of its own
  (``gramian_gradient``'s second pass when devices hold several units each).

  One backward pass (a plain step's cost) of ``sum_u w_{group(u)} scale_u loss_u``,
  with the same units, scales and dropout keys as ``group_gradients`` and
  ``unit_gram``, so it equals ``sum_g w_g group_gradients(...)[g]`` exactly (up to
  float32 summation order), without the stacks.

  Args:
    model, cfg, params, batch, group_counts, dkey, param_shardings: as for
      ``group_gradients``.
    group_weights: f32[G], the coefficients (``mtl.aggregate_gram``).

  Returns:
    The gradient, shaped and sharded like params.
  """
  # The forward pass does not need the weights, so XLA would run it during the first
  # pass and hold both passes' activations (2x a plain step's temporaries on CPU). The
  # tokens are made to depend on the weights (+0, or +1 when they are NaN, a step that
  # is skipped anyway): an optimization_barrier on (params, batch, weights) does the
  # same, but XLA then keeps both passes' buffers apart (also 2x, measured).
  late = jnp.isnan(jnp.sum(group_weights)).astype(jnp.int32)
  batch = dict(batch)
  for name in ("encoder_input_tokens", "decoder_input_tokens"):
    if name in batch:  # a decoder-only batch has no encoder side
      batch[name] = batch[name] + late
  data, unit_scale, unit_keys = _unit_inputs(
    cfg, batch, group_counts, dkey, param_shardings
  )
  coef = group_weights.astype(jnp.float32)[batch["unit_task"]] * unit_scale

  def unit_objective(p, unit, c, key):
    sums, _ = task_loss_sums(model, cfg, p, unit, key)
    return c * jnp.sum(sums["loss"])

  def total(p):
    per_unit = jax.vmap(
      unit_objective, in_axes=(None, 0, 0, 0), spmd_axis_name=cfg.unit_axes
    )
    with nn.logical_axis_rules(parallel.rules_within_unit(cfg.rules, cfg.unit_axes)):
      return jnp.sum(per_unit(p, data, coef, unit_keys))

  grads = jax.grad(total)(params)
  return jax.tree.map(jax.lax.with_sharding_constraint, grads, param_shardings)


def _tag_affinity(
  model, cfg, params, batch, group_counts, group_grads, present, lr, due, key
):
  """TAG affinity f32[G, G] on this batch when ``due`` (zeros otherwise): G + 1 forward
  passes without dropout, under ``lax.cond`` so that other steps pay nothing."""
  rows = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != "unit_task"}
  no_dropout = dataclasses.replace(cfg, dropout=False)

  def group_losses(p):
    sums, _ = task_loss_sums(model, no_dropout, p, rows, key)
    return safe_div(sums["loss"] @ group_matrix(cfg), group_counts)

  def affinity(_):
    return mtl.tag_affinity(group_losses, params, group_grads, lr, task_present=present)

  zeros = jnp.zeros((cfg.num_groups, cfg.num_groups), jnp.float32)
  return jax.lax.cond(due, affinity, lambda _: zeros, None)


def _group_metrics(info: dict) -> dict:
  """The per-group route's metrics from ``mtl.aggregate``'s (or ``aggregate_gram``'s)
  info: gradient norms, cosines, conflicts, the weights applied, the solve's report."""
  metrics = dict(
    group_grad_norm=info["grad_norm"],
    group_grad_cos=info["grad_cos"],
    conflict_frac=info["conflict_frac"],
  )
  if "weights" in info:
    metrics["group_weights"] = info["weights"]
  if "solver_residual" in info:  # the method solved for its weights
    metrics.update(
      solver_residual=info["solver_residual"], solver_failed=info["solver_failed"]
    )
  return metrics


def make_train_step(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  transforms: Sequence,
  cfg: StepConfig,
  param_shardings: Any,
  learning_rate_fn: Optional[Callable] = None,
  group_gradients_fn: Callable = group_gradients,
) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``mtx.train.build.build_train_step`` calls this and jits the step with the state and
  batch shardings; call it directly only to build a step outside a run's settings.

  Args:
    model: the ``mtx.model.T5`` module.
    optimizer: the optax optimizer the combined gradient goes to.
    transforms: the mtl transforms, aggregator included (``mtl.ensure_aggregator``);
      ``cfg.task_grads`` says which route they need (``mtl.needs_task_grads``).
    cfg: the step's static settings.
    param_shardings: the (whole) params' ``NamedSharding`` pytree (per-group
      gradients are sharded like its trainable subtree).
    learning_rate_fn: step -> learning rate; TAG's lookahead uses it when
      ``cfg.tag_affinity_lr`` is 0.
    group_gradients_fn: the per-group route's gradients, with ``group_gradients``'
      arguments and results; another one (``jax.jacrev`` of the group-loss vector in
      tools/bench.py) lets a benchmark compare routes inside the same step.

  ``state`` is ``{"step", "params", "opt_state", "mtl_state", "rng",
  "nonfinite_steps"}`` (``mtx.train.state.make_state``; the last is the int32[] count
  of skipped steps, see the module docstring). With ``cfg.trainable_params`` the
  optimizer and mtl states are those of the trainable subtree
  (``freeze.trainable(params, pattern)``), and the frozen params pass through
  unchanged. ``batch`` is flat [B, length] on the
  one-gradient route and task-major [U, B/U, length] plus ``unit_task`` on the
  per-group route (``mtx.data.pipeline``).

  Metrics hold ``task_loss_sums``/``task_tokens`` f32[k] (and the loss's parts for the
  logs: ``task_cross_ent_sums``, ``task_z_loss_sums``, ``task_correct``, f32[k] each,
  see ``LOSS_PARTS``), ``group_weights`` f32[G]
  (one-gradient route), ``grad_norm``, ``nonfinite`` (bool[], this step was skipped),
  ``nonfinite_steps``, and on the per-group route ``group_grad_norm`` f32[G],
  ``group_grad_cos`` f32[G, G] and ``conflict_frac``. On the per-group route
  ``group_weights`` holds the weights the method applied, when it reports them
  (``mtl.aggregate``), and a method that solves for them (MGDA, CAGrad, IMTL-G,
  Nash-MTL, UPGrad) adds ``solver_residual`` f32[] and ``solver_failed`` bool[].
  With ``tag_affinity_period`` metrics also hold ``tag_affinity`` f32[G, G] and
  ``tag_due`` (bool[], whether it was measured at this step).

  Raises:
    ValueError: TAG affinity without the per-group route or a learning rate.
  """
  transforms = tuple(transforms)
  if cfg.tag_affinity_period and not (
    cfg.task_grads and (cfg.tag_affinity_lr > 0 or learning_rate_fn is not None)
  ):
    raise ValueError("TAG affinity needs the per-group route and a learning rate.")
  gramian = cfg.task_grads and cfg.task_grads_route == "gramian"
  if gramian and (cfg.tag_affinity_period or cfg.grad_accum_steps != 1):
    raise ValueError("The Gramian route needs grad_accum_steps 1 and no TAG affinity.")

  # With frozen params the routes see the trainable subtree only (its shardings too)
  # and a model that merges the frozen one back in (``freeze.FrozenBase``).
  pattern = cfg.trainable_params
  shardings = freeze.trainable(param_shardings, pattern)

  def gramian_route(net, params, state, batch, group_counts, dkey, mkey):
    """The Gram matrix, ``mtl.aggregate_gram``, the weighted backward pass and
    ``mtl.finish_chain`` (``gramian_gradient``): what ``per_group_route`` returns,
    without the stacks."""
    present = group_counts > 0

    def extra_of(sums):
      group_losses = safe_div(sums["loss"] @ group_matrix(cfg), group_counts)
      return dict(task_losses=group_losses, task_present=present, key=mkey)

    def weights(unit_gram_matrix, sums):
      gram = group_gram(unit_gram_matrix, batch["unit_task"], cfg.num_groups)
      w, mtl_state, info = mtl.aggregate_gram(
        transforms, state["mtl_state"], gram, **extra_of(sums)
      )
      return w, (mtl_state, info)

    grads, sums, (mtl_state, info) = gramian_gradient(
      net, cfg, params, batch, group_counts, dkey, shardings, weights
    )
    grads, mtl_state = mtl.finish_chain(
      transforms, mtl_state, grads, params, **extra_of(sums)
    )
    return grads, sums, mtl_state, _group_metrics(info)

  def per_group_route(net, params, state, batch, group_counts, dkey, mkey):
    """Per-group gradients and ``mtl.aggregate``: (grads, task sums, mtl state,
    metrics), TAG's affinity included when configured."""
    if gramian:
      return gramian_route(net, params, state, batch, group_counts, dkey, mkey)
    group_grads, sums = group_gradients_fn(
      net, cfg, params, batch, group_counts, dkey, shardings
    )
    present = group_counts > 0
    group_losses = safe_div(sums["loss"] @ group_matrix(cfg), group_counts)
    grads, mtl_state, info = mtl.aggregate(
      transforms,
      state["mtl_state"],
      group_grads,
      params,
      task_losses=group_losses,
      task_present=present,
      key=mkey,
    )
    # The stacks are split over data too (``parallel.group_stack_sharding``); the
    # combined gradient is gathered into the params' sharding once, here.
    grads = jax.tree.map(
      lambda g, s: jax.lax.with_sharding_constraint(
        jax.lax.with_sharding_constraint(
          g, parallel.group_split_sharding(s, cfg.unit_axes)
        ),
        s,
      ),
      grads,
      shardings,
    )
    metrics = _group_metrics(info)
    if cfg.tag_affinity_period:
      due = (state["step"] + 1) % cfg.tag_affinity_period == 0
      lr = (
        cfg.tag_affinity_lr
        if cfg.tag_affinity_lr > 0
        else learning_rate_fn(state["step"])
      )
      metrics["tag_affinity"] = _tag_affinity(
        net, cfg, params, batch, group_counts, group_grads, present, lr, due, dkey
      )
      metrics["tag_due"] = due
    return grads, sums, mtl_state, metrics

  def step(state, batch):
    params, net, frozen = state["params"], model, None
    if pattern is not None:  # differentiate the trainable subtree only
      params, frozen = freeze.split(params, pattern)
      net = freeze.FrozenBase(model, frozen)
    base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    dkey, mkey = jax.random.split(base)
    counts = token_counts(cfg, batch)  # target tokens per task in the global batch
    group_counts = counts @ group_matrix(cfg)
    if cfg.inject_nonfinite_steps:
      batch = _inject_nonfinite(cfg, batch, state["step"] + 1)
    if cfg.task_grads:
      grads, sums, mtl_state, metrics = per_group_route(
        net, params, state, batch, group_counts, dkey, mkey
      )
    else:
      grads, sums, w, mtl_state = one_gradient(
        net,
        cfg,
        transforms,
        params,
        state["mtl_state"],
        batch,
        group_counts,
        dkey,
        mkey,
      )
      metrics = {"group_weights": w}
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    # The update is checked too: a finite gradient can still overflow in the optimizer.
    ok = _all_finite(sums["loss"], grad_norm, updates)
    metrics.update(
      task_loss_sums=sums["loss"],
      task_cross_ent_sums=sums["cross_ent"],
      task_z_loss_sums=sums["z_loss"],
      task_correct=sums["correct"],
      task_tokens=counts,
      grad_norm=grad_norm,
      nonfinite=jnp.logical_not(ok),
    )
    new_state = dict(state, step=state["step"] + 1)
    new_params = _keep_if(ok, new_params, params)
    new_state.update(
      # The frozen leaves go out as they came in (the donated buffers, unchanged).
      params=new_params if frozen is None else freeze.merge(new_params, frozen),
      opt_state=_keep_if(ok, opt_state, state["opt_state"]),
      mtl_state=_keep_if(ok, mtl_state, state["mtl_state"]),
    )
    new_state["nonfinite_steps"] = state["nonfinite_steps"] + (1 - ok.astype(jnp.int32))
    metrics["nonfinite_steps"] = new_state["nonfinite_steps"]
    return new_state, metrics

  return step
