"""seqio metric functions: ``fn(targets, predictions) -> {name: value}``, in percent.

Each function takes the postprocessed targets and predictions of one task's eval split
(lists of equal length) and returns a dict of floats scaled to 0-100, as T5 reports them.
Keyword arguments configure a metric; bind them with ``functools.partial`` before handing
the function to ``seqio.Task(metric_fns=...)``:

    metric_fns=[accuracy, functools.partial(f1_binary, positive_label="duplicate")]

Empty inputs give NaN rather than raising, so an eval of an empty shard still logs.

``bleu`` and ``rouge`` use sacrebleu and rouge-score, which are optional
(``pip install "mtx[text-metrics]"``); they are imported when first called.
"""

import collections
import importlib
import re
import string
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import scipy.stats

from mtx.errors import UserError


def _check(targets: Sequence[Any], predictions: Sequence[Any], metric: str) -> None:
  if len(targets) != len(predictions):
    raise UserError(
      f"Metric {metric} got {len(targets)} targets but "
      f"{len(predictions)} predictions; pass one prediction per target."
    )


def exact_match(
  targets: Sequence[Any], predictions: Sequence[Any]
) -> Mapping[str, float]:
  """Percent of predictions equal to their target (strings compared exactly)."""
  _check(targets, predictions, "exact_match")
  if not targets:
    return {"exact_match": float("nan")}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / len(targets)}


def accuracy(
  targets: Sequence[Hashable], predictions: Sequence[Hashable]
) -> Mapping[str, float]:
  """Percent of predicted labels equal to the target label."""
  _check(targets, predictions, "accuracy")
  if not targets:
    return {"accuracy": float("nan")}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def _f1(tp: int, fp: int, fn: int) -> float:
  denom = 2 * tp + fp + fn
  return 2.0 * tp / denom if denom else 0.0


def f1_binary(
  targets: Sequence[Hashable],
  predictions: Sequence[Hashable],
  positive_label: Hashable = 1,
  negative_label: Optional[Hashable] = None,
) -> Mapping[str, float]:
  """F1 of the positive class, an invalid prediction counted wrong (T5's
  ``f1_score_with_invalid``, for MRPC, QQP and MultiRC).

  A prediction that is neither label (-1 from a label postprocessor, text the model
  made up) is wrong whatever the target: a false positive on a negative example, a false
  negative on a positive one. (Counting it as a negative prediction would make it a
  true negative on a negative example: targets [0, 0, 0, 1, 1] and predictions
  [-1, -1, 0, 1, 0] score 40.0 here and in T5, 66.7 that way.)

  Args:
    targets: gold labels.
    predictions: predicted labels.
    positive_label: the label counted as positive (e.g. 1 after a label-to-id
      postprocessor, or "duplicate" on raw text).
    negative_label: the other valid label; None takes the targets' one value that is
      not ``positive_label`` (0 for 0/1 targets).

  Returns:
    ``{"f1": ...}`` in percent; 0 when there is no positive target or prediction.

  Raises:
    UserError: ``negative_label`` is None and the targets hold more than two labels.
  """
  _check(targets, predictions, "f1_binary")
  if negative_label is None:
    others = {t for t in targets if t != positive_label}
    if len(others) > 1:
      raise UserError(
        f"Metric f1_binary got targets with labels {sorted(others, key=repr)[:5]} "
        f"besides the positive {positive_label!r}; bind negative_label (say with "
        "functools.partial) to the one negative label."
      )
    negative_label = others.pop() if others else None
  t = np.array([x == positive_label for x in targets], dtype=bool)
  p = np.array([x == positive_label for x in predictions], dtype=bool)
  invalid = np.array(
    [x != positive_label and x != negative_label for x in predictions], dtype=bool
  )
  tp = int(np.sum(t & p))
  fp = int(np.sum(~t & (p | invalid)))
  fn = int(np.sum(t & ~p))
  return {"f1": 100.0 * _f1(tp, fp, fn)}


def mean_multiclass_f1(
  targets: Sequence[Hashable],
  predictions: Sequence[Hashable],
  labels: Optional[Sequence[Hashable]] = None,
) -> Mapping[str, float]:
  """Unweighted mean over classes of one-vs-rest F1 (macro F1), as T5 uses for CB
  (``mean_multiclass_f1(num_classes=3)``: scikit-learn's macro F-score over
  ``labels=range(3)``; a class with no target and no prediction scores 0).

  Args:
    targets: gold labels.
    predictions: predicted labels; values outside ``labels`` count as wrong.
    labels: the classes to average over; None means every value seen in targets.

  Returns:
    ``{"mean_multiclass_f1": ...}`` in percent.
  """
  _check(targets, predictions, "mean_multiclass_f1")
  if labels is None:
    labels = sorted(set(targets), key=repr)
  if not labels:
    return {"mean_multiclass_f1": float("nan")}
  scores = []
  for label in labels:
    tp = sum(t == label and p == label for t, p in zip(targets, predictions))
    fp = sum(t != label and p == label for t, p in zip(targets, predictions))
    fn = sum(t == label and p != label for t, p in zip(targets, predictions))
    scores.append(_f1(tp, fp, fn))
  return {"mean_multiclass_f1": 100.0 * float(np.mean(scores))}


def matthews_corrcoef(
  targets: Sequence[Hashable], predictions: Sequence[Hashable]
) -> Mapping[str, float]:
  """Matthews correlation (multiclass form of Gorodkin 2004; the usual one for 2 classes),
  as T5 takes it from scikit-learn for CoLA. An invalid prediction (-1) is a class of
  its own, which no target has.

  Computed from the confusion matrix C as
  ``(c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t))`` with c the correct count, s the total,
  t and p the per-class target and prediction counts. 0 when either side is constant.
  """
  _check(targets, predictions, "matthews_corrcoef")
  if not targets:
    return {"matthews_corrcoef": float("nan")}
  classes = sorted(set(targets) | set(predictions), key=repr)
  t_counts = collections.Counter(targets)
  p_counts = collections.Counter(predictions)
  t = np.array([t_counts[c] for c in classes], dtype=np.float64)
  p = np.array([p_counts[c] for c in classes], dtype=np.float64)
  s = float(len(targets))
  c = float(sum(x == y for x, y in zip(targets, predictions)))
  denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  mcc = (c * s - t @ p) / denom if denom > 0 else 0.0
  return {"matthews_corrcoef": 100.0 * float(mcc)}


def _as_floats(values: Sequence[Any], metric: str) -> np.ndarray:
  try:
    return np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise UserError(
      f"Metric {metric} needs numbers but got {values[:3]!r}...; add a "
      f"postprocess_fn to the task that turns text into floats."
    ) from e


def pearson(
  targets: Sequence[float], predictions: Sequence[float]
) -> Mapping[str, float]:
  """Pearson correlation times 100, T5's ``pearson_corrcoef`` (scipy's), except that a
  constant side gives 0 where scipy gives NaN (a model that always says "2.6" has no
  correlation; a NaN would also void the eval's mean over tasks)."""
  _check(targets, predictions, "pearson")
  t, p = _as_floats(targets, "pearson"), _as_floats(predictions, "pearson")
  if t.size < 2:
    return {"pearson": float("nan")}
  if np.ptp(t) == 0 or np.ptp(p) == 0:
    return {"pearson": 0.0}
  return {"pearson": 100.0 * float(scipy.stats.pearsonr(t, p)[0])}


def spearman(
  targets: Sequence[float], predictions: Sequence[float]
) -> Mapping[str, float]:
  """Spearman rank correlation times 100, T5's ``spearman_corrcoef`` (scipy's), with 0
  for a constant side as in ``pearson``."""
  _check(targets, predictions, "spearman")
  t, p = _as_floats(targets, "spearman"), _as_floats(predictions, "spearman")
  if t.size < 2:
    return {"spearman": float("nan")}
  if np.ptp(t) == 0 or np.ptp(p) == 0:
    return {"spearman": 0.0}
  return {"spearman": 100.0 * float(scipy.stats.spearmanr(t, p)[0])}


_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> str:
  """Lower case, drop punctuation and English articles, squeeze spaces (SQuAD's rule)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  """Token F1 of SQuAD v1.1 as T5 computes it: 0 when no token is shared (two empty
  strings included)."""
  t, p = target.split(), prediction.split()
  common = sum((collections.Counter(t) & collections.Counter(p)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(t)
  return 2 * precision * recall / (precision + recall)


def max_over_answers_em_f1(
  targets: Sequence[Any], predictions: Sequence[str]
) -> Mapping[str, float]:
  """SQuAD-style exact match and token F1, each the best over a target's answers.

  Each target is a string or a list of acceptable answers (as ReCoRD has); answers and
  predictions are normalized (case, punctuation, articles, spaces) before comparing.
  T5's ``squad`` metric (``qa_utils.qa_metrics`` on ``normalize_squad``ed text), which
  it uses for ReCoRD.

  Returns:
    ``{"em": ..., "f1": ...}`` in percent.
  """
  _check(targets, predictions, "max_over_answers_em_f1")
  if not targets:
    return {"em": float("nan"), "f1": float("nan")}
  em, f1 = [], []
  for target, prediction in zip(targets, predictions):
    answers = [target] if isinstance(target, str) else list(target)
    answers = [_normalize_answer(a) for a in answers] or [""]
    prediction = _normalize_answer(prediction)
    em.append(max(float(a == prediction) for a in answers))
    f1.append(max(_token_f1(a, prediction) for a in answers))
  return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


_TEXT_METRICS_HINT = 'pip install "mtx[text-metrics]"'


def _import_optional(module: str, metric: str):
  """Imports an optional metric package or says how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise UserError(
      f"Metric {metric} needs the package {module.split('.')[0]}, which "
      f"is not installed; run {_TEXT_METRICS_HINT}."
    ) from e


def bleu(
  targets: Sequence[Any], predictions: Sequence[str], tokenize: str = "intl"
) -> Mapping[str, float]:
  """Corpus BLEU (sacrebleu, T5's settings: exp smoothing, "intl" tokenization).

  Args:
    targets: one reference string per example, or per example a list of references
      (every example with the same number).
    predictions: one string per example.
    tokenize: sacrebleu's tokenizer ("intl", "13a", "zh", ...).

  Returns:
    ``{"bleu": ...}``, 0-100.
  """
  _check(targets, predictions, "bleu")
  if not targets:
    return {"bleu": float("nan")}
  sacrebleu = _import_optional("sacrebleu", "bleu")
  if isinstance(targets[0], str):
    streams = [list(targets)]
  else:
    counts = {len(t) for t in targets}
    if len(counts) != 1:
      raise UserError(
        f"Metric bleu got examples with {sorted(counts)} references; give "
        "every example the same number."
      )
    streams = [list(refs) for refs in zip(*targets)]
  score = sacrebleu.corpus_bleu(
    list(predictions),
    streams,
    smooth_method="exp",
    smooth_value=0.0,
    force=False,
    lowercase=False,
    tokenize=tokenize,
    use_effective_order=False,
  )
  return {"bleu": float(score.score)}


def rouge(
  targets: Sequence[str],
  predictions: Sequence[str],
  score_keys: Sequence[str] = ("rouge1", "rouge2", "rougeLsum"),
) -> Mapping[str, float]:
  """Mean ROUGE F-measures (rouge-score), as T5 reports them for summarization.

  As in T5, " . " ends a sentence for rougeLsum. The mean over examples is reported
  (T5 takes the middle of a bootstrap, which is the mean up to resampling noise).

  Returns:
    ``{"rouge1": ..., "rouge2": ..., "rougeLsum": ...}``, 0-100.
  """
  _check(targets, predictions, "rouge")
  if not targets:
    return {k: float("nan") for k in score_keys}
  rouge_scorer = _import_optional("rouge_score.rouge_scorer", "rouge")
  scorer = rouge_scorer.RougeScorer(list(score_keys))
  totals = collections.defaultdict(float)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(
      target=target.replace(" . ", " .\n"), prediction=prediction.replace(" . ", " .\n")
    )
    for key in score_keys:
      totals[key] += scores[key].fmeasure
  return {k: 100.0 * totals[k] / len(targets) for k in score_keys}
