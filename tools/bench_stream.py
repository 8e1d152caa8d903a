"""Measures streamed tasks beside in-memory ones: tokens/s, host RSS, resume time.

    python tools/bench_stream.py                 # 20 M examples (~3 GB), 10,000 steps
    python tools/bench_stream.py --quick         # 200 k examples, 1,000 steps (smoke)
    python tools/bench_stream.py --delete        # ... and remove the generated data

**Data.** ``--examples`` short examples (inputs 6-40 tokens, targets 2-12, random ids
of the demo vocabulary) written once to ``--data_dir`` as ``seqio_cache_tasks`` writes
a cached task (``bench_big``: ``train.tfrecord-NNNNN-of-NNNNN`` shards of
tf.train.Examples, ``info.train.json``, ``stats.train.json``, ``COMPLETED``), reused
by later runs. ``bench_small`` is the same kind of task over the first
``--subset_files`` shards, read by a plain ``TFExampleDataSource`` (small enough for
memory).

**Runs.** Each mixes one of them with the demo tasks (mixtures/demo.py, their own rates;
the big task gets as many examples as all demo tasks together), at the demo's lengths
(32/16) and ``--batch_size`` rows, flat layout:

  stream     bench_big streamed (``StreamOptions(tasks=['bench_big'])``), cached reading
  in-memory  bench_small read into memory (today's path), the demo tasks too

For each: ``pipeline.load`` time; ``--steps`` batches of ``next_batch``, with
non-padding target tokens/s per host (time inside ``next_batch`` only) per segment and
host RSS (``psutil``) every ``--rss_every`` batches; the data position saved after
each of ``--resume_at`` steps; then, per saved position, a fresh process-like restart:
``load`` + ``set_state`` + the next batch, checked equal to the uninterrupted run's.

Prints a table and one JSON line (prefixed ``JSON: ``).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top
import psutil
import seqio
import tensorflow as tf
from etils import epath

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top
import mixtures.demo  # noqa: F401  # registers the demo tasks
from mtx.data import pipeline, streaming

# pylint: enable=g-import-not-at-top

LENGTHS = {"inputs": 32, "targets": 16}
BIG, SMALL = "bench_big", "bench_small"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bench_stream", description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default="/tmp/mtx_bench_stream")
  p.add_argument("--examples", type=int, default=20_000_000)
  p.add_argument("--files", type=int, default=64)
  p.add_argument("--subset_files", type=int, default=2, help="shards of bench_small")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=10_000)
  p.add_argument("--resume_at", default="100,1000,10000")
  p.add_argument("--rss_every", type=int, default=250)
  p.add_argument("--window", type=int, default=4096)
  p.add_argument("--workers", type=int, default=2, help="processes writing the data")
  p.add_argument("--delete", action="store_true", help="remove --data_dir at the end")
  p.add_argument(
    "--quick",
    action="store_true",
    help="200 k examples in 8 files, 1,000 steps, resume at 10,100,1000",
  )
  return p


# ---- data ------------------------------------------------------------------------------
def _write_shard(args: tuple) -> int:
  """Writes shard ``index`` of ``files``: its examples, seeded by the index."""
  path, index, count, vocab_size = args
  rng = np.random.default_rng([7, index])
  li, lt = rng.integers(6, 41, count), rng.integers(2, 13, count)
  tokens = rng.integers(3, vocab_size, (count, 52))
  with tf.io.TFRecordWriter(path) as w:
    for i in range(count):
      feature = {
        "inputs": tokens[i, : li[i]].tolist(),
        "targets": tokens[i, 40 : 40 + lt[i]].tolist(),
      }
      ex = tf.train.Example(
        features=tf.train.Features(
          feature={
            k: tf.train.Feature(int64_list=tf.train.Int64List(value=v))
            for k, v in feature.items()
          }
        )
      )
      w.write(ex.SerializeToString())
  return count


def generate(data_dir: str, examples: int, files: int, workers: int, vocab_size: int):
  """Writes ``bench_big``'s cache under ``data_dir`` unless it is complete already."""
  out = epath.Path(data_dir) / BIG
  if (out / "COMPLETED").exists():
    stats = json.loads((out / "stats.train.json").read_text())
    if stats["examples"] == examples and len(shard_paths(data_dir)) == files:
      return 0.0
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  t0 = time.time()
  per = [examples // files + (i < examples % files) for i in range(files)]
  jobs = [
    (str(out / f"train.tfrecord-{i:05d}-of-{files:05d}"), i, n, vocab_size)
    for i, n in enumerate(per)
  ]
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    for done, _ in enumerate(pool.imap_unordered(_write_shard, jobs), 1):
      print(f"  wrote {done}/{files} shards ({time.time() - t0:.0f} s)", flush=True)
  feature = {"shape": [None], "dtype": "int32"}
  info = {"num_shards": files, "features": {"inputs": feature, "targets": feature}}
  (out / "info.train.json").write_text(json.dumps({**info, "seqio_version": "0.0.20"}))
  (out / "stats.train.json").write_text(json.dumps({"examples": examples}))
  (out / "COMPLETED").write_text("")
  return time.time() - t0


def shard_paths(data_dir: str) -> list:
  return sorted(str(p) for p in (epath.Path(data_dir) / BIG).glob("train.tfrecord-*"))


def _to_int32(ds):
  return ds.map(lambda ex: {k: tf.cast(v, tf.int32) for k, v in ex.items()})


def register(data_dir: str, subset_files: int) -> None:
  """Registers bench_big (cached), bench_small (plain) and a mixture for each."""
  features = seqio.get_mixture_or_task("demo_copy").output_features
  parse = {
    k: tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True)
    for k in ("inputs", "targets")
  }
  files = shard_paths(data_dir)
  for name, source_files, preprocessors in (
    (BIG, files, [seqio.CacheDatasetPlaceholder(required=True)]),
    (SMALL, files[:subset_files], [_to_int32]),
  ):
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      source=seqio.TFExampleDataSource({"train": source_files}, parse),
      preprocessors=preprocessors,
      output_features=features,
    )
  seqio.add_global_cache_dirs([data_dir])
  demo = seqio.get_mixture_or_task("demo")
  rates = [(t.name, float(demo.get_rate(t))) for t in demo.tasks]
  for task in (BIG, SMALL):
    seqio.MixtureRegistry.remove(f"mix_{task}")
    seqio.MixtureRegistry.add(f"mix_{task}", rates + [(task, sum(r for _, r in rates))])


# ---- measurement -----------------------------------------------------------------------
def _load(mixture: str, batch_size: int, window: int) -> pipeline.Pipeline:
  stream = streaming.StreamOptions(
    tasks=[BIG] if BIG in mixture else [], above_bytes=None, window=window
  )
  layout = pipeline.Layout(batch_size, 0, LENGTHS["inputs"], LENGTHS["targets"])
  return pipeline.load(mixture, LENGTHS, layout, seed=0, stream=stream)


def _rss_mb() -> float:
  return psutil.Process().memory_info().rss / 2**20


def measure(mixture: str, args: argparse.Namespace) -> dict:
  """Throughput, RSS over time and resume times for one mixture (see module doc)."""
  t0 = time.time()
  pipe = _load(mixture, args.batch_size, args.window)
  load_s = time.time() - t0
  resume_at = sorted(int(s) for s in args.resume_at.split(","))
  saved, following = {}, {}
  rss = [(0, _rss_mb())]
  segments, seg_tokens, seg_time = [], 0, 0.0
  segment = max(1, args.steps // 10)
  # One batch past the last resume point, to check the resumed batch against it.
  for step in range(1, max(args.steps, resume_at[-1]) + 2):
    t = time.perf_counter()
    batch = pipe.next_batch()
    seg_time += time.perf_counter() - t
    seg_tokens += int(batch["decoder_loss_weights"].sum())
    if step - 1 in saved:
      following[step - 1] = batch["decoder_target_tokens"].copy()
    if step in resume_at:
      saved[step] = json.loads(json.dumps(pipe.get_state()))
    if step % args.rss_every == 0:
      rss.append((step, _rss_mb()))
    if step % segment == 0 and step <= args.steps:
      segments.append(seg_tokens / seg_time)
      seg_tokens, seg_time = 0, 0.0
  resumes = {}
  for step, state in saved.items():
    t0 = time.time()
    again = _load(mixture, args.batch_size, args.window)
    t1 = time.time()
    again.set_state(state)
    batch = again.next_batch()
    t2 = time.time()
    if step in following:
      assert np.array_equal(batch["decoder_target_tokens"], following[step]), step
    read = sum(getattr(ex, "records_read", 0) for ex in again.examples)
    resumes[step] = {
      "load_s": t1 - t0,
      "seek_s": t2 - t1,
      "records_read": read,
      "exact": step in following,
    }
    del again
  after_warmup = [m for s, m in rss if s >= min(1000, args.steps // 2)]
  return {
    "mixture": mixture,
    "load_s": load_s,
    "tokens_per_s": float(np.median(segments)),
    "tokens_per_s_segments": [round(x) for x in segments],
    "rss_mb": [(s, round(m)) for s, m in rss],
    "rss_after_warmup_min_max_mb": [round(min(after_warmup)), round(max(after_warmup))],
    "resume": resumes,
    "epochs": pipe.epochs(),
  }


def _table(results: dict) -> str:
  lines = [
    f"{'run':10s} {'load s':>7s} {'tokens/s':>9s} {'RSS MB (min-max)':>17s}  resume "
    "(load + seek s, records read)"
  ]
  for name, r in results.items():
    lo, hi = r["rss_after_warmup_min_max_mb"]
    res = "; ".join(
      f"@{s}: {v['load_s']:.1f} + {v['seek_s']:.2f} ({v['records_read']})"
      for s, v in sorted(r["resume"].items())
    )
    lines.append(
      f"{name:10s} {r['load_s']:7.1f} {r['tokens_per_s']:9.0f} {lo:8d}-{hi:<8d}  {res}"
    )
  return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
  if args.quick:
    args.examples, args.files, args.steps = 200_000, 8, 1000
    args.resume_at, args.rss_every = "10,100,1000", 100
  vocab_size = (
    seqio.get_mixture_or_task("demo_copy")
    .output_features["targets"]
    .vocabulary.vocab_size
  )
  gen_s = generate(args.data_dir, args.examples, args.files, args.workers, vocab_size)
  register(args.data_dir, args.subset_files)
  size = sum(os.path.getsize(p) for p in shard_paths(args.data_dir))
  print(
    f"data: {args.examples} examples in {args.files} files, {size / 2**30:.2f} GiB "
    f"({'generated in %.0f s' % gen_s if gen_s else 'reused'}); bench_small: "
    f"{args.subset_files} files",
    flush=True,
  )
  results = {
    "stream": measure(f"mix_{BIG}", args),
    "in-memory": measure(f"mix_{SMALL}", args),
  }
  print(_table(results))
  out = {
    "examples": args.examples,
    "bytes": size,
    "batch_size": args.batch_size,
    "steps": args.steps,
    "window": args.window,
    "runs": results,
  }
  print("JSON: " + json.dumps(out, sort_keys=True), flush=True)
  if args.delete:
    shutil.rmtree(args.data_dir)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  run(_parser().parse_args(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
