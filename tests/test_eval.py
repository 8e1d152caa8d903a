"""Evaluation: metrics and summary numbers by hand, the Evaluator, `mtx eval` end to end."""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tiny_mixture
import zero_token

from mtx import parallel
from mtx.cli import main as cli
from mtx.data import decoder_only
from mtx.errors import UserError
from mtx.eval import metrics, predictions, results, summary
from mtx.eval.evaluator import EvalOptions, Evaluator, UnpackedFeatureConverter
from mtx.model import T5, Llama, T5Config
from mtx.runtime import metrics_writer
from mtx.runtime import params as params_lib

TINY = T5Config(
  vocab_size=384,
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=1,
  num_decoder_layers=1,
)
LENGTHS = {"inputs": 16, "targets": 16}


# ---- numbers by hand -------------------------------------------------------------------
def test_mean_primary_and_delta_m_by_hand():
  tasks = {
    "a": {"exact_match": 80.0, "loss": 0.5},
    "b": {"accuracy": 50.0, "loss": 1.0},
    "c": {"loss": 0.5},
  }
  primary = {"a": "exact_match", "b": "accuracy", "c": "loss"}
  # Tasks scored only by loss stay out of the mean of percentages.
  assert summary.mean_primary(tasks, primary) == pytest.approx(65.0)
  assert summary.mean_primary({"c": {"loss": 0.5}}, {"c": "loss"}) == 0.5
  base = {"a": {"exact_match": 64.0}, "b": {"accuracy": 40.0}, "c": {"loss": 0.4}}
  # a: +25%, b: +25%, c: loss up 25% is worse: -25%.  Mean: 25/3.
  assert summary.delta_m(tasks, primary, base) == pytest.approx(25.0 / 3)
  # A task missing from the baseline or with a zero baseline is left out.
  assert summary.delta_m(
    tasks, primary, {"a": {"exact_match": 0.0}, "b": {"accuracy": 40.0}}
  ) == pytest.approx(25.0)
  assert summary.delta_m(tasks, primary, {"z": {"loss": 1.0}}) is None


def test_text_metrics_by_hand():
  pytest.importorskip("sacrebleu")
  pytest.importorskip("rouge_score")
  same = ["the cat sat on the mat", "a dog ran . it was fast"]
  assert metrics.bleu(same, same)["bleu"] == pytest.approx(100.0)
  assert metrics.bleu([[s, "other words"] for s in same], same)["bleu"] == pytest.approx(
    100.0
  )
  assert metrics.bleu(same, ["nothing alike here", "zzz"])["bleu"] < 1.0
  # rouge1: P = 1, R = 2/3 -> F = 0.8;  rouge2: P = 1, R = 1/2 -> F = 2/3.
  scores = metrics.rouge(["the cat sat"], ["the cat"])
  assert scores["rouge1"] == pytest.approx(80.0)
  assert scores["rouge2"] == pytest.approx(200.0 / 3)
  assert metrics.rouge(same, same) == pytest.approx(
    {"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0}
  )


def test_text_metrics_say_how_to_install(monkeypatch):
  import importlib

  real_import_module = importlib.import_module

  def without_text_metrics(name, *args, **kwargs):
    if name.split(".")[0] in ("sacrebleu", "rouge_score"):
      raise ImportError(f"No module named {name}")
    return real_import_module(name, *args, **kwargs)

  monkeypatch.setattr(importlib, "import_module", without_text_metrics)
  for fn in (metrics.bleu, metrics.rouge):
    with pytest.raises(UserError, match=r'pip install "mtx\[text-metrics\]"'):
      fn(["a b"], ["a b"])


# ---- the Evaluator ---------------------------------------------------------------------
class _CopyPredictor:
  """Predicts each input unchanged: tiny_copy is all right, tiny_rev only on palindromes."""

  def predict(self, params, inputs):
    del params
    return [ids[:-1] if ids and ids[-1] == 1 else ids for ids in inputs]


def _hand_loss(model, params, pairs):
  """Mean token cross-entropy over all examples, one unsharded batch, numpy padding."""
  vocab = tiny_mixture.VOCAB
  enc = [vocab.encode(x) + [1] for x, _ in pairs]
  tgt = [vocab.encode(y) + [1] for _, y in pairs]
  enc_arr = np.zeros([len(pairs), max(map(len, enc))], np.int32)
  tgt_arr = np.zeros([len(pairs), max(map(len, tgt))], np.int32)
  for i, (e, t) in enumerate(zip(enc, tgt)):
    enc_arr[i, : len(e)], tgt_arr[i, : len(t)] = e, t
  dec_in = np.pad(tgt_arr[:, :-1], ((0, 0), (1, 0)))
  logits = np.asarray(model.apply({"params": params}, enc_arr, dec_in), np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token_lp = np.take_along_axis(log_probs, tgt_arr[..., None], -1)[..., 0]
  return float(-(token_lp * (tgt_arr > 0)).sum() / (tgt_arr > 0).sum())


def test_evaluator_scores_per_task_and_computes_the_loss_on_a_mesh(tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  model = T5(TINY)
  mesh = parallel.make_mesh({"data": 4, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  boxed, _ = params_lib.abstract_params(model, 8, 8)
  shardings = params_lib.param_shardings(boxed, mesh, rules)
  params = params_lib.init_params(model, 0, 8, 8, shardings)
  # 64 examples per task in batches of 24: the last batch is padded.
  evaluator = Evaluator(
    model,
    mesh,
    rules,
    shardings,
    "tiny",
    LENGTHS,
    EvalOptions(batch_size=24, output_dir=str(tmp_path / "preds")),
    predictor=_CopyPredictor(),
    model_dir=str(tmp_path / "run"),  # EVAL_OUTPUT_DIR wins over its inference_eval/
  )
  result = evaluator.evaluate(params, step=5)
  words = tiny_mixture._strings(64, 1)  # pylint: disable=protected-access
  assert result.step == 5 and sorted(result.tasks) == ["tiny_copy", "tiny_rev"]
  assert result.primary == {"tiny_copy": "exact_match", "tiny_rev": "exact_match"}
  assert result.tasks["tiny_copy"]["exact_match"] == 100.0
  palindromes = 100.0 * np.mean([w == w[::-1] for w in words])
  assert result.tasks["tiny_rev"]["exact_match"] == pytest.approx(palindromes)
  host_params = jax.device_get(params)
  for task, fn in (("tiny_copy", lambda w: w), ("tiny_rev", lambda w: w[::-1])):
    assert result.tasks[task]["num_examples"] == 64
    expected = _hand_loss(model, host_params, [(w, fn(w)) for w in words])
    assert result.tasks[task]["loss"] == pytest.approx(expected, rel=1e-5)
  # Every example's prediction is kept, in the split's order (T5X's inference_eval).
  assert sorted(os.listdir(tmp_path / "preds")) == [
    "tiny_copy-000005.jsonl",
    "tiny_rev-000005.jsonl",
  ]
  assert not (tmp_path / "run").exists()
  for task, fn in (("tiny_copy", lambda w: w), ("tiny_rev", lambda w: w[::-1])):
    text = (tmp_path / "preds" / f"{task}-000005.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [(r["input"], r["target"], r["prediction"]) for r in rows] == [
      (w, fn(w), w) for w in words
    ]


def test_unpacked_feature_converter_marks_examples_by_length_as_its_docstring_shows():
  example = {"inputs": [5, 0, 1], "targets": [7, 0]}  # 0 is a token here, not padding
  ds = tf.data.Dataset.from_tensors(
    {k: tf.constant(v, tf.int32) for k, v in example.items()}
  )
  out = next(
    UnpackedFeatureConverter()(ds, {"inputs": 5, "targets": 4}).as_numpy_iterator()
  )
  assert {k: v.tolist() for k, v in out.items()} == {
    "encoder_input_tokens": [5, 0, 1, 0, 0],
    "encoder_input_mask": [1, 1, 1, 0, 0],
    "decoder_target_tokens": [7, 0, 0, 0],
    "decoder_loss_weights": [1, 1, 0, 0],
    "decoder_input_tokens": [0, 7, 0, 0],
  }


class _RecordingCopyPredictor(_CopyPredictor):
  def __init__(self):
    self.inputs = []

  def predict(self, params, inputs):
    self.inputs += inputs
    return super().predict(params, inputs)


def test_a_decoder_only_evaluation_keeps_a_token_0_ending_inputs_and_targets(tmp_path):
  """On a tokenizer.json whose id 0 is "!" (Llama 3's, Qwen2's), examples ending in "!"
  keep it: in the prompts predicted, in the targets compared and in the loss."""
  texts = ["a b !", "c !", "! d", "e"]  # no EOS
  ids = [[4, 5, 0], [6, 0], [0, 7], [8]]
  zero_token.register_copy_task("zero_copy", zero_token.vocabulary(tmp_path), texts)
  model = Llama(zero_token.CONFIG)
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  boxed, _ = params_lib.abstract_params(model, 8, 8)
  shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = jax.device_put(zero_token.params(), shardings)
  predictor = _RecordingCopyPredictor()
  evaluator = Evaluator(
    model,
    mesh,
    parallel.DEFAULT_RULES,
    shardings,
    "zero_copy",
    {"inputs": 8, "targets": 8},
    EvalOptions(batch_size=4, output_dir=str(tmp_path / "preds")),
    predictor=predictor,
    prefix_lm=decoder_only.PrefixLM(bidirectional_inputs=False),
  )
  assert evaluator.shapes == {"inputs": 3, "targets": 3}
  result = evaluator.evaluate(params, step=1).tasks["zero_copy"]
  assert predictor.inputs == ids
  assert result["exact_match"] == 100.0
  rows = [json.loads(r) for r in (tmp_path / "preds" / "zero_copy-000001.jsonl").open()]
  assert [r["prediction"] for r in rows] == texts
  # The loss by hand: each example one causal sequence BOS + inputs + targets, scored
  # on its targets (their final 0 too).
  seqs = [[zero_token.BOS] + x + x for x in ids]
  tokens = np.zeros([len(seqs), 7], np.int32)
  for i, seq in enumerate(seqs):
    tokens[i, : len(seq)] = seq
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens[:, :-1])))
  log_probs = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
  losses = [
    -log_probs[i, t, seqs[i][t + 1]]
    for i, x in enumerate(ids)
    for t in range(len(x), 2 * len(x))
  ]
  assert result["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)


# ---- `mtx eval` --------------------------------------------------------------------------
def _cli(*args):
  gin.clear_config()
  try:
    return cli.run(list(args))
  finally:
    gin.clear_config()


def _train(model_dir, steps=4, *extra):
  assert (
    _cli(
      "train",
      "--gin_file=tests/tiny.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.CHECKPOINT_PERIOD=2",
      *extra,
    )
    == 0
  )


def _eval(model_dir, *extra):
  return _cli(
    "eval",
    "--gin_file=tests/tiny.gin",
    "--gin_file=runs/eval.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.EVAL_BATCH_SIZE=64",
    "--gin_bindings=evaluate.tensorboard = False",
    *extra,
  )


def _expected_delta_m(record, baseline):
  """Delta-m by its definition; tasks with a zero baseline cannot be compared."""
  changes = []
  for task, metric in record["primary"].items():
    base = baseline["tasks"][task][metric]
    sign = -1.0 if metric == "loss" else 1.0
    if base:
      changes.append(100.0 * sign * (record["tasks"][task][metric] - base) / abs(base))
  return float(np.mean(changes)) if changes else None


def test_mtx_eval_writes_json_metrics_and_delta_m(tmp_path, capsys):
  run = tmp_path / "run"
  _train(run)
  # A baseline run's results, as `mtx eval` would have left them.
  base = tmp_path / "base"
  (base / "eval").mkdir(parents=True)
  baseline = {
    "step": 9,
    "split": "validation",
    "tasks": {
      "tiny_copy": {"exact_match": 50.0, "loss": 2.0, "num_examples": 64},
      "tiny_rev": {"exact_match": 25.0, "loss": 2.0, "num_examples": 64},
    },
    "primary": {"tiny_copy": "exact_match", "tiny_rev": "exact_match"},
    "summary": {"mean_primary": 37.5, "delta_m": None, "baseline": None},
  }
  (base / "eval" / "step_9.json").write_text(json.dumps(baseline))
  capsys.readouterr()
  assert _eval(run, f"--gin.EVAL_BASELINE_DIR='{base}'") == 0
  out = capsys.readouterr().out
  record = json.loads((run / "eval" / "step_4.json").read_text())
  assert record["step"] == 4 and record["split"] == "validation"
  assert record["primary"] == baseline["primary"]
  for task in ("tiny_copy", "tiny_rev"):
    values = record["tasks"][task]
    assert values["num_examples"] == 64 and 0.0 <= values["exact_match"] <= 100.0
    assert 0.0 < values["loss"] < 10.0
  s = record["summary"]
  assert s["mean_primary"] == pytest.approx(
    np.mean([record["tasks"][t]["exact_match"] for t in ("tiny_copy", "tiny_rev")])
  )
  assert s["baseline"] == str(base)
  assert s["delta_m"] == pytest.approx(_expected_delta_m(record, baseline))
  # metrics.jsonl: the training lines, then one eval line at the evaluated step.
  rows = metrics_writer.read_metrics(str(run))
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  line = [r for r in rows if "eval/mean_primary" in r][-1]
  assert line["step"] == 4
  for key in (
    "eval/tiny_copy/exact_match",
    "eval/tiny_copy/loss",
    "eval/tiny_rev/loss",
    "eval/delta_m",
  ):
    assert key in line, key
  assert line["eval/delta_m"] == pytest.approx(s["delta_m"])
  # The table and the one-line summary.
  assert "tiny_copy" in out and "exact_match" in out
  assert out.strip().splitlines()[-1].startswith("Evaluated step 4 on 2 tasks")
  assert "delta_m" in out.strip().splitlines()[-1]
  # Predictions: MODEL_DIR/inference_eval by default.
  for task in ("tiny_copy", "tiny_rev"):
    lines = (run / "inference_eval" / f"{task}-000004.jsonl").read_text().splitlines()
    assert len(lines) == 64 and set(json.loads(lines[0])) >= {"input", "target"}


@pytest.mark.parametrize(
  "extra, pattern",
  [
    ((), "holds no finished checkpoint"),
    (("--gin.EVAL_BASELINE_DIR='{tmp}'",), "has no eval results"),
    (("--gin.EVAL_DECODE_METHOD='beem'",), "EVAL_DECODE_METHOD 'beem' is not one of"),
    (
      ("--gin_bindings=eval.EvalOptions.num_beams = 0",),
      "EVAL decoding settings are out of range .num_beams 0",
    ),
    (
      ("--gin.EVAL_TASK_FEATURE_LENGTHS={{'inputs': '8', 'targets': 8}}",),
      r"EVAL_TASK_FEATURE_LENGTHS\['inputs'\] must be a positive integer",
    ),
    (("--gin.EVAL_MAX_EXAMPLES=0",), "EVAL_MAX_EXAMPLES must be positive"),
    (
      ("--gin.EVAL_CHECKPOINT_STEP=7",),
      "EVAL_CHECKPOINT_STEP has no checkpoint at step 7 in .*empty: it holds no "
      "finished checkpoint",
    ),
  ],
)
def test_mtx_eval_bad_input_one_sentence(tmp_path, capsys, extra, pattern):
  import re

  gin.clear_config()
  os.makedirs(tmp_path / "empty")
  args = [
    "eval",
    "--gin_file=tests/tiny.gin",
    "--gin_file=runs/eval.gin",
    f"--gin.MODEL_DIR='{tmp_path}/empty'",
  ] + [e.format(tmp=tmp_path) for e in extra]
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(args)
  finally:
    gin.clear_config()
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err), err


@pytest.mark.slow
def test_mtx_eval_two_runs_checkpoint_step_and_delta_m(tmp_path):
  base, run = tmp_path / "base", tmp_path / "run"
  _train(base, 2)
  _train(run, 6, "--gin.LOG_PERIOD=3")
  assert _eval(base) == 0
  assert _eval(run, "--gin.EVAL_CHECKPOINT_STEP=2") == 0
  assert _eval(run, f"--gin.EVAL_BASELINE_DIR='{base}'") == 0
  assert results.eval_steps(str(run)) == [2, 6]
  baseline = results.read_results(str(base))
  record = results.read_results(str(run))
  assert baseline["step"] == 2 and record["step"] == 6
  expected = _expected_delta_m(record, baseline)
  if expected is None:  # A few steps may leave every exact match at 0.
    assert record["summary"]["delta_m"] is None
  else:
    assert record["summary"]["delta_m"] == pytest.approx(expected)
  # The same params (step 2 of identical runs) score the same.
  at_2 = results.read_results(str(run), step=2)
  assert at_2["tasks"] == baseline["tasks"]


def test_predictions_dir_follows_eval_output_dir():
  assert predictions.output_dir("/runs/a", None) == "/runs/a/inference_eval"
  assert predictions.output_dir("/runs/a", "/preds") == "/preds"
  assert predictions.output_dir("/runs/a", "") is None  # '' turns them off
  assert predictions.output_dir(None, None) is None
  assert (
    predictions.path("/p", "glue_cola_v002", 1000) == "/p/glue_cola_v002-001000.jsonl"
  )
