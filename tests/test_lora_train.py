"""LoRA in the trainer (issue 17): the base stays bit-identical and only adapters train,
per-task adapters train and are routed by each token's task, a merged export loads back
with the adapted model's logits, adapters save alone and load onto a base, and
INITIAL_CHECKPOINT_PATH gives the base while the adapters keep their fresh init."""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_mixture  # noqa: F401  # registers the "tiny" mixture
from loop_helpers import TINY, loop_train

from mtx import mtl
from mtx.cli import evaluate as evaluate_lib
from mtx.cli import export as export_lib
from mtx.errors import UserError
from mtx.eval import periodic as eval_periodic
from mtx.eval import results as results_lib
from mtx.eval.evaluator import EvalOptions, Evaluator
from mtx.model import LoraConfig, lora
from mtx.runtime import adapters_io
from mtx.runtime import params as params_lib
from mtx.train import adapter_ids, adapters, freeze, loop, optim, settings
from mtx.train import build as build_lib

LORA = LoraConfig(targets="attention/(query|value)$|mlp/wo$", rank=4, per_task=True)
CONFIG = dataclasses.replace(TINY, lora=LORA)
LENGTHS = {"inputs": 16, "targets": 16}
EVAL_OPTIONS = EvalOptions(max_examples=8, batch_size=8)


def test_adapter_ids_of_the_packing_worked_example():
  """mtx.data.packing's row (task 0 then task 1) and encoder padding; with tasks
  (0, 1, 2) in groups (0, 0, 1) a token of task 2 uses adapter 1."""
  batch = {
    "decoder_task_ids": np.array([[0, 0, 0, 2, 2]]),
    "decoder_segment_ids": np.array([[1, 1, 1, 2, 2]]),
    "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0]]),
  }
  ids = adapter_ids.batch_adapter_ids(batch, (0, 0, 1))
  np.testing.assert_array_equal(ids["decoder_adapter_ids"], [[0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(ids["encoder_adapter_ids"], [[0, 0, 0, 1, 1, 1, -1]])
  padded = dict(batch, decoder_task_ids=np.array([[0, 0, -1, 2, 2]]))
  np.testing.assert_array_equal(
    adapter_ids.decoder_adapter_ids(padded["decoder_task_ids"], (0, 0, 1)),
    [[0, 0, -1, 1, 1]],
  )


def _data():
  return settings.DataSettings(
    mixture_or_task_name="tiny", task_feature_lengths=LENGTHS, batch_size=8
  )


def _step_settings(**kw):
  return settings.StepSettings(
    model_config=CONFIG,
    mtl_transforms=(mtl.pcgrad,),
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-2,
    **kw,
  )


def _leaves(tree) -> dict:
  return {
    freeze.path_str(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """(MODEL_DIR of a 3-step PCGrad run of per-task LoRA on the tiny T5, its build,
  its initial params)."""
  model_dir = tmp_path_factory.mktemp("lora")
  loop_train(
    model_dir=str(model_dir),
    mixture_or_task_name="tiny",
    task_feature_lengths=LENGTHS,
    train_steps=3,
    batch_size=8,
    model_config=CONFIG,
    mtl_transforms=(mtl.pcgrad,),
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-2,
    log_period=1,
    checkpoint_period=0,
    eval_period=3,
    eval_options=EVAL_OPTIONS,
    print_param_table=False,
    tensorboard=False,
  )
  build = build_lib.build_train_step(_data(), _step_settings())
  with build.mesh:
    initial = build.init_params()
  return model_dir, build, initial


def _final_state(model_dir) -> dict:
  steps = sorted(int(p) for p in os.listdir(model_dir) if p.isdigit())
  return ocp.StandardCheckpointer().restore(
    os.path.join(model_dir, str(steps[-1]), "state")
  )


@pytest.mark.slow  # the module's training run (about a minute on 2 busy cores)
def test_the_build_trains_adapters_only_with_one_per_task_group(lora_run):
  _, build, _ = lora_run
  assert build.model_config.lora.num_adapters == 2  # tiny_copy, tiny_rev
  assert build.settings.trainable_params == "_lora_"
  assert build.step_config.adapter_ids
  names = _leaves(build.trainable_abstract)
  assert names and all("_lora_" in n for n in names)


@pytest.mark.slow  # the module's training run (about a minute on 2 busy cores)
def test_a_lora_run_leaves_the_base_bit_identical_and_trains_each_adapter(lora_run):
  model_dir, _, initial = lora_run
  state = _final_state(model_dir)
  final, start = _leaves(state["params"]), _leaves(initial)
  assert final.keys() == start.keys()
  for name, value in final.items():
    if "_lora_" in name:
      assert not np.array_equal(value, start[name]), name
    else:
      np.testing.assert_array_equal(value, start[name], err_msg=name)
  # Each task's own adapter moved (B starts at 0): per-task adapters train.
  task_b = [v for n, v in final.items() if n.endswith("_lora_task_b")]
  assert task_b and all(np.abs(b[t]).max() > 0 for b in task_b for t in (0, 1))
  opt = [n for n, x in _leaves(state["opt_state"]).items() if x.ndim]
  assert opt and all("_lora_" in n for n in opt)


def _logits(model, params, rows, ids=None):
  inputs = {k: rows[k] for k in params_lib.dummy_batch(1, 1, 1)}
  return np.asarray(model.apply({"params": params}, **inputs, **(ids or {})))


@pytest.mark.slow  # the module's training run (about a minute on 2 busy cores)
def test_merged_export_loads_back_with_the_adapted_logits(lora_run, tmp_path):
  """EXPORT_TASK tiny_rev: the exported Hugging Face T5 (mtx's own importer reads it)
  gives the logits of the unmerged model with tiny_rev's adapter on every token."""
  model_dir, build, _ = lora_run
  out = str(tmp_path / "hf")
  export_lib.export(
    model_dir=str(model_dir),
    export_dir=out,
    model_config=CONFIG,
    mixture_or_task_name="tiny",
    task="tiny_rev",
  )
  rev = adapters_io.task_adapters(str(model_dir))["tiny_rev"]
  assert rev == 1
  base_config = dataclasses.replace(build.model_config, lora=LoraConfig())
  model, params, _ = params_lib.load_trained(
    base_config, base_config.vocab_size, build.mesh, build.rules, out
  )
  trained = _final_state(model_dir)["params"]
  rng = np.random.default_rng(0)
  rows = params_lib.dummy_batch(2, 16, 16)
  rows = dict(rows, encoder_input_tokens=rng.integers(1, 200, (2, 16)))
  rows["decoder_input_tokens"] = rng.integers(1, 200, (2, 16))
  ids = {k: np.full((2, 16), rev, np.int32) for k in ("encoder_adapter_ids",)}
  ids["decoder_adapter_ids"] = np.full((2, 16), rev, np.int32)
  want = _logits(build.model, trained, rows, ids)
  got = _logits(model, params, rows)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow  # the module's training run (about a minute on 2 busy cores)
def test_adapters_save_alone_and_load_onto_a_base(lora_run, tmp_path):
  model_dir, build, initial = lora_run
  out = str(tmp_path / "adapters")
  result = export_lib.export(
    model_dir=str(model_dir),
    export_dir=out,
    model_config=CONFIG,
    mixture_or_task_name="tiny",
    adapters_only=True,
  )
  assert sorted(os.listdir(out)) == ["adapters.safetensors", "lora.json"]
  assert len(result.files) == 2
  trained = _leaves(_final_state(model_dir)["params"])
  with build.mesh:
    loaded = _leaves(
      adapters_io.replace_adapters(
        initial, out, build.model_config.lora, build.spec.group_names
      )
    )
  for name, value in loaded.items():
    want = trained[name] if "_lora_" in name else np.asarray(_leaves(initial)[name])
    np.testing.assert_array_equal(value, want, err_msg=name)


@pytest.mark.slow  # the module's training run (about a minute on 2 busy cores)
def test_initial_checkpoint_gives_the_base_and_adapters_keep_their_init(
  lora_run, tmp_path
):
  """A Hugging Face T5 as INITIAL_CHECKPOINT_PATH (the merged export of the run): the
  base is its weights, the adapters the values a fresh run starts with."""
  model_dir, build, initial = lora_run
  out = str(tmp_path / "hf")
  export_lib.export(
    model_dir=str(model_dir),
    export_dir=out,
    model_config=CONFIG,
    mixture_or_task_name="tiny",
  )
  base_config = dataclasses.replace(build.model_config, lora=LoraConfig())
  _, exported, _ = params_lib.load_trained(
    base_config, base_config.vocab_size, build.mesh, build.rules, out
  )
  with build.mesh:
    params = _leaves(loop.initial_params(build, out))
  exported, start = _leaves(exported), _leaves(initial)
  for name, value in params.items():
    want = start[name] if "_lora_" in name else exported[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
  _, base = lora.split(_final_state(model_dir)["params"])
  assert any(  # the merged kernels differ from the run's base: the adapters are in them
    not np.array_equal(params[n], v) for n, v in _leaves(base).items()
  )


@pytest.mark.slow  # the module's training run
def test_for_task_merges_that_tasks_adapter_for_eval_and_infer(lora_run):
  """What eval and infer decode with: tiny_rev's model is the base with the shared and
  tiny_rev's adapters merged in (the unmerged model's logits with adapter 1 on every
  token); tiny_copy's differs."""
  model_dir, build, _ = lora_run
  trained = _final_state(model_dir)["params"]
  rows = dict(params_lib.dummy_batch(2, 16, 16))
  rng = np.random.default_rng(1)
  rows["encoder_input_tokens"] = rng.integers(1, 200, (2, 16))
  rows["decoder_input_tokens"] = rng.integers(1, 200, (2, 16))
  ids = {k: np.full((2, 16), 1, np.int32) for k in ADAPTER_IDS}
  want = _logits(build.model, trained, rows, ids)
  model, params, shardings = adapters_io.for_task(
    build.model, trained, build.param_shardings, "tiny_rev", str(model_dir)
  )
  assert not model.config.lora.enabled
  assert jax.tree.structure(shardings) == jax.tree.structure(params)
  got = _logits(model, params, rows)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  _, copy_params, _ = adapters_io.for_task(
    build.model, trained, build.param_shardings, "tiny_copy", str(model_dir)
  )
  assert not np.allclose(_logits(model, copy_params, rows), want)


ADAPTER_IDS = ("encoder_adapter_ids", "decoder_adapter_ids")


@pytest.mark.slow  # the module's training run, and decoding
def test_mtx_eval_and_eval_in_training_score_each_task_with_its_own_adapter(lora_run):
  """The trainer's periodic eval (task -> adapter from the mixture's groups) and
  ``mtx eval`` (from the run's tasks.json) give the same per-task results; scoring a
  task with the other task's adapter gives another loss, so the adapter matters."""
  model_dir, build, _ = lora_run
  in_training = results_lib.read_results(str(model_dir), 3)
  report = evaluate_lib.evaluate(
    model_dir=str(model_dir),
    mixture_or_task_name="tiny",
    task_feature_lengths=LENGTHS,
    model_config=CONFIG,
    options=EVAL_OPTIONS,
    print_table=False,
  )
  assert report.step == 3
  after = results_lib.read_results(str(model_dir), 3)
  assert sorted(after["tasks"]) == ["tiny_copy", "tiny_rev"]
  for task, values in after["tasks"].items():
    for metric, value in values.items():
      assert in_training["tasks"][task][metric] == pytest.approx(value, rel=1e-5), (
        task,
        metric,
      )
  params = _final_state(model_dir)["params"]
  model = params_lib.make_model(build.model_config)
  base, merged, shardings = adapters_io.merged(model, params, build.param_shardings, 1)
  with build.mesh:
    evaluator = Evaluator(
      base, build.mesh, build.rules, shardings, "tiny_copy", LENGTHS, EVAL_OPTIONS
    )
    try:
      other = evaluator.evaluate(merged, 3)  # tiny_copy with tiny_rev's adapter
    finally:
      evaluator.close()
  assert other.tasks["tiny_copy"]["loss"] != pytest.approx(
    after["tasks"]["tiny_copy"]["loss"], rel=1e-4
  )


def test_per_task_adapters_refuse_a_count_or_an_eval_task_that_does_not_fit():
  """num_adapters set to another number than the task groups, and an eval task with no
  adapter, are one-sentence errors; EVAL_MIXTURE_OR_TASK_NAME picks the eval tasks."""
  with pytest.raises(UserError, match="num_adapters is 3 but the mixture has 2"):
    adapters.attach(
      dataclasses.replace(TINY, lora=dataclasses.replace(LORA, num_adapters=3)), 2
    )
  assert adapters.attach(CONFIG, 2).lora.num_adapters == 2
  options = EvalOptions()
  assert eval_periodic.per_task_names(
    "tiny", options, {"tiny_copy": 0, "tiny_rev": 1}
  ) == [
    "tiny_copy",
    "tiny_rev",
  ]
  only_rev = dataclasses.replace(options, mixture_or_task_name="tiny_rev")
  assert eval_periodic.per_task_names(
    "tiny", only_rev, {"tiny_copy": 0, "tiny_rev": 1}
  ) == ["tiny_rev"]
  with pytest.raises(UserError, match="tiny_rev of 'tiny' have no per-task adapter"):
    eval_periodic.per_task_names("tiny", options, {"tiny_copy": 0})
