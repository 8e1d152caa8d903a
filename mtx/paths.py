"""Paths the user gives (MODEL_DIR, VOCABULARY, INFER_INPUT, ...), made absolute once.

Every command turns the paths of its settings into absolute ones where they enter
(``mtx.train.settings``, ``mtx.cli.evaluate``, ``mtx.cli.infer``), so that nothing
downstream depends on the working directory (orbax wants absolute paths; a relative
MODEL_DIR used to fail at the first checkpoint) and ``~`` means the home directory, as
it does in a shell, not a folder named ``~``.
"""

import os
from typing import Optional


def absolute(path: Optional[str]) -> Optional[str]:
  """``path`` with ``~`` expanded, made absolute against the working directory.

  None, '' and URLs with a scheme (``gs://bucket/run``) are returned as they are; a
  ``pathlib.Path`` becomes a ``str``.
  """
  if isinstance(path, os.PathLike):
    path = os.fspath(path)
  if not isinstance(path, str) or not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))
