"""Packs examples into fixed-size rows and keeps each token's task id.

seqio's packing keeps only the rank-1 features it knows and a Mixture drops every
feature but its outputs, so a packed row can no longer say which task each token came
from. mtx packs itself and writes ``decoder_task_ids``, aligned with
``decoder_target_tokens``: the task id on every target token, -1 on padding.

Worked example: two tasks, ids 0 (copy) and 1 (reverse), inputs length 6, targets
length 5, one row. Examples arrive in the order the scheduler picks them:

    (task 0)  inputs [3, 4, 1]    targets [3, 4, 1]
    (task 1)  inputs [5, 6, 1]    targets [6, 1]

After ``UnitPacker(rows=1, inputs_length=6, targets_length=5)`` took both:

    encoder_input_tokens   [[3, 4, 1, 5, 6, 1]]
    encoder_segment_ids    [[1, 1, 1, 2, 2, 2]]
    encoder_positions      [[0, 1, 2, 0, 1, 2]]
    decoder_target_tokens  [[3, 4, 1, 6, 1]]
    decoder_input_tokens   [[0, 3, 4, 0, 6]]    (shifted right within each example)
    decoder_segment_ids    [[1, 1, 1, 2, 2]]
    decoder_positions      [[0, 1, 2, 0, 1]]
    decoder_loss_weights   [[1, 1, 1, 1, 1]]
    decoder_task_ids       [[0, 0, 0, 1, 1]]

so the loss of task 0 is the mean over the first three target tokens and the loss of
task 1 over the last two, from one row.

Placement is first-fit: an example goes to the first row with room for both its
inputs and its targets; the unit is full when an example fits in no row (that example
stays unconsumed and opens the next unit).
"""

from typing import Dict

import numpy as np

FEATURES = (
  "encoder_input_tokens",
  "encoder_segment_ids",
  "encoder_positions",
  "decoder_target_tokens",
  "decoder_input_tokens",
  "decoder_segment_ids",
  "decoder_positions",
  "decoder_loss_weights",
  "decoder_task_ids",
)


def empty_rows(
  rows: int, inputs_length: int, targets_length: int
) -> Dict[str, np.ndarray]:
  """All-padding arrays of every packed feature: int32 [rows, length]."""
  out = {}
  for name in FEATURES:
    length = inputs_length if name.startswith("encoder") else targets_length
    fill = -1 if name == "decoder_task_ids" else 0
    out[name] = np.full([rows, length], fill, np.int32)
  return out


class UnitPacker:
  """Fills ``rows`` rows of one unit with examples, first-fit, writing in place.

  Args:
    rows: rows in the unit.
    inputs_length, targets_length: row lengths of the encoder and decoder sides.
    out: optional dict of int32 [rows, length] arrays (from ``empty_rows``) to fill,
      e.g. views into a larger batch array, so no copy is needed afterwards.
  """

  def __init__(
    self,
    rows: int,
    inputs_length: int,
    targets_length: int,
    out: Dict[str, np.ndarray] | None = None,
  ):
    self.inputs_length = inputs_length
    self.targets_length = targets_length
    self.arrays = (
      out if out is not None else empty_rows(rows, inputs_length, targets_length)
    )
    self.used_inputs = np.zeros(rows, np.int64)
    self.used_targets = np.zeros(rows, np.int64)
    self.segments = np.zeros(rows, np.int64)
    self.num_examples = 0
    self.num_target_tokens = 0

  def try_add(self, task_id: int, inputs: np.ndarray, targets: np.ndarray) -> bool:
    """Places one example in the first row with room; False if no row has room."""
    n_in, n_tg = len(inputs), len(targets)
    fits = (self.used_inputs + n_in <= self.inputs_length) & (
      self.used_targets + n_tg <= self.targets_length
    )
    candidates = np.flatnonzero(fits)
    if candidates.size == 0:
      return False
    r = int(candidates[0])
    self.segments[r] += 1
    seg = self.segments[r]
    a = self.arrays
    i0, t0 = self.used_inputs[r], self.used_targets[r]
    a["encoder_input_tokens"][r, i0 : i0 + n_in] = inputs
    a["encoder_segment_ids"][r, i0 : i0 + n_in] = seg
    a["encoder_positions"][r, i0 : i0 + n_in] = np.arange(n_in)
    a["decoder_target_tokens"][r, t0 : t0 + n_tg] = targets
    # Shifted right within the example; 0 is T5's decoder start token.
    a["decoder_input_tokens"][r, t0 + 1 : t0 + n_tg] = targets[:-1]
    a["decoder_segment_ids"][r, t0 : t0 + n_tg] = seg
    a["decoder_positions"][r, t0 : t0 + n_tg] = np.arange(n_tg)
    a["decoder_loss_weights"][r, t0 : t0 + n_tg] = 1
    a["decoder_task_ids"][r, t0 : t0 + n_tg] = task_id
    self.used_inputs[r] += n_in
    self.used_targets[r] += n_tg
    self.num_examples += 1
    self.num_target_tokens += n_tg
    return True
