"""k-sized solvers: task coefficients from the Gram matrix of task gradients.

Every function here takes ``G`` [k, k], the Gram matrix ``G_ij = <g_i, g_j>`` with
zero rows and columns for absent tasks, and ``present`` bool[k], and returns
coefficients ``c`` [k] (zero for absent tasks) such that the aggregated gradient is
``sum_i c_i g_i``. They run on device and are pure: no gradient ever enters them,
only its Gram matrix. Each one is scale-free: multiplying every gradient by s > 0
scales the result by s (or leaves it unchanged where the method is normalized).

PCGrad, GradVac and Aligned-MTL are closed forms (a fixed pass of projections, an
eigendecomposition). MGDA, UPGrad, CAGrad, Nash-MTL and IMTL-G solve a convex problem
exactly, on the cosine matrix (``qp.cosine_gram``: a 1000x ratio of gradient norms is
no harder than equal norms), to their optimality conditions rather than for a fixed
number of iterations, and return ``(c, qp.SolverStats)``: the residual of those
conditions, the iterations, and whether the solve failed. They work in float32 and
float64 (tolerances follow the dtype) and under ``jax.vmap``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtx.mtl import qp


def _present_scale(g, present):
  """The largest present diagonal entry, for conditioning (1 if none)."""
  s = jnp.max(jnp.where(present, jnp.diag(g), 0.0))
  return jnp.where(s > 0, s, 1.0)


def task_orders(key, k: int) -> jax.Array:
  """Random orders of the tasks, one per task: i32[k, k], row i a permutation.

  Row i is the argsort of k uniform draws (row i of
  ``jax.random.uniform(key, (k, k))``), a uniformly random permutation.
  """
  return jnp.argsort(jax.random.uniform(key, (k, k)), axis=-1).astype(jnp.int32)


# -------------------------------------------------------------------- PCGrad


def pcgrad_coefficients(g, present, orders):
  """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

  For each task i the projected gradient ``g_i^PC = sum_j W_ij g_j`` is built in
  the Gram basis: start from ``w = e_i``; for each j != i in ``orders[i]``, if
  ``<g_i^PC, g_j> = (G w)_j < 0`` then ``g_i^PC -= (G w)_j / G_jj * g_j``, i.e.
  ``w_j -= (G w)_j / G_jj`` (eq. 7's projection onto the normal plane of the
  ORIGINAL g_j). Absent tasks (and zero gradients) are skipped.

  Args:
    g: f32[k, k] Gram matrix.
    present: bool[k].
    orders: i32[k, k]; row i the order in which task i visits the others.

  Returns:
    W f32[k, k]; row i holds task i's projected gradient in the task basis.
    PCGrad's update is ``sum_i W[i]`` applied to the gradients.
  """
  k = g.shape[0]
  diag = jnp.diag(g)

  def one(i, order):
    w0 = jax.nn.one_hot(i, k, dtype=jnp.float32) * present[i]

    def body(s, w):
      j = order[s]
      dot = g[j] @ w
      project = (j != i) & present[j] & (dot < 0) & (diag[j] > 0)
      return w.at[j].add(jnp.where(project, -qp.safe_div(dot, diag[j]), 0.0))

    return jax.lax.fori_loop(0, k, body, w0)

  return jax.vmap(one)(jnp.arange(k), orders)


# ------------------------------------------------------------------- GradVac


def gradvac_coefficients(g, present, orders, targets, beta):
  """Gradient Vaccine (Wang et al. 2021, ICLR), whole-model granularity.

  For task i, with ``g_i'`` its current gradient (from ``e_i``), for each j != i
  in ``orders[i]``: ``phi = cos(g_i', g_j)``, ``phi_hat = targets[i, j]``; if
  ``phi < phi_hat``::

      g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
              / (|g_j| sqrt(1 - phi_hat^2)) * g_j

  and in every case ``targets[i, j] <- (1 - beta) phi_hat + beta phi`` (an EMA
  of the observed cosine). With all targets 0 this is PCGrad's projection.

  Args:
    g: f32[k, k] Gram matrix.
    present: bool[k].
    orders: i32[k, k].
    targets: f32[k, k] running targets phi_hat.
    beta: EMA rate.

  Returns:
    ``(W f32[k, k], new_targets f32[k, k])``; row i of W is task i's adjusted
    gradient in the task basis. Targets of pairs with an absent task are kept.
  """
  k = g.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))

  def one(i, order, trow):
    w0 = jax.nn.one_hot(i, k, dtype=jnp.float32) * present[i]

    def body(s, carry):
      w, trow = carry
      j = order[s]
      gw = g @ w
      nw = jnp.sqrt(jnp.maximum(w @ gw, 0.0))
      valid = (j != i) & present[i] & present[j] & (norms[j] > 0) & (nw > 0)
      cos = jnp.clip(qp.safe_div(gw[j], nw * norms[j]), -1.0, 1.0)
      tgt = trow[j]
      sin_t = jnp.sqrt(jnp.maximum(1.0 - tgt**2, 0.0))
      sin_c = jnp.sqrt(jnp.maximum(1.0 - cos**2, 0.0))
      a = qp.safe_div(nw * (tgt * sin_c - cos * sin_t), norms[j] * sin_t)
      w = w.at[j].add(jnp.where(valid & (cos < tgt), a, 0.0))
      trow = trow.at[j].set(jnp.where(valid, (1.0 - beta) * tgt + beta * cos, tgt))
      return w, trow

    return jax.lax.fori_loop(0, k, body, (w0, trow))

  return jax.vmap(one)(jnp.arange(k), orders, targets)


# ---------------------------------------------------------------------- MGDA


@qp.full_precision
def min_norm_weights(g, present, *, max_iter=None, tol=None):
  """MGDA's min-norm point (Desideri 2012; Sener & Koltun 2018), solved exactly.

  ``lambda* = argmin_{lambda in simplex} |sum_i lambda_i g_i|^2``: ``d = sum_i lambda*_i
  g_i`` is the minimum-norm point of the convex hull of the task gradients. Its
  optimality conditions are the method's guarantee: ``<g_j, d> >= |d|^2 >= 0`` for
  every task j, with equality where ``lambda*_j > 0`` (d = 0 at a Pareto-stationary
  point). For two tasks ``lambda_1 = clip(<g_2 - g_1, g_2> / |g_1 - g_2|^2, 0, 1)``.

  Solved through least-distance programming (Lawson & Hanson 1974, ch. 23):
  ``d / |d|^2`` is the shortest z with ``<g_j, z> >= 1`` for all j, whose dual is the
  non-negative least-squares problem ``min_{u >= 0} |J^T u|^2 + (1 - 1^T u)^2``, and
  ``lambda* = u / 1^T u``. In the scale-free basis (``u_i = a_i y_i``, ``a_i = n_min /
  n_i``, n the gradient norms) its Hessian is ``C + a a^T`` (C the cosine matrix) and
  its linear term ``-a``, which ``qp.nnqp`` solves exactly.

  Closed forms: a present task with a zero gradient puts 0 in the hull (``lambda* =
  e_j``, d = 0); identical gradients give any point of the simplex (the solve picks
  one; d is the gradient).

  Args:
    g: [k, k] Gram matrix (zero rows and columns for absent tasks).
    present: bool[k].
    max_iter, tol: ``qp.nnqp``'s.

  Returns:
    ``(lambda [k], SolverStats)``: lambda on the simplex of present tasks (zero if
    none); the residual is ``qp.nnqp``'s (relative to max a = 1). A failed solve keeps
    its last iterate, a point of the simplex.
  """
  k = g.shape[0]
  c, norms, active = qp.cosine_gram(g, present)
  n_min = jnp.min(jnp.where(active, norms, jnp.inf))
  a = jnp.where(active, n_min / jnp.where(active, norms, 1), 0)
  y, stats = qp.nnqp(c + jnp.outer(a, a), -a, active, max_iter=max_iter, tol=tol)
  lam = qp.safe_div(a * y, jnp.sum(a * y))
  zero = present & ~active
  any_zero = jnp.any(zero)
  lam = jnp.where(any_zero, jax.nn.one_hot(jnp.argmax(zero), k, dtype=g.dtype), lam)
  stats = _select_stats(any_zero | ~jnp.any(active), qp.exact(g.dtype), stats)
  return lam, stats


def _select_stats(pred, if_true: qp.SolverStats, if_false: qp.SolverStats):
  return jax.tree_util.tree_map(
    lambda a, b: jnp.where(pred, a, b.astype(a.dtype)), if_true, if_false
  )


# -------------------------------------------------------------------- UPGrad


@qp.full_precision
def upgrad_weights(g, present, *, reg=0.0, max_iter=None, tol=None):
  """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization").

  Each task gradient ``g_i`` is projected onto the dual cone ``{x : <x, g_j> >= 0 for
  all j}``: the projection is ``J^T w^(i)`` with ``w^(i) = argmin_{v >= e_i} v^T G v``
  (their Proposition 1), and UPGrad averages the projections, ``c = (1/|P|) sum_{i in
  P} w^(i)``. Every projection lies in the dual cone, so ``<d, g_j> >= 0`` for every
  task j (the guarantee), and d is the mean gradient when no pair conflicts.

  Solved scale-free and exactly: with ``v_j = n_i t_j / n_j`` the problem becomes
  ``min_{t >= e_i} t^T C t`` on the cosine matrix C, i.e. ``t = e_i + x`` with ``x =
  argmin_{x >= 0} 1/2 x^T C x + (C e_i)^T x`` (``qp.nnqp``), and ``pi(g_i) = n_i
  sum_j t_j u_j``. The k projections run as one batch (``jax.vmap``). Tasks with a
  zero gradient add no constraint and project to 0 (they count in the mean).

  Args:
    g: [k, k] Gram matrix.
    present: bool[k].
    reg: ridge added to C's diagonal (0: the exact projection); on C it is the
      relative ridge ``G + reg diag(G)``, the same for every scale of gradients.
    max_iter, tol: ``qp.nnqp``'s.

  Returns:
    ``(c [k], SolverStats)``: the worst projection's residual (``qp.nnqp``'s,
    relative to ``max |C e_i| = 1``). A failed projection keeps its last iterate,
    a point with ``t >= e_i``.
  """
  k = g.shape[0]
  c, norms, active = qp.cosine_gram(g, present)
  h = c + reg * jnp.diag(active.astype(g.dtype))

  def project(i):
    x, stats = qp.nnqp(h, h[:, i], active, max_iter=max_iter, tol=tol)
    return jax.nn.one_hot(i, k, dtype=g.dtype) + x, stats

  t, stats = jax.vmap(project)(jnp.arange(k))
  weight = jnp.where(active, norms, 0) / jnp.maximum(jnp.sum(present), 1)
  inv = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
  coef = qp.dot(weight, t) * inv
  stats = qp.SolverStats(
    residual=jnp.max(jnp.where(active, stats.residual, 0)),
    iterations=jnp.max(stats.iterations),
    failed=jnp.any(active & stats.failed),
  )
  return coef, stats


# -------------------------------------------------------------------- CAGrad


class _CAGradState(NamedTuple):
  lo: jax.Array  # phi(lo) <= c: the best t known feasible
  hi: jax.Array  # t* <= hi
  x_lo: jax.Array  # the solution at lo
  phi_lo: jax.Array
  res_lo: jax.Array  # its KKT residual
  x: jax.Array  # the last good solution (warm start, local quadratic)
  it: jax.Array
  solves: jax.Array
  hit: jax.Array
  done: jax.Array


@qp.full_precision
def cagrad_coefficients(g, present, c, *, max_iter=None, tol=None):
  """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent"), solved exactly.

  With ``g_0`` the mean gradient of the present tasks and ``r = c |g_0|``, CAGrad's
  update is the point of the ball ``|d - g_0| <= r`` that maximizes the worst task's
  improvement, ``max_d min_i <g_i, d>`` (their eq. 3); its dual is the paper's
  ``min_{w in simplex} <g_w, g_0> + r |g_w|`` with ``d = g_0 + r g_w / |g_w|``.

  Solved through that primal: for a level t, the point of ``{d : <g_i, d> >= t}``
  closest to ``g_0`` is ``g_0 + J^T v(t)``, v(t) a non-negative least-squares
  solution (``qp.nnqp`` on the cosine matrix), and its distance ``phi(t) = |J^T
  v(t)|`` is convex and non-decreasing in t; CAGrad's t* solves ``phi(t*) = r``, and
  then ``d = g_0 + J^T v(t*)`` (``v = r w / |g_w|``). On a fixed active set S,
  ``phi(t)^2`` is a quadratic in t, so the search takes its root on the active set
  of the last solve, kept in the bracket ``[min_i <g_i, g_0>, min_i <g_i, g_0> + r
  |g_i|]`` (bisecting when it leaves it): once the last active set is found, its
  root is exact. The KKT conditions hold at the end: ``|d - g_0| = r``, ``<g_i, d> >=
  t*`` for every task, with equality where ``v_i > 0``.

  Closed forms: ``c = 0`` or ``g_0 = 0`` gives ``d = g_0``; a single task gives
  ``(1 + c) g``. Tasks with a zero gradient count in the mean but not in the worst
  case (no d changes their loss). Where the ball is larger than needed (a
  Pareto-stationary point, c large) no level reaches it: the solve reports a
  miss, and d is the point nearest ``g_0`` among the best.

  Args:
    g: [k, k] Gram matrix.
    present: bool[k].
    c: the radius, relative to ``|g_0|`` (>= 0).
    max_iter, tol: ``qp.nnqp``'s; the search takes at most 64 steps.

  Returns:
    ``(coef [k], SolverStats)``: ``d = sum_i coef_i g_i`` before CAGrad's rescaling;
    the residual is the larger of the least-squares solve's and ``|phi^2 - r^2|``
    relative to the size of the terms of ``phi^2``.
    A failed search returns its best feasible level's d (inside the ball).
  """
  k = g.shape[0]
  dtype = g.dtype
  tol = qp.default_tol(dtype) if tol is None else tol
  stop = qp.stop_tol(dtype)
  p = present.astype(dtype)
  mean = p / jnp.maximum(jnp.sum(p), 1)
  cm, norms, active = qp.cosine_gram(g, present)
  b = qp.dot(jnp.where(present[:, None] & present[None, :], g, 0), mean)
  s0 = jnp.sqrt(jnp.maximum(mean @ b, 0))
  trivial = (c <= 0) | ~(s0 > 0) | ~jnp.any(active)
  s0 = jnp.where(trivial, 1, s0)
  inv_n = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
  # Scale-free: t in units of |g_0|^2; bh_i = cos(g_i, g_0), ah_i = |g_0| / |g_i|.
  bh = b * inv_n / s0
  ah = s0 * inv_n
  levels = jnp.where(active, b / s0**2, jnp.inf)
  i0 = jnp.argmin(levels)
  lo0 = levels[i0]
  hi0 = jnp.min(jnp.where(active, (bh + c) / jnp.where(active, ah, 1), jnp.inf))
  lo0, hi0 = jnp.where(trivial, 0, lo0), jnp.where(trivial, 1, hi0)
  floor = 4 * qp.eps(dtype) * (hi0 - lo0)

  def _miss(phi, x):
    """|phi^2 - c^2|, relative to the size of the terms of phi^2 (a backward error)."""
    size = jnp.maximum(jnp.abs(x) @ qp.dot(jnp.abs(cm), jnp.abs(x)), c**2)
    return jnp.abs(phi**2 - c**2) / size

  def local_root(x):
    """The root of phi(t)^2 = c^2 on x's active set ({i0} at the start)."""
    s = x > 0
    s = jnp.where(jnp.any(s), s, jax.nn.one_hot(i0, k, dtype=bool))
    sol = qp.masked_solve(cm, jnp.stack([ah, bh], axis=1), s)
    a2 = jnp.sum(jnp.where(s, ah * sol[:, 0], 0))
    b1 = jnp.sum(jnp.where(s, ah * sol[:, 1], 0))
    c0 = jnp.sum(jnp.where(s, bh * sol[:, 1], 0))
    disc = b1**2 - a2 * (c0 - c**2)
    root = (b1 + jnp.sqrt(jnp.maximum(disc, 0))) / jnp.where(a2 > 0, a2, 1)
    return root, (a2 > 0) & (disc >= 0) & jnp.isfinite(root)

  def body(st: _CAGradState) -> _CAGradState:
    root, ok = local_root(st.x)
    t = jnp.where(ok & (root > st.lo) & (root <= st.hi), root, 0.5 * (st.lo + st.hi))
    x, ns = qp.nnqp(cm, bh - t * ah, active, st.x, max_iter=max_iter, tol=tol)
    phi = jnp.sqrt(jnp.maximum(x @ qp.dot(cm, x), 0))
    good = ~ns.failed
    hit = good & (_miss(phi, x) <= stop)
    below = good & ((phi <= c) | hit)
    lo, hi = jnp.where(below, t, st.lo), jnp.where(below, st.hi, t)
    return _CAGradState(
      lo=lo,
      hi=hi,
      x_lo=jnp.where(below, x, st.x_lo),
      phi_lo=jnp.where(below, phi, st.phi_lo),
      res_lo=jnp.where(below, ns.residual.astype(dtype), st.res_lo),
      x=jnp.where(good, x, st.x),
      it=st.it + 1,
      solves=st.solves + ns.iterations,
      hit=hit,
      done=hit | (hi - lo <= floor + 4 * qp.eps(dtype) * (jnp.abs(lo) + jnp.abs(hi))),
    )

  zero = jnp.zeros((k,), dtype)
  st = _CAGradState(
    lo=lo0,
    hi=hi0,
    x_lo=zero,
    phi_lo=jnp.zeros([], dtype),
    res_lo=jnp.zeros([], dtype),
    x=zero,
    it=jnp.zeros([], jnp.int32),
    solves=jnp.zeros([], jnp.int32),
    hit=jnp.zeros([], bool),
    done=trivial,
  )
  st = jax.lax.while_loop(lambda st: ~st.done & (st.it < 64), body, st)
  # Without a hit the bracket closed below r: the best level found is reported as
  # not converged (for c < 1 the ball binds even at a Pareto-stationary point
  # unless the stationary combination leaves tasks out).
  res = jnp.maximum(st.res_lo, _miss(st.phi_lo, st.x_lo))
  res = jnp.where(jnp.all(jnp.isfinite(st.x_lo)), res, jnp.inf)
  stats = qp.SolverStats(residual=res, iterations=st.solves, failed=~(res <= tol))
  coef = mean + jnp.where(trivial, 0, s0 * st.x_lo * inv_n)
  return coef, _select_stats(trivial, qp.exact(dtype), stats)


# ------------------------------------------------------------------- IMTL-G


@qp.full_precision
def imtl_g_weights(g, present, *, tol=None):
  """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning").

  Finds ``alpha`` with ``sum_t alpha_t = 1`` such that ``d = sum_t alpha_t g_t`` has
  equal projections on every task's unit gradient ``u_t = g_t / |g_t|``: ``<d, u_t> =
  lambda`` for all t (the guarantee; lambda is not constrained in sign).

  Solved in the basis of unit gradients: with ``beta_t = alpha_t |g_t|``, ``d = sum_t
  beta_t u_t`` and ``<d, u_t> = (C beta)_t`` for the cosine matrix C, so ``beta =
  lambda C^+ 1`` and ``alpha = beta / n`` normalized to sum 1: the paper's closed form
  ``alpha_{2:k} = g_1 U^T (D U^T)^{-1}`` written on the Gram matrix, with C's
  pseudo-inverse (eigenvalues below ``10 k eps lambda_max`` dropped: C's entries are
  cosines known to ~eps, so the cut-off never depends on the gradients' scales).
  When 1 is not in C's range (e.g. opposite gradients) only lambda = 0 is possible:
  d = 0, with alpha in C's null space. Tasks with a zero gradient get alpha = 0.

  Args:
    g: [k, k] Gram matrix.
    present: bool[k].
    tol: failure threshold (default ``qp.default_tol``).

  Returns:
    ``(alpha [k], SolverStats)``: the residual is the spread of the projections,
    ``(max_t <d, u_t> - min_t <d, u_t>) / |d|``. The solve fails when the sum of
    alpha is zero (the normalization is impossible: d would be infinite) or the
    residual is above ``tol``; the caller applies its fallback.
  """
  k = g.shape[0]
  dtype = g.dtype
  tol = qp.default_tol(dtype) if tol is None else tol
  cm, norms, active = qp.cosine_gram(g, present)
  af = active.astype(dtype)
  w = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
  lam, v = jnp.linalg.eigh(cm)
  keep = lam > 10 * k * qp.eps(dtype) * jnp.maximum(jnp.max(lam), 1)
  vt1 = qp.dot(v.T, af)
  beta0 = qp.dot(v, jnp.where(keep, vt1 / jnp.where(keep, lam, 1), 0))
  in_range = jnp.max(jnp.abs(qp.dot(v, jnp.where(keep, 0, vt1)))) <= jnp.sqrt(
    qp.eps(dtype)
  )
  null_w = qp.dot(v, jnp.where(keep, 0, qp.dot(v.T, w)))
  s_a, s_b = beta0 @ w, null_w @ w
  ok = jnp.where(
    in_range, jnp.abs(s_a) > tol * jnp.sum(jnp.abs(beta0 * w)), s_b > tol * (w @ w)
  )
  beta = jnp.where(
    in_range, beta0 / jnp.where(ok, s_a, 1), null_w / jnp.where(ok, s_b, 1)
  )
  beta = jnp.where(active, beta, 0)
  proj = qp.dot(cm, beta)
  size = jnp.sqrt(jnp.maximum(beta @ proj, 0))
  spread = jnp.max(jnp.where(active, proj, -jnp.inf)) - jnp.min(
    jnp.where(active, proj, jnp.inf)
  )
  res = jnp.where(in_range & (size > 0), spread / jnp.where(size > 0, size, 1), 0)
  res = jnp.where(jnp.all(jnp.isfinite(beta)), res, jnp.inf)
  alpha = beta * w
  # No task with a gradient: d = 0 whatever alpha; the mean of present tasks.
  p = present.astype(dtype)
  none = ~jnp.any(active)
  alpha = jnp.where(none, p / jnp.maximum(jnp.sum(p), 1), alpha)
  failed = ~none & (~ok | ~(res <= tol))
  stats = qp.SolverStats(res, jnp.ones([], jnp.int32), failed)
  return alpha, _select_stats(none, qp.exact(dtype), stats)


# ----------------------------------------------------------------- Nash-MTL


class _NashState(NamedTuple):
  b: jax.Array
  it: jax.Array
  res: jax.Array
  prev: jax.Array  # the residual one step before


@qp.full_precision
def nash_weights(g, present, alpha0, *, max_iter=100, tol=None, normalize=False):
  """Nash-MTL's bargaining weights (Navon et al. 2022, ICML), solved to tolerance.

  The paper's Nash bargaining solution: ``alpha > 0`` with ``G alpha = 1 / alpha``
  (elementwise; their eq. 3 / Algorithm 1), so ``d = sum alpha_i g_i`` has ``<d, g_i>
  = 1 / alpha_i > 0`` for every task (the guarantee) and ``|d|^2 = alpha^T G alpha =
  k`` whatever the scale of the gradients. (The authors' code normalizes G by |G|_F
  for its solver but multiplies the factor back into its constraint ``alpha_i (G
  alpha)_i >= 1``: the same system.)

  Solved scale-free: with ``beta_i = alpha_i |g_i|`` the system is ``C beta = 1 /
  beta`` on the cosine matrix C, whose solution minimizes the strictly convex,
  self-concordant ``phi(b) = 1/2 b^T C b - sum_i log b_i``. Newton's method with a
  backtracking (Armijo) line search inside ``b > 0``, the damped step ``1 / (1 +
  lambda)`` when the search fails (lambda the Newton decrement), and the pure step
  once ``lambda < 1/4``, where it converges quadratically; it stops when the
  residual ``max_i |beta_i (C beta)_i - 1| = max_i |alpha_i (G alpha)_i - 1|`` is at
  rounding level. Warm-started from ``alpha0`` (if it is better than the uniform
  start). A solution exists iff no convex combination of the present gradients is
  0; near such a point alpha grows without bound and the solve fails.

  Tasks with a zero gradient get alpha = 0 (no d changes their loss). With
  ``normalize=True`` (an mtx variant, not the paper) alpha is multiplied by
  ``sqrt(|G|_F)``: it solves ``(G / |G|_F) alpha = 1 / alpha``, and d has the same
  direction but scales like the gradients instead of having norm sqrt(k).

  Args:
    g: [k, k] Gram matrix (zero rows and columns for absent tasks).
    present: bool[k].
    alpha0: [k], the previous alpha (same convention), the warm start.
    max_iter: Newton steps at most.
    tol: failure threshold on the residual (default ``qp.default_tol``).
    normalize: see above.

  Returns:
    ``(alpha [k], SolverStats)``; alpha is 0 for absent tasks. The caller applies
    its fallback when the solve failed.
  """
  k = g.shape[0]
  dtype = g.dtype
  tol = qp.default_tol(dtype) if tol is None else tol
  stop = 4 * qp.eps(dtype)
  cm, norms, active = qp.cosine_gram(g, present)
  af = active.astype(dtype)
  both = present[:, None] & present[None, :]
  fro = jnp.sqrt(jnp.sum(jnp.where(both, g, 0) ** 2))
  scale = jnp.sqrt(jnp.where(fro > 0, fro, 1)) if normalize else jnp.ones([], dtype)
  ones_c = af @ qp.dot(cm, af)
  small = qp.stop_tol(dtype)
  tau = jnp.sqrt(jnp.maximum(jnp.sum(af), 1) / jnp.where(ones_c > small, ones_c, 1))
  uniform = tau * af
  b0 = jnp.asarray(alpha0, dtype) / scale * norms
  warm = jnp.where(active & (b0 > 0) & jnp.isfinite(b0), b0, uniform)
  eye_off = jnp.diag(1 - af)

  def phi(b):
    logs = jnp.where(active, jnp.log(jnp.where(active & (b > 0), b, 1)), 0)
    inside = jnp.all(jnp.where(active, b > 0, True))
    return jnp.where(inside, 0.5 * b @ qp.dot(cm, b) - jnp.sum(logs), jnp.inf)

  def residual(b):
    # A backward error: relative to the size of the terms of b_i (C b)_i.
    size = 1 + b * qp.dot(jnp.abs(cm), b)
    return jnp.max(jnp.where(active, jnp.abs(b * qp.dot(cm, b) - 1) / size, 0))

  start = jnp.where(phi(warm) < phi(uniform), warm, uniform)
  steps = 0.5 ** jnp.arange(30, dtype=dtype)

  def body(st: _NashState) -> _NashState:
    b = st.b
    grad = jnp.where(active, qp.dot(cm, b) - 1 / jnp.where(active, b, 1), 0)
    hess = cm + jnp.diag(jnp.where(active, 1 / jnp.where(active, b, 1) ** 2, 0)) + eye_off
    step = -qp.masked_solve(hess, grad, jnp.ones((k,), bool))
    slope = grad @ step
    dec = jnp.sqrt(jnp.maximum(-slope, 0))  # the Newton decrement
    room = jnp.min(jnp.where(active & (step < 0), -b / jnp.where(step < 0, step, -1), 1))
    ts = jnp.minimum(1, 0.99 * room) * steps
    vals = jax.vmap(lambda t: phi(b + t * step))(ts)
    armijo = vals <= phi(b) + 0.25 * ts * slope
    t = jnp.where(jnp.any(armijo), ts[jnp.argmax(armijo)], 1 / (1 + dec))
    b = b + jnp.where(dec < 0.25, 1, t) * step
    return _NashState(b=b, it=st.it + 1, res=residual(b), prev=st.res)

  def going(st: _NashState):
    # Newton converges quadratically: stop at a few ulps, or once an acceptable
    # residual stops improving (rounding), or at the cap.
    stalled = (st.res >= 0.5 * st.prev) & (st.res <= tol)
    return (st.res > stop) & ~stalled & (st.it < max_iter)

  inf = jnp.full([], jnp.inf, dtype)
  st = _NashState(b=start, it=jnp.zeros([], jnp.int32), res=residual(start), prev=inf)
  st = jax.lax.while_loop(going, body, st)
  alpha = jnp.where(active, st.b / jnp.where(active, norms, 1), 0) * scale
  res = jnp.where(jnp.all(jnp.isfinite(alpha)), st.res, jnp.inf)
  none = ~jnp.any(active)
  stats = qp.SolverStats(residual=res, iterations=st.it, failed=~none & ~(res <= tol))
  return jnp.where(none, 0, alpha), _select_stats(none, qp.exact(dtype), stats)


# -------------------------------------------------------------- Aligned-MTL


def aligned_mtl_weights(g, present):
  """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment").

  With ``G = V diag(lambda) V^T`` (eigenvalues above ``k eps lambda_max`` kept,
  ``lambda_min`` the smallest kept), the aligned task gradients are
  ``g_hat = B g`` with ``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T``: they
  are orthogonal with equal norm ``sqrt(lambda_min)`` (the condition number of
  the system becomes 1). The update is ``sum_i g_hat_i`` with unit task
  weights, i.e. coefficients ``B 1``.

  Returns:
    ``B p`` f32[k] (p the presence indicator).
  """
  k = g.shape[0]
  s = _present_scale(g, present)
  lam, v = jnp.linalg.eigh(g / s)
  tol = jnp.max(lam) * k * jnp.finfo(jnp.float32).eps
  keep = lam > tol
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  lam_min = jnp.where(jnp.any(keep), lam_min, 0.0)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(lam_min) * (v * inv_sqrt) @ v.T
  return b @ present.astype(jnp.float32)
