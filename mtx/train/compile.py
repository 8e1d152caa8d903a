"""``mtx compile``: the train step compiled for a target mesh on the CPU, before a run.

    mtx compile --gin_file=gin_configs/demo.gin --gin_file=models/xxl.gin \\
      --gin.COMPILE_NUM_DEVICES=256 \\
      --gin.MESH_SHAPE="{'data': 16, 'fsdp': 16, 'tensor': 1}" \\
      --gin.COMPILE_DEVICE_MEMORY_GIB=95

reads the same gin files as ``mtx train`` (the ``train.*`` bindings), builds the step
as the trainer builds it (``build_train_step``), and lowers and compiles it with
abstract inputs only (``jax.ShapeDtypeStruct`` with shardings: no parameter is ever
materialised, so a T5-XXL compile allocates nothing of its 11B parameters) on
``COMPILE_NUM_DEVICES`` fake CPU devices, set before JAX starts: no accelerator is
touched. It prints XLA's memory analysis per device, split into parameters, optimizer
and mtl state, per-task gradients and activations/temporaries, the total, whether it
fits ``COMPILE_DEVICE_MEMORY_GIB``, the compile time and XLA's FLOP estimate, and exits
non-zero when it does not fit. (MaxText's train_compile does this for TPUs.)

The numbers are the CPU compiler's: the program, its shardings and the state and
batch sizes are the target's, but a GPU or TPU compiler fuses and schedules
differently, so temporaries may differ (usually fewer on accelerators); leave a margin.
"""

import dataclasses
import inspect
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax

from mtx import mtl, parallel
from mtx.data import packing
from mtx.data import pipeline as data_pipeline
from mtx.data import registry
from mtx.data import vocab as vocab_lib
from mtx.errors import UserError
from mtx.model import T5, T5Config
from mtx.train import loop as loop_lib, optim, state as state_lib
from mtx.train import step as step_lib

log = logging.getLogger("mtx")
GIB = 1024 ** 3


@dataclasses.dataclass
class StepBuild:
  """The train step and everything around it, as ``mtx train`` builds it (no arrays).

  Attributes:
    mesh, spec, layout: the device mesh, the resolved mixture, the global batch layout.
    transforms: the mtl transforms (aggregator ensured); task_grads: per-task route.
    model_config, model, schedule, optimizer, mtl_init: the model and its optimizer.
    params_abstract, param_shardings: parameter ShapeDtypeStructs and NamedShardings.
    abstract_state, state_shardings: the whole train state, abstract, and its shardings.
    step_config: the step's static settings; rules: the logical axis rules.
    jit_step: ``jax.jit(step, in/out shardings, donated state)``.
    batch_shardings: NamedShardings of the batch features.
  """
  mesh: Any
  spec: registry.MixtureSpec
  layout: data_pipeline.Layout
  transforms: tuple
  task_grads: bool
  model_config: T5Config
  model: T5
  schedule: Callable
  optimizer: optax.GradientTransformation
  mtl_init: Callable
  params_abstract: Any
  param_shardings: Any
  abstract_state: Any
  state_shardings: Any
  step_config: step_lib.StepConfig
  rules: tuple
  jit_step: Callable
  batch_shardings: dict

  def sharded_state(self) -> Any:
    """The abstract state with its shardings: what restore and lower take."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of one global batch ([U, R, L] task-major, or [B, L])."""
    lay = self.layout
    lead = (lay.units, lay.rows_per_unit) if lay.task_major else (lay.batch_size,)
    out = {}
    for name in packing.FEATURES:
      length = lay.inputs_length if name.startswith("encoder") else lay.targets_length
      out[name] = jax.ShapeDtypeStruct(lead + (length,), np.int32,
                                       sharding=self.batch_shardings[name])
    if lay.task_major:
      out["unit_task"] = jax.ShapeDtypeStruct(
          (lay.units,), np.int32, sharding=self.batch_shardings["unit_task"])
    return out


def batch_shardings(layout: data_pipeline.Layout, mesh) -> dict:
  ndim = 3 if layout.task_major else 2
  out = {k: parallel.batch_sharding(mesh, ndim) for k in packing.FEATURES}
  if layout.task_major:
    out["unit_task"] = parallel.batch_sharding(mesh, 1)
  return out


def build_train_step(*,
                     mixture_or_task_name: str,
                     task_feature_lengths: Mapping[str, int],
                     batch_size: int = 32,
                     model_config: T5Config = T5Config(),
                     mtl_transforms: Sequence = (),
                     optimizer_fn: Callable = optim.make_optimizer,
                     learning_rate: Any = None,
                     mesh_shape: Optional[Mapping[str, int]] = None,
                     logical_axis_rules: Sequence = parallel.DEFAULT_RULES,
                     units: Optional[int] = None,
                     task_groups: Optional[Mapping[str, str]] = None,
                     grad_accum_steps: int = 1,
                     z_loss: float = 1e-4,
                     label_smoothing: float = 0.0,
                     seed: int = 0,
                     num_shards: int = 1,
                     devices: Optional[Sequence[jax.Device]] = None,
                     mesh: Optional[jax.sharding.Mesh] = None) -> StepBuild:
  """Builds the jitted train step and its abstract state, reading no data.

  Arguments mean what they mean for ``mtx.train.loop.train`` (gin_configs/runs/
  train.gin); ``num_shards`` is the number of data shards (processes reading data),
  which default UNITS must be a multiple of; ``mesh``, if given, replaces
  ``mesh_shape`` and ``devices``. Raises UserError on settings that do not fit
  together (batch vs mesh, units, accumulation).
  """
  if grad_accum_steps < 1:
    raise UserError(f"grad_accum_steps must be >= 1 (got {grad_accum_steps}).")
  if mesh is None:
    mesh = parallel.make_mesh(mesh_shape, devices)
  dp = parallel.data_parallel_size(mesh)
  spec = registry.resolve(mixture_or_task_name, task_groups)
  transforms = mtl.ensure_aggregator(loop_lib.build_transforms(mtl_transforms,
                                                            spec.num_groups))
  task_grads = mtl.needs_task_grads(transforms)
  lengths = data_pipeline.check_feature_lengths(task_feature_lengths)
  if batch_size % dp:
    raise UserError(f"BATCH_SIZE {batch_size} is not divisible by the mesh's data axes "
                    f"(data x fsdp = {dp}); use a multiple of {dp}.")
  if task_grads and units is None:
    units = loop_lib.default_units(spec.num_groups, batch_size, dp, num_shards)
  num_units = units if task_grads else 0
  if task_grads and (num_units % dp or num_units % grad_accum_steps):
    raise UserError(f"UNITS {num_units} must be a multiple of the data-parallel size "
                    f"{dp} and of grad_accum_steps {grad_accum_steps}.")
  if not task_grads and (batch_size // dp) % grad_accum_steps:
    raise UserError(f"Rows per device {batch_size // dp} are not divisible by "
                    f"grad_accum_steps {grad_accum_steps}.")
  layout = data_pipeline.Layout(batch_size, num_units, lengths["inputs"],
                                lengths["targets"])
  data_pipeline.check_layout(layout, num_shards)

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
  cfg = step_lib.StepConfig(
      num_tasks=spec.num_tasks, group_of_task=spec.group_of_task, task_grads=task_grads,
      grad_accum_steps=grad_accum_steps, z_loss=z_loss, label_smoothing=label_smoothing,
      dropout=model_config.dropout_rate > 0, rules=rules)
  step_fn = step_lib.make_train_step(model, optimizer, transforms, cfg, p_shardings)
  b_shardings = batch_shardings(layout, mesh)
  jit_step = jax.jit(step_fn, in_shardings=(s_shardings, b_shardings),
                     out_shardings=(s_shardings, None), donate_argnums=(0,))
  return StepBuild(mesh, spec, layout, transforms, task_grads, model_config, model,
                   schedule, optimizer, mtl_init, params_abstract, p_shardings,
                   abstract_state, s_shardings, cfg, rules, jit_step, b_shardings)


# ---- the report ---------------------------------------------------------------------
def sharded_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of ``tree`` (ShapeDtypeStructs) under ``shardings``.

  The largest per-device share: a replicated leaf counts whole on every device.
  """
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(tuple(leaf.shape)) if leaf.shape else ()
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class CompileReport:
  """What ``mtx compile`` found (bytes are per device).

  ``failure`` is one sentence when the step does not fit ``device_memory``, else None;
  the CLI prints it and exits non-zero.
  """
  mesh_shape: dict
  num_devices: int
  num_params: int
  model: str
  route: str
  bytes: dict
  device_memory: Optional[int]
  lower_s: float
  compile_s: float
  flops: Optional[float]
  flops_note: str = ""
  failure: Optional[str] = None

  @property
  def total(self) -> int:
    return self.bytes["total"]

  @property
  def fits(self) -> Optional[bool]:
    return None if not self.device_memory else self.total <= self.device_memory

  def __str__(self) -> str:
    b = self.bytes
    rows = [("parameters", b["params"]),
            ("optimizer state", b["optimizer"]),
            ("mtl state", b["mtl"]),
            ("batch", b["batch"]),
            (f"per-task gradients ({b['groups']} x params)", b["task_grads"]),
            ("other activations/temporaries", b["other_temp"]),
            ("outputs not aliased to inputs", b["unaliased_output"]),
            ("generated code", b["code"]),
            ("total", b["total"])]
    width = max(len(r[0]) for r in rows)
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    lines = [f"Compiled the train step for {self.num_devices} devices (mesh {mesh}), "
             f"{self.model}, {self.num_params:,} parameters, {self.route}.",
             f"Memory per device (XLA's analysis of the CPU compile):"]
    lines += [f"  {name:<{width}}  {_gib(n):>10}" for name, n in rows]
    flops = f"{self.flops:.3e}" if self.flops is not None else "n/a"
    lines.append(f"XLA FLOPs per device per step: {flops}{self.flops_note}; lowering "
                 f"{self.lower_s:.1f} s, compile {self.compile_s:.1f} s.")
    if self.device_memory:
      verdict = "fits" if self.fits else "does not fit"
      lines.append(f"Device memory {_gib(self.device_memory)}: {verdict} "
                   f"({100.0 * self.total / self.device_memory:.0f}% used).")
    else:
      lines.append("No COMPILE_DEVICE_MEMORY_GIB given: fit not checked.")
    return "\n".join(lines)


def _gib(n: int) -> str:
  return f"{n / GIB:.3f} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.2f} MiB"


def _flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def compile_step(build: StepBuild, device_memory_gib: float = 0.0) -> CompileReport:
  """Lowers and compiles ``build.jit_step`` on abstract inputs; returns the report."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  with build.mesh, nn.logical_axis_rules(list(build.rules)):
    lowered = build.jit_step.lower(build.sharded_state(), build.abstract_batch())
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  mem = compiled.memory_analysis()
  state, shard = build.abstract_state, build.state_shardings
  params = sharded_bytes(state["params"], shard["params"])
  optimizer = sharded_bytes(state["opt_state"], shard["opt_state"])
  mtl_state = sharded_bytes(state["mtl_state"], shard["mtl_state"])
  groups = build.step_config.num_groups if build.task_grads else 0
  # Per-task gradients are f32 stacks shaped [G, *param], sharded like params.
  f32_params = sharded_bytes(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32),
                   state["params"]), shard["params"])
  task_grads = groups * f32_params
  temp = int(mem.temp_size_in_bytes)
  unaliased = max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)
  total = int(mem.argument_size_in_bytes) + temp + unaliased + int(
      mem.generated_code_size_in_bytes)
  arguments = int(mem.argument_size_in_bytes)
  batch = max(arguments - params - optimizer - mtl_state, 0)
  nbytes = {"params": params, "optimizer": optimizer, "mtl": mtl_state, "batch": batch,
            "groups": groups, "task_grads": min(task_grads, temp),
            "other_temp": max(temp - task_grads, 0), "temp": temp,
            "unaliased_output": unaliased, "arguments": arguments,
            "code": int(mem.generated_code_size_in_bytes), "total": total}
  cfg = build.model_config
  model = (f"T5 emb {cfg.emb_dim} x {cfg.num_encoder_layers}+{cfg.num_decoder_layers} "
           f"layers, vocab {cfg.vocab_size}")
  route = (f"per-task gradients over {groups} groups, {build.layout.units} units"
           if build.task_grads else "one gradient")
  report = CompileReport(
      mesh_shape=dict(build.mesh.shape), num_devices=build.mesh.size,
      num_params=state_lib.count_params(build.params_abstract), model=model,
      route=route, bytes=nbytes,
      device_memory=int(device_memory_gib * GIB) if device_memory_gib else None,
      lower_s=t1 - t0, compile_s=t2 - t1, flops=_flops(compiled),
      # XLA's cost analysis counts a while loop's body once.
      flops_note=(" (loops counted once: scanned layers, microbatches)"
                  if cfg.scan_layers or build.step_config.grad_accum_steps > 1 else ""))
  if report.fits is False:
    report.failure = (
        f"The train step needs {_gib(total)} per device but COMPILE_DEVICE_MEMORY_GIB "
        f"is {device_memory_gib:g} GiB; shard more (MESH_SHAPE fsdp/tensor), lower "
        "BATCH_SIZE or TASK_FEATURE_LENGTHS, turn on remat, or group tasks.")
  return report


# ---- the gin edge -------------------------------------------------------------------
def use_fake_devices(num_devices: int) -> None:
  """Makes JAX start on ``num_devices`` CPU devices and nothing else.

  Must run before JAX initialises its backends (the CLI imports JAX lazily, so the
  ``compile`` command gets here first). Raises UserError when JAX already runs with a
  different number of devices.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    have = len(jax.devices())
    if num_devices and have != num_devices:
      raise UserError(f"JAX already runs with {have} devices, so COMPILE_NUM_DEVICES="
                      f"{num_devices} cannot take effect; run `mtx compile` in a fresh "
                      "process.")
    return
  jax.config.update("jax_platforms", "cpu")
  if num_devices:
    jax.config.update("jax_num_cpu_devices", int(num_devices))


# train.* settings that do not shape the step (evaluated only when the step needs them).
_NOT_FOR_THE_STEP = ("model_dir", "train_steps", "rate_fn", "rate_maximum",
                     "rate_temperature", "data_seed", "log_period", "checkpoint_period",
                     "keep_checkpoints", "async_checkpoint", "initial_checkpoint_path",
                     "eval_period", "split", "tensorboard", "print_param_table",
                     "devices")


def _train_bindings() -> dict:
  """The gin bindings of ``train`` (what ``mtx train`` would be called with).

  Values are evaluated one by one, and only those the step needs, so settings the
  step does not need (MODEL_DIR, TRAIN_STEPS) may stay REQUIRED.
  """
  import copy  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  out = {}
  for name, value in gin.get_bindings("train", resolve_references=False).items():
    if name in _NOT_FOR_THE_STEP:
      continue
    try:
      out[name] = copy.deepcopy(value)  # evaluates @references and %MACROS
    except Exception as e:  # pylint: disable=broad-except
      if name == "learning_rate":  # a schedule of TRAIN_STEPS, say: any will do here
        log.info("The learning rate schedule could not be built (%s); compiling with a "
                 "constant one (the same program).", " ".join(str(e).split()))
        out[name] = 1e-3
        continue
      raise UserError(f"Setting train.{name} could not be evaluated "
                      f"({' '.join(str(e).split())[:300]}); set it for mtx compile as "
                      "for mtx train.") from e
  return out


def compile_train(num_devices: int = 0, device_memory_gib: float = 0.0,
                  num_processes: int = 1) -> CompileReport:
  """``mtx compile``: the gin-configured run's train step, compiled for a target.

  Args:
    num_devices: fake CPU devices to compile for (COMPILE_NUM_DEVICES); 0 keeps the
      devices JAX finds (the CPU's, unless set otherwise).
    device_memory_gib: memory of one target device (COMPILE_DEVICE_MEMORY_GIB); 0
      skips the fit check.
    num_processes: processes of the target run (hosts), which default UNITS must be a
      multiple of (COMPILE_NUM_PROCESSES).
  """
  use_fake_devices(num_devices)
  kwargs = _train_bindings()
  registry.import_modules(kwargs.pop("mixture_or_task_module", None))
  vocabulary_path = kwargs.pop("vocabulary_path", None)
  if vocabulary_path:  # as the trainer does: tasks on the default vocabulary use it
    vocab_lib.get_vocabulary(vocabulary_path)
    os.environ["MTX_VOCAB"] = vocabulary_path
  data_shards = kwargs.pop("data_shards", None)
  known = inspect.signature(build_train_step).parameters
  ignored = sorted(set(kwargs) - set(known))
  if ignored:
    log.info("mtx compile ignores train.%s (not part of the step).",
             ", train.".join(ignored))
  build = build_train_step(num_shards=data_shards or num_processes,
                           **{k: v for k, v in kwargs.items() if k in known})
  return compile_step(build, device_memory_gib)
