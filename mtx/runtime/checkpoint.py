"""Orbax checkpoints of the train state and the data position, in ``MODEL_DIR``.

Layout (orbax's, one directory per saved step)::

  MODEL_DIR/
    1000/                    a finished step: orbax wrote it as
      commit_success.txt       1000.orbax-checkpoint-tmp/ and renamed it when
      _CHECKPOINT_METADATA     complete (on GCS it writes commit_success.txt last)
      state/                 the state pytree (params, opt_state, step, rng, ...):
                             OCDBT/zarr arrays, each host writing its own shards
      data_state/metadata    the data position, JSON, written by the primary host
    2000.orbax-checkpoint-tmp/   a save in progress, or cut short: never a step

Nothing is pickled. Saves are asynchronous: ``save`` returns once the arrays are copied
off the devices and the files are written in a background thread; ``wait`` blocks until
they are final. Only orbax's own primary-host logic writes shared metadata, so every
process of a ``jax.distributed`` run calls ``save`` and ``restore`` alike.

What counts as a corrupted checkpoint. ``restore`` walks the steps from newest to
oldest and skips (with a ``logging.warning`` naming the step and the reason) a step
that:

- has no ``commit_success.txt`` (orbax writes it before the final rename, or as the
  commit itself on GCS, so its absence means a copy or save that did not finish), or
  lacks its ``state/`` or ``data_state/`` item directory;
- has unreadable tree metadata (``state/_METADATA`` missing, truncated or not JSON);
- fails to restore: a truncated or damaged OCDBT manifest or data file (tensorstore
  reports a decode or out-of-range read; the data files are zstd-compressed, whose
  frames detect most damage), or a truncated ``data_state`` JSON.

Temporary ``*.orbax-checkpoint-tmp*`` directories are never taken for steps; a new
``Checkpointer`` deletes them in the background (its first save waits for that). A bit
flip inside an array's payload that still decompresses is not detected (OCDBT keeps no
checksums). Skipped steps newer than the one restored are renamed ``<step>.corrupt``
(kept for inspection) so that training can write those steps again. A checkpoint that
is intact but does not fit the state being restored (a changed model or optimizer) is
not corruption: it raises a ``UserError``.

Failed saves. ``save`` refuses a state holding a NaN or an Inf (``NonFiniteStateError``,
naming the leaf), so a checkpoint is always finite. A save that cannot be written (a full
disk, a directory gone read-only) raises ``CheckpointWriteError`` from ``save``, ``wait``
or ``close`` (an asynchronous save fails in the background and is reported by the next
of these), naming the step and the newest intact one. Orbax deletes old steps only after
a new one is committed, so the steps already on disk stay restorable, and the cut-short
``<step>.orbax-checkpoint-tmp`` directory goes like any other temporary one. Orbax reports
a failed save as soon as its first write fails, while the save's other writer threads
(say, the one writing ``state/_sharding``) still run and log their own errors when they
fail too; ``close`` returns only once every thread the save started has ended, so that
those threads write nothing into a temporary directory that a new save of the step may
be filling, and their logs come before the caller reports the error.
"""

import errno
import json
import logging
import os
import re
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mtx import paths
from mtx.errors import UserError
from mtx.model import lora

STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
_COMMIT_FILE = "commit_success.txt"
# In the names of LoRA adapter params (``mtx.model.lora.MARK``).
ADAPTER_MARK = lora.MARK
_CORRUPT_SUFFIX = ".corrupt"
# How long ``close`` waits for the writer threads of a failed save to end (they fail
# fast on a full disk; a slow remote write may take minutes, as it would at exit).
_SAVE_THREADS_TIMEOUT_S = 600.0
# How tensorstore and orbax word an OS error in the exceptions they raise.
_IO_ERROR = re.compile(
  r"No space left|Read-only file system|Permission denied|"
  r"Disk quota|os_error_code|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
  r"Input/output error",
  re.I,
)


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, unwritable directory, I/O error)."""


class NonFiniteStateError(UserError):
  """``save`` was given a state holding NaN or Inf; nothing was written."""


class Checkpointer:
  """Saves and restores ``(step, state, data_state)`` under one directory.

  Example::

    ckpt = Checkpointer(model_dir, save_period=1000, keep=3)
    restored = ckpt.restore(abstract_state)        # None on a fresh MODEL_DIR
    ...
    ckpt.save(step, state, {"position": 123})      # no-op unless step % 1000 == 0
    ...
    ckpt.save(step, state, data_state, force=True)
    ckpt.close()                                   # waits for the last save
  """

  def __init__(
    self,
    directory: str,
    *,
    save_period: int,
    keep: int | None = 3,
    async_save: bool = True,
  ):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: usually MODEL_DIR; a local path or one orbax can write (gs://...).
      save_period: ``save`` writes when ``step % save_period == 0``; 0 or less saves
        only when forced.
      keep: how many of the newest checkpoints to keep; ``None`` keeps all.
      async_save: write in a background thread (``wait`` or the next ``save`` joins).
    """
    if keep is not None and keep < 1:
      raise UserError(
        f"Checkpointer got keep={keep} for {directory}; keep at least 1 checkpoint, "
        "or pass None to keep them all."
      )
    _check_writable(directory)
    paths.check_checkpoint_dir("MODEL_DIR", directory)
    self.directory = epath.Path(directory)
    self.save_period = int(save_period)
    preservation = (
      ocp.checkpoint_managers.PreserveAll()
      if keep is None
      else ocp.checkpoint_managers.LatestN(keep)
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation,
      enable_async_checkpointing=async_save,
      # Step directories are made before ``save`` returns: when that fails (a full or
      # read-only disk) the error is raised there, and no background thread is left
      # waiting minutes for a directory that never came (which blocks the exit).
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, item_names=(STATE_ITEM, DATA_STATE_ITEM), options=options
    )
    self._pending = None  # The step of a save that may still be running.
    self._save_threads: list[threading.Thread] = []  # Those the last save started.

  def latest_step(self) -> int | None:
    """The newest committed step, or None; ``restore`` may still find it damaged."""
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      if _incomplete_reason(self.directory / str(step)) is None:
        return step
    return None

  def all_steps(self) -> list[int]:
    """Every step orbax lists, oldest first (including damaged ones)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving ``state`` and ``data_state`` as ``step``; returns whether it did.

    Saves when ``step % save_period == 0`` or ``force``, unless ``step`` is already
    saved. Must be called by every process. Returns once the device arrays are copied;
    ``wait`` blocks until the checkpoint is final.

    Args:
      step: the number of finished training steps the state reflects.
      state: a pytree of ``jax.Array`` (any sharding) and numbers.
      data_state: a JSON-able dict, the position of the input pipeline(s).

    Raises:
      NonFiniteStateError: a floating leaf of ``state`` holds NaN or Inf.
      CheckpointWriteError: this save, or the previous one still running, failed.
    """
    periodic = self.save_period > 0 and step % self.save_period == 0
    if not (periodic or force):
      return False
    self.wait()  # Orbax would wait too; this way a failure names the step it belongs to.
    if step in self._manager.all_steps():
      logging.info(
        "Checkpoint step %d already exists in %s; not saving it again.",
        step,
        self.directory,
      )
      return False
    try:
      json.dumps(data_state, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpointer.save: data_state is not plain JSON: {e}") from e
    bad = _nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(
        f"Checkpoint step {step} was not saved to {self.directory} because "
        f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''} hold NaN or Inf "
        f"({self._newest_intact()}); lower the learning rate or set "
        "train.nonfinite_policy, and resume from that checkpoint."
      )
    args = ocp.args.Composite(
      **{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_STATE_ITEM: ocp.args.JsonSave(data_state),
      }
    )
    self._pending = step
    before = set(threading.enumerate())
    try:
      started = self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      error = self._write_error(step, e)
      if error is None:
        raise
      raise error from e
    finally:
      self._save_threads = [
        t for t in threading.enumerate() if t not in before and not t.daemon
      ]
    if not started:
      self._pending = None
    return started

  def restore(
    self, abstract_state: Any, step: int | None = None
  ) -> tuple[int, Any, dict] | None:
    """Restores the newest good checkpoint onto ``abstract_state``'s shardings.

    Args:
      abstract_state: the state's pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``
        (e.g. from ``jax.eval_shape`` plus the step's shardings); a leaf without a
        sharding goes to the first local device.
      step: restore exactly this step (an error if it is missing or damaged); None
        takes the newest one, falling back past damaged ones with a warning.

    Returns:
      ``(step, state, data_state)``, or None when the directory holds no checkpoint.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise UserError(
          f"Checkpoint step {step} is not in {self.directory}; pick one of "
          f"{sorted(steps) or 'none'}, or leave the step unset to take the newest."
        )
      steps = [step]
    if not steps:
      return None
    abstract_state = _with_default_sharding(abstract_state)
    skipped = []
    for candidate in steps:
      restored, reason = self._try_restore(candidate, abstract_state)
      if restored is not None:
        if skipped:
          self._quarantine(skipped)
        return candidate, restored[0], restored[1]
      if step is not None:
        raise UserError(
          f"Checkpoint step {candidate} in {self.directory} is unusable ({reason}); "
          "restore another step, or leave the step unset to take the newest good "
          "one."
        )
      logging.warning(
        "Skipping checkpoint step %d in %s: %s", candidate, self.directory, reason
      )
      skipped.append((candidate, reason))
    raise UserError(
      f"No usable checkpoint in {self.directory}: steps "
      f"{', '.join(str(s) for s, _ in skipped)} are all damaged (first reason: "
      f"{skipped[0][1]}); move them out of the directory to start over."
    )

  def _try_restore(self, step: int, abstract_state) -> tuple[tuple | None, str]:
    """Returns ((state, data_state), '') or (None, why the step is unusable)."""
    step_dir = self.directory / str(step)
    reason = _incomplete_reason(step_dir)
    if reason is None:
      try:
        on_disk = _tree_metadata(step_dir / STATE_ITEM)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"unreadable tree metadata: {_short(e)}"
    if reason is None:
      mismatch = _first_mismatch(on_disk, abstract_state)
      if mismatch:
        raise UserError(
          f"Checkpoint step {step} in {self.directory} does not fit the state being "
          f"restored: {mismatch}; resume with the run's original model and optimizer "
          "settings, or use a fresh MODEL_DIR."
        )
      args = ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          DATA_STATE_ITEM: ocp.args.JsonRestore(),
        }
      )
      try:
        restored = self._manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"restore failed: {_short(e)}"
    if not _all_processes_agree(reason is None):
      reason = reason or "another process could not restore it"
    if reason is not None:
      return None, reason
    data_state = restored[DATA_STATE_ITEM]
    return (restored[STATE_ITEM], dict(data_state) if data_state else {}), ""

  def _quarantine(self, skipped: list[tuple[int, str]]) -> None:
    """Renames damaged steps to ``<step>.corrupt[.N]``; training may save them anew."""
    if ocp.multihost.is_primary_host(0):
      for step, _ in skipped:
        source = self.directory / str(step)
        target = self.directory / f"{step}{_CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
          target = self.directory / f"{step}{_CORRUPT_SUFFIX}.{n}"
          n += 1
        try:
          source.rename(target)
        except OSError as e:
          raise CheckpointWriteError(
            f"Could not move the damaged checkpoint {source} aside ({e.strerror}); "
            f"make {self.directory} writable, then run the same command again."
          ) from e
        logging.warning("Moved damaged checkpoint %s to %s.", source, target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("mtx_checkpoint_quarantine")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is final.

    Raises:
      CheckpointWriteError: a save failed to write (orbax's error is its cause).
    """
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = self._write_error(step, e)
      if error is None:
        raise
      raise error from e

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads (raises like ``wait``).

    Returns (or raises) only once every thread the last save started has ended, failed
    saves included (see the module docstring).
    """
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      finally:
        self._join_save_threads()

  def _join_save_threads(self) -> None:
    """Waits for the threads of the last save, which outlive ``wait`` when it failed."""
    threads, self._save_threads = self._save_threads, []
    deadline = time.monotonic() + _SAVE_THREADS_TIMEOUT_S
    for thread in threads:
      try:
        thread.join(max(0.0, deadline - time.monotonic()))
      except Exception:  # pylint: disable=broad-except
        pass  # Orbax's writer threads re-raise their error: the failed save's, reported.
    running = [t.name for t in threads if t.is_alive()]
    if running:
      logging.warning(
        "Checkpoint writer threads %s in %s still run after %.0f s; leaving them.",
        ", ".join(running),
        self.directory,
        _SAVE_THREADS_TIMEOUT_S,
      )

  def _newest_intact(self) -> str:
    """'the newest intact checkpoint is step N' (or that there is none), for errors."""
    try:
      steps = [
        int(p.name)
        for p in self.directory.iterdir()
        if p.name.isdigit() and _incomplete_reason(p) is None
      ]
    except OSError:
      steps = []
    if not steps:
      return "no intact checkpoint is on disk yet"
    return f"the newest intact checkpoint is step {max(steps)}"

  def _write_error(self, step: int | None, error: Exception):
    """A ``CheckpointWriteError`` if ``error`` is an I/O failure, else None."""
    reason = _io_reason(error)
    if reason is None:
      return None
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return CheckpointWriteError(
      f"Could not write {what} to {self.directory} ({reason}); "
      f"{self._newest_intact()}: free some space or make the directory writable, then "
      "run the same command again to resume from it."
    )

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_params(
  path: str,
  abstract_params: Any,
  what: str = "INITIAL_CHECKPOINT_PATH",
  skip_adapters: bool = False,
) -> Any:
  """Loads only the params of a run's checkpoint (fine-tuning, eval, inference).

  Floating params are cast to the model's dtype (a run's bfloat16 frozen params,
  ``train.frozen_dtype``, read as float32 and back).

  Args:
    path: that run's MODEL_DIR (its newest committed step is used), one step directory
      in it (``MODEL_DIR/1000``), or that step's ``state`` directory.
    abstract_params: the model's params as ``jax.ShapeDtypeStruct`` with shardings.
    what: how error messages name ``path`` (the setting the user gave it with).
    skip_adapters: leave out the LoRA adapters of the checkpoint that the model lacks
      (a LoRA run's base read on purpose, for a new run's fresh adapters). False: such
      adapters are refused, since reading without them would silently drop them.

  Returns:
    The params, placed on ``abstract_params``' shardings.

  Raises:
    UserError: ``path`` holds no checkpoint, or its params differ from the model's in
      tree, shape or dtype (the message names the first differing parameter), or hold
      LoRA adapters the model lacks and ``skip_adapters`` is False.
  """
  item_dir = find_state_dir(path, what)
  try:
    on_disk = _tree_metadata(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f"{what} {path} is not a readable mtx checkpoint "
      f"({_short(e)}); point it at a MODEL_DIR or a step directory of one."
    ) from e
  if not isinstance(on_disk, dict) or "params" not in on_disk:
    raise UserError(
      f"{what} {path} holds no 'params' in {item_dir}; point it at "
      "a checkpoint written by mtx."
    )
  abstract_params = _with_default_sharding(abstract_params)
  if not skip_adapters:
    _check_no_extra_adapters(on_disk["params"], abstract_params, path, what)
  mismatch = _first_mismatch(
    on_disk["params"], abstract_params, prefix="params/", params_only=True
  )
  if mismatch:
    raise UserError(
      f"{what} {path} does not fit the model: {mismatch}; use a "
      "checkpoint of the same model configuration."
    )
  item = {"params": abstract_params}
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    restored = checkpointer.restore(
      item_dir,
      args=ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
      ),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f"{what} {path}: the params in {item_dir} are damaged "
      f"({_short(e)}); point it at another step of that run."
    ) from e
  finally:
    checkpointer.close()
  return restored["params"]


def _check_no_extra_adapters(on_disk, abstract, path: str, what: str) -> None:
  """Raises UserError if ``on_disk`` (a checkpoint's params) holds LoRA adapter leaves
  that ``abstract`` (the model's params) lacks: a LoRA run read without its LoRA
  settings would silently give the un-adapted base."""
  want = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  extra = sorted(
    name
    for name in (
      _path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(on_disk)[0]
    )
    if ADAPTER_MARK in name and name not in want
  )
  if extra:
    raise UserError(
      f"{what} {path} holds LoRA adapters this model lacks (e.g. {extra[0]!r}), so "
      "reading it would silently drop them; give the run's LoRA settings (e.g. "
      "--gin_file=adapters/lora.gin with the run's model.LoraConfig bindings), or export "
      "it merged (mtx export, with EXPORT_TASK for a per-task adapter) and read that."
    )


def _io_reason(error: BaseException) -> str | None:
  """The OS-level reason if ``error`` (or its causes) is a failed write, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno is not None:
      return error.strerror or os.strerror(error.errno)
    text = str(error)
    if _IO_ERROR.search(text):
      for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO):
        if os.strerror(code).lower() in text.lower():
          return os.strerror(code)
      return " ".join(text.split())[:200]
    error = error.__cause__ or error.__context__
  return None


def _nonfinite_leaves(state: Any) -> list[str]:
  """Paths of the floating leaves of ``state`` that hold a NaN or an Inf."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  floats = [
    (p, x)
    for p, x in flat
    if jnp.issubdtype(
      x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype, jnp.inexact
    )
  ]
  if not floats:
    return []
  flags = jax.device_get(_finite_flags([x for _, x in floats]))
  return [_path_str(p) for (p, _), ok in zip(floats, flags) if not ok]


@jax.jit
def _finite_flags(leaves: list) -> list:
  """One bool[] per leaf: all finite (one program for the whole state, run in place)."""
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _check_writable(directory: str) -> None:
  """Raises UserError unless ``directory`` exists (or can be made) and takes files."""
  if paths.is_remote(directory):
    # The CLI checked it (mtx.paths.check_reachable); orbax reports its own errors.
    return
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".mtx-write-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f"MODEL_DIR {directory} is not writable: {e.strerror or e}; choose a directory "
      "you can write to, or fix its permissions."
    ) from e


def _incomplete_reason(step_dir: epath.Path) -> str | None:
  """Why ``step_dir`` is not a finished checkpoint, or None if it looks finished."""
  if not (step_dir / _COMMIT_FILE).exists():
    return f"no {_COMMIT_FILE} (the save did not finish)"
  for item in (STATE_ITEM, DATA_STATE_ITEM):
    if not (step_dir / item).is_dir():
      return f"its {item}/ directory is missing"
  return None


def _tree_metadata(item_dir: epath.Path):
  """The on-disk tree (nested dicts/lists of ArrayMetadata) of a pytree item."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(item_dir).tree
  finally:
    handler.close()


def _path_str(key_path) -> str:
  """'opt_state/1/0/mu/enc/w' for both live pytrees and orbax's metadata dicts."""
  parts = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype | None]:
  """Shape and dtype as stored: typed PRNG keys are stored as their key data."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
    dtype = leaf.dtype
  shape = getattr(leaf, "shape", None)
  shape = tuple(shape) if shape is not None else np.shape(leaf)
  return shape, (np.dtype(dtype) if dtype is not None else None)


def _first_mismatch(
  on_disk, abstract, prefix: str = "", params_only: bool = False
) -> str | None:
  """Describes the first leaf whose path, shape or dtype differs, or returns None.

  ``params_only`` (params read into a model, not a run resumed): a floating dtype may
  differ (restore casts: a run's bfloat16 frozen params, ``train.frozen_dtype``, read as
  float32 and back), and LoRA adapter leaves the model does not have are left out (a
  LoRA run's base read on purpose; ``load_params`` refuses them unless asked to skip
  them)."""
  disk_leaves = {
    prefix + _path_str(p): leaf
    for p, leaf in jax.tree_util.tree_flatten_with_path(on_disk)[0]
  }
  want_leaves = {
    prefix + _path_str(p): leaf
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  for name in sorted(want_leaves):
    want_shape, want_dtype = _shape_dtype(want_leaves[name])
    if name not in disk_leaves:
      return f"{name!r} (shape {want_shape}) is missing from the checkpoint"
    disk_shape, disk_dtype = _shape_dtype(disk_leaves[name])
    cast = (
      params_only
      and disk_dtype is not None
      and want_dtype is not None
      and jnp.issubdtype(disk_dtype, jnp.floating)
      and jnp.issubdtype(want_dtype, jnp.floating)
    )
    if disk_shape != want_shape or (
      disk_dtype is not None
      and want_dtype is not None
      and disk_dtype != want_dtype
      and not cast
    ):
      return (
        f"{name!r} has shape {disk_shape} and dtype {disk_dtype} in the "
        f"checkpoint but shape {want_shape} and dtype {want_dtype} here"
      )
  extra = sorted(set(disk_leaves) - set(want_leaves))
  if params_only:
    extra = [name for name in extra if ADAPTER_MARK not in name]
  if extra:
    shape, _ = _shape_dtype(disk_leaves[extra[0]])
    return f"the checkpoint has {extra[0]!r} (shape {shape}), which is not expected here"
  return None


def _with_default_sharding(abstract):
  """Gives sharding-less ShapeDtypeStructs the first local device."""
  device = jax.local_devices()[0]

  def fill(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
      )
    return leaf

  return jax.tree.map(fill, abstract)


def _all_processes_agree(ok: bool) -> bool:
  """True iff ``ok`` on every process (so that all fall back to the same step)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(flags))


def find_state_dir(path: str, what: str) -> epath.Path:
  """The ``state`` item directory that ``path`` names or contains (newest step)."""
  paths.check_checkpoint_dir(what, path)  # orbax reads local paths and gs:// only
  root = epath.Path(path)
  if not root.exists() and root.name.isdigit() and root.parent.is_dir():
    raise UserError(_missing_step(root, what))
  if not root.exists():
    raise UserError(
      f"{what} {path} does not exist; point it at the MODEL_DIR of "
      "a finished run or one of its step directories."
    )
  if (root / "_METADATA").exists() or (root / "manifest.ocdbt").exists():
    return root
  if (root / STATE_ITEM).is_dir():
    reason = _incomplete_reason(root)
    if reason:
      raise UserError(
        f"{what} {path} is not a finished checkpoint ({reason}); "
        "point it at another step."
      )
    return root / STATE_ITEM
  steps = []
  for child in root.iterdir():
    if child.name.isdigit() and _incomplete_reason(child) is None:
      steps.append(int(child.name))
  if not steps:
    raise UserError(
      f"{what} {path} holds no finished checkpoint; point it at "
      "the MODEL_DIR of a run that saved one, or at one of its step directories."
    )
  return root / str(max(steps)) / STATE_ITEM


def _missing_step(step_dir: epath.Path, what: str) -> str:
  """The sentence for a step directory that does not exist: the steps that do."""
  steps = sorted(
    int(c.name)
    for c in step_dir.parent.iterdir()
    if c.name.isdigit() and _incomplete_reason(c) is None
  )
  held = (
    f"it holds step(s) {', '.join(map(str, steps))}; choose one of them"
    if steps
    else "it holds no finished checkpoint"
  )
  return f"{what} has no checkpoint at step {step_dir.name} in {step_dir.parent}: {held}."


def _short(error: Exception, limit: int = 300) -> str:
  text = f"{type(error).__name__}: {error}".replace("\n", " ")
  return text if len(text) <= limit else text[:limit] + "..."
