"""Soak test: a long CPU run that must keep its memory flat and its step time steady.

    python tools/soak.py                       # 2,000 steps of the demo, ~15 min on 2 cores
    python tools/soak.py --steps 500 --out /tmp/soak.json

Runs ``mtx train --gin_file=gin_configs/demo.gin`` (the tiny model on the demo mixture)
in a subprocess with a checkpoint every ``--period`` steps, and evaluation every
``--period`` steps when this mtx has periodic evaluation (``mtx.eval.evaluator``).
Meanwhile it samples the trainer's resident memory (RSS, psutil) every ``--sample_s``
seconds; step times come from ``metrics.jsonl`` (``timing/step_s``, logged every
``--log_period`` steps).

Verdicts, after a warm-up (``--warmup`` steps: compilation, the first checkpoint and
evaluation, allocator growth):

* memory is flat when the largest RSS after the warm-up is within ``--rss_tolerance``
  (10%) of the RSS at the end of the warm-up; the least-squares slope (MiB per 1,000
  steps) is reported too;
* step time is steady when the median step time of every ``--period``-step window after
  the warm-up is within ``--time_tolerance`` (25%) of the median over all of them. Log
  lines that cover a checkpoint or evaluation step are left out of the windows (those
  are reported apart), so a window measures training steps;
* the same for CPU time per step (the trainer's user + system CPU seconds over each
  window's steps, checkpoints and evaluation included), which other processes on a
  shared machine barely move: wall-clock windows then show contention, CPU windows show
  whether the trainer itself slows down.

The full record (samples, windows, verdicts) goes to ``--out`` as JSON. Exit status: 0,
or 1 when the run failed (or, with ``--strict``, a verdict).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from mtx.runtime import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument(
    "--period", type=int, default=100, help="steps between checkpoints (and evaluations)"
  )
  p.add_argument("--log_period", type=int, default=10)
  p.add_argument("--warmup", type=int, default=200, help="steps left out of the verdicts")
  p.add_argument("--sample_s", type=float, default=1.0)
  p.add_argument("--rss_tolerance", type=float, default=0.10)
  p.add_argument("--time_tolerance", type=float, default=0.25)
  p.add_argument("--model_dir", default=None, help="default: a fresh temporary folder")
  p.add_argument("--out", default=None, help="JSON record; default MODEL_DIR/soak.json")
  p.add_argument(
    "--gin_file", action="append", default=None, help="default: gin_configs/demo.gin"
  )
  p.add_argument("--strict", action="store_true", help="exit 1 when a verdict fails")
  p.epilog = "Other --gin.NAME=VALUE flags go to the trainer unchanged."
  args, extra = p.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith("--gin")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.extra = extra
  return args


def trainer_command(args, model_dir: str, evaluate: bool) -> list:
  cmd = [sys.executable, "-m", "mtx", "train"]
  cmd += [f"--gin_file={f}" for f in (args.gin_file or ["gin_configs/demo.gin"])]
  cmd += [
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.TRAIN_STEPS={args.steps}",
    f"--gin.CHECKPOINT_PERIOD={args.period}",
    f"--gin.LOG_PERIOD={args.log_period}",
  ]
  if evaluate:
    cmd.append(f"--gin.EVAL_PERIOD={args.period}")
  return cmd + list(args.extra)


class MetricsTail:
  """Reads the lines appended to metrics.jsonl since the last call."""

  def __init__(self, path: str):
    self._path, self._offset, self.rows = path, 0, []

  def poll(self) -> list:
    if not os.path.exists(self._path):
      return self.rows
    with open(self._path, "rb") as f:
      f.seek(self._offset)
      data = f.read()
    end = data.rfind(b"\n") + 1  # Only whole lines.
    self._offset += end
    for line in data[:end].splitlines():
      try:
        self.rows.append(json.loads(line))
      except ValueError:
        pass
    return self.rows

  def last_step(self) -> int:
    steps = [r["step"] for r in self.rows if "loss" in r]
    return max(steps) if steps else 0


def _usage(proc: psutil.Process) -> tuple:
  """(resident bytes, user + system CPU seconds) of the process and its children."""
  procs = [proc] + proc.children(recursive=True)
  rss = cpu = 0
  for p in procs:
    try:
      with p.oneshot():
        rss += p.memory_info().rss
        times = p.cpu_times()
        cpu += times.user + times.system
    except psutil.Error:
      if p is proc:
        raise
  return rss, cpu


def run_and_sample(cmd: list, metrics_path: str, sample_s: float, log_path: str):
  """Runs the trainer; returns (status, [(seconds, step, rss bytes, cpu s)], rows)."""
  tail = MetricsTail(metrics_path)
  samples = []
  with open(log_path, "w", encoding="utf-8") as log:
    child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    start = time.time()
    while child.poll() is None:
      try:
        if proc.status() == psutil.STATUS_ZOMBIE:
          break
        rss, cpu = _usage(proc)
      except psutil.Error:
        break
      tail.poll()
      samples.append(
        (round(time.time() - start, 2), tail.last_step(), rss, round(cpu, 3))
      )
      time.sleep(sample_s)
    status = child.wait()
  return status, samples, tail.poll()


def rss_verdict(samples: list, warmup: int, tolerance: float) -> dict:
  """Flatness of RSS over the samples taken after step ``warmup``."""
  after = [(t, s, r) for t, s, r, _ in samples if s > warmup and r > 0]
  if len(after) < 3:
    return {"ok": None, "why": "too few samples after the warm-up"}
  reference = after[0][2]
  peak = max(r for _, _, r in after)
  steps = [s for _, s, _ in after]
  mib = [r / 2**20 for _, _, r in after]
  mean_s, mean_m = statistics.fmean(steps), statistics.fmean(mib)
  var = sum((s - mean_s) ** 2 for s in steps)
  slope = (
    sum((s - mean_s) * (m - mean_m) for s, m in zip(steps, mib)) / var if var > 0 else 0.0
  )
  growth = peak / reference - 1.0
  return {
    "ok": growth <= tolerance,
    "reference_mib": reference / 2**20,
    "peak_mib": peak / 2**20,
    "last_mib": after[-1][2] / 2**20,
    "min_mib": min(mib),
    "growth": growth,
    "tolerance": tolerance,
    "slope_mib_per_1000_steps": slope * 1000,
    "samples": len(after),
  }


def cpu_verdict(samples: list, warmup: int, period: int, tolerance: float) -> dict:
  """Steadiness of CPU seconds per step over ``period``-step windows after ``warmup``."""

  def at(step):  # (step, cpu) of the first sample at or past ``step``
    for _, s, _, cpu in samples:
      if s >= step:
        return s, cpu
    return None

  per_step = {}
  end = warmup + period
  while True:
    a, b = at(end - period), at(end)
    if a is None or b is None or b[0] <= a[0]:
      break
    per_step[end] = (b[1] - a[1]) / (b[0] - a[0])
    end += period
  if len(per_step) < 2:
    return {"ok": None, "why": "too few windows after the warm-up"}
  values = list(per_step.values())
  overall = statistics.median(values)
  worst = max(abs(v / overall - 1.0) for v in values)
  return {
    "ok": worst <= tolerance,
    "median_cpu_s_per_step": overall,
    "worst_window_deviation": worst,
    "tolerance": tolerance,
    "window_cv": statistics.pstdev(values) / statistics.fmean(values),
    "first_window_s": values[0],
    "last_window_s": values[-1],
    "window_cpu_s_per_step": per_step,
  }


def time_verdict(
  rows: list, warmup: int, period: int, log_period: int, tolerance: float
) -> dict:
  """Steadiness of the per-window median step time after step ``warmup``."""
  train_rows = [r for r in rows if "timing/step_s" in r and r["step"] > warmup]

  # A log line covers steps (step - log_period, step]; one that holds a checkpoint or
  # evaluation step measures that work too.
  def covers_period_step(step):
    return (step // period) != ((step - log_period) // period)

  plain = [r for r in train_rows if not covers_period_step(r["step"])]
  busy = [r["timing/step_s"] for r in train_rows if covers_period_step(r["step"])]
  windows = {}
  for r in plain:
    windows.setdefault((r["step"] - 1) // period, []).append(r["timing/step_s"])
  medians = {(w + 1) * period: statistics.median(v) for w, v in sorted(windows.items())}
  if len(medians) < 2:
    return {"ok": None, "why": "too few windows after the warm-up"}
  overall = statistics.median(medians.values())
  worst = max(abs(m / overall - 1.0) for m in medians.values())
  values = list(medians.values())
  return {
    "ok": worst <= tolerance,
    "median_step_s": overall,
    "worst_window_deviation": worst,
    "tolerance": tolerance,
    "window_cv": statistics.pstdev(values) / statistics.fmean(values),
    "first_window_s": values[0],
    "last_window_s": values[-1],
    "window_median_step_s": medians,
    "checkpoint_or_eval_lines_median_step_s": statistics.median(busy) if busy else None,
  }


def main(argv=None) -> int:
  args = _parse_args(argv)
  model_dir = args.model_dir or tempfile.mkdtemp(prefix="mtx_soak_")
  if os.path.exists(model_dir) and os.listdir(model_dir):
    print(
      f"soak: {model_dir} is not empty; give a fresh --model_dir (a soak run must "
      "start from step 0).",
      file=sys.stderr,
    )
    return 2
  os.makedirs(model_dir, exist_ok=True)
  evaluate = True  # soak the periodic evaluation too
  cmd = trainer_command(args, model_dir, evaluate)
  print("soak: running", " ".join(cmd), flush=True)
  start = time.time()
  status, samples, rows = run_and_sample(
    cmd,
    os.path.join(model_dir, "metrics.jsonl"),
    args.sample_s,
    os.path.join(model_dir, "soak_trainer.log"),
  )
  wall = time.time() - start
  record = {
    "command": cmd,
    "exit_status": status,
    "wall_s": wall,
    "steps": args.steps,
    "period": args.period,
    "warmup": args.warmup,
    "evaluation": evaluate,
    "eval_lines": sum(1 for r in rows if any(k.startswith("eval/") for k in r)),
    "checkpoints": sorted(int(p) for p in os.listdir(model_dir) if p.isdigit())
    if os.path.isdir(model_dir)
    else [],
    "load_average": os.getloadavg(),
    "cpus": os.cpu_count(),
    "rss": rss_verdict(samples, args.warmup, args.rss_tolerance),
    "step_time": time_verdict(
      rows, args.warmup, args.period, args.log_period, args.time_tolerance
    ),
    "cpu_time": cpu_verdict(samples, args.warmup, args.period, args.time_tolerance),
    "samples": samples,
  }
  out = args.out or os.path.join(model_dir, "soak.json")
  metrics_writer.write_atomically(out, json.dumps(record, indent=1))
  _print_summary(record, out)
  if status != 0:
    print(
      f"soak: the trainer exited with status {status}; see "
      f"{os.path.join(model_dir, 'soak_trainer.log')}",
      file=sys.stderr,
    )
    return 1
  verdicts = [record["rss"]["ok"], record["step_time"]["ok"], record["cpu_time"]["ok"]]
  return 1 if args.strict and not all(verdicts) else 0


def _print_summary(record: dict, out: str) -> None:
  rss, st = record["rss"], record["step_time"]
  print(
    f"soak: {record['steps']} steps in {record['wall_s']:.0f} s, exit status "
    f"{record['exit_status']}, checkpoints {len(record['checkpoints'])} kept, "
    f"evaluation {'requested' if record['evaluation'] else 'not available'} "
    f"({record['eval_lines']} eval lines in metrics.jsonl), load average "
    f"{record['load_average'][0]:.1f} on {record['cpus']} CPUs"
  )
  if rss.get("ok") is not None:
    print(
      f"  RSS after warm-up: {rss['reference_mib']:.0f} MiB -> peak "
      f"{rss['peak_mib']:.0f}, last {rss['last_mib']:.0f} (growth "
      f"{100 * rss['growth']:+.1f}%, slope {rss['slope_mib_per_1000_steps']:+.1f} "
      f"MiB/1000 steps): {'FLAT' if rss['ok'] else 'GROWS'}"
    )
  else:
    print(f"  RSS: {rss['why']}")
  if st.get("ok") is not None:
    print(
      f"  step time: median {1000 * st['median_step_s']:.1f} ms, first window "
      f"{1000 * st['first_window_s']:.1f} ms, last {1000 * st['last_window_s']:.1f} "
      f"ms, worst window {100 * st['worst_window_deviation']:.0f}% off, CV "
      f"{100 * st['window_cv']:.1f}%: {'STEADY' if st['ok'] else 'UNSTEADY'}"
    )
    print(
      "  window medians (ms): "
      + ", ".join(f"{k}: {1000 * v:.1f}" for k, v in st["window_median_step_s"].items())
    )
  else:
    print(f"  step time: {st['why']}")
  ct = record["cpu_time"]
  if ct.get("ok") is not None:
    print(
      f"  CPU per step: median {1000 * ct['median_cpu_s_per_step']:.1f} ms, first "
      f"window {1000 * ct['first_window_s']:.1f} ms, last "
      f"{1000 * ct['last_window_s']:.1f} ms, worst window "
      f"{100 * ct['worst_window_deviation']:.0f}% off, CV {100 * ct['window_cv']:.1f}%"
      f": {'STEADY' if ct['ok'] else 'UNSTEADY'}"
    )
    print(
      "  window CPU per step (ms): "
      + ", ".join(f"{k}: {1000 * v:.1f}" for k, v in ct["window_cpu_s_per_step"].items())
    )
  else:
    print(f"  CPU per step: {ct['why']}")
  print(f"  record: {out}")


if __name__ == "__main__":
  sys.exit(main())
