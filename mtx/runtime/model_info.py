"""``MODEL_DIR/model-info.txt``: the parameter table of a run, and its one-line summary.

The table (one line per parameter array: path, shape, mesh sharding; 282 lines for an
unscanned T5-base) is for reading when needed, so it goes to a file; the log gets::

  Model: 247,577,856 parameters, 944.4 MiB (float32), 236.1 MiB per device; 190 of 282
  arrays sharded (fsdp 120, tensor 130); table in /runs/x/model-info.txt.
"""

import collections
import math
from typing import Any

import jax
from jax.sharding import NamedSharding

from mtx import paths
from mtx.runtime import params as params_lib

MODEL_INFO_FILE = "model-info.txt"


def _size(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} B"


def summary(params_abstract: Any, shardings: Any) -> str:
  """One line: parameters, bytes (total and on the most loaded device), sharded arrays
  and the mesh axes they use."""
  leaves = jax.tree.leaves(params_abstract)
  specs = jax.tree.leaves(shardings)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  per_device = 0
  sharded = 0
  axes = collections.Counter()
  dtypes = sorted({str(x.dtype) for x in leaves})
  for leaf, sharding in zip(leaves, specs):
    shape = leaf.shape
    if isinstance(sharding, NamedSharding):
      shape = sharding.shard_shape(leaf.shape)
      # An axis of size 1 splits nothing: a one-device mesh shards no array.
      used = {
        a
        for entry in sharding.spec
        if entry
        for a in _names(entry)
        if sharding.mesh.shape[a] > 1
      }
      if used:
        sharded += 1
        axes.update(used)
    per_device += math.prod(shape) * leaf.dtype.itemsize
  by_axis = ", ".join(f"{a} {n}" for a, n in sorted(axes.items()))
  return (
    f"{params_lib.count_params(params_abstract):,} parameters, {_size(total)} "
    f"({'/'.join(dtypes)}), {_size(per_device)} per device; {sharded} of {len(leaves)} "
    f"arrays sharded" + (f" ({by_axis})" if by_axis else "")
  )


def _names(entry) -> tuple:
  return entry if isinstance(entry, tuple) else (entry,)


def write(model_dir: str, params_abstract: Any, shardings: Any) -> str:
  """Writes ``MODEL_DIR/model-info.txt`` (atomically) and returns the log's line."""
  path = paths.join(model_dir, MODEL_INFO_FILE)
  line = summary(params_abstract, shardings)
  text = f"{line}\n\n{params_lib.param_table(params_abstract, shardings)}\n"
  paths.write_atomically(path, text)
  return f"Model: {line}; table in {path}."
