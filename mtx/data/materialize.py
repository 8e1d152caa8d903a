"""Reads a task's preprocessed, tokenized examples once into flat numpy arrays.

Random access to every example is what lets mtx seek: the example a task yields at
cursor position c is ``examples[permutation(seed, task, epoch)[c % n]]`` with
``epoch = c // n``, computable without reading anything before it. The cost is
memory: one int32 per token of this host's shard of each task (GLUE is ~50 MB, the
demo well under 10 MB); corpora that do not fit in host memory are out of scope for
this reader.

Layout of one feature (a ragged list of token sequences, stored flat):

    sequences  [[5, 6, 1], [7, 1]]
    ->  tokens  [5, 6, 1, 7, 1]   offsets  [0, 3, 5]

TensorFlow runs only here, on the host CPU, to execute the seqio preprocessors.
"""

import dataclasses
import logging
import re
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from mtx import paths, tf_logs
from mtx.errors import UserError

# The input pipeline must never take an accelerator from JAX (and TF's CUDA probing on
# a machine without one is noise).
with tf_logs.filtered_stderr():
  tf.config.set_visible_devices([], "GPU")

_READ_BATCH = 4096


@dataclasses.dataclass
class Ragged:
  """A list of int32 sequences stored as ``tokens[offsets[i]:offsets[i+1]]``."""

  tokens: np.ndarray  # int32 [total_tokens]
  offsets: np.ndarray  # int64 [n + 1]

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def get(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclasses.dataclass
class TaskExamples:
  """One task's examples for one split and host shard, trimmed to the feature lengths.

  Attributes:
    name: the task name.
    inputs, targets: the token sequences (EOS included when the feature adds it).
    num_truncated: examples whose inputs or targets were longer than the feature
      length and were cut (keeping EOS last); -1 when unknown because the task's
      preprocessors need the sequence lengths and trim themselves.
  """

  name: str
  inputs: Ragged
  targets: Ragged
  num_truncated: int

  def __len__(self) -> int:
    return len(self.targets)


def _dataset(task: seqio.Task, split: str, sequence_length, shard_info):
  return task.get_dataset(
    sequence_length=sequence_length,
    split=split,
    shuffle=False,
    shard_info=shard_info,
    num_epochs=1,
    trim_output_features=False,
    use_cached=False,
  )


def _read(ds: tf.data.Dataset, keys=("inputs", "targets")) -> dict:
  """Reads the whole dataset as flat token arrays, batched through ragged tensors."""
  parts = {k: [] for k in keys}
  lengths = {k: [] for k in keys}
  ds = ds.map(lambda ex: {k: ex[k] for k in keys}).ragged_batch(_READ_BATCH)
  for batch in ds:
    for k in keys:
      rt = batch[k]
      parts[k].append(rt.flat_values.numpy().astype(np.int32))
      lengths[k].append(np.diff(rt.row_splits.numpy()))
  out = {}
  for k in keys:
    lens = np.concatenate(lengths[k]) if lengths[k] else np.zeros([0], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.concatenate(parts[k]) if parts[k] else np.zeros([0], np.int32)
    out[k] = Ragged(tokens, offsets)
  return out


def _select(seqs: Ragged, keep: np.ndarray) -> Ragged:
  """The sequences where ``keep`` is True, in order."""
  lens = seqs.lengths()[keep]
  idx = [
    np.arange(s, e) for s, e, k in zip(seqs.offsets[:-1], seqs.offsets[1:], keep) if k
  ]
  tokens = np.concatenate(idx) if idx else np.zeros([0], np.int64)
  return Ragged(
    seqs.tokens[tokens], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
  )


def _trim(seqs: Ragged, max_len: int, eos_id: Optional[int]) -> tuple:
  """Cuts sequences to ``max_len`` tokens, keeping EOS as the last token if it was."""
  lens = seqs.lengths()
  over = lens > max_len
  if not over.any():
    return seqs, over
  new_lens = np.minimum(lens, max_len)
  offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
  idx = np.concatenate([np.arange(s, s + n) for s, n in zip(seqs.offsets[:-1], new_lens)])
  tokens = seqs.tokens[idx].copy()
  if eos_id is not None:
    ends_with_eos = seqs.tokens[seqs.offsets[1:] - 1] == eos_id
    fix = over & ends_with_eos
    tokens[offsets[1:][fix] - 1] = eos_id
  return Ragged(tokens, offsets), over


def source_files(task: seqio.Task, split: str, limit: Optional[int] = 100) -> list:
  """The files of a seqio ``FileDataSource``'s split, sorted ([] for other sources).
  ``limit`` caps the list (enough to name a file); None lists them all."""
  if not isinstance(task.source, seqio.FileDataSource):
    return []
  try:
    return sorted(task.source.list_shards(split))[:limit]
  except Exception:  # pylint: disable=broad-except  # only to name a file
    return []


def _lines(path: str, limit: int = 100_000):
  """(line number, text) of a text file's first ``limit`` lines ([] if unreadable)."""
  try:
    with paths.open_file(path, "rb") as f:
      return [
        (i, line.decode("utf-8", errors="replace").rstrip("\n"))
        for i, line in zip(range(1, limit + 1), f)
      ]
  except OSError:
    return []


def _first_line_without_tab(files) -> Optional[tuple]:
  """(path, line number) of the first non-empty line without a tab in TSV-like files
  (where at least half the lines have one), else None."""
  for path in files:
    lines = [(i, t) for i, t in _lines(path) if t.strip()]
    tabbed = sum("\t" in t for _, t in lines)
    if tabbed * 2 >= len(lines):
      for i, t in lines:
        if "\t" not in t:
          return path, i
  return None


def warn_header_lines(task: seqio.Task, split: str) -> None:
  """Warns when a plain seqio text-line source starts with a header line (the
  feature names, tab-separated): it would be read as an example."""
  if not isinstance(task.source, seqio.TextLineDataSource):
    return
  names = {"\t".join(task.output_features), "\t".join(sorted(task.output_features))}
  try:  # the source's first line as it reads it (skip_header_lines applied)
    first = next(iter(task.source.get_dataset(split, shuffle=False).take(1)), None)
  except Exception:  # pylint: disable=broad-except  # read errors come later, named
    return
  if first is None or not isinstance(first, tf.Tensor):
    return
  line = first.numpy().decode("utf-8", "replace").strip()
  if line in names:
    logging.warning(
      "Task %s: the first line of its split '%s' is a header (%s) and is read as an "
      "example; pass skip_header_lines=1 to its TextLineDataSource.",
      task.name,
      split,
      line.replace("\t", "<TAB>"),
    )


def read_error(task: seqio.Task, split: str, error: Exception) -> UserError:
  """A TensorFlow error while running a task's preprocessors, in one sentence naming
  the task and its file (and the line without a tab, for TSV-like files)."""
  text = " ".join(str(error).split())
  m = re.search(r"transformation with iterator: [^ ]*: (.*?)\s*\[\[", text)
  reason = (m.group(1) if m else text)[:300]
  files = source_files(task, split)
  bad = _first_line_without_tab(files)
  if bad:
    where = f"; {bad[0]}:{bad[1]} has no tab, unlike the other lines: fix or drop it"
  elif files:
    where = f"; its files: {', '.join(files[:3])}"
  else:
    where = "; check its data and preprocessors"
  return UserError(
    f"Task '{task.name}' failed reading split '{split}' in its preprocessors "
    f"({reason}){where}."
  )


def read_task(
  task: seqio.Task,
  split: str,
  feature_lengths: Mapping[str, int],
  shard_index: int = 0,
  num_shards: int = 1,
) -> TaskExamples:
  """Runs ``task``'s preprocessors over this host's shard of ``split``, once.

  Sequence lengths are not given to the preprocessors when they can do without, so
  over-long examples arrive whole and are trimmed (and counted) here; tasks whose
  preprocessors need the lengths (span corruption, say) get them and trim themselves.

  Raises:
    UserError: an unknown split, or a shard with no examples.
  """
  if split not in task.splits:
    raise UserError(
      f"Task '{task.name}' has no split '{split}' (it has {list(task.splits)}); "
      "choose one of those."
    )
  warn_header_lines(task, split)
  shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  num_truncated = 0
  try:
    data = _read(_dataset(task, split, None, shard_info))
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    logging.info(
      "Task %s needs sequence lengths in its preprocessors (%s); its "
      "truncation count is not known.",
      task.name,
      e,
    )
    try:
      data = _read(_dataset(task, split, dict(feature_lengths), shard_info))
    except tf.errors.OpError as e2:
      raise read_error(task, split, e2) from e2
    num_truncated = -1
  keep = data["targets"].lengths() > 0  # An empty target teaches nothing; skip it.
  if not keep.all():
    logging.warning(
      "Task %s: skipped %d examples with empty targets.", task.name, int((~keep).sum())
    )
    data = {k: _select(v, keep) for k, v in data.items()}
  if len(data["targets"]) == 0:
    where = f" shard {shard_index} of {num_shards} of" if num_shards > 1 else ""
    raise UserError(
      f"Task '{task.name}' has no examples in{where} split '{split}'; check its data "
      "source (or use fewer processes than examples)."
    )
  over_any = np.zeros(len(data["targets"]), bool)
  for key in ("inputs", "targets"):
    feature = task.output_features[key]
    eos = feature.vocabulary.eos_id if feature.add_eos else None
    data[key], over = _trim(data[key], int(feature_lengths[key]), eos)
    over_any |= over
  if num_truncated == 0:
    num_truncated = int(over_any.sum())
  return TaskExamples(task.name, data["inputs"], data["targets"], num_truncated)
