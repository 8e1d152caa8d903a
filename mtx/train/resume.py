"""What a resumed run checks against the run it continues (MODEL_DIR's own files).

A run keeps its task set: the checkpoint's per-task state (data cursors, the mtl
methods' k-sized state, the task ids of metrics.jsonl) belongs to those tasks, so a
launch on fewer, more or renamed tasks is refused, with the two ways on. Settings
that may change on resume (the learning rate, the steps, the batch) are reported,
so that a changed flag is never a surprise:

    MODEL_DIR/tasks.json   {"mixture": "demo", "tasks": [{"id": 0, "name": ...}, ...]}
    MODEL_DIR/config.gin   the previous launch's operative gin configuration
"""

import json
import re
from typing import Optional, Sequence

from mtx import paths
from mtx.errors import UserError

TASKS_FILE = "tasks.json"
CONFIG_FILE = "config.gin"


def saved_task_names(model_dir: str) -> Optional[list]:
  """The task names of MODEL_DIR/tasks.json in id order; None without one (a run
  from before tasks.json) or with one that is not mtx's JSON.

  Raises:
    UserError: tasks.json exists but cannot be read (a permission or a transient
      remote error), so the task-set check is not skipped in silence.
  """
  file = paths.join(model_dir, TASKS_FILE)
  if not paths.exists(file):
    return None
  try:
    text = paths.read_text(file)
  except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise their own
    raise UserError(
      f"{file} exists but cannot be read ({e}); fix its access and restart, so the "
      "resumed run can be checked against the tasks it was trained on."
    ) from e
  try:
    info = json.loads(text)
    return [t["name"] for t in sorted(info["tasks"], key=lambda t: t["id"])]
  except (ValueError, KeyError, TypeError):
    return None


def check_task_set(model_dir: str, step: int, task_names: Sequence[str]) -> None:
  """Refuses to resume MODEL_DIR's checkpoint at ``step`` on another task set.

  Raises:
    UserError: the tasks differ from the saved tasks.json (fewer, more or renamed).
  """
  saved = saved_task_names(model_dir)
  if saved is None or list(saved) == list(task_names):
    return
  gone = [t for t in saved if t not in task_names]
  new = [t for t in task_names if t not in saved]
  change = " and ".join(
    part
    for part in (
      f"without {', '.join(gone)}" if gone else "",
      f"with {', '.join(new)} added" if new else "",
    )
    if part
  )
  raise UserError(
    f"MODEL_DIR {model_dir} holds a run at step {step} on tasks {', '.join(saved)} "
    f"and this launch is {change}; a run keeps its tasks, so start a new run in "
    "another MODEL_DIR, or fine-tune from this one there with "
    f"--gin.INITIAL_CHECKPOINT_PATH=\"'{model_dir}'\"."
  )


def _bindings(text: str) -> dict:
  """{'selector.param' or 'MACRO': value text} of an operative gin config."""
  out, key = {}, None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    m = re.match(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$", line)
    if m and not line[0].isspace():
      key = m.group(1)
      out[key] = m.group(2).strip()
    elif key is not None:  # a value continued over several lines
      out[key] += " " + line.strip()
  return out


def changed_settings(model_dir: str, operative_config: str) -> list:
  """['name: old -> new', ...] for the bindings of both MODEL_DIR/config.gin and
  ``operative_config`` whose values differ (sorted by name)."""
  try:
    before = _bindings(paths.read_text(paths.join(model_dir, CONFIG_FILE)))
  except Exception:  # pylint: disable=broad-except  # no file: gfile and fsspec differ.
    return []
  now = _bindings(operative_config)
  return [
    f"{name}: {before[name]} -> {now[name]}"
    for name in sorted(now)
    if name in before and before[name] != now[name]
  ]
