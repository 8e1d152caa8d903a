"""Keeps TensorFlow's start-up notices off stderr (mtx uses TF for data and events only).

Importing TensorFlow prints, from C++ and twice (two libraries), lines such as::

  WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
  I0000 00:00:1796139185.836225 4540 port.cc:153] oneDNN custom operations are on. ...
  I0000 00:00:1796139185.837279 4540 cudart_stub.cc:31] Could not find cuda drivers ...

On a GPU machine the last one misleads (it is TF's view; JAX uses the GPU). Since TF
2.18 ``TF_CPP_MIN_LOG_LEVEL`` no longer hides them (they are logged before absl's logging
is set up), so ``install`` does two things before anything imports TF:

- sets ``TF_CPP_MIN_LOG_LEVEL=1`` (INFO off) unless the user set it, for TF's later logs;
- catches stderr (file descriptor 2) while ``tensorflow`` itself is imported, and
  writes back every line but the known start-up notices (``NOISE``); mtx's own first
  TF device set-up (``tf.config.set_visible_devices``) goes through ``filtered_stderr``
  too (on a machine without CUDA, TF logs "failed call to cuInit" there).

A user who sets ``TF_CPP_MIN_LOG_LEVEL=0`` asked for TF's INFO lines: then nothing is
filtered.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
from typing import Iterator

ENV = "TF_CPP_MIN_LOG_LEVEL"

# Substrings of the lines TensorFlow prints while it is imported that tell a JAX user
# nothing (the CPU build's notices, and the CUDA probing of a TF that is not used on GPU).
NOISE = (
  "All log messages before absl::InitializeLog() is called",
  "oneDNN custom operations are on",
  "Could not find cuda drivers",
  "Unable to register cuDNN factory",
  "Unable to register cuFFT factory",
  "Unable to register cuBLAS factory",
  "computation placer already registered",
  "TF-TRT Warning",
  "This TensorFlow binary is optimized to use available CPU instructions",
  "To enable the following instructions",
  "failed call to cuInit",
)


def is_noise(line: str) -> bool:
  """Whether ``line`` is one of TensorFlow's start-up notices."""
  return any(n in line for n in NOISE)


def install() -> None:
  """Sets the TF log level (unless set) and filters the first ``import tensorflow``."""
  os.environ.setdefault(ENV, "1")
  if os.environ[ENV].strip() in ("", "0") or "tensorflow" in sys.modules:
    return
  if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
  """Finds ``tensorflow`` as usual, once, and loads it with stderr filtered."""

  def find_spec(self, fullname, path, target=None):
    del path, target
    if fullname != "tensorflow":
      return None
    # The real spec, looked up without this finder. The finder stays until TF is
    # loaded: a probe such as etils.epath's ``find_spec("tensorflow")`` (is TF
    # installed?) is not the import, which must still be filtered.
    index = sys.meta_path.index(self)
    sys.meta_path.remove(self)
    try:
      spec = importlib.util.find_spec(fullname)
    finally:
      sys.meta_path.insert(index, self)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader, self)
    return spec


class _QuietLoader(importlib.abc.Loader):
  """Delegates to TF's own loader; runs the module with fd 2 caught and filtered."""

  def __init__(self, loader, finder):
    self._loader = loader
    self._finder = finder

  def __getattr__(self, name):  # get_resource_reader, is_package, ...
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    if self._finder in sys.meta_path:
      sys.meta_path.remove(self._finder)  # TF loads once: the finder's work is done
    with filtered_stderr():
      self._loader.exec_module(module)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
  """Points fd 2 at a temporary file; on exit restores it and writes back the lines
  that are not ``NOISE``. Also wraps TF's first device set-up (its CUDA probing).

  >>> with filtered_stderr():
  ...   tf.config.set_visible_devices([], "GPU")
  """
  try:
    sys.stderr.flush()
    caught = tempfile.TemporaryFile()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):  # no fd 2 (embedded, closed)
    yield
    return
  os.dup2(caught.fileno(), 2)
  try:
    yield
  finally:
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(saved, 2)
    os.close(saved)
    caught.seek(0)
    text = caught.read().decode("utf-8", "replace")
    caught.close()
    kept = "".join(line for line in text.splitlines(True) if not is_noise(line))
    if kept:
      try:
        os.write(2, kept.encode("utf-8"))
      except OSError:
        pass
