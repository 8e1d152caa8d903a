"""``mtx compile``: the gin-configured run's train step, compiled for a target mesh.

    mtx compile --gin_file=gin_configs/demo.gin --gin_file=models/xxl.gin \\
      --gin.COMPILE_NUM_DEVICES=256 \\
      --gin.MESH_SHAPE="{'data': 16, 'fsdp': 16, 'tensor': 1}" \\
      --gin.COMPILE_DEVICE_MEMORY_GIB=95

reads the ``train.*`` bindings that shape the step, the fields of ``DataSettings`` and
``StepSettings`` (``mtx.train.settings``), builds the step as ``mtx train`` builds it and
compiles it (``mtx.train.compile``). The other settings (MODEL_DIR, TRAIN_STEPS, ...)
are never evaluated, so they may stay REQUIRED.
"""

import copy
import dataclasses
import logging

import gin

from mtx import paths
from mtx.data import registry
from mtx.errors import UserError
from mtx.model import T5Config
from mtx.runtime import pretrained
from mtx.train import build as build_lib
from mtx.train import compile as compile_lib
from mtx.train import settings as settings_lib

log = logging.getLogger("mtx")


def _step_bindings(names: frozenset) -> dict:
  """The gin bindings of ``train`` among ``names``, evaluated one by one.

  A learning rate schedule that cannot be built here (one of TRAIN_STEPS, say) is
  replaced by a constant: the compiled program is the same.
  """
  out = {}
  for name, value in gin.get_bindings("train", resolve_references=False).items():
    if name not in names:
      continue
    try:
      out[name] = copy.deepcopy(value)  # evaluates @references and %MACROS
    except Exception as e:  # pylint: disable=broad-except
      if name == "learning_rate":
        log.info(
          "The learning rate schedule could not be built (%s); compiling with a "
          "constant one (the same program).",
          " ".join(str(e).split()),
        )
        out[name] = 1e-3
        continue
      raise UserError(
        f"Setting train.{name} could not be evaluated "
        f"({' '.join(str(e).split())[:300]}); set it for mtx compile as "
        "for mtx train."
      ) from e
  return out


def _fields(cls) -> frozenset:
  return frozenset(f.name for f in dataclasses.fields(cls))


def compile_train(
  num_devices: int = 0,
  device_memory_gib: float = 0.0,
  num_processes: int = 1,
  compare_routes: bool = False,
) -> compile_lib.CompileReport:
  """``mtx compile`` (gin_configs/runs/compile.gin).

  Args:
    num_devices: fake CPU devices to compile for (COMPILE_NUM_DEVICES); 0 keeps the
      devices JAX finds (the CPU's, unless set otherwise).
    device_memory_gib: memory of one target device (COMPILE_DEVICE_MEMORY_GIB); 0
      skips the fit check.
    num_processes: processes of the target run (hosts), which default UNITS must be a
      multiple of (COMPILE_NUM_PROCESSES).
    compare_routes: for a per-task method, also compile the plain step and both
      per-task routes ('stacks', 'gramian'; ``train.task_grads_route``) and print the
      memory of each (COMPILE_COMPARE_ROUTES).
  """
  compile_lib.use_fake_devices(num_devices)
  data_names = _fields(settings_lib.DataSettings)
  step_names = _fields(settings_lib.StepSettings)
  bindings = _step_bindings(data_names | step_names | {"initial_checkpoint_path"})
  # A pretrained INITIAL_CHECKPOINT_PATH gives the model and vocabulary, as in training.
  bindings["model_config"], bindings["vocabulary_path"] = pretrained.resolve(
    paths.absolute(bindings.pop("initial_checkpoint_path", None)),
    bindings.get("model_config", T5Config()),
    bindings.get("vocabulary_path"),
    "INITIAL_CHECKPOINT_PATH",
  )
  data = settings_lib.DataSettings(
    **{k: v for k, v in bindings.items() if k in data_names}
  )
  settings = settings_lib.StepSettings(
    **{k: v for k, v in bindings.items() if k in step_names}
  )
  registry.import_modules(data.mixture_or_task_module, data.vocabulary_path)
  memory = int(device_memory_gib * compile_lib.GIB) or None
  shards = data.data_shards or num_processes
  build = build_lib.build_train_step(
    data, settings, num_shards=shards, device_memory=memory
  )
  report = compile_lib.compile_step(build, device_memory_gib)
  if compare_routes and build.task_grads:
    report.routes = _other_routes(data, settings, shards, memory, build, report.total)
  return report


def _other_routes(data, settings, shards, memory, build, total) -> dict:
  """``CompileReport.routes``: the total bytes per device of this run's route
  (``total``), of the plain step (the same run summing the task losses) and of the
  other per-task route."""
  route = build.step_config.task_grads_route
  out = {f"{route} (this run)": (total, "")}
  variants = {
    "plain (sum of losses)": dataclasses.replace(
      settings, mtl_transforms=(), tag_affinity_period=0
    ),
    "stacks": dataclasses.replace(settings, task_grads_route="stacks"),
    "gramian": dataclasses.replace(settings, task_grads_route="gramian"),
  }
  for name, variant in variants.items():
    if name == route:
      continue
    try:
      other = build_lib.build_train_step(
        data, variant, num_shards=shards, device_memory=memory, mesh=build.mesh
      )
    except UserError as e:
      out[name] = (None, f"not applicable ({e})")
      continue
    out[name] = (compile_lib.compile_step(other).total, "")
  return out
