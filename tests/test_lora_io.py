"""A LoRA run or saved adapters read back under settings that would change what the
adapters mean are refused, each in one sentence, before anything is written: a LoRA run
read by a model without adapters (export, eval, INITIAL_CHECKPOINT_PATH), saved adapters
of another LoraConfig or other task groups (``train.adapters_path``), and an EXPORT_TASK
that would be ignored. A LoRA run's base is still read on purpose for a new LoRA run.

The "run" here is one checkpoint of the per-task LoRA tiny T5's initial params with the
run's tasks.json, as a LoRA run leaves them, without training (fast)."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tiny_mixture  # noqa: F401  # registers the "tiny" mixture
from loop_helpers import TINY, loop_train

from mtx import mtl
from mtx.cli import evaluate as evaluate_lib
from mtx.cli import export as export_lib
from mtx.data import registry
from mtx.errors import UserError
from mtx.eval.evaluator import EvalOptions
from mtx.model import LoraConfig, lora
from mtx.runtime import adapters_io, checkpoint
from mtx.runtime import params as params_lib
from mtx.train import build as build_lib
from mtx.train import freeze, loop, optim, settings

LORA = LoraConfig(targets="attention/(query|value)$|mlp/wo$", rank=4, per_task=True)
CONFIG = dataclasses.replace(TINY, lora=LORA)
LENGTHS = {"inputs": 16, "targets": 16}
GROUPS = ["tiny_copy", "tiny_rev"]  # the tiny mixture's groups, in adapter-id order


def _leaves(tree) -> dict:
  return {
    freeze.path_str(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """(MODEL_DIR of a per-task LoRA "run" of the tiny T5, its params): step 1 holds the
  model's initial params with the adapters' B set to 1 (so merging them changes the
  kernels), and tasks.json the tiny mixture's tasks, one group each."""
  model_dir = str(tmp_path_factory.mktemp("lora_run"))
  size = registry.resolve("tiny").vocabulary.vocab_size
  config = params_lib.resolve_model_config(
    dataclasses.replace(CONFIG, lora=dataclasses.replace(LORA, num_adapters=2)), size
  )
  model = params_lib.make_model(config)
  params = jax.jit(
    lambda key: nn.unbox(
      model.init(key, **params_lib.dummy_inputs(model, 16, 16))["params"]
    )
  )(jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 1 if freeze.path_str(p).endswith("_b") else x, params
  )
  ckpt = checkpoint.Checkpointer(model_dir, save_period=1)
  ckpt.save(1, {"params": params}, {}, force=True)
  ckpt.close()
  tasks = [{"id": i, "name": name, "group": name} for i, name in enumerate(GROUPS)]
  with open(os.path.join(model_dir, "tasks.json"), "w") as f:
    json.dump({"mixture": "tiny", "tasks": tasks}, f)
  return model_dir, params


def _export(model_dir, out, **kw):
  return export_lib.export(
    model_dir=model_dir, export_dir=out, mixture_or_task_name="tiny", **kw
  )


def test_a_lora_run_read_without_its_lora_config_is_refused(lora_run, tmp_path):
  """Export and eval of a LoRA run with a model that has no adapters would silently use
  the un-adapted base: refused, naming an adapter and the LoRA gin file, and no file is
  written."""
  model_dir, _ = lora_run
  out = tmp_path / "hf"
  with pytest.raises(UserError, match=r"MODEL_DIR .* holds LoRA adapters .*_lora_") as e:
    _export(model_dir, str(out), model_config=TINY)
  assert "--gin_file=adapters/lora.gin" in str(e.value)
  assert not out.exists()
  with pytest.raises(UserError, match="holds LoRA adapters this model lacks"):
    evaluate_lib.evaluate(
      model_dir=model_dir,
      mixture_or_task_name="tiny",
      task_feature_lengths=LENGTHS,
      model_config=TINY,
      options=EvalOptions(max_examples=8, batch_size=8),
      print_table=False,
      tensorboard=False,
    )
  assert sorted(os.listdir(model_dir)) == ["1", "tasks.json"]  # no results written


def _build(model_config):
  data = settings.DataSettings(
    mixture_or_task_name="tiny", task_feature_lengths=LENGTHS, batch_size=8
  )
  step = settings.StepSettings(
    model_config=model_config,
    mtl_transforms=(mtl.pcgrad,),
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-2,
  )
  return build_lib.build_train_step(data, step)


@pytest.mark.slow  # a training run (suite time)
def test_a_lora_run_as_initial_checkpoint_gives_a_lora_model_its_base_only(lora_run):
  """INITIAL_CHECKPOINT_PATH of a LoRA run: a LoRA model reads its base, its adapters
  keep their fresh init; a model without adapters is refused (it would drop them)."""
  model_dir, trained = lora_run
  build = _build(CONFIG)
  with build.mesh:
    got = _leaves(loop.initial_params(build, model_dir))
    fresh = _leaves(build.init_params())
  trained = _leaves(trained)
  for name, value in got.items():
    want = fresh[name] if "_lora_" in name else trained[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
  assert any(not np.array_equal(got[n], trained[n]) for n in got if "_lora_" in n)
  full = _build(TINY)
  with full.mesh, pytest.raises(UserError, match="INITIAL_CHECKPOINT_PATH .* holds LoRA"):
    loop.initial_params(full, model_dir)


def test_saved_adapters_record_their_groups_and_refuse_another_config_or_groups(
  lora_run, tmp_path
):
  """EXPORT_ADAPTERS_ONLY writes the run's groups in adapter order to lora.json; loading
  with another alpha, or for other task groups, is refused naming both; a lora.json
  without groups (saved before they were recorded) still loads."""
  model_dir, trained = lora_run
  out = str(tmp_path / "adapters")
  _export(model_dir, out, model_config=CONFIG, adapters_only=True)
  meta = os.path.join(out, "lora.json")
  with open(meta) as f:
    saved = json.load(f)
  assert saved["task_groups"] == GROUPS and saved["alpha"] == LORA.alpha
  adapters = lora.split(trained)[0]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
  config = dataclasses.replace(LORA, num_adapters=2)
  got = adapters_io.load(out, abstract, config, GROUPS)
  for name, value in _leaves(got).items():
    np.testing.assert_array_equal(value, _leaves(adapters)[name], err_msg=name)
  other_alpha = dataclasses.replace(config, alpha=4.0)
  with pytest.raises(UserError, match=f"{meta}: .*alpha = 16.0 but this model has 4.0"):
    adapters_io.load(out, abstract, other_alpha, GROUPS)
  shared_only = dataclasses.replace(config, per_task=False)
  with pytest.raises(UserError, match="per_task = True but this model has False"):
    adapters_io.load(out, abstract, shared_only, GROUPS)
  with pytest.raises(UserError, match=r"lacks tiny_rev; this run adds tiny_sum"):
    adapters_io.load(out, abstract, config, ["tiny_copy", "tiny_sum"])
  with pytest.raises(UserError, match="the same groups in another order"):
    adapters_io.load(out, abstract, config, GROUPS[::-1])
  del saved["task_groups"]  # as saved before groups were recorded
  with open(meta, "w") as f:
    json.dump(saved, f)
  adapters_io.load(out, abstract, config, ["tiny_copy", "tiny_sum"])
  with pytest.raises(UserError, match="holds 2 per-task adapters but this run has 3"):
    adapters_io.load(out, abstract, dataclasses.replace(config, num_adapters=3), None)


@pytest.mark.slow  # a training run (suite time)
def test_the_trainer_refuses_adapters_saved_for_other_task_groups(lora_run, tmp_path):
  """train.adapters_path of adapters saved for groups (tiny_copy, tiny_rev), in a run
  whose train.task_groups are (a, b): refused before the first step."""
  model_dir, _ = lora_run
  out = str(tmp_path / "adapters")
  _export(model_dir, out, model_config=CONFIG, adapters_only=True)
  run_dir = tmp_path / "new_run"
  with pytest.raises(UserError, match=r"\['tiny_copy', 'tiny_rev'\] but this run's are"):
    loop_train(
      model_dir=str(run_dir),
      mixture_or_task_name="tiny",
      task_feature_lengths=LENGTHS,
      task_groups={"tiny_copy": "a", "tiny_rev": "b"},
      train_steps=1,
      batch_size=8,
      model_config=CONFIG,
      adapters_path=out,
      optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
      learning_rate=1e-2,
      checkpoint_period=0,
      print_param_table=False,
      tensorboard=False,
    )
  assert not run_dir.exists() or not any(p.isdigit() for p in os.listdir(run_dir))


@pytest.mark.parametrize(
  "model_config, adapters_only, match",
  [
    (TINY, False, "has no LoRA adapters"),
    (CONFIG, True, "EXPORT_ADAPTERS_ONLY = True writes every adapter"),
    (
      dataclasses.replace(TINY, lora=dataclasses.replace(LORA, per_task=False)),
      False,
      "has only a shared adapter",
    ),
  ],
)
def test_an_export_task_that_would_be_ignored_is_refused(
  lora_run, tmp_path, model_config, adapters_only, match
):
  """EXPORT_TASK with no LoRA, with EXPORT_ADAPTERS_ONLY, or with a shared adapter only:
  refused before the checkpoint is read, nothing written."""
  model_dir, _ = lora_run
  out = tmp_path / "out"
  with pytest.raises(UserError, match=f"EXPORT_TASK is 'tiny_rev' .*{match}"):
    _export(
      model_dir,
      str(out),
      model_config=model_config,
      adapters_only=adapters_only,
      task="tiny_rev",
    )
  assert not out.exists()
