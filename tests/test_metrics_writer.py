"""Tests for mtx.runtime.metrics_writer and mtx.runtime.progress."""

import io
import json
import math
import os

import numpy as np
import pytest

from mtx.runtime import metrics_writer
from mtx.runtime.progress import Progress


def _lines(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return f.read().splitlines()


def test_write_appends_one_json_object_per_step(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(10, {"loss": np.float32(2.5), "loss/cola": 1.25, "tokens": np.int64(7)})
  writer.write(20, {"loss": 2.0, "learning_rate": 0.01})
  writer.close()
  lines = _lines(tmp_path)
  assert [json.loads(line) for line in lines] == [
    {"step": 10, "loss": 2.5, "loss/cola": 1.25, "tokens": 7},
    {"step": 20, "loss": 2.0, "learning_rate": 0.01},
  ]


def test_non_finite_values_are_null_and_read_back_as_nan(tmp_path):
  # null keeps every column numeric for pandas and jq (a "NaN" string would not).
  with metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"a": float("nan"), "b": float("inf"), "c": -np.inf, "d": 1.0})
  line = _lines(tmp_path)[0]
  assert line == '{"step": 1, "a": null, "b": null, "c": null, "d": 1.0}'
  (record,) = metrics_writer.read_metrics(str(tmp_path))
  assert all(math.isnan(record[k]) for k in "abc") and record["d"] == 1.0


def test_strings_of_older_files_are_still_read_as_floats(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1, "a": "NaN", "b": "Infinity", "c": "-Infinity"}\n'
  )
  (record,) = metrics_writer.read_metrics(str(tmp_path))
  assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_read_metrics_skips_a_truncated_last_line_and_writer_repairs_it(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
  assert metrics_writer.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 3.0}]
  with metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(2, {"loss": 2.0})
  assert metrics_writer.read_metrics(str(tmp_path)) == [
    {"step": 1, "loss": 3.0},
    {"step": 2, "loss": 2.0},
  ]
  assert metrics_writer.read_metrics(str(tmp_path / "missing")) == []


def test_truncate_after_keeps_steps_up_to_the_restored_one(tmp_path):
  with metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (100, 200, 300, 400):
      writer.write(step, {"loss": 1.0 / step})
  metrics_writer.truncate_after(str(tmp_path), 200)
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [100, 200]
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # No temporary file left.
  with metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(300, {"loss": 0.5})
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [
    100,
    200,
    300,
  ]
  metrics_writer.truncate_after(str(tmp_path / "missing"), 5)  # No file: no-op.


def test_non_primary_writes_nothing(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path / "run"), is_primary=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()


def test_tensorboard_events_are_written(tmp_path):
  with metrics_writer.MetricsWriter(str(tmp_path)) as writer:
    writer.write(5, {"loss/cola": 1.5})
  events = os.listdir(tmp_path / "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in events)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  values = []
  for name in events:
    path = str(tmp_path / "tensorboard" / name)
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        values.append((event.step, value.tag, value.simple_value))
  assert values == [(5, "loss/cola", 1.5)]


def test_progress_line_shows_steps_rate_eta_and_losses():
  stream = io.StringIO()
  progress = Progress(total_steps=100, start_step=0, enabled=True, stream=stream)
  start = progress._start_time  # pylint: disable=protected-access
  line = progress.line(50, {"loss/cola": 1.23456}, now=start + 10.0)
  assert "50/100" in line and "5.0 steps/s" in line and "ETA 0:00:10" in line
  assert "cola 1.235" in line
  progress.update(100, {"loss": 1.0})
  progress.close()
  assert stream.getvalue().startswith("\r[") and stream.getvalue().endswith("\n")


def test_progress_disabled_writes_nothing():
  stream = io.StringIO()
  progress = Progress(total_steps=10, start_step=0, enabled=False, stream=stream)
  progress.update(5, {"loss": 1.0})
  progress.close()
  assert stream.getvalue() == ""
  assert Progress(10, 0, stream=stream).enabled is False  # StringIO is not a tty.


def test_tensorboard_reads_the_losses_as_scalars(tmp_path):
  event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
  )
  with metrics_writer.MetricsWriter(str(tmp_path)) as writer:
    writer.write(10, {"loss": 2.5, "loss/cola": 2.0, "loss/rte": float("nan")})
    writer.write(20, {"loss": 2.25, "loss/cola": 1.75, "loss/rte": 3.0})
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  scalars = events.Tags()["scalars"]
  assert {"loss", "loss/cola", "loss/rte"} <= set(scalars)
  read = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in scalars}
  assert read["loss"] == [(10, 2.5), (20, 2.25)]
  assert read["loss/cola"] == [(10, 2.0), (20, 1.75)]
  assert read["loss/rte"] == [(20, 3.0)]  # absent at step 10: no point, not NaN
