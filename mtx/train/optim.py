"""Optimizers and learning-rate schedules, as plain optax objects.

Everything here takes plain arguments (gin binds them at the CLI edge) and returns an
``optax.Schedule`` or an ``optax.GradientTransformation``. Gradient accumulation is not
done here: the trainer accumulates micro-batch gradients before calling ``update``.

The default is T5's recipe: Adafactor (factored second moments, decay rate 0.8, no
momentum, update clipping at block RMS 1.0, steps scaled by the parameter's RMS) with
the inverse-square-root schedule ``lr(step) = 1 / sqrt(max(step, 10000))``.
"""

import logging
from typing import Union

import jax
import jax.numpy as jnp
import optax

from mtx.errors import UserError, close_names

log = logging.getLogger(__name__)

LearningRate = Union[float, optax.Schedule]

# A warmup that would not fit the run is cut to this fraction of it (MaxText's default
# ``warmup_steps_fraction``), so that a short smoke run just works.
SHORT_RUN_WARMUP_FRACTION = 0.1

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "rsqrt", "warmup_cosine")


def rsqrt_schedule(base_lr: float = 1.0, warmup_steps: int = 10000) -> optax.Schedule:
  """T5's inverse-square-root schedule, constant during warmup.

  ``lr(step) = base_lr / sqrt(max(step, warmup_steps))``: with the T5 defaults the rate
  is 0.01 for the first 10k steps, then decays as ``1 / sqrt(step)``.

  Args:
    base_lr: the numerator; T5 used 1.0.
    warmup_steps: steps at the constant rate ``base_lr / sqrt(warmup_steps)``; > 0.

  Returns:
    A schedule mapping an integer step (traced or not) to a float32 rate.
  """
  if warmup_steps <= 0:
    raise UserError(
      f"rsqrt_schedule got warmup_steps={warmup_steps}, which would divide by zero "
      "at step 0; set warmup_steps to a positive number (T5 used 10000)."
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base_lr * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))

  return schedule


def warmup_cosine_schedule(
  peak_lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1
) -> optax.Schedule:
  """Linear warmup from 0 to ``peak_lr``, then cosine decay to a fraction of it.

  The decay ends at ``total_steps`` (warmup included); the rate stays at its end value
  afterwards.

  Args:
    peak_lr: the rate reached at ``warmup_steps``.
    warmup_steps: length of the linear warmup; 0 starts at the peak.
    total_steps: the step at which the decay ends; > ``warmup_steps``.
    end_lr_ratio: the final rate as a fraction of ``peak_lr``.

  Returns:
    A schedule mapping an integer step (traced or not) to a float32 rate.
  """
  if warmup_steps < 0 or total_steps <= warmup_steps:
    raise UserError(
      f"warmup_cosine_schedule got warmup_steps={warmup_steps} and "
      f"total_steps={total_steps}; set 0 <= warmup_steps < total_steps."
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=peak_lr * end_lr_ratio,
  )


def learning_rate_fn(
  name: str = "rsqrt",
  *,
  base_lr: float = 1.0,
  warmup_steps: int = 10000,
  total_steps: int | None = None,
  end_lr_ratio: float = 0.1,
) -> optax.Schedule:
  """Returns the schedule called ``name``; the trainer also calls it to log the rate.

  Args:
    name: one of ``SCHEDULES``: "constant" (``base_lr`` throughout), "rsqrt"
      (``rsqrt_schedule(base_lr, warmup_steps)``), "warmup_cosine"
      (``warmup_cosine_schedule(base_lr, warmup_steps, total_steps, end_lr_ratio)``).
    base_lr: the constant rate, rsqrt's numerator, or the cosine schedule's peak.
    warmup_steps: see the schedules. For "warmup_cosine", a warmup as long as the run
      or longer (a smoke run of a config made for a long one) is cut to
      ``SHORT_RUN_WARMUP_FRACTION`` of ``total_steps``, with a one-line warning.
    total_steps: the end of the cosine decay; required by "warmup_cosine".
    end_lr_ratio: see ``warmup_cosine_schedule``.

  Returns:
    An ``optax.Schedule``.
  """
  if name == "constant":
    return as_schedule(base_lr)
  if name == "rsqrt":
    return rsqrt_schedule(base_lr, warmup_steps)
  if name == "warmup_cosine":
    if total_steps is None:
      raise UserError(
        "The 'warmup_cosine' learning-rate schedule needs total_steps; pass "
        "total_steps (usually TRAIN_STEPS) to learning_rate_fn."
      )
    if 0 < total_steps <= warmup_steps:
      short = int(total_steps * SHORT_RUN_WARMUP_FRACTION)
      log.warning(
        "warmup_steps=%d does not fit a run of %d steps; warming up for %d steps "
        "(%d%% of the run) instead.",
        warmup_steps,
        total_steps,
        short,
        round(100 * SHORT_RUN_WARMUP_FRACTION),
      )
      warmup_steps = short
    return warmup_cosine_schedule(base_lr, warmup_steps, total_steps, end_lr_ratio)
  raise UserError(
    f"Unknown learning-rate schedule {name!r}; use one of {', '.join(SCHEDULES)}"
    f"{close_names(name, SCHEDULES)}."
  )


def as_schedule(learning_rate: LearningRate) -> optax.Schedule:
  """Returns ``learning_rate`` as a schedule (a float becomes a constant schedule)."""
  if callable(learning_rate):
    return learning_rate
  rate = float(learning_rate)
  return lambda step: jnp.full((), rate, jnp.float32)


def _matrices_only(params):
  """Weight-decay mask: decay matrices and embeddings, not scales or biases."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
  name: str = "adafactor",
  learning_rate: LearningRate | None = None,
  *,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  clip_grad_norm: float = 0.0,
) -> optax.GradientTransformation:
  """Builds the optimizer that turns an aggregated gradient into a parameter update.

  Args:
    name: "adafactor" (T5's settings, see the module docstring) or "adamw".
    learning_rate: a float or an ``optax.Schedule``; ``None`` means T5's
      ``rsqrt_schedule()``.
    weight_decay: decoupled weight decay, applied to parameters of rank >= 2 only
      (layer-norm scales and biases are not decayed); 0 turns it off. AdamW multiplies
      it by the learning rate (``optax.adamw``); Adafactor adds ``weight_decay * param``
      to the already scaled update, as ``optax.adafactor`` does.
    b1: AdamW's first-moment decay (Adafactor, as in T5, keeps no momentum).
    b2: AdamW's second-moment decay (Adafactor uses T5's ``1 - step^-0.8``).
    eps: AdamW's denominator epsilon (Adafactor keeps its own 1e-30).
    clip_grad_norm: if > 0, gradients are first clipped to this global norm.

  Returns:
    An ``optax.GradientTransformation``; ``update(grads, state, params)`` needs params.
  """
  if learning_rate is None:
    learning_rate = rsqrt_schedule()
  if clip_grad_norm < 0:
    raise UserError(
      f"make_optimizer got clip_grad_norm={clip_grad_norm}; use a positive global "
      "norm, or 0 to turn clipping off."
    )
  if weight_decay < 0:
    raise UserError(
      f"make_optimizer got weight_decay={weight_decay}; use a non-negative rate."
    )
  if name == "adafactor":
    optimizer = optax.adafactor(
      learning_rate=learning_rate,
      min_dim_size_to_factor=128,
      decay_rate=0.8,
      multiply_by_parameter_scale=True,
      clipping_threshold=1.0,
      momentum=None,
      weight_decay_rate=weight_decay if weight_decay else None,
      weight_decay_mask=_matrices_only,
      factored=True,
    )
  elif name == "adamw":
    optimizer = optax.adamw(
      learning_rate=learning_rate,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      mask=_matrices_only,
    )
  else:
    raise UserError(
      f"Unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}"
      f"{close_names(name, OPTIMIZERS)}."
    )
  if clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(clip_grad_norm), optimizer)
  return optimizer


__all__ = [
  "OPTIMIZERS",
  "SCHEDULES",
  "as_schedule",
  "learning_rate_fn",
  "make_optimizer",
  "rsqrt_schedule",
  "warmup_cosine_schedule",
]
