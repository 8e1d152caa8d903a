"""The one exception type for mistakes a user can fix.

A ``UserError`` carries one sentence: what was wrong, where, and what to do. The CLI
prints it without a traceback and exits with status 2; library code raises it at the
boundary where bad input is first seen, before anything is written.
"""

import difflib
from typing import Iterable


class UserError(ValueError):
  """A mistake in configuration or input that the user can fix; str() is the message.

  A ValueError, so that library users catching ValueError (the usual exception for
  a bad argument) also catch ``mtx.mtl``'s shape and argument errors; the CLI still
  prints it as one sentence.
  """


def close_names(name: str, candidates: Iterable[str], n: int = 3) -> str:
  """Returns ' (did you mean: a, b?)' for the closest candidates, or '' if none is close."""
  matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
  return f" (did you mean: {', '.join(matches)}?)" if matches else ""


def check_int(name: str, value, minimum: int, optional: bool = False) -> None:
  """Raises a UserError unless ``value`` is an int >= ``minimum`` (or None if optional).

  ``name`` is what the user set (``TRAIN_STEPS``, ``train.seed``); gin passes a quoted
  number as a string and ``8.0`` as a float, which would fail far from the setting.
  """
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int):
    shown = repr(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
      fix = f"write {value.strip()} without quotes"
    elif isinstance(value, float) and value.is_integer():
      fix = f"write {int(value)}"
    else:
      fix = "give a whole number"
    raise UserError(
      f"{name} must be an integer (got {shown}, a {type(value).__name__}); {fix}."
    )
  if value < minimum:
    what = "positive" if minimum == 1 else f">= {minimum}"
    raise UserError(f"{name} must be {what} (got {value}).")
