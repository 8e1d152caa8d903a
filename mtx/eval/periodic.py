"""Evaluation every EVAL_PERIOD steps of training, as one object the training loop holds.

    periodic = PeriodicEval(eval_period, model_dir, model, mesh, rules, param_shardings,
                            mixture_or_task_name, task_feature_lengths, options)
    ...                                         # in the loop, after the step (and save)
    if periodic.due(step, last=step == train_steps):
      periodic(state["params"], step, writer)   # eval/step_N.json + metrics + TensorBoard
    ...
    periodic.close()

The eval data is read once, when the object is built (before training starts, so that
a bad eval setting fails at once).
"""

import time
from typing import Mapping, Optional, Sequence

from mtx.data.decoder_only import PrefixLM
from mtx.eval import results
from mtx.eval.evaluator import EvalOptions, Evaluator
from mtx.runtime import progress


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
  ):
    self.period = int(period)
    self.model_dir = model_dir
    self.options = options or EvalOptions()
    self._evaluator = None
    if self.period > 0:
      self._evaluator = Evaluator(
        model,
        mesh,
        rules,
        param_shardings,
        mixture_or_task_name,
        task_feature_lengths,
        self.options,
        predictor=predictor,
        model_dir=model_dir,
        prefix_lm=prefix_lm,
      )

  def due(self, step: int, last: bool = False) -> bool:
    """Whether to evaluate after ``step`` (``last``: the run's final step)."""
    return self.period > 0 and (step % self.period == 0 or last)

  def __call__(self, params, step: int, writer) -> dict:
    """Evaluates ``params``, writes the results (process 0) and returns their object."""
    start = time.time()
    result = self._evaluator.evaluate(params, step)
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
    if self._evaluator is not None:
      self._evaluator.close()
