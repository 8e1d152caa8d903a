"""Writes a T5X-format checkpoint from mtx params, the way ``t5x/checkpoints.py`` does.

It makes the committed fixture of ``tests/test_t5x_checkpoint.py`` (a tiny random mtx T5),
or converts an ``.npz`` of mtx-layout params (keys are mtx's unscanned param paths)::

  python tools/make_t5x_fixture.py tests/fixtures/t5x_tiny           # the test fixture
  python tools/make_t5x_fixture.py OUT_DIR --npz params.npz --step 5000

What it writes (``Checkpointer.save`` and ``_get_param_info`` of T5X, ``VERSION = 3``)::

  OUT_DIR/checkpoint_<step>/
    checkpoint     flax msgpack of {"version": 3, "optimizer": {"target": params,
                   "state": {"step": int32, "param_states": {<param>: {"m": f32[1]}}}}}
    target.<param path with '.' for '/'>/   zarr, gzip, chunks of at most 64 MiB
                   (T5X's _choose_chunk_shape); the msgpack holds the spec's JSON

Params go to tensorstore except the ``--inline`` ones, which go into the msgpack as
arrays (T5X does that for a leaf without partitioning axes; its own test checkpoint holds
every param so). ``--bf16`` params are stored as zarr ``bfloat16``, as T5X saves with
``SaveCheckpointConfig.dtype='bfloat16'``; ``--zstd`` ones with jax's array metadata
(zstd, one chunk per shard), as T5X writes a ``jax.Array``. For the fixture, the bf16
param is rounded to bf16 in the ``.npz`` too, so the npz is exactly what the checkpoint
holds. The step directory is written as ``checkpoint_<step>.tmp-<time>`` and renamed.
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import serialization

from mtx.model.t5 import T5, T5Config
from mtx.runtime import params as params_lib

VERSION = 3
DESIRED_CHUNK_SIZE_BYTES = 64 * 1024 * 1024
TINY = dict(
  vocab_size=32,
  emb_dim=8,
  num_heads=2,
  head_dim=4,
  mlp_dim=16,
  num_encoder_layers=2,
  num_decoder_layers=2,
)
TINY_BF16 = ("encoder/layers_0/mlp/wi_0",)
TINY_ZSTD = ("token_embedder/embedding",)
_ATTENTION = ("attention", "self_attention", "encoder_decoder_attention")


def choose_chunk_shape(write_shape, target_elements):
  """T5X's ``_choose_chunk_shape``: halve the largest dimension's divisors greedily."""
  dim_factors = [[i for i in range(1, n + 1) if n % i == 0] for n in write_shape]
  while np.prod([f[-1] for f in dim_factors]) > target_elements:
    largest = max(range(len(dim_factors)), key=lambda i: dim_factors[i][-1])
    dim_factors[largest].pop()
  return [f[-1] for f in dim_factors]


def to_t5x(name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
  """mtx name and layout -> T5X's (t5.network: 2-D kernels with a ``kernel`` level)."""
  parts = name.split("/")
  if len(parts) >= 2 and parts[-2] in _ATTENTION:
    if parts[-1] == "out":  # [H, D, E] -> [H*D, E]
      arr = arr.reshape(-1, arr.shape[-1])
    else:  # [E, H, D] -> [E, H*D]
      arr = arr.reshape(arr.shape[0], -1)
    return name + "/kernel", arr
  if len(parts) >= 2 and parts[-2] == "mlp":
    return name + "/kernel", arr
  return name, arr


def _spec(t5x_name: str, arr: np.ndarray, dtype: str, zstd: bool) -> dict:
  """The tensorstore spec T5X writes for a param, as JSON (what the msgpack holds)."""
  if zstd:  # jax's array_serialization metadata for a single-shard jax.Array
    metadata = {"compressor": {"id": "zstd"}, "shape": arr.shape, "chunks": arr.shape}
  else:
    chunks = choose_chunk_shape(
      arr.shape, DESIRED_CHUNK_SIZE_BYTES / np.dtype(dtype).itemsize
    )
    metadata = {"compressor": {"id": "gzip"}, "shape": arr.shape, "chunks": chunks}
  spec = {
    "driver": "zarr",
    "dtype": dtype,
    "kvstore": {"driver": "file", "path": "target." + t5x_name.replace("/", ".")},
    "metadata": metadata,
  }
  return ts.Spec(spec).to_json()


def _nest(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def write_t5x_checkpoint(
  params: dict[str, np.ndarray],
  model_dir: str,
  step: int,
  bf16=(),
  inline=(),
  zstd=(),
) -> str:
  """Writes mtx-layout ``params`` (path -> array) as ``model_dir/checkpoint_<step>``."""
  final_dir = os.path.join(model_dir, f"checkpoint_{step}")
  tmp_dir = f"{final_dir}.tmp-{int(time.time())}"
  os.makedirs(tmp_dir)
  target, param_states = {}, {}
  for name, arr in sorted(params.items()):
    t5x_name, arr = to_t5x(name, np.asarray(arr, np.float32))
    dtype = "bfloat16" if name in bf16 else "float32"
    _nest(param_states, t5x_name, {"m": np.zeros([1], np.float32)})
    if name in inline:
      _nest(target, t5x_name, arr.astype(ml_dtypes.bfloat16) if name in bf16 else arr)
      continue
    spec = _spec(t5x_name, arr, dtype, zstd=name in zstd)
    absolute = json.loads(json.dumps(spec))
    absolute["kvstore"]["path"] = os.path.join(tmp_dir, spec["kvstore"]["path"])
    # T5X casts with a 'cast' driver over the stored dtype; the bytes are the same.
    store = ts.open(
      {"driver": "cast", "dtype": "float32", "base": absolute}, create=True, open=True
    ).result()
    store.write(arr).result()
    _nest(target, t5x_name, spec)
  state = {"step": np.int32(step), "param_states": param_states}
  blob = serialization.msgpack_serialize(
    {"version": VERSION, "optimizer": {"target": target, "state": state}}
  )
  with open(os.path.join(tmp_dir, "checkpoint"), "wb") as f:
    f.write(blob)
  os.rename(tmp_dir, final_dir)
  return final_dir


def tiny_params(seed: int = 0) -> dict[str, np.ndarray]:
  """A tiny random mtx T5 (``TINY``), flattened to path -> float32 array."""
  model = T5(T5Config(**TINY))
  _, abstract = params_lib.abstract_params(model, 4, 4)
  shardings = jax.tree.map(lambda _: None, abstract)
  tree = params_lib.init_params(model, seed, 4, 4, shardings)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): np.asarray(x) for path, x in flat}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out", help="model directory to write checkpoint_<step>/ into")
  parser.add_argument("--npz", help="mtx-layout params; default: a tiny random T5")
  parser.add_argument("--step", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--bf16", nargs="*", default=None, help="params stored as bf16")
  parser.add_argument("--inline", nargs="*", default=None, help="params in the msgpack")
  parser.add_argument("--zstd", nargs="*", default=None, help="params in jax's layout")
  args = parser.parse_args(argv)
  if args.npz:
    with np.load(args.npz) as f:
      params = {k: f[k] for k in f.files}
    bf16, inline, zstd = args.bf16 or (), args.inline or (), args.zstd or ()
  else:
    params = tiny_params(args.seed)
    bf16 = TINY_BF16 if args.bf16 is None else args.bf16
    zstd = TINY_ZSTD if args.zstd is None else args.zstd
    inline = (
      [n for n in params if n.endswith("/scale")] if args.inline is None else args.inline
    )
    for name in bf16:  # the npz holds exactly what the checkpoint holds
      params[name] = params[name].astype(ml_dtypes.bfloat16).astype(np.float32)
  step_dir = os.path.join(args.out, f"checkpoint_{args.step}")
  if os.path.exists(step_dir):
    shutil.rmtree(step_dir)
  os.makedirs(args.out, exist_ok=True)
  write_t5x_checkpoint(params, args.out, args.step, bf16=bf16, inline=inline, zstd=zstd)
  if not args.npz:
    np.savez(os.path.join(args.out, "params.npz"), **params)
    with open(os.path.join(args.out, "t5_config.json"), "w") as f:
      json.dump(TINY, f, indent=2)
  print(f"wrote {step_dir} ({len(params)} params)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
