"""k-sized solvers: task coefficients from the Gram matrix of task gradients.

Every function here takes ``G`` f32[k, k], the Gram matrix ``G_ij = <g_i, g_j>``
with zero rows and columns for absent tasks, and ``present`` bool[k], and
returns coefficients ``c`` f32[k] (zero for absent tasks) such that the
aggregated gradient is ``sum_i c_i g_i``. They run on device, with fixed
iteration counts, and are pure: no gradient ever enters them, only its Gram
matrix. Each one is scale-free: multiplying every gradient by s > 0 scales the
result by s (or leaves it unchanged where the method is normalized).
"""

import jax
import jax.numpy as jnp


def _safe_div(a, b):
  return jnp.where(b != 0, a / jnp.where(b != 0, b, 1.0), 0.0)


def _present_scale(g, present, how="mean"):
  """A positive scale of the present diagonal, for conditioning (1 if none)."""
  d = jnp.where(present, jnp.diag(g), 0.0)
  if how == "max":
    s = jnp.max(d)
  else:
    s = jnp.sum(d) / jnp.maximum(jnp.sum(present), 1)
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
      return w.at[j].add(jnp.where(project, -_safe_div(dot, diag[j]), 0.0))

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
      cos = jnp.clip(_safe_div(gw[j], nw * norms[j]), -1.0, 1.0)
      tgt = trow[j]
      sin_t = jnp.sqrt(jnp.maximum(1.0 - tgt**2, 0.0))
      sin_c = jnp.sqrt(jnp.maximum(1.0 - cos**2, 0.0))
      a = _safe_div(nw * (tgt * sin_c - cos * sin_t), norms[j] * sin_t)
      w = w.at[j].add(jnp.where(valid & (cos < tgt), a, 0.0))
      trow = trow.at[j].set(jnp.where(valid, (1.0 - beta) * tgt + beta * cos, tgt))
      return w, trow

    return jax.lax.fori_loop(0, k, body, (w0, trow))

  return jax.vmap(one)(jnp.arange(k), orders, targets)


# ------------------------------------------------- simplex problems (FW)


def _pairwise_frank_wolfe(grad_fn, line_fn, present, iterations):
  """Minimizes a convex function over the simplex of present tasks.

  Pairwise Frank-Wolfe: move weight from the support vertex with the largest
  partial derivative to the vertex with the smallest, by an exact line search
  ``line_fn(w, d, gamma_max)`` along ``d = e_s - e_a``. Starts at the uniform
  point; a fixed number of iterations (linear convergence on polytopes).
  """
  p = present.astype(jnp.float32)
  w0 = p / jnp.maximum(jnp.sum(p), 1.0)
  k = present.shape[0]

  def body(_, w):
    grad = grad_fn(w)
    s = jnp.argmin(jnp.where(present, grad, jnp.inf))
    a = jnp.argmax(jnp.where(present & (w > 0), grad, -jnp.inf))
    d = jax.nn.one_hot(s, k, dtype=jnp.float32) - jax.nn.one_hot(a, k, dtype=jnp.float32)
    gamma = jnp.where(s == a, 0.0, line_fn(w, d, w[a]))
    return jnp.maximum(w + gamma * d, 0.0)

  return jax.lax.fori_loop(0, iterations, body, w0)


def min_norm_weights(g, present, iterations=100):
  """MGDA's min-norm point (Desideri 2012; Sener & Koltun 2018).

  ``lambda = argmin_{lambda in simplex} lambda^T G lambda``; the common descent
  direction is ``sum_i lambda_i g_i``, the minimum-norm point of the convex hull
  of the task gradients. For two tasks this is
  ``lambda_1 = clip(<g_2 - g_1, g_2> / |g_1 - g_2|^2, 0, 1)``.

  Returns:
    lambda f32[k] on the simplex of present tasks.
  """
  gs = g / _present_scale(g, present)

  def line(w, d, gmax):
    q1 = d @ (gs @ w)
    q2 = d @ (gs @ d)
    free = jnp.clip(_safe_div(-q1, q2), 0.0, gmax)
    return jnp.where(q2 > 0, free, jnp.where(q1 < 0, gmax, 0.0))

  return _pairwise_frank_wolfe(lambda w: gs @ w, line, present, iterations)


def cagrad_weights(g, present, c, iterations=100):
  """The inner problem of CAGrad (Liu et al. 2021, "Conflict-Averse Gradient").

  With ``g_0`` the mean gradient of present tasks and ``r = c |g_0|``::

      w* = argmin_{w in simplex}  <g_w, g_0> + r |g_w|,   g_w = sum_i w_i g_i

  In the Gram basis ``<g_w, g_0> = w^T G m`` (m the uniform weights) and
  ``|g_w| = sqrt(w^T G w)``. Solved by pairwise Frank-Wolfe with an exact line
  search: along ``w + t d`` the objective is ``a t + r sqrt(Q(t))`` with
  ``Q(t) = q0 + 2 q1 t + q2 t^2``; writing ``u = q1 + q2 t`` and
  ``m = q0 - q1^2 / q2 >= 0``, its stationary point solves
  ``r u = -a sqrt(m + u^2 / q2)``, i.e. ``u = -sign(a) |a| sqrt(m / (r^2 - a^2/q2))``
  when ``r^2 q2 > a^2`` (otherwise the objective is monotone in t).

  Returns:
    w* f32[k] on the simplex of present tasks.
  """
  s = _present_scale(g, present)
  gs = g / s
  p = present.astype(jnp.float32)
  mean = p / jnp.maximum(jnp.sum(p), 1.0)
  b = gs @ mean
  r = c * jnp.sqrt(jnp.maximum(mean @ b, 0.0))

  def grad_fn(w):
    gw = gs @ w
    return b + r * _safe_div(gw, jnp.sqrt(jnp.maximum(w @ gw, 0.0)))

  def line(w, d, gmax):
    a = b @ d
    gsw = gs @ w
    q0 = w @ gsw
    q1 = d @ gsw
    q2 = d @ (gs @ d)
    curved = (q2 > 0) & (r * r * q2 > a * a)
    m = jnp.maximum(q0 - _safe_div(q1 * q1, q2), 0.0)
    u = -jnp.sign(a) * jnp.sqrt(
      _safe_div(a * a * m, jnp.where(curved, r * r - _safe_div(a * a, q2), 1.0))
    )
    t_stat = jnp.clip(_safe_div(u - q1, q2), 0.0, gmax)
    monotone = jnp.where(a < 0, gmax, 0.0)
    return jnp.where(curved, t_stat, monotone)

  return _pairwise_frank_wolfe(grad_fn, line, present, iterations)


# ------------------------------------------------------------------- IMTL-G


def imtl_g_weights(g, present):
  """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning").

  Finds ``alpha`` with ``sum_t alpha_t = 1`` such that ``d = sum_t alpha_t g_t``
  has equal projections on every task's unit gradient ``u_t = g_t / |g_t|``:
  ``<d, u_t> = (G alpha)_t / |g_t| = lambda`` for all t, hence
  ``alpha = G^+ n / (1^T G^+ n)`` with ``n_t = |g_t|`` (the paper's closed form
  ``alpha_{2:k} = g_1 U^T (D U^T)^{-1}`` written in the Gram basis). Tasks with a
  zero gradient are left out; if the system degenerates, the mean is returned.

  Returns:
    alpha f32[k], summing to 1 over present tasks.
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
  active = present & (norms > 0)
  s = _present_scale(g, active, "max")
  both = active[:, None] & active[None, :]
  gs = jnp.where(both, g / s, 0.0) + jnp.diag(jnp.where(active, 0.0, 1.0))
  rhs = jnp.where(active, norms / jnp.sqrt(s), 0.0)
  alpha = jnp.linalg.pinv(gs, hermitian=True) @ rhs
  alpha = jnp.where(active, alpha, 0.0)
  total = jnp.sum(alpha)
  p = present.astype(jnp.float32)
  mean = p / jnp.maximum(jnp.sum(p), 1.0)
  ok = (
    (jnp.abs(total) > 1e-6 * jnp.sum(jnp.abs(alpha)))
    & jnp.all(jnp.isfinite(alpha))
    & (jnp.sum(active) > 0)
  )
  return jnp.where(ok, alpha / jnp.where(ok, total, 1.0), mean)


# ----------------------------------------------------------------- Nash-MTL


def nash_weights(
  g, present, alpha0, iterations=20, ridge=1e-6, normalize=False, tol=1e-2
):
  """Nash-MTL's bargaining weights (Navon et al. 2022, ICML).

  The paper's Nash bargaining solution: ``alpha > 0`` with ``G alpha = 1 / alpha``
  (elementwise; their eq. 3 / Algorithm 1), so ``d = sum alpha_i g_i`` has
  ``|d|^2 = alpha^T G alpha = k`` whatever the scale of the gradients, and d does
  not change when one task's loss is rescaled. (The authors' code normalizes G
  by |G|_F for its solver but multiplies the factor back into its constraint
  ``alpha_i (G alpha)_i >= 1``: the same system.)

  Solved scale-free: with ``D = diag(1 / |g_i|)`` and the cosine matrix
  ``C = D G D``, ``beta`` solving ``C beta = 1 / beta`` gives ``alpha = D beta``.
  ``beta`` minimizes the strictly convex, self-concordant
  ``phi(b) = 1/2 b^T C b - sum_i log b_i``: damped Newton (step
  ``1 / (1 + lambda)``, lambda the Newton decrement, which stays in b > 0),
  warm-started from ``alpha0``. A small ridge on C keeps the solution bounded
  when gradients conflict exactly. Tasks with a zero gradient get alpha = 0
  (they add nothing to d).

  With ``normalize=True`` (an mtx variant, not the paper) alpha is multiplied by
  ``sqrt(|G|_F)``: it solves ``(G / |G|_F) alpha = 1 / alpha``, and d has the
  same direction but scales like the gradients instead of having norm sqrt(k).

  Args:
    g: f32[k, k] Gram matrix (zero rows/columns for absent tasks).
    present: bool[k].
    alpha0: f32[k], the previous alpha (same convention), the warm start.
    iterations: damped Newton iterations.
    ridge: added to the diagonal of C.
    normalize: see above.
    tol: the solve is ok when ``max_i |beta_i (C beta)_i - 1| <= tol``.

  Returns:
    ``(alpha f32[k], ok bool[])``; alpha is 0 for absent tasks; ok is False when
    the solve failed or did not converge (the caller keeps its previous weights).
  """
  k = g.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
  active = present & (norms > 0)
  inv = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  c = g * inv[:, None] * inv[None, :]
  c = jnp.where(active[:, None] & active[None, :], c, 0.0)
  c = c + jnp.diag(jnp.where(active, ridge, 1.0))
  both = present[:, None] & present[None, :]
  fro = jnp.sqrt(jnp.sum(jnp.where(both, g, 0.0) ** 2))
  scale = jnp.sqrt(jnp.where(fro > 0, fro, 1.0)) if normalize else 1.0
  b0 = alpha0 / scale * norms
  n_active = jnp.maximum(jnp.sum(active), 1)
  uniform = jnp.full((k,), 1.0, jnp.float32) / jnp.sqrt(n_active.astype(jnp.float32))
  warm = jnp.where(active & (b0 > 0) & jnp.isfinite(b0), b0, uniform)

  def phi(b):
    return 0.5 * b @ (c @ b) - jnp.sum(jnp.where(active, jnp.log(b), 0.0))

  # The previous solution is a good start only if the tasks' scales did not move.
  start = jnp.where(phi(warm) < phi(uniform), warm, uniform)
  eye_inactive = jnp.diag(jnp.where(active, 0.0, 1.0))

  def body(_, b):
    grad = jnp.where(active, c @ b - 1.0 / b, 0.0)
    hess = c + jnp.diag(jnp.where(active, 1.0 / b**2, 0.0)) + eye_inactive
    step = jnp.linalg.solve(hess, grad)
    decrement = jnp.sqrt(jnp.maximum(grad @ step, 0.0))
    return b - step / (1.0 + decrement)

  b = jax.lax.fori_loop(0, iterations, body, start)
  residual = jnp.max(jnp.where(active, jnp.abs(b * (c @ b) - 1.0), 0.0))
  alpha = jnp.where(active, b * inv, 0.0) * scale
  ok = (
    jnp.all(jnp.isfinite(alpha))
    & jnp.all(jnp.where(active, b > 0, True))
    & jnp.any(active)
    & (residual <= tol)
  )
  return alpha, ok


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
  s = _present_scale(g, present, "max")
  lam, v = jnp.linalg.eigh(g / s)
  tol = jnp.max(lam) * k * jnp.finfo(jnp.float32).eps
  keep = lam > tol
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  lam_min = jnp.where(jnp.any(keep), lam_min, 0.0)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(lam_min) * (v * inv_sqrt) @ v.T
  return b @ present.astype(jnp.float32)


# ------------------------------------------------------------------- UPGrad


def upgrad_weights(g, present, iterations=100, reg=0.0):
  """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Opt.").

  Each task gradient ``g_i`` is projected onto the dual cone
  ``{x : <x, g_j> >= 0 for all j}``; the projection is ``J^T w^(i)`` with
  ``w^(i) = argmin_{v >= e_i} v^T G v`` (their Proposition 1), a box-constrained
  QP solved by cyclic coordinate descent ``v_j <- max(e_ij, v_j - (G v)_j / G_jj)``
  for a fixed number of sweeps. UPGrad averages the projections:
  ``c = (1 / |P|) sum_{i in P} w^(i)``. Since ``G w^(i) >= 0`` at the optimum, the
  result has a non-negative inner product with every task gradient.

  Args:
    g: f32[k, k] Gram matrix.
    present: bool[k].
    iterations: coordinate-descent sweeps.
    reg: ridge added to the normalized Gram matrix's diagonal.

  Returns:
    c f32[k].
  """
  k = g.shape[0]
  gs = g / _present_scale(g, present) + reg * jnp.diag(present.astype(jnp.float32))
  diag = jnp.diag(gs)
  p = present.astype(jnp.float32)

  def solve_one(u):

    def coord(j, v):
      step = _safe_div(gs[j] @ v, diag[j])
      return v.at[j].set(jnp.where(diag[j] > 0, jnp.maximum(u[j], v[j] - step), v[j]))

    def sweep(_, v):
      return jax.lax.fori_loop(0, k, coord, v)

    return jax.lax.fori_loop(0, iterations, sweep, u)

  w = jax.vmap(solve_one)(jnp.diag(p))
  return jnp.sum(w * p[:, None], axis=0) / jnp.maximum(jnp.sum(p), 1.0)
