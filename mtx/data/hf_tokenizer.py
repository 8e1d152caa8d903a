"""A Hugging Face ``tokenizer.json`` (the `tokenizers` library) as a ``seqio.Vocabulary``.

Llama 3, Qwen2 and most recent models ship their tokenizer as ``tokenizer.json`` (a
byte-level BPE) rather than a SentencePiece model. seqio tasks tokenize inside
``tf.data`` (``encode_tf`` on a scalar string) and mtx decodes predictions in Python, so
the wrapper offers both; the TensorFlow side calls the Rust tokenizer through
``tf.numpy_function`` (one example at a time, as seqio's ``tokenize`` preprocessor asks).

>>> vocabulary = TokenizersVocabulary("tests/fixtures/hf_qwen2/tokenizer.json", eos_id=0)
>>> vocabulary.decode(vocabulary.encode("copy: hello world"))
'copy: hello world'

Ids are the tokenizer's own: no ids are reserved or shifted (seqio's ``pad_id`` 0 is the
tokenizer's id 0, a real token: Llama 3's and Qwen2's "!"). So mtx never reads padding
off a 0 in these ids: decoder-only batches mark it with segment ids and loss weights,
evaluation rows with lengths and masks, and decoding may emit id 0 and ends each
output at EOS (``zero_is_padding``).
"""

import os
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

from mtx import paths
from mtx.errors import UserError


class TokenizersVocabulary(seqio.Vocabulary):
  """``seqio.Vocabulary`` over a ``tokenizers.Tokenizer`` JSON file.

  Args:
    path: a ``tokenizer.json`` on any path ``mtx.paths`` reads.
    eos_id: the end-of-sequence id (config.json's ``eos_token_id``), or None.
    bos_id: the beginning-of-sequence id (``bos_token_id``), or None.

  Raises:
    UserError: the file is missing or not a tokenizer.json.
  """

  def __init__(
    self, path: str, eos_id: Optional[int] = None, bos_id: Optional[int] = None
  ):
    self._path = os.fspath(path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(paths.read_text(self._path))
    except Exception as e:  # pylint: disable=broad-except  # the library's own errors
      raise UserError(
        f"Vocabulary {self._path} is not a Hugging Face tokenizer.json "
        f"({str(e).splitlines()[0][:120]}); use the tokenizer.json that came with the model."
      ) from e
    self._eos_id, self._bos_id = eos_id, bos_id
    unk = getattr(self._tokenizer.model, "unk_token", None)
    self._unk_id = self._tokenizer.token_to_id(unk) if unk else None
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self._path

  @property
  def eos_id(self) -> Optional[int]:
    return self._eos_id

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _until_eos(self, ids: list) -> list:
    if self.eos_id is not None and self.eos_id in ids:
      return ids[: ids.index(self.eos_id)]
    return ids

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar tf.string -> int32 [length]."""

    def encode(text) -> np.ndarray:
      text = np.asarray(text).item()  # a 0-d array in eager mode, bytes in a graph
      return np.asarray(self._encode(text.decode("utf-8")), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int32 [..., length] -> tf.string [...]."""

    def decode(batch: np.ndarray) -> np.ndarray:
      # seqio has set everything after the first EOS to pad_id, which may be a real
      # token here: each row ends at its first EOS instead.
      flat = batch.reshape(-1, batch.shape[-1]).tolist()
      texts = [self._decode(self._until_eos(row)) for row in flat]
      return np.asarray([t.encode("utf-8") for t in texts], object).reshape(
        batch.shape[:-1]
      )

    text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    text.set_shape(ids.shape[:-1])
    return text

  def __eq__(self, other) -> bool:
    return (
      isinstance(other, TokenizersVocabulary)
      and self._path == other.path
      and (self.eos_id, self.bos_id) == (other.eos_id, other.bos_id)
    )

  def __hash__(self) -> int:
    return hash((self._path, self._eos_id, self._bos_id))


def zero_is_padding(vocabulary) -> bool:
  """Whether ``vocabulary``'s id 0 is padding, never a token of text: True for seqio's
  SentencePiece and byte vocabularies (T5's pad, which they reserve; a Llama 2
  tokenizer.model's ``<unk>``, which its byte fallback never produces), False for a
  ``TokenizersVocabulary``, whose id 0 is the tokenizer's first token (Llama 3's and
  Qwen2's "!"), which a model may emit."""
  return not isinstance(vocabulary, TokenizersVocabulary)
