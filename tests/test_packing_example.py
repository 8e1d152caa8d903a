"""mtx.data.packing's worked example (its module docstring), run as written."""

import numpy as np

from mtx.data import packing


def test_docstring_example_packs_two_tasks_into_one_row_with_their_task_ids():
  packer = packing.UnitPacker(rows=1, inputs_length=6, targets_length=5)
  assert packer.try_add(0, np.array([3, 4, 1]), np.array([3, 4, 1]))  # copy
  assert packer.try_add(1, np.array([5, 6, 1]), np.array([6, 1]))  # reverse
  want = {
    "encoder_input_tokens": [[3, 4, 1, 5, 6, 1]],
    "encoder_segment_ids": [[1, 1, 1, 2, 2, 2]],
    "encoder_positions": [[0, 1, 2, 0, 1, 2]],
    "decoder_target_tokens": [[3, 4, 1, 6, 1]],
    "decoder_input_tokens": [[0, 3, 4, 0, 6]],
    "decoder_segment_ids": [[1, 1, 1, 2, 2]],
    "decoder_positions": [[0, 1, 2, 0, 1]],
    "decoder_loss_weights": [[1, 1, 1, 1, 1]],
    "decoder_task_ids": [[0, 0, 0, 1, 1]],
  }
  assert sorted(packer.arrays) == sorted(packing.FEATURES) == sorted(want)
  for name, rows in want.items():
    assert packer.arrays[name].dtype == np.int32, name
    np.testing.assert_array_equal(packer.arrays[name], rows, err_msg=name)
  assert (packer.num_examples, packer.num_target_tokens) == (2, 5)


def test_an_example_that_fits_no_row_is_refused_and_changes_nothing():
  """The unit is full: the docstring's 'that example stays unconsumed'."""
  packer = packing.UnitPacker(rows=1, inputs_length=6, targets_length=5)
  packer.try_add(0, np.array([3, 4, 1]), np.array([3, 4, 1]))
  before = {k: v.copy() for k, v in packer.arrays.items()}
  # The inputs would fit (3 of 6 used); the targets would not (3 + 3 > 5).
  assert not packer.try_add(1, np.array([7, 1]), np.array([7, 8, 1]))
  for name, array in packer.arrays.items():
    np.testing.assert_array_equal(array, before[name], err_msg=name)
  assert packer.num_examples == 1
