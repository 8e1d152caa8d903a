"""Looks at a seqio task or mixture the way mtx will train on it, before training.

    python tools/inspect_mixture.py demo
    python tools/inspect_mixture.py demo --inputs_length 24 --targets_length 8 --units 8
    python tools/inspect_mixture.py glue_v002 --module mixtures.glue \\
        --rate_fn examples_proportional --rate_maximum 65536

For every task of the mixture it prints the task id, the rate (the normalised share of
examples, computed as ``mtx.data.pipeline.load`` computes it, ``--rate_fn`` and friends
included), the number of examples, a few decoded examples (inputs -> targets, with the
task's own vocabularies), the lengths of inputs and targets in tokens
(min/mean/p50/p95/max, before truncation) and how many examples the given lengths
truncate. Then it builds ``--batches`` batches of the given layout (flat, or task-major
with ``--units``) with the real ``Pipeline`` and reports the packing: the share of
non-padding tokens on the encoder and decoder side, examples per row, and the realised
example share of every task next to its rate.

A bad name, split, length or layout prints the data layer's one-sentence error and
exits with status 2.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top
from mtx.data import materialize, mixing, pipeline, registry
from mtx.errors import UserError

# pylint: enable=g-import-not-at-top

# "No truncation" lengths, to read an example's untrimmed length.
_UNBOUNDED = 2**31 - 1


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="inspect_mixture",
    description="Prints a mixture's tasks, rates, examples, lengths and packing.",
  )
  p.add_argument("name", help="registered seqio task or mixture name")
  p.add_argument(
    "--module",
    default="mixtures.demo",
    help="module(s) registering the name, comma-separated; '' for none",
  )
  p.add_argument(
    "--vocabulary",
    default=None,
    help="SentencePiece model for tasks built on the default vocabulary (VOCABULARY)",
  )
  p.add_argument("--split", default="train")
  p.add_argument("--inputs_length", type=int, default=32)
  p.add_argument("--targets_length", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument(
    "--units",
    type=int,
    default=0,
    help="task-major units per batch; 0 for the flat layout",
  )
  p.add_argument(
    "--examples", type=int, default=3, help="decoded examples shown per task"
  )
  p.add_argument(
    "--batches", type=int, default=50, help="batches built to measure packing; 0 to skip"
  )
  p.add_argument("--seed", type=int, default=0, help="data seed")
  p.add_argument("--rate_fn", default="mixture", choices=mixing.RATE_FNS)
  p.add_argument("--rate_maximum", type=float, default=None)
  p.add_argument("--rate_temperature", type=float, default=1.0)
  p.add_argument(
    "--task_group",
    action="append",
    default=[],
    metavar="PATTERN=GROUP",
    help="put tasks matching PATTERN (fnmatch) in GROUP; repeatable",
  )
  return p


def _task_groups(items: Sequence[str]) -> Optional[dict]:
  groups = {}
  for item in items:
    pattern, sep, group = item.partition("=")
    if not sep or not pattern or not group:
      raise UserError(
        f"--task_group '{item}' must look like PATTERN=GROUP, e.g. 'glue_*=glue'."
      )
    groups[pattern] = group
  return groups or None


def _stats(lengths: np.ndarray) -> str:
  if lengths.size == 0:
    return "-"
  p50, p95 = np.percentile(lengths, [50, 95])
  return f"{int(lengths.min())}/{lengths.mean():.1f}/{p50:g}/{p95:g}/{int(lengths.max())}"


def _decode(vocabulary, ids: np.ndarray, limit: int = 100) -> str:
  try:
    text = vocabulary.decode([int(i) for i in ids])
  except Exception:  # pylint: disable=broad-except
    text = str(ids.tolist())
  text = repr(text)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _read(task, split: str, lengths: dict) -> tuple:
  """(what training reads, untrimmed lengths per side or None, truncations per side).

  Reads the task exactly as ``pipeline.load`` does; only if that truncated something,
  reads it again untrimmed so the length statistics show the real tail.
  """
  ex = materialize.read_task(task, split, lengths)
  raw = {"inputs": ex.inputs.lengths(), "targets": ex.targets.lengths()}
  if ex.num_truncated < 0:  # Its preprocessors trim; the untrimmed lengths are unknown.
    return ex, raw, None
  if ex.num_truncated > 0:
    whole = materialize.read_task(task, split, {k: _UNBOUNDED for k in lengths})
    raw = {"inputs": whole.inputs.lengths(), "targets": whole.targets.lengths()}
  truncated = {k: int((raw[k] > lengths[k]).sum()) for k in lengths}
  return ex, raw, truncated


def _segment_starts(seg: np.ndarray) -> np.ndarray:
  """Bool mask of the first token of every packed example, rows flattened."""
  seg = seg.reshape(-1, seg.shape[-1])
  return (seg > 0) & np.concatenate(
    [np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1
  )


def _packing_report(pipe: pipeline.Pipeline, batches: int) -> List[str]:
  k = len(pipe.examples)
  enc_tokens = dec_tokens = enc_slots = dec_slots = rows = empty_rows = 0
  examples = np.zeros(k, np.int64)
  tokens = np.zeros(k, np.int64)
  units_per_group = np.zeros(pipe.spec.num_groups, np.int64)
  for _ in range(batches):
    b = pipe.next_batch()
    enc, dec = b["encoder_segment_ids"], b["decoder_task_ids"]
    enc_tokens += int((enc > 0).sum())
    enc_slots += enc.size
    dec_tokens += int((dec >= 0).sum())
    dec_slots += dec.size
    n_rows = dec.size // dec.shape[-1]
    rows += n_rows
    empty_rows += int((dec.reshape(n_rows, -1) < 0).all(axis=1).sum())
    ids = dec.reshape(n_rows, -1)
    examples += np.bincount(ids[_segment_starts(b["decoder_segment_ids"])], minlength=k)
    tokens += np.bincount(ids[ids >= 0], minlength=k)
    if "unit_task" in b:
      units_per_group += np.bincount(b["unit_task"], minlength=pipe.spec.num_groups)
  lay = pipe.layout
  kind = (
    f"task-major, {lay.units} units x {lay.rows_per_unit} rows"
    if lay.task_major
    else "flat"
  )
  lines = [
    f"packing over {batches} batches of {lay.batch_size} rows ({kind}), lengths "
    f"{lay.inputs_length}/{lay.targets_length}:",
    f"  packing efficiency: encoder {enc_tokens / max(enc_slots, 1):.1%} non-padding, "
    f"decoder {dec_tokens / max(dec_slots, 1):.1%} non-padding",
    f"  examples per row: {examples.sum() / max(rows, 1):.2f}   empty rows: "
    f"{empty_rows} of {rows}",
    "  realised shares per task (examples, target tokens) vs rate:",
    f"    {'id':>3}  {'rate':>7}  {'examples':>8}  {'ex share':>8}  {'tok share':>9}  "
    "task",
  ]
  ex_share = examples / max(examples.sum(), 1)
  tok_share = tokens / max(tokens.sum(), 1)
  for t, ex in enumerate(pipe.examples):
    lines.append(
      f"    {t:3d}  {pipe.rates[t]:7.4f}  {examples[t]:8d}  "
      f"{ex_share[t]:8.4f}  {tok_share[t]:9.4f}  {ex.name}"
    )
  if lay.task_major:
    lines.append(
      "  units per group: "
      + ", ".join(f"{g} {int(n)}" for g, n in zip(pipe.spec.group_names, units_per_group))
    )
  epochs = pipe.epochs()
  lines.append(
    "  epochs consumed: " + ", ".join(f"{name} {e:.3f}" for name, e in epochs.items())
  )
  return lines


def inspect(args: argparse.Namespace) -> str:
  """Builds the report; raises UserError for anything the user can fix."""
  registry.import_modules(args.module, args.vocabulary)
  lengths = pipeline.check_feature_lengths(
    {"inputs": args.inputs_length, "targets": args.targets_length}
  )
  layout = pipeline.Layout(
    args.batch_size, args.units, lengths["inputs"], lengths["targets"]
  )
  pipeline.check_layout(layout, 1)
  if args.examples < 0 or args.batches < 0:
    raise UserError("--examples and --batches must be >= 0.")
  spec = registry.resolve(args.name, _task_groups(args.task_group))
  reads = [_read(task, args.split, lengths) for task in spec.tasks]
  examples = [r[0] for r in reads]
  # As pipeline.load computes them.
  rates = mixing.compute_rates(
    args.rate_fn,
    spec.seqio_rates,
    [len(e) for e in examples],
    args.rate_maximum,
    args.rate_temperature,
  )
  total = sum(len(e) for e in examples)
  width = max(len("group"), *(len(g) for g in spec.group_names))
  lines = [
    f"{args.name}: {spec.num_tasks} task(s), {spec.num_groups} group(s), split "
    f"'{args.split}', {total} examples, rate_fn '{args.rate_fn}', lengths "
    f"{lengths['inputs']}/{lengths['targets']}",
    "",
    f"{'id':>3}  {'rate':>7}  {'seqio rate':>10}  {'examples':>8}  "
    f"{'group':<{width}}  task",
  ]
  for t, (task, ex) in enumerate(zip(spec.tasks, examples)):
    group = spec.group_names[spec.group_of_task[t]]
    lines.append(
      f"{t:3d}  {rates[t]:7.4f}  {spec.seqio_rates[t]:10.6g}  {len(ex):8d}  "
      f"{group:<{width}}  {task.name}"
    )
  for t, (task, (ex, raw, truncated)) in enumerate(zip(spec.tasks, reads)):
    lines += ["", f"[{t}] {task.name}  rate {rates[t]:.4f}  examples {len(ex)}"]
    for key in ("inputs", "targets"):
      where = "" if truncated is not None else " (trimmed by the task's preprocessors)"
      cut = (
        f"truncated at {lengths[key]}: {truncated[key]}"
        if truncated is not None
        else "truncated: unknown"
      )
      lines.append(
        f"  {key:<7} tokens min/mean/p50/p95/max {_stats(raw[key])}{where}  {cut}"
      )
    if truncated is not None:
      lines.append(f"  examples truncated (either side): {ex.num_truncated}")
    vin = task.output_features["inputs"].vocabulary
    vtg = task.output_features["targets"].vocabulary
    for i in range(min(args.examples, len(ex))):
      lines.append(
        f"  {_decode(vin, ex.inputs.get(i))} -> {_decode(vtg, ex.targets.get(i))}"
      )
  if args.batches:
    pipe = pipeline.Pipeline(spec, examples, rates, layout, args.seed)
    lines += [""] + _packing_report(pipe, args.batches)
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the tool; returns the exit status (2 for a mistake the user can fix)."""
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse already printed the usage and the problem.
    return int(e.code or 0)
  try:
    report = inspect(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report, flush=True)
  return 0


if __name__ == "__main__":
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's "not cached" notes.
  sys.exit(main())
