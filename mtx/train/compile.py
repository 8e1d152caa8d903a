"""The train step compiled for a target mesh on the CPU, before a run (``mtx compile``).

    mtx compile --gin_file=gin_configs/demo.gin --gin_file=models/xxl.gin \\
      --gin.COMPILE_NUM_DEVICES=256 \\
      --gin.MESH_SHAPE="{'data': 16, 'fsdp': 16, 'tensor': 1}" \\
      --gin.COMPILE_DEVICE_MEMORY_GIB=95

reads the same gin files as ``mtx train`` (the ``train.*`` bindings; ``mtx.cli.compile``),
builds the step as the trainer builds it (``build_train_step``), and ``compile_step``
lowers and compiles it with abstract inputs only (``jax.ShapeDtypeStruct`` with shardings: no parameter is ever
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
import logging
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from mtx import parallel
from mtx.errors import UserError
from mtx.train import freeze
from mtx.train.build import StepBuild

log = logging.getLogger("mtx")
GIB = 1024**3


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
  # Parameters trained (``train.trainable_params``); None: all of them.
  num_trainable: Optional[int] = None
  # route name -> (total bytes per device, or None where the route does not apply,
  # and why); filled by ``mtx compile`` with COMPILE_COMPARE_ROUTES.
  routes: dict = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> int:
    return self.bytes["total"]

  @property
  def fits(self) -> Optional[bool]:
    return None if not self.device_memory else self.total <= self.device_memory

  def __str__(self) -> str:
    b = self.bytes
    trained = "params" if self.num_trainable is None else "trainable params"
    rows = [
      ("parameters", b["params"]),
      ("optimizer state", b["optimizer"]),
      ("mtl state", b["mtl"]),
      ("batch", b["batch"]),
      (f"per-task gradients ({b['groups']} x {trained} / data)", b["task_grads"]),
      ("other activations/temporaries", b["other_temp"]),
      ("outputs not aliased to inputs", b["unaliased_output"]),
      ("generated code", b["code"]),
      ("total", b["total"]),
    ]
    width = max(len(r[0]) for r in rows)
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    unit, scale = column_unit(b["total"])  # one unit for the column: rows compare
    frozen = (
      ""
      if self.num_trainable is None
      else f" ({self.num_trainable:,} trainable, the rest frozen)"
    )
    lines = [
      f"Compiled the train step for {self.num_devices} devices (mesh {mesh}), "
      f"{self.model}, {self.num_params:,} parameters{frozen}, {self.route}.",
      "Memory per device (XLA's analysis of the CPU compile):",
    ]
    lines += [f"  {name:<{width}}  {n / scale:>10.3f} {unit}" for name, n in rows]
    flops = f"{self.flops:.3e}" if self.flops is not None else "n/a"
    lines.append(
      f"XLA FLOPs per device per step: {flops}{self.flops_note}; lowering "
      f"{self.lower_s:.1f} s, compile {self.compile_s:.1f} s."
    )
    if self.device_memory:
      verdict = "fits" if self.fits else "does not fit"
      lines.append(
        f"Device memory {_gib(self.device_memory)}: {verdict} "
        f"({100.0 * self.total / self.device_memory:.0f}% used)."
      )
    else:
      lines.append("No COMPILE_DEVICE_MEMORY_GIB given: fit not checked.")
    for route, (total, why) in self.routes.items():
      shown = f"{total / scale:.3f} {unit} per device" if total is not None else why
      lines.append(f"  route {route}: {shown}")
    return "\n".join(lines)


def column_unit(largest: int) -> tuple:
  """(name, bytes) of the unit a column of byte counts up to ``largest`` is shown in:
  GiB from 1 GiB, MiB from 1 MiB, else KiB."""
  for name, scale in (("GiB", GIB), ("MiB", 2**20)):
    if largest >= scale:
      return name, scale
  return "KiB", 2**10


def _gib(n: int) -> str:
  return f"{n / GIB:.3f} GiB" if n >= GIB / 100 else f"{n / 2**20:.2f} MiB"


def _flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def memory_breakdown(build: StepBuild, mem) -> dict:
  """Bytes per device of the compiled step (``mem``: XLA's ``memory_analysis()``), split
  into params, optimizer and mtl state, batch, per-task gradients (of the trainable
  params), other temporaries, outputs not aliased to inputs and code; ``groups`` is the
  number of task groups."""
  state, shard = build.abstract_state, build.state_shardings
  params = sharded_bytes(state["params"], shard["params"])
  optimizer = sharded_bytes(state["opt_state"], shard["opt_state"])
  mtl_state = sharded_bytes(state["mtl_state"], shard["mtl_state"])
  stacks = build.task_grads and build.step_config.task_grads_route == "stacks"
  groups = build.step_config.num_groups if stacks else 0
  # Per-task gradients are f32 stacks [G, *param], laid out by
  # parallel.group_stack_sharding (like params, split over data too); the Gramian
  # route holds none.
  task_grads = sharded_bytes(
    jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((groups,) + a.shape, np.float32),
      build.trainable_abstract,
    ),
    jax.tree.map(parallel.group_stack_sharding, build.trainable_shardings),
  )
  temp = int(mem.temp_size_in_bytes)
  unaliased = max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)
  total = (
    int(mem.argument_size_in_bytes)
    + temp
    + unaliased
    + int(mem.generated_code_size_in_bytes)
  )
  arguments = int(mem.argument_size_in_bytes)
  batch = max(arguments - params - optimizer - mtl_state, 0)
  nbytes = {
    "params": params,
    "optimizer": optimizer,
    "mtl": mtl_state,
    "batch": batch,
    "groups": groups,
    "task_grads": min(task_grads, temp),
    "other_temp": max(temp - task_grads, 0),
    "temp": temp,
    "unaliased_output": unaliased,
    "arguments": arguments,
    "code": int(mem.generated_code_size_in_bytes),
    "total": total,
  }
  return nbytes


def compile_step(build: StepBuild, device_memory_gib: float = 0.0) -> CompileReport:
  """Lowers and compiles ``build.jit_step`` on abstract inputs; returns the report."""
  t0 = time.time()
  with build.mesh, nn.logical_axis_rules(list(build.rules)):
    lowered = build.jit_step.lower(build.sharded_state(), build.abstract_batch())
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  nbytes = memory_breakdown(build, compiled.memory_analysis())
  groups, total = nbytes["groups"], nbytes["total"]
  cfg = build.model_config
  if hasattr(cfg, "num_kv_heads"):  # a LlamaConfig
    model = (
      f"Llama emb {cfg.emb_dim} x {cfg.num_layers} layers, heads {cfg.num_heads} "
      f"(kv {cfg.num_kv_heads}), vocab {cfg.vocab_size}"
    )
  else:
    model = (
      f"T5 emb {cfg.emb_dim} x {cfg.num_encoder_layers}+{cfg.num_decoder_layers} "
      f"layers, vocab {cfg.vocab_size}"
    )
  route = (
    f"per-task route '{build.step_config.task_grads_route}' over "
    f"{build.step_config.num_groups} groups, {build.layout.units} units over "
    f"{' x '.join(build.step_config.unit_axes)}"
    if build.task_grads
    else "one gradient"
  )
  total_params, trainable = freeze.counts(
    build.params_abstract, build.settings.trainable_params
  )
  report = CompileReport(
    mesh_shape=dict(build.mesh.shape),
    num_devices=build.mesh.size,
    num_params=total_params,
    num_trainable=None if build.settings.trainable_params is None else trainable,
    model=model,
    route=route,
    bytes=nbytes,
    device_memory=int(device_memory_gib * GIB) if device_memory_gib else None,
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    flops=_flops(compiled),
    # XLA's cost analysis counts a while loop's body once.
    flops_note=(
      " (loops counted once: scanned layers, microbatches)"
      if cfg.scan_layers or build.step_config.grad_accum_steps > 1
      else ""
    ),
  )
  if report.fits is False:
    report.failure = (
      f"The train step needs {_gib(total)} per device but COMPILE_DEVICE_MEMORY_GIB "
      f"is {device_memory_gib:g} GiB; shard more (MESH_SHAPE fsdp/tensor), lower "
      "BATCH_SIZE or TASK_FEATURE_LENGTHS, turn on remat, or group tasks."
    )
  return report


# ---- fake devices -------------------------------------------------------------------
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
      raise UserError(
        f"JAX already runs with {have} devices, so COMPILE_NUM_DEVICES="
        f"{num_devices} cannot take effect; run `mtx compile` in a fresh "
        "process."
      )
    return
  jax.config.update("jax_platforms", "cpu")
  if num_devices:
    jax.config.update("jax_num_cpu_devices", int(num_devices))
