"""mtx.mtl: multi-task weightings and gradient aggregators as Optax transforms.

Compose them with any optax optimizer; ``update`` takes per-task gradients (a
pytree shaped like params with a leading task axis k) and the extra args
``task_losses`` f32[k], ``task_present`` bool[k] and ``key``::

    tx = optax.chain(mtl.uncertainty_weighting(k), mtl.pcgrad(), optax.adamw(1e-3))
    state = tx.init(params)
    updates, state = tx.update(per_task_grads, state, params,
                               task_losses=losses, task_present=present, key=key)

Every method is an ``optax.GradientTransformationExtraArgs`` of one of two
types, which ``kind`` reads:

``Weighting`` (keeps the task axis; its ``weights`` are gradient-free, so the
trainer can use one gradient of sum_t w_t L_t, see ``needs_task_grads`` /
``combined_weights``): ``static_weights``, ``uncertainty_weighting``, ``dwa``,
``rlw``, ``famo``.

``Aggregator`` (reduces the task axis; its ``aggregate`` reuses a Gram matrix
and reports the task coefficients): ``sum_tasks``, ``mean_tasks``, ``pcgrad``,
``mgda``, ``cagrad``, ``imtl_g``, ``gradvac``, ``nash_mtl``, ``aligned_mtl``,
``upgrad``, ``gradnorm``; ``masked`` limits one to some parameters. MGDA, CAGrad,
IMTL-G, Nash-MTL and UPGrad solve a k-sized convex problem exactly (``mtx.mtl.qp``)
and report its residual (``SolverStats``; ``aggregate``'s ``info``).

The trainer takes a list, not a chain: weightings, one aggregator, then plain
optax transforms. ``ensure_aggregator`` refuses any other order (an
``optax.chain`` of mtl transforms is of neither type) and appends
``sum_tasks()`` to a list of weightings only. Errors in shapes or arguments are
``ValueError``s (``mtx.errors.UserError``). See ``mtx/mtl/base.py`` for the
protocol.

In the trainer: ``combined_weights`` (one gradient of ``sum_t w_t L_t``) or
``aggregate`` (per-task gradients: the chain's update with one shared Gram
matrix, the task weights it applied, and the gradient diagnostics);
``aggregate_gram`` and ``finish_chain`` (the Gramian route: the same chain from the
task gradients' Gram matrix alone, for aggregators with ``coefficients``; see
``gram_route_refusal``); ``tag_affinity`` measures TAG's inter-task affinity (Fifty et al. 2021).
"""

from mtx.mtl.affinity import affinity_metrics, tag_affinity
from mtx.mtl.aggregators import (
  GradNormState,
  GradVacState,
  NashMTLState,
  PCGradState,
  aligned_mtl,
  cagrad,
  gradnorm,
  gradvac,
  imtl_g,
  mgda,
  nash_mtl,
  pcgrad,
  upgrad,
)
from mtx.mtl.base import (
  AGGREGATOR,
  WEIGHTING,
  Aggregator,
  EmptyState,
  Weighting,
  aggregate,
  aggregate_gram,
  aggregator_transform,
  build,
  combine,
  combined_weights,
  diagnostics,
  ensure_aggregator,
  finish_chain,
  gram,
  gram_diagnostics,
  gram_route_refusal,
  kind,
  masked,
  mean_tasks,
  needs_task_grads,
  sum_tasks,
)
from mtx.mtl.qp import SolverStats
from mtx.mtl.weighting import (
  DWAState,
  FAMOState,
  RLWState,
  UncertaintyState,
  dwa,
  famo,
  rlw,
  static_weights,
  uncertainty_weighting,
)

# Every method factory, by the name gin and the docs use.
METHODS = {
  "sum_tasks": sum_tasks,
  "mean_tasks": mean_tasks,
  "static_weights": static_weights,
  "uncertainty_weighting": uncertainty_weighting,
  "dwa": dwa,
  "rlw": rlw,
  "famo": famo,
  "gradnorm": gradnorm,
  "pcgrad": pcgrad,
  "mgda": mgda,
  "cagrad": cagrad,
  "imtl_g": imtl_g,
  "gradvac": gradvac,
  "nash_mtl": nash_mtl,
  "aligned_mtl": aligned_mtl,
  "upgrad": upgrad,
}
