"""Reading T5X checkpoints (mtx.runtime.t5x) on the committed fixture.

``tests/fixtures/t5x_tiny`` was written by ``tools/make_t5x_fixture.py`` from a tiny random
mtx T5 (``t5_config.json``; its params, in mtx's layout, in ``params.npz``): tensorstore
zarr arrays with gzip, the token embedding with zstd as T5X writes a jax.Array,
``encoder/layers_0/mlp/wi_0`` stored as bfloat16, and the layer-norm scales inline in the
msgpack.
"""

import json
import os
import pathlib
import shutil

import jax
import msgpack
import numpy as np
import pytest
from flax import serialization

from mtx.errors import UserError
from mtx.model.t5 import T5, T5Config
from mtx.runtime import params as params_lib
from mtx.runtime.t5x import is_t5x_checkpoint, open_t5x

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "t5x_tiny"
STEP_DIR = FIXTURE / "checkpoint_1"


@pytest.fixture(scope="module")
def written():
  with np.load(FIXTURE / "params.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def config():
  return T5Config(**json.loads((FIXTURE / "t5_config.json").read_text()))


def _nest(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def test_reading_the_fixture_gives_exactly_the_params_it_was_written_from(written):
  with open_t5x(str(STEP_DIR)) as reader:
    assert set(reader.names()) == set(written)
    for name, want in written.items():
      got = reader.read(name)
      assert got.dtype == np.float32 and got.shape == want.shape, name
      assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_names_and_shapes_match_the_models_abstract_params(config):
  _, abstract = params_lib.abstract_params(T5(config), 4, 4)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  want = {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}
  reader = open_t5x(str(STEP_DIR))
  assert {n: shape for n, (shape, _) in reader.names().items()} == want
  dtypes = {n: dtype for n, (_, dtype) in reader.names().items()}
  assert dtypes["encoder/layers_0/mlp/wi_0"] == "bfloat16"
  assert {d for n, d in dtypes.items() if n != "encoder/layers_0/mlp/wi_0"} == {"float32"}
  assert reader.model_config() is None


@pytest.mark.parametrize(
  "name,index",
  [
    ("encoder/layers_0/attention/query", (slice(None), slice(1, 2))),  # one head
    ("encoder/layers_0/attention/query", (slice(2, 5), slice(0, 2), slice(1, 3))),
    ("decoder/layers_1/encoder_decoder_attention/out", (slice(1, 2),)),
    ("decoder/layers_1/self_attention/out", (slice(None), slice(None, None, -2))),
    ("token_embedder/embedding", (slice(3, 17, 3), slice(2, None))),
    ("encoder/layers_0/mlp/wi_0", (slice(None), slice(4, 12))),  # bf16 on disk
    ("decoder/decoder_norm/scale", (slice(1, 6),)),  # inline in the msgpack
    ("encoder/relpos_bias/rel_embedding", ()),
  ],
)
def test_a_slice_read_equals_the_slice_of_the_whole_param(written, name, index):
  reader = open_t5x(str(STEP_DIR))
  got = reader.read(name, index)
  assert np.array_equal(got, written[name][index]), (name, index)


def test_the_model_gives_the_same_logits_with_the_read_params(written, config):
  model = T5(config)
  read = open_t5x(str(STEP_DIR))
  params = {n: read.read(n) for n in read.names()}
  tokens = np.array([[5, 9, 3, 1, 0, 0], [7, 2, 8, 4, 6, 1]], np.int32)
  decoder = np.array([[0, 4, 2, 0], [0, 3, 3, 9]], np.int32)
  logits = [
    np.asarray(model.apply({"params": _nest(p)}, tokens, decoder))
    for p in (written, params)
  ]
  assert np.array_equal(logits[0], logits[1])


def test_a_model_dir_reads_its_newest_checkpoint(tmp_path):
  shutil.copytree(STEP_DIR, tmp_path / "checkpoint_1")
  shutil.copytree(STEP_DIR, tmp_path / "checkpoint_20")
  (tmp_path / "checkpoint_3.tmp-123").mkdir()
  assert is_t5x_checkpoint(str(tmp_path))
  assert open_t5x(str(tmp_path)).path == str(tmp_path / "checkpoint_20")
  assert open_t5x(str(STEP_DIR / "checkpoint")).path == str(STEP_DIR)


def _one_sentence(e: pytest.ExceptionInfo, *words: str) -> None:
  message = str(e.value)
  assert message.count(". ") == 0 and message.endswith("."), message
  for word in words:
    assert word in message, (word, message)


def test_a_directory_that_is_not_t5x_is_refused(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
  assert not is_t5x_checkpoint(str(tmp_path))
  with pytest.raises(UserError) as e:
    open_t5x(str(tmp_path), what="INFER_CHECKPOINT_PATH")
  _one_sentence(e, "INFER_CHECKPOINT_PATH", str(tmp_path), "not a T5X checkpoint")
  assert not is_t5x_checkpoint(str(tmp_path / "missing"))
  (tmp_path / "1000" / "state").mkdir(parents=True)  # an mtx (orbax) MODEL_DIR
  assert not is_t5x_checkpoint(str(tmp_path))


def test_a_missing_array_directory_is_named(tmp_path):
  step = tmp_path / "checkpoint_1"
  shutil.copytree(STEP_DIR, step)
  shutil.rmtree(step / "target.decoder.layers_1.mlp.wo.kernel")
  with pytest.raises(UserError) as e:
    open_t5x(str(step))
  _one_sentence(
    e, "decoder/layers_1/mlp/wo/kernel", "target.decoder.layers_1.mlp.wo.kernel"
  )


def test_a_truncated_msgpack_is_refused(tmp_path):
  step = tmp_path / "checkpoint_1"
  shutil.copytree(STEP_DIR, step)
  blob = (step / "checkpoint").read_bytes()
  (step / "checkpoint").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(UserError) as e:
    open_t5x(str(step))
  _one_sentence(e, str(step / "checkpoint"), "truncated")


def test_an_unsupported_version_and_orbax_layout_are_refused(tmp_path):
  step = tmp_path / "checkpoint_1"
  shutil.copytree(STEP_DIR, step)
  contents = serialization.msgpack_restore((step / "checkpoint").read_bytes())
  contents["version"] = 1
  (step / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
  with pytest.raises(UserError) as e:
    open_t5x(str(step))
  _one_sentence(e, "version 1")

  orbax = tmp_path / "orbax" / "checkpoint_5"
  (orbax / "state").mkdir(parents=True)
  (orbax / "state" / "_METADATA").write_text("{}")
  assert is_t5x_checkpoint(str(orbax.parent))
  with pytest.raises(UserError) as e:
    open_t5x(str(orbax.parent))
  _one_sentence(e, "orbax", "use_orbax=False")


@pytest.mark.parametrize(
  "target,name",
  [  # scanned: the layer axis at 1 ([E, layers, H, D]), under encoder/encoder
    (
      {"encoder": {"attention": {"query": {"kernel": np.zeros([8, 2, 2, 4])}}}},
      "encoder/encoder/attention/query/kernel",
    ),
    (
      {"layers_0": {"relpos_bias": {"rel_embedding": np.zeros([2, 32])}}},
      "encoder/layers_0/relpos_bias/rel_embedding",
    ),
  ],
)
def test_scalable_t5_layouts_are_refused(tmp_path, target, name):
  step = tmp_path / "checkpoint_1"
  step.mkdir()
  target = {"encoder": target}
  blob = serialization.msgpack_serialize({"version": 3, "optimizer": {"target": target}})
  (step / "checkpoint").write_bytes(blob)
  with pytest.raises(UserError) as e:
    open_t5x(str(step))
  _one_sentence(e, "scalable_t5", name)


def test_the_msgpack_is_what_t5x_writes():
  """The structure T5X's ``checkpoint_utils.detect_checkpoint_type`` recognises."""
  raw = msgpack.unpackb((STEP_DIR / "checkpoint").read_bytes(), raw=False)
  assert set(raw) == {"version", "optimizer"} and raw["version"] == 3
  spec = raw["optimizer"]["target"]["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]
  assert spec == {
    "driver": "zarr",
    "dtype": "float32",
    "kvstore": {"driver": "file", "path": "target.decoder.layers_0.mlp.wo.kernel/"},
    "metadata": {
      "chunks": [16, 8],
      "compressor": {"id": "gzip", "level": 1},
      "shape": [16, 8],
    },
  }
  assert os.path.isfile(STEP_DIR / "target.decoder.layers_0.mlp.wo.kernel" / ".zarray")
