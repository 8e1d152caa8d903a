"""mtx.paths, the one filesystem layer, on a fake remote filesystem (fsspec's
``memory://``: no network) and on bad URLs."""

import importlib
import os
import sys
import uuid

import gin
import numpy as np
import pytest
import safetensors.numpy

import mtx.cli.configurables  # noqa: F401  (registers train, evaluate, infer with gin)
from mtx import paths
from mtx.cli import main as cli
from mtx.errors import UserError
from mtx.runtime import hf, metrics_writer, pretrained, safetensors_io
from mtx.train.settings import LoopSettings


def _bucket():
  """A fresh directory on the fake remote (memory:// is one store per process)."""
  return f"memory://bucket-{uuid.uuid4().hex[:8]}/run"


def test_write_atomically_on_a_remote_writes_one_whole_object_and_no_temporary():
  run = _bucket()
  path = paths.join(run, "config.gin")
  paths.write_atomically(path, "old = 1\n")
  paths.write_atomically(path, b"new = 2\n")
  assert paths.read_text(path) == "new = 2\n"
  assert paths.listdir(run) == ["config.gin"]
  assert paths.isfile(path) and paths.isdir(run) and not paths.exists(path + "x")


def test_join_dirname_basename_keep_the_scheme():
  assert paths.join("gs://b/run", "eval", "step_1.json") == "gs://b/run/eval/step_1.json"
  assert paths.dirname("gs://b/run/eval/") == "gs://b/run"
  assert paths.dirname("gs://b") == "gs://b"
  assert paths.basename("gs://b/run/") == "run"
  assert paths.scheme("GS://b") == "gs" and paths.scheme("/tmp/a:b") is None


def _metrics_story(model_dir):
  """Write, reopen and append, resume at step 2 (truncate), append: what a run and
  its resumption do to metrics.jsonl."""
  with metrics_writer.MetricsWriter(model_dir, tensorboard=False) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": step / 10, "loss/a": float("nan")})
  with metrics_writer.MetricsWriter(model_dir, tensorboard=False) as w:
    w.write(4, {"loss": 0.4})
  metrics_writer.truncate_after(model_dir, 2)
  with metrics_writer.MetricsWriter(model_dir, tensorboard=False) as w:
    w.write(3, {"loss": 0.35})
  return metrics_writer.read_metrics(model_dir)


def test_metrics_on_a_remote_append_truncate_and_read_as_locally(tmp_path):
  remote, local = _metrics_story(_bucket()), _metrics_story(str(tmp_path))
  assert [r["step"] for r in remote] == [1, 2, 3]
  assert [r["loss"] for r in remote] == [0.1, 0.2, 0.35]
  assert np.isnan(remote[0]["loss/a"])
  assert str(remote) == str(local)


def test_tensorboard_on_a_url_tensorflow_cannot_write_is_one_sentence():
  with pytest.raises(paths.WriteError, match=r"TensorBoard events cannot be written to "):
    metrics_writer.MetricsWriter(_bucket(), tensorboard=True)


@pytest.mark.parametrize(
  "url,pattern",
  [
    ("foo://x/run", r"^MODEL_DIR=foo://x/run: no filesystem is installed for foo://"),
    ("s3://b/run", r"^MODEL_DIR=s3://b/run: no filesystem .*; pip install s3fs\.$"),
  ],
)
def test_a_scheme_without_a_filesystem_is_one_sentence_with_the_fix(url, pattern):
  pytest.importorskip("fsspec")
  if url.startswith("s3") and _installed("s3fs"):
    pytest.skip("s3fs is installed here")
  with pytest.raises(UserError, match=pattern):
    paths.check_reachable("MODEL_DIR", url, write=True)


def _installed(module):
  try:
    __import__(module)
  except ImportError:
    return False
  return True


def test_a_model_dir_orbax_cannot_write_is_refused_with_the_setting():
  with pytest.raises(
    UserError, match=r"^MODEL_DIR=memory://b/run: mtx checkpoints .* gs://"
  ):
    LoopSettings(model_dir="memory://b/run", train_steps=1)


def test_train_on_an_unreachable_model_dir_exits_2_before_building(
  tmp_path, monkeypatch, capsys
):
  """A missing filesystem fails in one sentence, before the mixture or model is built
  and with nothing written (the working directory stays empty)."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
  tiny_gin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")
  gin.clear_config()
  with pytest.raises(SystemExit) as exit_info:  # main() exits with the status
    cli.main(
      [
        "train",
        f"--gin_file={tiny_gin}",
        "--gin.MODEL_DIR='foo://bucket/run'",
        "--gin.TRAIN_STEPS=1",
      ]
    )
  gin.clear_config()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("mtx: error: MODEL_DIR=foo://bucket/run: ")
  assert not os.listdir(tmp_path)


def _copy_to(remote, local_dir):
  for name in os.listdir(local_dir):
    with open(os.path.join(local_dir, name), "rb") as f:
      paths.write_atomically(paths.join(remote, name), f.read())


def test_remote_safetensors_reads_what_safe_open_reads(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "w": rng.standard_normal((5, 3)).astype(np.float32),
    "h": rng.standard_normal((4, 6)).astype(np.float16),
    "b": rng.standard_normal((7,)).astype(np.float32),
  }
  data = safetensors.numpy.save(tensors, metadata={"format": "pt"})
  local = tmp_path / "m.safetensors"
  local.write_bytes(data)
  remote = paths.join(_bucket(), "m.safetensors")
  paths.write_atomically(remote, data)
  a, b = (
    safetensors_io.open_safetensors(str(local)),
    safetensors_io.open_safetensors(remote),
  )
  assert sorted(a.keys()) == b.keys()
  for name in ("w", "h"):
    sa, sb = a.get_slice(name), b.get_slice(name)
    assert sa.get_shape() == sb.get_shape() and sa.get_dtype() == sb.get_dtype()
    for index in ((slice(1, 3), slice(0, 2)), (slice(None), slice(2, 3)), (slice(2, 2),)):
      np.testing.assert_array_equal(sa[index], sb[index])
  np.testing.assert_array_equal(b.get_slice("b")[2:5], tensors["b"][2:5])


def test_a_hugging_face_directory_on_a_remote_reads_as_locally():
  local = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_t5_v1_1"
  )
  remote = _bucket()
  _copy_to(remote, local)
  a, b = pretrained.open_reader(local, "X"), pretrained.open_reader(remote, "X")
  try:
    assert a.model_config() == b.model_config() and a.names() == b.names()
    for name, (shape, _) in a.names().items():
      index = tuple(slice(0, max(1, n // 2)) for n in shape)
      np.testing.assert_array_equal(a.read(name, index), b.read(name, index))
  finally:
    a.close(), b.close()


def test_the_cli_imports_a_task_module_from_the_working_directory(tmp_path, monkeypatch):
  """``MIXTURE_OR_TASK_MODULE='my_tasks'`` finds ./my_tasks.py, as ``python -m`` would,
  though a console script's sys.path starts at the venv's bin/."""
  (tmp_path / "my_tasks_fs_test.py").write_text("VALUE = 7\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
  with pytest.raises(ImportError):
    importlib.import_module("my_tasks_fs_test")
  cli.import_from_working_directory()
  assert importlib.import_module("my_tasks_fs_test").VALUE == 7
  sys.modules.pop("my_tasks_fs_test", None)


def test_a_gin_file_on_a_remote_parses_with_its_includes():
  """``--gin_file=gs://.../run.gin`` works as T5X's does: gin reads URLs through
  mtx.paths, and the file's includes come from the search paths (runs/train.gin)."""
  here = os.path.dirname(os.path.abspath(__file__))
  with open(os.path.join(here, "tiny.gin"), encoding="utf-8") as f:
    text = f.read().replace("TRAIN_STEPS = 12", "TRAIN_STEPS = 7")
  remote = paths.join(_bucket(), "tiny.gin")
  paths.write_atomically(remote, text)
  gin.clear_config()
  try:
    cli.parse_gin([remote], [], [], [], ())
    assert gin.query_parameter("%TRAIN_STEPS") == 7
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "tiny"
  finally:
    gin.clear_config()


def test_a_url_that_cannot_be_written_is_one_sentence_naming_the_setting(tmp_path):
  """fsspec's file:// under a regular file stands in for a bucket that refuses writes."""
  (tmp_path / "afile").write_text("x")
  url = f"file://{tmp_path}/afile/run"
  with pytest.raises(
    UserError, match=rf"^EXPORT_DIR={url} cannot be written \(.*\); check"
  ):
    paths.check_reachable("EXPORT_DIR", url, write=True)
  paths.check_reachable("EXPORT_DIR", f"file://{tmp_path}/new/run", write=True)
  assert os.listdir(tmp_path) == ["afile"]  # the probe is gone, no directory made


def test_an_export_to_a_remote_reads_back_the_same_weights():
  """``hf.export`` to an EXPORT_DIR URL writes config.json, model.safetensors and
  spiece.model whole, and the remote reader gets the same arrays back."""
  local = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_t5_v1_0"
  )
  source = pretrained.open_reader(local, "X")
  try:
    params = {name: source.read(name) for name in source.names()}
    config = source.config_type()(**source.model_config())
  finally:
    source.close()
  out = _bucket()
  spiece = os.path.join(local, "spiece.model")
  written = hf.export(
    params, config, out, spiece_path=spiece if os.path.isfile(spiece) else None
  )
  assert sorted(paths.basename(p) for p in written) == paths.listdir(out)
  back = pretrained.open_reader(out, "X")
  try:
    for name, value in params.items():
      np.testing.assert_array_equal(back.read(name), value)
  finally:
    back.close()
