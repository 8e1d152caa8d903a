"""TAG's inter-task affinity: how a step on one task's gradient moves another's loss.

Fifty et al. 2021 ("Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS) measure, at a training step, the relative change in task j's
loss after a lookahead SGD step on task i's gradient alone::

    Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta)

Z[i, j] > 0: a step for task i also lowers task j's loss (i helps j); < 0: it
raises it. Z is not symmetric. Averaged over training it ranks task groupings.
To first order ``Z[i, j] ~ lr <g_i, g_j> / L_j``, which is why it tracks the
gradient cosines, but it also sees curvature.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mtx.mtl import base

PyTree = Any


def tag_affinity(
  loss_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  group_grads: PyTree,
  lr,
  task_present=None,
) -> jax.Array:
  """The lookahead affinity matrix Z f32[k, k] (Fifty et al. 2021).

  ``Z[i, j] = 1 - L_j(params - lr g_i) / L_j(params)``. Costs k + 1 evaluations
  of ``loss_fn``, one after the other (``lax.map``), so memory holds one
  lookahead copy of the parameters at a time (besides ``group_grads``).

      loss_fn(params) -> f32[k]; group_grads {'w': f32[k, 3, 4]} -> Z f32[k, k]

  Args:
    loss_fn: ``params -> f32[k]``, each task's (or group's) loss on a fixed
      batch (the lookahead needs the same batch before and after).
    params: the current parameters theta.
    group_grads: per-task gradients, a tree shaped like params with a leading
      task axis k (g_i = the gradient of L_i).
    lr: the lookahead SGD learning rate, a float or f32[].
    task_present: bool[k] or None (all present). Rows and columns of absent
      tasks are 0, and so is a column whose loss L_j(params) is not positive.

  Returns:
    Z f32[k, k]: row i the lookahead task, column j the task whose loss moves.
  """
  k = base.num_tasks_of(group_grads)
  p = base.presence(task_present, k)
  lr = jnp.asarray(lr, jnp.float32)
  before = jnp.asarray(loss_fn(params), jnp.float32)

  def lookahead(g_i):
    moved = jax.tree_util.tree_map(
      lambda x, g: x - (lr * g.astype(jnp.float32)).astype(x.dtype), params, g_i
    )
    return jnp.asarray(loss_fn(moved), jnp.float32)

  after = jax.lax.map(lookahead, group_grads)  # [i, j]
  ok = p[:, None] & p[None, :] & (before[None, :] > 0)
  ratio = after / jnp.where(before > 0, before, 1.0)[None, :]
  return jnp.where(ok, 1.0 - ratio, 0.0)


def affinity_metrics(group_names: Sequence[str], z) -> dict:
  """``{'tag/<a>/<b>': Z[a, b]}`` for every ordered pair a != b, as floats.

  ``tag/<a>/<b>`` is the relative decrease of b's loss after a step on a's
  gradient (row a, column b of ``tag_affinity``).
  """
  out = {}
  for a, name_a in enumerate(group_names):
    for b, name_b in enumerate(group_names):
      if a != b:
        out[f"tag/{name_a}/{name_b}"] = float(z[a][b])
  return out
