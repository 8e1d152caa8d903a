"""Pretrained checkpoints of other formats (Hugging Face, T5X) into mtx's sharded params.

Every format is read through one small protocol, ``Reader``: the checkpoint's params by
mtx's *unscanned* names (``encoder/layers_0/attention/query``) in mtx's layout
(``[E, H, D]``), in float32, a slice at a time. ``load_params`` then builds each sharded
param with ``jax.make_array_from_callback``, so each process reads only the slices its
devices hold, and only one parameter is in host memory at a time; scanned trees
(``encoder/layers/...``, layer axis first) stack the per-layer slices.

Which format a path holds is decided once, by ``open_reader``: an mtx MODEL_DIR or step
directory gives None (orbax, ``mtx.runtime.checkpoint.load_params``); a Hugging Face
directory (``config.json`` + safetensors) gives ``mtx.runtime.hf.HfReader``.

``resolve`` is the one place where a checkpoint's model configuration and vocabulary
become the run's (train, eval, infer and export all call it): fields the checkpoint
defines replace gin's, and a gin setting that contradicts one is refused.

>>> model_config, vocabulary_path = resolve(path, gin_model_config, None, "INFER_CHECKPOINT_PATH")
>>> params = load(path, abstract_params_with_shardings, model_config.scan_layers, what)
"""

import dataclasses
import os
import re
from typing import Any, Optional, Protocol

import jax
import numpy as np

from mtx import paths
from mtx.data import vocab
from mtx.errors import UserError
from mtx.model import T5Config
from mtx.runtime import checkpoint, hf, t5x


class Reader(Protocol):
  """A checkpoint's params, by mtx's unscanned names, read lazily.

  Attributes:
    path: the checkpoint, as the user gave it.
  """

  path: str

  def names(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every param: unscanned mtx path -> (shape in mtx's layout, dtype name on disk)."""

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The param ``name`` (or its ``index`` slice, in mtx's layout) as float32."""

  def model_config(self) -> dict | None:
    """The model config fields the checkpoint defines; None if it defines none. They
    are ``T5Config``'s unless the reader has a ``config_type()`` that says otherwise
    (a Hugging Face Llama directory: ``LlamaConfig``)."""

  def vocabulary_path(self) -> str | None:
    """A path ``mtx.data.vocab.get_vocabulary`` loads, or None (no vocabulary)."""

  def close(self) -> None:
    """Releases open files."""


def open_reader(path: str, what: str) -> Optional[Reader]:
  """The reader of a pretrained checkpoint at ``path``, or None for an mtx checkpoint.

  Raises:
    UserError: ``path`` is none of the formats (names them), or a damaged one.
  """
  path = os.fspath(path)
  if t5x.is_t5x_checkpoint(path):
    return t5x.open_t5x(path, what)
  if paths.isdir(path) and is_mtx_checkpoint(path):
    return None  # an mtx run wins, even over a Hugging Face export put inside it
  if hf.is_hf_dir(path):
    return hf.HfReader(path, what)
  if paths.isdir(path):
    raise UserError(
      f"{what} {path} is neither an mtx checkpoint (a MODEL_DIR or step directory), "
      "nor a Hugging Face model directory (config.json and model.safetensors), nor a "
      "T5X checkpoint; point it at one of those."
    )
  return None


def is_pretrained(path: Optional[str], what: str) -> bool:
  """``path`` is a checkpoint of another format (it has no mtx steps)."""
  if not path:
    return False
  reader = open_reader(path, what)
  if reader is not None:
    reader.close()
  return reader is not None


def is_mtx_checkpoint(path: str) -> bool:
  """A MODEL_DIR (numbered step dirs), a step dir, or a step's state dir."""
  entries = paths.listdir(path)
  markers = ("state", "config.gin", "metrics.jsonl", "_METADATA", "_CHECKPOINT_METADATA")
  return (
    any(e.split(".")[0].isdigit() for e in entries)  # steps, finished or not
    or any(e in entries for e in markers)
    or paths.basename(path) == "state"
  )


# Settings of the run rather than of the architecture: they carry over when a checkpoint
# of another model family replaces gin's config (LoRA adapters too: a checkpoint never
# defines them).
RUN_FIELDS = ("dtype", "remat_policy", "scan_layers", "dropout_rate", "lora")


def merge_model_config(
  defined: dict, config: Any, path: str, what: str, config_type: type = T5Config
) -> Any:
  """``config`` with the checkpoint's ``defined`` fields; refuses contradicting gin.

  A gin field counts as set when it differs from the config class's default. When the
  checkpoint is of another family (``config_type``, e.g. ``LlamaConfig`` while gin
  set a ``T5Config``), the checkpoint's family wins and only ``RUN_FIELDS`` carry over.
  """
  if not isinstance(config, config_type):
    config = config_type(**{f: getattr(config, f) for f in RUN_FIELDS})
  default = config_type()
  for field, value in defined.items():
    mine = getattr(config, field)
    if mine != getattr(default, field) and mine != value:
      raise UserError(
        f"model.{config_type.__name__}.{field} = {mine!r} contradicts {what} {path}, which has "
        f"{field} = {value!r}; drop that gin setting (the checkpoint defines the model)."
      )
  return dataclasses.replace(config, **defined)


def resolve(
  path: Optional[str],
  model_config: Any,
  vocabulary_path: Optional[str],
  what: str,
) -> tuple[Any, Optional[str]]:
  """(model config, vocabulary path) for a run starting from or reading ``path``.

  For an mtx checkpoint (or no path) both come back unchanged. For a pretrained one, the
  checkpoint's architecture replaces gin's (``merge_model_config``) and its vocabulary
  becomes the default (a VOCABULARY set in gin still wins).
  """
  if not path:
    return model_config, vocabulary_path
  reader = open_reader(path, what)
  if reader is None:
    return model_config, vocabulary_path
  try:
    defined = reader.model_config()
    if defined is not None:
      config_type = reader.config_type() if hasattr(reader, "config_type") else T5Config
      model_config = merge_model_config(defined, model_config, path, what, config_type)
    own = reader.vocabulary_path() if hasattr(reader, "vocabulary_path") else None
  finally:
    reader.close()
  if own and not vocabulary_path:
    vocabulary_path = own
  if vocabulary_path and defined is not None:
    _check_vocabulary_fits(vocabulary_path, model_config.vocab_size, path, what)
  return model_config, vocabulary_path


def resolve_run(
  path: Optional[str],
  initial_checkpoint_path: Optional[str],
  model_config: Any,
  vocabulary_path: Optional[str],
  what: str,
) -> tuple[Any, Optional[str]]:
  """(model config, vocabulary path) for reading ``path`` (eval, infer, export): those of
  ``path`` if it is pretrained, else those of the pretrained checkpoint the run started
  from (its INITIAL_CHECKPOINT_PATH), else gin's."""
  if is_pretrained(path, what):
    return resolve(path, model_config, vocabulary_path, what)
  return resolve(
    initial_checkpoint_path, model_config, vocabulary_path, "INITIAL_CHECKPOINT_PATH"
  )


def _check_vocabulary_fits(vocabulary_path: str, vocab_size: int, path, what) -> None:
  size = vocab.get_vocabulary(vocabulary_path).vocab_size
  if vocab_size and size > vocab_size:
    whose = "its" if vocabulary_path == path else f"the vocabulary {vocabulary_path}"
    raise UserError(
      f"{what} {path}: {whose} vocabulary has {size} ids but its embedding only "
      f"{vocab_size} rows; use the vocabulary the checkpoint was trained with."
    )


def load(
  path: str, abstract_params: Any, scanned: bool, what: str, skip_adapters: bool = False
) -> Any:
  """Params from any checkpoint ``path``: mtx's orbax, or a pretrained format.

  ``skip_adapters``: an mtx LoRA run's adapters that the model lacks are left out (its
  base read on purpose) instead of refused (``checkpoint.load_params``); pretrained
  formats hold no adapters."""
  reader = open_reader(path, what)
  if reader is None:
    return checkpoint.load_params(
      path, abstract_params, what=what, skip_adapters=skip_adapters
    )
  try:
    return load_params(reader, abstract_params, scanned, what)
  finally:
    reader.close()


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


_SCANNED = re.compile(r"(^|/)layers(/|$)")


def _unscanned(name: str, layer: int) -> str:
  return _SCANNED.sub(lambda m: f"{m.group(1)}layers_{layer}{m.group(2)}", name, count=1)


def _expected(abstract_params: Any, scanned: bool) -> dict[str, tuple[int, ...]]:
  """Unscanned name -> shape, for every param of the model."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = _path_name(path)
    if scanned and _SCANNED.search(name):
      for layer in range(leaf.shape[0]):
        out[_unscanned(name, layer)] = tuple(leaf.shape[1:])
    else:
      out[name] = tuple(leaf.shape)
  return out


def _some(names: list) -> str:
  return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def check_names(reader: Reader, expected: dict, what: str) -> None:
  """Raises a one-sentence UserError unless ``reader`` has exactly ``expected``."""
  have = reader.names()
  missing = sorted(set(expected) - set(have))
  extra = sorted(set(have) - set(expected))
  if missing or extra:
    parts = []
    if missing:
      parts.append(
        f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" * (len(missing) > 1))
      )
    if extra:
      parts.append(
        f"has {extra[0]} the model does not"
        + (f" (and {len(extra) - 1} more)" * (len(extra) > 1))
      )
    raise UserError(
      f"{what} {reader.path} does not fit the model: it {' and '.join(parts)}; use a "
      "checkpoint of the same model configuration."
    )
  for name, shape in sorted(expected.items()):
    if tuple(have[name][0]) != tuple(shape):
      raise UserError(
        f"{what} {reader.path} does not fit the model: {name} is "
        f"{list(have[name][0])} there but {list(shape)} in the model; use a checkpoint "
        "of the same model configuration."
      )


def _full_index(index, shape) -> tuple[slice, ...]:
  """``index`` with every slice made explicit (start, stop; step 1)."""
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided slice {s} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def _reader_callback(reader: Reader, name: str, shape, scanned_layers: bool):
  """index -> float32 block; memoized per index (replicated shards read once)."""
  cache = {}

  def read(index):
    index = _full_index(index, shape)
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      if scanned_layers:
        layers = range(index[0].start, index[0].stop)
        cache[key] = np.stack(
          [reader.read(_unscanned(name, i), index[1:]) for i in layers]
        )
      else:
        cache[key] = reader.read(name, index)
    return cache[key]

  return read


def load_params(reader: Reader, abstract_params: Any, scanned: bool, what: str) -> Any:
  """The model's params read from ``reader``, placed on ``abstract_params``' shardings.

  Args:
    reader: an open ``Reader``.
    abstract_params: ``jax.ShapeDtypeStruct`` leaves with shardings (float32).
    scanned: the model scans its layers (``T5Config.scan_layers``): leaves under a
      ``layers`` subtree have a leading layer axis, read layer by layer.
    what: how errors name the checkpoint (the setting the user gave it with).

  Raises:
    UserError: names missing or extra, or a shape differs (both named).
  """
  check_names(reader, _expected(abstract_params, scanned), what)

  def build(path, leaf):
    name = _path_name(path)
    stacked = scanned and bool(_SCANNED.search(name))
    callback = _reader_callback(reader, name, leaf.shape, stacked)
    sharding = leaf.sharding
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    array = jax.make_array_from_callback(
      leaf.shape, sharding, lambda index: callback(index).astype(leaf.dtype, copy=False)
    )
    return array

  return jax.tree_util.tree_map_with_path(build, abstract_params)
