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
"""

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtx import mtl, parallel
from mtx.train import losses

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
  """
  num_tasks: int
  group_of_task: tuple
  task_grads: bool = False
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  dropout: bool = False
  rules: tuple = parallel.DEFAULT_RULES

  @property
  def num_groups(self) -> int:
    return max(self.group_of_task) + 1


def _sums(model, cfg: StepConfig, params, batch, key):
  """(loss sums f32[k], token counts f32[k]) of a chunk of rows [..., rows, L]."""
  logits = model.apply({"params": params}, **{k: batch[k] for k in MODEL_KEYS},
                       enable_dropout=cfg.dropout, rngs={"dropout": key})
  tok = losses.cross_entropy(logits, batch["decoder_target_tokens"], z_loss=cfg.z_loss,
                             label_smoothing=cfg.label_smoothing)
  return losses.task_sums(tok, batch["decoder_task_ids"], batch["decoder_loss_weights"],
                          cfg.num_tasks)


def _microbatches(batch: dict, m: int) -> dict:
  """[N, ...] -> [m, N/m, ...] taking rows b with b % m == i, so no row changes device."""
  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _group_matrix(cfg: StepConfig) -> jax.Array:
  return jax.nn.one_hot(jnp.asarray(cfg.group_of_task), cfg.num_groups, dtype=jnp.float32)


def _safe_div(a, b):
  return jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)


def _token_counts(cfg: StepConfig, batch) -> jax.Array:
  """Target tokens per task in the whole (global) batch, f32[k]; no model needed."""
  onehot = jax.nn.one_hot(batch["decoder_task_ids"], cfg.num_tasks, dtype=jnp.float32)
  w = batch["decoder_loss_weights"].astype(jnp.float32)[..., None] * onehot
  return jnp.sum(w, axis=tuple(range(w.ndim - 1)))


def _one_gradient(model, cfg, transforms, params, mtl_state, batch, group_counts, dkey,
                  mkey):
  """Weighted-sum route: returns (grads like params, task sums, w[G], new mtl state)."""
  gm = _group_matrix(cfg)
  m = cfg.grad_accum_steps

  def weights_for(group_losses):
    return mtl.combined_weights(transforms, mtl_state, task_losses=group_losses,
                                task_present=group_counts > 0, key=mkey)

  if m == 1:
    def group_losses(p):
      sums, _ = _sums(model, cfg, p, batch, dkey)
      return _safe_div(sums @ gm, group_counts), sums
    lg, vjp_fn, sums = jax.vjp(group_losses, params, has_aux=True)
    w, new_state = weights_for(jax.lax.stop_gradient(lg))
    (grads,) = vjp_fn(w.astype(lg.dtype))
    return grads, sums, w, new_state

  micro = _microbatches(batch, m)
  keys = jax.random.split(dkey, m)

  def fwd(carry, xs):
    mb, key = xs
    sums, _ = _sums(model, cfg, params, mb, key)
    return carry + sums, None
  sums, _ = jax.lax.scan(fwd, jnp.zeros([cfg.num_tasks]), (micro, keys))
  w, new_state = weights_for(_safe_div(sums @ gm, group_counts))
  scale = _safe_div(w, group_counts)  # d/dp sum_g w_g S_g / N_g

  def bwd(acc, xs):
    mb, key = xs
    g = jax.grad(lambda p: _sums(model, cfg, p, mb, key)[0] @ gm @ scale)(params)
    return jax.tree.map(jnp.add, acc, g), None
  grads, _ = jax.lax.scan(bwd, jax.tree.map(jnp.zeros_like, params), (micro, keys))
  return grads, sums, w, new_state


def _group_gradients(model, cfg, params, batch, group_counts, dkey, param_shardings):
  """Task-major route: returns (per-group grads [G, *param], task sums f32[k])."""
  unit_task = batch["unit_task"]
  data = {k: v for k, v in batch.items() if k != "unit_task"}
  unit_scale = _safe_div(1.0, group_counts)[unit_task]  # [U]
  num_units = unit_task.shape[0]
  unit_keys = jax.random.split(dkey, num_units)
  m = cfg.grad_accum_steps

  def unit_objective(p, unit, scale, key):
    sums, _ = _sums(model, cfg, p, unit, key)
    return scale * jnp.sum(sums), sums

  per_unit = jax.vmap(jax.grad(unit_objective, has_aux=True), in_axes=(None, 0, 0, 0),
                      spmd_axis_name=parallel.BATCH_AXES)

  def chunk(p, units, scales, keys, tasks):
    with nn.logical_axis_rules(parallel.rules_without_batch(cfg.rules)):
      grads, sums = per_unit(p, units, scales, keys)
    grads = jax.tree.map(
        lambda g: jax.ops.segment_sum(g, tasks, num_segments=cfg.num_groups), grads)
    return grads, sums.sum(0)

  def constrain(grads):
    return jax.tree.map(
        lambda g, s: jax.lax.with_sharding_constraint(
            g, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))),
        grads, param_shardings)

  if m == 1:
    grads, sums = chunk(params, data, unit_scale, unit_keys, unit_task)
    return constrain(grads), sums

  xs = _microbatches({"d": data, "s": unit_scale, "k": unit_keys, "t": unit_task}, m)

  def body(carry, x):
    acc, acc_sums = carry
    g, s = chunk(params, x["d"], x["s"], x["k"], x["t"])
    return (jax.tree.map(jnp.add, acc, constrain(g)), acc_sums + s), None
  zeros = constrain(jax.tree.map(
      lambda p: jnp.zeros((cfg.num_groups,) + p.shape, jnp.float32), params))
  (grads, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros([cfg.num_tasks])), xs)
  return grads, sums


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    transforms: Sequence, cfg: StepConfig,
                    param_shardings: Any) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``state`` is ``{"step", "params", "opt_state", "mtl_state", "rng"}``; metrics hold
  ``task_loss_sums``/``task_tokens`` f32[k], ``group_weights`` f32[G] (one-gradient
  route), ``grad_norm``, and on the per-group route ``group_grad_norm`` f32[G],
  ``group_grad_cos`` f32[G, G] and ``conflict_frac``.
  """
  transforms = tuple(transforms)
  mtl_chain = optax.chain(*transforms) if cfg.task_grads else None

  def step(state, batch):
    params = state["params"]
    base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    dkey, mkey = jax.random.split(base)
    metrics = {}
    counts = _token_counts(cfg, batch)  # target tokens per task in the global batch
    group_counts = counts @ _group_matrix(cfg)
    if cfg.task_grads:
      group_grads, sums = _group_gradients(model, cfg, params, batch, group_counts, dkey,
                                           param_shardings)
      present = group_counts > 0
      group_losses = _safe_div(sums @ _group_matrix(cfg), group_counts)
      grads, mtl_state = mtl_chain.update(group_grads, state["mtl_state"], params,
                                          task_losses=group_losses, task_present=present,
                                          key=mkey)
      diag = mtl.diagnostics(group_grads, present)
      metrics.update(group_grad_norm=diag["grad_norm"], group_grad_cos=diag["grad_cos"],
                     conflict_frac=diag["conflict_frac"])
    else:
      grads, sums, w, mtl_state = _one_gradient(model, cfg, transforms, params,
                                                state["mtl_state"], batch, group_counts,
                                                dkey, mkey)
      metrics["group_weights"] = w
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics.update(task_loss_sums=sums, task_tokens=counts,
                   grad_norm=optax.global_norm(grads))
    new_state = dict(state, step=state["step"] + 1, params=new_params,
                     opt_state=opt_state, mtl_state=mtl_state)
    return new_state, metrics

  return step
