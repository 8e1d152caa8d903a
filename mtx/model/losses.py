"""Token cross-entropy and its per-task sums (pure, jit-friendly)."""

import jax
import jax.numpy as jnp


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
  if z_loss > 0:
    loss = loss + z_loss * jnp.square(log_z)
  return loss


def task_sums(
  token_loss: jax.Array, task_ids: jax.Array, weights: jax.Array, num_tasks: int
) -> tuple:
  """Sums of loss and of weight per task.

  Args:
    token_loss: f32[..., L]; task_ids: int[..., L] (-1 on padding); weights: [..., L].
  Returns:
    (loss_sums f32[k], token_counts f32[k]).
  """
  onehot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32)  # -1 -> all zeros
  w = weights.astype(jnp.float32)[..., None] * onehot
  axes = tuple(range(token_loss.ndim))
  return (jnp.sum(w * token_loss[..., None], axis=axes), jnp.sum(w, axis=axes))
