"""Training progress: a log line per logging period, and a progress bar on a terminal.

The log line goes through Python ``logging`` (logger ``mtx.progress``, at INFO, shown at
the CLI's default level), under ``tee``, ``nohup``, SLURM or a pod's log collector alike::

  step 3500/10000: loss 2.310 (cola 2.051, sst2 2.566); 12.4 steps/s, 25.3k tokens/s, ETA 0:08:44

The bar is redrawn (with a carriage return) every step, at most 10 times a second, with
the latest period's losses, task names shortened (their common prefix dropped) and cut
to the terminal's width::

  [#######.............]  3500/10000  12.4 steps/s  ETA 0:08:44  loss 2.310  cola 2.051  +3

It is off by default when stderr is not a terminal (logs, CI), so that log files do not
fill with carriage returns.
"""

import logging
import os
import shutil
import sys
import time
from typing import Mapping, Sequence, TextIO

_BAR_WIDTH = 20
_MIN_REDRAW_S = 0.1

# Training's own progress (period lines, evaluations, resumes) is shown at the default
# level of the command line (WARNING): this logger's level is INFO whatever the root's.
log = logging.getLogger("mtx.progress")
log.setLevel(logging.INFO)


def format_duration(seconds: float) -> str:
  """``3725.0 -> '1:02:05'``."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def task_labels(names: Sequence[str]) -> list[str]:
  """Short labels of task names: their common prefix (up to a ``_`` or ``.``) dropped.

  >>> task_labels(["glue_cola_v2", "glue_sst2_v2"])
  ['cola_v2', 'sst2_v2']
  """
  if len(names) < 2:
    return list(names)
  prefix = os.path.commonprefix(list(names))
  cut = max(prefix.rfind("_"), prefix.rfind(".")) + 1
  return [n[cut:] or n for n in names]


def _si(value: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.1f}{unit}"
  return f"{value:.0f}"


def log_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
  """The period's line: step, loss, per-task losses, steps/s, tokens/s, ETA.

  ``scalars`` are the period's metrics (``loss``, ``loss/<task>``, ``timing/step_s``,
  ``timing/tokens_per_s``; any may be missing). A task absent from the period is left
  out of the parentheses.
  """
  tasks = [k[len("loss/") :] for k in scalars if k.startswith("loss/")]
  losses = [
    f"{label} {scalars['loss/' + t]:.3f}"
    for t, label in zip(tasks, task_labels(tasks))
    if scalars["loss/" + t] == scalars["loss/" + t]  # not NaN (absent)
  ]
  text = f"step {step}/{total_steps}"
  if "loss" in scalars:
    text += f": loss {scalars['loss']:.3f}"
    if losses:
      text += f" ({', '.join(losses)})"
  rates = []
  step_s = scalars.get("timing/step_s")
  if step_s:
    rates.append(f"{1.0 / step_s:.2f} steps/s")
  if scalars.get("timing/tokens_per_s"):
    rates.append(f"{_si(scalars['timing/tokens_per_s'])} tokens/s")
  if step_s and step < total_steps:
    rates.append(f"ETA {format_duration((total_steps - step) * step_s)}")
  return text + ("; " + ", ".join(rates) if rates else "")


class Progress:
  """Draws training progress; ``update`` is cheap and may be called every step."""

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    enabled: bool | None = None,
    stream: TextIO | None = None,
  ):
    self._stream = stream if stream is not None else sys.stderr
    self.enabled = self._stream.isatty() if enabled is None else enabled
    self._total = max(int(total_steps), 1)
    self._start_step = int(start_step)
    self._start_time = time.monotonic()
    self._last_draw = -float("inf")
    self._drawn = False

  def update(self, step: int, info: Mapping[str, float] | None = None) -> None:
    """Redraws the line for ``step`` (at most 10 times a second, always at the end)."""
    if not self.enabled:
      return
    now = time.monotonic()
    if now - self._last_draw < _MIN_REDRAW_S and step < self._total:
      return
    self._last_draw = now
    self._stream.write("\r" + self.line(step, info or {}, now) + "\x1b[K")
    self._stream.flush()
    self._drawn = True

  def line(self, step: int, info: Mapping[str, float], now: float | None = None) -> str:
    """Returns the text of the bar for ``step``, cut to the terminal's width."""
    now = time.monotonic() if now is None else now
    done = min(max(step, 0), self._total)
    filled = _BAR_WIDTH * done // self._total
    elapsed = now - self._start_time
    rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
    eta = format_duration((self._total - done) / rate) if rate > 0 else "?"
    width = len(str(self._total))
    parts = [
      f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]",
      f"{step:>{width}}/{self._total}",
      f"{rate:.1f} steps/s",
      f"ETA {eta}",
    ]
    columns = max(shutil.get_terminal_size((120, 24)).columns - 1, 20)
    return _fit("  ".join(parts), _loss_parts(info), columns)

  def clear(self) -> None:
    """Erases the bar (before a log line); the next ``update`` draws it again."""
    if self._drawn:
      self._stream.write("\r\x1b[K")
      self._stream.flush()
      self._drawn = False
      self._last_draw = -float("inf")

  def close(self) -> None:
    """Ends the line so that later output starts on a fresh one."""
    if self._drawn:
      self._stream.write("\n")
      self._stream.flush()
      self._drawn = False


def _loss_parts(info: Mapping[str, float]) -> list[str]:
  """'loss 2.310', then 'cola 2.051' per task (NaN: absent from the period, left out)."""
  parts = [f"{k} {float(v):.3f}" for k, v in info.items() if not k.startswith("loss/")]
  tasks = [k for k in info if k.startswith("loss/")]
  labels = task_labels([k[len("loss/") :] for k in tasks])
  parts += [
    f"{label} {float(info[k]):.3f}"
    for k, label in zip(tasks, labels)
    if float(info[k]) == float(info[k])
  ]
  return parts


def _fit(head: str, parts: Sequence[str], columns: int) -> str:
  """``head`` and as many of ``parts`` as fit in ``columns``, then '+N' for the rest."""
  text = head
  for i, part in enumerate(parts):
    more = f"  +{len(parts) - i - 1}" if i < len(parts) - 1 else ""
    if len(text) + 2 + len(part) + len(more) > columns:
      return (text + f"  +{len(parts) - i}")[:columns]
    text += "  " + part
  return text[:columns]
