"""The decoder-only Llama family (issue #16): the model, and Hugging Face checkpoints in and out.

tests/fixtures/hf_llama (GQA, "llama3" RoPE scaling, untied, float32), hf_qwen2 (q/k/v
biases, tied, bfloat16 sharded, tokenizer.json) and hf_mistral (sliding window 3, tied)
were written by ``tools/make_hf_fixtures.py --family llama`` with transformers, with
hf_llama_reference.npz holding transformers' float32 logits and greedy continuations.
"""

import functools
import json
import os
import shutil

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtx import mtl, parallel
from mtx.cli import configurables  # noqa: F401  (registers model.LlamaConfig with gin)
from mtx.cli import main as cli
from mtx.data import decoder_only, packing, vocab
from mtx.errors import UserError
from mtx.infer import decoding
from mtx.model import LlamaConfig, T5Config, llama
from mtx.runtime import hf, pretrained
from mtx.runtime import params as params_lib
from mtx.train import build as build_lib
from mtx.train import state as state_lib
from mtx.train import step

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
REFERENCE = np.load(os.path.join(FIXTURES, "hf_llama_reference.npz"))
NAMES = ("hf_llama", "hf_qwen2", "hf_mistral")
WHAT = "INFER_CHECKPOINT_PATH"


def _load(name, scan_layers=False, mesh_shape=None, path=None):
  path = path or os.path.join(FIXTURES, name)
  model_config, vocabulary_path = pretrained.resolve(
    path, LlamaConfig(scan_layers=scan_layers), None, WHAT
  )
  devices = None if mesh_shape else jax.devices()[:1]
  mesh = parallel.make_mesh(mesh_shape, devices)
  model, params, _ = params_lib.load_trained(
    model_config,
    vocab.get_vocabulary(vocabulary_path).vocab_size,
    mesh,
    parallel.DEFAULT_RULES,
    path,
    what=WHAT,
  )
  return model, params


@pytest.mark.parametrize(
  "name,scan,mesh_shape",
  [
    ("hf_llama", False, None),
    pytest.param(
      "hf_llama", True, {"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow
    ),
    ("hf_qwen2", True, {"data": 2, "fsdp": 2, "tensor": 2}),
    ("hf_mistral", False, None),
  ],
)
def test_logits_equal_transformers(name, scan, mesh_shape):
  """Llama (llama3 RoPE, GQA), Qwen2 (biases, tied) and Mistral (window): unscanned on
  one device and scanned on a sharded (2, 2, 2) mesh of 8 devices."""
  model, params = _load(name, scan, mesh_shape)
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(REFERENCE["ids"]))
  np.testing.assert_allclose(logits, REFERENCE[f"{name}/logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "name,scan",
  [("hf_llama", False), pytest.param("hf_mistral", True, marks=pytest.mark.slow)],
)
def test_a_packed_row_gives_each_example_its_own_logits(name, scan):
  """Rows 0 (first 6 tokens) and 1 (first 4) packed into one row, with segment ids and
  restarting positions, get transformers' logits of each alone (causal: a prefix of a
  row has the logits of that row's first positions)."""
  model, params = _load(name, scan)
  ids = REFERENCE["ids"]
  tokens = np.concatenate([ids[0, :6], ids[1, :4]])[None]
  segments = np.array([[1] * 6 + [2] * 4], np.int32)
  positions = np.array([list(range(6)) + list(range(4))], np.int32)
  logits = jax.jit(model.apply)({"params": params}, tokens, segments, positions)
  want = REFERENCE[f"{name}/logits"]
  np.testing.assert_allclose(logits[0, :6], want[0, :6], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 6:], want[1, :4], atol=1e-5, rtol=0)


def _greedy(model, params, prompts, new_tokens):
  """Prefill the prompts in one call, then one token per step, with the KV cache."""
  batch, length = prompts.shape
  cache = llama.init_cache(model.config, batch, length + new_tokens)
  step = jax.jit(
    lambda c, t: model.apply(
      {"params": params, "cache": c}, t, decode=True, mutable=["cache"]
    )
  )
  logits, state = step(cache, jnp.asarray(prompts))
  out = []
  for _ in range(new_tokens):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out.append(token)
    logits, state = step(state["cache"], token[:, None])
  return np.stack(out, axis=1)


@pytest.mark.parametrize(
  "name,scan",
  [("hf_llama", False), pytest.param("hf_qwen2", True, marks=pytest.mark.slow)],
)
def test_kv_cache_greedy_decoding_equals_transformers_generate(name, scan):
  model, params = _load(name, scan)
  prompts = REFERENCE["prompts"]
  generated = REFERENCE[f"{name}/generated"]
  got = _greedy(model, params, prompts, generated.shape[1])
  np.testing.assert_array_equal(got, generated)


def _tiny(**overrides):
  fields = dict(
    vocab_size=64,
    emb_dim=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    mlp_dim=32,
    num_layers=2,
  )
  return llama.Llama(LlamaConfig(**{**fields, **overrides}))


@pytest.fixture(scope="module")
def tiny_params():
  """Random params of ``_tiny()`` (any overrides here keep the shapes), drawn with numpy:
  compiling flax's initializers costs seconds that these tests need not spend."""
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(_tiny().init, jax.random.key(0), tokens))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.5), shapes
  )


def test_prefix_lm_attends_both_ways_within_the_inputs_only(tiny_params):
  """With decoder_causal_attention on the first 3 positions: an input token changes
  the logits of earlier inputs, a target token changes nothing before it, and the
  same example packed after another gets the same logits."""
  model = _tiny()
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]], jnp.int32)
  prefix = jnp.array([[1, 1, 1, 0, 0, 0]], jnp.int32)
  params = tiny_params

  apply = jax.jit(model.apply)

  def run(t):
    return apply({"params": params}, t, None, None, prefix)

  base = run(tokens)
  changed_input = run(tokens.at[0, 2].set(30))
  changed_target = run(tokens.at[0, 4].set(30))
  assert np.abs(changed_input[0, 0] - base[0, 0]).max() > 1e-3
  np.testing.assert_array_equal(changed_target[0, :4], base[0, :4])
  causal = apply({"params": params}, tokens)
  assert np.abs(causal[0, 0] - base[0, 0]).max() > 1e-3
  # Packed behind a 2-token example of its own prefix.
  packed_tokens = jnp.concatenate([jnp.array([[3, 4]], jnp.int32), tokens], axis=1)
  packed = apply(
    {"params": params},
    packed_tokens,
    jnp.array([[1, 1] + [2] * 6], jnp.int32),
    jnp.array([[0, 1] + list(range(6))], jnp.int32),
    jnp.concatenate([jnp.array([[1, 0]], jnp.int32), prefix], axis=1),
  )
  np.testing.assert_allclose(packed[0, 2:], base[0], atol=1e-5, rtol=0)


def test_linear_rope_scaling_by_two_at_position_2p_equals_none_at_p(tiny_params):
  plain, scaled = _tiny(), _tiny(rope_scaling="linear", rope_factor=2.0)
  tokens = jnp.array([[5, 6, 7, 8]], jnp.int32)
  params = tiny_params
  positions = jnp.array([[0, 1, 2, 3]], jnp.int32)
  want = jax.jit(plain.apply)({"params": params}, tokens, None, positions)
  got = jax.jit(scaled.apply)({"params": params}, tokens, None, positions * 2)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow  # default-suite time; bfloat16 on CPU compiles slowly
def test_bfloat16_activations_return_float32_logits_close_to_float32(tiny_params):
  f32, bf16 = _tiny(), _tiny(dtype="bfloat16")
  tokens = jnp.array([[5, 6, 7, 8, 9]], jnp.int32)
  params = tiny_params
  want = jax.jit(f32.apply)({"params": params}, tokens)
  got = jax.jit(bf16.apply)({"params": params}, tokens)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * float(np.abs(want).max()), rtol=0)


def _read_all(path):
  reader = hf.HfReader(path, WHAT)
  try:
    return {name: reader.read(name) for name in reader.names()}, reader.model_config()
  finally:
    reader.close()


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_bit_identical(name, tmp_path):
  """Every architecture: read, export (config.json, model.safetensors, tokenizer), read
  the export again: the same config fields and the same float32 tensors bit for bit."""
  path = os.path.join(FIXTURES, name)
  params, fields = _read_all(path)
  config = LlamaConfig(**fields)
  written = hf.export(params, config, str(tmp_path), hf.spiece_of(path))
  assert sorted(os.path.basename(p) for p in written)[:2] == [
    "config.json",
    "model.safetensors",
  ]
  again, again_fields = _read_all(str(tmp_path))
  assert again_fields == fields
  for key, value in params.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert (
      json.load(f)["architectures"]
      == json.load(open(os.path.join(path, "config.json")))["architectures"]
    )
  assert (
    vocab.get_vocabulary(str(tmp_path)).vocab_size
    == vocab.get_vocabulary(path).vocab_size
  )


def _copy(name, tmp_path):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target, symlinks=False)
  return target


def test_unsupported_architecture_is_one_sentence(tmp_path):
  target = _copy("hf_llama", tmp_path)
  config = json.loads((target / "config.json").read_text())
  config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
  (target / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    UserError,
    match=r"is a GPT2LMHeadModel .* LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM\.$",
  ):
    pretrained.resolve(str(target), LlamaConfig(), None, WHAT)


def test_unsupported_rope_scaling_is_one_sentence(tmp_path):
  target = _copy("hf_llama", tmp_path)
  config = json.loads((target / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
  (target / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"rope scaling 'yarn'"):
    pretrained.resolve(str(target), LlamaConfig(), None, WHAT)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
  """hf_qwen2 has 300 embedding rows; the demo SentencePiece model has 709 ids."""
  target = _copy("hf_qwen2", tmp_path)
  shutil.copy(
    os.path.join(FIXTURES, "hf_llama", "tokenizer.model"), target / "tokenizer.model"
  )
  with pytest.raises(
    UserError, match=r"vocabulary has 709 ids but its embedding only 300 rows"
  ):
    pretrained.resolve(str(target), LlamaConfig(), None, WHAT)


def test_gin_settings_of_a_t5_carry_only_run_settings_to_a_llama_checkpoint():
  """A run whose gin sets a T5Config starts from a Llama directory: the architecture is
  the checkpoint's, scan_layers and dtype stay the run's."""
  path = os.path.join(FIXTURES, "hf_llama")
  config, _ = pretrained.resolve(
    path, T5Config(scan_layers=True, dtype="bfloat16"), None, WHAT
  )
  assert isinstance(config, LlamaConfig)
  assert (config.scan_layers, config.dtype, config.num_kv_heads) == (True, "bfloat16", 2)
  assert config.rope_scaling == "llama3"


@pytest.mark.parametrize(
  "gin_file,count",
  [
    ("llama3_8b.gin", 8_030_261_248),  # Llama 3.1 8B's model card
    ("llama_smollm_135m.gin", 134_515_008),  # SmolLM-135M
    ("qwen2_5_0_5b.gin", 494_032_768),  # Qwen2.5-0.5B
  ],
)
def test_gin_sizes_have_the_published_parameter_counts(gin_file, count):
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(HERE, "..", "gin_configs", "models", gin_file))
    config = gin.get_configurable("model.LlamaConfig")()
  finally:
    gin.clear_config()
  _, abstract = params_lib.abstract_params(llama.Llama(config), 4, 4)
  assert params_lib.count_params(abstract) == count


# Training: decoder-only batches through mtx.train.step's per-task machinery.
STEP_CONFIG = LlamaConfig(
  vocab_size=64,
  emb_dim=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  num_layers=2,
)
STEP_LENGTHS = (8, 6)  # inputs, targets: decoder-only rows of 14
UNIT_GROUPS = (0, 1, 0, 1)


def _decoder_only_task_major_batch(group_of_task, rows=2, seed=0):
  """Task-major units packed as the pipeline packs them, then converted to prefix-LM
  rows (mtx.data.decoder_only)."""
  rng = np.random.default_rng(seed)
  flat = packing.empty_rows(len(UNIT_GROUPS) * rows, *STEP_LENGTHS)
  out = {k: v.reshape(len(UNIT_GROUPS), rows, -1) for k, v in flat.items()}
  for u, g in enumerate(UNIT_GROUPS):
    tasks = [t for t, tg in enumerate(group_of_task) if tg == g]
    packer = packing.UnitPacker(
      rows, *STEP_LENGTHS, out={k: v[u] for k, v in out.items()}
    )
    while packer.try_add(
      int(rng.choice(tasks)),
      rng.integers(1, 64, int(rng.integers(2, 5))),
      rng.integers(1, 64, int(rng.integers(2, 4))),
    ):
      pass
  out["unit_task"] = np.asarray(UNIT_GROUPS, np.int32)
  return decoder_only.convert(out)


def _pcgrad_step(mesh_shape, devices, group_of_task, batch):
  mesh = parallel.make_mesh(mesh_shape, devices)
  model = llama.Llama(STEP_CONFIG)
  boxed, abstract = params_lib.abstract_params(model, *STEP_LENGTHS)
  p_shardings = params_lib.param_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = jax.device_put(
    jax.tree.map(
      lambda s, k: jax.random.normal(k, s.shape) * 0.3,
      abstract,
      dict_keys(abstract),
    ),
    p_shardings,
  )
  host_params = jax.device_get(params)  # the step donates the state
  cfg = step.StepConfig(
    num_tasks=len(group_of_task), group_of_task=group_of_task, task_grads=True
  )
  optimizer = optax.sgd(0.5)
  transforms = mtl.ensure_aggregator((mtl.pcgrad(),))
  fn = step.make_train_step(model, optimizer, transforms, cfg, p_shardings)
  state = state_lib.make_state(params, optimizer, optax.chain(*transforms).init, 0)
  s_shardings = state_lib.state_shardings(
    jax.eval_shape(lambda s: s, state), abstract, p_shardings, mesh
  )
  b_shardings = {
    k: parallel.batch_sharding(mesh, v.ndim, parallel.UNIT_AXES) for k, v in batch.items()
  }
  jitted = build_lib.jit_step_fn(fn, mesh, cfg.rules, s_shardings, b_shardings)
  new_state, metrics = jitted(state, jax.device_put(batch, b_shardings))
  return (
    model,
    host_params,
    jax.tree.map(np.asarray, new_state["params"]),
    jax.tree.map(np.asarray, metrics),
  )


def dict_keys(tree):
  """One PRNG key per leaf, fixed by the leaf's order (the same on every mesh)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(treedef, list(keys))


@pytest.mark.slow  # ~30 s on 2 cores: two compilations of the per-group step
def test_pcgrad_step_of_a_decoder_only_model_on_8_devices_equals_one_device():
  """A Llama on prefix-LM task-major batches through the per-group (PCGrad) route: the
  per-task loss sums are those of the targets' tokens alone, and the (2, 2, 2) mesh
  gives the one-device update to float32 precision."""
  group_of_task = (0, 0, 1)
  batch = _decoder_only_task_major_batch(group_of_task, seed=3)
  model, params, one, one_metrics = _pcgrad_step(
    {"data": 1}, jax.devices()[:1], group_of_task, batch
  )
  _, _, pod, pod_metrics = _pcgrad_step(
    {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), group_of_task, batch
  )
  for got, want in zip(jax.tree.leaves(pod), jax.tree.leaves(one)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(
    pod_metrics["task_loss_sums"], one_metrics["task_loss_sums"], rtol=1e-5
  )
  # The loss sums: cross-entropy of every target token of each task, inputs excluded.
  rows = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if k != "unit_task"}
  logits = jax.jit(model.apply)({"params": params}, **step.model_inputs(rows))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, rows["decoder_target_tokens"][..., None], -1)
  token_loss = np.asarray(log_z - target[..., 0])
  want = [
    np.sum(token_loss * (rows["decoder_task_ids"] == t) * rows["decoder_loss_weights"])
    for t in range(3)
  ]
  np.testing.assert_allclose(one_metrics["task_loss_sums"], want, rtol=1e-5)


def _cli(*args):
  gin.clear_config()
  try:
    return cli.run(list(args))
  finally:
    gin.clear_config()


@pytest.mark.slow  # ~40 s on 2 cores: a training run and an export
def test_finetune_hf_llama_with_pcgrad_then_export_infer_and_eval(tmp_path):
  """tests/hf.gin (runs/finetune.gin, whose gin model is a T5Config) from the Llama
  fixture: the checkpoint's family wins; PCGrad trains on 8 devices with per-task
  losses; the export holds exactly the run's params and the Llama's config; mtx infer
  decodes with the run; mtx eval scores each task."""
  model_dir, export_dir = tmp_path / "run", tmp_path / "export"
  common = [
    "--gin_file=tests/hf.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.INITIAL_CHECKPOINT_PATH='{os.path.join(FIXTURES, 'hf_llama')}'",
  ]
  assert _cli("train", *common, "--gin_file=mtl/pcgrad.gin", "--gin.TRAIN_STEPS=2") == 0
  last = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])
  assert (
    last["step"] == 2 and np.isfinite([last["loss/hf_copy"], last["loss/hf_rev"]]).all()
  )
  assert (
    _cli(
      "export", *common, "--gin_file=runs/export.gin", f"--gin.EXPORT_DIR='{export_dir}'"
    )
    == 0
  )
  exported, fields = _read_all(str(export_dir))
  assert fields == hf_llama_fields()
  config, _ = pretrained.resolve_run(
    str(model_dir / "2"), os.path.join(FIXTURES, "hf_llama"), T5Config(), None, WHAT
  )
  _, run_params, _ = params_lib.load_trained(
    config,
    config.vocab_size,
    parallel.make_mesh(None, jax.devices()[:1]),
    parallel.DEFAULT_RULES,
    str(model_dir / "2"),
    what=WHAT,
  )
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(run_params)[0]
  }
  assert flat.keys() == exported.keys()
  for name, value in flat.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  inputs, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
  inputs.write_text("a b c d\nh g\n")
  infer = [
    f"--gin.INFER_INPUT='{inputs}'",
    f"--gin.INFER_OUTPUT='{out}'",
    "--gin.INFER_TASK='hf_rev'",
    "--gin.INFER_MAX_DECODE_LENGTH=4",
  ]
  assert _cli("infer", *common, "--gin_file=runs/infer.gin", *infer) == 0
  assert len(out.read_text().splitlines()) == 2
  assert _cli("eval", *common, "--gin.EVAL_BATCH_SIZE=8") == 0
  result = json.loads((model_dir / "eval" / "step_2.json").read_text())
  assert "hf_copy" in json.dumps(result) and "hf_rev" in json.dumps(result)
  before, _ = _read_all(os.path.join(FIXTURES, "hf_llama"))
  assert not np.array_equal(
    before["decoder/decoder_norm/scale"], flat["decoder/decoder_norm/scale"]
  )


def hf_llama_fields():
  return _read_all(os.path.join(FIXTURES, "hf_llama"))[1]


@pytest.mark.slow  # ~50 s on 2 cores: five compilations of the decoding loop
def test_mtx_decoding_of_a_llama_equals_transformers_generate_and_pads_per_row():
  """mtx.infer.decoding.decode (prefill + cached steps): each reference prompt, its first
  token given as the start token and causal attention (as transformers runs it), gives
  transformers' greedy tokens; decoded together, rows of different lengths (left-padded
  in the cache) give what each gives alone."""
  model, params = _load("hf_llama")
  prompts, generated = REFERENCE["prompts"], REFERENCE["hf_llama/generated"]
  steps = generated.shape[1]

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def decode(rows, start_id, prefix_lm):
    return decoding.decode(
      model,
      params,
      rows,
      max_decode_length=steps,
      eos_id=-1,  # the random model's tokens are compared as they come
      start_id=start_id,
      prefix_lm=prefix_lm,
    )[0]

  def run(rows, start_id, prefix_lm=False):
    return decode(jnp.asarray(rows, jnp.int32), start_id, prefix_lm)

  for row in range(len(prompts)):
    got = run(prompts[row : row + 1, 1:], int(prompts[row, 0]))
    np.testing.assert_array_equal(got[0], generated[row])
  ragged = np.array([[17, 299, 42, 9, 3], [4, 9, 0, 0, 0]], np.int32)
  together = run(ragged, 5, prefix_lm=True)
  for row in range(2):
    alone = run(ragged[row : row + 1, : 5 - 3 * row], 5, prefix_lm=True)
    np.testing.assert_array_equal(together[row], alone[0])


@pytest.mark.slow  # ~60 s on 2 cores: three short training runs
def test_a_decoder_only_run_stopped_and_resumed_ends_bit_identical(tmp_path):
  """tests/llama.gin from scratch with PCGrad: 4 steps at once, and 2 steps then a
  restart to 4 (the checkpoint at 2 holds the data position), give the same params."""

  def train(model_dir, steps):
    args = [
      "train",
      "--gin_file=tests/llama.gin",
      "--gin_file=mtl/pcgrad.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.CHECKPOINT_PERIOD=2",
    ]
    assert _cli(*args) == 0

  train(tmp_path / "once", 4)
  train(tmp_path / "twice", 2)
  train(tmp_path / "twice", 4)
  config = LlamaConfig(
    vocab_size=384,
    emb_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    num_layers=2,
    tie_word_embeddings=True,
  )
  mesh = parallel.make_mesh(None, jax.devices()[:1])
  loaded = [
    params_lib.load_trained(
      config, 384, mesh, parallel.DEFAULT_RULES, str(tmp_path / run / "4"), what=WHAT
    )[1]
    for run in ("once", "twice")
  ]
  for got, want in zip(jax.tree.leaves(loaded[1]), jax.tree.leaves(loaded[0])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # ~40 s on 2 cores: two short training runs
def test_a_decoder_only_run_on_the_gramian_route_logs_the_stacks_losses(tmp_path):
  """PCGrad on tests/llama.gin (a log line every step) for 3 steps on the stacks route
  and on the Gramian route: the Gram taps reach every Llama parameter, so the losses
  after the first updates agree."""
  from mtx.runtime import metrics_writer

  def train(route):
    model_dir = tmp_path / route
    args = [
      "train",
      "--gin_file=tests/llama.gin",
      "--gin_file=mtl/pcgrad.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.TRAIN_STEPS=3",
      "--gin.CHECKPOINT_PERIOD=3",
      f"--gin.train.task_grads_route='{route}'",
    ]
    assert _cli(*args) == 0
    return [r for r in metrics_writer.read_metrics(str(model_dir)) if "loss" in r]

  stacks, gram = train("stacks"), train("gramian")
  assert [r["step"] for r in stacks] == [r["step"] for r in gram] == [1, 2, 3]
  for a, b in zip(stacks, gram):
    for key in [k for k in a if k.startswith("loss")]:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
