"""Two tiny tasks on the *default* vocabulary, for fine-tuning tests from pretrained
checkpoints: imported under a Hugging Face INITIAL_CHECKPOINT_PATH, they get its
spiece.model (``mtx.data.vocab.get_vocabulary()``). ``hf_copy`` copies letter strings,
``hf_rev`` reverses them; the mixture ``hf_mix`` has rates 1:1."""

import random

import seqio
import tensorflow as tf

from mtx.data import vocab
from mtx.eval import metrics

FEATURES = {
  k: seqio.Feature(vocab.get_vocabulary(), add_eos=True) for k in ("inputs", "targets")
}


def _source(transform, n=32):
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    rng = random.Random(0 if split == "train" else 1)
    words = [" ".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(n)]
    return tf.data.Dataset.from_tensor_slices(
      {"inputs": words, "targets": [transform(w) for w in words]}
    )

  return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))


for _name, _fn in (("hf_copy", lambda w: w), ("hf_rev", lambda w: w[::-1])):
  seqio.TaskRegistry.remove(_name)
  seqio.TaskRegistry.add(
    _name,
    source=_source(_fn),
    preprocessors=[
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=FEATURES,
    metric_fns=[metrics.exact_match],
  )
seqio.MixtureRegistry.remove("hf_mix")
seqio.MixtureRegistry.add("hf_mix", [("hf_copy", 1.0), ("hf_rev", 1.0)])
