"""Per-task evaluation of a model's params: seqio's Evaluator plus teacher-forced loss.

One ``Evaluator`` is built once (it reads and caches every task's eval split) and
called as often as wanted, during training or on a checkpoint::

    evaluator = Evaluator(model, mesh, rules, param_shardings, "demo",
                          {"inputs": 32, "targets": 16}, EvalOptions(max_examples=200))
    result = evaluator.evaluate(params, step=1000)
    result.tasks["demo_sort"]  # {"exact_match": 71.5, "loss": 0.42, "num_examples": 200}

For each leaf task of the mixture that has the eval split:

- **metrics**: seqio's ``Evaluator`` (as T5X uses it) feeds the task's examples,
  converted by ``UnpackedFeatureConverter`` (seqio's ``EncDecFeatureConverter(pack=False)``
  with each example's length kept, so a real token 0 is not padding), to a predict function
  (greedy or sampled or beam decoding by ``mtx.infer.predict.Predictor``) and a score
  function (log-likelihood of the targets), decodes and postprocesses the outputs with
  the task's ``postprocess_fn`` and applies its ``metric_fns``. Tasks without
  ``metric_fns`` get no metrics.
- **loss**: the mean token cross-entropy of the targets given the inputs
  (teacher-forced, no z-loss, no label smoothing), computed in fixed-size batches by
  one jitted function on the mesh.

The primary metric of a task is the first metric its first metric_fn returns; a task
without metric_fns is scored by its loss. Examples are truncated to the eval lengths
(the run's TASK_FEATURE_LENGTHS unless ``EvalOptions.task_feature_lengths`` is set);
targets are compared with the untruncated target text.

Every process reads and scores every example (eval splits are small); only process 0
writes results (``mtx.eval.results``).
"""

import dataclasses
import logging
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from mtx import parallel, paths
from mtx.data import chat_template, decoder_only
from mtx.data import pipeline as data_pipeline
from mtx.errors import UserError, check_int
from mtx.eval import predictions, results
from mtx.eval.results import LOSS, NUM_EXAMPLES, EvalResult
from mtx.infer import decoding
from mtx.infer.predict import Predictor, decoding_pad_id
from mtx.model import Llama, losses

log = logging.getLogger("mtx")

ENCODER_MASK = "encoder_input_mask"
_MODEL_FEATURES = (
  "encoder_input_tokens",
  ENCODER_MASK,
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_loss_weights",
)


class UnpackedFeatureConverter(seqio.EncDecFeatureConverter):
  """seqio's unpacked encoder-decoder features (``EncDecFeatureConverter(pack=False)``)
  with each example's extent marked by its length, not by id 0.

  seqio pads with 0 and weighs the targets where they are not 0: a target ending in a
  real token 0 (a ``tokenizer.json`` vocabulary's, e.g. Llama 3's "!") would lose it,
  and inputs ending in one could not be told from their padding. Here the lengths are
  noted before padding: ``decoder_loss_weights`` is 1 on every target token and
  ``encoder_input_mask`` on every input token. Inputs [5, 0, 1] and targets [7, 0], at
  lengths {"inputs": 5, "targets": 4}::

      encoder_input_tokens [5, 0, 1, 0, 0]    decoder_target_tokens [7, 0, 0, 0]
      encoder_input_mask   [1, 1, 1, 0, 0]    decoder_loss_weights  [1, 1, 0, 0]
                                              decoder_input_tokens  [0, 7, 0, 0]

  With T5's vocabularies, whose texts hold no 0, the features are seqio's and the mask.
  """

  MODEL_FEATURES = {
    **seqio.EncDecFeatureConverter.MODEL_FEATURES,
    ENCODER_MASK: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  _MASKS = {"inputs": "inputs_mask", "targets": "targets_mask"}

  def __init__(self):
    super().__init__(pack=False)

  def _convert_features(self, ds, task_feature_lengths):
    """seqio's hook: trims and pads the examples and their masks, then converts."""

    def with_masks(ex):
      ones = {m: tf.ones_like(ex[k], tf.int32) for k, m in self._MASKS.items()}
      return {**ex, **ones}

    lengths = dict(task_feature_lengths)
    lengths.update({m: task_feature_lengths[k] for k, m in self._MASKS.items()})
    ds = seqio.utils.trim_and_pad_dataset(ds.map(with_masks), lengths)

    def convert(ex):
      return {
        "encoder_input_tokens": ex["inputs"],
        ENCODER_MASK: ex["inputs_mask"],
        "decoder_target_tokens": ex["targets"],
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
          ex["targets"], bos_id=self.bos_id
        ),
        "decoder_loss_weights": ex["targets_mask"],
      }

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths[ENCODER_MASK] = task_feature_lengths["inputs"]
    return lengths


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How to evaluate; gin binds these as ``eval.EvalOptions.*`` (runs/eval.gin).

  Attributes:
    split: the seqio split to evaluate ("validation").
    batch_size: global rows per decoding / loss batch; rounded up to a multiple of the
      mesh's data-parallel size.
    max_examples: at most this many examples per task, the first ones of the split
      (None = all).
    task_feature_lengths: {"inputs": N, "targets": M} for eval; None = the run's.
      ``targets`` also bounds the decoded length.
    mixture_or_task_name: evaluate this task or mixture instead of the run's (e.g.
      one with eval-only tasks); None = the run's.
    decode_method: "greedy", "sample" or "beam" (``mtx.infer.predict.Predictor``).
    num_beams, length_penalty: beam search.
    temperature, top_k: sampling.
    seed: sampling seed.
    loss: also compute the teacher-forced per-task loss.
    baseline_dir: another run's MODEL_DIR whose newest ``eval/step_N.json`` is the
      baseline of Delta-m (None = no Delta-m).
    output_dir: where every example's prediction goes, ``<task>-<step>.jsonl``
      (``mtx.eval.predictions``); None = MODEL_DIR/inference_eval, '' = nowhere.
  """

  split: str = "validation"
  batch_size: int = 128
  max_examples: Optional[int] = None
  task_feature_lengths: Optional[Mapping[str, int]] = None
  mixture_or_task_name: Optional[str] = None
  decode_method: str = "greedy"
  num_beams: int = 4
  length_penalty: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0
  loss: bool = True
  baseline_dir: Optional[str] = None
  output_dir: Optional[str] = None

  def __post_init__(self):  # Bad settings fail where they are given, before any work.
    object.__setattr__(self, "baseline_dir", paths.absolute(self.baseline_dir))
    check_int("EVAL_BATCH_SIZE", self.batch_size, 1)
    check_int("EVAL_MAX_EXAMPLES", self.max_examples, 1, optional=True)
    self.decode.check(self.batch_size, "EVAL")
    if self.task_feature_lengths is not None:
      data_pipeline.check_feature_lengths(
        self.task_feature_lengths, "EVAL_TASK_FEATURE_LENGTHS"
      )

  @property
  def decode(self) -> decoding.DecodeOptions:
    """The decoding options among these."""
    return decoding.DecodeOptions(
      method=self.decode_method,
      num_beams=self.num_beams,
      length_penalty=self.length_penalty,
      temperature=self.temperature,
      top_k=self.top_k,
      seed=self.seed,
    )


def _as_float(value: Any) -> Optional[float]:
  """A metric value as a float; None for values that are not one number (text, arrays)."""
  value = getattr(value, "value", value)  # seqio/clu MetricValue wrappers
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None
  return float(array) if array.ndim == 0 else None


def _length_key(feature: str) -> str:
  """The task feature whose length a model feature has."""
  return "inputs" if feature.startswith("encoder") else "targets"


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _to_numpy(dataset, with_index: bool, lengths: Mapping[str, int]) -> dict:
  """Stacks a converted (optionally enumerated) dataset into [N, L] arrays."""
  parts = {k: [] for k in _MODEL_FEATURES}
  indices = []
  for element in dataset.batch(4096).as_numpy_iterator():
    if with_index:
      index, element = element
      indices.append(index)
    for k in _MODEL_FEATURES:
      parts[k].append(element[k])
  out = {}
  for k, v in parts.items():
    empty = np.zeros([0, lengths[_length_key(k)]], np.int32)
    out[k] = np.concatenate(v) if v else empty
  if with_index:
    out["index"] = np.concatenate(indices) if indices else np.zeros([0], np.int64)
  return out


def _used_lengths(all_arrays) -> dict:
  """{"inputs": longest encoder input, "targets": longest target} over all examples
  (by their masks, ``UnpackedFeatureConverter``), at least 1."""

  def longest(mask):
    return max(1, int(np.max(np.sum(mask != 0, axis=1), initial=0)))

  all_arrays = list(all_arrays)
  return {
    "inputs": max(longest(a[ENCODER_MASK]) for a in all_arrays),
    "targets": max(longest(a["decoder_loss_weights"]) for a in all_arrays),
  }


def _decoder_only_options(model, prefix_lm, vocabulary) -> tuple:
  """(``PrefixLM`` with its start token, the chat template or None): a decoder-only
  model reads inputs + targets rows made as in training."""
  prefix_lm = (prefix_lm or decoder_only.PrefixLM()).for_vocabulary(vocabulary)
  chat = None
  if isinstance(model, Llama) and prefix_lm.chat_template:
    chat = chat_template.TokenTemplate.for_vocabulary(vocabulary)
  return prefix_lm, chat


def _chat_rows(
  arrays: dict, chat: Optional[chat_template.TokenTemplate], lengths: Mapping[str, int]
) -> dict:
  """Unpacked rows with every example rendered by the chat template (as training
  renders them, ``mtx.data.chat_template``); the rows as they are when ``chat`` is None.

  Shapes: int32 [N, Li] inputs and [N, Lt] targets in and out (``lengths``).
  """
  if chat is None:
    return arrays
  inputs = [chat.prompt(r, lengths["inputs"]) for r in unpadded(arrays, "inputs")]
  targets = [chat.answer(r, lengths["targets"]) for r in unpadded(arrays, "targets")]
  out = dict(arrays)
  out["encoder_input_tokens"], out[ENCODER_MASK] = _stack(inputs, lengths["inputs"])
  out["decoder_target_tokens"], out["decoder_loss_weights"] = _stack(
    targets, lengths["targets"]
  )
  out["decoder_input_tokens"] = np.pad(
    out["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0))
  )
  return out


def _stack(rows: Sequence, length: int) -> tuple:
  """(int32 [N, length] rows padded with 0, int32 [N, length] mask of their ids)."""
  tokens = np.zeros([len(rows), length], np.int32)
  mask = np.zeros([len(rows), length], np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)], mask[i, : len(row)] = row, 1
  return tokens, mask


def unpadded(arrays: Mapping[str, np.ndarray], side: str) -> list:
  """Each example's ids of ``side`` ("inputs" or "targets") as a list, padding dropped
  by the rows' masks (``UnpackedFeatureConverter``), a token 0 kept.

  >>> unpadded({"decoder_target_tokens": np.array([[7, 0, 0]]),
  ...           "decoder_loss_weights": np.array([[1, 1, 0]])}, "targets")
  [[7, 0]]
  """
  if side == "inputs":
    tokens, mask = arrays["encoder_input_tokens"], arrays[ENCODER_MASK]
  else:
    tokens, mask = arrays["decoder_target_tokens"], arrays["decoder_loss_weights"]
  lengths = np.sum(np.asarray(mask) != 0, axis=1)
  return [row[:n].tolist() for row, n in zip(np.asarray(tokens), lengths)]


def _loss_features(model: nn.Module) -> tuple:
  """The features ``make_loss_fn(model)`` reads."""
  if isinstance(model, Llama):
    return decoder_only.MODEL_FEATURES + ("decoder_target_tokens", "decoder_loss_weights")
  # T5's encoder masks its padding by id 0 (its texts hold none).
  return tuple(k for k in _MODEL_FEATURES if k != ENCODER_MASK)


def make_loss_fn(model: nn.Module):
  """``fn(params, batch) -> (loss_sum f32[], token_count f32[])``, teacher-forced.

  ``batch`` holds the unpacked model features, each int32 [B, L]: encoder_input_tokens,
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights; for a decoder-only
  ``Llama``, ``mtx.data.decoder_only``'s features instead (``_loss_features``). Rows
  whose weights are all 0 (batch padding) add nothing.
  """

  def fn(params, batch):
    if isinstance(model, Llama):
      inputs = {k: batch[k] for k in decoder_only.MODEL_FEATURES}
      logits = model.apply({"params": params}, **inputs)
    else:
      logits = model.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
      )
    token_loss = losses.cross_entropy(logits, batch["decoder_target_tokens"])
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    # An all-padding row may give non-finite logits; 0 * NaN would still be NaN.
    token_loss = jnp.where(weights > 0, token_loss, 0.0)
    return jnp.sum(token_loss * weights), jnp.sum(weights)

  return fn


def eval_tasks(name: str, split: str) -> list:
  """The leaf tasks of ``name``; a UserError unless it is registered and some task has
  ``split``."""
  try:
    tasks = seqio.get_subtasks(seqio.get_mixture_or_task(name))
  except ValueError as e:
    raise UserError(
      f"Eval mixture or task '{name}' is not registered ({e}); set "
      "MIXTURE_OR_TASK_MODULE to the module that registers it."
    ) from e
  if not any(split in t.splits for t in tasks):
    splits = sorted({s for t in tasks for s in t.splits})
    raise UserError(
      f"No task of '{name}' has a '{split}' split; set EVAL_SPLIT to "
      f"one of their splits ({', '.join(splits)})."
    )
  left_out = sorted(t.name for t in tasks if split not in t.splits)
  if left_out:
    log.warning(
      "Evaluation of '%s' leaves out task(s) %s: they have no '%s' split (set "
      "EVAL_SPLIT or EVAL_MIXTURE_OR_TASK_NAME to evaluate them).",
      name,
      ", ".join(left_out),
      split,
    )
  return tasks


class Evaluator:
  """Evaluates params on every eval task of a mixture (see the module docstring).

  Args:
    model: the ``mtx.model.T5`` being trained.
    mesh, rules: the mesh and logical axis rules params are sharded by.
    param_shardings: the params' shardings (a pytree like params).
    mixture_or_task_name: the run's seqio task or mixture.
    task_feature_lengths: the run's {"inputs": N, "targets": M}.
    options: ``EvalOptions``.
    predictor: anything with ``predict(params, inputs)`` (and ``score`` for score
      metrics) as ``mtx.infer.predict.Predictor`` has; None builds that Predictor from
      the options.
    model_dir: the run's MODEL_DIR: predictions go to its ``inference_eval/`` unless
      ``options.output_dir`` says otherwise (None and no output_dir: not written).
    prefix_lm: a decoder-only model's rows and prompts, as training made them
      (``decoder_only.PrefixLM``); None = its defaults. Unused by T5.
  """

  def __init__(
    self,
    model: nn.Module,
    mesh,
    rules: Sequence,
    param_shardings,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    options: EvalOptions = EvalOptions(),
    *,
    predictor: Any = None,
    model_dir: Optional[str] = None,
    prefix_lm: Optional[decoder_only.PrefixLM] = None,
  ):
    self.options = options
    self._model, self._mesh, self._rules = model, mesh, tuple(rules)
    name = options.mixture_or_task_name or mixture_or_task_name
    self.lengths = data_pipeline.check_feature_lengths(
      options.task_feature_lengths or task_feature_lengths,
      "EVAL_TASK_FEATURE_LENGTHS"
      if options.task_feature_lengths
      else "TASK_FEATURE_LENGTHS",
    )
    dp = parallel.data_parallel_size(mesh)
    self.batch_size = _round_up(options.batch_size, dp * jax.process_count())
    if options.baseline_dir:  # Fail now rather than at the first evaluation.
      results.read_results(options.baseline_dir)
    start = time.time()
    split = options.split
    tasks = eval_tasks(name, split)
    self.task_names = tuple(sorted(t.name for t in tasks if split in t.splits))
    self.predictions_dir = predictions.output_dir(model_dir, options.output_dir)
    self._seqio = seqio.Evaluator(
      name,
      UnpackedFeatureConverter(),
      eval_split=split,
      sequence_length=self.lengths,
      num_examples=options.max_examples,
      use_memory_cache=True,
      async_compute_metrics=False,
      logger_cls=(predictions.PredictionsLogger,) if self.predictions_dir else (),
      log_dir=self.predictions_dir,
    )
    scored = {t.name for t in self._seqio.eval_tasks}
    self._metric_tasks = tuple(n for n in self.task_names if n in scored)
    vocabulary = tasks[0].output_features["targets"].vocabulary
    self._prefix_lm, self._chat = _decoder_only_options(model, prefix_lm, vocabulary)
    # task -> its examples as unpacked model features, [N, L] arrays.
    self._arrays = {
      t.name: _chat_rows(
        self._read_examples(t, t.name in scored), self._chat, self.lengths
      )
      for t in tasks
      if t.name in self.task_names
    }
    # Shapes as long as the longest example, not the configured bound: the decoder
    # runs fewer steps and nothing is cut that the bound would keep.
    self.shapes = _used_lengths(self._arrays.values())
    for arrays in self._arrays.values():
      for k in _MODEL_FEATURES:
        arrays[k] = arrays[k][:, : self.shapes[_length_key(k)]]
    self._eos_id = vocabulary.eos_id
    self._predictor = predictor
    if self._predictor is None and self._metric_tasks:
      self._predictor = self._make_predictor(param_shardings, vocabulary)
    rows = parallel.batch_sharding(mesh, 2)
    # Traced under the mesh and rules, so the model's activation constraints hold.
    self._loss_fn = jax.jit(
      parallel.traced_in_mesh(make_loss_fn(model), mesh, self._rules),
      in_shardings=(param_shardings, {k: rows for k in _loss_features(model)}),
    )
    log.info(
      "Eval data for %d tasks of '%s' (%s) read in %.1f s.",
      len(self.task_names),
      name,
      split,
      time.time() - start,
    )

  def _read_examples(self, task: seqio.Task, scored: bool) -> dict:
    """A task's eval examples as [N, L] arrays of unpacked model features."""
    if scored:  # seqio has read and cached it already.
      return _to_numpy(self._seqio.cached_model_datasets[task.name], True, self.lengths)
    # No metric_fns: seqio skips the task, but its loss is still worth reporting.
    ds = task.get_dataset(
      self.lengths, split=self.options.split, shuffle=False, num_epochs=1
    )
    if self.options.max_examples:
      ds = ds.take(self.options.max_examples)
    converted = UnpackedFeatureConverter()(ds, self.lengths)
    return _to_numpy(converted, False, self.lengths)

  def _make_predictor(self, param_shardings, vocabulary):
    o = self.options
    return Predictor(
      self._model,
      self._mesh,
      self._rules,
      param_shardings,
      batch_size=self.batch_size,
      inputs_length=self.shapes["inputs"],
      max_decode_length=self.shapes["targets"],
      decode=o.decode,
      eos_id=self._eos_id,
      vocab_size=vocabulary.vocab_size,
      start_id=self._prefix_lm.start_id,
      prefix_lm=self._prefix_lm.bidirectional_inputs,
      pad_id=decoding_pad_id(self._model, vocabulary),
    )

  def num_examples(self, task_name: str) -> int:
    return len(self._arrays[task_name]["encoder_input_tokens"])

  # ---- seqio's model functions -------------------------------------------------------

  def _examples(self, dataset) -> Mapping[str, np.ndarray]:
    """The arrays of one of seqio's cached datasets (read once, at construction)."""
    for name, cached in self._seqio.cached_model_datasets.items():
      if cached is dataset:
        return self._arrays[name]
    return _to_numpy(dataset, True, self.lengths)

  def _predict_fn(self, params):
    """seqio's predict_fn: (index, token ids) per example, ids padded to one width."""
    width = self.shapes["targets"] + 1

    def predict(dataset, model_feature_shapes=None):
      del model_feature_shapes
      arrays = self._examples(dataset)
      inputs = unpadded(arrays, "inputs")
      outputs = self._predictor.predict(params, inputs) if inputs else []
      out = []
      for index, ids in zip(arrays["index"], outputs):
        if self._chat is not None:  # the end of the assistant's turn is no answer
          ids = self._chat.strip(ids)
        # EOS, then padding: seqio decodes up to the first EOS, and stacks the
        # outputs into one 2-D array, so every row needs the same width.
        ids = list(ids)[: width - 1] + [self._eos_id]
        out.append((int(index), np.array(ids + [0] * (width - len(ids)), np.int32)))
      return out

    return predict

  def _score_fn(self, params):
    """seqio's score_fn: (index, log-likelihood of the targets) per example."""

    def score(dataset, model_feature_shapes=None):
      del model_feature_shapes
      arrays = self._examples(dataset)
      inputs, targets = unpadded(arrays, "inputs"), unpadded(arrays, "targets")
      scores = self._predictor.score(params, inputs, targets) if inputs else []
      return [(int(i), float(s)) for i, s in zip(arrays["index"], scores)]

    return score

  # ---- loss --------------------------------------------------------------------------

  def _task_loss(self, params, arrays: Mapping[str, np.ndarray]) -> float:
    n = len(arrays["encoder_input_tokens"])
    if n == 0:
      return float("nan")
    total, count = 0.0, 0.0
    sharding = parallel.batch_sharding(self._mesh, 2)
    if isinstance(self._model, Llama):
      arrays = decoder_only.from_unpacked(arrays, self._prefix_lm)
    for start in range(0, n, self.batch_size):
      batch = {}
      for k in _loss_features(self._model):
        rows = arrays[k][start : start + self.batch_size]
        pad = self.batch_size - len(rows)
        if pad:
          rows = np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], rows.dtype)])
        # Every process holds all rows: each device takes its slice of them.
        batch[k] = jax.make_array_from_callback(
          rows.shape, sharding, lambda idx, r=rows: r[idx]
        )
      loss_sum, tokens = self._loss_fn(params, batch)
      total += float(loss_sum)
      count += float(tokens)
    return total / count if count else float("nan")

  # ---- the evaluation ----------------------------------------------------------------

  def evaluate(self, params, step: int) -> EvalResult:
    """Scores ``params`` on every task; returns per-task metrics, loss and counts."""
    start = time.time()
    tasks, primary = {}, {}
    with self._mesh, nn.logical_axis_rules(list(self._rules)):
      scores = {}
      if self._metric_tasks:
        future, _ = self._seqio.evaluate(
          compute_metrics=True,
          step=int(step),
          predict_fn=self._predict_fn(params),
          score_fn=self._score_fn(params),
        )
        scores = future.result() or {}
      for name in self.task_names:
        values = {}
        for metric, value in (scores.get(name) or {}).items():
          number = _as_float(value)
          if number is not None:
            values[metric] = number
        if values:
          primary[name] = next(iter(values))
        if self.options.loss:
          values[LOSS] = self._task_loss(params, self._arrays[name])
        primary.setdefault(name, LOSS if self.options.loss else None)
        if primary[name] is None:
          del primary[name]
        values[NUM_EXAMPLES] = self.num_examples(name)
        tasks[name] = values
    return EvalResult(
      step=int(step),
      split=self.options.split,
      tasks=tasks,
      primary=primary,
      seconds=time.time() - start,
    )

  def close(self) -> None:
    self._seqio.close()
