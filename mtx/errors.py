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
