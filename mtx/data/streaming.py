"""Streams a task that does not fit in memory, seekably: read as T5X reads, resume exact.

**Why tf.data over seqio, and not an indexed format.** A seqio user's big data is a
seqio task: TFRecord or TSV files behind a ``FileDataSource`` with preprocessors, or
the TFRecord shards that ``seqio_cache_tasks`` wrote (T5X's ``USE_CACHED_TASKS``). A
random-access format (ArrayRecord through Grain) would let mtx's cursor/permutation
machinery run unchanged, but only after converting every corpus and re-running the
preprocessors offline, and a global permutation of N examples costs O(N) memory per
epoch. So a streamed task is read exactly as T5X reads it, with
``task.get_dataset(split, use_cached=..., shuffle=True, seed=..., shard_info=...)``,
and resume uses tf.data's own iterator checkpointing (as T5X's ``checkpoint_dataset``
does): a ``TFRecordDataset`` or ``TextLineDataset`` saves its file index and byte
offset and restores by seeking, so a restart reads nothing before its position.

**Order.** Epoch e of shard s of task t is seqio's order for seed
``hash(seed, t, s, e)`` (files shuffled per epoch, then read through seqio's
interleave), cut into *windows* of ``window`` consecutive examples, each window
permuted by a seeded generator:

    window 0 read:    [a, b, c, d]      permuted -> [c, a, d, b]
    window 1 read:    [e, f, g, h]      permuted -> [g, e, h, f]
    stream:           c a d b g e h f | (epoch 1: a new file order) ...

Every example of the shard comes once per epoch; a task never runs out (epochs go on,
each in a new order), as in-memory tasks do.

**Position and resume.** The position is ``(epoch, window, offset in window)`` plus the
tf.data iterator's checkpoint taken at the window's start (file indices, byte offsets,
and the examples tf.data had read ahead: ~0.4 MB of base64 for seqio's cached reader,
saved once per window). Restoring seeks the iterator there and reads one window again:
resume costs at most ``window`` examples, whatever the step. With ``on_corrupt='stop'``
a window is one tf.data call (``ragged_batch``); 'skip' reads example by example to see
each error, so its iterator checkpoints are not interchangeable: keep the policy of a
run to resume it exactly.

**Memory bound.** Per streamed task and shard: one window (``window`` examples as int32
arrays, 4096 x (inputs + targets tokens) x 4 bytes by default, under 2 MB at T5's
lengths), tf.data's read-ahead
(seqio's interleave of ``cycle_length=16`` files x ``block_length=16`` examples, an
AUTOTUNE prefetch, and a read buffer per open file), and one iterator checkpoint.
None of it grows with the corpus (docs/benchmarks.md, "Streaming", measures it).

**Example counts.** A streamed task is never counted by reading it: its count comes
from seqio's cache statistics (``stats.<split>.json``, written by
``seqio_cache_tasks``) or from its source's ``num_input_examples``. Rates that need
counts (examples-proportional, temperature) require one of those; explicit mixture
rates need none. The count also scales the ``epochs`` a run logs (the count over the
number of shards, per shard); the epoch boundaries themselves come from the data.

**Corrupt records.** A TFRecord whose checksum fails (``DataLossError``) is named by
file and record (found by walking the file's record headers, CRC32C checked) and, per
``on_corrupt``, stops the run (``UserError``) or is skipped and counted. TensorFlow's
reader cannot find the next record after a broken frame, so skipping drops the rest of
that file for this epoch; the log says so. A file cut inside a record's header ends
silently in TensorFlow; for a cached task read as one shard, an epoch shorter than the
cache stats' count is then reported the same way (with more shards the per-shard count
is not known, and such a cut goes unnoticed).
"""

import base64
import dataclasses
import fnmatch
import logging
import re
import struct
import uuid
from typing import Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mtx import paths
from mtx.data import materialize, mixing
from mtx.errors import UserError

CORRUPT_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """Which tasks stream and how (gin: ``train.stream_*``; runs/train.gin).

  Attributes:
    tasks: task names or fnmatch patterns that always stream.
    above_bytes: other tasks stream when their split's files (seqio's cache files
      when cached, else the source's files) total more bytes; None = only ``tasks``.
    window: examples per shuffle window (memory and resume cost, see above).
    use_cached: read a streamed task from seqio's cache when it has one (T5X's
      ``USE_CACHED_TASKS``).
    on_corrupt: "stop" (exit 2 naming the file and record) or "skip" (count, log).
    cache_dirs: folders added to seqio's global cache directories (T5X's
      ``--seqio_additional_cache_dirs``), where ``seqio_cache_tasks`` wrote tasks.
  """

  tasks: Sequence[str] = ()
  above_bytes: Optional[int] = 1 << 30
  window: int = 4096
  use_cached: bool = True
  on_corrupt: str = "stop"
  cache_dirs: Sequence[str] = ()

  def __post_init__(self):
    for name in ("tasks", "cache_dirs"):
      value = getattr(self, name)
      object.__setattr__(
        self, name, (value,) if isinstance(value, str) else tuple(value or ())
      )
    if not isinstance(self.window, int) or self.window < 1:
      raise UserError(
        f"train.stream_window must be a positive integer (got {self.window!r}); "
        "set e.g. train.stream_window = 1024."
      )
    if self.above_bytes is not None and self.above_bytes < 0:
      raise UserError(
        f"train.stream_above_bytes must be >= 0 or None (got {self.above_bytes}); "
        "None streams only train.stream_tasks."
      )
    if self.on_corrupt not in CORRUPT_POLICIES:
      raise UserError(
        f"train.stream_on_corrupt is '{self.on_corrupt}'; use 'stop' (exit naming "
        "the record) or 'skip' (skip it and count it)."
      )


def _cached(task: seqio.Task, use_cached: bool) -> bool:
  if not (use_cached and task.supports_caching):
    return False
  try:
    return task.cache_dir is not None
  except (ValueError, AssertionError):  # seqio: no COMPLETED cache found
    return False


def _split_files(task: seqio.Task, split: str, cached: bool) -> list:
  if cached:
    pattern = seqio.utils.get_cached_tfrecord_prefix(task.cache_dir, split) + "-*"
    return paths.glob(pattern)
  return materialize.source_files(task, split, limit=None)


def split_bytes(task: seqio.Task, split: str, use_cached: bool) -> int:
  """Bytes of the files behind ``task``'s split (0 for sources without files)."""
  files = _split_files(task, split, _cached(task, use_cached))
  return sum(paths.size(f) for f in files)


def should_stream(task: seqio.Task, split: str, options: StreamOptions) -> bool:
  """Whether ``task`` streams: named in ``options.tasks`` or bigger than the threshold."""
  if any(task.name == p or fnmatch.fnmatchcase(task.name, p) for p in options.tasks):
    return True
  if options.above_bytes is None:
    return False
  return split_bytes(task, split, options.use_cached) > options.above_bytes


def check_patterns(task_names: Sequence[str], options: StreamOptions) -> None:
  """Every ``options.tasks`` pattern must match a task of the mixture."""
  for p in options.tasks:
    if not any(n == p or fnmatch.fnmatchcase(n, p) for n in task_names):
      raise UserError(
        f"train.stream_tasks pattern '{p}' matches no task of the mixture "
        f"({', '.join(task_names)}); fix it or remove it."
      )


def example_count(task: seqio.Task, split: str, use_cached: bool) -> Optional[int]:
  """The task's example count without reading it: cache stats, else the source's
  ``num_input_examples``; None when neither knows."""
  if _cached(task, use_cached):
    return int(task.get_cached_stats(split)["examples"])
  n = task.source.num_input_examples(split)
  return None if n is None else int(n)


# ---- locating a corrupt record --------------------------------------------------------


def _crc32c_table() -> list:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC32C, rotated right by 15 bits plus a constant."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  c ^= 0xFFFFFFFF
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def corrupt_record_at(path: str, offset: int) -> Optional[int]:
  """The number (from 0) of the record of TFRecord file ``path`` that fails its
  checksum at byte ``offset``, or None if none does.

  TensorFlow's reader reports the offset of the part whose checksum failed: the
  record's start (its 12-byte length header) or its payload (start + 12).
  """
  try:
    f = paths.open_file(path, "rb")
  except OSError:
    return None
  with f:
    position, index = 0, 0
    while position + 12 < offset:
      header = f.read(12)
      if len(header) < 12:
        return None
      (length,) = struct.unpack("<Q", header[:8])
      if struct.unpack("<I", header[8:])[0] != _masked_crc32c(header[:8]):
        return None  # a broken frame before the offset: not this file's error
      position += 12 + length + 4
      f.seek(position)
      index += 1
    if position not in (offset, offset - 12):
      return None
    header = f.read(12)
    if len(header) < 12:
      return None
    (length,) = struct.unpack("<Q", header[:8])
    if struct.unpack("<I", header[8:])[0] != _masked_crc32c(header[:8]):
      return index
    data, crc = f.read(length), f.read(4)
    if len(data) < length or len(crc) < 4:
      return index
    return index if struct.unpack("<I", crc)[0] != _masked_crc32c(data) else None


def _record_start(path: str, index: int) -> int:
  with paths.open_file(path, "rb") as f:
    position = 0
    for _ in range(index):
      f.seek(position)
      (length,) = struct.unpack("<Q", f.read(8))
      position += 12 + length + 4
  return position


def _locate(files: Sequence[str], message: str) -> str:
  """'<file>, record <n> (byte <record start>)' for a DataLossError's 'corrupted
  record at <offset>'."""
  m = re.search(r"(?:corrupted|truncated) record at (\d+)", message)
  if m:
    offset = int(m.group(1))
    for path in files:
      index = corrupt_record_at(path, offset)
      if index is not None:
        return f"{path}, record {index} (byte {_record_start(path, index)})"
    return f"one of its files at byte {offset} ({', '.join(files[:3])})"
  return f"one of its files ({', '.join(files[:3])})"


# ---- the reader -----------------------------------------------------------------------


def _epoch_seed(seed: int, name: str, shard: int, epoch: int) -> int:
  state = np.random.SeedSequence([seed, mixing.stable_hash(name), shard, epoch])
  return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def _trim_rows(
  flat: np.ndarray, splits: np.ndarray, max_len: int, eos_id: Optional[int]
) -> tuple:
  """(rows of a ragged batch as views into ``flat``, cut to ``max_len`` keeping a
  final EOS last; how many were cut). ``flat`` is modified where a row is cut.

      flat [5, 6, 7, 1, 8, 1]  splits [0, 4, 6]  max_len 3  eos 1
      ->  rows [5, 6, 1], [8, 1]   (1 cut)
  """
  starts, lens = splits[:-1], np.diff(splits)
  cut = np.flatnonzero(lens > max_len)
  if eos_id is not None and len(cut):
    ends_with_eos = flat[splits[1:][cut] - 1] == eos_id
    flat[(starts[cut] + max_len - 1)[ends_with_eos]] = eos_id
  ends = starts + np.minimum(lens, max_len)
  return [flat[a:b] for a, b in zip(starts.tolist(), ends.tolist())], len(cut)


def _save_iterator(iterator) -> dict:
  """The tf.data iterator's checkpoint as ``{file suffix: base64}`` (held in memory:
  written to TensorFlow's ``ram://`` filesystem and read back: scratch inside
  TensorFlow, not a user file, so it does not go through ``mtx.paths``)."""
  prefix = f"ram://mtx_stream/{uuid.uuid4().hex}"
  path = tf.train.Checkpoint(iterator=iterator).write(prefix)
  out = {}
  for name in tf.io.gfile.glob(path + "*"):
    with tf.io.gfile.GFile(name, "rb") as f:
      out[name[len(path) :]] = base64.b64encode(f.read()).decode("ascii")
    tf.io.gfile.remove(name)
  return out


def _restore_iterator(iterator, saved: Mapping[str, str]) -> None:
  prefix = f"ram://mtx_stream/{uuid.uuid4().hex}"
  for suffix, blob in saved.items():
    with tf.io.gfile.GFile(prefix + suffix, "wb") as f:
      f.write(base64.b64decode(blob))
  try:
    tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
  finally:
    for suffix in saved:
      tf.io.gfile.remove(prefix + suffix)


class TaskReader:
  """One task's examples on one data shard, streamed in a seekable order.

  Used like ``materialize.TaskExamples`` through ``example(cursor)``, for the cursors
  the scheduler asks in order (the same cursor again, or the next one); ``state()``
  and ``restore()`` move it anywhere it has been.

  Args:
    task, split: the seqio task and split.
    feature_lengths: ``{"inputs": N, "targets": M}``; longer examples are cut and
      counted (``num_truncated``), as in-memory tasks are.
    shard_index, num_shards: this reader's data shard (``seqio.ShardInfo``).
    seed: the data seed.
    options: ``StreamOptions``.
    num_examples: the task's example count over all shards (``example_count``), or
      None when unknown. ``len()`` is its share of one shard (for logged epochs and
      multi-shard counts), or the window when unknown (logged epochs then count
      windows; the epochs themselves still end with the data).

  >>> r = TaskReader(task, "train", {"inputs": 64, "targets": 32}, 0, 1, 0,
  ...                StreamOptions(), num_examples=20_000_000)
  >>> inputs, targets = r.example(0)   # int32 arrays
  >>> saved = r.state()                # JSON-able; r.restore(saved) seeks back
  """

  def __init__(
    self,
    task: seqio.Task,
    split: str,
    feature_lengths: Mapping[str, int],
    shard_index: int,
    num_shards: int,
    seed: int,
    options: StreamOptions,
    num_examples: Optional[int],
  ):
    if split not in task.splits:
      raise UserError(
        f"Task '{task.name}' has no split '{split}' (it has {list(task.splits)}); "
        "choose one of those."
      )
    self.name = task.name
    self.task, self.split, self.options = task, split, options
    self.shard_index, self.num_shards, self.seed = shard_index, num_shards, seed
    self.cached = _cached(task, options.use_cached)
    if task.requires_caching and not self.cached:
      raise UserError(
        f"Task '{task.name}' must be read from seqio's cache and no cache of it "
        f"was found (searched {seqio.utils.get_global_cache_dirs()}); run "
        "seqio_cache_tasks for it, or add its cache folder to train.stream_cache_dirs."
      )
    self.files = _split_files(task, split, self.cached)
    self.num_examples_total = num_examples
    self.num_examples = (
      max(1, num_examples // num_shards) if num_examples else options.window
    )
    self._lengths = {k: int(feature_lengths[k]) for k in ("inputs", "targets")}
    self._eos = {
      k: (f.vocabulary.eos_id if f.add_eos else None)
      for k, f in task.output_features.items()
      if k in self._lengths
    }
    self._spare = (None, None)  # ((epoch, lengths), an iterator of that dataset)
    # 'stop' reads a window per tf.data call; 'skip' example by example, to see which
    # one fails (the iterator checkpoints differ: a run keeps its policy to resume).
    self._batched = options.on_corrupt == "stop"
    self.records_read = 0  # examples pulled from tf.data in this process (tests, logs)
    self.num_truncated = 0
    self._reset(self._fresh_state())

  def __len__(self) -> int:
    return self.num_examples

  # ---- position -------------------------------------------------------------------
  @staticmethod
  def _fresh_state() -> dict:
    return {
      "cursor": 0,
      "epoch": 0,
      "window": 0,
      "pos": 0,
      "reader": None,
      "skipped": 0,
      "epoch_examples": 0,
      "epoch_records": 0,
      "lengths": None,
    }

  def _reset(self, state: Mapping) -> None:
    # The open iterator is kept to be restored in place (building seqio's dataset
    # again costs a trace of its preprocessors).
    if getattr(self, "_iterator", None) is not None:
      self._spare = ((self._state["epoch"], self._state["lengths"]), self._iterator)
    self._state = dict(state)
    self._iterator = None
    self._window = None  # list of (inputs, targets) in permuted order
    self._epoch_ended = False
    self._window_skipped = 0
    self._window_records = 0

  def start_state(self, cursor: int = 0) -> dict:
    """A position at ``cursor`` that starts a fresh epoch order (no saved reader)."""
    return {
      **self._fresh_state(),
      "cursor": cursor,
      "epoch": cursor // self.num_examples,
      "lengths": self._state["lengths"],
    }

  def state(self) -> dict:
    """The position: JSON-able (ints and a base64 iterator checkpoint)."""
    return {**self._state, "reading": [self.options.window, self._batched]}

  def restore(self, state: Mapping) -> None:
    """Moves to ``state`` (from ``state()``, possibly of another process).

    A position saved with another window or corrupt-record policy (their iterator
    checkpoints differ) restarts the epoch order at the same cursor, with a warning.
    """
    reading = [self.options.window, self._batched]
    if state.get("reading", reading) != reading:
      logging.warning(
        "Task %s: the saved stream position was read with window %s and policy "
        "'%s'; this run reads with window %s and '%s', so its reading order "
        "restarts (same cursor, not the same examples).",
        self.name,
        state["reading"][0],
        "stop" if state["reading"][1] else "skip",
        self.options.window,
        self.options.on_corrupt,
      )
      state = self.start_state(int(state["cursor"]))
    self._reset(state)

  @property
  def corrupt_skipped(self) -> int:
    """Corrupt records skipped so far (``on_corrupt='skip'``), over the whole run."""
    return int(self._state["skipped"]) + self._window_skipped

  def epochs(self) -> float:
    return self._state["cursor"] / self.num_examples

  # ---- reading --------------------------------------------------------------------
  def _dataset(self, epoch: int, with_lengths: bool) -> tf.data.Dataset:
    shuffle = self.task.shuffle_buffer_size is not None
    ds = self.task.get_dataset(
      sequence_length=dict(self._lengths) if with_lengths else None,
      split=self.split,
      use_cached=self.cached,
      shuffle=shuffle,
      # The in-order windows are permuted here; seqio's buffer would only make the
      # iterator's checkpoint larger (it saves its buffer).
      shuffle_buffer_size=1 if shuffle else None,
      seed=_epoch_seed(self.seed, self.name, self.shard_index, epoch),
      shard_info=(
        seqio.ShardInfo(self.shard_index, self.num_shards)
        if self.num_shards > 1
        else None
      ),
      num_epochs=1,
      trim_output_features=False,
      try_in_mem_cache=False,
    )
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
    if self._batched:
      ds = ds.ragged_batch(self.options.window)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _open(self, epoch: int):
    # Preprocessors get sequence lengths only if they need them (as in materialize):
    # the first window of the run tries without ("lengths" None, then False or True).
    return iter(self._dataset(epoch, bool(self._state["lengths"])))

  def _next_raw(self) -> Optional[tuple]:
    """The next raw (inputs, targets) from tf.data, None at the end of the epoch
    (example by example: the 'skip' policy, which needs to see each error)."""
    while True:
      try:
        ex = next(self._iterator)
      except StopIteration:
        return None
      except tf.errors.DataLossError as e:
        self._corrupt(_locate(self.files, str(e)), e, rest_of_file=True)
        continue
      except tf.errors.OpError as e:
        if self._state["lengths"] is None:
          raise  # perhaps the preprocessors need lengths: _read_window retries
        self._corrupt(f"a record ({' '.join(str(e).split())[:200]})", e, False)
        continue
      out = []
      for key in ("inputs", "targets"):
        tokens = ex[key].numpy().astype(np.int32)
        rows, cut = _trim_rows(
          tokens, np.array([0, len(tokens)]), self._lengths[key], self._eos[key]
        )
        self.num_truncated += cut if key == "targets" else 0
        out.append(rows[0])
      return tuple(out)

  def _next_batch(self) -> list:
    """The next window's raw (inputs, targets), read as one ragged batch (the 'stop'
    policy: one tf.data call per window, not one per example)."""
    try:
      batch = next(self._iterator)
    except StopIteration:
      return []
    except tf.errors.DataLossError as e:
      self._corrupt(_locate(self.files, str(e)), e, rest_of_file=True)
    except tf.errors.OpError as e:
      raise materialize.read_error(self.task, self.split, e) from e
    parts = []
    for key in ("inputs", "targets"):
      rt = batch[key]
      flat = rt.flat_values.numpy().astype(np.int32)
      parts.append(
        _trim_rows(flat, rt.row_splits.numpy(), self._lengths[key], self._eos[key])
      )
      self.num_truncated += parts[-1][1] if key == "targets" else 0
    return list(zip(parts[0][0], parts[1][0]))

  def _corrupt(self, where: str, error: Exception, rest_of_file: bool) -> None:
    if self.options.on_corrupt == "stop":
      raise UserError(
        f"Task '{self.name}' has a corrupt or truncated record in {where}; fix or remove that "
        "file, or set train.stream_on_corrupt = 'skip' to skip and count it."
      ) from error
    self._window_skipped += 1
    logging.warning(
      "Task %s: skipped a corrupt record in %s%s (%d skipped so far).",
      self.name,
      where,
      " and the rest of that file for this epoch" if rest_of_file else "",
      self.corrupt_skipped,
    )

  def _restore_or_restart(self) -> None:
    """Seeks the iterator to the saved window start; a checkpoint that does not fit
    the task's pipeline (its preprocessors or files changed) restarts the order."""
    st = self._state
    try:
      _restore_iterator(self._iterator, st["reader"])
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      logging.warning(
        "Task %s: its saved stream position does not fit its reading pipeline now "
        "(%s); its reading order restarts (same cursor, not the same examples).",
        self.name,
        " ".join(str(e).split())[:200],
      )
      fresh = self.start_state(int(st["cursor"]))
      st.clear()  # in place: the caller holds this dict
      st.update(fresh)
      self._iterator = self._open(st["epoch"])
      st["reader"] = _save_iterator(self._iterator)

  def _next_window(self) -> list:
    if self._batched:
      return self._next_batch()
    raw = []
    while len(raw) < self.options.window:
      ex = self._next_raw()
      if ex is None:
        break
      raw.append(ex)
    return raw

  def _read_window(self) -> None:
    """Reads the window at the current position (from its saved iterator start)."""
    st = self._state
    try:
      if st["reader"] is None:
        self._iterator = self._open(st["epoch"])
        st["reader"] = _save_iterator(self._iterator)
      elif self._iterator is None:
        spare_key, spare = self._spare
        same = spare_key == (st["epoch"], st["lengths"])
        self._iterator = spare if same else self._open(st["epoch"])
        self._restore_or_restart()
      self._window_skipped = 0
      raw = self._next_window()
    except Exception as e:  # pylint: disable=broad-except  # retried with lengths
      if st["lengths"] is not None:
        raise
      logging.info(
        "Task %s needs sequence lengths in its preprocessors (%s).", self.name, e
      )
      st["lengths"], st["reader"] = True, None
      return self._read_window()
    if st["lengths"] is None:
      st["lengths"] = False
    self.records_read += len(raw)
    self._window_records = len(raw)
    self._epoch_ended = len(raw) < self.options.window
    # An empty target teaches nothing; skipped as in materialize.
    rows = [ex for ex in raw if len(ex[1])]
    key = [self.seed, mixing.stable_hash(self.name), self.shard_index]
    order = np.random.default_rng([*key, st["epoch"], st["window"]]).permutation(
      len(rows)
    )
    self._window = [rows[i] for i in order]

  def _advance_window(self) -> None:
    """Moves to the next window (the next epoch after a short one)."""
    st = self._state
    st["skipped"] += self._window_skipped
    st["epoch_examples"] += len(self._window)
    st["epoch_records"] = st.get("epoch_records", 0) + self._window_records
    if not self._epoch_ended:
      st["window"] += 1
      st["reader"] = _save_iterator(self._iterator)
    else:
      if st["epoch_examples"] == 0:
        raise UserError(
          f"Task '{self.name}' has no examples in shard {self.shard_index} of "
          f"{self.num_shards} of split '{self.split}'; check its data (or use "
          "fewer data shards than its files)."
        )
      self._check_epoch_count(st["epoch_records"])
      st["epoch_records"] = 0
      st["epoch"] += 1
      st["window"], st["epoch_examples"], st["reader"] = 0, 0, None
      self._iterator = None
    st["pos"] = 0
    self._window = None
    self._window_skipped = 0

  def _check_epoch_count(self, records: int) -> None:
    """A cached task's epoch must hold the count its stats give: TensorFlow's reader
    ends a file silently at a truncated last record, so a short epoch is the only
    sign of a truncated or missing file (checked with one data shard, where the
    count is the whole split's)."""
    expected = self.num_examples_total
    if not self.cached or self.num_shards != 1 or expected in (None, records):
      return
    where = (
      f"Task '{self.name}' read {records} examples in epoch {self._state['epoch']} "
      f"of split '{self.split}' where its cache stats say {expected}: a file of "
      f"{seqio.utils.get_cached_tfrecord_prefix(self.task.cache_dir, self.split)}-* "
      "is truncated or missing"
    )
    if self.options.on_corrupt == "stop":
      raise UserError(
        f"{where}; rewrite the cache (seqio_cache_tasks), or set "
        "train.stream_on_corrupt = 'skip' to go on."
      )
    logging.warning("%s; going on (train.stream_on_corrupt = 'skip').", where)

  def example(self, cursor: int) -> tuple:
    """(inputs, targets) int32 arrays at stream position ``cursor``, which is the
    position of the last call or the next one."""
    st = self._state
    if cursor == st["cursor"] + 1:
      st["cursor"], st["pos"] = cursor, st["pos"] + 1
    elif cursor != st["cursor"]:
      raise ValueError(
        f"TaskReader {self.name}: cursor {cursor} asked at position {st['cursor']}."
      )
    while True:
      if self._window is None:
        self._read_window()
      if st["pos"] < len(self._window):
        return self._window[st["pos"]]
      self._advance_window()
