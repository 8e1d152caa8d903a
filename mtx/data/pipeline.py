"""From a seqio task or mixture to the batches the train step eats, seekably.

Two layouts, both carrying ``decoder_task_ids`` (task id per target token, -1 on pad):

* **flat** ``[batch, length]``: examples of all tasks, mixed by rate and packed
  together, as T5X trains a seqio mixture.
* **task-major** ``[units, rows_per_unit, length]`` plus ``unit_task`` ``[units]``: every
  unit holds packed rows of one task group only, so ``vmap(grad)`` over units gives one
  gradient per unit at the FLOPs of one gradient, and a segment-sum over ``unit_task``
  gives one gradient per group (README, "Concepts": two batch layouts).

Example, 2 tasks as 2 groups, batch 4, units 2 (rows_per_unit 2), targets length 4:

    unit_task               [1, 0]
    decoder_task_ids  [[[1, 1, 1, -1], [1, 1, -1, -1]],     <- unit 0: task 1 only
                       [[0, 0, 0, 0], [0, 0, -1, -1]]]      <- unit 1: task 0 only

**Determinism and resume.** The batch sequence is a pure function of the seed and
the per-task cursors, and the cursors after batch s are a pure function of (seed, s).
mtx checkpoints the iterator position (``get_state``: k integers per data shard) with
the model, so a restart at step s continues with exactly the batches an uninterrupted
run sees, at O(1) cost: nothing is replayed.

**Multi-host: data shards.** The data is split into ``num_shards`` shards
(``seqio.ShardInfo``); shard s has its own example streams and cursors and builds rows
(flat) or units (task-major) ``[s * B/S, (s+1) * B/S)`` of every global batch. A process
reads only the shards of the batch rows its devices hold (``mtx.parallel.batch_block``:
with the default ``num_shards`` = number of such blocks, one shard per process) and the
trainer assembles the global batch as one ``jax.Array`` sharded over the data axes. So the
batches depend on ``num_shards``, not on how many processes read them: one process that
reads both shards of a 2-shard run builds exactly the batches two processes build, and a
data position saved by one layout restores exactly in the other (``merge_states``).

Every shard runs its own scheduler; in task-major batches shard s starts with a head
start of ``s * units/S`` units (computed by a dry run of its scheduler), so that the
shards stand at successive points of the group sequence instead of all choosing the
same group in the same step: the global batch holds the mixture's groups even when
each shard builds fewer units than there are groups.

**Streamed tasks.** A task too big for memory is read by a ``streaming.TaskReader``
instead of ``materialize.read_task`` (``StreamOptions`` choose which; one mixture may
hold both kinds). The scheduler, packing and task ids are the same; a reader serves
the cursors in order and its own position (a few ints and a tf.data iterator
checkpoint) joins the shard's cursors in ``get_state``, so resume stays exact and
reads nothing before the saved position.
"""

import dataclasses
import logging
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import seqio

from mtx.data import materialize, mixing, packing, registry, streaming
from mtx.errors import UserError


@dataclasses.dataclass(frozen=True)
class Layout:
  """The global shape of a batch.

  Attributes:
    batch_size: global number of rows.
    units: global number of task-major units; 0 for the flat layout.
    inputs_length, targets_length: row lengths.
  """

  batch_size: int
  units: int
  inputs_length: int
  targets_length: int

  @property
  def task_major(self) -> bool:
    return self.units > 0

  @property
  def rows_per_unit(self) -> int:
    return self.batch_size // self.units if self.units else self.batch_size


def check_feature_lengths(
  feature_lengths: Mapping[str, int], what: str = "TASK_FEATURE_LENGTHS"
) -> dict:
  """Validates feature lengths (``what`` names the setting): positive 'inputs' and
  'targets' ints."""
  if not isinstance(feature_lengths, Mapping):
    raise UserError(
      f"{what} must be a dict like {{'inputs': 64, "
      f"'targets': 32}} (got {feature_lengths!r})."
    )
  out = {}
  for key in ("inputs", "targets"):
    value = feature_lengths.get(key)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise UserError(
        f"{what}['{key}'] must be a positive integer (got "
        f"{value!r}); set e.g. --gin.{what}=\"{{'inputs': "
        "64, 'targets': 32}\"."
      )
    out[key] = int(value)
  return out


def check_layout(layout: Layout, num_shards: int) -> None:
  """Checks the batch splits evenly into units and data shards (>= 1 per process)."""
  if layout.batch_size <= 0:
    raise UserError(f"BATCH_SIZE must be positive (got {layout.batch_size}).")
  if layout.batch_size % num_shards:
    raise UserError(
      f"BATCH_SIZE {layout.batch_size} is not divisible by the "
      f"{num_shards} data shards (processes); choose a multiple of "
      f"{num_shards}."
    )
  if layout.units:
    if layout.batch_size % layout.units:
      raise UserError(
        f"BATCH_SIZE {layout.batch_size} is not divisible by UNITS "
        f"{layout.units}; choose UNITS that divides it."
      )
    if layout.units % num_shards:
      raise UserError(
        f"UNITS {layout.units} is not divisible by the {num_shards} data "
        f"shards (processes); choose a multiple of {num_shards}."
      )


def local_shards(
  process_index: int, process_count: int, num_shards: Optional[int] = None
) -> range:
  """The data shards one process reads: a contiguous run, so its rows are contiguous.

  ``process_index``/``process_count`` count the processes that feed distinct batch
  rows (``mtx.parallel.batch_block``); ``num_shards`` defaults to ``process_count``.
  """
  num_shards = process_count if num_shards is None else num_shards
  if num_shards < 1 or num_shards % process_count:
    raise UserError(
      f"The number of data shards ({num_shards}) must be a positive "
      f"multiple of the {process_count} processes that read data; set "
      f"train.data_shards to a multiple of {process_count}."
    )
  per = num_shards // process_count
  return range(process_index * per, (process_index + 1) * per)


class _StaggeredScheduler(mixing.DeficitScheduler):
  """A deficit scheduler whose group choice counts ``head_start`` extra examples.

  The head start moves the shard to a later point of the group sequence (see the
  module docstring); the cursors, which index the example streams, are untouched.
  """

  def __init__(self, rates, group_of_task, head_start=None):
    super().__init__(rates, group_of_task)
    self.head_start = (
      np.zeros(len(self.rates), np.int64)
      if head_start is None
      else np.asarray(head_start, np.int64)
    )

  def next_group(self) -> int:
    real = self.cursors
    self.cursors = real + self.head_start
    try:
      return super().next_group()
    finally:
      self.cursors = real


@dataclasses.dataclass(frozen=True)
class LocalTask:
  """A task as this process sees it over its shards: name, examples, truncated."""

  name: str
  num_examples: int
  num_truncated: int

  def __len__(self) -> int:
    return self.num_examples


class _Shard:
  """One data shard: its examples of every task, their streams, and the cursors."""

  def __init__(
    self,
    index: int,
    examples: Sequence,
    rates: np.ndarray,
    group_of_task: Sequence[int],
    seed: int,
    example_fn: Optional[Callable] = None,
  ):
    self.index = index
    self.examples = list(examples)  # materialize.TaskExamples or streaming.TaskReader
    self._example_fn = example_fn  # (inputs, targets) -> (inputs, targets), or None
    self.scheduler = _StaggeredScheduler(rates, group_of_task)
    self.streams = [
      None if _streamed(ex) else mixing.TaskStream(ex.name, len(ex), seed, index)
      for ex in self.examples
    ]

  def readers(self) -> list:
    """The streamed tasks' readers of this shard."""
    return [ex for ex in self.examples if _streamed(ex)]

  def example(self, t: int, cursor: int) -> tuple:
    """(inputs, targets) of task ``t`` at stream position ``cursor``, through the
    pipeline's ``example_fn``."""
    ex = self.examples[t]
    if self.streams[t] is None:
      pair = ex.example(cursor)
    else:
      i = self.streams[t].index(cursor)
      pair = ex.inputs.get(i), ex.targets.get(i)
    return pair if self._example_fn is None else self._example_fn(*pair)

  def fill(self, packer: packing.UnitPacker, group: Optional[int]) -> None:
    """Adds examples (of ``group``, or any task) until the next one does not fit."""
    sched = self.scheduler
    while True:
      t = sched.next_task(group)
      if not packer.try_add(t, *self.example(t, int(sched.cursors[t]))):
        return
      sched.cursors[t] += 1

  def units(self, out: dict, unit_task: np.ndarray, layout: Layout) -> None:
    """Fills ``len(unit_task)`` task-major units in ``out`` ([units, rows, length])."""
    for u in range(len(unit_task)):
      g = self.scheduler.next_group()
      unit_task[u] = g
      self.fill(
        packing.UnitPacker(
          layout.rows_per_unit,
          layout.inputs_length,
          layout.targets_length,
          out={k: v[u] for k, v in out.items()},
        ),
        g,
      )

  def dry_run(self, units: int, layout: Layout) -> np.ndarray:
    """Examples per task that choosing ``units`` units consumes (state restored)."""
    saved = self.scheduler.cursors.copy()
    positions = [r.state() for r in self.readers()]
    scratch = packing.empty_rows(
      layout.rows_per_unit, layout.inputs_length, layout.targets_length
    )
    scratch = {k: v[None] for k, v in scratch.items()}
    for _ in range(units):
      self.units(scratch, np.zeros([1], np.int32), layout)
    consumed = self.scheduler.cursors - saved
    self.scheduler.cursors = saved
    for reader, position in zip(self.readers(), positions):
      reader.restore(position)
    return consumed


class Pipeline:
  """Builds this process's part of every batch from materialised task examples.

  Args:
    spec: the resolved mixture.
    examples: one shard's ``TaskExamples`` (one per task, in task-id order), or a
      mapping ``{shard index: [TaskExamples per task]}`` for the shards this process
      reads (``local_shards``).
    rates: f64[k] example shares (``mixing.compute_rates``), the same in every process.
    layout: the global batch layout.
    seed: data seed.
    process_index, process_count: with a plain list of examples, its shard index and
      the number of shards.
    num_shards: the number of shards when ``examples`` is a mapping.
    example_fn: ``(inputs, targets) -> (inputs, targets)`` applied to every example
      before packing, within the feature lengths (a chat template,
      ``mtx.data.chat_template``); None = the examples as read.
  """

  def __init__(
    self,
    spec: registry.MixtureSpec,
    examples,
    rates: np.ndarray,
    layout: Layout,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    *,
    num_shards: Optional[int] = None,
    example_fn: Optional[Callable] = None,
  ):
    if not isinstance(examples, Mapping):
      examples, num_shards = {process_index: examples}, process_count
    num_shards = len(examples) if num_shards is None else num_shards
    check_layout(layout, num_shards)
    self.spec = spec
    self.layout = layout
    self.num_shards = num_shards
    self.rates = np.asarray(rates)
    self.shards = [
      _Shard(i, examples[i], self.rates, spec.group_of_task, seed, example_fn)
      for i in sorted(examples)
    ]
    if len(self.shards) == 1:
      self.examples = self.shards[0].examples
    else:
      self.examples = [
        LocalTask(
          exs[0].name,
          sum(len(e) for e in exs),
          -1
          if any(e.num_truncated < 0 for e in exs)
          else sum(e.num_truncated for e in exs),
        )
        for exs in zip(*(s.examples for s in self.shards))
      ]
    self.batches = 0
    if layout.task_major:
      per_shard = layout.units // num_shards
      for s in self.shards:
        if s.index:
          s.scheduler.head_start = s.dry_run(s.index * per_shard, layout)

  # ---- state ---------------------------------------------------------------------
  def get_state(self) -> dict:
    """The position after the last batch: JSON-able, k ints per shard + a counter.

    ``cursors`` (summed over this process's shards) is what logs use; ``shards``
    holds each shard's cursors and example counts, which is what restores.
    """
    names = [ex.name for ex in self.examples]
    return {
      "batches": self.batches,
      "num_shards": self.num_shards,
      "cursors": {
        n: int(c)
        for n, c in zip(names, np.sum([s.scheduler.cursors for s in self.shards], axis=0))
      },
      "shards": {
        str(s.index): {
          "cursors": {n: int(c) for n, c in zip(names, s.scheduler.cursors)},
          "examples": {n: len(ex) for n, ex in zip(names, s.examples)},
          "streams": {r.name: r.state() for r in s.readers()},
        }
        for s in self.shards
      },
    }

  def set_state(self, state: Mapping) -> None:
    """Continues from ``state`` (``get_state``, or ``merge_states`` of all processes).

    Saved with the same number of shards, the position is exact. Saved with a
    different number, every task's examples consumed so far are split evenly over
    the new shards (same epochs and mixing position; other examples, so not exact).
    """
    state = merge_states([state])
    shards = state["shards"]
    names = [ex.name for ex in self.examples]
    missing = sorted(
      {n for sh in shards.values() for n in names if n not in sh["cursors"]}
    )
    if missing:
      raise UserError(
        f"The checkpoint's data position has no cursor for task(s) "
        f"{missing}: the mixture changed since it was saved; restart in "
        "a new MODEL_DIR or keep the mixture's tasks."
      )
    self.batches = int(state["batches"])
    if state["num_shards"] == self.num_shards and all(
      str(s.index) in shards for s in self.shards
    ):
      for s in self.shards:
        saved = shards[str(s.index)]
        s.scheduler.cursors = np.array(
          [int(saved["cursors"][n]) for n in names], np.int64
        )
        _restore_readers(s, saved.get("streams", {}))
      return
    if len(shards) != state["num_shards"]:
      logging.warning(
        "The checkpoint's data position lacks some of its %d shards; "
        "the data order restarts from the beginning.",
        state["num_shards"],
      )
      return
    totals = np.array(
      [sum(int(s["cursors"][n]) for s in shards.values()) for n in names], np.int64
    )
    logging.warning(
      "The checkpoint's data position has %d data shards and this run "
      "%d: each task's %s examples consumed so far are split evenly over "
      "the new shards (same epochs, not the same examples). Set "
      "train.data_shards=%d to continue exactly.",
      state["num_shards"],
      self.num_shards,
      totals.tolist(),
      state["num_shards"],
    )
    for s in self.shards:
      s.scheduler.cursors = totals // self.num_shards + (
        s.index < totals % self.num_shards
      )
      _restore_readers(s, {})

  def epochs(self) -> dict:
    """Completed passes over each task's data (this process's shards), as a float."""
    cursors = np.sum([s.scheduler.cursors for s in self.shards], axis=0)
    return {ex.name: float(c) / len(ex) for ex, c in zip(self.examples, cursors)}

  # ---- batches -------------------------------------------------------------------
  def next_batch(self) -> dict:
    """This process's part of the next batch, as numpy int32 arrays.

    Returns (S_local = this process's shards, S = all shards):
      flat: features [batch * S_local/S, length];
      task-major: features [units * S_local/S, rows_per_unit, length] and
        ``unit_task`` int32 [units * S_local/S], the group id of each unit.
      Shard by shard in shard order, each shard's rows contiguous.
    """
    lay = self.layout
    n = len(self.shards)
    if lay.task_major:
      per = lay.units // self.num_shards
      out = packing.empty_rows(
        n * per * lay.rows_per_unit, lay.inputs_length, lay.targets_length
      )
      out = {k: v.reshape(n * per, lay.rows_per_unit, -1) for k, v in out.items()}
      unit_task = np.zeros([n * per], np.int32)
      for j, shard in enumerate(self.shards):
        part = slice(j * per, (j + 1) * per)
        shard.units({k: v[part] for k, v in out.items()}, unit_task[part], lay)
      out["unit_task"] = unit_task
    else:
      per = lay.batch_size // self.num_shards
      out = packing.empty_rows(n * per, lay.inputs_length, lay.targets_length)
      for j, shard in enumerate(self.shards):
        part = slice(j * per, (j + 1) * per)
        shard.fill(
          packing.UnitPacker(
            per,
            lay.inputs_length,
            lay.targets_length,
            out={k: v[part] for k, v in out.items()},
          ),
          None,
        )
    self.batches += 1
    return out


def _streamed(example_source) -> bool:
  return isinstance(example_source, streaming.TaskReader)


def _restore_readers(shard: _Shard, saved: Mapping) -> None:
  """Puts the shard's readers at their saved positions; a reader without one (the
  task did not stream, or the shards changed) starts its epoch order afresh at the
  shard's cursor."""
  for t, ex in enumerate(shard.examples):
    if not _streamed(ex):
      continue
    cursor = int(shard.scheduler.cursors[t])
    # A reader stands at the scheduler's cursor (the example it peeked did not fit)
    # or one before it (its last example fitted and another task's did not).
    if ex.name in saved and cursor - 1 <= int(saved[ex.name]["cursor"]) <= cursor:
      ex.restore(saved[ex.name])
      continue
    if cursor:
      logging.warning(
        "Task %s streams and the checkpoint holds no stream position for it in "
        "shard %d: its reading order restarts (same cursor and epoch count, not "
        "the same examples).",
        ex.name,
        shard.index,
      )
    ex.restore(ex.start_state(cursor))


def merge_states(states: Sequence[Mapping]) -> dict:
  """One data position from every process's ``get_state`` (shards united).

  Also reads positions saved before data shards existed (one ``cursors`` dict per
  process, process i reading shard i of as many shards as processes).
  """
  merged, batches, num_shards = {}, 0, None
  for i, st in enumerate(states):
    if "shards" in st:
      merged.update(st["shards"])
      num_shards = int(st["num_shards"])
    else:
      merged[str(i)] = {"cursors": dict(st["cursors"])}
      num_shards = len(states)
    batches = max(batches, int(st.get("batches", 0)))
  return {"batches": batches, "num_shards": num_shards or 1, "shards": merged}


def _streamed_counts(
  spec: registry.MixtureSpec, split: str, stream: streaming.StreamOptions, rate_fn: str
) -> dict:
  """``{name: example count or None}`` of the tasks that stream; rates from example
  counts need every streamed task's count (never read)."""
  if stream.cache_dirs:  # before asking tasks for their cache
    seqio.add_global_cache_dirs(list(stream.cache_dirs))
  streaming.check_patterns(spec.task_names, stream)
  streamed = {
    t.name: streaming.example_count(t, split, stream.use_cached)
    for t in spec.tasks
    if streaming.should_stream(t, split, stream)
  }
  unknown = sorted(n for n, c in streamed.items() if c is None)
  if unknown and rate_fn in ("examples_proportional", "temperature"):
    raise UserError(
      f"Task(s) {', '.join(unknown)} stream and their example counts are unknown, "
      f"which rate_fn '{rate_fn}' needs; cache them (seqio_cache_tasks writes the "
      "counts), give their source num_input_examples, or set train.rate_fn = "
      "'mixture' with explicit rates."
    )
  return streamed


def _global_counts(
  local: np.ndarray, process_index: int, allgather: Optional[Callable]
) -> np.ndarray:
  """Examples per task over all shards: a sum over distinct readers' local counts."""
  if allgather is None:
    return local
  mine = np.concatenate([[process_index], local]).astype(np.int64)
  rows = np.asarray(allgather(mine))
  by_reader = {int(r[0]): r[1:] for r in rows.reshape(-1, len(local) + 1)}
  return np.sum(list(by_reader.values()), axis=0)


def load(
  name: str,
  feature_lengths: Mapping[str, int],
  layout: Layout,
  *,
  split: str = "train",
  seed: int = 0,
  rate_fn: str = "mixture",
  rate_maximum: float | None = None,
  rate_temperature: float = 1.0,
  task_groups: Mapping[str, str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_shards: Optional[int] = None,
  allgather: Optional[Callable] = None,
  stream: Optional[streaming.StreamOptions] = None,
  example_fn: Optional[Callable] = None,
) -> Pipeline:
  """Resolves ``name``, reads this process's shards of every task, returns a Pipeline.

  Args:
    process_index, process_count: this process's place among the processes that feed
      distinct batch rows (``mtx.parallel.batch_block``; processes whose devices hold
      the same rows read the same shards).
    num_shards: data shards (a multiple of ``process_count``; default one per process).
    allgather: with several processes, ``multihost_utils.process_allgather`` (called
      once by every process): rates then use every shard's example counts.
    stream: which tasks stream (``streaming.StreamOptions``); None = the defaults
      (tasks whose files exceed 1 GiB).
    example_fn: see ``Pipeline``.
  Other arguments: see ``mixing.compute_rates`` and ``materialize.read_task``.
  """
  lengths = check_feature_lengths(feature_lengths)
  if seed < 0:
    raise UserError(
      f"The data seed must be >= 0 (got {seed}); set train.seed (or "
      "train.data_seed) to 0 or more."
    )
  shard_ids = local_shards(process_index, process_count, num_shards)
  num_shards = process_count if num_shards is None else num_shards
  check_layout(layout, num_shards)  # before the (slow) read, not only in Pipeline
  spec = registry.resolve(name, task_groups)
  stream = streaming.StreamOptions() if stream is None else stream
  streamed = _streamed_counts(spec, split, stream, rate_fn)
  examples = {
    s: [
      streaming.TaskReader(
        t, split, lengths, s, num_shards, seed, stream, streamed[t.name]
      )
      if t.name in streamed
      else materialize.read_task(t, split, lengths, s, num_shards)
      for t in spec.tasks
    ]
    for s in shard_ids
  }
  local = np.sum(
    [[0 if _streamed(e) else len(e) for e in exs] for exs in examples.values()],
    axis=0,
  )
  logging.info(
    "Data shard(s) %s of %d read here: %s examples; streamed: %s.",
    list(shard_ids),
    num_shards,
    {n: int(c) for n, c in zip(spec.task_names, local) if n not in streamed},
    streamed or "none",
  )
  counts = _global_counts(local, process_index, allgather)
  counts = np.array(
    [
      streamed.get(n) or 0 if n in streamed else c
      for n, c in zip(spec.task_names, counts)
    ],
    np.int64,
  )
  rates = mixing.compute_rates(
    rate_fn, spec.seqio_rates, counts, rate_maximum, rate_temperature
  )
  return Pipeline(
    spec, examples, rates, layout, seed, num_shards=num_shards, example_fn=example_fn
  )
