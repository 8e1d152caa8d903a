"""Trains a T5-compatible SentencePiece model from local text files.

    python tools/train_vocab.py --input a.txt b.txt --vocab_size 4096 --model_prefix out
    python tools/train_vocab.py      # regenerates mtx/data/assets/mtx_demo.model

The model is unigram with byte fallback (any text encodes, unknown characters become
UTF-8 byte pieces instead of <unk>), with T5's ids: pad=0, eos=1, unk=2 and no bos.
Training is single-threaded with a fixed seed and no sentence sampling, so the same
input gives byte-identical files (``<prefix>.model`` and ``<prefix>.vocab``).

Without ``--input`` it rebuilds the shipped demo vocabulary from the text of the demo
tasks (``mixtures.demo``) plus a few paragraphs of general English, so words outside the
demo still split into sensible pieces. Note that ``vocab_size`` counts the 256 byte
pieces and the 3 special ids, and that it is an upper bound: a small corpus yields fewer
pieces (the demo text asks for 1024 and supports about 700).
"""

import argparse
import os
import sys
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from mtx.data import vocab  # pylint: disable=g-import-not-at-top
from mtx.errors import UserError  # pylint: disable=g-import-not-at-top

DEMO_VOCAB_SIZE = 1024
_SEED = 20240601

# General English written for this file, so the demo vocabulary is not degenerate on
# text outside the demo tasks (and has the words of T5's GLUE prompts).
GENERAL_ENGLISH = """\
The morning train left the station a few minutes late, and most of the passengers did not seem to mind.
A small boy by the window counted the bridges while his mother read the newspaper.
Outside, the fields were green after a week of rain, and the river had risen almost to the road.
When the train stopped at the next town, an old man with a heavy suitcase asked for help.
Two students carried the case to an empty seat and then went back to their books.
They were studying for an exam on the history of science, which began the following Monday.
One of them explained that the first clocks were built to measure the hours of prayer.
The other answered that sailors needed good clocks to find their position at sea.
Both of them were right, and the old man laughed and told them about his father, who repaired watches.
Language models learn to predict the next word from a large amount of written text.
A sentence can be acceptable or unacceptable, and a review can be positive or negative.
The question asks whether the second sentence follows from the first one.
If the premise is true, the hypothesis may be an entailment, a contradiction, or neutral.
Two questions are duplicates when they ask for the same information in different words.
The passage describes a city, and the answer to the question is found in its third paragraph.
Choose the more likely cause or effect: the first choice or the second choice.
The word bank means something different in the first sentence than in the second.
People often disagree about what makes a story interesting, but most agree that it needs a clear beginning.
Researchers measured the temperature of the lake every day for three years and published their results.
The committee will meet again next week to review the budget and discuss the new proposal.
Please write your name, your address and your phone number at the top of the form.
She opened the door, looked at the empty room, and decided to paint the walls yellow.
Water boils at one hundred degrees at sea level, but at a lower temperature in the mountains.
Computers store numbers in binary, using only the digits zero and one.
The weather today is cloudy with a chance of light rain in the afternoon and evening.
He bought bread, cheese, apples and a bottle of milk before the shop closed.
Children learn to read by listening to stories, recognizing letters and sounding out words.
The museum is open every day except Tuesday, from nine in the morning until six in the evening.
Many birds fly south in the autumn and return in the spring when the days become longer.
The software update fixed several bugs, improved performance and added support for new devices.
"""


def _train(
  prefix: str,
  vocab_size: int,
  input_files: Sequence[str] = (),
  sentences: Optional[Iterable[str]] = None,
) -> None:
  """Trains ``<prefix>.model`` and ``<prefix>.vocab``; see the module docstring."""
  options = dict(
    model_prefix=prefix,
    vocab_size=vocab_size,
    model_type="unigram",
    byte_fallback=True,
    character_coverage=1.0,
    split_digits=False,
    pad_id=vocab.PAD_ID,
    eos_id=vocab.EOS_ID,
    unk_id=vocab.UNK_ID,
    bos_id=-1,
    # Determinism: one thread, every sentence, in file order.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    # Small corpora cannot always fill vocab_size; take what they support.
    hard_vocab_limit=False,
    minloglevel=2,
  )
  spm.set_random_generator_seed(_SEED)
  if sentences is not None:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **options)
  else:
    spm.SentencePieceTrainer.train(input=",".join(input_files), **options)


def demo_sentences() -> List[str]:
  """The text the shipped demo vocabulary is trained on."""
  from mixtures import demo  # pylint: disable=g-import-not-at-top

  return list(demo.demo_texts()) + GENERAL_ENGLISH.splitlines()


def build_demo_vocab(prefix: str = vocab.DEFAULT_SPM_PATH[: -len(".model")]) -> None:
  """Regenerates the shipped demo vocabulary (``mtx/data/assets/mtx_demo.*``)."""
  if not os.path.exists(vocab.DEFAULT_SPM_PATH):
    # mixtures.demo loads the shipped model on import; a fresh checkout without it
    # first gets a stand-in from the English text, which the real one then replaces.
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    _train(prefix, 512, sentences=GENERAL_ENGLISH.splitlines())
  _train(prefix, DEMO_VOCAB_SIZE, sentences=demo_sentences())


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--input",
    nargs="+",
    default=None,
    help="local text files, one sentence per line (default: the demo text)",
  )
  parser.add_argument(
    "--vocab_size",
    type=int,
    default=DEMO_VOCAB_SIZE,
    help="pieces including 256 byte pieces and pad/eos/unk",
  )
  parser.add_argument(
    "--model_prefix",
    default=None,
    help="writes PREFIX.model and PREFIX.vocab (default: the shipped demo path)",
  )
  args = parser.parse_args(argv)
  try:
    if args.vocab_size < 300:
      raise UserError(
        f"--vocab_size {args.vocab_size} is too small for 256 byte pieces "
        f"plus pad/eos/unk; pass at least 300."
      )
    if args.input is None:
      if args.model_prefix is None:
        build_demo_vocab()
        print(f"wrote {vocab.DEFAULT_SPM_PATH}")
        return 0
      _train(args.model_prefix, args.vocab_size, sentences=demo_sentences())
    else:
      for path in args.input:
        if not os.path.isfile(path):
          raise UserError(
            f"Input file {path} passed to --input does not exist; pass local text files."
          )
      if args.model_prefix is None:
        raise UserError(
          "--model_prefix is required with --input (refusing to overwrite "
          "the shipped demo vocabulary); pass e.g. --model_prefix out/spm."
        )
      os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
      _train(args.model_prefix, args.vocab_size, input_files=args.input)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.model_prefix}.model")
  return 0


if __name__ == "__main__":
  sys.exit(main())
