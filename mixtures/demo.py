"""Demo tasks and mixtures: synthetic text-to-text tasks small enough to learn on a CPU.

Importing this module registers the tasks below and three mixtures as plain
``seqio.Task`` / ``seqio.Mixture`` objects. Everything is generated in code from fixed
seeds (no files, no downloads), so every machine sees the same examples; validation
inputs never occur in the train split of the same task.

| task           | train  | valid | example (inputs -> targets)                     | teaches                |
|----------------|--------|-------|-------------------------------------------------|------------------------|
| demo_sort      | 50,000 | 1,000 | "sort: 42 7 19" -> "7 19 42"                    | ordering numbers       |
| demo_copy      | 20,000 |   500 | "copy: cat red owl" -> "cat red owl"            | copying                |
| demo_reverse   | 20,000 |   500 | "reverse: cat red owl" -> "owl red cat"         | reversing              |
| demo_sentiment |  8,000 |   500 | "review: the soup was not good" -> "negative"   | classification         |
| demo_verdict   |  8,000 |   500 | "review: the soup was not good" -> "bad"        | other words; CONFLICTS |
| demo_min       |  5,000 |   500 | "min: 42 7 19" -> "7"                           | smallest; helps sort   |
| demo_max       |  5,000 |   500 | "max: 42 7 19" -> "42"                          | largest; helps sort    |
| demo_count     |  2,000 |   200 | "count: 42 7 19" -> "3"                         | counting (smallest)    |

``demo_sentiment`` and ``demo_verdict`` conflict on purpose: their inputs are the *same
strings*, prefix included (same generator, same seed), with the same judgement in other
words ("positive"/"negative" against "good"/"bad"), as when two datasets label one thing
with different label sets. The model cannot tell the two tasks apart: both learn the
polarity (they help each other there), but no model can satisfy both label sets, and
once the polarity is learned their gradients point against each other on the label
words, which ``grad_cos/demo_sentiment/demo_verdict`` shows (README, "The demo"). ``demo_copy`` and
``demo_reverse`` read the same words (2 to 4 of them, same seed) behind their own
prefixes: both can be learned, they only compete for the small model's capacity.
``demo_sort``, ``demo_min``, ``demo_max`` and ``demo_count`` read the same kind of input (3 to
8 numbers below 100) and help each other. Exact match scores the generative tasks;
accuracy scores ``demo_sentiment``, ``demo_verdict`` and ``demo_count``. With the shipped
vocabulary (``mtx.data.vocab``) inputs are at most 18 tokens (11 outside the reviews) and
targets at most 8, before EOS, so ``{"inputs": 24, "targets": 16}`` never truncates.

Mixtures (rates keep seqio's meaning: relative numbers of examples):

| mixture       | tasks                            | rate                                          |
|---------------|----------------------------------|-----------------------------------------------|
| demo          | all eight                        | examples-proportional, capped at 10,000       |
| demo_conflict | demo_sentiment, demo_verdict     | equal (1.0 each)                              |
| demo_helpful  | demo_sort, demo_min, demo_max    | examples-proportional, capped at 10,000       |

With the cap, ``demo`` draws sort, copy and reverse at 10,000 each, sentiment and verdict
at 8,000 each, min and max at 5,000 each and count at 2,000 (out of 58,000 in total).

Re-importing (or ``importlib.reload``) replaces the registrations instead of failing.
``demo_texts`` gives the same text to ``tools/train_vocab.py`` for the shipped vocabulary.
"""

import functools
import random
from typing import Callable, Dict, Iterator, List, Tuple

import seqio
import tensorflow as tf

from mtx.data import vocab
from mtx.eval import metrics

Example = Tuple[str, str]

_WORDS = (
  "cat",
  "dog",
  "fox",
  "owl",
  "bee",
  "cow",
  "pig",
  "hen",
  "ant",
  "bat",
  "red",
  "blue",
  "green",
  "gold",
  "pink",
  "gray",
  "sun",
  "moon",
  "star",
  "tree",
  "rock",
  "lake",
  "hill",
  "rain",
  "snow",
  "wind",
  "fire",
  "ice",
  "sea",
  "sky",
)
_SUBJECTS = (
  "the movie",
  "the food",
  "the service",
  "the book",
  "the game",
  "the hotel",
  "the song",
  "the show",
  "the room",
  "the coffee",
  "the soup",
  "the film",
  "the staff",
  "the music",
  "the story",
  "the trip",
)
_ADVERBS = ("", "really ", "very ", "quite ", "so ", "truly ")
_POSITIVE = (
  "great",
  "good",
  "tasty",
  "lovely",
  "fun",
  "nice",
  "amazing",
  "wonderful",
  "excellent",
  "pleasant",
  "fresh",
  "friendly",
)
_NEGATIVE = (
  "bad",
  "awful",
  "boring",
  "terrible",
  "dull",
  "poor",
  "cold",
  "slow",
  "rude",
  "bland",
  "noisy",
  "sad",
)


def _numbers(rng: random.Random) -> List[int]:
  return [rng.randrange(100) for _ in range(rng.randint(3, 8))]


def _join(values) -> str:
  return " ".join(str(v) for v in values)


def _sort(rng: random.Random) -> Example:
  xs = _numbers(rng)
  return f"sort: {_join(xs)}", _join(sorted(xs))


def _min(rng: random.Random) -> Example:
  xs = _numbers(rng)
  return f"min: {_join(xs)}", str(min(xs))


def _max(rng: random.Random) -> Example:
  xs = _numbers(rng)
  return f"max: {_join(xs)}", str(max(xs))


def _count(rng: random.Random) -> Example:
  xs = _numbers(rng)
  return f"count: {_join(xs)}", str(len(xs))


def _words(rng: random.Random) -> List[str]:
  return [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]


def _copy(rng: random.Random) -> Example:
  words = _words(rng)
  return f"copy: {_join(words)}", _join(words)


def _reverse(rng: random.Random) -> Example:
  words = _words(rng)
  return f"reverse: {_join(words)}", _join(reversed(words))


def _review(rng: random.Random) -> Tuple[str, bool]:
  positive = rng.random() < 0.5
  negated = rng.random() < 0.3
  # A negated positive word reads negative and vice versa.
  word_is_positive = positive != negated
  words = _POSITIVE if word_is_positive else _NEGATIVE
  text = f"{rng.choice(_SUBJECTS)} was {'not ' if negated else ''}{rng.choice(_ADVERBS)}"
  text += rng.choice(words)
  if not negated and rng.random() < 0.4:
    text += f" and {rng.choice(_ADVERBS)}{rng.choice(words)}"
  return f"review: {text}", positive


def _sentiment(rng: random.Random) -> Example:
  text, positive = _review(rng)
  return text, "positive" if positive else "negative"


def _verdict(rng: random.Random) -> Example:
  text, positive = _review(rng)  # the same reviews and labels, in other words
  return text, "good" if positive else "bad"


# name -> (generator, train size, validation size, seed, metric fns). The seed belongs to
# the generator's input stream: demo_sentiment and demo_verdict share 1002 on purpose (the
# same inputs), and so do demo_copy and demo_reverse (1001).
_TASKS: Dict[str, Tuple[Callable[[random.Random], Example], int, int, int, tuple]] = {
  "demo_sort": (_sort, 50_000, 1_000, 1000, (metrics.exact_match,)),
  "demo_copy": (_copy, 20_000, 500, 1001, (metrics.exact_match,)),
  "demo_reverse": (_reverse, 20_000, 500, 1001, (metrics.exact_match,)),
  "demo_sentiment": (_sentiment, 8_000, 500, 1002, (metrics.accuracy,)),
  "demo_verdict": (_verdict, 8_000, 500, 1002, (metrics.accuracy,)),
  "demo_min": (_min, 5_000, 500, 1003, (metrics.exact_match,)),
  "demo_max": (_max, 5_000, 500, 1004, (metrics.exact_match,)),
  "demo_count": (_count, 2_000, 200, 1005, (metrics.accuracy,)),
}
TASK_NAMES = tuple(_TASKS)
RATE_CAP = 10_000


@functools.lru_cache(maxsize=None)
def examples(task_name: str, split: str) -> Tuple[Example, ...]:
  """Returns the (inputs, targets) pairs of a demo task's split, always the same ones.

  The validation split is drawn first from the task's seed; the train split continues
  the same stream and skips any input already used for validation.
  """
  generate, num_train, num_validation, seed, _ = _TASKS[task_name]
  rng = random.Random(seed)
  validation = [generate(rng) for _ in range(num_validation)]
  if split == "validation":
    return tuple(validation)
  if split != "train":
    raise ValueError(f"Demo task {task_name} has no split {split!r}.")
  held_out = {inputs for inputs, _ in validation}
  train = []
  while len(train) < num_train:
    example = generate(rng)
    if example[0] not in held_out:
      train.append(example)
  return tuple(train)


def demo_texts(examples_per_task: int = 2000) -> Iterator[str]:
  """Yields input and target strings from every demo task (for training a vocabulary)."""
  for name in TASK_NAMES:
    for inputs, targets in examples(name, "train")[:examples_per_task]:
      yield inputs
      yield targets


def _dataset_fn(
  split: str, shuffle_files: bool, seed=None, *, task_name: str
) -> tf.data.Dataset:
  del shuffle_files, seed  # One in-memory "file"; seqio's Task shuffles examples.
  pairs = examples(task_name, split)
  return tf.data.Dataset.from_tensor_slices(
    {
      "inputs": tf.constant([p[0] for p in pairs], dtype=tf.string),
      "targets": tf.constant([p[1] for p in pairs], dtype=tf.string),
    }
  )


def _replace_task(task: seqio.Task) -> None:
  if task.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)


def _replace_mixture(name: str, tasks, default_rate) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def register() -> None:
  """Registers (or re-registers) the demo tasks and mixtures; runs on import."""
  spm = vocab.get_vocabulary()
  output_features = {
    "inputs": seqio.Feature(vocabulary=spm, add_eos=True),
    "targets": seqio.Feature(vocabulary=spm, add_eos=True),
  }
  for name, (_, num_train, num_validation, _, metric_fns) in _TASKS.items():
    dataset_fn = functools.partial(_dataset_fn, task_name=name)
    # seqio validates the signature by name; a partial keeps split/shuffle_files/seed.
    source = seqio.FunctionDataSource(
      dataset_fn=dataset_fn,
      splits=("train", "validation"),
      num_input_examples={"train": num_train, "validation": num_validation},
    )
    _replace_task(
      seqio.Task(
        name,
        source=source,
        output_features=output_features,
        preprocessors=[
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=list(metric_fns),
      )
    )
  proportional = functools.partial(seqio.mixing_rate_num_examples, maximum=RATE_CAP)
  _replace_mixture("demo", TASK_NAMES, proportional)
  _replace_mixture("demo_conflict", ("demo_sentiment", "demo_verdict"), 1.0)
  _replace_mixture("demo_helpful", ("demo_sort", "demo_min", "demo_max"), proportional)


register()
