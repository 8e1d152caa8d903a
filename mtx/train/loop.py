"""The training loop: data, mesh, state, the jitted step, logging and checkpoints.

``train(config)`` runs a ``mtx.train.settings.TrainConfig`` (gin's ``train.*``;
``gin_configs/runs/train.gin`` documents every knob); the work is done by small
functions below it, each usable on its own.
"""

import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from mtx import mtl, parallel, paths
from mtx.data import pipeline as data_pipeline
from mtx.data import registry
from mtx.errors import UserError
from mtx.eval import periodic as eval_periodic
from mtx.model import lora
from mtx.runtime import (
  adapters_io,
  checkpoint,
  metrics_writer,
  model_info,
  pretrained,
  progress,
)
from mtx.runtime import lock as lock_lib
from mtx.runtime import params as params_lib
from mtx.train import adapters, flops, freeze, resume
from mtx.train import build as build_lib
from mtx.train import settings as settings_lib

log = logging.getLogger("mtx")


class NonFiniteStepError(UserError):
  """A step had a non-finite loss or gradient and ``nonfinite_policy`` is 'stop'."""


@dataclasses.dataclass
class RunResult:
  """What a finished (or stopped) run reports back.

  ``preempted`` is True when a signal stopped the run (after saving ``step``);
  ``signal`` names it ("SIGTERM", "SIGINT" or "SIGHUP"; None when it ran to the end).
  ``start_step`` is the step it started from (the restored checkpoint's, or 0).
  """

  step: int
  preempted: bool
  last_metrics: dict
  signal: Optional[str] = None
  start_step: int = 0


class Prefetcher:
  """Builds global batches in a background thread, ``depth`` ahead of the step.

  Yields ``(batch, data_state_after)``; the state is what to checkpoint once that
  batch has been trained on.
  """

  def __init__(
    self,
    pipe: data_pipeline.Pipeline,
    mesh,
    depth: int = 2,
    axes=parallel.BATCH_AXES,
    convert: Optional[Callable[[dict], dict]] = None,
  ):
    self._pipe, self._mesh, self._axes = pipe, mesh, axes
    self._convert = convert  # the model's batch from packed rows (build.batch_converter)
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _put(self, item) -> None:
    while not self._stop.is_set():  # never blocks past close()
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        pass

  def _run(self):
    try:
      while not self._stop.is_set():
        local = self._pipe.next_batch()
        if self._convert is not None:
          local = self._convert(local)
        state = self._pipe.get_state()
        self._put((parallel.host_to_global(local, self._mesh, self._axes), state, None))
    except Exception as e:  # pylint: disable=broad-except
      self._put((None, None, e))

  def next(self):
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    return batch, state

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


def gather_data_state(state: dict) -> dict:
  """Every process's pipeline position, in one JSON dict (written by process 0)."""
  if jax.process_count() == 1:
    return {"processes": [state]}
  blob = json.dumps(state).encode()
  sizes = multihost_utils.process_allgather(np.array([len(blob)], np.int32))
  padded = np.zeros([int(np.max(sizes))], np.uint8)
  padded[: len(blob)] = np.frombuffer(blob, np.uint8)
  blobs = multihost_utils.process_allgather(padded)
  return {
    "processes": [
      json.loads(bytes(b[: int(n)]).decode())
      for b, n in zip(np.asarray(blobs), np.asarray(sizes).ravel())
    ]
  }


def local_data_state(data_state: dict) -> Optional[dict]:
  """The saved position of every data shard (any process count; the pipeline picks its
  own shards, or re-splits the position when the number of shards changed)."""
  procs = data_state.get("processes", [])
  return data_pipeline.merge_states(procs) if procs else None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopSignals:
  """SIGTERM, SIGINT and SIGHUP as a request to save after the current step and stop.

  The handlers only note the signal; the loop reads the note between steps. No
  KeyboardInterrupt is raised for the first one, so none can be lost inside a JAX or
  garbage-collection callback (which swallow exceptions) and none can cut a checkpoint
  write short. A SIGINT after any of them aborts: it raises KeyboardInterrupt at once
  (``check`` raises it again at the next step should a callback have swallowed it), and
  SIGINT is left to the system's default meanwhile, so that a third one ends the process
  outright should the way out hang. SIGHUP (a closed terminal or ssh session) also
  points stdout and stderr away from the gone terminal, where any write would fail.
  (Python runs handlers between its own operations: a signal that arrives during a long
  native call, such as compiling the step, is acted on when that call returns.)
  """

  def __init__(self):
    self.signum = 0  # The first stop signal received (0: none).
    self.aborted = False
    self._previous = {}
    self._logging_disabled = logging.NOTSET

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum:
      self.aborted = True
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      # What breaks off now (orbax waiting for a save) is no error to report.
      self._logging_disabled = logging.root.manager.disable
      logging.disable(logging.CRITICAL)
      raise KeyboardInterrupt
    if signum == signal.SIGHUP:
      _detach_from_terminal()
    if not self.signum:
      self.signum = signum
      name = signal.Signals(signum).name
      again = "" if signum == signal.SIGTERM else " (Ctrl-C again: stop at once, unsaved)"
      _say(f"mtx: {name}: saving after the current step, then stopping{again}.\n")

  def check(self) -> None:
    """Raises KeyboardInterrupt if an abort was asked for (and swallowed somewhere)."""
    if self.aborted:
      raise KeyboardInterrupt

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self.aborted:
      logging.disable(self._logging_disabled)


def _say(text: str) -> None:
  """Writes to stderr from a signal handler (no locks, no exception)."""
  try:
    os.write(2, text.encode())
  except OSError:
    pass


def _detach_from_terminal() -> None:
  """Points stdout and stderr that are a terminal at /dev/null (after a hangup), so
  that the progress bar and the last lines do not fail on the gone terminal. (No flush
  first: a signal handler must not reenter a buffered stream.)"""
  try:
    null = os.open(os.devnull, os.O_WRONLY)
  except OSError:
    return
  try:
    for fd in (1, 2):
      if os.isatty(fd):
        os.dup2(null, fd)
  finally:
    os.close(null)


def _period_metrics(
  h: Sequence[dict],
  task_names: Sequence[str],
  group_names: Sequence[str],
  group_of_task: Optional[Sequence[int]] = None,
) -> dict:
  """Means over the logging period (host copies of the step metrics).

  Per-task values are means over the task's target tokens in the period, as T5X logs
  them: ``loss/<task>`` (what training minimizes: cross-entropy, z-loss and label
  smoothing as configured), ``cross_ent_loss/<task>`` (the plain cross-entropy, which
  ``eval/<task>/loss`` reports too), ``accuracy/<task>`` (tokens whose most likely
  prediction is the target); ``z_loss`` is the z-loss term's mean over all tokens. A
  task with no token in the period gets NaN (written as null). ``mtl/weight/<group>`` is
  the mean over the steps where the group had tokens (a method does not weigh an
  absent group); ``group_of_task`` (default: every task its own group) says which.
  Skipped (non-finite) steps are left out of the means; a period of only skipped steps
  reports their (non-finite) values.
  """
  h = [m for m in h if not m["nonfinite"]] or h
  toks = np.sum([m["task_tokens"] for m in h], axis=0)
  total = max(toks.sum(), 1.0)

  def per_task(key):
    sums = np.sum([m[key] for m in h], axis=0)
    return [float(v / n) if n > 0 else float("nan") for v, n in zip(sums, toks)], sums

  losses, sums = per_task("task_loss_sums")
  out = {"loss": float(sums.sum() / total)}
  out.update({f"loss/{name}": v for name, v in zip(task_names, losses)})
  if "task_cross_ent_sums" in h[-1]:
    cross_ent, ce_sums = per_task("task_cross_ent_sums")
    accuracy, correct = per_task("task_correct")
    out["cross_ent_loss"] = float(ce_sums.sum() / total)
    out["z_loss"] = float(np.sum([m["task_z_loss_sums"] for m in h]) / total)
    out["accuracy"] = float(correct.sum() / total)
    out.update({f"cross_ent_loss/{n}": v for n, v in zip(task_names, cross_ent)})
    out.update({f"accuracy/{n}": v for n, v in zip(task_names, accuracy)})
  out["grad_norm"] = float(np.mean([m["grad_norm"] for m in h]))
  if "group_weights" in h[-1]:
    out.update(_mean_weights(h, group_names, group_of_task))
  if "group_grad_cos" in h[-1]:
    out.update(cosine_metrics(h, group_names))
  if "solver_residual" in h[-1]:  # worst solve of the period, and failed solves
    out["mtl/solver_residual"] = float(np.max([m["solver_residual"] for m in h]))
    out["mtl/solver_failures"] = int(np.sum([m["solver_failed"] for m in h]))
  measured = [m["tag_affinity"] for m in h if m.get("tag_due", False)]
  if measured:  # TAG affinity, averaged over the period's measurements
    out.update(mtl.affinity_metrics(group_names, np.mean(measured, axis=0)))
  return out


def _mean_weights(
  h: Sequence[dict],
  group_names: Sequence[str],
  group_of_task: Optional[Sequence[int]],
) -> dict:
  """``mtl/weight/<group>``: the mean weight over the steps where the group had tokens
  (the last step's weight, or 0, would make a method look as if it dropped a group that
  was merely absent); NaN (null) for a group absent from the whole period."""
  of_task = np.arange(len(group_names)) if group_of_task is None else group_of_task
  onehot = np.eye(len(group_names))[np.asarray(of_task)]  # [k, G]
  present = np.stack([np.asarray(m["task_tokens"]) @ onehot > 0 for m in h])  # [T, G]
  weights = np.stack([np.asarray(m["group_weights"], np.float64) for m in h])
  n = present.sum(0)
  mean = np.where(n > 0, (weights * present).sum(0) / np.maximum(n, 1), np.nan)
  return {f"mtl/weight/{name}": float(mean[g]) for g, name in enumerate(group_names)}


def cosine_metrics(h: Sequence[dict], group_names: Sequence[str]) -> dict:
  """Gradient norms, pairwise cosines and conflict_frac of the period, each a mean
  over the steps where it was measured: a cosine where both groups had a gradient,
  conflict_frac where at least two had. One never measured (a pair never in the same
  step) is left out, not logged as 0."""
  norms = np.stack([np.asarray(m["group_grad_norm"]) for m in h])  # [steps, G]
  cos = np.stack([np.asarray(m["group_grad_cos"]) for m in h])  # [steps, G, G]
  has = norms > 0
  out = {f"grad_norm/{n}": float(norms[:, a].mean()) for a, n in enumerate(group_names)}
  for a, name_a in enumerate(group_names):
    for b in range(a + 1, len(group_names)):
      both = has[:, a] & has[:, b]
      if both.any():
        out[f"grad_cos/{name_a}/{group_names[b]}"] = float(cos[both, a, b].mean())
  compared = has.sum(axis=1) >= 2
  if compared.any():
    fracs = np.asarray([float(m["conflict_frac"]) for m in h])
    out["conflict_frac"] = float(fracs[compared].mean())
  return out


def train(
  config: settings_lib.TrainConfig,
  devices: Optional[Sequence[jax.Device]] = None,
  operative_config: Optional[Callable[[], str]] = None,
) -> RunResult:
  """Trains a T5 on a seqio mixture; resumes from MODEL_DIR's latest checkpoint.

  Args:
    config: the run's settings (gin's ``train.*``; ``mtx.train.settings``).
    devices: the devices of the mesh (default all).
    operative_config: returns the text of MODEL_DIR/config.gin, called once the first
      step has been traced (the CLI passes gin's ``operative_config_str``); None
      writes no config.gin.

  Holds MODEL_DIR's lock (``mtx.runtime.lock``; process 0) from start to end, so a
  second training of the same MODEL_DIR is refused.

  Returns when ``train_steps`` are done, or after saving on SIGTERM, SIGINT or SIGHUP
  (``preempted=True``, ``signal`` names it; a signal before the first step stops the
  run without a step).

  Raises:
    UserError: bad settings or input (before anything is written); MODEL_DIR in use
      by another training (``lock.ModelDirInUseError``); a write that fails mid-run
      (``metrics_writer.WriteError``, ``checkpoint.CheckpointWriteError``); a
      non-finite step under ``nonfinite_policy='stop'`` (``NonFiniteStepError``).
    KeyboardInterrupt: a second SIGINT (Ctrl-C) aborted the run without saving.
  """
  lock = lock_lib.ModelDirLock(config.model_dir, enabled=jax.process_index() == 0)
  try:  # release() is a no-op for a lock not held
    _on_process_0(lambda: _check_paths(config))
    _on_process_0(lock.acquire)
    with _StopSignals() as stop:
      job, train_state, start_step = _start(config, devices, operative_config)
      return _run(job, train_state, start_step, stop)
  finally:
    lock.release()


def _check_paths(config: settings_lib.TrainConfig) -> None:
  """A bucket that cannot be reached fails now, in one sentence, before any build."""
  paths.check_reachable("MODEL_DIR", config.model_dir, write=True)
  paths.check_reachable("INITIAL_CHECKPOINT_PATH", config.initial_checkpoint_path)
  paths.check_reachable("train.adapters_path", config.adapters_path)
  paths.check_reachable("VOCABULARY", config.vocabulary_path)


def _on_process_0(fn: Callable[[], object]) -> None:
  """Runs ``fn`` on process 0; when it raises, every process raises (process 0 its
  error), so that none is left waiting in a collective."""
  error = None
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except  # re-raised below
      error = e
  if _agree(int(error is not None)):
    raise error or UserError(
      "Process 0 of this run stopped with an error before training (see its output); "
      "fix that, then start every process again."
    )


def _start(
  config: settings_lib.TrainConfig,
  devices: Optional[Sequence[jax.Device]],
  operative_config: Optional[Callable[[], str]],
) -> tuple:
  """(the job, the train state, the start step): data, step, restored checkpoint."""
  config = _with_checkpoint_model(config)
  data, settings, run = config.data, config.step, config.loop
  registry.import_modules(data.mixture_or_task_module, data.vocabulary_path)
  mesh = parallel.make_mesh(settings.mesh_shape, devices, settings.dcn_mesh_shape)
  # Processes whose devices hold the same batch rows read the same data shards.
  build = build_lib.build_train_step(
    data, settings, num_shards=data.data_shards, mesh=mesh
  )
  block, blocks = build.batch_block()
  num_shards = build.num_shards
  pipe = _load_data(build, block, blocks, num_shards)
  _report_mixture(pipe)

  # Reads the eval data now, so that a bad eval setting fails before MODEL_DIR is
  # written to.
  evaluation = eval_periodic.PeriodicEval(
    run.eval_period,
    run.model_dir,
    build.model,
    build.mesh,
    build.rules,
    build.param_shardings,
    data.mixture_or_task_name,
    build.lengths,
    run.eval_options,
    prefix_lm=data.prefix_lm,
    task_adapters={
      t: build.spec.group_of_task[i] for i, t in enumerate(build.spec.task_names)
    },
  )
  ckpt = checkpoint.Checkpointer(
    run.model_dir,
    save_period=config.checkpoint.checkpoint_period,
    keep=config.checkpoint.keep_checkpoints,
    async_save=config.checkpoint.async_checkpoint,
  )
  try:
    _check_resume(run, ckpt, pipe, operative_config)
    start_step, train_state = _restore_or_init(build, ckpt, pipe, config.checkpoint)
    _check_steps_left(run, start_step)
  except BaseException:
    _close_all((evaluation.close, ckpt.close), failed=True)
    raise

  job = _Job(
    build=build,
    pipe=pipe,
    ckpt=ckpt,
    settings=run,
    operative_config=operative_config,
    watch=_NonFiniteWatch(run.nonfinite_policy, build.spec, ckpt),
    evaluation=evaluation,
  )
  return job, train_state, start_step


def _with_checkpoint_model(
  config: settings_lib.TrainConfig,
) -> settings_lib.TrainConfig:
  """``config`` with the model and vocabulary of a pretrained INITIAL_CHECKPOINT_PATH
  (Hugging Face, T5X), as ``mtx.runtime.pretrained.resolve`` gives them."""
  model_config, vocabulary_path = pretrained.resolve(
    config.initial_checkpoint_path,
    config.model_config,
    config.vocabulary_path,
    "INITIAL_CHECKPOINT_PATH",
  )
  return dataclasses.replace(
    config, model_config=model_config, vocabulary_path=vocabulary_path
  )


def _check_resume(run, ckpt, pipe, operative_config) -> None:
  """Before restoring MODEL_DIR's checkpoint: the same tasks (or a UserError), and a
  warning naming the settings that changed since the previous launch."""
  step = ckpt.latest_step()
  if step is None:
    return
  # Every process checks (they read the same MODEL_DIR), so that all stop together.
  resume.check_task_set(run.model_dir, step, pipe.spec.task_names)
  if operative_config is not None and jax.process_index() == 0:
    changed = resume.changed_settings(run.model_dir, operative_config())
    if changed:
      log.warning(
        "Resuming step %d of %s with settings changed since its last launch "
        "(config.gin): %s.",
        step,
        run.model_dir,
        "; ".join(changed),
      )


def _check_steps_left(run, start_step: int) -> None:
  """A checkpoint beyond TRAIN_STEPS is a mistake; one at TRAIN_STEPS is a finished
  run started again (a retried job: ``_run`` does nothing and the CLI says so)."""
  if start_step > run.train_steps:
    raise UserError(
      f"Nothing to train: the checkpoint in {run.model_dir} is at step {start_step}, "
      f"beyond TRAIN_STEPS={run.train_steps}; raise TRAIN_STEPS above {start_step} to "
      "train on, or evaluate it with mtx eval."
    )


def _first_step_done(job, start_step: int):
  """After the first step has traced and run (so every check of the configuration
  has passed), writes the run's files and returns its metrics writer: tasks.json,
  config.gin, and metrics.jsonl without the lines after ``start_step`` (logged by a
  run that died after its last checkpoint: not part of this run)."""
  run = job.settings
  _write_tasks(run.model_dir, job.pipe)
  _write_model_info(run, job.build)
  if job.operative_config is not None:  # after tracing: it is complete now
    _write_config(run.model_dir, job.operative_config())
  if jax.process_index() == 0:
    metrics_writer.truncate_after(run.model_dir, start_step)
  return metrics_writer.MetricsWriter(
    run.model_dir, tensorboard=run.tensorboard, is_primary=jax.process_index() == 0
  )


def _load_data(
  build: build_lib.StepBuild, block: int, blocks: int, num_shards: int
) -> data_pipeline.Pipeline:
  """This process's pipeline of the run's mixture (``block`` of ``blocks``)."""
  data = build.data
  return data_pipeline.load(
    data.mixture_or_task_name,
    build.lengths,
    build.layout,
    split=data.split,
    seed=build.settings.seed if data.data_seed is None else data.data_seed,
    rate_fn=data.rate_fn,
    rate_maximum=data.rate_maximum,
    rate_temperature=data.rate_temperature,
    task_groups=data.task_groups,
    process_index=block,
    process_count=blocks,
    num_shards=num_shards,
    allgather=multihost_utils.process_allgather if jax.process_count() > 1 else None,
    stream=data.stream,
    example_fn=build.example_fn(),
  )


def _restore_or_init(
  build: build_lib.StepBuild,
  ckpt: checkpoint.Checkpointer,
  pipe: data_pipeline.Pipeline,
  settings: settings_lib.CheckpointSettings,
) -> tuple:
  """(start step, train state): MODEL_DIR's newest checkpoint (and the data position),
  or step 0 from INITIAL_CHECKPOINT_PATH's params or a fresh init, with the adapters
  of ``train.adapters_path`` when set."""
  restored = ckpt.restore(build.sharded_state())
  if restored is not None:
    start_step, train_state, data_state = restored
    local = local_data_state(data_state)
    if local is not None:
      pipe.set_state(local)
    log.info("Resumed from step %d in %s.", start_step, ckpt.directory)
    return start_step, train_state
  with build.mesh:
    params = None
    if settings.initial_checkpoint_path:
      params = initial_params(build, settings.initial_checkpoint_path)
    if settings.adapters_path:
      params = build.init_params() if params is None else params
      params = adapters_io.replace_adapters(
        params,
        settings.adapters_path,
        build.model_config.lora,
        build.spec.group_names,
      )
    return 0, build.init_state(params)


def initial_params(build: build_lib.StepBuild, path: str) -> Any:
  """The params a run starts from, read from INITIAL_CHECKPOINT_PATH ``path`` (an mtx
  run, Hugging Face or T5X). A LoRA model reads its base only (a LoRA run's adapters
  are left out) and its adapters get their fresh init (``adapters.init_adapters``, the
  values a run from scratch would start them with). A model without adapters refuses
  a LoRA run (it would drop the adapters; start from its merged export instead)."""
  target = build.sharded_state()["params"]
  scanned, what = build.model_config.scan_layers, "INITIAL_CHECKPOINT_PATH"
  if not adapters.enabled(build.model_config):
    return pretrained.load(path, target, scanned, what)
  adapter_target, base_target = lora.split(target)
  base = pretrained.load(path, base_target, scanned, what, skip_adapters=True)
  fresh = adapters.init_adapters(
    build.model,
    build.settings.seed,
    (build.layout.inputs_length, build.layout.targets_length),
    jax.tree.map(lambda a: a.sharding, adapter_target),
  )
  return lora.combine(base, fresh)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Job:
  """What a training run's loop works with, built once by ``train``."""

  build: build_lib.StepBuild
  pipe: data_pipeline.Pipeline
  ckpt: checkpoint.Checkpointer
  settings: settings_lib.LoopSettings
  operative_config: Optional[Callable[[], str]]
  watch: "_NonFiniteWatch"
  evaluation: eval_periodic.PeriodicEval


class _NonFiniteWatch:
  """Reports skipped (non-finite) steps from the step metrics; under 'stop', raises.

  The step itself never applies a non-finite update; this only reads the per-step
  ``nonfinite`` flags, at log and checkpoint steps (reading them every step would
  stall the device queue), so 'stop' stops there, naming the first bad step, before
  anything after it is saved.
  """

  def __init__(self, policy: str, spec, ckpt):
    self.policy = policy
    self._spec, self._ckpt = spec, ckpt
    self._reviewed = -1  # Steps up to this one have been looked at.

  def review(self, history: Sequence[dict], first_step: int) -> None:
    """Looks at ``history`` (step metrics of steps first_step, first_step + 1, ...)."""
    flags = jax.device_get([m["nonfinite"] for m in history])
    bad = [
      first_step + i for i, f in enumerate(flags) if f and first_step + i > self._reviewed
    ]
    self._reviewed = max(self._reviewed, first_step + len(history) - 1)
    if not bad:
      return
    what = self._describe(history[bad[0] - first_step])
    if self.policy == "stop":
      self._ckpt.wait()  # A save still in flight is of a step before the bad one.
      latest = self._ckpt.latest_step()
      saved = (
        f"the newest checkpoint is step {latest}"
        if latest is not None
        else "no checkpoint was saved"
      )
      raise NonFiniteStepError(
        f"Step {bad[0]} had {what} and train.nonfinite_policy is 'stop', so training "
        f"stopped without saving it ({saved}); lower the learning rate or set "
        "train.nonfinite_policy = 'skip', then run the same command again."
      )
    log.warning(
      "Skipped %d step(s) with a non-finite loss or gradient (step %d had "
      "%s); their updates were not applied.",
      len(bad),
      bad[0],
      what,
    )

  def _describe(self, metrics: dict) -> str:
    """'a non-finite loss in task(s) a, b' or 'a non-finite gradient (...)'."""
    host = jax.device_get(
      {k: metrics[k] for k in ("task_loss_sums", "group_grad_norm") if k in metrics}
    )
    sums = np.asarray(host["task_loss_sums"])
    tasks = [n for n, v in zip(self._spec.task_names, sums) if not np.isfinite(v)]
    if tasks:
      return f"a non-finite loss in task(s) {', '.join(tasks)}"
    if "group_grad_norm" in host:
      groups = [
        n
        for n, v in zip(self._spec.group_names, host["group_grad_norm"])
        if not np.isfinite(v)
      ]
      if groups:
        return f"a non-finite gradient of group(s) {', '.join(groups)}"
    return "a non-finite gradient or update (every task's loss was finite)"


def _report_mixture(pipe) -> None:
  if jax.process_index() != 0:
    return
  lines = ["task id  rate    examples  truncated  name"]
  for i, (ex, rate) in enumerate(zip(pipe.examples, pipe.rates)):
    lines.append(f"{i:7d}  {rate:.4f}  {len(ex):8d}  {ex.num_truncated:9d}  {ex.name}")
  print("\n".join(lines), flush=True)


def _write_tasks(model_dir: str, pipe) -> None:
  """MODEL_DIR/tasks.json: the task id map (sorted names), groups and rates of the run."""
  if jax.process_index() != 0:
    return
  spec = pipe.spec
  info = {
    "mixture": spec.name,
    "tasks": [
      {
        "id": i,
        "name": ex.name,
        "group": spec.group_names[g],
        "rate": float(r),
        "examples": len(ex),
      }
      for i, (ex, g, r) in enumerate(zip(pipe.examples, spec.group_of_task, pipe.rates))
    ],
  }
  paths.write_atomically(paths.join(model_dir, "tasks.json"), json.dumps(info, indent=1))


def _write_model_info(run: settings_lib.LoopSettings, build: build_lib.StepBuild):
  """MODEL_DIR/model-info.txt (the parameter table) and its one-line summary in the
  log (process 0); ``print_param_table`` prints the table too."""
  if jax.process_index() != 0:
    return
  line = model_info.write(run.model_dir, build.params_abstract, build.param_shardings)
  progress.log.info("%s", line)
  pattern = build.settings.trainable_params
  if pattern is not None:
    total, trainable = freeze.counts(build.params_abstract, pattern)
    progress.log.info(
      "Training %s of the %s parameters (train.trainable_params %r); the rest are "
      "frozen.",
      f"{trainable:,}",
      f"{total:,}",
      pattern,
    )
  if build.task_grads:
    progress.log.info(
      "Per-task gradients of %d groups by the '%s' route (train.task_grads_route), "
      "%d units over %s.",
      build.step_config.num_groups,
      build.step_config.task_grads_route,
      build.layout.units,
      " x ".join(build.step_config.unit_axes),
    )
  if run.print_param_table:
    print(
      params_lib.param_table(build.params_abstract, build.param_shardings), flush=True
    )


def _write_config(model_dir: str, text: str) -> None:
  """MODEL_DIR/config.gin: the configuration the run used (process 0)."""
  if jax.process_index() != 0:
    return
  paths.write_atomically(paths.join(model_dir, "config.gin"), text)


def _run(job: _Job, train_state, start_step: int, stop: _StopSignals) -> RunResult:
  """Steps until ``train_steps`` or a stop signal; logs, checkpoints, saves at the end.

  A failed write (disk full, MODEL_DIR gone read-only) raises a ``UserError`` naming
  the file; checkpoints already committed stay as they were. A second Ctrl-C
  (KeyboardInterrupt) leaves at once, without waiting for a save in flight: orbax only
  renames a save into a step once it is complete, so the newest committed checkpoint
  stays the one a restart takes.
  """
  run, build, ckpt = job.settings, job.build, job.ckpt
  writer = None  # Created after the first step: bad settings leave MODEL_DIR as it was.
  bar = progress.Progress(
    run.train_steps, start_step, enabled=jax.process_index() == 0 and os.isatty(2)
  )
  _log_resume(job, start_step, job.pipe.get_state())  # before the prefetcher reads on
  convert = build.batch_converter()
  prefetch = Prefetcher(job.pipe, build.mesh, axes=build.batch_axes, convert=convert)
  step = start_step
  history, last, data_state = [], {}, job.pipe.get_state()
  t0, t0_step = None, step
  outcome = "failed"
  try:
    signum = _agree(stop.signum)  # A signal while starting: stop before the first step.
    stop.check()
    with build.mesh, nn.logical_axis_rules(list(build.rules)):
      while not signum and step < run.train_steps:
        batch, data_state = prefetch.next()
        train_state, metrics = build.jit_step(train_state, batch)
        step += 1
        history.append(metrics)
        if t0 is None:  # The first step compiles: time from its end.
          jax.block_until_ready(metrics)
          t0, t0_step = time.time(), step
          writer = _first_step_done(job, start_step)
        if step % run.log_period == 0 or step == run.train_steps:
          bar.clear()  # the log line goes where the bar was; the bar comes back below
          last = _log(job, writer, step, history, data_state, t0, t0_step)
          job.watch.review(history, step - len(history) + 1)
          history = []
          t0, t0_step = time.time(), step
        bar.update(step, {k: v for k, v in last.items() if k.startswith("loss")})
        # Processes must agree to stop; asking costs a collective, so not every step.
        if jax.process_count() == 1 or step % 10 == 0:
          signum = _agree(stop.signum)
        stop.check()  # An abort (a second Ctrl-C) that some callback swallowed.
        periodic = ckpt.save_period > 0 and step % ckpt.save_period == 0
        if periodic or signum or step == run.train_steps:
          if history:
            job.watch.review(history, step - len(history) + 1)
          ckpt.save(step, train_state, gather_data_state(data_state), force=True)
        if not signum and job.evaluation.due(step, last=step == run.train_steps):
          job.evaluation(train_state["params"], step, writer)
          t0, t0_step = time.time(), step  # eval time is not step time
    outcome = "done"
  except KeyboardInterrupt:
    outcome = "aborted"
    raise
  finally:
    prefetch.close()
    bar.close()
    waits = () if outcome == "aborted" else (ckpt.close,)  # Abort: no waiting for saves.
    closers = (job.evaluation.close, *waits) + ((writer.close,) if writer else ())
    _close_all(closers, outcome != "done")
  name = signal.Signals(signum).name if signum else None
  if name and step > start_step:
    log.warning("%s: saved step %d and stopping.", name, step)
  elif name:
    log.warning("%s before the first step: stopping with nothing new to save.", name)
  return RunResult(step, bool(signum), last, name, start_step)


def _close_all(closers: Sequence[Callable], failed: bool) -> None:
  """Runs every closer. Closing waits for the last save, which may fail too; when the
  run already failed, a second error must not hide the first."""
  errors = []
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  if errors and failed:
    log.error("While stopping after an error: %s", errors[0])
  elif errors:
    raise errors[0]


def _agree(value: int) -> int:
  """The largest of every process's ``value`` (a flag, or a signal number)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.array([int(value)]))))


def _log(
  job: _Job,
  writer,
  step: int,
  history: Sequence,
  data_state: dict,
  t0: float,
  t0_step: int,
) -> dict:
  """Writes the period's metrics line (means over ``history``) and returns it."""
  host = jax.device_get(list(history))  # waits for the period's last step
  elapsed = time.time() - t0
  steps = step - t0_step
  spec = job.build.spec
  scalars = _period_metrics(host, spec.task_names, spec.group_names, spec.group_of_task)
  tokens = float(np.sum([m["task_tokens"] for m in host[-steps:]])) if steps > 0 else 0.0
  scalars["learning_rate"] = float(job.build.schedule(step - 1))
  scalars["nonfinite_steps"] = int(host[-1]["nonfinite_steps"])
  if steps > 0:
    scalars["timing/step_s"] = elapsed / steps
    scalars["timing/tokens_per_s"] = tokens / max(elapsed, 1e-9)
    scalars.update(_perf(job, elapsed / steps))
  for ex in job.pipe.examples:  # Epochs of this host's shard at the trained position.
    scalars[f"data/epochs/{ex.name}"] = data_state["cursors"][ex.name] / len(ex)
  writer.write(step, scalars)
  if jax.process_index() == 0:
    progress.log.info("%s", progress.log_line(step, job.settings.train_steps, scalars))
  warn_solver_failures(scalars, step)
  return scalars


def _perf(job: _Job, step_s: float) -> dict:
  """``perf/tflops_per_device`` and ``perf/mfu`` (``flops.perf_metrics``) for a step
  time; ``perf/mfu`` only where the device's peak is known (not on CPU)."""
  b = job.build
  step_flops = flops.train_step_flops(
    b.model_config, b.layout.batch_size, b.layout.inputs_length, b.layout.targets_length
  )
  peak = flops.peak_tflops(b.mesh.devices.flat[0].device_kind, job.settings.peak_tflops)
  return flops.perf_metrics(step_flops, step_s, b.mesh.size, peak)


def _log_resume(job: _Job, start_step: int, data_state: dict) -> None:
  """'Resumed from step N of M; data position: ...' (process 0; none at step 0)."""
  if start_step and jax.process_index() == 0:
    progress.log.info(
      "Resumed from step %d of %d; data position: %s.",
      start_step,
      job.settings.train_steps,
      _data_position(job.pipe, data_state),
    )


def _data_position(pipe: data_pipeline.Pipeline, data_state: dict) -> str:
  """'batch 40; epochs tiny_copy 0.52, tiny_rev 0.48' (this host's shard)."""
  epochs = ", ".join(
    f"{ex.name} {data_state['cursors'][ex.name] / max(len(ex), 1):.2f}"
    for ex in pipe.examples
  )
  return f"batch {data_state['batches']}; epochs {epochs}"


def warn_solver_failures(scalars: dict, step: int) -> None:
  """Warns when the period's metrics count failed gradient-surgery solves."""
  if scalars.get("mtl/solver_failures"):
    log.warning(
      "%d step(s) of the period ending at step %d had a gradient-surgery solve that "
      "did not converge (worst residual %.3g); those steps used the method's "
      "fallback (see its docstring in mtx.mtl.aggregators).",
      scalars["mtl/solver_failures"],
      step,
      scalars["mtl/solver_residual"],
    )
