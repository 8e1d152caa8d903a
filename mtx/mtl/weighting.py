"""Weightings: scale the task axis by weights that never look at gradients.

Each factory returns a ``base.Weighting`` (an
``optax.GradientTransformationExtraArgs``): its ``weights`` computes ``w``
f32[k] from the state and the extra args alone, so the trainer can take one
gradient of ``sum_t w_t L_t`` instead of k gradients, and its ``update``
returns ``w[:, None, ...] * updates`` (the task axis is kept, f32[k, ...] ->
f32[k, ...]). Weights of absent tasks are 0 and their state is left as it was.
An aggregator must follow (the trainer appends ``sum_tasks()`` when none does).
"""

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from mtx.errors import UserError
from mtx.mtl import base


def _k_of(task_losses, task_present, num_tasks):
  """Checks the extra args against ``num_tasks``; returns presence bool[k]."""
  for name, x in (("task_losses", task_losses), ("task_present", task_present)):
    if x is not None and jnp.shape(x) != (num_tasks,):
      raise UserError(
        f"{name} has shape {jnp.shape(x)} but the weighting was "
        f"built for num_tasks={num_tasks}."
      )
  return base.presence(task_present, num_tasks)


def _masked_softmax(logits, present):
  """Softmax over present tasks; 0 for absent ones (and all 0 if none)."""
  shift = jnp.max(jnp.where(present, logits, -jnp.inf))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  e = jnp.where(present, jnp.exp(logits - shift), 0.0)
  return e / jnp.maximum(jnp.sum(e), 1e-30)


# ------------------------------------------------------------ static weights


def static_weights(weights: Sequence[float]) -> base.Weighting:
  """Fixed task weights: ``w_t`` given, 0 for absent tasks. Stateless.

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  Args:
    weights: k floats, one per task, in task-id order.
  """
  w_fixed = jnp.asarray(weights, jnp.float32)
  if w_fixed.ndim != 1:
    raise UserError(
      f"static_weights needs a flat list of k weights, got shape {w_fixed.shape}."
    )

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    del key
    p = _k_of(task_losses, task_present, w_fixed.shape[0])
    return jnp.where(p, w_fixed, 0.0), state

  return base.Weighting(base.init_empty, weights_fn)


# ----------------------------------------------------- uncertainty weighting


class UncertaintyState(NamedTuple):
  """``log_vars`` f32[k]: s_t = log sigma_t^2, initialized to 0."""

  log_vars: jax.Array


def uncertainty_weighting(num_tasks: int, lr: float = 1e-2) -> base.Weighting:
  """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, CVPR).

  With learnable ``s_t = log sigma_t^2`` (state), the paper's objective (eq. 7,
  the regression form ``1/(2 sigma^2) L + log sigma``) is::

      J(s) = sum_t 1/2 (exp(-s_t) L_t + s_t)

  so the model sees weights ``w_t = dJ/dL_t = 1/2 exp(-s_t)`` (the current s),
  and s takes one SGD step on J from this step's losses::

      dJ/ds_t = 1/2 (1 - exp(-s_t) L_t)
      s_t <- s_t - lr * 1/2 (1 - exp(-s_t) L_t)        (present tasks only)

  J is minimized at ``s_t = log L_t``, where every weighted loss is 1/2.

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  Args:
    num_tasks: k.
    lr: learning rate of s (the step is stable for lr < 4).

  Returns:
    A weighting with state ``UncertaintyState``. Needs ``task_losses``.
  """

  def init_fn(params):
    del params
    return UncertaintyState(log_vars=jnp.zeros((num_tasks,), jnp.float32))

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    del key
    p = _k_of(task_losses, task_present, num_tasks)
    losses = jnp.where(
      p, base.losses_of(task_losses, num_tasks, "uncertainty_weighting"), 0.0
    )
    s = state.log_vars
    w = 0.5 * jnp.exp(-s)
    grad_s = 0.5 * (1.0 - jnp.exp(-s) * losses)
    new_s = jnp.where(p, s - lr * grad_s, s)
    return jnp.where(p, w, 0.0), UncertaintyState(log_vars=new_s)

  return base.Weighting(init_fn, weights_fn)


# ---------------------------------------------------------------------- DWA


class DWAState(NamedTuple):
  """Loss history, all f32[k] except ``step`` and ``windows``.

  ``loss_sum``/``loss_count``: sum and number of present steps in the current
  window; ``last``/``before_last``: mean loss of the last two completed windows,
  L(t-1) and L(t-2); ``windows`` i32[k]: completed windows with data per task;
  ``step`` i32[]: steps taken.
  """

  loss_sum: jax.Array
  loss_count: jax.Array
  last: jax.Array
  before_last: jax.Array
  windows: jax.Array
  step: jax.Array


def dwa(num_tasks: int, temperature: float = 2.0, window: int = 1) -> base.Weighting:
  """Dynamic Weight Average (Liu, Johns & Davison 2019, CVPR, MTAN).

  ``w_t = K exp(r_t / T) / sum_i exp(r_i / T)``, ``r_t = L_t(t-1) / L_t(t-2)``,
  with K the number of present tasks and T the temperature. The paper's "t" is an
  epoch and ``L(t)`` the epoch's average loss; here it is a window of ``window``
  steps (1: every step). ``w_t = 1`` for a task until it has two completed
  windows (r = 1 then).

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  Args:
    num_tasks: k.
    temperature: T; larger is smoother.
    window: steps averaged into one L(t).

  Returns:
    A weighting with state ``DWAState``. Needs ``task_losses``.
  """
  if window < 1:
    raise UserError(f"dwa: window must be >= 1, not {window}.")

  def init_fn(params):
    del params
    z = jnp.zeros((num_tasks,), jnp.float32)
    return DWAState(
      loss_sum=z,
      loss_count=z,
      last=z + 1.0,
      before_last=z + 1.0,
      windows=jnp.zeros((num_tasks,), jnp.int32),
      step=jnp.zeros([], jnp.int32),
    )

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    del key
    p = _k_of(task_losses, task_present, num_tasks)
    losses = jnp.where(p, base.losses_of(task_losses, num_tasks, "dwa"), 0.0)
    ready = (state.windows >= 2) & (state.before_last > 0)
    ratio = jnp.where(ready, state.last / jnp.where(ready, state.before_last, 1.0), 1.0)
    n = jnp.sum(p.astype(jnp.float32))
    w = n * _masked_softmax(ratio / temperature, p)

    loss_sum = state.loss_sum + losses
    loss_count = state.loss_count + p.astype(jnp.float32)
    step = state.step + 1
    end = step % window == 0
    has = end & (loss_count > 0)
    mean = loss_sum / jnp.maximum(loss_count, 1.0)
    new_state = DWAState(
      loss_sum=jnp.where(end, 0.0, loss_sum),
      loss_count=jnp.where(end, 0.0, loss_count),
      last=jnp.where(has, mean, state.last),
      before_last=jnp.where(has, state.last, state.before_last),
      windows=state.windows + has.astype(jnp.int32),
      step=step,
    )
    return w, new_state

  return base.Weighting(init_fn, weights_fn)


# ---------------------------------------------------------------------- RLW


class RLWState(NamedTuple):
  """``count`` i32[]: steps taken (folds a fallback key when none is given)."""

  count: jax.Array


def rlw(num_tasks: int, seed: int = 0) -> base.Weighting:
  """Random Loss Weighting (Lin et al. 2022, TMLR, "Reasonable Effectiveness
  of Random Weighting").

  ``w = softmax(z)`` over present tasks, ``z ~ N(0, I_k)`` drawn from this step's
  ``key`` (or from ``seed`` and the step count). The weights sum to 1.

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  Returns:
    A weighting with state ``RLWState``.
  """

  def init_fn(params):
    del params
    return RLWState(count=jnp.zeros([], jnp.int32))

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    p = _k_of(task_losses, task_present, num_tasks)
    z = jax.random.normal(base.step_key(key, seed, state.count), (num_tasks,))
    return _masked_softmax(z, p), RLWState(count=state.count + 1)

  return base.Weighting(init_fn, weights_fn)


# --------------------------------------------------------------------- FAMO


class FAMOState(NamedTuple):
  """``logits`` f32[k] (xi, init 0); ``prev_losses`` f32[k]: each task's loss
  when last present; ``has_prev`` bool[k]; ``opt_state``: the logits' Adam."""

  logits: jax.Array
  prev_losses: jax.Array
  has_prev: jax.Array
  opt_state: Any


def famo(
  num_tasks: int,
  lr: float = 0.025,
  weight_decay: float = 0.01,
  min_losses: Optional[Sequence[float]] = None,
  eps: float = 1e-8,
) -> base.Weighting:
  """FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023, NeurIPS).

  O(1) in k: no per-task gradient. Logits xi (state), ``z = softmax(xi)``,
  ``l_t = L_t - min_t + eps``. The model follows the gradient of
  ``sum_t z_t log l_t / c`` with ``c = sum_t z_t / l_t``, i.e. weights::

      w_t = (z_t / l_t) / sum_i (z_i / l_i)               (sum to 1)

  The logits chase balanced log-loss decrease. With ``delta_t = log l_t(prev)
  - log l_t(now)``, the decrease since the previous step (the losses of two
  consecutive steps, on consecutive batches, so no extra forward pass), the
  logits take one Adam step (with L2 weight decay ``weight_decay``, the
  paper's gamma) on the gradient ``(dz/dxi)^T delta = z * (delta - <z, delta>)``:
  a single vector-Jacobian product of the softmax. Tasks that improved more
  lose weight. Order in a step: update xi from delta, then compute w from the
  new xi and this step's losses; store the losses for the next step.

  Absent tasks: left out of the softmax, weight 0, logits and stored loss
  untouched; delta counts only tasks present now and before.

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  Args:
    num_tasks: k.
    lr: Adam learning rate of the logits (the paper's beta).
    weight_decay: L2 coefficient on the logits (the paper's gamma).
    min_losses: lower bounds of the losses (default 0).
    eps: keeps log l finite.

  Returns:
    A weighting with state ``FAMOState``. Needs ``task_losses``.
  """
  opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
  floor = (
    jnp.zeros((num_tasks,), jnp.float32)
    if min_losses is None
    else (jnp.asarray(min_losses, jnp.float32))
  )

  def init_fn(params):
    del params
    xi = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(
      logits=xi,
      prev_losses=jnp.ones((num_tasks,), jnp.float32),
      has_prev=jnp.zeros((num_tasks,), bool),
      opt_state=opt.init(xi),
    )

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    del key
    p = _k_of(task_losses, task_present, num_tasks)
    losses = jnp.where(p, base.losses_of(task_losses, num_tasks, "famo"), 1.0)
    log_now = jnp.log(jnp.maximum(losses - floor, 0.0) + eps)
    log_prev = jnp.log(jnp.maximum(state.prev_losses - floor, 0.0) + eps)
    valid = p & state.has_prev
    delta = jnp.where(valid, log_prev - log_now, 0.0)

    z = _masked_softmax(state.logits, p)
    grad = z * (delta - jnp.sum(z * delta))
    step, opt_state = opt.update(grad, state.opt_state, state.logits)
    logits = jnp.where(p & jnp.any(valid), state.logits + step, state.logits)
    opt_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(jnp.any(valid), new, old), opt_state, state.opt_state
    )

    z = _masked_softmax(logits, p)
    inv = jnp.where(p, z / jnp.exp(log_now), 0.0)
    w = inv / jnp.maximum(jnp.sum(inv), 1e-30)
    new_state = FAMOState(
      logits=logits,
      prev_losses=jnp.where(p, losses, state.prev_losses),
      has_prev=state.has_prev | p,
      opt_state=opt_state,
    )
    return w, new_state

  return base.Weighting(init_fn, weights_fn)
