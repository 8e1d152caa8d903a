"""Mixing rates and the deterministic scheduler that realises them.

**What a rate means.** As in seqio, a task's rate is its share of *examples*: with
rates {a: 2, b: 1}, two thirds of the examples trained on come from a. seqio draws each
example at random with those probabilities; mtx instead picks, for every next example,
the task furthest behind its share (largest ``rate_t * consumed_total - consumed_t``).
The realised shares are then exact up to one example at every point of the run, with no
sampling noise, and the choice is a pure function of the per-task cursors.

In task-major batches a *unit* (a block of rows given to one task or task group) is
filled with examples of one group; the group is the one furthest behind its share of
examples. Long, poorly packing tasks therefore get more units than short ones for the
same rate: a rate is a fraction of examples, not of rows or tokens.

**Rates from gin.** ``rate_fn`` overrides the mixture's own rates:
  - "mixture": seqio's rates (``Mixture.get_rate``, rate functions included);
  - "equal": every task 1;
  - "examples_proportional": ``min(n_t, maximum) ** (1 / temperature)`` with n_t the
    task's number of training examples (seqio's ``mixing_rate_num_examples``);
  - "temperature": the same with ``maximum`` unset.

**Tasks repeat.** A task never runs out (seqio issue 513): its stream is an endless
sequence of epochs, each a fresh permutation of its examples seeded by (seed, task name,
epoch, host), so cursor c of task t is ``examples[perm(epoch=c // n)[c % n]]``.
"""

import zlib
from typing import Sequence

import numpy as np

from mtx.errors import UserError

RATE_FNS = ("mixture", "equal", "examples_proportional", "temperature")


def compute_rates(
  rate_fn: str,
  seqio_rates: Sequence[float],
  num_examples: Sequence[int],
  maximum: float | None = None,
  temperature: float = 1.0,
) -> np.ndarray:
  """Returns normalised example shares f64[k] (summing to 1)."""
  n = np.asarray(num_examples, np.float64)
  if rate_fn == "mixture":
    rates = np.asarray(seqio_rates, np.float64)
  elif rate_fn == "equal":
    rates = np.ones_like(n)
  elif rate_fn in ("examples_proportional", "temperature"):
    if temperature <= 0:
      raise UserError(
        f"Mixing temperature must be > 0 (got {temperature}); set "
        "mixing.temperature to 1 for plain examples-proportional."
      )
    if maximum is not None and maximum <= 0:
      raise UserError(
        f"rate_maximum must be positive (got {maximum}); leave it unset for no cap."
      )
    capped = (
      n if (maximum is None or rate_fn == "temperature") else np.minimum(n, maximum)
    )
    rates = capped ** (1.0 / temperature)
  else:
    raise UserError(
      f"Unknown mixing rate function '{rate_fn}'; use one of {', '.join(RATE_FNS)}."
    )
  if np.any(rates < 0) or rates.sum() <= 0:
    raise UserError(f"Mixing rates {rates.tolist()} must be >= 0 with a positive sum.")
  return rates / rates.sum()


def stable_hash(text: str) -> int:
  """A hash of a task name that is the same in every process and Python version."""
  return zlib.crc32(text.encode("utf-8"))


class TaskStream:
  """An endless, seekable, per-epoch-shuffled order over one task's examples."""

  def __init__(self, name: str, num_examples: int, seed: int, shard: int):
    self.n = num_examples
    self._key = (seed, stable_hash(name), shard)
    self._epoch = -1
    self._perm = None

  def index(self, cursor: int) -> int:
    """The example index at stream position ``cursor``."""
    epoch, pos = divmod(cursor, self.n)
    if epoch != self._epoch:
      rng = np.random.default_rng([*self._key, epoch])
      self._perm = rng.permutation(self.n)
      self._epoch = epoch
    return int(self._perm[pos])


class DeficitScheduler:
  """Chooses the next task (or group) as the one furthest behind its example share.

  State is only the per-task cursors (examples consumed so far), so it checkpoints as
  k integers and resumes exactly.

  Args:
    rates: f64[k] shares of examples per task, summing to 1.
    group_of_task: int[k] group id of each task.
  """

  def __init__(self, rates: np.ndarray, group_of_task: Sequence[int]):
    self.rates = np.asarray(rates, np.float64)
    self.group_of_task = np.asarray(group_of_task, np.int64)
    self.num_groups = int(self.group_of_task.max()) + 1
    self.group_rates = np.bincount(self.group_of_task, self.rates, self.num_groups)
    self.cursors = np.zeros(len(self.rates), np.int64)
    # next_task runs once per example: its masks are computed once here.
    base = np.where(self.rates > 0, 0.0, -np.inf)
    self._task_masks = [base] + [
      np.where(self.group_of_task == g, base, -np.inf) for g in range(self.num_groups)
    ]
    self._group_mask = np.where(self.group_rates > 0, 0.0, -np.inf)

  def _deficit(self) -> np.ndarray:
    total = self.cursors.sum() + 1
    return self.rates * total - self.cursors

  def next_group(self) -> int:
    """The group furthest behind its share (ties: lowest id); never a rate-0 group."""
    total = self.cursors.sum() + 1
    consumed = np.bincount(self.group_of_task, self.cursors, self.num_groups)
    return int(np.argmax(self.group_rates * total - consumed + self._group_mask))

  def next_task(self, group: int | None = None) -> int:
    """The task furthest behind its share, within ``group`` if given."""
    mask = self._task_masks[0 if group is None else group + 1]
    return int(np.argmax(self._deficit() + mask))
