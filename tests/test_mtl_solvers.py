"""The exact k-sized solvers (mtx.mtl.qp, mtx.mtl.solvers) against float64 references.

Issue #12: MGDA, UPGrad, CAGrad, Nash-MTL and IMTL-G must solve their problems
exactly, including when task gradients conflict or differ in scale by 1000x.

References: float64, computed here with scipy from the Jacobian J (rows = task
gradients; never from the Gram matrix the solvers see), each by another route than
the solver's: MGDA and UPGrad by ``scipy.optimize.nnls`` in parameter space, CAGrad
by Brent's method on its level t with nnls projections, Nash-MTL by Newton's method
on ``G a = 1 / a`` polished to 1e-13, IMTL-G by the paper's closed form
``alpha_{2:k} = g_1 U^T (D U^T)^{-1}``. Each reference is checked against its own
optimality conditions before use.

Tolerance for "equals the reference": the solvers see the Gram matrix rounded to the
dtype (relative error ~eps per entry) and work on its cosine matrix C (unit
diagonal, so gradient norms never enter the conditioning). They are backward stable
(their residual, checked, is a few eps), so the coefficients err by at most ~kappa
eps, kappa = cond(C); an error along an eigenvector of C with eigenvalue mu moves
``d = sum_i beta_i u_i`` by only sqrt(mu) times it, so d errs by ~sqrt(k kappa) eps
in units of the largest gradient norm. Nash-MTL's system has the Jacobian ``C +
diag(1 / beta^2)``, which under conflict is as ill-conditioned as C itself (beta
grows): there the bound is ``sqrt(k) kappa eps`` relative to |d| (norm sqrt(k)).
The tests allow 50 times these bounds; the measured errors stay below ~1/20 of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from mtx import mtl
from mtx.mtl import base, qp, solvers
from mtx.train import loop

C_AGRAD = 0.4
METHODS = ("mgda", "upgrad", "cagrad", "nash_mtl", "imtl_g")
FAMILIES = ("random", "conflicting", "multi_scale", "conflicting_multi_scale")


# ---------------------------------------------------------------- references


def ref_mgda(jac):
  """Least-distance programming by NNLS (Lawson & Hanson, ch. 23): lambda = u / 1^T u."""
  k = len(jac)
  e = np.vstack([jac.T, np.ones((1, k))])
  f = np.zeros(len(e))
  f[-1] = 1.0
  u, _ = scipy.optimize.nnls(e, f, maxiter=100 * k)
  lam = u / u.sum()
  d = lam @ jac
  # KKT: <g_j, d> >= |d|^2, with equality where lambda_j > 0.
  gap = jac @ d - d @ d
  scale = np.linalg.norm(jac, axis=1).max() ** 2
  assert gap.min() > -1e-10 * scale and np.abs(gap[lam > 1e-9]).max() < 1e-9 * scale
  return d


def ref_upgrad(jac):
  """Each projection: g_i + J^T x, x = argmin_{x >= 0} |g_i + J^T x| (nnls)."""
  k = len(jac)
  proj = []
  for i in range(k):
    if not np.any(jac[i]):
      proj.append(np.zeros(jac.shape[1]))
      continue
    x, _ = scipy.optimize.nnls(jac.T, -jac[i], maxiter=100 * k)
    proj.append(jac[i] + x @ jac)
    assert np.min(jac @ proj[-1]) > -1e-10 * np.abs(jac).max() ** 2
  return np.mean(proj, axis=0)


def _closest(jac, g0, t):
  """The point of {d : J d >= t} closest to g0, by least-distance programming."""
  h = t - jac @ g0
  e = np.vstack([jac.T, h[None]])
  f = np.zeros(len(e))
  f[-1] = 1.0
  u, _ = scipy.optimize.nnls(e, f, maxiter=100 * len(jac))
  r = e @ u - f
  if abs(r[-1]) < 1e-14:
    return None  # infeasible
  return g0 - r[:-1] / r[-1]


def ref_cagrad(jac, c, g0=None):
  """CAGrad before rescaling: the level t* where the closest point leaves the ball."""
  g0 = jac.mean(0) if g0 is None else g0
  r = c * np.linalg.norm(g0)
  b = jac @ g0
  norms = np.linalg.norm(jac, axis=1)
  lo, hi = b.min(), np.min(b + r * norms)
  hi = hi + 1e-9 * (abs(hi) + abs(lo))

  def excess(t):
    d = _closest(jac, g0, t)
    return 1e30 if d is None else np.linalg.norm(d - g0) - r

  xtol = 1e-16 * (hi - lo)  # brentq's xtol is absolute; t scales like |g|^2
  t = scipy.optimize.brentq(excess, lo, hi, xtol=xtol, rtol=8.9e-16, maxiter=1000)
  return _closest(jac, g0, t)


def ref_nash(jac):
  """alpha > 0 with G alpha = 1 / alpha: scipy's root finder, then Newton's method."""
  g = jac @ jac.T
  k = len(jac)
  a = scipy.optimize.root(lambda a: g @ a - 1 / a, np.ones(k) / np.sqrt(np.trace(g))).x
  a = np.abs(a)
  for _ in range(100):
    a = a - np.linalg.solve(g + np.diag(1 / a**2), g @ a - 1 / a)
  assert np.max(np.abs(a * (g @ a) - 1)) < 1e-9
  return a @ jac


def _imtl_g_system(jac):
  u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  return jac[0] - jac[1:], u[0] - u[1:]


def ref_imtl_g(jac):
  """The paper's closed form: alpha_{2:k} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum."""
  dmat, umat = _imtl_g_system(jac)
  rest = jac[0] @ umat.T @ np.linalg.inv(dmat @ umat.T)
  alpha = np.concatenate([[1 - rest.sum()], rest])
  return alpha @ jac


def _ref_error(method, jac, ref):
  """The float64 reference's own error, where it is not negligible: the paper's IMTL-G
  formula is not scale-free (cond(D U^T) reaches 1e5 on multi-scale Jacobians)."""
  if method != "imtl_g" or len(jac) < 2:
    return 0.0
  dmat, umat = _imtl_g_system(jac)
  return np.finfo(np.float64).eps * np.linalg.cond(dmat @ umat.T) * np.linalg.norm(ref)


REFS = {
  "mgda": ref_mgda,
  "upgrad": ref_upgrad,
  "cagrad": lambda jac: ref_cagrad(jac, C_AGRAD),
  "nash_mtl": ref_nash,
  "imtl_g": ref_imtl_g,
}


def _solve(method, g, present):
  """The method's solver on a Gram matrix: (coefficients, stats)."""
  if method == "mgda":
    return solvers.min_norm_weights(g, present)
  if method == "upgrad":
    return solvers.upgrad_weights(g, present)
  if method == "cagrad":
    return solvers.cagrad_coefficients(g, present, C_AGRAD)
  if method == "nash_mtl":
    return solvers.nash_weights(g, present, jnp.ones(g.shape[0], g.dtype))
  return solvers.imtl_g_weights(g, present)


def _family(name, k, seed, n=64):
  """Issue #12's Jacobians: random; strongly conflicting pairs g_{2m+1} = -g_{2m} + 0.1
  noise; norms spread over 1000x; and both."""
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(k, n))
  if "conflicting" in name:
    for m in range(k // 2):
      jac[2 * m + 1] = -jac[2 * m] + 0.1 * rng.normal(size=n)
  if "multi_scale" in name:
    jac *= 10.0 ** rng.uniform(-3, 0, size=(k, 1))
  return jac


def _kappa(jac):
  u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  return np.linalg.cond(u @ u.T)


# ---------------------------------------------- the five cases of issue #12


MINIMAL = {
  # name: (J, the exact d the issue gives, its rounding)
  "mgda": ([[-4, 1, -4], [3.9, -1, 4.1], [-3, 1, -3]], [-0.0498, 0.0050, 0.0498], 1e-4),
  "upgrad": ([[-3, -4, -1], [2.9, 4, 1], [0, -3, -1]], [-0.00076, 0.0218, -0.0851], 1e-4),
  "cagrad": (
    [[-4, 4, 0, 1], [4, -3.9, 0.1, -1.1], [-3, -1, 1, 2], [3, 0.9, -1, -1.9]],
    None,
    0,
  ),
  "nash_mtl": ([[4, 1, 4], [-4.1, -1.1, -4], [4, 4, -4]], [0.954, -1.304, -0.624], 1e-3),
  "imtl_g": ([[1, 0], [0, 1 / 700]], [0.00143, 0.00143], 1e-5),
}


def _aggregator(method, k):
  return mtl.build(mtl.METHODS[method], k)


@pytest.mark.parametrize("method", METHODS)
def test_issue_minimal_cases_are_solved(method):
  jac, exact, rounding = MINIMAL[method]
  jac = np.asarray(jac, np.float64)
  k = len(jac)
  ref = REFS[method](jac)
  if exact is not None:  # the issue's digits are the reference's
    np.testing.assert_allclose(ref, exact, atol=rounding)
  tx = _aggregator(method, k)
  grads = jnp.asarray(jac, jnp.float32)
  state = tx.init(jnp.zeros(jac.shape[1]))
  out, _, info = jax.jit(lambda g, s: mtl.aggregate([tx], s, g, task_losses=jnp.ones(k)))(
    grads, (state,)
  )
  d = np.asarray(out, np.float64)
  assert not info["solver_failed"] and info["solver_residual"] < 1e-5, info
  # float32: within the bound of the module docstring (kappa up to 1e6 here).
  norms = np.linalg.norm(jac, axis=1)
  kappa = _kappa(jac)
  if method == "nash_mtl":
    tol = 50 * np.sqrt(k) * kappa * np.finfo(np.float32).eps * np.linalg.norm(ref)
  else:
    tol = 50 * np.sqrt(k * kappa) * np.finfo(np.float32).eps * norms.max()
  if method == "cagrad":
    ref = ref / (1 + C_AGRAD**2)
  np.testing.assert_allclose(d, ref, atol=tol)
  # The guarantee holds at float32 precision.
  coef = np.asarray(info["weights"], np.float64)
  if method == "cagrad":
    coef, d = coef * (1 + C_AGRAD**2), d * (1 + C_AGRAD**2)
  _check_guarantee(method, jac, coef, d, qp.default_tol(np.float32))
  if method == "mgda":  # equal, positive improvements (all three on the support)
    np.testing.assert_allclose(jac @ d, 0.005, atol=2e-4)
  # float64 all the way: the reference to 1e-9.
  with jax.enable_x64(True):
    g64 = jnp.asarray(jac @ jac.T, jnp.float64)
    c, stats = _solve(method, g64, jnp.ones(k, bool))
    d64 = np.asarray(c) @ jac
    assert not stats.failed and stats.residual < 1e-12
  ref64 = REFS[method](jac)
  np.testing.assert_allclose(d64, ref64, atol=1e-9 * max(1, np.abs(ref64).max()))


# -------------------------------------------------------- property tests


def _check_guarantee(method, jac, coef, d, tol):
  """The paper's promise for ``d = sum_i coef_i g_i`` (d before any rescaling).

  Inner products with d are measured against the size of the terms summed into d,
  ``|g_j| sum_i |coef_i| |g_i|``: a float32 Gram matrix knows ``<d, g_j>`` to about
  eps times that, and under conflict d is much shorter than its terms.
  """
  norms = np.linalg.norm(jac, axis=1)
  nd = np.linalg.norm(d)
  size = norms * max(np.abs(coef) @ norms, 1e-300)
  if method in ("mgda", "upgrad", "nash_mtl"):  # no task's loss increases
    assert np.min(jac @ d / size) > -tol
  if method == "mgda":  # the min-norm point: <g_j, d> >= |d|^2
    assert np.min((jac @ d - nd**2) / size) > -tol
  if method == "nash_mtl":  # alpha_j <g_j, d> = 1, as a backward error
    g = jac @ jac.T
    size = 1 + coef * (np.abs(g) @ coef)
    assert np.max(np.abs(coef * (jac @ d) - 1) / size) < tol
  if method == "imtl_g":  # equal projections on the unit gradients; sum alpha = 1
    proj = jac @ d / norms
    assert np.ptp(proj) < tol * nd
    assert abs(coef.sum() - 1) < tol * np.abs(coef).sum()
  if method == "cagrad":  # inside the ball, and optimal (zero duality gap)
    g0 = jac.mean(0)
    r = C_AGRAD * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= r * (1 + tol)
    v = coef - 1 / len(jac)
    gw = (v / v.sum()) @ jac
    dual = gw @ g0 + r * np.linalg.norm(gw)
    primal = np.min(jac @ d)
    assert abs(dual - primal) < tol * (r + np.linalg.norm(g0)) * norms.max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", METHODS)
def test_guarantees_and_exact_solutions_on_issue_families(method, dtype):
  """Random, conflicting and multi-scale Jacobians, k up to 16, float32 and float64."""
  eps = np.finfo(dtype).eps
  with jax.enable_x64(dtype == np.float64):
    solve = jax.jit(lambda g, p: _solve(method, g, p))
    worst = 0.0
    for family in FAMILIES:
      for k in (2, 5, 16):
        for seed in range(2):
          jac = _family(family, k, seed).astype(dtype).astype(np.float64)
          if dtype == np.float32:  # the Gram matrix the trainer computes
            g = base.gram(jnp.asarray(jac, jnp.float32))
          else:
            g = jnp.asarray(jac @ jac.T, jnp.float64)
          coef, stats = solve(g, jnp.ones(k, bool))
          coef = np.asarray(coef, np.float64)
          where = f"{family} k={k} seed={seed}: {stats}"
          assert not stats.failed and stats.residual < 100 * eps, where
          d = coef @ jac
          _check_guarantee(method, jac, coef, d, qp.default_tol(dtype))
          ref = REFS[method](jac)
          kappa = _kappa(jac)
          if method == "nash_mtl":
            bound = np.sqrt(k) * kappa * eps * np.linalg.norm(ref)
          else:
            bound = np.sqrt(k * kappa) * eps * np.linalg.norm(jac, axis=1).max()
          err = np.linalg.norm(d - ref)
          assert err < 50 * bound + 10 * _ref_error(method, jac, ref), where
          worst = max(worst, err / bound)
  print(f"{method} {dtype.__name__}: worst error {worst:.3g} x the bound")


# -------------------------------------------------------- degenerate cases


G1 = np.array([1.0, 2.0, -0.5])
G2 = np.array([0.5, -1.0, 0.3])


_JITTED = {}


def _run(method, jac, present=None):
  """The method through mtl.aggregate under jit: (d, coefficients, info)."""
  k = len(jac)
  if (method, k) not in _JITTED:
    tx = _aggregator(method, k)
    _JITTED[method, k] = (
      tx,
      jax.jit(
        lambda g, s, p: mtl.aggregate([tx], s, g, task_losses=jnp.ones(k), task_present=p)
      ),
    )
  tx, run = _JITTED[method, k]
  p = jnp.ones(k, bool) if present is None else jnp.asarray(present)
  out, _, info = run(jnp.asarray(jac, jnp.float32), (tx.init(jnp.zeros(3)),), p)
  return np.asarray(out, np.float64), np.asarray(info["weights"]), info


def _closed_forms(method):
  """d for one gradient g, two identical ones, and two opposite ones."""
  g, n = G1, np.linalg.norm(G1)
  rescale = (1 + C_AGRAD) / (1 + C_AGRAD**2)
  return {
    "mgda": (g, g, 0 * g),
    "upgrad": (g, g, 0 * g),
    "cagrad": (rescale * g, rescale * g, 0 * g),
    "nash_mtl": (g / n, np.sqrt(2) * g / n, 0 * g),  # |d|^2 = k
    "imtl_g": (g, g, 0 * g),
  }[method]


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_cases_are_finite_closed_forms(method):
  one, identical, opposite = _closed_forms(method)
  for jac, want in (([G1], one), ([G1, G1], identical), ([G1, -G1], opposite)):
    d, _, info = _run(method, np.array(jac))
    np.testing.assert_allclose(d, want, atol=1e-5, err_msg=f"{method} {len(jac)}")
    assert np.isfinite(info["solver_residual"])
  # All gradients zero, or no task present: d = 0, nothing failed.
  for jac, present in ((np.zeros((2, 3)), None), (np.array([G1, G2]), [False, False])):
    d, w, info = _run(method, jac, present)
    assert np.all(d == 0) and np.all(np.isfinite(w)) and not info["solver_failed"]


@pytest.mark.parametrize("method", METHODS)
def test_absent_and_zero_gradient_tasks(method):
  """An absent task is as if it were not there. A present task with a zero gradient:
  MGDA's hull contains 0 (d = 0); UPGrad projects it to 0 and counts it in the mean;
  CAGrad counts it in the mean g_0 but not in the worst case; Nash-MTL and IMTL-G
  leave it out (alpha = 0)."""
  pair = np.array([G1, G2])
  d_pair, w_pair, _ = _run(method, pair)
  d, w, _ = _run(method, np.array([G1, 100 * G2 + 3, G2]), [True, False, True])
  np.testing.assert_allclose(d, d_pair, rtol=1e-5, atol=1e-6)
  assert w[1] == 0.0
  d, w, info = _run(method, np.array([G1, 0 * G1, G2]))
  assert not info["solver_failed"]
  if method == "mgda":
    want = 0 * G1
  elif method == "upgrad":
    want = d_pair * 2 / 3
  elif method == "cagrad":
    g0 = (G1 + G2) / 3
    want = ref_cagrad(pair, C_AGRAD, g0=g0) / (1 + C_AGRAD**2)
  else:
    want = d_pair
  np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- reports and fallbacks


@pytest.mark.slow
def test_aggregate_reports_the_solve_and_masked_forwards_it():
  jac = _family("conflicting", 4, 0, n=10)
  grads = {"w": jnp.asarray(jac[:, :6], jnp.float32), "b": jnp.asarray(jac[:, 6:])}
  for name in METHODS:
    for tx in (_aggregator(name, 4), mtl.masked(_aggregator(name, 4), "w")):
      state = (tx.init(jax.tree_util.tree_map(lambda g: g[0], grads)),)
      _, _, info = jax.jit(
        lambda s, g, tx=tx: mtl.aggregate([tx], s, g, task_losses=jnp.ones(4))
      )(state, grads)
      assert info["solver_residual"].dtype == jnp.float32, name
      assert info["solver_residual"] < 1e-5 and not info["solver_failed"], name
      assert info["solver_iterations"] >= 1, name
  state = (mtl.pcgrad().init(None),)
  _, _, info = mtl.aggregate([mtl.pcgrad()], state, grads, task_losses=jnp.ones(4))
  assert "solver_residual" not in info  # no solve, no report


@pytest.mark.parametrize("method", ["imtl_g", "nash_mtl"])
def test_a_failed_solve_falls_back_to_mgda_and_says_so(method):
  """tol=0 makes every solve fail: the weights are MGDA's, never the plain sum."""
  jac = _family("conflicting", 3, 1, n=8)
  k = len(jac)
  tx = mtl.imtl_g(tol=0.0) if method == "imtl_g" else mtl.nash_mtl(k, tol=0.0)
  state = (tx.init(jnp.zeros(8)),)
  grads = jnp.asarray(jac, jnp.float32)
  _, _, info = mtl.aggregate([tx], state, grads, task_losses=jnp.ones(k))
  assert info["solver_failed"] and info["solver_residual"] > 0
  lam, _ = solvers.min_norm_weights(mtl.gram(grads), jnp.ones(k, bool))
  np.testing.assert_allclose(info["weights"], lam, rtol=1e-6)


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad"])
def test_a_capped_solve_keeps_a_feasible_iterate_and_says_so(method):
  jac = _family("conflicting", 8, 2, n=16)
  k = len(jac)
  tx = {
    "mgda": mtl.mgda(max_iter=2),
    "upgrad": mtl.upgrad(max_iter=2),
    "cagrad": mtl.cagrad(max_iter=2),
  }[method]
  state = (tx.init(jnp.zeros(16)),)
  grads = jnp.asarray(jac, jnp.float32)
  out, _, info = mtl.aggregate([tx], state, grads, task_losses=jnp.ones(k))
  assert info["solver_failed"] and np.all(np.isfinite(out))
  w = np.asarray(info["weights"])
  if method == "mgda":  # still a point of the simplex
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-6
  if method == "cagrad":  # still inside the ball
    g0 = jac.mean(0)
    d = (1 + C_AGRAD**2) * (w @ jac)
    assert np.linalg.norm(d - g0) <= C_AGRAD * np.linalg.norm(g0) * (1 + 1e-5)


def test_period_metrics_log_the_worst_residual_and_count_failures(caplog):
  def step(residual, failed, nonfinite=False):
    return {
      "nonfinite": nonfinite,
      "task_loss_sums": np.ones(2),
      "task_tokens": np.ones(2),
      "grad_norm": 1.0,
      "solver_residual": np.float32(residual),
      "solver_failed": np.bool_(failed),
    }

  history = [
    step(1e-7, False),
    step(3e-3, True),
    step(2e-7, False),
    step(1.0, True, True),
  ]
  out = loop._period_metrics(history, ["a", "b"], ["a", "b"])  # pylint: disable=protected-access
  assert out["mtl/solver_residual"] == pytest.approx(3e-3)
  assert out["mtl/solver_failures"] == 1  # the skipped (non-finite) step is left out
  with caplog.at_level("WARNING", logger="mtx"):
    loop.warn_solver_failures(out, 40)
  assert "1 step(s) of the period ending at step 40" in caplog.text
  caplog.clear()
  loop.warn_solver_failures(loop._period_metrics(history[:1], ["a"], ["a"]), 10)  # pylint: disable=protected-access
  assert not caplog.text
