"""LoRA against an independent reference (issue #17): mtx's adapted logits and its merged
export equal a LoRA applied by transformers itself.

tests/fixtures/lora_t5/ (adapters.safetensors, lora.json: per-task adapters T = 2 and a
shared one, rank 4, on attention q/v/out and the MLP of the base hf_t5_v1_1) and
lora_t5_reference.npz (transformers' float32 logits of the base with the shared adapter
and per-task adapter 1 added to its weights, mapped to Hugging Face's names and layouts
by the tool itself) were written by tools/make_lora_fixture.py.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx import parallel
from mtx.cli import export as export_lib
from mtx.model import LoraConfig, T5Config, lora
from mtx.runtime import adapters_io, checkpoint, pretrained
from mtx.runtime import params as params_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
BASE = os.path.join(FIXTURES, "hf_t5_v1_1")
ADAPTERS = os.path.join(FIXTURES, "lora_t5")
REFERENCE = np.load(os.path.join(FIXTURES, "lora_t5_reference.npz"))
_spec = importlib.util.spec_from_file_location(
  "make_lora_fixture", os.path.join(HERE, "..", "tools", "make_lora_fixture.py")
)
make_lora_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_lora_fixture)
ADAPTER = make_lora_fixture.ADAPTER  # the per-task adapter the reference applied
TASKS = ["task_a", "task_b"]  # a run's tasks, one group each: task_b has adapter 1


def _config() -> LoraConfig:
  with open(os.path.join(ADAPTERS, adapters_io.CONFIG_FILE)) as f:
    return LoraConfig(**json.load(f))


def _close(got, want=REFERENCE["logits"]):
  """Equal within 1e-5 of the largest |logit| (float32 summation order)."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope="module")
def adapted():
  """(the LoRA model, its params: the base hf_t5_v1_1 and the fixture's adapters)."""
  model, base, abstract = make_lora_fixture.lora_model(BASE, _config())
  return model, lora.combine(base, adapters_io.load(ADAPTERS, abstract, "the fixture"))


def _logits(model, params, adapter=None):
  encoder_ids = jnp.asarray(REFERENCE["encoder_ids"])
  decoder_ids = jnp.asarray(REFERENCE["decoder_ids"])
  ids = {}
  if adapter is not None:  # this adapter on every token, padding included (as merged)
    ids = {
      "encoder_adapter_ids": jnp.full(encoder_ids.shape, adapter, jnp.int32),
      "decoder_adapter_ids": jnp.full(decoder_ids.shape, adapter, jnp.int32),
    }
  apply = jax.jit(model.apply)  # one compile for both adapters' ids
  return np.asarray(apply({"params": params}, encoder_ids, decoder_ids, **ids))


def test_adapted_logits_equal_transformers_with_the_adapters_added(adapted):
  """Adapter 1 on every token gives the reference's logits; adapter 0 does not (the
  reference is not the base's either: the adapters move the logits by ~0.4)."""
  model, params = adapted
  _close(_logits(model, params, ADAPTER))
  other = _logits(model, params, 1 - ADAPTER)
  assert np.abs(other - REFERENCE["logits"]).max() > 1e-2


def test_merged_export_reloads_with_the_reference_logits(adapted, tmp_path):
  """``mtx export`` of a LoRA run (an mtx checkpoint whose base came from a Hugging Face
  INITIAL_CHECKPOINT_PATH) with EXPORT_TASK task_b writes a plain T5 directory that
  mtx's Hugging Face importer reads back with the reference's logits."""
  model, params = adapted
  run = tmp_path / "run"
  ckpt = checkpoint.Checkpointer(str(run), save_period=0, async_save=False)
  ckpt.save(1, {"params": params}, {}, force=True)
  ckpt.close()
  tasks = [{"name": t, "group": t} for t in TASKS]
  (run / adapters_io.TASKS_FILE).write_text(json.dumps({"tasks": tasks}))
  out = str(tmp_path / "hf")
  export_lib.export(
    model_dir=str(run),
    export_dir=out,
    initial_checkpoint_path=BASE,
    model_config=T5Config(lora=model.config.lora),
    devices=jax.devices()[:1],
    task=TASKS[ADAPTER],
  )
  assert not any("lora" in f for f in os.listdir(out))
  base_config, _ = pretrained.resolve(out, T5Config(), None, "the export")
  assert base_config == dataclasses.replace(model.config, lora=LoraConfig())
  exported_model, exported, _ = params_lib.load_trained(
    base_config,
    base_config.vocab_size,
    parallel.make_mesh(None, jax.devices()[:1]),
    parallel.DEFAULT_RULES,
    out,
    what="the export",
  )
  _close(_logits(exported_model, exported))
