"""From a seqio task or mixture to the batches the train step eats, seekably.

Two layouts, both carrying ``decoder_task_ids`` (task id per target token, -1 on pad):

* **flat** ``[batch, length]``: examples of all tasks, mixed by rate and packed
  together, as T5X trains a seqio mixture.
* **task-major** ``[units, rows_per_unit, length]`` plus ``unit_task`` ``[units]``: every
  unit holds packed rows of one task group only, so ``vmap(grad)`` over units gives one
  gradient per unit at the FLOPs of one gradient, and a segment-sum over ``unit_task``
  gives one gradient per group (DESIGN.md, "Per-task gradients, cheaply").

Example, 2 tasks as 2 groups, batch 4, units 2 (rows_per_unit 2), targets length 4:

    unit_task               [1, 0]
    decoder_task_ids  [[[1, 1, 1, -1], [1, 1, -1, -1]],     <- unit 0: task 1 only
                       [[0, 0, 0, 0], [0, 0, -1, -1]]]      <- unit 1: task 0 only

**Determinism and resume.** The batch sequence is a pure function of the seed and
the per-task cursors, and the cursors after batch s are a pure function of (seed, s).
mtx checkpoints the iterator position (``get_state``: k integers per host) with the
model, so a restart at step s continues with exactly the batches an uninterrupted run
sees, at O(1) cost: nothing is replayed.

**Multi-host.** Each process reads only its shard of every task (``seqio.ShardInfo``
from ``jax.process_index()``/``process_count()``), builds its own rows (flat) or units
(task-major) with its own cursors, and the trainer assembles the global batch as one
``jax.Array`` sharded over the mesh's data axes.
"""

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from mtx.data import materialize, mixing, packing, registry
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


def check_feature_lengths(feature_lengths: Mapping[str, int]) -> dict:
  """Validates TASK_FEATURE_LENGTHS: needs positive 'inputs' and 'targets' ints."""
  if not isinstance(feature_lengths, Mapping):
    raise UserError(f"TASK_FEATURE_LENGTHS must be a dict like {{'inputs': 64, "
                    f"'targets': 32}} (got {feature_lengths!r}).")
  out = {}
  for key in ("inputs", "targets"):
    value = feature_lengths.get(key)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise UserError(f"TASK_FEATURE_LENGTHS['{key}'] must be a positive integer (got "
                      f"{value!r}); set e.g. --gin.TASK_FEATURE_LENGTHS=\"{{'inputs': "
                      "64, 'targets': 32}\".")
    out[key] = int(value)
  return out


def check_layout(layout: Layout, process_count: int) -> None:
  """Checks the batch splits evenly into units and processes."""
  if layout.batch_size <= 0:
    raise UserError(f"BATCH_SIZE must be positive (got {layout.batch_size}).")
  if layout.batch_size % process_count:
    raise UserError(f"BATCH_SIZE {layout.batch_size} is not divisible by the "
                    f"{process_count} processes; choose a multiple of {process_count}.")
  if layout.units:
    if layout.batch_size % layout.units:
      raise UserError(f"BATCH_SIZE {layout.batch_size} is not divisible by UNITS "
                      f"{layout.units}; choose UNITS that divides it.")
    if layout.units % process_count:
      raise UserError(f"UNITS {layout.units} is not divisible by the {process_count} "
                      f"processes; choose a multiple of {process_count}.")


class Pipeline:
  """Builds this host's part of every batch from materialised task examples.

  Args:
    spec: the resolved mixture.
    examples: this host's ``TaskExamples``, one per task, in task-id order.
    rates: f64[k] example shares (``mixing.compute_rates``).
    layout: the global batch layout.
    seed: data seed.
    process_index, process_count: this host's place among the processes.
  """

  def __init__(self, spec: registry.MixtureSpec, examples: Sequence[materialize.TaskExamples],
               rates: np.ndarray, layout: Layout, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    check_layout(layout, process_count)
    self.spec = spec
    self.examples = list(examples)
    self.layout = layout
    self.process_index = process_index
    self.process_count = process_count
    self.scheduler = mixing.DeficitScheduler(rates, spec.group_of_task)
    self.streams = [mixing.TaskStream(ex.name, len(ex), seed, process_index)
                    for ex in self.examples]
    self.batches = 0
    self.rates = np.asarray(rates)

  # ---- state ---------------------------------------------------------------------
  def get_state(self) -> dict:
    """The iterator position after the last batch: JSON-able, k ints + a counter."""
    return {"batches": self.batches,
            "cursors": {ex.name: int(c) for ex, c in
                        zip(self.examples, self.scheduler.cursors)}}

  def set_state(self, state: Mapping) -> None:
    cursors = state["cursors"]
    missing = [ex.name for ex in self.examples if ex.name not in cursors]
    if missing:
      raise UserError(f"The checkpoint's data position has no cursor for task(s) "
                      f"{missing}: the mixture changed since it was saved; restart in "
                      "a new MODEL_DIR or keep the mixture's tasks.")
    self.scheduler.cursors = np.array([int(cursors[ex.name]) for ex in self.examples],
                                      np.int64)
    self.batches = int(state["batches"])

  def epochs(self) -> dict:
    """Completed passes over each task's (host shard of) data, as a float."""
    return {ex.name: float(c) / len(ex)
            for ex, c in zip(self.examples, self.scheduler.cursors)}

  # ---- batches -------------------------------------------------------------------
  def _fill(self, packer: packing.UnitPacker, group: Optional[int]) -> None:
    sched = self.scheduler
    while True:
      t = sched.next_task(group)
      ex = self.examples[t]
      i = self.streams[t].index(int(sched.cursors[t]))
      if not packer.try_add(t, ex.inputs.get(i), ex.targets.get(i)):
        return
      sched.cursors[t] += 1

  def next_batch(self) -> dict:
    """This host's part of the next batch, as numpy int32 arrays.

    Returns:
      flat: features [batch/processes, length];
      task-major: features [units/processes, rows_per_unit, length] and
        ``unit_task`` int32 [units/processes], the group id of each unit.
    """
    lay = self.layout
    if lay.task_major:
      units = lay.units // self.process_count
      out = packing.empty_rows(units * lay.rows_per_unit, lay.inputs_length,
                               lay.targets_length)
      out = {k: v.reshape(units, lay.rows_per_unit, -1) for k, v in out.items()}
      unit_task = np.zeros([units], np.int32)
      for u in range(units):
        g = self.scheduler.next_group()
        unit_task[u] = g
        self._fill(packing.UnitPacker(lay.rows_per_unit, lay.inputs_length,
                                      lay.targets_length,
                                      out={k: v[u] for k, v in out.items()}), g)
      out["unit_task"] = unit_task
    else:
      rows = lay.batch_size // self.process_count
      packer = packing.UnitPacker(rows, lay.inputs_length, lay.targets_length)
      self._fill(packer, None)
      out = packer.arrays
    self.batches += 1
    return out


def load(name: str, feature_lengths: Mapping[str, int], layout: Layout, *,
         split: str = "train", seed: int = 0, rate_fn: str = "mixture",
         rate_maximum: float | None = None, rate_temperature: float = 1.0,
         task_groups: Mapping[str, str] | None = None, process_index: int = 0,
         process_count: int = 1) -> Pipeline:
  """Resolves ``name``, reads this host's shard of every task, and returns a Pipeline."""
  lengths = check_feature_lengths(feature_lengths)
  check_layout(layout, process_count)  # before the (slow) read, not only in Pipeline
  spec = registry.resolve(name, task_groups)
  examples = [materialize.read_task(t, split, lengths, process_index, process_count)
              for t in spec.tasks]
  rates = mixing.compute_rates(rate_fn, spec.seqio_rates, [len(e) for e in examples],
                               rate_maximum, rate_temperature)
  return Pipeline(spec, examples, rates, layout, seed, process_index, process_count)
