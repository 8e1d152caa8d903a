"""Eval results on disk: ``MODEL_DIR/eval/step_<step>.json``, metrics.jsonl, TensorBoard.

``eval/step_1000.json`` (written atomically: a temporary file, then ``os.replace``)::

    {"step": 1000, "split": "validation",
     "tasks": {"demo_sort": {"exact_match": 71.5, "loss": 0.42, "num_examples": 1000}, ...},
     "primary": {"demo_sort": "exact_match", ...},
     "summary": {"mean_primary": 64.2, "delta_m": 3.1, "baseline": "/runs/base"}}

Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity", as in
metrics.jsonl (``read_results`` turns them back into floats). The same numbers go to
``metrics.jsonl`` and TensorBoard as ``eval/<task>/<metric>``, ``eval/<task>/loss``,
``eval/mean_primary`` and (with a baseline) ``eval/delta_m``.
"""

import dataclasses
import json
import math
import re
from typing import Any, Optional, Sequence

import jax

from mtx import paths
from mtx.errors import UserError
from mtx.eval import summary

EVAL_DIR = "eval"
LOSS = "loss"  # the teacher-forced per-task loss among the metrics
NUM_EXAMPLES = "num_examples"
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclasses.dataclass
class EvalResult:
  """One evaluation of one set of params.

  Attributes:
    step: the training step of the params.
    split: the evaluated split.
    tasks: task name -> {metric name: value in percent, ..., "loss": mean token
      cross-entropy, "num_examples": int}, tasks in sorted order.
    primary: task name -> the name of its primary metric (a key of ``tasks[name]``).
    seconds: wall time of the evaluation.
  """

  step: int
  split: str
  tasks: dict
  primary: dict
  seconds: float = 0.0


def combine(parts: Sequence[EvalResult]) -> EvalResult:
  """One result of evaluations of the same step on disjoint tasks (each task scored
  apart, e.g. with its own LoRA adapter merged in): their tasks and primary metrics,
  the seconds summed."""
  return dataclasses.replace(
    parts[0],
    tasks=dict(sorted((k, v) for r in parts for k, v in r.tasks.items())),
    primary={k: v for r in parts for k, v in r.primary.items()},
    seconds=sum(r.seconds for r in parts),
  )


def _encode(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  if isinstance(value, dict):
    return {k: _encode(v) for k, v in value.items()}
  return value


def _decode(value: Any) -> Any:
  if isinstance(value, str) and value in _NON_FINITE:
    return _NON_FINITE[value]
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  return value


def result_path(model_dir: str, step: int) -> str:
  return paths.join(model_dir, EVAL_DIR, f"step_{int(step)}.json")


def eval_steps(model_dir: str) -> list:
  """Steps with a results file in ``model_dir/eval``, oldest first."""
  directory = paths.join(model_dir, EVAL_DIR)
  if not paths.isdir(directory):
    return []
  return sorted(
    int(m.group(1)) for m in map(_STEP_FILE.match, paths.listdir(directory)) if m
  )


def read_results(
  path: str, step: Optional[int] = None, what: str = "EVAL_BASELINE_DIR"
) -> dict:
  """Reads one results file: ``path`` itself, or a MODEL_DIR's ``step`` (default newest).

  Raises:
    UserError: nothing to read (``what`` names the setting that gave ``path``).
  """
  if paths.isfile(path):
    file = path
  else:
    if not paths.isdir(path):
      raise UserError(f"{what} {path} does not exist; point it at a run's MODEL_DIR.")
    steps = eval_steps(path)
    if not steps or (step is not None and step not in steps):
      which = f"step {step}" if step is not None else "any step"
      raise UserError(
        f"{what} {path} has no eval results for {which} (no "
        f"{EVAL_DIR}/step_N.json); run `mtx eval` with that MODEL_DIR "
        "first."
      )
    file = result_path(path, step if step is not None else steps[-1])
  try:
    return _decode(json.loads(paths.read_text(file)))
  except (OSError, ValueError) as e:
    raise UserError(
      f"{what}: {file} is not a readable eval result ({e}); run "
      "`mtx eval` on that run again."
    ) from e


def summarize(result: EvalResult, baseline_dir: Optional[str] = None) -> dict:
  """The JSON object of ``result`` (layout in the module docstring), with its summary."""
  delta = None
  if baseline_dir:
    baseline = read_results(baseline_dir)
    delta = summary.delta_m(result.tasks, result.primary, baseline.get("tasks", {}))
  return {
    "step": int(result.step),
    "split": result.split,
    "tasks": result.tasks,
    "primary": result.primary,
    "summary": {
      "mean_primary": summary.mean_primary(result.tasks, result.primary),
      "delta_m": delta,
      "baseline": baseline_dir or None,
    },
  }


def scalars(record: dict) -> dict:
  """The metrics.jsonl / TensorBoard scalars of a results object."""
  out = {}
  for task, values in record["tasks"].items():
    for metric, value in values.items():
      if metric != NUM_EXAMPLES:
        out[f"eval/{task}/{metric}"] = value
  out["eval/mean_primary"] = record["summary"]["mean_primary"]
  if record["summary"]["delta_m"] is not None:
    out["eval/delta_m"] = record["summary"]["delta_m"]
  return out


def write_results(
  model_dir: str, result: EvalResult, writer, baseline_dir: Optional[str] = None
) -> dict:
  """Writes ``eval/step_N.json`` and the eval scalars (to ``writer``); returns the object.

  Args:
    model_dir: the run's MODEL_DIR.
    result: what ``Evaluator.evaluate`` returned.
    writer: a ``mtx.runtime.metrics_writer.MetricsWriter`` for metrics.jsonl and
      TensorBoard (or None to write only the JSON file).
    baseline_dir: a baseline run's MODEL_DIR (or one of its results files) for Delta-m.

  Only process 0 writes; every process returns the same object.
  """
  record = summarize(result, baseline_dir)
  if jax.process_index() != 0:
    return record
  path = result_path(model_dir, result.step)
  paths.makedirs(paths.dirname(path))
  # Unique temp file, fsync, rename (one upload on object stores); a full disk is a
  # one-line WriteError (a UserError).
  paths.write_atomically(path, json.dumps(_encode(record), indent=1, allow_nan=False))
  if writer is not None:
    writer.write(result.step, scalars(record))
    writer.flush()
  return record


def format_table(record: dict) -> str:
  """A per-task table of a results object, for people."""
  rows = [("task", "primary", "value", "loss", "examples", "other metrics")]
  for task, values in record["tasks"].items():
    metric = record["primary"].get(task, "")
    other = ", ".join(
      f"{k} {v:.2f}" for k, v in values.items() if k not in (metric, "loss", NUM_EXAMPLES)
    )
    rows.append(
      (
        task,
        metric,
        _fmt(values.get(metric)),
        _fmt(values.get("loss"), 4),
        str(values.get(NUM_EXAMPLES, "")),
        other,
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  lines = [
    "  ".join(f"{c:<{w}}" for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows
  ]
  s = record["summary"]
  lines.append(f"mean primary: {_fmt(s['mean_primary'])}")
  if s["baseline"]:
    delta = "n/a" if s["delta_m"] is None else f"{s['delta_m']:+.2f}%"
    lines.append(f"delta_m vs {s['baseline']}: {delta}")
  return "\n".join(line.rstrip() for line in lines)


def _fmt(value, digits: int = 2) -> str:
  if value is None:
    return ""
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
