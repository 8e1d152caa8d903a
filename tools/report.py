"""PNG figures and one HTML page for one mtx run, or a side-by-side view of several.

    python tools/report.py /tmp/mtx_demo
    python tools/report.py runs/sum runs/pcgrad runs/uw --labels sum,pcgrad,uw --out /tmp/abl

It reads each MODEL_DIR's metrics.jsonl, eval/step_*.json, tasks.json and config.gin and
writes, into ``--out`` (default: the first run's MODEL_DIR/report/), ``index.html`` and
the PNGs it shows, side by side (the page refers to them by relative name, so the folder
can be moved or zipped as a whole; nothing is fetched from the network). Per run:

  r<i>_train_loss.png       training loss per task (log-y when the losses span > 8x)
  r<i>_eval.png             primary eval metric per task + their mean, eval loss and Δm
                            over steps (bars per task when the run has one eval)
  r<i>_grad_cos.png         task x task gradient cosine at the last logged step
  r<i>_grad_cos_strip.png   the same heatmap at up to 6 steps (its evolution)
  r<i>_grad_cos_lines.png   cosine per pair over steps, conflict_frac, per-task grad norm
  r<i>_weights.png          the mtl method's task weights over steps
  r<i>_dynamics.png         step time, tokens/s, learning rate, gradient norm

and for several runs a table of final numbers (best value per row highlighted) and
overlaid curves, one panel per task and one line per run: ``ablation_train_loss.png``,
``ablation_eval.png`` (grouped bars when each run has one eval) and
``ablation_conflict.png``. A figure whose data a run lacks (a plain-sum run logs no
gradient cosines; a run without evaluation has no eval figure) is replaced by a note.

A path that is not a run directory prints one sentence and exits with status 2.
matplotlib is needed (``pip install "mtx[report]"``); nothing else beyond mtx's own
dependencies (numpy).
"""

import argparse
import datetime
import html
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _p in (_REPO, _HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

# pylint: disable=g-import-not-at-top,wrong-import-position
import _report_runs as runs_lib
import numpy as np  # pylint: disable=g-import-not-at-top

from mtx.errors import UserError

# pylint: enable=g-import-not-at-top,wrong-import-position

_PLOTS_MISSING = (
  "tools/report.py needs matplotlib, which is not installed; run "
  'pip install "mtx[report]" (or pip install matplotlib) and try again.'
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="report",
    description="Writes PNG figures and an index.html for one or several mtx runs.",
  )
  p.add_argument(
    "model_dirs",
    nargs="+",
    metavar="MODEL_DIR",
    help="run directories (MODEL_DIR of mtx train); several for an ablation",
  )
  p.add_argument(
    "--out", default=None, help="output folder (default: FIRST_MODEL_DIR/report)"
  )
  p.add_argument(
    "--labels",
    default=None,
    help="comma-separated run names, one per MODEL_DIR (default: folder names)",
  )
  p.add_argument(
    "--smooth",
    type=float,
    default=0.0,
    help="EMA weight in [0, 1) for training-loss curves (0: none)",
  )
  return p


# ---- numbers ---------------------------------------------------------------------------


def fmt(v: Optional[float], kind: str = "g") -> str:
  """A table number: metrics in percent with 2 decimals, others with 4 significant digits."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, float) and math.isinf(v):
    return "inf" if v > 0 else "-inf"
  if kind == "pct":
    return f"{v:.2f}"
  if kind == "int":
    return f"{int(v)}"
  return f"{v:.4g}"


def _median(run, key: str) -> float:
  """Median of a timing series (the trainer's timing already leaves out compilation)."""
  _, y = run.series(key)
  y = y[np.isfinite(y)]
  return float(np.median(y)) if y.size else math.nan


# One table row: (label, kind, "min"/"max"/None, per-run values).
Row = Tuple[str, str, Optional[str], List[float]]


def comparison_rows(runs: Sequence[runs_lib.Run]) -> List[Row]:
  """The ablation table, as rows of per-run values: eval first, then training, then speed.

  Eval values are those of each run's newest eval; train losses the newest finite value
  of each task's loss; step time and tokens/s medians over the logged periods.
  """
  # long: the table's rows in the order they are shown, one short block each; the
  # formatter's one argument per line makes it long.
  tasks = runs_lib.union(*[r.tasks for r in runs])
  rows: List[Row] = []

  def ev(r, task, metric):
    if not r.last_eval:
      return math.nan
    return r.last_eval["tasks"].get(task, {}).get(metric, math.nan)

  for t in tasks:
    metrics = runs_lib.union(
      *[[r.primary[t]] for r in runs if r.primary.get(t) not in (None, "loss")]
    )  # loss: below
    for m in metrics:
      rows.append(
        (
          f"eval {t} {m}",
          "pct",
          "min" if runs_lib.is_lower_better(m) else "max",
          [ev(r, t, m) if r.primary.get(t) == m else math.nan for r in runs],
        )
      )
  summaries = [r.last_eval["summary"] if r.last_eval else {} for r in runs]
  if any("mean_primary" in s for s in summaries):
    rows.append(
      (
        "eval mean of primaries",
        "pct",
        "max",
        [s.get("mean_primary", math.nan) for s in summaries],
      )
    )
  if any(math.isfinite(s.get("delta_m", math.nan)) for s in summaries):
    rows.append(
      (
        "eval Δm % vs baseline",
        "pct",
        "max",
        [s.get("delta_m", math.nan) for s in summaries],
      )
    )
  if any(r.last_eval for r in runs):
    rows.append(
      (
        "eval step",
        "int",
        None,
        [r.last_eval["step"] if r.last_eval else math.nan for r in runs],
      )
    )
  for t in tasks:
    if any(r.last_eval and "loss" in r.last_eval["tasks"].get(t, {}) for r in runs):
      rows.append((f"eval loss {t}", "g", "min", [ev(r, t, "loss") for r in runs]))
  rows.append(
    ("final train loss (all tasks)", "g", "min", [r.last_finite("loss")[1] for r in runs])
  )
  for t in tasks:
    rows.append(
      (f"final train loss {t}", "g", "min", [r.last_finite(f"loss/{t}")[1] for r in runs])
    )
  rows.append(
    (
      "last logged step",
      "int",
      None,
      [r.last_step if r.last_step is not None else math.nan for r in runs],
    )
  )
  rows.append(
    ("step time (s, median)", "g", "min", [_median(r, "timing/step_s") for r in runs])
  )
  rows.append(
    ("tokens / s (median)", "g", "max", [_median(r, "timing/tokens_per_s") for r in runs])
  )
  return rows


def _best(values: Sequence[float], goal: Optional[str]) -> List[bool]:
  """Which cells hold the best finite value of the row (all ties; none if < 2 finite)."""
  fin = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  if goal is None or len(fin) < 2 or len(set(fin)) == 1:
    return [False] * len(values)
  best = min(fin) if goal == "min" else max(fin)
  return [isinstance(v, (int, float)) and math.isfinite(v) and v == best for v in values]


# ---- HTML ------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
     color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f4f4f4} td.best{background:#d7f0d7;font-weight:bold}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
.note{color:#666;font-style:italic;margin:2px 0 12px}
.warn{color:#a40}
figure{margin:8px 0 20px} figcaption{font-size:13px;color:#444}
"""


def _esc(s) -> str:
  return html.escape(str(s))


def _pre(lines: Sequence[str]) -> str:
  return f"<pre>{_esc(chr(10).join(lines))}</pre>" if lines else ""


def _table_html(runs: Sequence[runs_lib.Run], rows: Sequence[Row]) -> str:
  head = "".join(f"<th>{_esc(r.label)}</th>" for r in runs)
  out = [f'<table class="ablation"><tr><th>quantity</th>{head}</tr>']
  for label, kind, goal, values in rows:
    best = _best(values, goal)
    cells = "".join(
      f"<td{' class=best' if b else ''}>{_esc(fmt(v, kind))}</td>"
      for v, b in zip(values, best)
    )
    arrow = {"min": " ↓", "max": " ↑"}.get(goal, "")
    out.append(f"<tr><td>{_esc(label)}{arrow}</td>{cells}</tr>")
  out.append("</table>")
  return "\n".join(out)


def _eval_table_html(run: runs_lib.Run) -> str:
  """The newest eval of one run: task rows, metric columns (primary marked)."""
  ev = run.last_eval
  if not ev or not ev["tasks"]:
    return ""
  metrics = runs_lib.union(*[list(v) for v in ev["tasks"].values()])
  metrics = [m for m in metrics if m != "loss"] + (["loss"] if "loss" in metrics else [])
  out = [
    f"<h3>Eval at step {ev['step']}</h3><table><tr><th>task</th>"
    + "".join(f"<th>{_esc(m)}</th>" for m in metrics)
    + "</tr>"
  ]
  for t in [t for t in run.tasks if t in ev["tasks"]]:
    cells = []
    for m in metrics:
      v = ev["tasks"][t].get(m)
      mark = " *" if run.primary.get(t) == m else ""
      cells.append(f"<td>{_esc(fmt(v, 'g' if m == 'loss' else 'pct'))}{mark}</td>")
    out.append(f"<tr><td>{_esc(t)}</td>{''.join(cells)}</tr>")
  out.append("</table>")
  summary = ev["summary"]
  parts = [
    f"{k} = {fmt(summary[k], 'pct')}" for k in ("mean_primary", "delta_m") if k in summary
  ]
  out.append(
    '<p class="note">* the primary metric of the task'
    + (f"; {_esc(', '.join(parts))}" if parts else "")
    + ".</p>"
  )
  return "\n".join(out)


def _figure_html(name: Optional[str], reason: Optional[str], title: str) -> str:
  if name:
    return (
      f'<figure><img src="{_esc(name)}" alt="{_esc(title)}">'
      f"<figcaption>{_esc(title)}</figcaption></figure>"
    )
  return f'<h3>{_esc(title)}</h3><p class="note">Not drawn: {_esc(reason)}</p>'


def _run_header_html(run: runs_lib.Run) -> str:
  method, mtl_lines = runs_lib.mtl_summary(run.config)
  steps = runs_lib.train_steps(run.config)
  last = run.last_step
  progress = f"last logged step {last}" if last is not None else "no metrics logged yet"
  if last is not None and steps:
    progress += f" of TRAIN_STEPS = {steps}" + (
      " (in progress or stopped early)" if last < steps else ""
    )
  out = [
    f"<p><b>directory</b> {_esc(run.path)}<br><b>mixture</b> {_esc(run.mixture or '?')}"
    f" ({len(run.tasks)} tasks: {_esc(', '.join(run.tasks))})<br>"
    f"<b>mtl method</b> {_esc(method)}<br>{_esc(progress)}</p>"
  ]
  nonfinite = run.last_finite("nonfinite_steps")[1]
  if math.isfinite(nonfinite) and nonfinite > 0:
    out.append(
      f'<p class="warn">{int(nonfinite)} step(s) had a non-finite loss or '
      f"gradient (nonfinite_steps).</p>"
    )
  _, last_loss = run.series("loss")
  if last_loss.size and not np.isfinite(last_loss[-1]):
    out.append(
      '<p class="warn">The last logged loss is not finite: the run diverged.</p>'
    )
  for note in run.notes:
    out.append(f'<p class="warn">{_esc(note)}</p>')
  if mtl_lines:
    out.append("<h3>mtl configuration (config.gin)</h3>" + _pre(mtl_lines))
  model = runs_lib.model_summary(run.config)
  if model:
    out.append(
      "<details><summary>model, mixture and optimiser (config.gin)</summary>"
      + _pre(model)
      + "</details>"
    )
  if run.config_text:
    out.append(
      "<details><summary>the whole operative config.gin</summary>"
      f"<pre>{_esc(run.config_text)}</pre></details>"
    )
  return "\n".join(out)


def _run_figures(plots, run, i: int, out_dir: str, smooth: float, warn) -> List[str]:
  """Writes one run's PNGs; returns their HTML."""
  figures = [
    (
      "train_loss",
      "Training loss per task",
      lambda p: plots.plot_train_loss(run, p, smooth),
    ),
    (
      "eval",
      "Evaluation per task: primary metric, eval loss",
      lambda p: plots.plot_eval(run, p),
    ),
    (
      "grad_cos",
      "Gradient cosine between tasks, last logged step",
      lambda p: plots.plot_grad_cos_heatmap(run, p),
    ),
    (
      "grad_cos_strip",
      "Gradient cosine over training (heatmaps at several steps)",
      lambda p: plots.plot_grad_cos_strip(run, p),
    ),
    (
      "grad_cos_lines",
      "Gradient cosine per pair, conflicting fraction and per-task "
      "gradient norm over steps",
      lambda p: plots.plot_grad_cos_lines(run, p),
    ),
    ("weights", "Task weights of the mtl method", lambda p: plots.plot_weights(run, p)),
    (
      "dynamics",
      "Step time, throughput, learning rate and gradient norm",
      lambda p: plots.plot_dynamics(run, p),
    ),
  ]
  out = []
  for key, title, make in figures:
    name, reason = plots.write_figure(make, out_dir, f"r{i}_{key}.png")
    if reason and reason.startswith("this figure failed"):
      warn(f"{run.label}: {title}: {reason}")
    if key == "grad_cos_strip" and not name and reason and "one step" not in reason:
      continue  # Same reason as the heatmap: say it once.
    if (
      key == "grad_cos_lines" and not name and reason and reason.startswith("no pairwise")
    ):
      continue
    out.append(_figure_html(name, reason, title))
  return out


def build_report(
  runs: Sequence[runs_lib.Run], out_dir: str, smooth: float = 0.0, warn=lambda msg: None
) -> str:
  """Writes every figure and index.html into ``out_dir``; returns the HTML's path."""
  # long: the report's figures and page in the order they are shown, one call each;
  # the formatter's one argument per line makes it long.
  import _report_plots as plots  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  several = len(runs) > 1
  title = (
    f"mtx report: {runs[0].label}"
    if not several
    else f"mtx report: {len(runs)} runs ({', '.join(r.label for r in runs)})"
  )
  body = [
    f"<h1>{_esc(title)}</h1>",
    f'<p class="note">Written {datetime.datetime.now():%Y-%m-%d %H:%M} by '
    f"tools/report.py. Losses are token cross-entropy (nats/token), means over each "
    f"log period; eval metrics are in percent.</p>",
  ]
  if several:
    body.append("<h2>Ablation</h2>")
    body.append(
      "<h3>Side by side</h3>"
      '<p class="note">Best value of each row in green (↑ higher is better, '
      "↓ lower is better); – where a run has no value.</p>"
    )
    body.append(_table_html(runs, comparison_rows(runs)))
    methods = "".join(
      f'<tr><td><a href="#run{i}">{_esc(r.label)}</a></td>'
      f"<td>{_esc(runs_lib.mtl_summary(r.config)[0])}</td>"
      f"<td>{_esc(r.mixture or '?')}</td><td>{_esc(r.path)}</td></tr>"
      for i, r in enumerate(runs)
    )
    body.append(
      "<h3>Runs</h3><table><tr><th>run</th><th>mtl method</th><th>mixture</th>"
      f"<th>directory</th></tr>{methods}</table>"
    )
    for key, t, make in [
      (
        "ablation_train_loss",
        "Training loss per task, one line per run",
        lambda p: plots.plot_overlay_train_loss(runs, p, smooth),
      ),
      (
        "ablation_eval",
        "Primary eval metric per task, one line per run",
        lambda p: plots.plot_overlay_eval(runs, p),
      ),
      (
        "ablation_conflict",
        "Gradient conflict per run",
        lambda p: plots.plot_overlay_conflict(runs, p),
      ),
    ]:
      name, reason = plots.write_figure(make, out_dir, f"{key}.png")
      if reason and reason.startswith("this figure failed"):
        warn(f"{t}: {reason}")
      body.append(_figure_html(name, reason, t))
  for i, run in enumerate(runs):
    body.append(f'<h2 id="run{i}">{"Run: " if several else ""}{_esc(run.label)}</h2>')
    body.append(_run_header_html(run))
    body.append(_eval_table_html(run))
    body.extend(_run_figures(plots, run, i, out_dir, smooth, warn))
  page = (
    '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
    f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
    + "\n".join(b for b in body if b)
    + "\n</body></html>\n"
  )
  path = os.path.join(out_dir, "index.html")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(tmp, path)
  return path


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the tool; returns the exit status (2 for a mistake the user can fix)."""
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse already printed the usage and the problem.
    return int(e.code or 0)
  try:
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if not 0.0 <= args.smooth < 1.0:
      raise UserError(f"--smooth must be in [0, 1) (got {args.smooth}).")
    runs = runs_lib.ensure_runs(args.model_dirs, labels)
  except UserError as e:
    print(f"report: error: {e}", file=sys.stderr)
    return 2
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print(f"report: error: {_PLOTS_MISSING}", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join(runs[0].path, "report")
  warn = lambda msg: print(f"report: warning: {msg}", file=sys.stderr)
  path = build_report(runs, out_dir, args.smooth, warn)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
