"""tools/bench.py: the tool runs every variant; its naive route and FLOPs are right."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mtx import parallel
from mtx.model import LlamaConfig
from mtx.train import flops as flops_lib
from mtx.train import step as step_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOL = os.path.join(_ROOT, "tools", "bench.py")
_TINY = os.path.join(_ROOT, "tests", "tiny.gin")  # E32, 1+1 layers: quick to compile


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench", _TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # five XLA compiles: ~1 min on 2 idle cores
def test_smoke_every_variant(bench, tmp_path, capsys):
  path = tmp_path / "bench.json"
  status = bench.main(
    [
      "--model",
      _TINY,
      "--tasks",
      "2",
      "--steps",
      "1",
      "--repeats",
      "1",
      "--batch",
      "8",
      "--inputs_length",
      "16",
      "--targets_length",
      "8",
      "--mixture",
      "tiny",
      "--module",
      "tiny_mixture",
      "--pipeline_seconds",
      "0.1",
      "--json",
      str(path),
    ]
  )
  out = capsys.readouterr().out
  assert status == 0
  for variant in bench.VARIANTS:
    assert f"\n{variant} " in out
  assert "input pipeline (tiny mixture" in out
  result = json.loads(path.read_text())
  (row,) = result["results"]
  assert sorted(row["variants"]) == sorted(bench.VARIANTS)
  assert all(v["step_ms"] > 0 and not v.get("failed") for v in row["variants"].values())
  # 2 tasks: the group stacks are split over the data axis too (ZeRO-2 style,
  # parallel.group_stack_sharding), so each of the n devices holds 1/n of the 2 copies
  # of the gradient, plus the padding of leaves whose sharded side does not divide by n.
  share = 2 * row["param_bytes"] / len(jax.devices())
  assert share <= row["grad_stack_bytes_per_device"] < 1.25 * share
  # XLA's count: per-task gradients by vmap cost the FLOPs of one gradient; jacrev over
  # 2 tasks (one forward, two backward passes) costs ~5/3 of it.
  xla = {v: r["xla_flops"] for v, r in row["variants"].items()}
  assert xla["pcgrad_vmap"] / xla["plain"] < 1.25  # + Gram, combination, diagnostics
  assert xla["pcgrad_naive"] / xla["plain"] > 1.4
  # The Gramian route: two forward and backward passes (Gram, then weighted), ~2x.
  assert 1.6 < xla["pcgrad_gramian"] / xla["plain"] < 2.4


def test_analytic_flops_match_xla(bench):
  """mtx.train.flops counts what XLA counts in the tiny model's step, within 15%."""
  mesh = parallel.make_mesh(None, jax.devices()[:1])  # 1 device: no replicated work
  config = bench.model_config("tiny", vocab_size=768)
  setup = bench.make_setup(
    bench.step_settings(config, "adafactor"), mesh, (32, 16), num_tasks=2, batch_size=16
  )
  build = bench.build_step(setup.data, setup.settings, mesh, "plain")
  assert not build.task_grads and build.step_config.num_tasks == 2
  # XLA's HLO cost analysis of the lowered step (the tool reports the compiled one,
  # which agrees within a few percent but takes ~10x longer to get).
  lowered, _, _, _ = bench.lower_variant(setup, build)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops_lib.t5_train_step_flops(config, 16, 32, 16)
  assert analytic == pytest.approx(2.051e9, rel=1e-3)
  assert 0.95 < cost["flops"] / analytic < 1.15


def test_unknown_variant_exits_2(bench, capsys):
  assert bench.main(["--variants", "plain,pcgard"]) == 2
  assert "pcgard" in capsys.readouterr().err


@pytest.mark.slow
def test_naive_route_equals_vmap_route(bench):
  """jacrev of the task-loss vector gives the per-task gradients of vmap + segment-sum."""
  mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
  config = bench.model_config(_TINY, vocab_size=200)
  # k=3 with 4 units on 2 devices: tasks hold 2, 1 and 1 units, so the segment-sum
  # really sums.
  setup = bench.make_setup(
    bench.step_settings(config, "adamw"), mesh, (16, 8), num_tasks=3, batch_size=16
  )
  assert setup.units == 4
  cfg = setup.step_config  # built by build_train_step for the synthetic 3-task mixture
  assert (cfg.task_grads, cfg.group_of_task) == (True, (0, 1, 2))
  vmap_stack, _, (params, batch) = bench.grad_stack(setup, seed=0)
  naive = jax.jit(
    lambda p, b: bench.naive_group_gradients(
      setup.model,
      cfg,
      p,
      b,
      bench.group_token_counts(cfg, b),
      jax.random.key(0),
      setup.p_shardings,
    )[0]
  )
  with mesh, nn.logical_axis_rules(list(setup.rules)):
    naive_stack = naive(params, batch)
  flat_v, _ = jax.tree.flatten(vmap_stack)
  flat_n, _ = jax.tree.flatten(naive_stack)
  assert len(flat_v) == len(flat_n)
  for v, n in zip(flat_v, flat_n):
    v, n = np.asarray(v), np.asarray(n)
    assert v.shape == n.shape and v.shape[0] == 3
    np.testing.assert_allclose(n, v, rtol=1e-5, atol=1e-5 * np.abs(v).max())
  # Not trivially equal: the tasks' gradients differ.
  leaf = np.asarray(flat_v[0])
  assert not np.allclose(leaf[0], leaf[1])


def test_naive_variant_puts_jacrev_in_the_step_through_the_builder_seam(
  bench, monkeypatch
):
  """pcgrad_naive's step is pcgrad_vmap's with ``naive_group_gradients`` passed to
  ``build_train_step`` as the per-group route (no patching of mtx.train.step)."""
  mesh = parallel.make_mesh(None, jax.devices()[:1])
  config = bench.model_config(_TINY, vocab_size=200)
  setup = bench.make_setup(
    bench.step_settings(config), mesh, (16, 8), num_tasks=2, batch_size=8
  )
  calls = []

  def recording(*args):
    calls.append(args[1])  # the StepConfig it was given
    return naive_group_gradients(*args)

  naive_group_gradients = bench.naive_group_gradients
  monkeypatch.setattr(bench, "naive_group_gradients", recording)
  build = bench.build_step(setup.data, setup.settings, mesh, "pcgrad_naive")
  assert build.step_config == setup.reference.step_config  # same step otherwise
  with mesh, nn.logical_axis_rules(list(setup.rules)):
    bench.lower_variant(setup, build)
  assert calls == [setup.reference.step_config]
  assert step_lib.group_gradients.__module__ == "mtx.train.step"  # left unpatched


def test_analytic_flops_formula():
  """The docstring's worked example, and linearity in the batch."""
  from mtx.model import T5Config  # pylint: disable=g-import-not-at-top

  c = T5Config(
    vocab_size=768,
    emb_dim=128,
    num_heads=4,
    head_dim=32,
    mlp_dim=256,
    num_encoder_layers=2,
    num_decoder_layers=2,
  )
  fwd = flops_lib.t5_forward_flops(c, 16, 32, 16)
  assert fwd["total"] == pytest.approx(0.6837e9, rel=1e-3)
  assert flops_lib.t5_train_step_flops(c, 32, 32, 16) == pytest.approx(6 * fwd["total"])


def test_perf_metrics_divide_model_flops_by_time_devices_and_the_peak():
  assert flops_lib.peak_tflops("NVIDIA H200") == 989.0
  assert flops_lib.peak_tflops("TPU v5 lite") == 197.0
  assert flops_lib.peak_tflops("cpu") is None
  assert flops_lib.peak_tflops("cpu", 2.0) == 2.0
  out = flops_lib.perf_metrics(8e12, 2.0, 4, 10.0)
  assert out == {"perf/tflops_per_device": 1.0, "perf/mfu": 0.1}
  assert "perf/mfu" not in flops_lib.perf_metrics(8e12, 2.0, 4, None)


def test_llama_flops_equal_a_hand_count():
  """llama_forward_flops' worked example, counted term by term (E 32, H 4 of width 8
  sharing K 2 key/value heads, M 64, 2 layers, V 256; 2 rows of 10 tokens)."""
  config = LlamaConfig(
    vocab_size=256,
    emb_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    num_layers=2,
  )
  q, kv, out, mlp = 32 * 32, 2 * 32 * 16, 32 * 32, 3 * 32 * 64  # multiply-adds / token
  attention, logits = 2 * 10 * 32, 32 * 256  # scores + values over the row; logits
  per_token = 2 * (2 * (q + kv + out + mlp + attention) + logits)
  assert per_token == 55_808
  got = flops_lib.llama_forward_flops(config, batch_size=2, length=10)
  assert got["total"] == 20 * per_token == 1_116_160
  assert got["attention"] == 2 * 2 * 20 * attention
  # A decoder-only row is inputs + targets long: 4 + 6 here.
  assert flops_lib.train_step_flops(config, 2, 4, 6) == 3 * 1_116_160


def test_analytic_flops_of_a_llama_match_xla(bench):
  """The decoder-only count agrees with XLA's on tools/bench.py's llama_tiny step."""
  mesh = parallel.make_mesh(None, jax.devices()[:1])
  config = bench.model_config("llama_tiny", vocab_size=256)
  assert isinstance(config, LlamaConfig)
  setup = bench.make_setup(
    bench.step_settings(config, "adafactor"), mesh, (32, 16), num_tasks=2, batch_size=16
  )
  assert setup.batch_np["decoder_input_tokens"].shape[-1] == 48  # prefix-LM rows
  build = bench.build_step(setup.data, setup.settings, mesh, "plain")
  lowered, _, _, _ = bench.lower_variant(setup, build)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops_lib.train_step_flops(config, 16, 32, 16)
  assert 0.95 < cost["flops"] / analytic < 1.15
