"""The train state and its shardings: params, optimizer and mtl state, step, RNG.

The state is a plain dict pytree, checkpointed whole:

    {"step": int32[], "params": {...}, "opt_state": ..., "mtl_state": ..., "rng": uint32[2],
     "nonfinite_steps": int32[]}   (steps skipped for a NaN/Inf; mtx.train.step)

With frozen params (``train.trainable_params``, ``mtx.train.freeze``) "params" holds
them all and "opt_state", "mtl_state" cover the trainable ones only.

Parameters themselves (shapes, shardings, init) are ``mtx.runtime.params``.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from mtx import parallel
from mtx.train import freeze


def make_state(
  params,
  optimizer: optax.GradientTransformation,
  mtl_init,
  seed: int,
  trainable_params: Optional[str] = None,
) -> dict:
  """The full state around ``params`` (call under jit with out_shardings).

  With ``trainable_params`` (a regex on param paths, ``mtx.train.freeze``) the
  optimizer and mtl states are those of the matching params only: the frozen ones
  get none.
  """
  trainable = freeze.trainable(params, trainable_params)
  return {
    "step": jnp.zeros([], jnp.int32),
    "params": params,
    "opt_state": optimizer.init(trainable),
    "mtl_state": mtl_init(trainable),
    "rng": jax.random.key_data(jax.random.key(seed)),
    "nonfinite_steps": jnp.zeros([], jnp.int32),
  }


def state_shardings(
  abstract_state,
  params_abstract,
  params_shardings,
  mesh,
  trainable_params: Optional[str] = None,
):
  """Shardings of the whole state: params by rules, states mirroring params alike
  (the trainable params, with ``trainable_params``)."""
  out = {
    k: parallel.replicated(mesh)
    for k in ("step", "rng", "nonfinite_steps")
    if k in abstract_state
  }
  out["params"] = params_shardings
  for key in ("opt_state", "mtl_state"):
    out[key] = parallel.like_params_shardings(
      abstract_state[key],
      freeze.trainable(params_abstract, trainable_params),
      freeze.trainable(params_shardings, trainable_params),
      mesh,
    )
  return out
