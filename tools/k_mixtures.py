"""Synthetic k-task mixtures for ``mtx compile`` memory tables: ``synthetic_k{K}``.

    mtx compile --gin_file=gin_configs/demo.gin ... \\
      --gin.MIXTURE_OR_TASK_MODULE="'tools.k_mixtures'" \\
      --gin.MIXTURE_OR_TASK_NAME="'synthetic_k8'"

Importing this module registers mixtures of K = 2, 8 and 32 equally weighted tasks
(``synthetic_k{K}_t000`` ...) with the demo mixture's vocabulary size (768), so that
only k changes between the rows of a table. The tasks have no examples and raise if
read: ``mtx compile`` reads none.
"""

import seqio

VOCAB_SIZE = 768


def _no_examples(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  raise RuntimeError("tools/k_mixtures.py's tasks have no examples; compile only.")


def register(k: int) -> str:
  """Registers ``synthetic_k{k}`` (once) and returns its name."""
  name = f"synthetic_k{k}"
  if name in seqio.MixtureRegistry.names():
    return name
  vocabulary = seqio.PassThroughVocabulary(size=VOCAB_SIZE)
  features = {f: seqio.Feature(vocabulary) for f in ("inputs", "targets")}
  source = seqio.FunctionDataSource(_no_examples, splits=("train",))
  tasks = [f"{name}_t{i:03d}" for i in range(k)]
  for task in tasks:
    seqio.TaskRegistry.add(
      task, source=source, preprocessors=[], output_features=features
    )
  seqio.MixtureRegistry.add(name, [(task, 1.0) for task in tasks])
  return name


for _k in (2, 8, 32):
  register(_k)
