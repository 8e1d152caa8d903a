"""``mtx export``: a run's params as a Hugging Face T5 directory that transformers loads.

    mtx export --gin_file=my_run.gin --gin_file=runs/export.gin \\
      --gin.EXPORT_DIR="'/tmp/my-t5'"

reads MODEL_DIR's newest checkpoint (or EXPORT_CHECKPOINT_PATH: another run, a step
directory, or a Hugging Face directory) and writes ``config.json``, ``model.safetensors``
(float32) and ``spiece.model`` (the run's vocabulary) to EXPORT_DIR, each file atomically,
so that ``T5ForConditionalGeneration.from_pretrained(EXPORT_DIR)`` gives mtx's logits.
The model is the run's: gin's ``model.T5Config``, or that of a pretrained
INITIAL_CHECKPOINT_PATH the run started from. Hugging Face -> mtx -> Hugging Face gives
the same tensors, bit for bit.
"""

import dataclasses
import logging
import re
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtx import parallel, paths
from mtx.data import registry, vocab
from mtx.errors import UserError, check_int
from mtx.model import LoraConfig, T5Config, lora
from mtx.runtime import adapters_io, hf, pretrained
from mtx.runtime import params as params_lib

log = logging.getLogger("mtx")


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What ``mtx export`` did; ``str()`` is the line the CLI prints."""

  directory: str
  files: tuple
  seconds: float

  def __str__(self) -> str:
    names = ", ".join(paths.basename(f) for f in self.files)
    return f"Exported {names} to {self.directory}."


def _host_arrays(params, scanned: bool) -> dict[str, np.ndarray]:
  """Unscanned mtx name -> float32 host array (a scanned stack split per layer)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    array = np.asarray(multihost_utils.process_allgather(leaf, tiled=True), np.float32)
    if scanned and re.search(r"(^|/)layers(/|$)", name):
      for i in range(array.shape[0]):
        out[re.sub(r"(^|/)layers(/|$)", rf"\1layers_{i}\2", name, count=1)] = array[i]
    else:
      out[name] = array
  return out


def _vocab_size(
  model_config: T5Config,
  vocabulary_path: Optional[str],
  mixture_or_task_name: Optional[str],
  mixture_or_task_module: Optional[str],
) -> int:
  """The vocabulary's size, as training saw it (the mixture's, else VOCABULARY's)."""
  if model_config.vocab_size:
    return model_config.vocab_size
  registry.import_modules(mixture_or_task_module, vocabulary_path)
  if mixture_or_task_name:
    return registry.resolve(mixture_or_task_name).vocabulary.vocab_size
  return vocab.get_vocabulary(vocabulary_path).vocab_size


def _check_export_dir(export_dir: str, source: Optional[str]) -> None:
  """Refuses an EXPORT_DIR that would hide a checkpoint or is not a directory."""
  if paths.exists(export_dir) and not paths.isdir(export_dir):
    raise UserError(
      f"EXPORT_DIR {export_dir} is a file; set it to a directory (new or a previous "
      "export)."
    )
  if export_dir == source or (
    paths.isdir(export_dir) and pretrained.is_mtx_checkpoint(export_dir)
  ):
    raise UserError(
      f"EXPORT_DIR {export_dir} holds an mtx run; a Hugging Face directory there would "
      "shadow its checkpoints, so set EXPORT_DIR to another directory."
    )


def _task_adapter(
  task: Optional[str], source: str, config: Optional[LoraConfig], adapters_only: bool
) -> Optional[int]:
  """The per-task adapter of EXPORT_TASK ``task`` in the run at ``source`` (None: no
  task, or no per-task adapters); refuses an EXPORT_TASK that would be ignored (no
  LoRA, a shared adapter only, EXPORT_ADAPTERS_ONLY) and one a run needs but lacks."""
  enabled = config is not None and config.enabled
  if task is not None and adapters_only:
    raise UserError(
      f"EXPORT_TASK is {task!r} but EXPORT_ADAPTERS_ONLY = True writes every adapter "
      "unmerged, so no task is picked; set EXPORT_TASK = None for the adapters, or "
      "EXPORT_ADAPTERS_ONLY = False for the model merged with that task's adapter."
    )
  if task is not None and not enabled:
    raise UserError(
      f"EXPORT_TASK is {task!r} but the model of {source} has no LoRA adapters "
      "(model.LoraConfig.targets is unset), so there is no task adapter to merge; set "
      "EXPORT_TASK = None, or give the run's LoRA gin file if it trained adapters."
    )
  if task is not None and not config.per_task:
    raise UserError(
      f"EXPORT_TASK is {task!r} but the LoRA of {source} has only a shared adapter "
      "(model.LoraConfig.per_task = False), which is merged for every task; set "
      "EXPORT_TASK = None, or give the run's model.LoraConfig if it had per-task ones."
    )
  if adapters_only or not enabled:
    return None
  if config.per_task and not config.shared and task is None:
    raise UserError(
      f"The run at {source} has per-task adapters and no shared one, so there is "
      "nothing to merge without a task; set EXPORT_TASK to one of its tasks (or "
      "EXPORT_ADAPTERS_ONLY=True for all of them)."
    )
  if task is None:
    return None
  adapters = adapters_io.task_adapters(source) or {}
  if task not in adapters:
    raise UserError(
      f"EXPORT_TASK {task!r} is not a task of the run at {source} (its tasks: "
      f"{', '.join(sorted(adapters)) or 'none found'}); name one of them, or None to "
      "merge the shared adapter only."
    )
  return adapters[task]


def export(
  *,
  model_dir: Optional[str],
  export_dir: str,
  checkpoint_path: Optional[str] = None,
  checkpoint_step: Optional[int] = None,
  initial_checkpoint_path: Optional[str] = None,
  vocabulary_path: Optional[str] = None,
  model_config: T5Config = T5Config(),
  mixture_or_task_name: Optional[str] = None,
  mixture_or_task_module: Optional[str] = None,
  devices: Optional[Sequence[jax.Device]] = None,
  adapters_only: bool = False,
  task: Optional[str] = None,
) -> ExportResult:
  """Writes a checkpoint as a Hugging Face T5 directory; see the module docstring.

  Args:
    model_dir: the run (its newest finished checkpoint is exported).
    export_dir: where config.json, model.safetensors and spiece.model go (EXPORT_DIR).
    checkpoint_path: export this checkpoint instead (EXPORT_CHECKPOINT_PATH).
    checkpoint_step: the step to export; None = the newest finished one.
    initial_checkpoint_path: the run's INITIAL_CHECKPOINT_PATH (a pretrained one
      defines the model and vocabulary).
    vocabulary_path, model_config, mixture_or_task_name, mixture_or_task_module: the
      run's, as for training (they give the vocabulary size and the file to copy).
    devices: the devices to load on (default all).
    adapters_only: a LoRA run: write its adapters alone (``adapters.safetensors`` and
      ``lora.json``, ``mtx.runtime.adapters_io``) instead of the merged model
      (EXPORT_ADAPTERS_ONLY).
    task: a run with per-task adapters: merge this task's adapter (and the shared one)
      into the exported model (EXPORT_TASK); None: the shared adapter only. Refused
      where it cannot apply (no LoRA, a shared adapter only, ``adapters_only``).

  A LoRA model is exported merged (``mtx.model.merge``: K + s A B in float32), as the
  base architecture, which transformers loads with the adapted model's logits.
  """
  start = time.time()
  model_dir, export_dir = paths.absolute(model_dir), paths.absolute(export_dir)
  checkpoint_path = paths.absolute(checkpoint_path)
  vocabulary_path = paths.absolute(vocabulary_path)
  initial_checkpoint_path = paths.absolute(initial_checkpoint_path)
  if not export_dir:
    raise UserError(
      "EXPORT_DIR is not set; set it to the directory to write, e.g. "
      "--gin.EXPORT_DIR=\"'/tmp/my-t5'\"."
    )
  paths.check_reachable("EXPORT_DIR", export_dir, write=True)
  source = checkpoint_path or model_dir
  what = "EXPORT_CHECKPOINT_PATH" if checkpoint_path else "MODEL_DIR"
  _check_export_dir(export_dir, source)
  if checkpoint_step is not None:
    check_int("EXPORT_CHECKPOINT_STEP", checkpoint_step, minimum=0)
  model_config, vocabulary_path = pretrained.resolve_run(
    source, initial_checkpoint_path, model_config, vocabulary_path, what
  )
  if checkpoint_step is not None and not pretrained.is_pretrained(source, what):
    source = paths.join(source, str(int(checkpoint_step)))
  size = _vocab_size(
    model_config, vocabulary_path, mixture_or_task_name, mixture_or_task_module
  )
  mesh = parallel.make_mesh(None, devices)
  model_config = adapters_io.with_num_adapters(model_config, source)
  # Before the slow part: an EXPORT_TASK that does not apply is refused.
  adapter = _task_adapter(
    task, source, getattr(model_config, "lora", None), adapters_only
  )
  model, params, _ = params_lib.load_trained(
    model_config, size, mesh, parallel.DEFAULT_RULES, source, what=what
  )
  config, files = model.config, ()
  if adapters_only:
    groups = adapters_io.task_groups(source) if config.lora.per_task else None
    if jax.process_index() == 0:
      files = adapters_io.save(export_dir, lora.split(params)[0], config.lora, groups)
    return ExportResult(export_dir, files, time.time() - start)
  if config.lora.enabled:  # merged into the base kernels: the base architecture
    params = lora.merge(params, config.lora, adapter)
    config = dataclasses.replace(config, lora=LoraConfig())
  arrays = _host_arrays(params, config.scan_layers)
  spiece = hf.spiece_of(vocabulary_path or vocab.default_path())
  if jax.process_index() == 0:
    files = tuple(hf.export(arrays, config, export_dir, spiece))
  seconds = time.time() - start
  log.info("Exported %s to %s in %.1f s.", source, export_dir, seconds)
  return ExportResult(export_dir, files, seconds)
