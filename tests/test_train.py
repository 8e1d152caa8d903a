"""The trainer: sharding equivalence, per-task losses, exact resume, SIGTERM, the CLI,
relative and ``~`` paths."""

import contextlib
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
from loop_helpers import TINY, loop_train

from mtx import mtl, paths
from mtx.eval.evaluator import EvalOptions
from mtx.runtime import lock as lock_lib
from mtx.runtime import metrics_writer
from mtx.runtime import params as params_lib
from mtx.train import optim
from mtx.train.settings import TrainConfig

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _train(model_dir, devices, mesh_shape=None, transforms=(), steps=4, **kw):
  kw.setdefault("batch_size", 8)
  return loop_train(
    model_dir=str(model_dir),
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    train_steps=steps,
    model_config=TINY,
    mtl_transforms=transforms,
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-3,
    mesh_shape=mesh_shape,
    log_period=1,
    checkpoint_period=0,
    devices=devices,
    print_param_table=False,
    tensorboard=False,
    **kw,
  )


def _losses(model_dir):
  rows = metrics_writer.read_metrics(str(model_dir))
  return np.array([[r["loss"], r["loss/tiny_copy"], r["loss/tiny_rev"]] for r in rows])


def _final_params(model_dir):
  steps = sorted(int(p) for p in os.listdir(model_dir) if p.isdigit())
  tree = ocp.StandardCheckpointer().restore(
    os.path.join(model_dir, str(steps[-1]), "state")
  )
  return jax.tree.map(np.asarray, tree["params"])


# Both run with the slow tests (default-suite time); test_step's PCGrad step on a
# (data, fsdp, tensor) mesh checks the sharded route in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_sharded_mesh_matches_one_device(tmp_path, method):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  transforms = (mtl.pcgrad(),) if method == "pcgrad" else ()
  # The same units on both meshes, so both see the same task-major batches.
  one = _train(tmp_path / "one", jax.devices()[:1], transforms=transforms, units=4)
  many = _train(
    tmp_path / "many",
    jax.devices(),
    {"data": 2, "fsdp": 2, "tensor": 2},
    transforms=transforms,
    units=4,
  )
  assert one.step == many.step == 4
  np.testing.assert_allclose(
    _losses(tmp_path / "many"), _losses(tmp_path / "one"), rtol=1e-5
  )


def test_parameters_are_sharded(tmp_path):
  from mtx import parallel
  from mtx.model import T5

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed, abstract = params_lib.abstract_params(
    T5(TINY.__class__(**{**TINY.__dict__, "vocab_size": 384})), 16, 16
  )
  shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = params_lib.init_params(
    T5(TINY.__class__(**{**TINY.__dict__, "vocab_size": 384})), 0, 16, 16, shardings
  )
  specs = {
    jax.tree_util.keystr(p): leaf.sharding.spec
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
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
  for key in (
    "loss",
    "loss/tiny_copy",
    "loss/tiny_rev",
    "learning_rate",
    "timing/step_s",
    "timing/tokens_per_s",
    "perf/tflops_per_device",
  ):
    assert key in rows[-1], key
  assert rows[-1]["perf/tflops_per_device"] > 0
  assert "perf/mfu" not in rows[-1]  # a CPU has no peak in flops.PEAK_TFLOPS
  assert rows[-1]["loss/tiny_copy"] < 0.8 * rows[0]["loss/tiny_copy"]
  assert result.step == 30


def test_config_gin_written(tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS)
  model_dir = tmp_path / "cfg"
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mtx",
      "train",
      "--gin_file=tests/tiny.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.TRAIN_STEPS=2",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  text = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 2" in text and "train.train_steps = %TRAIN_STEPS" in text
  assert "model.T5Config" in text
  # stderr is no terminal: a log line per LOG_PERIOD (1) at the default level, no bar,
  # and none of TensorFlow's start-up notices.
  lines = out.stderr.splitlines()
  assert [line.split(":")[1] for line in lines if "mtx.progress: step" in line] == [
    " step 1/2",
    " step 2/2",
  ], out.stderr[-2000:]
  assert "\r" not in out.stderr
  assert not [line for line in lines if "oneDNN" in line or "cuda" in line.lower()]


def _cli(model_dir, *extra):
  return [
    sys.executable,
    "-m",
    "mtx",
    "train",
    "--gin_file=tests/tiny.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    *extra,
  ]


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


@pytest.mark.slow  # default-suite time; test_faults checks SIGINT in the default suite
def test_sigterm_saves_and_exits_zero(tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS)
  model_dir = tmp_path / "term"
  proc = subprocess.Popen(
    _cli(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=0"),
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
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

  from mtx.cli import main as cli

  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(["train", *args])
  gin.clear_config()
  err = capsys.readouterr().err.strip()
  return e.value.code, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A MODEL_DIR holding a finished 2-step run of tests/tiny.gin's model."""
  model_dir = tmp_path_factory.mktemp("finished")
  _train(model_dir, jax.devices()[:1], steps=2)
  return model_dir


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  """Broken inputs, and task modules (on sys.path) whose tasks read the data files."""
  d = tmp_path_factory.mktemp("bad_files")
  (d / "cols.tsv").write_text("a\tb\nc\td\ne f\n")
  (d / "latin1.tsv").write_bytes("a\tb\ncaf\u00e9\tx\n".encode("latin-1"))
  (d / "garbage.model").write_bytes(b"not a sentencepiece model")
  (d / "locked.model").write_bytes(b"")
  os.chmod(d / "locked.model", 0)
  for name, path in (
    ("bad_missing", d / "missing.tsv"),
    ("bad_cols", d / "cols.tsv"),
    ("bad_utf8", d / "latin1.tsv"),
  ):
    (d / f"{name}.py").write_text(
      "import seqio\nfrom mtx.data import sources\nimport tsv_tasks\n"
      f"seqio.TaskRegistry.remove({name!r})\n"
      f"seqio.TaskRegistry.add({name!r}, source=sources.tsv_source("
      f"{{'train': {str(path)!r}}}), preprocessors=[seqio.preprocessors.tokenize, "
      "seqio.preprocessors.append_eos_after_trim], output_features=tsv_tasks.FEATURES)\n"
    )
  (d / "bad_raises.py").write_text(
    "import seqio\nx = 1\nraise RuntimeError('my task module is broken')\n"
  )
  (d / "bad_syntax.py").write_text("import seqio\ndef f(:\n  pass\n")
  (d / "bad_unregistered.py").write_text(
    "import seqio\nimport tiny_mixture\n"
    "seqio.MixtureRegistry.remove('bad_unregistered')\n"
    "seqio.MixtureRegistry.add('bad_unregistered', "
    "[('tiny_copy', 1.0), ('no_such_task', 1.0)])\n"
  )
  (d / "bad_rate.py").write_text(
    "import seqio\nimport tiny_mixture\nseqio.MixtureRegistry.remove('bad_rate')\n"
    "seqio.MixtureRegistry.add('bad_rate', [('tiny_copy', 1.0), ('tiny_rev', -1.0)])\n"
  )
  (d / "bad_notab.py").write_text(
    "import tsv_tasks\n"
    f"tsv_tasks.register_tsv('bad_notab', {str(d / 'notab.tsv')!r}, [('a', 'b')])\n"
    f"open({str(d / 'notab.tsv')!r}, 'a').write('no tab here\\n')\n"
  )
  (d / "include_missing.gin").write_text(
    "include 'tests/tiny.gin'\ninclude 'runs/no_such_include.gin'\n"
  )
  sys.path.insert(0, str(d))
  yield d
  sys.path.remove(str(d))


def _task(name):
  return [
    f"--gin.MIXTURE_OR_TASK_MODULE='{name}'",
    f"--gin.MIXTURE_OR_TASK_NAME='{name}'",
  ]


# Every mistake of issue #7's table: the arguments after tests/tiny.gin, and what the one
# sentence must say. {d} is the bad_files folder.
_BAD = [
  ("unknown_configurable", ["--gin_bindings=nosuch.fn.x = 1"], "No configurable.*nosuch"),
  ("unknown_parameter", ["--gin.train.no_such_knob=1"], "no_such_knob"),
  ("undefined_macro", ["--gin_bindings=train.seed = %NO_SUCH_MACRO"], "NO_SUCH_MACRO"),
  ("missing_required", ["--gin_file=gin_configs/runs/train.gin"], "required"),
  (
    "flag_binds_nothing",
    ["--gin.TRAIN_STEP=100"],
    "TRAIN_STEP.*did you mean: TRAIN_STEPS",
  ),
  ("unquoted_string", ["--gin.MIXTURE_OR_TASK_NAME=tiny"], "strings need quotes"),
  ("unknown_mixture", ["--gin.MIXTURE_OR_TASK_NAME='tinyy'"], "did you mean: tiny"),
  ("unknown_task", ["--gin.MIXTURE_OR_TASK_NAME='tiny_cpy'"], "did you mean: tiny_copy"),
  (
    "unknown_module",
    ["--gin.MIXTURE_OR_TASK_MODULE='tiny_mixtur'"],
    "MIXTURE_OR_TASK_MODULE 'tiny_mixtur' could not be imported",
  ),
  (
    "vocabulary_missing",
    ["--gin.VOCABULARY='{d}/none.model'"],
    r"Vocabulary file .*none.model does not exist",
  ),
  (
    "vocabulary_not_a_model",
    ["--gin.VOCABULARY='{d}/garbage.model'"],
    "not a SentencePiece model",
  ),
  ("vocabulary_unreadable", ["--gin.VOCABULARY='{d}/locked.model'"], "cannot be read"),
  ("data_file_missing", _task("bad_missing"), r"missing.tsv .*does not exist"),
  ("data_file_malformed", _task("bad_cols"), r"cols.tsv:3 has 1 .*fields"),
  ("data_file_not_utf8", _task("bad_utf8"), r"latin1.tsv:2 is not valid UTF-8"),
  (
    "feature_length_zero",
    ["--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}"],
    r"TASK_FEATURE_LENGTHS\['inputs'\] must be a positive",
  ),
  (
    "feature_length_negative",
    ["--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': -2}"],
    r"TASK_FEATURE_LENGTHS\['targets'\] must be a positive",
  ),
  ("train_steps_zero", ["--gin.TRAIN_STEPS=0"], "TRAIN_STEPS must be positive"),
  ("batch_not_divisible", ["--gin.BATCH_SIZE=6"], "divisible"),
  ("mesh_not_devices", ["--gin.BATCH_SIZE=6", "--gin.MESH_SHAPE={'data': 4}"], "devices"),
  ("mesh_unknown_axis", ["--gin.MESH_SHAPE={'dta': 8}"], "Unknown mesh axes"),
  (
    "checkpoint_of_another_shape",
    ["--gin.model.T5Config.mlp_dim=96"],
    r"does not fit the state being restored: .*mlp",
  ),
  (
    "nonfinite_policy",
    ["--gin_bindings=train.nonfinite_policy = 'stp'"],
    "did you mean: stop",
  ),
  ("gin_file_missing", ["--gin_file=tests/no_such.gin"], "not found"),
  (
    "task_group_matches_nothing",
    ["--gin_bindings=train.task_groups = {'tiny_cpy': 'g'}"],
    "pattern 'tiny_cpy' matches no task.*did you mean: tiny_copy",
  ),
  (
    "weighting_after_aggregator",
    ["--gin_bindings=train.mtl_transforms = [@mtl.pcgrad, @mtl.uncertainty_weighting]"],
    "weighting placed after an aggregator",
  ),
  ("negative_seed", ["--gin_bindings=train.seed = -1"], "seed must be >= 0"),
  (
    "model_dir_in_use",  # while this process holds the lock, as a first run would
    [],
    r"MODEL_DIR .* is in use by another mtx train \(pid {pid} on host .*\); wait for "
    "that run to end or stop it, or choose another MODEL_DIR",
  ),
  (
    "relpos_buckets",
    ["--gin_bindings=model.T5Config.relative_attention_num_buckets = 2"],
    "at least 4 buckets",
  ),
  (
    "vocab_size_too_small",
    ["--gin_bindings=model.T5Config.vocab_size = 64"],
    "smaller than the vocabulary",
  ),
  # Issue #19's confusing mistakes.
  (
    "steps_quoted",
    ["--gin.TRAIN_STEPS='100'"],
    "TRAIN_STEPS must be an integer .*write 100 without quotes",
  ),
  ("batch_float", ["--gin.BATCH_SIZE=8.0"], "BATCH_SIZE must be an integer .*write 8"),
  ("log_period_zero", ["--gin.LOG_PERIOD=0"], "LOG_PERIOD must be positive"),
  ("log_period_negative", ["--gin.LOG_PERIOD=-5"], "LOG_PERIOD must be positive"),
  ("checkpoint_period_negative", ["--gin.CHECKPOINT_PERIOD=-1"], "CHECKPOINT_PERIOD"),
  ("eval_period_negative", ["--gin.EVAL_PERIOD=-1"], "EVAL_PERIOD must be >= 0"),
  (
    "module_raises",
    _task("bad_raises"),
    r"'bad_raises' raised RuntimeError at .*bad_raises.py:3.*my task module is broken",
  ),
  (
    "module_syntax_error",
    _task("bad_syntax"),
    r"'bad_syntax' has a syntax error at .*bad_syntax.py:2",
  ),
  (
    "mixture_unregistered_task",
    _task("bad_unregistered"),
    r"bad_unregistered.py:4 \(seqio.MixtureRegistry.add\('bad_unregistered'.*"
    "no_such_task",
  ),
  (
    "negative_rate",
    _task("bad_rate"),
    "Mixture 'bad_rate' gives task.* tiny_rev a negative rate",
  ),
  (
    "tsv_line_without_tab",
    _task("bad_notab"),
    r"Task 'bad_notab' failed .*notab.tsv:2 has no tab",
  ),
  (
    "static_weights_count",
    [
      "--gin_bindings=train.mtl_transforms = [@mtl.static_weights()]",
      "--gin_bindings=mtl.static_weights.weights = [1.0]",
    ],
    "does not fit the run's 2 task group.*in id order: tiny_copy, tiny_rev",
  ),
  (
    "static_weights_none",
    ["--gin_bindings=train.mtl_transforms = [@mtl.static_weights()]"],
    "static_weights needs a value for weights",
  ),
  ("units_zero", ["--gin.UNITS=0", "--gin_file=mtl/pcgrad.gin"], "UNITS must be"),
  (
    "units_below_groups",
    ["--gin.UNITS=1", "--gin_file=mtl/pcgrad.gin"],
    "UNITS 1 is below the 2 task groups .*set UNITS to at least 2",
  ),
  (
    "mask_matches_nothing",
    [
      "--gin_bindings=train.mtl_transforms = [@mtl.masked()]",
      "--gin_bindings=mtl.masked.inner = @mtl.pcgrad",
      "--gin_bindings=mtl.masked.mask = 'nomatch/'",
    ],
    "mask 'nomatch/' matches no parameter",
  ),
  (
    "units_not_multiple_of_accumulation",
    [
      "--gin_file=mtl/pcgrad.gin",
      "--gin.UNITS=3",
      "--gin_bindings=train.grad_accum_steps = 2",
    ],
    r"UNITS 3 must be a multiple .*grad_accum_steps 2.*set UNITS to a multiple of \d+",
  ),
  (
    "include_missing",
    ["--gin_file={d}/include_missing.gin"],
    "includes runs/no_such_include.gin, which was not found",
  ),
  (
    "dict_unquoted",
    ["--gin.TASK_FEATURE_LENGTHS={inputs: 8, targets: 8}"],
    "removed the quotes",
  ),
  ("dict_split_by_shell", ["--gin.TASK_FEATURE_LENGTHS={inputs:"], "is cut off"),
  ("path_unquoted", ["--gin.MODEL_DIR=/tmp/x"], "strings need quotes"),
  ("gin_file_misspelt", ["--gin_file=mtl/pcgard.gin"], "did you mean: mtl/pcgrad.gin"),
  (
    "parameter_misspelt",
    ["--gin.model.T5Config.num_layer=2"],
    "num_layer.*did you mean: .*num_encoder_layers",
  ),
  (
    "eval_max_examples_zero",
    ["--gin.EVAL_PERIOD=1", "--gin.EVAL_MAX_EXAMPLES=0"],
    "EVAL_MAX_EXAMPLES must be positive",
  ),
  (
    "fewer_tasks_on_resume",
    ["--gin.MIXTURE_OR_TASK_NAME='tiny_copy'"],
    "holds a run at step 2 on tasks tiny_copy, tiny_rev and this launch is without "
    "tiny_rev; .*INITIAL_CHECKPOINT_PATH",
  ),
  (
    "steps_below_checkpoint",
    ["--gin.TRAIN_STEPS=1"],
    "Nothing to train: the checkpoint .* is at step 2, beyond TRAIN_STEPS=1",
  ),
  (
    "initial_checkpoint_of_another_shape",
    ["--gin.INITIAL_CHECKPOINT_PATH='{run}'", "--gin.model.T5Config.mlp_dim=96"],
    "INITIAL_CHECKPOINT_PATH .* does not fit the model",
  ),
]
# Rows that are about resuming the finished run: with a fresh MODEL_DIR they train.
_RESUME_ONLY = {
  "fewer_tasks_on_resume",
  "steps_below_checkpoint",
  "checkpoint_of_another_shape",
  "model_dir_in_use",
}
# Rows whose MODEL_DIR is the finished run's only to resume: started fresh, they would
# read the finished run's (another model's) checkpoint as INITIAL_CHECKPOINT_PATH.
_FRESH_ONLY = {"initial_checkpoint_of_another_shape"}
_MARKS = {}
# Cases run while the test process holds MODEL_DIR's lock (mtx.runtime.lock).
_LOCKED = {"model_dir_in_use"}
BAD = [pytest.param(*c, id=c[0], marks=_MARKS.get(c[0], ())) for c in _BAD]


def _snapshot(root):
  """{relative path: file bytes} of everything under root."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.mark.parametrize("case,args,pattern", BAD)
def test_bad_input_one_sentence(finished_run, bad_files, capsys, case, args, pattern):
  """One line 'mtx: error: ...' naming the problem, exit 2, the run's files untouched."""
  import re

  if case == "vocabulary_unreadable" and os.geteuid() == 0:
    pytest.skip("root reads any file")
  if case in _FRESH_ONLY:
    pytest.skip("a fresh-MODEL_DIR case (test_bad_input_leaves_a_fresh_model_dir)")
  args = [a.replace("{d}", str(bad_files)) for a in args]
  pattern = pattern.replace("{pid}", str(os.getpid()))
  with (
    lock_lib.ModelDirLock(str(finished_run))
    if case in _LOCKED
    else contextlib.nullcontext()
  ):
    before = _snapshot(finished_run)
    code, err = _run_cli(
      None,
      capsys,
      "--gin_file=tests/tiny.gin",
      f"--gin.MODEL_DIR='{finished_run}'",
      *args,
    )
    assert code == 2, err
    assert err.startswith("mtx: error: ") and "\n" not in err, err
    assert re.search(pattern, err, re.I), err
    assert _snapshot(finished_run) == before
  assert lock_lib.LOCK_FILE not in os.listdir(finished_run)  # Released on every error.


FRESH = [
  pytest.param(*c, id=c[0], marks=_MARKS.get(c[0], ()))
  for c in _BAD
  if c[0] not in _RESUME_ONLY
]


@pytest.mark.parametrize("case,args,pattern", FRESH)
def test_bad_input_leaves_a_fresh_model_dir(
  finished_run, bad_files, tmp_path, capsys, case, args, pattern
):
  """The same mistakes on a MODEL_DIR that does not exist yet: one sentence, exit 2,
  and no MODEL_DIR afterwards (validation comes before anything is written)."""
  import re

  if case == "vocabulary_unreadable" and os.geteuid() == 0:
    pytest.skip("root reads any file")
  args = [
    a.replace("{d}", str(bad_files)).replace("{run}", str(finished_run)) for a in args
  ]
  model_dir = tmp_path / "fresh"
  code, err = _run_cli(
    None, capsys, "--gin_file=tests/tiny.gin", f"--gin.MODEL_DIR='{model_dir}'", *args
  )
  assert code == 2, err
  assert err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err, re.I), err
  assert not model_dir.exists() or not os.listdir(model_dir)


def _copy_run(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return dst


def test_nothing_to_train_at_train_steps(finished_run, tmp_path, capsys):
  """A finished run started again (a scheduler's retry) says so and exits 0: the job
  did succeed; nothing in MODEL_DIR changes. (A TRAIN_STEPS below the checkpoint is a
  mistake: exit 2, a row of the bad-input table.)"""
  import gin

  from mtx.cli import main as cli

  run = _copy_run(finished_run, tmp_path / "run")
  before = _snapshot(run)
  gin.clear_config()
  try:
    code = cli.run(
      [
        "train",
        "--gin_file=tests/tiny.gin",
        f"--gin.MODEL_DIR='{run}'",
        "--gin.TRAIN_STEPS=2",
      ]
    )
  finally:
    gin.clear_config()
  assert code == 0
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out.startswith("Nothing to train: the checkpoint is at step 2"), out
  assert _snapshot(run) == before


def test_resume_reports_changed_settings(finished_run, tmp_path, caplog):
  """Resuming with another learning rate, batch or step count names each change
  against the run's saved config.gin."""
  import gin

  from mtx.cli import main as cli

  run = _copy_run(finished_run, tmp_path / "run")
  # The previous launch's operative config, as `mtx train` writes it.
  (run / "config.gin").write_text(
    "# Macros:\nBATCH_SIZE = 8\nTRAIN_STEPS = 2\n\n"
    "# Parameters for learning_rate_fn:\n"
    "learning_rate_fn.base_lr = 0.003\nlearning_rate_fn.name = 'constant'\n"
  )
  gin.clear_config()
  try:
    with caplog.at_level("WARNING", logger="mtx"):
      code = cli.run(
        [
          "train",
          "--gin_file=tests/tiny.gin",
          f"--gin.MODEL_DIR='{run}'",
          "--gin.TRAIN_STEPS=3",
          "--gin.BATCH_SIZE=16",
          "--gin_bindings=optim.learning_rate_fn.base_lr = 0.001",
        ]
      )
  finally:
    gin.clear_config()
  assert code == 0
  text = " ".join(r.getMessage() for r in caplog.records if "Resuming" in r.getMessage())
  assert "Resuming step 2 of" in text, caplog.text
  assert "learning_rate_fn.base_lr: 0.003 -> 0.001" in text, text
  assert "BATCH_SIZE: 8 -> 16" in text and "TRAIN_STEPS: 2 -> 3" in text, text
  assert "learning_rate_fn.name" not in text  # unchanged settings are not listed


def test_task_set_changes_are_refused_on_resume(tmp_path):
  """Fewer, more or renamed tasks than MODEL_DIR/tasks.json: one sentence with the
  ways on; the same tasks pass."""
  from mtx.errors import UserError
  from mtx.train import resume

  tasks = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]
  (tmp_path / "tasks.json").write_text(json.dumps({"mixture": "m", "tasks": tasks}))
  resume.check_task_set(str(tmp_path), 5, ["a", "b"])
  for names, what in (
    (["a"], "without b"),
    (["a", "b", "c"], "with c added"),
    (["a", "c"], "without b and with c added"),
  ):
    with pytest.raises(
      UserError,
      match=f"at step 5 on tasks a, b and this launch is {what}; .*INITIAL_CHECKPOINT_PATH",
    ):
      resume.check_task_set(str(tmp_path), 5, names)


def test_every_weighting_passes_the_task_count_check():
  """check_task_counts traces each weighting on k tasks: the right k passes for every
  method, and static_weights with another count is refused naming the groups."""
  import types

  import jax.numpy as jnp
  import optax

  from mtx.errors import UserError
  from mtx.train import build as build_lib

  spec = types.SimpleNamespace(num_groups=3, group_names=("a", "b", "c"))
  params = {"w": jnp.zeros((2, 2))}
  for name, factory in mtl.METHODS.items():
    transform = (
      build_lib.build_transforms([factory], 3)[0]
      if name != "static_weights"
      else factory([1.0, 2.0, 3.0])
    )
    state = optax.chain(transform).init(params)
    build_lib.check_task_counts([transform], state, spec)
  wrong = mtl.static_weights([1.0, 2.0])
  with pytest.raises(UserError, match="in id order: a, b, c"):
    build_lib.check_task_counts([wrong], optax.chain(wrong).init(params), spec)


def test_cosines_are_logged_only_where_measured():
  """A pair of groups never present in the same step has no cosine (absent, not
  0.0); conflict_frac averages only steps that held two groups or more."""
  from mtx.train import loop

  def step(norms, cos_ab, frac):
    cos = np.eye(3, dtype=np.float32)
    cos[0, 1] = cos[1, 0] = cos_ab
    return {
      "group_grad_norm": np.array(norms, np.float32),
      "group_grad_cos": cos,
      "conflict_frac": np.float32(frac),
    }

  h = [step([1, 1, 0], -0.5, 1.0), step([1, 0, 0], 0.0, 0.0), step([0, 1, 0], 0.0, 0.0)]
  out = loop.cosine_metrics(h, ["a", "b", "c"])
  assert out["grad_cos/a/b"] == pytest.approx(-0.5)
  assert "grad_cos/a/c" not in out and "grad_cos/b/c" not in out
  assert out["conflict_frac"] == pytest.approx(1.0)
  assert "conflict_frac" not in loop.cosine_metrics(h[1:], ["a", "b", "c"])


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
  code, err = _run_cli(
    tmp_path, capsys, "--gin_file=tests/tiny.gin", f"--gin.MODEL_DIR='{target}'"
  )
  assert code == 2 and "writable" in err, err


# ---- relative and ~ paths -----------------------------------------------------------------
def test_paths_are_made_absolute_where_settings_are_built(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.absolute("rel") == str(tmp_path / "rel")
  assert paths.absolute("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
  assert paths.absolute(tmp_path / "a" / ".." / "b") == str(tmp_path / "b")
  assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
  assert paths.absolute(None) is None and paths.absolute("") == ""
  config = TrainConfig(
    model_dir="~/run",
    initial_checkpoint_path="init",
    vocabulary_path="~/v.model",
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    train_steps=1,
  )
  home = tmp_path / "home"
  assert config.model_dir == config.loop.model_dir == str(home / "run")
  assert config.checkpoint.initial_checkpoint_path == str(tmp_path / "init")
  assert config.data.vocabulary_path == str(home / "v.model")
  assert EvalOptions(baseline_dir="base").baseline_dir == str(tmp_path / "base")


@pytest.mark.slow  # default-suite time (the test above checks the paths fast)
def test_a_relative_model_dir_checkpoints_and_resumes_through_tilde(
  tmp_path, monkeypatch, capsys, caplog
):
  """MODEL_DIR 'rel_run' from another working directory trains past a checkpoint (orbax
  wants absolute paths); '~/rel_run' (HOME is that directory) names the same run, and
  resumes it from its checkpoint rather than calling it damaged."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path))
  tiny = f"--gin_file={os.path.join(TESTS, 'tiny.gin')}"
  code, err = _run_cli(
    None, capsys, tiny, "--gin.MODEL_DIR='rel_run'", "--gin.TRAIN_STEPS=5"
  )
  assert code == 0, err
  run = tmp_path / "rel_run"
  assert sorted(int(p) for p in os.listdir(run) if p.isdigit()) == [4, 5]
  code, err = _run_cli(
    None, capsys, tiny, "--gin.MODEL_DIR='~/rel_run'", "--gin.TRAIN_STEPS=8"
  )
  assert code == 0, err
  assert sorted(p for p in os.listdir(run) if p[0].isdigit()) == ["4", "5", "8"]
  assert "damaged" not in caplog.text and "Skipping" not in caplog.text
  assert [r["step"] for r in metrics_writer.read_metrics(str(run))] == list(range(1, 9))
  assert sorted(os.listdir(tmp_path)) == ["rel_run"]  # No folder named '~'.


# ---- every mtl method trains from its gin file, inside the jitted step -------------------
MTL_FILES = sorted(f[:-4] for f in os.listdir(os.path.join(REPO, "gin_configs", "mtl")))
FAST_MTL = {"pcgrad", "uncertainty"}  # the rest run with the slow tests (suite time)


@pytest.mark.parametrize(
  "method",
  [pytest.param(m, marks=() if m in FAST_MTL else pytest.mark.slow) for m in MTL_FILES],
)
def test_mtl_gin_file_trains(tmp_path, method):
  _check_mtl_gin_file_trains(tmp_path, "tests/tiny.gin", method)


@pytest.mark.slow  # ~20 s a method on 2 cores (a compilation each), 6 min in all
@pytest.mark.parametrize("method", MTL_FILES + ["tag"])
def test_mtl_gin_file_and_tag_train_a_decoder_only_model(tmp_path, method):
  """Every mtl method (and TAG affinity) trains a Llama as it trains a T5: the
  decoder-only batch keeps task identity through the per-task route."""
  _check_mtl_gin_file_trains(tmp_path, "tests/llama.gin", method)


def _check_mtl_gin_file_trains(tmp_path, model_gin: str, method: str) -> None:
  """Three steps of ``model_gin`` with ``mtl/<method>.gin`` (``tag``: the sum with TAG
  affinity every step): finite losses, and the method's own metrics logged."""
  import gin

  from mtx.cli import main as cli

  gin.clear_config()
  extra = {
    "static_weights": ["--gin.mtl.static_weights.weights=[1.0, 0.5]"],
    "tag": ["--gin.train.tag_affinity_period=1"],
  }.get(method, [])
  try:
    code = cli.run(
      [
        "train",
        f"--gin_file={model_gin}",
        f"--gin_file=mtl/{'sum' if method == 'tag' else method}.gin",
        f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.TRAIN_STEPS=3",
        "--gin.CHECKPOINT_PERIOD=0",
        *extra,
      ]
    )
  finally:
    gin.clear_config()
  assert code == 0
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
  assert all(np.isfinite(r["loss/tiny_copy"]) for r in rows)
  # The model's FLOPs are counted (perf/ from the second logged step: timed steps).
  perf = [r["perf/tflops_per_device"] for r in rows if "perf/tflops_per_device" in r]
  assert perf and all(p > 0 for p in perf)
  if method == "tag":
    assert all(np.isfinite(r[f"tag/{a}/{b}"]) for r in rows for a, b in _TAG_PAIRS)
  elif method not in (
    "sum",
    "mean",
    "static_weights",
    "uncertainty",
    "dwa",
    "rlw",
    "famo",
  ):
    assert "grad_cos/tiny_copy/tiny_rev" in rows[-1] and "conflict_frac" in rows[-1]
  else:
    assert "mtl/weight/tiny_copy" in rows[-1]


_TAG_PAIRS = (("tiny_copy", "tiny_rev"), ("tiny_rev", "tiny_copy"))


# The sum variant runs with the slow tests (suite time).
@pytest.mark.parametrize(
  "method", [pytest.param("sum", marks=pytest.mark.slow), "pcgrad"]
)
def test_gradient_accumulation_matches_one_batch(tmp_path, method):
  transforms = (mtl.pcgrad(),) if method == "pcgrad" else ()
  one = _train(tmp_path / "one", jax.devices()[:1], transforms=transforms, units=4)
  acc = _train(
    tmp_path / "acc",
    jax.devices()[:1],
    transforms=transforms,
    units=4,
    grad_accum_steps=2,
  )
  assert one.step == acc.step == 4
  np.testing.assert_allclose(
    _losses(tmp_path / "acc"), _losses(tmp_path / "one"), rtol=2e-5
  )


def test_initial_checkpoint_path_and_tasks_json(tmp_path):
  from mtx.errors import UserError

  _train(tmp_path / "a", jax.devices()[:1], steps=2)
  tasks = json.loads((tmp_path / "a" / "tasks.json").read_text())
  assert [t["name"] for t in tasks["tasks"]] == ["tiny_copy", "tiny_rev"]
  # Fine-tune from a's params with a zero learning rate: b's params stay a's.
  loop_train(
    model_dir=str(tmp_path / "b"),
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    train_steps=1,
    batch_size=8,
    model_config=TINY,
    learning_rate=0.0,
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    initial_checkpoint_path=str(tmp_path / "a"),
    log_period=1,
    checkpoint_period=0,
    devices=jax.devices()[:1],
    print_param_table=False,
    tensorboard=False,
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    _final_params(tmp_path / "a"),
    _final_params(tmp_path / "b"),
  )
  with pytest.raises(UserError, match="shape"):
    loop_train(
      model_dir=str(tmp_path / "c"),
      mixture_or_task_name="tiny",
      task_feature_lengths={"inputs": 16, "targets": 16},
      train_steps=1,
      batch_size=8,
      model_config=TINY.__class__(**{**TINY.__dict__, "mlp_dim": 96}),
      initial_checkpoint_path=str(tmp_path / "a"),
      devices=jax.devices()[:1],
      print_param_table=False,
      tensorboard=False,
    )
  # Nothing saved; the MODEL_DIR the run made is removed again when left empty.
  c = tmp_path / "c"
  assert not (c.exists() and [p for p in os.listdir(c) if p.isdigit()])
