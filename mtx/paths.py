"""The one filesystem layer: every file mtx reads or writes goes through this module.

A path is a ``str``: a local path, or a URL ``scheme://...``. Three kinds, one API:

  local        ``/data/run``, ``~/run``, ``run`` (made absolute by ``absolute``)
               -> ``etils.epath`` over ``os``.
  ``gs://``    -> ``etils.epath``: TensorFlow's gfile when TensorFlow is installed
               (it is: mtx needs it), else fsspec's ``gcsfs``. Orbax's checkpoints and
               TensorBoard's events reach the same bucket by their own GCS clients.
  any other    (``s3://``, ``az://``, ``hf://``, ``memory://``, ...) -> the fsspec
               filesystem registered for the scheme (``pip install s3fs``,
               ``adlfs``, ...); TensorFlow's gfile has none of them built in.

``check_reachable`` turns a scheme with no filesystem installed, missing credentials
or a bucket that cannot be listed into one ``UserError`` naming the setting, the path
and the fix; commands call it on their paths before building anything.

What "atomic" means (``write_atomically``):

  local        a temporary file in the same directory, fsynced, renamed over the
               target (``os.replace``), the directory fsynced: a reader sees the old
               file or the new one, never part of one, even after a power cut.
  object store an object is written whole in one upload (GCS, S3 and Azure make an
               object visible only when its upload completes), so a reader sees the
               old object or the new one. There is no rename: a write cut short
               leaves the old object as it was and no temporary object behind
               (gfile's GCS writer uploads on close).
  other fsspec the same single write on close: whole-object for object stores (s3fs,
               gcsfs, adlfs) and ``memory://``, but in place for fsspec's ``file://``
               (use a plain local path for local files).

Appending (``metrics.jsonl``): object stores cannot append, so
``mtx.runtime.metrics_writer`` rewrites the whole object at each logged step there (one
atomic upload each); locally it appends whole lines with ``O_APPEND``.

Beyond this layer: orbax's checkpoints and TensorBoard's events are written by their
own clients, which reach local paths and ``gs://`` only (``check_checkpoint_dir``
refuses other schemes for a checkpoint directory); ``MODEL_DIR``'s lock is local only
(``mtx.runtime.lock``).

>>> p = join("memory://bucket/run", "config.gin")
>>> write_atomically(p, "x = 1\\n"); read_text(p)
'x = 1\\n'
"""

import errno
import glob as glob_lib
import os
import tempfile
from typing import IO, Optional

import fsspec.core
from etils import epath

from mtx.errors import UserError

# Schemes routed through etils.epath (as orbax routes them); others go to fsspec.
_EPATH_SCHEMES = ("gs",)
# Where orbax (tensorstore) can keep checkpoints: local paths (None) and GCS.
_CHECKPOINT_SCHEMES = (None, "gs")
# pip packages of fsspec's well-known remote schemes, for the error's fix.
_FSSPEC_PACKAGES = {
  "s3": "s3fs",
  "s3a": "s3fs",
  "gcs": "gcsfs",
  "az": "adlfs",
  "abfs": "adlfs",
  "hf": "huggingface_hub",
}


class WriteError(UserError):
  """A run output (metrics, TensorBoard, config.gin, tasks.json, ...) could not be written."""


def write_error(path: str, error: BaseException) -> WriteError:
  """A one-sentence ``WriteError`` for a failed write of ``path``."""
  reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
  hint = (
    "free some space"
    if getattr(error, "errno", None) == errno.ENOSPC
    else "make it writable (or free some space)"
  )
  return WriteError(
    f"Could not write {path} ({reason}); {hint}, then run the same command again: "
    "training resumes from the newest checkpoint."
  )


def absolute(path: Optional[str]) -> Optional[str]:
  """``path`` with ``~`` expanded, made absolute against the working directory.

  Every command turns the paths of its settings into absolute ones where they enter
  (``mtx.train.settings``, ``mtx.cli.evaluate``, ``mtx.cli.infer``), so that nothing
  downstream depends on the working directory (orbax wants absolute paths) and ``~``
  means the home directory, as in a shell. None, '' and URLs (``gs://bucket/run``) are
  returned as they are; a ``pathlib.Path`` becomes a ``str``.
  """
  if isinstance(path, os.PathLike):
    path = os.fspath(path)
  if not isinstance(path, str) or not path or scheme(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def scheme(path: str) -> Optional[str]:
  """``"gs"`` for ``gs://b/x``; None for a local path.

  >>> scheme("gs://bucket/run"), scheme("/tmp/run"), scheme("C:/x")
  ('gs', None, None)
  """
  path = os.fspath(path)
  head, sep, _ = path.partition("://")
  return head.lower() if sep and head.isidentifier() else None


def is_remote(path: str) -> bool:
  """True for a URL (``gs://``, ``memory://``, ...), False for a local path."""
  return scheme(path) is not None


def join(path: str, *parts: str) -> str:
  """``path/part/...`` with ``/`` for URLs (``os.path.join`` locally)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *parts)
  for part in parts:
    path = path.rstrip("/") + "/" + part.lstrip("/")
  return path


def basename(path: str) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path: str) -> str:
  """The parent of ``path``; a bucket (``gs://b``) is its own parent."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.dirname(path)
  prefix, _, rest = path.partition("://")
  head, sep, _ = rest.rstrip("/").rpartition("/")
  return f"{prefix}://{head}" if sep else path


# ---- the two backends ----------------------------------------------------------------
def _epath(path: str) -> Optional[epath.Path]:
  """An ``epath.Path`` for local and epath-routed paths; None for fsspec's schemes."""
  s = scheme(path)
  return epath.Path(path) if s is None or s in _EPATH_SCHEMES else None


def _fsspec(path: str):
  """``(filesystem, path inside it)`` for a scheme routed to fsspec.

  Raises:
    UserError: no fsspec filesystem is installed for the scheme.
  """
  s = scheme(path)
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    package = _FSSPEC_PACKAGES.get(s)
    fix = (
      f"pip install {package}"
      if package
      else "install the fsspec filesystem for it (or use a local or gs:// path)"
    )
    raise UserError(
      f"{path}: no filesystem is installed for {s}:// ({_short(e)}); {fix}."
    ) from e


def exists(path: str) -> bool:
  p = _epath(path)
  if p is not None:
    return p.exists()
  fs, inner = _fsspec(path)
  return fs.exists(inner)


def isdir(path: str) -> bool:
  p = _epath(path)
  if p is not None:
    return p.is_dir()
  fs, inner = _fsspec(path)
  return fs.isdir(inner)


def isfile(path: str) -> bool:
  p = _epath(path)
  if p is not None:
    return p.is_file()
  fs, inner = _fsspec(path)
  return fs.isfile(inner)


def listdir(path: str) -> list[str]:
  """The names (not paths) in directory ``path``, sorted."""
  p = _epath(path)
  if p is not None:
    return sorted(c.name for c in p.iterdir())
  fs, inner = _fsspec(path)
  return sorted({basename(e) for e in fs.ls(inner, detail=False)} - {""})


def glob(pattern: str) -> list[str]:
  """The files (not directories) matching ``pattern``, sorted; ``*``, ``?`` and
  ``[...]`` may appear in any part. A URL's matches are URLs of the same scheme.

  >>> write_atomically("memory://g/a.tsv", "x"); glob("memory://g/*.tsv")
  ['memory://g/a.tsv']
  """
  s = scheme(pattern)
  if s is None:
    local = os.path.expanduser(pattern)
    return sorted(p for p in glob_lib.glob(local) if os.path.isfile(p))
  if s in _EPATH_SCHEMES:
    # epath globs below a directory: split the pattern at its first magic part.
    parts = pattern.split("/")
    first = next((i for i, x in enumerate(parts) if glob_lib.has_magic(x)), None)
    if first is None:
      return [pattern] if isfile(pattern) else []
    base = epath.Path("/".join(parts[:first]))
    return sorted(str(p) for p in base.glob("/".join(parts[first:])) if p.is_file())
  fs, inner = _fsspec(pattern)
  found = [fs.unstrip_protocol(p) for p in fs.glob(inner) if fs.isfile(p)]
  # memory:// puts its root at "/": give the matches back in the pattern's spelling.
  rooted, plain = f"{s}:///", f"{s}://"
  if not pattern.startswith(rooted):
    found = [plain + p[len(rooted) :] if p.startswith(rooted) else p for p in found]
  return sorted(found)


def size(path: str) -> int:
  """Bytes in file ``path``."""
  p = _epath(path)
  if p is not None:
    return p.stat().length
  fs, inner = _fsspec(path)
  return fs.size(inner)


def makedirs(path: str) -> None:
  """Creates directory ``path`` and its parents (object stores have no directories:
  there it is a no-op unless the filesystem keeps markers)."""
  p = _epath(path)
  if p is not None:
    p.mkdir(parents=True, exist_ok=True)
    return
  fs, inner = _fsspec(path)
  fs.makedirs(inner, exist_ok=True)


def remove(path: str) -> None:
  """Removes file ``path``."""
  p = _epath(path)
  if p is not None:
    p.unlink()
    return
  fs, inner = _fsspec(path)
  fs.rm_file(inner)


def open_file(path: str, mode: str = "rb") -> IO:
  """``open`` for any path: ``"rb"``, ``"r"`` (UTF-8), ``"wb"``, ``"w"``.

  A write through this handle is NOT atomic; use ``write_atomically`` for whole files.
  """
  p = _epath(path)
  if p is not None:
    if "b" in mode:
      return p.open(mode)
    return p.open(mode, encoding="utf-8")
  fs, inner = _fsspec(path)
  if "b" in mode:
    return fs.open(inner, mode)
  return fs.open(inner, mode, encoding="utf-8")


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomically(path: str, text: str | bytes) -> None:
  """Replaces ``path`` with ``text`` (str as UTF-8) atomically (see the module doc).

  Locally: temp file, fsync, rename, directory fsync. On an object store: one whole
  upload, so the object is the old one or the new one.

  Raises:
    WriteError: the directory or bucket does not take the file (full, read-only,
      missing, no permission).
  """
  data = text.encode("utf-8") if isinstance(text, str) else text
  if is_remote(path):
    try:
      with open_file(path, "wb") as f:
        f.write(data)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise their own.
      raise write_error(path, e) from e
    return
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    # A unique name (O_EXCL), so that hosts sharing a file system never collide.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _fsync_directory(directory)  # The rename itself survives a power cut too.
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise write_error(path, e) from e
    raise


def check_reachable(setting: str, path: Optional[str], *, write: bool = False) -> None:
  """Raises one ``UserError`` unless ``path``'s filesystem is installed and reachable.

  Local paths are left to the code that uses them (their errors already name the
  path). For a URL: the scheme must have a filesystem, ``path`` and its parents must
  be listable, and with ``write`` a probe object in the nearest existing one (the
  bucket, for a new run) must be writable; it is removed at once.

  Args:
    setting: what the user set (``MODEL_DIR``, ``INFER_OUTPUT``), for the message.
    path: the setting's value; None and '' pass.
    write: the command will write under ``path``.

  Raises:
    UserError: "MODEL_DIR=s3://b/run: no filesystem is installed for s3:// ...;
      pip install s3fs."
  """
  if not path or not is_remote(path):
    return
  if scheme(path) not in _EPATH_SCHEMES:
    try:
      _fsspec(path)
    except UserError as e:
      raise UserError(f"{setting}={e}") from e
  what = "reached"
  try:
    parent = path
    while not exists(parent) and dirname(parent) != parent:
      parent = dirname(parent)  # probe where the command's first write will land
    if write:
      what = "written"
      probe = join(parent, f".mtx-write-probe-{os.getpid()}")
      with open_file(probe, "wb") as f:
        f.write(b"")
      remove(probe)
  except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise their own.
    fix = (
      "check the bucket name and your credentials (for gs://, `gcloud auth "
      "application-default login` or GOOGLE_APPLICATION_CREDENTIALS)"
      if scheme(path) in ("gs", "gcs")
      else "check the bucket name and your credentials"
    )
    raise UserError(
      f"{setting}={path} cannot be {what} ({_short(e)}); {fix}, then run again."
    ) from e


def check_checkpoint_dir(setting: str, path: Optional[str]) -> None:
  """Raises a ``UserError`` unless orbax can keep checkpoints at ``path``.

  Orbax writes arrays with tensorstore, whose drivers mtx reaches are the local file
  system and ``gs://`` (orbax picks tensorstore's GCS driver for ``gs://`` only, and
  wants every other path local and absolute).
  """
  s = scheme(path) if path else None
  if s not in _CHECKPOINT_SCHEMES:
    raise UserError(
      f"{setting}={path}: mtx checkpoints are kept by orbax, which reaches local paths "
      f"and gs:// only, not {s}://; use a local path or a gs:// bucket."
    )


def _short(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text[:200]


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # Some platforms and file systems do not open directories.
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
