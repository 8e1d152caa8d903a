"""``mtx eval``: evaluate a run's checkpoint on every task of its mixture.

Reads the same gin files as ``mtx train`` (``runs/eval.gin`` holds the EVAL_* settings;
``runs/train.gin`` includes it)::

    mtx eval --gin_file=gin_configs/demo.gin
    mtx eval ... --gin.EVAL_CHECKPOINT_STEP=500 --gin.EVAL_BASELINE_DIR="'/tmp/base'"

loads MODEL_DIR's newest finished checkpoint (or EVAL_CHECKPOINT_STEP), evaluates it
(``mtx.eval.evaluator``), writes ``MODEL_DIR/eval/step_N.json``, the ``eval/...`` lines
of metrics.jsonl and TensorBoard (``mtx.eval.results``), prints a per-task table, and
returns an ``EvalReport`` whose ``str()`` is a one-line summary.
"""

import dataclasses
import logging
import os
from typing import Mapping, Optional, Sequence

import jax

from mtx import parallel, paths
from mtx.data import decoder_only, registry
from mtx.data import pipeline as data_pipeline
from mtx.errors import UserError
from mtx.eval import periodic as eval_periodic
from mtx.eval import results
from mtx.eval.evaluator import EvalOptions, Evaluator
from mtx.model import T5Config
from mtx.runtime import adapters_io, checkpoint, metrics_writer, pretrained
from mtx.runtime import params as params_lib

log = logging.getLogger("mtx")


@dataclasses.dataclass
class EvalReport:
  """What ``mtx eval`` did: the step, where it wrote, and the results object."""

  step: int
  path: str
  record: dict

  def __str__(self) -> str:
    s = self.record["summary"]
    line = (
      f"Evaluated step {self.step} on {len(self.record['tasks'])} tasks "
      f"({self.record['split']}): mean primary {s['mean_primary']:.2f}"
    )
    if s["baseline"]:
      delta = "n/a" if s["delta_m"] is None else f"{s['delta_m']:+.2f}%"
      line += f", delta_m {delta} vs {s['baseline']}"
    return line + f"; wrote {self.path}."


def find_checkpoint_step(model_dir: str, step: Optional[int] = None) -> int:
  """The step ``mtx eval`` reads: ``step`` if that checkpoint is finished, else the newest.

  Raises:
    UserError: no finished checkpoint (or not that step) in ``model_dir``.
  """
  path = model_dir if step is None else paths.join(model_dir, str(int(step)))
  what = "MODEL_DIR" if step is None else "EVAL_CHECKPOINT_STEP"
  state_dir = checkpoint.find_state_dir(path, what)
  return int(state_dir.parent.name)


def _check_results_dir(model_dir: str, checkpoint_path: Optional[str]) -> None:
  """Another checkpoint's results must not land among a training run's own (its
  eval/step_N.json and metrics.jsonl)."""
  if not checkpoint_path or checkpoint_path == model_dir or not paths.isdir(model_dir):
    return
  if any(e.isdigit() for e in paths.listdir(model_dir)):
    raise UserError(
      f"EVAL_CHECKPOINT_PATH {checkpoint_path} would write its results into MODEL_DIR "
      f"{model_dir}, which holds checkpoints of its own run; set MODEL_DIR to another "
      "directory for these results."
    )


def _check_paths(checkpoint_path: Optional[str], model_dir: str) -> None:
  """A bucket that cannot be read or written fails now, in one sentence."""
  paths.check_reachable("EVAL_CHECKPOINT_PATH", checkpoint_path)
  paths.check_reachable("MODEL_DIR", model_dir, write=True)


def _each_task(run, model_config, names) -> results.EvalResult:
  """``run(None)``, or for per-task LoRA adapters ``run(task)`` for each of ``names()``
  (each scored with its own adapter merged in), combined into one result."""
  lora = getattr(model_config, "lora", None)
  if not (lora and lora.enabled and lora.per_task):
    return run(None)
  return results.combine([run(name) for name in names()])


def evaluate(
  *,
  model_dir: str,
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  mixture_or_task_module: Optional[str] = None,
  vocabulary_path: Optional[str] = None,
  model_config: T5Config = T5Config(),
  options: EvalOptions = EvalOptions(),
  prefix_lm: decoder_only.PrefixLM = decoder_only.PrefixLM(),
  checkpoint_step: Optional[int] = None,
  checkpoint_path: Optional[str] = None,
  initial_checkpoint_path: Optional[str] = None,
  mesh_shape: Optional[Mapping[str, int]] = None,
  dcn_mesh_shape: Optional[Mapping[str, int]] = None,
  logical_axis_rules: Sequence = parallel.DEFAULT_RULES,
  tensorboard: bool = True,
  print_table: bool = True,
  devices: Optional[Sequence[jax.Device]] = None,
  predictor=None,
) -> EvalReport:
  """Evaluates MODEL_DIR's checkpoint; see the module docstring and runs/eval.gin.

  Paths may be relative or start with ``~``; they are made absolute here.

  Args:
    model_dir: the run to evaluate (results are written there too); a run still
      training may be evaluated (this takes no lock).
    mixture_or_task_name, task_feature_lengths, mixture_or_task_module,
      vocabulary_path, model_config, mesh_shape, dcn_mesh_shape, logical_axis_rules: as
      for training.
    options: what and how to evaluate (``EvalOptions``).
    prefix_lm: a decoder-only model's rows and prompts, as for training
      (``train.prefix_lm``); unused by T5.
    checkpoint_step: the step to evaluate; None = the newest finished checkpoint.
    checkpoint_path: evaluate this checkpoint instead of MODEL_DIR's (results still go
      to MODEL_DIR): another MODEL_DIR, or a Hugging Face model directory (step 0; its
      config and vocabulary become the run's).
    initial_checkpoint_path: the run's INITIAL_CHECKPOINT_PATH; a pretrained one gives
      the model and vocabulary (``mtx.runtime.pretrained.resolve_run``).
    tensorboard: also write the scalars to TensorBoard.
    print_table: print the per-task table (process 0).
    devices: the devices of the mesh (default all).
    predictor: a stand-in for ``mtx.infer.predict.Predictor`` (tests).
  """
  # long: the command's steps in order (resolve the run, find the checkpoint, load it,
  # evaluate, write), each a call; the formatter's one argument per line makes it long.
  model_dir, vocabulary_path = paths.absolute(model_dir), paths.absolute(vocabulary_path)
  checkpoint_path = paths.absolute(checkpoint_path)
  _check_paths(checkpoint_path, model_dir)
  model_config, vocabulary_path = pretrained.resolve_run(
    checkpoint_path,
    paths.absolute(initial_checkpoint_path),
    model_config,
    vocabulary_path,
    "EVAL_CHECKPOINT_PATH",
  )
  registry.import_modules(mixture_or_task_module, vocabulary_path)
  lengths = data_pipeline.check_feature_lengths(task_feature_lengths)
  spec = registry.resolve(mixture_or_task_name)
  if options.baseline_dir:  # Fail before the slow part.
    results.read_results(options.baseline_dir)
  source = checkpoint_path or model_dir
  _check_results_dir(model_dir, checkpoint_path)
  if pretrained.is_pretrained(checkpoint_path, "EVAL_CHECKPOINT_PATH"):
    step, params_path = 0, checkpoint_path
  else:
    step = find_checkpoint_step(source, checkpoint_step)
    params_path = paths.join(source, str(step))
  mesh = parallel.make_mesh(mesh_shape, devices, dcn_mesh_shape)
  rules = tuple(logical_axis_rules)
  model_config = adapters_io.with_num_adapters(model_config, params_path)
  model, params, shardings = params_lib.load_trained(
    model_config,
    spec.vocabulary.vocab_size,
    mesh,
    rules,
    params_path,
    lengths["inputs"],
    lengths["targets"],
    what="EVAL_CHECKPOINT_PATH" if checkpoint_path else "MODEL_DIR",
  )

  def run(task: Optional[str]) -> results.EvalResult:
    """Evaluates ``task`` (None: the whole mixture) with its adapters merged in (LoRA;
    ``adapters_io.for_task``)."""
    m, p, s = adapters_io.for_task(model, params, shardings, task, params_path)
    evaluator = Evaluator(
      m,
      mesh,
      rules,
      s,
      task or mixture_or_task_name,
      lengths,
      # One task at a time: EVAL_MIXTURE_OR_TASK_NAME chose the tasks already.
      dataclasses.replace(options, mixture_or_task_name=None) if task else options,
      predictor=predictor,
      model_dir=model_dir,
      prefix_lm=prefix_lm,
    )
    try:
      return evaluator.evaluate(p, step)
    finally:
      evaluator.close()

  result = _each_task(
    run,
    model.config,
    lambda: eval_periodic.per_task_names(
      mixture_or_task_name, options, adapters_io.task_adapters(params_path) or {}
    ),
  )
  writer = metrics_writer.MetricsWriter(
    model_dir, tensorboard=tensorboard, is_primary=jax.process_index() == 0
  )
  try:
    record = results.write_results(model_dir, result, writer, options.baseline_dir)
  finally:
    writer.close()
  if print_table and jax.process_index() == 0:
    print(results.format_table(record), flush=True)
  log.info("Evaluated step %d in %.1f s.", step, result.seconds)
  return EvalReport(step, results.result_path(model_dir, step), record)
