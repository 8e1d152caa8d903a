"""Runs the PCGrad paper's two-task toy (Yu et al. 2020, App. D) for every method.

    python tools/toy_pcgrad.py                      # 500k Adam steps, toy_pcgrad.png
    python tools/toy_pcgrad.py --steps 100000 --methods adam,pcgrad,mgda
    python tools/toy_pcgrad.py --no_plot            # numbers only

theta in R^2, from (0.5, -3)::

    L1 = 20 log(max(|0.5 t1 + tanh t2|, 5e-6))
    L2 = 25 log(max(|0.5 t1 - tanh t2 + 2|, 5e-6))

Both losses are minimal (-inf, floored) where t1 = -2 and tanh t2 = 1, i.e. t1 near -2
with t2 large. Plain Adam (lr 1e-3) on L1 + L2 falls into task 1's valley
(0.5 t1 + tanh t2 = 0) and stalls there; ``optax.chain(mtl.<method>(), optax.adam(1e-3))``
gets the two task gradients (``jax.jacrev``) and, for PCGrad, reaches the joint optimum
region. Every run is one ``lax.scan``. It prints each method's final point and losses
and saves the trajectories over the contours of L1 + L2 to one PNG (``--out``).

The plot needs matplotlib, which mtx itself does not depend on:
``pip install matplotlib`` (into the same environment as mtx). Without it the tool
prints the numbers, says so, and exits with status 2 unless ``--no_plot`` is given.
"""

import argparse
import os
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from mtx import mtl  # pylint: disable=g-import-not-at-top

START = (0.5, -3.0)

# Every aggregator, as used in the toy (two tasks).
AGGREGATORS = {
  "sum_tasks": lambda: mtl.sum_tasks(),
  "pcgrad": lambda: mtl.pcgrad(),
  "mgda": lambda: mtl.mgda(),
  "cagrad": lambda: mtl.cagrad(),
  "imtl_g": lambda: mtl.imtl_g(),
  "gradvac": lambda: mtl.gradvac(2),
  "nash_mtl": lambda: mtl.nash_mtl(2),
  "aligned_mtl": lambda: mtl.aligned_mtl(),
  "upgrad": lambda: mtl.upgrad(),
  "gradnorm": lambda: mtl.gradnorm(2),
}


def losses(theta):
  """The two task losses, f32[2], at theta f32[2]."""
  t1, t2 = theta[0], theta[1]
  l1 = 20.0 * jnp.log(jnp.maximum(jnp.abs(0.5 * t1 + jnp.tanh(t2)), 5e-6))
  l2 = 25.0 * jnp.log(jnp.maximum(jnp.abs(0.5 * t1 - jnp.tanh(t2) + 2.0), 5e-6))
  return jnp.stack([l1, l2])


def run(method: str, steps: int, lr: float, every: int):
  """Trains from START; returns (final theta f32[2], trajectory f32[steps//every, 2])."""
  per_task = method != "adam"
  if per_task:
    tx = optax.chain(AGGREGATORS[method](), optax.adam(lr))
  else:
    tx = optax.adam(lr)

  def step(carry, key):
    theta, state = carry
    if per_task:
      grads = jax.jacrev(losses)(theta)
    else:
      grads = jax.grad(lambda t: jnp.sum(losses(t)))(theta)
    upd, state = tx.update(grads, state, theta, task_losses=losses(theta), key=key)
    return (optax.apply_updates(theta, upd), state), theta

  def chunk(carry, keys):
    carry, thetas = jax.lax.scan(step, carry, keys)
    return carry, thetas[0]

  theta0 = jnp.asarray(START, jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), steps).reshape(steps // every, every, -1)
  (theta, _), traj = jax.jit(lambda c, k: jax.lax.scan(chunk, c, k))(
    (theta0, tx.init(theta0)), keys
  )
  return np.asarray(theta), np.asarray(traj)


def plot(results, path):
  """Saves the trajectories over the contours of L1 + L2; False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  points = np.concatenate([traj for _, traj in results.values()])
  lo = np.minimum(points.min(0), START) - 1.0
  hi = np.maximum(points.max(0), START) + 1.0
  t1, t2 = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 400))
  grid = np.stack([t1.ravel(), t2.ravel()], axis=1)
  total = np.asarray(jax.vmap(lambda t: jnp.sum(losses(t)))(jnp.asarray(grid)))
  fig, ax = plt.subplots(figsize=(8, 7))
  cs = ax.contourf(t1, t2, total.reshape(t1.shape), levels=40, cmap="Greys_r")
  fig.colorbar(cs, ax=ax, label="L1 + L2")
  # tab20 without its reds, which mark Adam.
  colors = [plt.get_cmap("tab20")(i) for i in range(0, 20, 2) if i != 6]
  colors += [plt.get_cmap("tab20")(i) for i in range(1, 20, 2) if i != 7]
  for i, (name, (theta, traj)) in enumerate(results.items()):
    if name == "adam":
      style = dict(lw=3, color="red", zorder=3)
    else:
      style = dict(lw=1.5, color=colors[i % len(colors)], ls=("-", "--", ":")[i % 3])
    ax.plot(traj[:, 0], traj[:, 1], label=name, **style)
    ax.plot(theta[0], theta[1], "o", color=style["color"])
  ax.plot(*START, "y*", ms=16, label="start", zorder=4)
  ax.set_xlabel("theta_1")
  ax.set_ylabel("theta_2")
  ax.set_xlim(lo[0], hi[0])
  ax.set_ylim(lo[1], hi[1])
  ax.set_title("PCGrad toy (Yu et al. 2020, App. D): Adam vs mtl aggregators")
  ax.legend(loc="lower left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=500_000)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument(
    "--methods",
    default="adam," + ",".join(AGGREGATORS),
    help="comma-separated: adam and/or " + ", ".join(AGGREGATORS),
  )
  parser.add_argument(
    "--every",
    type=int,
    default=500,
    help="keep one trajectory point every this many steps",
  )
  parser.add_argument("--out", default="toy_pcgrad.png")
  parser.add_argument("--no_plot", action="store_true")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m != "adam" and m not in AGGREGATORS]
  if unknown:
    print(
      f"Unknown method(s) {unknown}; choose from adam, {', '.join(AGGREGATORS)}.",
      file=sys.stderr,
    )
    return 2
  if args.steps % args.every:
    print(
      f"--steps {args.steps} must be a multiple of --every {args.every}.", file=sys.stderr
    )
    return 2

  results = {}
  print(
    f"{'method':<12} {'theta_1':>9} {'theta_2':>9} {'L1':>10} {'L2':>10} {'seconds':>8}"
  )
  for name in methods:
    t0 = time.time()
    theta, traj = run(name, args.steps, args.lr, args.every)
    l1, l2 = np.asarray(losses(jnp.asarray(theta)))
    print(
      f"{name:<12} {theta[0]:9.3f} {theta[1]:9.3f} {l1:10.2f} {l2:10.2f}"
      f" {time.time() - t0:8.1f}",
      flush=True,
    )
    results[name] = (theta, traj)
  if args.no_plot:
    return 0
  if not plot(results, args.out):
    print(
      "matplotlib is not installed, so no plot was saved; install it with "
      "`pip install matplotlib` in this environment (or pass --no_plot).",
      file=sys.stderr,
    )
    return 2
  print(f"saved {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
