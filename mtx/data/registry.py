"""Resolves a seqio task or mixture name into mtx's view of it: tasks, ids and groups.

Any plain ``seqio.Task`` or ``seqio.Mixture`` works: mtx never asks for a special
subclass or an extra feature. Task ids are the positions of the leaf task names in
sorted order, so the id-to-name map is stable across runs and machines:

    mixture "demo" = {demo_sort: 1, demo_copy: 2, demo_add: 1}
    ->  task_names = ("demo_add", "demo_copy", "demo_sort"), ids 0, 1, 2

Task groups (for many tasks) map task names to group names; groups are numbered the
same way (sorted names). Without a mapping every task is its own group.
"""

import dataclasses
import fnmatch
import importlib
import importlib.util
import traceback
from typing import Mapping, Optional, Sequence

import seqio

from mtx.data import vocab
from mtx.errors import UserError, close_names


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  """The leaf tasks of a mixture, their seqio rates, ids and groups.

  Attributes:
    name: the registered task or mixture name.
    tasks: leaf ``seqio.Task`` objects sorted by name; a task's id is its index.
    seqio_rates: f64 rates as seqio's ``Mixture.get_rate`` gives them (unnormalised;
      1.0 for a single task). Rate functions that need example counts are resolved
      later, once the examples are read (see ``mtx.data.mixing``).
    group_names: sorted group names; ``group_of_task[i]`` is task i's group id.
    group_of_task: tuple of group ids, one per task.
  """

  name: str
  tasks: tuple
  seqio_rates: tuple
  group_names: tuple
  group_of_task: tuple

  @property
  def task_names(self) -> tuple:
    return tuple(t.name for t in self.tasks)

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def num_groups(self) -> int:
    return len(self.group_names)

  @property
  def vocabulary(self) -> seqio.Vocabulary:
    return self.tasks[0].output_features["targets"].vocabulary

  @property
  def output_features(self) -> Mapping[str, seqio.Feature]:
    return self.tasks[0].output_features


def import_modules(
  modules: Sequence[str] | str | None, vocabulary_path: Optional[str] = None
) -> None:
  """Imports user modules that register tasks (``MIXTURE_OR_TASK_MODULE``).

  Tasks they build on the default vocabulary (``vocab.get_vocabulary()``) get
  ``vocabulary_path`` (gin's ``VOCABULARY``), checked first; None keeps the default.
  """
  if vocabulary_path:
    vocab.get_vocabulary(vocabulary_path)  # fails early and clearly if bad
  if not modules:
    return
  if isinstance(modules, str):
    modules = [m for m in modules.replace(",", " ").split() if m]
  for module in modules:
    try:
      with vocab.default_vocabulary_path(vocabulary_path):
        importlib.import_module(module)
    except UserError:
      raise
    except ModuleNotFoundError as e:
      raise UserError(
        f"MIXTURE_OR_TASK_MODULE '{module}' could not be imported ({e}); check the "
        "module name and that its folder is on PYTHONPATH or installed."
      ) from e
    except SyntaxError as e:
      raise UserError(
        f"MIXTURE_OR_TASK_MODULE '{module}' has a syntax error at "
        f"{e.filename}:{e.lineno} ({e.msg}); fix that line."
      ) from e
    except Exception as e:  # pylint: disable=broad-except  # the user's own code
      raise UserError(
        f"MIXTURE_OR_TASK_MODULE '{module}' raised {type(e).__name__} at "
        f"{_where(module, e)}: {' '.join(str(e).split())}; fix the module."
      ) from e


def _where(module: str, error: BaseException) -> str:
  """'file:line' in ``module``'s own file where ``error`` was raised (or the last
  frame of the traceback when the module's file is not in it)."""
  frames = traceback.extract_tb(error.__traceback__)
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    spec = None
  own = [f for f in frames if spec is not None and f.filename == spec.origin]
  frame = (own or frames or [None])[-1]
  if frame is None:
    return module
  code = (frame.line or "").strip()
  code = f" ({code[:117]}...)" if len(code) > 120 else (f" ({code})" if code else "")
  return f"{frame.filename}:{frame.lineno}{code}"


def _registered_names() -> list:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def resolve(name: str, task_groups: Optional[Mapping[str, str]] = None) -> MixtureSpec:
  """Looks up ``name`` in seqio's registries and checks its tasks can train together.

  Args:
    name: a registered seqio task or mixture name.
    task_groups: optional ``{task name or fnmatch pattern: group name}``. Tasks that
      match no pattern form a group of their own (named after the task).

  Raises:
    UserError: unknown name (with close names), tasks with different vocabularies or
      features, or a mixture without an "inputs"/"targets" pair.
  """
  if name in seqio.MixtureRegistry.names():
    tasks, rates = _mixture_tasks(name)
  elif name in seqio.TaskRegistry.names():
    tasks = (seqio.get_mixture_or_task(name),)
    rates = (1.0,)
  else:
    raise UserError(
      f"No seqio task or mixture is registered as '{name}'"
      f"{close_names(name, _registered_names())}; set MIXTURE_OR_TASK_MODULE to "
      "the module that registers it."
    )
  _check_compatible(name, tasks)
  if all(r <= 0 for r in rates):
    raise UserError(
      f"Every task of mixture '{name}' has rate 0; give at least one a positive rate."
    )
  groups = _group_tasks([t.name for t in tasks], task_groups or {})
  group_names = tuple(sorted(set(groups)))
  group_of_task = tuple(group_names.index(g) for g in groups)
  return MixtureSpec(name, tasks, rates, group_names, group_of_task)


def _mixture_tasks(name: str) -> tuple:
  """(leaf tasks sorted by name, their rates) of mixture ``name``; a task it names
  that is not registered, or a negative rate, is the user's to fix."""
  try:
    mixture = seqio.get_mixture_or_task(name)
    # seqio flattens sub-mixtures (rates multiplied through) into leaf tasks.
    tasks = tuple(sorted(mixture.tasks, key=lambda t: t.name))
  except ValueError as e:
    missing = str(e).split("Provider name not registered:")[-1].strip()
    if "not registered" not in str(e):
      raise
    raise UserError(
      f"Mixture '{name}' names '{missing}', which is not a registered task or "
      f"mixture{close_names(missing, _registered_names())}; register it (in "
      "MIXTURE_OR_TASK_MODULE) or fix the mixture."
    ) from e
  rates = tuple(float(mixture.get_rate(t)) for t in tasks)
  negative = [t.name for t, r in zip(tasks, rates) if r < 0]
  if negative:
    raise UserError(
      f"Mixture '{name}' gives task(s) {', '.join(negative)} a negative rate "
      f"({', '.join(str(r) for r in rates if r < 0)}); rates must be >= 0."
    )
  return tasks, rates


def _check_compatible(name: str, tasks: Sequence[seqio.Task]) -> None:
  first = tasks[0]
  for key in ("inputs", "targets"):
    if key not in first.output_features:
      raise UserError(
        f"Task '{first.name}' has no '{key}' output feature (it has "
        f"{sorted(first.output_features)}); mtx trains encoder-decoder models on "
        "inputs -> targets."
      )
  for task in tasks[1:]:
    if set(task.output_features) != set(first.output_features):
      raise UserError(
        f"Tasks '{first.name}' and '{task.name}' in '{name}' have different output "
        f"features ({sorted(first.output_features)} vs "
        f"{sorted(task.output_features)}); give them the same features."
      )
    for key, feature in first.output_features.items():
      other = task.output_features[key]
      if other.vocabulary != feature.vocabulary:
        raise UserError(
          f"Tasks '{first.name}' and '{task.name}' in '{name}' use different "
          f"vocabularies for '{key}'; a mixture must share one vocabulary."
        )


def _group_tasks(task_names: Sequence[str], task_groups: Mapping[str, str]) -> list:
  groups, used = [], set()
  for task in task_names:
    group = task
    for pattern, g in task_groups.items():
      if task == pattern or fnmatch.fnmatchcase(task, pattern):
        group = g
        used.add(pattern)
        break
    groups.append(group)
  for pattern in task_groups:
    if pattern not in used:
      raise UserError(
        f"train.task_groups pattern '{pattern}' matches no task"
        f"{close_names(pattern, task_names)}; fix it or remove it."
      )
  return groups
