"""Exact solvers for the small convex problems of gradient surgery, inside jit.

The Gram-based methods (``mtx.mtl.solvers``) reduce to problems in k variables, k the
number of tasks, posed on the Gram matrix ``G`` of the task gradients. This module holds
what they share:

``cosine_gram``: the scale-free form. With ``n_i = |g_i| = sqrt(G_ii)`` and the unit
  gradients ``u_i = g_i / n_i``, the cosine matrix ``C = D G D`` (``D = diag(1/n)``)
  has a unit diagonal whatever the norms: a 1000x ratio of gradient norms becomes a
  1000x spread in a vector of the problem, never a 10^6 condition number of its matrix.
``nnqp``: ``min 1/2 x^T H x + q^T x`` over ``x >= 0`` by the active-set method of
  Lawson & Hanson ("Solving Least Squares Problems", 1974, ch. 23; in its Gram form,
  Bro & De Jong 1997). Every step solves the equality-constrained problem of the
  current active set exactly (a Cholesky factorization and one step of iterative
  refinement), so the method ends, after finitely many steps, on the exact solution
  of its final active set; the loop stops when the KKT conditions hold (no
  coordinate at zero has a negative partial derivative), not after a fixed count.
``SolverStats``: what every solve reports: its KKT residual, its iterations, and
  whether it failed (residual above the tolerance after the iteration cap).

Everything is pure and jit-able, works in float32 or float64 (tolerances follow the
dtype), and runs its matrix products at full float32 precision on every backend.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Matrix products of the solvers run at full float32 precision: the default on GPUs
# (TF32) and TPUs (bfloat16 passes) would put a 1e-3 error in every residual.
PRECISION = jax.lax.Precision.HIGHEST


class SolverStats(NamedTuple):
  """What a solve reports (all scalars).

  residual: the largest violation of the method's optimality conditions, in the
    scale-free units its docstring gives (dimensionless; ~1e-6 is float32's
    rounding); 0 for a closed form.
  iterations: i32[], linear solves (active-set steps, Newton steps) taken.
  failed: bool[], the residual is above the tolerance: the method's documented
    fallback was applied.
  """

  residual: jax.Array
  iterations: jax.Array
  failed: jax.Array


def exact(dtype=jnp.float32) -> SolverStats:
  """The stats of a closed form: residual 0, no iteration, not failed."""
  return SolverStats(
    residual=jnp.zeros([], dtype),
    iterations=jnp.zeros([], jnp.int32),
    failed=jnp.zeros([], bool),
  )


def eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def default_tol(dtype) -> float:
  """The residual above which a solve has failed: 1e-4 in float32, 1e-10 in float64.

  About 1000 ulps: the rounding of a well-posed solve stays 10-100x below it (the
  property tests in tests/test_mtl_solvers.py measure it), while an unconverged
  solve (what 100 Frank-Wolfe steps left under conflict) is 1e-2 or worse.
  """
  return 1e-4 if jnp.dtype(dtype).itemsize <= 4 else 1e-10


def stop_tol(dtype) -> float:
  """The tolerance the loops stop at: 64 ulps, well below ``default_tol``."""
  return 64 * eps(dtype)


def dot(a, b):
  return jnp.matmul(a, b, precision=PRECISION)


def full_precision(fn):
  """Runs ``fn`` (traced) with every matrix product at full float32 precision."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


def safe_div(a, b):
  """``a / b`` where ``b != 0``, else 0 (no NaN from an absent or zero gradient)."""
  return jnp.where(b != 0, a / jnp.where(b != 0, b, 1), 0)


def cosine_gram(g: jax.Array, present: jax.Array):
  """The scale-free form of a Gram matrix.

  Args:
    g: [k, k] Gram matrix (zero rows and columns for absent tasks).
    present: bool[k].

  Returns:
    ``(c, norms, active)``: ``c`` [k, k] the cosines ``G_ij / (n_i n_j)`` of the
    active tasks, clipped to [-1, 1], unit diagonal, zero rows and columns for
    the others; ``norms`` [k] the gradient norms ``n_i`` (0 for absent tasks);
    ``active`` bool[k], the present tasks with a non-zero, finite gradient.
  """
  d = jnp.where(present, jnp.diag(g), 0)
  norms = jnp.sqrt(jnp.maximum(d, 0))
  active = present & (norms > 0) & jnp.isfinite(norms)
  inv = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
  c = jnp.clip(g * inv[:, None] * inv[None, :], -1, 1)
  both = active[:, None] & active[None, :]
  eye = jnp.eye(g.shape[0], dtype=bool)
  c = jnp.where(both & ~eye, c, 0) + jnp.diag(active.astype(g.dtype))
  return c, jnp.where(present, norms, 0), active


def masked_solve(h: jax.Array, rhs: jax.Array, mask: jax.Array) -> jax.Array:
  """Solves ``H[m, m] x[m] = rhs[m]`` (x zero off the mask m) for a PSD ``H``.

  A Cholesky factorization of the masked block, its diagonal brought into [1/2, 2] by
  powers of two (Jacobi scaling without rounding), with the identity elsewhere, a
  jitter of ``16 k eps`` against rounding (a block that is singular in exact
  arithmetic), and one step of iterative refinement against the jitter. ``rhs`` is
  [k] or [k, r].
  """
  k = h.shape[0]
  diag = jnp.diag(h)
  mask = mask & (diag > 0)  # a zero diagonal: a zero row and column of a PSD H
  power = jnp.round(-0.5 * jnp.log2(jnp.where(mask, diag, 1)))
  s = jnp.where(mask, jnp.exp2(power), 0).astype(h.dtype)
  both = mask[:, None] & mask[None, :]
  eye = jnp.diag(jnp.where(mask, 0, 1).astype(h.dtype))
  block = jnp.where(both, h * s[:, None] * s[None, :], 0) + eye
  jitter = jnp.where(mask, 16 * k * eps(h.dtype), 0).astype(h.dtype)
  factor = jax.scipy.linalg.cho_factor(block + jnp.diag(jitter))
  col = s if rhs.ndim == 1 else s[:, None]
  rhs = jnp.where(col != 0, rhs * col, 0)
  y = jax.scipy.linalg.cho_solve(factor, rhs)
  y = y + jax.scipy.linalg.cho_solve(factor, rhs - dot(block, y))
  return y * col


def nnqp_residual(h, q, x, free) -> jax.Array:
  """The KKT residual of ``nnqp``, a backward error: relative to ``max(|q|, |H| |x|)``.

  The largest of: ``|(H x + q)_j|`` where ``x_j > 0`` (stationarity on the
  support) and ``-(H x + q)_j`` where ``x_j = 0`` (no descent off the support),
  divided by the size of the terms that sum to ``H x + q``: how much H and q
  must move for x to be exact, whatever the conditioning.
  """
  grad = dot(h, x) + q
  viol = jnp.where(x > 0, jnp.abs(grad), jnp.maximum(-grad, 0))
  viol = jnp.where(free, viol, 0)
  scale = jnp.maximum(
    jnp.maximum(jnp.max(jnp.abs(jnp.where(free, q, 0))), jnp.max(dot(jnp.abs(h), x))),
    jnp.finfo(h.dtype).tiny,
  )
  return jnp.max(viol) / scale


class _LHState(NamedTuple):
  x: jax.Array  # the current feasible point
  passive: jax.Array  # bool[k], the free set (x_j > 0 there)
  blocked: jax.Array  # bool[k], coordinates rounding kept from entering
  last: jax.Array  # i32[], the coordinate that just entered, or -1
  it: jax.Array
  done: jax.Array


def nnqp(
  h: jax.Array,
  q: jax.Array,
  free: jax.Array,
  x0: Optional[jax.Array] = None,
  *,
  max_iter: Optional[int] = None,
  tol: Optional[float] = None,
):
  """``min 1/2 x^T H x + q^T x`` over ``x >= 0``, ``x_j = 0`` off ``free``.

  ``H`` [k, k] symmetric positive semi-definite, such that the problem is bounded
  (it is, for ``H = A^T A`` and ``q = A^T b``: a non-negative least-squares problem).
  Lawson-Hanson's active-set method: from a feasible point with passive set P (its
  positive coordinates), solve the problem on P with the others at zero; if the
  solution is positive, move there and let in the coordinate of most negative
  partial derivative (stop when none is below ``-stop_tol``: the KKT conditions
  hold); otherwise step toward it until a coordinate reaches zero and drop it. In
  exact arithmetic the objective decreases at each accepted step, so no active set
  repeats and it ends in finitely many steps (at most ``2^k``; in practice about
  twice the size of the support). A coordinate that rounding keeps from entering
  (its solve gives it a non-positive value) is blocked; the final residual says
  whether that mattered.

  Args:
    h: [k, k].
    q: [k].
    free: bool[k].
    x0: a feasible start (warm start), or None for 0.
    max_iter: cap on the linear solves; default ``4 k + 20``.
    tol: the residual (``nnqp_residual``) above which the solve failed; default
      ``default_tol(dtype)``.

  Returns:
    ``(x [k], SolverStats)``.
  """
  k = h.shape[0]
  dtype = h.dtype
  max_iter = 4 * k + 20 if max_iter is None else max_iter
  tol = default_tol(dtype) if tol is None else tol
  q = jnp.where(free, q, 0)
  x = jnp.zeros((k,), dtype) if x0 is None else jnp.where(free, jnp.maximum(x0, 0), 0)
  enter_tol = stop_tol(dtype) * jnp.maximum(jnp.max(jnp.abs(q)), jnp.finfo(dtype).tiny)
  state = _LHState(
    x=x,
    passive=x > 0,
    blocked=~free,
    last=jnp.asarray(-1, jnp.int32),
    it=jnp.zeros([], jnp.int32),
    done=jnp.zeros([], bool),
  )

  def body(st: _LHState) -> _LHState:
    s = masked_solve(h, -q, st.passive)
    finite = jnp.all(jnp.isfinite(s))
    feasible = finite & jnp.all(jnp.where(st.passive, s > 0, True))
    # Accept: move to s, let in the most promising coordinate (or stop).
    grad = dot(h, s) + q
    w = jnp.where(~st.passive & ~st.blocked, -grad, -jnp.inf)
    j = jnp.argmax(w).astype(jnp.int32)
    enter = w[j] > enter_tol
    # The coordinate that just entered did not come out positive: rounding.
    last = jnp.maximum(st.last, 0)
    stuck = ~feasible & (~finite | ((st.last >= 0) & (s[last] <= 0)))
    # Step back toward s until the first coordinate reaches zero.
    # Coordinates that do not block the step get +inf (not 1): with alpha == 1 (a
    # blocking s_j that rounds to 0) a 1 would drop every passive coordinate.
    ratio = jnp.where(
      st.passive & (s <= 0), st.x / jnp.where(s <= 0, st.x - s, 1), jnp.inf
    )
    alpha = jnp.clip(jnp.min(ratio), 0, 1)
    back = st.x + alpha * (s - st.x)
    drop = st.passive & ((ratio <= alpha) | (back <= 0))
    onehot_j = jax.nn.one_hot(j, k, dtype=bool)
    onehot_last = jax.nn.one_hot(last, k, dtype=bool) & (st.last >= 0)

    def pick(accept, stuck_, back_):
      return jnp.where(feasible, accept, jnp.where(stuck, stuck_, back_))

    return _LHState(
      x=pick(s, st.x, jnp.where(drop, 0, back)),
      passive=pick(
        st.passive | (onehot_j & enter), st.passive & ~onehot_last, st.passive & ~drop
      ),
      blocked=st.blocked | (stuck & onehot_last),
      last=pick(jnp.where(enter, j, -1), jnp.asarray(-1, jnp.int32), jnp.int32(-1)),
      it=st.it + 1,
      # Stop when the KKT conditions hold, or when rounding leaves no way on.
      done=pick(~enter, ~finite & (st.last < 0), False),
    )

  st = jax.lax.while_loop(lambda st: ~st.done & (st.it < max_iter), body, state)
  x = jnp.where(free, jnp.maximum(st.x, 0), 0)
  res = nnqp_residual(h, q, x, free)
  res = jnp.where(jnp.all(jnp.isfinite(x)), res, jnp.inf)
  return x, SolverStats(residual=res, iterations=st.it, failed=~(res <= tol))
