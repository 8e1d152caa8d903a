"""LoRA against an independent reference (issue #17): mtx's adapted logits and its merged
export equal a LoRA applied by transformers itself, for T5 and Llama.

tests/fixtures/lora_t5/ (adapters.safetensors, lora.json: per-task adapters T = 2 and a
shared one, rank 4, on attention q/v/out and the MLP of the base hf_t5_v1_1),
lora_llama/ (the same on attention q/k/v/out and the MLP of hf_llama), and their
lora_*_reference.npz (transformers' float32 logits of the base with the shared adapter
and per-task adapter 1 added to its weights, mapped to Hugging Face's names and layouts
by the tool itself, and the inputs) were written by tools/make_lora_fixture.py.
"""

import dataclasses
import importlib.util
import json
import os
from typing import Any

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
_spec = importlib.util.spec_from_file_location(
  "make_lora_fixture", os.path.join(HERE, "..", "tools", "make_lora_fixture.py")
)
make_lora_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_lora_fixture)
ADAPTER = make_lora_fixture.ADAPTER  # the per-task adapter the reference applied
TASKS = ["task_a", "task_b"]  # a run's tasks, one group each: task_b has adapter 1


@dataclasses.dataclass(frozen=True)
class Adapted:
  """A family's LoRA model on its fixture: the base and the fixture's adapters."""

  family: str
  base: str  # the Hugging Face base directory
  model: Any
  params: Any
  reference: Any  # the npz: logits and the inputs


def _close(got, want):
  """Equal within 1e-5 of the largest |logit| (float32 summation order)."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope="module", params=sorted(make_lora_fixture.FIXTURES_BY_FAMILY))
def adapted(request):
  fixture = make_lora_fixture.FIXTURES_BY_FAMILY[request.param]
  adapters_dir = os.path.join(FIXTURES, fixture.adapters)
  with open(os.path.join(adapters_dir, adapters_io.CONFIG_FILE)) as f:
    config = LoraConfig(**json.load(f))
  base = os.path.join(FIXTURES, fixture.base)
  model, params, abstract = make_lora_fixture.lora_model(base, config)
  adapters = adapters_io.load(adapters_dir, abstract, config, what="the fixture")
  reference = np.load(os.path.join(FIXTURES, fixture.reference))
  return Adapted(request.param, base, model, lora.combine(params, adapters), reference)


def _logits(adapted, model, params, adapter=None):
  """The model's logits on the reference's inputs; ``adapter`` on every token (padding
  included, as a merged model has it) or none."""
  reference = adapted.reference
  names = ("ids",) if adapted.family == "llama" else ("encoder_ids", "decoder_ids")
  inputs = [jnp.asarray(reference[n]) for n in names]
  ids = {}
  if adapter is not None:
    keys = ["decoder_adapter_ids"]
    if adapted.family == "t5":
      keys = ["encoder_adapter_ids", "decoder_adapter_ids"]
    ids = {k: jnp.full(x.shape, adapter, jnp.int32) for k, x in zip(keys, inputs)}
  apply = jax.jit(model.apply)  # one compile for both adapters' ids
  return np.asarray(apply({"params": params}, *inputs, **ids))


def test_adapted_logits_equal_transformers_with_the_adapters_added(adapted):
  """Adapter 1 on every token gives the reference's logits; adapter 0 does not (the
  reference is not the base's either: the adapters move the logits by ~0.4)."""
  want = adapted.reference["logits"]
  _close(_logits(adapted, adapted.model, adapted.params, ADAPTER), want)
  other = _logits(adapted, adapted.model, adapted.params, 1 - ADAPTER)
  assert np.abs(other - want).max() > 1e-2


def test_merged_export_reloads_with_the_reference_logits(adapted, tmp_path):
  """``mtx export`` of a LoRA run (an mtx checkpoint whose base came from a Hugging Face
  INITIAL_CHECKPOINT_PATH) with EXPORT_TASK task_b writes a plain Hugging Face directory
  that mtx's importer reads back with the reference's logits."""
  model = adapted.model
  run = tmp_path / "run"
  ckpt = checkpoint.Checkpointer(str(run), save_period=0, async_save=False)
  ckpt.save(1, {"params": adapted.params}, {}, force=True)
  ckpt.close()
  tasks = [{"name": t, "group": t} for t in TASKS]
  (run / adapters_io.TASKS_FILE).write_text(json.dumps({"tasks": tasks}))
  out = str(tmp_path / "hf")
  export_lib.export(
    model_dir=str(run),
    export_dir=out,
    initial_checkpoint_path=adapted.base,
    model_config=type(model.config)(lora=model.config.lora),
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
  want = adapted.reference["logits"]
  _close(_logits(adapted, exported_model, exported), want)
