"""mtx.parallel's meshes on the 8 fake CPU devices conftest sets: ICI and DCN shapes."""

import jax
import numpy as np
import pytest

from mtx import parallel
from mtx.errors import UserError


def _ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices)


def test_one_slice_keeps_the_devices_order_on_cpu():
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  np.testing.assert_array_equal(_ids(mesh).ravel(), [d.id for d in jax.devices()])
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_dcn_axes_are_outermost_and_multiply_the_ici_shape():
  """Two slices of 4 devices on "data": devices 0-3 are slice 0, 4-7 slice 1, and
  the data axis runs over slices first, so only data crosses the slow network."""
  mesh = parallel.make_mesh({"fsdp": 2, "data": -1}, dcn_shape={"data": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  ids = _ids(mesh)[:, :, 0]
  np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])
  assert set(ids[:2].ravel()) == {0, 1, 2, 3}  # slice 0 holds data 0 and 1


def test_dcn_shape_must_divide_the_devices():
  with pytest.raises(UserError, match="DCN_MESH_SHAPE"):
    parallel.make_mesh(None, dcn_shape={"data": 3})
  with pytest.raises(UserError, match="Unknown mesh axes"):
    parallel.make_mesh(None, dcn_shape={"slices": 2})
  with pytest.raises(UserError, match="MESH_SHAPE"):
    parallel.make_mesh({"data": 8}, dcn_shape={"data": 2})
