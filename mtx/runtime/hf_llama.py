"""Hugging Face Llama-family directories: config.json <-> ``LlamaConfig``, weight names.

``mtx.runtime.hf`` reads and writes the files (lazy safetensors, the atomic writer); this
module says what they mean for ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and
``MistralForCausalLM``, whose differences are config-level (``mtx.model.llama``):

    LlamaForCausalLM    attention_bias (q/k/v/o biases), rope_scaling "linear" / "llama3"
    Qwen2ForCausalLM    q/k/v biases always; a sliding window only when use_sliding_window
                        (refused: Qwen2 windows some layers only)
    MistralForCausalLM  sliding_window (every layer)

Weights map to mtx's params as below (HF's Linear weights are [out, in]; H query heads,
K key/value heads, D head width, E hidden_size, M intermediate_size; ``L`` is
``model.layers.i``, ``l`` is ``decoder/layers_i``)::

    model.embed_tokens.weight          [V, E]    token_embedder/embedding
    L.input_layernorm.weight           [E]       l/pre_self_attention_layer_norm/scale
    L.self_attn.q_proj.weight          [H*D, E]  l/self_attention/query [E, H, D]
    L.self_attn.{k,v}_proj.weight      [K*D, E]  l/self_attention/{key,value} [E, K, D]
    L.self_attn.o_proj.weight          [E, H*D]  l/self_attention/out [H, D, E]
    L.self_attn.{q,k,v}_proj.bias      [H*D]     l/self_attention/{query,key,value}_bias [H, D]
    L.self_attn.o_proj.bias            [E]       l/self_attention/out_bias
    L.post_attention_layernorm.weight  [E]       l/pre_mlp_layer_norm/scale
    L.mlp.{gate,up}_proj.weight        [M, E]    l/mlp/{wi_0,wi_1} [E, M]
    L.mlp.down_proj.weight             [E, M]    l/mlp/wo [M, E]
    model.norm.weight                  [E]       decoder/decoder_norm/scale
    lm_head.weight (untied)            [V, E]    decoder/logits_dense/kernel [E, V]

Rotary embeddings use HF's rotate-half layout in both (``mtx.model.llama.apply_rope``),
so q/k need no permutation (unlike Meta's original checkpoints).
"""

from mtx.errors import UserError
from mtx.model import LlamaConfig

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
  "MistralForCausalLM": "mistral",
}
# config.json keys without a default worth trusting.
REQUIRED_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
)
_ROPE_TYPES = ("default", "linear", "llama3")
# Old files store RoPE's frequencies as a buffer; mtx computes them from the config.
_INV_FREQ = ".self_attn.rotary_emb.inv_freq"


def is_llama_family(config: dict) -> bool:
  """config.json (parsed) names one of the architectures above."""
  return (config.get("architectures") or ["?"])[0] in ARCHITECTURES


def _rope_fields(config: dict, where: str) -> dict:
  """RoPE fields from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
  ``rope_scaling`` (whose type key was ``type`` before ``rope_type``)."""
  params = dict(config.get("rope_parameters") or {})
  scaling = dict(config.get("rope_scaling") or {})
  theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind not in _ROPE_TYPES:
    raise UserError(
      f"{where} uses rope scaling {kind!r}, which mtx cannot run; it runs "
      f"{', '.join(_ROPE_TYPES)}."
    )
  fields = dict(rope_theta=float(theta), rope_scaling=kind)
  if kind != "default":
    fields["rope_factor"] = float(merged.get("factor", 1.0))
  if kind == "llama3":
    fields.update(
      rope_low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
      rope_original_max_position=int(
        merged.get("original_max_position_embeddings", 8192)
      ),
    )
  return fields


def model_config_fields(config: dict, where: str) -> dict:
  """``LlamaConfig`` fields from a parsed config.json (the architecture only).

  ``where`` names the directory in errors ("INITIAL_CHECKPOINT_PATH /x/y").

  Raises:
    UserError: a key is missing, or a feature mtx's model lacks is on.
  """
  arch = (config.get("architectures") or ["?"])[0]
  family = ARCHITECTURES[arch]
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise UserError(
      f"{where}: config.json lacks {', '.join(missing)}; use the config.json that came "
      "with the weights."
    )
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise UserError(
      f"{where} has hidden_act {act!r}, which mtx's Llama cannot run; it runs 'silu'."
    )
  if config.get("mlp_bias"):
    raise UserError(
      f"{where} has mlp_bias true, which mtx's Llama does not have; use a model "
      "without MLP biases."
    )
  if family == "qwen2" and config.get("use_sliding_window"):
    raise UserError(
      f"{where} is a Qwen2 with use_sliding_window true (a window on some layers "
      "only), which mtx cannot run; use a Qwen2 without it."
    )
  heads = int(config["num_attention_heads"])
  emb = int(config["hidden_size"])
  bias = bool(config.get("attention_bias", False))
  fields = dict(
    vocab_size=int(config["vocab_size"]),
    emb_dim=emb,
    num_heads=heads,
    num_kv_heads=int(config.get("num_key_value_heads") or heads),
    head_dim=int(config.get("head_dim") or emb // heads),
    mlp_dim=int(config["intermediate_size"]),
    num_layers=int(config["num_hidden_layers"]),
    norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
    tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    qkv_bias=True if family == "qwen2" else bias,
    out_bias=False if family == "qwen2" else bias,
    sliding_window=int(config.get("sliding_window") or 0) if family == "mistral" else 0,
    **_rope_fields(config, where),
  )
  return fields


def hf_config(config: LlamaConfig) -> dict:
  """A config.json for ``config`` that transformers loads (Llama, Qwen2 or Mistral).

  The architecture is the one that has ``config``'s biases and window: q/k/v biases
  alone are a Qwen2, a window a Mistral, anything else a Llama.

  Raises:
    UserError: no supported architecture has this combination.
  """
  if config.qkv_bias and not config.out_bias:
    arch = "Qwen2ForCausalLM"
  elif config.sliding_window:
    arch = "MistralForCausalLM"
  else:
    arch = "LlamaForCausalLM"
  if (arch != "MistralForCausalLM" and config.sliding_window) or (
    arch == "MistralForCausalLM" and (config.qkv_bias or config.out_bias)
  ):
    raise UserError(
      f"LlamaConfig with qkv_bias={config.qkv_bias}, out_bias={config.out_bias} and "
      f"sliding_window={config.sliding_window} is no Hugging Face architecture; a "
      "window goes without biases (Mistral)."
    )
  if arch == "LlamaForCausalLM" and config.qkv_bias != config.out_bias:
    raise UserError(
      f"LlamaConfig with qkv_bias={config.qkv_bias} and out_bias={config.out_bias} is "
      "no Hugging Face architecture; set both (Llama's attention_bias) or qkv_bias alone "
      "(Qwen2)."
    )
  rope = {"rope_type": config.rope_scaling, "rope_theta": config.rope_theta}
  if config.rope_scaling != "default":
    rope["factor"] = config.rope_factor
  if config.rope_scaling == "llama3":
    rope.update(
      low_freq_factor=config.rope_low_freq_factor,
      high_freq_factor=config.rope_high_freq_factor,
      original_max_position_embeddings=config.rope_original_max_position,
    )
  out = {
    "architectures": [arch],
    "model_type": ARCHITECTURES[arch],
    "vocab_size": config.vocab_size,
    "hidden_size": config.emb_dim,
    "intermediate_size": config.mlp_dim,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": config.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": config.norm_epsilon,
    "tie_word_embeddings": bool(config.tie_word_embeddings),
    "attention_dropout": config.dropout_rate,
    # transformers 5 reads rope_parameters; earlier versions rope_theta and rope_scaling.
    "rope_parameters": rope,
    "rope_theta": config.rope_theta,
    "rope_scaling": None
    if config.rope_scaling == "default"
    else {k: v for k, v in rope.items() if k != "rope_theta"},
    "torch_dtype": "float32",
  }
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=config.qkv_bias, mlp_bias=False)
  if arch == "MistralForCausalLM":
    out["sliding_window"] = config.sliding_window
  if arch == "Qwen2ForCausalLM":
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def name_map(config: LlamaConfig) -> dict[str, tuple[str, str]]:
  """mtx unscanned name -> (HF name, layout kind); kinds as ``mtx.runtime.hf.name_map``'s
  plus "split_heads" ([N*D] -> [N, D])."""
  names = {"token_embedder/embedding": ("model.embed_tokens.weight", "same")}
  for i in range(config.num_layers):
    mtx_layer, hf_layer = f"decoder/layers_{i}", f"model.layers.{i}"
    attention = f"{hf_layer}.self_attn"
    names[f"{mtx_layer}/pre_self_attention_layer_norm/scale"] = (
      f"{hf_layer}.input_layernorm.weight",
      "same",
    )
    for mtx_name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
      names[f"{mtx_layer}/self_attention/{mtx_name}"] = (
        f"{attention}.{proj}_proj.weight",
        "in_heads",
      )
      if config.qkv_bias:
        names[f"{mtx_layer}/self_attention/{mtx_name}_bias"] = (
          f"{attention}.{proj}_proj.bias",
          "split_heads",
        )
    names[f"{mtx_layer}/self_attention/out"] = (f"{attention}.o_proj.weight", "out_heads")
    if config.out_bias:
      names[f"{mtx_layer}/self_attention/out_bias"] = (f"{attention}.o_proj.bias", "same")
    names[f"{mtx_layer}/pre_mlp_layer_norm/scale"] = (
      f"{hf_layer}.post_attention_layernorm.weight",
      "same",
    )
    for mtx_name, proj in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down")):
      names[f"{mtx_layer}/mlp/{mtx_name}"] = (f"{hf_layer}.mlp.{proj}_proj.weight", "t")
  names["decoder/decoder_norm/scale"] = ("model.norm.weight", "same")
  if not config.tie_word_embeddings:
    names["decoder/logits_dense/kernel"] = ("lm_head.weight", "t")
  return names


def mtx_shapes(config: LlamaConfig) -> dict[str, tuple]:
  """mtx unscanned name -> mtx shape, from the config alone."""
  e, h, k, d = config.emb_dim, config.num_heads, config.num_kv_heads, config.head_dim
  m, v = config.mlp_dim, config.vocab_size
  by_leaf = {
    "embedding": (v, e),
    "scale": (e,),
    "query": (e, h, d),
    "key": (e, k, d),
    "value": (e, k, d),
    "out": (h, d, e),
    "query_bias": (h, d),
    "key_bias": (k, d),
    "value_bias": (k, d),
    "out_bias": (e,),
    "wi_0": (e, m),
    "wi_1": (e, m),
    "wo": (m, e),
    "kernel": (e, v),
  }
  return {name: by_leaf[name.rsplit("/", 1)[-1]] for name in name_map(config)}


def is_ignored(hf_name: str, config: LlamaConfig) -> bool:
  """Tensors some files hold that the model does not use: a tied ``lm_head`` copy and
  old files' RoPE frequency buffers."""
  return hf_name.endswith(_INV_FREQ) or (
    config.tie_word_embeddings and hf_name == "lm_head.weight"
  )
