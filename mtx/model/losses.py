"""Token cross-entropy and its per-task sums (pure, jit-friendly)."""

import jax
import jax.numpy as jnp


def token_losses(
  logits: jax.Array,
  targets: jax.Array,
  *,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
) -> dict:
  """The training loss of every token and its parts, f32[..., L] each.

  From logits f32[..., L, V] and int targets [..., L]:

  - ``loss``: what training minimizes, ``cross_entropy`` with these options;
  - ``cross_ent``: the plain cross-entropy ``-log p(target)`` (no z-loss, no label
    smoothing: what evaluation reports as a task's loss);
  - ``z_loss``: the z-loss term ``z_loss * log(Z)^2`` alone;
  - ``correct``: 1.0 where the most likely token is the target (token accuracy).

  One pass over the logits serves all four (XLA shares the log-sum-exp).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    loss = -(on - off) * target_lp - off * log_probs.sum(-1)
    normaliser = -(on * jnp.log(on) + (vocab - 1) * off * jnp.log(off + 1e-20))
    loss = loss - normaliser
  else:
    loss = -target_lp
  z_term = z_loss * jnp.square(log_z) if z_loss > 0 else jnp.zeros_like(log_z)
  return {
    "loss": loss + z_term,
    "cross_ent": -target_lp,
    "z_loss": z_term,
    "correct": (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32),
  }


def cross_entropy(
  logits: jax.Array,
  targets: jax.Array,
  *,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-token loss, f32[..., L], from logits f32[..., L, V] and int targets [..., L].

  With label smoothing s the target distribution puts 1 - s on the target and
  s / (V - 1) elsewhere, minus its own entropy so a perfect model scores 0 (as in T5X).
  The z-loss ``z_loss * log(Z)^2`` keeps the softmax normaliser near 1 (PaLM).
  """
  return token_losses(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)[
    "loss"
  ]


def task_sums(
  token_loss, task_ids: jax.Array, weights: jax.Array, num_tasks: int
) -> tuple:
  """Sums of loss and of weight per task.

  Args:
    token_loss: f32[..., L], or a dict of them (``token_losses``); task_ids: int[..., L]
      (-1 on padding); weights: [..., L].
  Returns:
    (loss_sums f32[k] (a dict of them for a dict), token_counts f32[k]).
  """
  onehot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32)  # -1 -> all zeros
  w = weights.astype(jnp.float32)[..., None] * onehot
  axes = tuple(range(task_ids.ndim))
  return (
    jax.tree.map(lambda x: jnp.sum(w * x[..., None], axis=axes), token_loss),
    jnp.sum(w, axis=axes),
  )
