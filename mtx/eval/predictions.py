"""Every evaluated example's prediction, kept: ``<dir>/<task>-<step>.jsonl``, as T5X does.

The directory is ``MODEL_DIR/inference_eval`` unless ``EVAL_OUTPUT_DIR`` names another
(``''``: none written). One JSON object per example, in the eval split's order, e.g.::

  {"input": "sort: 3 1 2", "target": "1 2 3", "prediction": "1 2 3",
   "output": "1 2 3"}

``input`` is the example's input text (``inputs_pretokenized``, else the decoded input
ids); ``target`` and ``prediction`` are what the task's metrics compared (after its
``postprocess_fn``); ``output`` is the decoded text before postprocessing, and ``score``
the log-likelihood of the target where a metric asked for it. Written by process 0
through ``mtx.paths.write_atomically``: a reader sees a whole file or none. The
step is zero-padded to 6 digits (``demo_sort-001000.jsonl``), so files sort by step.
"""

import json
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from mtx import paths

PREDICTIONS_DIR = "inference_eval"


def output_dir(model_dir: Optional[str], setting: Optional[str]) -> Optional[str]:
  """Where predictions go: ``setting`` (EVAL_OUTPUT_DIR) if given, '' for nowhere
  (None), else ``MODEL_DIR/inference_eval`` (None without a MODEL_DIR)."""
  if setting is not None:
    return paths.absolute(setting) if setting else None
  return paths.join(model_dir, PREDICTIONS_DIR) if model_dir else None


def path(directory: str, task_name: str, step: int) -> str:
  return paths.join(directory, f"{task_name}-{int(step):06d}.jsonl")


def _plain(value: Any) -> Any:
  """A JSON-able copy: bytes as text, NumPy values as Python ones."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  return value


def _input_text(example: Mapping[str, Any], vocabulary) -> Any:
  if "inputs_pretokenized" in example:
    return _plain(example["inputs_pretokenized"])
  if "inputs" in example and vocabulary is not None:
    return vocabulary.decode([int(i) for i in np.asarray(example["inputs"]).ravel()])
  return None


def lines(
  examples: Sequence[Mapping[str, Any]],
  targets: Sequence[Any],
  inferences: Mapping[str, Sequence[Any]],
  vocabulary=None,
) -> str:
  """The file's text: one JSON object per example (see the module docstring)."""
  out = []
  for i, example in enumerate(examples):
    record = {"input": _input_text(example, vocabulary)}
    record["target"] = _plain(targets[i]) if i < len(targets) else None
    for key in ("prediction", "output", "score"):
      values = inferences.get(key)
      if values is not None and i < len(values):
        record[key] = _plain(values[i])
    out.append(json.dumps(record, ensure_ascii=False, default=str))
  return "".join(line + "\n" for line in out)


class PredictionsLogger(seqio.Logger):
  """A seqio logger (``seqio.Evaluator(logger_cls=...)``) writing the files above."""

  def __call__(
    self,
    task_name: str,
    step: Optional[int],
    metrics: Mapping[str, Any],
    dataset,
    inferences: Optional[Mapping[str, Sequence[Any]]],
    targets: Optional[Sequence[Any]],
  ) -> None:
    del metrics
    if jax.process_index() != 0 or dataset is None or not inferences:
      return
    examples = list(dataset.as_numpy_iterator())
    task = seqio.get_mixture_or_task(task_name)
    features = getattr(task, "output_features", {}) or {}
    vocabulary = features["inputs"].vocabulary if "inputs" in features else None
    try:
      paths.makedirs(self.output_dir)
    except OSError as e:
      raise paths.write_error(self.output_dir, e) from e
    paths.write_atomically(
      path(self.output_dir, task_name, step if step is not None else -1),
      lines(examples, list(targets or []), inferences, vocabulary),
    )
