"""One training at a time per MODEL_DIR: an exclusive lock, ``MODEL_DIR/.mtx.lock``.

Two ``mtx train`` on one MODEL_DIR (a second launch, a retried job) would restore each
other's checkpoints, write the same steps and interleave ``metrics.jsonl``; the second
is refused instead, with one sentence naming the holder::

  with ModelDirLock(model_dir):          # UserError if another run holds it
    ...train...

The lock is the kernel's: the holder keeps ``.mtx.lock`` open under ``fcntl.flock``,
which the kernel drops when the process ends, however it ends (kill -9 included). A
lock file left behind by a dead run is therefore recognised as stale without guessing
from process ids, and replaced. The file's content, JSON ``{"host", "pid", "started",
"command"}``, only names the holder for the refusal. It is written whole before the
file appears (a temporary file, fsynced, flocked, then hard-linked into place, which
fails if a lock file exists), so a reader never sees part of it.

Where the file system has no ``flock`` (some network or FUSE mounts), a lock file is
stale when its host is this host and its pid is not running; one of another host is
taken as held. Where it has no hard links, or MODEL_DIR is a URL (``gs://``), nothing
is locked (with a warning): an object store offers no lock that dies with its holder
(GCS's create-if-absent precondition would leave a dead run's lock object behind for
a person to delete, and ``mtx.paths`` does not reach preconditions), so there one
training per MODEL_DIR is the job scheduler's to ensure. ``mtx eval`` and ``mtx infer`` only read a run and take
no lock. On several hosts, process 0 holds the lock for the run.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
from typing import Optional

from mtx import paths
from mtx.errors import UserError

LOCK_FILE = ".mtx.lock"
_ATTEMPTS = (
  5  # each ends in the lock, a refusal, or a race lost to a run that came or went
)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF)
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK)

log = logging.getLogger("mtx")


class ModelDirInUseError(UserError):
  """Another live process holds MODEL_DIR's lock."""


class ModelDirLock:
  """An exclusive lock on a MODEL_DIR, held from ``acquire`` (or ``with``) to ``release``.

  ``acquire`` creates MODEL_DIR if needed; ``release`` removes the lock file, and the
  directories ``acquire`` created if nothing else was written to them, so that a run
  refused for a bad setting leaves no trace.
  """

  def __init__(self, model_dir: str, *, enabled: bool = True):
    """Args:
    model_dir: the run's directory (absolute, as ``mtx.paths.absolute`` makes it).
    enabled: False makes this a no-op (the processes other than 0 of a multi-host run).
    """
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.enabled = enabled and not paths.is_remote(model_dir)
    self._fd: Optional[int] = None
    self._created: list = []  # Directories acquire made, deepest first.
    if enabled and not self.enabled:
      log.warning("MODEL_DIR %s is not a local path: it is not locked.", model_dir)

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "ModelDirLock":
    """Takes the lock (idempotent).

    Raises:
      ModelDirInUseError: another live process holds it (the message names it).
      UserError: MODEL_DIR cannot be created or written.
    """
    if not self.enabled or self._fd is not None:
      return self
    self._created = _make_dirs(self.model_dir)
    try:
      for _ in range(_ATTEMPTS):
        fd = _create(self.model_dir, self.path)
        if fd is not None:
          self._fd = fd
          return self
        _refuse_unless_stale(self.path, self.model_dir)
      raise ModelDirInUseError(
        f"MODEL_DIR {self.model_dir} changed hands {_ATTEMPTS} times while this run "
        f"tried to lock it ({self.path}); another mtx train is starting or stopping "
        "there: wait for it, or choose another MODEL_DIR."
      )
    except BaseException:
      self._remove_created()
      raise

  def release(self) -> None:
    """Drops the lock and removes the lock file (a no-op when not held)."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if _same_file(fd, self.path):
        os.unlink(self.path)
    except OSError as e:  # The kernel lock goes with the close below anyway.
      log.warning("Could not remove the lock file %s: %s", self.path, e)
    finally:
      os.close(fd)
    self._remove_created()

  def _remove_created(self) -> None:
    for directory in self._created:
      try:
        os.rmdir(directory)  # Only when empty: nothing else was written.
      except OSError:
        break
    self._created = []

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _holder_info() -> dict:
  """What the lock file says about this process."""
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "command": " ".join(sys.argv)[:500],
  }


def _writable_error(model_dir: str, error: OSError) -> UserError:
  return UserError(
    f"MODEL_DIR {model_dir} is not writable: {error.strerror or error}; choose a "
    "directory you can write to, or fix its permissions."
  )


def _make_dirs(model_dir: str) -> list:
  """Creates ``model_dir`` and its missing parents; returns those made, deepest first."""
  missing, d = [], model_dir
  while not os.path.isdir(d) and os.path.dirname(d) != d:
    missing.append(d)
    d = os.path.dirname(d)
  try:
    os.makedirs(model_dir, exist_ok=True)
  except OSError as e:
    raise _writable_error(model_dir, e) from e
  return missing


def _create(model_dir: str, path: str) -> Optional[int]:
  """Our lock file, complete and flocked, linked in at ``path``: its descriptor, or None
  when a lock file is already there."""
  try:
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.tmp-", dir=model_dir)
  except OSError as e:
    raise _writable_error(model_dir, e) from e
  try:
    os.write(fd, json.dumps(_holder_info()).encode("utf-8"))
    os.fsync(fd)
    os.fchmod(fd, 0o644)
    _try_flock(fd)  # Nobody else knows the file yet: never contended.
    try:
      os.link(tmp, path)  # Atomic, and fails if a lock file exists.
    except FileExistsError:
      os.close(fd)
      return None
    except OSError as e:
      if e.errno not in _NO_LINK:
        raise
      log.warning(
        "MODEL_DIR %s is on a file system without hard links: it is not locked; "
        "make sure no other mtx train writes it.",
        model_dir,
      )
    return fd
  except OSError as e:
    os.close(fd)
    raise _writable_error(model_dir, e) from e
  finally:
    try:
      os.unlink(tmp)
    except OSError:
      pass


def _try_flock(fd: int) -> Optional[bool]:
  """Takes the kernel lock without waiting: True, False when another process has it,
  None when the file system has no flock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    if e.errno in _NO_FLOCK:
      return None
    raise


def _same_file(fd: int, path: str) -> bool:
  """Whether ``path`` still names the file open as ``fd``."""
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _refuse_unless_stale(path: str, model_dir: str) -> None:
  """Raises ``ModelDirInUseError`` naming the holder of the lock file at ``path``; if
  no live process holds it, removes it (the caller tries again)."""
  fd = _open_existing(path, model_dir)
  if fd is None:
    return  # Released meanwhile.
  try:
    info = _read(fd)
    locked = _try_flock(fd)
    free = _stale_without_flock(info) if locked is None else locked
    if not _same_file(fd, path):
      return  # Replaced or released meanwhile: look again.
    if free:
      os.unlink(path)  # Still ours to judge: the kernel lock (or a dead pid) says so.
      log.warning(
        "Removed a stale lock of MODEL_DIR %s (host %s, pid %s, no longer running).",
        model_dir,
        info.get("host", "?"),
        info.get("pid", "?"),
      )
      return
    raise ModelDirInUseError(_in_use_message(model_dir, path, info))
  finally:
    os.close(fd)


def _open_existing(path: str, model_dir: str) -> Optional[int]:
  """The lock file at ``path``, opened for writing where allowed (NFS locks need it)."""
  for flags in (os.O_RDWR, os.O_RDONLY):
    try:
      return os.open(path, flags)
    except FileNotFoundError:
      return None
    except PermissionError:
      continue
    except OSError as e:
      raise _writable_error(model_dir, e) from e
  raise ModelDirInUseError(
    f"MODEL_DIR {model_dir} has a lock file {path} that this user cannot read; "
    "ask its owner whether a run is using that directory, or choose another MODEL_DIR."
  )


def _read(fd: int) -> dict:
  try:
    info = json.loads(os.read(fd, 65536).decode("utf-8"))
  except (OSError, ValueError):
    return {}
  return info if isinstance(info, dict) else {}


def _stale_without_flock(info: dict) -> bool:
  """Without a kernel lock: stale when it names this host and a pid not running."""
  if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return False
  try:
    os.kill(info["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False  # Alive, another user's.
  return False


def _in_use_message(model_dir: str, path: str, info: dict) -> str:
  if "host" in info and "pid" in info:
    who = f"pid {info['pid']} on host {info['host']}"
    if info.get("started"):
      who += f", started {info['started']}"
  else:
    who = f"a process whose lock file {path} does not say which"
  return (
    f"MODEL_DIR {model_dir} is in use by another mtx train ({who}); wait for that "
    "run to end or stop it, or choose another MODEL_DIR (mtx eval and mtx infer may "
    "read it meanwhile)."
  )
