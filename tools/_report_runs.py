"""Reads one mtx run directory into plain arrays for tools/report.py (no matplotlib).

A run directory (MODEL_DIR) holds, as written by ``mtx train`` and ``mtx eval``:

  metrics.jsonl        one JSON object per logged step; training and eval lines may
                       share a step, e.g. {"step": 200, "loss/a": 1.2} and
                       {"step": 200, "eval/a/accuracy": 81.0}: they are merged by step.
  eval/step_<N>.json   {"step", "tasks": {task: {metric: v, "loss": v}},
                       "primary": {task: metric}, "summary": {"mean_primary", "delta_m"}}
  tasks.json           {"mixture", "tasks": [{"id", "name", "group", "rate", ...}]}
  config.gin           the operative gin config.

``load_run`` turns these into a ``Run``: ``run.series(key)`` gives the (steps, values)
of one scalar, e.g. ``run.series("loss/a") -> (int64[S], float64[S])``, sorted by step,
with NaN where a value was logged as non-finite. Anything missing or unreadable becomes
an empty series or a note in ``run.notes``, never an exception: a report of a run still
in progress must render.
"""

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtx.errors import UserError
from mtx.eval import summary as eval_summary
from mtx.runtime.metrics_writer import read_metrics

_EVAL_SUMMARY_KEYS = ("eval/mean_primary", "eval/delta_m")
_NOT_METRICS = frozenset({"num_examples"})


@dataclasses.dataclass
class Run:
  """One run directory, read.

  Attributes:
    label: the name shown in the report (directory name unless given).
    path: the directory.
    records: step -> merged scalars of that step (every line of that step), sorted.
    tasks: task names in task-id order.
    groups: task-group names (the axis of grad_cos and mtl/weight), in task-id order.
    primary: task -> primary eval metric name.
    eval_metrics: task -> eval metric names (without "loss"), in the order first seen.
    last_eval: the newest eval: {"step", "tasks": {task: {metric: v}}, "summary"}.
    mixture: the mixture or task name.
    config: binding name -> binding text (possibly several lines), from config.gin.
    config_text: config.gin as written.
    notes: problems met while reading, one sentence each.
  """

  label: str
  path: str
  records: Dict[int, Dict[str, float]]
  tasks: List[str]
  groups: List[str]
  primary: Dict[str, str]
  eval_metrics: Dict[str, List[str]]
  last_eval: Optional[Dict[str, Any]]
  mixture: str
  config: Dict[str, str]
  config_text: str
  notes: List[str]

  def series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps int64[S], values float64[S]) of the steps that logged ``key``."""
    steps = [s for s, r in self.records.items() if key in r]
    values = [self.records[s][key] for s in steps]
    return np.asarray(steps, np.int64), _finite_or_nan(values)

  def has(self, key: str) -> bool:
    return any(key in r for r in self.records.values())

  def keys_with_prefix(self, prefix: str) -> List[str]:
    """Keys starting with ``prefix`` in the order first logged."""
    seen = {}
    for r in self.records.values():
      for k in r:
        if k.startswith(prefix):
          seen.setdefault(k, None)
    return list(seen)

  def last_finite(self, key: str) -> Tuple[Optional[int], float]:
    """(step, value) of the newest finite value of ``key``; (None, nan) if none."""
    steps, values = self.series(key)
    ok = np.flatnonzero(np.isfinite(values))
    if not ok.size:
      return None, math.nan
    return int(steps[ok[-1]]), float(values[ok[-1]])

  @property
  def last_step(self) -> Optional[int]:
    return max(self.records) if self.records else None

  def grad_cos(self, step: int) -> np.ndarray:
    """f64[G, G] pairwise gradient cosines of the groups at ``step`` (1 on the diagonal,
    NaN where not logged)."""
    g = len(self.groups)
    m = np.full((g, g), np.nan)
    r = self.records.get(step, {})
    for i, a in enumerate(self.groups):
      m[i, i] = 1.0
      for j in range(i + 1, g):
        b = self.groups[j]
        v = r.get(f"grad_cos/{a}/{b}", r.get(f"grad_cos/{b}/{a}"))
        if v is not None:
          m[i, j] = m[j, i] = _finite_or_nan([v])[0]
    return m

  def grad_cos_steps(self) -> List[int]:
    return [
      s for s, r in self.records.items() if any(k.startswith("grad_cos/") for k in r)
    ]


def is_lower_better(metric: str) -> bool:
  """As Delta-m counts it (mtx.eval.summary): losses and error rates."""
  return not eval_summary.higher_is_better(metric)


def check_run_dir(path: str) -> None:
  """Raises UserError unless ``path`` is an mtx run directory."""
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory; pass the MODEL_DIR of an mtx run.")
  markers = ("metrics.jsonl", "tasks.json", "config.gin")
  if not any(os.path.isfile(os.path.join(path, m)) for m in markers) and not glob.glob(
    os.path.join(path, "eval", "step_*.json")
  ):
    raise UserError(
      f"{path} is not an mtx run directory (it has no metrics.jsonl, "
      f"tasks.json, config.gin or eval/step_*.json); pass the MODEL_DIR "
      f"of an mtx run."
    )


def load_run(path: str, label: Optional[str] = None) -> Run:
  """Reads a run directory (see the module docstring); raises UserError if it is none."""
  check_run_dir(path)
  path = os.path.abspath(path)
  notes = []
  records = _merge_by_step(read_metrics(path), notes)
  evals = _read_eval_files(path, notes)
  primary = {}
  for ev in evals:  # Oldest first: the newest eval's view wins.
    _merge_eval(records, ev)
    primary.update(
      {
        t: m
        for t, m in (ev.get("primary") or {}).items()
        if isinstance(t, str) and isinstance(m, str)
      }
    )
  records = dict(sorted(records.items()))

  mixture, tasks, groups = _read_tasks(path, notes)
  config_text = _read_text(os.path.join(path, "config.gin"))
  config = parse_gin_bindings(config_text)
  if not mixture:
    mixture = _unquote(config.get("MIXTURE_OR_TASK_NAME", "").split("=", 1)[-1])
  run = Run(
    label=label or os.path.basename(os.path.normpath(path)),
    path=path,
    records=records,
    tasks=[],
    groups=[],
    primary={},
    eval_metrics={},
    last_eval=None,
    mixture=mixture,
    config=config,
    config_text=config_text,
    notes=notes,
  )

  # Tasks and groups the metrics know of, after those of tasks.json.
  eval_metrics = {}
  for key in run.keys_with_prefix("eval/"):
    if key in _EVAL_SUMMARY_KEYS or key.count("/") < 2:
      continue
    task, metric = key[len("eval/") :].rsplit("/", 1)
    if metric not in _NOT_METRICS and metric != "loss":
      eval_metrics.setdefault(task, []).append(metric)
    elif metric == "loss":
      eval_metrics.setdefault(task, [])
  loss_tasks = [k[len("loss/") :] for k in run.keys_with_prefix("loss/")]
  run.tasks = union(tasks, loss_tasks, list(eval_metrics))
  metric_groups = [k[len("grad_norm/") :] for k in run.keys_with_prefix("grad_norm/")] + [
    k[len("mtl/weight/") :] for k in run.keys_with_prefix("mtl/weight/")
  ]
  run.groups = union(groups, metric_groups)
  run.eval_metrics = eval_metrics
  run.primary = {
    t: primary.get(t) or ms[0] for t, ms in eval_metrics.items() if primary.get(t) or ms
  }
  run.last_eval = _last_eval(run)
  return run


def union(*lists: Sequence[str]) -> List[str]:
  out = {}
  for names in lists:
    for n in names:
      out.setdefault(n, None)
  return list(out)


def _finite_or_nan(values) -> np.ndarray:
  out = np.full(len(values), np.nan)
  for i, v in enumerate(values):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[i] = v
  return out


def _merge_by_step(lines: Sequence[Any], notes: List[str]) -> Dict[int, Dict[str, float]]:
  """step -> the union of the numeric scalars of every line of that step (later wins)."""
  records = {}
  skipped = 0
  for line in lines:
    step = line.get("step") if isinstance(line, dict) else None
    if (
      not isinstance(step, (int, float))
      or isinstance(step, bool)
      or not math.isfinite(step)
    ):
      skipped += 1
      continue
    merged = records.setdefault(int(step), {})
    for k, v in line.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        merged[k] = float(v)
  if skipped:
    notes.append(
      f"{skipped} line(s) of metrics.jsonl without a numeric step were skipped."
    )
  return records


def _read_eval_files(path: str, notes: List[str]) -> List[Dict[str, Any]]:
  """The eval/step_<N>.json objects, oldest step first; unreadable ones become notes."""
  found = []
  for f in glob.glob(os.path.join(path, "eval", "step_*.json")):
    m = re.fullmatch(r"step_(\d+)\.json", os.path.basename(f))
    if not m:
      continue
    try:
      with open(f, encoding="utf-8") as fh:
        ev = json.load(fh, object_hook=_decode_non_finite)
    except (OSError, ValueError) as e:
      notes.append(f"{os.path.relpath(f, path)} could not be read ({type(e).__name__}).")
      continue
    if not isinstance(ev, dict) or not isinstance(ev.get("tasks"), dict):
      notes.append(f"{os.path.relpath(f, path)} has no 'tasks' object; skipped.")
      continue
    step = ev.get("step")
    found.append((int(step) if isinstance(step, (int, float)) else int(m.group(1)), ev))
  found.sort(key=lambda x: x[0])
  return [dict(ev, step=s) for s, ev in found]


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _decode_non_finite(obj: Dict[str, Any]) -> Dict[str, Any]:
  """The eval files write non-finite floats as "NaN" / "Infinity" strings."""
  return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in obj.items()}


def _merge_eval(records: Dict[int, Dict[str, float]], ev: Dict[str, Any]) -> None:
  """Adds an eval file's numbers as eval/<task>/<metric> scalars where not logged."""
  r = records.setdefault(ev["step"], {})
  for task, metrics in ev["tasks"].items():
    if not isinstance(metrics, dict):
      continue
    for metric, v in metrics.items():
      if (
        metric not in _NOT_METRICS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
      ):
        r.setdefault(f"eval/{task}/{metric}", float(v))
  summary = ev.get("summary") or {}
  for name in ("mean_primary", "delta_m"):
    v = summary.get(name) if isinstance(summary, dict) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      r.setdefault(f"eval/{name}", float(v))


def _last_eval(run: Run) -> Optional[Dict[str, Any]]:
  """The newest step with eval scalars: {"step", "tasks": {t: {m: v}}, "summary": {..}}."""
  steps = [s for s, r in run.records.items() if any(k.startswith("eval/") for k in r)]
  if not steps:
    return None
  step = steps[-1]
  r = run.records[step]
  tasks = {}
  for task, metrics in run.eval_metrics.items():
    values = {
      m: r[f"eval/{task}/{m}"] for m in metrics + ["loss"] if f"eval/{task}/{m}" in r
    }
    if values:
      tasks[task] = values
  summary = {k.split("/", 1)[1]: r[k] for k in _EVAL_SUMMARY_KEYS if k in r}
  return {"step": step, "tasks": tasks, "summary": summary}


def _read_tasks(path: str, notes: List[str]) -> Tuple[str, List[str], List[str]]:
  """(mixture, task names by id, group names by first task id) from tasks.json."""
  f = os.path.join(path, "tasks.json")
  if not os.path.exists(f):
    return "", [], []
  try:
    with open(f, encoding="utf-8") as fh:
      data = json.load(fh)
    entries = sorted(data["tasks"], key=lambda t: t.get("id", 0))
    tasks = [str(t["name"]) for t in entries]
    groups = union([str(t.get("group", t["name"])) for t in entries])
    return str(data.get("mixture", "")), tasks, groups
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    notes.append(
      f"tasks.json could not be read ({type(e).__name__}); task names come "
      f"from metrics.jsonl."
    )
    return "", [], []


def _read_text(f: str) -> str:
  try:
    with open(f, encoding="utf-8", errors="replace") as fh:
      return fh.read()
  except OSError:
    return ""


_BINDING = re.compile(r"^([A-Za-z_][\w./]*)\s*=")


def parse_gin_bindings(text: str) -> Dict[str, str]:
  """name -> full text of its binding, for an operative gin config.

  A binding starts at column 0 with ``name =``; indented or continued lines belong to
  the binding above. E.g. ``"train.mtl_transforms = [@mtl.pcgrad]"`` gives
  ``{"train.mtl_transforms": "train.mtl_transforms = [@mtl.pcgrad]"}``.
  """
  out = {}
  current = None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      current = None if not line.strip() or not line.startswith(" ") else current
      continue
    m = _BINDING.match(line)
    if m and not line[0].isspace():
      current = m.group(1)
      out[current] = line.rstrip()
    elif current is not None:
      out[current] += "\n" + line.rstrip()
  return out


def _unquote(value: str) -> str:
  return value.strip().strip("'\"")


def _refs(text: str) -> List[str]:
  """The configurables a binding's value references: "x = [@mtl.a(), @b]" -> [mtl.a, b]."""
  return re.findall(r"@([\w.]+)", text.split("=", 1)[1])


def _bindings_of(config: Dict[str, str], ref: str) -> List[str]:
  """The bindings of configurable ``ref`` ("mtl.pcgrad" matches "pcgrad.reduction")."""
  short = ref.rsplit(".", 1)[-1]
  out = []
  for name, text in config.items():
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if owner and (owner == ref or owner.rsplit(".", 1)[-1] == short):
      out.append(text)
  return out


def mtl_summary(config: Dict[str, str]) -> Tuple[str, List[str]]:
  """(short method name, binding lines) of a run's multi-task method.

  The name joins the configurables referenced by ``train.mtl_transforms``, wrappers
  showing what they wrap: ``[@mtl.uncertainty_weighting, @mtl.pcgrad]`` gives
  ``"uncertainty_weighting + pcgrad"``, ``[@mtl.masked]`` with ``masked.inner =
  @mtl.cagrad()`` gives ``"masked(cagrad)"``. The lines are that binding and the
  bindings of every configurable it reaches.
  """
  root = config.get("train.mtl_transforms")
  if root is None:
    return ("unknown (no config.gin)" if not config else "sum (default)"), []
  lines = [root]
  seen = set()

  def name(ref: str, depth: int) -> str:
    short = ref.rsplit(".", 1)[-1]
    own = _bindings_of(config, ref)
    if short not in seen:
      seen.add(short)
      lines.extend(own)
    inner = [r for text in own for r in _refs(text)]
    if not inner or depth > 3:
      return short
    return f"{short}({', '.join(name(r, depth + 1) for r in inner)})"

  names = [name(r, 0) for r in _refs(root)]
  return (" + ".join(names) if names else "sum (default)"), lines


def model_summary(config: Dict[str, str]) -> List[str]:
  """The model's and mixture's binding lines (T5Config.*, mixture, lengths, steps)."""
  keep = (
    "MIXTURE_OR_TASK_NAME",
    "TASK_FEATURE_LENGTHS",
    "TRAIN_STEPS",
    "BATCH_SIZE",
    "UNITS",
    "train.task_groups",
    "make_optimizer.name",
    "learning_rate_fn.name",
    "learning_rate_fn.base_lr",
  )
  lines = [config[k] for k in keep if k in config]
  lines += [t for k, t in config.items() if k.startswith("T5Config.")]
  return lines


def train_steps(config: Dict[str, str]) -> Optional[int]:
  """TRAIN_STEPS of the config, if it is a literal int."""
  text = config.get("TRAIN_STEPS", "")
  try:
    return int(text.split("=", 1)[1].strip())
  except (IndexError, ValueError):
    return None


def ensure_runs(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[Run]:
  """Loads every run; labels default to directory names (made unique)."""
  if labels is not None and len(labels) != len(paths):
    raise UserError(
      f"--labels has {len(labels)} name(s) for {len(paths)} run(s); give "
      f"one comma-separated label per MODEL_DIR."
    )
  for p in paths:
    check_run_dir(p)
  runs = []
  used = set()
  for i, p in enumerate(paths):
    label = (
      labels[i] if labels else os.path.basename(os.path.normpath(os.path.abspath(p)))
    )
    base, n = label, 2
    while label in used:
      label, n = f"{base} ({n})", n + 1
    used.add(label)
    runs.append(load_run(p, label))
  return runs
