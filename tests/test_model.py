"""Tests of mtx.model: the T5 v1.1 module, its cache, SPMD names and gin files."""

import ast
import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx.errors import UserError
from mtx.model import T5, T5Config, init_cache, layers

TINY = T5Config(
  vocab_size=64,
  emb_dim=16,
  num_heads=2,
  head_dim=8,
  mlp_dim=32,
  num_encoder_layers=2,
  num_decoder_layers=2,
)
PARAM_AXES = {"vocab", "embed", "heads", "kv", "mlp", "relpos_buckets", "layers"}
GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "models"


def _config(**overrides) -> T5Config:
  return dataclasses.replace(TINY, **overrides)


def _batch(batch=2, enc_len=7, dec_len=5, seed=0):
  """Random tokens with some encoder padding; decoder inputs start with 0."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, TINY.vocab_size, (batch, enc_len))
  enc[0, enc_len - 2 :] = 0  # Row 0 has two padding tokens.
  dec = rng.integers(1, TINY.vocab_size, (batch, dec_len))
  dec[:, 0] = 0
  return jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32)


def _init(config, enc, dec):
  return T5(config).init(jax.random.key(0), enc, dec)


# Compiling dominates this file's run time on CPU; XLA's backend optimizations
# buy nothing for models this small, and skipping them saves about a third.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(_jit, static_argnums=(0, 1), static_argnames=("enable_dropout",))
def _apply(config, method, variables, *args, enable_dropout=False, rngs=None):
  """T5(config).<method>(*args), compiled once per config, method and shapes."""
  return T5(config).apply(
    variables, *args, method=getattr(T5, method), enable_dropout=enable_dropout, rngs=rngs
  )


@functools.cache
def _unrolled_params():
  """TINY-shaped random params, unboxed; made once for the whole file.

  Filled with numpy rather than ``init`` (whose initializers take seconds to
  compile on CPU); the scale mimics T5's initialization.
  """
  shapes = jax.eval_shape(lambda: nn.unbox(_init(TINY, *_batch())["params"]))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    else:
      fan_in = {
        "embedding": 1,
        "rel_embedding": 4,
        "out": leaf.shape[0] * leaf.shape[1],
      }.get(name, leaf.shape[0])
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _params(scan_layers: bool = False):
  """TINY variables in the unrolled or scanned layout (same weights)."""
  params = _unrolled_params()
  return {"params": _stack_layers(params) if scan_layers else params}


def _stack_layers(tree):
  """Unrolled params (layers_0, layers_1, ...) -> the scanned 'layers' layout."""
  if not isinstance(tree, dict):
    return tree
  layer_keys = sorted(
    (k for k in tree if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])
  )
  out = {k: _stack_layers(v) for k, v in tree.items() if k not in layer_keys}
  if layer_keys:
    out["layers"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[tree[k] for k in layer_keys]
    )
  return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  config = _config(dtype=dtype)
  enc, dec = _batch()
  variables = jax.eval_shape(lambda: _init(config, enc, dec))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {
    jnp.dtype(jnp.float32)
  }

  logits = jax.eval_shape(T5(config).apply, variables, enc, dec)
  assert logits.shape == (2, 5, config.vocab_size)
  assert logits.dtype == jnp.float32
  encoded = jax.eval_shape(
    lambda v: T5(config).apply(v, enc, method=T5.encode), variables
  )
  assert encoded.shape == (2, 7, config.emb_dim)
  assert encoded.dtype == jnp.dtype(dtype)


def test_bfloat16_activations_only_add_rounding_noise():
  enc, dec = _batch()
  got = _apply(_config(dtype="bfloat16"), "__call__", _params(), enc, dec)
  want = _apply(TINY, "__call__", _params(), enc, dec)
  assert got.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(want)))
  assert float(jnp.max(jnp.abs(got - want))) < 0.05 * scale


def test_packed_examples_match_examples_alone():
  # Example a: inputs [5, 6, 7], decoder inputs [0, 11, 12];
  # example b: inputs [8, 9, 10, 3], decoder inputs [0, 13].
  packed_enc = jnp.array([[5, 6, 7, 8, 9, 10, 3, 0]], jnp.int32)
  packed_enc_seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]], jnp.int32)
  packed_enc_pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]], jnp.int32)
  packed_dec = jnp.array([[0, 11, 12, 0, 13, 0]], jnp.int32)
  packed_dec_seg = jnp.array([[1, 1, 1, 2, 2, 0]], jnp.int32)
  packed_dec_pos = jnp.array([[0, 1, 2, 0, 1, 0]], jnp.int32)
  alone_enc = jnp.array([[5, 6, 7, 0, 0], [8, 9, 10, 3, 0]], jnp.int32)
  alone_dec = jnp.array([[0, 11, 12, 0], [0, 13, 0, 0]], jnp.int32)

  packed = _apply(
    TINY,
    "__call__",
    _params(),
    packed_enc,
    packed_dec,
    packed_enc_seg,
    packed_dec_seg,
    packed_enc_pos,
    packed_dec_pos,
  )
  alone = _apply(TINY, "__call__", _params(), alone_enc, alone_dec)
  np.testing.assert_allclose(packed[0, 0:3], alone[0, 0:3], atol=1e-5)
  np.testing.assert_allclose(packed[0, 3:5], alone[1, 0:2], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_incremental_decoding_matches_teacher_forcing(scan_layers):
  config = _config(scan_layers=scan_layers)
  model = T5(config)
  enc, dec = _batch(batch=3, dec_len=6)
  variables = _params(scan_layers)
  full = _apply(config, "__call__", variables, enc, dec)
  encoded = _apply(config, "encode", variables, enc)

  cache = init_cache(config, batch_size=3, max_decode_length=6)
  assert int(cache["decoder"]["cache_index"]) == 0
  for leaf in jax.tree.leaves(cache):
    assert leaf.ndim == 0 or leaf.shape[0] == 3  # Batch first.

  @_jit
  def step(cache, encoded, enc, token):
    return model.apply(
      {**variables, "cache": cache},
      encoded,
      enc,
      token,
      decode=True,
      method=T5.decode,
      mutable=["cache"],
    )

  # Halfway, reorder the rows as beam search would: gather every batch-first
  # cache leaf along axis 0. Decoding must continue as if the rows had always
  # been in the new order.
  order = jnp.array([2, 0, 1])
  steps = []
  for i in range(6):
    if i == 3:
      cache = jax.tree.map(lambda x: x[order] if x.ndim else x, cache)
      enc, dec, encoded, full = enc[order], dec[order], encoded[order], (full[order])
      steps = [s[order] for s in steps]
    logits, mutated = step(cache, encoded, enc, dec[:, i : i + 1])
    cache = mutated["cache"]
    steps.append(logits)
  assert int(cache["decoder"]["cache_index"]) == 6
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_has_logical_axis_names(scan_layers):
  config = _config(scan_layers=scan_layers)
  enc, dec = _batch()
  # Shapes only: the boxes and their names are all this test needs.
  variables = jax.eval_shape(lambda: _init(config, enc, dec))
  boxes = jax.tree.leaves(
    variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  assert boxes
  for box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned), type(box)
    assert len(box.names) == len(box.value.shape)
    assert set(box.names) <= PARAM_AXES, box.names
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["token_embedder"]["embedding"] == jax.sharding.PartitionSpec(
    "vocab", "embed"
  )
  assert specs["decoder"]["logits_dense"]["kernel"] == (
    jax.sharding.PartitionSpec("embed", "vocab")
  )
  layer = specs["encoder"]["layers" if scan_layers else "layers_0"]
  expected = ("layers",) if scan_layers else ()
  assert tuple(layer["attention"]["query"]) == expected + ("embed", "heads", "kv")
  assert tuple(layer["mlp"]["wo"]) == expected + ("mlp", "embed")


def test_scanned_layers_match_unrolled_layers():
  enc, dec = _batch()
  scanned_config = _config(scan_layers=True)
  stacked = _params(scan_layers=True)
  # The stacked tree has exactly the scanned model's structure and shapes.
  expected = jax.eval_shape(lambda: nn.unbox(_init(scanned_config, enc, dec)))
  assert jax.tree.map(jnp.shape, stacked["params"]) == jax.tree.map(
    jnp.shape, expected["params"]
  )

  want = _apply(TINY, "__call__", _params(), enc, dec)
  got = _apply(scanned_config, "__call__", stacked, enc, dec)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_remat_does_not_change_outputs_or_gradients():
  enc, dec = _batch()

  def loss_and_grads(policy, scan_layers):
    config = _config(scan_layers=scan_layers, remat_policy=policy)

    def loss(p):
      return jnp.sum(T5(config).apply({"params": p}, enc, dec) ** 2)

    return _jit(jax.value_and_grad(loss))(_params(scan_layers)["params"])

  want_loss, want_grads = loss_and_grads("none", scan_layers=False)
  # Each policy once; "full" also under scan, against the stacked gradients.
  for policy, scan_layers in (("minimal", False), ("full", True)):
    got_loss, got_grads = loss_and_grads(policy, scan_layers)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
      got_grads,
      _stack_layers(want_grads) if scan_layers else want_grads,
    )


@pytest.mark.parametrize("with_rules", [False, True])
def test_vmap_over_units_matches_each_unit(with_rules):
  # The trainer's layout: [units, rows, length] with params unbatched, packed rows.
  units, rows = 2, 2
  enc, dec = _batch(batch=units * rows, enc_len=6, dec_len=4)
  enc_seg = jnp.tile(jnp.array([1, 1, 1, 2, 2, 2], jnp.int32), (units * rows, 1))
  dec_seg = jnp.tile(jnp.array([1, 1, 2, 2], jnp.int32), (units * rows, 1))
  enc = jnp.where(enc == 0, 1, enc)  # Packed rows here have no padding.
  config = _config(scan_layers=True, remat_policy="minimal")
  variables = _params(scan_layers=True)

  def unitize(x):
    return x.reshape((units, rows) + x.shape[1:])

  def apply(e, d, es, ds):
    return T5(config).apply(variables, e, d, es, ds)

  batched = [unitize(x) for x in (enc, dec, enc_seg, dec_seg)]
  if with_rules:
    # Activation constraints become real sharding constraints under a mesh.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rules = [("activation_batch", "data"), ("embed", None), ("vocab", None)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      got = _jit(jax.vmap(apply))(*batched)
  else:
    got = _jit(jax.vmap(apply))(*batched)
  for u in range(units):
    want = _apply(config, "__call__", variables, *(x[u] for x in batched))
    np.testing.assert_allclose(got[u], want, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_only_when_enabled(scan_layers):
  config = _config(dropout_rate=0.3, scan_layers=scan_layers)
  enc, dec = _batch()
  variables = _params(scan_layers)

  def run(enable, seed):
    return _apply(
      config,
      "__call__",
      variables,
      enc,
      dec,
      enable_dropout=enable,
      rngs={"dropout": jax.random.key(seed)},
    )

  no_dropout = _apply(_config(scan_layers=scan_layers), "__call__", variables, enc, dec)
  if not scan_layers:  # The disabled path does not depend on the layout.
    deterministic = run(False, 0)
    np.testing.assert_array_equal(run(False, 1), deterministic)
    np.testing.assert_allclose(deterministic, no_dropout, atol=1e-5)
  dropped = run(True, 0)
  assert not np.allclose(dropped, no_dropout, atol=1e-3)
  np.testing.assert_array_equal(run(True, 0), dropped)  # Same key, same mask.
  assert not np.allclose(run(True, 1), dropped, atol=1e-3)


def test_relative_position_buckets():
  bucket = _jit(layers.relative_position_bucket, static_argnums=(1, 2, 3))
  causal = bucket(jnp.array([0, -1, -2, -4, -9, 3]), False, 4, 8)
  np.testing.assert_array_equal(causal, [0, 1, 2, 3, 3, 0])
  both = bucket(jnp.array([-1, 1, 0]), True, 8, 8)
  # Keys after the query use the upper half of the buckets.
  np.testing.assert_array_equal(both, [1, 5, 0])


def test_unset_vocab_size_is_a_user_error():
  enc, dec = _batch()
  with pytest.raises(UserError, match="vocab_size"):
    T5(T5Config()).init(jax.random.key(0), enc, dec)


def _gin_bindings(path: pathlib.Path) -> dict[str, object]:
  bindings = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    name, value = (s.strip() for s in line.split("=", 1))
    assert name.startswith("model.T5Config."), (path.name, line)
    bindings[name.removeprefix("model.T5Config.")] = ast.literal_eval(value)
  return bindings


@pytest.mark.parametrize(
  "size,emb,mlp,heads,depth",
  [
    ("tiny", 128, 256, 4, 2),
    ("small", 512, 1024, 6, 8),
    ("base", 768, 2048, 12, 12),
    ("large", 1024, 2816, 16, 24),
    ("xl", 2048, 5120, 32, 24),
    ("xxl", 4096, 10240, 64, 24),
  ],
)
def test_gin_model_sizes(size, emb, mlp, heads, depth):
  bindings = _gin_bindings(GIN_DIR / f"{size}.gin")
  fields = {f.name for f in dataclasses.fields(T5Config)}
  assert set(bindings) <= fields - {"vocab_size"}  # The trainer sets vocab_size.
  config = T5Config(vocab_size=128, **bindings)
  head_dim = 32 if size == "tiny" else 64
  assert (
    config.emb_dim,
    config.mlp_dim,
    config.num_heads,
    config.head_dim,
    config.num_encoder_layers,
    config.num_decoder_layers,
  ) == (emb, mlp, heads, head_dim, depth, depth)
  assert config.dropout_rate == 0.0
