"""Hugging Face directories in and out: config.json, safetensors, the tokenizer.

T5 (below) and the Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``: ``mtx.runtime.hf_llama`` has their config and weight names, and
their tokenizer is ``tokenizer.model`` or ``tokenizer.json``) share the reader and the
writer here.

A Hugging Face T5 directory (``google/flan-t5-small`` downloaded by the user; mtx never
touches the network) holds::

    config.json                    T5ForConditionalGeneration / MT5ForConditionalGeneration
    model.safetensors              or model.safetensors.index.json + model-0000k-of-0000n.safetensors
    spiece.model                   SentencePiece; T5 adds 100 extra ids (ByT5: bytes, no file)

Weights map to mtx's params as below (HF's Linear weights are [out, in]; H heads, D head
width, E d_model, M d_ff, V vocabulary; ``e``/``d`` = encoder/decoder, i the block)::

    shared.weight                                   [V, E]    token_embedder/embedding
    {e,d}.block.i.layer.0.SelfAttention.{q,k,v}     [H*D, E]  {e,d}/layers_i/{attention,self_attention}/{query,key,value} [E, H, D]
    {e,d}.block.i.layer.0.SelfAttention.o           [E, H*D]  .../out [H, D, E]
    d.block.i.layer.1.EncDecAttention.{q,k,v,o}     as above  decoder/layers_i/encoder_decoder_attention/...
    {e,d}.block.0.layer.0.SelfAttention.relative_attention_bias  [buckets, H]  {e,d}/relpos_bias/rel_embedding [H, buckets]
    {e,d}.block.i.layer.k.layer_norm                [E]       pre_attention / pre_self_attention /
                                                              pre_cross_attention / pre_mlp layer norms
    {e,d}.block.i.layer.-1.DenseReluDense.{wi,wi_0,wi_1}  [M, E]  .../mlp/{wi,wi_0,wi_1} [E, M]
    {e,d}.block.i.layer.-1.DenseReluDense.wo        [E, M]    .../mlp/wo [M, E]
    {e,d}.final_layer_norm                          [E]       encoder/encoder_norm, decoder/decoder_norm
    lm_head.weight (untied, v1.1)                   [V, E]    decoder/logits_dense/kernel [E, V]

(every HF name ends in ``.weight``; ``e`` is ``encoder``, ``d`` ``decoder``). Tied copies
(``encoder.embed_tokens``, ``decoder.embed_tokens``, a tied ``lm_head``) are ignored.

Reading is lazy: ``safetensors.safe_open(..., framework="numpy")`` reads headers only,
and ``get_slice`` reads just the rows and columns a device needs (on ``gs://`` and other
URLs, ``mtx.runtime.safetensors_io`` reads the header and then ranges of rows). float32, bfloat16 and
float16 files are read (safetensors hands bfloat16 to numpy as ml_dtypes' bfloat16).
"""

import dataclasses
import json
from typing import Optional

import ml_dtypes  # noqa: F401  # registers numpy's "bfloat16", which safetensors asks for
import numpy as np
import safetensors
import safetensors.numpy

from mtx import paths
from mtx.errors import UserError
from mtx.model import LlamaConfig, T5Config
from mtx.runtime import hf_llama, safetensors_io

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SPIECE = "spiece.model"
# The Llama family's tokenizer: SentencePiece, or the `tokenizers` library's JSON.
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
MODEL_TYPES = ("t5", "mt5")
# feed_forward_proj <-> T5Config.mlp_activations ("gated-gelu" is HF's gelu_new, the tanh
# approximation mtx uses).
ACTIVATIONS = {
  "relu": ("relu",),
  "gated-gelu": ("gelu", "linear"),
  "gated-relu": ("relu", "linear"),
}
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Present in some files, never used by the model (tied copies, an unused bias).
_IGNORED = (
  "encoder.embed_tokens.weight",
  "decoder.embed_tokens.weight",
  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


def is_hf_dir(path: str) -> bool:
  return paths.isdir(path) and paths.isfile(paths.join(path, CONFIG))


# config.json keys that define the architecture and have no default in transformers' T5.
REQUIRED_KEYS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers")


def read_config(path: str, what: str) -> dict:
  """config.json of the directory ``path``, checked to be a T5 or Llama-family model
  this mtx runs (the Llama family's fields are checked by ``hf_llama``)."""
  file = paths.join(path, CONFIG)
  try:
    config = json.loads(paths.read_text(file))
  except (OSError, ValueError) as e:
    raise UserError(f"{what} {path}: {CONFIG} cannot be read as JSON ({e}).") from e
  arch = (config.get("architectures") or ["?"])[0]
  if hf_llama.is_llama_family(config):
    return config
  if arch not in ARCHITECTURES or config.get("model_type") not in MODEL_TYPES:
    raise UserError(
      f"{what} {path} is a {arch} (model_type {config.get('model_type')!r}), which mtx "
      f"cannot load; it loads {', '.join(ARCHITECTURES)} (model_type t5 or mt5: T5 "
      "v1.0 and v1.1, Flan-T5, mT5, ByT5) and "
      f"{', '.join(hf_llama.ARCHITECTURES)}."
    )
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise UserError(
      f"{what} {path}: {CONFIG} lacks {', '.join(missing)}; use the config.json that "
      "came with the weights."
    )
  proj = config.get("feed_forward_proj", "relu")
  if proj not in ACTIVATIONS:
    raise UserError(
      f"{what} {path} has feed_forward_proj {proj!r}, which mtx cannot run; it runs "
      f"{', '.join(ACTIVATIONS)}."
    )
  return config


def model_config_fields(config: dict) -> dict:
  """T5Config fields from a HF config.json (the architecture only)."""
  return dict(
    vocab_size=int(config["vocab_size"]),
    emb_dim=int(config["d_model"]),
    num_heads=int(config["num_heads"]),
    head_dim=int(config["d_kv"]),
    mlp_dim=int(config["d_ff"]),
    num_encoder_layers=int(config["num_layers"]),
    num_decoder_layers=int(config.get("num_decoder_layers") or config["num_layers"]),
    relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
    relative_attention_max_distance=int(
      config.get("relative_attention_max_distance", 128)
    ),
    mlp_activations=ACTIVATIONS[config.get("feed_forward_proj", "relu")],
    # HF's T5 scales and ties unless the config says tie_word_embeddings: false (v1.1).
    logits_via_embedding=config.get("tie_word_embeddings", True) is not False,
  )


def hf_config(config: T5Config, dropout_rate: Optional[float] = None) -> dict:
  """A config.json for ``config`` that transformers loads as T5ForConditionalGeneration."""
  proj = {v: k for k, v in ACTIVATIONS.items()}.get(tuple(config.mlp_activations))
  if proj is None:
    raise UserError(
      f"T5Config.mlp_activations {config.mlp_activations} has no Hugging Face "
      f"feed_forward_proj; exportable are {sorted(ACTIVATIONS.values())}."
    )
  return {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": config.vocab_size,
    "d_model": config.emb_dim,
    "d_kv": config.head_dim,
    "d_ff": config.mlp_dim,
    "num_heads": config.num_heads,
    "num_layers": config.num_encoder_layers,
    "num_decoder_layers": config.num_decoder_layers,
    "relative_attention_num_buckets": config.relative_attention_num_buckets,
    "relative_attention_max_distance": config.relative_attention_max_distance,
    "feed_forward_proj": proj,
    "tie_word_embeddings": bool(config.logits_via_embedding),
    "dropout_rate": config.dropout_rate if dropout_rate is None else dropout_rate,
    "layer_norm_epsilon": 1e-6,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "torch_dtype": "float32",
  }


def _attention_names(prefix: str, hf_prefix: str, names: dict) -> None:
  for mtx_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
    names[f"{prefix}/{mtx_name}"] = (f"{hf_prefix}.{hf_name}.weight", "in_heads")
  names[f"{prefix}/out"] = (f"{hf_prefix}.o.weight", "out_heads")


def name_map(config: T5Config) -> dict[str, tuple[str, str]]:
  """mtx unscanned name -> (HF name, layout kind), for the model ``config`` describes.

  Kinds: "same" (no change), "t" (2-D transpose), "in_heads" ([H*D, E] -> [E, H, D]),
  "out_heads" ([E, H*D] -> [H, D, E]), "split_heads" ([H*D] -> [H, D], Llama's biases).
  """
  names = {"token_embedder/embedding": ("shared.weight", "same")}
  wis = (
    ["wi"]
    if len(config.mlp_activations) == 1
    else [f"wi_{i}" for i in range(len(config.mlp_activations))]
  )
  for stack, layers in (
    ("encoder", config.num_encoder_layers),
    ("decoder", config.num_decoder_layers),
  ):
    names[f"{stack}/relpos_bias/rel_embedding"] = (
      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      "t",
    )
    final = "encoder_norm" if stack == "encoder" else "decoder_norm"
    names[f"{stack}/{final}/scale"] = (f"{stack}.final_layer_norm.weight", "same")
    for i in range(layers):
      mtx_layer, hf_layer = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      if stack == "encoder":
        norms = ["pre_attention_layer_norm", "pre_mlp_layer_norm"]
        _attention_names(f"{mtx_layer}/attention", f"{hf_layer}.0.SelfAttention", names)
      else:
        norms = [
          "pre_self_attention_layer_norm",
          "pre_cross_attention_layer_norm",
          "pre_mlp_layer_norm",
        ]
        _attention_names(
          f"{mtx_layer}/self_attention", f"{hf_layer}.0.SelfAttention", names
        )
        _attention_names(
          f"{mtx_layer}/encoder_decoder_attention", f"{hf_layer}.1.EncDecAttention", names
        )
      for k, norm in enumerate(norms):
        names[f"{mtx_layer}/{norm}/scale"] = (f"{hf_layer}.{k}.layer_norm.weight", "same")
      mlp = f"{hf_layer}.{len(norms) - 1}.DenseReluDense"
      for wi in wis:
        names[f"{mtx_layer}/mlp/{wi}"] = (f"{mlp}.{wi}.weight", "t")
      names[f"{mtx_layer}/mlp/wo"] = (f"{mlp}.wo.weight", "t")
  if not config.logits_via_embedding:
    names["decoder/logits_dense/kernel"] = ("lm_head.weight", "t")
  return names


def hf_shape(mtx_shape: tuple, kind: str) -> tuple:
  """The on-disk shape of a param of ``mtx_shape``."""
  if kind == "same":
    return tuple(mtx_shape)
  if kind == "t":
    return tuple(reversed(mtx_shape))
  if kind == "in_heads":
    e, h, d = mtx_shape
    return (h * d, e)
  if kind == "split_heads":
    return (mtx_shape[0] * mtx_shape[1],)
  e, (h, d) = mtx_shape[2], mtx_shape[:2]
  return (e, h * d)


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  """An mtx-layout array in HF's layout."""
  if kind == "same":
    return array
  if kind == "t":
    return array.T
  if kind == "in_heads":
    e, h, d = array.shape
    return array.reshape(e, h * d).T
  if kind == "split_heads":
    return array.reshape(-1)
  h, d, e = array.shape
  return array.reshape(h * d, e).T


def mtx_shapes(config: T5Config) -> dict[str, tuple]:
  """mtx unscanned name -> mtx shape, from the config alone."""
  e, h, d, m, v = (
    config.emb_dim,
    config.num_heads,
    config.head_dim,
    config.mlp_dim,
    config.vocab_size,
  )
  out = {}
  for name in name_map(config):
    leaf = name.rsplit("/", 1)[-1]
    if name == "token_embedder/embedding":
      out[name] = (v, e)
    elif name.endswith("rel_embedding"):
      out[name] = (h, config.relative_attention_num_buckets)
    elif name.endswith("/scale"):
      out[name] = (e,)
    elif leaf in ("query", "key", "value"):
      out[name] = (e, h, d)
    elif leaf == "out":
      out[name] = (h, d, e)
    elif leaf.startswith("wi"):
      out[name] = (e, m)
    elif leaf == "wo":
      out[name] = (m, e)
    else:  # logits_dense/kernel
      out[name] = (e, v)
  return out


class HfReader:
  """``mtx.runtime.pretrained.Reader`` of a Hugging Face T5 or Llama-family directory."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self.config = read_config(path, what)
    self.llama = hf_llama.is_llama_family(self.config)
    if self.llama:
      self._fields = hf_llama.model_config_fields(self.config, f"{what} {path}")
      llama_config = LlamaConfig(**self._fields)
      self._map = hf_llama.name_map(llama_config)
      self._shapes = hf_llama.mtx_shapes(llama_config)
      self._ignored = lambda hf_name: hf_llama.is_ignored(hf_name, llama_config)
    else:
      self._fields = model_config_fields(self.config)
      t5_config = T5Config(**self._fields)
      self._map = name_map(t5_config)
      self._shapes = mtx_shapes(t5_config)
      self._ignored = lambda hf_name: hf_name in _IGNORED or hf_name == "lm_head.weight"
    self._files = {}  # shard file name -> safe_open handle
    self._where = self._weight_files()  # HF name -> shard file name
    self._check_tensors()

  def _weight_files(self) -> dict[str, str]:
    index = paths.join(self.path, INDEX)
    if paths.isfile(index):
      try:
        weight_map = json.loads(paths.read_text(index))["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(
          f"{self.what} {self.path}: {INDEX} is not a safetensors index ({e})."
        ) from e
    elif paths.isfile(paths.join(self.path, WEIGHTS)):
      weight_map = {k: WEIGHTS for k in self._open(WEIGHTS).keys()}
    else:
      raise UserError(
        f"{self.what} {self.path} has a {CONFIG} but no {WEIGHTS} or {INDEX}; mtx "
        "reads safetensors weights only (save them with safe_serialization=True)."
      )
    for file in sorted(set(weight_map.values())):
      self._open(file)  # a missing or damaged shard fails here, named
    return weight_map

  def _open(self, file: str):
    if file not in self._files:
      full = paths.join(self.path, file)
      if not paths.isfile(full):
        raise UserError(
          f"{self.what} {self.path}: the weights file {file} is missing; download "
          "the whole model directory again."
        )
      try:
        self._files[file] = safetensors_io.open_safetensors(full)
      except Exception as e:  # pylint: disable=broad-except  # the library's own errors
        raise UserError(
          f"{self.what} {self.path}: the weights file {file} is damaged or truncated "
          f"({str(e).splitlines()[0][:120]}); download it again."
        ) from e
    return self._files[file]

  def _check_tensors(self) -> None:
    """Every tensor the config asks for is there, with the config's shape and a dtype
    mtx reads; nothing else is there."""
    wanted = {hf_name: mtx_name for mtx_name, (hf_name, _) in self._map.items()}
    for hf_name in sorted(self._where):
      if hf_name not in wanted and not self._ignored(hf_name):
        model = "Llama" if self.llama else "T5"
        raise UserError(
          f"{self.what} {self.path} has a weight {hf_name} that mtx's {model} does not "
          "have; use a checkpoint whose config.json describes its weights."
        )
    for hf_name, mtx_name in sorted(wanted.items()):
      if hf_name not in self._where:
        raise UserError(
          f"{self.what} {self.path} lacks the weight {hf_name} that its {CONFIG} "
          "implies; download the whole model directory again."
        )
      kind = self._map[mtx_name][1]
      piece = self._slice(hf_name)
      shape, want = tuple(piece.get_shape()), hf_shape(self._shapes[mtx_name], kind)
      if shape != want:
        raise UserError(
          f"{self.what} {self.path}: {hf_name} is {list(shape)} but its {CONFIG} "
          f"implies {list(want)}; the weights and the config do not belong together."
        )
      if piece.get_dtype() not in DTYPES:
        raise UserError(
          f"{self.what} {self.path}: {hf_name} is {piece.get_dtype()}; mtx reads "
          f"{', '.join(DTYPES.values())} weights."
        )

  def _slice(self, hf_name: str):
    return self._open(self._where[hf_name]).get_slice(hf_name)

  def names(self) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
      name: (self._shapes[name], DTYPES[self._slice(hf_name).get_dtype()])
      for name, (hf_name, _) in self._map.items()
    }

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    hf_name, kind = self._map[name]
    shape = self._shapes[name]
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    piece = self._slice(hf_name)
    if kind == "same":
      block = piece[index]
    elif kind == "t":
      block = piece[tuple(reversed(index))].T
    elif kind == "split_heads":  # [H*D] entries h*D + d
      h, d = index
      hd = shape[1]
      block = piece[h.start * hd : h.stop * hd]
      block = block.reshape(h.stop - h.start, hd)[:, d]
    elif kind == "in_heads":  # [H*D, E] rows h*D + d
      e, h, d = index
      hd = shape[2]
      block = piece[h.start * hd : h.stop * hd, e].T
      block = block.reshape(block.shape[0], h.stop - h.start, hd)[:, :, d]
    else:  # out_heads: [E, H*D] columns h*D + d
      h, d, e = index
      hd = shape[1]
      block = piece[e, h.start * hd : h.stop * hd].T
      block = block.reshape(h.stop - h.start, hd, block.shape[-1])[:, d, :]
    return np.ascontiguousarray(block, dtype=np.float32)

  def model_config(self) -> dict:
    """``T5Config`` fields, or ``LlamaConfig`` fields (see ``config_type``)."""
    return dict(self._fields)

  def config_type(self) -> type:
    """The config class ``model_config``'s fields belong to."""
    return LlamaConfig if self.llama else T5Config

  def vocabulary_path(self) -> str | None:
    """The directory itself: ``mtx.data.vocab.get_vocabulary`` reads a HF directory's
    spiece.model with T5's 100 extra ids (or bytes, for ByT5), or a Llama family's
    tokenizer.model or tokenizer.json."""
    return self.path

  def close(self) -> None:
    self._files.clear()


def export(
  params: dict[str, np.ndarray],
  config: T5Config | LlamaConfig,
  out_dir: str,
  spiece_path: Optional[str] = None,
  dropout_rate: Optional[float] = None,
) -> list[str]:
  """Writes ``params`` (unscanned mtx name -> float32 array) as a HF directory: a T5, or
  for a ``LlamaConfig`` a Llama / Qwen2 / Mistral (``hf_llama.hf_config``).

  ``spiece_path`` is the tokenizer file to copy: spiece.model for T5; for the Llama
  family a SentencePiece model (written as tokenizer.model) or a tokenizer.json.
  Each file goes through mtx's one atomic writer. Returns the paths written.
  """
  llama = isinstance(config, LlamaConfig)
  tensors = {}
  names = hf_llama.name_map(config) if llama else name_map(config)
  for name, (hf_name, kind) in names.items():
    tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(params[name]), kind))
  if llama:
    if dropout_rate is not None:
      config = dataclasses.replace(config, dropout_rate=dropout_rate)
    config_json = hf_llama.hf_config(config)
  else:
    config_json = hf_config(config, dropout_rate)
  # Everything is read before the first write, so a bad input writes nothing.
  files = [
    (WEIGHTS, safetensors.numpy.save(tensors, metadata={"format": "pt"})),
    (CONFIG, json.dumps(config_json, indent=2, sort_keys=True) + "\n"),
  ]
  if spiece_path:
    if not llama:
      target = SPIECE
    else:
      target = TOKENIZER_JSON if spiece_path.endswith(".json") else TOKENIZER_MODEL
    try:
      files.append((target, paths.read_bytes(spiece_path)))
    except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise their own.
      raise UserError(
        f"The vocabulary {spiece_path} cannot be read ({getattr(e, 'strerror', e)}); "
        "export needs it to write spiece.model."
      ) from e
  try:
    paths.makedirs(out_dir)
  except OSError as e:
    raise UserError(
      f"EXPORT_DIR {out_dir} cannot be created ({e.strerror}); choose a writable "
      "directory."
    ) from e
  written = []
  for file, content in files:
    paths.write_atomically(paths.join(out_dir, file), content)
    written.append(paths.join(out_dir, file))
  return written


def spiece_of(vocabulary_path: Optional[str]) -> Optional[str]:
  """The tokenizer file behind a vocabulary path (a .model or .json file, or a HF
  directory's spiece.model, tokenizer.model or tokenizer.json, in that order)."""
  if not vocabulary_path:
    return None
  if paths.isdir(vocabulary_path):
    for name in (SPIECE, TOKENIZER_MODEL, TOKENIZER_JSON):
      if paths.isfile(paths.join(vocabulary_path, name)):
        return paths.join(vocabulary_path, name)
    return None
  return vocabulary_path
