"""Tests of mtx.model.lora: LoRA, MultiLoRA and per-task adapters in both families."""

import ast
import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtx import parallel
from mtx.errors import UserError
from mtx.model import (
  T5,
  Llama,
  LlamaConfig,
  LoraConfig,
  T5Config,
  combine,
  init_cache,
  is_adapter,
  merge,
  split,
)
from mtx.model import llama as llama_lib

T5_TINY = T5Config(
  vocab_size=64,
  emb_dim=16,
  num_heads=2,
  head_dim=8,
  mlp_dim=32,
  num_encoder_layers=1,
  num_decoder_layers=1,
)
LLAMA_TINY = LlamaConfig(
  vocab_size=64,
  emb_dim=16,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=32,
  num_layers=2,
)
# Every kernel LoRA may adapt, in both families (T5's attention modules are "attention",
# "self_attention" and "encoder_decoder_attention"; Llama's "self_attention").
EVERY_KERNEL = "attention/(query|key|value|out)$|mlp/w"
VARIANTS = {
  "shared": LoraConfig(targets=EVERY_KERNEL, rank=2),
  "multilora": LoraConfig(targets=EVERY_KERNEL, rank=2, num_parallel=3),
  "per_task": LoraConfig(targets=EVERY_KERNEL, rank=2, per_task=True, num_adapters=3),
  # All three kinds at once: MultiLoRA's shared adapters and per-task ones.
  "all": LoraConfig(
    targets=EVERY_KERNEL, rank=2, num_parallel=2, per_task=True, num_adapters=3
  ),
}

ADAPTERS_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "adapters"

# Compiling dominates on CPU; XLA's backend optimizations buy nothing at this size.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _with_lora(config, lora: LoraConfig, **overrides):
  return dataclasses.replace(config, lora=lora, **overrides)


def _model(config):
  return Llama(config) if isinstance(config, LlamaConfig) else T5(config)


@functools.partial(_jit, static_argnums=0)
def _logits(config, params, tokens, adapter_ids=None):
  """Teacher-forced logits: tokens is (enc, dec) for T5, dec for Llama; adapter_ids
  likewise (or None)."""
  if isinstance(config, LlamaConfig):
    return Llama(config).apply(
      {"params": params}, tokens, decoder_adapter_ids=adapter_ids
    )
  enc_ids, dec_ids = adapter_ids if adapter_ids is not None else (None, None)
  return T5(config).apply(
    {"params": params},
    *tokens,
    encoder_adapter_ids=enc_ids,
    decoder_adapter_ids=dec_ids,
  )


def _tokens(config, batch=2, length=6, seed=0):
  rng = np.random.default_rng(seed)
  dec = jnp.asarray(rng.integers(1, 64, (batch, length)), jnp.int32)
  if isinstance(config, LlamaConfig):
    return dec
  enc = jnp.asarray(rng.integers(1, 64, (batch, length + 1)), jnp.int32)
  return enc, dec.at[:, 0].set(0)


def _ids(config, tokens, adapter):
  """Every token on adapter ``adapter``, in _logits's layout."""
  if isinstance(config, LlamaConfig):
    return jnp.full_like(tokens, adapter)
  return tuple(jnp.full_like(t, adapter) for t in tokens)


@functools.partial(_jit, static_argnums=0)
def _init(config, tokens):
  args = (tokens,) if isinstance(config, LlamaConfig) else tokens
  return nn.meta.unbox(_model(config).init(jax.random.key(0), *args)["params"])


def _random_params(config, tokens, seed=1):
  """Random params of the model's shapes (no init to compile): kernels ~ N(0, 1/fan_in)
  roughly, norm scales near 1, adapters' A and B ~ N(0, 0.1^2) (with s = alpha / r = 8
  the delta is about half the base kernel), MultiLoRA's scales in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    name = path[-1].key
    if name.endswith("_lora_scale"):
      return rng.uniform(0.5, 1.5, shape.shape)
    if name == "scale":
      return 1.0 + 0.1 * rng.standard_normal(shape.shape)
    std = 0.1 if "_lora_" in name else shape.shape[-1] ** -0.5
    return std * rng.standard_normal(shape.shape)

  args = (tokens,) if isinstance(config, LlamaConfig) else tokens
  shapes = jax.eval_shape(lambda: _model(config).init(jax.random.key(0), *args))
  shapes = nn.meta.unbox(shapes["params"])
  filled = jax.tree_util.tree_map_with_path(fill, shapes)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), filled)


FAMILIES = {"t5": T5_TINY, "llama": LLAMA_TINY}


# A few kernels of each shape kind only: compiling init dominates these tests.
SOME_KERNELS = "attention/(query|out)$|mlp/wo$"


@pytest.mark.parametrize("family,variant", [("t5", "shared"), ("llama", "all")])
def test_adapters_at_init_give_exactly_the_base_logits(family, variant):
  base_config = FAMILIES[family]
  lora = dataclasses.replace(VARIANTS[variant], targets=SOME_KERNELS)
  config = _with_lora(base_config, lora)
  tokens = _tokens(config)
  params = _init(config, tokens)
  adapters, base = split(params)
  assert adapters
  # The base params do not depend on LoRA: the same init key gives the same base.
  jax.tree.map(np.testing.assert_array_equal, base, _init(base_config, tokens))
  ids = _ids(config, tokens, 1) if config.lora.per_task else None
  got = _logits(config, params, tokens, ids)
  want = _logits(base_config, base, tokens)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  "family,variant,scan",
  [
    ("t5", "shared", False),
    ("t5", "multilora", True),
    ("t5", "per_task", False),
    ("llama", "shared", True),
    ("llama", "multilora", False),
    ("llama", "per_task", True),
  ],
)
def test_merged_adapters_give_the_unmerged_logits(family, variant, scan):
  config = _with_lora(FAMILIES[family], VARIANTS[variant], scan_layers=scan)
  base_config = dataclasses.replace(config, lora=LoraConfig())
  tokens = _tokens(config)
  params = _random_params(config, tokens)
  adapter = 2 if variant == "per_task" else None
  ids = None if adapter is None else _ids(config, tokens, adapter)
  unmerged = _logits(config, params, tokens, ids)
  merged = _logits(base_config, merge(params, config.lora, adapter), tokens)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
  # The adapters matter (the comparison above could not pass by doing nothing).
  assert (
    float(jnp.max(jnp.abs(unmerged - _logits(base_config, split(params)[1], tokens))))
    > 1e-2
  )
  if variant == "per_task":  # No ids: the shared adapter only, as merge(adapter=None).
    shared = _logits(config, params, tokens)
    merged = _logits(base_config, merge(params, config.lora), tokens)
    np.testing.assert_allclose(merged, shared, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(shared - unmerged))) > 1e-2


def test_t5_packed_row_of_two_tasks_equals_the_examples_apart():
  # Example a (task 0): inputs [5, 6, 7], decoder inputs [0, 11, 12];
  # example b (task 2): inputs [8, 9, 10, 3], decoder inputs [0, 13].
  config = _with_lora(T5_TINY, VARIANTS["per_task"])
  packed_enc = jnp.array([[5, 6, 7, 8, 9, 10, 3, 0]], jnp.int32)
  packed_enc_seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]], jnp.int32)
  packed_enc_ids = jnp.array([[0, 0, 0, 2, 2, 2, 2, -1]], jnp.int32)
  packed_dec = jnp.array([[0, 11, 12, 0, 13, 0]], jnp.int32)
  packed_dec_seg = jnp.array([[1, 1, 1, 2, 2, 0]], jnp.int32)
  packed_dec_ids = jnp.array([[0, 0, 0, 2, 2, -1]], jnp.int32)
  alone_enc = jnp.array([[5, 6, 7, 0, 0], [8, 9, 10, 3, 0]], jnp.int32)
  alone_enc_ids = jnp.array([[0, 0, 0, -1, -1], [2, 2, 2, 2, -1]], jnp.int32)
  alone_dec = jnp.array([[0, 11, 12, 0], [0, 13, 0, 0]], jnp.int32)
  alone_dec_ids = jnp.array([[0, 0, 0, -1], [2, 2, -1, -1]], jnp.int32)
  params = _random_params(config, (alone_enc, alone_dec))

  @_jit
  def run(*args):
    return T5(config).apply({"params": params}, *args)

  packed = run(
    packed_enc, packed_dec, packed_enc_seg, packed_dec_seg, None, None,
    packed_enc_ids, packed_dec_ids,
  )  # fmt: skip
  alone = run(alone_enc, alone_dec, None, None, None, None, alone_enc_ids, alone_dec_ids)
  np.testing.assert_allclose(packed[0, 0:3], alone[0, 0:3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[0, 3:5], alone[1, 0:2], atol=1e-5, rtol=0)
  swapped = run(
    alone_enc, alone_dec, None, None, None, None, 2 - alone_enc_ids, 2 - alone_dec_ids
  )
  assert float(jnp.max(jnp.abs(swapped[0, :3] - alone[0, :3]))) > 1e-2


def test_llama_packed_row_of_two_tasks_equals_the_examples_apart():
  config = _with_lora(LLAMA_TINY, VARIANTS["per_task"])
  a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14]
  packed = jnp.array([a + b], jnp.int32)
  segments = jnp.array([[1] * 6 + [2] * 4], jnp.int32)
  positions = jnp.array([list(range(6)) + list(range(4))], jnp.int32)
  packed_ids = jnp.array([[0] * 6 + [2] * 4], jnp.int32)
  alone = jnp.array([a, b + [0, 0]], jnp.int32)
  alone_ids = jnp.array([[0] * 6, [2] * 4 + [-1] * 2], jnp.int32)
  params = _random_params(config, alone)

  @_jit
  def run(tokens, segments, positions, ids):
    return Llama(config).apply({"params": params}, tokens, segments, positions, None, ids)

  got = run(packed, segments, positions, packed_ids)
  want = run(alone, None, None, alone_ids)
  np.testing.assert_allclose(got[0, :6], want[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[0, 6:], want[1, :4], atol=1e-5, rtol=0)
  swapped = run(alone, None, None, jnp.where(alone_ids >= 0, 2 - alone_ids, -1))
  assert float(jnp.max(jnp.abs(swapped[0] - want[0]))) > 1e-2


@pytest.mark.parametrize("scan", [False, True])
def test_t5_cached_decoding_with_adapters_equals_the_full_forward(scan):
  config = _with_lora(T5_TINY, VARIANTS["all"], scan_layers=scan)
  model = T5(config)
  enc, dec = _tokens(config, batch=3)
  row_ids = jnp.array([[0], [2], [1]], jnp.int32)  # one task per row
  enc_ids, dec_ids = (
    jnp.broadcast_to(row_ids, enc.shape),
    jnp.broadcast_to(row_ids, dec.shape),
  )
  params = _random_params(config, (enc, dec))
  full = _logits(config, params, (enc, dec), (enc_ids, dec_ids))
  encoded = _jit(functools.partial(model.apply, method=T5.encode))(
    {"params": params}, enc, None, enc_ids
  )

  @_jit
  def step(cache, token, token_ids):
    return model.apply(
      {"params": params, "cache": cache},
      encoded, enc, token, None, None, enc_ids, token_ids,
      decode=True, method=T5.decode, mutable=["cache"],
    )  # fmt: skip

  cache = init_cache(config, batch_size=3, max_decode_length=dec.shape[1])
  steps = []
  for i in range(dec.shape[1]):
    logits, mutated = step(cache, dec[:, i : i + 1], dec_ids[:, i : i + 1])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_llama_cached_decoding_with_adapters_equals_the_full_forward():
  config = _with_lora(LLAMA_TINY, VARIANTS["all"], scan_layers=True)
  model = Llama(config)
  tokens = _tokens(config, batch=3, length=7)
  ids = jnp.broadcast_to(jnp.array([[1], [0], [2]], jnp.int32), tokens.shape)
  params = _random_params(config, tokens)
  full = _logits(config, params, tokens, ids)

  @_jit
  def step(cache, chunk, chunk_ids):
    return model.apply(
      {"params": params, "cache": cache},
      chunk, None, None, None, chunk_ids,
      decode=True, mutable=["cache"],
    )  # fmt: skip

  cache = llama_lib.init_cache(config, 3, tokens.shape[1])
  logits, state = step(cache, tokens[:, :3], ids[:, :3])  # prefill
  steps = [logits]
  for i in range(3, tokens.shape[1]):
    logits, state = step(state["cache"], tokens[:, i : i + 1], ids[:, i : i + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def _boxes(config, tokens):
  args = (tokens,) if isinstance(config, LlamaConfig) else tokens
  shapes = jax.eval_shape(lambda: _model(config).init(jax.random.key(0), *args))
  flat = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(
    shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  for path, box in leaves:
    flat["/".join(k.key for k in path)] = box
  return flat


def test_adapter_param_names_shapes_and_logical_axes():
  lora = LoraConfig(
    targets="^encoder/.*/(query|out)$|mlp/wo", rank=4, per_task=True, num_adapters=3,
    num_parallel=2,
  )  # fmt: skip
  config = _with_lora(T5_TINY, lora)
  boxes = _boxes(config, _tokens(config))
  att, mlp = "encoder/layers_0/attention/", "decoder/layers_0/mlp/"
  want = {
    # query [E, H, D]: in (E,), out (H, D).
    att + "query_lora_a": ((2, 16, 4), ("lora_parallel", "embed", "lora_rank")),
    att + "query_lora_b": ((2, 4, 2, 8), ("lora_parallel", "lora_rank", "heads", "kv")),
    att + "query_lora_scale": ((2,), ("lora_parallel",)),
    att + "query_lora_task_a": ((3, 16, 4), ("lora_adapters", "embed", "lora_rank")),
    att + "query_lora_task_b": (
      (3, 4, 2, 8),
      ("lora_adapters", "lora_rank", "heads", "kv"),
    ),
    # out [H, D, E]: in (H, D), out (E,).
    att + "out_lora_a": ((2, 2, 8, 4), ("lora_parallel", "heads", "kv", "lora_rank")),
    att + "out_lora_b": ((2, 4, 16), ("lora_parallel", "lora_rank", "embed")),
    att + "out_lora_scale": ((2,), ("lora_parallel",)),
    att + "out_lora_task_a": (
      (3, 2, 8, 4),
      ("lora_adapters", "heads", "kv", "lora_rank"),
    ),
    att + "out_lora_task_b": ((3, 4, 16), ("lora_adapters", "lora_rank", "embed")),
  }
  for prefix in ("encoder/layers_0/mlp/", mlp):  # wo [M, E]
    want[prefix + "wo_lora_a"] = ((2, 32, 4), ("lora_parallel", "mlp", "lora_rank"))
    want[prefix + "wo_lora_b"] = ((2, 4, 16), ("lora_parallel", "lora_rank", "embed"))
    want[prefix + "wo_lora_scale"] = ((2,), ("lora_parallel",))
    want[prefix + "wo_lora_task_a"] = ((3, 32, 4), ("lora_adapters", "mlp", "lora_rank"))
    want[prefix + "wo_lora_task_b"] = (
      (3, 4, 16),
      ("lora_adapters", "lora_rank", "embed"),
    )
  got = {
    path: (tuple(box.value.shape), tuple(box.names))
    for path, box in boxes.items()
    if is_adapter(tuple(path.split("/")))
  }
  assert got == want
  for box in boxes.values():
    assert box.value.dtype == jnp.float32
  # Sharded like the adapted kernel: its axes map as the kernel's, the LoRA axes to None.
  with nn.logical_axis_rules(parallel.DEFAULT_RULES):
    assert tuple(nn.logical_to_mesh_axes(want[att + "query_lora_a"][1])) == (
      None,
      "fsdp",
      None,
    )
    assert tuple(nn.logical_to_mesh_axes(want[mlp + "wo_lora_task_a"][1])) == (
      None,
      "tensor",
      None,
    )


def test_scanned_llama_adapters_have_a_leading_layers_axis():
  lora = LoraConfig(targets="self_attention/(key|value)$", rank=4)
  config = _with_lora(LLAMA_TINY, lora, scan_layers=True)
  boxes = _boxes(config, _tokens(config))
  got = {
    p: (tuple(b.value.shape), tuple(b.names)) for p, b in boxes.items() if "_lora_" in p
  }
  prefix = "decoder/layers/self_attention/"
  assert got == {  # key/value [E, K, D] with K = 2 key/value heads
    prefix + "key_lora_a": ((2, 16, 4), ("layers", "embed", "lora_rank")),
    prefix + "key_lora_b": ((2, 4, 2, 8), ("layers", "lora_rank", "kv_heads", "kv")),
    prefix + "value_lora_a": ((2, 16, 4), ("layers", "embed", "lora_rank")),
    prefix + "value_lora_b": ((2, 4, 2, 8), ("layers", "lora_rank", "kv_heads", "kv")),
  }


@pytest.mark.parametrize(
  "lora,count",
  [
    # q and v of the 3 T5 attention modules: A [16, 4] + B [4, 2, 8] = 128 each.
    (LoraConfig(targets="attention/(query|value)$", rank=4), 6 * 128),
    # MultiLoRA n = 2: twice that, plus 2 scales per kernel.
    (LoraConfig(targets="attention/(query|value)$", rank=4, num_parallel=2), 6 * 258),
    # Per-task T = 3 besides the shared: four adapters' worth.
    (
      LoraConfig(
        targets="attention/(query|value)$", rank=4, per_task=True, num_adapters=3
      ),
      6 * 4 * 128,
    ),
    # Per-task only, on the 2 MLPs' wo [32, 16]: 3 x (32 * 4 + 4 * 16) each.
    (
      LoraConfig(targets="mlp/wo$", rank=4, per_task=True, num_adapters=3, shared=False),
      2 * 3 * 192,
    ),
  ],
)
def test_adapter_parameter_count_of_a_tiny_t5(lora, count):
  config = _with_lora(T5_TINY, lora)
  boxes = _boxes(config, _tokens(config))
  got = sum(b.value.size for p, b in boxes.items() if is_adapter(tuple(p.split("/"))))
  assert got == count


def test_split_and_combine_round_trip():
  config = _with_lora(LLAMA_TINY, VARIANTS["per_task"], qkv_bias=True)
  params = _random_params(config, _tokens(config))
  adapters, base = split(params)
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])  # noqa: E731
  assert flat(adapters) and all(is_adapter(p) for p in flat(adapters))
  assert not any(is_adapter(p) for p in flat(base))
  assert len(flat(adapters)) + len(flat(base)) == len(flat(params))
  back = combine(base, adapters)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match="both"):
    combine(base, base)


@pytest.mark.parametrize(
  "targets,match",
  [
    ("nothing_like_this", "matches no kernel.*such as .*attention/query', .*mlp/wo'"),
    ("token_embedder", "matches 'token_embedder/embedding'"),
    ("logits_dense", "matches 'decoder/logits_dense/kernel'"),
    ("(", "not a valid regex"),
  ],
)
def test_targets_that_adapt_no_kernel_or_the_embedding_are_user_errors(targets, match):
  config = _with_lora(T5_TINY, LoraConfig(targets=targets))
  with pytest.raises(UserError, match=match):
    _init(config, _tokens(config))


@pytest.mark.parametrize(
  "field,value",
  [
    ("rank", 0),
    ("alpha", 0.0),
    ("num_parallel", 0),
    ("num_adapters", 0),
    ("shared", False),
  ],
)
def test_bad_lora_settings_are_user_errors_naming_the_binding(field, value):
  lora = dataclasses.replace(VARIANTS["shared"], **{field: value})
  if field == "num_adapters":
    lora = dataclasses.replace(lora, per_task=True)
  config = _with_lora(LLAMA_TINY, lora)
  with pytest.raises(UserError, match=f"model.LoraConfig.{field} "):
    _init(config, _tokens(config))


def test_lora_off_by_default():
  assert not T5Config().lora.enabled and not LlamaConfig().lora.enabled
  params = _random_params(T5_TINY, _tokens(T5_TINY))
  assert split(params)[0] == {}


def _lora_bindings(name: str) -> dict:
  """model.LoraConfig.* bindings of gin_configs/adapters/<name>, includes first (the
  trainer's bindings in the same files are left out)."""
  bindings = {}
  for line in (ADAPTERS_GIN / name).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line.startswith("include"):
      bindings.update(_lora_bindings(ast.literal_eval(line.split()[1]).split("/")[-1]))
    elif line:
      key, value = (s.strip() for s in line.split("=", 1))
      if key.startswith("model.LoraConfig."):
        bindings[key.removeprefix("model.LoraConfig.")] = ast.literal_eval(value)
  return bindings


# The (module, kernel) pairs the example files adapt: q/v of every attention, the MLP.
GIN_TARGETS = {
  "t5": {
    (module, kernel)
    for module in ("attention", "self_attention", "encoder_decoder_attention")
    for kernel in ("query", "value")
  }
  | {("mlp", "wi_0"), ("mlp", "wi_1"), ("mlp", "wo")},
  "llama": {
    ("self_attention", "query"),
    ("self_attention", "value"),
    ("mlp", "wi_0"),
    ("mlp", "wi_1"),
    ("mlp", "wo"),
  },
}


@pytest.mark.parametrize("name", ["lora.gin", "lora_per_task.gin"])
def test_example_gin_files_adapt_attention_q_v_and_the_mlp_of_both_families(name):
  lora = LoraConfig(**_lora_bindings(name))
  assert (lora.rank, lora.alpha, lora.shared) == (8, 16.0, True)
  assert lora.per_task == (name == "lora_per_task.gin")
  if lora.per_task:
    lora = dataclasses.replace(lora, num_adapters=2)  # the trainer's part
  for family, config in FAMILIES.items():
    config = _with_lora(config, lora)
    adapted = set()
    for path in _boxes(config, _tokens(config)):
      if "_lora_" in path:
        module, param = path.split("/")[-2:]
        adapted.add((module, param.split("_lora_")[0]))
    assert adapted == GIN_TARGETS[family]


def _unit_loss(config, params, tokens, ids, probe=None):
  """A scalar of the logits with a gradient everywhere (one unit's rows)."""
  variables = {"params": params}
  if probe is not None:
    variables["gram_probe"] = probe
  logits = _model(config).apply(variables, tokens, decoder_adapter_ids=ids)
  return jnp.sum(jax.nn.log_softmax(logits)[..., 3])


def test_per_unit_adapter_gradients_on_a_mesh_equal_each_unit_alone():
  """The trainer's per-task route: vmap(grad) over units of rows of one task each, params
  unbatched, scanned and rematerialized layers, activations constrained on a (2, 2, 2)
  mesh by the default rules. Each unit's adapter gradient is its own, computed alone."""
  config = _with_lora(
    LLAMA_TINY, VARIANTS["all"], scan_layers=True, remat_policy="minimal", num_layers=1
  )
  tokens = _tokens(config, batch=4, length=6).reshape(2, 2, 6)  # [units, rows, length]
  ids = jnp.broadcast_to(jnp.array([0, 2], jnp.int32)[:, None, None], tokens.shape)
  adapters, base = split(_random_params(config, tokens[0]))

  def grad(adapters, tokens, ids):  # the adapters' gradient only, the base frozen
    loss = lambda a: _unit_loss(config, combine(base, a), tokens, ids)  # noqa: E731
    return jax.grad(loss)(adapters)

  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
  mesh = jax.sharding.Mesh(devices, parallel.MESH_AXES)
  rules = parallel.rules_within_unit(parallel.DEFAULT_RULES)
  per_unit_grad = jax.vmap(grad, in_axes=(None, 0, 0), spmd_axis_name=parallel.UNIT_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    per_unit = _jit(per_unit_grad)(adapters, tokens, ids)
  alone_grad = _jit(grad)
  for u in range(2):
    alone = alone_grad(adapters, tokens[u], ids[u])
    got = jax.tree.map(lambda x: x[u], per_unit)  # noqa: B023
    check = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree.map(check, got, alone)
  # Unit 0 (task 0) leaves task 2's adapter alone, and the other way round.
  task_b = per_unit["decoder"]["layers"]["mlp"]["wo_lora_task_b"]  # [U, layers, T, r, E]
  assert (
    float(jnp.abs(task_b[0, :, 2]).max()) == 0.0 < float(jnp.abs(task_b[0, :, 0]).max())
  )
  assert (
    float(jnp.abs(task_b[1, :, 0]).max()) == 0.0 < float(jnp.abs(task_b[1, :, 2]).max())
  )


def test_gram_taps_cover_the_adapters():
  """The unit Gram matrix (mtx.model.taps) of an adapter leaf, from its probe, equals
  g g^T of the per-unit gradients of that leaf."""
  config = _with_lora(LLAMA_TINY, VARIANTS["all"], num_layers=1)
  tokens = _tokens(config, batch=4, length=5).reshape(2, 2, 5)
  ids = jnp.broadcast_to(jnp.array([1, 0], jnp.int32)[:, None, None], tokens.shape)
  params = _random_params(config, tokens[0])
  probe = jax.tree.map(lambda _: jnp.zeros((2,), jnp.float32), params)

  def probe_grad(tokens, ids):
    return jax.grad(lambda q: _unit_loss(config, params, tokens, ids, q))(probe)

  gram = _jit(jax.vmap(probe_grad))(tokens, ids)
  grads = _jit(jax.vmap(jax.grad(functools.partial(_unit_loss, config)), (None, 0, 0)))(
    params, tokens, ids
  )
  attention = "decoder/layers_0/self_attention/"
  for name in ("query_lora_a", "value_lora_scale", "out_lora_task_b"):
    g = grads["decoder"]["layers_0"]["self_attention"][name].reshape(2, -1)
    got = gram["decoder"]["layers_0"]["self_attention"][name]
    np.testing.assert_allclose(got, g @ g.T, rtol=1e-4, err_msg=attention + name)
  assert (
    float(jnp.abs(gram["decoder"]["layers_0"]["self_attention"]["out_lora_task_b"]).max())
    > 0
  )


def test_bfloat16_activations_with_adapters_stay_close_to_float32():
  config = _with_lora(T5_TINY, VARIANTS["all"])
  tokens = _tokens(config)
  params = _random_params(config, tokens)
  ids = _ids(config, tokens, 1)
  want = _logits(config, params, tokens, ids)
  got = _logits(dataclasses.replace(config, dtype="bfloat16"), params, tokens, ids)
  assert got.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))


def test_adapter_ids_not_shaped_like_the_tokens_are_refused():
  config = _with_lora(LLAMA_TINY, VARIANTS["per_task"])
  tokens = _tokens(config)
  params = _random_params(config, tokens)
  with pytest.raises(ValueError, match="decoder_adapter_ids must be integer and shaped"):
    Llama(config).apply({"params": params}, tokens, decoder_adapter_ids=tokens[:, :2])
