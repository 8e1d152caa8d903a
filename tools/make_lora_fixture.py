"""Writes the LoRA reference fixtures of tests/test_lora_export.py (issue #17; run once).

Runs with mtx's venv and calls a second Python that has torch and transformers (mtx
never imports them) through a subprocess:

    python tools/make_lora_fixture.py --ref_python /work/venv-ref/bin/python
    python tools/make_lora_fixture.py --ref_python /work/venv-ref/bin/python \
      --family llama

For each family (``FIXTURES_BY_FAMILY``; T5: the base tests/fixtures/hf_t5_v1_1,
attention q/v/out and every MLP kernel; Llama: hf_llama, attention q/k/v/out and every
MLP kernel; both with per-task adapters, T = 2, and a shared one, rank 4, alpha 8):

1. mtx: reads the base with mtx's importer, builds the same model with the LoRA
   config, sets every adapter leaf to seeded random normal values (std
   ``ADAPTER_STD``, so that the delta moves the logits by ~0.4 where they are ~1) and
   saves them with ``mtx.runtime.adapters_io.save`` to tests/fixtures/lora_t5/ (or
   lora_llama/): adapters.safetensors, lora.json.
2. reference (``REFERENCE_SCRIPT``, in the other Python): loads the base with
   ``transformers`` in float32, adds to each targeted Hugging Face weight
   ``alpha / rank * (A B)^T`` of the shared adapter and of per-task adapter
   ``ADAPTER`` -- its own name and layout mapping, not mtx's ``merge`` nor its exporter
   (mtx kernels are [*in, *out], e.g. query [E, H, D], out [H, D, E], wi_0 [E, M]; HF's
   weights [out, in] with heads flattened as (H, D)) -- and writes its float32 logits on
   the inputs of tests/fixtures/hf_reference.npz (T5: padded encoder and decoder ids) or
   hf_llama_reference.npz (Llama) to tests/fixtures/lora_t5_reference.npz (or
   lora_llama_reference.npz), with those inputs.

``--check_export DIR`` instead loads an ``mtx export`` directory (the merged LoRA model,
EXPORT_TASK giving adapter 1) with transformers and prints the largest
|logits - reference|. Measured on 2026-12-01 on the exports tests/test_lora_export.py
makes from the fixtures: T5 1.1e-06 (max |logit| 0.99), Llama 7.8e-07 (max |logit|
1.36); the test asks 1e-5 of max |logit|. transformers 5.24 warns, for the base
fixtures and the exports alike, that the T5 config "specifies to tie shared.weight to
lm_head.weight" (both say tie_word_embeddings false and it leaves them untied) and that
hf_llama's original_max_position_embeddings is not below max_position_embeddings.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from mtx import parallel
from mtx.model import LoraConfig, T5Config, lora
from mtx.runtime import adapters_io, pretrained
from mtx.runtime import params as params_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


@dataclasses.dataclass(frozen=True)
class Fixture:
  """One family's fixture: its base, its adapters and reference, and their inputs."""

  base: str  # a Hugging Face directory of tests/fixtures
  adapters: str  # the folder adapters_io.save writes
  reference: str  # the reference's npz
  inputs: str  # the npz of tools/make_hf_fixtures.py whose ids are used
  input_keys: tuple
  lora: LoraConfig


def _lora(targets: str) -> LoraConfig:
  return LoraConfig(
    targets=targets, rank=4, alpha=8.0, per_task=True, num_adapters=2, shared=True
  )


FIXTURES_BY_FAMILY = {
  "t5": Fixture(
    base="hf_t5_v1_1",
    adapters="lora_t5",
    reference="lora_t5_reference.npz",
    inputs="hf_reference.npz",
    input_keys=("encoder_ids", "decoder_ids"),
    lora=_lora("attention/(query|value|out)$|mlp/w"),
  ),
  # mtx's Llama importer does not permute q/k (RoPE is rotate-half in both), so every
  # attention kernel can be adapted; "llama3" RoPE scaling and grouped-query attention.
  "llama": Fixture(
    base="hf_llama",
    adapters="lora_llama",
    reference="lora_llama_reference.npz",
    inputs="hf_llama_reference.npz",
    input_keys=("ids",),
    lora=_lora("attention/(query|key|value|out)$|mlp/w"),
  ),
}
ADAPTER = 1  # the per-task adapter the reference applies (with the shared one)
ADAPTER_STD = 0.05
SEED = 17

# Runs in the reference Python (torch, transformers, safetensors, numpy; no mtx).
REFERENCE_SCRIPT = r'''
import json, re, sys
import numpy as np
import safetensors.numpy
import torch
import transformers

ATTENTION = {  # mtx module -> (HF layer index, HF module)
  "attention": (0, "SelfAttention"),
  "self_attention": (0, "SelfAttention"),
  "encoder_decoder_attention": (1, "EncDecAttention"),
}
PROJECTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
NAME = re.compile(r"^(encoder|decoder)/layers_(\d+)/(\w+)/(\w+?)_lora_(a|task_a)$")


LLAMA_MLP = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}


def hf_name(family, stack, layer, module, kernel):
  """mtx "encoder/layers_0/attention/query" -> HF "encoder.block.0.layer.0...q.weight";
  Llama's "decoder/layers_0/self_attention/query" -> "model.layers.0.self_attn.q_proj...".
  """
  if family == "llama":
    if module == "mlp":
      return f"model.layers.{layer}.mlp.{LLAMA_MLP[kernel]}.weight"
    assert module == "self_attention", module
    return f"model.layers.{layer}.self_attn.{PROJECTION[kernel]}_proj.weight"
  block = f"{stack}.block.{layer}.layer"
  if module == "mlp":  # the last sub-layer: 1 in the encoder, 2 in the decoder
    return f"{block}.{1 if stack == 'encoder' else 2}.DenseReluDense.{kernel}.weight"
  index, hf_module = ATTENTION[module]
  return f"{block}.{index}.{hf_module}.{PROJECTION[kernel]}.weight"


def deltas(family, adapters, scale, adapter):
  """HF weight name -> scale * (A B)^T, summed over the shared and per-task adapter."""
  out = {}
  for name, a in adapters.items():
    if name.endswith("_b"):
      continue
    match = NAME.match(name)
    assert match, f"an adapter name the reference cannot map: {name}"
    stack, layer, module, kernel, kind = match.groups()
    b = adapters[name[: -len("a")] + "b"]
    if kind == "task_a":  # [T, *in, r] and [T, r, *out]: adapter `adapter`'s
      a, b = a[adapter], b[adapter]
    rank = a.shape[-1]
    # [*in, r] @ [r, *out] -> [in, out] with heads flattened (H, D); HF is [out, in].
    delta = (torch.tensor(a).reshape(-1, rank) @ torch.tensor(b).reshape(rank, -1)).T
    key = hf_name(family, stack, layer, module, kernel)
    out[key] = out.get(key, 0) + scale * delta.double()
  return out


def logits(family, model, inputs):
  with torch.no_grad():
    if family == "llama":
      ids = torch.tensor(inputs["ids"].astype(np.int64))
      return model(input_ids=ids).logits.float().numpy()
    encoder_ids = torch.tensor(inputs["encoder_ids"].astype(np.int64))
    return model(
      input_ids=encoder_ids,
      attention_mask=encoder_ids != 0,
      decoder_input_ids=torch.tensor(inputs["decoder_ids"].astype(np.int64)),
    ).logits.float().numpy()


def load(family, directory):
  if family == "llama":
    cls = transformers.AutoModelForCausalLM
  else:
    cls = transformers.T5ForConditionalGeneration
  return cls.from_pretrained(directory, dtype=torch.float32).eval()


def main(mode, family, *args):
  if mode == "make":
    base, adapters_dir, inputs_path, out, adapter = args
    with open(f"{adapters_dir}/lora.json") as f:
      config = json.load(f)
    adapters = safetensors.numpy.load_file(f"{adapters_dir}/adapters.safetensors")
    model = load(family, base)
    weights = dict(model.named_parameters())
    scale = config["alpha"] / config["rank"]
    with torch.no_grad():
      changes = deltas(family, adapters, scale, int(adapter))
      for key, delta in changes.items():
        assert weights[key].shape == delta.shape, (key, weights[key].shape, delta.shape)
        weights[key].copy_((weights[key].double() + delta).float())
    inputs = dict(np.load(inputs_path))
    result = logits(family, model, inputs)
    np.savez(out, logits=result, **inputs)
    print(f"{len(changes)} weights adapted; max |logit| {np.abs(result).max():.3f}")
  else:
    directory, reference = args
    want = np.load(reference)
    got = logits(family, load(family, directory), dict(want))
    print(f"max |logits - reference| = {np.abs(got - want['logits']).max():.3e} "
          f"(max |logit| {np.abs(want['logits']).max():.3f})")


main(*sys.argv[1:])
'''


def lora_model(base_dir: str, config: LoraConfig):
  """(the LoRA model, the base params read from ``base_dir``, the abstract adapter
  subtree) on one device; ``lora.combine(base, adapters)`` gives the model's params."""
  model_config, _ = pretrained.resolve(base_dir, T5Config(), None, "the base")
  mesh = parallel.make_mesh(None, jax.devices()[:1])
  _, base, _ = params_lib.load_trained(
    model_config,
    model_config.vocab_size,
    mesh,
    parallel.DEFAULT_RULES,
    base_dir,
    what="the base",
  )
  model = params_lib.make_model(dataclasses.replace(model_config, lora=config))
  _, abstract = params_lib.abstract_params(model, 8, 8)
  return model, base, lora.split(abstract)[0]


def random_adapters(abstract_adapters, seed: int, std: float):
  """Seeded normal values of std ``std`` for every adapter leaf (float32)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda leaf: (rng.standard_normal(leaf.shape) * std).astype(np.float32),
    abstract_adapters,
  )


def _reference(ref_python: str, *args: str) -> None:
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(REFERENCE_SCRIPT)
  try:
    subprocess.run([ref_python, f.name, *args], check=True)
  finally:
    os.remove(f.name)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ref_python", required=True, help="a Python with transformers")
  parser.add_argument("--family", choices=sorted(FIXTURES_BY_FAMILY), default="t5")
  parser.add_argument("--out", default=FIXTURES)
  parser.add_argument("--check_export", default=None, help="an mtx export directory")
  args = parser.parse_args(argv)
  fixture = FIXTURES_BY_FAMILY[args.family]
  reference = os.path.join(args.out, fixture.reference)
  if args.check_export:
    _reference(args.ref_python, "check", args.family, args.check_export, reference)
    return
  base_dir = os.path.join(FIXTURES, fixture.base)
  _, _, abstract = lora_model(base_dir, fixture.lora)
  adapters_dir = os.path.join(args.out, fixture.adapters)
  adapters = random_adapters(abstract, SEED, ADAPTER_STD)
  adapters_io.save(adapters_dir, adapters, fixture.lora)
  with tempfile.TemporaryDirectory() as tmp:
    inputs = os.path.join(tmp, "inputs.npz")
    given = np.load(os.path.join(FIXTURES, fixture.inputs))
    np.savez(inputs, **{k: given[k] for k in fixture.input_keys})
    _reference(
      args.ref_python,
      *("make", args.family, base_dir, adapters_dir, inputs, reference, str(ADAPTER)),
    )
  print(f"Wrote {adapters_dir} and {reference}.")


if __name__ == "__main__":
  sys.exit(main())
