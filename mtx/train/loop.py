"""The training loop: data, mesh, state, the jitted step, logging and checkpoints.

``train`` is the gin-configured entry (``gin_configs/runs/train.gin`` documents every
knob); the work is done by small functions below it, each usable on its own.
"""

import dataclasses
import inspect
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mtx import mtl, parallel
from mtx.data import pipeline as data_pipeline
from mtx.data import registry
from mtx.data import vocab as vocab_lib
from mtx.errors import UserError
from mtx.model import T5, T5Config
from mtx.train import checkpoint, metrics_writer, optim, progress, state as state_lib
from mtx.train import step as step_lib

log = logging.getLogger("mtx")


@dataclasses.dataclass
class RunResult:
  """What a finished (or preempted) run reports back."""
  step: int
  preempted: bool
  last_metrics: dict


def default_units(num_groups: int, batch_size: int, dp: int, processes: int) -> int:
  """Smallest multiple of the data-parallel size >= groups that divides the batch."""
  step = math.lcm(dp, processes)
  for units in range(step, batch_size + 1, step):
    if units >= num_groups and batch_size % units == 0:
      return units
  raise UserError(
      f"No number of units divides BATCH_SIZE {batch_size} into at least {num_groups} "
      f"task groups and is a multiple of the {dp} data-parallel devices; raise "
      "BATCH_SIZE, set UNITS, or group tasks (train.task_groups).")


def build_transforms(items: Sequence, num_tasks: int) -> tuple:
  """Transforms as given, or built from factories (gin's ``@mtl.pcgrad``) with k tasks.

  A gin file names a factory without calling it, so that methods with per-task state
  get ``num_tasks`` (the number of task groups) from the mixture, not from the user.
  """
  out = []
  for item in items:
    if hasattr(item, "init") and hasattr(item, "update"):
      out.append(item)
      continue
    params = inspect.signature(item).parameters
    out.append(item(num_tasks=num_tasks) if "num_tasks" in params else item())
  return tuple(out)


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

  def _run(self):
    try:
      while not self._stop.is_set():
        local = self._pipe.next_batch()
        state = self._pipe.get_state()
        batch = parallel.host_to_global(local, self._mesh)
        while not self._stop.is_set():
          try:
            self._queue.put((batch, state, None), timeout=0.1)
            break
          except queue.Full:
            pass
    except Exception as e:  # pylint: disable=broad-except
      self._queue.put((None, None, e))

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
  procs = data_state.get("processes", [])
  if len(procs) != jax.process_count():
    log.warning("The checkpoint's data position was written by %d processes and this "
                "run has %d; the data order restarts from the beginning.", len(procs),
                jax.process_count())
    return None
  return procs[jax.process_index()]


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
  weighted by their tokens."""
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
          split: str = "train",
          tensorboard: bool = True,
          print_param_table: bool = True,
          devices: Optional[Sequence[jax.Device]] = None) -> RunResult:
  """Trains a T5 on a seqio mixture; resumes from MODEL_DIR's latest checkpoint.

  See gin_configs/runs/train.gin for every argument's meaning. Returns when
  ``train_steps`` are done, or after saving on SIGTERM (``preempted=True``).
  """
  del eval_period  # Evaluation during training arrives with mtx.eval.
  if train_steps <= 0:
    raise UserError(f"TRAIN_STEPS must be positive (got {train_steps}).")
  if grad_accum_steps < 1:
    raise UserError(f"grad_accum_steps must be >= 1 (got {grad_accum_steps}).")
  if vocabulary_path:  # Tasks built on the default vocabulary pick this one up.
    vocab_lib.get_vocabulary(vocabulary_path)  # fails early and clearly if bad
    os.environ["MTX_VOCAB"] = vocabulary_path
  registry.import_modules(mixture_or_task_module)

  # ---- mesh, mtl route, data ----------------------------------------------------------
  mesh = parallel.make_mesh(mesh_shape, devices)
  dp = parallel.data_parallel_size(mesh)
  spec = registry.resolve(mixture_or_task_name, task_groups)
  transforms = mtl.ensure_aggregator(build_transforms(mtl_transforms, spec.num_groups))
  task_grads = mtl.needs_task_grads(transforms)
  lengths = data_pipeline.check_feature_lengths(task_feature_lengths)
  if batch_size % dp:
    raise UserError(f"BATCH_SIZE {batch_size} is not divisible by the mesh's data axes "
                    f"(data x fsdp = {dp}); use a multiple of {dp}.")
  if task_grads and units is None:
    units = default_units(spec.num_groups, batch_size, dp, jax.process_count())
  num_units = units if task_grads else 0
  if task_grads and (num_units % dp or num_units % grad_accum_steps):
    raise UserError(f"UNITS {num_units} must be a multiple of the data-parallel size "
                    f"{dp} and of grad_accum_steps {grad_accum_steps}.")
  if not task_grads and (batch_size // dp) % grad_accum_steps:
    raise UserError(f"Rows per device {batch_size // dp} are not divisible by "
                    f"grad_accum_steps {grad_accum_steps}.")
  layout = data_pipeline.Layout(batch_size, num_units, lengths["inputs"], lengths["targets"])
  pipe = data_pipeline.load(
      mixture_or_task_name, lengths, layout, split=split,
      seed=seed if data_seed is None else data_seed, rate_fn=rate_fn,
      rate_maximum=rate_maximum, rate_temperature=rate_temperature,
      task_groups=task_groups, process_index=jax.process_index(),
      process_count=jax.process_count())
  _report_mixture(pipe)

  # ---- model, optimizer, state --------------------------------------------------------
  model_config = state_lib.resolve_model_config(model_config,
                                                spec.vocabulary.vocab_size)
  model = T5(model_config)
  schedule = optim.as_schedule(learning_rate if learning_rate is not None
                               else optim.rsqrt_schedule())
  optimizer = optimizer_fn(learning_rate=schedule)
  mtl_init = optax.chain(*transforms).init
  boxed, params_abstract = state_lib.abstract_params(model, lengths["inputs"],
                                                     lengths["targets"])
  rules = tuple(logical_axis_rules)
  p_shardings = state_lib.param_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(
      lambda p: state_lib.make_state(p, optimizer, mtl_init, seed), params_abstract)
  s_shardings = state_lib.state_shardings(abstract_state, params_abstract, p_shardings,
                                          mesh)
  if print_param_table and jax.process_index() == 0:
    print(state_lib.param_table(params_abstract, p_shardings), flush=True)

  ckpt = checkpoint.Checkpointer(model_dir, save_period=checkpoint_period,
                                 keep=keep_checkpoints, async_save=async_checkpoint)
  abstract_with_sharding = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, s_shardings)
  restored = ckpt.restore(abstract_with_sharding)
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
        params_sharded = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            params_abstract, p_shardings)
        params = checkpoint.load_params(initial_checkpoint_path, params_sharded)
      else:
        params = state_lib.init_params(model, seed, lengths["inputs"],
                                       lengths["targets"], p_shardings)
      train_state = jax.jit(
          lambda p: state_lib.make_state(p, optimizer, mtl_init, seed),
          out_shardings=s_shardings)(params)

  _write_tasks(model_dir, pipe)
  # Lines logged after the last checkpoint by a run that died are not part of this run.
  if jax.process_index() == 0 and os.path.exists(os.path.join(model_dir, "metrics.jsonl")):
    metrics_writer.truncate_after(model_dir, start_step)

  # ---- the step -----------------------------------------------------------------------
  cfg = step_lib.StepConfig(
      num_tasks=spec.num_tasks, group_of_task=spec.group_of_task, task_grads=task_grads,
      grad_accum_steps=grad_accum_steps, z_loss=z_loss, label_smoothing=label_smoothing,
      dropout=model_config.dropout_rate > 0, rules=rules)
  step_fn = step_lib.make_train_step(model, optimizer, transforms, cfg, p_shardings)
  batch_shardings = _batch_shardings(layout, mesh)
  jit_step = jax.jit(step_fn, in_shardings=(s_shardings, batch_shardings),
                     out_shardings=(s_shardings, None), donate_argnums=(0,))

  return _run(jit_step, train_state, start_step, train_steps, pipe, mesh, rules, ckpt,
              model_dir, schedule, spec, log_period, tensorboard)


def _batch_shardings(layout, mesh) -> dict:
  ndim = 3 if layout.task_major else 2
  out = {k: parallel.batch_sharding(mesh, ndim) for k in data_pipeline.packing.FEATURES}
  if layout.task_major:
    out["unit_task"] = parallel.batch_sharding(mesh, 1)
  return out


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
  tmp = os.path.join(model_dir, ".tasks.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(model_dir, "tasks.json"))


def _write_config(model_dir: str) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  text = gin.operative_config_str()
  tmp = os.path.join(model_dir, ".config.gin.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, os.path.join(model_dir, "config.gin"))


def _run(jit_step, train_state, start_step, train_steps, pipe, mesh, rules, ckpt,
         model_dir, schedule, spec, log_period, tensorboard) -> RunResult:
  """Steps until ``train_steps`` or preemption; logs, checkpoints, saves at the end."""
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
          history = []
          t0, t0_step = time.time(), step
          bar.update(step, {k: v for k, v in last.items() if k.startswith("loss")})
        # Processes must agree to stop; asking costs a collective, so not every step.
        if jax.process_count() == 1 or step % 10 == 0:
          preempted = _agree(preemption.requested)
        periodic = ckpt.save_period > 0 and step % ckpt.save_period == 0
        if periodic or preempted or step == train_steps:
          ckpt.save(step, train_state, gather_data_state(data_state), force=True)
        if preempted:
          log.warning("SIGTERM: saved step %d and stopping.", step)
          break
  finally:
    prefetch.close()
    bar.close()
    ckpt.close()
    writer.close()
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
  if steps > 0:
    scalars["timing/step_s"] = elapsed / steps
    scalars["timing/tokens_per_s"] = tokens / max(elapsed, 1e-9)
  for ex in pipe.examples:  # Epochs of this host's shard at the trained position.
    scalars[f"data/epochs/{ex.name}"] = data_state["cursors"][ex.name] / len(ex)
  writer.write(step, scalars)
  return scalars
