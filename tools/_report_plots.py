"""The figures of tools/report.py (matplotlib, Agg backend; imported only when needed).

Every ``plot_*`` function writes one PNG and returns None, or writes nothing and
returns the reason (one sentence) when the run has no data for that figure. Tasks are
told apart by colour, line style and marker together, so the figures stay readable in
grey and for colour-blind readers.
"""

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
import _report_runs as runs_lib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker

# pylint: enable=g-import-not-at-top,wrong-import-position

DPI = 110
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_MAX_PANELS = 36  # small multiples shown per figure
_MAX_LEGEND_ROWS = 24

plt.rcParams.update(
  {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
  }
)


def style(i: int, n: int) -> dict:
  """Colour, line style and marker of the i-th of n lines."""
  palette = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
  return {
    "color": palette[i % len(palette)],
    "linestyle": _STYLES[i % len(_STYLES)],
    "marker": _MARKERS[i % len(_MARKERS)],
  }


def _names(run) -> List[str]:
  """The run's tasks then its other groups: the order that fixes each one's style."""
  return runs_lib.union(run.tasks, run.groups)


def _task_style_of(run, name: str) -> dict:
  names = _names(run)
  return style(names.index(name), len(names))


def _task_line(ax, run, name: str, x, y, label: Optional[str] = None, **kw):
  """Plots a task's (or group's) curve in the same style in every figure of a run."""
  names = _names(run)
  return _line(ax, x, y, names.index(name), len(names), label or name, **kw)


def _line(ax, x, y, i: int, n: int, label: str, **kw):
  """Plots y over x with the i-th style; markers on ~6 points (all if few)."""
  st = style(i, n)
  every = max(1, len(x) // 6)
  kw = {"linewidth": 1.5, "markersize": 4, "markevery": (i % every, every), **st, **kw}
  if len(x) == 1:
    kw["markersize"] = 6
  return ax.plot(x, y, label=label, **kw)


def ema(y: np.ndarray, weight: float) -> np.ndarray:
  """Exponential moving average (TensorBoard's smoothing), skipping NaN."""
  if weight <= 0 or len(y) < 2:
    return y
  out = np.array(y, dtype=float)
  acc, norm = 0.0, 0.0
  for i, v in enumerate(y):
    if np.isfinite(v):
      acc = weight * acc + (1 - weight) * v
      norm = weight * norm + (1 - weight)
    out[i] = acc / norm if norm > 0 else np.nan
  return out


def _use_log(values: Sequence[np.ndarray]) -> bool:
  """Log-y when all values are positive and span more than a factor 8."""
  flat = np.concatenate([v[np.isfinite(v)] for v in values] or [np.zeros(0)])
  return bool(flat.size) and flat.min() > 0 and flat.max() / flat.min() > 8


def _log_y(ax) -> None:
  """Log-scale y with plain tick labels at 1, 2, 5 x 10^k (readable without exponents)."""
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _legend_outside(ax, n: int, title: Optional[str] = None):
  ax.legend(
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
    frameon=False,
    title=title,
    ncol=max(1, math.ceil(n / _MAX_LEGEND_ROWS)),
  )


def _save(fig, path: str) -> None:
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def _steps_axis(ax) -> None:
  ax.set_xlabel("training step")
  ax.xaxis.get_major_locator().set_params(integer=True)


# ---- one run ---------------------------------------------------------------------------


def plot_train_loss(run, path: str, smooth: float = 0.0) -> Optional[str]:
  """Per-task training loss over steps, with the overall loss in black."""
  curves = [(t, *run.series(f"loss/{t}")) for t in run.tasks]
  curves = [(t, x, y) for t, x, y in curves if np.isfinite(y).any()]
  total = run.series("loss")
  if not curves and not np.isfinite(total[1]).any():
    return "no training loss logged yet."
  fig, ax = plt.subplots(figsize=(8.5, 4.6))
  n = len(curves)
  for t, x, y in curves:
    _task_line(ax, run, t, x, ema(y, smooth))
  if np.isfinite(total[1]).any():
    ax.plot(
      total[0],
      ema(total[1], smooth),
      color="black",
      linewidth=2.4,
      alpha=0.75,
      label="all tasks",
      zorder=5,
      marker="o" if len(total[0]) == 1 else None,
    )
  if _use_log([y for _, _, y in curves] + [total[1]]):
    _log_y(ax)
  _steps_axis(ax)
  ax.set_ylabel("training loss (nats/token)")
  smooth_note = f", EMA {smooth:g}" if smooth > 0 else ""
  ax.set_title(
    f"{run.label}: training loss per task (mean over each log period{smooth_note})"
  )
  _legend_outside(ax, n + 1, "task")
  _save(fig, path)
  return None


def plot_eval(run, path: str) -> Optional[str]:
  """Per-task primary eval metric (+ their mean) and eval loss over steps, and delta_m;
  bars of the one evaluation when there is only one."""
  # long: one figure's panels, drawn in order; the formatter's one argument per line
  # makes it long, and its pieces share the figure's axes.
  tasks = [t for t in run.tasks if t in run.eval_metrics]
  prim = [(t, run.primary.get(t)) for t in tasks]
  prim = [(t, m, *run.series(f"eval/{t}/{m}")) for t, m in prim if m and m != "loss"]
  prim = [c for c in prim if len(c[2])]
  losses = [(t, *run.series(f"eval/{t}/loss")) for t in tasks]
  losses = [c for c in losses if len(c[1])]
  mean = run.series("eval/mean_primary")
  delta = run.series("eval/delta_m")
  if not prim and not losses and not len(mean[0]):
    return (
      "no eval results yet (train with EVAL_PERIOD > 0 or run mtx eval to write "
      "eval lines)."
    )
  steps = sorted(
    {int(s) for c in prim for s in c[2]}
    | {int(s) for c in losses for s in c[1]}
    | set(mean[0].tolist())
  )
  if len(steps) == 1:
    return _plot_eval_bars(run, path, steps[0], prim, losses)
  panels = [
    p
    for p, ok in (
      ("prim", prim or len(mean[0])),
      ("loss", losses),
      ("delta", np.isfinite(delta[1]).any()),
    )
    if ok
  ]
  fig, axes = plt.subplots(
    1,
    len(panels),
    figsize=(4.6 * len(panels) + 2.2, 4.2),
    squeeze=False,
    layout="constrained",
  )
  for ax, panel in zip(axes[0], panels):
    if panel == "prim":
      for t, m, x, y in prim:
        _task_line(ax, run, t, x, y, f"{t} ({m})")
      if len(mean[0]):
        ax.plot(
          mean[0],
          mean[1],
          color="black",
          linewidth=2.4,
          alpha=0.75,
          label="mean of primaries",
          zorder=5,
          marker="o",
        )
      ax.set_ylabel("primary metric (%)")
      ax.set_title("primary metric per task")
    elif panel == "loss":
      for t, x, y in losses:
        _task_line(ax, run, t, x, y, t if not prim else f"_{t}")  # "_": no legend twice
      if _use_log([y for _, _, y in losses]):
        _log_y(ax)
      ax.set_ylabel("eval loss (teacher-forced, nats/token)")
      ax.set_title("eval loss per task")
    else:
      ax.plot(delta[0], delta[1], color="black", marker="o")
      ax.axhline(0.0, color="grey", linewidth=0.8)
      ax.set_ylabel("Δm (% vs baseline, higher is better)")
      ax.set_title("Δm against the baseline")
    _steps_axis(ax)
  fig.legend(
    loc="outside right upper",
    frameon=False,
    title="task (primary metric)" if prim else "task",
  )
  fig.suptitle(
    f"{run.label}: evaluation (colours are tasks in every panel)",
    x=0.02,
    ha="left",
    fontsize=11,
  )
  _save(fig, path)
  return None


def _plot_eval_bars(run, path: str, step: int, prim, losses) -> None:
  """The one evaluation of a run: bars per task of its primary metric and eval loss."""
  panels = [
    ("primary metric (%)", [(t, f"{t} ({m})", y[-1]) for t, m, _, y in prim]),
    ("eval loss (teacher-forced, nats/token)", [(t, t, y[-1]) for t, _, y in losses]),
  ]
  panels = [p for p in panels if p[1]]
  k = max(len(p[1]) for p in panels)
  fig, axes = plt.subplots(
    1,
    len(panels),
    figsize=(5.6 * len(panels), 1.2 + 0.36 * k),
    squeeze=False,
    layout="constrained",
  )
  for ax, (xlabel, bars) in zip(axes[0], panels):
    ypos = np.arange(len(bars))[::-1]
    vals = np.array([v for _, _, v in bars])
    for yp, (t, _, v) in zip(ypos, bars):
      st = _task_style_of(run, t)
      ax.barh(yp, 0 if not np.isfinite(v) else v, color=st["color"], alpha=0.85)
      ax.text(
        v if np.isfinite(v) else 0,
        yp,
        f" {v:.2f}" if "%" in xlabel else f" {v:.3g}",
        va="center",
        fontsize=8,
      )
    ax.set_yticks(ypos)
    ax.set_yticklabels([label for _, label, _ in bars])
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", visible=False)
    fin = vals[np.isfinite(vals)]
    if fin.size:
      ax.set_xlim(0, max(fin.max() * 1.15, 1e-9))
  summary = (run.last_eval or {}).get("summary", {})
  extra = ""
  if np.isfinite(summary.get("mean_primary", np.nan)):
    extra += f"; mean primary {summary['mean_primary']:.2f}"
  if np.isfinite(summary.get("delta_m", np.nan)):
    extra += f"; Δm {summary['delta_m']:+.2f}% vs baseline"
  fig.suptitle(
    f"{run.label}: evaluation at step {step}{extra}", x=0.02, ha="left", fontsize=11
  )
  _save(fig, path)


def _no_grad_cos(run) -> str:
  if not run.records:
    return "no metrics logged yet."
  return (
    "no pairwise gradient cosines logged: this method needs one gradient only "
    "(a plain or weighted sum); methods with per-task gradients (pcgrad, mgda, "
    "cagrad, ...) log them."
  )


def _nice_ceil(v: float) -> float:
  """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v."""
  if not v > 0:
    return 1.0
  e = math.floor(math.log10(v))
  for m in (1.0, 2.0, 2.5, 5.0, 10.0):
    if m * 10**e >= v * (1 - 1e-9):
      return m * 10**e
  return 10.0 ** (e + 1)


def _cos_limit(mats: Sequence[np.ndarray], percentile: float = 100.0) -> float:
  """Symmetric colour limit: a percentile of |off-diagonal cosines|, rounded up to a
  nice number in [0.001, 1], so that small cosines still show colour."""
  off = [m[~np.eye(len(m), dtype=bool)] for m in mats]
  off = np.abs(np.concatenate(off)) if off else np.zeros(0)
  off = off[np.isfinite(off)]
  lim = float(np.percentile(off, percentile)) if off.size else 1.0
  return min(1.0, max(1e-3, _nice_ceil(lim)))


def _cos_text(v: float, lim: float) -> str:
  """A cosine with enough decimals for the colour scale, never "-0.00"."""
  if not np.isfinite(v):
    return "n/a"
  digits = max(2, 1 - math.floor(math.log10(lim)))
  text = f"{v:.{digits}f}"
  return text[1:] if text.startswith("-") and float(text) == 0 else text


def _heatmap(
  ax, m: np.ndarray, names: Sequence[str], lim: float, annotate: bool, ticks: bool = True
):
  """A task x task cosine map, diverging colours centred at 0, diagonal in grey."""
  masked = np.ma.masked_where(np.eye(len(m), dtype=bool) | ~np.isfinite(m), m)
  cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
  im = ax.imshow(
    masked, cmap=cmap, norm=mcolors.Normalize(-lim, lim), interpolation="nearest"
  )
  ax.grid(False)
  ax.set_xticks(range(len(names)))
  ax.set_yticks(range(len(names)))
  if ticks:
    ax.set_xticklabels(
      names, rotation=40 if annotate else 90, ha="right" if annotate else "center"
    )
    ax.set_yticklabels(names)
  else:
    ax.set_xticklabels([])
    ax.set_yticklabels([])
  if annotate:
    for i in range(len(m)):
      for j in range(len(m)):
        if i == j:
          continue
        v = m[i, j]
        text = _cos_text(v, lim)
        dark = np.isfinite(v) and abs(v) > 0.6 * lim
        ax.text(
          j,
          i,
          text,
          ha="center",
          va="center",
          fontsize=8,
          color="white" if dark else "black",
        )
  return im


def plot_grad_cos_heatmap(run, path: str) -> Optional[str]:
  """Gradient cosines of every pair of tasks (groups) at the last step that logged them."""
  steps = run.grad_cos_steps()
  if not steps or len(run.groups) < 2:
    return _no_grad_cos(run)
  step = steps[-1]
  m = run.grad_cos(step)
  k = len(run.groups)
  size = min(11.0, 3.2 + 0.55 * k)
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  lim = _cos_limit([m])
  im = _heatmap(ax, m, run.groups, lim, annotate=k <= 10)
  cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  cb.set_label("cosine of the two task gradients  (red: conflict, blue: agreement)")
  ax.set_title(
    f"{run.label}: gradient cosine at step {step}\n(mean over the log period; "
    f"colour scale ±{lim:g})"
  )
  ax.set_xlabel("task" if run.groups == run.tasks else "task group")
  ax.set_ylabel("task" if run.groups == run.tasks else "task group")
  _save(fig, path)
  return None


def plot_grad_cos_strip(run, path: str, max_panels: int = 6) -> Optional[str]:
  """Small multiples of the cosine heatmap at up to ``max_panels`` evenly spaced steps."""
  steps = run.grad_cos_steps()
  if not steps or len(run.groups) < 2:
    return _no_grad_cos(run)
  if len(steps) < 2:
    return "gradient cosines were logged at one step only (see the heatmap above)."
  idx = np.unique(np.linspace(0, len(steps) - 1, min(max_panels, len(steps))).round())
  chosen = [steps[int(i)] for i in idx]
  mats = [run.grad_cos(s) for s in chosen]
  lim = _cos_limit(mats, percentile=98)
  clipped = any(
    np.nanmax(np.abs(np.where(np.eye(len(m), dtype=bool), 0, m))) > lim for m in mats
  )
  k = len(run.groups)
  n = len(chosen)
  fig, axes = plt.subplots(1, n, figsize=(2.3 * n + 2.4, 2.9), squeeze=False)
  for c, (ax, s, m) in enumerate(zip(axes[0], chosen, mats)):
    im = _heatmap(ax, m, run.groups, lim, annotate=k <= 4, ticks=(c == 0 and k <= 12))
    ax.set_title(f"step {s}")
  cb = fig.colorbar(
    im, ax=list(axes[0]), fraction=0.02, pad=0.02, extend="both" if clipped else "neither"
  )
  cb.set_label("gradient cosine")
  fig.suptitle(
    f"{run.label}: gradient cosine over training (tasks in the heatmap's "
    f"order; scale ±{lim:g}" + (", larger values clipped" if clipped else "") + ")",
    x=0.02,
    ha="left",
    fontsize=10,
  )
  _save(fig, path)
  return None


def plot_grad_cos_lines(run, path: str) -> Optional[str]:
  """Pairwise cosines over steps (all pairs if <= 10, else a band and the extremes),
  the fraction of conflicting pairs, and per-task gradient norms."""
  steps = run.grad_cos_steps()
  if not steps or len(run.groups) < 2:
    return _no_grad_cos(run)
  g = run.groups
  pairs = [(a, b) for i, a in enumerate(g) for b in g[i + 1 :]]
  x = np.asarray(steps)
  cos = np.stack([run.grad_cos(s)[np.triu_indices(len(g), 1)] for s in steps], axis=1)
  conflict = run.series("conflict_frac")
  norms = [(name, *run.series(f"grad_norm/{name}")) for name in g]
  norms = [c for c in norms if np.isfinite(c[2]).any()]
  rows = 1 + bool(len(conflict[0])) + bool(norms)
  fig, axes = plt.subplots(
    rows, 1, figsize=(8.5, 3.0 * rows + 0.4), sharex=True, squeeze=False
  )
  axes = list(axes[:, 0])
  ax = axes.pop(0)
  if len(pairs) <= 10:
    for i, (a, b) in enumerate(pairs):
      _line(ax, x, cos[i], i, len(pairs), f"{a} · {b}")
    _legend_outside(ax, len(pairs), "pair")
  else:
    with np.errstate(all="ignore"):
      lo, hi = np.nanmin(cos, 0), np.nanmax(cos, 0)
      p25, p75 = np.nanpercentile(cos, 25, 0), np.nanpercentile(cos, 75, 0)
      mid = np.nanmean(cos, 0)
    ax.fill_between(x, lo, hi, color="grey", alpha=0.18, label="min–max over pairs")
    ax.fill_between(x, p25, p75, color="grey", alpha=0.35, label="25–75th percentile")
    ax.plot(x, mid, color="black", linewidth=2, label="mean over pairs")
    last = np.where(np.isfinite(cos[:, -1]), cos[:, -1], np.inf)
    worst = [int(i) for i in np.argsort(last)[:4] if np.isfinite(last[i])]
    for j, i in enumerate(worst):
      a, b = pairs[i]
      _line(ax, x, cos[i], j, 10, f"{a} · {b}", linewidth=1.0, alpha=0.85)
    _legend_outside(ax, 3 + len(worst), f"{len(pairs)} pairs; lowest at the end")
  ax.axhline(0.0, color="grey", linewidth=0.8)
  ax.set_ylabel("gradient cosine")
  ax.set_title(f"{run.label}: pairwise gradient cosine over training")
  if len(conflict[0]):
    ax = axes.pop(0)
    ax.plot(
      conflict[0],
      conflict[1],
      color="tab:red",
      markersize=3,
      marker="o" if len(conflict[0]) <= 40 else None,
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("conflicting pairs\n(fraction with cos < 0)")
  if norms:
    ax = axes.pop(0)
    for i, (name, xs, ys) in enumerate(norms):
      _task_line(ax, run, name, xs, ys)
    if _use_log([c[2] for c in norms]):
      _log_y(ax)
    ax.set_ylabel("gradient norm per task")
    _legend_outside(ax, len(norms), "task")
  _steps_axis(ax)
  fig.tight_layout()
  _save(fig, path)
  return None


def plot_weights(run, path: str) -> Optional[str]:
  """The mtl method's task weights (mtl/weight/<group>) over steps."""
  curves = [(name, *run.series(f"mtl/weight/{name}")) for name in run.groups]
  curves = [c for c in curves if np.isfinite(c[2]).any()]
  if not curves:
    return "no task weights logged (mtl/weight/<task>)."
  flat = [c[2][np.isfinite(c[2])] for c in curves]
  if all(np.ptp(v) <= 1e-6 * max(1.0, np.abs(v).max()) for v in flat):
    values = sorted({f"{v[0]:g}" for v in flat})
    what = (
      f"all {values[0]}"
      if len(values) == 1
      else ", ".join(f"{c[0]} {c[2][np.isfinite(c[2])][0]:g}" for c in curves)
    )
    return f"the task weights stay constant over training ({what}): nothing to plot."
  fig, ax = plt.subplots(figsize=(8.5, 4.2))
  for name, x, y in curves:
    _task_line(ax, run, name, x, y)
  _steps_axis(ax)
  ax.set_ylabel("task weight")
  ax.set_title(f"{run.label}: task weights of the mtl method")
  _legend_outside(ax, len(curves), "task")
  _save(fig, path)
  return None


def plot_dynamics(run, path: str) -> Optional[str]:
  """Step time, tokens/s, learning rate and global gradient norm over steps."""
  panels = [
    ("timing/step_s", "step time (s)"),
    ("timing/tokens_per_s", "tokens / s"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "gradient norm (global)"),
  ]
  data = [(label, *run.series(key)) for key, label in panels]
  if not any(np.isfinite(y).any() for _, _, y in data):
    return "no step time, throughput, learning rate or gradient norm logged."
  fig, axes = plt.subplots(2, 2, figsize=(9.5, 5.6), sharex=True)
  for ax, (label, x, y) in zip(axes.flat, data):
    if np.isfinite(y).any():
      ax.plot(x, y, color="tab:blue", marker="o" if len(x) <= 25 else None, markersize=3)
      fin = y[np.isfinite(y)]
      if label.startswith("step") or label.startswith("tokens"):
        ax.axhline(
          float(np.median(fin)),
          color="grey",
          linestyle="--",
          linewidth=0.9,
          label=f"median {np.median(fin):.4g}",
        )
        ax.legend(loc="best", frameon=False)
    else:
      ax.text(
        0.5,
        0.5,
        "not logged",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="grey",
      )
    ax.set_ylabel(label)
  for ax in axes[1]:
    _steps_axis(ax)
  fig.suptitle(
    f"{run.label}: speed and optimisation (means over each log period)",
    x=0.02,
    ha="left",
    fontsize=10,
  )
  fig.tight_layout()
  _save(fig, path)
  return None


# ---- several runs ----------------------------------------------------------------------


def _small_multiples(
  runs_,
  panels: List[Tuple[str, Callable]],
  path: str,
  title: str,
  ylabel: str,
  log_ok: bool,
) -> Optional[str]:
  """One panel per (name, run -> (x, y)), one line per run, a shared legend on top."""
  shown = panels[:_MAX_PANELS]
  have = [(name, [get(r) for r in runs_]) for name, get in shown]
  have = [(name, cs) for name, cs in have if any(len(c[0]) for c in cs)]
  if not have:
    return None
  ncol = min(4, len(have))
  nrow = math.ceil(len(have) / ncol)
  fig, axes = plt.subplots(
    nrow,
    ncol,
    figsize=(3.4 * ncol + 0.4, 2.6 * nrow + 0.8),
    squeeze=False,
    layout="constrained",
  )
  handles = []
  for ax, (name, cs) in zip(axes.flat, have):
    for i, (x, y) in enumerate(cs):
      if len(x):
        (h,) = _line(ax, x, y, i, len(runs_), runs_[i].label, linewidth=1.3)
        if len(handles) < len(runs_) and runs_[i].label not in [
          hh.get_label() for hh in handles
        ]:
          handles.append(h)
    if log_ok and _use_log([c[1] for c in cs]):
      _log_y(ax)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(have) :]:
    ax.set_visible(False)
  for ax in axes[-1]:
    ax.set_xlabel("training step")
  for ax in axes[:, 0]:
    ax.set_ylabel(ylabel)
  handles.sort(key=lambda h: [r.label for r in runs_].index(h.get_label()))
  # The title goes on the legend: constrained layout stacks a suptitle onto an outside
  # legend.
  title += f" (first {_MAX_PANELS} of {len(panels)})" if len(panels) > _MAX_PANELS else ""
  fig.legend(
    handles=handles,
    loc="outside upper center",
    ncol=min(len(handles), 6),
    frameon=False,
    title=title,
    title_fontsize=11,
    fontsize=9,
  )
  _save(fig, path)
  return "ok"


def plot_overlay_train_loss(runs_, path: str, smooth: float = 0.0) -> Optional[str]:
  """Training loss per task (and overall), one panel each, one line per run."""
  tasks = runs_lib.union(*[r.tasks for r in runs_])

  def get(key):
    def f(r):
      x, y = r.series(key)
      return x, ema(y, smooth)

    return f

  panels = [("all tasks", get("loss"))] + [(t, get(f"loss/{t}")) for t in tasks]
  if (
    _small_multiples(
      runs_,
      panels,
      path,
      "training loss per task, by run",
      "loss (nats/token)",
      log_ok=True,
    )
    is None
  ):
    return "none of the runs logged a training loss."
  return None


def plot_overlay_eval(runs_, path: str) -> Optional[str]:
  """Primary eval metric per task (and their mean), one panel each, one line per run."""
  tasks = runs_lib.union(
    *[[t for t in r.tasks if r.primary.get(t) not in (None, "loss")] for r in runs_]
  )

  def get(t):
    def f(r):
      m = r.primary.get(t)
      return r.series(f"eval/{t}/{m}") if m else (np.zeros(0), np.zeros(0))

    return f

  def metric(t):
    ms = sorted({r.primary[t] for r in runs_ if t in r.primary})
    return f"{t} ({'/'.join(ms)})"

  panels = [("mean of primaries", lambda r: r.series("eval/mean_primary"))]
  panels += [(metric(t), get(t)) for t in tasks]
  counts = [len({int(x) for _, g in panels for x in g(r)[0]}) for r in runs_]
  if max(counts) == 1:  # Points on a time axis say little: bars of the one eval.
    return _grouped_bars(runs_, panels, path)
  if (
    _small_multiples(
      runs_,
      panels,
      path,
      "eval: primary metric per task, by run",
      "metric (%)",
      log_ok=False,
    )
    is None
  ):
    return "none of the runs has eval results yet."
  return None


def _grouped_bars(runs_, panels, path: str) -> Optional[str]:
  """One group of horizontal bars per panel name (mean, then tasks), one bar per run."""
  names = [name for name, _ in panels]
  values = np.array([[_last(get(r)[1]) for r in runs_] for _, get in panels])
  n = len(runs_)
  height = 0.8 / n
  fig, ax = plt.subplots(figsize=(8.5, 1.0 + 0.3 * n * len(names)), layout="constrained")
  ypos = np.arange(len(names))[::-1]
  for i, r in enumerate(runs_):
    st = style(i, n)
    y = ypos + (n - 1 - 2 * i) * height / 2
    v = values[:, i]
    ax.barh(
      y,
      np.where(np.isfinite(v), v, 0),
      height=height * 0.92,
      color=st["color"],
      label=r.label if np.isfinite(v).any() else f"{r.label} (no eval)",
      alpha=0.85,
    )
    for yy, vv in zip(y, v):
      if np.isfinite(vv):
        ax.text(vv, yy, f" {vv:.2f}", va="center", fontsize=7)
  ax.set_yticks(ypos)
  ax.set_yticklabels(names)
  ax.grid(axis="y", visible=False)
  fin = values[np.isfinite(values)]
  ax.set_xlim(0, max(fin.max() * 1.12, 1e-9) if fin.size else 1)
  ax.set_xlabel("primary metric (%) at each run's newest eval")
  # Legend in run order, top to bottom as the bars are.
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="run")
  ax.set_title("eval: primary metric per task, by run")
  _save(fig, path)
  return None


def _last(y: np.ndarray) -> float:
  fin = y[np.isfinite(y)]
  return float(fin[-1]) if fin.size else math.nan


def plot_overlay_conflict(runs_, path: str) -> Optional[str]:
  """conflict_frac and mean pairwise cosine over steps, one line per run."""
  have = [r for r in runs_ if r.grad_cos_steps()]
  if not have:
    return "none of the runs logged gradient cosines."
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for i, r in enumerate(runs_):
    if r not in have:
      continue
    steps = r.grad_cos_steps()
    k = len(r.groups)
    with np.errstate(all="ignore"):
      mean = [np.nanmean(r.grad_cos(s)[np.triu_indices(k, 1)]) for s in steps]
    _line(axes[0], np.asarray(steps), np.asarray(mean), i, len(runs_), r.label)
    x, y = r.series("conflict_frac")
    _line(axes[1], x, y, i, len(runs_), r.label)
  axes[0].axhline(0.0, color="grey", linewidth=0.8)
  axes[0].set_ylabel("mean pairwise gradient cosine")
  axes[1].set_ylabel("conflicting pairs (fraction)")
  axes[1].set_ylim(-0.02, 1.02)
  for ax in axes:
    _steps_axis(ax)
  _legend_outside(axes[1], len(have), "run")
  fig.suptitle(
    "gradient conflict, by run (runs without per-task gradients are absent)",
    x=0.02,
    ha="left",
    fontsize=10,
  )
  fig.tight_layout()
  _save(fig, path)
  return None


def write_figure(
  make: Callable[[str], Optional[str]], out_dir: str, name: str
) -> Tuple[Optional[str], Optional[str]]:
  """Runs ``make(path)``; returns (file name, None) or (None, reason)."""
  path = os.path.join(out_dir, name)
  try:
    reason = make(path)
  except Exception as e:  # pylint: disable=broad-except
    plt.close("all")  # A figure that fails must not take the rest of the report down.
    return None, f"this figure failed ({type(e).__name__}: {e})."
  return (None, reason) if reason else (name, None)
