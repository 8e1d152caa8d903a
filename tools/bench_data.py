"""Measures the input pipeline and what it costs the train loop, side by side.

    python tools/bench_data.py            # ~100 measured steps, 5 s per pipeline case
    python tools/bench_data.py --quick    # a smoke run, well under 2 minutes on 2 cores

(a) **Pipeline throughput**: non-padding target tokens per second that
``Pipeline.next_batch`` produces on this host, for the flat and the task-major layout
(units as ``build.default_units`` picks them), for the mixture at T5's lengths
(512/114, batch ``--data_batch_size``) and at the demo's lengths (32/16, batch
``--batch_size``). Only the time inside ``next_batch`` counts.

(b) **Step time on real data vs a constant batch**: the tiny T5 (emb 128, 4 heads x 32,
mlp 256, 2+2 layers, float32) with AdamW, built and jitted by the trainer's own builder
(``mtx.train.build.build_train_step`` from ``DataSettings`` and ``StepSettings``, as
``mtx train`` builds it), stepped ``--steps`` times
on (i) one constant device batch and (ii) the ``Prefetcher(pipe, mesh)`` path of
``mtx.train.loop``, after ``--warmup`` steps each. The two are measured alternately in
``--rounds`` rounds so drift hits both alike. The ratio real / constant is the input
pipeline's overhead on the step (1.0 = free).

Prints a table and one JSON line (prefixed ``JSON: ``).
"""

import argparse
import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top
import flax.linen as nn
import jax

from mtx import parallel
from mtx.data import materialize, mixing, pipeline, registry
from mtx.errors import UserError
from mtx.model import T5Config
from mtx.train import build as build_lib
from mtx.train import loop, optim
from mtx.train import settings as settings_lib

# pylint: enable=g-import-not-at-top

T5_LENGTHS = (512, 114)
DEMO_LENGTHS = (32, 16)
TINY = dict(
  emb_dim=128,
  num_heads=4,
  head_dim=32,
  mlp_dim=256,
  num_encoder_layers=2,
  num_decoder_layers=2,
  dropout_rate=0.0,
  dtype="float32",
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bench_data", description=__doc__.split("\n")[0])
  p.add_argument("--mixture", default="demo")
  p.add_argument("--module", default="mixtures.demo")
  p.add_argument("--steps", type=int, default=100, help="measured train steps per mode")
  p.add_argument("--warmup", type=int, default=10, help="unmeasured steps per mode")
  p.add_argument(
    "--rounds",
    type=int,
    default=5,
    help="alternations of constant and real (steps split among them)",
  )
  p.add_argument(
    "--batch_size",
    type=int,
    default=32,
    help="train step batch, and pipeline batch at the demo's lengths",
  )
  p.add_argument(
    "--data_batch_size", type=int, default=128, help="pipeline batch at T5's lengths"
  )
  p.add_argument(
    "--data_seconds",
    type=float,
    default=5.0,
    help="time spent in next_batch per pipeline case",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 20 steps in 2 rounds, 3 warmup, 1 s per pipeline case",
  )
  return p


# ---- data ------------------------------------------------------------------------------
class MixtureData:
  """The mixture's examples, read once per distinct truncation, and its rates (also
  tools/bench.py's input pipeline measurement)."""

  def __init__(self, name: str):
    self.spec = registry.resolve(name)
    self._cache = {}

  def examples(self, lengths: tuple) -> list:
    """Examples trimmed to ``lengths``; reuses a longer read when nothing would be cut."""
    for (li, lt), exs in self._cache.items():
      fits = all(
        int(e.inputs.lengths().max()) <= lengths[0]
        and int(e.targets.lengths().max()) <= lengths[1]
        and e.num_truncated == 0
        for e in exs
      )
      if li >= lengths[0] and lt >= lengths[1] and fits:
        return exs
    fl = {"inputs": lengths[0], "targets": lengths[1]}
    exs = [materialize.read_task(t, "train", fl) for t in self.spec.tasks]
    self._cache[lengths] = exs
    return exs

  def pipeline(
    self, lengths: tuple, batch_size: int, units: int, seed: int
  ) -> pipeline.Pipeline:
    """What ``pipeline.load`` returns (rate_fn 'mixture'), without re-reading."""
    exs = self.examples(lengths)
    rates = mixing.compute_rates("mixture", self.spec.seqio_rates, [len(e) for e in exs])
    layout = pipeline.Layout(batch_size, units, *lengths)
    return pipeline.Pipeline(self.spec, exs, rates, layout, seed)


def bench_pipeline(pipe: pipeline.Pipeline, seconds: float, min_batches: int = 3) -> dict:
  """Target tokens/s etc. of ``pipe.next_batch`` (time inside the call only)."""
  pipe.next_batch()  # First permutations.
  spent, batches, tokens, enc, enc_slots, dec_slots = 0.0, 0, 0, 0, 0, 0
  while spent < seconds or batches < min_batches:
    t0 = time.perf_counter()
    b = pipe.next_batch()
    spent += time.perf_counter() - t0
    batches += 1
    tokens += int(b["decoder_loss_weights"].sum())
    dec_slots += b["decoder_loss_weights"].size
    enc += int((b["encoder_segment_ids"] > 0).sum())
    enc_slots += b["encoder_segment_ids"].size
  return {
    "target_tokens_per_s": tokens / spent,
    "ms_per_batch": 1e3 * spent / batches,
    "batches": batches,
    "decoder_fill": tokens / dec_slots,
    "encoder_fill": enc / enc_slots,
  }


# ---- train step ------------------------------------------------------------------------
def build_step(spec: registry.MixtureSpec, lengths: tuple, batch_size: int, seed: int):
  """(mesh, rules, jit_step, train_state) for the tiny T5 with AdamW, built by the
  trainer's own builder (``mtx.train.build``), one-gradient route, all devices on
  "data"."""
  data = settings_lib.DataSettings(
    mixture_or_task_name=spec.name,
    task_feature_lengths={"inputs": lengths[0], "targets": lengths[1]},
    batch_size=batch_size,
  )
  settings = settings_lib.StepSettings(
    model_config=T5Config(**TINY),
    optimizer_fn=functools.partial(optim.make_optimizer, "adamw"),
    learning_rate=1e-3,
    seed=seed,
  )
  build = build_lib.build_train_step(data, settings)
  with build.mesh:
    train_state = build.init_state()
  return build.mesh, build.rules, build.jit_step, train_state


def _steps(jit_step, state, next_batch, n: int):
  """Runs n steps as the train loop does (no per-step sync); returns (state, s, tokens)."""
  t0 = time.perf_counter()
  history = []
  for _ in range(n):
    state, metrics = jit_step(state, next_batch())
    history.append(metrics)
  jax.block_until_ready((state, history[-1]))
  elapsed = time.perf_counter() - t0
  tokens = float(np.sum(jax.device_get([m["task_tokens"] for m in history])))
  return state, elapsed, tokens


def bench_step(
  data: MixtureData, batch_size: int, steps: int, warmup: int, rounds: int, seed: int
) -> dict:
  spec = data.spec
  mesh, rules, jit_step, state = build_step(spec, DEMO_LENGTHS, batch_size, seed)
  const_pipe = data.pipeline(DEMO_LENGTHS, batch_size, 0, seed)
  real_pipe = data.pipeline(DEMO_LENGTHS, batch_size, 0, seed)
  per_round = max(1, steps // rounds)
  out = {"constant": [0.0, 0.0, 0], "real": [0.0, 0.0, 0]}  # seconds, tokens, steps
  ratios = []
  with mesh, nn.logical_axis_rules(list(rules)):
    constant = parallel.host_to_global(const_pipe.next_batch(), mesh)
    t0 = time.perf_counter()
    state, _, _ = _steps(jit_step, state, lambda: constant, 1)
    compile_s = time.perf_counter() - t0
    prefetch = loop.Prefetcher(real_pipe, mesh)
    try:
      real = lambda: prefetch.next()[0]
      state, _, _ = _steps(jit_step, state, lambda: constant, warmup)
      state, _, _ = _steps(jit_step, state, real, warmup)
      for _ in range(rounds):
        seconds = {}
        for mode, fn in (("constant", lambda: constant), ("real", real)):
          state, s, tok = _steps(jit_step, state, fn, per_round)
          acc = out[mode]
          acc[0] += s
          acc[1] += tok
          acc[2] += per_round
          seconds[mode] = s
        ratios.append(seconds["real"] / seconds["constant"])
    finally:
      prefetch.close()
  res = {
    "compile_s": compile_s,
    "devices": len(jax.devices()),
    "platform": jax.devices()[0].platform,
    "rounds": rounds,
    "round_ratios": ratios,
  }
  for mode, (s, tok, n) in out.items():
    res[mode] = {"step_ms": 1e3 * s / n, "target_tokens_per_s": tok / s, "steps": n}
  res["overhead"] = res["real"]["step_ms"] / res["constant"]["step_ms"]
  # Other processes on the host make single rounds noisy; the median resists them.
  res["overhead_median_round"] = float(np.median(ratios))
  return res


# ---- report ----------------------------------------------------------------------------
def bench_pipelines(data: MixtureData, args: argparse.Namespace) -> list:
  """(a): each layout's pipeline at T5's and at the demo's lengths; prints each."""
  cases = []
  for lengths, batch in (
    (T5_LENGTHS, args.data_batch_size),
    (DEMO_LENGTHS, args.batch_size),
  ):
    units = build_lib.default_units(data.spec.num_groups, batch, 1, 1)
    for layout, u in (("flat", 0), ("task-major", units)):
      r = bench_pipeline(data.pipeline(lengths, batch, u, args.seed), args.data_seconds)
      r.update(lengths=list(lengths), batch=batch, layout=layout, units=u)
      cases.append(r)
      print(
        f"  pipeline {layout:<10} {lengths[0]}/{lengths[1]} batch {batch}: "
        f"{r['target_tokens_per_s']:,.0f} tok/s",
        flush=True,
      )
  return cases


def report_lines(cases: list, step: dict, batch_size: int) -> list:
  """The printed tables of (a) and (b)."""
  lines = [
    "",
    "(a) input pipeline, this host (time inside Pipeline.next_batch only)",
    f"{'lengths':>8}  {'batch':>5}  {'layout':<15}  {'target tok/s':>12}  "
    f"{'ms/batch':>8}  {'dec fill':>8}  {'enc fill':>8}",
  ]
  for r in cases:
    lay = r["layout"] + (f" ({r['units']}u)" if r["units"] else "")
    lines.append(
      f"{r['lengths'][0]:>4}/{r['lengths'][1]:<3}  {r['batch']:5d}  "
      f"{lay:<15}  {r['target_tokens_per_s']:12,.0f}  "
      f"{r['ms_per_batch']:8.2f}  {r['decoder_fill']:8.1%}  "
      f"{r['encoder_fill']:8.1%}"
    )
  c, rl = step["constant"], step["real"]
  lines += [
    "",
    f"(b) train step, tiny T5, batch {batch_size}, lengths "
    f"{DEMO_LENGTHS[0]}/{DEMO_LENGTHS[1]}, {c['steps']} measured steps each, "
    f"{step['devices']} {step['platform']} device(s), compile "
    f"{step['compile_s']:.1f} s",
    f"{'feed':<26}  {'step ms':>8}  {'target tok/s':>12}",
    f"{'constant in-memory batch':<26}  {c['step_ms']:8.2f}  "
    f"{c['target_tokens_per_s']:12,.0f}",
    f"{'Prefetcher(pipe, mesh)':<26}  {rl['step_ms']:8.2f}  "
    f"{rl['target_tokens_per_s']:12,.0f}",
    f"overhead ratio (real / constant): {step['overhead']:.3f} over all steps, "
    f"{step['overhead_median_round']:.3f} median of {step['rounds']} rounds "
    f"({', '.join(f'{r:.2f}' for r in step['round_ratios'])})",
    f"pipeline headroom at these lengths: "
    f"{cases[2]['target_tokens_per_s'] / rl['target_tokens_per_s']:.0f}x the "
    "step's consumption (flat layout)",
  ]
  return lines


def run(args: argparse.Namespace) -> dict:
  """Runs both benchmarks; returns the JSON-able results (and prints the table)."""
  if args.quick:
    args.steps, args.warmup, args.data_seconds, args.rounds = 20, 3, 1.0, 2
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
    raise UserError("--steps and --rounds must be >= 1 and --warmup >= 0.")
  registry.import_modules(args.module)
  t0 = time.perf_counter()
  data = MixtureData(args.mixture)
  data.examples(T5_LENGTHS)
  read_s = time.perf_counter() - t0
  print(
    f"read {args.mixture}: {data.spec.num_tasks} tasks, "
    f"{sum(len(e) for e in data.examples(T5_LENGTHS))} examples in {read_s:.1f} s",
    flush=True,
  )

  cases = bench_pipelines(data, args)
  step = bench_step(
    data, args.batch_size, args.steps, args.warmup, args.rounds, args.seed
  )

  lines = report_lines(cases, step, args.batch_size)
  print("\n".join(lines), flush=True)
  result = {"mixture": args.mixture, "read_s": read_s, "pipeline": cases, "step": step}
  print("JSON: " + json.dumps(result, sort_keys=True), flush=True)
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's "not cached" notes.
  sys.exit(main())
