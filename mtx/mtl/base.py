"""The mtl protocol: per-task gradients in, Optax transforms, shared helpers.

Every method in ``mtx.mtl`` is an ``optax.GradientTransformationExtraArgs``
whose ``update`` takes **per-task gradients**: a pytree shaped like the
parameters with a leading task axis of size k (float32)::

    params          {'w': f32[3, 4], 'b': f32[4]}
    per_task_grads  {'w': f32[k, 3, 4], 'b': f32[k, 4]}

``update(updates, state, params=None, **extra_args)`` reads these extra
arguments (all optional; unknown ones are ignored):

  task_losses:  f32[k], the mean loss of each task in this batch.
  task_present: bool[k], False for a task with no rows in this batch. An absent
    task contributes nothing, nothing is projected on it, and its learnable or
    running state is left untouched. Default: every task present. The rows of
    absent tasks in ``per_task_grads`` must be finite (the trainer gives zeros).
  key:          a jax PRNG key for this step (random orders, random weights).
    Transforms that need randomness fall back to a key folded from their own
    step counter and ``seed`` when none is given.

There are two kinds of transform, told apart by their type (``kind``):

  ``Weighting`` scales along the task axis and keeps it: ``update`` returns
    ``w[:, None, ...] * updates``. Its ``weights`` attribute is a function
    ``(state, *, task_losses, task_present, key) -> (w f32[k], new_state)``
    that never looks at gradients, and ``update`` is derived from it. When
    every transform has such weights (see ``needs_task_grads``), the trainer
    takes the cheap path: it calls ``combined_weights`` and then takes ONE
    gradient of ``sum_t w_t L_t`` instead of k gradients. Both paths give the
    same update and share one state.
  ``Aggregator`` reduces the task axis away and hands an ordinary gradient,
    shaped like params, to the rest of the chain. Its ``aggregate`` attribute is
    the same update that (a) may reuse a Gram matrix computed by the caller,
    (b) reports the task coefficients ``c`` f32[k] it applied, ``out = sum_i c_i
    g_i``, and (c) when ``c`` comes from a solve, reports how well it was solved
    (``qp.SolverStats``: residual, iterations, failed); ``update`` is derived from
    it. ``sum_tasks`` and ``mean_tasks`` also carry gradient-free ``weights``. The
    function ``aggregate`` runs a whole list of transforms through these
    attributes: one Gram matrix for the step's diagnostics and the aggregator, the
    chain's task weights and the solve's report for the metrics.

Both types are still ``optax.GradientTransformationExtraArgs``, so
``optax.chain(mtl.pcgrad(), optax.sgd(0.1))`` works and passes the extra args
through; but the transform ``optax.chain`` returns is a plain one, of neither
kind. So the trainer takes a LIST of transforms, in this order: weightings, then
one aggregator, then any plain optax transforms (they act on the aggregated
gradient). ``ensure_aggregator`` checks that order, refusing anything before the
aggregator that is neither kind (``optax.chain(mtl.uncertainty_weighting(3))``
among them), and appends ``sum_tasks()`` to a list of weightings only, so that
the optimizer receives a gradient shaped like params.

Most gradient-surgery methods are a weighting of the task gradients computed
from the k-by-k Gram matrix ``G_ij = <g_i, g_j>``: ``gram`` computes it once (one
contraction per leaf, float32), a k-sized solver gives coefficients ``c f32[k]``,
and ``combine`` forms ``sum_i c_i g_i``.
"""

import functools
import inspect
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from mtx.errors import UserError

PyTree = Any
# A mask selects parameter leaves: None (all), a regex searched in the leaf's
# '/'-joined path (e.g. 'decoder/.*final_layer_norm'), a callable taking that
# path string and returning a bool, or a pytree of bools (or a prefix of one).
Mask = Union[None, str, Callable[[str], bool], PyTree]

WEIGHTING = "weighting"
AGGREGATOR = "aggregator"


# ------------------------------------------------------------------ protocol


class _TypedTransform(optax.GradientTransformationExtraArgs):
  """What ``Weighting`` and ``Aggregator`` share: mtl attributes that survive.

  Not a NamedTuple with more fields: ``optax.chain`` unpacks every transform as
  an ``(init, update)`` pair (optax 0.2.8: ``init_fns, update_fns =
  zip(*transforms)``), so the tuple keeps exactly those two elements and the
  mtl functions (named in ``_attrs``) are instance attributes. The NamedTuple
  machinery would drop them: ``copy``/``pickle`` rebuild from the two fields,
  ``_make``/``_replace`` build a bare tuple, and ``jax.tree_util`` rebuilds a
  NamedTuple as ``cls(init, update)``. Hence ``__reduce__``, ``_replace`` and
  the pytree methods below, which carry the attributes along (``pickle`` works
  when the functions themselves pickle, e.g. module-level functions).
  """

  _attrs: tuple[str, ...] = ()

  def tree_flatten(self):
    # The leaves are init and update, as for any optax transform; the mtl
    # functions ride along as static data.
    return (self.init, self.update), tuple(getattr(self, a) for a in self._attrs)

  @classmethod
  def tree_unflatten(cls, attrs, children):
    init, update = children
    return cls(init, *attrs, update=update)

  def __reduce__(self):
    attrs = tuple(getattr(self, a) for a in self._attrs)
    return (type(self), (self.init, *attrs, self.update))

  def _replace(self, **changes):
    """A NamedTuple's ``_replace`` for ``init`` and ``update``; same attributes."""
    unknown = sorted(set(changes) - {"init", "update"})
    if unknown:
      raise ValueError(
        f"{type(self).__name__}._replace takes init and update "
        f"only, not {unknown}; build a new {type(self).__name__} "
        "to change them."
      )
    children = (changes.get("init", self.init), changes.get("update", self.update))
    return self.tree_unflatten(self.tree_flatten()[1], children)

  @classmethod
  def _make(cls, iterable):
    raise TypeError(
      f"{cls.__name__} is not built from (init, update) alone; "
      f"call {cls.__name__}(...) with its functions."
    )


@jax.tree_util.register_pytree_node_class
class Weighting(_TypedTransform):
  """A transform that scales the task axis by gradient-free task weights.

  Shapes: per-task f32[k, ...] -> f32[k, ...] (task axis kept); w f32[k].

  ``update`` returns ``w[:, None, ...] * updates``, with ``w`` and the new state
  from ``weights``; deriving it from ``weights`` keeps the per-task route
  (``update``, ``aggregate``) and the one-gradient route (``combined_weights``)
  equal by construction. It is a ``GradientTransformationExtraArgs``, a 2-tuple
  ``(init, update)`` with ``weights`` an attribute, not a NamedTuple with a third
  field, because ``optax.chain`` unpacks transforms as ``(init, update)`` pairs.

  Attributes:
    init: ``params -> state``.
    update: ``(updates, state, params=None, *, task_losses=None,
      task_present=None, key=None, **ignored) -> (updates, state)``.
    weights: ``(state, *, task_losses, task_present, key) -> (w f32[k],
      new_state)``; zero for absent tasks; never reads gradients.
  """

  _attrs = ("weights",)

  def __new__(
    cls,
    init: Callable[[PyTree], Any],
    weights: Callable[..., tuple[jax.Array, Any]],
    update: Optional[Callable[..., Any]] = None,
  ):
    """``update`` is derived from ``weights``; pass one only to restore a copy."""
    if update is None:
      update = functools.partial(_weighting_update, weights)
    self = super().__new__(cls, init, update)
    self.weights = weights
    return self


@jax.tree_util.register_pytree_node_class
class Aggregator(_TypedTransform):
  """A transform that reduces the task axis away and reports its coefficients.

  Shapes: per-task f32[k, ...] -> f32[...]; c f32[k] (or None).

  ``update`` is ``aggregate`` without a Gram matrix, minus ``c``. It is a
  ``GradientTransformationExtraArgs``, a 2-tuple ``(init, update)`` with
  ``aggregate``/``weights`` attributes, not a NamedTuple with more fields,
  because ``optax.chain`` unpacks transforms as ``(init, update)`` pairs.

  Attributes:
    init: ``params -> state``.
    update: ``(updates, state, params=None, *, task_losses=None,
      task_present=None, key=None, **ignored) -> (out, state)``.
    aggregate: ``(updates, state, params, *, gram_matrix, task_losses,
      task_present, key) -> (out, new_state, c)`` or ``(out, new_state, c,
      stats)``: ``updates`` the per-task gradients f32[k, ...], ``gram_matrix``
      None or their Gram matrix f32[k, k] already computed by the caller (to
      reuse instead of computing it), ``out`` the aggregated gradient shaped like
      params, ``c`` f32[k] the coefficients applied (``out == sum_i c_i
      updates[i]``, zero for absent tasks) or None when the output is not such a
      combination, and ``stats`` (optional) the ``qp.SolverStats`` of the solve
      that gave ``c``.
    weights: None, or for an aggregator whose ``c`` is gradient-free (sum,
      mean) a ``Weighting``'s weights function giving ``c`` (it enables the
      one-gradient route; see ``needs_task_grads``).
    coefficients: None, or for an aggregator whose ``c`` depends on the task
      gradients through their Gram matrix only (PCGrad, MGDA, CAGrad, IMTL-G,
      GradVac, Nash-MTL, Aligned-MTL, UPGrad, GradNorm without a mask, sum,
      mean): ``(gram_matrix f32[k, k], state, *, task_losses, task_present,
      key) -> (c, new_state)`` or ``(c, new_state, stats)``, the same ``c`` and
      state ``aggregate`` gives for gradients with that Gram matrix. It enables
      the Gramian route (``aggregate_gram``), which never holds k gradients.
  """

  _attrs = ("aggregate", "weights", "coefficients")

  def __new__(
    cls,
    init: Callable[[PyTree], Any],
    aggregate: Callable[..., tuple[PyTree, Any, Optional[jax.Array]]],
    weights: Optional[Callable[..., tuple[jax.Array, Any]]] = None,
    coefficients: Optional[Callable[..., tuple]] = None,
    update: Optional[Callable[..., Any]] = None,
  ):
    """``update`` is derived from ``aggregate``; pass one only to restore a copy."""
    if update is None:
      update = functools.partial(_aggregator_update, aggregate)
    self = super().__new__(cls, init, update)
    self.aggregate = aggregate
    self.weights = weights
    self.coefficients = coefficients
    return self


def _weighting_update(
  weights_fn,
  updates,
  state,
  params=None,
  *,
  task_losses=None,
  task_present=None,
  key=None,
  **extra_args,
):
  """``Weighting.update`` (module level, so that a Weighting can pickle)."""
  del params, extra_args
  out, _, new_state = _apply_weighting(
    weights_fn,
    updates,
    state,
    task_losses=task_losses,
    task_present=task_present,
    key=key,
  )
  return out, new_state


def _aggregator_update(
  aggregate_fn,
  updates,
  state,
  params=None,
  *,
  task_losses=None,
  task_present=None,
  key=None,
  **extra_args,
):
  """``Aggregator.update``; ignores unknown extra args, ``gram_matrix`` among
  them: only ``aggregate`` passes one, when it is known to be right."""
  del extra_args
  out, new_state = aggregate_fn(
    updates,
    state,
    params,
    gram_matrix=None,
    task_losses=task_losses,
    task_present=task_present,
    key=key,
  )[:2]
  return out, new_state


def _apply_weighting(weights_fn, updates, state, *, task_losses, task_present, key):
  """``(w[:, None, ...] * updates, w, new_state)`` for a weighting's weights_fn."""
  w, new_state = weights_fn(
    state, task_losses=task_losses, task_present=task_present, key=key
  )
  k = num_tasks_of(updates)
  if w.shape != (k,):
    raise UserError(
      f"A weighting produced weights of shape {w.shape} for per-task "
      f"gradients with {k} tasks; set its num_tasks to {k}."
    )
  return scale_tasks(updates, w), w, new_state


def weighting_transform(
  init_fn: Callable[[PyTree], NamedTuple],
  weights_fn: Callable[..., tuple[jax.Array, NamedTuple]],
) -> Weighting:
  """``Weighting(init_fn, weights_fn)``; see ``Weighting``."""
  return Weighting(init_fn, weights_fn)


def aggregator_transform(
  init_fn: Callable[[PyTree], Any],
  aggregate_fn: Callable[..., tuple[PyTree, Any, Optional[jax.Array]]],
  weights_fn: Optional[Callable[..., tuple[jax.Array, Any]]] = None,
) -> Aggregator:
  """``Aggregator(init_fn, aggregate_fn, weights_fn)``; see ``Aggregator``."""
  return Aggregator(init_fn, aggregate_fn, weights_fn)


def kind(transform) -> Optional[str]:
  """'weighting', 'aggregator', or None for any other transform.

  Read from the type: ``optax.chain`` of mtl transforms is of neither kind.
  """
  if isinstance(transform, Weighting):
    return WEIGHTING
  if isinstance(transform, Aggregator):
    return AGGREGATOR
  return None


def _weights_of(transform):
  """The gradient-free weights function of ``transform``, or None."""
  if isinstance(transform, (Weighting, Aggregator)):
    return transform.weights
  return None


def needs_task_grads(transforms: Sequence[optax.GradientTransformation]) -> bool:
  """Whether the chain of ``transforms`` needs one gradient per task.

  False iff every transform has a gradient-free weights function: every
  weighting, plus ``sum_tasks()`` and ``mean_tasks()``, which are aggregators
  whose result is also a fixed weighting (so a list of weightings followed by the
  appended ``sum_tasks()`` still takes the cheap path). An empty list needs none.
  """
  return not all(_weights_of(t) is not None for t in transforms)


def _check_order(transforms, what: str) -> Optional[int]:
  """The index of the first aggregator (None if none), or a UserError.

  Before it: weightings only; after it: plain optax transforms only, since the
  task axis is gone (a second aggregator or a weighting would silently treat a
  parameter axis as the task axis). ``what`` names an item in the message.
  """
  first = None
  for i, t in enumerate(transforms):
    if first is None and isinstance(t, Aggregator):
      first = i
    elif first is None and not isinstance(t, Weighting):
      raise UserError(
        f"{what} {i} ({type(t).__name__}) is neither an mtx.mtl weighting nor "
        "an aggregator, so it cannot come before the aggregator: pass the mtl "
        "transforms themselves in the list (optax.chain of them hides their "
        "kind) and put plain optax transforms after the aggregator."
      )
    elif first is not None and isinstance(t, Weighting):
      raise UserError(
        f"{what} {i} is a loss weighting placed after an aggregator, which "
        "has already reduced the task axis; put weightings before the aggregator "
        "(e.g. [@mtl.uncertainty_weighting, @mtl.pcgrad])."
      )
    elif first is not None and isinstance(t, Aggregator):
      raise UserError(
        f"{what} {i} is an aggregator placed after aggregator {first}, which "
        "has already reduced the task axis; keep one aggregator (mtl.masked "
        "limits one to some parameters)."
      )
  return first


def ensure_aggregator(transforms: Sequence[optax.GradientTransformation]):
  """Returns ``transforms`` with ``sum_tasks()`` appended if none aggregates.

  A list that ends in weightings would hand the optimizer a gradient that still
  has the task axis; summing over tasks afterwards is what ``sum_t w_t L_t`` means.
  Raises a UserError (a ValueError) unless the list is weightings, then at most
  one aggregator, then plain optax transforms: a transform of neither kind before
  the aggregator (``optax.chain`` of mtl transforms, ``optax.scale``) would get
  per-task gradients it cannot know about.
  """
  transforms = tuple(transforms)
  if _check_order(transforms, "mtl transform") is not None:
    return transforms
  return transforms + (sum_tasks(),)


def combined_weights(transforms, states, *, task_losses, task_present=None, key=None):
  """The cheap path: the product of the transforms' task weights.

  Args:
    transforms: the mtl transforms, each with gradient-free ``weights`` (see
      ``needs_task_grads``).
    states: their states as a tuple in transform order, the layout of
      ``optax.chain(*transforms).init(params)``.
    task_losses: f32[k].
    task_present: bool[k] or None (all present).
    key: PRNG key, given to every transform, as ``optax.chain`` does.

  Returns:
    ``(w f32[k], new_states)``: the gradient of ``sum_t w_t L_t`` equals what the
    chain produces from per-task gradients, and ``new_states`` equals its state.
  """
  if len(transforms) != len(states):
    raise UserError(
      f"combined_weights got {len(transforms)} transforms but {len(states)} "
      "states; pass the state of optax.chain(*transforms)."
    )
  task_losses = jnp.asarray(task_losses, jnp.float32)
  w = jnp.ones(task_losses.shape, jnp.float32)
  new_states = []
  for t, s in zip(transforms, states):
    fn = _weights_of(t)
    if fn is None:
      raise UserError(
        "combined_weights needs transforms whose weights do not depend on "
        "gradients (weightings, sum_tasks, mean_tasks); use the per-task "
        "gradient path when needs_task_grads(transforms) is True."
      )
    wt, s = fn(s, task_losses=task_losses, task_present=task_present, key=key)
    w = w * wt
    new_states.append(s)
  return w, tuple(new_states)


def aggregate(
  transforms: Sequence[optax.GradientTransformation],
  states,
  per_task_grads: PyTree,
  params: PyTree = None,
  *,
  task_losses=None,
  task_present=None,
  key=None,
  **extra_args,
):
  """The per-task-gradient route: the chain's update, its task weights, diagnostics.

  Runs ``transforms`` in order exactly as ``optax.chain(*transforms).update``
  does (same result, same state), but with ONE Gram matrix of the per-task
  gradients, computed here and shared by the diagnostics and by the aggregator
  (rescaled by the weights of any weightings before it; a ``masked`` aggregator
  reuses it only when its mask selects every parameter), and it reports the task
  weights the chain applied.

      per_task_grads {'w': f32[k, 3, 4]}  ->  updates {'w': f32[3, 4]}
      info['weights'] f32[k]: updates == sum_i weights_i * per_task_grads[i]

  What ``info['weights']`` means for a chain: the product of the weightings'
  weights and the aggregator's coefficients (e.g. uncertainty weighting then
  PCGrad gives ``w_uw * c_pcgrad``). For ``masked`` it is the inner method's
  weights, which apply to the selected parameters (the others are summed).
  Plain optax transforms after the aggregator act on the aggregated gradient and
  do not change the weights. It is absent when the aggregator reports no
  coefficients (its ``aggregate`` returns None for ``c``).

  Args:
    transforms: the mtl transforms, in chain order: weightings, at most one
      aggregator, then plain optax transforms (see ``ensure_aggregator``).
    states: their states as a tuple in transform order, the layout of
      ``optax.chain(*transforms).init(params)``.
    per_task_grads: tree with a leading task (or group) axis k.
    params: the parameters (passed on to the transforms).
    task_losses: f32[k].
    task_present: bool[k] or None (all present).
    key: PRNG key, given to every transform, as ``optax.chain`` does.
    **extra_args: passed on to plain optax transforms in the chain.

  Returns:
    ``(updates, new_states, info)``: ``info`` holds ``diagnostics``'s
    ``grad_norm`` f32[k], ``grad_cos`` f32[k, k], ``conflict_frac`` f32[],
    ``weights`` f32[k] when known, and when the aggregator solved for its weights
    (MGDA, CAGrad, IMTL-G, Nash-MTL, UPGrad) the solve's report
    (``qp.SolverStats``): ``solver_residual`` f32[] (the residual of its
    optimality conditions, dimensionless), ``solver_iterations`` i32[] and
    ``solver_failed`` bool[] (the residual is above tolerance and the method's
    fallback was applied).
  """
  transforms = tuple(transforms)
  states = tuple(states)
  if len(transforms) != len(states):
    raise UserError(
      f"aggregate got {len(transforms)} transforms but {len(states)} states; "
      "pass the state of optax.chain(*transforms)."
    )
  _check_order(transforms, "mtl transform")
  k = num_tasks_of(per_task_grads)
  p = presence(task_present, k)
  g = gram(per_task_grads)
  out, new_states, w, stats = _run_chain(
    transforms,
    states,
    per_task_grads,
    params,
    gram_matrix=g,
    task_losses=task_losses,
    task_present=p,
    key=key,
    extra_args=extra_args,
  )
  info = diagnostics(per_task_grads, p, gram_matrix=g)
  if w is not None:
    info["weights"] = w
  if stats is not None:
    info["solver_residual"] = jnp.asarray(stats.residual, jnp.float32)
    info["solver_iterations"] = jnp.asarray(stats.iterations, jnp.int32)
    info["solver_failed"] = jnp.asarray(stats.failed, bool)
  return out, new_states, info


def _run_chain(
  transforms,
  states,
  updates,
  params,
  *,
  gram_matrix,
  task_losses,
  task_present,
  key,
  extra_args,
):
  """``optax.chain`` through the mtl attributes: ``(out, new_states, w|None,
  stats|None)``.

  ``transforms`` passed ``_check_order``. ``gram_matrix`` is the Gram matrix of
  ``updates`` (or None); it follows the task axis through weightings
  (``G * outer(w, w)``) and is handed to the aggregator. ``w`` is the product of
  the weightings' weights and the aggregator's coefficients (None if it reports
  none); ``stats`` the aggregator's solve report (None if it has none).
  """
  k = num_tasks_of(updates)
  w = jnp.ones((k,), jnp.float32)
  out, reduced, new_states, stats = updates, False, [], None
  for t, s in zip(transforms, states):
    if reduced:
      # A plain optax transform on the aggregated gradient, as optax.chain runs it.
      out, s = optax.with_extra_args_support(t).update(
        out,
        s,
        params,
        task_losses=task_losses,
        task_present=task_present,
        key=key,
        **extra_args,
      )
    elif isinstance(t, Weighting):
      out, wt, s = _apply_weighting(
        t.weights, out, s, task_losses=task_losses, task_present=task_present, key=key
      )
      if gram_matrix is not None:
        gram_matrix = gram_matrix * wt[:, None] * wt[None, :]
      w = w * wt
    else:  # the aggregator: _check_order lets nothing else come first
      result = t.aggregate(
        out,
        s,
        params,
        gram_matrix=gram_matrix,
        task_losses=task_losses,
        task_present=task_present,
        key=key,
      )
      out, s, c = result[:3]
      stats = result[3] if len(result) > 3 else None
      w = None if c is None else w * c
      reduced = True
    new_states.append(s)
  return out, tuple(new_states), w, stats


def gram_route_refusal(
  transforms: Sequence[optax.GradientTransformation],
) -> Optional[str]:
  """Why the Gramian route cannot run ``transforms`` exactly (one sentence), or None.

  That route knows the task gradients through their Gram matrix only, so the chain's
  aggregator needs a ``coefficients`` function (``Aggregator``). ``masked`` (a Gram
  matrix of some parameters), GradNorm with a mask, and aggregators built without
  ``coefficients`` need the gradients themselves.
  """
  transforms = tuple(transforms)
  first = _check_order(transforms, "mtl transform")
  if first is None:
    return "the mtl transforms have no aggregator (the trainer appends sum_tasks)."
  if transforms[first].coefficients is None:
    return (
      f"mtl transform {first} (the aggregator) needs the per-task gradients "
      "themselves, not only their Gram matrix (mtl.masked, gradnorm with a mask, "
      "or an aggregator without coefficients)."
    )
  return None


def aggregate_gram(
  transforms: Sequence[optax.GradientTransformation],
  states,
  gram_matrix: jax.Array,
  *,
  task_losses=None,
  task_present=None,
  key=None,
):
  """``aggregate`` for task gradients known only by their Gram matrix f32[k, k].

  Runs the weightings and the aggregator's ``coefficients`` exactly as ``aggregate``
  runs them on gradients with that Gram matrix (the weightings rescale it by
  ``outer(w, w)``), and returns the coefficients of the combination instead of the
  combination: the caller takes ``sum_i weights_i g_i`` itself (the trainer: one
  backward pass of ``sum_i weights_i L_i``) and then runs ``finish_chain``.

      G f32[k, k]  ->  info['weights'] f32[k], grad_norm, grad_cos, conflict_frac

  Args:
    transforms, states: as for ``aggregate``; ``gram_route_refusal(transforms)``
      must be None.
    gram_matrix: the Gram matrix of the task gradients, f32[k, k].
    task_losses, task_present, key: as for ``aggregate``.

  Returns:
    ``(weights f32[k], new_states, info)``: ``aggregate``'s task weights, its new
    states (the plain optax transforms after the aggregator keep theirs until
    ``finish_chain``), and ``info`` with ``aggregate``'s diagnostics and solve report.
  """
  transforms, states = tuple(transforms), tuple(states)
  refusal = gram_route_refusal(transforms)
  if refusal is not None:
    raise UserError(f"The Gramian route cannot run these mtl transforms: {refusal}")
  k = gram_matrix.shape[0]
  p = presence(task_present, k)
  g = gram_matrix
  w = jnp.ones((k,), jnp.float32)
  new_states, stats = [], None
  for t, s in zip(transforms, states):
    if isinstance(t, Weighting):
      wt, s = t.weights(s, task_losses=task_losses, task_present=p, key=key)
      if wt.shape != (k,):
        raise UserError(
          f"A weighting produced weights of shape {wt.shape} for {k} tasks; set its "
          f"num_tasks to {k}."
        )
      g = g * wt[:, None] * wt[None, :]
      w = w * wt
    elif isinstance(t, Aggregator):
      c, s, *rest = t.coefficients(g, s, task_losses=task_losses, task_present=p, key=key)
      stats = rest[0] if rest else None
      w = w * c
    new_states.append(s)
  info = gram_diagnostics(gram_matrix, p)
  info["weights"] = w
  if stats is not None:
    info["solver_residual"] = jnp.asarray(stats.residual, jnp.float32)
    info["solver_iterations"] = jnp.asarray(stats.iterations, jnp.int32)
    info["solver_failed"] = jnp.asarray(stats.failed, bool)
  return w, tuple(new_states), info


def finish_chain(
  transforms: Sequence[optax.GradientTransformation],
  states,
  updates: PyTree,
  params: PyTree = None,
  *,
  task_losses=None,
  task_present=None,
  key=None,
  **extra_args,
):
  """The plain optax transforms after the aggregator, on the combined gradient.

  The Gramian route's last step (``aggregate_gram``): ``updates`` is the combination
  ``sum_i weights_i g_i``, shaped like params. Returns ``(updates, new_states)``, the
  states of the transforms up to the aggregator passed through.
  """
  transforms, states = tuple(transforms), tuple(states)
  first = _check_order(transforms, "mtl transform")
  new_states = list(states)
  for i in range(first + 1, len(transforms)):
    updates, new_states[i] = optax.with_extra_args_support(transforms[i]).update(
      updates,
      states[i],
      params,
      task_losses=task_losses,
      task_present=task_present,
      key=key,
      **extra_args,
    )
  return updates, tuple(new_states)


def _is_transform(item) -> bool:
  return hasattr(item, "init") and hasattr(item, "update")


def build(item, num_tasks: Optional[int] = None):
  """A transform as given, or built from a factory (gin's ``@mtl.pcgrad``).

  A factory whose signature has ``num_tasks`` gets it (when known), so that
  methods with per-task state need not repeat the number of tasks.
  """
  if _is_transform(item):
    return item
  if not callable(item):
    raise UserError(
      f"{item!r} is neither an optax transform nor a factory of "
      "one; name an mtl method, e.g. @mtl.pcgrad."
    )
  try:
    takes_k = "num_tasks" in inspect.signature(item).parameters
  except (TypeError, ValueError):
    takes_k = False
  if takes_k and num_tasks is not None:
    return item(num_tasks=num_tasks)
  return item()


# ------------------------------------------------------------ array helpers


def num_tasks_of(per_task_grads: PyTree) -> int:
  """The size of the leading task axis, checked equal across leaves."""
  leaves = jax.tree_util.tree_leaves(per_task_grads)
  if not leaves:
    raise UserError("Per-task gradients have no leaves; nothing to aggregate.")
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise UserError(
      "Per-task gradients must have the same leading task axis on every "
      f"leaf; got leading sizes {sorted(map(str, sizes))}."
    )
  return sizes.pop()


def presence(task_present, k: int) -> jax.Array:
  """``task_present`` as bool[k]; all True when None."""
  if task_present is None:
    return jnp.ones((k,), bool)
  p = jnp.asarray(task_present).astype(bool)
  if p.shape != (k,):
    raise UserError(f"task_present has shape {p.shape}; expected ({k},).")
  return p


def losses_of(task_losses, k: int, who: str) -> jax.Array:
  """``task_losses`` as f32[k], or a UserError naming the transform ``who``."""
  if task_losses is None:
    raise UserError(f"{who} needs task losses: pass task_losses=f32[{k}] to update().")
  losses = jnp.asarray(task_losses, jnp.float32)
  if losses.shape != (k,):
    raise UserError(f"{who}: task_losses has shape {losses.shape}; expected ({k},).")
  return losses


def step_key(key, seed: int, count: jax.Array) -> jax.Array:
  """``key`` if given, else a key folded from ``seed`` and a step counter."""
  if key is not None:
    return key
  return jax.random.fold_in(jax.random.PRNGKey(seed), count)


def scale_tasks(per_task_grads: PyTree, w: jax.Array) -> PyTree:
  """``w[:, None, ...] * g`` on every leaf; the task axis is kept."""

  def scale(g):
    return w.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype) * g

  return jax.tree_util.tree_map(scale, per_task_grads)


def gram(per_task_grads: PyTree) -> jax.Array:
  """The Gram matrix of the task gradients, f32[k, k].

  ``G_ij = sum over leaves of <g_i, g_j>``, one contraction over all non-task
  dimensions per leaf (``einsum('iab,jab->ij')`` for a 2-d leaf), accumulated in
  float32 at highest precision.
  """
  k = num_tasks_of(per_task_grads)
  total = jnp.zeros((k, k), jnp.float32)
  letters = "abcdefghmnopqrstuvwxyz"
  # On CPU, XLA runs a dot with several contracting dimensions ~2x slower than the
  # same dot on [k, n] (tools/bench.py --breakdown). On a mesh the reshape makes XLA
  # regather a leaf sharded on a trailing dimension (T5-XXL on 256 fake CPU devices:
  # 7 whole gradients per device, issue 15), so it is for one CPU device only.
  mesh = jax.sharding.get_abstract_mesh()
  flatten = jax.default_backend() == "cpu" and (mesh.empty or mesh.size == 1)
  for g in jax.tree_util.tree_leaves(per_task_grads):
    if flatten and g.ndim > 2:
      g = g.reshape(k, -1)
    dims = letters[: g.ndim - 1]
    total = total + jnp.einsum(
      f"i{dims},j{dims}->ij",
      g,
      g,
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
    )
  return total


def mask_gram(g: jax.Array, present: jax.Array) -> jax.Array:
  """A Gram matrix with the rows and columns of absent tasks set to zero."""
  return jnp.where(present[:, None] & present[None, :], g, 0.0)


def combine(per_task_grads: PyTree, c: jax.Array) -> PyTree:
  """``sum_i c_i g_i``: f32[k] coefficients -> a tree shaped like params."""

  def comb(g):
    out = jnp.tensordot(
      c.astype(jnp.float32), g, axes=1, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(g.dtype)

  return jax.tree_util.tree_map(comb, per_task_grads)


def diagnostics(
  per_task_grads: PyTree, task_present=None, *, gram_matrix: Optional[jax.Array] = None
) -> dict[str, jax.Array]:
  """Per-task gradient statistics for logging.

  Args:
    per_task_grads: tree with a leading task axis k.
    task_present: bool[k] or None (all present).
    gram_matrix: an already computed ``gram(per_task_grads)`` to reuse.

  Returns:
    ``grad_norm`` f32[k] (0 for absent tasks); ``grad_cos`` f32[k, k], the
    pairwise cosines (0 where either task is absent or has a zero gradient, 1 on
    the diagonal of present non-zero tasks); ``conflict_frac`` f32[], the
    fraction of pairs i < j of present tasks whose cosine is negative (0 when
    fewer than two tasks are present).
  """
  k = num_tasks_of(per_task_grads)
  return gram_diagnostics(
    gram(per_task_grads) if gram_matrix is None else gram_matrix,
    presence(task_present, k),
  )


def gram_diagnostics(gram_matrix: jax.Array, task_present=None) -> dict[str, jax.Array]:
  """``diagnostics`` from the Gram matrix f32[k, k] of the task gradients alone."""
  k = gram_matrix.shape[0]
  p = presence(task_present, k)
  g = mask_gram(gram_matrix, p)
  norm = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
  denom = norm[:, None] * norm[None, :]
  cos = jnp.where(denom > 0, g / jnp.where(denom > 0, denom, 1.0), 0.0)
  upper = jnp.triu(jnp.ones((k, k), bool), 1) & p[:, None] & p[None, :]
  pairs = jnp.sum(upper)
  conflicts = jnp.sum(upper & (cos < 0))
  frac = jnp.where(pairs > 0, conflicts / jnp.maximum(pairs, 1), 0.0)
  return {"grad_norm": norm, "grad_cos": cos, "conflict_frac": frac.astype(jnp.float32)}


# ------------------------------------------------------------------ masking


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_mask(mask: Mask, tree: PyTree) -> PyTree:
  """Resolves ``mask`` against ``tree``: a tree of Python bools, one per leaf."""
  if mask is None:
    return jax.tree_util.tree_map(lambda _: True, tree)
  if isinstance(mask, str):
    pattern = re.compile(mask)
    return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(pattern.search(_path_str(path))), tree
    )
  if callable(mask):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(mask(_path_str(path))), tree
    )
  try:
    return jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), mask, tree
    )
  except (ValueError, TypeError) as e:
    raise UserError(
      "A parameter mask must be None, a regex string, a callable on the "
      "'/'-joined parameter path, or a pytree of bools shaped like params "
      f"(or a prefix of it); it did not match the parameters: {e}"
    ) from e


def _select(tree: PyTree, m: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
    lambda x, keep: x if keep else optax.MaskedNode(), tree, m
  )


def masked(inner, mask: Mask, num_tasks: Optional[int] = None) -> Aggregator:
  """Limits an aggregating transform to some parameters, along the task axis.

  Like ``optax.masked``, but for per-task gradients: leaves selected by ``mask``
  go through ``inner`` together (so a Gram matrix, a projection or a norm inside
  ``inner`` sees those leaves only), and every other leaf is **summed over
  tasks** (what ``sum_tasks()`` does). The PCGrad paper applies surgery to shared
  parameters only; ``masked(pcgrad(), 'encoder/')`` does that. ``inner`` must
  reduce the task axis: an aggregator, or a list in the order the trainer takes
  (weightings, one aggregator, plain optax transforms), chained; it gets the
  extra args ``task_losses``, ``task_present``, ``key``.

  Shapes: per-task f32[k, ...] -> f32[...].

      per_task {'enc': f32[k, d1], 'head': f32[k, d2]}, mask {'enc': True, 'head': False}
      out      {'enc': inner({'enc': ...})['enc'] f32[d1], 'head': sum_t head[t] f32[d2]}

  Its task weights (``aggregate``'s ``info['weights']``) and solve report are the
  inner method's, on the selected leaves.

  Args:
    inner: the transform applied to the selected leaves, a factory of one
      (gin's ``@mtl.pcgrad`` without parentheses: built here with
      ``num_tasks``), or a list of those, chained.
    mask: see ``Mask``: None, a regex on the '/'-joined parameter path, a
      callable on that path, or a pytree of bools (or a prefix of one).
    num_tasks: k, given to inner factories that take it (the trainer sets it).

  Returns:
    An aggregator; its state is ``inner``'s state on the selected parameters
    (a tuple of states when ``inner`` is a list).
  """
  # A transform is a NamedTuple, hence a tuple: tell it from a list of them.
  single = _is_transform(inner) or not isinstance(inner, (list, tuple))
  inner_list = tuple(build(t, num_tasks) for t in ((inner,) if single else inner))
  if not inner_list:
    raise UserError(
      "masked() got an empty list of inner transforms; give it "
      "an aggregator such as mtl.pcgrad()."
    )
  if _check_order(inner_list, "masked(): inner transform") is None:
    raise UserError(
      "masked() got inner transforms without an aggregator, so "
      "the selected parameters would keep the task axis; end the "
      "weightings with an aggregator such as mtl.pcgrad()."
    )

  def init_fn(params):
    m = leaf_mask(mask, params)
    leaves = jax.tree_util.tree_leaves(params)
    if leaves and not any(jax.tree_util.tree_leaves(m)):
      paths = [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
      ]
      raise UserError(
        f"mtl.masked's mask {mask!r} matches no parameter, so its method would act "
        f"on nothing; match a path such as {', '.join(paths[:3])} (regexes on the "
        "'/'-joined parameter path)."
      )
    sub = _select(params, m)
    states = tuple(t.init(sub) for t in inner_list)
    return states[0] if single else states

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
    m = leaf_mask(mask, updates)
    keep = jax.tree_util.tree_leaves(m)
    # The caller's Gram matrix covers every leaf; it is this one only if all are kept.
    sub_gram = gram_matrix if all(keep) else None
    sub_params = None if params is None else _select(params, m)
    states = (state,) if single else state
    inner_out, new_states, c, stats = _run_chain(
      inner_list,
      states,
      _select(updates, m),
      sub_params,
      gram_matrix=sub_gram,
      task_losses=task_losses,
      task_present=task_present,
      key=key,
      extra_args={},
    )
    flat, treedef = jax.tree_util.tree_flatten(updates)
    inner_leaves = iter(jax.tree_util.tree_leaves(inner_out))
    out = []
    for g, kept in zip(flat, keep):
      if kept:
        r = next(inner_leaves)
        if r.shape != g.shape[1:]:  # a user's Aggregator that does not reduce
          raise UserError(
            f"masked(): the inner transform returned a leaf of shape {r.shape} "
            f"for per-task gradients of shape {g.shape}; the inner transform "
            "must be an aggregator (reduce the task axis)."
          )
        out.append(r)
      else:
        # sum over tasks as a contraction: XLA's CPU reduce over the leading axis of a
        # large array is ~20x slower than this (tools/bench.py, T5-small stack).
        out.append(combine(g, jnp.ones((g.shape[0],), jnp.float32)))
    result = (treedef.unflatten(out), new_states[0] if single else new_states, c)
    return result if stats is None else result + (stats,)

  return Aggregator(init_fn, aggregate_fn)


# ---------------------------------------------------- gram-based aggregators


def gram_aggregator(
  init_fn: Callable[[PyTree], NamedTuple],
  solve: Callable[..., tuple[jax.Array, NamedTuple]],
) -> Aggregator:
  """An aggregator ``sum_i c_i g_i`` with ``c`` solved from the Gram matrix.

  Shapes: per-task f32[k, ...] -> f32[...]; G f32[k, k] -> c f32[k].

  Args:
    init_fn: ``params -> state``.
    solve: ``(G f32[k,k], present bool[k], state, *, key, task_losses) ->
      (c f32[k], new_state)`` or ``(c, new_state, stats)``, ``stats`` the
      ``qp.SolverStats`` of the solve (reported through ``aggregate``); ``G`` has
      zero rows/columns for absent tasks.

  Returns:
    The aggregator transform (it reuses a Gram matrix passed by ``aggregate``).
  """

  def coefficients_fn(
    gram_matrix, state, *, task_losses=None, task_present=None, key=None
  ):
    p = presence(task_present, gram_matrix.shape[0])
    c, new_state, *stats = solve(
      mask_gram(gram_matrix, p), p, state, key=key, task_losses=task_losses
    )
    return (jnp.where(p, c, 0.0), new_state, *stats)

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
    del params
    g = gram(updates) if gram_matrix is None else gram_matrix
    c, new_state, *stats = coefficients_fn(
      g, state, task_losses=task_losses, task_present=task_present, key=key
    )
    return (combine(updates, c), new_state, c, *stats)

  return Aggregator(init_fn, aggregate_fn, coefficients=coefficients_fn)


class EmptyState(NamedTuple):
  """State of a stateless transform."""


def init_empty(params) -> EmptyState:
  del params
  return EmptyState()


# ------------------------------------------------------ the plain reductions


def _fixed_weights(fn):
  """A gradient-free weights function for an aggregator without state."""

  def weights_fn(state, *, task_losses=None, task_present=None, key=None):
    del key
    if task_present is not None:
      k = jnp.shape(task_present)[0]
    elif task_losses is not None:
      k = jnp.shape(task_losses)[0]
    else:
      raise UserError("Pass task_losses (or task_present) to compute weights.")
    return fn(presence(task_present, k)), state

  return weights_fn


def _fixed_aggregator(weights) -> Aggregator:
  """A stateless aggregator ``sum_t c_t g_t`` with ``c = weights(present)``."""

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
    del params, gram_matrix, task_losses, key
    c = weights(presence(task_present, num_tasks_of(updates)))
    return combine(updates, c), state, c

  def coefficients_fn(
    gram_matrix, state, *, task_losses=None, task_present=None, key=None
  ):
    del task_losses, key
    return weights(presence(task_present, gram_matrix.shape[0])), state

  return Aggregator(
    init_empty, aggregate_fn, _fixed_weights(weights), coefficients=coefficients_fn
  )


def sum_tasks() -> Aggregator:
  """Sums the task axis away: ``sum_t g_t`` over present tasks.

  The gradient of the summed loss ``sum_t L_t``; what the trainer appends after
  a list of weightings. Stateless.

  Shapes: per-task f32[k, ...] -> f32[...]; c f32[k].
  """

  def weights(p):
    return p.astype(jnp.float32)

  return _fixed_aggregator(weights)


def mean_tasks() -> Aggregator:
  """Averages over present tasks: ``(1/|P|) sum_{t in P} g_t``.

  Stateless. Zero when no task is present.

  Shapes: per-task f32[k, ...] -> f32[...]; c f32[k].
  """

  def weights(p):
    p = p.astype(jnp.float32)
    return p / jnp.maximum(jnp.sum(p), 1.0)

  return _fixed_aggregator(weights)
