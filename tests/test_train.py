"""The trainer: sharding equivalence, per-task losses, exact resume, SIGTERM, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)
from mtx import mtl
from mtx.model import T5Config
from mtx.train import loop, metrics_writer, optim

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TINY = T5Config(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                num_decoder_layers=1)


def _train(model_dir, devices, mesh_shape=None, transforms=(), steps=4, **kw):
  kw.setdefault("batch_size", 8)
  return loop.train(
      model_dir=str(model_dir), mixture_or_task_name="tiny",
      task_feature_lengths={"inputs": 16, "targets": 16}, train_steps=steps,
      model_config=TINY, mtl_transforms=transforms,
      optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
      learning_rate=1e-3, mesh_shape=mesh_shape, log_period=1, checkpoint_period=0,
      devices=devices, print_param_table=False, tensorboard=False, **kw)


def _losses(model_dir):
  rows = metrics_writer.read_metrics(str(model_dir))
  return np.array([[r["loss"], r["loss/tiny_copy"], r["loss/tiny_rev"]] for r in rows])


def _final_params(model_dir):
  steps = sorted(int(p) for p in os.listdir(model_dir) if p.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(model_dir, str(steps[-1]), "state"))
  return jax.tree.map(np.asarray, tree["params"])


@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_sharded_mesh_matches_one_device(tmp_path, method):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  transforms = (mtl.pcgrad(),) if method == "pcgrad" else ()
  # The same units on both meshes, so both see the same task-major batches.
  one = _train(tmp_path / "one", jax.devices()[:1], transforms=transforms, units=4)
  many = _train(tmp_path / "many", jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2},
                transforms=transforms, units=4)
  assert one.step == many.step == 4
  np.testing.assert_allclose(_losses(tmp_path / "many"), _losses(tmp_path / "one"),
                             rtol=1e-5)


def test_parameters_are_sharded(tmp_path):
  from mtx import parallel
  from mtx.model import T5
  from mtx.train import state as state_lib
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed, abstract = state_lib.abstract_params(T5(TINY.__class__(**{**TINY.__dict__, "vocab_size": 384})), 16, 16)
  shardings = state_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = state_lib.init_params(T5(TINY.__class__(**{**TINY.__dict__, "vocab_size": 384})),
                                 0, 16, 16, shardings)
  specs = {jax.tree_util.keystr(p): leaf.sharding.spec
           for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  sharded = [k for k, s in specs.items() if any(a is not None for a in s)]
  assert len(sharded) > len(specs) // 2, specs
  mlp = [k for k in specs if "wi" in k]
  assert mlp and all("tensor" in str(specs[k]) and "fsdp" in str(specs[k]) for k in mlp)
  leaf = jax.tree.leaves(params)[0]
  assert len(leaf.sharding.device_set) == 8


def test_per_task_losses_are_reported_and_fall(tmp_path):
  result = _train(tmp_path / "r", jax.devices()[:1], steps=30)
  rows = metrics_writer.read_metrics(str(tmp_path / "r"))
  assert len(rows) == 30
  for key in ("loss", "loss/tiny_copy", "loss/tiny_rev", "learning_rate",
              "timing/step_s", "timing/tokens_per_s"):
    assert key in rows[-1], key
  assert rows[-1]["loss/tiny_copy"] < 0.8 * rows[0]["loss/tiny_copy"]
  assert result.step == 30


def test_config_gin_written(tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS)
  model_dir = tmp_path / "cfg"
  out = subprocess.run(
      [sys.executable, "-m", "mtx.train", "--gin_file=tests/tiny.gin",
       f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  text = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 2" in text and "train.train_steps = %TRAIN_STEPS" in text
  assert "model.T5Config" in text


def _cli(model_dir, *extra):
  return [sys.executable, "-m", "mtx.train", "--gin_file=tests/tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'", *extra]


def _wait_for(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended early: {proc.stderr.read()[-2000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def _logged_steps(model_dir):
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return len(metrics_writer.read_metrics(str(model_dir)))


def test_kill_9_and_restart_is_bit_identical(tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS)
  straight = tmp_path / "straight"
  subprocess.run(_cli(straight), cwd=REPO, env=env, check=True, capture_output=True,
                 timeout=300)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed, "--gin.LOG_PERIOD=1"), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Kill once step 4's checkpoint is committed and training has gone past it.
  _wait_for(lambda: _logged_steps(killed) >= 6
            and os.path.exists(killed / "4" / "commit_success.txt"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_cli(killed), cwd=REPO, env=env, check=True, capture_output=True,
                 timeout=300)
  a, b = _losses(straight), _losses(killed)
  assert a.shape == b.shape == (12, 3)
  np.testing.assert_array_equal(a, b)  # bit for bit, every logged step
  pa, pb = _final_params(straight), _final_params(killed)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_sigterm_saves_and_exits_zero(tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS)
  model_dir = tmp_path / "term"
  proc = subprocess.Popen(_cli(model_dir, "--gin.TRAIN_STEPS=100000",
                               "--gin.CHECKPOINT_PERIOD=0"),
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _logged_steps(model_dir) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Preempted: saved step" in out
  saved = [int(p) for p in os.listdir(model_dir) if p.isdigit()]
  assert saved and max(saved) >= 3


# ---- the CLI: bad input gets one sentence and exit status 2 ------------------------------
def _run_cli(tmp_path, capsys, *args):
  import gin
  from mtx.train import cli
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(["train", *args])
  gin.clear_config()
  err = capsys.readouterr().err.strip()
  return e.value.code, err


BAD = [
    (["--gin_file=tests/tiny.gin", "--gin.train.no_such_knob=1"], "no_such_knob"),
    (["--gin_file=gin_configs/runs/train.gin"], "required"),
    (["--gin_file=tests/tiny.gin", "--gin.TRAIN_STEP=100"], "TRAIN_STEP.*did you mean: TRAIN_STEPS"),
    (["--gin_file=tests/tiny.gin", "--gin.MIXTURE_OR_TASK_NAME=tiny"], "strings need quotes"),
    (["--gin_file=tests/tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='tinyy'"], "did you mean: tiny"),
    (["--gin_file=tests/tiny.gin", "--gin.BATCH_SIZE=6", "--gin.MESH_SHAPE={'data': 4}"], "devices"),
    (["--gin_file=tests/tiny.gin", "--gin.BATCH_SIZE=6"], "divisible"),
    (["--gin_file=tests/tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}"], "TASK_FEATURE_LENGTHS"),
    (["--gin_file=tests/no_such.gin"], "not found"),
]


@pytest.mark.parametrize("args,pattern", BAD)
def test_bad_input_one_sentence(tmp_path, capsys, args, pattern):
  import re
  code, err = _run_cli(tmp_path, capsys, *args, f"--gin.MODEL_DIR='{tmp_path}/m'")
  assert code == 2
  assert err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err, re.I), err
  assert not any(p.isdigit() for p in os.listdir(tmp_path / "m")) if (tmp_path / "m").exists() else True


def test_gin_syntax_error_names_file_and_line(tmp_path, capsys):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'runs/train.gin'\ntrain.seed = = 3\n")
  code, err = _run_cli(tmp_path, capsys, f"--gin_file={bad}")
  assert code == 2 and "bad.gin" in err and "2" in err, err


def test_unwritable_model_dir(tmp_path, capsys):
  if os.geteuid() == 0:
    target = "/proc/mtx_cannot_write_here"
  else:
    target = str(tmp_path / "ro")
    os.makedirs(target)
    os.chmod(target, 0o500)
  code, err = _run_cli(tmp_path, capsys, "--gin_file=tests/tiny.gin",
                       f"--gin.MODEL_DIR='{target}'")
  assert code == 2 and "writable" in err, err


# ---- every mtl method trains from its gin file, inside the jitted step -------------------
MTL_FILES = sorted(f[:-4] for f in os.listdir(os.path.join(REPO, "gin_configs", "mtl")))
FAST_MTL = {"pcgrad", "uncertainty", "famo"}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=() if m in FAST_MTL else pytest.mark.slow) for m in MTL_FILES])
def test_mtl_gin_file_trains(tmp_path, method):
  import gin
  from mtx.train import cli
  gin.clear_config()
  extra = ["--gin.mtl.static_weights.weights=[1.0, 0.5]"] if method == "static_weights" else []
  try:
    code = cli.run(["train", "--gin_file=tests/tiny.gin", f"--gin_file=mtl/{method}.gin",
                    f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=3",
                    "--gin.CHECKPOINT_PERIOD=0", *extra])
  finally:
    gin.clear_config()
  assert code == 0
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
  if method not in ("sum", "mean", "static_weights", "uncertainty", "dwa", "rlw", "famo"):
    assert "grad_cos/tiny_copy/tiny_rev" in rows[-1] and "conflict_frac" in rows[-1]
  else:
    assert "mtl/weight/tiny_copy" in rows[-1]


@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_gradient_accumulation_matches_one_batch(tmp_path, method):
  transforms = (mtl.pcgrad(),) if method == "pcgrad" else ()
  one = _train(tmp_path / "one", jax.devices()[:1], transforms=transforms, units=4)
  acc = _train(tmp_path / "acc", jax.devices()[:1], transforms=transforms, units=4,
               grad_accum_steps=2)
  assert one.step == acc.step == 4
  np.testing.assert_allclose(_losses(tmp_path / "acc"), _losses(tmp_path / "one"),
                             rtol=2e-5)


def test_initial_checkpoint_path_and_tasks_json(tmp_path):
  from mtx.errors import UserError
  _train(tmp_path / "a", jax.devices()[:1], steps=2)
  tasks = json.loads((tmp_path / "a" / "tasks.json").read_text())
  assert [t["name"] for t in tasks["tasks"]] == ["tiny_copy", "tiny_rev"]
  # Fine-tune from a's params with a zero learning rate: b's params stay a's.
  loop.train(model_dir=str(tmp_path / "b"), mixture_or_task_name="tiny",
             task_feature_lengths={"inputs": 16, "targets": 16}, train_steps=1,
             batch_size=8, model_config=TINY, learning_rate=0.0,
             optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
             initial_checkpoint_path=str(tmp_path / "a"), log_period=1,
             checkpoint_period=0, devices=jax.devices()[:1], print_param_table=False,
             tensorboard=False)
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "a"),
               _final_params(tmp_path / "b"))
  with pytest.raises(UserError, match="shape"):
    loop.train(model_dir=str(tmp_path / "c"), mixture_or_task_name="tiny",
               task_feature_lengths={"inputs": 16, "targets": 16}, train_steps=1,
               batch_size=8, model_config=TINY.__class__(**{**TINY.__dict__, "mlp_dim": 96}),
               initial_checkpoint_path=str(tmp_path / "a"), devices=jax.devices()[:1],
               print_param_table=False, tensorboard=False)
  assert not [p for p in os.listdir(tmp_path / "c") if p.isdigit()]
