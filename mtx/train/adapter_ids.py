"""Which per-task adapter each token uses: adapter ids from a packed batch's task ids.

A model with per-task adapters (``mtx.model.lora``, ``LoraConfig.per_task``) takes an
int32 adapter id per token, -1 for none (padding). The adapter of a task is its task
group's (one adapter per task, or per group with ``train.task_groups``), so a packed row
holding two tasks uses each task's adapter on its own tokens.

Worked example: ``mtx.data.packing``'s row (task 0 then task 1), groups (0, 1)::

    decoder_task_ids     [[0, 0, 0, 1, 1]]      encoder_segment_ids [[1, 1, 1, 2, 2, 2, 0]]
    decoder_segment_ids  [[1, 1, 1, 2, 2]]

    decoder_adapter_ids  [[0, 0, 0, 1, 1]]      group of each target token's task
    encoder_adapter_ids  [[0, 0, 0, 1, 1, 1, -1]]  the task of the example (segment)
                                                   each encoder token belongs to

A decoder-only batch (``mtx.data.decoder_only``) has task ids on every token of an
example, so it needs the decoder ids only. Pure functions of arrays (they run in the
jitted step).
"""

import jax.numpy as jnp


def decoder_adapter_ids(task_ids, group_of_task: tuple):
  """int32 [..., L]: the group of each token's task (``group_of_task[task]``), -1 where
  the task id is -1 (padding)."""
  groups = jnp.asarray(group_of_task, jnp.int32)
  task_ids = jnp.asarray(task_ids, jnp.int32)
  return jnp.where(task_ids >= 0, groups[jnp.maximum(task_ids, 0)], -1)


def encoder_adapter_ids(encoder_segment_ids, decoder_segment_ids, decoder_ids):
  """int32 [..., Le]: each encoder token's adapter, that of its example.

  Example s of a packed row has encoder segment s and decoder segment s, so its
  adapter is the one of its decoder tokens (``decoder_ids``, from
  ``decoder_adapter_ids``); encoder padding (segment 0), or a segment with no decoder
  token, gets -1.

  Args:
    encoder_segment_ids: int [..., Le], 1, 2, ... per example, 0 on padding.
    decoder_segment_ids: int [..., Ld], the same examples' segments on the decoder side.
    decoder_ids: int32 [..., Ld], the decoder tokens' adapter ids.
  """
  num_segments = encoder_segment_ids.shape[-1] + 1  # ids 0..Le
  segments = jnp.arange(num_segments, dtype=jnp.int32)
  dec_segments = jnp.asarray(decoder_segment_ids, jnp.int32)[..., :, None]
  hit = (dec_segments == segments) & (segments > 0)  # [..., Ld, S]
  table = jnp.max(jnp.where(hit, decoder_ids[..., :, None], -1), axis=-2)  # [..., S]
  return jnp.take_along_axis(table, encoder_segment_ids.astype(jnp.int32), axis=-1)


def batch_adapter_ids(batch: dict, group_of_task: tuple) -> dict:
  """The model's adapter-id inputs for a packed batch: ``decoder_adapter_ids`` and, for
  an encoder-decoder batch, ``encoder_adapter_ids`` (keyword names of the models'
  ``__call__``)."""
  dec = decoder_adapter_ids(batch["decoder_task_ids"], group_of_task)
  out = {"decoder_adapter_ids": dec}
  if "encoder_segment_ids" in batch:
    out["encoder_adapter_ids"] = encoder_adapter_ids(
      batch["encoder_segment_ids"], batch["decoder_segment_ids"], dec
    )
  return out
