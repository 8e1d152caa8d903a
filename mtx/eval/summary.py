"""The multi-task summary of an evaluation: mean primary metric and Delta-m%.

Both act on the per-task tables of ``MODEL_DIR/eval/step_N.json``::

    tasks   = {"sort": {"exact_match": 80.0, "loss": 0.5}, "count": {"accuracy": 90.0, ...}}
    primary = {"sort": "exact_match", "count": "accuracy"}

**mean_primary** is the plain mean over tasks of their primary metric. Tasks scored
only by their loss (no metric_fns) are left out of it unless no task has metrics; then
it is the mean loss.

**Delta-m%** (Maninis et al., 2019; the MTL literature's usual measure, e.g. Liu et al.'s
FAMO and Nash-MTL papers) is the mean relative change of each task's primary metric
against a baseline run, signed so that better is positive::

    delta_m = 100 / T * sum_t s_t * (M_t - B_t) / |B_t|,   s_t = +1 if higher is better
                                                            s_t = -1 if lower is better

over the T tasks both runs evaluated with a nonzero, finite baseline value. All percent
metrics are higher-is-better; the loss is lower-is-better. For example, sort 80 vs 64
(+25%) and loss 0.5 vs 0.4 (-25%) give delta_m = 0.
"""

import logging
import math
from typing import Mapping, Optional

log = logging.getLogger("mtx")

# Metric names where smaller is better; every other metric (percentages) is the reverse.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ter", "wer", "cer"})


def higher_is_better(metric: str) -> bool:
  return metric not in LOWER_IS_BETTER


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def mean_primary(
  tasks: Mapping[str, Mapping[str, float]], primary: Mapping[str, str]
) -> float:
  """Mean over tasks of their primary metric (see the module docstring); NaN if none."""
  values = {name: tasks[name].get(metric) for name, metric in primary.items()}
  scored = [v for n, v in values.items() if higher_is_better(primary[n]) and _finite(v)]
  if not scored:
    scored = [v for v in values.values() if _finite(v)]
  return float(sum(scored) / len(scored)) if scored else float("nan")


def delta_m(
  tasks: Mapping[str, Mapping[str, float]],
  primary: Mapping[str, str],
  baseline_tasks: Mapping[str, Mapping[str, float]],
) -> Optional[float]:
  """Delta-m% of ``tasks`` against ``baseline_tasks`` on each task's primary metric.

  Args:
    tasks: this run's per-task metrics.
    primary: task -> its primary metric name.
    baseline_tasks: the baseline run's per-task metrics (same layout).

  Returns:
    The mean signed relative change in percent, or None when no task can be compared
    (absent from the baseline, or a baseline value of 0 or not finite).
  """
  changes = []
  for name, metric in sorted(primary.items()):
    value = tasks.get(name, {}).get(metric)
    base = baseline_tasks.get(name, {}).get(metric)
    if not (_finite(value) and _finite(base)) or base == 0:
      log.warning(
        "Delta-m leaves out task %s: %s is %s here and %s in the baseline.",
        name,
        metric,
        value,
        base,
      )
      continue
    sign = 1.0 if higher_is_better(metric) else -1.0
    changes.append(sign * (value - base) / abs(base))
  return 100.0 * sum(changes) / len(changes) if changes else None
