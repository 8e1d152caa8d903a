"""Packed encoder-decoder rows into decoder-only (prefix-LM) rows, task ids kept.

A decoder-only model (``mtx.model.llama``) reads each example as one sequence,
``inputs + targets``, and learns only the targets: T5X's prefix-LM feature conversion
(seqio's ``PrefixLMFeatureConverter``). mtx packs text-to-text examples once
(``mtx.data.packing``: per-token task ids, flat or task-major layouts, exact resume) and
converts the packed rows here, so the decoder-only batch holds exactly the examples the
encoder-decoder one would, in the same order, whatever the layout: ``convert`` works on
the last axis of ``[rows, length]`` and ``[units, rows_per_unit, length]`` alike and
passes ``unit_task`` through. Each example of a row becomes one segment of a row of
length ``inputs_length + targets_length`` (it always fits: its inputs fitted the
encoder side and its targets the decoder side).

Worked example: the row of ``mtx.data.packing``'s docstring (tasks 0 and 1, inputs
length 6, targets length 5) becomes a row of length 11::

    encoder_input_tokens  [[3, 4, 1, 5, 6, 1]]      decoder_target_tokens [[3, 4, 1, 6, 1]]
    encoder_segment_ids   [[1, 1, 1, 2, 2, 2]]      decoder_segment_ids   [[1, 1, 1, 2, 2]]

      ->

    decoder_target_tokens    [[3, 4, 1, 3, 4, 1, 5, 6, 1, 6, 1]]
    decoder_input_tokens     [[0, 3, 4, 1, 3, 4, 0, 5, 6, 1, 6]]  shifted right per example
    decoder_segment_ids      [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]]
    decoder_positions        [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    decoder_loss_weights     [[0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]]  targets only
    decoder_causal_attention [[1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]]  start + inputs
    decoder_task_ids         [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]  every token of an example

(the start token, 0 here, is ``start_id``: 0 as in T5X, or a Hugging Face model's BOS).
``decoder_causal_attention`` is 1 on the positions whose *input* token is the start or
an inputs token, the positions that attend to each other bidirectionally in a prefix-LM
(T5X's definition, for the ``decoder_input_tokens`` the model reads); with
``bidirectional_inputs=False`` it is all 0 and the model is a plain causal LM that is
still trained on the targets only.
"""

import dataclasses
from typing import Dict, Optional

import numpy as np

from mtx.errors import UserError

FEATURES = (
  "decoder_target_tokens",
  "decoder_input_tokens",
  "decoder_segment_ids",
  "decoder_positions",
  "decoder_loss_weights",
  "decoder_causal_attention",
  "decoder_task_ids",
)
# What the decoder-only model reads (``mtx.model.llama.Llama.__call__``'s arguments).
MODEL_FEATURES = (
  "decoder_input_tokens",
  "decoder_segment_ids",
  "decoder_positions",
  "decoder_causal_attention",
)
_PACKED = (
  "encoder_input_tokens",
  "encoder_segment_ids",
  "encoder_positions",
  "decoder_target_tokens",
  "decoder_segment_ids",
  "decoder_positions",
  "decoder_loss_weights",
  "decoder_task_ids",
)


@dataclasses.dataclass(frozen=True)
class PrefixLM:
  """How text-to-text examples become decoder-only sequences.

  Gin binds these as ``decoder_only.PrefixLM.*`` (gin_configs/runs/train.gin); train,
  eval and infer read the same binding, so a model is evaluated and decoded the way it
  was trained.

  Attributes:
    start_id: the token before each example (T5X: 0; a Hugging Face Llama: its BOS);
      None = the vocabulary's (``for_vocabulary``), 0 where no vocabulary is at hand.
    bidirectional_inputs: the inputs attend to each other both ways (prefix-LM, T5X's
      ``decoder_causal_attention``); False: causal attention everywhere (training,
      evaluation and decoding alike).
    loss_on_targets_only: weigh only the targets' tokens in the loss (T5X's default);
      False: the inputs' too (plain language modelling of the whole sequence).
    chat_template: render each example as a user turn (inputs) and an assistant turn
      (targets) with the tokenizer's chat template, or a plain default
      (``mtx.data.chat_template``); the prompt at inference likewise.
  """

  start_id: Optional[int] = None
  bidirectional_inputs: bool = True
  loss_on_targets_only: bool = True
  chat_template: bool = False

  def for_vocabulary(self, vocabulary) -> "PrefixLM":
    """These options with ``start_id`` resolved: the vocabulary's (``start_id()``)
    unless set."""
    if self.start_id is not None:
      return self
    return dataclasses.replace(self, start_id=start_id(vocabulary))


def start_id(vocabulary) -> int:
  """The start token of a vocabulary's decoder-only sequences: its BOS, or 0 (T5X's)
  when it has none. Training (``PrefixLM.start_id``) and decoding use this one value."""
  try:
    bos = vocabulary.bos_id
  except NotImplementedError:  # seqio's base class has no BOS
    return 0
  return int(bos) if bos is not None and bos >= 0 else 0


def _examples(flat: Dict[str, np.ndarray]) -> tuple:
  """Per row and segment id (int64 [rows, segments], column 0 = padding): the inputs'
  length, the example's start in the decoder-only row, and its task (-1: none).

  Raises:
    UserError: an example has no target tokens.
  """
  enc_seg, dec_seg = flat["encoder_segment_ids"], flat["decoder_segment_ids"]
  rows = enc_seg.shape[0]
  segments = int(max(enc_seg.max(initial=0), dec_seg.max(initial=0))) + 1
  row = np.arange(rows)[:, None]

  def per_segment(seg):  # [rows, segments]: tokens per segment id
    out = np.zeros([rows, segments], np.int64)
    np.add.at(out, (np.broadcast_to(row, seg.shape), seg), 1)
    out[:, 0] = 0  # padding
    return out

  in_len, tg_len = per_segment(enc_seg), per_segment(dec_seg)
  if np.any((in_len > 0) & (tg_len == 0)):
    raise UserError(
      "An example has inputs but no target tokens, so a decoder-only model has nothing "
      "to learn from it; give every task a non-empty 'targets' feature."
    )
  # Start of each example in the new row: the lengths of the examples before it.
  offset = np.cumsum(in_len + tg_len, axis=1) - (in_len + tg_len)
  # Every example's task, from the task id on its target tokens.
  task_of = np.full([rows, segments], -1, np.int64)
  real = dec_seg > 0
  task_of[np.broadcast_to(row, dec_seg.shape)[real], dec_seg[real]] = flat[
    "decoder_task_ids"
  ][real]
  return in_len, offset, task_of


def convert(batch: Dict[str, np.ndarray], options: PrefixLM = PrefixLM()) -> dict:
  """Decoder-only features of packed encoder-decoder rows (module docstring).

  Args:
    batch: ``mtx.data.packing``'s features, int32 [..., Li] (encoder) and [..., Lt]
      (decoder), any leading axes; ``unit_task`` (task-major) passes through.
    options: the conversion.

  Returns:
    ``FEATURES``, int32 [..., Li + Lt], plus ``unit_task`` if the batch had it.

  Raises:
    UserError: an example has no target tokens (its task lacks ``targets``).
  """
  missing = [k for k in _PACKED if k not in batch]
  if missing:
    raise ValueError(f"convert needs the packed features {missing}; got {sorted(batch)}.")
  lead = batch["encoder_input_tokens"].shape[:-1]
  li, lt = (
    batch["encoder_input_tokens"].shape[-1],
    batch["decoder_target_tokens"].shape[-1],
  )
  flat = {k: np.asarray(batch[k]).reshape(-1, batch[k].shape[-1]) for k in _PACKED}
  rows, length = flat["encoder_input_tokens"].shape[0], li + lt
  in_len, offset, task_of = _examples(flat)
  row = np.arange(rows)[:, None]
  out = {k: np.zeros([rows, length], np.int32) for k in FEATURES}
  out["decoder_task_ids"][:] = -1
  in_pos = np.zeros([rows, length], np.int64)  # position within the example
  for side in ("inputs", "targets"):
    prefix = "encoder" if side == "inputs" else "decoder"
    seg, pos = flat[f"{prefix}_segment_ids"], flat[f"{prefix}_positions"]
    tokens = flat["encoder_input_tokens" if side == "inputs" else "decoder_target_tokens"]
    real = seg > 0
    r = np.broadcast_to(row, seg.shape)[real]
    s = seg[real]
    within = pos[real] + (in_len[r, s] if side == "targets" else 0)
    where = offset[r, s] + within
    out["decoder_target_tokens"][r, where] = tokens[real]
    out["decoder_segment_ids"][r, where] = s
    out["decoder_positions"][r, where] = within
    out["decoder_task_ids"][r, where] = task_of[r, s]
    in_pos[r, where] = within
    if side == "targets":
      out["decoder_loss_weights"][r, where] = flat["decoder_loss_weights"][real]
    elif not options.loss_on_targets_only:
      out["decoder_loss_weights"][r, where] = 1

  real = out["decoder_segment_ids"] > 0
  shifted = np.concatenate(
    [np.zeros([rows, 1], np.int32), out["decoder_target_tokens"][:, :-1]], axis=1
  )
  starts = real & (in_pos == 0)
  out["decoder_input_tokens"] = np.where(
    starts, options.start_id or 0, np.where(real, shifted, 0)
  ).astype(np.int32)
  if options.bidirectional_inputs:
    example_in_len = in_len[row, out["decoder_segment_ids"]]
    out["decoder_causal_attention"] = (real & (in_pos <= example_in_len)).astype(np.int32)
  result = {k: v.reshape(lead + (length,)) for k, v in out.items()}
  if "unit_task" in batch:
    result["unit_task"] = batch["unit_task"]
  return result


def from_unpacked(arrays: Dict[str, np.ndarray], options: PrefixLM = PrefixLM()) -> dict:
  """``convert`` of unpacked rows (one example per row, no segment ids, as evaluation
  reads them: ``mtx.eval.evaluator.UnpackedFeatureConverter``).

  An example's inputs are where ``encoder_input_mask`` is 1 and its targets where
  ``decoder_loss_weights`` is: never read off the ids, since id 0 may be a real token
  (Llama 3's and Qwen2's ``tokenizer.json``). Its task id is 0 (evaluation goes task
  by task).

  Args:
    arrays: int32 ``encoder_input_tokens`` and ``encoder_input_mask`` [N, Li],
      ``decoder_target_tokens`` and ``decoder_loss_weights`` [N, Lt].

  Returns:
    ``FEATURES``, int32 [N, Li + Lt].
  """
  inputs = np.asarray(arrays["encoder_input_tokens"])
  enc_real = np.asarray(arrays["encoder_input_mask"]) > 0
  dec_real = np.asarray(arrays["decoder_loss_weights"]) > 0
  packed = {
    "encoder_input_tokens": np.where(enc_real, inputs, 0),
    "encoder_segment_ids": enc_real.astype(np.int32),
    "encoder_positions": np.where(enc_real, np.arange(inputs.shape[1]), 0),
    "decoder_target_tokens": np.where(dec_real, arrays["decoder_target_tokens"], 0),
    "decoder_segment_ids": dec_real.astype(np.int32),
    "decoder_positions": np.where(dec_real, np.arange(dec_real.shape[1]), 0),
    "decoder_loss_weights": dec_real.astype(np.int32),
    "decoder_task_ids": np.where(dec_real, 0, -1),
  }
  return convert({k: v.astype(np.int32) for k, v in packed.items()}, options)
