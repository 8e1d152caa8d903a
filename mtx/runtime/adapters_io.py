"""LoRA adapters saved alone, loaded onto a base, and a run's per-task adapter map.

A folder of adapters (``mtx export`` with EXPORT_ADAPTERS_ONLY; ``train.adapters_path``
reads it)::

    adapters.safetensors   every adapter leaf (``mtx.model.lora.is_adapter``), float32,
                           by its '/'-joined param path ("decoder/layers_0/mlp/wo_lora_a";
                           scanned models keep their 'layers' axis)
    lora.json              the LoraConfig they were trained with (targets, rank, alpha,
                           per_task, num_adapters, shared, num_parallel)

A few MB for a rank-8 adapter of a T5-base, where the model is ~1 GB.

A run's per-task adapters are its task groups in id order (sorted group names,
``mtx.data.registry``); ``task_adapters`` reads them back from MODEL_DIR/tasks.json, so
eval, infer and export pick a task's adapter from the run alone.
"""

import dataclasses
import json
from typing import Any, Optional

import jax
import numpy as np
import safetensors.numpy

from mtx import paths
from mtx.errors import UserError
from mtx.model import LoraConfig, lora
from mtx.runtime import params as params_lib
from mtx.runtime import safetensors_io

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "lora.json"
TASKS_FILE = "tasks.json"


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def save(directory: str, adapters: Any, config: LoraConfig) -> tuple:
  """Writes ``adapters`` (the adapter subtree, ``lora.split(params)[0]``; arrays on any
  devices) and ``config`` to ``directory``, each file atomically; returns the paths."""
  arrays = {
    _name(p): np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32))
    for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
  }
  if not arrays:
    raise UserError(
      "The model has no LoRA adapters to save; export them from a run whose model has "
      "model.LoraConfig.targets set (gin_configs/adapters/lora.gin)."
    )
  paths.makedirs(directory)
  weights, meta = paths.join(directory, ADAPTERS_FILE), paths.join(directory, CONFIG_FILE)
  paths.write_atomically(weights, safetensors.numpy.save(arrays))
  paths.write_atomically(meta, json.dumps(dataclasses.asdict(config), indent=1))
  return weights, meta


def load(path: str, abstract_adapters: Any, what: str = "train.adapters_path") -> Any:
  """The adapters saved in folder ``path``, placed on ``abstract_adapters``' shardings
  (ShapeDtypeStructs of the model's adapter subtree).

  Raises:
    UserError: no such folder or file, or names or shapes that differ from the model's
      adapters (the first one named).
  """
  weights = paths.join(path, ADAPTERS_FILE)
  if not paths.exists(weights):
    raise UserError(
      f"{what} {path} has no {ADAPTERS_FILE}; point it at a folder written by mtx "
      "export with EXPORT_ADAPTERS_ONLY = True."
    )
  reader = safetensors_io.open_safetensors(weights)
  have = set(reader.keys())
  flat = jax.tree_util.tree_flatten_with_path(abstract_adapters)[0]
  want = {_name(p): leaf for p, leaf in flat}
  missing, extra = sorted(set(want) - have), sorted(have - set(want))
  if missing or extra:
    first = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model lacks"
    raise UserError(
      f"{what} {path} does not fit the model's adapters: it {first}; use adapters "
      "saved from a run of the same model and model.LoraConfig."
    )
  for name, leaf in want.items():
    shape = tuple(reader.get_slice(name).get_shape())
    if shape != tuple(leaf.shape):
      raise UserError(
        f"{what} {path}: adapter {name} is {list(shape)} but the model's is "
        f"{list(leaf.shape)}; use adapters saved from the same model and "
        "model.LoraConfig (rank, per-task adapters)."
      )

  def place(p, leaf):
    value = np.asarray(reader.get_slice(_name(p))[:], np.float32).astype(leaf.dtype)
    sharding = leaf.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(leaf.shape, sharding, lambda i: value[i])

  return jax.tree_util.tree_map_with_path(place, abstract_adapters)


def replace_adapters(params: Any, path: str, what: str = "train.adapters_path") -> Any:
  """``params`` with their adapters read from ``path`` (``load``), the base kept."""
  current, base = lora.split(params)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
  )
  return lora.combine(base, load(path, abstract, what))


def _run_dir(path: str) -> Optional[str]:
  """The MODEL_DIR holding ``path`` (itself, a step directory in it, or a step's state
  directory) when it has a tasks.json; else None."""
  here = path
  for _ in range(3):
    if paths.exists(paths.join(here, TASKS_FILE)):
      return here
    here = paths.dirname(here)
  return None


def task_adapters(path: Optional[str]) -> Optional[dict]:
  """{task name: per-task adapter id} of the run at ``path`` (its tasks.json: the
  adapter of a task is its group's id), or None when ``path`` is not an mtx run."""
  run = _run_dir(path) if path else None
  if run is None:
    return None
  with paths.open_file(paths.join(run, TASKS_FILE), "r") as f:
    tasks = json.load(f)["tasks"]
  groups = sorted({t["group"] for t in tasks})
  return {t["name"]: groups.index(t["group"]) for t in tasks}


def with_num_adapters(model_config, path: Optional[str]):
  """``model_config`` with ``lora.num_adapters`` filled in from the run at ``path``
  (its number of task groups) for per-task adapters left at 0; else unchanged."""
  cfg = getattr(model_config, "lora", None)
  if not (cfg and cfg.enabled and cfg.per_task and cfg.num_adapters == 0):
    return model_config
  adapters = task_adapters(path)
  if not adapters:
    raise UserError(
      f"The model has per-task LoRA adapters but {path} has no {TASKS_FILE} to count "
      "them from; set model.LoraConfig.num_adapters to the run's number of task groups."
    )
  return dataclasses.replace(
    model_config,
    lora=dataclasses.replace(cfg, num_adapters=max(adapters.values()) + 1),
  )


def for_task(model, params: Any, shardings: Any, task: Optional[str], run: Optional[str]):
  """(model, params, shardings) to decode or score ``task`` with: for a LoRA model, the
  base architecture with the shared adapter and ``task``'s own (per-task adapters: the
  run at ``run``'s map, ``task_adapters``) merged into its kernels (``lora.merge``), so
  decoding code runs unchanged; any other model as given."""
  config = model.config
  if not (getattr(config, "lora", None) and config.lora.enabled):
    return model, params, shardings
  adapter = None
  if config.lora.per_task and task is not None:
    adapters = task_adapters(run) or {}
    if task not in adapters:
      raise UserError(
        f"Task {task!r} has no per-task adapter in the run at {run} (its tasks: "
        f"{', '.join(sorted(adapters)) or 'none found'}); name one of its tasks."
      )
    adapter = adapters[task]
  return merged(model, params, shardings, adapter)


def merged(model, params: Any, shardings: Any, adapter: Optional[int]):
  """(the base model, params with the shared adapter and per-task adapter ``adapter``
  (None: none) merged into its kernels, their shardings) of a LoRA ``model``."""
  base, base_shardings = without_adapters(model, shardings)
  return base, lora.merge(params, model.config.lora, adapter), base_shardings


def without_adapters(model, shardings: Any) -> tuple:
  """(the model without LoRA, the shardings of its params) of a LoRA ``model``: what
  runs merged params (``merged``)."""
  base = params_lib.make_model(dataclasses.replace(model.config, lora=LoraConfig()))
  return base, lora.split(shardings)[1]
