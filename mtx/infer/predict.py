"""Batched, sharded prediction and scoring of token-id lists: ``Predictor``.

    predictor = Predictor(model, mesh, rules, param_shardings, batch_size=32,
                          inputs_length=64, max_decode_length=32,
                          decode=DecodeOptions(method="beam"))
    predictor.predict(params, [[37, 8, 1], [5, 1]])       # -> [[12, 9], [4]]
    predictor.score(params, [[37, 8, 1]], [[12, 9, 1]])   # -> [-1.73]

Inputs are lists of token ids (tokenized, EOS included). Each batch is padded to the
fixed shape [batch_size, inputs_length] (rows of zeros fill the last batch; zeros fill
each row), so every batch runs the same compiled function: one compilation per
(batch_size, lengths, method). Each row's length goes along with it, so that a real
token 0 (Llama 3's and Qwen2's ``tokenizer.json`` vocabularies) is never taken for
padding; outputs end at EOS. The batch rows are sharded over the mesh's data axes and
the params stay as trained.
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mtx import parallel
from mtx.data import hf_tokenizer
from mtx.errors import UserError
from mtx.infer import decoding
from mtx.model import Llama

Array = jax.Array


def fit_length(ids: Sequence[int], length: int, eos_id: int) -> list:
  """``ids`` cut to ``length`` tokens, keeping a final EOS: [5, 6, 7, 1] -> [5, 6, 1]."""
  ids = [int(t) for t in ids]
  if len(ids) <= length:
    return ids
  if ids and ids[-1] == eos_id:
    return ids[: length - 1] + [eos_id]
  return ids[:length]


def strip_output(ids: Sequence[int], eos_id: int, pad_id: Optional[int] = 0) -> list:
  """Decoded ids up to (not including) the first EOS, or ``pad_id`` (the filler after
  EOS, which decoding never emits; None: id 0 is a token and only EOS ends the ids).

  >>> strip_output([5, 0, 1, 0], eos_id=1, pad_id=None), strip_output([5, 0, 1], 1)
  ([5, 0], [5])
  """
  out = []
  for t in ids:
    t = int(t)
    if t == eos_id or (pad_id is not None and t == pad_id):
      break
    out.append(t)
  return out


def decoding_pad_id(model, vocabulary) -> Optional[int]:
  """The id decoding never emits (``decoding.decode``'s ``pad_id``): None for a
  decoder-only model whose vocabulary's id 0 is a real token (a ``tokenizer.json``:
  Llama 3's and Qwen2's "!"), else 0 (T5's padding and decoder start; SentencePiece and
  byte vocabularies reserve it)."""
  if isinstance(model, Llama) and not hf_tokenizer.zero_is_padding(vocabulary):
    return None
  return 0


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int, length: int) -> np.ndarray:
  """int32 [num_rows, length]: the rows, zero-padded on the right and below."""
  out = np.zeros((num_rows, length), np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def row_lengths(rows: Sequence[Sequence[int]], num_rows: int) -> np.ndarray:
  """int32 [num_rows]: each row's length, 0 for the batch padding below them."""
  out = np.zeros((num_rows,), np.int32)
  out[: len(rows)] = [len(row) for row in rows]
  return out


def sequence_log_probs(
  model,
  params: Any,
  encoder_input_tokens: Array,
  targets: Array,
  vocab_size: int = 0,
  target_lengths: Optional[Array] = None,
) -> Array:
  """Teacher-forced sum of log p(target token) per row; float32 [B].

  ``targets`` int32 [B, L], each row's first ``target_lengths`` [B] ids scored (None:
  its nonzero ids, 0 being T5's padding); the decoder input is the targets shifted
  right behind the start token 0. The log-probabilities are over the ids decoding may
  emit (``decoding.allowed_tokens_mask``), so that the score of a decoded sequence is
  the score decoding reported.
  """
  if isinstance(model, Llama):
    raise UserError(
      "Score metrics (rank classification) are not available for decoder-only models "
      "yet; evaluate tasks with predict metrics, or a T5."
    )
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  logits = model.apply({"params": params}, encoder_input_tokens, decoder_inputs)
  logits = decoding.allowed_tokens_mask(logits.astype(jnp.float32), vocab_size)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if target_lengths is None:
    scored = targets != 0
  else:
    scored = jnp.arange(targets.shape[1])[None, :] < target_lengths[:, None]
  return jnp.sum(jnp.where(scored, token_lp, 0.0), axis=-1)


class Predictor:
  """Jitted decoding on a mesh (batch sharded over the data axes, params as trained),
  with batch and length padding.

  Args:
    model: an ``mtx.model.T5`` or a decoder-only ``mtx.model.Llama``.
    mesh: the device mesh; ``rules`` map the model's logical axis names onto it.
    param_shardings: the params' shardings (as ``mtx.runtime.params.load_trained``
      returns them).
    batch_size: rows per decoding batch; rounded up to a multiple of the mesh's
      data-parallel size.
    inputs_length: encoder length; longer inputs are cut (keeping their EOS).
    max_decode_length: the most tokens decoded (and the target length of ``score``).
    decode: how to decode (``mtx.infer.decoding.DecodeOptions``); sampling batch i
      uses ``fold_in(key(decode.seed), i)``.
    eos_id: the end-of-sequence token.
    vocab_size: when > 0, ids at or above it (the trainer's vocabulary padding) are
      never emitted and not counted by ``score``.
    start_id: a decoder-only model's token before each prompt
      (``mtx.data.decoder_only.start_id``, as in training); unused by T5.
    prefix_lm: a decoder-only model's prompt attends both ways (training's
      ``decoder_only.PrefixLM.bidirectional_inputs``); unused by T5.
    pad_id: the id never emitted, which also ends the outputs (``decoding_pad_id``):
      0 (T5's padding); None where id 0 is a real token (a decoder-only model with a
      ``tokenizer.json`` vocabulary): outputs then end at EOS only.
  """

  def __init__(
    self,
    model,
    mesh,
    rules,
    param_shardings,
    *,
    batch_size: int,
    inputs_length: int,
    max_decode_length: int,
    decode: decoding.DecodeOptions = decoding.DecodeOptions(),
    eos_id: int = 1,
    vocab_size: int = 0,
    start_id: int = 0,
    prefix_lm: bool = True,
    pad_id: Optional[int] = 0,
  ):
    decode.check(batch_size)
    dp = parallel.data_parallel_size(mesh)
    self.batch_size = max(1, math.ceil(batch_size / dp)) * dp
    self.inputs_length = int(inputs_length)
    self.max_decode_length = int(max_decode_length)
    self.method = decode.method
    self.eos_id = int(eos_id)
    self.pad_id = pad_id
    self._model = model
    self._mesh = mesh
    self._rules = list(rules)
    self._seed = int(decode.seed)
    self.num_return = int(decode.num_return)
    self._rows = parallel.batch_sharding(mesh, 2)
    self._scalars = parallel.batch_sharding(mesh, 1)
    n_best = self.num_return > 1  # [B, n, L] tokens and [B, n] scores
    decoded = (parallel.batch_sharding(mesh, 3), self._rows) if n_best else None
    options = dict(
      max_decode_length=self.max_decode_length,
      method=decode.method,
      num_beams=decode.num_beams,
      length_penalty=decode.length_penalty,
      temperature=decode.temperature,
      top_k=decode.top_k,
      eos_id=self.eos_id,
      vocab_size=vocab_size,
      num_return=self.num_return,
      start_id=start_id,
      prefix_lm=prefix_lm,
      pad_id=pad_id,
    )

    def decode_fn(params, tokens, lengths, key):
      return decoding.decode(
        model, params, tokens, key=key, input_lengths=lengths, **options
      )

    def score_fn(params, tokens, targets, target_lengths):
      return sequence_log_probs(
        model, params, tokens, targets, vocab_size, target_lengths
      )

    replicated = parallel.replicated(mesh)
    self._decode = jax.jit(
      decode_fn,
      in_shardings=(param_shardings, self._rows, self._scalars, replicated),
      out_shardings=decoded or (self._rows, self._scalars),
    )
    self._score = jax.jit(
      score_fn,
      in_shardings=(param_shardings, self._rows, self._rows, self._scalars),
      out_shardings=self._scalars,
    )

  # ---- host side -----------------------------------------------------------------------

  def _device_rows(self, rows: np.ndarray) -> Array:
    # Every process holds all rows: each device takes its slice of them.
    sharding = self._rows if rows.ndim == 2 else self._scalars
    return jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])

  def _batches(self, n: int):
    for start in range(0, n, self.batch_size):
      yield start, min(start + self.batch_size, n)

  def _to_host(self, x: Array) -> np.ndarray:
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  def predict_with_scores(
    self,
    params,
    inputs: Sequence[Sequence[int]],
    on_batch: Optional[Callable[[int], None]] = None,
  ) -> tuple[list, list]:
    """Decodes every input; returns (list of id lists without EOS, list of scores).

    With ``decode.num_return`` n > 1, each input's entry is a list of its n best
    (id lists and scores, best first). ``on_batch(n)`` is called after each batch
    with the number of inputs done.
    """
    outputs, scores = [], []
    base_key = jax.random.key(self._seed)
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
      for i, (start, end) in enumerate(self._batches(len(inputs))):
        rows = [fit_length(x, self.inputs_length, self.eos_id) for x in inputs[start:end]]
        tokens = self._device_rows(pad_rows(rows, self.batch_size, self.inputs_length))
        lengths = self._device_rows(row_lengths(rows, self.batch_size))
        key = jax.random.fold_in(base_key, i)
        out, score = self._decode(params, tokens, lengths, key)
        out, score = self._to_host(out), self._to_host(score)
        if self.num_return > 1:
          outputs += [
            [strip_output(r, self.eos_id, self.pad_id) for r in rows_n]
            for rows_n in out[: end - start]
          ]
          scores += [[float(s) for s in row] for row in score[: end - start]]
        else:
          outputs += [
            strip_output(row, self.eos_id, self.pad_id) for row in out[: end - start]
          ]
          scores += [float(s) for s in score[: end - start]]
        if on_batch is not None:
          on_batch(end)
    return outputs, scores

  def predict(self, params, inputs: Sequence[Sequence[int]]) -> list:
    """Decodes every input; a list of id lists, each up to (not including) EOS."""
    return self.predict_with_scores(params, inputs)[0]

  def score(
    self, params, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
  ) -> list:
    """Sum of log-probabilities of each target given its input (teacher-forced).

    Targets are cut to ``max_decode_length`` tokens (keeping a final EOS); each is
    scored over its own length (a target's id 0 too), the padding after it not.
    """
    if len(inputs) != len(targets):
      raise ValueError(f"score got {len(inputs)} inputs but {len(targets)} targets.")
    out = []
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
      for start, end in self._batches(len(inputs)):
        rows = [fit_length(x, self.inputs_length, self.eos_id) for x in inputs[start:end]]
        tgts = [
          fit_length(t, self.max_decode_length, self.eos_id) for t in targets[start:end]
        ]
        tokens = self._device_rows(pad_rows(rows, self.batch_size, self.inputs_length))
        tgt = self._device_rows(pad_rows(tgts, self.batch_size, self.max_decode_length))
        tgt_lengths = self._device_rows(row_lengths(tgts, self.batch_size))
        scores = self._to_host(self._score(params, tokens, tgt, tgt_lengths))
        out += [float(s) for s in scores[: end - start]]
    return out
