"""LoRA adapters saved alone, loaded onto a base, and a run's per-task adapter map.

A folder of adapters (``mtx export`` with EXPORT_ADAPTERS_ONLY; ``train.adapters_path``
reads it)::

    adapters.safetensors   every adapter leaf (``mtx.model.lora.is_adapter``), float32,
                           by its '/'-joined param path ("decoder/layers_0/mlp/wo_lora_a";
                           scanned models keep their 'layers' axis)
    lora.json              the LoraConfig they were trained with (targets, rank, alpha,
                           per_task, num_adapters, shared, num_parallel) and, for
                           per-task adapters, "task_groups": the run's task group names
                           in adapter order (adapter i is task_groups[i])

A few MB for a rank-8 adapter of a T5-base, where the model is ~1 GB. ``load`` refuses
adapters whose LoraConfig differs from the model's (they would mean something else: another
scale, other kernels, other routing) or, per-task, whose groups are not the run's.

A run's per-task adapters are its task groups in id order (sorted group names,
``mtx.data.registry``); ``task_adapters`` reads them back from MODEL_DIR/tasks.json, so
eval, infer and export pick a task's adapter from the run alone.
"""

import dataclasses
import json
from typing import Any, Optional, Sequence

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
GROUPS_KEY = "task_groups"  # lora.json: per-task adapters' group names, in id order


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def save(
  directory: str,
  adapters: Any,
  config: LoraConfig,
  group_names: Optional[Sequence[str]] = None,
) -> tuple:
  """Writes ``adapters`` (the adapter subtree, ``lora.split(params)[0]``; arrays on any
  devices), ``config`` and the per-task adapters' ``group_names`` (in adapter order;
  ``task_groups``) to ``directory``, each file atomically; returns the paths."""
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
  info = dataclasses.asdict(config)
  if config.per_task and group_names is not None:
    info[GROUPS_KEY] = list(group_names)
  paths.write_atomically(meta, json.dumps(info, indent=1))
  return weights, meta


# The LoraConfig fields that change what saved adapters mean (num_adapters, the number of
# per-task adapters, is checked with the task groups).
_MEANING = ("targets", "rank", "alpha", "per_task", "shared", "num_parallel")


def check_saved_config(
  path: str, config: LoraConfig, group_names: Optional[Sequence[str]], what: str
) -> None:
  """Raises UserError unless the lora.json in folder ``path`` has ``config``'s meaning
  and, for per-task adapters, ``group_names`` (the run's, in adapter order) as its
  groups. A lora.json written before groups were recorded has its count checked only."""
  meta = paths.join(path, CONFIG_FILE)
  if not paths.exists(meta):
    raise UserError(
      f"{what} {path} has no {CONFIG_FILE} to check the adapters' LoRA settings "
      "against; point it at a folder written by mtx export with EXPORT_ADAPTERS_ONLY = "
      "True."
    )
  with paths.open_file(meta, "r") as f:
    saved = json.load(f)
  defaults = dataclasses.asdict(LoraConfig())  # fields a lora.json may predate
  for field in _MEANING:
    theirs, ours = saved.get(field, defaults[field]), getattr(config, field)
    if theirs != ours:
      raise UserError(
        f"{what} {meta}: its adapters were trained with model.LoraConfig.{field} = "
        f"{theirs!r} but this model has {ours!r}, so they would mean something "
        f"else; set model.LoraConfig.{field} = {theirs!r} or start the adapters fresh "
        "(train.adapters_path = None)."
      )
  if config.per_task:
    _check_groups(saved, config, group_names, meta, what)


def _check_groups(saved: dict, config, group_names, meta: str, what: str) -> None:
  """Per-task adapters: the saved task groups (or, in an older lora.json, their count)
  against the run's ``group_names`` (None: not known here, count only)."""
  theirs, ours = saved.get(GROUPS_KEY), list(group_names or [])
  if theirs is not None and group_names is not None and theirs != ours:
    how = (
      "the same groups in another order"
      if sorted(theirs) == sorted(ours)
      else _group_difference(theirs, ours)
    )
    raise UserError(
      f"{what} {meta}: its per-task adapters are for task groups {theirs} but this "
      f"run's are {ours} ({how}), so they would load onto the wrong tasks; train on "
      "the mixture (and train.task_groups) they were saved from, or start the adapters "
      "fresh (train.adapters_path = None)."
    )
  count = saved.get("num_adapters", 0)
  if count != config.num_adapters:
    raise UserError(
      f"{what} {meta}: it holds {count} per-task adapters but this run has "
      f"{config.num_adapters} task groups; train on the mixture (and "
      "train.task_groups) they were saved from, or start the adapters fresh "
      "(train.adapters_path = None)."
    )


def _group_difference(theirs: Sequence[str], ours: Sequence[str]) -> str:
  """'this run lacks x; this run adds y' for two sets of group names."""
  lacks, adds = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
  parts = [f"this run lacks {', '.join(lacks)}"] if lacks else []
  parts += [f"this run adds {', '.join(adds)}"] if adds else []
  return "; ".join(parts)


def load(
  path: str,
  abstract_adapters: Any,
  config: LoraConfig,
  group_names: Optional[Sequence[str]] = None,
  what: str = "train.adapters_path",
) -> Any:
  """The adapters saved in folder ``path``, placed on ``abstract_adapters``' shardings
  (ShapeDtypeStructs of the model's adapter subtree), after checking that they were
  saved with ``config`` and, per-task, for ``group_names`` (``check_saved_config``).

  Raises:
    UserError: no such folder or file, a LoraConfig or task groups that differ from the
      model's (``check_saved_config``), or names or shapes that differ from the model's
      adapters (the first one named).
  """
  weights = paths.join(path, ADAPTERS_FILE)
  if not paths.exists(weights):
    raise UserError(
      f"{what} {path} has no {ADAPTERS_FILE}; point it at a folder written by mtx "
      "export with EXPORT_ADAPTERS_ONLY = True."
    )
  check_saved_config(path, config, group_names, what)
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


def replace_adapters(
  params: Any,
  path: str,
  config: LoraConfig,
  group_names: Optional[Sequence[str]] = None,
  what: str = "train.adapters_path",
) -> Any:
  """``params`` with their adapters read from ``path`` (``load``: saved with ``config``
  and, per-task, for the run's ``group_names``), the base kept."""
  current, base = lora.split(params)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
  )
  return lora.combine(base, load(path, abstract, config, group_names, what))


def _run_dir(path: str) -> Optional[str]:
  """The MODEL_DIR holding ``path`` (itself, a step directory in it, or a step's state
  directory) when it has a tasks.json; else None."""
  here = path
  for _ in range(3):
    if paths.exists(paths.join(here, TASKS_FILE)):
      return here
    here = paths.dirname(here)
  return None


def _run_tasks(path: Optional[str]) -> Optional[list]:
  """The "tasks" of the run at ``path``'s tasks.json, or None when not an mtx run."""
  run = _run_dir(path) if path else None
  if run is None:
    return None
  with paths.open_file(paths.join(run, TASKS_FILE), "r") as f:
    return json.load(f)["tasks"]


def task_groups(path: Optional[str]) -> Optional[list]:
  """The task group names of the run at ``path`` in adapter-id order (sorted, as
  ``mtx.data.registry`` numbers groups), or None when ``path`` is not an mtx run."""
  tasks = _run_tasks(path)
  return None if tasks is None else sorted({t["group"] for t in tasks})


def task_adapters(path: Optional[str]) -> Optional[dict]:
  """{task name: per-task adapter id} of the run at ``path`` (its tasks.json: the
  adapter of a task is its group's id), or None when ``path`` is not an mtx run."""
  tasks = _run_tasks(path)
  if tasks is None:
    return None
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
