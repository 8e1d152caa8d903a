"""Runs every multi-task method on the demo mixture, on several seeds, into one table.

    python tools/ablate.py --out /tmp/ablate                    # 15 methods x 3 seeds
    python tools/ablate.py --out /tmp/ablate --methods sum,pcgrad,nash_mtl --seeds 5
    python tools/ablate.py --out /tmp/ablate --resume           # after an interruption
    python tools/ablate.py --out /tmp/ablate --table_only       # just rebuild the table
    python tools/ablate.py --out /tmp/lora --methods sum,pcgrad,sum+adapters/lora,pcgrad+adapters/lora

A method may name more gin files after ``+`` (``pcgrad+adapters/lora``: the method's file
plus ``gin_configs/adapters/lora.gin``), so one table compares a method across settings
(full fine-tuning against adapters, say); its runs go to ``<out>/pcgrad+adapters.lora``.

Each method is one gin file, ``gin_configs/mtl/<method>.gin``: a run is
``mtx train --gin_file=gin_configs/demo.gin --gin_file=gin_configs/mtl/<method>.gin
--gin.train.seed=<seed>`` with the same ``--steps`` for all, in its own MODEL_DIR
``<out>/<method>/seed_<seed>``, followed by ``mtx eval`` of the final checkpoint
(skipped when the trainer already wrote ``eval/step_<steps>.json`` itself). The seeds
are 0..N-1 (``--seeds N``); ``train.seed`` sets the initialization and, with
``train.data_seed`` left at None, the data order. The runs go seed by seed (every method
on seed 0, then on seed 1, ...), so an interrupted ablation has whole seeds. Extra
``--gin.NAME=VALUE`` flags go to every run. ``static_weights`` is left out unless named
(its file needs one weight per task).

The table (``<out>/ablation.md``, also printed) has one row per method: the number of
seeds, each task's primary eval metric (the first metric of its first metric_fn, in
percent), their mean, Delta-m% against the baseline (``--baseline``, default ``sum``:
the mean over tasks of the sign-adjusted relative change, Maninis et al. 2019, of each
seed against the baseline's seed-mean), each as mean ± standard error over the seeds,
the median training step time (``timing/step_s`` in metrics.jsonl) and the training
process's peak resident memory (its ``ru_maxrss``; on CPU the device memory is host
memory). A value better or worse than the baseline's by more than 2 standard errors of
the difference is marked ▲ or ▼; no mark means within noise. A column's best is bold only when it beats every
other row beyond noise, so a single seed (no standard error) is never bold or marked.

``--resume`` skips (method, seed) runs whose ``eval/step_<steps>.json`` exists and lets
unfinished ones continue from their last checkpoint, so raising ``--seeds`` later runs
only the new seeds; without it an existing non-empty run directory is an error, so that
a finished ablation is never overwritten by accident.
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
DEFAULT_STEPS = 600
DEFAULT_SEEDS = 3
DEFAULT_EVAL_EXAMPLES = 0  # all: ~4,200 demo examples, a few seconds


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
    peak_mib: the training process's peak resident memory (MiB), or None.
  """

  step: int
  primary: Dict[str, Tuple[str, float]]
  step_s: Optional[float]
  peak_mib: Optional[float] = None


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
    peak_mib=read_peak_mib(run_dir),
  )


RUN_INFO = "ablate_run.json"  # written next to the run by this tool: {"peak_mib": ...}


def read_peak_mib(run_dir: str) -> Optional[float]:
  """The peak resident memory this tool recorded for the run's training, or None."""
  try:
    with open(os.path.join(run_dir, RUN_INFO), encoding="utf-8") as f:
      value = json.load(f).get("peak_mib")
  except (OSError, ValueError, AttributeError):
    return None
  return float(value) if isinstance(value, (int, float)) else None


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


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean over seeds and its standard error (None with fewer than two seeds).

  >>> e = estimate([40.0, 44.0, 48.0])
  >>> (e.mean, e.se, e.n)
  (44.0, 2.309401076758503, 3)
  """

  mean: float
  se: Optional[float]
  n: int


def estimate(values: Sequence[float]) -> Optional[Estimate]:
  """Mean and standard error (sample sd / sqrt(n)) of ``values``; None if empty."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None
  n = len(values)
  se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
  return Estimate(statistics.fmean(values), se, n)


def beyond_noise(a: Optional[Estimate], b: Optional[Estimate], z: float = 2.0) -> bool:
  """Whether ``a`` and ``b`` differ by more than ``z`` standard errors of the difference.

  The difference of two independent means has SE sqrt(se_a^2 + se_b^2). Without a
  standard error on both sides (a single seed) nothing is beyond noise.
  """
  if a is None or b is None or a.se is None or b.se is None:
    return False
  return abs(a.mean - b.mean) > z * math.hypot(a.se, b.se)


@dataclasses.dataclass
class MethodResult:
  """One table row: a method's estimates over its seeds.

  Attributes:
    tasks: task -> the primary metric over seeds.
    mean_primary: the mean primary metric over seeds.
    delta_m: Delta-m% over seeds (each seed against the baseline's seed-mean).
    step_s: the median over seeds of each run's median step time.
    seeds: how many seeds had an evaluation.
    peak_mib: the largest peak resident memory over seeds (MiB), or None.
  """

  tasks: Dict[str, Estimate]
  mean_primary: Optional[Estimate]
  delta_m: Optional[Estimate]
  step_s: Optional[float]
  seeds: int
  peak_mib: Optional[float] = None


def mean_summary(summaries: Sequence[RunSummary]) -> Optional[RunSummary]:
  """One RunSummary holding each task's mean over ``summaries`` (Delta-m's reference)."""
  if not summaries:
    return None
  values: Dict[str, List[float]] = {}
  names: Dict[str, str] = {}
  for s in summaries:
    for task, (metric, value) in s.primary.items():
      names.setdefault(task, metric)
      values.setdefault(task, []).append(value)
  primary = {t: (names[t], statistics.fmean(v)) for t, v in values.items()}
  return RunSummary(step=summaries[0].step, primary=primary, step_s=None)


def aggregate(
  summaries: Sequence[RunSummary], base: Optional[RunSummary]
) -> Optional[MethodResult]:
  """A method's row from its seeds' summaries; ``base`` is the baseline's seed-mean."""
  if not summaries:
    return None
  tasks = sorted({t for s in summaries for t in s.primary})
  times = [s.step_s for s in summaries if s.step_s is not None]
  peaks = [s.peak_mib for s in summaries if s.peak_mib is not None]
  return MethodResult(
    tasks={
      t: estimate([s.primary[t][1] for s in summaries if t in s.primary]) for t in tasks
    },
    mean_primary=estimate([mean_primary(s) for s in summaries]),
    delta_m=estimate([delta_m(s, base) for s in summaries]) if base else None,
    step_s=statistics.median(times) if times else None,
    peak_mib=max(peaks) if peaks else None,
    seeds=len(summaries),
  )


def _cell(e: Optional[Estimate], spec: str, mark: str = "", bold: bool = False) -> str:
  if e is None:
    return "n/a"
  digits = int(spec.rstrip("f")[-1])
  text = format(round(e.mean, digits) + 0.0, spec)  # + 0.0: never "-0.00"
  if e.se is not None:
    text += f" ± {e.se:{spec.lstrip('+')}}"
  text += mark
  return f"**{text}**" if bold else text


def _best(column: Sequence[Optional[Estimate]], lower: bool) -> Optional[int]:
  """Index of a column's best value, only when it beats every other beyond noise."""
  present = [(i, e) for i, e in enumerate(column) if e is not None]
  if len(present) < 2:
    return None
  order = sorted(present, key=lambda p: p[1].mean, reverse=not lower)
  best_i, best = order[0]
  return best_i if all(beyond_noise(best, e) for _, e in order[1:]) else None


def _marks(
  column: Sequence[Optional[Estimate]], base_row: Optional[int], lower: bool
) -> List[str]:
  """' ▲' / ' ▼' where a row is better / worse than the baseline beyond noise."""
  if base_row is None or column[base_row] is None:
    return [""] * len(column)
  base = column[base_row]
  marks = []
  for i, e in enumerate(column):
    if i == base_row or not beyond_noise(e, base):
      marks.append("")
    else:
      marks.append(" ▲" if (e.mean < base.mean) == lower else " ▼")
  return marks


def build_table(
  runs: Sequence[Tuple[str, Sequence[RunSummary]]],
  baseline: str = "sum",
  notes: Sequence[str] = (),
) -> str:
  """The markdown table of an ablation over seeds.

  Args:
    runs: (method name, the summaries of its evaluated seeds, maybe none), in row order.
    baseline: the method Delta-m% and the ▲/▼ marks are measured against.
    notes: lines printed above the table (e.g. the command that made it).

  Returns:
    Markdown: notes, the table (mean ± standard error over seeds; ▲/▼ where a
    method differs from the baseline by more than 2 SE of the difference; bold only
    for a best that beats every other row beyond noise), and a legend.
  """
  base = mean_summary(dict(runs).get(baseline, ()))
  results = [(name, aggregate(list(ss), base)) for name, ss in runs]
  done = [(name, r) for name, r in results if r is not None]
  tasks = sorted({t for _, r in done for t in r.tasks})
  metric_of = {}
  for _, ss in runs:
    for s in ss:
      for t, (m, _) in s.primary.items():
        metric_of.setdefault(t, m)
  base_row = next((i for i, (n, _) in enumerate(done) if n == baseline), None)
  columns = [
    ([r.tasks.get(t) for _, r in done], metric_of[t] in LOWER_IS_BETTER) for t in tasks
  ]
  columns += [
    ([r.mean_primary for _, r in done], False),
    ([r.delta_m for _, r in done], False),
  ]
  specs = [".1f"] * len(tasks) + [".2f", "+.2f"]
  cells = [[] for _ in done]
  for (column, lower), spec in zip(columns, specs):
    best, marks = _best(column, lower), _marks(column, base_row, lower)
    for i, e in enumerate(column):
      cells[i].append(_cell(e, spec, marks[i], bold=i == best))
  header = (
    ["method", "seeds"]
    + tasks
    + ["mean primary", f"Δm% vs {baseline}", "step (s)", "peak RSS (MiB)"]
  )
  out = list(notes) + ([""] if notes else [])
  out.append("| " + " | ".join(header) + " |")
  out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
  rows = iter(zip(done, cells))
  for name, r in results:
    if r is None:
      out.append(
        "| " + " | ".join([f"{name} (no eval)"] + ["—"] * (len(header) - 1)) + " |"
      )
      continue
    _, row_cells = next(rows)
    out.append(
      "| "
      + " | ".join(
        [name, str(r.seeds)]
        + row_cells
        + [_fmt(r.step_s, ".3f"), _fmt(r.peak_mib, ".0f")]
      )
      + " |"
    )
  if tasks:
    out += ["", _legend(tasks, metric_of, baseline, done)]
  return "\n".join(out) + "\n"


def _legend(tasks, metric_of, baseline: str, done) -> str:
  seeds = sorted({r.seeds for _, r in done})
  text = (
    "Task columns: each task's primary metric on its eval split ("
    + ", ".join(f"{t}: {metric_of[t]}" for t in tasks)
    + "). Cells: mean ± standard error over seeds. "
    f"Δm%: mean relative change per task vs `{baseline}`'s seed-mean, sign-adjusted "
    "(Maninis et al. 2019), one value per seed. "
    f"▲/▼: better/worse than `{baseline}` by more than 2 standard errors of the "
    "difference; no mark: within noise. Bold: a column's best only when it beats every "
    "other row beyond noise. Step: median seconds per training step. Peak RSS: the "
    "training process's peak resident memory, the largest over seeds."
  )
  if seeds and seeds[0] < 2:
    text += " A single seed has no noise estimate: nothing is marked or bold for it."
  return text


# ------------------------------------------------------------------ the runs


def available_methods() -> List[str]:
  names = sorted(f[:-4] for f in os.listdir(MTL_DIR) if f.endswith(".gin"))
  return [m for m in ORDER if m in names] + [m for m in names if m not in ORDER]


GIN_DIR = os.path.join(REPO, "gin_configs")


def method_gin_files(method: str) -> List[str]:
  """The gin files of a ``--methods`` entry: ``pcgrad+adapters/lora`` is
  gin_configs/mtl/pcgrad.gin then gin_configs/adapters/lora.gin."""
  name, *more = method.split("+")
  return [os.path.join(MTL_DIR, name + ".gin")] + [
    os.path.join(GIN_DIR, m + ".gin") for m in more
  ]


def choose_methods(spec: Optional[str]) -> List[str]:
  """``--methods`` as a list (default: every gin file but those needing settings)."""
  known = available_methods()
  if not spec:
    return [m for m in known if m not in NEEDS_SETTINGS]
  methods = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in methods if m.split("+")[0] not in known]
  if unknown:
    raise AblateError(
      f"Unknown method(s) {', '.join(unknown)} in --methods; choose from "
      f"{', '.join(known)} (the files in gin_configs/mtl/)."
    )
  for m in methods:
    missing = [f for f in method_gin_files(m)[1:] if not os.path.exists(f)]
    if missing:
      raise AblateError(
        f"--methods entry {m!r} names {os.path.relpath(missing[0], REPO)}, which does "
        "not exist; after '+' give gin files under gin_configs/ without '.gin' "
        "(e.g. pcgrad+adapters/lora)."
      )
  return methods


def _resolve_gin(path: str) -> str:
  """An absolute path when the file exists from here; else as given (gin search path)."""
  return os.path.abspath(path) if os.path.exists(path) else path


def run_dir_of(out: str, method: str, seed: int) -> str:
  """``<out>/<method>/seed_<seed>``: one MODEL_DIR per (method, seed) ('/' in a
  method's gin names becomes '.')."""
  return os.path.join(os.path.abspath(out), method_dir(method), f"seed_{seed}")


def method_dir(method: str) -> str:
  """The folder name of a method's runs (``pcgrad+adapters/lora``: pcgrad+adapters.lora)."""
  return method.replace("/", ".")


def commands(
  method: str, seed: int, run_dir: str, args, extra: Sequence[str]
) -> Tuple[list, list]:
  """The ``mtx train`` and ``mtx eval`` command lines of one (method, seed).

  ``train.seed`` sets the initialization, dropout and (``train.data_seed`` being None)
  the data order; evaluation is deterministic.
  """
  gin_files = [f"--gin_file={_resolve_gin(f)}" for f in args.gin_file]
  gin_files += [f"--gin_file={f}" for f in method_gin_files(method)]
  if os.path.exists(EVAL_GIN):
    gin_files.append(f"--gin_file={EVAL_GIN}")
  log_period = args.log_period or max(1, min(100, args.steps // 10))
  common = gin_files + [
    f"--gin.MODEL_DIR='{run_dir}'",
    f"--gin.TRAIN_STEPS={args.steps}",
    f"--gin.LOG_PERIOD={log_period}",
    # A few checkpoints, so that --resume continues an interrupted run.
    f"--gin.CHECKPOINT_PERIOD={max(1, args.steps // 4)}",
    f"--gin.train.seed={seed}",
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


def _subprocess_env() -> Dict[str, str]:
  """The environment of the runs: this checkout first on PYTHONPATH (its mtx, mixtures)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  return env


def run_method(method: str, seed: int, args, extra: Sequence[str]) -> Optional[str]:
  """Trains and evaluates one (method, seed); returns an error line, or None."""
  run_dir = run_dir_of(args.out, method, seed)
  label = f"{method} seed {seed}"
  if finished(run_dir, args.steps) and args.resume:
    print(f"[ablate] {label}: done already, skipped (--resume)", flush=True)
    return None
  if os.path.isdir(run_dir) and os.listdir(run_dir) and not args.resume:
    raise AblateError(
      f"{run_dir} already holds a run; pass --resume to reuse it or choose another --out."
    )
  os.makedirs(run_dir, exist_ok=True)
  log_path = os.path.join(
    os.path.abspath(args.out), "logs", f"{method_dir(method)}-seed_{seed}.log"
  )
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  train, evaluate = commands(method, seed, run_dir, args, extra)
  t0 = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    for what, cmd in (("train", train), ("eval", evaluate)):
      if what == "eval" and finished(run_dir, args.steps):
        break  # the trainer evaluated its last step itself
      log.write("$ " + " ".join(cmd) + "\n")
      log.flush()
      status, peak_mib = run_measured(cmd, log)
      if what == "train":
        write_text(os.path.join(run_dir, RUN_INFO), json.dumps({"peak_mib": peak_mib}))
      if status != 0:
        return f"{what} failed with status {status}; see {log_path}"
  if not finished(run_dir, args.steps):
    return f"no eval/step_{args.steps}.json was written; see {log_path}"
  print(f"[ablate] {label}: done in {time.time() - t0:.0f} s", flush=True)
  return None


def run_measured(cmd: Sequence[str], log) -> Tuple[int, float]:
  """Runs ``cmd`` from the repository, output to ``log``: (exit status, the process's
  peak resident memory in MiB, from ``os.wait4``'s rusage, children included)."""
  proc = subprocess.Popen(
    list(cmd), cwd=REPO, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT
  )
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_maxrss / 1024.0  # KiB on Linux


def write_text(path: str, text: str) -> None:
  """Writes a file whole or not at all (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def collect(out: str, method: str) -> List[RunSummary]:
  """The summaries of every evaluated ``<out>/<method>/seed_*`` run, by seed."""
  d = os.path.join(os.path.abspath(out), method_dir(method))
  if not os.path.isdir(d):
    return []
  seeds = sorted(
    int(m.group(1)) for m in map(re.compile(r"^seed_(\d+)$").match, os.listdir(d)) if m
  )
  found = [summarize(os.path.join(d, f"seed_{s}")) for s in seeds]
  return [s for s in found if s is not None]


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
  p.add_argument(
    "--seeds",
    type=int,
    default=DEFAULT_SEEDS,
    help="seeds per method, train.seed = 0..N-1 (default %(default)s)",
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


def _notes(args, extra: Sequence[str]) -> List[str]:
  gin_names = " ".join(
    f"--gin_file={os.path.relpath(f, REPO) if os.path.isabs(f) else f}"
    for f in args.gin_file
  )
  return [
    f"Ablation: {args.steps} steps per run from `{gin_names}` + "
    f"`gin_configs/mtl/<method>.gin`, seeds (`train.seed`) 0..{args.seeds - 1}"
    + (
      f", eval on the first {args.eval_max_examples} examples of each task"
      if args.eval_max_examples
      else ", eval on every example"
    )
    + (f", extra flags `{' '.join(extra)}`" if extra else "")
    + "."
  ]


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = [a for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  try:
    if args.steps <= 0:
      raise AblateError(f"--steps must be positive (got {args.steps}).")
    if args.seeds <= 0:
      raise AblateError(f"--seeds must be positive (got {args.seeds}).")
    args.gin_file = args.gin_file or [os.path.join(REPO, "gin_configs", "demo.gin")]
    methods = choose_methods(args.methods)
    if args.baseline not in methods:
      print(
        f"[ablate] note: the baseline '{args.baseline}' is not among the methods; "
        "Delta-m% is left out unless its runs exist in --out.",
        flush=True,
      )
    errors = {}
    if not args.table_only:
      # Seed-major: after every full pass over the methods the table is comparable.
      for seed in range(args.seeds):
        for method in methods:
          error = run_method(method, seed, args, extra)
          if error:
            errors[(method, seed)] = error
            print(f"[ablate] {method} seed {seed}: {error}", file=sys.stderr, flush=True)
    out = os.path.abspath(args.out)
    names = methods if args.baseline in methods else [args.baseline] + methods
    runs = [
      (m, collect(out, m))
      for m in names
      if m in methods or os.path.isdir(os.path.join(out, method_dir(m)))
    ]
    table = build_table(runs, args.baseline, _notes(args, extra))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ablation.md")
    write_text(path, table)
    print(table, flush=True)
    print(f"[ablate] wrote {path}", flush=True)
    return 1 if errors else 0
  except AblateError as e:
    print(f"ablate: error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  sys.exit(main())
