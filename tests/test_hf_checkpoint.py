"""Hugging Face T5 checkpoints in and out (issue #13), on the committed tiny fixtures.

tests/fixtures/hf_t5_v1_0 (ReLU, tied, float32, one file) and hf_t5_v1_1 (gated GELU,
untied, bfloat16, sharded) were written by tools/make_hf_fixtures.py with transformers,
with hf_reference.npz holding transformers' float32 logits and greedy outputs.
"""

import importlib.util
import json
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy's bfloat16, for reading the fixture back)
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from mtx import parallel
from mtx.cli import main as cli
from mtx.data import vocab
from mtx.model import T5Config
from mtx.runtime import checkpoint, pretrained
from mtx.runtime import params as params_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
V1_0, V1_1 = (os.path.join(FIXTURES, n) for n in ("hf_t5_v1_0", "hf_t5_v1_1"))
REFERENCE = np.load(os.path.join(FIXTURES, "hf_reference.npz"))
_spec = importlib.util.spec_from_file_location(
  "make_t5x_fixture", os.path.join(HERE, "..", "tools", "make_t5x_fixture.py")
)
make_t5x_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_t5x_fixture)
INPUT_TEXTS = ["sort: c a b", "copy: hello world", "reverse: abc"]  # the tool's


def _cli(*args):
  gin.clear_config()
  try:
    return cli.run(list(args))
  finally:
    gin.clear_config()


def _run_args(command, model_dir, *extra):
  return [
    command,
    "--gin_file=tests/hf.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    *extra,
  ]


def _load(path, scan_layers=False, mesh_shape=None, devices=None):
  model_config, vocabulary_path = pretrained.resolve(
    path, T5Config(scan_layers=scan_layers), None, "INFER_CHECKPOINT_PATH"
  )
  mesh = parallel.make_mesh(mesh_shape, devices)
  model, params, _ = params_lib.load_trained(
    model_config,
    vocab.get_vocabulary(vocabulary_path).vocab_size,
    mesh,
    parallel.DEFAULT_RULES,
    path,
    what="INFER_CHECKPOINT_PATH",
  )
  return model, params


@pytest.mark.parametrize(
  "name,scan,mesh_shape",
  [
    ("hf_t5_v1_0", False, None),
    ("hf_t5_v1_1", True, {"data": 2, "fsdp": 2, "tensor": 2}),
  ],
)
def test_logits_equal_transformers(name, scan, mesh_shape):
  """Both architectures, unscanned on one device and scanned on a sharded 8-device mesh."""
  devices = None if mesh_shape else jax.devices()[:1]
  model, params = _load(os.path.join(FIXTURES, name), scan, mesh_shape, devices)
  logits = model.apply(
    {"params": params},
    jnp.asarray(REFERENCE["encoder_ids"]),
    jnp.asarray(REFERENCE["decoder_ids"]),
  )
  np.testing.assert_allclose(logits, REFERENCE[f"{name}/logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [V1_0, V1_1])
def test_reading_a_slice_reads_that_part(path):
  """What a device's shard asks for equals that part of the whole, for every layout
  (transposed, heads split from [H*D, E] and [E, H*D])."""
  reader = pretrained.open_reader(path, "X")
  rng = np.random.default_rng(0)
  try:
    for name, (shape, dtype) in reader.names().items():
      assert dtype == ("float32" if path == V1_0 else "bfloat16")
      whole = reader.read(name)
      assert whole.shape == shape and whole.dtype == np.float32
      starts = [int(rng.integers(0, n)) for n in shape]
      index = tuple(
        slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, shape)
      )
      np.testing.assert_array_equal(reader.read(name, index), whole[index])
  finally:
    reader.close()


def test_float16_files_read_exactly(tmp_path):
  d = _copy(tmp_path, V1_0)
  halves = {k: v.astype(np.float16) for k, v in _tensors(d).items()}
  (d / "model.safetensors").write_bytes(safetensors.numpy.save(halves))
  reader, original = (
    pretrained.open_reader(str(d), "X"),
    pretrained.open_reader(V1_0, "X"),
  )
  try:
    for name, (_, dtype) in reader.names().items():
      assert dtype == "float16"
      want = original.read(name).astype(np.float16).astype(np.float32)
      np.testing.assert_array_equal(reader.read(name), want)
  finally:
    reader.close()
    original.close()


def test_config_and_vocabulary_come_from_the_directory():
  config, vocabulary_path = pretrained.resolve(V1_0, T5Config(), None, "X")
  assert (config.emb_dim, config.num_encoder_layers, config.vocab_size) == (32, 2, 896)
  assert config.mlp_activations == ("relu",) and config.logits_via_embedding
  assert vocab.get_vocabulary(vocabulary_path).vocab_size == 709 + 100  # 100 extra ids
  config, _ = pretrained.resolve(V1_1, T5Config(dropout_rate=0.1), None, "X")
  assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
  assert config.dropout_rate == 0.1  # gin's runtime settings stay


@pytest.mark.parametrize(
  "name", [pytest.param("hf_t5_v1_0", marks=pytest.mark.slow), "hf_t5_v1_1"]
)
def test_greedy_infer_equals_transformers_generate(tmp_path, name):
  inputs = tmp_path / "in.txt"
  inputs.write_text("\n".join(INPUT_TEXTS) + "\n")
  out = tmp_path / "out.jsonl"
  status = _cli(
    *_run_args(
      "infer",
      tmp_path / "run",
      "--gin.INITIAL_CHECKPOINT_PATH=None",
      f"--gin.INFER_CHECKPOINT_PATH='{os.path.join(FIXTURES, name)}'",
      f"--gin.INFER_INPUT='{inputs}'",
      f"--gin.INFER_OUTPUT='{out}'",
      "--gin.INFER_TASK='hf_copy'",
      "--gin.INFER_PREPROCESS='tokenize'",
      "--gin.INFER_MAX_DECODE_LENGTH=8",
    )
  )
  assert status == 0
  vocabulary = vocab.get_vocabulary(os.path.join(FIXTURES, name))
  expected = []
  for ids in REFERENCE[f"{name}/generated"].tolist():
    ids = ids[: ids.index(1)] if 1 in ids else ids
    expected.append(vocabulary.decode(ids))
  got = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
  assert got == expected


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """A one-step fine-tune of the v1.1 fixture with runs/finetune.gin."""
  model_dir = tmp_path_factory.mktemp("ft")
  assert (
    _cli(*_run_args("train", model_dir, f"--gin.INITIAL_CHECKPOINT_PATH='{V1_1}'")) == 0
  )
  return model_dir


def test_finetune_one_step_from_hf(finetuned):
  lines = (finetuned / "metrics.jsonl").read_text().splitlines()
  last = json.loads(lines[-1])
  assert last["step"] == 1 and np.isfinite(last["loss/hf_copy"])


def test_infer_from_the_finetuned_run(finetuned, tmp_path):
  """The run's model comes from its INITIAL_CHECKPOINT_PATH, as in training."""
  inputs = tmp_path / "in.txt"
  inputs.write_text("a b c d\n")
  out = tmp_path / "out.jsonl"
  status = _cli(
    *_run_args(
      "infer",
      finetuned,
      f"--gin.INITIAL_CHECKPOINT_PATH='{V1_1}'",
      f"--gin.INFER_INPUT='{inputs}'",
      f"--gin.INFER_OUTPUT='{out}'",
      "--gin.INFER_TASK='hf_rev'",
      "--gin.INFER_MAX_DECODE_LENGTH=4",
    )
  )
  assert status == 0 and len(out.read_text().splitlines()) == 1


@pytest.mark.slow
def test_finetune_v1_0_with_pcgrad(tmp_path):
  status = _cli(
    *_run_args(
      "train",
      tmp_path,
      "--gin_file=mtl/pcgrad.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{V1_0}'",
    )
  )
  assert status == 0
  assert (
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
  )


def test_byt5_directory_reads_bytes(tmp_path):
  d = tmp_path / "byt5"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"vocab_size": 384}))
  assert vocab.get_vocabulary(str(d)).vocab_size == 384  # seqio's ByteVocabulary
  (d / "config.json").write_text(json.dumps({"vocab_size": 32128}))
  with pytest.raises(vocab.UserError, match="has no spiece.model"):
    vocab.get_vocabulary(str(d))


@pytest.mark.slow
def test_eval_of_the_finetuned_run(finetuned):
  status = _cli(
    *_run_args(
      "eval",
      finetuned,
      f"--gin.INITIAL_CHECKPOINT_PATH='{V1_1}'",
      "--gin.EVAL_BATCH_SIZE=8",
    )
  )
  assert status == 0 and (finetuned / "eval" / "step_1.json").exists()


@pytest.mark.slow
def test_eval_of_hf_directory(tmp_path):
  status = _cli(
    *_run_args(
      "eval",
      tmp_path,
      "--gin.INITIAL_CHECKPOINT_PATH=None",
      f"--gin.EVAL_CHECKPOINT_PATH='{V1_1}'",
      "--gin.EVAL_BATCH_SIZE=8",
    )
  )
  assert status == 0 and (tmp_path / "eval" / "step_0.json").exists()


def _export(tmp_path, source, model_dir, initial="None", *extra):
  out = tmp_path / "export"
  status = _cli(
    *_run_args(
      "export",
      model_dir,
      f"--gin.INITIAL_CHECKPOINT_PATH={initial}",
      f"--gin.EXPORT_CHECKPOINT_PATH={source}",
      f"--gin.EXPORT_DIR='{out}'",
      *extra,
    )
  )
  assert status == 0
  return out


def _tensors(directory):
  out = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(directory, file), "numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def test_export_round_trip_is_bit_identical(tmp_path):
  """HF -> mtx -> HF: the v1.0 file byte for byte; v1.1's (bfloat16, sharded) tensors
  exactly, in float32; the vocabulary copied; config.json's architecture kept."""
  out = _export(tmp_path / "a", f"'{V1_0}'", tmp_path / "run")
  with (
    open(out / "model.safetensors", "rb") as f,
    open(f"{V1_0}/model.safetensors", "rb") as g,
  ):
    assert f.read() == g.read()
  with open(out / "spiece.model", "rb") as f, open(vocab.DEFAULT_SPM_PATH, "rb") as g:
    assert f.read() == g.read()
  out = _export(tmp_path / "b", f"'{V1_1}'", tmp_path / "run")
  original, exported = _tensors(V1_1), _tensors(out)
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    assert exported[name].dtype == np.float32
    np.testing.assert_array_equal(exported[name], value.astype(np.float32))
  # A model that scans its layers exports the same file.
  scanned = _export(
    tmp_path / "c",
    f"'{V1_1}'",
    tmp_path / "run",
    "None",
    "--gin.model.T5Config.scan_layers=True",
  )
  assert (scanned / "model.safetensors").read_bytes() == (
    out / "model.safetensors"
  ).read_bytes()
  config = json.loads((out / "config.json").read_text())
  with open(f"{V1_1}/config.json") as f:
    reference = json.load(f)
  for key in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size",
              "feed_forward_proj", "tie_word_embeddings"):  # fmt: skip
    assert config[key] == reference[key], key


def test_export_of_a_finetuned_run_reloads_the_same_params(finetuned, tmp_path):
  out = _export(tmp_path, "None", finetuned, initial=f"'{V1_1}'")
  config, _ = pretrained.resolve(str(out), T5Config(), None, "X")
  model = params_lib.T5(config)
  boxed, abstract = params_lib.abstract_params(model, 8, 8)
  exported = pretrained.load(str(out), abstract, False, "X")
  trained = checkpoint.load_params(str(finetuned), abstract)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- bad input: one sentence, exit 2, nothing written --------------------------------


def _copy(tmp_path, source, name="ckpt"):
  target = tmp_path / name
  shutil.copytree(source, target)
  return target


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def _neither(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "weights.bin").write_bytes(b"x")
  return tmp_path / "ckpt"


def _unsupported(tmp_path):
  d = _copy(tmp_path, V1_0)
  _edit_config(d, architectures=["BartForConditionalGeneration"], model_type="bart")
  return d


def _wrong_shape(tmp_path):
  d = _copy(tmp_path, V1_0)
  _edit_config(d, d_ff=96)
  return d


def _missing_shard(tmp_path):
  d = _copy(tmp_path, V1_1)
  os.remove(d / "model-00002-of-00003.safetensors")
  return d


def _truncated_shard(tmp_path):
  d = _copy(tmp_path, V1_1)
  path = d / "model-00002-of-00003.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  return d


def _missing_key(tmp_path):
  d = _copy(tmp_path, V1_0)
  config = json.loads((d / "config.json").read_text())
  del config["d_kv"]
  (d / "config.json").write_text(json.dumps(config))
  return d


def _small_embedding(tmp_path):
  """A consistent checkpoint whose embedding (768 rows) is smaller than its vocabulary
  (709 pieces + 100 extra ids)."""
  d = _copy(tmp_path, V1_0)
  tensors = _tensors(d)
  tensors["shared.weight"] = tensors["shared.weight"][:768]
  (d / "model.safetensors").write_bytes(safetensors.numpy.save(tensors))
  _edit_config(d, vocab_size=768)
  return d


_BAD = [
  ("neither_format", _neither, [], "is neither an mtx checkpoint"),
  (
    "unsupported_architecture",
    _unsupported,
    [],
    "BartForConditionalGeneration.*loads T5",
  ),
  (
    "shape_not_config",
    _wrong_shape,
    [],
    r"DenseReluDense.wi.weight is \[64, 32\].*\[96, 32\]",
  ),
  ("config_missing_key", _missing_key, [], "config.json lacks d_kv"),
  ("missing_shard", _missing_shard, [], "model-00002-of-00003.safetensors is missing"),
  (
    "truncated_shard",
    _truncated_shard,
    [],
    "model-00002-of-00003.safetensors is damaged",
  ),
  ("vocabulary_too_big", _small_embedding, [], "809 ids but its embedding only 768"),
  (
    "gin_contradicts",
    lambda tmp_path: V1_0,
    ["--gin.model.T5Config.num_encoder_layers=3"],
    "num_encoder_layers = 3 contradicts INITIAL_CHECKPOINT_PATH",
  ),
]


@pytest.mark.parametrize("case,make,args,pattern", _BAD, ids=[c[0] for c in _BAD])
def test_bad_checkpoint_one_sentence(tmp_path, capsys, case, make, args, pattern):
  import re

  path = make(tmp_path)
  model_dir = tmp_path / "run"
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(
      _run_args("train", model_dir, f"--gin.INITIAL_CHECKPOINT_PATH='{path}'", *args)
    )
  gin.clear_config()
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2, err
  assert err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err), err
  written = [f for _, _, files in os.walk(model_dir) for f in files]
  assert written == [], written


# ---- T5X checkpoints through the same settings --------------------------------------------
def _as_t5x(tmp_path, source=V1_1):
  """The Hugging Face fixture's params rewritten as a T5X checkpoint, the way
  tools/make_t5x_fixture.py writes T5X's format; the model comes from gin then."""
  reader = pretrained.open_reader(source, "INITIAL_CHECKPOINT_PATH")
  try:
    params = {name: reader.read(name) for name in reader.names()}
    defined = reader.model_config()
  finally:
    reader.close()
  t5x_dir = tmp_path / "t5x_run"
  make_t5x_fixture.write_t5x_checkpoint(params, str(t5x_dir), step=7)
  bindings = [f"--gin.model.T5Config.{k} = {v!r}" for k, v in defined.items()]
  return t5x_dir, T5Config(**defined), bindings


def test_t5x_checkpoint_gives_transformers_logits(tmp_path):
  """An independent reference for the T5X reader: the same weights in T5X's layout load
  to transformers' logits (the T5X model dir resolves to its newest checkpoint_N)."""
  t5x_dir, model_config, _ = _as_t5x(tmp_path)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model, params, _ = params_lib.load_trained(
    model_config,
    0,
    mesh,
    parallel.DEFAULT_RULES,
    str(t5x_dir),
    what="INFER_CHECKPOINT_PATH",
  )
  logits = model.apply(
    {"params": params},
    jnp.asarray(REFERENCE["encoder_ids"]),
    jnp.asarray(REFERENCE["decoder_ids"]),
  )
  np.testing.assert_allclose(logits, REFERENCE["hf_t5_v1_1/logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_finetune_one_step_from_t5x(tmp_path):
  """INITIAL_CHECKPOINT_PATH accepts a T5X model directory; gin gives the model and the
  vocabulary, as in T5X's fine-tuning configs."""
  t5x_dir, _, bindings = _as_t5x(tmp_path)
  model_dir = tmp_path / "ft"
  args = _run_args(
    "train",
    model_dir,
    f"--gin.INITIAL_CHECKPOINT_PATH='{t5x_dir}'",
    f"--gin.VOCABULARY='{os.path.join(V1_1, 'spiece.model')}'",
    *bindings,
  )
  assert _cli(*args) == 0
  last = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 1 and np.isfinite(last["loss/hf_copy"])


def test_export_into_a_run_or_onto_a_file_is_refused(finetuned, tmp_path, capsys):
  """A Hugging Face directory inside MODEL_DIR would shadow its checkpoints."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for export_dir, pattern in ((finetuned, "holds an mtx run"), (a_file, "is a file")):
    before = sorted(os.listdir(finetuned))
    gin.clear_config()
    with pytest.raises(SystemExit) as e:
      cli.main(_run_args("export", finetuned, f"--gin.EXPORT_DIR='{export_dir}'"))
    gin.clear_config()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and pattern in err and "\n" not in err, err
    assert sorted(os.listdir(finetuned)) == before


def test_eval_of_another_checkpoint_into_a_training_run_is_refused(finetuned, capsys):
  """Its results would overwrite the run's own eval/step_N.json and metrics.jsonl."""
  before = sorted(os.listdir(finetuned))
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(_run_args("eval", finetuned, f"--gin.EVAL_CHECKPOINT_PATH='{V1_1}'"))
  gin.clear_config()
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "holds checkpoints of its own run" in err, err
  assert sorted(os.listdir(finetuned)) == before
