"""The jitted train step: per-task losses, per-task gradients when needed, mtl, optimizer.

Two routes, chosen once from the mtl transforms (``mtx.mtl.needs_task_grads``):

* **one gradient** (sum, mean, static or learned loss weights): a forward pass gives the
  group losses L [G]; the weightings turn them into w [G]; one backward pass with
  cotangent w gives grad(sum_g w_g L_g). Same cost as a plain step.
* **per-group gradients** (PCGrad, MGDA, ...): the batch is task-major
  [units, rows_per_unit, length]; ``vmap(grad)`` over units (params unbatched) gives one
  gradient per unit at the FLOPs of one gradient, each unit's loss pre-scaled by
  1 / (its group's token count) so that a segment-sum over ``unit_task`` yields the
  gradient of every group's mean loss, [G, *param_shape], sharded like params.

Group loss L_g = (sum of token losses of group g) / (its target tokens in the global
batch), so a group's weight does not depend on how many units it got this step.

Gradient accumulation splits the batch into ``grad_accum_steps`` microbatches (rows b
with b % M == m, so each device keeps its own rows) and sums exactly the same quantities.
With M > 1 on the one-gradient route the losses for w come from an extra forward pass.

On the per-group route ``mtl.aggregate`` runs the mtl chain with one Gram matrix shared
by the method and the diagnostics, and reports the task weights the method applied; TAG's
inter-task affinity (``tag_affinity_period``) is measured there too, every N steps.

Non-finite steps. A step whose task losses, gradient or update hold a NaN or an Inf
changes nothing: params, optimizer and mtl state keep their old values (a select, fused
into the update), while ``step`` still advances and ``nonfinite_steps`` counts it. The
optimizer's own step count therefore lags ``step`` by the skipped steps, as with
``optax.apply_if_finite``. Whether the run goes on or stops is the loop's choice
(``train.nonfinite_policy``); the device program is the same.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtx import mtl, parallel
from mtx.model import losses

MODEL_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
              "decoder_segment_ids", "encoder_positions", "decoder_positions")


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

  @property
  def num_groups(self) -> int:
    return max(self.group_of_task) + 1


def task_loss_sums(model, cfg: StepConfig, params, batch, key):
  """(loss sums f32[k], token counts f32[k]) of a chunk of rows [..., rows, L]."""
  logits = model.apply({"params": params}, **{k: batch[k] for k in MODEL_KEYS},
                       enable_dropout=cfg.dropout, rngs={"dropout": key})
  tok = losses.cross_entropy(logits, batch["decoder_target_tokens"], z_loss=cfg.z_loss,
                             label_smoothing=cfg.label_smoothing)
  return losses.task_sums(tok, batch["decoder_task_ids"], batch["decoder_loss_weights"],
                          cfg.num_tasks)


def microbatches(batch: dict, m: int) -> dict:
  """[N, ...] -> [m, N/m, ...] taking rows b with b % m == i, so no row changes device."""
  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def group_matrix(cfg: StepConfig) -> jax.Array:
  return jax.nn.one_hot(jnp.asarray(cfg.group_of_task), cfg.num_groups, dtype=jnp.float32)


def safe_div(a, b):
  return jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)


def token_counts(cfg: StepConfig, batch) -> jax.Array:
  """Target tokens per task in the whole (global) batch, f32[k]; no model needed."""
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
  flags = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _keep_if(ok: jax.Array, new, old):
  """``new`` where ``ok`` else ``old``, leaf by leaf (a select XLA fuses into the update)."""
  return jax.tree.map(lambda a, b: jax.lax.select(jnp.broadcast_to(ok, a.shape), a, b),
                      new, old)


def one_gradient(model, cfg, transforms, params, mtl_state, batch, group_counts, dkey,
                  mkey):
  """Weighted-sum route: returns (grads like params, task sums, w[G], new mtl state)."""
  gm = group_matrix(cfg)
  m = cfg.grad_accum_steps

  def weights_for(group_losses):
    return mtl.combined_weights(transforms, mtl_state, task_losses=group_losses,
                                task_present=group_counts > 0, key=mkey)

  if m == 1:
    def group_losses(p):
      sums, _ = task_loss_sums(model, cfg, p, batch, dkey)
      return safe_div(sums @ gm, group_counts), sums
    lg, vjp_fn, sums = jax.vjp(group_losses, params, has_aux=True)
    w, new_state = weights_for(jax.lax.stop_gradient(lg))
    (grads,) = vjp_fn(w.astype(lg.dtype))
    return grads, sums, w, new_state

  micro = microbatches(batch, m)
  keys = jax.random.split(dkey, m)

  def fwd(carry, xs):
    mb, key = xs
    sums, _ = task_loss_sums(model, cfg, params, mb, key)
    return carry + sums, None
  sums, _ = jax.lax.scan(fwd, jnp.zeros([cfg.num_tasks]), (micro, keys))
  w, new_state = weights_for(safe_div(sums @ gm, group_counts))
  scale = safe_div(w, group_counts)  # d/dp sum_g w_g S_g / N_g

  def bwd(acc, xs):
    mb, key = xs
    g = jax.grad(lambda p: task_loss_sums(model, cfg, p, mb, key)[0] @ gm @ scale)(params)
    return jax.tree.map(jnp.add, acc, g), None
  grads, _ = jax.lax.scan(bwd, jax.tree.map(jnp.zeros_like, params), (micro, keys))
  return grads, sums, w, new_state


def sum_units_by_group(per_unit, unit_task, num_groups: int):
  """Per-unit gradients [U, *param] -> per-group sums [G, *param].

  A contraction with the one-hot unit-to-group matrix [G, U] rather than
  ``jax.ops.segment_sum``: XLA lowers segment_sum to a scatter, which on CPU is slower
  and keeps an extra copy of the stack alive (T5-small, k=8: 3.9 -> 2.6 GB per device,
  step 1.55x -> 1.34x of plain; tools/bench.py). HIGHEST precision keeps the sum exact
  in float32 on TPU/GPU (no bf16/TF32 passes); the unit axis is data-sharded, so the
  contraction ends in the same all-reduce a scatter would need.
  """
  onehot = jax.nn.one_hot(unit_task, num_groups, dtype=jnp.float32).T  # [G, U]
  return jax.tree.map(
      lambda g: jnp.tensordot(onehot.astype(g.dtype), g, axes=1,
                              precision=jax.lax.Precision.HIGHEST), per_unit)


def group_gradients(model, cfg, params, batch, group_counts, dkey, param_shardings):
  """Task-major route: returns (per-group grads [G, *param], task sums f32[k])."""
  unit_task = batch["unit_task"]
  data = {k: v for k, v in batch.items() if k != "unit_task"}
  unit_scale = safe_div(1.0, group_counts)[unit_task]  # [U]
  num_units = unit_task.shape[0]
  unit_keys = jax.random.split(dkey, num_units)
  m = cfg.grad_accum_steps

  def unit_objective(p, unit, scale, key):
    sums, _ = task_loss_sums(model, cfg, p, unit, key)
    return scale * jnp.sum(sums), sums

  per_unit = jax.vmap(jax.grad(unit_objective, has_aux=True), in_axes=(None, 0, 0, 0),
                      spmd_axis_name=parallel.BATCH_AXES)

  def chunk(p, units, scales, keys, tasks):
    with nn.logical_axis_rules(parallel.rules_without_batch(cfg.rules)):
      grads, sums = per_unit(p, units, scales, keys)
    return sum_units_by_group(grads, tasks, cfg.num_groups), sums.sum(0)

  def constrain(grads):
    return jax.tree.map(
        lambda g, s: jax.lax.with_sharding_constraint(
            g, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))),
        grads, param_shardings)

  if m == 1:
    grads, sums = chunk(params, data, unit_scale, unit_keys, unit_task)
    return constrain(grads), sums

  xs = microbatches({"d": data, "s": unit_scale, "k": unit_keys, "t": unit_task}, m)

  def body(carry, x):
    acc, acc_sums = carry
    g, s = chunk(params, x["d"], x["s"], x["k"], x["t"])
    return (jax.tree.map(jnp.add, acc, constrain(g)), acc_sums + s), None
  zeros = constrain(jax.tree.map(
      lambda p: jnp.zeros((cfg.num_groups,) + p.shape, jnp.float32), params))
  (grads, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros([cfg.num_tasks])), xs)
  return grads, sums


def _tag_affinity(model, cfg, params, batch, group_counts, group_grads, present, lr,
                  due, key):
  """TAG affinity f32[G, G] on this batch when ``due`` (zeros otherwise): G + 1 forward
  passes without dropout, under ``lax.cond`` so that other steps pay nothing."""
  rows = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != "unit_task"}
  no_dropout = dataclasses.replace(cfg, dropout=False)

  def group_losses(p):
    sums, _ = task_loss_sums(model, no_dropout, p, rows, key)
    return safe_div(sums @ group_matrix(cfg), group_counts)

  def affinity(_):
    return mtl.tag_affinity(group_losses, params, group_grads, lr, task_present=present)

  zeros = jnp.zeros((cfg.num_groups, cfg.num_groups), jnp.float32)
  return jax.lax.cond(due, affinity, lambda _: zeros, None)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    transforms: Sequence, cfg: StepConfig,
                    param_shardings: Any,
                    learning_rate_fn: Optional[Callable] = None,
                    group_gradients_fn: Callable = group_gradients) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``state`` is ``{"step", "params", "opt_state", "mtl_state", "rng",
  "nonfinite_steps"}`` (``mtx.train.state.make_state``; the last is the int32[] count
  of skipped steps, see the module docstring). Metrics hold ``task_loss_sums``/``task_tokens`` f32[k],
  ``group_weights`` f32[G] (one-gradient route), ``grad_norm``, ``nonfinite``
  (bool[], this step was skipped), ``nonfinite_steps``,
  and on the per-group route ``group_grad_norm`` f32[G], ``group_grad_cos`` f32[G, G]
  and ``conflict_frac``.

  With ``tag_affinity_period`` metrics also hold ``tag_affinity`` f32[G, G] and
  ``tag_due`` (bool[], whether it was measured at this step); ``learning_rate_fn``
  (step -> lr) gives its lookahead learning rate when ``tag_affinity_lr`` is 0. On the
  per-group route ``group_weights`` holds the weights the method applied, when it
  reports them (``mtl.aggregate``).

  ``group_gradients_fn`` computes the per-group route's gradients, with
  ``group_gradients``' arguments and results; another one (``jax.jacrev`` of the loss
  vector in tools/bench.py) lets a benchmark compare routes inside the same step.
  """
  transforms = tuple(transforms)
  if cfg.tag_affinity_period and not (cfg.task_grads and (
      cfg.tag_affinity_lr > 0 or learning_rate_fn is not None)):
    raise ValueError("TAG affinity needs the per-group route and a learning rate.")

  def step(state, batch):
    params = state["params"]
    base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    dkey, mkey = jax.random.split(base)
    metrics = {}
    counts = token_counts(cfg, batch)  # target tokens per task in the global batch
    group_counts = counts @ group_matrix(cfg)
    if cfg.inject_nonfinite_steps:
      batch = _inject_nonfinite(cfg, batch, state["step"] + 1)
    if cfg.task_grads:
      group_grads, sums = group_gradients_fn(model, cfg, params, batch, group_counts,
                                             dkey, param_shardings)
      present = group_counts > 0
      group_losses = safe_div(sums @ group_matrix(cfg), group_counts)
      grads, mtl_state, info = mtl.aggregate(transforms, state["mtl_state"],
                                             group_grads, params,
                                             task_losses=group_losses,
                                             task_present=present, key=mkey)
      metrics.update(group_grad_norm=info["grad_norm"], group_grad_cos=info["grad_cos"],
                     conflict_frac=info["conflict_frac"])
      if "weights" in info:
        metrics["group_weights"] = info["weights"]
      if cfg.tag_affinity_period:
        due = (state["step"] + 1) % cfg.tag_affinity_period == 0
        lr = (cfg.tag_affinity_lr if cfg.tag_affinity_lr > 0
              else learning_rate_fn(state["step"]))
        metrics["tag_affinity"] = _tag_affinity(model, cfg, params, batch, group_counts,
                                                group_grads, present, lr, due, dkey)
        metrics["tag_due"] = due
    else:
      grads, sums, w, mtl_state = one_gradient(model, cfg, transforms, params,
                                                state["mtl_state"], batch, group_counts,
                                                dkey, mkey)
      metrics["group_weights"] = w
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    # The update is checked too: a finite gradient can still overflow in the optimizer.
    ok = _all_finite(sums, grad_norm, updates)
    metrics.update(task_loss_sums=sums, task_tokens=counts, grad_norm=grad_norm,
                   nonfinite=jnp.logical_not(ok))
    new_state = dict(state, step=state["step"] + 1,
                     params=_keep_if(ok, new_params, params),
                     opt_state=_keep_if(ok, opt_state, state["opt_state"]),
                     mtl_state=_keep_if(ok, mtl_state, state["mtl_state"]))
    new_state["nonfinite_steps"] = state["nonfinite_steps"] + (1 - ok.astype(jnp.int32))
    metrics["nonfinite_steps"] = new_state["nonfinite_steps"]
    return new_state, metrics

  return step
