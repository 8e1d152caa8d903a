"""mtx.eval.metrics against T5's definitions (t5/evaluation/metrics.py, qa_utils.py),
written out here independently of mtx's code, on fixed and random small cases.

T5 takes F1, macro F1 and the Matthews correlation from scikit-learn; the references
below are those textbook formulas (precision/recall with 0 for 0/0; the Matthews
correlation as the correlation of one-hot matrices, Gorodkin 2004).
"""

import collections
import re
import string

import numpy as np
import pytest
import scipy.stats

from mtx.errors import UserError
from mtx.eval import metrics


def ref_f1(targets, predictions, positive=1):
  """sklearn.metrics.f1_score(average='binary'): 2PR / (P + R), 0 where undefined."""
  t = np.asarray(targets) == positive
  p = np.asarray(predictions) == positive
  tp = np.sum(t & p)
  precision = tp / p.sum() if p.sum() else 0.0
  recall = tp / t.sum() if t.sum() else 0.0
  if precision + recall == 0:
    return 0.0
  return 100 * 2 * precision * recall / (precision + recall)


def ref_f1_score_with_invalid(targets, predictions):
  """T5: a prediction other than 0 or 1 becomes 1 - target, then sklearn's F1."""
  targets = np.asarray(targets)
  predictions = np.array(predictions)
  invalid = (predictions != 0) & (predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return ref_f1(targets, predictions)


def ref_macro_f1(targets, predictions, labels):
  """sklearn.metrics.fbeta_score(beta=1, labels=labels, average='macro')."""
  return float(np.mean([ref_f1(targets, predictions, positive=c) / 100 for c in labels]))


def ref_matthews(targets, predictions):
  """sklearn.metrics.matthews_corrcoef: R_K = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) of
  the one-hot matrices X (targets) and Y (predictions); 0 when a side is constant."""
  classes = sorted(set(targets) | set(predictions))
  x = np.array([[t == c for c in classes] for t in targets], np.float64)
  y = np.array([[p == c for c in classes] for p in predictions], np.float64)
  x -= x.mean(0)
  y -= y.mean(0)
  den = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return 100 * float(np.sum(x * y) / den) if den else 0.0


def ref_normalize_squad(text):
  text = "".join(c for c in text.lower() if c not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def ref_squad(targets, predictions):
  """T5's ``squad``: qa_utils.qa_metrics on normalize_squad'ed answers."""

  def f1(target, prediction):
    p, t = prediction.split(), target.split()
    same = sum((collections.Counter(p) & collections.Counter(t)).values())
    if same == 0:
      return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)

  em, f = [], []
  for answers, prediction in zip(targets, predictions):
    answers = [ref_normalize_squad(a) for a in answers]
    prediction = ref_normalize_squad(prediction)
    em.append(max(float(a == prediction) for a in answers))
    f.append(max(f1(a, prediction) for a in answers))
  return {"em": 100 * np.mean(em), "f1": 100 * np.mean(f)}


def test_f1_counts_an_invalid_prediction_on_a_negative_example_as_a_false_positive():
  # The case: T5 40.0 (tp 1, fp 2 invalid, fn 1), not 66.7.
  targets, predictions = [0, 0, 0, 1, 1], [-1, -1, 0, 1, 0]
  assert ref_f1_score_with_invalid(targets, predictions) == pytest.approx(40.0)
  assert metrics.f1_binary(targets, predictions)["f1"] == pytest.approx(40.0)
  # An invalid prediction on a positive example is a false negative.
  assert metrics.f1_binary([1, 1, 0], [1, -1, 0])["f1"] == pytest.approx(
    ref_f1_score_with_invalid([1, 1, 0], [1, -1, 0])
  )
  # Raw text labels: the negative is the targets' other label, or named.
  text = metrics.f1_binary(["dup", "no", "no"], ["dup", "??", "no"], positive_label="dup")
  assert text["f1"] == pytest.approx(ref_f1_score_with_invalid([1, 0, 0], [1, -1, 0]))
  assert metrics.f1_binary(
    ["dup", "dup"], ["dup", "no"], positive_label="dup", negative_label="no"
  )["f1"] == pytest.approx(ref_f1([1, 1], [1, 0]))
  with pytest.raises(UserError, match="negative_label"):
    metrics.f1_binary(["a", "b", "c"], ["a", "b", "c"], positive_label="a")
  assert metrics.f1_binary([0, 0], [0, -1])["f1"] == 0.0  # no positive anywhere


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_t5_on_random_cases(seed):
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, 2, 40).tolist()
  predictions = rng.choice([-1, 0, 1], 40, p=[0.2, 0.4, 0.4]).tolist()
  assert metrics.f1_binary(targets, predictions)["f1"] == pytest.approx(
    ref_f1_score_with_invalid(targets, predictions)
  )
  assert metrics.matthews_corrcoef(targets, predictions)[
    "matthews_corrcoef"
  ] == pytest.approx(ref_matthews(targets, predictions))
  assert metrics.accuracy(targets, predictions)["accuracy"] == pytest.approx(
    100 * np.mean(np.asarray(targets) == np.asarray(predictions))
  )


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_metrics_match_t5_on_random_cases(seed):
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, 3, 30).tolist()
  predictions = rng.choice([-1, 0, 1, 2], 30).tolist()
  got = metrics.mean_multiclass_f1(targets, predictions, labels=(0, 1, 2))
  assert got["mean_multiclass_f1"] == pytest.approx(
    100 * ref_macro_f1(targets, predictions, (0, 1, 2))
  )
  assert metrics.matthews_corrcoef(targets, predictions)[
    "matthews_corrcoef"
  ] == pytest.approx(ref_matthews(targets, predictions))


def test_fixed_multiclass_and_correlation_cases():
  # CB: class 2 never predicted, class 1 never a target: each scores 0 in the mean.
  f1 = metrics.mean_multiclass_f1([0, 0, 2], [0, 1, -1], labels=(0, 1, 2))
  assert f1["mean_multiclass_f1"] == pytest.approx(100 * (2 / 3 + 0 + 0) / 3)
  # Constant predictions: 0 (sklearn's Matthews convention; mtx's for correlations).
  assert metrics.matthews_corrcoef([0, 1, 1], [1, 1, 1])["matthews_corrcoef"] == 0.0
  assert metrics.pearson([1.0, 2.0, 3.0], [2.6, 2.6, 2.6])["pearson"] == 0.0
  rng = np.random.default_rng(0)
  t = np.round(rng.uniform(0, 5, 25) * 5) / 5  # STS-B's 0.2 grid: ties for Spearman
  p = np.round((t + rng.normal(0, 1, 25)) * 5) / 5
  assert metrics.pearson(t.tolist(), p.tolist())["pearson"] == pytest.approx(
    100 * scipy.stats.pearsonr(t, p)[0]
  )
  assert metrics.spearman(t.tolist(), p.tolist())["spearman"] == pytest.approx(
    100 * scipy.stats.spearmanr(t, p)[0]
  )


def test_record_em_and_f1_match_t5_squad():
  targets = [["The Cat", "dog"], ["a red fox"], ["Paris"], ["x y z"], ["the"]]
  predictions = ["cat!", "red dog", "London", "z y y", ""]
  got = metrics.max_over_answers_em_f1(targets, predictions)
  want = ref_squad(targets, predictions)
  assert got["em"] == pytest.approx(want["em"]) and got["f1"] == pytest.approx(want["f1"])
  # An empty prediction for an answer that normalizes to empty: EM 1, F1 0 (T5).
  assert metrics.max_over_answers_em_f1([["the"]], [""]) == {"em": 100.0, "f1": 0.0}


def test_exact_match_is_t5s_sequence_accuracy():
  targets, predictions = ["a b", "c", "d "], ["a b", "c ", "d "]
  assert metrics.exact_match(targets, predictions)["exact_match"] == pytest.approx(
    100 * np.mean([p == t for p, t in zip(predictions, targets)])
  )
