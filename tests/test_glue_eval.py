"""GLUE and SuperGLUE tasks evaluate end to end on TFDS mock data (no downloads)."""

import jax
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from mixtures import glue
from mtx import parallel
from mtx.eval import results
from mtx.eval.evaluator import EvalOptions, Evaluator
from mtx.model import T5, T5Config
from mtx.runtime import params as params_lib

_LENGTHS = {"inputs": 48, "targets": 8}
_NUM_EXAMPLES = 4


def _metric_names(task_name):
  """The keys a task's metric_fns return (called on a tiny perfect prediction)."""
  task = seqio.get_mixture_or_task(task_name)
  target, prediction = (["a"], "a") if "record" in task_name else (1.0, 1.0)
  return [k for fn in task.metric_fns for k in fn([target] * 2, [prediction] * 2)]


# One task per kind of metric and postprocessor runs by default; all of them in -m slow.
_SOME = (
  "glue_cola_v002",
  "glue_stsb_v002",
  "glue_mnli_matched_v002",
  "super_glue_cb_v102",
  "super_glue_record_v102",
)
_ALL = glue.GLUE_EVAL_TASKS + glue.SUPER_GLUE_TASKS


@pytest.mark.parametrize(
  "task_names",
  [pytest.param(_SOME, id="some"), pytest.param(_ALL, id="all", marks=pytest.mark.slow)],
)
def test_glue_and_super_glue_evaluate_on_mock_data(tmp_path, monkeypatch, task_names):
  # Mock data has no split sizes; seqio asks for them to decide on in-memory caching.
  monkeypatch.setattr(
    glue.LocalTfdsSource, "num_input_examples", lambda self, split: _NUM_EXAMPLES
  )
  config = T5Config(
    vocab_size=0,
    emb_dim=32,
    num_heads=2,
    head_dim=16,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
  )
  vocab = (
    seqio.get_mixture_or_task(glue.GLUE_MIXTURE).output_features["targets"].vocabulary
  )
  model = T5(params_lib.resolve_model_config(config, vocab.vocab_size))
  mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
  rules = parallel.DEFAULT_RULES
  boxed, _ = params_lib.abstract_params(model, 8, 8)
  shardings = params_lib.param_shardings(boxed, mesh, rules)
  params = params_lib.init_params(model, 0, 8, 8, shardings)
  # One mixture of the tasks: one evaluator, one compilation.
  seqio.MixtureRegistry.remove("test_glue_eval")
  seqio.MixtureRegistry.add("test_glue_eval", task_names, default_rate=1.0)
  with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
    evaluator = Evaluator(
      model,
      mesh,
      rules,
      shardings,
      "test_glue_eval",
      _LENGTHS,
      EvalOptions(batch_size=16),
    )
    out = evaluator.evaluate(params, step=7)
  tasks, primary = out.tasks, out.primary
  assert sorted(tasks) == sorted(task_names)
  for name, values in tasks.items():
    assert values["num_examples"] == _NUM_EXAMPLES, name
    assert np.isfinite(values["loss"]) and values["loss"] > 0, name
    expected = _metric_names(name)
    assert list(values)[: len(expected)] == expected, (name, values)
    assert primary[name] == expected[0]
  assert primary["glue_cola_v002"] == "matthews_corrcoef"
  cb = tasks["super_glue_cb_v102"]
  assert primary["super_glue_cb_v102"] == "accuracy" and "mean_multiclass_f1" in cb
  assert primary["glue_stsb_v002"] == "pearson"
  assert set(tasks["super_glue_record_v102"]) >= {"em", "f1"}
  record = results.write_results(str(tmp_path), out, writer=None)
  assert (tmp_path / "eval" / "step_7.json").exists()
  assert np.isfinite(record["summary"]["mean_primary"])
