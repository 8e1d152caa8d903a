"""Gram taps: the unit Gram matrix P P^T of per-unit gradients without holding P.

P [U, n] are the per-unit gradients of the params (one row per unit of a task-major
batch, ``mtx.train.step``). Every parameter leaf W goes through ``tap(W, probe)`` at
its point of use, ``tap(W, probe, logical axis names)`` (``mtx.model.layers``, when the model is applied with a
``GRAM_PROBE`` collection); ``tap`` is the identity on W, and its backward pass turns
the cotangent of W into a contribution to the cotangent of ``probe``:

    forward:   tap(W, probe) = W                      probe f32[U] (zeros)
    backward:  ct_W [U, *W.shape] per unit (under jax.vmap over units)
               -> ct_probe [U, U] = sum over W's dims of ct_W[u] * ct_W[v]
               -> ct_W for W itself: passed through (summed over units by vmap)

Under ``jax.vmap(jax.grad(f, argnums=probe))`` over units, with W unbatched (or the VJP
of a ``vmap`` over units with one probe row per unit, ``mtx.train.step.gramian_gradient``),
the cotangent that reaches a tap is batched over units: unit u's gradient of that use of W.
``gram_rows`` is a ``jax.custom_batching.custom_vmap`` function, so its batching rule
sees the whole unit axis and returns ``ct ct^T``; each unit gets its row. Summed over
all taps (the gradient of the probe accumulates over every use, over the iterations of
``nn.scan`` too, since the probe is broadcast to every layer), the probe's gradients,
one row per unit, are P P^T. Per layer, only that layer's per-unit cotangents exist,
and only while its backward pass runs.

Worked example (one leaf W [2], two units with gradients [1, 0] and [1, 1]): the probe
gradient, vmapped over units, is ``[[1, 1], [1, 2]]``.

Without the collection nothing is tapped and the model is bit-identical.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtx import parallel

# The variable collection that holds one probe f32[U] per parameter leaf (same paths as
# 'params'; under nn.scan the probes are broadcast to every layer, not stacked).
GRAM_PROBE = "gram_probe"


def _spread(ct: jax.Array, names: tuple) -> jax.Array:
  """Per-unit cotangents [U, *param] laid out for ``ct ct^T``: every device holds all
  units of a slice of the param (its fsdp dimension split over data too,
  ``parallel.group_stack_spec``), so the contraction is local and only [U, U] is
  summed across devices. Left to XLA, the unit axis stays over data and one operand is
  gathered whole over data (T5-XXL, data=16 x fsdp=16: 27 GiB of temporaries for the
  Gram pass). A no-op without a mesh or logical axis rules."""
  if jax.sharding.get_abstract_mesh().empty:
    return ct
  spec = nn.logical_to_mesh_axes(names)
  if spec is None:
    return ct
  # The unit axes in effect (data, or every batch axis for spread units) come with the
  # rules inside the vmap over units (``parallel.rules_within_unit``).
  unit_axes = parallel.unit_axes_in(nn.get_logical_axis_rules())
  # First the layout the per-unit gradients come out in (units over their axes, the
  # rest like the param), then an all-to-all, as the stacks route does; asked for the
  # second alone, XLA's partitioner replicated whole cotangents (14.8 GiB of the 22.6).
  ct = jax.lax.with_sharding_constraint(ct, parallel.unit_stack_spec(spec, unit_axes))
  return jax.lax.with_sharding_constraint(ct, parallel.group_stack_spec(spec, unit_axes))


@functools.lru_cache(maxsize=None)
def gram_rows(names: tuple):
  """The function ``(ct, probe) -> one unit's row of the Gram matrix of ct`` over the
  unit axis, f32[U], for a param with logical axes ``names``.

  Only meaningful under ``jax.vmap`` over units (its batching rule, which sees the unit
  axis, computes ``ct ct^T``); called on one unit (U = 1) it is ``|ct|^2``.
  """

  @jax.custom_batching.custom_vmap
  def rows(ct, probe):
    return jnp.broadcast_to(jnp.vdot(ct, ct).astype(jnp.float32), probe.shape)

  @rows.def_vmap
  def _rows_vmap(axis_size, in_batched, ct, probe):
    """ct [U, *shape] (batched over units) -> [U, U] = ct ct^T, batched on axis 0."""
    ct_batched, _ = in_batched  # a probe row per unit, or one probe shared by all
    if not ct_batched:  # the same cotangent for every unit
      ct = jnp.broadcast_to(ct, (axis_size,) + ct.shape)
    ct = _spread(ct, names)
    dims = tuple(range(1, ct.ndim))
    out = jax.lax.dot_general(
      ct,
      ct,
      ((dims, dims), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
    )
    return out, True

  return rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tap(w: jax.Array, probe: jax.Array, names: tuple) -> jax.Array:
  """The identity on ``w`` (a param with logical axes ``names``); its backward pass
  sends the Gram rows of ``w``'s cotangent to ``probe`` (module docstring)."""
  return _batched_like(w, probe)


def _batched_like(w, probe):
  """``w``, batched over units when the probe is (one probe row per unit, under
  ``vmap``): + 0 x the probe's sum. Then a VJP taken outside the ``vmap``
  (``mtx.train.step.gramian_gradient``) brings each unit's own cotangent to the tap,
  not their sum (an unbatched ``w``'s cotangent is summed over units before it gets
  here). Per device that is one copy of the (gathered) param per local unit."""
  return w + (0.0 * jnp.sum(probe)).astype(w.dtype)


def _tap_fwd(w, probe, names):
  del names
  return _batched_like(w, probe), probe


def _tap_bwd(names, probe, ct):
  # The param's own cotangent passes through: a VJP that asks for it (the Gramian
  # route's weighted pass) gets the gradient; one that does not (the Gram pass) has
  # it dropped, and XLA removes its computation.
  return ct, gram_rows(names)(ct, probe)


tap.defvjp(_tap_fwd, _tap_bwd)
