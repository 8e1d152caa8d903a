"""A model's parameters: abstract shapes, shardings from logical axis names, init, load.

Shared by training (``mtx.train``), evaluation and inference: nothing here knows about
optimizers or the train state.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mtx.errors import UserError
from mtx.model import T5, Llama, LlamaConfig
from mtx.runtime import pretrained


def dummy_batch(batch_size: int, inputs_length: int, targets_length: int) -> dict:
  """A [batch, length] batch of ones, enough to trace the model's shapes."""
  enc = jnp.ones([batch_size, inputs_length], jnp.int32)
  dec = jnp.ones([batch_size, targets_length], jnp.int32)
  return dict(
    encoder_input_tokens=enc,
    decoder_input_tokens=dec,
    encoder_segment_ids=enc,
    decoder_segment_ids=dec,
    encoder_positions=enc * 0,
    decoder_positions=dec * 0,
  )


def make_model(config) -> nn.Module:
  """The model a config describes: ``Llama`` for a ``LlamaConfig``, else ``T5``."""
  return Llama(config) if isinstance(config, LlamaConfig) else T5(config)


def dummy_inputs(model: nn.Module, inputs_length: int, targets_length: int) -> dict:
  """Keyword inputs of one row that trace ``model``'s params: ``dummy_batch`` for T5;
  for the decoder-only ``Llama``, one row of inputs + targets (prefix-LM features)."""
  if not isinstance(model, Llama):
    return dummy_batch(1, inputs_length, targets_length)
  tokens = jnp.ones([1, inputs_length + targets_length], jnp.int32)
  return dict(
    decoder_input_tokens=tokens,
    decoder_segment_ids=tokens,
    decoder_positions=tokens * 0,
    decoder_causal_attention=tokens,
  )


def abstract_params(model: nn.Module, inputs_length: int, targets_length: int):
  """Returns (boxed abstract params with logical names, unboxed ShapeDtypeStructs)."""

  def init(key):
    return model.init(key, **dummy_inputs(model, inputs_length, targets_length))["params"]

  boxed = jax.eval_shape(init, jax.random.key(0))
  return boxed, nn.unbox(boxed)


def param_shardings(boxed_params, mesh, rules: Sequence) -> Any:
  """NamedShardings for params from their logical axis names and the rules."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def init_params(
  model: nn.Module,
  seed: int,
  inputs_length: int,
  targets_length: int,
  shardings,
  cast: Optional[Callable[[Any], Any]] = None,
) -> Any:
  """Initialises params directly into their shardings (no host-side full copy);
  ``cast`` (params -> params, say frozen ones to bfloat16) runs inside the same jit."""

  def init(key):
    params = nn.unbox(
      model.init(key, **dummy_inputs(model, inputs_length, targets_length))["params"]
    )
    return params if cast is None else cast(params)

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def count_params(params_abstract) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params_abstract)))


def param_table(params_abstract, shardings) -> str:
  """A table of parameter paths, shapes and mesh shardings, for the start of a run."""
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    rows.append((name, "x".join(map(str, leaf.shape)), str(spec)))
  w = [
    max(len(r[i]) for r in rows + [("parameter", "shape", "sharding")]) for i in range(3)
  ]
  lines = [f"{'parameter':<{w[0]}}  {'shape':<{w[1]}}  sharding"]
  lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
  lines.append(f"total parameters: {count_params(params_abstract):,}")
  return "\n".join(lines)


def resolve_model_config(config, vocab_size: int, multiple: int = 128):
  """``config`` with ``vocab_size`` set from the vocabulary (padded) when it is 0."""
  if config.vocab_size:
    if config.vocab_size < vocab_size:
      raise UserError(
        f"{type(config).__name__}.vocab_size {config.vocab_size} is smaller than the vocabulary "
        f"({vocab_size} ids); set it to at least {vocab_size}, or to 0 to follow "
        "the vocabulary."
      )
    return config
  padded = -(-vocab_size // multiple) * multiple
  return dataclasses.replace(config, vocab_size=padded)


def load_trained(
  model_config,
  vocab_size: int,
  mesh,
  rules: Sequence,
  path: str,
  inputs_length: int = 8,
  targets_length: int = 8,
  what: str = "MODEL_DIR",
):
  """A trained model and its params, sharded on ``mesh``, for eval/inference.

  Args:
    model_config: the run's ``T5Config`` or ``LlamaConfig`` (vocab_size 0 = from the
      vocabulary).
    vocab_size: the vocabulary's size (before padding).
    mesh, rules: where the params go, by their logical axis names.
    path: a MODEL_DIR (newest finished step), a step directory, or its state dir;
      or a pretrained checkpoint (``mtx.runtime.pretrained``) whose config
      ``model_config`` already is (``pretrained.resolve``).
    inputs_length, targets_length: only used to trace shapes.
    what: how errors name ``path``.

  Returns:
    (model: T5 or Llama, params: pytree of sharded arrays, param_shardings).
  """
  model = make_model(resolve_model_config(model_config, vocab_size))
  boxed, abstract = abstract_params(model, inputs_length, targets_length)
  shardings = param_shardings(boxed, mesh, rules)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  params = pretrained.load(path, target, model.config.scan_layers, what)
  return model, params, shardings
