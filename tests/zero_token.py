"""A vocabulary whose id 0 is a real token, as Llama 3's and Qwen2's tokenizer.json have
("!"), and a tiny Llama on it, for the tests that eval and infer keep that token
(tests/test_decoding.py, tests/test_eval.py, tests/test_infer.py).

The tokenizer is a word-level tokenizer.json written with the ``tokenizers`` library
(no network, no fixture file): ``"a b !"`` -> ``[4, 5, 0]``.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import models, pre_tokenizers

from mtx.data.hf_tokenizer import TokenizersVocabulary
from mtx.eval import metrics
from mtx.model import Llama, LlamaConfig
from mtx.runtime import hf

WORDS = ("!", "</s>", "<s>", "<unk>") + tuple("abcdefgh")
BANG, EOS, BOS = 0, 1, 2
CONFIG = LlamaConfig(
  vocab_size=16,
  emb_dim=16,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  mlp_dim=32,
  num_layers=1,
)


def write_tokenizer(directory) -> str:
  """Writes ``directory/tokenizer.json`` (ids as in ``WORDS``); returns its path."""
  tok = tokenizers.Tokenizer(
    models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
  )
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["</s>", "<s>", "<unk>"])
  path = os.path.join(str(directory), "tokenizer.json")
  tok.save(path)
  return path


def vocabulary(directory) -> TokenizersVocabulary:
  return TokenizersVocabulary(write_tokenizer(directory), eos_id=EOS, bos_id=BOS)


def params(flat_logits: bool = False) -> dict:
  """Random params of ``Llama(CONFIG)``, drawn with numpy (no initializer to compile).

  ``flat_logits``: the final norm's scale is 0, so every logit is 0 and greedy decoding
  takes the lowest id it may emit: 0 where id 0 is a token, never where it is padding.
  """
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(Llama(CONFIG).init, jax.random.key(0), tokens))
  rng = np.random.default_rng(0)
  out = jax.tree.map(
    lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5, shapes["params"]
  )
  if flat_logits:
    norm = out["decoder"]["decoder_norm"]
    norm["scale"] = np.zeros_like(norm["scale"])
  return out


def write_hf_dir(directory, llama_params: dict) -> str:
  """``directory`` as a Hugging Face Llama (config.json with EOS and BOS, safetensors,
  the tokenizer.json above); returns it."""
  directory = str(directory)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(llama_params)[0]
  }
  os.makedirs(directory, exist_ok=True)
  hf.export(flat, CONFIG, directory, write_tokenizer(directory))
  config_path = os.path.join(directory, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config.update(eos_token_id=EOS, bos_token_id=BOS)
  with open(config_path, "w") as f:
    json.dump(config, f)
  return directory


def register_copy_task(name: str, vocab, texts) -> seqio.Task:
  """A copy task on ``vocab`` whose inputs and targets are ``texts``, without EOS, so
  that a text ending in "!" ends in id 0."""
  features = {k: seqio.Feature(vocab, add_eos=False) for k in ("inputs", "targets")}

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts})

  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
    name,
    source=seqio.FunctionDataSource(dataset_fn, splits=("validation",)),
    preprocessors=[seqio.preprocessors.tokenize],
    output_features=features,
    metric_fns=[metrics.exact_match],
  )
