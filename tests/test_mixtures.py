"""Demo and GLUE registrations: tasks exist, data is deterministic, texts match T5's formats."""

import importlib

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from mixtures import demo, glue
from mtx.eval import metrics

_LENGTHS = {"inputs": 24, "targets": 16}


def _texts(task_name, split, n, **kwargs):
  task = seqio.get_mixture_or_task(task_name)
  kwargs.setdefault("shuffle", False)
  ds = task.get_dataset(_LENGTHS, split=split, **kwargs).take(n)
  return [
    (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
    for ex in ds.as_numpy_iterator()
  ]


# --- demo -----------------------------------------------------------------------------


def test_demo_registers_plain_seqio_objects_and_survives_reimport():
  importlib.reload(demo)
  for name in demo.TASK_NAMES:
    task = seqio.TaskRegistry.get(name)
    assert type(task) is seqio.Task and name.startswith("demo_")
    assert set(task.splits) == {"train", "validation"}
    assert task.metric_fns
  mixture = seqio.MixtureRegistry.get("demo")
  assert type(mixture) is seqio.Mixture
  assert sorted(t.name for t in mixture.tasks) == sorted(demo.TASK_NAMES)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates["demo_sort"] == demo.RATE_CAP and rates["demo_count"] == 2000
  assert {t.name for t in seqio.get_mixture_or_task("demo_conflict").tasks} == {
    "demo_sentiment",
    "demo_verdict",
  }


def test_demo_sizes_differ_and_validation_is_held_out():
  sizes = {
    n: seqio.get_mixture_or_task(n).num_input_examples("train") for n in demo.TASK_NAMES
  }
  assert min(sizes.values()) <= 2000 and max(sizes.values()) >= 50000
  for name in ("demo_sort", "demo_count"):
    train = {i for i, _ in demo.examples(name, "train")}
    assert not train & {i for i, _ in demo.examples(name, "validation")}


def test_demo_is_deterministic():
  first = _texts("demo_min", "train", 20, shuffle=True, seed=7)
  demo.examples.cache_clear()
  assert _texts("demo_min", "train", 20, shuffle=True, seed=7) == first
  for inputs, target in _texts("demo_sort", "validation", 20):
    numbers = [int(x) for x in inputs.removeprefix("sort: ").split()]
    assert target == " ".join(str(x) for x in sorted(numbers))


def test_conflicting_tasks_share_inputs_with_other_label_words():
  # demo_sentiment and demo_verdict: the same inputs, prefix included, and the same
  # judgement in other words, so the model cannot tell them apart and no model can
  # satisfy both.
  sentiment = demo.examples("demo_sentiment", "train")
  verdict = demo.examples("demo_verdict", "train")
  assert [i for i, _ in sentiment] == [i for i, _ in verdict]
  same = {"positive": "good", "negative": "bad"}
  assert all(same[a] == b for (_, a), (_, b) in zip(sentiment, verdict))
  assert {t for _, t in verdict} == {"good", "bad"}
  # demo_copy and demo_reverse read the same words but each has its own prefix.
  copy = demo.examples("demo_copy", "train")
  reverse = demo.examples("demo_reverse", "train")
  assert [i.removeprefix("copy: ") for i, _ in copy] == [
    i.removeprefix("reverse: ") for i, _ in reverse
  ]
  assert all(t == i.removeprefix("copy: ") for i, t in copy[:100])
  assert all(
    t.split() == i.removeprefix("reverse: ").split()[::-1] for i, t in reverse[:100]
  )


def test_demo_examples_fit_the_tiny_lengths():
  vocab = seqio.get_mixture_or_task("demo_sentiment").output_features["inputs"].vocabulary
  for name in demo.TASK_NAMES:
    for inputs, targets in demo.examples(name, "validation"):
      assert len(vocab.encode(inputs)) < _LENGTHS["inputs"]
      assert len(vocab.encode(targets)) < _LENGTHS["targets"]


def test_metrics_match_hand_computed_values():
  assert metrics.exact_match(["a b", "c"], ["a b", "d"]) == {"exact_match": 50.0}
  assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 50.0}
  # tp=2, fp=1, fn=1 -> F1 = 4 / 6.
  assert metrics.f1_binary([1, 1, 0, 1, 0], [1, 1, 1, 0, 0])["f1"] == pytest.approx(
    200 / 3
  )
  assert metrics.f1_binary(["dup", "no"], ["dup", "dup"], positive_label="dup")["f1"] == (
    pytest.approx(200 / 3)
  )
  # Binary MCC: tp=2, tn=1, fp=1, fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
  mcc = metrics.matthews_corrcoef([1, 1, 0, 1, 0], [1, 1, 1, 0, 0])["matthews_corrcoef"]
  assert mcc == pytest.approx(100 / 6)
  assert metrics.matthews_corrcoef([0, 1, 2], [0, 1, 2])["matthews_corrcoef"] == 100.0
  assert metrics.pearson([1, 2, 3], [2, 4, 6])["pearson"] == pytest.approx(100.0)
  assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 20])["spearman"] == pytest.approx(100.0)
  f1 = metrics.mean_multiclass_f1([0, 1, 2, 2], [0, 1, 1, 2], labels=(0, 1, 2))
  assert f1["mean_multiclass_f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)
  em_f1 = metrics.max_over_answers_em_f1(
    [["The Cat", "dog"], "a red fox"], ["cat", "red dog"]
  )
  assert em_f1["em"] == 50.0 and em_f1["f1"] == pytest.approx(50 + 50 * 0.5)


# --- GLUE / SuperGLUE -----------------------------------------------------------------


def _glue_texts(task_name, split, num_examples=3):
  with tfds.testing.mock_data(num_examples=num_examples):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(_LENGTHS, split=split, shuffle=False, try_in_mem_cache=False)
    return list(ds.as_numpy_iterator())


@pytest.mark.parametrize(
  "task_name, split, prefix, keys, labels",
  [
    (
      "glue_cola_v002",
      "validation",
      "cola",
      ["sentence"],
      {"unacceptable", "acceptable"},
    ),
    (
      "glue_mnli_v002",
      "validation_mismatched",
      "mnli",
      ["hypothesis", "premise"],
      {"entailment", "neutral", "contradiction"},
    ),
    (
      "glue_qqp_v002",
      "train",
      "qqp",
      ["question1", "question2"],
      {"not_duplicate", "duplicate"},
    ),
    (
      "super_glue_boolq_v102",
      "validation",
      "boolq",
      ["passage", "question"],
      {"False", "True"},
    ),
    (
      "super_glue_copa_v102",
      "train",
      "copa",
      ["choice1", "choice2", "premise", "question"],
      {"choice1", "choice2"},
    ),
  ],
)
def test_glue_tasks_produce_t5_text(task_name, split, prefix, keys, labels):
  examples = _glue_texts(task_name, split)
  assert len(examples) == 3
  for ex in examples:
    inputs = ex["inputs_pretokenized"].decode()
    assert inputs.startswith(f"{prefix} {keys[0]}: ")
    positions = [inputs.index(f" {k}: ") for k in keys]
    assert positions == sorted(positions)
    assert ex["targets_pretokenized"].decode() in labels | {"<unk>"}
    assert ex["targets"][-1] == 1  # EOS


def test_stsb_targets_are_rounded_scores():
  for ex in _glue_texts("glue_stsb_v002", "validation", num_examples=5):
    target = ex["targets_pretokenized"].decode()
    assert ex["inputs_pretokenized"].decode().startswith("stsb sentence1: ")
    assert round(float(target) * 5) == pytest.approx(float(target) * 5)
    assert glue.string_to_float(target.encode()) == float(target)


def test_record_keeps_all_answers_for_eval():
  for ex in _glue_texts("super_glue_record_v102", "validation"):
    assert ex["inputs_pretokenized"].decode().startswith("record query: ")
    answers = glue.record_answers(b"", example=ex, is_target=True)
    assert ex["targets_pretokenized"].decode() in answers + ["<unk>"]


def test_glue_postprocessors_map_label_words_to_ids():
  task = seqio.get_mixture_or_task("glue_mnli_v002")
  assert task.postprocess_fn(b"neutral") == 1
  assert task.postprocess_fn(b"banana") == -1
  assert glue.string_to_float(b"n/a") == -1.0


def test_glue_mixtures_resolve_examples_proportionally(monkeypatch):
  sizes = {}

  def fake_size(source, split):
    del split
    return sizes.setdefault(source._name, 100 * (len(sizes) + 1))  # pylint: disable=protected-access

  monkeypatch.setattr(glue.LocalTfdsSource, "num_input_examples", fake_size)
  for mixture_name, task_names in [
    (glue.GLUE_MIXTURE, glue.GLUE_TASKS),
    (glue.SUPER_GLUE_MIXTURE, glue.SUPER_GLUE_TASKS),
  ]:
    mixture = seqio.get_mixture_or_task(mixture_name)
    assert sorted(t.name for t in mixture.tasks) == sorted(task_names)
    rates = np.array([mixture.get_rate(t) for t in mixture.tasks])
    expected = np.array([t.source.num_input_examples("train") for t in mixture.tasks])
    np.testing.assert_allclose(rates, expected)


def test_glue_reregisters_with_another_vocabulary(monkeypatch):
  monkeypatch.setenv("MTX_VOCAB_EXTRA_IDS", "5")
  try:
    glue.register()
    vocab = (
      seqio.get_mixture_or_task("glue_rte_v002").output_features["inputs"].vocabulary
    )
    assert vocab.extra_ids == 5
  finally:
    monkeypatch.delenv("MTX_VOCAB_EXTRA_IDS")
    glue.register()
