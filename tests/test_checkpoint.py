"""Tests for mtx.runtime.checkpoint: round trip, retention, damage, load_params."""

import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtx.errors import UserError
from mtx.runtime import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
  params = {
    "enc": {"w": jnp.arange(12.0).reshape(4, 3) + seed, "scale": jnp.ones(3)},
    "emb": jnp.full((5, 3), seed, jnp.bfloat16),
  }
  tx = optax.adamw(1e-3)
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.asarray(seed, jnp.int32),
    "rng": jax.random.key(seed),
  }


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
  )


def _assert_same(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, keep=5):
  ckpt = checkpoint.Checkpointer(directory, save_period=1, keep=keep)
  for step in steps:
    assert ckpt.save(step, _state(step), {"position": step * 10})
  ckpt.wait()
  return ckpt


def test_round_trip_with_data_state(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=10)
  assert ckpt.restore(_abstract(_state())) is None
  assert ckpt.latest_step() is None
  state = _state(3)
  assert ckpt.save(10, state, {"position": [1, 2], "epoch": 0, "name": "x"})
  ckpt.wait()
  assert ckpt.latest_step() == 10
  step, restored, data_state = ckpt.restore(_abstract(state))
  assert step == 10
  assert data_state == {"position": [1, 2], "epoch": 0, "name": "x"}
  _assert_same(restored, state)
  assert restored["params"]["enc"]["w"].sharding == jax.sharding.SingleDeviceSharding(
    jax.devices()[0]
  )
  ckpt.close()
  # A new Checkpointer (a restarted run) sees the same checkpoint.
  with checkpoint.Checkpointer(str(tmp_path), save_period=10) as again:
    assert again.restore(_abstract(state))[0] == 10


def test_save_period_force_and_existing_step(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=2)
  state = _state()
  assert not ckpt.save(3, state, {})
  assert ckpt.save(4, state, {})
  assert ckpt.save(5, state, {}, force=True)
  assert not ckpt.save(5, state, {}, force=True)  # Already saved: no error, no-op.
  ckpt.wait()
  assert ckpt.all_steps() == [4, 5]
  with pytest.raises(ValueError, match="JSON"):
    ckpt.save(6, state, {"bad": object()})
  ckpt.close()
  never = checkpoint.Checkpointer(str(tmp_path / "b"), save_period=0)
  assert not never.save(100, state, {})
  never.close()


def test_keeps_the_last_n(tmp_path):
  ckpt = _save_steps(str(tmp_path), [1, 2, 3, 4], keep=2)
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  ckpt.close()


def test_async_save_is_final_after_wait(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1, async_save=True)
  big = {"params": {"w": jnp.ones((512, 512))}}
  assert ckpt.save(1, big, {"position": 1})
  ckpt.wait()
  assert os.path.exists(tmp_path / "1" / "commit_success.txt")
  assert not glob.glob(str(tmp_path / "*tmp*"))
  step, restored, _ = ckpt.restore(_abstract(big))
  assert step == 1 and float(restored["params"]["w"].sum()) == 512 * 512
  ckpt.close()


def _truncate_data_files(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 2)


def _remove_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, "commit_success.txt"))


def _truncate_json(step_dir):
  with open(os.path.join(step_dir, "data_state", "metadata"), "w") as f:
    f.write('{"position": 3')


def _truncate_tree_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
    f.truncate(20)


def _remove_state_dir(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


# A failed tensorstore read leaves a callback on orbax's closed event loop; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "damage",
  [
    _truncate_data_files,
    _remove_commit_marker,
    _truncate_json,
    _truncate_tree_metadata,
    _remove_state_dir,
  ],
)
def test_damaged_latest_falls_back_to_previous_with_warning(tmp_path, caplog, damage):
  _save_steps(str(tmp_path), [1, 2, 3]).close()
  damage(str(tmp_path / "3"))
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1)
  with caplog.at_level(logging.WARNING):
    step, restored, data_state = ckpt.restore(_abstract(_state()))
  assert step == 2 and data_state == {"position": 20}
  _assert_same(restored, _state(2))
  assert any("Skipping checkpoint step 3" in r.getMessage() for r in caplog.records)
  # The damaged step is kept aside, and training can save step 3 again.
  assert os.path.isdir(tmp_path / "3.corrupt")
  assert ckpt.save(3, _state(33), {"position": 33})
  ckpt.wait()
  assert ckpt.restore(_abstract(_state()))[2] == {"position": 33}
  ckpt.close()


def test_interrupted_save_leftovers_are_not_steps(tmp_path):
  _save_steps(str(tmp_path), [1]).close()
  # What a save killed before its final rename leaves behind.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234567")
  os.remove(tmp_path / "2.orbax-checkpoint-tmp-1234567" / "commit_success.txt")
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1)
  assert ckpt.latest_step() == 1
  assert ckpt.restore(_abstract(_state()))[0] == 1
  ckpt.close()


def test_killed_during_async_save_restores_a_complete_step(tmp_path):
  script = textwrap.dedent(f"""
      import os, jax.numpy as jnp
      from mtx.runtime import checkpoint
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, save_period=1)
      ckpt.save(1, {{"w": jnp.full((256, 256), 1.0)}}, {{"position": 1}})
      ckpt.wait()
      ckpt.save(2, {{"w": jnp.full((256, 256), 2.0)}}, {{"position": 2}})
      os._exit(9)  # Killed while the async save runs.
  """)
  subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    check=False,
    capture_output=True,
    timeout=120,
  )
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=sharding)}
  step, restored, data_state = ckpt.restore(abstract)
  assert step in (1, 2)  # Whichever finished, but never a partial one.
  assert data_state == {"position": step}
  np.testing.assert_array_equal(restored["w"], np.full((256, 256), float(step)))
  ckpt.close()


def test_explicit_step_and_all_damaged(tmp_path):
  ckpt = _save_steps(str(tmp_path), [1, 2])
  assert ckpt.restore(_abstract(_state()), step=1)[2] == {"position": 10}
  with pytest.raises(UserError, match=r"step 7 is not in .*\[1, 2\]"):
    ckpt.restore(_abstract(_state()), step=7)
  _truncate_json(str(tmp_path / "1"))
  with pytest.raises(UserError, match="step 1 .* unusable"):
    ckpt.restore(_abstract(_state()), step=1)
  _truncate_json(str(tmp_path / "2"))
  with pytest.raises(UserError, match="No usable checkpoint"):
    ckpt.restore(_abstract(_state()))
  ckpt.close()


def test_state_that_does_not_fit_is_a_user_error_not_corruption(tmp_path):
  ckpt = _save_steps(str(tmp_path), [1])
  other = _state()
  other["params"]["enc"]["w"] = jnp.zeros((8, 3))
  with pytest.raises(UserError, match=r"params/enc/w.*\(4, 3\).*\(8, 3\)"):
    ckpt.restore(_abstract(other))
  assert os.path.isdir(tmp_path / "1")  # Not quarantined.
  ckpt.close()


def test_unwritable_directory_is_a_user_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(UserError, match="MODEL_DIR .* is not writable"):
    checkpoint.Checkpointer(str(blocker / "run"), save_period=1)
  if os.geteuid() != 0:  # root writes anywhere.
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
      checkpoint.Checkpointer(str(read_only), save_period=1)


def test_load_params_from_run_dir_and_step_dir(tmp_path):
  _save_steps(str(tmp_path), [1, 2]).close()
  abstract = _abstract(_state())["params"]
  _assert_same(checkpoint.load_params(str(tmp_path), abstract), _state(2)["params"])
  _assert_same(checkpoint.load_params(str(tmp_path / "1"), abstract), _state(1)["params"])
  _assert_same(
    checkpoint.load_params(str(tmp_path / "1" / "state"), abstract), _state(1)["params"]
  )


def test_load_params_casts_floats_and_leaves_out_lora_adapters_only_when_asked(tmp_path):
  """A run's bfloat16 params (``train.frozen_dtype``) load into a float32 model and back;
  a LoRA run's adapters are left out when the model has none only with skip_adapters
  (its base read on purpose), and refused otherwise (they would be dropped silently)."""
  state = _state(1)
  state["params"]["enc"]["w_lora_a"] = jnp.ones((4, 2))
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, state, {}, force=True)
  ckpt.close()
  want = _state(1)["params"]
  as_f32 = dict(want, emb=jnp.zeros((5, 3), jnp.float32))
  with pytest.raises(UserError, match=r"holds LoRA adapters .*'enc/w_lora_a'.*lora\.gin"):
    checkpoint.load_params(str(tmp_path), _abstract(as_f32))
  got = checkpoint.load_params(str(tmp_path), _abstract(as_f32), skip_adapters=True)
  assert got["emb"].dtype == jnp.float32 and "w_lora_a" not in got["enc"]
  np.testing.assert_array_equal(np.asarray(got["emb"]), np.ones((5, 3), np.float32))
  _assert_same(got["enc"], want["enc"])


def test_load_params_is_strict(tmp_path):
  _save_steps(str(tmp_path), [1]).close()
  params = _state()["params"]
  wrong_shape = dict(params, enc={"w": jnp.zeros((4, 5)), "scale": jnp.ones(3)})
  with pytest.raises(UserError, match=r"'params/enc/w' has shape \(4, 3\).*\(4, 5\)"):
    checkpoint.load_params(str(tmp_path), _abstract(wrong_shape))
  wrong_dtype = dict(params, emb=jnp.zeros((5, 3), jnp.int32))
  with pytest.raises(UserError, match=r"'params/emb'.*bfloat16.*int32"):
    checkpoint.load_params(str(tmp_path), _abstract(wrong_dtype))
  extra = dict(params, dec=jnp.zeros(2))
  with pytest.raises(UserError, match=r"'params/dec' \(shape \(2,\)\) is missing"):
    checkpoint.load_params(str(tmp_path), _abstract(extra))
  fewer = {"enc": params["enc"]}
  with pytest.raises(UserError, match=r"checkpoint has 'params/emb'"):
    checkpoint.load_params(str(tmp_path), _abstract(fewer))
  with pytest.raises(UserError, match="does not exist"):
    checkpoint.load_params(str(tmp_path / "nope"), _abstract(params))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds no finished checkpoint"):
    checkpoint.load_params(str(tmp_path / "empty"), _abstract(params))


def test_restore_onto_a_different_mesh_sharding(tmp_path):
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from mtx.runtime import checkpoint
      assert jax.device_count() == 2
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rows = NamedSharding(mesh, P("data", None))
      cols = NamedSharding(mesh, P(None, "data"))
      w = jax.device_put(jnp.arange(32.0).reshape(4, 8), rows)
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, save_period=1)
      ckpt.save(1, {{"params": {{"w": w}}}}, {{"hosts": [0]}})
      ckpt.wait()
      for sharding in (cols, NamedSharding(mesh, P())):
        abstract = {{"params": {{"w": jax.ShapeDtypeStruct((4, 8), jnp.float32,
                                                          sharding=sharding)}}}}
        step, state, data = ckpt.restore(abstract)
        got = state["params"]["w"]
        assert got.sharding == sharding, got.sharding
        np.testing.assert_array_equal(np.asarray(got), np.arange(32.0).reshape(4, 8))
      params = checkpoint.load_params({str(tmp_path)!r}, abstract["params"])
      assert params["w"].sharding == abstract["params"]["w"].sharding
      ckpt.close()
      print("OK")
  """)
  env = dict(
    os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
  )
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---- faults while saving -----------------------------------------------------------------
def test_save_refuses_a_nonfinite_state(tmp_path):
  ckpt = _save_steps(str(tmp_path), [1])
  bad = _state(2)
  bad["params"]["enc"]["w"] = bad["params"]["enc"]["w"].at[1, 2].set(jnp.nan)
  bad["opt_state"][0].mu["emb"] = jnp.full((5, 3), jnp.inf, jnp.bfloat16)
  with pytest.raises(
    checkpoint.NonFiniteStateError,
    match=r"step 2 .*opt_state/0/mu/emb, params/enc/w hold NaN or Inf "
    r"\(the newest intact checkpoint is step 1\)",
  ):
    ckpt.save(2, bad, {"position": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
  ckpt.close()


def test_failed_async_save_names_the_step_and_keeps_the_previous_one(
  tmp_path, monkeypatch
):
  """A save that fails in the background (here: ENOSPC at the commit) is reported by
  the next save, wait or close as a CheckpointWriteError; older steps survive even
  with keep=1, and the next run restores them and clears the leftovers."""
  import errno

  from orbax.checkpoint._src.path import atomicity

  ckpt = _save_steps(str(tmp_path), [1], keep=1)
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def no_space(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", no_space)
  assert ckpt.save(2, _state(2), {"position": 20})  # Returns: the write is async.
  with pytest.raises(
    checkpoint.CheckpointWriteError,
    match=r"checkpoint step 2 .*No space left on device.*newest "
    r"intact checkpoint is step 1",
  ):
    ckpt.wait()
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)
  ckpt.close()
  again = checkpoint.Checkpointer(str(tmp_path), save_period=1, keep=1)
  step, restored, data_state = again.restore(_abstract(_state()))
  assert step == 1 and data_state == {"position": 10}
  _assert_same(restored, _state(1))
  assert again.save(2, _state(2), {"position": 20})
  again.close()
  assert sorted(os.listdir(tmp_path)) == ["2"]


def test_save_into_a_directory_that_went_away(tmp_path):
  run = tmp_path / "run"
  ckpt = checkpoint.Checkpointer(str(run), save_period=1)
  shutil.rmtree(run)
  run.write_text("a file where the directory was")
  with pytest.raises(
    checkpoint.CheckpointWriteError,
    match=r"checkpoint step 1 to .*run \(.*\); no intact checkpoint",
  ):
    ckpt.save(1, _state(1), {})
    ckpt.wait()
