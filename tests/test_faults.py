"""Faults: NaN/Inf steps, disk errors mid-run, kill -9 anywhere, Ctrl-C and hangups, two
trainings of one MODEL_DIR, atomic writes, no pickle.

The fast tests run the trainer in-process on one CPU device; the slow ones start the
``mtx`` command line in subprocesses (one fake device each, so they compile quickly).
"""

import asyncio
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)
from loop_helpers import loop_train, tiny_train

from mtx import mtl
from mtx.cli import main as cli
from mtx.errors import UserError
from mtx.runtime import checkpoint, metrics_writer
from mtx.runtime import lock as lock_lib
from mtx.train import loop

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _train(model_dir, steps, **kw):
  return tiny_train(model_dir, steps, devices=jax.devices()[:1], **kw)


def _saved_state(model_dir, step):
  """(state as numpy, data_state) of a committed step, read without a target."""
  path = os.path.join(model_dir, str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  with open(os.path.join(path, "data_state", "metadata"), encoding="utf-8") as f:
    return jax.tree.map(np.asarray, state), json.load(f)


def _steps_on_disk(model_dir):
  return sorted(int(p) for p in os.listdir(model_dir) if p.isdigit())


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- NaN / Inf ---------------------------------------------------------------------------
@pytest.mark.parametrize(
  "method", ["sum", pytest.param("pcgrad", marks=pytest.mark.slow)]
)
def test_nonfinite_step_is_skipped_counted_and_never_saved(tmp_path, method):
  """'skip': an Inf loss at step 3 leaves params, optimizer and mtl state as they were
  after step 2, while the step counter and data position advance; nonfinite_steps counts
  it in metrics.jsonl and in the checkpoint (so it survives a resume)."""
  transforms = (mtl.pcgrad(),) if method == "pcgrad" else ()
  # units=4: tiny_rev gets a unit at every step, so the injection always hits.
  result = _train(
    tmp_path,
    4,
    mtl_transforms=transforms,
    units=4,
    checkpoint_period=1,
    keep_checkpoints=10,
    debug_inject_nonfinite_steps=(3,),
    debug_inject_nonfinite_task="tiny_rev",
  )
  assert result.step == 4
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1]
  assert not np.isfinite(rows[2]["loss/tiny_rev"]) and np.isfinite(
    rows[2]["loss/tiny_copy"]
  )
  assert all(np.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
  (s2, d2), (s3, d3), (s4, _) = (_saved_state(tmp_path, s) for s in (2, 3, 4))
  for key in ("params", "opt_state", "mtl_state"):
    _assert_trees_equal(s3[key], s2[key])
  assert (int(s2["step"]), int(s3["step"])) == (2, 3)
  assert (int(s2["nonfinite_steps"]), int(s3["nonfinite_steps"])) == (0, 1)
  assert d3 != d2  # The data position moved on: the bad batch is not seen again.
  assert any(
    not np.array_equal(x, y)  # Training goes on at step 4.
    for x, y in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s3["params"]))
  )
  for state in (s2, s3, s4):
    assert all(
      np.all(np.isfinite(x))
      for x in jax.tree.leaves(state)
      if np.issubdtype(x.dtype, np.floating)
    )


@pytest.mark.slow
def test_nonfinite_stop_names_step_and_task_and_saves_nothing_after(tmp_path):
  with pytest.raises(
    loop.NonFiniteStepError,
    match=r"^Step 3 had a non-finite loss in task\(s\) tiny_rev .*'stop'.*"
    r"newest checkpoint is step 2\)",
  ):
    _train(
      tmp_path,
      8,
      nonfinite_policy="stop",
      checkpoint_period=2,
      log_period=4,
      debug_inject_nonfinite_steps=(3,),
      debug_inject_nonfinite_task="tiny_rev",
    )
  assert _steps_on_disk(tmp_path) == [2]
  with pytest.raises(UserError, match=r"nonfinite_policy is 'stp' \(did you mean: stop"):
    _train(tmp_path / "x", 1, nonfinite_policy="stp")


# ---- disk errors mid-run -------------------------------------------------------------------
def _fail_metrics_after(monkeypatch, lines):
  calls = []
  original = metrics_writer.MetricsWriter._append  # pylint: disable=protected-access

  def append(self, data):
    calls.append(data)
    if len(calls) > lines:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    original(self, data)

  monkeypatch.setattr(metrics_writer.MetricsWriter, "_append", append)


def _fail_checkpoint_step(monkeypatch, step):
  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if f"/{step}" in str(self.get_final()):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "what",
  # Both run with the slow tests (default suite time), as does the read-only case below.
  [
    pytest.param("metrics", marks=pytest.mark.slow),
    pytest.param("checkpoint", marks=pytest.mark.slow),
  ],
)
def test_disk_full_mid_run_is_one_sentence_and_keeps_the_checkpoint(
  tmp_path, monkeypatch, what
):
  if what == "metrics":
    _fail_metrics_after(monkeypatch, 6)
    pattern = r"^Could not write .*metrics.jsonl \(No space left on device\); free some"
  else:
    _fail_checkpoint_step(monkeypatch, 8)
    pattern = (
      r"^Could not write checkpoint step 8 to .* \(No space left on device\); "
      r"the newest intact checkpoint is step 4: free some space"
    )
  with pytest.raises(UserError, match=pattern) as error:
    _train(tmp_path, 10, checkpoint_period=4)
  assert "\n" not in str(error.value)
  monkeypatch.undo()
  assert _steps_on_disk(tmp_path) == [4]
  # The same command again resumes from step 4 and finishes.
  assert _train(tmp_path, 10, checkpoint_period=4).step == 10
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, 11))


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  return (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
      capture_output=True,
      check=False,
    ).returncode
    == 0
  )


def _fill(directory):
  """Writes a file until the file system is full."""
  fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    while True:
      os.write(fd, b"\0" * 65536)
  except OSError as e:
    assert e.errno == errno.ENOSPC
  finally:
    os.close(fd)


@pytest.mark.slow
def test_disk_full_or_read_only_mid_run_exits_2_and_the_checkpoint_restores(tmp_path):
  """A real full disk (a small tmpfs, when this test may mount one) or, not as root,
  a MODEL_DIR made read-only, after step 4's checkpoint is committed."""
  disk = tmp_path / "disk"
  mounted = _mount_tmpfs(disk, "8m")
  if not mounted and os.geteuid() == 0:
    pytest.skip("root (permissions do not bind) and no tmpfs can be mounted")
  model_dir = disk / "run"
  proc = None
  try:
    proc = subprocess.Popen(
      _cli(model_dir, "--gin.TRAIN_STEPS=100000"),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    # Any committed step (step 4 itself may already be gone: keep=3).
    _wait_for(
      lambda: (
        model_dir.exists()
        and any(
          (model_dir / str(s) / "commit_success.txt").exists()
          for s in _steps_on_disk(model_dir)
        )
      ),
      proc,
      what="a committed checkpoint",
    )
    if mounted:
      _fill(disk)
    else:
      os.chmod(model_dir, 0o555)
    _, err = proc.communicate(timeout=300)
    if not mounted:
      os.chmod(model_dir, 0o755)
    assert proc.returncode == 2, err[-3000:]
    # Orbax and tensorstore log their own errors from background threads, some while
    # mtx reports and some after (the race of a disk filling during an asynchronous
    # save); mtx's sentence is one whole line of its own, and the last.
    lines = err.splitlines()
    ours = [line for line in lines if line.startswith("mtx: error: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # one line each without --verbose
    assert re.match(
      r"mtx: error: Could not write .*(No space left on device|"
      r"Permission denied)",
      ours[0],
    ), ours[0]
    if mounted:
      os.remove(disk / "filler")
    steps = _steps_on_disk(model_dir)
    assert steps and min(steps) >= 4
    state, _ = _saved_state(model_dir, max(steps))
    assert int(state["step"]) == max(steps)
  finally:
    if proc is not None and proc.poll() is None:
      proc.kill()
      proc.wait()
    if mounted:
      subprocess.run(["umount", str(disk)], check=False)


def _fail_one_item_now_and_the_other_late(monkeypatch, late_s):
  """From ``full.set()``: the data_state item fails at once with ENOSPC and the state's
  arrays ``late_s`` later, as when the disk fills during an asynchronous save: orbax
  reports the first failure while the arrays' writer threads still run."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  from orbax.checkpoint._src.serialization import serialization

  full = threading.Event()
  save_json = json_handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
  write_array = serialization.async_serialize_from_host

  async def json_fails_now(self, item, directory):
    if full.is_set():
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    await save_json(self, item, directory)

  async def array_fails_late(*args, **kwargs):
    if full.is_set():
      await asyncio.sleep(late_s)
      raise OSError(errno.ENOSPC, f"late: {os.strerror(errno.ENOSPC)}")
    return await write_array(*args, **kwargs)

  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", json_fails_now)
  monkeypatch.setattr(serialization, "async_serialize_from_host", array_fails_late)
  return full


def test_a_save_failing_while_its_other_writers_run_ends_them_before_close(
  tmp_path, monkeypatch, caplog
):
  """The race of a disk filling during an asynchronous save, made deterministic: close
  raises the one-sentence error only after the save's last writer thread has ended (and
  logged), so no write of it lands later, and the step is written again intact."""
  full = _fail_one_item_now_and_the_other_late(monkeypatch, late_s=1.0)
  state = {"params": {"w": jnp.arange(16.0).reshape(4, 4)}, "step": jnp.int32(4)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=4)
  ckpt.save(4, state, {"position": 4})
  ckpt.wait()
  full.set()
  before = set(threading.enumerate())
  ckpt.save(8, state, {"position": 8})
  with pytest.raises(
    checkpoint.CheckpointWriteError,
    match=r"^Could not write checkpoint step 8 .*\(No space left on device\); the "
    r"newest intact checkpoint is step 4",
  ):
    ckpt.close()
  assert [t.name for t in threading.enumerate() if t not in before] == []
  late = [r for r in caplog.records if r.exc_info and "late:" in str(r.exc_info[1])]
  assert late, "the late writer's error was not logged before close returned"
  assert _steps_on_disk(tmp_path) == [4]
  monkeypatch.undo()
  state = {**state, "step": jnp.int32(8)}
  with checkpoint.Checkpointer(str(tmp_path), save_period=4) as again:
    assert again.restore(jax.eval_shape(lambda: state))[0] == 4
    again.save(8, state, {"position": 8})
  saved, data_state = _saved_state(tmp_path, 8)
  _assert_trees_equal(saved, jax.tree.map(np.asarray, state))
  assert data_state == {"position": 8}


# The command line failing on a UserError while threads write to stderr as orbax's
# writers and tensorstore's callbacks do on a full disk: two log tracebacks all along,
# one prints a traceback's lines in pieces (as Python's C code does), and one logs only
# once main() has returned (at exit).
BACKGROUND_LOGS_MAIN = """
import logging, sys, threading, time
from mtx.cli import main as cli

def disk_full(thread):
  try:
    raise OSError(28, "No space left on device: " + "x" * 9000)
  except OSError:
    logging.getLogger("absl").error("[thread=%s] raised", thread, exc_info=True)

def all_along(log):
  while not logging.getLogger().handlers:
    time.sleep(0.001)
  while True:
    if log:
      disk_full("serialize_shardings")
    else:
      for piece in ('  File "', "base_events.py", '", line ', "806", "\\n"):
        sys.stderr.write(piece)
        time.sleep(0)  # lets another thread write in between
    time.sleep(0.001)

def at_exit():
  while threading.main_thread().is_alive():
    time.sleep(0.005)
  disk_full("write_metadata_after_commits")

class Callback:
  def __del__(self):
    raise RuntimeError("Event loop is closed")

def fails():
  raise RuntimeError("Event loop is closed")

def parse_gin(*args, parse=cli.parse_gin):
  Callback()  # Python reports its error as 'unraisable'
  threading.Thread(target=fails, name="callback").start()
  time.sleep(0.2)  # The threads write a while once the command line has set stderr up.
  return parse(*args)

for log in (True, True, False):
  threading.Thread(target=all_along, args=(log,), daemon=True).start()
threading.Thread(target=at_exit).start()
cli.parse_gin = parse_gin
cli.main()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_error_sentence_is_whole_and_last_while_threads_log(tmp_path, verbose):
  """mtx's sentence is one whole line of stderr, and its last unless --verbose; unless
  --verbose, a traceback a library logs, a thread's uncaught error and an unraisable
  one take one line each, and a line said already is not said again."""
  args = ["train", f"--gin_file={tmp_path / 'missing.gin'}"] + ["--verbose"] * verbose
  proc = subprocess.run(
    [sys.executable, "-c", BACKGROUND_LOGS_MAIN, *args],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  lines = proc.stderr.splitlines()
  ours = [i for i, line in enumerate(lines) if line.startswith("mtx: error: ")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(ours) == 1 and "missing.gin" in lines[ours[0]], proc.stderr[-3000:]
  assert proc.stderr.count("mtx: error: ") == 1  # ... and not glued into another line
  background = [line for line in lines if "[thread=" in line]
  assert background, proc.stderr[-3000:]
  pieces = [line for line in lines if "base_events.py" in line]
  assert pieces and set(pieces) == {'  File "base_events.py", line 806'}, pieces[:3]
  closed = [line for line in lines if line.startswith("RuntimeError: Event loop is")]
  assert len(closed) == 2 * verbose  # A thread's error and an unraisable one.
  if verbose:
    assert "Traceback (most recent call last)" in proc.stderr
    assert any("write_metadata_after_commits" in line for line in lines[ours[0] :])
  else:
    assert ours[0] == len(lines) - 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(background) == 1, background[:3]  # The same error, folded, is said once.
    assert re.match(
      r"ERROR absl: \[thread=serialize_shardings\] raised \(OSError: \[Errno 28\] No sp",
      background[0],
    ), background[0]
    closed = [line for line in lines if "Event loop is closed" in line]
    assert len(closed) == 2 and all(
      re.match(
        r"ERROR mtx\.cli\.main: Exception (ignored in: .*|in thread callback) "
        r"\(RuntimeError: Event loop is closed\)$",
        line,
      )
      for line in closed
    ), closed


# ---- kill -9 anywhere ------------------------------------------------------------------------
# The trainer's command line with orbax's commit slowed by argv[1] seconds, so that a test
# can kill the process while an asynchronous checkpoint save is in flight.
SLOW_SAVE_MAIN = """
import asyncio, sys
from orbax.checkpoint._src.path import atomicity
delay = float(sys.argv.pop(1))
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def slow_finalize(self):
  await asyncio.sleep(delay)
  await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
from mtx.cli import main as cli
cli.main()
"""


def _env():
  return dict(
    os.environ,
    PYTHONPATH=TESTS,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )


def _cli(model_dir, *extra, save_delay=None):
  main = (
    ["-m", "mtx", "train"]
    if save_delay is None
    else ["-c", SLOW_SAVE_MAIN, str(save_delay), "train"]
  )
  return [
    sys.executable,
    *main,
    "--gin_file=tests/tiny.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    *extra,
  ]


def _wait_for(predicate, proc, timeout=300, what="the condition"):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(
        f"process ended (status {proc.returncode}) before {what}: "
        f"{proc.stderr.read()[-3000:]}"
      )
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


def _logged(model_dir):
  return len(metrics_writer.read_metrics(str(model_dir)))


def _saves_in_flight(model_dir):
  return [
    int(p.split(".")[0]) for p in os.listdir(model_dir) if ".orbax-checkpoint-tmp" in p
  ]


def _losses(model_dir):
  rows = metrics_writer.read_metrics(str(model_dir))
  return [r["step"] for r in rows], np.array(
    [
      [r["loss"], r["loss/tiny_copy"], r["loss/tiny_rev"], r["nonfinite_steps"]]
      for r in rows
    ]
  )


@pytest.mark.slow
def test_kill_9_at_random_points_and_during_a_save_then_restart_is_bit_identical(
  tmp_path,
):
  """Three kill -9s of one run, at seeded random steps and while an async checkpoint
  save is in flight; each time the same command restarts it. Every logged loss and the
  final params equal an uninterrupted run's bit for bit."""
  steps, flags = 40, ("--gin.TRAIN_STEPS=40", "--gin.CHECKPOINT_PERIOD=4")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(
    _cli(straight, *flags),
    cwd=REPO,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=600,
  )
  rng = random.Random(20240607)
  first, last = rng.randint(2, 10), rng.randint(22, 30)

  def saving_past(resumed):
    """A save of a step after ``resumed`` is in flight and training went past it
    (metrics.jsonl was cut back to ``resumed`` on restart, so those lines are new)."""
    return lambda: any(
      s > resumed and _logged(killed) > s for s in _saves_in_flight(killed)
    )

  kills = [
    (f"after step {first}", {}, lambda _: lambda: _logged(killed) >= first),
    ("while a checkpoint save is in flight", {"save_delay": 3.0}, saving_past),
    (f"after step {last}", {}, lambda _: lambda: _logged(killed) >= last),
  ]
  for what, kw, make_predicate in kills:
    resumed = max(_steps_on_disk(killed), default=0) if killed.exists() else 0
    predicate = make_predicate(resumed)
    proc = subprocess.Popen(
      _cli(killed, *flags, **kw),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    _wait_for(
      lambda p=predicate: os.path.isdir(killed) and p(),
      proc,
      what=f"kill {what} (resumed from step {resumed})",
    )
    in_flight = [s for s in _saves_in_flight(killed) if s > resumed]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if kw:
      assert in_flight, f"no save was in flight when killed {what}"
  subprocess.run(
    _cli(killed, *flags),
    cwd=REPO,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=600,
  )
  (steps_a, a), (steps_b, b) = _losses(straight), _losses(killed)
  assert steps_a == steps_b == list(range(1, steps + 1))
  np.testing.assert_array_equal(a, b)  # bit for bit, every logged step
  final_a, _ = _saved_state(straight, steps)
  final_b, _ = _saved_state(killed, steps)
  _assert_trees_equal(final_a, final_b)
  assert not _saves_in_flight(killed)


# ---- Ctrl-C, hangup, SIGTERM -----------------------------------------------------------------
def _cli_run(model_dir, *extra):
  """``mtx train`` of tests/tiny.gin in this process: its exit status (``cli.run``)."""
  gin.clear_config()
  try:
    return cli.run(
      [
        "train",
        f"--gin_file={os.path.join(TESTS, 'tiny.gin')}",
        f"--gin.MODEL_DIR='{model_dir}'",
        *extra,
      ]
    )
  finally:
    gin.clear_config()


def _signal_at(monkeypatch, step, *signums, swallow=False):
  """Sends ``signums`` to this process right after metrics.jsonl gets ``step``'s line;
  ``swallow`` catches a KeyboardInterrupt there, as a JAX or gc callback would."""
  write = metrics_writer.MetricsWriter.write

  def write_then_signal(self, at, scalars):
    write(self, at, scalars)
    if at == step:
      for signum in signums:
        try:
          signal.raise_signal(signum)  # The handler runs before this returns.
        except KeyboardInterrupt:
          if not swallow:
            raise

  monkeypatch.setattr(metrics_writer.MetricsWriter, "write", write_then_signal)


@pytest.fixture
def guard():
  """A no-op handler of SIGINT and SIGHUP while a test sends them to itself: a run that
  failed to catch them fails its test instead of ending pytest."""

  def ignore(signum, frame):
    del signum, frame

  previous = {s: signal.signal(s, ignore) for s in (signal.SIGINT, signal.SIGHUP)}
  yield ignore
  for signum, handler in previous.items():
    signal.signal(signum, handler)


def _logged_steps(model_dir):
  return [r["step"] for r in metrics_writer.read_metrics(str(model_dir))]


# SIGHUP takes the same path as SIGINT; it runs with the slow tests (suite time).
@pytest.mark.parametrize(
  "sig,status",
  [("SIGINT", 130), pytest.param("SIGHUP", 129, marks=pytest.mark.slow)],
)
def test_sigint_and_sighup_save_the_step_exit_128_plus_n_and_the_run_resumes(
  tmp_path, monkeypatch, capfd, guard, sig, status
):
  """The signal arrives inside a callback that swallows exceptions: nothing is lost, the
  run saves the step it was on (6; the periodic checkpoint is 4) and stops with
  128 + the signal's number; the same command resumes at step 7."""
  monkeypatch.setattr(os, "isatty", lambda fd: False)  # Leave pytest's terminal alone.
  _signal_at(monkeypatch, 6, getattr(signal, sig), swallow=True)
  assert _cli_run(tmp_path, "--gin.TRAIN_STEPS=100") == status
  out = capfd.readouterr()
  assert out.out.strip().splitlines()[-1] == (
    f"Interrupted by {sig}: saved step 6; run the same command again to resume."
  )
  assert f"mtx: {sig}: saving after the current step" in out.err
  assert _steps_on_disk(tmp_path) == [4, 6]
  assert _logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  assert not os.path.exists(tmp_path / lock_lib.LOCK_FILE)
  assert signal.getsignal(signal.SIGINT) is guard  # Put back as found.
  assert signal.getsignal(signal.SIGHUP) is guard
  monkeypatch.undo()
  assert _cli_run(tmp_path, "--gin.TRAIN_STEPS=8") == 0
  assert _logged_steps(tmp_path) == list(range(1, 9))
  assert _steps_on_disk(tmp_path)[-1] == 8


# The swallowed case is the harder one; the plain one runs with the slow tests.
@pytest.mark.parametrize(
  "swallow",
  [pytest.param(False, marks=pytest.mark.slow), True],
  ids=["raised", "swallowed"],
)
def test_a_second_sigint_aborts_at_once_and_the_checkpoint_restores(
  tmp_path, monkeypatch, guard, swallow
):
  """Two Ctrl-Cs at step 6: KeyboardInterrupt before anything else is saved, even when
  a callback swallowed it (it is raised again before the step's save); the lock is
  released, and step 4 restores."""
  flags = ("--gin.TRAIN_STEPS=100", "--gin_bindings=train.async_checkpoint = False")
  _signal_at(monkeypatch, 6, signal.SIGINT, signal.SIGINT, swallow=swallow)
  with pytest.raises(KeyboardInterrupt):  # `mtx` prints one line and exits 130.
    _cli_run(tmp_path, *flags)
  assert _steps_on_disk(tmp_path) == [4]
  assert not os.path.exists(tmp_path / lock_lib.LOCK_FILE)
  assert signal.getsignal(signal.SIGINT) is guard
  if not swallow:
    monkeypatch.undo()
    assert _cli_run(tmp_path, "--gin.TRAIN_STEPS=8", *flags[1:]) == 0
    assert _logged_steps(tmp_path) == list(range(1, 9))


@pytest.mark.slow
def test_ctrl_c_of_the_command_saves_and_twice_during_a_save_aborts(tmp_path, capsys):
  """``mtx train`` in a subprocess: while it runs, a second ``mtx train`` of its
  MODEL_DIR is refused naming it; Ctrl-C saves the step and exits 130; a restart,
  Ctrl-C'd twice while a checkpoint save is in flight, exits 130 at once with one line
  and the save is never taken for a step; the same command then finishes the run."""
  model_dir, flags = tmp_path / "run", ("--gin.TRAIN_STEPS=60",)
  proc = subprocess.Popen(
    _cli(model_dir, *flags),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for(lambda: model_dir.exists() and _logged(model_dir) >= 3, proc, what="3 steps")
  capsys.readouterr()
  gin.clear_config()
  with pytest.raises(SystemExit) as refused:
    cli.main(
      [
        "train",
        f"--gin_file={os.path.join(TESTS, 'tiny.gin')}",
        f"--gin.MODEL_DIR='{model_dir}'",
      ]
    )
  gin.clear_config()
  err = capsys.readouterr().err
  assert refused.value.code == 2 and err.count("\n") == 1, err
  assert f"is in use by another mtx train (pid {proc.pid} on host" in err, err
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  saved = int(re.search(r"Interrupted by SIGINT: saved step (\d+);", out).group(1))
  assert max(_steps_on_disk(model_dir)) == saved == _logged(model_dir)

  proc = subprocess.Popen(
    _cli(model_dir, *flags, save_delay=5.0),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for(
    lambda: any(s > saved for s in _saves_in_flight(model_dir)),
    proc,
    what="a save in flight",
  )
  in_flight = max(_saves_in_flight(model_dir))
  start = time.time()
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert time.time() - start < 5.0  # Not waiting for the 5 s commit.
  ours = [line for line in err.splitlines() if line.startswith("mtx: aborted")]
  assert len(ours) == 1 and "Traceback" not in err, err[-3000:]
  assert in_flight not in _steps_on_disk(model_dir)
  assert not os.path.exists(model_dir / lock_lib.LOCK_FILE)  # Removed on the way out.
  subprocess.run(
    _cli(model_dir, *flags), cwd=REPO, env=_env(), check=True, capture_output=True
  )
  assert [r["step"] for r in metrics_writer.read_metrics(str(model_dir))] == list(
    range(1, 61)
  )


# ---- two trainings of one MODEL_DIR ------------------------------------------------------
def test_a_model_dir_in_use_is_refused_naming_the_holder_and_left_untouched(tmp_path):
  """One sentence naming this host and the holder's pid; nothing of the run is changed."""
  _train(tmp_path, 2)
  before = {p: (tmp_path / p).stat().st_mtime_ns for p in os.listdir(tmp_path)}
  with lock_lib.ModelDirLock(str(tmp_path)):
    with pytest.raises(lock_lib.ModelDirInUseError) as error:
      _train(tmp_path, 4)
    lock_text = (tmp_path / lock_lib.LOCK_FILE).read_text()
  message = str(error.value)
  assert re.match(
    rf"^MODEL_DIR {re.escape(str(tmp_path))} is in use by another mtx train \(pid "
    rf"{os.getpid()} on host {re.escape(socket.gethostname())}, started .*\); wait for "
    r"that run to end or stop it, or choose another MODEL_DIR",
    message,
  ), message
  assert "\n" not in message
  assert json.loads(lock_text)["pid"] == os.getpid()
  after = {p: (tmp_path / p).stat().st_mtime_ns for p in os.listdir(tmp_path)}
  assert after == before  # The lock file is gone again too.
  assert _logged_steps(tmp_path) == [1, 2]


@pytest.mark.slow  # suite time; the lock held by a live run stays in the default suite
def test_a_stale_lock_does_not_block_and_a_refused_fresh_dir_leaves_nothing(tmp_path):
  """A lock file left by a process killed with -9 (its kernel lock died with it), or
  one naming a pid of this host that is not running, is replaced; the lock is released
  however the run ends, and a MODEL_DIR that a bad setting stopped is not left behind."""
  killed, written = tmp_path / "killed", tmp_path / "written"
  holder = (
    "import os, sys\nfrom mtx.runtime import lock\n"
    "lock.ModelDirLock(sys.argv[1]).acquire()\nos.kill(os.getpid(), 9)\n"
  )
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, "-c", holder, str(killed)], env=env, check=False)
  assert os.path.exists(killed / lock_lib.LOCK_FILE)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  os.makedirs(written)
  (written / lock_lib.LOCK_FILE).write_text(
    json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "x"})
  )
  assert _train(killed, 2).step == 2
  assert not os.path.exists(killed / lock_lib.LOCK_FILE)  # Released at the end.
  with lock_lib.ModelDirLock(str(written)) as taken:
    assert json.loads((written / lock_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert taken.held
  assert os.listdir(written) == []
  fresh = tmp_path / "fresh" / "run"
  with pytest.raises(UserError, match="did you mean: tiny"):
    loop_train(
      model_dir=str(fresh),
      mixture_or_task_name="tinyy",
      task_feature_lengths={"inputs": 16, "targets": 16},
      train_steps=2,
    )
  assert not os.path.exists(tmp_path / "fresh")


# ---- atomic writes, no pickle ------------------------------------------------------------
def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "config.gin"
  metrics_writer.write_atomically(str(path), "old = 1\n")

  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(
    metrics_writer.WriteError,
    match=r"^Could not write .*config.gin \(No space left on device\)",
  ):
    metrics_writer.write_atomically(str(path), "new = 2\n")
  assert path.read_text() == "old = 1\n"
  assert os.listdir(tmp_path) == ["config.gin"]  # No temporary file left behind.


def test_no_pickle_in_code_or_checkpoints(tmp_path):
  pattern = re.compile(
    r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|"
    r"allow_pickle\s*=\s*True|torch\.load",
    re.M,
  )
  offenders = []
  for folder in ("mtx", "tools", "mixtures"):
    for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
      with open(path, encoding="utf-8") as f:
        if pattern.search(f.read()):
          offenders.append(os.path.relpath(path, REPO))
  assert not offenders, offenders
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(
    1,
    {"params": {"w": np.ones((4, 4), np.float32)}, "step": np.int32(1)},
    {"position": 1},
  )
  ckpt.close()
  for path in glob.glob(str(tmp_path / "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        head = f.read(2)
      # Every pickle protocol >= 2 stream starts with PROTO (0x80) and the version.
      assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), path
