"""Autoregressive decoding with the T5 key/value cache: greedy, sampling, beam search.

Everything here is pure and runs inside ``jax.jit``. The model-independent loops take
a ``step_fn``::

    step_fn(tokens int32 [N], cache) -> (log_probs float32 [N, V], new cache)

that feeds one token per row (the previous output; 0, T5's start token, at the first
step) and returns the log-probabilities of the next one. ``decode`` builds that step
from ``mtx.model.T5`` and its cache; tests drive the loops with synthetic steps.

Outputs, for every method: tokens int32 [B, max_decode_length], the sequence up to and
including EOS and 0 after it (a row that never emits EOS fills the whole length), and a
float32 [B] score: the sum of the model's log-probabilities of the emitted tokens
(beam search: that sum divided by GNMT's length penalty ``((5 + len) / 6) ** alpha``,
``len`` counting EOS, as in T5X).

Example (B = 2, max_decode_length = 5, EOS = 1)::

    tokens = [[37, 12, 1, 0, 0],     # "37 12" then EOS
              [ 8,  8, 8, 8, 8]]     # no EOS within 5 tokens

A row's output ends at its first EOS (or runs the whole length): the 0s after EOS are
filler, and readers stop at EOS (``mtx.infer.predict.strip_output``), never at a 0. Id
0 is T5's padding and decoder start, which its model never emits (``pad_id=0``, the
default); where id 0 is a real token (a decoder-only model with a ``tokenizer.json``
vocabulary, e.g. Llama 3's and Qwen2's), ``pad_id=None`` lets decoding emit it, and the
prompts' lengths come with them (``input_lengths``) instead of being read off their
zeros.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtx.errors import UserError
from mtx.model import Llama, init_cache
from mtx.model import llama as llama_lib

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeOptions:
  """How to decode (``decode``'s options), for ``mtx infer`` and evaluation alike.

  Attributes:
    method: "greedy", "sample" or "beam".
    num_beams, length_penalty: beam search (T5's alpha in ((5 + len) / 6) ** alpha).
    temperature, top_k: sampling (top_k 0 = the whole vocabulary).
    seed: sampling seed.
  """

  method: str = "greedy"
  num_beams: int = 4
  length_penalty: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0
  num_return: int = 1

  def check(self, batch_size: int, prefix: Optional[str] = None) -> None:
    """Raises a one-sentence UserError for settings out of range.

    ``prefix`` names the user's settings (``INFER`` or ``EVAL``: the INFER_* / EVAL_*
    macros); None (library use, e.g. ``Predictor``) names the fields instead.
    """
    method = f"{prefix}_DECODE_METHOD" if prefix else "The decoding method"
    if self.method not in METHODS:
      raise UserError(
        f"{method} {self.method!r} is not one of {METHODS}; set it to one of them."
      )
    if self.num_beams < 1 or batch_size < 1 or self.top_k < 0 or self.temperature < 0:
      which = f"{prefix} decoding settings" if prefix else "Decoding options"
      raise UserError(
        f"{which} are out of range (num_beams {self.num_beams}, "
        f"batch_size {batch_size}, top_k {self.top_k}, temperature "
        f"{self.temperature}); use num_beams >= 1, batch_size >= 1, top_k >= 0 and "
        "temperature >= 0."
      )
    if self.num_return != 1 and not (
      self.method == "beam" and 1 <= self.num_return <= self.num_beams
    ):
      which = f"{prefix}_NUM_RETURN" if prefix else "num_return"
      raise UserError(
        f"{which} {self.num_return} asks for that many predictions per input, which "
        f"beam search gives, up to its num_beams ({self.num_beams}); set the decode "
        "method to 'beam' with enough beams, or return 1."
      )


# A finite "minus infinity": -inf would turn into NaN in (-inf) - (-inf) or 0 * -inf.
NEG_INF = -1.0e7


def length_penalty_factor(length: Array, alpha: float) -> Array:
  """GNMT's length penalty ``((5 + length) / 6) ** alpha`` (Wu et al., 2016), float32."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------
# Greedy decoding and sampling: one row per example, stop when every row has emitted EOS.


def _pick_token(
  log_probs: Array, key: Optional[Array], method: str, temperature: float, top_k: int
) -> Array:
  """The next token per row, int32 [N], from log-probabilities [N, V]."""
  if method == "greedy" or temperature == 0.0 or top_k == 1:
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  logits = log_probs / temperature
  if top_k > 0:
    # Keep the k largest; ties at the k-th value are kept too (harmless).
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, NEG_INF)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_loop(
  step_fn: StepFn,
  cache: Any,
  batch_size: int,
  *,
  max_decode_length: int,
  method: str = "greedy",
  temperature: float = 1.0,
  top_k: int = 0,
  key: Optional[Array] = None,
  eos_id: int = 1,
) -> tuple[Array, Array]:
  """Greedy decoding (``method='greedy'``) or ancestral sampling (``'sample'``).

  Sampling draws from ``softmax(log_probs / temperature)`` restricted to the ``top_k``
  most likely tokens (0: all); temperature 0 or top_k 1 is greedy. The returned score
  is the sum of the unscaled log-probabilities of the emitted tokens.

  Args:
    step_fn: see the module docstring.
    cache: the step's initial state (batch-first leaves, N = batch_size rows).
    batch_size: N.
    max_decode_length: L, the most tokens emitted per row.
    method: "greedy" or "sample".
    temperature, top_k: sampling options.
    key: PRNG key, required when sampling.
    eos_id: the end-of-sequence token.

  Returns:
    (tokens int32 [N, L] with 0 after EOS, scores float32 [N]).
  """
  sampling = method == "sample" and temperature != 0.0 and top_k != 1
  if sampling and key is None:
    raise ValueError("Sampling needs a PRNG key; pass key=jax.random.key(seed).")
  if key is None:
    key = jax.random.key(0)  # Unused by greedy; keeps the loop state uniform.

  def cond(state):
    i, _, _, done, _, _, _ = state
    return (i < max_decode_length) & ~jnp.all(done)

  def body(state):
    i, tokens, last, done, scores, cache, key = state
    log_probs, cache = step_fn(last, cache)
    key, sub = jax.random.split(key)
    token = _pick_token(
      log_probs,
      sub if sampling else None,
      "sample" if sampling else "greedy",
      temperature,
      top_k,
    )
    token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, token_log_prob)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    done = done | (token == eos_id)
    return i + 1, tokens, token, done, scores, cache, key

  state = (
    jnp.zeros((), jnp.int32),
    jnp.zeros((batch_size, max_decode_length), jnp.int32),
    jnp.zeros((batch_size,), jnp.int32),
    jnp.zeros((batch_size,), jnp.bool_),
    jnp.zeros((batch_size,), jnp.float32),
    cache,
    key,
  )
  _, tokens, _, _, scores, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, scores


# ---------------------------------------------------------------------------------------
# Beam search (T5X-style): K alive beams and K finished ones per example.


def _flatten_beams(x: Array) -> Array:
  """[B, K, ...] -> [B * K, ...]."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unflatten_beams(x: Array, num_beams: int) -> Array:
  """[B * K, ...] -> [B, K, ...]."""
  return x.reshape((x.shape[0] // num_beams, num_beams) + x.shape[1:])


def _gather_beams(x: Array, beam_indices: Array) -> Array:
  """x [B, K, ...] indexed by beam_indices int32 [B, M] -> [B, M, ...]."""
  return jax.vmap(lambda row, idx: row[idx])(x, beam_indices)


def gather_cache_beams(cache: Any, beam_indices: Array, num_beams: int) -> Any:
  """Reorders the beams of a flat [B * K, ...] cache: row (b, k) <- (b, idx[b, k]).

  Leaves without a batch axis (T5's scalar ``cache_index``) are shared by every row
  and left alone.
  """

  def gather(leaf):
    if jnp.ndim(leaf) == 0:
      return leaf
    return _flatten_beams(_gather_beams(_unflatten_beams(leaf, num_beams), beam_indices))

  return jax.tree.map(gather, cache)


def expand_beams(x: Any, num_beams: int) -> Any:
  """Repeats every batch-first leaf K times: [B, ...] -> [B * K, ...] (row b*K + k)."""

  def expand(leaf):
    if jnp.ndim(leaf) == 0:
      return leaf
    return jnp.repeat(leaf, num_beams, axis=0)

  return jax.tree.map(expand, x)


def beam_search(
  step_fn: StepFn,
  cache: Any,
  batch_size: int,
  *,
  max_decode_length: int,
  num_beams: int = 4,
  length_penalty: float = 0.6,
  eos_id: int = 1,
  num_return: int = 1,
) -> tuple[Array, Array]:
  """Beam search with GNMT's length penalty; returns the best beam of each example
  (or its ``num_return`` best).

  The layout is T5X's: each example keeps K *alive* beams (no EOS yet) and the K best
  *finished* ones (ended by EOS, scored ``log_prob / ((5 + len) / 6) ** alpha``, len
  counting EOS). A step extends every alive beam by every token and ranks the
  extensions by summed log-probability. Of the 2K best, those ending in EOS *and*
  ranked within the top K join the finished set (as in Hugging Face's beam scorer: a
  hypothesis ends only where a beam would have kept it), and the K best not ending in
  EOS stay alive (2K candidates hold at least K of them).

  An example is done when it has K finished beams and its best alive beam, if it ended
  at the current length, would not beat the worst of them (Hugging Face's default
  stopping rule); the search stops when every example is done or after
  ``max_decode_length`` steps. An example with no finished beam then returns its best
  alive beam, scored with the penalty at full length.

  With ``num_beams=1`` this is exactly greedy decoding, for any ``length_penalty``:
  the single candidate kept is the argmax, and once it is EOS the alive beam (the
  runner-up, with a lower log-probability at the same length) cannot beat it.

  Args:
    step_fn: see the module docstring; called on B * K rows (row b * K + k is beam k
      of example b).
    cache: the step's initial state for B * K rows (use ``expand_beams``); its
      batch-first leaves are reordered as beams are (``gather_cache_beams``).
    batch_size: B.
    max_decode_length: L.
    num_beams: K.
    length_penalty: alpha.
    eos_id: the end-of-sequence token.
    num_return: n <= K; above 1, the n best of each example: its finished beams
      best first, then (should fewer than n have finished) its best alive ones.

  Returns:
    (tokens int32 [B, L] with 0 after EOS, scores float32 [B], length-penalised);
    with ``num_return`` n > 1, tokens int32 [B, n, L] and scores float32 [B, n].
  """
  k, length = num_beams, max_decode_length

  def example_done(i, alive_lp, finished_scores, finished):
    """bool [B]: K finished beams, none of which the best alive beam can beat."""
    best_alive = alive_lp[:, 0] / length_penalty_factor(i, length_penalty)
    worst_finished = jnp.min(jnp.where(finished, finished_scores, NEG_INF), axis=1)
    no_alive = alive_lp[:, 0] <= NEG_INF / 2
    return (jnp.all(finished, axis=1) & (best_alive <= worst_finished)) | no_alive

  def cond(state):
    i, _, alive_lp, _, finished_scores, finished, _ = state
    return (i < length) & ~jnp.all(example_done(i, alive_lp, finished_scores, finished))

  def body(state):
    i, alive_seqs, alive_lp, finished_seqs, finished_scores, finished, cache = state
    # A done example keeps its finished beams while others go on, so that its
    # result does not depend on the rest of the batch.
    done = example_done(i, alive_lp, finished_scores, finished)
    old_finished = (finished_seqs, finished_scores, finished)
    last = jnp.where(
      i > 0,
      jax.lax.dynamic_index_in_dim(
        alive_seqs, jnp.maximum(i - 1, 0), axis=2, keepdims=False
      ),
      0,
    )
    log_probs, cache = step_fn(_flatten_beams(last), cache)
    vocab = log_probs.shape[-1]
    candidates = alive_lp[:, :, None] + _unflatten_beams(log_probs, k)  # [B, K, V]
    cand_lp, cand_idx = jax.lax.top_k(candidates.reshape(batch_size, k * vocab), 2 * k)
    cand_beam = (cand_idx // vocab).astype(jnp.int32)
    cand_token = (cand_idx % vocab).astype(jnp.int32)
    cand_seqs = _gather_beams(alive_seqs, cand_beam)  # [B, 2K, L]
    cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_token[:, :, None], (0, 0, i))
    cand_eos = cand_token == eos_id
    # Only an EOS ranked among the K best ends a hypothesis (see docstring).
    # (Candidates from the empty beams of the first step are never real.)
    cand_ends = cand_eos & (jnp.arange(2 * k) < k)[None, :] & (cand_lp > NEG_INF / 2)

    # Alive: the K best candidates that did not end.
    alive_key = jnp.where(cand_eos, NEG_INF, cand_lp)
    new_alive_lp, pick = jax.lax.top_k(alive_key, k)
    alive_seqs = _gather_beams(cand_seqs, pick)
    cache = gather_cache_beams(cache, _gather_beams(cand_beam, pick), k)

    # Finished: the K best of the old finished and the candidates that just ended.
    cand_scores = cand_lp / length_penalty_factor(i + 1, length_penalty)
    cand_scores = jnp.where(cand_ends, cand_scores, NEG_INF)
    all_seqs = jnp.concatenate([finished_seqs, cand_seqs], axis=1)
    all_scores = jnp.concatenate([finished_scores, cand_scores], axis=1)
    all_flags = jnp.concatenate([finished, cand_ends], axis=1)
    finished_scores, pick = jax.lax.top_k(all_scores, k)
    finished_seqs = _gather_beams(all_seqs, pick)
    finished = _gather_beams(all_flags, pick)
    finished_seqs, finished_scores, finished = jax.tree.map(
      lambda old, new: jnp.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
      old_finished,
      (finished_seqs, finished_scores, finished),
    )
    return (
      i + 1,
      alive_seqs,
      new_alive_lp,
      finished_seqs,
      finished_scores,
      finished,
      cache,
    )

  # Only beam 0 is alive at first, so that the K beams do not start as K copies.
  alive_lp = jnp.tile(
    jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch_size, 1)
  )
  state = (
    jnp.zeros((), jnp.int32),
    jnp.zeros((batch_size, k, length), jnp.int32),
    alive_lp,
    jnp.zeros((batch_size, k, length), jnp.int32),
    jnp.full((batch_size, k), NEG_INF, jnp.float32),
    jnp.zeros((batch_size, k), jnp.bool_),
    cache,
  )
  _, alive_seqs, alive_lp, finished_seqs, finished_scores, finished, _ = (
    jax.lax.while_loop(cond, body, state)
  )
  if num_return > 1:
    return _n_best(
      num_return,
      (finished_seqs, finished_scores, finished),
      (alive_seqs, alive_lp / length_penalty_factor(length, length_penalty)),
    )
  # top_k keeps the best first: beam 0 is the best of each set.
  has_finished = finished[:, 0]
  tokens = jnp.where(has_finished[:, None], finished_seqs[:, 0], alive_seqs[:, 0])
  scores = jnp.where(
    has_finished,
    finished_scores[:, 0],
    alive_lp[:, 0] / length_penalty_factor(length, length_penalty),
  )
  return tokens, scores


# ---------------------------------------------------------------------------------------
# The T5 model's step.


def allowed_tokens_mask(
  logits: Array, vocab_size: int = 0, pad_id: Optional[int] = 0
) -> Array:
  """Logits with the ids a model must never emit set to NEG_INF.

  ``pad_id`` is padding, never a token: T5's 0 (also its decoder's start token), which
  training never targets; None where every id is a token (a ``tokenizer.json``
  vocabulary's id 0, ``mtx.infer.predict.decoding_pad_id``). Ids at or above
  ``vocab_size`` (when > 0) are the padding the trainer adds to round the embedding up.

  >>> allowed_tokens_mask(jnp.zeros([1, 4]), vocab_size=3)[0].tolist()
  [-10000000.0, 0.0, 0.0, -10000000.0]
  >>> allowed_tokens_mask(jnp.zeros([1, 4]), vocab_size=3, pad_id=None)[0].tolist()
  [0.0, 0.0, 0.0, -10000000.0]
  """
  ids = jnp.arange(logits.shape[-1])
  allowed = ids != pad_id if pad_id is not None else jnp.ones_like(ids, jnp.bool_)
  if 0 < vocab_size < logits.shape[-1]:
    allowed = allowed & (ids < vocab_size)
  return jnp.where(allowed, logits, NEG_INF)


def constrain_cache(cache: Any) -> Any:
  """Lays a T5 cache out like the activations: rows over the data axes, heads over
  'tensor' (by the logical axis rules in effect; a no-op without them)."""

  def constrain(path, leaf):
    if jnp.ndim(leaf) == 0:
      return leaf
    names = ["activation_batch"] + [None] * (leaf.ndim - 1)
    if getattr(path[-1], "key", None) in ("cached_key", "cached_value"):
      names[-2] = "activation_heads"  # [..., L_max, H, D]
    return nn.with_logical_constraint(leaf, tuple(names))

  return jax.tree_util.tree_map_with_path(constrain, cache)


def model_step_fn(
  model, params: Any, encoded: Array, encoder_input_tokens: Array, vocab_size: int = 0
) -> StepFn:
  """A ``step_fn`` for ``mtx.model.T5``: one cached decoder step.

  Args:
    model: the T5 module.
    params: its parameters.
    encoded: [N, Le, E] encoder output (one row per decoded row).
    encoder_input_tokens: int32 [N, Le], for the cross-attention padding mask.
    vocab_size: when > 0, ids at or above it are never emitted; id 0, T5's padding
      and start token, never is (``allowed_tokens_mask``).
  """

  def step(tokens: Array, cache: Any) -> tuple[Array, Any]:
    logits, mutated = model.apply(
      {"params": params, "cache": cache},
      encoded,
      encoder_input_tokens,
      tokens[:, None],
      decode=True,
      method=model.decode,
      mutable=["cache"],
    )
    logits = allowed_tokens_mask(logits[:, 0, :].astype(jnp.float32), vocab_size)
    return jax.nn.log_softmax(logits, axis=-1), constrain_cache(mutated["cache"])

  return step


def nonzero_lengths(prompts: Array) -> Array:
  """int32 [N]: each row's length up to its last nonzero id, for rows padded with 0
  where 0 is no token (T5's padding): [[5, 6, 1], [7, 1, 0]] -> [3, 2]."""
  width = prompts.shape[1]
  return jnp.max(jnp.where(prompts != 0, jnp.arange(1, width + 1), 0), axis=1)


def left_align(
  prompts: Array, start_id: int, lengths: Array
) -> tuple[Array, Array, Array]:
  """Right-padded prompts as a decoder-only model's left-padded prefill chunk.

  Each row becomes ``[padding..., start_id, prompt...]``: its real tokens end in the
  last column, so that every row's next token comes from the same slot. A prompt is its
  first ``lengths`` ids, whatever they are (id 0 may be a real token, as in Llama 3's
  and Qwen2's vocabularies).

  Example (start_id 9, lengths [3, 2]): [[5, 6, 0], [0, 1, 0]] -> tokens
  [[9, 5, 6, 0], [0, 9, 0, 1]], real [[1, 1, 1, 1], [0, 1, 1, 1]], positions
  [[0, 1, 2, 3], [0, 0, 1, 2]].

  Args:
    prompts: int32 [N, Lp], right-padded.
    start_id: the token before each prompt (training's ``decoder_only.PrefixLM``).
    lengths: int32 [N], each prompt's length (``nonzero_lengths`` where 0 pads).

  Returns:
    (tokens int32 [N, Lp + 1], real bool [N, Lp + 1], positions int32 [N, Lp + 1]).
  """
  n, width = prompts.shape
  columns = jnp.arange(width + 1)
  lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, width) + 1  # with the start
  shift = (width + 1) - lengths  # padding columns on the left
  with_start = jnp.concatenate([jnp.full((n, 1), start_id, jnp.int32), prompts], axis=1)
  source = columns[None, :] - shift[:, None]
  real = source >= 0
  tokens = jnp.where(real, jnp.take_along_axis(with_start, jnp.maximum(source, 0), 1), 0)
  return tokens.astype(jnp.int32), real, jnp.maximum(source, 0).astype(jnp.int32)


def decoder_only_step_fn(
  model,
  params: Any,
  prompts: Array,
  max_decode_length: int,
  vocab_size: int = 0,
  start_id: int = 0,
  prefix_lm: bool = True,
  *,
  lengths: Array,
  pad_id: Optional[int] = 0,
) -> tuple[StepFn, Any]:
  """(``step_fn``, its initial state) for a decoder-only ``mtx.model.Llama``.

  The prompts (int32 [N, Lp], each the first ``lengths`` ids of its row) are prefilled
  in one call (left-aligned by ``left_align``; with ``prefix_lm`` they attend to each
  other both ways, as the inputs did in training). ``pad_id`` is never emitted
  (``allowed_tokens_mask``; None: every id below ``vocab_size`` may be).
  The prefill's last logits are the first step's output, so the state carries them:
  ``(model cache, pending log-probs [N, V], first)``, and the first ``step_fn`` call
  returns them instead of running the model (its token is ignored).
  """
  tokens, real, positions = left_align(prompts, start_id, lengths)
  cache = llama_lib.init_cache(
    model.config, tokens.shape[0], tokens.shape[1] + max_decode_length
  )
  logits, mutated = model.apply(
    {"params": params, "cache": cache},
    tokens,
    real.astype(jnp.int32),
    positions,
    real.astype(jnp.int32) if prefix_lm else None,
    decode=True,
    mutable=["cache"],
  )
  first = allowed_tokens_mask(logits[:, -1, :].astype(jnp.float32), vocab_size, pad_id)
  pending = jax.nn.log_softmax(first, axis=-1)

  def step(token: Array, state: Any) -> tuple[Array, Any]:
    model_cache, pending, is_first = state

    def run(_):
      logits, mutated = model.apply(
        {"params": params, "cache": model_cache},
        token[:, None],
        decode=True,
        mutable=["cache"],
      )
      logits = allowed_tokens_mask(
        logits[:, 0, :].astype(jnp.float32), vocab_size, pad_id
      )
      return jax.nn.log_softmax(logits, axis=-1), constrain_cache(mutated["cache"])

    log_probs, model_cache = jax.lax.cond(
      is_first, lambda _: (pending, model_cache), run, None
    )
    return log_probs, (model_cache, pending, jnp.zeros((), jnp.bool_))

  return step, (constrain_cache(mutated["cache"]), pending, jnp.ones((), jnp.bool_))


def _n_best(n: int, finished_set: tuple, alive_set: tuple) -> tuple[Array, Array]:
  """The n best of each example's K finished and K alive beams: finished ones first
  (best first), then alive ones (best first). Shapes: [B, K, L] and [B, K] each ->
  tokens [B, n, L], scores [B, n]."""
  finished_seqs, finished_scores, finished = finished_set
  alive_seqs, alive_scores = alive_set
  seqs = jnp.concatenate([finished_seqs, alive_seqs], axis=1)  # [B, 2K, L]
  scores = jnp.concatenate([finished_scores, alive_scores], axis=1)
  tier = jnp.concatenate([~finished, jnp.ones_like(finished)], axis=1).astype(jnp.int32)
  # lexsort: the last key is the primary one (finished first), then the best score.
  order = jax.vmap(lambda t, s: jnp.lexsort((-s, t)))(tier, scores)[:, :n]
  return _gather_beams(seqs, order), jnp.take_along_axis(scores, order, axis=1)


def decode(
  model,
  params: Any,
  encoder_input_tokens: Array,
  *,
  max_decode_length: int,
  method: str = "greedy",
  num_beams: int = 4,
  length_penalty: float = 0.6,
  temperature: float = 1.0,
  top_k: int = 0,
  key: Optional[Array] = None,
  eos_id: int = 1,
  vocab_size: int = 0,
  num_return: int = 1,
  start_id: int = 0,
  prefix_lm: bool = True,
  input_lengths: Optional[Array] = None,
  pad_id: Optional[int] = 0,
) -> tuple[Array, Array]:
  """Decodes a batch with ``model`` (an ``mtx.model.T5``, or a decoder-only
  ``mtx.model.Llama`` that continues the inputs) and its key/value cache.

  Args:
    model: the T5 or Llama module.
    params: its parameters.
    encoder_input_tokens: int32 [B, L_in]; 0 is padding (a Llama's prompts,
      right-padded: see ``input_lengths``).
    max_decode_length: L, the most tokens emitted per row.
    method: "greedy", "sample" (temperature / top-k) or "beam".
    num_beams: K for beam search.
    length_penalty: alpha of beam search's ``((5 + len) / 6) ** alpha``.
    temperature: sampling temperature (0: greedy).
    top_k: sample among the k most likely tokens (0: all, 1: greedy).
    key: PRNG key for sampling.
    eos_id: the end-of-sequence token.
    vocab_size: when > 0, ids at or above it are never emitted.
    num_return: beam search only: the n best per row (``beam_search``).
    start_id, prefix_lm: a Llama only: the token before each prompt and whether the
      prompt attends both ways (as ``mtx.data.decoder_only.PrefixLM`` trained it).
    input_lengths: a Llama only: int32 [B], each prompt's length; None = up to its
      last nonzero id (``nonzero_lengths``: only where 0 pads, i.e. ``pad_id`` 0).
    pad_id: the id never emitted (``allowed_tokens_mask``): 0, T5's padding and
      start token (always so for a T5); None where id 0 is a real token (a Llama with
      a ``tokenizer.json`` vocabulary; ``mtx.infer.predict.decoding_pad_id``).

  Returns:
    (tokens int32 [B, L] with 0 after EOS, scores float32 [B]: summed log-prob,
    length-penalised for beam search); [B, n, L] and [B, n] for ``num_return`` n > 1.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown decoding method {method!r}; use one of {METHODS}.")
  batch_size = encoder_input_tokens.shape[0]
  if isinstance(model, Llama):
    # The prompt is the inputs; the model continues it (decoder_only_step_fn).
    if input_lengths is None:
      if pad_id is None:
        raise ValueError(
          "Where id 0 is a token (pad_id None), pass the prompts' input_lengths."
        )
      input_lengths = nonzero_lengths(encoder_input_tokens)
    prompts, lengths = encoder_input_tokens, input_lengths
    if method == "beam":
      prompts, lengths = expand_beams((prompts, lengths), num_beams)
    step, cache = decoder_only_step_fn(
      model,
      params,
      prompts,
      max_decode_length,
      vocab_size,
      start_id,
      prefix_lm,
      lengths=lengths,
      pad_id=pad_id,
    )
  else:
    encoded = model.apply({"params": params}, encoder_input_tokens, method=model.encode)
    rows = batch_size * (num_beams if method == "beam" else 1)
    if method == "beam":
      encoded, encoder_input_tokens = expand_beams(
        (encoded, encoder_input_tokens), num_beams
      )
    cache = constrain_cache(init_cache(model.config, rows, max_decode_length))
    step = model_step_fn(model, params, encoded, encoder_input_tokens, vocab_size)
  if method == "beam":
    return beam_search(
      step,
      cache,
      batch_size,
      max_decode_length=max_decode_length,
      num_beams=num_beams,
      length_penalty=length_penalty,
      eos_id=eos_id,
      num_return=num_return,
    )
  return sample_loop(
    step,
    cache,
    batch_size,
    max_decode_length=max_decode_length,
    method=method,
    temperature=temperature,
    top_k=top_k,
    key=key,
    eos_id=eos_id,
  )
