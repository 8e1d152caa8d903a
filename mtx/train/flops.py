"""Model FLOPs of a T5 train step, counted analytically (for MFU and benchmarks).

Only matrix multiplications count (2 FLOPs per multiply-add), over the padded
lengths the compiled program computes on; norms, softmax, the loss and the
optimizer are left out (they are a few percent at T5 sizes). A training step is
3x the forward pass: the backward pass of ``y = x @ W`` takes two matmuls of the
same size (``dx`` and ``dW``). The per-task-gradient route (``vmap(grad)`` over
task-major units) costs the same model FLOPs: each unit's weight gradient is
the same products summed over fewer rows.
"""

from typing import Mapping


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
