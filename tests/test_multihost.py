"""Several processes (JAX's multi-controller runtime over loopback, gloo collectives).

The slow test starts ``mtx train`` as 2 processes with 4 fake CPU devices each, and as
1 process with 8 devices reading both data shards; the fast ones check the data
sharding that makes the two agree, in one process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)

from mtx import parallel
from mtx.data import pipeline

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
MESH = "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}"
LENGTHS = {"inputs": 16, "targets": 16}


# ---- in one process: data shards --------------------------------------------------
def _load(layout, **kw):
  return pipeline.load("tiny", LENGTHS, layout, seed=1, **kw)


@pytest.mark.parametrize("units", [0, 4])
def test_one_process_reading_two_shards_builds_what_two_processes_build(units):
  layout = pipeline.Layout(8, units, 16, 16)
  both = _load(layout, num_shards=2)
  halves = [_load(layout, process_index=i, process_count=2) for i in range(2)]
  assert both.get_state()["shards"].keys() == {"0", "1"}
  for _ in range(6):
    got = both.next_batch()
    parts = [h.next_batch() for h in halves]
    for key in got:
      np.testing.assert_array_equal(
        got[key], np.concatenate([p[key] for p in parts]), err_msg=key
      )
  # Each half read only its shard; together they read every example once.
  for name in ("tiny_copy", "tiny_rev"):
    counts = [
      h.get_state()["shards"][str(i)]["examples"][name] for i, h in enumerate(halves)
    ]
    assert sum(counts) == 64 and min(counts) > 0, counts
  if units:  # Shard 1's head start: every global batch holds both tasks.
    fresh = _load(layout, num_shards=2)
    for _ in range(12):
      assert set(fresh.next_batch()["unit_task"].tolist()) == {0, 1}


def test_data_position_restores_across_process_counts_and_resplits_otherwise(caplog):
  layout = pipeline.Layout(8, 4, 16, 16)
  halves = [_load(layout, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    for h in halves:
      h.next_batch()
  saved = pipeline.merge_states([h.get_state() for h in halves])
  # Same shards in one process: exactly the batches the two processes go on with.
  one = _load(layout, num_shards=2)
  one.set_state(saved)
  got = one.next_batch()
  want = [h.next_batch() for h in halves]
  np.testing.assert_array_equal(
    got["decoder_target_tokens"],
    np.concatenate([w["decoder_target_tokens"] for w in want]),
  )
  # One shard now: the examples consumed so far carry over (epochs go on), with a warning.
  single = _load(layout)
  single.set_state(saved)
  assert "data shards" in caplog.text
  consumed = {
    n: sum(s["cursors"][n] for s in saved["shards"].values())
    for n in ("tiny_copy", "tiny_rev")
  }
  assert single.get_state()["cursors"] == consumed


def test_batch_blocks_of_processes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert parallel.batch_block(mesh) == (0, 1)
  # 4 processes, tensor parallelism across pairs: a pair reads the same shard.
  assert parallel.row_blocks({0: {0}, 1: {0}, 2: {1}, 3: {1}}) == {
    0: (0, 2),
    1: (0, 2),
    2: (1, 2),
    3: (1, 2),
  }
  assert parallel.row_blocks({0: {0, 1}, 1: {2, 3}}) == {0: (0, 2), 1: (1, 2)}
  with pytest.raises(Exception, match="contiguous"):
    parallel.row_blocks({0: {0, 2}, 1: {1, 3}})


# ---- two processes ----------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(
    os.environ,
    PYTHONPATH=TESTS,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )


def _command(model_dir, steps, *extra):
  return [
    sys.executable,
    "-m",
    "mtx",
    "train",
    "--gin_file=tests/tiny.gin",
    "--gin_file=mtl/pcgrad.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.TRAIN_STEPS={steps}",
    MESH,
    "--verbose",
    *extra,
  ]


def _start_two(model_dir, steps):
  """2 processes x 4 devices, one data shard each."""
  port = _free_port()
  return [
    subprocess.Popen(
      _command(
        model_dir,
        steps,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]


def _start_one(model_dir, steps):
  """1 process x 8 devices reading both data shards."""
  return [
    subprocess.Popen(
      _command(model_dir, steps, "--gin_bindings=train.data_shards=2"),
      cwd=REPO,
      env=_env(8),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
  ]


def _finish(*groups) -> list:
  """Waits for every process; returns their outputs, one list per group."""
  outs = []
  try:
    for group in groups:
      outs.append([p.communicate(timeout=900)[0] for p in group])
  finally:
    for group in groups:
      for p in group:
        if p.poll() is None:
          p.kill()
  for group, out in zip(groups, outs):
    for p, text in zip(group, out):
      assert p.returncode == 0, text[-3000:]
  return outs


def _losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return np.array(
    [[r["step"], r["loss"], r["loss/tiny_copy"], r["loss/tiny_rev"]] for r in rows]
  )


def _data_state(model_dir, step):
  with open(
    os.path.join(model_dir, str(step), "data_state", "metadata"), encoding="utf-8"
  ) as f:
    return json.load(f)


def _params(model_dir, step):
  """A checkpoint's params on one device (whatever topology saved them)."""
  path = os.path.join(model_dir, str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
    ckptr.metadata(path).item_metadata,
  )
  return jax.tree.map(np.asarray, ckptr.restore(path, target)["params"])


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  # tests/tiny.gin checkpoints every 4 steps.
  out_two, _ = _finish(_start_two(two, 8), _start_one(one, 4))

  # The same losses as one process with the same mesh and data shards.
  a, b = _losses(two), _losses(one)
  np.testing.assert_array_equal(a[:, 0], np.arange(1, 9))
  np.testing.assert_allclose(a[:4], b, rtol=1e-5)

  # Each process read only its own shard (half of each task's 64 examples).
  procs = _data_state(two, 8)["processes"]
  for i, proc in enumerate(procs):
    assert list(proc["shards"]) == [str(i)]
    assert proc["shards"][str(i)]["examples"] == {"tiny_copy": 32, "tiny_rev": 32}
    assert f"Data shard(s) [{i}] of 2 read here" in out_two[i]
  assert _data_state(one, 4)["processes"][0]["shards"].keys() == {"0", "1"}

  # 2-process checkpoint -> 1 process, and 1-process checkpoint -> 2 processes: both
  # continue exactly as the 2-process run went on.
  from_two = tmp_path / "from_two"
  shutil.copytree(two, from_two)
  shutil.rmtree(from_two / "8")
  _finish(_start_one(from_two, 8), _start_two(one, 8))
  for resumed in (from_two, one):
    np.testing.assert_allclose(_losses(resumed), a, rtol=1e-5, err_msg=str(resumed))
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
      _params(resumed, 8),
      _params(two, 8),
    )
