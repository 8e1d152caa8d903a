"""A one-line progress bar on stderr: step, steps/s, ETA and per-task losses.

Example of the line it redraws (with a carriage return) as training goes::

  [#######.............]  3500/10000  12.4 steps/s  ETA 0:08:44  loss/cola 2.051  ...

It is off by default when stderr is not a terminal (logs, CI), so that log files do not
fill with carriage returns.
"""

import shutil
import sys
import time
from typing import Mapping, TextIO

_BAR_WIDTH = 20
_MIN_REDRAW_S = 0.1


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
    eta = _format_duration((self._total - done) / rate) if rate > 0 else "?"
    width = len(str(self._total))
    parts = [
      f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]",
      f"{step:>{width}}/{self._total}",
      f"{rate:.1f} steps/s",
      f"ETA {eta}",
    ]
    parts += [f"{name} {float(value):.3f}" for name, value in info.items()]
    text = "  ".join(parts)
    columns = shutil.get_terminal_size((120, 24)).columns
    return text[: max(columns - 1, 20)]

  def close(self) -> None:
    """Ends the line so that later output starts on a fresh one."""
    if self._drawn:
      self._stream.write("\n")
      self._stream.flush()
      self._drawn = False


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"
