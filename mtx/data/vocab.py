"""SentencePiece vocabularies from local files, checked before anything uses them.

mtx ships one small model, ``mtx/data/assets/mtx_demo.model`` (about a thousand pieces,
unigram, byte fallback so any text encodes), made by ``python tools/train_vocab.py``. Its
ids follow T5: pad=0, eos=1, unk=2, no bos. Any other T5-compatible SentencePiece model
(T5's own ``spiece.model``, say, with ``extra_ids=100``) loads the same way.

seqio's ``SentencePieceVocabulary`` opens its file lazily, so a wrong path would only show
up deep inside a ``tf.data`` pipeline; ``get_vocabulary`` opens it at once instead and
turns every failure into one ``UserError``.
"""

import contextlib
import json
import os
from typing import Iterator, Optional

import sentencepiece as spm
import seqio

from mtx import paths
from mtx.data import hf_tokenizer
from mtx.errors import UserError

DEFAULT_SPM_PATH = os.path.join(os.path.dirname(__file__), "assets", "mtx_demo.model")

# T5's reserved ids; seqio's feature converters and T5 models assume them.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Sentinels T5's Hugging Face tokenizers add after the SentencePiece pieces.
T5_EXTRA_IDS = 100
# ByT5's embedding rows: 3 special ids, 256 bytes, 125 extra ids (seqio's ByteVocabulary).
BYT5_VOCAB_SIZE = 384

# The default vocabulary's path while task modules are imported (gin's VOCABULARY):
# set only by ``default_vocabulary_path``, for the duration of that import.
_default_path: Optional[str] = None

_FIX = "pass the path of a SentencePiece .model file or create one with `python tools/train_vocab.py`"


def get_vocabulary(path: Optional[str] = None, extra_ids: int = 0) -> seqio.Vocabulary:
  """Loads a local SentencePiece model as a seqio vocabulary, failing early and clearly.

  Args:
    path: a local ``.model`` file, or a Hugging Face T5 directory (its spiece.model
      with T5's 100 extra ids, or bytes for ByT5); None means the default: the path given to
      ``default_vocabulary_path`` while task modules are imported (gin's
      ``VOCABULARY``), else the shipped demo model (``DEFAULT_SPM_PATH``).
    extra_ids: sentinel ids appended after the model's pieces (T5 uses 100 for span
      corruption; the demo tasks need none).

  Returns:
    A loaded ``seqio.SentencePieceVocabulary``.

  Raises:
    UserError: the path is on a filesystem seqio cannot read, missing, unreadable, not a SentencePiece model, or its
      pad/eos ids are not T5's 0 and 1.
  """
  if path is None:
    path = default_path()
  path = paths.absolute(os.fspath(path))
  if paths.isdir(path) and paths.isfile(paths.join(path, "config.json")):
    return _hf_vocabulary(path)
  _check_gfile_scheme(path)
  if not paths.isfile(path):
    raise UserError(f"Vocabulary file {path} does not exist; {_FIX}.")
  if extra_ids < 0:
    raise UserError(
      f"extra_ids={extra_ids} for vocabulary {path} is negative; pass 0 or more."
    )
  try:
    proto = paths.read_bytes(path)
  except OSError as e:
    raise UserError(
      f"Vocabulary file {path} cannot be read ({e.strerror}); "
      f"fix its permissions or {_FIX}."
    ) from e
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(proto)
  except (RuntimeError, OSError, TypeError) as e:
    raise UserError(
      f"Vocabulary file {path} is not a SentencePiece model; {_FIX}."
    ) from e
  if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID:
    raise UserError(
      f"Vocabulary {path} has pad id {processor.pad_id()} and eos id "
      f"{processor.eos_id()} but T5 models need pad=0 and eos=1; retrain it with "
      f"`python tools/train_vocab.py` (or --pad_id=0 --eos_id=1)."
    )
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  vocab.tokenizer  # pylint: disable=pointless-statement  # Loads the model now.
  return vocab


def _hf_vocabulary(directory: str) -> seqio.Vocabulary:
  """A Hugging Face directory's vocabulary: a T5's spiece.model with T5's 100 extra ids
  (T5, Flan-T5, mT5), bytes when it has none and is a ByT5 (vocab_size 384), or a Llama
  family's tokenizer.model (SentencePiece, its own ids) or tokenizer.json."""
  spm = paths.join(directory, "spiece.model")
  if paths.isfile(spm):
    return get_vocabulary(spm, extra_ids=T5_EXTRA_IDS)
  try:
    config = json.loads(paths.read_text(paths.join(directory, "config.json")))
  except (OSError, ValueError):
    config = {}
  if paths.isfile(paths.join(directory, "tokenizer.model")):
    return _llama_sentencepiece(paths.join(directory, "tokenizer.model"))
  if paths.isfile(paths.join(directory, "tokenizer.json")):
    return hf_tokenizer.TokenizersVocabulary(
      paths.join(directory, "tokenizer.json"),
      eos_id=_first_id(config.get("eos_token_id")),
      bos_id=_first_id(config.get("bos_token_id")),
    )
  if config.get("vocab_size") == BYT5_VOCAB_SIZE:
    return seqio.ByteVocabulary(extra_ids=BYT5_VOCAB_SIZE - 259)  # 3 special + 256 bytes
  raise UserError(
    f"Hugging Face directory {directory} has no spiece.model, tokenizer.model or "
    "tokenizer.json (and is not a ByT5); copy the model's tokenizer file there, or set "
    "VOCABULARY to it."
  )


def _first_id(value) -> Optional[int]:
  """config.json's eos/bos_token_id: an int, a list of ints (the first counts) or null."""
  if isinstance(value, list):
    value = value[0] if value else None
  return None if value is None else int(value)


def _check_gfile_scheme(path: str) -> None:
  if paths.scheme(path) not in (None, "gs"):
    raise UserError(
      f"Vocabulary path {path} is on {paths.scheme(path)}:// but seqio reads "
      f"SentencePiece models with TensorFlow's gfile (local paths and gs:// only); "
      f"copy the model to a local or gs:// path and pass that."
    )


def _llama_sentencepiece(path: str) -> seqio.Vocabulary:
  """A Llama-family tokenizer.model: SentencePiece with the model's own special ids
  (Llama 2: unk 0, bos 1, eos 2), so T5's pad/eos check does not apply."""
  _check_gfile_scheme(path)
  vocabulary = seqio.SentencePieceVocabulary(path)
  try:
    vocabulary.tokenizer  # pylint: disable=pointless-statement  # Loads the model now.
  except Exception as e:  # pylint: disable=broad-except  # sentencepiece's own errors
    raise UserError(
      f"Vocabulary file {path} is not a SentencePiece model; use the tokenizer.model "
      "that came with the checkpoint."
    ) from e
  return vocabulary


def default_path() -> str:
  """The default vocabulary's path: the one in force (``default_vocabulary_path``), or
  the shipped demo model."""
  if os.environ.get("MTX_VOCAB"):  # read before; refuse rather than silently ignore it
    raise UserError(
      "MTX_VOCAB is set but mtx no longer reads it; unset it and set the run's "
      "VOCABULARY instead (--gin.VOCABULARY=\"'/path/to/spm.model'\")."
    )
  return _default_path or DEFAULT_SPM_PATH


@contextlib.contextmanager
def default_vocabulary_path(path: Optional[str]) -> Iterator[None]:
  """Within the block, ``get_vocabulary()`` without a path loads ``path`` (None: no
  change). ``mtx.data.registry.import_modules`` imports task modules inside it, so
  tasks built on the default vocabulary get the run's VOCABULARY."""
  global _default_path  # pylint: disable=global-statement
  previous = _default_path
  if path:
    _default_path = os.fspath(path)
  try:
    yield
  finally:
    _default_path = previous
