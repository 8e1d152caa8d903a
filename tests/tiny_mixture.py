"""A tiny two-task mixture generated in code, for trainer tests (no files, no network).

``tiny_copy`` and ``tiny_rev`` read the same random letter strings and copy or reverse
them; the mixture ``tiny`` has rates 2:1. Byte vocabulary, so no model file is needed.
Both are scored by exact match (eval tests).
"""

import random

import seqio
import tensorflow as tf

from mtx.eval import metrics

VOCAB = seqio.ByteVocabulary()
FEATURES = {k: seqio.Feature(VOCAB, add_eos=True) for k in ("inputs", "targets")}


def _strings(n, seed):
  rng = random.Random(seed)
  return [
    "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7))) for _ in range(n)
  ]


def _source(transform, n=64):
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    words = _strings(n, 0 if split == "train" else 1)
    return tf.data.Dataset.from_tensor_slices(
      {"inputs": words, "targets": [transform(w) for w in words]}
    )

  return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))


def _register():
  for name, fn in (("tiny_copy", lambda w: w), ("tiny_rev", lambda w: w[::-1])):
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      source=_source(fn),
      preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=FEATURES,
      metric_fns=[metrics.exact_match],
    )
  seqio.MixtureRegistry.remove("tiny")
  seqio.MixtureRegistry.add("tiny", [("tiny_copy", 2.0), ("tiny_rev", 1.0)])


_register()
