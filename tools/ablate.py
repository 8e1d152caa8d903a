"""Runs every multi-task method on the demo mixture and writes one markdown table.

    python tools/ablate.py --out /tmp/ablate                    # every method, ~35 min
    python tools/ablate.py --out /tmp/ablate --methods sum,pcgrad,nash_mtl --steps 600
    python tools/ablate.py --out /tmp/ablate --resume           # after an interruption
    python tools/ablate.py --out /tmp/ablate --table_only       # just rebuild the table

Each method is one gin file, ``gin_configs/mtl/<method>.gin``: the run is
``mtx train --gin_file=gin_configs/demo.gin --gin_file=gin_configs/mtl/<method>.gin``
with the same ``--steps`` for all, in its own MODEL_DIR ``<out>/<method>``, followed by
``mtx eval`` of the final checkpoint (skipped when the trainer already wrote
``eval/step_<steps>.json`` itself). Extra ``--gin.NAME=VALUE`` flags go to every run.
``static_weights`` is left out unless named (its file needs one weight per task).

The table (``<out>/ablation.md``, also printed) has one row per method: each task's
primary eval metric (the first metric of its first metric_fn, in percent), their mean,
Delta-m% against the baseline run (``--baseline``, default ``sum``: the mean over tasks
of the sign-adjusted relative change, Maninis et al. 2019), and the median training
step time (``timing/step_s`` in metrics.jsonl). The best value of a column is bold.

``--resume`` skips methods whose ``eval/step_<steps>.json`` exists and lets unfinished
ones continue from their last checkpoint; without it an existing non-empty run
directory is an error, so that a finished ablation is never overwritten by accident.
The default ``--steps`` is chosen so that the 15 default methods take about 30-40
minutes on a 2-core CPU.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MTL_DIR = os.path.join(REPO, "gin_configs", "mtl")
EVAL_GIN = os.path.join(REPO, "gin_configs", "runs", "eval.gin")
# Plain sums first (the baseline), then loss weightings, then gradient methods.
ORDER = (
  "sum",
  "mean",
  "static_weights",
  "uncertainty",
  "dwa",
  "rlw",
  "famo",
  "gradnorm",
  "pcgrad",
  "mgda",
  "cagrad",
  "imtl_g",
  "gradvac",
  "nash_mtl",
  "aligned_mtl",
  "upgrad",
)
NEEDS_SETTINGS = ("static_weights",)  # left out of the default list
# Metric names where smaller is better (as mtx.eval.summary); percentages are not.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ter", "wer", "cer"})
DEFAULT_STEPS = 1200
DEFAULT_EVAL_EXAMPLES = 200


class AblateError(Exception):
  """A mistake the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------ the table


@dataclasses.dataclass
class RunSummary:
  """What the table needs from one run directory.

  Attributes:
    step: the evaluated step.
    primary: task -> (primary metric name, value).
    step_s: median seconds per training step, or None if never logged.
  """

  step: int
  primary: Dict[str, Tuple[str, float]]
  step_s: Optional[float]


def newest_eval(run_dir: str) -> Optional[str]:
  """Path of the run's newest ``eval/step_N.json``, or None."""
  d = os.path.join(run_dir, "eval")
  if not os.path.isdir(d):
    return None
  steps = [
    int(m.group(1))
    for m in map(re.compile(r"^step_(\d+)\.json$").match, os.listdir(d))
    if m
  ]
  return os.path.join(d, f"step_{max(steps)}.json") if steps else None


def read_metrics_lines(run_dir: str) -> List[dict]:
  """metrics.jsonl's JSON objects; a torn last line (a run in progress) is skipped."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def summarize(run_dir: str) -> Optional[RunSummary]:
  """The run's newest evaluation and step time; None when it has no evaluation."""
  path = newest_eval(run_dir)
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  primary = {}
  for task, values in sorted(record.get("tasks", {}).items()):
    metric = record.get("primary", {}).get(task)
    if metric is None or metric not in values:
      metric = next((m for m in values if m not in ("loss", "num_examples")), "loss")
    value = values.get(metric)
    if isinstance(value, (int, float)) and math.isfinite(value):
      primary[task] = (metric, float(value))
  times = [
    r["timing/step_s"]
    for r in read_metrics_lines(run_dir)
    if isinstance(r.get("timing/step_s"), (int, float))
  ]
  return RunSummary(
    step=int(record.get("step", -1)),
    primary=primary,
    step_s=statistics.median(times) if times else None,
  )


def mean_primary(s: RunSummary) -> Optional[float]:
  """Mean primary metric; loss-scored tasks count only when no task has a metric."""
  scored = [v for m, v in s.primary.values() if m not in LOWER_IS_BETTER]
  if not scored:
    scored = [v for _, v in s.primary.values()]
  return sum(scored) / len(scored) if scored else None


def delta_m(s: RunSummary, base: RunSummary) -> Optional[float]:
  """Delta-m% of ``s`` against ``base``: 100/T sum_t sign_t (M_t - B_t) / |B_t|.

  Over the T tasks both runs scored with the same metric and a nonzero baseline;
  sign_t is -1 for lower-is-better metrics (loss), +1 otherwise. None if T = 0.
  """
  terms = []
  for task, (metric, value) in s.primary.items():
    if task not in base.primary or base.primary[task][0] != metric:
      continue
    b = base.primary[task][1]
    if b == 0:
      continue
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    terms.append(sign * (value - b) / abs(b))
  return 100.0 * sum(terms) / len(terms) if terms else None


def _fmt(x: Optional[float], spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


def build_table(
  runs: Sequence[Tuple[str, Optional[RunSummary]]],
  baseline: str = "sum",
  notes: Sequence[str] = (),
) -> str:
  """The markdown table of an ablation.

  Args:
    runs: (method name, its summary or None if it has no evaluation), in row order.
    baseline: the method Delta-m% is measured against.
    notes: lines printed above the table (e.g. the command that made it).

  Returns:
    Markdown: notes, the table, and a legend naming each task's primary metric.
  """
  done = {name: s for name, s in runs if s is not None}
  tasks = sorted({t for s in done.values() for t in s.primary})
  base = done.get(baseline)
  rows = []
  for name, s in runs:
    if s is None:
      rows.append((name, [None] * len(tasks), None, None, None))
      continue
    values = [s.primary[t][1] if t in s.primary else None for t in tasks]
    dm = delta_m(s, base) if base is not None else None
    rows.append((name, values, mean_primary(s), dm, s.step_s))

  def best(column, lower=False):
    """The column's best value, or None when there is nothing to single out."""
    present = [v for v in column if v is not None]
    if len(set(present)) < 2:
      return None
    return min(present) if lower else max(present)

  metric_of = {
    t: next(s.primary[t][0] for s in done.values() if t in s.primary) for t in tasks
  }
  best_task = [
    best([r[1][i] for r in rows], metric_of[t] in LOWER_IS_BETTER)
    for i, t in enumerate(tasks)
  ]
  best_mean = best([r[2] for r in rows])
  best_dm = best([r[3] for r in rows])
  best_time = best([r[4] for r in rows], lower=True)

  def cell(v, b, spec):
    text = _fmt(v, spec)
    return f"**{text}**" if v is not None and b is not None and v == b else text

  header = ["method"] + tasks + ["mean primary", f"Δm% vs {baseline}", "step (s)"]
  out = list(notes) + ([""] if notes else [])
  out.append("| " + " | ".join(header) + " |")
  out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
  for name, values, mean, dm, step_s in rows:
    if name not in done:
      out.append(
        "| " + " | ".join([f"{name} (no eval)"] + ["—"] * (len(header) - 1)) + " |"
      )
      continue
    cells = [name] + [cell(v, b, ".1f") for v, b in zip(values, best_task)]
    cells += [
      cell(mean, best_mean, ".2f"),
      cell(dm, best_dm, "+.2f"),
      cell(step_s, best_time, ".3f"),
    ]
    out.append("| " + " | ".join(cells) + " |")
  if tasks:
    out.append("")
    out.append(
      "Task columns: each task's primary metric on its eval split ("
      + ", ".join(f"{t}: {metric_of[t]}" for t in tasks)
      + "). "
      f"Δm%: mean relative change per task vs `{baseline}`, sign-adjusted "
      "(Maninis et al. 2019). Step: median seconds per training step."
    )
  return "\n".join(out) + "\n"


# ------------------------------------------------------------------ the runs


def available_methods() -> List[str]:
  names = sorted(f[:-4] for f in os.listdir(MTL_DIR) if f.endswith(".gin"))
  return [m for m in ORDER if m in names] + [m for m in names if m not in ORDER]


def choose_methods(spec: Optional[str]) -> List[str]:
  """``--methods`` as a list (default: every gin file but those needing settings)."""
  known = available_methods()
  if not spec:
    return [m for m in known if m not in NEEDS_SETTINGS]
  methods = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise AblateError(
      f"Unknown method(s) {', '.join(unknown)} in --methods; choose from "
      f"{', '.join(known)} (the files in gin_configs/mtl/)."
    )
  return methods


def _resolve_gin(path: str) -> str:
  """An absolute path when the file exists from here; else as given (gin search path)."""
  return os.path.abspath(path) if os.path.exists(path) else path


def commands(method: str, run_dir: str, args, extra: Sequence[str]) -> Tuple[list, list]:
  """The ``mtx train`` and ``mtx eval`` command lines of one method."""
  gin_files = [f"--gin_file={_resolve_gin(f)}" for f in args.gin_file]
  gin_files.append(f"--gin_file={os.path.join(MTL_DIR, method + '.gin')}")
  if os.path.exists(EVAL_GIN):
    gin_files.append(f"--gin_file={EVAL_GIN}")
  log_period = args.log_period or max(1, min(100, args.steps // 10))
  common = gin_files + [
    f"--gin.MODEL_DIR='{run_dir}'",
    f"--gin.TRAIN_STEPS={args.steps}",
    f"--gin.LOG_PERIOD={log_period}",
    # A few checkpoints, so that --resume continues an interrupted run.
    f"--gin.CHECKPOINT_PERIOD={max(1, args.steps // 4)}",
  ]
  if os.path.exists(EVAL_GIN):
    common.append(f"--gin.EVAL_MAX_EXAMPLES={args.eval_max_examples or None}")
  common += list(extra)
  py = [args.python, "-m", "mtx"]
  train = py + ["train"] + common + [f"--gin.EVAL_PERIOD={args.steps}"]
  evaluate = py + ["eval"] + common + [f"--gin.EVAL_CHECKPOINT_STEP={args.steps}"]
  return train, evaluate


def finished(run_dir: str, steps: int) -> bool:
  return os.path.exists(os.path.join(run_dir, "eval", f"step_{steps}.json"))


def run_method(method: str, args, extra: Sequence[str]) -> Optional[str]:
  """Trains and evaluates one method; returns an error line, or None on success."""
  run_dir = os.path.join(os.path.abspath(args.out), method)
  if finished(run_dir, args.steps) and args.resume:
    print(f"[ablate] {method}: done already, skipped (--resume)", flush=True)
    return None
  if os.path.isdir(run_dir) and os.listdir(run_dir) and not args.resume:
    raise AblateError(
      f"{run_dir} already holds a run; pass --resume to reuse it or choose another --out."
    )
  os.makedirs(run_dir, exist_ok=True)
  log_path = os.path.join(os.path.abspath(args.out), "logs", f"{method}.log")
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  train, evaluate = commands(method, run_dir, args, extra)
  t0 = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    for what, cmd in (("train", train), ("eval", evaluate)):
      if what == "eval" and finished(run_dir, args.steps):
        break  # the trainer evaluated its last step itself
      log.write("$ " + " ".join(cmd) + "\n")
      log.flush()
      status = subprocess.run(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False
      ).returncode
      if status != 0:
        return f"{what} failed with status {status}; see {log_path}"
  if not finished(run_dir, args.steps):
    return f"no eval/step_{args.steps}.json was written; see {log_path}"
  print(f"[ablate] {method}: done in {time.time() - t0:.0f} s", flush=True)
  return None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="ablate",
    description="Trains every mtl method on the demo mixture and "
    "writes a markdown table of final eval metrics, Delta-m% and step time. Extra "
    "--gin.NAME=VALUE flags go to every run.",
  )
  p.add_argument("--out", required=True, help="folder of the runs and ablation.md")
  p.add_argument(
    "--methods",
    default="",
    help="comma-separated gin_configs/mtl/ names (default: all but static_weights)",
  )
  p.add_argument(
    "--steps",
    type=int,
    default=DEFAULT_STEPS,
    help="training steps per method (default %(default)s)",
  )
  p.add_argument(
    "--gin_file",
    action="append",
    default=None,
    help="the run's gin file(s) (default gin_configs/demo.gin)",
  )
  p.add_argument(
    "--eval_max_examples",
    type=int,
    default=DEFAULT_EVAL_EXAMPLES,
    help="first examples per task to evaluate; 0 = all (default %(default)s)",
  )
  p.add_argument(
    "--log_period",
    type=int,
    default=0,
    help="steps between metrics lines (default steps/10, at most 100)",
  )
  p.add_argument("--baseline", default="sum", help="the Delta-m baseline method")
  p.add_argument(
    "--resume",
    action="store_true",
    help="skip finished methods, continue unfinished ones",
  )
  p.add_argument(
    "--table_only",
    action="store_true",
    help="only rebuild the table from the run folders",
  )
  p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = [a for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  try:
    if args.steps <= 0:
      raise AblateError(f"--steps must be positive (got {args.steps}).")
    args.gin_file = args.gin_file or [os.path.join(REPO, "gin_configs", "demo.gin")]
    methods = choose_methods(args.methods)
    if args.baseline not in methods:
      print(
        f"[ablate] note: the baseline '{args.baseline}' is not among the methods; "
        "Delta-m% is left out unless its run exists in --out.",
        flush=True,
      )
    errors = {}
    if not args.table_only:
      for method in methods:
        error = run_method(method, args, extra)
        if error:
          errors[method] = error
          print(f"[ablate] {method}: {error}", file=sys.stderr, flush=True)
    out = os.path.abspath(args.out)
    names = methods if args.baseline in methods else [args.baseline] + methods
    runs = [
      (m, summarize(os.path.join(out, m)))
      for m in names
      if m in methods or os.path.isdir(os.path.join(out, m))
    ]
    gin_names = " ".join(
      f"--gin_file={os.path.relpath(f, REPO) if os.path.isabs(f) else f}"
      for f in args.gin_file
    )
    notes = [
      f"Ablation: {args.steps} steps per method from `{gin_names}` + "
      "`gin_configs/mtl/<method>.gin`"
      + (
        f", eval on the first {args.eval_max_examples} examples of each task"
        if args.eval_max_examples
        else ", eval on every example"
      )
      + (f", extra flags `{' '.join(extra)}`" if extra else "")
      + "."
    ]
    table = build_table(runs, args.baseline, notes)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ablation.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(table)
    os.replace(tmp, path)
    print(table, flush=True)
    print(f"[ablate] wrote {path}", flush=True)
    return 1 if errors else 0
  except AblateError as e:
    print(f"ablate: error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  sys.exit(main())
