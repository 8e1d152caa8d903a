"""GLUE and SuperGLUE as text-to-text tasks, in T5's formats, over local TFDS data.

Importing this module registers one ``seqio.Task`` per benchmark and three mixtures:

- ``glue_v002_proportional``: the nine ``glue_*_v002`` tasks below.
- ``super_glue_v102_proportional``: the seven ``super_glue_*_v102`` tasks below.
- ``glue_v002_eval``: for evaluating a GLUE run (``EVAL_MIXTURE_OR_TASK_NAME``): the
  GLUE tasks with MNLI replaced by the eval-only ``glue_mnli_matched_v002`` and
  ``glue_mnli_mismatched_v002``, whose "validation" split is TFDS's
  ``validation_matched`` / ``validation_mismatched`` (as in T5).

Both mix examples-proportionally (``seqio.mixing_rate_num_examples``, no cap, the train
split's size as TFDS reports it), as T5's mixtures of the same names do.

Inputs name the benchmark, then each text field as ``key: value`` in alphabetical key
order; targets are the label as a word, as in T5 (section 2.4 of the T5 paper):

| task                    | TFDS                       | inputs                                          | targets                                   | metrics              |
|-------------------------|----------------------------|-------------------------------------------------|-------------------------------------------|----------------------|
| glue_cola_v002          | glue/cola:2.0.0            | cola sentence: S                                | unacceptable, acceptable                  | Matthews corr.       |
| glue_sst2_v002          | glue/sst2:2.0.0            | sst2 sentence: S                                | negative, positive                        | accuracy             |
| glue_mrpc_v002          | glue/mrpc:2.0.0            | mrpc sentence1: A sentence2: B                  | not_equivalent, equivalent                | F1, accuracy         |
| glue_qqp_v002           | glue/qqp:2.0.0             | qqp question1: A question2: B                   | not_duplicate, duplicate                  | F1, accuracy         |
| glue_stsb_v002          | glue/stsb:2.0.0            | stsb sentence1: A sentence2: B                  | score rounded to 0.2, e.g. "3.8"          | Pearson, Spearman    |
| glue_mnli_v002          | glue/mnli:2.0.0            | mnli hypothesis: H premise: P                   | entailment, neutral, contradiction        | accuracy             |
| glue_qnli_v002          | glue/qnli:2.0.0            | qnli question: Q sentence: S                    | entailment, not_entailment                | accuracy             |
| glue_rte_v002           | glue/rte:2.0.0             | rte sentence1: A sentence2: B                   | entailment, not_entailment                | accuracy             |
| glue_wnli_v002          | glue/wnli:2.0.0            | wnli sentence1: A sentence2: B                  | not_entailment, entailment                | accuracy             |
| super_glue_boolq_v102   | super_glue/boolq:1.0.2     | boolq passage: P question: Q                    | False, True                               | accuracy             |
| super_glue_cb_v102      | super_glue/cb:1.0.2        | cb hypothesis: H premise: P                     | entailment, contradiction, neutral        | accuracy, mean F1    |
| super_glue_copa_v102    | super_glue/copa:1.0.2      | copa choice1: A choice2: B premise: P question: Q | choice1, choice2                        | accuracy             |
| super_glue_rte_v102     | super_glue/rte:1.0.2       | rte hypothesis: H premise: P                    | entailment, not_entailment                | accuracy             |
| super_glue_wic_v102     | super_glue/wic:1.0.2       | wic sentence1: A sentence2: B word: W           | False, True                               | accuracy             |
| super_glue_multirc_v102 | super_glue/multirc:1.0.2   | multirc question: Q answer: A paragraph: P      | False, True                               | F1, accuracy         |
| super_glue_record_v102  | super_glue/record:1.0.2    | record query: Q entities: E1, E2 passage: P     | an answer entity                          | EM, F1 (best answer) |

MNLI keeps TFDS's split names (``validation_matched``, ``validation_mismatched``, ...);
its two eval-only tasks above name them "validation" and "test".
Unlabelled (test) examples get the target ``<unk>``. Predictions are postprocessed from
the label word to its class id (-1 for anything else), STS-B's to a float.

Metrics are T5's definitions (``mtx.eval.metrics``): F1 is T5's
``f1_score_with_invalid`` (a prediction that is no label is wrong: a false positive on a
negative example), mean F1 the macro F1 over CB's three classes, ReCoRD's EM/F1 T5's
``squad``; correlations of a constant prediction are 0 where T5 gets NaN.

Simpler than T5, on purpose:

- MultiRC is scored per answer (F1 of True, accuracy), not with T5's per-question exact
  match over answer groups.
- ReCoRD has one example per query with the first answer as target (T5 trains on one
  example per answer); eval scores the best EM/F1 over all answers, as T5 does.
- COPA gets no T5-style train-time choice swapping; WSC and the diagnostic sets (ax,
  axb, axg) are not registered.

Data: TFDS reads ``$TFDS_DATA_DIR`` if set, else its local default
(``~/tensorflow_datasets``); sources are read-only, so nothing is downloaded and GCS is
never tried. Prepare the datasets beforehand (``tfds build glue/cola`` on a machine with
network, then copy the directory).

Vocabulary: the run's ``VOCABULARY`` (gin; a local SentencePiece model, default the
shipped demo model), in force while mtx imports this module, and
``$MTX_VOCAB_EXTRA_IDS`` (default 0). To point the tasks elsewhere
from Python or gin, call ``register(vocab_path=..., extra_ids=...)`` again; it replaces
every task and mixture of this module (for T5's checkpoints: T5's ``spiece.model``, 100
extra ids).
"""

import functools
import os
from typing import Any, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from mtx.data import vocab
from mtx.errors import UserError
from mtx.eval import metrics

GLUE_VERSION = "2.0.0"
SUPER_GLUE_VERSION = "1.0.2"
GLUE_MIXTURE = "glue_v002_proportional"
GLUE_EVAL_MIXTURE = "glue_v002_eval"
SUPER_GLUE_MIXTURE = "super_glue_v102_proportional"
_ANSWER_SEPARATOR = "\t"  # Joins ReCoRD's answers into one string feature.


def tfds_data_dir() -> Optional[str]:
  """The local TFDS directory: ``$TFDS_DATA_DIR`` or None (TFDS's local default)."""
  data_dir = os.environ.get("TFDS_DATA_DIR") or None
  if data_dir and "://" in data_dir:
    raise UserError(
      f"TFDS_DATA_DIR={data_dir} is remote but mtx reads TFDS data only "
      f"from local directories; copy the prepared datasets to a local "
      f"directory and set TFDS_DATA_DIR to it."
    )
  return data_dir


def default_vocab_path() -> str:
  """The SentencePiece model for these tasks: the run's VOCABULARY (see
  ``mtx.data.vocab.default_vocabulary_path``), else the shipped demo model."""
  return vocab.default_path()


def _vocab_extra_ids() -> int:
  raw = os.environ.get("MTX_VOCAB_EXTRA_IDS", "0")
  try:
    return int(raw)
  except ValueError as e:
    raise UserError(
      f"MTX_VOCAB_EXTRA_IDS={raw!r} is not an integer; set it to e.g. 0 or 100."
    ) from e


# --- text formats ---------------------------------------------------------------------


def _label_word(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
  """Class id -> its name; -1 (unlabelled test data) -> '<unk>'."""
  names = tf.constant(list(label_names))
  safe = tf.clip_by_value(tf.cast(label, tf.int32), 0, len(label_names) - 1)
  return tf.where(tf.equal(label, -1), tf.constant("<unk>"), tf.gather(names, safe))


def _prompt(
  benchmark: str, ex: Mapping[str, tf.Tensor], keys: Sequence[str]
) -> tf.Tensor:
  parts = [benchmark]
  for key in keys:
    parts += [f"{key}:", ex[key]]
  return tf.strings.join(parts, separator=" ")


def classification(
  dataset: tf.data.Dataset,
  benchmark: str,
  keys: Sequence[str],
  label_names: Sequence[str],
) -> tf.data.Dataset:
  """T5's GLUE format: "<benchmark> k1: v1 k2: v2 ..." -> the label's name.

  For example ``{"sentence1": "A", "sentence2": "B", "label": 0}`` with benchmark "rte"
  becomes ``{"inputs": "rte sentence1: A sentence2: B", "targets": "entailment"}``.
  """

  def fn(ex):
    return {
      "inputs": _prompt(benchmark, ex, keys),
      "targets": _label_word(ex["label"], label_names),
    }

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def stsb(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """STS-B: the 0-5 similarity rounded to the nearest 0.2, as text ("3.8")."""

  def fn(ex):
    score = tf.round(tf.cast(ex["label"], tf.float32) * 5.0) / 5.0
    return {
      "inputs": _prompt("stsb", ex, ("sentence1", "sentence2")),
      "targets": tf.strings.as_string(score, precision=1),
    }

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD: "record query: Q entities: E1, E2 passage: P" -> the first answer.

  The passage's "@highlight" lines become sentences. Every example also keeps
  "answers" (all answers, tab-joined) so that eval can score the best match.
  """

  def fn(ex):
    passage = tf.strings.regex_replace(
      ex["passage"], r"(\.|\?|\!|\"|\')?\n@highlight\n", r"\1. "
    )
    inputs = tf.strings.join(
      [
        "record query:",
        ex["query"],
        "entities:",
        tf.strings.reduce_join(ex["entities"], separator=", "),
        "passage:",
        passage,
      ],
      separator=" ",
    )
    answers = ex["answers"]
    first = tf.concat([answers, tf.constant(["<unk>"])], axis=0)[0]
    return {
      "inputs": inputs,
      "targets": first,
      "answers": tf.strings.reduce_join(answers, separator=_ANSWER_SEPARATOR),
    }

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# --- postprocessing -------------------------------------------------------------------


def label_to_class_id(
  output: Any, label_names: Sequence[str], example=None, is_target: bool = False
) -> int:
  """Label word -> its index in ``label_names``; anything else -> -1."""
  del example, is_target
  text = output.decode("utf-8") if isinstance(output, bytes) else str(output)
  try:
    return list(label_names).index(text.strip())
  except ValueError:
    return -1


def string_to_float(
  output: Any, example=None, is_target: bool = False, default: float = -1.0
) -> float:
  """ "3.8" -> 3.8; text that is not a number -> ``default``."""
  del example, is_target
  text = output.decode("utf-8") if isinstance(output, bytes) else str(output)
  try:
    return float(text)
  except ValueError:
    return default


def record_answers(output: Any, example=None, is_target: bool = False):
  """Targets become the list of all answers (from the example); predictions stay text."""
  if is_target and example is not None and "answers" in example:
    joined = example["answers"]
    joined = joined.decode("utf-8") if isinstance(joined, bytes) else str(joined)
    return joined.split(_ANSWER_SEPARATOR) if joined else [""]
  return output.decode("utf-8") if isinstance(output, bytes) else str(output)


class LocalTfdsSource(seqio.TfdsDataSource):
  """``seqio.TfdsDataSource`` that never downloads and says how to prepare missing data."""

  def __init__(self, tfds_name: str, tfds_data_dir: Optional[str], splits: Sequence[str]):
    super().__init__(
      tfds_name, tfds_data_dir=tfds_data_dir, splits=splits, read_only=True
    )
    self._name = tfds_name
    self._data_dir = tfds_data_dir

  def _not_prepared(self) -> UserError:
    where = self._data_dir or "TFDS's default data directory (~/tensorflow_datasets)"
    return UserError(
      f"TFDS dataset {self._name} is not prepared in {where}; "
      f"run `tfds build {self._name.split(':')[0]}` on a machine with "
      f"network, copy the result there, or set TFDS_DATA_DIR to it."
    )

  def num_input_examples(self, split: str) -> Optional[int]:
    try:
      return super().num_input_examples(split)
    except KeyError as e:
      raise self._not_prepared() from e

  def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:
    try:
      return super().get_dataset(*args, **kwargs)
    except AssertionError as e:
      raise self._not_prepared() from e


# --- registration ---------------------------------------------------------------------

# name -> (benchmark, text keys, label names, metric fns)
_GLUE = {
  "cola": (("sentence",), ("unacceptable", "acceptable"), [metrics.matthews_corrcoef]),
  "sst2": (("sentence",), ("negative", "positive"), [metrics.accuracy]),
  "mrpc": (
    ("sentence1", "sentence2"),
    ("not_equivalent", "equivalent"),
    [metrics.f1_binary, metrics.accuracy],
  ),
  "qqp": (
    ("question1", "question2"),
    ("not_duplicate", "duplicate"),
    [metrics.f1_binary, metrics.accuracy],
  ),
  "mnli": (
    ("hypothesis", "premise"),
    ("entailment", "neutral", "contradiction"),
    [metrics.accuracy],
  ),
  "qnli": (
    ("question", "sentence"),
    ("entailment", "not_entailment"),
    [metrics.accuracy],
  ),
  "rte": (
    ("sentence1", "sentence2"),
    ("entailment", "not_entailment"),
    [metrics.accuracy],
  ),
  "wnli": (
    ("sentence1", "sentence2"),
    ("not_entailment", "entailment"),
    [metrics.accuracy],
  ),
}
_SUPER_GLUE = {
  "boolq": (("passage", "question"), ("False", "True"), [metrics.accuracy]),
  "cb": (
    ("hypothesis", "premise"),
    ("entailment", "contradiction", "neutral"),
    [metrics.accuracy, functools.partial(metrics.mean_multiclass_f1, labels=(0, 1, 2))],
  ),
  "copa": (
    ("choice1", "choice2", "premise", "question"),
    ("choice1", "choice2"),
    [metrics.accuracy],
  ),
  "rte": (
    ("hypothesis", "premise"),
    ("entailment", "not_entailment"),
    [metrics.accuracy],
  ),
  "wic": (("sentence1", "sentence2", "word"), ("False", "True"), [metrics.accuracy]),
  "multirc": (
    ("question", "answer", "paragraph"),
    ("False", "True"),
    [metrics.f1_binary, metrics.accuracy],
  ),
}

GLUE_TASKS = tuple(
  f"glue_{name}_v002"
  for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
)
MNLI_EVAL_TASKS = ("glue_mnli_matched_v002", "glue_mnli_mismatched_v002")
GLUE_EVAL_TASKS = tuple(t for t in GLUE_TASKS if t != "glue_mnli_v002") + MNLI_EVAL_TASKS
SUPER_GLUE_TASKS = tuple(
  f"super_glue_{name}_v102"
  for name in ("boolq", "cb", "copa", "rte", "wic", "multirc", "record")
)


_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = (
  "train",
  "validation_matched",
  "validation_mismatched",
  "test_matched",
  "test_mismatched",
)


def _add_task(
  name: str,
  tfds_name: str,
  text_preprocessor,
  output_features,
  metric_fns,
  postprocess_fn,
  data_dir: Optional[str],
  splits: Any = None,
) -> None:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  # Naming the splits keeps registration free of TFDS metadata reads.
  if splits is None:
    splits = _MNLI_SPLITS if tfds_name.startswith("glue/mnli:") else _SPLITS
  source = LocalTfdsSource(tfds_name, data_dir, splits)
  seqio.TaskRegistry.add_provider(
    name,
    seqio.Task(
      name,
      source=source,
      output_features=output_features,
      preprocessors=[
        text_preprocessor,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
      ],
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns,
    ),
  )


def _add_mixture(
  name: str, tasks: Sequence[str], default_rate: Any = seqio.mixing_rate_num_examples
) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def register(vocab_path: Optional[str] = None, extra_ids: Optional[int] = None) -> None:
  """(Re)registers every GLUE/SuperGLUE task and both mixtures with this vocabulary.

  Args:
    vocab_path: a local SentencePiece model; None takes the run's VOCABULARY (gin) when
      called while mtx imports this module, else the shipped demo model.
    extra_ids: sentinel ids of the vocabulary; None reads ``$MTX_VOCAB_EXTRA_IDS`` (0).
  """
  spm = vocab.get_vocabulary(
    vocab_path or default_vocab_path(),
    _vocab_extra_ids() if extra_ids is None else extra_ids,
  )
  output_features = {
    "inputs": seqio.Feature(vocabulary=spm, add_eos=True),
    "targets": seqio.Feature(vocabulary=spm, add_eos=True),
  }
  data_dir = tfds_data_dir()
  add = functools.partial(_add_task, output_features=output_features, data_dir=data_dir)

  for benchmark, (keys, labels, metric_fns) in _GLUE.items():
    add(
      f"glue_{benchmark}_v002",
      f"glue/{benchmark}:{GLUE_VERSION}",
      functools.partial(
        classification, benchmark=benchmark, keys=keys, label_names=labels
      ),
      metric_fns=metric_fns,
      postprocess_fn=functools.partial(label_to_class_id, label_names=labels),
    )
  add(
    "glue_stsb_v002",
    f"glue/stsb:{GLUE_VERSION}",
    stsb,
    metric_fns=[metrics.pearson, metrics.spearman],
    postprocess_fn=string_to_float,
  )
  keys, labels, metric_fns = _GLUE["mnli"]
  for name, which in zip(MNLI_EVAL_TASKS, ("matched", "mismatched")):
    add(
      name,
      f"glue/mnli:{GLUE_VERSION}",
      functools.partial(classification, benchmark="mnli", keys=keys, label_names=labels),
      metric_fns=metric_fns,
      postprocess_fn=functools.partial(label_to_class_id, label_names=labels),
      splits={"validation": f"validation_{which}", "test": f"test_{which}"},
    )

  for benchmark, (keys, labels, metric_fns) in _SUPER_GLUE.items():
    add(
      f"super_glue_{benchmark}_v102",
      f"super_glue/{benchmark}:{SUPER_GLUE_VERSION}",
      functools.partial(
        classification, benchmark=benchmark, keys=keys, label_names=labels
      ),
      metric_fns=metric_fns,
      postprocess_fn=functools.partial(label_to_class_id, label_names=labels),
    )
  add(
    "super_glue_record_v102",
    f"super_glue/record:{SUPER_GLUE_VERSION}",
    record,
    metric_fns=[metrics.max_over_answers_em_f1],
    postprocess_fn=record_answers,
  )

  _add_mixture(GLUE_MIXTURE, GLUE_TASKS)
  _add_mixture(GLUE_EVAL_MIXTURE, GLUE_EVAL_TASKS, default_rate=1.0)
  _add_mixture(SUPER_GLUE_MIXTURE, SUPER_GLUE_TASKS)


register()
