"""Plain seqio tasks over TSV files in a tmp dir, as a T5X user writes them (for tests).

Byte vocabulary, so no model file is needed.
"""

import seqio
import tensorflow as tf

VOCAB = seqio.ByteVocabulary()
FEATURES = {k: seqio.Feature(VOCAB, add_eos=True) for k in ("inputs", "targets")}


def parse_tsv(ds):
  """A plain TSV preprocessor: one line -> {"inputs", "targets"}."""

  def parse(line):
    fields = tf.strings.split(line, "\t")
    return {"inputs": fields[0], "targets": fields[1]}

  return ds.map(parse)


def register_tsv(name, path, rows):
  """Writes ``rows`` of (inputs, targets) to ``path`` and registers task ``name``."""
  with open(path, "w", encoding="utf-8") as f:
    for inputs, targets in rows:
      f.write(f"{inputs}\t{targets}\n")
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=seqio.TextLineDataSource({"train": str(path)}),
    preprocessors=[
      parse_tsv,
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=FEATURES,
  )


def register_mixture(name, tasks_and_rates):
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks_and_rates)
