"""Synthetic k-task mixtures for ``mtx compile`` memory tables: ``synthetic_k{K}``.

    mtx compile --gin_file=gin_configs/demo.gin ... \\
      --gin.MIXTURE_OR_TASK_MODULE="'tools.k_mixtures'" \\
      --gin.MIXTURE_OR_TASK_NAME="'synthetic_k8'"

Importing this module registers mixtures of K = 2, 8 and 32 equally weighted tasks with
the demo mixture's vocabulary size (768), so that only k changes between the rows of a
table. They are ``tools/bench.py``'s synthetic tasks (``bench_k{K}_v768_t000`` ...),
which have no examples and raise if read: ``mtx compile`` reads none.
"""

import seqio

from tools import bench

VOCAB_SIZE = 768


def register(k: int) -> str:
  """Registers ``synthetic_k{k}`` (once) and returns its name."""
  name = f"synthetic_k{k}"
  if name not in seqio.MixtureRegistry.names():
    tasks = seqio.get_mixture_or_task(bench.synthetic_mixture(k, VOCAB_SIZE)).tasks
    seqio.MixtureRegistry.add(name, [(task.name, 1.0) for task in tasks])
  return name


for _k in (2, 8, 32):
  register(_k)
