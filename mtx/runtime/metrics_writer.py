"""Per-step scalars to ``MODEL_DIR/metrics.jsonl`` and to TensorBoard.

``metrics.jsonl`` holds one JSON object per logged step, e.g.::

  {"step": 100, "loss": 2.31, "loss/glue_cola": 2.05, "learning_rate": 0.01}

A value that is not a finite number is written as ``null``: a task absent from the
logging period (its ``loss/<task>``, ``cross_ent_loss/<task>``, ``accuracy/<task>``),
and a NaN or infinite value (bare ``NaN`` is not JSON; a string would make the column
text for pandas and jq). Every column stays numeric: ``pandas.read_json(path,
lines=True)`` reads ``null`` as NaN, ``jq 'select(.["loss/cola"] != null)'`` skips it.
``read_metrics`` gives NaN for ``null`` (and reads the ``"NaN"``/``"Infinity"`` strings
of files written before). Each line goes out in one
``write`` on a file opened for appending, so a killed run leaves at most one partial
last line, which ``read_metrics`` skips and the next ``MetricsWriter`` removes.

On an object store (``gs://`` MODEL_DIR), which cannot append, the writer keeps the
file's content and uploads it whole at each logged step (``mtx.paths.write_atomically``:
one upload, so the object is the old or the new one; a killed run loses no line it had
written). A run of N logged steps of b bytes uploads about b*N^2/2 bytes in all: 10,000
lines of 1 KB is 50 GB, so log every 100 steps or more there (or train to a local
MODEL_DIR and copy).

Failed writes (a full disk, a file system gone read-only) raise ``WriteError``, a
``UserError`` naming the file. Whole files of a run (``config.gin``, ``tasks.json``)
are written with ``mtx.paths.write_atomically`` (temp file, fsync, rename locally; one
whole upload on object stores), so a reader sees the old or the new file, never part of one.

TensorBoard events go to ``MODEL_DIR/tensorboard`` (view them with ``pip install
"mtx[tensorboard]"`` and ``tensorboard --logdir MODEL_DIR/tensorboard``), written by
TensorFlow on the CPU only: TensorFlow is told to see no GPU before it is first used,
so it never takes accelerator memory from JAX.
"""

import errno
import json
import logging
import math
import os
from typing import Any, Mapping

from mtx import paths, tf_logs

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# The one atomic writer and its error live in the filesystem layer; these names stay
# for the callers that knew them here.
WriteError = paths.WriteError
write_error = paths.write_error
write_atomically = paths.write_atomically


class MetricsWriter:
  """Appends scalars to ``metrics.jsonl`` and TensorBoard; a no-op off the primary host.

  Example::

    writer = MetricsWriter(model_dir, is_primary=jax.process_index() == 0)
    writer.write(100, {"loss": 2.31, "loss/cola": 2.05, "learning_rate": 0.01})
    writer.close()
  """

  def __init__(
    self, model_dir: str, *, tensorboard: bool = True, is_primary: bool = True
  ):
    self._path = paths.join(model_dir, METRICS_FILE)
    self._fd = None
    self._remote = None  # The whole content, on an object store (no append there).
    self._tb_writer = None
    if not is_primary:
      return
    try:
      if paths.is_remote(model_dir):
        self._remote = _complete_lines(
          paths.read_bytes(self._path) if paths.exists(self._path) else b""
        )
      else:
        os.makedirs(model_dir, exist_ok=True)
        _drop_partial_last_line(self._path)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except paths.WriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise their own.
      raise write_error(self._path, e) from e
    if tensorboard:
      # TensorFlow's summary writer reaches gs:// itself (gfile), and no other URL.
      self._tb_dir = paths.join(model_dir, TENSORBOARD_DIR)
      if paths.scheme(model_dir) not in (None, "gs"):
        raise paths.WriteError(
          f"TensorBoard events cannot be written to {self._tb_dir}: TensorFlow writes "
          "local paths and gs:// only; turn TensorBoard off (train.tensorboard = False, "
          "evaluate.tensorboard = False) or use a local or gs:// MODEL_DIR."
        )
      try:
        self._tb_writer = _tensorboard_writer(self._tb_dir)
      except Exception as e:  # pylint: disable=broad-except  # TF raises its own types.
        raise write_error(self._tb_dir, e) from e

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one line ``{"step": step, **scalars}`` and the same TensorBoard scalars.

    Args:
      step: the training step these values belong to.
      scalars: name -> number (Python, NumPy or 0-d JAX values); ints stay ints.
    """
    if self._fd is None and self._remote is None:
      return
    record = {"step": int(step)}
    for name, value in scalars.items():
      if name == "step":
        raise ValueError("MetricsWriter.write: 'step' is reserved; pass it as step.")
      record[name] = _to_number(value)
    line = json.dumps({k: _encode(v) for k, v in record.items()}, allow_nan=False)
    try:
      self._append((line + "\n").encode("utf-8"))
    except OSError as e:
      raise write_error(self._path, e) from e
    if self._tb_writer is not None:
      self._tensorboard("write", step, record)

  def _append(self, data: bytes) -> None:
    """Appends ``data``; a short write (a nearly full disk) is continued or raises."""
    if self._remote is not None:
      paths.write_atomically(self._path, self._remote + data)
      self._remote += data  # Only once the upload holds it.
      return
    while data:
      n = os.write(self._fd, data)
      if n <= 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      data = data[n:]

  def _tensorboard(self, method: str, *args) -> None:
    try:
      getattr(self._tb_writer, method)(*args)
    except Exception as e:  # pylint: disable=broad-except  # TF raises its own types.
      raise write_error(self._tb_dir, e) from e

  def flush(self) -> None:
    """Flushes TensorBoard events (metrics.jsonl is unbuffered)."""
    if self._tb_writer is not None:
      self._tensorboard("flush")

  def close(self) -> None:
    try:
      if self._tb_writer is not None:
        self._tensorboard("close")
    finally:
      self._tb_writer = None
      self._remote = None
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
  """Returns the objects of ``model_dir/metrics.jsonl`` in order ([] if it is missing).

  A partial last line (a run killed mid-write) is skipped; ``null`` comes back as NaN
  (and the "NaN", "Infinity" and "-Infinity" strings of older files as floats).
  """
  path = paths.join(model_dir, METRICS_FILE)
  if not paths.exists(path):
    return []
  lines = paths.read_bytes(path).split(b"\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      if i == len(lines) - 1:  # No newline after it: a write that was cut short.
        continue
      logging.warning("Skipping unreadable line %d of %s.", i + 1, path)
      continue
    records.append({k: _decode(v) for k, v in record.items()})
  return records


def truncate_after(model_dir: str, step: int) -> None:
  """Drops the entries of ``metrics.jsonl`` with ``"step" > step``, atomically.

  Used on resume from a checkpoint at ``step``, so that steps about to be trained again
  are not logged twice. The file is rewritten with ``mtx.paths.write_atomically``, so a
  crash leaves either the old or the new file (on object stores too). Call it on the
  primary host only, before opening a ``MetricsWriter``.
  """
  path = paths.join(model_dir, METRICS_FILE)
  if not paths.exists(path):
    return
  lines = paths.read_bytes(path).split(b"\n")
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # Blank, or a partial last line.
    if isinstance(record, dict) and record.get("step", math.inf) <= step:
      kept.append(line + b"\n")
  write_atomically(path, b"".join(kept))


def _complete_lines(data: bytes) -> bytes:
  """``data`` up to its last newline: a partial last line is dropped before appending.

  >>> _complete_lines(b'{"step": 1}\\n{"st')
  b'{"step": 1}\\n'
  """
  return data[: data.rfind(b"\n") + 1]


def _to_number(value):
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, int):
    return value
  if hasattr(value, "dtype") and getattr(value.dtype, "kind", "f") in "iu":
    return int(value)
  return float(value)


def _encode(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _decode(value):
  if value is None:
    return math.nan
  if isinstance(value, str) and value in _NON_FINITE:  # files written before null
    return _NON_FINITE[value]
  return value


def _drop_partial_last_line(path: str) -> None:
  """Cuts a partial last line (no trailing newline) so that appends start cleanly."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    # Walk back to the last newline; metrics files are small enough to read whole.
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)


class _TensorBoardWriter:
  """Scalar events through TensorFlow core alone (the tensorboard package is optional).

  Each ``write`` is one event whose summary holds every value as a ``simple_value``:
  the scalar form every TensorBoard reader knows (the scalar dashboard, and the event
  reader ``tensorboard.backend.event_processing.event_accumulator``, whose ``Scalars``
  does not list tensor summaries), written with ``tf.summary.experimental.write_raw_pb``.
  """

  def __init__(self, logdir: str):
    # TensorFlow (slow to import) only when TensorBoard is on.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # pylint: disable-next=g-import-not-at-top
    from tensorflow.core.framework import summary_pb2

    try:
      with tf_logs.filtered_stderr():
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
      pass  # TF was initialized earlier by other code; it keeps the devices it chose.
    self._tf = tf
    self._summary = summary_pb2.Summary
    with tf.device("/cpu:0"):
      self._writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    tf = self._tf
    summary = self._summary()
    for name, value in record.items():
      # NaN: no point (a task absent from the period), not a point at NaN.
      if name != "step" and not math.isnan(value):
        summary.value.add(tag=name, simple_value=float(value))
    with tf.device("/cpu:0"), self._writer.as_default():
      tf.summary.experimental.write_raw_pb(
        tf.constant(summary.SerializeToString()), step=int(step)
      )

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _tensorboard_writer(logdir: str) -> _TensorBoardWriter:
  return _TensorBoardWriter(logdir)
