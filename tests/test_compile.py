"""`mtx compile`: the train step compiled for a mesh, abstractly, with its memory."""

import os
import re
import subprocess
import sys
import time

import gin
import psutil
import pytest

from mtx.cli import main as cli
from mtx.train import compile as compile_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
MESH = "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _gib(text, row):
  value, unit = re.search(rf"{re.escape(row)}\s+([\d.]+) (GiB|MiB|KiB)", text).groups()
  return float(value) * {"GiB": 1.0, "MiB": 2**-10, "KiB": 2**-20}[unit]


def test_tiny_step_compiles_on_a_mesh_and_does_not_fit_a_tiny_device(
  clean_gin, capsys, monkeypatch
):
  monkeypatch.syspath_prepend(TESTS)
  status = cli.run(
    [
      "compile",
      "--gin_file=tests/tiny.gin",
      "--gin_file=runs/compile.gin",
      "--gin_file=mtl/pcgrad.gin",
      "--gin.COMPILE_NUM_DEVICES=8",
      MESH,
      "--gin.COMPILE_DEVICE_MEMORY_GIB=0.0001",
      # 'auto' would take the Gramian route: the stacks exceed a quarter of 0.1 MiB.
      "--gin.train.task_grads_route='stacks'",
    ]
  )
  out, err = capsys.readouterr()
  assert "8 devices (mesh data=2, fsdp=2, tensor=2)" in out
  assert "per-task route 'stacks' over 2 groups" in out
  for row in (
    "parameters",
    "optimizer state",
    "per-task gradients (2 x params / data)",
    "other activations/temporaries",
    "total",
  ):
    assert row in out, row
  # AdamW keeps two moments of every (f32) parameter; the step keeps 2 gradient
  # copies, split over the data axis as well as the params' own (data=2).
  params = _gib(out, "parameters")
  assert params > 0
  assert _gib(out, "optimizer state") == pytest.approx(2 * params, rel=0.05)
  assert _gib(out, "per-task gradients (2 x params / data)") == pytest.approx(
    2 * params / 2, rel=0.05
  )
  assert "XLA FLOPs per device per step: " in out and "compile" in out
  assert "does not fit" in out
  assert status == 1 and err.startswith("mtx: error: The train step needs")
  assert len(err.strip().splitlines()) == 1


def test_report_fits_when_memory_is_enough():
  report = compile_lib.CompileReport(
    mesh_shape={"data": 1},
    num_devices=1,
    num_params=1,
    model="m",
    route="r",
    bytes={
      "params": 4,
      "optimizer": 8,
      "mtl": 0,
      "batch": 1,
      "groups": 0,
      "task_grads": 0,
      "other_temp": 10,
      "unaliased_output": 0,
      "code": 0,
      "total": 23,
    },
    device_memory=1024,
    lower_s=0.0,
    compile_s=0.0,
    flops=1.0,
  )
  assert report.fits and "fits (2% used)" in str(report)


def test_the_memory_column_has_one_unit():
  gib, mib = 2**30, 2**20
  nbytes = {
    "params": 3 * gib,
    "optimizer": 6 * gib,
    "mtl": 0,
    "batch": 2 * mib,
    "groups": 2,
    "task_grads": 6 * gib,
    "other_temp": 512 * mib,
    "unaliased_output": 0,
    "code": 3 * mib,
  }
  nbytes["total"] = sum(v for k, v in nbytes.items() if k != "groups")
  report = compile_lib.CompileReport(
    mesh_shape={"data": 1},
    num_devices=1,
    num_params=1,
    model="m",
    route="r",
    bytes=nbytes,
    device_memory=None,
    lower_s=0.0,
    compile_s=0.0,
    flops=None,
  )
  rows = [line for line in str(report).splitlines() if line.startswith("  ")]
  assert len(rows) == 9 and all(line.endswith(" GiB") for line in rows)
  assert any(line.split()[-2] == "0.003" for line in rows if "generated code" in line)
  assert any(line.split()[-2] == "0.500" for line in rows if "activations" in line)


@pytest.mark.slow
def test_base_model_compiles_without_allocating_its_parameters():
  """T5-base's f32 state with AdamW is ~2.2 GiB; compiling must not hold it.

  Layers are scanned: the CPU compiler's own memory grows with unrolled layers (about
  0.15 GiB per layer here), which would blur what this test looks at.
  """
  cmd = [
    sys.executable,
    "-m",
    "mtx",
    "compile",
    "--gin_file=tests/tiny.gin",
    "--gin_file=models/base.gin",
    "--gin_file=runs/compile.gin",
    "--gin.COMPILE_NUM_DEVICES=4",
    "--gin.MESH_SHAPE={'fsdp': 4}",
    "--gin.BATCH_SIZE=8",
    "--gin.model.T5Config.scan_layers=True",
  ]
  env = dict(os.environ, PYTHONPATH=TESTS, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # the command chooses its devices itself
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  peak, ps = 0, psutil.Process(proc.pid)
  while proc.poll() is None:
    try:
      peak = max(peak, ps.memory_info().rss)
    except psutil.NoSuchProcess:
      break
    time.sleep(0.05)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  assert "for 4 devices (mesh data=1, fsdp=4, tensor=1)" in out
  assert "198,819,072 parameters" in out
  state_gib = 4 * (_gib(out, "parameters") + _gib(out, "optimizer state"))  # 4 devices
  assert state_gib > 2.0, out
  # Python, TensorFlow and JAX take ~0.9 GiB; had the state been allocated, the peak
  # would be above that plus state_gib.
  assert 0 < peak / 2**30 < state_gib, (peak, out)


@pytest.mark.slow  # four compiles of the tiny step on 8 devices
def test_compare_routes_prints_plain_stacks_and_gramian(clean_gin, capsys, monkeypatch):
  """COMPILE_COMPARE_ROUTES: the run's route and the memory of the other two steps;
  the Gramian route holds no per-task gradient stacks."""
  monkeypatch.syspath_prepend(TESTS)
  status = cli.run(
    [
      "compile",
      "--gin_file=tests/tiny.gin",
      "--gin_file=runs/compile.gin",
      "--gin_file=mtl/pcgrad.gin",
      "--gin.COMPILE_NUM_DEVICES=8",
      MESH,
      "--gin.COMPILE_COMPARE_ROUTES=True",
      "--gin.train.task_grads_route='gramian'",
    ]
  )
  out = capsys.readouterr().out
  assert status == 0
  assert "per-task route 'gramian' over 2 groups" in out
  assert "per-task gradients (0 x params / data)" in out
  for route in ("gramian (this run)", "plain (sum of losses)", "stacks"):
    assert f"  route {route}: " in out and "per device" in out, route
