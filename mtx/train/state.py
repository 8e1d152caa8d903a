"""The train state and its shardings: params, optimizer and mtl state, step, RNG.

The state is a plain dict pytree, checkpointed whole:

    {"step": int32[], "params": {...}, "opt_state": ..., "mtl_state": ..., "rng": uint32[2],
     "nonfinite_steps": int32[]}   (steps skipped for a NaN/Inf; mtx.train.step)

Parameters themselves (shapes, shardings, init) are ``mtx.runtime.params``.
"""

import jax
import jax.numpy as jnp
import optax

from mtx import parallel


def make_state(
  params, optimizer: optax.GradientTransformation, mtl_init, seed: int
) -> dict:
  """The full state around ``params`` (call under jit with out_shardings)."""
  return {
    "step": jnp.zeros([], jnp.int32),
    "params": params,
    "opt_state": optimizer.init(params),
    "mtl_state": mtl_init(params),
    "rng": jax.random.key_data(jax.random.key(seed)),
    "nonfinite_steps": jnp.zeros([], jnp.int32),
  }


def state_shardings(abstract_state, params_abstract, params_shardings, mesh):
  """Shardings of the whole state: params by rules, states mirroring params alike."""
  out = {
    k: parallel.replicated(mesh)
    for k in ("step", "rng", "nonfinite_steps")
    if k in abstract_state
  }
  out["params"] = params_shardings
  for key in ("opt_state", "mtl_state"):
    out[key] = parallel.like_params_shardings(
      abstract_state[key], params_abstract, params_shardings, mesh
    )
  return out
