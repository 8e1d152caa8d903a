"""What per-task gradients cost: the train step of every mtl route, side by side.

    python tools/bench.py --scan_layers small     # README's table: tiny and small T5,
                                                  # k = 2, 4, 8 (~18 min on 2 cores)
    python tools/bench.py --model tiny --tasks 2 --steps 1 --repeats 1   # smoke run
    python tools/bench.py --model base,large --dtype bfloat16 --batch 64 \\
        --inputs_length 512 --targets_length 128 --vocab_size 32128        # a GPU

For each model (``gin_configs/models/<name>.gin``) and each number of tasks k, one
synthetic task-major batch (random tokens packed by ``mtx.data.packing`` like the
pipeline packs, units as ``build.default_units`` picks them) feeds every variant; the
one-gradient variants get the same rows as a flat batch. Each variant's step is built
through ``mtx.train.step.make_train_step`` and jitted with the state and batch
shardings and donation of ``mtx.train.loop.train``, then compiled ahead of time:

    plain         no mtl transform: the sum of task losses, one gradient
    static        mtl.static_weights: one gradient of the weighted sum
    famo          mtl.famo: one gradient, weights from the losses (O(1) in k)
    pcgrad_vmap   mtl.pcgrad on per-task gradients from vmap(grad) over task-major units
                  and a segment-sum (mtx's route, ``step._group_gradients``)
    pcgrad_naive  mtl.pcgrad on per-task gradients from ``jax.jacrev`` of the task-loss
                  vector: one forward and one backward pass per task over the whole
                  batch, what other libraries do; the reference to beat

**Timing.** After compiling and one warm-up step, the variants take turns in
``--repeats`` rounds of ``--steps`` steps each, so that drift on a shared machine hits
all of them alike; ``ratio`` is the median over rounds of (variant's round time / plain's
round time). ``cpu ratio`` is the same with process CPU time (all threads): the work
done, which barely moves when other processes share the cores, so it stays readable on a
busy machine; on an idle one the two agree (on a GPU or TPU it is host time, so not
shown). ``step ms`` and ``tok/s`` (non-padding target tokens) use the median round.

**FLOPs and MFU.** ``mtx.train.flops`` counts the model's matmul FLOPs per step
(3x forward); ``XLA GF`` is XLA's cost analysis of the compiled step (per device x
devices; it also counts elementwise work, the optimizer and, for per-task routes, the
Gram matrix and combination), printed with its ratio to the analytic count (``loop``
for scanned layers: XLA counts a loop body once, not per layer). MFU is the
analytic FLOPs per second over the peak matmul rate measured here (a large matmul on
every device of the mesh, in the activation dtype).

**Memory.** ``mem MiB``: the compiled step's per-device footprint (arguments + temporaries
+ outputs - donated aliases, ``compiled.memory_analysis()``); device memory stats
(GPU/TPU) and the process RSS are in the JSON. Each table's header gives the measured
per-device bytes of the per-task gradient stack [k, *params] (``_group_gradients``'
output) next to the parameters'.

**Input pipeline.** The demo mixture through ``mtx.data.pipeline`` at the same lengths
and batch (``tools/bench_data.py``'s measurement), next to the plain step's consumption.

``--breakdown`` times the pieces of the per-task route apart (gradients alone, segment
sum, Gram matrix, PCGrad, diagnostics, optimizer) to show where its extra time goes.

Prints tables, a goals summary and one JSON line (``JSON: ``; also ``--json PATH``).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
for _p in (_REPO, _TOOLS):
  if _p not in sys.path:
    sys.path.insert(0, _p)

# The tool times the step's own pieces (mtx.train.step's private helpers) on purpose.
# pylint: disable=protected-access
# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import flax.linen as nn
import gin
from gin import config_parser
import jax
import jax.numpy as jnp
import optax

import bench_data
from mtx.runtime import params as params_lib
from mtx import mtl, parallel
from mtx.data import packing, pipeline, registry
from mtx.errors import UserError
from mtx.model import T5, T5Config
from mtx.train import flops as flops_lib
from mtx.train import build as build_lib, optim, state as state_lib, step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

VARIANTS = ("plain", "static", "famo", "pcgrad_vmap", "pcgrad_naive")
MODELS = ("tiny", "small", "base", "large", "xl", "xxl")
MIB = 2.0**20


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny,small",
                 help=f"comma-separated sizes from gin_configs/models ({', '.join(MODELS)}),"
                      " or paths of gin files that bind model.T5Config")
  p.add_argument("--tasks", default="2,4,8", help="comma-separated numbers of tasks k")
  p.add_argument("--batch", type=int, default=16, help="global rows per step")
  p.add_argument("--inputs_length", type=int, default=64)
  p.add_argument("--targets_length", type=int, default=32)
  p.add_argument("--mesh", default="",
                 help="mesh axis sizes, e.g. 'data=4,tensor=2' (default: all devices "
                      "on data)")
  p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
  p.add_argument("--repeats", type=int, default=3, help="rounds (variants interleaved)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated subset of " + ",".join(VARIANTS) +
                 " (plain is always measured: ratios are to it)")
  p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                 help="activation dtype (default: the model's gin file)")
  p.add_argument("--scan_layers", default="",
                 help="override the gin files' scan_layers: 'true' or 'false' for every "
                      "model, or the models to scan (e.g. 'small'); scanning makes "
                      "compile time stop growing with depth")
  p.add_argument("--vocab_size", type=int, default=0,
                 help="0: the mixture's vocabulary size, padded to 128")
  p.add_argument("--mixture", default="demo",
                 help="mixture for the input pipeline (and the default vocabulary)")
  p.add_argument("--module", default="mixtures.demo", help="module registering it")
  p.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
  p.add_argument("--pipeline_seconds", type=float, default=3.0,
                 help="time in Pipeline.next_batch per layout (0: skip the pipeline)")
  p.add_argument("--matmul_size", type=int, default=0,
                 help="side of the peak-rate matmul (0: 2048 on CPU, 8192 elsewhere)")
  p.add_argument("--breakdown", action="store_true",
                 help="also time the pieces of the per-task route (more compiles)")
  p.add_argument("--json", default="", help="also write the JSON result to this path")
  p.add_argument("--seed", type=int, default=0)
  return p


def _csv(text: str, kind: Callable = str) -> list:
  return [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_mesh(text: str) -> Optional[dict]:
  """'data=4,tensor=2' -> {'data': 4, 'tensor': 2}; '' -> None (all on data)."""
  if not text:
    return None
  out = {}
  for item in _csv(text):
    name, _, size = item.partition("=")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise UserError(f"--mesh item {item!r} is not axis=size; write e.g. "
                      "'data=4,tensor=2'.") from None
  return out


# ---- model and data --------------------------------------------------------------------
def model_config(name: str, vocab_size: int, dtype: str = "",
                 scan_layers: str = "") -> T5Config:
  """The ``T5Config`` bound by ``gin_configs/models/<name>.gin`` (read, not applied).

  Args:
    name: tiny, small, base, large, xl or xxl; or the path of a gin file binding
      ``model.T5Config.*`` (its other bindings and includes are ignored).
    vocab_size: the vocabulary size (padded to a multiple of 128 here).
    dtype: overrides the file's activation dtype when not empty.
    scan_layers: "true"/"false" overrides the file's scan_layers when not empty.
  """
  path = name if name.endswith(".gin") else os.path.join(
      _REPO, "gin_configs", "models", f"{name}.gin")
  if not os.path.exists(path):
    raise UserError(f"--model {name!r}: no file {path}; use one of {', '.join(MODELS)} "
                    "or the path of a gin file.")
  values = {}
  with open(path, encoding="utf-8") as f:
    parser = config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True))
    for statement in parser:
      if (isinstance(statement, config_parser.BindingStatement)
          and statement.selector == "model.T5Config"):
        values[statement.arg_name] = statement.value
  if dtype:
    values["dtype"] = dtype
  if scan_layers:
    values["scan_layers"] = scan_layers == "true"
  return params_lib.resolve_model_config(T5Config(**values), vocab_size)


def synthetic_batch(num_tasks: int, batch_size: int, units: int, inputs_length: int,
                    targets_length: int, vocab_size: int, seed: int = 0) -> dict:
  """A task-major batch of random tokens, packed the way the pipeline packs.

  Unit u holds task ``u % num_tasks``; examples of random lengths (a quarter to a half
  of each row's length, tokens 1..V-1) are packed first-fit by ``packing.UnitPacker``
  until one does not fit, as ``Pipeline.next_batch`` does. Example (k 2, batch 4,
  units 2, targets 4): ``unit_task [0, 1]``, ``decoder_task_ids [[[0, 0, 0, -1], ...],
  [[1, 1, 1, 1], ...]]``.

  Returns:
    numpy int32 features [units, batch/units, length] and ``unit_task`` int32 [units].
  """
  rng = np.random.default_rng(seed)
  rows = batch_size // units
  flat = packing.empty_rows(batch_size, inputs_length, targets_length)
  out = {k: v.reshape(units, rows, -1) for k, v in flat.items()}
  unit_task = (np.arange(units) % num_tasks).astype(np.int32)
  for u in range(units):
    packer = packing.UnitPacker(rows, inputs_length, targets_length,
                                out={k: v[u] for k, v in out.items()})
    while True:
      n_in = int(rng.integers(max(1, inputs_length // 4), inputs_length // 2 + 1))
      n_tg = int(rng.integers(max(1, targets_length // 4), targets_length // 2 + 1))
      example = (rng.integers(1, vocab_size, n_in, dtype=np.int32),
                 rng.integers(1, vocab_size, n_tg, dtype=np.int32))
      if not packer.try_add(int(unit_task[u]), *example):
        break
  out["unit_task"] = unit_task
  return out


def flat_batch(task_major: dict) -> dict:
  """The same rows as a flat [batch, length] batch (no ``unit_task``)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in task_major.items()
          if k != "unit_task"}


# ---- the naive per-task route ----------------------------------------------------------
def naive_group_gradients(model, cfg, params, batch, group_counts, dkey, param_shardings):
  """Per-group gradients the usual way: ``jax.jacrev`` of the group-loss vector.

  Same signature and results as ``step._group_gradients`` (per-group gradients
  [G, *param] of each group's mean loss, and task loss sums f32[k]), computed over the
  whole batch flattened to [rows, length]: one forward pass, then one backward pass per
  group (jacrev vmaps the VJP over G one-hot cotangents), about (1 + 2G) / 3 the FLOPs
  of one gradient.
  """
  data = flat_batch(batch)
  gm = jax.nn.one_hot(jnp.asarray(cfg.group_of_task), cfg.num_groups, dtype=jnp.float32)

  def group_losses(p):
    sums, _ = step_lib._sums(model, cfg, p, data, dkey)
    return step_lib._safe_div(sums @ gm, group_counts), sums

  grads, sums = jax.jacrev(group_losses, has_aux=True)(params)
  grads = jax.tree.map(
      lambda g, s: jax.lax.with_sharding_constraint(
          g, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))),
      grads, param_shardings)
  return grads, sums


@contextlib.contextmanager
def naive_route():
  """While active (i.e. while the step is traced), the step uses the naive gradients."""
  saved = step_lib._group_gradients
  step_lib._group_gradients = naive_group_gradients
  try:
    yield
  finally:
    step_lib._group_gradients = saved


def variant_transforms(variant: str, num_tasks: int) -> tuple:
  """The mtl transforms of a variant, completed as ``loop.train`` completes them."""
  items = {"plain": (), "pcgrad_vmap": (mtl.pcgrad,), "pcgrad_naive": (mtl.pcgrad,),
           "static": (lambda: mtl.static_weights(
               [float(w) for w in np.linspace(0.5, 1.5, num_tasks)]),),
           "famo": (mtl.famo,)}[variant]
  return mtl.ensure_aggregator(build_lib.build_transforms(items, num_tasks))


# ---- building the steps ----------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """What every variant of one (model, k) shares."""
  model: Any
  config: T5Config
  mesh: Any
  rules: tuple
  optimizer: Any
  lengths: tuple
  params_abstract: Any
  p_shardings: Any
  params: Any
  num_tasks: int
  batch_size: int
  units: int
  batch_np: dict  # task-major numpy batch


@dataclasses.dataclass
class Built:
  """One variant, compiled, with its state and device batch."""
  name: str
  compiled: Any
  state: Any
  batch: dict
  compile_s: float  # trace + lower + XLA compile
  lower_s: float  # trace + lower
  xla_flops: float
  memory: dict


def make_setup(config: T5Config, mesh, rules: tuple, optimizer, lengths: tuple,
               num_tasks: int, batch_size: int, seed: int,
               params=None) -> Setup:
  """Model, shardings, initial params (reused when given) and the batch of one k."""
  dp = parallel.data_parallel_size(mesh)
  if batch_size % dp:
    raise UserError(f"--batch {batch_size} is not divisible by the mesh's data axes "
                    f"({dp}); use a multiple of {dp}.")
  units = build_lib.default_units(num_tasks, batch_size, dp, jax.process_count())
  model = T5(config)
  boxed, params_abstract = params_lib.abstract_params(model, *lengths)
  p_shardings = params_lib.param_shardings(boxed, mesh, rules)
  if params is None:
    with mesh:
      params = params_lib.init_params(model, seed, *lengths, p_shardings)
  batch_np = synthetic_batch(num_tasks, batch_size, units, *lengths, config.vocab_size,
                             seed)
  return Setup(model, config, mesh, rules, optimizer, lengths, params_abstract,
               p_shardings, params, num_tasks, batch_size, units, batch_np)


def _xla_flops(compiled, devices: int) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan"))) * devices


def _memory(compiled) -> dict:
  """The compiled program's per-device bytes."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0))
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  return out


def lower_variant(setup: Setup, variant: str, seed: int) -> tuple:
  """Builds one variant's step as ``loop.train`` does, jits and lowers it.

  Returns:
    (lowered, state, device batch, seconds to trace and lower).
  """
  s = setup
  k = s.num_tasks
  transforms = variant_transforms(variant, k)
  task_grads = mtl.needs_task_grads(transforms)
  if task_grads != variant.startswith("pcgrad"):
    raise AssertionError(f"{variant}: unexpected route (task_grads={task_grads})")
  mtl_init = optax.chain(*transforms).init
  abstract_state = jax.eval_shape(
      lambda p: state_lib.make_state(p, s.optimizer, mtl_init, seed), s.params_abstract)
  s_shardings = state_lib.state_shardings(abstract_state, s.params_abstract,
                                          s.p_shardings, s.mesh)
  with s.mesh:
    state = jax.jit(lambda p: state_lib.make_state(p, s.optimizer, mtl_init, seed),
                    out_shardings=s_shardings)(s.params)
  cfg = step_lib.StepConfig(num_tasks=k, group_of_task=tuple(range(k)),
                            task_grads=task_grads, z_loss=1e-4, rules=s.rules)
  step_fn = step_lib.make_train_step(s.model, s.optimizer, transforms, cfg, s.p_shardings)
  layout = pipeline.Layout(s.batch_size, s.units if task_grads else 0, *s.lengths)
  host = s.batch_np if task_grads else flat_batch(s.batch_np)
  batch = parallel.host_to_global(host, s.mesh)
  jit_step = jax.jit(step_fn, in_shardings=(s_shardings, build_lib.batch_shardings(
      layout, s.mesh)), out_shardings=(s_shardings, None), donate_argnums=(0,))
  route = naive_route() if variant == "pcgrad_naive" else contextlib.nullcontext()
  t0 = time.perf_counter()
  with s.mesh, nn.logical_axis_rules(list(s.rules)), route:
    lowered = jit_step.lower(state, batch)
  return lowered, state, batch, time.perf_counter() - t0


def build_variant(setup: Setup, variant: str, seed: int) -> Built:
  """``lower_variant``, then the XLA compile (timed), cost and memory analyses."""
  lowered, state, batch, lower_s = lower_variant(setup, variant, seed)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = lower_s + time.perf_counter() - t0
  return Built(variant, compiled, state, batch, compile_s, lower_s,
               _xla_flops(compiled, setup.mesh.size), _memory(compiled))


def grad_stack(setup: Setup, seed: int) -> tuple:
  """Runs the per-task route's gradients once; returns (stack, jitted fn, args).

  The stack is ``step._group_gradients``' output, [k, *param] per leaf, sharded like
  params with the task axis unsharded.
  """
  s = setup
  cfg = step_lib.StepConfig(num_tasks=s.num_tasks, group_of_task=tuple(range(s.num_tasks)),
                            task_grads=True, z_loss=1e-4, rules=s.rules)
  batch = parallel.host_to_global(s.batch_np, s.mesh)

  def fn(params, batch):
    counts = step_lib._token_counts(cfg, batch) @ step_lib._group_matrix(cfg)
    return step_lib._group_gradients(s.model, cfg, params, batch, counts,
                                     jax.random.key(seed), s.p_shardings)
  jitted = jax.jit(fn)
  with s.mesh, nn.logical_axis_rules(list(s.rules)):
    stack, _ = jitted(s.params, batch)
    jax.block_until_ready(stack)
  return stack, jitted, (s.params, batch)


def per_device_bytes(tree) -> int:
  """Bytes of ``tree``'s shards on the first device (what one device holds)."""
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += sum(sh.data.nbytes for sh in leaf.addressable_shards if sh.device == dev)
  return total


# ---- measurements ----------------------------------------------------------------------
def peak_matmul_flops(mesh, dtype: str, size: int = 0, seconds: float = 1.0) -> dict:
  """The best matmul rate of the mesh: every device multiplies two [n, n] matrices.

  Returns:
    {"flops_per_s": float (all devices), "n": n, "dtype": dtype}.
  """
  platform = jax.devices()[0].platform
  n = size or (2048 if platform == "cpu" else 8192)
  devices = mesh.size
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  sharded = jax.sharding.NamedSharding(mesh, spec)
  dt = jnp.dtype(dtype)
  x = jax.device_put(jnp.ones([devices * n, n], dt) * 0.01, sharded)
  w = jax.device_put(jnp.ones([n, n], dt) * 0.01, parallel.replicated(mesh))
  f = jax.jit(lambda a, b: a @ b, out_shardings=sharded)
  jax.block_until_ready(f(x, w))
  best, spent, calls = float("inf"), 0.0, 0
  while spent < seconds or calls < 3:
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, w))
    dt_s = time.perf_counter() - t0
    best, spent, calls = min(best, dt_s), spent + dt_s, calls + 1
  return {"flops_per_s": 2.0 * devices * n**3 / best, "n": n, "dtype": dtype,
          "devices": devices, "platform": platform}


def _device_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keep if k in stats}


def _rss() -> dict:
  """Current and peak resident memory of this process, bytes."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    current = psutil.Process().memory_info().rss
  except ImportError:
    current = 0
  return {"rss": int(current), "peak_rss": int(peak)}


def time_rounds(fns: dict, steps: int, repeats: int) -> dict:
  """Runs every ``fns[name]()`` (one step each, returning something to wait on)
  ``steps`` times per round, the names taking turns (in an order rotated each round),
  for ``repeats`` rounds.

  Wall time is what a user waits; process CPU time (all threads) is the work done, and
  barely moves when other processes share the cores, so its ratios stay readable on a
  busy machine (on an idle one the two agree).

  Returns:
    {name: {"wall": [s per step, per round], "cpu": [CPU s per step, per round]}}.
  """
  out = {name: {"wall": [], "cpu": []} for name in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn = fns[name]
      t0, c0 = time.perf_counter(), time.process_time()
      result = None
      for _ in range(steps):
        result = fn()
      jax.block_until_ready(result)
      out[name]["wall"].append((time.perf_counter() - t0) / steps)
      out[name]["cpu"].append((time.process_time() - c0) / steps)
  return out


def _stepper(built: Built) -> Callable:
  """A closure that advances ``built``'s own state by one step (state is donated)."""
  def step():
    built.state, metrics = built.compiled(built.state, built.batch)
    return metrics
  return step


def bench_one(config: T5Config, name: str, mesh, rules, optimizer, lengths, k: int,
              args, params) -> tuple:
  """Measures every variant for one model and k; returns (result dict, params)."""
  setup = make_setup(config, mesh, rules, optimizer, lengths, k, args.batch, args.seed,
                     params)
  tokens = float(setup.batch_np["decoder_loss_weights"].sum())
  analytic = flops_lib.t5_train_step_flops(config, args.batch, *lengths)
  variants = ["plain"] + [v for v in args.variants if v != "plain"]
  built = {}
  for v in variants:
    try:
      built[v] = build_variant(setup, v, args.seed)
    except Exception as e:  # pylint: disable=broad-except
      # A variant that cannot compile here (out of memory, say) is reported, not fatal.
      if v == "plain":
        raise
      print(f"  {name} k={k} {v}: failed to build: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}", flush=True)
      built[v] = None
    if built[v] is not None:
      print(f"  {name} k={k} {v}: compiled in {built[v].compile_s:.1f} s (trace and "
            f"lower {built[v].lower_s:.1f} s)", flush=True)
  live = {v: b for v, b in built.items() if b is not None}

  stack_bytes = None
  if any(v.startswith("pcgrad") for v in live):
    stack, _, _ = grad_stack(setup, args.seed)
    stack_bytes = per_device_bytes(stack)
    del stack

  with mesh, nn.logical_axis_rules(list(rules)):
    steppers = {v: _stepper(b) for v, b in live.items()}
    memory_after = {}
    for v, fn in steppers.items():  # warm-up; process-wide peaks are cumulative
      jax.block_until_ready(fn())
      memory_after[v] = {**_device_memory(), **_rss()}
    times = time_rounds(steppers, args.steps, args.repeats)

  rows = {}
  plain = np.asarray(times["plain"]["wall"])
  plain_cpu = np.asarray(times["plain"]["cpu"])
  for v in variants:
    b = built[v]
    if b is None:
      rows[v] = {"failed": True}
      continue
    t = np.asarray(times[v]["wall"])
    c = np.asarray(times[v]["cpu"])
    step_s = float(np.median(t))
    rows[v] = {
        "step_ms": 1e3 * step_s,
        "round_ms": [1e3 * x for x in t],
        "ratio": float(np.median(t / plain)),
        "round_ratios": [float(x) for x in t / plain],
        "cpu_ms": 1e3 * float(np.median(c)),
        "cpu_ratio": float(np.median(c / plain_cpu)),
        "round_cpu_ratios": [float(x) for x in c / plain_cpu],
        "target_tokens_per_s": tokens / step_s,
        "model_flops_per_s": analytic / step_s,
        "xla_flops": b.xla_flops,
        "xla_over_analytic": b.xla_flops / analytic,
        "compile_s": b.compile_s,
        "lower_s": b.lower_s,
        "memory": b.memory,
        "memory_after": memory_after[v],
    }
  result = {"model": name, "num_tasks": k, "units": setup.units,
            "rows_per_unit": args.batch // setup.units, "target_tokens": tokens,
            "analytic_flops": analytic,
            "analytic_forward": flops_lib.t5_forward_flops(config, args.batch, *lengths),
            "grad_stack_bytes_per_device": stack_bytes,
            "param_bytes": int(sum(np.prod(x.shape) * x.dtype.itemsize
                                   for x in jax.tree.leaves(setup.params_abstract))),
            "variants": rows}
  if args.breakdown and "pcgrad_vmap" in live:
    result["breakdown"] = breakdown(setup, live, args)
  for b in live.values():
    b.state = None  # free device memory before the next k
  return result, setup.params


# ---- breakdown of the per-task route ---------------------------------------------------
def breakdown(setup: Setup, live: dict, args) -> dict:
  """Times the pieces of a PCGrad step apart (ms per call, median of rounds).

  one_gradient: grads of the summed loss (``step._one_gradient``, the plain route).
  task_grads_vmap / task_grads_naive: per-task gradients (vmap + segment-sum / jacrev).
  segment_sum: the segment-sum alone, on a [k, *param] stack.
  gram, diagnostics, pcgrad_update: the k x k Gram matrix, ``mtl.diagnostics`` (its own
  Gram), and PCGrad's whole update (Gram, solve, combination) on the stack.
  optimizer: the optimizer's update and ``apply_updates`` on one gradient.
  """
  s = setup
  k = s.num_tasks
  seed = args.seed
  stack, vmap_fn, vmap_args = grad_stack(s, seed)
  cfg = step_lib.StepConfig(num_tasks=k, group_of_task=tuple(range(k)), task_grads=True,
                            z_loss=1e-4, rules=s.rules)
  flat = parallel.host_to_global(flat_batch(s.batch_np), s.mesh)
  key = jax.random.key(seed)
  plain_tx = variant_transforms("plain", k)
  plain_state = optax.chain(*plain_tx).init(s.params)
  cfg1 = dataclasses.replace(cfg, task_grads=False)

  def counts_of(batch):
    return step_lib._token_counts(cfg, batch) @ step_lib._group_matrix(cfg)

  def one_gradient(params, batch):
    return step_lib._one_gradient(s.model, cfg1, plain_tx, params, plain_state, batch,
                                  counts_of(batch), key, key)[0]

  def naive(params, batch):
    return naive_group_gradients(s.model, cfg, params, batch, counts_of(batch), key,
                                 s.p_shardings)[0]

  pc = optax.chain(*variant_transforms("pcgrad_vmap", k))
  pc_state = pc.init(s.params)
  present = jnp.ones([k], bool)
  losses = jnp.ones([k], jnp.float32)
  unit_task = jnp.asarray(s.batch_np["unit_task"])
  grads1 = jax.tree.map(lambda g: g[0], stack)
  opt_state = s.optimizer.init(s.params)

  def opt_step(grads, opt_state, params):
    updates, opt_state = s.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  pieces = {
      "one_gradient": (jax.jit(one_gradient), (s.params, flat)),
      "task_grads_vmap": (vmap_fn, vmap_args),
      "task_grads_naive": (jax.jit(naive), vmap_args),
      "segment_sum": (jax.jit(lambda st, t: jax.tree.map(
          lambda g: jax.ops.segment_sum(g, t, num_segments=k), st)), (stack, unit_task)),
      "gram": (jax.jit(mtl.gram), (stack,)),
      "diagnostics": (jax.jit(mtl.diagnostics), (stack, present)),
      "pcgrad_update": (jax.jit(lambda st, ps, p: pc.update(
          st, ps, p, task_losses=losses, task_present=present, key=key)[0]),
                        (stack, pc_state, s.params)),
      "optimizer": (jax.jit(opt_step), (grads1, opt_state, s.params)),
  }
  fns = {}
  with s.mesh, nn.logical_axis_rules(list(s.rules)):
    for name, (fn, fargs) in pieces.items():
      jax.block_until_ready(fn(*fargs))  # compile
      fns[name] = (lambda fn=fn, fargs=fargs: fn(*fargs))
    fns["plain_step"] = _stepper(live["plain"])
    fns["pcgrad_vmap_step"] = _stepper(live["pcgrad_vmap"])
    times = time_rounds(fns, args.steps, args.repeats)
  return {name: {kind: 1e3 * float(np.median(t[kind])) for kind in ("wall", "cpu")}
          for name, t in times.items()}


# ---- input pipeline --------------------------------------------------------------------
def bench_input_pipeline(args, lengths: tuple) -> list:
  """Target tokens/s of the mixture's pipeline at the bench's lengths and batch."""
  registry.import_modules(args.module)
  data = bench_data._Data(args.mixture)
  units = build_lib.default_units(data.spec.num_groups, args.batch, 1, 1)
  out = []
  for layout, u in (("flat", 0), ("task-major", units)):
    r = bench_data.bench_pipeline(data.pipeline(lengths, args.batch, u, args.seed),
                                  args.pipeline_seconds)
    r.update(layout=layout, units=u)
    out.append(r)
  return out


# ---- report ----------------------------------------------------------------------------
def _fmt_table(result: dict, config: T5Config, peak: float, on_cpu: bool) -> list:
  """The per-variant rows of one (model, k)."""
  r = result
  lines = [f"{'variant':<13} {'step ms':>9} {'ratio':>6} {'cpu ratio':>9} {'tok/s':>9} "
           f"{'MFU':>6} {'XLA GF':>8} {'XLA/an':>6} {'compile s':>9} {'mem MiB':>8}"]
  for v, row in r["variants"].items():
    if row.get("failed"):
      lines.append(f"{v:<13} {'failed to build':>9}")
      continue
    mfu = row["model_flops_per_s"] / peak
    lines.append(
        f"{v:<13} {row['step_ms']:9.1f} {row['ratio']:5.2f}x "
        + (f"{row['cpu_ratio']:8.2f}x " if on_cpu else f"{'-':>9} ") +
        f"{row['target_tokens_per_s']:9,.0f} {mfu:6.1%} {row['xla_flops'] / 1e9:8.2f} "
        + (f"{'loop':>6}" if config.scan_layers else f"{row['xla_over_analytic']:6.2f}")
        + f" {row['compile_s']:9.1f} "
        f"{row['memory'].get('peak', 0) / MIB:8.1f}")
  return lines


def _goals(results: list, on_cpu: bool) -> list:
  """The issue's goals, checked on T5-small rows (or the last model measured).

  Judged on the wall-clock ratio; the CPU-time ratio is printed beside it.
  """
  lines = []
  names = [r["model"] for r in results]
  target = "small" if "small" in names else (names[-1] if names else None)
  for r in results:
    if r["model"] != target:
      continue
    rows, k = r["variants"], r["num_tasks"]
    checks = [("static", 1.02)]
    if k == 4:
      checks.append(("pcgrad_vmap", 1.3))
    if k == 8:
      checks.append(("pcgrad_vmap", 1.6))
    checks.append(("pcgrad_naive", None))
    for v, goal in checks:
      row = rows.get(v)
      if row is None or row.get("failed"):
        continue
      got = row["ratio"]
      text = f"  {target} k={k}: {v} {got:.2f}x" + (
          f" (CPU time {row['cpu_ratio']:.2f}x)" if on_cpu else "")
      if goal is None:
        text += f" reference; jacrev's FLOPs are (1 + 2k) / 3 = {(1 + 2 * k) / 3:.1f}x"
      else:
        text += f", goal <= {goal}x: " + (
            "met" if got <= goal else f"MISSED by {got / goal - 1:.0%}")
      lines.append(text)
  return lines


def run(args: argparse.Namespace) -> dict:
  """Runs the benchmark; prints tables and returns the JSON-able result."""
  models = _csv(args.model)
  tasks = _csv(args.tasks, int)
  args.variants = _csv(args.variants)
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown:
    raise UserError(f"--variants {unknown} unknown; choose from {', '.join(VARIANTS)}.")
  if not tasks or min(tasks) < 1 or args.steps < 1 or args.repeats < 1:
    raise UserError("--tasks must list positive ints and --steps/--repeats be >= 1.")
  lengths = (args.inputs_length, args.targets_length)
  if min(lengths) < 4:
    raise UserError("--inputs_length and --targets_length must be >= 4.")
  vocab_size = args.vocab_size
  if not vocab_size:
    registry.import_modules(args.module)
    vocab_size = registry.resolve(args.mixture).vocabulary.vocab_size
  mesh = parallel.make_mesh(parse_mesh(args.mesh))
  rules = tuple(parallel.DEFAULT_RULES)
  optimizer = optim.make_optimizer(args.optimizer, learning_rate=optim.as_schedule(1e-3))
  scan = {m: args.scan_layers if args.scan_layers in ("", "true", "false") else
          ("true" if m in _csv(args.scan_layers) else "") for m in models}
  configs = {m: model_config(m, vocab_size, args.dtype, scan[m]) for m in models}
  dtypes = sorted({c.dtype for c in configs.values()})
  peaks = {dt: peak_matmul_flops(mesh, dt, args.matmul_size) for dt in dtypes}
  dev = jax.devices()[0]
  machine = {"platform": dev.platform, "device_kind": dev.device_kind,
             "devices": mesh.size, "mesh": dict(mesh.shape), "cpu_count": os.cpu_count(),
             "jax": jax.__version__}
  print(f"{mesh.size} {dev.platform} device(s) ({dev.device_kind}), mesh "
        f"{dict(mesh.shape)}; peak matmul "
        + ", ".join(f"{dt} {p['flops_per_s'] / 1e9:,.1f} GFLOP/s (n={p['n']})"
                    for dt, p in peaks.items()), flush=True)

  results = []
  for m in models:
    params = None
    for k in tasks:
      r, params = bench_one(configs[m], m, mesh, rules, optimizer, lengths, k, args,
                            params)
      results.append(r)
    params = None

  pipe = bench_input_pipeline(args, lengths) if args.pipeline_seconds > 0 else []

  lines = [""]
  for r in results:
    c = configs[r["model"]]
    peak = peaks[c.dtype]["flops_per_s"]
    stack = r["grad_stack_bytes_per_device"]
    lines += [
        f"{r['model']} (E{c.emb_dim} M{c.mlp_dim} H{c.num_heads}x{c.head_dim} "
        f"L{c.num_encoder_layers}+{c.num_decoder_layers} V{c.vocab_size}, {c.dtype}"
        + (", scanned" if c.scan_layers else "")
        + (f", remat {c.remat_policy}" if c.remat_policy != "none" else "") + "), "
        f"k={r['num_tasks']} ({r['units']} units x {r['rows_per_unit']} rows), batch "
        f"{args.batch}, lengths {lengths[0]}/{lengths[1]}, "
        f"{r['target_tokens']:.0f} target tokens/step; analytic "
        f"{r['analytic_flops'] / 1e9:.2f} GFLOP/step; params "
        f"{r['param_bytes'] / MIB:.1f} MiB"
        + (f"; task-grad stack {stack / MIB:.1f} MiB/device "
           f"({stack / max(r['param_bytes'], 1):.2f}x params)" if stack else "")]
    lines += _fmt_table(r, c, peak, dev.platform == "cpu")
    if "breakdown" in r:
      b = r["breakdown"]
      lines.append("  breakdown, ms wall (CPU): " + ", ".join(
          f"{n} {t['wall']:.1f} ({t['cpu']:.1f})" for n, t in b.items()))
    lines.append("")
  if pipe:
    plain_best = max((r["variants"]["plain"]["target_tokens_per_s"] for r in results),
                     default=0.0)
    lines.append(f"input pipeline ({args.mixture} mixture, {lengths[0]}/{lengths[1]}, batch "
                 f"{args.batch}, this host): " + ", ".join(
                     f"{p['layout']} {p['target_tokens_per_s']:,.0f} tok/s" for p in pipe)
                 + f"; the fastest plain step consumes {plain_best:,.0f} tok/s "
                 f"({min(p['target_tokens_per_s'] for p in pipe) / max(plain_best, 1e-9):.1f}x "
                 "headroom)")
  goals = _goals(results, dev.platform == "cpu")
  if goals:
    lines += ["goals (ratio to plain, median of rounds):"] + goals
  print("\n".join(lines), flush=True)

  result = {"machine": machine, "peak_matmul": peaks,
            "settings": {"models": models, "tasks": tasks, "batch": args.batch,
                         "lengths": list(lengths), "steps": args.steps,
                         "repeats": args.repeats, "optimizer": args.optimizer,
                         "vocab_size": vocab_size, "dtype": args.dtype or None,
                         "scan_layers": args.scan_layers or None},
            "results": results, "pipeline": pipe, "goals": goals}
  text = json.dumps(result, sort_keys=True)
  print("JSON: " + text, flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  import warnings  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's "not cached" notes.
  # loop.train's `with mesh:` idiom, used here too, is deprecated in this JAX.
  warnings.filterwarnings("ignore", message=".*with mesh", category=DeprecationWarning)
  sys.exit(main())
