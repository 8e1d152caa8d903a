"""Hugging Face T5 directories in and out: config.json, safetensors, spiece.model.

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
and ``get_slice`` reads just the rows and columns a device needs. float32, bfloat16 and
float16 files are read (safetensors hands bfloat16 to numpy as ml_dtypes' bfloat16).
"""

import json
import os
from typing import Optional

import ml_dtypes  # noqa: F401  # registers numpy's "bfloat16", which safetensors asks for
import numpy as np
import safetensors
import safetensors.numpy

from mtx.errors import UserError
from mtx.model import T5Config
from mtx.runtime import metrics_writer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SPIECE = "spiece.model"
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
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


# config.json keys that define the architecture and have no default in transformers' T5.
REQUIRED_KEYS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers")


def read_config(path: str, what: str) -> dict:
  """config.json of the directory ``path``, checked to be a T5 this mtx runs."""
  file = os.path.join(path, CONFIG)
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{what} {path}: {CONFIG} cannot be read as JSON ({e}).") from e
  arch = (config.get("architectures") or ["?"])[0]
  if arch not in ARCHITECTURES or config.get("model_type") not in MODEL_TYPES:
    raise UserError(
      f"{what} {path} is a {arch} (model_type {config.get('model_type')!r}), which mtx "
      f"cannot load; it loads {', '.join(ARCHITECTURES)} (model_type t5 or mt5: T5 "
      "v1.0 and v1.1, Flan-T5, mT5, ByT5)."
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
  "out_heads" ([E, H*D] -> [H, D, E]).
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
  """``mtx.runtime.pretrained.Reader`` of a Hugging Face T5 directory."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self.config = read_config(path, what)
    self.t5_config = T5Config(**model_config_fields(self.config))
    self._files = {}  # shard file name -> safe_open handle
    self._where = self._weight_files()  # HF name -> shard file name
    self._map = name_map(self.t5_config)
    self._shapes = mtx_shapes(self.t5_config)
    self._check_tensors()

  def _weight_files(self) -> dict[str, str]:
    index = os.path.join(self.path, INDEX)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(
          f"{self.what} {self.path}: {INDEX} is not a safetensors index ({e})."
        ) from e
    elif os.path.isfile(os.path.join(self.path, WEIGHTS)):
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
      full = os.path.join(self.path, file)
      if not os.path.isfile(full):
        raise UserError(
          f"{self.what} {self.path}: the weights file {file} is missing; download "
          "the whole model directory again."
        )
      try:
        self._files[file] = safetensors.safe_open(full, framework="numpy")
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
      if (
        hf_name not in wanted and hf_name not in _IGNORED and hf_name != "lm_head.weight"
      ):
        raise UserError(
          f"{self.what} {self.path} has a weight {hf_name} that mtx's T5 does not "
          "have; it loads T5 v1.0/v1.1-style models only."
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
    return model_config_fields(self.config)

  def vocabulary_path(self) -> str | None:
    """The directory itself: ``mtx.data.vocab.get_vocabulary`` reads a HF directory's
    spiece.model with T5's 100 extra ids (or bytes, for ByT5)."""
    return self.path

  def close(self) -> None:
    self._files.clear()


def export(
  params: dict[str, np.ndarray],
  config: T5Config,
  out_dir: str,
  spiece_path: Optional[str] = None,
  dropout_rate: Optional[float] = None,
) -> list[str]:
  """Writes ``params`` (unscanned mtx name -> float32 array) as a HF T5 directory.

  Each file goes through mtx's one atomic writer. Returns the paths written.
  """
  tensors = {}
  for name, (hf_name, kind) in name_map(config).items():
    tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(params[name]), kind))
  # Everything is read before the first write, so a bad input writes nothing.
  files = [
    (WEIGHTS, safetensors.numpy.save(tensors, metadata={"format": "pt"})),
    (
      CONFIG,
      json.dumps(hf_config(config, dropout_rate), indent=2, sort_keys=True) + "\n",
    ),
  ]
  if spiece_path:
    try:
      with open(spiece_path, "rb") as f:
        files.append((SPIECE, f.read()))
    except OSError as e:
      raise UserError(
        f"The vocabulary {spiece_path} cannot be read ({e.strerror}); export needs it "
        "to write spiece.model."
      ) from e
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f"EXPORT_DIR {out_dir} cannot be created ({e.strerror}); choose a writable "
      "directory."
    ) from e
  written = []
  for file, content in files:
    metrics_writer.write_atomically(os.path.join(out_dir, file), content)
    written.append(os.path.join(out_dir, file))
  return written


def spiece_of(vocabulary_path: Optional[str]) -> Optional[str]:
  """The SentencePiece file behind a vocabulary path (a .model or a HF directory)."""
  if not vocabulary_path:
    return None
  if os.path.isdir(vocabulary_path):
    spm = os.path.join(vocabulary_path, SPIECE)
    return spm if os.path.isfile(spm) else None
  return vocabulary_path
