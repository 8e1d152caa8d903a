"""LoRA adapters (Hu et al. 2021), per-task adapters and MultiLoRA (Wang et al. 2023).

A targeted dense kernel K [*in, *out] of attention (query, key, value, out) or of the MLP
(wi, wi_0, wi_1, ..., wo) gets, in the same module, low-rank factors whose product is
added on the activation path, as Hugging Face PEFT does (A @ B is never formed in the
forward pass; under the trainer's per-unit vmap it would cost one [*in, *out] per unit):

    y = x K + s * (x A) B                                       s = alpha / rank

Parameters next to K (``scan_layers`` adds a leading 'layers' axis to all of them)::

    K_lora_a       [*in, r]        (*in names, lora_rank)       shared adapter
    K_lora_b       [r, *out]       (lora_rank, *out names)
    MultiLoRA (num_parallel n > 1): a leading [n] ('lora_parallel') on both, and
    K_lora_scale   [n]             (lora_parallel)    y += s * sum_i c_i (x A_i) B_i
    per_task (num_adapters T):
    K_lora_task_a  [T, *in, r]     (lora_adapters, *in names, lora_rank)
    K_lora_task_b  [T, r, *out]    (lora_adapters, lora_rank, *out names)

"in" are the kernel's input axes: query/key/value [E, H, D] have in (E,), out (H, D);
the attention output [H, D, E] in (H, D), out (E,); wi [E, M]; wo [M, E]. The per-task
adapters are routed by a per-token adapter id (int32, >= 0 selects adapter t, -1 none,
e.g. padding): h = x A_t for all t at once ([B, L, T, r], cheap since T * r is small),
zeroed where t is not the token's id, then contracted with B over (T, r). So a packed
row holding examples of two tasks uses each task's adapter on its own tokens. A model
called without adapter ids applies the shared adapter(s) only.

Initialization as PEFT: A uniform in +-1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5)),
B zeros, so the adapted model equals the base at init. MultiLoRA: the scales c start at
0 (the delta is zero) and B is initialized like A (uniform in +-1/sqrt(r)).

This module holds the configuration, the forward delta (pure), and the param-tree helpers
(``split``, ``combine``, ``merge``); ``mtx.model.layers.adapt`` creates the adapters.

>>> cfg = LoraConfig(targets="attention/(query|value)$", rank=4)
>>> cfg.enabled, cfg.scale
(True, 4.0)

References:
  LoRA: https://arxiv.org/abs/2106.09685
  MultiLoRA: https://arxiv.org/abs/2311.11501
  PEFT's LoRA layer: https://github.com/huggingface/peft (src/peft/tuners/lora/layer.py)
"""

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mtx.errors import UserError

Array = jax.Array

MARK = "_lora_"
SUFFIX_A = "_lora_a"
SUFFIX_B = "_lora_b"
SUFFIX_SCALE = "_lora_scale"
SUFFIX_TASK_A = "_lora_task_a"
SUFFIX_TASK_B = "_lora_task_b"

# Logical axis names of the adapters' own axes (mtx.parallel.DEFAULT_RULES replicates
# them; the kernel's own axes keep the kernel's names and so its sharding).
RANK_AXIS = "lora_rank"
ADAPTERS_AXIS = "lora_adapters"
PARALLEL_AXIS = "lora_parallel"

# The dense kernels LoRA may adapt, by parameter name: attention query/key/value/out and
# the MLP's wi, wi_0, wi_1, ..., wo (both families).
ADAPTABLE = re.compile(r"^(query|key|value|out|wi|wi_\d+|wo)$")
# Kernels LoRA refuses: the token embedding and the vocabulary projection.
REFUSED = re.compile(r"(^|/)(token_embedder/embedding|logits_dense/kernel)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA adapters of a model; gin binds them as ``model.LoraConfig.*`` (and the model
  config takes them as ``model.T5Config.lora = @model.LoraConfig()``, or LlamaConfig's).

  Attributes:
    targets: a regex, ``re.search``-ed on each dense kernel's path, the '/'-joined module
      path and param name without the 'params' root, e.g.
      "encoder/layers_0/attention/query" (scanned models: "layers" for "layers_0").
      "" (the default) means no LoRA. Only attention and MLP kernels can be targeted;
      a regex that matches the embedding or the vocabulary projection is refused.
    rank: r, the adapters' rank.
    alpha: the delta is scaled by alpha / rank (PEFT's convention).
    per_task: one adapter per task (or task group), routed by per-token adapter ids.
    num_adapters: T, the number of per-task adapters; filled in by the trainer (number
      of tasks or groups) when ``per_task``. The model refuses ``per_task`` with 0.
    shared: a shared adapter on all tokens (with ``per_task``: besides the per-task
      ones).
    num_parallel: MultiLoRA's horizontal scaling of the shared adapter: n parallel
      LoRAs, summed with learnable per-LoRA scales (1: plain LoRA).
  """

  targets: str = ""
  rank: int = 8
  alpha: float = 16.0
  per_task: bool = False
  num_adapters: int = 0
  shared: bool = True
  num_parallel: int = 1

  @property
  def enabled(self) -> bool:
    return self.targets != ""

  @property
  def scale(self) -> float:
    """s = alpha / rank, the factor of every adapter's delta."""
    return self.alpha / self.rank

  def targets_kernel(self, path: str) -> bool:
    """Whether the kernel at ``path`` ("decoder/layers_0/mlp/wo") gets adapters."""
    return self.enabled and re.search(self.targets, path) is not None


def check_config(config: LoraConfig) -> None:
  """Raises UserError for LoRA settings a model cannot run with (none when disabled)."""
  if not config.enabled:
    return
  try:
    re.compile(config.targets)
  except re.error as e:
    raise UserError(
      f"model.LoraConfig.targets {config.targets!r} is not a valid regex ({e}); fix it "
      "(e.g. 'attention/(query|value)$|mlp/w')."
    ) from None
  if config.rank <= 0:
    raise UserError(
      f"model.LoraConfig.rank is {config.rank}; set it to a positive integer (e.g. 8)."
    )
  if config.alpha <= 0:
    raise UserError(
      f"model.LoraConfig.alpha is {config.alpha}; set it to a positive number (e.g. 16)."
    )
  if config.num_parallel < 1:
    raise UserError(
      f"model.LoraConfig.num_parallel is {config.num_parallel}; use 1 (plain LoRA) or "
      "more (MultiLoRA)."
    )
  if config.per_task and config.num_adapters <= 0:
    raise UserError(
      f"model.LoraConfig.per_task is set but num_adapters is {config.num_adapters}; set "
      "model.LoraConfig.num_adapters to the number of tasks or groups (the trainer does)."
    )
  if not config.per_task and not config.shared:
    raise UserError(
      "model.LoraConfig.shared is False and per_task is False, so there is no adapter; "
      "set one of them (or targets = '' for no LoRA)."
    )


def check_targets(config: LoraConfig, kernel_paths: Iterable[str]) -> None:
  """Raises UserError unless ``config.targets`` matches at least one adaptable kernel of
  ``kernel_paths`` (every param path of the model) and no embedding or vocabulary
  projection."""
  if not config.enabled:
    return
  paths = list(kernel_paths)
  refused = [p for p in paths if REFUSED.search(p) and re.search(config.targets, p)]
  if refused:
    raise UserError(
      f"model.LoraConfig.targets {config.targets!r} matches {refused[0]!r}; LoRA adapts "
      "attention and MLP kernels only, so narrow the regex to those."
    )
  adaptable = [p for p in paths if ADAPTABLE.match(p.rsplit("/", 1)[-1])]
  if not any(re.search(config.targets, p) for p in adaptable):
    first = {}  # one example of each kernel name
    for p in adaptable:
      first.setdefault(p.rsplit("/", 1)[-1], p)
    examples = ", ".join(repr(p) for p in first.values())
    raise UserError(
      f"model.LoraConfig.targets {config.targets!r} matches no kernel of the model; "
      f"write a regex for paths such as {examples}."
    )


def kaiming_uniform(fan_in: int):
  """PEFT's init of A: uniform in +-1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _contract_in(x: Array, a: Array, num_in: int, lead: int) -> Array:
  """x [B, L, *in] with a [*lead, *in, r] (``lead`` leading adapter axes, 0 or 1)
  -> [B, L, *lead, r]."""
  x_axes = tuple(range(x.ndim - num_in, x.ndim))
  a_axes = tuple(range(lead, lead + num_in))
  return jax.lax.dot_general(x, a, ((x_axes, a_axes), ((), ())))


def delta(
  x: Array,
  num_in: int,
  a: Array,
  b: Array,
  weights: Array | None = None,
) -> Array:
  """The unscaled adapter delta (x A) B on the activation path, in x's dtype.

  Shapes: x [B, L, *in]; a [*in, r], b [r, *out] -> [B, L, *out]. With a leading adapter
  axis n, a [n, *in, r] and b [n, r, *out], ``weights`` weighs each adapter's rank-r
  projection before the sum over (n, r): f32 [n] (MultiLoRA's scales) or [B, L, n] (a
  one-hot of the token's adapter id, all zeros for -1).
  """
  lead = 0 if weights is None else 1
  h = _contract_in(x, a.astype(x.dtype), num_in, lead)  # [B, L, (n,) r]
  if weights is not None:
    h = h * weights.astype(x.dtype)[..., None]
  h_axes = tuple(range(2, h.ndim))
  b_axes = tuple(range(len(h_axes)))
  return jax.lax.dot_general(h, b.astype(x.dtype), ((h_axes, b_axes), ((), ())))


def task_weights(adapter_ids: Array, num_adapters: int) -> Array:
  """int [B, L] adapter ids (-1: none) -> f32 [B, L, T] one-hot (zeros for -1)."""
  return jax.nn.one_hot(adapter_ids, num_adapters, dtype=jnp.float32)


# Param-tree helpers. They take nested mappings (dict or FrozenDict, the 'params'
# collection or its inside) whose leaves may be boxed (nn.Partitioned).


def _key_name(key: Any) -> str:
  return str(getattr(key, "key", getattr(key, "name", key)))


def is_adapter(path: Sequence[Any]) -> bool:
  """Whether a param path (its keys: strings, or jax key entries) is an adapter's.

  >>> is_adapter(("decoder", "layers_0", "mlp", "wo_lora_a")), is_adapter(("mlp", "wo"))
  (True, False)
  """
  return any(MARK in _key_name(k) for k in path)


def _partition(tree: Mapping, keep, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, Mapping):
      sub = _partition(v, keep, path)
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


def split(params: Mapping) -> tuple[dict, dict]:
  """(adapters, base): two disjoint nested dicts with ``params``' nesting, the adapter
  leaves (``is_adapter``) and everything else; empty subtrees are left out.
  ``combine(base, adapters)`` gives ``params`` back."""
  adapters = _partition(params, is_adapter)
  base = _partition(params, lambda p: not is_adapter(p))
  return adapters, base


def combine(base: Mapping, adapters: Mapping) -> dict:
  """The union of two disjoint nested dicts (the inverse of ``split``)."""
  out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
  for k, v in adapters.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = combine(out[k], v)
    elif k in out:
      raise ValueError(f"combine: {k!r} is in both the base and the adapters.")
    else:
      out[k] = v
  return out


def _unbox(x: Any) -> Array:
  return x.unbox() if hasattr(x, "unbox") else x


def _rebox(like: Any, value: Array) -> Any:
  return like.replace_boxed(value) if hasattr(like, "replace_boxed") else value


def _outer(a: Array, b: Array, lead: int) -> Array:
  """sum over r of a [*lead, *in, r] b [*lead, r, *out] -> [*lead, *in, *out], f32."""

  def fn(a, b):
    return jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)

  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(a, b)


def _kernel_delta(node: Mapping, name: str, kernel: Array, config: LoraConfig, adapter):
  """s * (the shared adapters' A B + adapter ``adapter``'s), f32 like ``kernel``."""
  total = jnp.zeros(kernel.shape, jnp.float32)

  def f32(suffix):
    return _unbox(node[name + suffix]).astype(jnp.float32)

  if name + SUFFIX_A in node:
    a, b = f32(SUFFIX_A), f32(SUFFIX_B)
    if name + SUFFIX_SCALE in node:  # MultiLoRA: [*layers, n, ...]; scales [*layers, n]
      c = f32(SUFFIX_SCALE)
      b = b * c.reshape(c.shape + (1,) * (b.ndim - c.ndim))
      total += _outer(a, b, c.ndim).sum(axis=c.ndim - 1)  # [*layers, n, ...] summed
    else:
      total += _outer(a, b, a.ndim + b.ndim - 2 - kernel.ndim)
  if adapter is not None and name + SUFFIX_TASK_A in node:
    a, b = f32(SUFFIX_TASK_A), f32(SUFFIX_TASK_B)
    lead = a.ndim + b.ndim - 4 - kernel.ndim  # the layer axis, when scanned
    num = a.shape[lead]
    if isinstance(adapter, int) and not 0 <= adapter < num:
      raise ValueError(f"merge: adapter {adapter} is not in [0, {num}).")
    a, b = jnp.take(a, adapter, axis=lead), jnp.take(b, adapter, axis=lead)
    total += _outer(a, b, lead)
  return config.scale * total


def merge(params: Mapping, config: LoraConfig, adapter: int | None = None) -> dict:
  """The base params with every adapted kernel replaced by K + delta, in float32.

  The delta is s * (the shared adapter, or MultiLoRA's scaled sum) plus, when the params
  hold per-task adapters and ``adapter`` is given, s * A_adapter B_adapter. ``adapter``
  None applies the shared adapter(s) only (as a model called without adapter ids);
  it is ignored when there are no per-task adapters; an int, or an int32 scalar under
  jit. The result has no adapter leaves, so the base model
  (``dataclasses.replace(model_config, lora=LoraConfig())``) runs it with the logits of
  the adapted model (given ids ``adapter`` on every token). Leaves may be arrays or boxed
  (``nn.Partitioned``); the merged kernels are float32.

  >>> a = {"wo": jnp.ones((2, 2)), "wo_lora_a": jnp.ones((2, 1)),
  ...      "wo_lora_b": jnp.ones((1, 2))}
  >>> merge(a, LoraConfig(targets="wo", rank=1, alpha=2.0))["wo"]
  Array([[3., 3.],
         [3., 3.]], dtype=float32)
  """
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      out[k] = merge(v, config, adapter)
    elif MARK in str(k):
      continue
    elif str(k) + SUFFIX_A in params or str(k) + SUFFIX_TASK_A in params:
      kernel = _unbox(v)
      merged = kernel.astype(jnp.float32) + _kernel_delta(
        params, str(k), kernel, config, adapter
      )
      out[k] = _rebox(v, merged)
    else:
      out[k] = v
  return out
