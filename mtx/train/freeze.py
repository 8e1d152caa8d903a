"""Frozen parameters: train a subset of the params, the rest closed over, unchanged.

``train.trainable_params`` is a regex ``re.search``-ed on each param's '/'-joined path
(the convention of ``mtl.masked``); None trains everything. The step splits the
params into the trainable and the frozen subtree (``split``), differentiates only the
trainable one, and gives the model a ``FrozenBase`` wrapper whose ``apply`` puts the
frozen leaves back (``merge``), so that every gradient, per-task stack, Gram probe,
mtl method and optimizer state covers the trainable params only. The frozen leaves
are never differentiated, never updated (bit-identical after any number of steps) and
still saved and restored with the state. (T5X and MaxText freeze the same way: a
param partition that gets no optimizer state.)

Worked example, pattern ``"decoder/"``::

    params     {"encoder": {"k": A}, "decoder": {"k": B, "b": C}}
    split   -> ({"decoder": {"k": B, "b": C}},   {"encoder": {"k": A}})
    merge(*split(params, "decoder/")) == params

Subtrees are nested dicts with the full key paths kept, so that optimizer states and
shardings built on the trainable subtree match the params by path
(``parallel.like_params_shardings``). Everything here is pure and runs under jit.
"""

import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from mtx.errors import UserError


def path_str(path) -> str:
  """A pytree key path as the '/'-joined string the regex is searched in
  (``"decoder/layers_0/attention/query/kernel"``)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def compile_pattern(pattern: str) -> re.Pattern:
  """``pattern`` compiled; UserError when it is not a string or not a valid regex."""
  if not isinstance(pattern, str):
    raise UserError(
      f"train.trainable_params is {pattern!r}; give a regex string searched in "
      "'/'-joined parameter paths, such as 'decoder/', or None to train every param."
    )
  try:
    return re.compile(pattern)
  except re.error as e:
    raise UserError(
      f"train.trainable_params {pattern!r} is not a valid regular expression ({e}); "
      "give a Python regex searched in '/'-joined parameter paths, such as 'decoder/'."
    ) from e


def split(tree: Any, pattern: str) -> tuple:
  """(trainable, frozen): the leaves of a nested-dict ``tree`` whose path ``pattern``
  matches, and the others, each as a nested dict with empty branches left out.

  Works on params, their ShapeDtypeStructs and their shardings alike (same paths).
  """
  regex = compile_pattern(pattern)

  def go(node, prefix):
    trainable, frozen = {}, {}
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        t, f = go(value, path)
        if t:
          trainable[key] = t
        if f:
          frozen[key] = f
      elif regex.search(path):
        trainable[key] = value
      else:
        frozen[key] = value
    return trainable, frozen

  return go(tree, "")


def merge(trainable: Any, frozen: Any) -> dict:
  """The nested dict holding the leaves of both subtrees (``split``'s inverse)."""
  out = dict(frozen)
  for key, value in trainable.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = merge(value, out[key])
    else:
      out[key] = value
  return out


def trainable(tree: Any, pattern: Optional[str]) -> Any:
  """The trainable subtree of ``tree``: all of it when ``pattern`` is None."""
  return tree if pattern is None else split(tree, pattern)[0]


class FrozenBase:
  """A model whose ``apply`` takes only the trainable params: the frozen ones, closed
  over, are merged into ``variables["params"]`` first. Every other attribute is the
  wrapped model's.

      net = FrozenBase(model, frozen)
      net.apply({"params": trainable}, **inputs) == model.apply(
          {"params": merge(trainable, frozen)}, **inputs)
  """

  def __init__(self, model, frozen: dict):
    self.model = model
    self.frozen = frozen

  def apply(self, variables: dict, *args, **kwargs):
    variables = dict(variables, params=merge(variables["params"], self.frozen))
    return self.model.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str):
    if name in ("model", "frozen"):  # not set yet (a copy being built): no recursion
      raise AttributeError(name)
    return getattr(self.model, name)


FROZEN_DTYPES = ("float32", "bfloat16")


def cast_frozen(tree: Any, pattern: Optional[str], dtype: Optional[str]) -> Any:
  """``tree`` (arrays or ShapeDtypeStructs) with its frozen leaves in ``dtype``
  (``train.frozen_dtype``: a bfloat16 base takes half the memory; it is only read,
  cast to the activation dtype where it is used); unchanged when ``dtype`` or
  ``pattern`` is None."""
  if dtype is None or pattern is None:
    return tree
  trainable_part, frozen = split(tree, pattern)

  def cast(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return merge(trainable_part, jax.tree.map(cast, frozen))


def counts(params_abstract: Any, pattern: Optional[str]) -> tuple:
  """(total, trainable) parameter counts."""
  total = _count(params_abstract)
  return total, total if pattern is None else _count(split(params_abstract, pattern)[0])


def _count(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def check(params_abstract: Any, pattern: Optional[str]) -> None:
  """Raises UserError when ``pattern`` is not a regex or matches no parameter (then
  every parameter would be frozen and the run would train nothing)."""
  if pattern is None:
    return
  if not jax.tree.leaves(split(params_abstract, pattern)[0]):
    names = [
      path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    ]
    example = ", ".join(names[:3])
    raise UserError(
      f"train.trainable_params {pattern!r} matches no parameter, so every parameter "
      f"would be frozen; give a regex searched in the '/'-joined parameter paths "
      f"(such as {example}), or None to train all of them."
    )
