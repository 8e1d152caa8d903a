"""Writes the LoRA reference fixture of tests/test_lora_export.py (issue #17; run once).

Runs with mtx's venv and calls a second Python that has torch and transformers (mtx
never imports them) through a subprocess:

    python tools/make_lora_fixture.py --ref_python /work/venv-ref/bin/python

1. mtx: reads the base tests/fixtures/hf_t5_v1_1 with mtx's importer, builds the same
   model with ``LORA`` (per-task adapters, T = 2, and a shared one; rank 4, alpha 8;
   attention q/v/out and every MLP kernel), sets every adapter leaf to seeded random
   normal values (std ``ADAPTER_STD``, so that the delta moves the logits visibly) and
   saves them with ``mtx.runtime.adapters_io.save`` to tests/fixtures/lora_t5/
   (adapters.safetensors, lora.json).
2. reference (``REFERENCE_SCRIPT``, in the other Python): loads the base with
   ``transformers`` in float32, adds to each targeted Hugging Face weight
   ``alpha / rank * (A B)^T`` of the shared adapter and of per-task adapter
   ``ADAPTER`` -- its own name and layout mapping, not mtx's ``merge`` nor its exporter
   (mtx kernels are [*in, *out], e.g. query [E, H, D], out [H, D, E], wi_0 [E, M]; HF's
   weights [out, in] with heads flattened as (H, D)) -- and writes its float32 logits on
   the padded inputs of tests/fixtures/hf_reference.npz to
   tests/fixtures/lora_t5_reference.npz.

``--check_export DIR`` instead loads an ``mtx export`` directory (the merged LoRA model)
with transformers and prints the largest |logits - reference|. Measured on 2026-12-01
for the export of the fixture (adapter 1 and the shared one merged):
max |logits - reference| = 1.1e-06 (max |logit| 0.99; tests/test_lora_export.py asks
1e-5 of it). transformers 5.24 warns that the config "specifies to tie shared.weight
to lm_head.weight" for the base fixture and the export alike; both say
tie_word_embeddings false and it leaves them untied.
"""

import argparse
import dataclasses
import json
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
BASE = "hf_t5_v1_1"
ADAPTERS_DIR = "lora_t5"
REFERENCE = "lora_t5_reference.npz"
INPUTS = "hf_reference.npz"  # its encoder_ids and decoder_ids (tools/make_hf_fixtures.py)
LORA = LoraConfig(
  targets="attention/(query|value|out)$|mlp/w",
  rank=4,
  alpha=8.0,
  per_task=True,
  num_adapters=2,
  shared=True,
)
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


def hf_name(stack, layer, module, kernel):
  """mtx "encoder/layers_0/attention/query" -> HF "encoder.block.0.layer.0...q.weight"."""
  block = f"{stack}.block.{layer}.layer"
  if module == "mlp":  # T5's MLP is the last sub-layer: 1 in the encoder, 2 in the decoder
    return f"{block}.{1 if stack == 'encoder' else 2}.DenseReluDense.{kernel}.weight"
  index, hf_module = ATTENTION[module]
  return f"{block}.{index}.{hf_module}.{PROJECTION[kernel]}.weight"


def deltas(adapters, scale, adapter):
  """HF weight name -> scale * (A B)^T, summed over the shared and per-task adapter."""
  out = {}
  for name, a in adapters.items():
    match = NAME.match(name)
    if not match:
      continue
    stack, layer, module, kernel, kind = match.groups()
    b = adapters[name[: -len("a")] + "b"]
    if kind == "task_a":  # [T, *in, r] and [T, r, *out]: adapter `adapter`'s
      a, b = a[adapter], b[adapter]
    rank = a.shape[-1]
    # [*in, r] @ [r, *out] -> [in, out] with heads flattened (H, D); HF is [out, in].
    delta = (torch.tensor(a).reshape(-1, rank) @ torch.tensor(b).reshape(rank, -1)).T
    key = hf_name(stack, layer, module, kernel)
    out[key] = out.get(key, 0) + scale * delta.double()
  return out


def logits(model, inputs):
  with torch.no_grad():
    encoder_ids = torch.tensor(inputs["encoder_ids"].astype(np.int64))
    return model(
      input_ids=encoder_ids,
      attention_mask=encoder_ids != 0,
      decoder_input_ids=torch.tensor(inputs["decoder_ids"].astype(np.int64)),
    ).logits.float().numpy()


def load(directory):
  cls = transformers.T5ForConditionalGeneration
  return cls.from_pretrained(directory, dtype=torch.float32).eval()


def main(mode, *args):
  if mode == "make":
    base, adapters_dir, inputs_path, out, adapter = args
    with open(f"{adapters_dir}/lora.json") as f:
      config = json.load(f)
    adapters = safetensors.numpy.load_file(f"{adapters_dir}/adapters.safetensors")
    model = load(base)
    weights = dict(model.named_parameters())
    with torch.no_grad():
      changes = deltas(adapters, config["alpha"] / config["rank"], int(adapter))
      for key, delta in changes.items():
        assert weights[key].shape == delta.shape, (key, weights[key].shape, delta.shape)
        weights[key].copy_((weights[key].double() + delta).float())
    inputs = dict(np.load(inputs_path))
    result = logits(model, inputs)
    np.savez(out, logits=result, **inputs)
    print(f"{len(changes)} weights adapted; max |logit| {np.abs(result).max():.3f}")
  else:
    directory, reference = args
    want = np.load(reference)
    got = logits(load(directory), dict(want))
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
  parser.add_argument("--out", default=FIXTURES)
  parser.add_argument("--check_export", default=None, help="an mtx export directory")
  args = parser.parse_args(argv)
  reference = os.path.join(args.out, REFERENCE)
  if args.check_export:
    _reference(args.ref_python, "check", args.check_export, reference)
    return
  base_dir = os.path.join(FIXTURES, BASE)
  _, _, abstract = lora_model(base_dir, LORA)
  adapters_dir = os.path.join(args.out, ADAPTERS_DIR)
  adapters_io.save(adapters_dir, random_adapters(abstract, SEED, ADAPTER_STD), LORA)
  with tempfile.TemporaryDirectory() as tmp:
    inputs = os.path.join(tmp, "inputs.npz")
    given = np.load(os.path.join(FIXTURES, INPUTS))
    np.savez(inputs, encoder_ids=given["encoder_ids"], decoder_ids=given["decoder_ids"])
    _reference(
      args.ref_python, "make", base_dir, adapters_dir, inputs, reference, str(ADAPTER)
    )
  with open(os.path.join(adapters_dir, adapters_io.CONFIG_FILE)) as f:
    print(f"Wrote {adapters_dir} ({json.load(f)}) and {reference}.")


if __name__ == "__main__":
  sys.exit(main())
