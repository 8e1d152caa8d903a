"""T5 (v1.1 and v1.0) encoder-decoder in flax.linen, with packing, a decoding cache and SPMD names.

The model maps token ids to float32 logits:

    encoder_input_tokens int32 [B, Le] --encode--> encoded [B, Le, E]
    encoded, decoder_input_tokens int32 [B, Ld] --decode--> logits float32 [B, Ld, V]

What makes it T5 v1.1 (and what differs from the original T5): RMS pre-norm, gated-GELU
MLP, relative position biases (one table per stack, shared by its layers), no biases,
an output projection untied from the input embedding, no 1/sqrt(D) in attention.
T5 v1.0 (``mlp_activations=("relu",)``, ``logits_via_embedding=True``) differs in two
places: a ReLU MLP with one input matrix (``mlp/wi``), and logits from the input
embedding (``embedding.attend(y) / sqrt(E)``, no ``decoder/logits_dense``).

Parameter tree (``scan_layers=False``; with ``scan_layers=True`` the ``layers_i``
subtrees become one ``layers`` subtree whose leaves have a leading layer axis with the
logical name 'layers')::

    token_embedder/embedding                      [V, E]  (vocab, embed)
    encoder/relpos_bias/rel_embedding             [H, buckets]  (heads, relpos_buckets)
    encoder/layers_i/pre_attention_layer_norm/scale
    encoder/layers_i/attention/{query,key,value}  [E, H, D]  (embed, heads, kv)
    encoder/layers_i/attention/out                [H, D, E]  (heads, kv, embed)
    encoder/layers_i/pre_mlp_layer_norm/scale     [E]  (embed)
    encoder/layers_i/mlp/{wi_0,wi_1}              [E, M]  (embed, mlp)  (one activation: mlp/wi)
    encoder/layers_i/mlp/wo                       [M, E]  (mlp, embed)
    encoder/encoder_norm/scale
    decoder/relpos_bias/rel_embedding
    decoder/layers_i/{pre_self_attention_layer_norm, self_attention,
                      pre_cross_attention_layer_norm, encoder_decoder_attention,
                      pre_mlp_layer_norm, mlp}
    decoder/decoder_norm/scale
    decoder/logits_dense/kernel                   [E, V]  (embed, vocab)  (not with
                                                  logits_via_embedding)

With ``config.lora`` (``mtx.model.lora``), each kernel its targets match gets LoRA
adapters next to it (``query_lora_a``, ``query_lora_b``, ...); per-task adapters are
routed by the per-token ``encoder_adapter_ids`` / ``decoder_adapter_ids``.

Decoding cache (the 'cache' collection; see ``init_cache``)::

    decoder/cache_index                               int32 []  next write position
    decoder/layers_i/self_attention/cached_key        dtype [B, L_max, H, D]
    decoder/layers_i/self_attention/cached_value      dtype [B, L_max, H, D]
    (scan_layers=True: decoder/layers/self_attention/cached_* [B, layers, L_max, H, D])

Every cache leaf except the scalar ``cache_index`` has the batch on axis 0, so beam
search can expand or reorder beams by gathering those leaves along axis 0 (and leave
``cache_index`` alone: all rows decode in lockstep). Cross-attention keys/values are
recomputed from ``encoded`` at every step rather than cached.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtx.errors import UserError
from mtx.model import layers
from mtx.model import lora as lora_lib

Array = jax.Array

_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of the T5 model; gin binds them as ``model.T5Config.*``.

  Attributes:
    vocab_size: V; 0 means "set by the trainer from the vocabulary, padded to a
      multiple of 128". The model refuses to build while it is 0.
    emb_dim: E, width of the residual stream.
    num_heads: H, attention heads.
    head_dim: D, width of one head (H * D need not equal E).
    mlp_dim: M, hidden width of the gated-GELU MLP.
    num_encoder_layers: encoder depth.
    num_decoder_layers: decoder depth.
    dropout_rate: dropout on embeddings, residual branches, MLP hidden and
      attention probabilities; applied only with ``enable_dropout=True``.
    dtype: activation dtype, "float32" or "bfloat16". Parameters are always
      float32 and logits are always returned in float32.
    relative_attention_num_buckets: buckets of the relative position bias.
    relative_attention_max_distance: distance where the log-spaced buckets end.
    remat_policy: "none", "minimal" (save matmul outputs) or "full" (save nothing
      but each layer's input).
    scan_layers: run each stack's layers with ``nn.scan``; params get a leading
      'layers' axis. Compile time stops growing with depth.
    mlp_activations: the MLP's activations, one per input matrix (T5X's name):
      ("gelu", "linear") is v1.1's gated GELU, ("relu",) is v1.0's.
    logits_via_embedding: logits from the input embedding, scaled by 1/sqrt(E)
      (T5 v1.0, tied embeddings) instead of a separate ``logits_dense``.
    lora: LoRA adapters (``mtx.model.lora``; off by default), gin
      ``model.T5Config.lora = @model.LoraConfig()``.
  """

  vocab_size: int = 0
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.0
  dtype: str = "float32"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  remat_policy: str = "none"
  scan_layers: bool = False
  mlp_activations: tuple = ("gelu", "linear")
  logits_via_embedding: bool = False
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  def __post_init__(self):
    # gin gives lists; a tuple keeps the config hashable (jit static arguments).
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

  @property
  def activation_dtype(self) -> Any:
    return layers.DTYPES[self.dtype]


def _validate_config(config: T5Config) -> None:
  """Raises UserError for settings the model cannot run with."""
  layers.check_config(
    config,
    (
      "emb_dim",
      "num_heads",
      "head_dim",
      "mlp_dim",
      "num_encoder_layers",
      "num_decoder_layers",
    ),
  )
  buckets = config.relative_attention_num_buckets
  distance = config.relative_attention_max_distance
  if buckets < 4 or distance <= buckets // 2:
    raise UserError(
      f"T5Config.relative_attention_num_buckets is {buckets} and "
      f"relative_attention_max_distance {distance}; use at least 4 buckets and a "
      "max distance above half of them (T5: 32 and 128)."
    )
  activations = tuple(config.mlp_activations)
  if not activations or any(a not in layers.ACTIVATIONS for a in activations):
    raise UserError(
      f"T5Config.mlp_activations is {activations}; use one or more of "
      f"{sorted(layers.ACTIVATIONS)}, e.g. ('gelu', 'linear') or ('relu',)."
    )


def _check_tokens(name: str, tokens: Array) -> None:
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
      f"{name} must be integer [batch, length]; got {tokens.dtype}{list(tokens.shape)}."
    )


def _dropout(config: T5Config, enable_dropout: bool, x: Array) -> Array:
  return nn.Dropout(config.dropout_rate)(x, deterministic=not enable_dropout)


def _attention(
  config: T5Config, enable_dropout: bool, name: str, **kwargs
) -> layers.MultiHeadAttention:
  return layers.MultiHeadAttention(
    num_heads=config.num_heads,
    head_dim=config.head_dim,
    dtype=config.activation_dtype,
    dropout_rate=config.dropout_rate,
    enable_dropout=enable_dropout,
    lora=config.lora,
    name=name,
    **kwargs,
  )


def _mlp(config: T5Config, enable_dropout: bool) -> layers.MlpBlock:
  return layers.MlpBlock(
    mlp_dim=config.mlp_dim,
    activations=tuple(config.mlp_activations),
    dtype=config.activation_dtype,
    dropout_rate=config.dropout_rate,
    enable_dropout=enable_dropout,
    lora=config.lora,
    name="mlp",
  )


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP block.

  Returns ``(x, None)`` so that the same module runs unrolled and under ``nn.scan``
  (carry, per-layer output).
  """

  config: T5Config
  enable_dropout: bool = False

  @nn.compact
  def __call__(
    self, x: Array, mask: Array, bias: Array, adapter_ids: Array | None
  ) -> tuple[Array, None]:
    """x [B, L, E], mask bool [B, 1, L, L], bias f32 [1, H, L, L], adapter_ids int32
    [B, L] or None -> [B, L, E]."""
    cfg, dtype = self.config, self.config.activation_dtype
    h = layers.RMSNorm(dtype, name="pre_attention_layer_norm")(x)
    h = _attention(cfg, self.enable_dropout, "attention")(
      h, h, mask, bias, None, adapter_ids, adapter_ids
    )
    x = x + _dropout(cfg, self.enable_dropout, h)
    h = layers.RMSNorm(dtype, name="pre_mlp_layer_norm")(x)
    h = _mlp(cfg, self.enable_dropout)(h, adapter_ids)
    x = x + _dropout(cfg, self.enable_dropout, h)
    return layers.constrain(x, _EMBED_AXES), None


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention + cross-attention + MLP block.

  Attributes:
    config: model hyperparameters.
    enable_dropout: apply dropout.
    decode: use/create the self-attention key/value cache.
    decode_step: the cache exists and this call feeds one token.
    max_decode_length: cache length when the cache is created (0: input length).
  """

  config: T5Config
  enable_dropout: bool = False
  decode: bool = False
  decode_step: bool = False
  max_decode_length: int = 0

  @nn.compact
  def __call__(
    self,
    y: Array,
    encoded: Array,
    self_mask: Array,
    cross_mask: Array,
    bias: Array,
    decode_index: Array,
    adapter_ids: Array | None,
    encoder_adapter_ids: Array | None,
  ) -> tuple[Array, None]:
    """Runs one decoder layer.

    Args:
      y: [B, Ld, E] decoder stream.
      encoded: [B, Le, E] encoder output.
      self_mask: bool, broadcastable to [B, 1, Ld, Ld] ([.., 1, L_max] in a step).
      cross_mask: bool, broadcastable to [B, 1, Ld, Le].
      bias: float32 [1, H, Ld, Ld] ([1, H, 1, L_max] in a step).
      decode_index: int32 [] cache write position (used only in a decode step).
      adapter_ids: int32 [B, Ld] LoRA adapter ids of the decoder tokens, or None.
      encoder_adapter_ids: int32 [B, Le], the encoder tokens' (cross-attention's key
        and value kernels), or None.

    Returns:
      ([B, Ld, E], None).
    """
    cfg, dtype = self.config, self.config.activation_dtype
    h = layers.RMSNorm(dtype, name="pre_self_attention_layer_norm")(y)
    h = _attention(
      cfg,
      self.enable_dropout,
      "self_attention",
      decode=self.decode,
      decode_step=self.decode_step,
      max_decode_length=self.max_decode_length,
    )(h, h, self_mask, bias, decode_index, adapter_ids, adapter_ids)
    y = y + _dropout(cfg, self.enable_dropout, h)
    h = layers.RMSNorm(dtype, name="pre_cross_attention_layer_norm")(y)
    h = _attention(cfg, self.enable_dropout, "encoder_decoder_attention")(
      h, encoded, cross_mask, None, None, adapter_ids, encoder_adapter_ids
    )
    y = y + _dropout(cfg, self.enable_dropout, h)
    h = layers.RMSNorm(dtype, name="pre_mlp_layer_norm")(y)
    h = _mlp(cfg, self.enable_dropout)(h, adapter_ids)
    y = y + _dropout(cfg, self.enable_dropout, h)
    return layers.constrain(y, _EMBED_AXES), None


class Encoder(nn.Module):
  """Encoder stack: dropout, layers, final norm, dropout."""

  config: T5Config

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
  ) -> Array:
    """Embedded inputs [B, L, E], mask bool [B, 1, L, L], LoRA adapter ids int32 [B, L]
    or None -> [B, L, E] in dtype."""
    cfg = self.config
    length = x.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)
    bias = layers.RelativePositionBias(
      num_heads=cfg.num_heads,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      bidirectional=True,
      name="relpos_bias",
    )(positions, positions)
    x = _dropout(cfg, enable_dropout, x)
    x = layers.run_layers(
      EncoderLayer,
      cfg.num_encoder_layers,
      cfg,
      {"enable_dropout": enable_dropout},
      True,
      x,
      mask,
      bias,
      adapter_ids,
    )
    x = layers.RMSNorm(cfg.activation_dtype, name="encoder_norm")(x)
    x = _dropout(cfg, enable_dropout, x)
    return layers.constrain(x, _EMBED_AXES)


def _cached_length(cache: Any) -> int:
  """L_max of an existing self-attention cache (axis -3 of any cached_key)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    if getattr(path[-1], "key", None) == "cached_key":
      return leaf.shape[-3]
  raise ValueError(
    "decode=True found a 'cache' without cached_key entries; "
    "create the cache with mtx.model.init_cache."
  )


class Decoder(nn.Module):
  """Decoder stack: dropout, layers, final norm, dropout, output projection."""

  config: T5Config

  @nn.compact
  def __call__(
    self,
    y: Array,
    encoded: Array,
    cross_mask: Array,
    decoder_segment_ids: Array | None = None,
    adapter_ids: Array | None = None,
    encoder_adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
    max_decode_length: int | None = None,
  ) -> Array:
    """Embedded decoder inputs [B, Ld, E] -> float32 logits [B, Ld, V].

    With ``config.logits_via_embedding`` the output is the final hidden state
    [B, Ld, E] instead, which ``T5.decode`` projects with the input embedding.

    Args:
      y: [B, Ld, E] embedded decoder inputs (Ld = 1 in a decode step).
      encoded: [B, Le, E] encoder output.
      cross_mask: bool, broadcastable to [B, 1, Ld, Le].
      decoder_segment_ids: int32 [B, Ld] or None (see ``T5.decode``).
      adapter_ids: int32 [B, Ld] LoRA adapter ids or None (see ``T5.decode``).
      encoder_adapter_ids: int32 [B, Le] or None, the encoder tokens'.
      enable_dropout: apply dropout.
      decode: use the 'cache' collection (see module docstring).
      max_decode_length: cache length when the cache is created.

    Returns:
      float32 [B, Ld, V].
    """
    cfg = self.config
    relpos = layers.RelativePositionBias(
      num_heads=cfg.num_heads,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      bidirectional=False,
      name="relpos_bias",
    )
    # A step needs a cache; the first decode=True call (e.g. init) creates one.
    decode_step = decode and self.has_variable("cache", "cache_index")
    if decode:
      cache_index = self.variable(
        "cache", "cache_index", lambda: jnp.zeros((), jnp.int32)
      )
    if decode_step:
      # Query: the current position; keys: every cache slot. Slots not yet
      # written (after the current position) are masked out.
      index = cache_index.value
      cache_length = _cached_length(self.variables["cache"])
      key_positions = jnp.arange(cache_length, dtype=jnp.int32)
      bias = relpos(index[None], key_positions)  # [1, H, 1, L_max]
      self_mask = (key_positions <= index)[None, None, None, :]
    else:
      index = jnp.zeros((), jnp.int32)
      positions = jnp.arange(y.shape[1], dtype=jnp.int32)
      bias = relpos(positions, positions)  # [1, H, Ld, Ld]
      # Without segment ids every position is a real query: the decoder inputs
      # start with token 0 (BOS = pad id in T5), so tokens cannot mark padding;
      # causality alone keeps real positions from seeing the trailing padding.
      valid = (
        jnp.ones(y.shape[:2], jnp.bool_)
        if decoder_segment_ids is None
        else decoder_segment_ids > 0
      )
      self_mask = layers.self_attention_mask(valid, decoder_segment_ids, causal=True)

    y = _dropout(cfg, enable_dropout, y)
    layer_kwargs = {
      "enable_dropout": enable_dropout,
      "decode": decode,
      "decode_step": decode_step,
      "max_decode_length": max_decode_length or 0,
    }
    # Remat only pays off when there is a backward pass; decoding has none.
    y = layers.run_layers(
      DecoderLayer,
      cfg.num_decoder_layers,
      cfg,
      layer_kwargs,
      not decode,
      y,
      encoded,
      self_mask,
      cross_mask,
      bias,
      index,
      adapter_ids,
      encoder_adapter_ids,
    )
    y = layers.RMSNorm(cfg.activation_dtype, name="decoder_norm")(y)
    y = _dropout(cfg, enable_dropout, y)
    if decode_step:
      cache_index.value = index + 1
    if cfg.logits_via_embedding:
      return y  # T5.decode projects with the input embedding.
    return layers.VocabProjection(
      cfg.vocab_size, cfg.activation_dtype, name="logits_dense"
    )(y)


class T5(nn.Module):
  """T5 encoder-decoder (v1.1, or v1.0 by its config).

  Token id 0 is padding (and, in ``decoder_input_tokens``, also T5's start token).
  Rows may pack several examples: segment ids (0 = padding, 1, 2, ... = example
  within the row) then keep examples from attending to each other, so each packed
  example gets the logits it would get alone.

  Attributes:
    config: model hyperparameters; ``vocab_size`` must be set (> 0).
  """

  config: T5Config

  def setup(self):
    _validate_config(self.config)
    layers.check_lora_targets(T5, self.config, 2)
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)

  def encode(
    self,
    encoder_input_tokens: Array,
    encoder_segment_ids: Array | None = None,
    encoder_adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
  ) -> Array:
    """Runs the encoder.

    Args:
      encoder_input_tokens: int32 [B, Le]; 0 is padding.
      encoder_segment_ids: int32 [B, Le] or None. Attention is allowed between
        equal nonzero segment ids; None treats each row as one example whose
        padding is where tokens are 0.
      encoder_adapter_ids: int32 [B, Le] or None: each token's per-task LoRA adapter
        (-1: none; ``mtx.model.lora``). None applies the shared adapter only.
      enable_dropout: apply dropout (needs rng 'dropout').

    Returns:
      [B, Le, E] in the activation dtype.
    """
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    valid = _encoder_valid(encoder_input_tokens, encoder_segment_ids)
    mask = layers.self_attention_mask(valid, encoder_segment_ids)
    layers.check_adapter_ids(
      "encoder_adapter_ids", encoder_adapter_ids, encoder_input_tokens
    )
    x = self.token_embedder(encoder_input_tokens)
    return self.encoder(x, mask, encoder_adapter_ids, enable_dropout=enable_dropout)

  def decode(
    self,
    encoded: Array,
    encoder_input_tokens: Array,
    decoder_input_tokens: Array,
    encoder_segment_ids: Array | None = None,
    decoder_segment_ids: Array | None = None,
    encoder_adapter_ids: Array | None = None,
    decoder_adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
    max_decode_length: int | None = None,
  ) -> Array:
    """Runs the decoder, teacher-forced or one step at a time.

    Teacher-forced (``decode=False``): logits for every decoder position.
    Decoder self-attention is causal and, with segment ids, within a segment;
    cross-attention is to encoder positions of the same segment.

    Incremental (``decode=True``, apply with ``mutable=['cache']``): if the
    'cache' collection holds no cache yet, one is created (zeros, length
    ``max_decode_length`` or Ld) and the call otherwise acts like the
    teacher-forced one; ``init_cache`` does this cheaply. With a cache,
    ``decoder_input_tokens`` is [B, 1], the token at position ``cache_index``;
    the call writes its keys/values to the cache, advances ``cache_index`` and
    returns the logits [B, 1, V] for the next token. Stepping past L_max is not
    checked (it would overwrite the last slot): stop after L_max steps.

    Args:
      encoded: [B, Le, E] from ``encode``.
      encoder_input_tokens: int32 [B, Le], for the cross-attention padding mask.
      decoder_input_tokens: int32 [B, Ld], targets shifted right (start token 0).
      encoder_segment_ids: int32 [B, Le] or None.
      decoder_segment_ids: int32 [B, Ld] or None; given together with the
        encoder ones for packed rows; not allowed with ``decode=True``.
      encoder_adapter_ids: int32 [B, Le] or None, as ``encode``'s: they route the
        cross-attention's key/value adapters.
      decoder_adapter_ids: int32 [B, Ld] (a decode step: [B, 1]) or None, the decoder
        tokens' adapters (self-attention, cross-attention's query/out, MLP).
      enable_dropout: apply dropout (needs rng 'dropout').
      decode: incremental decoding with the 'cache' collection.
      max_decode_length: cache length when the cache is created.

    Returns:
      float32 logits [B, Ld, V].
    """
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    if (encoder_segment_ids is None) != (decoder_segment_ids is None) and (not decode):
      raise ValueError(
        "Packed inputs need both encoder_segment_ids and "
        "decoder_segment_ids (or neither)."
      )
    if decode and decoder_segment_ids is not None:
      raise ValueError(
        "decode=True decodes one example per row; pass decoder_segment_ids=None."
      )
    enc_valid = _encoder_valid(encoder_input_tokens, encoder_segment_ids)
    if decoder_segment_ids is None:
      # One example per row: mask only the encoder's padding.
      cross_mask = enc_valid[:, None, None, :]
    else:
      cross_mask = layers.cross_attention_mask(
        decoder_segment_ids > 0, enc_valid, decoder_segment_ids, encoder_segment_ids
      )
    layers.check_adapter_ids(
      "encoder_adapter_ids", encoder_adapter_ids, encoder_input_tokens
    )
    layers.check_adapter_ids(
      "decoder_adapter_ids", decoder_adapter_ids, decoder_input_tokens
    )
    y = self.token_embedder(decoder_input_tokens)
    y = self.decoder(
      y,
      encoded,
      cross_mask,
      decoder_segment_ids,
      decoder_adapter_ids,
      encoder_adapter_ids,
      enable_dropout=enable_dropout,
      decode=decode,
      max_decode_length=max_decode_length,
    )
    if self.config.logits_via_embedding:
      # T5 v1.0 (T5X's logits_via_embedding): tied output, scaled by 1/sqrt(E).
      return self.token_embedder.attend(y) / jnp.sqrt(jnp.float32(y.shape[-1]))
    return y

  def __call__(
    self,
    encoder_input_tokens: Array,
    decoder_input_tokens: Array,
    encoder_segment_ids: Array | None = None,
    decoder_segment_ids: Array | None = None,
    encoder_positions: Array | None = None,
    decoder_positions: Array | None = None,
    encoder_adapter_ids: Array | None = None,
    decoder_adapter_ids: Array | None = None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
  ) -> Array:
    """Encodes and decodes; float32 logits [B, Ld, V].

    ``encoder_positions`` / ``decoder_positions`` (int32 [B, L], restarting at 0
    in each packed segment) are accepted for the packed-batch interface but not
    needed: relative position biases only use position differences, which
    within a segment equal those of ``arange`` (as in T5X).

    ``encoder_adapter_ids`` / ``decoder_adapter_ids`` (int32 [B, Le] / [B, Ld], or
    None) route per-task LoRA adapters token by token: >= 0 selects that adapter, -1
    none (padding). Without them only the shared adapter applies (``mtx.model.lora``).
    """
    del encoder_positions, decoder_positions  # See docstring.
    encoded = self.encode(
      encoder_input_tokens,
      encoder_segment_ids,
      encoder_adapter_ids,
      enable_dropout=enable_dropout,
    )
    return self.decode(
      encoded,
      encoder_input_tokens,
      decoder_input_tokens,
      encoder_segment_ids,
      decoder_segment_ids,
      encoder_adapter_ids,
      decoder_adapter_ids,
      enable_dropout=enable_dropout,
      decode=decode,
    )


def _encoder_valid(tokens: Array, segment_ids: Array | None) -> Array:
  """bool [B, L]: True at real encoder tokens."""
  return tokens != 0 if segment_ids is None else segment_ids > 0


def init_cache(config: T5Config, batch_size: int, max_decode_length: int) -> Any:
  """An empty decoding cache for ``T5(config).decode(..., decode=True)``.

  Only shapes are traced (no parameters are initialized or run).

  Args:
    config: model hyperparameters.
    batch_size: B (rows decoded together, e.g. batch * beams).
    max_decode_length: L_max, the number of decoder positions the cache holds.

  Returns:
    The 'cache' collection: zeros, with ``cache_index`` 0; layout in the module
    docstring.
  """
  model = T5(config)

  def _init():
    encoder_tokens = jnp.ones((batch_size, 1), jnp.int32)
    decoder_tokens = jnp.zeros((batch_size, max_decode_length), jnp.int32)
    return model.init(jax.random.key(0), encoder_tokens, decoder_tokens, decode=True)[
      "cache"
    ]

  shapes = jax.eval_shape(_init)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
