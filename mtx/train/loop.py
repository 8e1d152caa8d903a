"""The training loop: data, mesh, state, the jitted step, logging and checkpoints.

``train`` is the gin-configured entry (``gin_configs/runs/train.gin`` documents every
knob); the work is done by small functions below it, each usable on its own.
"""

import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtx import mtl, parallel
from mtx.data import pipeline as data_pipeline
from mtx.data import registry
from mtx.data import vocab as vocab_lib
from mtx.errors import UserError, close_names
from mtx.model import T5Config
from mtx.train import checkpoint, metrics_writer, optim, progress, state as state_lib
from mtx.train import build as build_lib
from mtx.eval import periodic as eval_periodic

log = logging.getLogger("mtx")

NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteStepError(UserError):
  """A step had a non-finite loss or gradient and ``nonfinite_policy`` is 'stop'."""


@dataclasses.dataclass
class RunResult:
  """What a finished (or preempted) run reports back."""
  step: int
  preempted: bool
  last_metrics: dict


class Prefetcher:
  """Builds global batches in a background thread, ``depth`` ahead of the step.

  Yields ``(batch, data_state_after)``; the state is what to checkpoint once that
  batch has been trained on.
  """

  def __init__(self, pipe: data_pipeline.Pipeline, mesh, depth: int = 2):
    self._pipe, self._mesh = pipe, mesh
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
        state = self._pipe.get_state()
        self._put((parallel.host_to_global(local, self._mesh), state, None))
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
  padded[:len(blob)] = np.frombuffer(blob, np.uint8)
  blobs = multihost_utils.process_allgather(padded)
  return {"processes": [json.loads(bytes(b[:int(n)]).decode())
                        for b, n in zip(np.asarray(blobs), np.asarray(sizes).ravel())]}


def local_data_state(data_state: dict) -> Optional[dict]:
  """The saved position of every data shard (any process count; the pipeline picks its
  own shards, or re-splits the position when the number of shards changed)."""
  procs = data_state.get("processes", [])
  return data_pipeline.merge_states(procs) if procs else None


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _period_metrics(h: Sequence[dict], task_names: Sequence[str],
                    group_names: Sequence[str]) -> dict:
  """Means over the logging period (host copies of the step metrics); per-task losses
  weighted by their tokens. Skipped (non-finite) steps are left out of the means; a
  period of only skipped steps reports their (non-finite) values."""
  if "nonfinite" in h[-1]:
    h = [m for m in h if not m["nonfinite"]] or h
  sums = np.sum([m["task_loss_sums"] for m in h], axis=0)
  toks = np.sum([m["task_tokens"] for m in h], axis=0)
  out = {"loss": float(sums.sum() / max(toks.sum(), 1.0))}
  for i, name in enumerate(task_names):
    out[f"loss/{name}"] = float(sums[i] / toks[i]) if toks[i] > 0 else float("nan")
  out["grad_norm"] = float(np.mean([m["grad_norm"] for m in h]))
  if "group_weights" in h[-1]:
    for g, name in enumerate(group_names):
      out[f"mtl/weight/{name}"] = float(h[-1]["group_weights"][g])
  if "group_grad_cos" in h[-1]:
    cos = np.mean([m["group_grad_cos"] for m in h], axis=0)
    norms = np.mean([m["group_grad_norm"] for m in h], axis=0)
    for a, name_a in enumerate(group_names):
      out[f"grad_norm/{name_a}"] = float(norms[a])
      for b in range(a + 1, len(group_names)):
        out[f"grad_cos/{name_a}/{group_names[b]}"] = float(cos[a, b])
    out["conflict_frac"] = float(np.mean([m["conflict_frac"] for m in h]))
  measured = [m["tag_affinity"] for m in h if m.get("tag_due", False)]
  if measured:  # TAG affinity, averaged over the period's measurements
    out.update(mtl.affinity_metrics(group_names, np.mean(measured, axis=0)))
  return out


def train(*,
          model_dir: str,
          mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int],
          train_steps: int,
          batch_size: int = 32,
          mixture_or_task_module: Optional[str] = None,
          vocabulary_path: Optional[str] = None,
          model_config: T5Config = T5Config(),
          mtl_transforms: Sequence = (),
          optimizer_fn: Callable = optim.make_optimizer,
          learning_rate: Any = None,
          mesh_shape: Optional[Mapping[str, int]] = None,
          logical_axis_rules: Sequence = parallel.DEFAULT_RULES,
          units: Optional[int] = None,
          task_groups: Optional[Mapping[str, str]] = None,
          rate_fn: str = "mixture",
          rate_maximum: Optional[float] = None,
          rate_temperature: float = 1.0,
          grad_accum_steps: int = 1,
          z_loss: float = 1e-4,
          label_smoothing: float = 0.0,
          seed: int = 0,
          data_seed: Optional[int] = None,
          log_period: int = 100,
          checkpoint_period: int = 1000,
          keep_checkpoints: int = 3,
          async_checkpoint: bool = True,
          initial_checkpoint_path: Optional[str] = None,
          eval_period: int = 0,
          eval_options: Optional[Any] = None,
          tag_affinity_period: int = 0,
          tag_affinity_lr: Optional[float] = None,
          split: str = "train",
          tensorboard: bool = True,
          print_param_table: bool = True,
          data_shards: Optional[int] = None,
          nonfinite_policy: str = "skip",
          debug_inject_nonfinite_steps: Sequence[int] = (),
          debug_inject_nonfinite_task: Optional[str] = None,
          devices: Optional[Sequence[jax.Device]] = None) -> RunResult:
  """Trains a T5 on a seqio mixture; resumes from MODEL_DIR's latest checkpoint.

  See gin_configs/runs/train.gin for every argument's meaning. Returns when
  ``train_steps`` are done, or after saving on SIGTERM (``preempted=True``).

  Raises:
    UserError: bad settings or input (before anything is written); a write that fails
      mid-run (``metrics_writer.WriteError``, ``checkpoint.CheckpointWriteError``);
      a non-finite step under ``nonfinite_policy='stop'`` (``NonFiniteStepError``).
  """
  if train_steps <= 0:
    raise UserError(f"TRAIN_STEPS must be positive (got {train_steps}).")
  if nonfinite_policy not in NONFINITE_POLICIES:
    raise UserError(
        f"train.nonfinite_policy is '{nonfinite_policy}'"
        f"{close_names(str(nonfinite_policy), NONFINITE_POLICIES)}; use 'skip' (skip "
        "the update, count it) or 'stop' (stop the run, naming the step).")
  if vocabulary_path:  # Tasks built on the default vocabulary pick this one up.
    vocab_lib.get_vocabulary(vocabulary_path)  # fails early and clearly if bad
    os.environ["MTX_VOCAB"] = vocabulary_path
  registry.import_modules(mixture_or_task_module)

  # ---- mesh, the step, data -----------------------------------------------------------
  mesh = parallel.make_mesh(mesh_shape, devices)
  # Processes whose devices hold the same batch rows read the same data shards.
  block, blocks = parallel.batch_block(mesh)
  num_shards = blocks if data_shards is None else data_shards
  build = build_lib.build_train_step(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      batch_size=batch_size, model_config=model_config, mtl_transforms=mtl_transforms,
      optimizer_fn=optimizer_fn, learning_rate=learning_rate,
      logical_axis_rules=logical_axis_rules, units=units, task_groups=task_groups,
      grad_accum_steps=grad_accum_steps, z_loss=z_loss, label_smoothing=label_smoothing,
      seed=seed, tag_affinity_period=tag_affinity_period, tag_affinity_lr=tag_affinity_lr,
      debug_inject_nonfinite_steps=debug_inject_nonfinite_steps,
      debug_inject_nonfinite_task=debug_inject_nonfinite_task, num_shards=num_shards,
      mesh=mesh)
  spec, rules = build.spec, build.rules
  lengths = {"inputs": build.layout.inputs_length, "targets": build.layout.targets_length}
  pipe = data_pipeline.load(
      mixture_or_task_name, lengths, build.layout, split=split,
      seed=seed if data_seed is None else data_seed, rate_fn=rate_fn,
      rate_maximum=rate_maximum, rate_temperature=rate_temperature,
      task_groups=task_groups, process_index=block, process_count=blocks,
      num_shards=num_shards,
      allgather=multihost_utils.process_allgather if jax.process_count() > 1 else None)
  _report_mixture(pipe)
  if print_param_table and jax.process_index() == 0:
    print(state_lib.param_table(build.params_abstract, build.param_shardings), flush=True)

  ckpt = checkpoint.Checkpointer(model_dir, save_period=checkpoint_period,
                                 keep=keep_checkpoints, async_save=async_checkpoint)
  restored = ckpt.restore(build.sharded_state())
  if restored is not None:
    start_step, train_state, data_state = restored
    local = local_data_state(data_state)
    if local is not None:
      pipe.set_state(local)
    log.info("Resumed from step %d in %s.", start_step, model_dir)
  else:
    start_step = 0
    with mesh:
      if initial_checkpoint_path:
        params_sharded = build.sharded_state()["params"]
        params = checkpoint.load_params(initial_checkpoint_path, params_sharded)
      else:
        params = state_lib.init_params(build.model, seed, lengths["inputs"],
                                       lengths["targets"], build.param_shardings)
      train_state = jax.jit(build.make_state,
                            out_shardings=build.state_shardings)(params)

  _write_tasks(model_dir, pipe)
  # Lines logged after the last checkpoint by a run that died are not part of this run.
  if jax.process_index() == 0 and os.path.exists(os.path.join(model_dir, "metrics.jsonl")):
    metrics_writer.truncate_after(model_dir, start_step)

  watch = _NonFiniteWatch(nonfinite_policy, spec, ckpt)
  # Reads the eval data now, so that a bad eval setting fails before training.
  evaluation = eval_periodic.PeriodicEval(eval_period, model_dir, build.model, mesh,
                                          rules, build.param_shardings,
                                          mixture_or_task_name, lengths, eval_options)
  return _run(build.jit_step, train_state, start_step, train_steps, pipe, mesh, rules,
              ckpt, model_dir, build.schedule, spec, log_period, tensorboard, watch,
              evaluation)


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
    bad = [first_step + i for i, f in enumerate(flags)
           if f and first_step + i > self._reviewed]
    self._reviewed = max(self._reviewed, first_step + len(history) - 1)
    if not bad:
      return
    what = self._describe(history[bad[0] - first_step])
    if self.policy == "stop":
      self._ckpt.wait()  # A save still in flight is of a step before the bad one.
      latest = self._ckpt.latest_step()
      saved = (f"the newest checkpoint is step {latest}" if latest is not None
               else "no checkpoint was saved")
      raise NonFiniteStepError(
          f"Step {bad[0]} had {what} and train.nonfinite_policy is 'stop', so training "
          f"stopped without saving it ({saved}); lower the learning rate or set "
          "train.nonfinite_policy = 'skip', then run the same command again.")
    log.warning("Skipped %d step(s) with a non-finite loss or gradient (step %d had "
                "%s); their updates were not applied.", len(bad), bad[0], what)

  def _describe(self, metrics: dict) -> str:
    """'a non-finite loss in task(s) a, b' or 'a non-finite gradient (...)'."""
    host = jax.device_get({k: metrics[k] for k in ("task_loss_sums", "group_grad_norm")
                           if k in metrics})
    sums = np.asarray(host["task_loss_sums"])
    tasks = [n for n, v in zip(self._spec.task_names, sums) if not np.isfinite(v)]
    if tasks:
      return f"a non-finite loss in task(s) {', '.join(tasks)}"
    if "group_grad_norm" in host:
      groups = [n for n, v in zip(self._spec.group_names, host["group_grad_norm"])
                if not np.isfinite(v)]
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
  info = {"mixture": spec.name,
          "tasks": [{"id": i, "name": ex.name, "group": spec.group_names[g],
                     "rate": float(r), "examples": len(ex)}
                    for i, (ex, g, r) in enumerate(zip(pipe.examples, spec.group_of_task,
                                                       pipe.rates))]}
  metrics_writer.write_atomically(os.path.join(model_dir, "tasks.json"),
                                  json.dumps(info, indent=1))


def _write_config(model_dir: str) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  metrics_writer.write_atomically(os.path.join(model_dir, "config.gin"),
                                  gin.operative_config_str())


def _run(jit_step, train_state, start_step, train_steps, pipe, mesh, rules, ckpt,
         model_dir, schedule, spec, log_period, tensorboard, watch,
         evaluation) -> RunResult:
  """Steps until ``train_steps`` or preemption; logs, checkpoints, saves at the end.

  A failed write (disk full, MODEL_DIR gone read-only) raises a ``UserError`` naming
  the file; checkpoints already committed stay as they were.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  writer = metrics_writer.MetricsWriter(model_dir, tensorboard=tensorboard,
                                        is_primary=jax.process_index() == 0)
  bar = progress.Progress(train_steps, start_step,
                          enabled=jax.process_index() == 0 and os.isatty(2))
  prefetch = Prefetcher(pipe, mesh)
  step = start_step
  history, last, data_state = [], {}, pipe.get_state()
  t0, t0_step = None, step
  preempted = False
  failed = True
  try:
    with _Preemption() as preemption, mesh, nn.logical_axis_rules(list(rules)):
      while step < train_steps:
        batch, data_state = prefetch.next()
        train_state, metrics = jit_step(train_state, batch)
        step += 1
        history.append(metrics)
        if t0 is None:  # The first step compiles: time from its end.
          jax.block_until_ready(metrics)
          t0, t0_step = time.time(), step
          _write_config(model_dir)  # after tracing: the operative config is complete
        if step % log_period == 0 or step == train_steps:
          last = _log(writer, step, history, spec, pipe, data_state, schedule, t0,
                      t0_step)
          watch.review(history, step - len(history) + 1)
          history = []
          t0, t0_step = time.time(), step
          bar.update(step, {k: v for k, v in last.items() if k.startswith("loss")})
        # Processes must agree to stop; asking costs a collective, so not every step.
        if jax.process_count() == 1 or step % 10 == 0:
          preempted = _agree(preemption.requested)
        periodic = ckpt.save_period > 0 and step % ckpt.save_period == 0
        if periodic or preempted or step == train_steps:
          if history:
            watch.review(history, step - len(history) + 1)
          ckpt.save(step, train_state, gather_data_state(data_state), force=True)
        if not preempted and evaluation.due(step, last=step == train_steps):
          evaluation(train_state["params"], step, writer)
          t0, t0_step = time.time(), step  # eval time is not step time
        if preempted:
          log.warning("SIGTERM: saved step %d and stopping.", step)
          break
    failed = False
  finally:
    prefetch.close()
    bar.close()
    # Closing waits for the last save, which may fail too; every closer runs, and when
    # the run already failed, a second error must not hide the first.
    errors = []
    for close in (evaluation.close, ckpt.close, writer.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors and failed:
      log.error("While stopping after an error: %s", errors[0])
    elif errors:
      raise errors[0]
  return RunResult(step, preempted, last)


def _agree(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.array([int(flag)]))))


def _log(writer, step, history, spec, pipe, data_state, schedule, t0, t0_step) -> dict:
  host = jax.device_get(list(history))  # waits for the period's last step
  elapsed = time.time() - t0
  steps = step - t0_step
  scalars = _period_metrics(host, spec.task_names, spec.group_names)
  tokens = float(np.sum([m["task_tokens"] for m in host[-steps:]])) if steps > 0 else 0.0
  scalars["learning_rate"] = float(schedule(step - 1))
  if "nonfinite_steps" in host[-1]:
    scalars["nonfinite_steps"] = int(host[-1]["nonfinite_steps"])
  if steps > 0:
    scalars["timing/step_s"] = elapsed / steps
    scalars["timing/tokens_per_s"] = tokens / max(elapsed, 1e-9)
  for ex in pipe.examples:  # Epochs of this host's shard at the trained position.
    scalars[f"data/epochs/{ex.name}"] = data_state["cursors"][ex.name] / len(ex)
  writer.write(step, scalars)
  return scalars
