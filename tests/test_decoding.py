"""Tests of mtx.infer.decoding and mtx.infer.predict: greedy, sampling, beam search."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zero_token

from mtx import parallel
from mtx.infer import decoding
from mtx.infer.decoding import DecodeOptions
from mtx.infer.predict import (
  Predictor,
  decoding_pad_id,
  fit_length,
  sequence_log_probs,
  strip_output,
)
from mtx.model import T5, Llama, T5Config
from mtx.runtime import params as params_lib

TINY = T5Config(
  vocab_size=64,
  emb_dim=16,
  num_heads=2,
  head_dim=8,
  mlp_dim=32,
  num_encoder_layers=1,
  num_decoder_layers=2,
)
EOS = 1


@functools.cache
def _params():
  model = T5(TINY)
  enc = jnp.ones((1, 4), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(1), enc, enc)
  params = nn.unbox(variables["params"])
  # Make EOS likelier so that, for _inputs(seed=1), some rows end early and others
  # run to the full length.
  kernel = params["decoder"]["logits_dense"]["kernel"]
  params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS].multiply(3.0)
  return params


def _inputs(batch=6, length=7, seed=1):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, TINY.vocab_size, (batch, length))
  enc[0, length - 3 :] = 0  # Padding in row 0.
  return jnp.asarray(enc, jnp.int32)


@functools.partial(
  jax.jit,
  static_argnames=(
    "method",
    "max_decode_length",
    "num_beams",
    "length_penalty",
    "temperature",
    "top_k",
  ),
)
def _decode(params, tokens, key=None, **kwargs):
  return decoding.decode(T5(TINY), params, tokens, key=key, eos_id=EOS, **kwargs)


@jax.jit
def _teacher_forced_logits(params, enc, targets):
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return T5(TINY).apply({"params": params}, enc, decoder_inputs)


def _emitted(tokens):
  """bool [B, L]: positions up to and including the first EOS."""
  return np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0


def test_greedy_with_cache_equals_teacher_forced_argmax():
  params, enc = _params(), _inputs()
  length = 6
  tokens, scores = _decode(params, enc, method="greedy", max_decode_length=length)
  tokens = np.asarray(tokens)
  assert tokens.shape == (6, length) and tokens.dtype == np.int32
  emitted = _emitted(tokens)
  assert 0 < np.sum(~emitted) and np.all(tokens[~emitted] == 0)  # 0 after EOS.
  assert not np.all(np.any(tokens == EOS, axis=1))  # Some rows run to the end.
  # Recomputed without a cache (causal attention: position t sees only the tokens
  # before it), the argmax at every position is the decoded token. Id 0 (padding) is
  # never emitted.
  logits = np.asarray(_teacher_forced_logits(params, enc, jnp.asarray(tokens)))
  argmax = np.argmax(logits[..., 1:], -1) + 1
  np.testing.assert_array_equal(argmax[emitted], tokens[emitted])
  expected = jax.jit(functools.partial(sequence_log_probs, T5(TINY)))(
    params, enc, jnp.asarray(tokens)
  )
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_of_one_equals_greedy(alpha):
  params, enc = _params(), _inputs()
  greedy = _decode(params, enc, method="greedy", max_decode_length=6)
  beam = _decode(
    params, enc, method="beam", num_beams=1, length_penalty=alpha, max_decode_length=6
  )
  # Rows that end early and rows that do not (a done row must not change while
  # the others go on).
  np.testing.assert_array_equal(beam[0], greedy[0])
  lengths = np.where(np.any(greedy[0] == EOS, 1), np.argmax(greedy[0] == EOS, 1) + 1, 6)
  np.testing.assert_allclose(beam[1], greedy[1] / ((5 + lengths) / 6) ** alpha, rtol=1e-6)


# A synthetic step over tokens {0, EOS=1, A=2, B=3}: the first token is A (0.6) or B
# (0.4); after A everything is a coin toss (EOS 0.34), after B EOS is almost certain.
# Greedy takes A then EOS (p = 0.204); the better sequence is B, EOS (p = 0.396).
A, B = 2, 3
_FIRST = np.log([1e-6, 1e-6, 0.6, 0.4])
_AFTER = {A: np.log([1e-6, 0.34, 0.33, 0.33]), B: np.log([1e-6, 0.99, 0.005, 0.005])}


def _synthetic_step(tokens, cache):
  """Reads the first token from the cache (so beams must carry their cache rows)."""
  index, first = cache["index"], cache["first"]
  first = jnp.where(index == 1, tokens, first)
  later = jnp.where((first == A)[:, None], _AFTER[A], _AFTER[B])
  log_probs = jnp.where(index == 0, jnp.broadcast_to(_FIRST, later.shape), later)
  log_probs = jax.nn.log_softmax(log_probs.astype(jnp.float32))
  return log_probs, {"index": index + 1, "first": first}


def _synthetic_cache(rows):
  return {"index": jnp.zeros((), jnp.int32), "first": jnp.zeros((rows,), jnp.int32)}


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_finds_a_better_sequence_than_myopic_greedy(alpha):
  batch, length = 2, 4
  greedy_tokens, greedy_scores = jax.jit(
    functools.partial(
      decoding.sample_loop,
      _synthetic_step,
      _synthetic_cache(batch),
      batch,
      max_decode_length=length,
      eos_id=EOS,
    )
  )()
  np.testing.assert_array_equal(greedy_tokens, [[A, EOS, 0, 0]] * batch)
  np.testing.assert_allclose(greedy_scores, np.log(0.6 * 0.34), rtol=1e-5)

  k = 2
  beam_tokens, beam_scores = jax.jit(
    functools.partial(
      decoding.beam_search,
      _synthetic_step,
      _synthetic_cache(batch * k),
      batch,
      max_decode_length=length,
      num_beams=k,
      length_penalty=alpha,
      eos_id=EOS,
    )
  )()
  np.testing.assert_array_equal(beam_tokens, [[B, EOS, 0, 0]] * batch)
  penalty = ((5 + 2) / 6) ** alpha
  np.testing.assert_allclose(beam_scores, np.log(0.4 * 0.99) / penalty, rtol=1e-5)
  assert np.all(beam_scores > greedy_scores / penalty)

  # One beam is greedy again.
  one_tokens, one_scores = decoding.beam_search(
    _synthetic_step,
    _synthetic_cache(batch),
    batch,
    max_decode_length=length,
    num_beams=1,
    length_penalty=alpha,
    eos_id=EOS,
  )
  np.testing.assert_array_equal(one_tokens, greedy_tokens)
  np.testing.assert_allclose(one_scores, greedy_scores / penalty, rtol=1e-6)


def _two_row_step(tokens, cache):
  """Row 0: EOS (0.5) or A (0.49) then surely EOS; row 1: never EOS."""
  del tokens
  index, row = cache["index"], cache["row"]
  row0 = jnp.where(
    index == 0,
    jnp.log(jnp.array([1e-6, 0.5, 0.49, 0.01])),
    jnp.log(jnp.array([1e-6, 0.98, 0.01, 0.01])),
  )
  row1 = jnp.log(jnp.array([1e-6, 1e-6, 0.9, 0.1]))
  log_probs = jnp.where((row == 0)[:, None], row0, row1)
  return jax.nn.log_softmax(log_probs), {"index": index + 1, "row": row}


def test_one_beam_is_greedy_even_when_a_longer_hypothesis_scores_higher():
  # Greedy ends row 0 at once: [EOS], log 0.5. With alpha = 2 the runner-up [A, EOS]
  # would score higher (log 0.48 / (7/6)^2 > log 0.5), but one beam is greedy, and
  # row 1 (still going) must not change row 0's result.
  cache = {"index": jnp.zeros((), jnp.int32), "row": jnp.arange(2, dtype=jnp.int32)}
  tokens, scores = decoding.beam_search(
    _two_row_step,
    cache,
    2,
    max_decode_length=4,
    num_beams=1,
    length_penalty=2.0,
    eos_id=EOS,
  )
  greedy, greedy_scores = decoding.sample_loop(
    _two_row_step, cache, 2, max_decode_length=4, eos_id=EOS
  )
  np.testing.assert_array_equal(tokens, greedy)
  np.testing.assert_array_equal(tokens[0], [EOS, 0, 0, 0])
  np.testing.assert_allclose(scores[0], greedy_scores[0], rtol=1e-6)


# A synthetic Markov step for sampling: log p(next | last) from a fixed random table.
_TABLE = jax.nn.log_softmax(jax.random.normal(jax.random.key(7), (16, 16)) * 2.0)


def _markov_step(tokens, cache):
  return _TABLE[tokens], cache


@functools.partial(jax.jit, static_argnames=("method", "temperature", "top_k"))
def _markov_decode(key, method="sample", temperature=1.0, top_k=0):
  return decoding.sample_loop(
    _markov_step,
    (),
    8,
    max_decode_length=6,
    method=method,
    temperature=temperature,
    top_k=top_k,
    key=key,
    eos_id=EOS,
  )


def test_sampling_limits_and_keys():
  key = jax.random.key(3)
  greedy, greedy_scores = _markov_decode(None, method="greedy")
  cold, cold_scores = _markov_decode(key, temperature=1e-4)
  top1, _ = _markov_decode(key, top_k=1)
  np.testing.assert_array_equal(cold, greedy)
  np.testing.assert_array_equal(top1, greedy)
  np.testing.assert_allclose(cold_scores, greedy_scores, rtol=1e-6)
  a, _ = _markov_decode(jax.random.key(0))
  b, _ = _markov_decode(jax.random.key(1))
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, greedy)
  # top_k = 2: every sampled token is one of the 2 most likely after its predecessor.
  c, _ = _markov_decode(key, temperature=10.0, top_k=2)
  top2 = np.argsort(-np.asarray(_TABLE), axis=-1)[:, :2]
  c = np.asarray(c)
  prev = np.pad(c[:, :-1], ((0, 0), (1, 0)))
  emitted = _emitted(c)
  assert all(c[i, t] in top2[prev[i, t]] for i, t in zip(*np.nonzero(emitted)))
  assert len(np.unique(c[emitted])) > 2  # Not a degenerate greedy-like output.
  # The model's own sampling at a very low temperature is greedy too.
  params, enc = _params(), _inputs()
  model_greedy, _ = _decode(params, enc, method="greedy", max_decode_length=6)
  model_cold, _ = _decode(
    params, enc, key, method="sample", temperature=1e-4, max_decode_length=6
  )
  np.testing.assert_array_equal(model_cold, model_greedy)


def _predictor(mesh, method):
  model = T5(TINY)
  boxed, _ = params_lib.abstract_params(model, 8, 8)
  shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = jax.device_put(_params(), shardings)
  predictor = Predictor(
    model,
    mesh,
    parallel.DEFAULT_RULES,
    shardings,
    batch_size=4,
    inputs_length=6,
    max_decode_length=5,
    decode=DecodeOptions(method=method, num_beams=2),
    eos_id=EOS,
    vocab_size=60,
  )
  return predictor, params


@pytest.mark.parametrize(
  "method",
  ["greedy", pytest.param("beam", marks=pytest.mark.slow)],  # suite time
)
def test_predictions_on_a_mesh_equal_one_device(method):
  rng = np.random.default_rng(5)
  # Five inputs in batches of four (the last one padded), one longer than the encoder.
  inputs = [list(rng.integers(2, 60, n)) + [EOS] for n in (3, 8, 1, 5, 2)]
  assert fit_length(inputs[1], 6, EOS) == inputs[1][:5] + [EOS]
  results = []
  for mesh in (
    parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
    parallel.make_mesh({"data": 1}, jax.devices()[:1]),
  ):
    predictor, params = _predictor(mesh, method)
    outputs, scores = predictor.predict_with_scores(params, inputs)
    results.append((outputs, np.asarray(scores)))
    assert all(0 < t < 60 for out in outputs for t in out)
    if method == "greedy":
      # The score of a greedy prediction is its teacher-forced log-likelihood.
      targets = [out + [EOS] if len(out) < 5 else out for out in outputs]
      np.testing.assert_allclose(
        predictor.score(params, inputs, targets), scores, rtol=1e-4, atol=1e-4
      )
  assert results[0][0] == results[1][0]
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


# ---- id 0: T5's padding, but a real token of a tokenizer.json (Llama 3, Qwen2) ---------


def test_left_align_takes_the_prompt_lengths_so_a_final_0_is_a_token():
  prompts = jnp.array([[5, 6, 0], [0, 1, 0]], jnp.int32)  # "5 6 0" and "0 1"
  tokens, real, positions = decoding.left_align(prompts, 9, jnp.array([3, 2]))
  assert tokens.tolist() == [[9, 5, 6, 0], [0, 9, 0, 1]]  # the docstring's example
  assert real.astype(int).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
  assert positions.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
  # Where 0 pads (T5's vocabularies), the lengths are the nonzero ids'.
  assert decoding.nonzero_lengths(jnp.array([[5, 6, 1], [7, 1, 0]])).tolist() == [3, 2]


def test_id_0_is_emitted_and_kept_only_where_it_is_a_token(tmp_path):
  logits = jnp.zeros([1, 14])
  allowed = decoding.allowed_tokens_mask(logits, 12) > decoding.NEG_INF
  assert allowed[0].tolist() == [False] + [True] * 11 + [False] * 2
  allowed = decoding.allowed_tokens_mask(logits, 12, pad_id=None) > decoding.NEG_INF
  assert allowed[0].tolist() == [True] * 12 + [False] * 2
  # Outputs end at EOS; the 0s after it are filler, those before it tokens.
  assert strip_output([4, 0, 1, 0, 0], EOS, pad_id=None) == [4, 0]
  assert strip_output([4, 0, 0], EOS, pad_id=None) == [4, 0, 0]
  assert strip_output([4, 1, 0], EOS) == [4]
  # Which: a decoder-only model on a tokenizer.json; T5 never, whatever its vocabulary.
  vocabulary = zero_token.vocabulary(tmp_path)
  assert decoding_pad_id(Llama(zero_token.CONFIG), vocabulary) is None
  assert decoding_pad_id(T5(TINY), vocabulary) == 0


def _llama_predictor(pad_id):
  model = Llama(zero_token.CONFIG)
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  boxed, _ = params_lib.abstract_params(model, 4, 3)
  shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  predictor = Predictor(
    model,
    mesh,
    parallel.DEFAULT_RULES,
    shardings,
    batch_size=2,
    inputs_length=4,
    max_decode_length=3,
    eos_id=zero_token.EOS,
    vocab_size=len(zero_token.WORDS),
    start_id=zero_token.BOS,
    pad_id=pad_id,
  )
  return predictor, shardings


def test_a_decoder_only_model_reads_and_emits_id_0_where_it_is_a_token():
  predictor, shardings = _llama_predictor(pad_id=None)
  params = jax.device_put(zero_token.params(), shardings)
  # "a !" and "a" in one batch: the prompt's final 0 is a token, so they differ.
  outputs, scores = predictor.predict_with_scores(params, [[4, 0], [4]])
  assert scores[0] != pytest.approx(scores[1], abs=1e-4)
  # Every logit equal: greedy takes the lowest id it may emit, 0, to the end.
  flat = jax.device_put(zero_token.params(flat_logits=True), shardings)
  assert predictor.predict(flat, [[4, 0], [4]]) == [[0, 0, 0], [0, 0, 0]]


def test_t5_never_emits_id_0():
  """The same all-equal logits make T5 emit its lowest allowed id, EOS (1), never 0."""
  params = jax.tree.map(lambda x: x, _params())
  norm = params["decoder"]["decoder_norm"]
  norm["scale"] = jnp.zeros_like(norm["scale"])
  tokens, _ = _decode(params, _inputs(), method="greedy", max_decode_length=6)
  assert np.all(np.asarray(tokens)[:, 0] == EOS)


def test_a_scored_target_ending_in_0_scores_its_0():
  """``score`` counts a target's own trailing 0 (by its length); T5's log p(0) is that
  of an id it never emits."""
  params, enc = _params(), _inputs()
  score = jax.jit(functools.partial(sequence_log_probs, T5(TINY)))
  targets = jnp.zeros((6, 6), jnp.int32).at[:, 0].set(7)  # "7" then a 0 or padding
  with_0 = score(params, enc, targets, target_lengths=jnp.full((6,), 2))
  without = score(params, enc, targets, target_lengths=jnp.full((6,), 1))
  np.testing.assert_array_less(with_0, without + decoding.NEG_INF / 2)
