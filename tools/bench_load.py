"""Times loading T5-base-sized random weights from safetensors: mtx against transformers.

    python tools/bench_load.py --dir /tmp/t5_base_random          # writes it once, then times mtx
    /path/to/venv-with-transformers/bin/python tools/bench_load.py --dir /tmp/t5_base_random \\
      --transformers                                               # times transformers too

The first run writes a Hugging Face directory of T5 v1.1-base shape (d_model 768, 12+12
layers, d_ff 2048, vocabulary 32128: about 248M float32 parameters, ~1 GB) with random
weights, using numpy and safetensors only. mtx's time is ``pretrained.resolve`` +
``params.load_trained`` (lazy, per-device slices, every param on the device) on all local
devices; transformers' is ``T5ForConditionalGeneration.from_pretrained`` in float32.
Each is the best of ``--repeats`` runs in this process (the file is in the page cache).
transformers memory-maps the file, so its time includes one pass over every weight, which
reads it; mtx copies every weight into device buffers.
"""

import argparse
import json
import os
import time

import numpy as np

BASE = dict(
  vocab_size=32128,
  d_model=768,
  d_kv=64,
  d_ff=2048,
  num_layers=12,
  num_decoder_layers=12,
  num_heads=12,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
)


def write_random(directory: str) -> None:
  """A T5 v1.1-base-shaped HF directory with random float32 weights."""
  # lazy: mtx loads only for the mtx half (the transformers half may run without it).
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  from mtx.model import T5Config  # pylint: disable=g-import-not-at-top # lazy: optional
  from mtx.runtime import hf  # pylint: disable=g-import-not-at-top # lazy: optional

  config = T5Config(**hf.model_config_fields(BASE))
  rng = np.random.default_rng(0)
  tensors = {}
  shapes = hf.mtx_shapes(config)
  for name, (hf_name, kind) in hf.name_map(config).items():
    shape = hf.hf_shape(shapes[name], kind)
    tensors[hf_name] = rng.standard_normal(shape, np.float32) * 0.05
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(
    tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf.hf_config(config), f, indent=2)


def time_mtx(directory: str, repeats: int) -> tuple[float, int]:
  import jax  # pylint: disable=g-import-not-at-top

  from mtx import parallel  # pylint: disable=g-import-not-at-top # lazy: optional
  from mtx.model import T5Config  # pylint: disable=g-import-not-at-top # lazy: optional
  from mtx.runtime import params as params_lib  # lazy: optional
  from mtx.runtime import pretrained  # pylint: disable=g-import-not-at-top # lazy: optional

  best, count = (float("inf"),) * 2, 0
  for _ in range(repeats):
    start = time.perf_counter()
    config, _ = pretrained.resolve(directory, T5Config(), "unused", "bench")
    mesh = parallel.make_mesh(None, None)
    model = params_lib.T5(config)
    boxed, abstract = params_lib.abstract_params(model, 8, 8)
    shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    traced = time.perf_counter()
    params = pretrained.load(directory, target, config.scan_layers, "bench")
    jax.block_until_ready(params)
    end = time.perf_counter()
    best = min(best, (end - start, end - traced))
    count = sum(x.size for x in jax.tree.leaves(params))
    del params
  return best, count


def time_transformers(directory: str, repeats: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  best = (float("inf"),) * 2
  for _ in range(repeats):
    start = time.perf_counter()
    model = transformers.T5ForConditionalGeneration.from_pretrained(
      directory, dtype=torch.float32
    )
    loaded = time.perf_counter()
    with torch.no_grad():  # safetensors are memory-mapped: touch every weight once
      sum(float(p.sum()) for p in model.parameters())
    end = time.perf_counter()
    best = min(best, (loaded - start, end - start))
    del model
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default="/tmp/mtx_t5_base_random")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--transformers", action="store_true", help="time transformers too")
  parser.add_argument("--no_mtx", action="store_true", help="skip mtx's half")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
    write_random(args.dir)
  size = os.path.getsize(os.path.join(args.dir, "model.safetensors")) / 2**30
  print(f"{args.dir}: model.safetensors {size:.2f} GiB")
  results = {}
  if not args.no_mtx:
    (total, read), count = time_mtx(args.dir, args.repeats)
    results["mtx"] = total
    print(
      f"mtx:          {total:6.2f} s  ({count / 1e6:.0f}M params; {read:.2f} s reading "
      f"into device arrays, the rest tracing the model's shapes)"
    )
  if args.transformers:
    lazy, touched = time_transformers(args.dir, args.repeats)
    results["transformers"] = touched
    print(
      f"transformers: {touched:6.2f} s  (from_pretrained {lazy:.2f} s, memory-mapped; "
      "the rest reading every weight once)"
    )
  if len(results) == 2:
    print(f"mtx / transformers: {results['mtx'] / results['transformers']:.2f}")


if __name__ == "__main__":
  main()
