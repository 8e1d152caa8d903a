"""Packed text-to-text rows into decoder-only prefix-LM rows (mtx.data.decoder_only)."""

import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import mtx.cli.configurables  # noqa: F401  (registers train with gin)
from mtx.cli import main as cli
from mtx.data import decoder_only, packing
from mtx.errors import UserError
from mtx.train import build


def _packed(examples, rows=1, inputs_length=6, targets_length=5):
  packer = packing.UnitPacker(rows, inputs_length, targets_length)
  for task, inputs, targets in examples:
    assert packer.try_add(task, np.array(inputs), np.array(targets))
  return packer.arrays


def test_the_docstring_example():
  out = decoder_only.convert(_packed([(0, [3, 4, 1], [3, 4, 1]), (1, [5, 6, 1], [6, 1])]))
  assert {k: v.tolist() for k, v in out.items()} == {
    "decoder_target_tokens": [[3, 4, 1, 3, 4, 1, 5, 6, 1, 6, 1]],
    "decoder_input_tokens": [[0, 3, 4, 1, 3, 4, 0, 5, 6, 1, 6]],
    "decoder_segment_ids": [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]],
    "decoder_positions": [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]],
    "decoder_loss_weights": [[0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]],
    "decoder_causal_attention": [[1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]],
    "decoder_task_ids": [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]],
  }


def test_equals_seqio_prefix_lm_feature_converter_on_a_packed_row():
  """T5X's conversion (seqio.PrefixLMFeatureConverter, pack=True) of the same two
  examples, packed into one row of 12, gives the same features."""
  examples = [([9, 4, 6, 1], [3, 9, 1]), ([5, 1], [7, 1])]
  ds = tf.data.Dataset.from_tensor_slices(
    {
      "inputs": tf.ragged.constant([e[0] for e in examples]),
      "targets": tf.ragged.constant([e[1] for e in examples]),
    }
  )
  converter = seqio.PrefixLMFeatureConverter(pack=True)
  want = next(converter(ds, {"inputs": 6, "targets": 6}).as_numpy_iterator())
  got = decoder_only.convert(
    _packed([(3, i, t) for i, t in examples], inputs_length=6, targets_length=6)
  )
  for key, value in want.items():
    np.testing.assert_array_equal(got[key][0], value, err_msg=key)


def test_task_major_units_convert_unit_by_unit_and_keep_unit_task():
  """[units, rows, length] with unit_task: each unit equals its own conversion."""
  a = _packed([(0, [3, 4, 1], [3, 1])], rows=2)
  b = _packed([(1, [5, 1], [6, 7, 1]), (1, [8, 1], [9, 1])], rows=2)
  batch = {k: np.stack([a[k], b[k]]) for k in a}
  batch["unit_task"] = np.array([0, 1], np.int32)
  out = decoder_only.convert(batch)
  assert out["decoder_input_tokens"].shape == (2, 2, 11)
  np.testing.assert_array_equal(out["unit_task"], [0, 1])
  for u, unit in enumerate((a, b)):
    alone = decoder_only.convert(unit)
    for key in decoder_only.FEATURES:
      np.testing.assert_array_equal(out[key][u], alone[key], err_msg=key)


def test_options_start_id_causal_and_loss_on_everything():
  packed = _packed([(0, [3, 4, 1], [5, 1])])
  options = decoder_only.PrefixLM(
    start_id=7, bidirectional_inputs=False, loss_on_targets_only=False
  )
  out = decoder_only.convert(packed, options)
  assert out["decoder_input_tokens"][0, :5].tolist() == [7, 3, 4, 1, 5]
  assert out["decoder_causal_attention"].sum() == 0
  assert out["decoder_loss_weights"][0].tolist() == [1] * 5 + [0] * 6


def test_an_example_without_targets_is_one_sentence():
  packed = _packed([(0, [3, 4, 1], [5, 1])])
  packed["decoder_segment_ids"][:] = 0
  with pytest.raises(UserError, match=r"no target tokens.*'targets' feature\.$"):
    decoder_only.convert(packed)


def test_unpacked_rows_convert_like_the_same_examples_packed():
  """Evaluation's unpacked rows (one example each, trailing padding, extents by mask)
  give what the packer's rows of the same examples give; a token 0 ending the inputs
  or the targets (a tokenizer.json's real id 0, no EOS) is kept."""
  examples = [([3, 4, 1], [5, 1]), ([6, 1], [7, 8, 9, 1]), ([6, 0], [7, 0])]
  unpacked = {
    "encoder_input_tokens": np.array([[3, 4, 1, 0], [6, 1, 0, 0], [6, 0, 0, 0]]),
    "encoder_input_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]),
    "decoder_target_tokens": np.array([[5, 1, 0, 0], [7, 8, 9, 1], [7, 0, 0, 0]]),
    "decoder_loss_weights": np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
  }
  got = decoder_only.from_unpacked(unpacked)
  for row, (inputs, targets) in enumerate(examples):
    want = decoder_only.convert(
      _packed([(0, inputs, targets)], inputs_length=4, targets_length=4)
    )
    for key in decoder_only.FEATURES:
      np.testing.assert_array_equal(got[key][row], want[key][0], err_msg=key)
  # The last example's 0s are its tokens: 2 inputs, then 2 targets with a loss.
  assert got["decoder_target_tokens"][2, :4].tolist() == [6, 0, 7, 0]
  assert got["decoder_loss_weights"][2].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]


class _Vocabulary:  # what PrefixLM.for_vocabulary reads of a vocabulary
  bos_id = 5


def _gin_train_batch(tmp_path, *bindings):
  """The decoder-only batch ``mtx train`` makes of one packed example, with
  tests/llama.gin and the ``--gin.`` bindings given."""
  here = os.path.dirname(os.path.abspath(__file__))
  gin.clear_config()
  try:
    cli.parse_gin(
      [os.path.join(here, "llama.gin")],
      [("MODEL_DIR", repr(str(tmp_path / "run")))] + [b.split("=") for b in bindings],
      [],
      [here],
      (),
    )
    config = gin.get_configurable("train")()
  finally:
    gin.clear_config()
  convert = build.batch_converter(config.model_config, _Vocabulary(), config.prefix_lm)
  return convert(_packed([(0, [3, 4, 1], [5, 1])]))


def test_gin_bidirectional_inputs_false_makes_the_train_batch_causal(tmp_path):
  default = _gin_train_batch(tmp_path)
  assert default["decoder_causal_attention"][0].tolist() == [1] * 4 + [0] * 7
  assert default["decoder_input_tokens"][0, 0] == _Vocabulary.bos_id
  causal = _gin_train_batch(tmp_path, "decoder_only.PrefixLM.bidirectional_inputs=False")
  assert causal["decoder_causal_attention"].sum() == 0
  assert causal["decoder_loss_weights"][0].tolist() == [0, 0, 0, 1, 1] + [0] * 6


def test_gin_loss_on_targets_only_false_weighs_the_inputs_too(tmp_path):
  assert _gin_train_batch(tmp_path)["decoder_loss_weights"][0].tolist() == (
    [0, 0, 0, 1, 1] + [0] * 6
  )
  every = _gin_train_batch(tmp_path, "decoder_only.PrefixLM.loss_on_targets_only=False")
  assert every["decoder_loss_weights"][0].tolist() == [1] * 5 + [0] * 6
  assert every["decoder_causal_attention"][0].tolist() == [1] * 4 + [0] * 7
