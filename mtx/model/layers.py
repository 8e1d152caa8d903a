"""Building blocks shared by the T5 and Llama models: norm, embedding, attention, MLP,
masks, and the layer loop (unrolled or scanned, rematerialized).

Conventions shared by every module here:

* Parameters are created in float32 and carry logical axis names (boxed with
  ``nn.with_logical_partitioning``) from this set: 'vocab', 'embed', 'heads',
  'kv', 'mlp', 'relpos_buckets' (plus 'layers' added by ``nn.scan``, and the LoRA
  adapters' 'lora_rank', 'lora_parallel', 'lora_adapters', see ``mtx.model.lora``).
* Activations run in ``dtype`` (float32 or bfloat16); kernels are cast to it at the
  point of use, so the optimizer always sees float32 master weights.
* Shapes in docstrings: B batch, Lq / Lk query / key length, E embed, H heads,
  D head dim, M mlp dim, V vocab.
* No biases in these blocks (T5 v1.0 and v1.1; Llama's optional attention biases live in
  ``mtx.model.llama``).
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mtx.errors import UserError
from mtx.model import lora as lora_lib
from mtx.model import taps

Array = jax.Array
DType = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _weight_matmuls_saveable(prim, *_, **params) -> bool:
  """A remat policy: save the outputs of weight matmuls, dot_generals with no batch
  dimension or one, the unit axis the Gramian route's per-unit weights add
  (``mtx.model.taps``); attention's matmuls have two or more (batch, heads) and are
  recomputed. Without Gram probes it saves what
  ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable`` saves."""
  if prim is not jax.lax.dot_general_p:
    return False
  _, (lhs_batch, _) = params["dimension_numbers"]
  return len(lhs_batch) <= 1


REMAT_POLICIES = {
  # Save the outputs of weight matmuls, recompute the rest (norms, activations,
  # attention softmax) in the backward pass.
  "minimal": _weight_matmuls_saveable,
  # Save only each layer's input; recompute the whole layer.
  "full": jax.checkpoint_policies.nothing_saveable,
}

# Attention logits of masked pairs. Logits are float32, so a large finite value is
# safe (no inf - inf = nan when a whole row is masked, e.g. a padding query).
MASKED_LOGIT = -1e10


def check_config(config: Any, sizes: Sequence[str]) -> None:
  """The checks every model config shares: vocab_size set, a known dtype and remat
  policy, the ``sizes`` fields positive, dropout in [0, 1). Names the config's class.

  Raises:
    UserError: the first setting the model cannot run with.
  """
  name = type(config).__name__
  if config.vocab_size <= 0:
    raise UserError(
      f"{name}.vocab_size is {config.vocab_size}; set it to the vocabulary size (the "
      "trainer does this from the task vocabulary) before building the model."
    )
  if config.dtype not in DTYPES:
    raise UserError(f"{name}.dtype is {config.dtype!r}; use one of {sorted(DTYPES)}.")
  if config.remat_policy != "none" and config.remat_policy not in REMAT_POLICIES:
    raise UserError(
      f"{name}.remat_policy is {config.remat_policy!r}; use one of "
      f"{['none'] + sorted(REMAT_POLICIES)}."
    )
  for field in sizes:
    if getattr(config, field) <= 0:
      raise UserError(
        f"{name}.{field} is {getattr(config, field)}; it must be a positive integer."
      )
  if not 0.0 <= config.dropout_rate < 1.0:
    raise UserError(
      f"{name}.dropout_rate is {config.dropout_rate}; it must be in [0, 1)."
    )
  lora_lib.check_config(config.lora)


@functools.lru_cache(maxsize=None)
def _param_paths(model_cls: type, config: Any, num_inputs: int) -> tuple[str, ...]:
  """Every param path of ``model_cls(config)``, from an abstract init (nothing runs)."""
  model = model_cls(config, parent=None)
  tokens = (jnp.ones((1, 1), jnp.int32),) * num_inputs
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *tokens))
  flat = traverse_util.flatten_dict(dict(shapes["params"]), sep="/")
  return tuple(flat)


def check_lora_targets(model_cls: type, config: Any, num_inputs: int) -> None:
  """Raises UserError when ``config.lora.targets`` adapts no kernel of the model, or
  its embedding or vocabulary projection (``lora.check_targets``). The model's param
  paths come from an abstract init, once per config; ``num_inputs`` is the number of
  token arrays ``model_cls.__call__`` needs."""
  if not config.lora.enabled:
    return
  base = dataclasses.replace(config, lora=lora_lib.LoraConfig())
  lora_lib.check_targets(config.lora, _param_paths(model_cls, base, num_inputs))


def check_adapter_ids(name: str, ids: Array | None, tokens: Array) -> None:
  """Raises ValueError unless ``ids`` is None or integer and shaped like ``tokens``."""
  if ids is not None and (
    ids.shape != tokens.shape or not jnp.issubdtype(ids.dtype, jnp.integer)
  ):
    raise ValueError(
      f"{name} must be integer and shaped like the tokens {list(tokens.shape)}; got "
      f"{ids.dtype}{list(ids.shape)}."
    )


def constrain(x: Array, names: Sequence[str]) -> Array:
  """Logical sharding constraint on an activation; a no-op without axis rules.

  Under ``jax.vmap`` (per-unit gradients in the trainer) JAX's batching rule adds
  an unconstrained axis for the mapped dimension, so the names given here always
  describe the unbatched rank.
  """
  return nn.with_logical_constraint(x, tuple(names))


def param(
  module: nn.Module, name: str, init, shape: Sequence[int], names: Sequence[str]
) -> Array:
  """A float32 parameter with logical axis names, tapped for the unit Gram matrix when
  the model is applied with a ``taps.GRAM_PROBE`` collection (``mtx.model.taps``)."""
  w = module.param(
    name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), jnp.float32
  )
  if module.has_variable(taps.GRAM_PROBE, name):
    w = taps.tap(w, module.get_variable(taps.GRAM_PROBE, name), tuple(names))
  return w


def adapt(
  module: nn.Module,
  name: str,
  x: Array,
  y: Array,
  kernel_shape: Sequence[int],
  kernel_names: Sequence[str],
  num_in: int,
  config: lora_lib.LoraConfig,
  adapter_ids: Array | None = None,
) -> Array:
  """``y`` (= x K for the kernel ``name`` of ``module``) plus its LoRA delta, when
  ``config.targets`` matches the kernel's path; else ``y`` unchanged.

  Creates the adapters next to K (names, shapes, logical axes and init in
  ``mtx.model.lora``) through ``param``, so Gram taps cover them; call it after the
  module's base params are created, so that their init keys do not depend on LoRA.

  Args:
    module: the module that owns K (its ``path`` and the param name form K's path).
    name: K's param name.
    x: [B, L, *in] in the activation dtype.
    y: [B, L, *out], x K.
    kernel_shape: K's shape, (*in, *out).
    kernel_names: K's logical axis names.
    num_in: the number of K's input axes (contracted with x's last ones).
    config: the model's LoRA settings.
    adapter_ids: int32 [B, L] per-token adapter ids (-1 none) or None (shared only).

  Returns:
    y + s * (x A) B (+ the per-task adapters' deltas), in y's dtype.
  """
  if not config.targets_kernel("/".join(module.path + (name,))):
    return y
  in_shape, out_shape = tuple(kernel_shape[:num_in]), tuple(kernel_shape[num_in:])
  in_names, out_names = tuple(kernel_names[:num_in]), tuple(kernel_names[num_in:])
  r, rank_axis = config.rank, lora_lib.RANK_AXIS
  a_init = lora_lib.kaiming_uniform(math.prod(in_shape))
  a_names, b_names = in_names + (rank_axis,), (rank_axis,) + out_names
  total = jnp.zeros((), x.dtype)
  if config.shared and config.num_parallel == 1:
    a = param(module, name + lora_lib.SUFFIX_A, a_init, in_shape + (r,), a_names)
    b = param(
      module, name + lora_lib.SUFFIX_B, nn.initializers.zeros, (r,) + out_shape, b_names
    )
    total = total + lora_lib.delta(x, num_in, a, b)
  elif config.shared:  # MultiLoRA: n parallel adapters, scales start at 0.
    n, axis = config.num_parallel, (lora_lib.PARALLEL_AXIS,)
    a = param(
      module, name + lora_lib.SUFFIX_A, a_init, (n,) + in_shape + (r,), axis + a_names
    )
    b = param(
      module,
      name + lora_lib.SUFFIX_B,
      lora_lib.kaiming_uniform(r),
      (n, r) + out_shape,
      axis + b_names,
    )
    scales = param(
      module, name + lora_lib.SUFFIX_SCALE, nn.initializers.zeros, (n,), axis
    )
    total = total + lora_lib.delta(x, num_in, a, b, scales)
  if config.per_task:
    t, axis = config.num_adapters, (lora_lib.ADAPTERS_AXIS,)
    a = param(
      module,
      name + lora_lib.SUFFIX_TASK_A,
      a_init,
      (t,) + in_shape + (r,),
      axis + a_names,
    )
    b = param(
      module,
      name + lora_lib.SUFFIX_TASK_B,
      nn.initializers.zeros,
      (t, r) + out_shape,
      axis + b_names,
    )
    if adapter_ids is not None:
      weights = lora_lib.task_weights(adapter_ids, t)
      total = total + lora_lib.delta(x, num_in, a, b, weights)
  return y + (config.scale * total).astype(y.dtype)


# Initializers as in T5X's T5 v1.1 configs. Fan-in is given per axis so that
# multi-axis kernels ([E, H, D] and [H, D, E]) see the fan-in of the flat matrix.
def fan_in_normal(in_axis, out_axis, truncated: bool = False):
  return nn.initializers.variance_scaling(
    1.0,
    "fan_in",
    "truncated_normal" if truncated else "normal",
    in_axis=in_axis,
    out_axis=out_axis,
  )


class RMSNorm(nn.Module):
  """T5 layer norm: scale by the root mean square, no mean subtraction, no bias.

  [..., E] -> [..., E] in ``dtype``. The statistics are computed in float32
  because bfloat16 sums of squares lose too much precision.
  """

  dtype: DType = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    mean_sq = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(mean_sq + self.epsilon)).astype(self.dtype)
    return y * scale.astype(self.dtype)


class Embed(nn.Module):
  """Token embedding, shared by encoder and decoder inputs (and, in T5 v1.0, the output).

  Attributes:
    vocab_size: V.
    features: E.
    dtype: activation dtype of the returned embeddings.
    stddev: of the initial embedding (T5: 1; Llama, whose tied logits are not
      rescaled, 1/sqrt(E) so that they start near unit size).
  """

  vocab_size: int
  features: int
  dtype: DType = jnp.float32
  stddev: float = 1.0

  def setup(self):
    self.embedding = param(
      self,
      "embedding",
      nn.initializers.normal(stddev=self.stddev),
      (self.vocab_size, self.features),
      ("vocab", "embed"),
    )

  def __call__(self, tokens: Array) -> Array:
    """int32 [B, L] -> dtype [B, L, E]."""
    # Gather first, then cast: casting the whole [V, E] table costs more.
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def attend(self, x: Array) -> Array:
    """[B, L, E] -> float32 [B, L, V]: logits against the embedding table (tied output)."""
    logits = jnp.einsum(
      "ble,ve->blv",
      x,
      self.embedding.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    return constrain(
      logits, ("activation_batch", "activation_length", "activation_vocab")
    )


def relative_position_bucket(
  relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
  """Maps key-minus-query distances to T5's relative-position buckets.

  Half of the buckets (per direction) hold exact distances 0, 1, 2, ...; the rest
  cover larger distances logarithmically up to ``max_distance``, beyond which
  everything shares the last bucket. A causal (unidirectional) stack has no use for
  keys after the query, so it spends all buckets on distances to the past.

  Example (bidirectional=False, num_buckets=4, max_distance=8): distances
  key - query = [0, -1, -2, -4, -9, +3] -> buckets [0, 1, 2, 3, 3, 0].

  Args:
    relative_position: int32 [...], key position minus query position.
    bidirectional: whether keys after the query get buckets of their own.
    num_buckets: total number of buckets.
    max_distance: distance at which the logarithmic range ends.

  Returns:
    int32 [...] bucket ids in [0, num_buckets).
  """
  bucket = jnp.zeros_like(relative_position)
  # Distance into the past is positive from here on.
  distance = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket += (distance < 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_exact = distance < max_exact
  # log(distance / max_exact) / log(max_distance / max_exact) runs 0..1 over the
  # logarithmic range; the tiny epsilon avoids log(0) on the (unused) exact side.
  log_ratio = jnp.log(
    distance.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps
  ) / math.log(max_distance / max_exact)
  log_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
  return bucket + jnp.where(is_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
  """One learned scalar per (head, bucket), added to attention logits.

  T5 keeps one table per stack and shares it across that stack's layers.

  Attributes:
    num_heads: H.
    num_buckets: number of relative-position buckets.
    max_distance: see ``relative_position_bucket``.
    bidirectional: True for the encoder, False for the (causal) decoder.
  """

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """int32 [Lq], int32 [Lk] -> float32 bias [1, H, Lq, Lk].

    Only differences of positions matter, so within one packed segment the bias
    equals that of the example alone whatever its offset in the row; the leading 1
    broadcasts over the batch.
    """
    table = param(
      self,
      "rel_embedding",
      nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
      (self.num_heads, self.num_buckets),
      ("heads", "relpos_buckets"),
    )
    relative = key_positions[None, :] - query_positions[:, None]  # [Lq, Lk]
    buckets = relative_position_bucket(
      relative, self.bidirectional, self.num_buckets, self.max_distance
    )
    return jnp.take(table, buckets, axis=1)[None]  # [1, H, Lq, Lk]


class MultiHeadAttention(nn.Module):
  """T5 attention: no biases, no 1/sqrt(D) in the dot product.

  The 1/sqrt(D) scaling lives in the query kernel's initialization instead (as in
  Mesh TensorFlow T5 and T5X), which is equivalent at step 0 and lets the learned
  query weights own the scale.

  Decoding cache (only when ``decode=True``, self-attention only), in the 'cache'
  collection:
    cached_key, cached_value: dtype [B, L_max, H, D], batch first so that beam
      search can reorder or expand it with a plain gather along axis 0.
  The write position comes from the caller (one index per decoder stack).

  Attributes:
    num_heads: H.
    head_dim: D.
    dtype: activation dtype.
    dropout_rate: dropout on the attention probabilities.
    enable_dropout: whether dropout is applied (needs rng 'dropout').
    decode: use the key/value cache.
    decode_step: with ``decode``, the cache exists and this call feeds one new
      token; otherwise (cache being created) the cache is zero-filled with
      ``max_decode_length`` positions and the call attends like training.
    max_decode_length: cache length when the cache is created.
    lora: LoRA adapters of the query/key/value/out kernels its targets match.
  """

  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  enable_dropout: bool = False
  decode: bool = False
  decode_step: bool = False
  max_decode_length: int = 0
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @nn.compact
  def __call__(
    self,
    inputs_q: Array,
    inputs_kv: Array,
    mask: Array,
    bias: Array | None = None,
    decode_index: Array | None = None,
    q_adapter_ids: Array | None = None,
    kv_adapter_ids: Array | None = None,
  ) -> Array:
    """Attends from queries to keys/values.

    Args:
      inputs_q: [B, Lq, E] in dtype.
      inputs_kv: [B, Lk, E] in dtype (Lk = 1 and equal to Lq in a decode step).
      mask: bool, broadcastable to [B, H, Lq, Lk'] where Lk' is Lk, or L_max in a
        decode step; True where attention is allowed.
      bias: float32 broadcastable to [B, H, Lq, Lk'] or None.
      decode_index: int32 scalar, the position the new token is written to in a
        decode step; ignored otherwise.
      q_adapter_ids: int32 [B, Lq] LoRA adapter ids of the queries' tokens (for the
        query and out kernels), or None (``mtx.model.lora``).
      kv_adapter_ids: int32 [B, Lk], the same for the key/value kernels.

    Returns:
      [B, Lq, E] in dtype.
    """
    emb = inputs_q.shape[-1]
    h, d = self.num_heads, self.head_dim
    kv_init = fan_in_normal(0, (1, 2))
    depth_scale = math.sqrt(d)

    def query_init(*args):
      return kv_init(*args) / depth_scale

    # Every base kernel first, in a fixed order (their init keys depend on it), then
    # any LoRA adapters as each kernel is used.
    qkv_names = ("embed", "heads", "kv")
    kernels = {
      "query": param(self, "query", query_init, (emb, h, d), qkv_names),
      "key": param(self, "key", kv_init, (emb, h, d), qkv_names),
      "value": param(self, "value", kv_init, (emb, h, d), qkv_names),
    }
    out_names = ("heads", "kv", "embed")
    out_kernel = param(self, "out", fan_in_normal((0, 1), 2), (h, d, emb), out_names)

    def project(name, x, adapter_ids):
      y = jnp.einsum("ble,ehd->blhd", x, kernels[name].astype(self.dtype))
      y = adapt(self, name, x, y, (emb, h, d), qkv_names, 1, self.lora, adapter_ids)
      return constrain(
        y, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
      )

    query = project("query", inputs_q, q_adapter_ids)
    key = project("key", inputs_kv, kv_adapter_ids)
    value = project("value", inputs_kv, kv_adapter_ids)

    if self.decode:
      batch = inputs_kv.shape[0]
      cache_shape = (batch, self.max_decode_length or inputs_kv.shape[1], h, d)
      cached_key = self.variable(
        "cache", "cached_key", jnp.zeros, cache_shape, self.dtype
      )
      cached_value = self.variable(
        "cache", "cached_value", jnp.zeros, cache_shape, self.dtype
      )
      if self.decode_step:
        if inputs_q.shape[1] != 1:
          raise ValueError(
            "A decode step takes exactly one token per row; got decoder "
            f"inputs of length {inputs_q.shape[1]}."
          )
        start = (0, decode_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
          cached_key.value, key.astype(self.dtype), start
        )
        cached_value.value = jax.lax.dynamic_update_slice(
          cached_value.value, value.astype(self.dtype), start
        )
        key, value = cached_key.value, cached_value.value

    # Logits and softmax in float32: bfloat16 softmax over long rows is lossy.
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(
      weights, deterministic=not self.enable_dropout
    )
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    out = constrain(
      out, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    )
    heads_out = out
    out = jnp.einsum("bqhd,hde->bqe", heads_out, out_kernel.astype(self.dtype))
    out = adapt(
      self, "out", heads_out, out, (h, d, emb), out_names, 2, self.lora, q_adapter_ids
    )
    return constrain(out, ("activation_batch", "activation_length", "activation_embed"))


ACTIVATIONS = {
  # GELU uses the tanh approximation, as T5X's ``nn.gelu`` default and Hugging Face's
  # ``gelu_new`` (T5 v1.1's "gated-gelu") do.
  "gelu": lambda x: nn.gelu(x, approximate=True),
  "relu": nn.relu,
  # SiLU (swish) gates Llama's MLP: ("silu", "linear") is SwiGLU.
  "silu": nn.silu,
  "linear": lambda x: x,
}


class MlpBlock(nn.Module):
  """T5's feed-forward, no biases: wo(prod_i act_i(x wi_i)), T5X's ``MlpBlock``.

  ``activations=("gelu", "linear")`` is T5 v1.1's gated GELU, wo(gelu(x wi_0) * (x wi_1));
  ``("relu",)`` is T5 v1.0's wo(relu(x wi)). One activation names its input matrix
  ``wi``, several name theirs ``wi_0``, ``wi_1``, ... (T5X's names).

  Attributes:
    mlp_dim: M.
    activations: one name per input matrix, from "gelu", "relu", "linear".
    dtype: activation dtype.
    dropout_rate: dropout on the hidden activations.
    enable_dropout: whether dropout is applied (needs rng 'dropout').
    lora: LoRA adapters of the wi.../wo kernels its targets match.
  """

  mlp_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  enable_dropout: bool = False
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @nn.compact
  def __call__(self, x: Array, adapter_ids: Array | None = None) -> Array:
    """[B, L, E] -> [B, L, E], in dtype; ``adapter_ids`` int32 [B, L] or None route
    the per-task LoRA adapters (``mtx.model.lora``)."""
    emb = x.shape[-1]
    init = fan_in_normal(0, 1, truncated=True)
    names = (
      ["wi"]
      if len(self.activations) == 1
      else [f"wi_{i}" for i in range(len(self.activations))]
    )
    # Created in this order (wi..., wo): each param's init key depends on it.
    wis = [param(self, n, init, (emb, self.mlp_dim), ("embed", "mlp")) for n in names]
    wo = param(self, "wo", init, (self.mlp_dim, emb), ("mlp", "embed"))
    hidden = None
    for activation, name, wi in zip(self.activations, names, wis):
      h = x @ wi.astype(self.dtype)
      h = adapt(
        self, name, x, h, (emb, self.mlp_dim), ("embed", "mlp"), 1, self.lora, adapter_ids
      )
      h = ACTIVATIONS[activation](h)
      hidden = h if hidden is None else hidden * h
    hidden = constrain(
      hidden, ("activation_batch", "activation_length", "activation_mlp")
    )
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=not self.enable_dropout)
    out = hidden @ wo.astype(self.dtype)
    out = adapt(
      self,
      "wo",
      hidden,
      out,
      (self.mlp_dim, emb),
      ("mlp", "embed"),
      1,
      self.lora,
      adapter_ids,
    )
    return constrain(out, ("activation_batch", "activation_length", "activation_embed"))


class VocabProjection(nn.Module):
  """Output layer, untied from the input embedding (T5 v1.1).

  Attributes:
    vocab_size: V.
    dtype: dtype of the matmul inputs; the product accumulates and is returned in
      float32 so that bfloat16 runs do not round the logits.
  """

  vocab_size: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, L, E] -> float32 [B, L, V]."""
    kernel = param(
      self,
      "kernel",
      fan_in_normal(0, 1, truncated=True),
      (x.shape[-1], self.vocab_size),
      ("embed", "vocab"),
    )
    logits = jnp.einsum(
      "ble,ev->blv", x, kernel.astype(self.dtype), preferred_element_type=jnp.float32
    )
    return constrain(
      logits, ("activation_batch", "activation_length", "activation_vocab")
    )


# Masks. All are bool, True where attention is allowed, shaped [B, 1, Lq, Lk] (the
# 1 broadcasts over heads) or broadcastable to it.


def self_attention_mask(
  valid: Array, segment_ids: Array | None = None, causal: bool = False
) -> Array:
  """Mask for self-attention within rows that may pack several examples.

  Example (causal=False): segment_ids [[1, 1, 2, 0]] gives, for row 0,
      [[1, 1, 0, 0],
       [1, 1, 0, 0],
       [0, 0, 1, 0],
       [0, 0, 0, 0]]
  With causal=True the upper triangle is removed as well.

  Args:
    valid: bool [B, L], False at padding.
    segment_ids: int32 [B, L] or None (one example per row).
    causal: forbid attending to later positions.

  Returns:
    bool [B, 1, L, L].
  """
  mask = valid[:, None, :, None] & valid[:, None, None, :]
  if segment_ids is not None:
    mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if causal:
    length = valid.shape[1]
    mask &= jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
  return mask


def cross_attention_mask(
  query_valid: Array,
  key_valid: Array,
  query_segment_ids: Array | None = None,
  key_segment_ids: Array | None = None,
) -> Array:
  """Mask for decoder-to-encoder attention.

  Args:
    query_valid: bool [B, Lq] (decoder side).
    key_valid: bool [B, Lk] (encoder side).
    query_segment_ids: int32 [B, Lq] or None.
    key_segment_ids: int32 [B, Lk] or None; given together with the query ones.

  Returns:
    bool [B, 1, Lq, Lk].
  """
  mask = query_valid[:, None, :, None] & key_valid[:, None, None, :]
  if query_segment_ids is not None:
    mask &= query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]
  return mask


def run_layers(
  layer_cls,
  num_layers: int,
  config: Any,
  layer_kwargs: dict[str, Any],
  remat: bool,
  x: Array,
  *args: Array,
) -> Array:
  """Applies ``num_layers`` layers, unrolled or scanned, optionally rematerialized.

  ``config`` is the model's frozen config (``T5Config``, ``LlamaConfig``): it needs
  ``remat_policy`` and ``scan_layers``, and each layer gets it as ``config=``. A layer
  returns ``(x, None)`` (scan's carry and per-layer output).

  Must be called from inside a compact method: the layers become children of the
  calling stack, named ``layers_0``.. (unrolled) or ``layers`` (scanned).
  """
  if remat and config.remat_policy != "none":
    # Under scan, CSE across iterations cannot happen, and prevent_cse would only
    # block optimizations (as the flax docs advise).
    layer_cls = nn.remat(
      layer_cls,
      policy=REMAT_POLICIES[config.remat_policy],
      prevent_cse=not config.scan_layers,
    )
  if config.scan_layers:
    scanned = nn.scan(
      layer_cls,
      # Params stack on a leading layer axis. The cache stacks on axis 1 so that
      # its batch axis stays first (beam search gathers along axis 0).
      variable_axes={"params": 0, "cache": 1},
      split_rngs={"params": True, "dropout": True},
      # Gram probes (mtx.model.taps) are one per parameter, shared by all layers.
      variable_broadcast=taps.GRAM_PROBE,
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(config=config, name="layers", **layer_kwargs)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = layer_cls(config=config, name=f"layers_{i}", **layer_kwargs)(x, *args)
  return x
