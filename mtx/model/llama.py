"""Llama-family decoder-only Transformer in flax.linen (Llama 2/3, Qwen2, Mistral, SmolLM).

The model maps token ids to float32 logits:

    decoder_input_tokens int32 [B, L] --embed, layers, norm, project--> logits float32 [B, L, V]

What makes it Llama: RMS pre-norm, rotary position embeddings (RoPE, with the "linear"
and "llama3" frequency scalings), a SwiGLU MLP (``wo(silu(x wi_0) * (x wi_1))``),
grouped-query attention (K key/value heads shared by H = K * G query heads), no biases,
an optional output projection tied to the input embedding. The family's variations are
config fields: attention biases on q/k/v (Qwen2) or q/k/v/o (Llama's
``attention_bias``), a sliding attention window (Mistral).

Rows may pack several examples (``decoder_segment_ids``: 0 padding, 1, 2, ... the
example within the row; ``decoder_positions`` restart at 0 in each), and a prefix-LM
attends bidirectionally within each example's inputs (``decoder_causal_attention``,
T5X's name: 1 on the inputs part). The attention mask of a query q and key k is

    same segment (both nonzero) AND (k <= q OR (prefix[q] AND prefix[k]))
    AND q - k < sliding_window (when one is set)

Example (one row, segment ids [1, 1, 1, 2, 2, 0], prefix [1, 1, 0, 1, 0, 0])::

    q\\k  0 1 2 3 4 5
    0    1 1 0 0 0 0      positions 0-1 are example 1's inputs: they see each other
    1    1 1 0 0 0 0
    2    1 1 1 0 0 0      its target sees its past only
    3    0 0 0 1 0 0      example 2 starts; nothing crosses a segment
    4    0 0 0 1 1 0
    5    0 0 0 0 0 0      padding attends nowhere (its logits are ignored)

Parameter tree (``scan_layers=False``; with ``scan_layers=True`` the ``layers_i``
subtrees become one ``layers`` subtree whose leaves have a leading 'layers' axis)::

    token_embedder/embedding                         [V, E]  (vocab, embed)
    decoder/layers_i/pre_self_attention_layer_norm/scale  [E]  (embed)
    decoder/layers_i/self_attention/query            [E, H, D]  (embed, heads, kv)
    decoder/layers_i/self_attention/{key,value}      [E, K, D]  (embed, kv_heads, kv)
    decoder/layers_i/self_attention/out              [H, D, E]  (heads, kv, embed)
    decoder/layers_i/self_attention/query_bias       [H, D]  (heads, kv)     (qkv_bias)
    decoder/layers_i/self_attention/{key,value}_bias [K, D]  (kv_heads, kv)  (qkv_bias)
    decoder/layers_i/self_attention/out_bias         [E]  (embed)            (out_bias)
    decoder/layers_i/pre_mlp_layer_norm/scale        [E]  (embed)
    decoder/layers_i/mlp/{wi_0,wi_1}                 [E, M]  (embed, mlp)  gate, up
    decoder/layers_i/mlp/wo                          [M, E]  (mlp, embed)  down
    decoder/decoder_norm/scale                       [E]  (embed)
    decoder/logits_dense/kernel                      [E, V]  (embed, vocab)  (untied only)

With ``config.lora`` (``mtx.model.lora``), each kernel its targets match gets LoRA
adapters next to it (``query_lora_a``, ``query_lora_b``, ...); per-task adapters are
routed by the per-token ``decoder_adapter_ids``.

Decoding cache (the 'cache' collection; see ``init_cache``)::

    decoder/cache_index                              int32 []  next write position
    decoder/cache_valid                              bool [B, L_max]  slots holding a real token
    decoder/next_position                            int32 [B]  each row's next RoPE position
    decoder/layers_i/self_attention/cached_key       dtype [B, L_max, K, D]
    decoder/layers_i/self_attention/cached_value     dtype [B, L_max, K, D]
    (scan_layers=True: decoder/layers/self_attention/cached_* [B, layers, L_max, K, D])

A call with ``decode=True`` on an existing cache feeds a chunk of C >= 1 tokens (a whole
prompt to prefill it, then one token per step): their keys and values are written at
``cache_index`` .. ``cache_index + C - 1``, they attend to every earlier slot that holds
a real token, and ``cache_index`` advances by C. All rows move in lockstep: prompts of
different lengths are left-padded, with ``decoder_segment_ids`` 0 on the padding (never
attended) and ``decoder_positions`` starting at 0 on each row's first real token; later
steps continue each row's positions (``next_position``). The batch is axis 0 of every
cache leaf but the scalar ``cache_index``.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtx.errors import UserError
from mtx.model import layers
from mtx.model import lora as lora_lib

Array = jax.Array

ROPE_SCALINGS = ("default", "linear", "llama3")
_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")
_HEAD_AXES = (
  "activation_batch",
  "activation_length",
  "activation_heads",
  "activation_kv",
)
_KV_AXES = (
  "activation_batch",
  "activation_length",
  "activation_kv_heads",
  "activation_kv",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of the decoder-only model; gin binds them as ``model.LlamaConfig.*``.

  Defaults are SmolLM-135M's shape (a Llama architecture), with ``vocab_size`` unset.

  Attributes:
    vocab_size: V; 0 means "set by the trainer from the vocabulary". The model refuses
      to build while it is 0.
    emb_dim: E, width of the residual stream (HF ``hidden_size``).
    num_heads: H, query heads (``num_attention_heads``).
    num_kv_heads: K, key/value heads (``num_key_value_heads``); H must be a multiple
      of K. K = H is plain multi-head attention, K = 1 multi-query.
    head_dim: D, width of one head (HF's default: E / H).
    mlp_dim: M, hidden width of the SwiGLU MLP (``intermediate_size``).
    num_layers: depth (``num_hidden_layers``).
    norm_epsilon: RMSNorm's epsilon (``rms_norm_eps``).
    rope_theta: RoPE's base wavelength (``rope_theta``).
    rope_scaling: "default" (none), "linear" (positions divided by
      ``rope_factor``) or "llama3" (Llama 3.1's piecewise frequency scaling, with
      ``rope_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor`` and
      ``rope_original_max_position``).
    rope_factor: the scaling factor of "linear" and "llama3".
    rope_low_freq_factor: "llama3": wavelengths above original / low are scaled fully.
    rope_high_freq_factor: "llama3": wavelengths below original / high are kept.
    rope_original_max_position: "llama3": the pretraining context length.
    tie_word_embeddings: logits from the input embedding (no ``logits_dense``).
    qkv_bias: biases on the query/key/value projections (Qwen2; Llama's
      ``attention_bias``).
    out_bias: a bias on the output projection (Llama's ``attention_bias``).
    sliding_window: 0 for full attention, else a query sees only the keys less than
      this many positions before it (Mistral).
    dropout_rate: dropout on residual branches, MLP hidden and attention
      probabilities; applied only with ``enable_dropout=True``.
    dtype: activation dtype, "float32" or "bfloat16". Parameters are always float32;
      RoPE, attention softmax, norms' statistics and logits are computed in float32.
    remat_policy: "none", "minimal" or "full" (see ``mtx.model.layers.REMAT_POLICIES``).
    scan_layers: run the layers with ``nn.scan``; params get a leading 'layers' axis.
    lora: LoRA adapters (``mtx.model.lora``; off by default), gin
      ``model.LlamaConfig.lora = @model.LoraConfig()``.
  """

  vocab_size: int = 0
  emb_dim: int = 576
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  mlp_dim: int = 1536
  num_layers: int = 30
  norm_epsilon: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  sliding_window: int = 0
  dropout_rate: float = 0.0
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @property
  def activation_dtype(self) -> Any:
    return layers.DTYPES[self.dtype]


def validate_config(config: LlamaConfig) -> None:
  """Raises UserError for settings the model cannot run with."""
  layers.check_config(
    config, ("emb_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "num_layers")
  )
  if config.num_heads % config.num_kv_heads:
    raise UserError(
      f"LlamaConfig.num_heads is {config.num_heads} and num_kv_heads "
      f"{config.num_kv_heads}; the query heads must be a multiple of the key/value heads."
    )
  if config.head_dim % 2:
    raise UserError(
      f"LlamaConfig.head_dim is {config.head_dim}; rotary embeddings need an even width."
    )
  if config.rope_scaling not in ROPE_SCALINGS:
    raise UserError(
      f"LlamaConfig.rope_scaling is {config.rope_scaling!r}; use one of {ROPE_SCALINGS}."
    )
  if config.rope_scaling != "default" and config.rope_factor <= 0:
    raise UserError(
      f"LlamaConfig.rope_factor is {config.rope_factor}; it must be positive."
    )
  if config.sliding_window < 0:
    raise UserError(
      f"LlamaConfig.sliding_window is {config.sliding_window}; use 0 (none) or a "
      "positive window."
    )


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """RoPE's inverse wavelengths, float32 [D / 2], after the config's scaling.

  inv_freq_i = theta ** (-2i / D). "linear" divides all by ``rope_factor``. "llama3"
  (Llama 3.1) divides those with a wavelength 2 pi / inv_freq longer than
  original / low_freq_factor by the factor, keeps those shorter than
  original / high_freq_factor, and interpolates in between.
  """
  d = config.head_dim
  exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  if config.rope_scaling == "linear":
    return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
  if config.rope_scaling == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_angles(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """int32 [B, L] positions -> (cos, sin), float32 [B, L, D / 2] each."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates each head's halves: [B, L, N, D] with cos/sin [B, L, D / 2] -> [B, L, N, D].

  Hugging Face's layout (rotate_half), not the interleaved pairs of the original paper:
  dimension i pairs with i + D/2, so (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
  Computed in float32 and returned in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(
  query_index: Array,
  key_index: Array,
  query_segment_ids: Array | None,
  key_segment_ids: Array | None,
  query_prefix: Array | None,
  key_prefix: Array | None,
  sliding_window: int,
) -> Array:
  """The mask of the module docstring: bool [B, 1, Lq, Lk], True where allowed.

  Args:
    query_index: int32 [Lq], each query's index in the row (or in the cache).
    key_index: int32 [Lk], each key's index.
    query_segment_ids, key_segment_ids: int32 [B, Lq] / [B, Lk], or both None (one
      example per row, all positions real).
    query_prefix, key_prefix: bool [B, Lq] / [B, Lk] (True on inputs, attended
      bidirectionally), or both None (causal everywhere).
    sliding_window: 0, or the window (see ``LlamaConfig``).
  """
  mask = (key_index[None, :] <= query_index[:, None])[None, None]
  if query_prefix is not None:
    mask = mask | (query_prefix[:, None, :, None] & key_prefix[:, None, None, :])
  if sliding_window:
    mask = (
      mask & ((query_index[:, None] - key_index[None, :]) < sliding_window)[None, None]
    )
  if query_segment_ids is not None:
    mask = mask & (
      (query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :])
      & (query_segment_ids > 0)[:, None, :, None]
    )
  return mask


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache.

  The scores are (q k) / sqrt(D) in float32; query head h reads key/value head
  h // G (G = H / K), Hugging Face's ``repeat_kv`` order.

  Attributes:
    config: model hyperparameters (heads, widths, biases, dtype, dropout).
    enable_dropout: whether dropout is applied (needs rng 'dropout').
    decode: use the key/value cache.
    decode_step: with ``decode``, the cache exists and this call writes to it;
      otherwise (cache being created) it is zero-filled with ``max_decode_length``
      positions and the call attends like training.
    max_decode_length: cache length when the cache is created (0: input length).
  """

  config: LlamaConfig
  enable_dropout: bool = False
  decode: bool = False
  decode_step: bool = False
  max_decode_length: int = 0

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    cos: Array,
    sin: Array,
    decode_index: Array,
    adapter_ids: Array | None = None,
  ) -> Array:
    """x [B, L, E], mask bool [B, 1, L, Lk], cos/sin f32 [B, L, D/2] -> [B, L, E].

    Lk is L, or L_max in a decode step; ``decode_index`` (int32 []) is where the
    chunk's keys are written in a decode step, and ignored otherwise;
    ``adapter_ids`` int32 [B, L] or None route the per-task LoRA adapters.
    """
    cfg, dtype = self.config, self.config.activation_dtype
    emb, h, k, d = x.shape[-1], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = layers.fan_in_normal(0, (1, 2))
    projections = {
      "query": (h, "heads", _HEAD_AXES),
      "key": (k, "kv_heads", _KV_AXES),
      "value": (k, "kv_heads", _KV_AXES),
    }
    # Every base param first, in a fixed order (their init keys depend on it), then any
    # LoRA adapters as each kernel is used.
    kernels, biases = {}, {}
    for name, (heads, heads_axis, _) in projections.items():
      names = ("embed", heads_axis, "kv")
      kernels[name] = layers.param(self, name, init, (emb, heads, d), names)
      if cfg.qkv_bias:
        biases[name] = layers.param(
          self, f"{name}_bias", nn.initializers.zeros, (heads, d), (heads_axis, "kv")
        )
    out_names = ("heads", "kv", "embed")
    out_kernel = layers.param(
      self, "out", layers.fan_in_normal((0, 1), 2), (h, d, emb), out_names
    )
    if cfg.out_bias:
      biases["out"] = layers.param(
        self, "out_bias", nn.initializers.zeros, (emb,), ("embed",)
      )

    def project(name):
      heads, heads_axis, axes = projections[name]
      y = jnp.einsum("ble,ehd->blhd", x, kernels[name].astype(dtype))
      shape, names = (emb, heads, d), ("embed", heads_axis, "kv")
      y = layers.adapt(self, name, x, y, shape, names, 1, cfg.lora, adapter_ids)
      if cfg.qkv_bias:
        y = y + biases[name].astype(dtype)
      return layers.constrain(y, axes)

    query = apply_rope(project("query"), cos, sin)
    key = apply_rope(project("key"), cos, sin)
    value = project("value")

    if self.decode:
      shape = (x.shape[0], self.max_decode_length or x.shape[1], k, d)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, dtype)
      if self.decode_step:
        start = (0, decode_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
          cached_key.value, key.astype(dtype), start
        )
        cached_value.value = jax.lax.dynamic_update_slice(
          cached_value.value, value.astype(dtype), start
        )
        key, value = cached_key.value, cached_value.value

    # [B, Lq, H, D] -> [B, Lq, K, G, D]: query head h = kv head h // G, member h % G.
    query = query.reshape(query.shape[:2] + (k, h // k, d))
    logits = jnp.einsum(
      "bqkgd,bskd->bkgqs", query, key, preferred_element_type=jnp.float32
    ) * np.float32(1.0 / math.sqrt(d))
    logits = jnp.where(mask[:, :, None], logits, layers.MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=not self.enable_dropout)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value).reshape(x.shape[:2] + (h, d))
    heads_out = layers.constrain(out, _HEAD_AXES)
    out = jnp.einsum("bqhd,hde->bqe", heads_out, out_kernel.astype(dtype))
    out = layers.adapt(
      self, "out", heads_out, out, (h, d, emb), out_names, 2, cfg.lora, adapter_ids
    )
    if cfg.out_bias:
      out = out + biases["out"].astype(dtype)
    return layers.constrain(out, _EMBED_AXES)


def _dropout(config: LlamaConfig, enable_dropout: bool, x: Array) -> Array:
  return nn.Dropout(config.dropout_rate)(x, deterministic=not enable_dropout)


class DecoderLayer(nn.Module):
  """Pre-norm grouped-query attention + SwiGLU MLP, each a residual branch.

  Attributes: as ``Attention``'s (the layer passes them on).
  """

  config: LlamaConfig
  enable_dropout: bool = False
  decode: bool = False
  decode_step: bool = False
  max_decode_length: int = 0

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    cos: Array,
    sin: Array,
    decode_index: Array,
    adapter_ids: Array | None,
  ) -> tuple[Array, None]:
    """x [B, L, E] -> ([B, L, E], None); the other arguments as ``Attention``'s."""
    cfg, dtype = self.config, self.config.activation_dtype
    h = layers.RMSNorm(dtype, cfg.norm_epsilon, name="pre_self_attention_layer_norm")(x)
    h = Attention(
      cfg,
      self.enable_dropout,
      self.decode,
      self.decode_step,
      self.max_decode_length,
      name="self_attention",
    )(h, mask, cos, sin, decode_index, adapter_ids)
    x = x + _dropout(cfg, self.enable_dropout, h)
    h = layers.RMSNorm(dtype, cfg.norm_epsilon, name="pre_mlp_layer_norm")(x)
    h = layers.MlpBlock(
      mlp_dim=cfg.mlp_dim,
      activations=("silu", "linear"),
      dtype=dtype,
      dropout_rate=cfg.dropout_rate,
      enable_dropout=self.enable_dropout,
      lora=cfg.lora,
      name="mlp",
    )(h, adapter_ids)
    x = x + _dropout(cfg, self.enable_dropout, h)
    return layers.constrain(x, _EMBED_AXES), None


def _decode_mask(
  index: Array,
  length: int,
  valid: Array,
  segment_ids: Array | None,
  prefix: Array | None,
  sliding_window: int,
) -> tuple[Array, Array]:
  """(valid, mask) of a chunk of ``length`` queries written at cache slot ``index``.

  ``valid`` bool [B, L_max] marks the slots holding real tokens; the chunk's are added
  (``segment_ids`` int [B, length] > 0, or all when None). ``prefix`` bool [B, length]
  or None marks the chunk's prompt tokens (prefix-LM: they see each other both ways).
  The mask is bool [B, 1, length, L_max].
  """
  batch, cache_length = valid.shape
  real = jnp.ones((batch, length), jnp.bool_) if segment_ids is None else segment_ids > 0
  valid = jax.lax.dynamic_update_slice(valid, real, (0, index))
  key_prefix = None
  if prefix is not None:
    key_prefix = jax.lax.dynamic_update_slice(
      jnp.zeros((batch, cache_length), jnp.bool_), prefix, (0, index)
    )
  mask = attention_mask(
    index + jnp.arange(length, dtype=jnp.int32),
    jnp.arange(cache_length, dtype=jnp.int32),
    None,
    None,
    prefix,
    key_prefix,
    sliding_window,
  )
  return valid, mask & valid[:, None, None, :]


class Decoder(nn.Module):
  """The layer stack: layers, final norm, output projection (untied)."""

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    x: Array,
    segment_ids: Array | None,
    positions: Array | None,
    prefix: Array | None,
    adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
    max_decode_length: int | None = None,
  ) -> Array:
    """Embedded tokens [B, L, E] -> float32 logits [B, L, V] (tied: hidden [B, L, E]).

    Arguments as ``Llama.__call__``'s (``prefix`` is ``decoder_causal_attention > 0``).
    """
    cfg = self.config
    batch, length = x.shape[:2]
    decode_step = decode and self.has_variable("cache", "cache_index")
    if decode:
      slots = max_decode_length or length  # used only when the cache is created
      cache_index = self.variable(
        "cache", "cache_index", lambda: jnp.zeros((), jnp.int32)
      )
      cache_valid = self.variable(
        "cache", "cache_valid", lambda: jnp.zeros((batch, slots), jnp.bool_)
      )
      next_position = self.variable(
        "cache", "next_position", lambda: jnp.zeros((batch,), jnp.int32)
      )
    chunk = jnp.arange(length, dtype=jnp.int32)
    if decode_step:
      # Queries are cache slots index .. index + L - 1; keys are every slot holding a
      # real token. Slots not yet written lie after every query (causality).
      index = cache_index.value
      cache_valid.value, mask = _decode_mask(
        index, length, cache_valid.value, segment_ids, prefix, cfg.sliding_window
      )
      if positions is None:
        positions = next_position.value[:, None] + chunk
      next_position.value = positions[:, -1] + 1
    else:
      index = jnp.zeros((), jnp.int32)
      mask = attention_mask(
        chunk, chunk, segment_ids, segment_ids, prefix, prefix, cfg.sliding_window
      )
      if positions is None:
        positions = jnp.broadcast_to(chunk, x.shape[:2])
    cos, sin = rope_angles(positions, rope_frequencies(cfg))
    layer_kwargs = {
      "enable_dropout": enable_dropout,
      "decode": decode,
      "decode_step": decode_step,
      "max_decode_length": max_decode_length or 0,
    }
    # Remat only pays off when there is a backward pass; decoding has none.
    x = layers.run_layers(
      DecoderLayer,
      cfg.num_layers,
      cfg,
      layer_kwargs,
      not decode,
      x,
      mask,
      cos,
      sin,
      index,
      adapter_ids,
    )
    x = layers.RMSNorm(cfg.activation_dtype, cfg.norm_epsilon, name="decoder_norm")(x)
    if decode_step:
      cache_index.value = index + length
    if cfg.tie_word_embeddings:
      return x  # Llama.__call__ projects with the input embedding.
    return layers.VocabProjection(
      cfg.vocab_size, cfg.activation_dtype, name="logits_dense"
    )(x)


class Llama(nn.Module):
  """Decoder-only Llama-family language model.

  >>> model = Llama(LlamaConfig(vocab_size=256, emb_dim=32, num_heads=4, num_kv_heads=2,
  ...                           head_dim=8, mlp_dim=64, num_layers=2))
  >>> tokens = jnp.ones((2, 6), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)["params"]
  >>> model.apply({"params": params}, tokens).shape
  (2, 6, 256)

  Attributes:
    config: model hyperparameters; ``vocab_size`` must be set (> 0).
  """

  config: LlamaConfig

  def setup(self):
    validate_config(self.config)
    layers.check_lora_targets(Llama, self.config, 1)
    cfg = self.config
    self.token_embedder = layers.Embed(
      cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype, stddev=cfg.emb_dim**-0.5
    )
    self.decoder = Decoder(cfg)

  def __call__(
    self,
    decoder_input_tokens: Array,
    decoder_segment_ids: Array | None = None,
    decoder_positions: Array | None = None,
    decoder_causal_attention: Array | None = None,
    decoder_adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
    max_decode_length: int | None = None,
  ) -> Array:
    """float32 logits [B, L, V] for every position (the next token's distribution).

    Args:
      decoder_input_tokens: int32 [B, L].
      decoder_segment_ids: int32 [B, L] or None: packed examples (0 = padding);
        None treats each row as one example with every position real (trailing
        padding then only sees itself and the past, and its logits are ignored).
      decoder_positions: int32 [B, L] or None: RoPE positions, restarting at 0 in
        each packed example; None is 0, 1, 2, ... (in a decode step: the cache slots).
      decoder_causal_attention: int or bool [B, L] or None: 1 on each example's
        inputs, which attend to each other bidirectionally (prefix-LM); None is a
        causal LM.
      decoder_adapter_ids: int32 [B, L] or None: each token's per-task LoRA adapter
        (>= 0: that adapter, -1: none, e.g. padding; in a decode step the chunk's).
        None applies the shared adapter only (``mtx.model.lora``).
      enable_dropout: apply dropout (needs rng 'dropout').
      decode: incremental decoding with the 'cache' collection (apply with
        ``mutable=['cache']``; see the module docstring). Segment ids then only mark
        padding (0) in a left-padded prompt.
      max_decode_length: cache length when the cache is created.
    """
    if decoder_input_tokens.ndim != 2 or not jnp.issubdtype(
      decoder_input_tokens.dtype, jnp.integer
    ):
      raise ValueError(
        "decoder_input_tokens must be integer [batch, length]; got "
        f"{decoder_input_tokens.dtype}{list(decoder_input_tokens.shape)}."
      )
    layers.check_adapter_ids(
      "decoder_adapter_ids", decoder_adapter_ids, decoder_input_tokens
    )
    prefix = None if decoder_causal_attention is None else decoder_causal_attention > 0
    x = self.token_embedder(decoder_input_tokens)
    y = self.decoder(
      x,
      decoder_segment_ids,
      decoder_positions,
      prefix,
      decoder_adapter_ids,
      enable_dropout=enable_dropout,
      decode=decode,
      max_decode_length=max_decode_length,
    )
    if self.config.tie_word_embeddings:
      return self.token_embedder.attend(y)
    return y


def init_cache(config: LlamaConfig, batch_size: int, max_decode_length: int) -> Any:
  """An empty decoding cache for ``Llama(config)(..., decode=True)``.

  Only shapes are traced (no parameters are initialized or run).

  Returns:
    The 'cache' collection: zeros, ``cache_index`` 0; layout in the module docstring.
  """
  model = Llama(config)

  def _init():
    tokens = jnp.zeros((batch_size, max_decode_length), jnp.int32)
    return model.init(jax.random.key(0), tokens, decode=True)["cache"]

  shapes = jax.eval_shape(_init)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
