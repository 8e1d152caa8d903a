"""The command line before any work: --help, and gin mistakes reported before JAX and
TensorFlow are imported (a fraction of a second instead of the seconds they take)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DIR = "--gin.MODEL_DIR='/nonexistent/mtx_test_run'"  # never created: each case fails

# Runs `mtx ARGS` in a fresh interpreter and reports the exit status, the message and
# whether JAX or TensorFlow were imported by then.
_PROBE = """
import sys
from mtx.cli import main
try:
  main.main(sys.argv[1:])
except SystemExit as e:
  heavy = sorted(m for m in ("jax", "tensorflow", "seqio") if m in sys.modules)
  print("STATUS", e.code, "HEAVY", ",".join(heavy) or "-")
"""


def _probe(*args):
  done = subprocess.run(
    [sys.executable, "-c", _PROBE, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  status_line = done.stdout.strip().splitlines()[-1]
  return status_line, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


@pytest.mark.parametrize(
  "args,pattern",
  [
    (["--gin_file=nonexistent.gin"], "nonexistent.gin was not found"),
    (["--gin_file=mtl/pcgard.gin"], "did you mean: mtl/pcgrad.gin"),
    (["--gin_file=tests/tiny.gin", "--gin.MODEL_DIR=/tmp/x"], "strings need quotes"),
    (["--gin_file=gin_configs/runs/train.gin"], "Required setting"),
    (
      ["--gin_file=tests/tiny.gin", _DIR, "--gin.TRAIN_STEP=3"],
      "did you mean: TRAIN_STEPS",
    ),
    (
      ["--gin_file=tests/tiny.gin", _DIR, "--gin.model.T5Config.num_layer=2"],
      "'num_layer'.*did you mean: .*num_encoder_layers",
    ),
    (
      ["--gin_file=tests/tiny.gin", _DIR, "--gin_bindings=train.seed = %NO_SUCH_MACRO"],
      "Macro %NO_SUCH_MACRO is used but never defined",
    ),
  ],
)
def test_gin_mistakes_are_reported_before_jax_is_imported(args, pattern):
  import re

  status, err = _probe("train", *args)
  assert status == "STATUS 2 HEAVY -", (status, err)
  assert err.startswith("mtx: error: ") and re.search(pattern, err), err


def test_the_parameter_manifest_matches_the_registered_configurables():
  """mtx/cli/configurables.json (what the first look checks flags against) lists
  every registered configurable's parameters; regenerate it with
  `python -m mtx.cli.gin_check` when this fails."""
  import io
  import json

  from mtx.cli import configurables, gin_check

  out = io.StringIO()
  gin_check.write_manifest(configurables.NAMES, out)
  with open(gin_check.MANIFEST, encoding="utf-8") as f:
    assert json.load(f) == json.loads(out.getvalue())


def test_help_explains_gin_flags_and_the_required_macros():
  done = subprocess.run(
    [sys.executable, "-m", "mtx", "train", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert done.returncode == 0, done.stderr
  text = done.stdout
  assert "--gin.NAME=VALUE" in text and "strings need" in text
  assert (
    "train    MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS, MODEL_DIR" in text
  )
  assert "infer    MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, MODEL_DIR" in text


def _mtx(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", "mtx", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")])),
  )


def _own_lines(stderr):
  """stderr without TensorFlow's and XLA's C++ start-up notices."""
  noise = ("WARNING: All log messages", "I0000", "E0000", "W0000")
  return [
    line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)
  ]


@pytest.mark.slow
def test_initial_checkpoint_error_exits_cleanly(tmp_path):
  """An INITIAL_CHECKPOINT_PATH of another model: one line, exit 2, and orbax shut
  down before the interpreter (no 'cannot schedule new futures' traceback after it)."""
  base = tmp_path / "base"
  done = _mtx("train", "--gin_file=tests/tiny.gin", f"--gin.MODEL_DIR='{base}'",
              "--gin.TRAIN_STEPS=1")  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  done = _mtx("train", "--gin_file=tests/tiny.gin", f"--gin.MODEL_DIR='{tmp_path}/new'",
              f"--gin.INITIAL_CHECKPOINT_PATH='{base}'",
              "--gin.model.T5Config.mlp_dim=96")  # fmt: skip
  lines = _own_lines(done.stderr)
  assert done.returncode == 2, done.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("mtx: error: INITIAL_CHECKPOINT_PATH"), (
    lines
  )
  assert not (tmp_path / "new").exists()
