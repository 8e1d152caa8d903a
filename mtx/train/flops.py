"""Model FLOPs of a train step (T5 or decoder-only), counted analytically (for MFU and benchmarks).

Only matrix multiplications count (2 FLOPs per multiply-add), over the padded
lengths the compiled program computes on; norms, softmax, the loss and the
optimizer are left out (they are a few percent at T5 sizes). A training step is
3x the forward pass: the backward pass of ``y = x @ W`` takes two matmuls of the
same size (``dx`` and ``dW``). The per-task-gradient route (``vmap(grad)`` over
task-major units) costs the same model FLOPs: each unit's weight gradient is
the same products summed over fewer rows.
"""

from typing import Mapping, Optional

from mtx.model import LlamaConfig

# Peak dense bf16 TFLOP/s of one JAX device, by a substring of its ``device_kind``
# (first match wins; the vendors' figures). A TPU v2/v3 device is one core (half a
# chip); v4 and later are one chip. CPUs have no entry: their runs log no MFU.
PEAK_TFLOPS = (
  ("TPU v2", 22.5),
  ("TPU v3", 61.5),
  ("TPU v4", 275.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5e", 197.0),
  ("TPU v5", 459.0),  # v5p
  ("TPU v6 lite", 918.0),
  ("TPU v6e", 918.0),
  ("H200", 989.0),
  ("H100", 989.0),
  ("A100", 312.0),
  ("L4", 121.0),
)


def peak_tflops(device_kind: str, override: Optional[float] = None) -> Optional[float]:
  """One device's peak TFLOP/s: ``override`` (``train.peak_tflops``) if given, else
  ``PEAK_TFLOPS``'s entry for ``device_kind``, else None (unknown, e.g. a CPU).

      >>> peak_tflops("NVIDIA H100 80GB HBM3")
      989.0
  """
  if override:
    return float(override)
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def perf_metrics(
  step_flops: float, step_s: float, num_devices: int, peak: Optional[float]
) -> dict:
  """``perf/tflops_per_device`` (model FLOPs per second per device, in TFLOP/s) and,
  when ``peak`` is known, ``perf/mfu`` (that over the peak; MaxText's MFU). Model
  FLOPs are the plain step's (``train_step_flops``) whatever the route: the
  per-task routes' extra work is overhead, which MFU is meant to show.

      >>> perf_metrics(2e15, 1.0, 8, 989.0)
      {'perf/tflops_per_device': 250.0, 'perf/mfu': 0.2527...}
  """
  tflops = step_flops / max(step_s, 1e-9) / num_devices / 1e12
  out = {"perf/tflops_per_device": tflops}
  if peak:
    out["perf/mfu"] = tflops / peak
  return out


def t5_forward_flops(
  config, batch_size: int, inputs_length: int, targets_length: int
) -> Mapping[str, float]:
  """Forward-pass matmul FLOPs of a T5 v1.1 (``mtx.model.T5``), by component.

  With E = emb_dim, A = num_heads * head_dim, M = mlp_dim, V = vocab_size,
  Le / Ld the encoder / decoder lengths and B the rows, per token (x 2 FLOPs):

      encoder layer   4 E A (q, k, v, out) + 3 E M (gated-GELU wi_0, wi_1, wo)
                      + 2 Le A (scores q.k and the weighted sum of values)
      decoder layer   4 E A + 3 E M + 2 Ld A      (causal self-attention, full L)
                      + 2 E A + 2 Ld A            (cross-attention q, out; scores)
                      + 2 E A per *encoder* token (cross-attention k, v)
                      + 2 Le A                    (cross-attention scores, values)
      logits          E V per decoder token (untied output projection)

  The embedding lookup is a gather (no FLOPs). Example: the tiny model (E 128,
  A 128, M 256, 2+2 layers, V 768) at B 16, Le 32, Ld 16 does 0.68 GFLOPs forward
  (0.34 encoder, 0.27 decoder, 0.03 attention, 0.05 logits), 2.05 GFLOPs per step.

  Args:
    config: a ``T5Config`` with ``vocab_size`` set.
    batch_size: B, rows (all rows of the global batch).
    inputs_length, targets_length: Le, Ld.

  Returns:
    Dict of float FLOPs: ``encoder``, ``decoder``, ``attention`` (the
    length-quadratic scores and weighted sums of all stacks), ``logits``, and
    ``total`` (their sum; ``encoder``/``decoder`` exclude attention).
  """
  e, m, v = config.emb_dim, config.mlp_dim, config.vocab_size
  a = config.num_heads * config.head_dim
  b, le, ld = batch_size, inputs_length, targets_length
  enc_tokens, dec_tokens = b * le, b * ld
  enc_layer = 2 * enc_tokens * (4 * e * a + 3 * e * m)
  dec_layer = (
    2 * dec_tokens * (4 * e * a + 3 * e * m + 2 * e * a) + 2 * enc_tokens * 2 * e * a
  )
  attn_enc = 2 * enc_tokens * 2 * le * a
  attn_dec = 2 * dec_tokens * 2 * ld * a + 2 * dec_tokens * 2 * le * a
  out = {
    "encoder": float(config.num_encoder_layers * enc_layer),
    "decoder": float(config.num_decoder_layers * dec_layer),
    "attention": float(
      config.num_encoder_layers * attn_enc + config.num_decoder_layers * attn_dec
    ),
    "logits": float(2 * dec_tokens * e * v),
  }
  out["total"] = sum(out.values())
  return out


def t5_train_step_flops(
  config, batch_size: int, inputs_length: int, targets_length: int
) -> float:
  """Model FLOPs of one train step (forward + backward): 3x the forward pass.

  Args:
    config: a ``T5Config`` with ``vocab_size`` set.
    batch_size: rows of the global batch.
    inputs_length, targets_length: padded encoder / decoder lengths.

  Returns:
    FLOPs per step (float), the numerator of MFU.
  """
  return (
    3.0 * t5_forward_flops(config, batch_size, inputs_length, targets_length)["total"]
  )


def llama_forward_flops(config, batch_size: int, length: int) -> Mapping[str, float]:
  """Forward-pass matmul FLOPs of a decoder-only ``mtx.model.Llama``, by component.

  With E = emb_dim, H / K = query / key-value heads of width D, M = mlp_dim,
  V = vocab_size, L the row length (a prefix-LM row: inputs + targets) and B the rows,
  per token (x 2 FLOPs):

      layer       E H D (q) + 2 E K D (k, v: grouped-query) + H D E (out)
                  + 3 E M (SwiGLU gate, up, down)
      attention   2 L H D (scores q.k and the weighted sum of values, the full row:
                  the causal / prefix / window masks do not skip work)
      logits      E V (tied or not, the output projection is a matmul)

  Example (``tests/test_bench.py``'s hand count): E 32, H 4, K 2, D 8, M 64, 2 layers,
  V 256 at B 2, L 10: per token 2 x (2 x (9216 + 640) + 8192) = 55,808 FLOPs, 1.12
  MFLOPs forward, 3.35 MFLOPs per train step.

  Args:
    config: a ``LlamaConfig`` with ``vocab_size`` set.
    batch_size: B, rows (all rows of the global batch).
    length: L.

  Returns:
    Dict of float FLOPs: ``decoder`` (the layers without attention), ``attention``,
    ``logits`` and ``total``.
  """
  e, m, v, d = config.emb_dim, config.mlp_dim, config.vocab_size, config.head_dim
  h, k = config.num_heads, config.num_kv_heads
  tokens = batch_size * length
  layer = 2 * tokens * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * m)
  out = {
    "decoder": float(config.num_layers * layer),
    "attention": float(config.num_layers * 2 * tokens * 2 * length * h * d),
    "logits": float(2 * tokens * e * v),
  }
  out["total"] = sum(out.values())
  return out


def train_step_flops(
  config, batch_size: int, inputs_length: int, targets_length: int
) -> float:
  """Model FLOPs of one train step (forward + backward, 3x the forward pass) of either
  model family: a T5 (``t5_forward_flops``) or a decoder-only model, whose rows are
  ``inputs_length + targets_length`` long (``llama_forward_flops``).

  Args:
    config: a ``T5Config`` or ``LlamaConfig`` with ``vocab_size`` set.
    batch_size: rows of the global batch.
    inputs_length, targets_length: the padded feature lengths.

  Returns:
    FLOPs per step (float), the numerator of MFU.
  """
  return 3.0 * forward_flops(config, batch_size, inputs_length, targets_length)["total"]


def forward_flops(
  config, batch_size: int, inputs_length: int, targets_length: int
) -> Mapping[str, float]:
  """``t5_forward_flops`` or, for a ``LlamaConfig``, ``llama_forward_flops`` of rows of
  ``inputs_length + targets_length`` (the prefix-LM rows, ``mtx.data.decoder_only``)."""
  if isinstance(config, LlamaConfig):
    return llama_forward_flops(config, batch_size, inputs_length + targets_length)
  return t5_forward_flops(config, batch_size, inputs_length, targets_length)
