"""What an operator reads: a log line per LOG_PERIOD without a terminal, resumes and
evaluations at the default level, a bar that fits, no TensorFlow start-up noise."""

import io
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)
from loop_helpers import tiny_train

from mtx import tf_logs
from mtx.runtime import metrics_writer, model_info, progress
from mtx.train import loop

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _train(model_dir, steps, log_period, **kw):
  return tiny_train(model_dir, steps, log_period=log_period, **kw)


def _progress_lines(caplog):
  return [r.getMessage() for r in caplog.records if r.name == "mtx.progress"]


def test_a_log_line_every_log_period_at_the_default_level(tmp_path, caplog):
  # No caplog.at_level: the root logger stays at WARNING, as under `mtx train`.
  assert not sys.stderr.isatty()
  _train(tmp_path / "r", steps=3, log_period=1)
  lines = _progress_lines(caplog)
  assert lines[0].startswith("Model: ") and "model-info.txt" in lines[0]
  assert (tmp_path / "r" / "model-info.txt").read_text().count("\n") > 10
  lines = [line for line in lines if line.startswith("step")]
  assert [line.split(":")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
  assert "loss " in lines[0] and "(copy " in lines[0] and "rev " in lines[0]
  assert "steps/s" in lines[1] and "tokens/s" in lines[1]  # step 1 is compile time
  assert "ETA" in lines[1] and "ETA" not in lines[2]  # nothing left after the end
  # T5X's metrics: the loss's parts apart (eval reports the plain cross-entropy).
  row = metrics_writer.read_metrics(str(tmp_path / "r"))[-1]
  for task in ("tiny_copy", "tiny_rev"):
    assert row[f"cross_ent_loss/{task}"] < row[f"loss/{task}"]
    assert 0.0 <= row[f"accuracy/{task}"] <= 1.0
  assert 0.0 < row["z_loss"] < row["loss"] - row["cross_ent_loss"] + 1e-6


@pytest.mark.slow  # two runs: ~20 s on 2 idle cores
def test_a_resume_is_logged_at_the_default_level_with_the_data_position(tmp_path, caplog):
  _train(tmp_path / "r", steps=2, log_period=2)
  caplog.clear()
  _train(tmp_path / "r", steps=5, log_period=2)
  lines = [line for line in _progress_lines(caplog) if not line.startswith("Model: ")]
  assert lines[0].startswith("Resumed from step 2 of 5; data position: batch 2; epochs ")
  assert "tiny_copy" in lines[0] and "tiny_rev" in lines[0]
  assert [line.split(":")[0] for line in lines[1:]] == ["step 4/5", "step 5/5"]


def test_log_line_formats_the_period():
  scalars = {
    "loss": 2.3104,
    "loss/glue_cola": 2.0512,
    "loss/glue_sst2": float("nan"),  # absent from the period
    "loss/glue_rte": 2.5,
    "timing/step_s": 0.5,
    "timing/tokens_per_s": 25300.0,
  }
  assert progress.log_line(100, 1000, scalars) == (
    "step 100/1000: loss 2.310 (cola 2.051, rte 2.500); 2.00 steps/s, "
    "25.3k tokens/s, ETA 0:07:30"
  )
  assert progress.task_labels(["a_x", "a_y"]) == ["x", "y"]
  assert progress.task_labels(["copy", "cop"]) == ["copy", "cop"]  # no '_' in common
  assert progress.task_labels(["only_one"]) == ["only_one"]


def test_the_bar_shows_the_task_losses_that_fit_and_counts_the_rest(monkeypatch):
  monkeypatch.setattr(
    progress.shutil, "get_terminal_size", lambda *a: os.terminal_size((120, 24))
  )
  bar = progress.Progress(100, 0, enabled=True, stream=io.StringIO())
  info = {"loss": 1.0, **{f"loss/mix_task{i}": 1.0 + i for i in range(20)}}
  line = bar.line(50, info, now=bar._start_time + 10.0)  # pylint: disable=protected-access
  assert len(line) <= 119
  assert "loss 1.000  task0 1.000  task1 2.000" in line
  shown = sum(f"task{i} " in line for i in range(20))
  assert 0 < shown < 20 and line.endswith(f"+{20 - shown}")


def test_the_bar_advances_every_step_and_clears_for_a_log_line():
  stream = io.StringIO()
  bar = progress.Progress(3, 0, enabled=True, stream=stream)
  bar.update(1, {})
  bar.clear()
  bar.update(2, {})  # right after a clear: drawn again, though < 0.1 s went by
  assert stream.getvalue().count("\r[") == 2 and "\r\x1b[K" in stream.getvalue()


def test_tensorflow_start_up_notices_are_not_printed():
  """Also after a probe for TF that is not its import (etils.epath's, through
  mtx.paths, asks ``find_spec("tensorflow")``)."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = REPO
  code = (
    "import sys, mtx.paths; mtx.paths.exists('/');"
    "import mtx.data.materialize, mtx.runtime.metrics_writer;"
    "import tensorflow as tf; tf.constant(1);"
    "print('kept', file=sys.stderr)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stderr.strip() == "kept", out.stderr[-2000:]


def test_a_user_setting_of_the_tf_log_level_is_kept(monkeypatch):
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
  tf_logs.install()
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
  assert tf_logs.is_noise("I0000 port.cc:153] oneDNN custom operations are on.")
  assert not tf_logs.is_noise("ERROR mtx: something real")


def test_noise_is_filtered_and_the_rest_kept(capfd):
  with tf_logs.filtered_stderr():
    os.write(2, b"W0000 cudart_stub.cc:31] Could not find cuda drivers\nreal line\n")
  assert capfd.readouterr().err == "real line\n"


def _step_metrics(tokens, weights, loss=2.0):
  tokens = np.asarray(tokens, np.float32)
  return {
    "nonfinite": False,
    "task_loss_sums": loss * tokens,
    "task_cross_ent_sums": (loss - 0.5) * tokens,
    "task_z_loss_sums": 0.1 * tokens,
    "task_correct": 0.25 * tokens,
    "task_tokens": tokens,
    "grad_norm": 1.0,
    "group_weights": np.asarray(weights, np.float32),
  }


def test_an_absent_task_is_null_and_weights_average_over_the_steps_it_was_present(
  tmp_path,
):
  # Task c never appears; task b is absent at the period's last step, where the method
  # (PCGrad, say) reports weight 0 for it: its logged weight is its mean when present.
  history = [
    _step_metrics([4, 2, 0], [1.0, 0.5, 0.0]),
    _step_metrics([4, 2, 0], [1.0, 1.5, 0.0]),
    _step_metrics([4, 0, 0], [2.0, 0.0, 0.0]),
  ]
  out = loop._period_metrics(history, ["a", "b", "c"], ["a", "b", "c"])  # pylint: disable=protected-access
  assert out["mtl/weight/a"] == pytest.approx(4 / 3)
  assert out["mtl/weight/b"] == pytest.approx(1.0)
  assert out["loss/b"] == pytest.approx(2.0)
  assert out["cross_ent_loss/a"] == pytest.approx(1.5)
  assert out["accuracy/b"] == pytest.approx(0.25)
  assert out["z_loss"] == pytest.approx(0.1)
  assert math.isnan(out["loss/c"]) and math.isnan(out["mtl/weight/c"])
  with metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(3, out)
  record = json.loads((tmp_path / "metrics.jsonl").read_text())
  for key in ("loss/c", "cross_ent_loss/c", "accuracy/c", "mtl/weight/c"):
    assert key in record and record[key] is None, key
  numeric = [v for k, v in record.items() if not k.endswith("/c")]
  assert all(isinstance(v, (int, float)) for v in numeric)


def test_weights_of_task_groups_use_the_groups_presence():
  # Tasks 0 and 1 form group "g0"; task 2 is "g1", absent at the last step.
  history = [_step_metrics([1, 0, 3], [1.0, 3.0]), _step_metrics([0, 2, 0], [1.0, 0.0])]
  out = loop._period_metrics(history, ["a", "b", "c"], ["g0", "g1"], [0, 0, 1])  # pylint: disable=protected-access
  assert out["mtl/weight/g0"] == pytest.approx(1.0)
  assert out["mtl/weight/g1"] == pytest.approx(3.0)


def test_model_info_summarizes_parameters_bytes_and_shardings(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
  spec = jax.sharding.PartitionSpec
  params = {
    "dense": {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32)},
    "mlp": {"wi": jax.ShapeDtypeStruct((32, 128), np.float32)},
    "norm": {"scale": jax.ShapeDtypeStruct((32,), np.float32)},
  }
  shardings = {
    "dense": {"kernel": jax.sharding.NamedSharding(mesh, spec("fsdp", None))},
    "mlp": {"wi": jax.sharding.NamedSharding(mesh, spec("fsdp", "tensor"))},
    "norm": {"scale": jax.sharding.NamedSharding(mesh, spec())},
  }
  line = model_info.write(str(tmp_path), params, shardings)
  # 2048 + 4096 + 32 = 6176 parameters, 24704 bytes; per device 1024 + 1024 + 32 floats.
  assert line == (
    "Model: 6,176 parameters, 24.1 KiB (float32), 8.1 KiB per device; 2 of 3 arrays "
    f"sharded (fsdp 2, tensor 1); table in {tmp_path / 'model-info.txt'}."
  )
  text = (tmp_path / "model-info.txt").read_text().splitlines()
  assert text[0] == line[len("Model: ") : line.index("; table")]
  assert any(row.startswith("mlp/wi") and "('fsdp', 'tensor')" in row for row in text)
  assert text[-1] == "total parameters: 6,176"


def test_model_info_counts_no_array_sharded_over_axes_of_size_one(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32)}}
  spec = jax.sharding.PartitionSpec("fsdp", "tensor")
  shardings = {"dense": {"kernel": jax.sharding.NamedSharding(mesh, spec)}}
  line = model_info.summary(params, shardings)
  assert line.endswith("8.0 KiB per device; 0 of 1 arrays sharded")
