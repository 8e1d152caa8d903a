"""Reads a T5X checkpoint's params, lazily, one array at a time, in mtx's names and layout.

Layout (``t5x/checkpoints.py``, ``Checkpointer.save``, ``VERSION = 3``)::

  MODEL_DIR/
    checkpoint_1000000/          one saved step ("checkpoint_<step>"; the newest is used)
      checkpoint                 msgpack: {"version": 3, "optimizer": {
                                   "target": params,              (what mtx reads)
                                   "state": {"step": ..., "param_states": ...}}}
      target.encoder.layers_0.attention.query.kernel/   a zarr array (.zarray + chunks)
      target.token_embedder.embedding/
      state.param_states.…/      optimizer state (ignored)

A leaf of the msgpack tree is either the array itself (flax's msgpack encoding: ext type
1, ``(shape, dtype name, C-order bytes)``; T5X writes a leaf there when it has no
partitioning axes) or, for an array written to tensorstore, the JSON of its
``tensorstore.Spec`` with a path relative to the step directory::

  {"driver": "zarr", "dtype": "float32",          ("bfloat16" when saved in bf16: zarr's
   "kvstore": {"driver": "file", "path": "target.encoder.layers_0.mlp.wo.kernel/"},
   "metadata": {"chunks": [...], "compressor": {"id": "gzip", "level": 1}, "shape": [M, E]}}

The array directory is the param's '/'-joined path with '.' for '/'. Version 3 (since
2021-06) differs from 2 only in writing bfloat16 natively instead of as uint16; a uint16
array is refused, as T5X refuses it. T5X's other, opt-in layout (``use_orbax=True``:
``checkpoint_N/state/`` written by orbax with OCDBT) is recognised and refused.

Names (T5X's ``t5x/examples/t5/network.py``, which the released T5 1.1 and Flan-T5 T5X
checkpoints use) map to mtx's unscanned param paths by dropping the ``kernel`` level of
the attention and MLP projections and unfolding the heads of 2-D attention kernels::

  T5X target/...                                     mtx
  token_embedder/embedding            [V, E]         token_embedder/embedding   [V, E]
  encoder/layers_0/attention/query/kernel [E, H*D]   encoder/layers_0/attention/query [E, H, D]
  encoder/layers_0/attention/out/kernel   [H*D, E]   encoder/layers_0/attention/out   [H, D, E]
  decoder/layers_0/mlp/wi_0/kernel    [E, M]         decoder/layers_0/mlp/wi_0  [E, M]
  decoder/layers_0/mlp/wi/kernel      [E, M]         decoder/layers_0/mlp/wi    (T5 v1.0, ReLU)
  .../*_layer_norm/scale, encoder/encoder_norm/scale, .../relpos_bias/rel_embedding [H,
  buckets], decoder/logits_dense/kernel [E, V] (absent when tied, v1.0): unchanged.

H comes from the stack's ``relpos_bias/rel_embedding`` [H, buckets]. Attention kernels
already stored 3-D ([E, H, D], as ``scalable_t5`` writes them) are taken as they are.
``scalable_t5``'s scanned stacks (``encoder/encoder/...`` with the layer axis at 1) and
its per-layer relative position biases have no counterpart in mtx and are refused.

>>> reader = open_t5x("/ckpts/flan_t5_small/checkpoint_1198000")  # doctest: +SKIP
>>> reader.names()["encoder/layers_0/attention/query"]  # doctest: +SKIP
((512, 6, 64), 'float32')
>>> reader.read("encoder/layers_0/attention/query", (slice(None), slice(0, 2)))  # doctest: +SKIP
"""

import copy
import dataclasses
import os
import re
from typing import Any

import msgpack
import numpy as np
import tensorstore as ts
from flax import serialization

from mtx import paths
from mtx.errors import UserError, close_names

SUPPORTED_VERSIONS = (2, 3)
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
_FILE_DRIVERS = (
  "file",
  "gfile",
  "gcs",
)  # gcs/gfile specs name a path relative to the step
_ARRAY_DRIVERS = ("zarr", "zarr3")
_ATTENTION = ("attention", "self_attention", "encoder_decoder_attention")
_MLP = ("wi", "wi_0", "wi_1", "wo")
# Sub-modules of a stack in t5.network; anything else under encoder/ or decoder/ is a
# layout mtx does not read (scalable_t5's scanned "encoder/encoder/...", say).
_STACK_CHILDREN = re.compile(
  r"layers_\d+|relpos_bias|encoder_norm|decoder_norm|logits_dense"
)


def _is_spec(leaf: Any) -> bool:
  """A tensorstore spec's JSON, as T5X tells it from an inline leaf."""
  return isinstance(leaf, dict) and leaf.keys() >= {"driver", "kvstore", "metadata"}


def _newest_step_dir(model_dir: str) -> str | None:
  steps = []
  for entry in paths.listdir(model_dir):
    m = _STEP_DIR.fullmatch(entry)
    if m and paths.isdir(paths.join(model_dir, entry)):
      steps.append((int(m.group(1)), entry))
  return paths.join(model_dir, max(steps)[1]) if steps else None


def _step_dir(path: str) -> str | None:
  """The checkpoint_N directory ``path`` names (it, its msgpack file, or a model dir)."""
  path = paths.absolute(os.fspath(path))
  if paths.isfile(path):
    return paths.dirname(path) if paths.basename(path) == "checkpoint" else None
  if not paths.isdir(path):
    return None
  if paths.isfile(paths.join(path, "checkpoint")) or _is_orbax_step(path):
    return path
  return _newest_step_dir(path)


def _is_orbax_step(step_dir: str) -> bool:
  """T5X's orbax layout: checkpoint_N/state/ (orbax's PyTreeCheckpointHandler, OCDBT)."""
  return _STEP_DIR.fullmatch(paths.basename(step_dir)) is not None and paths.isdir(
    paths.join(step_dir, "state")
  )


def _has_t5x_keys(msgpack_file: str) -> bool:
  """The msgpack's top-level map has 'version' and 'optimizer' (T5X's own test)."""
  try:
    with paths.open_file(msgpack_file, "rb") as f:
      unpacker = msgpack.Unpacker(f, raw=False)
      keys = set()
      for _ in range(unpacker.read_map_header()):
        keys.add(unpacker.unpack())
        if keys >= {"version", "optimizer"}:
          return True
        unpacker.skip()
  except (OSError, ValueError, msgpack.UnpackException):
    return False
  return False


def is_t5x_checkpoint(path: str) -> bool:
  """Whether ``path`` is a T5X checkpoint: a checkpoint_N dir, its file, or a model dir.

  True also for T5X's orbax layout, which ``open_t5x`` then refuses with the reason.
  """
  step_dir = _step_dir(path)
  if step_dir is None:
    return False
  if _is_orbax_step(step_dir) and not paths.isfile(paths.join(step_dir, "checkpoint")):
    return True
  return _has_t5x_keys(paths.join(step_dir, "checkpoint"))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """'/'-joined paths of the leaves (arrays, scalars, spec dicts) of a msgpack tree."""
  if not isinstance(tree, dict) or _is_spec(tree):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def _mtx_name(t5x_name: str) -> str:
  """'encoder/layers_0/attention/query/kernel' -> 'encoder/layers_0/attention/query'."""
  parts = t5x_name.split("/")
  if (
    len(parts) >= 3
    and parts[-1] == "kernel"
    and (
      (parts[-3] in _ATTENTION and parts[-2] in ("query", "key", "value", "out"))
      or (parts[-3] == "mlp" and parts[-2] in _MLP)
    )
  ):
    return "/".join(parts[:-1])
  return t5x_name


@dataclasses.dataclass(frozen=True)
class _Param:
  """One param: where it is (inline array or spec JSON) and how it maps to mtx's layout.

  ``fold`` is "" (same layout), "qkv" ([E, H*D] on disk, [E, H, D] in mtx) or "out"
  ([H*D, E] on disk, [H, D, E] in mtx).
  """

  t5x_name: str
  leaf: Any
  disk_shape: tuple[int, ...]
  dtype: str
  shape: tuple[int, ...]
  fold: str = ""


def _leaf_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], str]:
  if _is_spec(leaf):
    metadata = leaf["metadata"]
    dtype = leaf.get("dtype") or str(metadata.get("dtype", "?"))
    return tuple(int(n) for n in metadata["shape"]), dtype
  arr = np.asarray(leaf)
  return tuple(arr.shape), arr.dtype.name


def _read_msgpack(msgpack_file: str, what: str) -> dict:
  try:
    contents = serialization.msgpack_restore(paths.read_bytes(msgpack_file))
  except Exception as e:  # msgpack raises ValueError, ExtraData, UnpackValueError, ...
    raise UserError(
      f"{what} {msgpack_file} is not a readable T5X msgpack file ({type(e).__name__}: "
      f"{e}); it may be truncated: copy the checkpoint directory again."
    ) from e
  if not isinstance(contents, dict):
    raise UserError(
      f"{what} {msgpack_file} holds no T5X state dict; point it at a T5X "
      "checkpoint_N directory."
    )
  return contents


def _slice_bounds(index: tuple, shape: tuple[int, ...]) -> list[slice]:
  """``index`` padded to ``shape``'s rank, each slice normalised to (start, stop, step)."""
  if len(index) > len(shape):
    raise ValueError(f"index {index} has more entries than the shape {shape}")
  out = []
  for i, n in enumerate(shape):
    s = index[i] if i < len(index) else slice(None)
    if not isinstance(s, slice):
      raise TypeError(f"index entries must be slices, got {s!r}")
    start, stop, step = s.indices(n)
    # slice(None, None, -1).indices(4) is (3, -1, -1), whose -1 would count from the end.
    out.append(slice(start, None if stop < 0 else stop, step))
  return out


class T5XReader:
  """A T5X checkpoint's params by mtx's unscanned paths; arrays read on demand.

  ``names()`` lists them with their mtx-layout shapes and on-disk dtypes; ``read``
  returns one (or a slice of it) as float32 from its tensorstore array or from the
  msgpack. Only the msgpack (small arrays and specs) stays in memory between reads.
  """

  def __init__(self, step_dir: str, what: str = "INITIAL_CHECKPOINT_PATH"):
    self.path = step_dir
    self._what = what
    contents = _read_msgpack(paths.join(step_dir, "checkpoint"), what)
    version = contents.get("version")
    if version not in SUPPORTED_VERSIONS or not isinstance(
      contents.get("optimizer"), dict
    ):
      raise UserError(
        f"{what} {step_dir} is a T5X checkpoint of version {version!r} without an "
        f"'optimizer' state dict; mtx reads versions 2 and 3 (T5X since 2021): save "
        "it again with a current T5X."
      )
    target = contents["optimizer"].get("target")
    if not isinstance(target, dict) or not target:
      raise UserError(
        f"{what} {step_dir} has no params ('optimizer/target' is empty); point it at "
        "a checkpoint saved with its params."
      )
    flat = _flatten(target)
    self._check_layout(flat)
    self._params = self._index(flat)

  def _fail(self, message: str) -> UserError:
    return UserError(f"{self._what} {self.path}: {message}")

  def _check_layout(self, flat: dict[str, Any]) -> None:
    for name in flat:
      parts = name.split("/")
      stray = (
        len(parts) > 2
        and parts[0] in ("encoder", "decoder")
        and not _STACK_CHILDREN.fullmatch(parts[1])
      )
      if stray or (
        parts[1:2] and parts[1].startswith("layers_") and "relpos_bias" in parts
      ):
        raise self._fail(
          f"param '{name}' is of T5X's scalable_t5 layout (scanned stacks or a "
          "relative position bias per layer), which mtx cannot hold; mtx reads the "
          "t5.network layout (layers_i, one bias table per stack) of the released "
          "T5 1.1 and Flan-T5 checkpoints."
        )

  def _heads(self, flat: dict[str, Any], stack: str) -> int:
    leaf = flat.get(f"{stack}/relpos_bias/rel_embedding")
    if leaf is None:
      raise self._fail(
        f"'{stack}/relpos_bias/rel_embedding' is missing, so the number of heads of "
        "its 2-D attention kernels is unknown; is it a T5 checkpoint?"
      )
    return _leaf_shape_dtype(leaf)[0][0]

  def _index(self, flat: dict[str, Any]) -> dict[str, _Param]:
    params = {}
    for t5x_name, leaf in flat.items():
      if not (_is_spec(leaf) or isinstance(leaf, (np.ndarray, np.generic))):
        raise self._fail(
          f"param '{t5x_name}' is neither an array nor a tensorstore spec but "
          f"{str(leaf)[:60]!r} (an orbax placeholder?); mtx reads checkpoints as "
          "T5X's default Checkpointer writes them."
        )
      disk_shape, dtype = _leaf_shape_dtype(leaf)
      name, shape, fold = _mtx_name(t5x_name), disk_shape, ""
      parts = t5x_name.split("/")
      if name != t5x_name and parts[-3] in _ATTENTION and len(disk_shape) == 2:
        heads = self._heads(flat, parts[0])
        fold = "out" if parts[-2] == "out" else "qkv"
        folded = disk_shape[0] if fold == "out" else disk_shape[1]
        if folded % heads:
          raise self._fail(
            f"'{t5x_name}' has shape {disk_shape}, whose heads x head_dim axis is not "
            f"a multiple of the {heads} heads of {parts[0]}/relpos_bias."
          )
        hd = (heads, folded // heads)
        shape = hd + disk_shape[1:] if fold == "out" else disk_shape[:1] + hd
      params[name] = _Param(t5x_name, leaf, disk_shape, dtype, shape, fold)
      if _is_spec(leaf):
        self._array_dir(params[name])  # a missing array fails now, not mid-load
    return params

  def names(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every param by mtx's unscanned path -> (shape in mtx layout, dtype on disk)."""
    return {name: (p.shape, p.dtype) for name, p in self._params.items()}

  def model_config(self) -> None:
    """None: a T5X checkpoint carries no model config (its gin model file does)."""
    return None

  def close(self) -> None:
    self._params = {}

  def __enter__(self) -> "T5XReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Param ``name`` (mtx path) as float32 in mtx's layout, or its slice ``index``.

    Only the slice is read from disk when the layout allows it (any slice of an
    unfolded param; for a folded attention kernel, a range of heads with all of D).
    """
    if name not in self._params:
      raise self._fail(
        f"has no param '{name}'{close_names(name, self._params)}; its params are "
        "listed by names()."
      )
    p = self._params[name]
    bounds = _slice_bounds(index or (), p.shape)
    if not p.fold:
      return self._read_disk(p, bounds)
    return self._read_folded(p, bounds)

  def _read_folded(self, p: _Param, bounds: list[slice]) -> np.ndarray:
    """A slice of a 2-D attention kernel, unfolded: [E, H*D] -> [E, H, D] ("qkv") or
    [H*D, E] -> [H, D, E] ("out")."""
    h_axis = 1 if p.fold == "qkv" else 0  # the folded axis on disk
    d_axis = h_axis + 1
    d = p.shape[d_axis]
    h = bounds[h_axis]
    disk = [b for i, b in enumerate(bounds) if i != d_axis]
    whole_heads = h.step == 1 and h.stop > h.start and bounds[d_axis] == slice(0, d, 1)
    if whole_heads:  # a range of heads with all of D: read just those rows/columns
      disk[h_axis] = slice(h.start * d, h.stop * d, 1)
      heads, rest = h.stop - h.start, ()
    else:  # read the other axes' slice, unfold, then take the heads and D asked for
      disk[h_axis] = slice(0, p.disk_shape[h_axis], 1)
      heads, rest = p.shape[h_axis], (h, bounds[d_axis])
    arr = self._read_disk(p, disk)
    shape = list(arr.shape)
    shape[h_axis : h_axis + 1] = [heads, d]
    arr = arr.reshape(shape)
    if rest:
      index = [slice(None)] * arr.ndim
      index[h_axis], index[d_axis] = rest
      arr = arr[tuple(index)]
    return arr

  def _read_disk(self, p: _Param, bounds: list[slice]) -> np.ndarray:
    """The slice ``bounds`` (normalised, on-disk layout) of ``p``, as float32."""
    if not _is_spec(p.leaf):
      return np.asarray(p.leaf)[tuple(bounds)].astype(np.float32)
    store = self._open(p)
    if all(b.step == 1 for b in bounds):
      arr = store[tuple(bounds)].read().result()
    else:  # strided: read the whole axes, stride in numpy
      arr = store.read().result()[tuple(bounds)]
    return np.asarray(arr).astype(np.float32)

  def _array_dir(self, p: _Param) -> str:
    spec = p.leaf
    kvstore = spec.get("kvstore") or {}
    relative = kvstore.get("path", spec.get("path"))
    if spec.get("driver") not in _ARRAY_DRIVERS or kvstore.get("driver") not in (
      _FILE_DRIVERS
    ):
      raise self._fail(
        f"'{p.t5x_name}' is stored with tensorstore driver {spec.get('driver')!r} on "
        f"{kvstore.get('driver')!r}; mtx reads zarr arrays in the checkpoint directory, "
        "as T5X writes them."
      )
    if p.dtype in ("uint16", "<u2"):
      raise self._fail(
        f"'{p.t5x_name}' is bfloat16 stored as uint16 (T5X before 2021-06), which T5X "
        "itself no longer reads; save the checkpoint again with a current T5X."
      )
    path = paths.join(self.path, str(relative).lstrip("/"))
    if not paths.isdir(path):
      raise self._fail(
        f"the tensorstore array of '{p.t5x_name}' ({path}) is missing; copy the whole "
        "checkpoint directory again."
      )
    return path

  def _open(self, p: _Param) -> Any:
    spec = {
      "driver": p.leaf["driver"],
      "kvstore": _kvstore(self._array_dir(p)),
    }
    try:
      store = ts.open(copy.deepcopy(spec), open=True, read=True).result()
    except Exception as e:  # tensorstore raises ValueError with its own status text
      raise self._fail(
        f"the tensorstore array of '{p.t5x_name}' ({spec['kvstore']['path']}) cannot "
        f"be opened ({e}); copy the whole checkpoint directory again."
      ) from e
    if tuple(store.shape) != p.disk_shape:
      raise self._fail(
        f"the tensorstore array of '{p.t5x_name}' has shape {tuple(store.shape)} but "
        f"the msgpack says {p.disk_shape}; the checkpoint is inconsistent, copy it again."
      )
    return store


def _kvstore(directory: str) -> dict:
  """The tensorstore kvstore of an array directory: tensorstore's own GCS driver for
  ``gs://`` (as orbax does), its file driver locally; it has none for other schemes.

  >>> _kvstore("gs://bucket/t5/checkpoint_100/target.x")
  {'driver': 'gcs', 'bucket': 'bucket', 'path': 't5/checkpoint_100/target.x/'}
  """
  s = paths.scheme(directory)
  if s is None:
    return {"driver": "file", "path": directory}
  if s == "gs":
    bucket, _, inner = directory.partition("://")[2].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": inner.rstrip("/") + "/"}
  raise UserError(
    f"{directory}: T5X arrays are read with tensorstore, which reads local paths and "
    f"gs:// only, not {s}://; copy the checkpoint to one of those."
  )


def open_t5x(path: str, what: str = "INITIAL_CHECKPOINT_PATH") -> T5XReader:
  """A reader of the T5X checkpoint at ``path``: a checkpoint_N directory, its
  ``checkpoint`` msgpack file, or a model directory (its newest checkpoint_N).

  ``what`` names ``path`` in errors (the gin setting it came from).
  """
  step_dir = _step_dir(path)
  if step_dir is None or not (
    _is_orbax_step(step_dir) or paths.isfile(paths.join(step_dir, "checkpoint"))
  ):
    raise UserError(
      f"{what} {path} is not a T5X checkpoint (no checkpoint_N directory with a "
      "msgpack 'checkpoint' file); point it at one, or at the model directory holding "
      "them."
    )
  if not paths.isfile(paths.join(step_dir, "checkpoint")):
    raise UserError(
      f"{what} {step_dir} is a T5X checkpoint in orbax's layout (state/, written with "
      "use_orbax=True), which mtx does not read; mtx reads T5X's default layout "
      "(msgpack 'checkpoint' + tensorstore arrays): save it again with use_orbax=False."
    )
  return T5XReader(step_dir, what)
