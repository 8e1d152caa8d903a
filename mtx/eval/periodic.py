"""Evaluation every EVAL_PERIOD steps of training, as one object the training loop holds.

    periodic = PeriodicEval(eval_period, model_dir, model, mesh, rules, param_shardings,
                            mixture_or_task_name, task_feature_lengths, options)
    ...                                         # in the loop, after the step (and save)
    if periodic.due(step, last=step == train_steps):
      periodic(state["params"], step, writer)   # eval/step_N.json + metrics + TensorBoard
    ...
    periodic.close()

The eval data is read once, when the object is built (before training starts, so that
a bad eval setting fails at once). A model with per-task LoRA adapters
(``LoraConfig.per_task``) is scored task by task, each task with its own adapter merged
into the base kernels (``task_adapters``: task name -> adapter id), as ``mtx eval``
scores it; one evaluator per task, each reading its task's data once.
"""

import dataclasses
import time
from typing import Mapping, Optional, Sequence

from mtx.data.decoder_only import PrefixLM
from mtx.errors import UserError
from mtx.eval import results
from mtx.eval.evaluator import EvalOptions, Evaluator, eval_tasks
from mtx.runtime import adapters_io, progress


def per_task_names(
  mixture_or_task_name: str, options: EvalOptions, task_adapters: Mapping[str, int]
) -> list:
  """The tasks a model with per-task adapters is evaluated on, one at a time: those of
  the eval mixture (``EVAL_MIXTURE_OR_TASK_NAME``, else the run's) with the eval split
  (the others are left out, with a warning).

  Raises:
    UserError: an eval task has no adapter in ``task_adapters`` (task -> adapter id).
  """
  split = options.split
  name = options.mixture_or_task_name or mixture_or_task_name
  names = [t.name for t in eval_tasks(name, split) if split in t.splits]
  missing = [n for n in names if n not in task_adapters]
  if missing:
    raise UserError(
      f"Eval task(s) {', '.join(missing)} of '{name}' have no per-task adapter (the "
      f"model's tasks: {', '.join(sorted(task_adapters))}); evaluate the tasks it was "
      "trained on (EVAL_MIXTURE_OR_TASK_NAME)."
    )
  return names


class PeriodicEval:
  """Evaluates every ``period`` steps and at the last step; ``period`` <= 0: never."""

  def __init__(
    self,
    period: int,
    model_dir: str,
    model,
    mesh,
    rules: Sequence,
    param_shardings,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    options: Optional[EvalOptions] = None,
    *,
    predictor=None,
    prefix_lm: Optional[PrefixLM] = None,
    task_adapters: Optional[Mapping[str, int]] = None,
  ):
    self.period = int(period)
    self.model_dir = model_dir
    self.options = options or EvalOptions()
    self._model, self._shardings = model, param_shardings
    lora = getattr(model.config, "lora", None)
    per_task = bool(lora and lora.enabled and lora.per_task)
    # name -> (evaluator, per-task adapter id or None); one entry None for the mixture.
    self._evaluators = {}
    if self.period <= 0:
      return
    if per_task and not task_adapters:
      raise ValueError("PeriodicEval: per-task adapters need task_adapters.")
    m, s = model, param_shardings
    if per_task:
      m, s = adapters_io.without_adapters(model, param_shardings)
    names, options = [None], self.options
    if per_task:  # One task each, whatever EVAL_MIXTURE_OR_TASK_NAME names.
      names = per_task_names(mixture_or_task_name, self.options, task_adapters)
      options = dataclasses.replace(self.options, mixture_or_task_name=None)
    for name in names:
      self._evaluators[name] = (
        Evaluator(
          m,
          mesh,
          rules,
          s,
          name or mixture_or_task_name,
          task_feature_lengths,
          options,
          predictor=predictor,
          model_dir=model_dir,
          prefix_lm=prefix_lm,
        ),
        task_adapters[name] if per_task else None,
      )

  def due(self, step: int, last: bool = False) -> bool:
    """Whether to evaluate after ``step`` (``last``: the run's final step)."""
    return self.period > 0 and (step % self.period == 0 or last)

  def __call__(self, params, step: int, writer) -> dict:
    """Evaluates ``params``, writes the results (process 0) and returns their object."""
    start = time.time()
    parts = []
    for evaluator, adapter in self._evaluators.values():
      p = params
      if adapter is not None:
        _, p, _ = adapters_io.merged(self._model, params, self._shardings, adapter)
      parts.append(evaluator.evaluate(p, step))
    result = results.combine(parts)
    record = results.write_results(
      self.model_dir, result, writer, self.options.baseline_dir
    )
    s = record["summary"]
    delta = "" if s["delta_m"] is None else f", delta_m {s['delta_m']:+.2f}%"
    progress.log.info(  # at the default level, like the training lines
      "Eval at step %d: mean primary %.2f%s (%.1f s).",
      step,
      s["mean_primary"],
      delta,
      time.time() - start,
    )
    return record

  def close(self) -> None:
    for evaluator, _ in self._evaluators.values():
      evaluator.close()
