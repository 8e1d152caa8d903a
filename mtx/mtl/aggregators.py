"""Aggregators: per-task gradients f32[k, ...] in, one gradient f32[...] out.

Each factory returns a ``base.Aggregator`` (an
``optax.GradientTransformationExtraArgs``). The gradient-surgery methods compute
the k-by-k Gram matrix of the present tasks' gradients once (``base.gram``),
solve for task coefficients ``c`` f32[k] with a k-sized solver (``solvers``),
and return ``sum_i c_i g_i`` (``base.combine``). Absent tasks have zero rows and
columns in the Gram matrix and a zero coefficient.

MGDA, CAGrad, IMTL-G, Nash-MTL and UPGrad solve a small convex problem for ``c``
(``solvers``, ``qp``) to tolerance and report its residual, iterations and whether
it failed (``qp.SolverStats``, the fourth element of ``aggregate``); the trainer
logs them (``mtl/solver_residual``, ``mtl/solver_failures``) and warns about
failures. What a failed solve falls back to is each method's documented choice,
never the plain sum.

``sum_tasks`` and ``mean_tasks`` live in ``base``; GradNorm is here because it
reads per-task gradient norms.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtx.errors import UserError
from mtx.mtl import base, qp, solvers


def _check_reduction(reduction):
  if reduction not in ("sum", "mean"):
    raise UserError(f"reduction must be 'sum' or 'mean', not {reduction!r}.")


def _reduce(w_rows, present, reduction):
  """Sums (or averages) the per-task rows of present tasks: f32[k, k] -> f32[k]."""
  p = present.astype(jnp.float32)
  c = jnp.sum(w_rows * p[:, None], axis=0)
  if reduction == "mean":
    c = c / jnp.maximum(jnp.sum(p), 1.0)
  return c


# -------------------------------------------------------------------- PCGrad


class PCGradState(NamedTuple):
  """``count`` i32[]: steps taken (folds a fallback key when none is given)."""

  count: jax.Array


def pcgrad(reduction: str = "sum", seed: int = 0) -> base.Aggregator:
  """PCGrad: project conflicting gradients (Yu et al. 2020, NeurIPS).

  For each present task i, in a random order of the others (drawn per task from
  the ``key`` extra arg), whenever ``<g_i^PC, g_j> < 0``::

      g_i^PC <- g_i^PC - <g_i^PC, g_j> / |g_j|^2  g_j          (eq. 7)

  always projecting onto the ORIGINAL ``g_j``. The update is
  ``sum_i g_i^PC`` (the paper), or their mean with ``reduction='mean'``.
  Computed exactly in the Gram basis (``solvers.pcgrad_coefficients``).

  Shapes: per-task f32[k, ...] -> f32[...].

  Args:
    reduction: 'sum' (paper) or 'mean'.
    seed: folds the key with the step count when no ``key`` is passed.

  Returns:
    An aggregator with state ``PCGradState``.
  """
  _check_reduction(reduction)

  def init_fn(params):
    del params
    return PCGradState(count=jnp.zeros([], jnp.int32))

  def solve(g, present, state, *, key, task_losses):
    del task_losses
    orders = solvers.task_orders(base.step_key(key, seed, state.count), g.shape[0])
    w_rows = solvers.pcgrad_coefficients(g, present, orders)
    return (_reduce(w_rows, present, reduction), PCGradState(count=state.count + 1))

  return base.gram_aggregator(init_fn, solve)


# --------------------------------------------------------------------- MGDA


def mgda(max_iter: Optional[int] = None, tol: Optional[float] = None) -> base.Aggregator:
  """MGDA: the min-norm point of the task gradients' convex hull.

  Sener & Koltun 2018 ("Multi-Task Learning as Multi-Objective Optimization"),
  after Desideri 2012::

      lambda* = argmin_{lambda in simplex} |sum_i lambda_i g_i|^2
      d = sum_i lambda*_i g_i

  Guarantee: ``<d, g_j> >= |d|^2 >= 0`` for every task j (d = 0 at a
  Pareto-stationary point). Solved exactly on the Gram matrix, scale-free, by an
  active-set method to its KKT conditions (``solvers.min_norm_weights``), on the
  raw gradients (the authors' and LibMTL's ``'none'`` normalization; their default
  ``'loss+'`` rescales each gradient by its loss and norm first: chain a weighting
  before it for that). A failed solve keeps its last iterate, a point of the
  simplex (so d is still in the hull).

  Shapes: per-task f32[k, ...] -> f32[...]. Stateless (``base.EmptyState``).

  Args:
    max_iter: active-set steps at most (default 4k + 20).
    tol: residual above which the solve counts as failed (default 1e-4 in float32).
  """

  def solve(g, present, state, *, key, task_losses):
    del key, task_losses
    lam, stats = solvers.min_norm_weights(g, present, max_iter=max_iter, tol=tol)
    return lam, state, stats

  return base.gram_aggregator(base.init_empty, solve)


def _or_min_norm(c, stats: qp.SolverStats, g, present):
  """``c``, or MGDA's min-norm weights when its solve failed (the fallback of the
  methods without a feasible iterate to keep: a direction that hurts no task, or
  0 at a Pareto-stationary point)."""
  return jax.lax.cond(
    stats.failed,
    lambda: solvers.min_norm_weights(g, present)[0].astype(c.dtype),
    lambda: c,
  )


# ------------------------------------------------------------------- CAGrad


def cagrad(
  c: float = 0.4,
  rescale: bool = True,
  max_iter: Optional[int] = None,
  tol: Optional[float] = None,
) -> base.Aggregator:
  """CAGrad: conflict-averse gradient descent (Liu et al. 2021, NeurIPS).

  With ``g_0`` the mean gradient of present tasks::

      d = argmax_{|d - g_0| <= c |g_0|}  min_i <g_i, d>
        = g_0 + c |g_0| / |g_w*| g_w*,   w* = argmin_{w in simplex} <g_w, g_0> + c |g_0| |g_w|

  Guarantee: d is inside the ball and optimal (no d in the ball improves the worst
  task more). Solved exactly through the primal, to its KKT conditions
  (``solvers.cagrad_coefficients``). With ``rescale`` (the authors' default and
  LibMTL's ``rescale=1``) d is divided by ``1 + c^2``. ``c = 0`` gives the mean
  gradient. A failed solve returns the best d found inside the ball.

  Shapes: per-task f32[k, ...] -> f32[...]. Stateless.

  Args:
    c: radius of the ball, relative to |g_0| (the authors' 0.4; LibMTL's 0.5).
    rescale: divide by 1 + c^2.
    max_iter: active-set steps of each least-squares solve (default 4k + 20).
    tol: residual above which the solve counts as failed (default 1e-4 in float32).
  """
  if c < 0:
    raise UserError(f"cagrad: c must be >= 0, not {c}.")

  def solve(g, present, state, *, key, task_losses):
    del key, task_losses
    coef, stats = solvers.cagrad_coefficients(g, present, c, max_iter=max_iter, tol=tol)
    if rescale:
      coef = coef / (1.0 + c**2)
    return coef, state, stats

  return base.gram_aggregator(base.init_empty, solve)


# ------------------------------------------------------------------- IMTL-G


def imtl_g(tol: Optional[float] = None) -> base.Aggregator:
  """IMTL-G: impartial gradients (Liu et al. 2021, ICLR, "Towards Impartial MTL").

  ``d = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1`` and equal projections
  ``<d, g_t / |g_t|>`` on every task (the guarantee): the paper's closed form, solved
  in the basis of unit gradients (``solvers.imtl_g_weights``), so a task with a
  1000x smaller gradient keeps its share. When no such alpha exists (its sum would
  be 0, d infinite) the solve fails and MGDA's min-norm weights are used instead.

  Shapes: per-task f32[k, ...] -> f32[...]. Stateless.

  Args:
    tol: residual above which the solve counts as failed (default 1e-4 in float32).
  """

  def solve(g, present, state, *, key, task_losses):
    del key, task_losses
    alpha, stats = solvers.imtl_g_weights(g, present, tol=tol)
    return _or_min_norm(alpha, stats, g, present), state, stats

  return base.gram_aggregator(base.init_empty, solve)


# ------------------------------------------------------------------- GradVac


class GradVacState(NamedTuple):
  """``targets`` f32[k, k]: running cosine targets phi_hat[i, j] (init 0);
  ``count`` i32[]: steps taken (fallback key)."""

  targets: jax.Array
  count: jax.Array


def gradvac(
  num_tasks: int, beta: float = 0.01, reduction: str = "sum", seed: int = 0
) -> base.Aggregator:
  """Gradient Vaccine (Wang et al. 2021, ICLR), at whole-model granularity.

  PCGrad generalized to a positive target similarity: for each task i and each
  j != i in a random order, with ``phi = cos(g_i', g_j)`` and target
  ``phi_hat_ij``, if ``phi < phi_hat_ij``::

      g_i' += |g_i'| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2))
              / (|g_j| sqrt(1-phi_hat^2)) g_j

  then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. The update is
  ``sum_i g_i'`` (or the mean). Limit it to some layers with ``masked``.

  Shapes: per-task f32[k, ...] -> f32[...].

  Args:
    num_tasks: k.
    beta: EMA rate of the targets.
    reduction: 'sum' or 'mean'.
    seed: folds the fallback key.

  Returns:
    An aggregator with state ``GradVacState``.
  """
  _check_reduction(reduction)

  def init_fn(params):
    del params
    return GradVacState(
      targets=jnp.zeros((num_tasks, num_tasks), jnp.float32),
      count=jnp.zeros([], jnp.int32),
    )

  def solve(g, present, state, *, key, task_losses):
    del task_losses
    _check_k("gradvac", num_tasks, g.shape[0])
    orders = solvers.task_orders(base.step_key(key, seed, state.count), g.shape[0])
    w_rows, targets = solvers.gradvac_coefficients(
      g, present, orders, state.targets, beta
    )
    return (
      _reduce(w_rows, present, reduction),
      GradVacState(targets=targets, count=state.count + 1),
    )

  return base.gram_aggregator(init_fn, solve)


def _check_k(who, num_tasks, k):
  if num_tasks != k:
    raise UserError(
      f"{who} was built with num_tasks={num_tasks} but got "
      f"per-task gradients for {k} tasks; set num_tasks={k}."
    )


# ----------------------------------------------------------------- Nash-MTL


class NashMTLState(NamedTuple):
  """``weights`` f32[k]: the coefficients of the last solve (init 1), reused
  between solves and as the warm start; ``count`` i32[]: steps taken."""

  weights: jax.Array
  count: jax.Array


def nash_mtl(
  num_tasks: int,
  update_every: int = 1,
  max_iter: int = 100,
  normalize: bool = False,
  tol: Optional[float] = None,
) -> base.Aggregator:
  """Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022).

  The Nash bargaining solution ``d = sum_i alpha_i g_i`` with ``alpha > 0``
  solving ``G alpha = 1 / alpha`` (their eq. 3, Algorithm 1;
  ``solvers.nash_weights``, Newton's method to tolerance). Guarantee: ``<d, g_i>
  = 1 / alpha_i > 0`` for every task. Like the paper's, the update has norm
  sqrt(k) whatever the gradients' scale, and is invariant to rescaling any task's
  loss; the authors (and LibMTL, TorchJD: ``max_norm=1``) clip its norm to 1: put
  ``optax.clip_by_global_norm(1.0)`` after it in the chain (or rely on
  Adam/Adafactor's own normalization). ``normalize=True`` solves ``(G / |G|_F)
  alpha = 1 / alpha`` instead (the same direction, scaled like the gradients;
  not the paper).

  Every ``update_every`` steps alpha is solved again; in between, the
  coefficients stored in the state are reused (the authors' cheaper variant; no
  Gram matrix is computed unless the caller already has one). A failed solve
  (no solution near a Pareto-stationary point, or the iteration cap) uses MGDA's
  min-norm weights instead, for this step and the reuse steps after it: a
  direction that hurts no task, never the plain sum (the authors keep their
  previous weights, ones at the first step).

  Shapes: per-task f32[k, ...] -> f32[...].

  Args:
    num_tasks: k.
    update_every: solve every this many steps (1: every step).
    max_iter: Newton steps per solve at most.
    normalize: solve on the Frobenius-normalized Gram matrix.
    tol: residual above which the solve counts as failed (default 1e-4 in float32).

  Returns:
    An aggregator with state ``NashMTLState``.
  """
  if update_every < 1:
    raise UserError(f"nash_mtl: update_every must be >= 1, not {update_every}.")

  def init_fn(params):
    del params
    return NashMTLState(
      weights=jnp.ones((num_tasks,), jnp.float32), count=jnp.zeros([], jnp.int32)
    )

  def aggregate_fn(
    updates,
    state,
    params=None,
    *,
    gram_matrix=None,
    task_losses=None,
    task_present=None,
    key=None,
  ):
    del params, task_losses, key
    k = base.num_tasks_of(updates)
    c, new_state, stats = solve(
      lambda: base.gram(updates) if gram_matrix is None else gram_matrix,
      k,
      state,
      task_present,
    )
    return base.combine(updates, c), new_state, c, stats

  def coefficients_fn(
    gram_matrix, state, *, task_losses=None, task_present=None, key=None
  ):
    del task_losses, key
    return solve(lambda: gram_matrix, gram_matrix.shape[0], state, task_present)

  def solve(gram_fn, k, state, task_present):
    """(c, new state, stats); ``gram_fn()`` gives the Gram matrix, called only when
    the coefficients are solved again."""
    _check_k("nash_mtl", num_tasks, k)
    p = base.presence(task_present, k)

    def fresh(_):
      g = base.mask_gram(gram_fn(), p)
      alpha, stats = solvers.nash_weights(
        g, p, state.weights, max_iter=max_iter, tol=tol, normalize=normalize
      )
      alpha = _or_min_norm(alpha, stats, g, p)
      return jnp.where(p, alpha, state.weights), stats

    def reuse(_):
      return state.weights, qp.exact()

    if update_every == 1:
      alpha, stats = fresh(None)
    else:
      alpha, stats = jax.lax.cond(state.count % update_every == 0, fresh, reuse, None)
    c = jnp.where(p, alpha, 0.0)
    return c, NashMTLState(weights=alpha, count=state.count + 1), stats

  return base.Aggregator(init_fn, aggregate_fn, coefficients=coefficients_fn)


# -------------------------------------------------------------- Aligned-MTL


def aligned_mtl() -> base.Aggregator:
  """Aligned-MTL (Senushkin et al. 2023, CVPR, "Independent Component Alignment").

  Replaces the task gradients by the closest orthogonal system with equal norms
  ``sqrt(lambda_min(G))`` (condition number 1) and sums it:
  ``d = sum_i g_hat_i``, ``g_hat = sqrt(lambda_min) V Lambda^{-1/2} V^T g``
  (``solvers.aligned_mtl_weights``).

  Shapes: per-task f32[k, ...] -> f32[...]. Stateless.
  """

  def solve(g, present, state, *, key, task_losses):
    del key, task_losses
    return solvers.aligned_mtl_weights(g, present), state

  return base.gram_aggregator(base.init_empty, solve)


# ------------------------------------------------------------------- UPGrad


def upgrad(
  reg: float = 0.0, max_iter: Optional[int] = None, tol: Optional[float] = None
) -> base.Aggregator:
  """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Opt.").

  Projects each task gradient onto the dual cone of all of them,
  ``{x : <x, g_j> >= 0 for all j}``, and averages the projections (the paper's
  and TorchJD's mean): ``d = (1/|P|) sum_i pi(g_i)``, with ``pi(g_i) = sum_j
  w^(i)_j g_j`` and ``w^(i) = argmin_{v >= e_i} v^T G v``. Guarantee: ``<d, g_j> >=
  0`` for every task j; d is the mean gradient when no pair conflicts. Each
  projection is an exact non-negative least-squares solve on the cosine matrix
  (``solvers.upgrad_weights``); a failed one keeps its last iterate.

  Shapes: per-task f32[k, ...] -> f32[...]. Stateless.

  Args:
    reg: ridge on the cosine (unit-diagonal) Gram matrix, i.e. ``G + reg
      diag(G)``; 0 (the default) is the exact projection. TorchJD adds 1e-4 to
      ``G / trace(G)`` instead, a ridge that swamps a task whose gradient is 100x
      smaller than the others.
    max_iter: active-set steps per projection (default 4k + 20).
    tol: residual above which the solve counts as failed (default 1e-4 in float32).
  """

  def solve(g, present, state, *, key, task_losses):
    del key, task_losses
    c, stats = solvers.upgrad_weights(g, present, reg=reg, max_iter=max_iter, tol=tol)
    return c, state, stats

  return base.gram_aggregator(base.init_empty, solve)


# ------------------------------------------------------------------ GradNorm


class GradNormState(NamedTuple):
  """``weights`` f32[k] (init 1, sum kept at k); ``initial_losses`` f32[k]:
  L_i(0), the loss when task i was first present; ``has_initial`` bool[k];
  ``opt_state``: Adam's state for the weights."""

  weights: jax.Array
  initial_losses: jax.Array
  has_initial: jax.Array
  opt_state: Any


def gradnorm(
  num_tasks: int, alpha: float = 1.5, lr: float = 0.025, mask: base.Mask = None
) -> base.Aggregator:
  """GradNorm (Chen et al. 2018, ICML): balance gradient norms by loss ratios.

  Learnable weights w (state). On the parameters W selected by ``mask``, with
  ``G_i = w_i |grad_W L_i|``, ``G_bar`` their mean, ``r_i = L~_i / mean(L~)``
  and ``L~_i = L_i(t) / L_i(0)``::

      L_grad = sum_i | G_i - G_bar r_i^alpha |        (target held constant)
      dL_grad/dw_i = sign(G_i - G_bar r_i^alpha) |grad_W L_i|

  The step returns ``sum_i w_i g_i`` with the current w, then takes one Adam
  step (learning rate ``lr``) on w, floors it at 1e-3 and renormalizes the
  present tasks' weights to keep their sum (so sum w = k, as in the paper).
  Absent tasks' weights are untouched. The method assumes positive losses (as
  cross-entropy is): a task whose first loss is not positive keeps ratio 1, and
  negative ratios are clipped to 0.

  ``mask`` selects W. The default (None) is every parameter: in a T5-style
  text-to-text model every layer is shared by all tasks, and the per-task
  squared norms cost one pass over the gradients, like the combine itself. To
  follow the paper's "last shared layer", pass a regex on the '/'-joined
  parameter path (e.g. ``'decoder/final_layer_norm'``), a callable on that path,
  or a pytree of bools.

  Shapes: per-task f32[k, ...] -> f32[...]. Needs ``task_losses``.

  Args:
    num_tasks: k.
    alpha: the asymmetry hyperparameter.
    lr: Adam learning rate of the weights.
    mask: which parameters the gradient norms are taken on.

  Returns:
    An aggregator with state ``GradNormState``.
  """
  opt = optax.adam(lr)

  def init_fn(params):
    del params
    w = jnp.ones((num_tasks,), jnp.float32)
    return GradNormState(
      weights=w,
      initial_losses=jnp.ones((num_tasks,), jnp.float32),
      has_initial=jnp.zeros((num_tasks,), bool),
      opt_state=opt.init(w),
    )

  def aggregate_fn(
    updates,
    state,
    params=None,
    *,
    gram_matrix=None,
    task_losses=None,
    task_present=None,
    key=None,
  ):
    del params, key
    k = base.num_tasks_of(updates)
    _check_k("gradnorm", num_tasks, k)
    p = base.presence(task_present, k)
    m = base.leaf_mask(mask, updates)
    keep_leaves = jax.tree_util.tree_leaves(m)
    if not any(keep_leaves):
      raise UserError(
        "gradnorm: its mask selects no parameter; pass a mask "
        "that matches at least one parameter path."
      )
    if gram_matrix is not None and all(keep_leaves):
      sq = jnp.diag(gram_matrix)  # the squared norms on every parameter
    else:
      sq = jnp.zeros((k,), jnp.float32)
      for g, keep in zip(jax.tree_util.tree_leaves(updates), keep_leaves):
        if keep:
          sq = sq + jnp.sum(
            jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))
          )
    c, new_state = step(sq, state, task_losses, p)
    return base.combine(updates, c), new_state, c

  def coefficients_fn(
    gram_matrix, state, *, task_losses=None, task_present=None, key=None
  ):
    del key
    k = gram_matrix.shape[0]
    _check_k("gradnorm", num_tasks, k)
    p = base.presence(task_present, k)
    return step(jnp.diag(gram_matrix), state, task_losses, p)

  def step(sq, state, task_losses, p):
    """(c, new state) from the squared gradient norms f32[k] on the masked params."""
    k = sq.shape[0]
    pf = p.astype(jnp.float32)
    losses = jnp.where(p, base.losses_of(task_losses, k, "gradnorm"), 1.0)
    norms = jnp.where(p, jnp.sqrt(jnp.maximum(sq, 0.0)), 0.0)

    first = p & ~state.has_initial
    initial = jnp.where(first, losses, state.initial_losses)
    n = jnp.maximum(jnp.sum(pf), 1.0)
    w = state.weights
    weighted = w * norms
    mean_norm = jnp.sum(weighted * pf) / n
    ratio = jnp.where(
      p & (initial > 0), losses / jnp.where(initial > 0, initial, 1.0), 1.0
    )
    # Loss ratios below 0 (a loss that crossed zero) count as fully trained.
    ratio = jnp.maximum(ratio, 0.0)
    rel = ratio / jnp.maximum(jnp.sum(ratio * pf) / n, 1e-12)
    target = mean_norm * rel**alpha
    grad_w = jnp.where(p, jnp.sign(weighted - target) * norms, 0.0)

    step, opt_state = opt.update(grad_w, state.opt_state, w)
    new_w = jnp.where(p, jnp.maximum(w + step, 1e-3), w)
    old_sum = jnp.sum(w * pf)
    new_sum = jnp.sum(new_w * pf)
    new_w = jnp.where(p, new_w * old_sum / jnp.maximum(new_sum, 1e-12), w)

    c = jnp.where(p, w, 0.0)
    return c, GradNormState(
      weights=new_w,
      initial_losses=initial,
      has_initial=state.has_initial | p,
      opt_state=opt_state,
    )

  # With a mask the norms are those of some parameters: not in the Gram matrix.
  return base.Aggregator(
    init_fn, aggregate_fn, coefficients=coefficients_fn if mask is None else None
  )
