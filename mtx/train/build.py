"""The train step and everything around it, built once for ``mtx train`` and ``mtx compile``.

``build_train_step`` turns a run's settings into the jitted step, its abstract state and
shardings, and the batch layout, reading no data and allocating no array, so that the
trainer (``mtx.train.loop``) and the ahead-of-time compiler (``mtx.train.compile``)
compile exactly the same program.
"""

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax

from mtx import mtl, parallel
from mtx.data import chat_template, decoder_only, packing, registry
from mtx.data import pipeline as data_pipeline
from mtx.errors import UserError, close_names
from mtx.model import LlamaConfig, T5Config
from mtx.runtime import params as params_lib
from mtx.train import adapters, freeze
from mtx.train import settings as settings_lib
from mtx.train import state as state_lib
from mtx.train import step as step_lib

log = logging.getLogger("mtx")


def default_units(
  num_groups: int,
  batch_size: int,
  dp: int,
  shards: int,
  accum: int = 1,
  rows_over: int = 1,
) -> int:
  """Smallest multiple of ``dp`` (the devices the units are split over: the data axis),
  of the data shards and of the gradient accumulation microbatches (``accum``) that is
  at least the number of groups and divides the batch.

  Among those, first choice: rows per unit that divide evenly over ``rows_over`` (the
  fsdp devices a unit's rows are split over; otherwise XLA pads them, which costs
  FLOPs) and room for every group in every shard (units >= groups x shards, so that
  each shard's scheduler can give every group a unit); then even rows alone; then the
  smallest.

      >>> default_units(7, 512, 16, 1, rows_over=16)   # T5-XXL on data=16 x fsdp=16
      16
  """
  step = math.lcm(dp, shards, accum)
  fits = [
    units
    for units in range(step, batch_size + 1, step)
    if units >= num_groups and batch_size % units == 0
  ]
  if not fits:
    raise UserError(
      f"No number of units divides BATCH_SIZE {batch_size} into at least {num_groups} "
      f"task groups and is a multiple of the {dp} data-parallel devices; raise "
      "BATCH_SIZE, set UNITS, or group tasks (train.task_groups)."
    )
  even = [u for u in fits if (batch_size // u) % rows_over == 0]
  roomy = [u for u in even if u >= num_groups * shards]
  return (roomy or even or fits)[0]


# 'auto' takes the Gramian route when the stacks would hold more than this fraction of a
# device's memory, or, where that is unknown (CPU), more than this many groups.
AUTO_GRAMIAN_MEMORY_FRACTION = 0.25
AUTO_GRAMIAN_GROUPS = 16


def gramian_refusal(settings: settings_lib.StepSettings, transforms) -> Optional[str]:
  """Why the Gramian route cannot run these settings (one sentence), or None."""
  if settings.grad_accum_steps != 1:
    return (
      "train.grad_accum_steps > 1 (a Gram matrix of gradients summed over "
      "microbatches needs the gradients themselves)."
    )
  if settings.tag_affinity_period:
    return "TAG affinity (train.tag_affinity_period) needs the per-group gradients."
  return mtl.gram_route_refusal(transforms)


def choose_task_grads_route(
  settings: settings_lib.StepSettings,
  transforms,
  num_groups: int,
  stack_bytes: int,
  device_memory: Optional[int],
  padding: float = 1.0,
) -> str:
  """'stacks' or 'gramian' for a per-group run (``train.task_grads_route``).

  'auto' is 'gramian' when that route applies (``gramian_refusal``) and either the
  stacks route's units would be padded (``padding`` > 1, ``unit_padding``: fewer rows
  per unit than fsdp devices, as on a pure FSDP mesh; the Gramian route runs whole
  units per device, ``parallel.SPREAD_UNIT_AXES``), or the stacks (``stack_bytes``
  per device: groups x params / data) exceed ``AUTO_GRAMIAN_MEMORY_FRACTION`` of
  ``device_memory``, or, with no known device memory, there are more than
  ``AUTO_GRAMIAN_GROUPS`` groups; else 'stacks', which is faster while it fits (one
  backward pass instead of two).

      >>> choose_task_grads_route(settings, (mtl.pcgrad(),), 32, 40 * 2**30, 95 * 2**30)
      'gramian'

  Raises:
    UserError: 'gramian' asked for where it does not apply.
  """
  requested = settings.task_grads_route
  refusal = gramian_refusal(settings, transforms)
  if requested == "gramian" and refusal is not None:
    raise UserError(
      f"train.task_grads_route is 'gramian' but the run has {refusal[0].lower()}"
      f"{refusal[1:-1]}; set train.task_grads_route to 'auto' or 'stacks'."
    )
  if requested != "auto":
    return requested
  if refusal is not None:
    return "stacks"
  if padding > 1:
    return "gramian"
  if device_memory:
    big = stack_bytes > AUTO_GRAMIAN_MEMORY_FRACTION * device_memory
  else:
    big = num_groups > AUTO_GRAMIAN_GROUPS
  return "gramian" if big else "stacks"


def device_memory_bytes(mesh) -> Optional[int]:
  """Memory of one of the mesh's devices, as the device reports it (None on CPU)."""
  try:
    stats = mesh.devices.flat[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without memory_stats
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def stack_bytes_per_device(
  params_abstract,
  param_shardings,
  num_groups: int,
  trainable_params: Optional[str] = None,
) -> int:
  """Bytes per device of the per-group stacks f32[G, *param] of the trainable params
  (all, or those ``trainable_params`` matches), laid out as
  ``parallel.group_stack_sharding`` lays them out (like params, split over data too)."""
  total = 0
  for leaf, sharding in zip(
    jax.tree.leaves(freeze.trainable(params_abstract, trainable_params)),
    jax.tree.leaves(freeze.trainable(param_shardings, trainable_params)),
  ):
    stack = parallel.group_stack_sharding(sharding)
    shape = stack.shard_shape((num_groups,) + tuple(leaf.shape))
    total += int(np.prod(shape, dtype=np.int64)) * 4
  return total


def build_transforms(items: Sequence, num_tasks: int) -> tuple:
  """Transforms as given, or built from factories (gin's ``@mtl.pcgrad``) with k tasks.

  A gin file names a factory without calling it, so that methods with per-task state
  get ``num_tasks`` (the number of task groups) from the mixture, not from the user.
  """
  return tuple(mtl.build(item, num_tasks) for item in items)


def batch_axes(
  layout: data_pipeline.Layout, unit_axes: Sequence[str] = parallel.UNIT_AXES
) -> tuple:
  """The mesh axes the batch's leading axis is split over: rows over the data axes,
  task-major units over ``unit_axes`` (``StepConfig.unit_axes``: data, their rows then
  split over fsdp in the step, or every batch axis on the Gramian route)."""
  return _axes(layout.task_major, unit_axes)


def _axes(task_major: bool, unit_axes: Sequence[str] = parallel.UNIT_AXES) -> tuple:
  return tuple(unit_axes) if task_major else parallel.BATCH_AXES


def batch_shardings(
  layout: data_pipeline.Layout,
  mesh,
  features: Sequence[str] = packing.FEATURES,
  unit_axes: Sequence[str] = parallel.UNIT_AXES,
) -> dict:
  """NamedShardings of the batch ``features``: rows (or units) over ``batch_axes``."""
  ndim = 3 if layout.task_major else 2
  axes = batch_axes(layout, unit_axes)
  out = {k: parallel.batch_sharding(mesh, ndim, axes) for k in features}
  if layout.task_major:
    out["unit_task"] = parallel.batch_sharding(mesh, 1, axes)
  return out


def batch_converter(
  model_config, vocabulary, options: decoder_only.PrefixLM = decoder_only.PrefixLM()
) -> Optional[Callable[[dict], dict]]:
  """What turns the pipeline's packed rows into the model's batch: None for T5 (they
  are its batch); for a decoder-only model, ``decoder_only.convert`` to prefix-LM rows
  by ``options`` (``DataSettings.prefix_lm``), each example starting with
  ``options.start_id`` or else the vocabulary's BOS (0 when it has none, as in T5X)."""
  if not isinstance(model_config, LlamaConfig):
    return None
  options = options.for_vocabulary(vocabulary)
  return lambda batch: decoder_only.convert(batch, options)


def example_fn(
  model_config, vocabulary, options: decoder_only.PrefixLM, lengths: Mapping[str, int]
) -> Optional[Callable]:
  """``(inputs, targets) -> (inputs, targets)`` of each tokenized example before packing:
  a decoder-only model's chat template when ``options.chat_template`` is on
  (``mtx.data.chat_template``, fitted to ``lengths``); else None (the examples as read)."""
  if not (isinstance(model_config, LlamaConfig) and options.chat_template):
    return None
  template = chat_template.TokenTemplate.for_vocabulary(vocabulary)
  return functools.partial(template.example, lengths=dict(lengths))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepBuild:
  """The train step and everything around it, as ``mtx train`` builds it (no arrays).

  Attributes:
    data, settings: the run's ``DataSettings`` and ``StepSettings``.
    mesh, spec, layout: the device mesh, the resolved mixture, the global batch layout.
    transforms: the mtl transforms (aggregator ensured); task_grads: per-task route.
    model_config, model, schedule, optimizer, mtl_init: the model and its optimizer.
    params_abstract, param_shardings: parameter ShapeDtypeStructs and NamedShardings.
    abstract_state, state_shardings: the whole train state, abstract, and its shardings.
    step_config: the step's static settings; rules: the logical axis rules.
    jit_step: ``jax.jit(step, in/out shardings, donated state)``.
    batch_shardings: NamedShardings of the batch features.
    num_shards: the data shards the global batch is read in.
  """

  data: settings_lib.DataSettings
  settings: settings_lib.StepSettings
  mesh: Any
  spec: registry.MixtureSpec
  layout: data_pipeline.Layout
  transforms: tuple
  task_grads: bool
  model_config: T5Config | LlamaConfig
  model: Any  # mtx.model.T5 or Llama
  schedule: Callable
  optimizer: optax.GradientTransformation
  mtl_init: Callable
  params_abstract: Any
  param_shardings: Any
  abstract_state: Any
  state_shardings: Any
  step_config: step_lib.StepConfig
  rules: tuple
  jit_step: Callable
  batch_shardings: dict
  num_shards: int

  @property
  def batch_axes(self) -> tuple:
    """The mesh axes the batch's leading axis is split over (``batch_axes``)."""
    return batch_axes(self.layout, self.step_config.unit_axes)

  def batch_block(self) -> tuple:
    """(block, blocks) of the batch this process builds (``parallel.batch_block``)."""
    return parallel.batch_block(self.mesh, axes=self.batch_axes)

  def batch_converter(self) -> Optional[Callable[[dict], dict]]:
    """The packed rows -> model batch conversion (module ``batch_converter``)."""
    return batch_converter(self.model_config, self.spec.vocabulary, self.data.prefix_lm)

  def example_fn(self) -> Optional[Callable]:
    """What the pipeline applies to each example (module ``example_fn``)."""
    return example_fn(
      self.model_config, self.spec.vocabulary, self.data.prefix_lm, self.lengths
    )

  @property
  def lengths(self) -> dict:
    """``{"inputs": N, "targets": M}`` of the batch layout."""
    return {"inputs": self.layout.inputs_length, "targets": self.layout.targets_length}

  def make_state(self, params) -> dict:
    """The full train state around ``params`` (jit it with ``state_shardings``)."""
    return state_lib.make_state(
      params,
      self.optimizer,
      self.mtl_init,
      self.settings.seed,
      self.settings.trainable_params,
    )

  @property
  def trainable_abstract(self) -> Any:
    """The trainable params' ShapeDtypeStructs (all params without
    ``train.trainable_params``; ``mtx.train.freeze``)."""
    return freeze.trainable(self.params_abstract, self.settings.trainable_params)

  @property
  def trainable_shardings(self) -> Any:
    """The trainable params' shardings (per-task stacks are laid out like them)."""
    return freeze.trainable(self.param_shardings, self.settings.trainable_params)

  def init_params(self) -> Any:
    """Fresh params (``settings.seed``), initialised directly into their shardings."""
    settings = self.settings
    return params_lib.init_params(
      self.model,
      settings.seed,
      self.layout.inputs_length,
      self.layout.targets_length,
      self.param_shardings,
      cast=lambda p: freeze.cast_frozen(
        p, settings.trainable_params, settings.frozen_dtype
      ),
    )

  def init_state(self, params: Any = None) -> dict:
    """The sharded train state around ``params`` (None: ``init_params()``); call it
    under ``with self.mesh``."""
    params = self.init_params() if params is None else params
    return jax.jit(self.make_state, out_shardings=self.state_shardings)(params)

  def sharded_state(self) -> Any:
    """The abstract state with its shardings: what restore and lower take."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_shardings,
    )

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of one global batch ([U, R, L] task-major, or [B, L])."""
    lay = self.layout
    lead = (lay.units, lay.rows_per_unit) if lay.task_major else (lay.batch_size,)
    out = {}
    # A decoder-only batch (mtx.data.decoder_only) has rows of inputs + targets.
    decoder_only_batch = "encoder_input_tokens" not in self.batch_shardings
    for name in self.batch_shardings:
      if name == "unit_task":
        continue
      if decoder_only_batch:
        length = lay.inputs_length + lay.targets_length
      else:
        length = lay.inputs_length if name.startswith("encoder") else lay.targets_length
      out[name] = jax.ShapeDtypeStruct(
        lead + (length,), np.int32, sharding=self.batch_shardings[name]
      )
    if lay.task_major:
      out["unit_task"] = jax.ShapeDtypeStruct(
        (lay.units,), np.int32, sharding=self.batch_shardings["unit_task"]
      )
    return out


def batch_layout(
  data: settings_lib.DataSettings,
  grad_accum_steps: int,
  num_groups: int,
  task_grads: bool,
  mesh,
  num_shards: int,
  unit_axes: Sequence[str] = parallel.UNIT_AXES,
) -> data_pipeline.Layout:
  """The global batch layout: flat [B, L], or task-major [U, B/U, L] for the per-group
  route, units over ``unit_axes`` (default UNITS: ``default_units``). Raises UserError
  when the batch, units, accumulation and mesh do not fit together."""
  dp = parallel.data_parallel_size(mesh)
  unit_dp = math.prod(mesh.shape[a] for a in unit_axes)
  batch_size, units = data.batch_size, data.units
  lengths = data_pipeline.check_feature_lengths(data.task_feature_lengths)
  if batch_size % dp:
    raise UserError(
      f"BATCH_SIZE {batch_size} is not divisible by the mesh's data axes "
      f"(data x fsdp = {dp}); use a multiple of {dp}."
    )
  if task_grads and units is None:
    units = default_units(
      num_groups,
      batch_size,
      unit_dp,
      num_shards,
      grad_accum_steps,
      rows_over=dp // unit_dp,
    )
  num_units = units if task_grads else 0
  if task_grads and units < num_groups:
    raise UserError(
      f"UNITS {units} is below the {num_groups} task groups of a per-task method: "
      "a step would never hold every group, so the method could not compare their "
      f"gradients; set UNITS to at least {num_groups} (or leave it None, automatic), "
      "or group tasks (train.task_groups)."
    )
  if task_grads and (num_units % unit_dp or num_units % grad_accum_steps):
    raise UserError(
      f"UNITS {num_units} must be a multiple of the mesh's {' x '.join(unit_axes)} "
      f"axes ({unit_dp}; units are split over them) and of train.grad_accum_steps "
      f"{grad_accum_steps} (each microbatch holds UNITS / grad_accum_steps units); set "
      f"UNITS to a multiple of {math.lcm(unit_dp, grad_accum_steps)} (or leave it None, "
      "automatic), or change train.grad_accum_steps."
    )
  if not task_grads and (batch_size // dp) % grad_accum_steps:
    raise UserError(
      f"Rows per device {batch_size // dp} are not divisible by "
      f"grad_accum_steps {grad_accum_steps}."
    )
  layout = data_pipeline.Layout(
    batch_size, num_units, lengths["inputs"], lengths["targets"]
  )
  data_pipeline.check_layout(layout, num_shards)
  return layout


def unit_padding(layout: data_pipeline.Layout, mesh) -> float:
  """How many times over XLA pads the stacks route's units: their rows are split over
  the batch axes the units do not take (fsdp), and a unit with fewer rows than that,
  or rows that do not divide, is padded. 1.0 when even (or flat)."""
  if not layout.task_major:
    return 1.0
  unit_dp = math.prod(mesh.shape[a] for a in parallel.UNIT_AXES)
  rows_over = parallel.data_parallel_size(mesh) // unit_dp
  rows = layout.rows_per_unit
  return math.ceil(rows / rows_over) * rows_over / rows


def _units_for_route(data, settings, spec, task_grads, mesh, num_shards, plan) -> tuple:
  """(layout, unit axes, data shards) for the route: the Gramian route spreads its
  units over every batch axis (``parallel.SPREAD_UNIT_AXES``), so its default UNITS
  and shards are recounted (unless a set UNITS does not divide over them); the stacks
  route keeps the units over data, warned when they are padded. ``plan`` is (route,
  the stacks layout, the shards asked for)."""
  route, layout, shards_asked = plan
  if route != "gramian":
    padding = unit_padding(layout, mesh)
    if task_grads and padding > 1:
      log.warning(
        "Each of the %d units has %d rows for the %d fsdp devices that share it, so XLA "
        "pads them (%.1fx the FLOPs and activations of the plain step); give the mesh a "
        "data axis of at least the number of task groups (%d), raise BATCH_SIZE, or "
        "take the Gramian route (train.task_grads_route), which runs whole units per "
        "device.",
        layout.units,
        layout.rows_per_unit,
        mesh.shape["fsdp"],
        padding,
        spec.num_groups,
      )
    num_shards = shards_asked or parallel.batch_block(mesh, axes=_axes(task_grads))[1]
    return layout, parallel.UNIT_AXES, num_shards
  unit_axes = parallel.SPREAD_UNIT_AXES
  if data.units is not None and data.units % parallel.data_parallel_size(mesh):
    # The user's UNITS cannot give every device whole units: keep them over data (the
    # taps follow the unit axes, so the route is the same, padded like the stacks).
    log.info(
      "UNITS %d is not a multiple of the %d data x fsdp devices, so the Gramian route "
      "keeps its units over data (leave UNITS None to spread them).",
      data.units,
      parallel.data_parallel_size(mesh),
    )
    num_shards = shards_asked or parallel.batch_block(mesh, axes=_axes(task_grads))[1]
    return layout, parallel.UNIT_AXES, num_shards
  num_shards = shards_asked or parallel.batch_block(mesh, axes=unit_axes)[1]
  layout = batch_layout(
    data,
    settings.grad_accum_steps,
    spec.num_groups,
    task_grads,
    mesh,
    num_shards,
    unit_axes,
  )
  return layout, unit_axes, num_shards


def model_features(model_config) -> tuple:
  """The batch features the model's step takes: a decoder-only model's prefix-LM rows
  (``mtx.data.decoder_only``) or an encoder-decoder's (``mtx.data.packing``)."""
  if isinstance(model_config, LlamaConfig):
    return decoder_only.FEATURES
  return packing.FEATURES


def build_train_step(
  data: settings_lib.DataSettings,
  settings: settings_lib.StepSettings,
  *,
  num_shards: Optional[int] = None,
  mesh: Optional[jax.sharding.Mesh] = None,
  devices: Optional[Sequence[jax.Device]] = None,
  group_gradients_fn: Callable = step_lib.group_gradients,
  device_memory: Optional[int] = None,
) -> StepBuild:
  """Builds the jitted train step and its abstract state, reading no data.

  Args:
    data: which mixture, its lengths, the batch size, units and task groups.
    settings: the model, optimizer, loss, mtl transforms, mesh and rules.
    num_shards: the number of data shards, which default UNITS must be a multiple of;
      None: one per block of processes holding distinct batch rows (``batch_block``).
    mesh: the mesh to build on; None makes one from ``settings.mesh_shape``,
      ``settings.dcn_mesh_shape`` and ``devices``.
    devices: the devices of that mesh (default all).
    group_gradients_fn: the per-group route's gradients (``step.make_train_step``);
      benchmarks pass another to compare routes.
    device_memory: bytes of one target device, for ``train.task_grads_route`` 'auto';
      None: as the mesh's devices report it (``mtx compile``: COMPILE_DEVICE_MEMORY_GIB).

  Raises:
    UserError: settings that do not fit together (batch vs mesh, units, accumulation).
  """
  # long: the build's steps in order (mesh, mixture, layout, model, state, route and
  # units, step, jit); each is one call, and splitting them would pass them all along.
  if mesh is None:
    mesh = parallel.make_mesh(settings.mesh_shape, devices, settings.dcn_mesh_shape)
  spec = registry.resolve(data.mixture_or_task_name, data.task_groups)
  transforms = mtl.ensure_aggregator(
    build_transforms(settings.mtl_transforms, spec.num_groups)
  )
  # TAG's lookahead needs per-group gradients, so it takes the per-group route.
  task_grads = mtl.needs_task_grads(transforms) or settings.tag_affinity_period > 0
  # Default: one shard per block of processes holding distinct batch rows (of the
  # stacks route's units first; the Gramian route's are recounted below).
  shards_asked = num_shards
  num_shards = num_shards or parallel.batch_block(mesh, axes=_axes(task_grads))[1]
  layout = batch_layout(
    data, settings.grad_accum_steps, spec.num_groups, task_grads, mesh, num_shards
  )
  model_config, settings = run_model_config(settings, spec)
  model, schedule = params_lib.make_model(model_config), settings.schedule
  optimizer = settings.optimizer_fn(learning_rate=schedule)
  # Before tracing the model: a bad debug setting fails at once.
  cfg = step_config(settings, spec, task_grads, model_config)
  rules = tuple(settings.logical_axis_rules)
  params_abstract, p_shardings, abstract_state, s_shardings, stacks = _abstract_state(
    model, layout, optimizer, (transforms, spec), settings, mesh
  )
  route = None
  if task_grads:
    memory = device_memory or device_memory_bytes(mesh)
    padding = unit_padding(layout, mesh)
    route = choose_task_grads_route(
      settings, transforms, spec.num_groups, stacks, memory, padding
    )
  layout, unit_axes, num_shards = _units_for_route(
    data, settings, spec, task_grads, mesh, num_shards, (route, layout, shards_asked)
  )
  if task_grads:
    cfg = dataclasses.replace(cfg, task_grads_route=route, unit_axes=unit_axes)
  step_fn = step_lib.make_train_step(
    model,
    optimizer,
    transforms,
    cfg,
    p_shardings,
    learning_rate_fn=schedule,
    group_gradients_fn=group_gradients_fn,
  )
  b_shardings = batch_shardings(layout, mesh, model_features(model_config), cfg.unit_axes)
  jit_step = jit_step_fn(step_fn, mesh, rules, s_shardings, b_shardings)
  return StepBuild(
    data=data,
    settings=settings,
    mesh=mesh,
    spec=spec,
    layout=layout,
    transforms=transforms,
    task_grads=task_grads,
    model_config=model_config,
    model=model,
    schedule=schedule,
    optimizer=optimizer,
    mtl_init=optax.chain(*transforms).init,
    params_abstract=params_abstract,
    param_shardings=p_shardings,
    abstract_state=abstract_state,
    state_shardings=s_shardings,
    step_config=cfg,
    rules=rules,
    jit_step=jit_step,
    batch_shardings=b_shardings,
    num_shards=num_shards,
  )


def jit_step_fn(step_fn: Callable, mesh, rules, state_shardings, b_shardings) -> Callable:
  """``jax.jit`` of the step with explicit shardings and the state donated, traced
  under the mesh and logical rules (``parallel.traced_in_mesh``), so that the model's
  activation constraints hold whatever context the caller runs it in."""
  return jax.jit(
    parallel.traced_in_mesh(step_fn, mesh, rules),
    in_shardings=(state_shardings, b_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )


def check_task_counts(transforms: Sequence, mtl_state: Sequence, spec) -> None:
  """Traces each weighting's ``weights`` on the run's k task groups (shapes only), so
  that one built for another k (``static_weights`` with the wrong count) fails now,
  naming the groups in id order, instead of in the first step."""
  k = spec.num_groups
  extra = {
    "task_losses": jax.ShapeDtypeStruct((k,), np.float32),
    "task_present": jax.ShapeDtypeStruct((k,), np.bool_),
    "key": jax.eval_shape(jax.random.key, 0),  # the step's typed key
  }
  for transform, state in zip(transforms, mtl_state):
    if mtl.kind(transform) != mtl.WEIGHTING:
      continue
    try:
      jax.eval_shape(lambda s, x, t=transform: t.weights(s, **x), state, extra)
    except UserError as e:
      raise UserError(
        f"A weighting in train.mtl_transforms does not fit the run's {k} task "
        f"group(s) ({' '.join(str(e).split())}); give one weight per group, in id "
        f"order: {', '.join(spec.group_names)}."
      ) from e


def _abstract_state(
  model, layout, optimizer, mtl_and_spec, settings: settings_lib.StepSettings, mesh
) -> tuple:
  """(params ShapeDtypeStructs, their shardings, the abstract train state, its
  shardings, the bytes per device of per-group gradient stacks of the trainable params,
  ``stack_bytes_per_device``), traced without allocating anything. ``mtl_and_spec`` is
  (the mtl transforms, the MixtureSpec); their task counts are checked here
  (``check_task_counts``), and ``train.trainable_params`` against the params
  (``freeze.check``)."""
  transforms, spec = mtl_and_spec
  mtl_init = optax.chain(*transforms).init
  boxed, params_abstract = params_lib.abstract_params(
    model, layout.inputs_length, layout.targets_length
  )
  pattern = settings.trainable_params
  freeze.check(params_abstract, pattern)
  params_abstract = freeze.cast_frozen(params_abstract, pattern, settings.frozen_dtype)
  p_shardings = params_lib.param_shardings(
    boxed, mesh, tuple(settings.logical_axis_rules)
  )
  abstract_state = jax.eval_shape(
    lambda p: state_lib.make_state(p, optimizer, mtl_init, settings.seed, pattern),
    params_abstract,
  )
  check_task_counts(transforms, abstract_state["mtl_state"], spec)
  s_shardings = state_lib.state_shardings(
    abstract_state, params_abstract, p_shardings, mesh, pattern
  )
  stacks = stack_bytes_per_device(params_abstract, p_shardings, spec.num_groups, pattern)
  return params_abstract, p_shardings, abstract_state, s_shardings, stacks


def run_model_config(settings: settings_lib.StepSettings, spec: registry.MixtureSpec):
  """(the model config the run builds, the settings it runs): vocab_size from the
  vocabulary when 0; for a LoRA model, one per-task adapter per task group and the
  adapters as the default trainable params (``mtx.train.adapters``)."""
  model_config = params_lib.resolve_model_config(
    settings.model_config, spec.vocabulary.vocab_size
  )
  model_config = adapters.attach(model_config, spec.num_groups)
  pattern = adapters.trainable_pattern(settings.trainable_params, model_config)
  return model_config, dataclasses.replace(
    settings, model_config=model_config, trainable_params=pattern
  )


def step_config(
  settings: settings_lib.StepSettings,
  spec: registry.MixtureSpec,
  task_grads: bool,
  model_config,
) -> step_lib.StepConfig:
  """The jitted step's static settings for a resolved mixture and model."""
  return step_lib.StepConfig(
    num_tasks=spec.num_tasks,
    group_of_task=spec.group_of_task,
    task_grads=task_grads,
    grad_accum_steps=settings.grad_accum_steps,
    z_loss=settings.z_loss,
    label_smoothing=settings.label_smoothing,
    dropout=model_config.dropout_rate > 0,
    rules=tuple(settings.logical_axis_rules),
    tag_affinity_period=settings.tag_affinity_period,
    tag_affinity_lr=settings.tag_affinity_lr or 0.0,
    inject_nonfinite_steps=tuple(int(s) for s in settings.debug_inject_nonfinite_steps),
    inject_nonfinite_task=_inject_task_id(
      spec, settings.debug_inject_nonfinite_steps, settings.debug_inject_nonfinite_task
    ),
    trainable_params=settings.trainable_params,
    adapter_ids=adapters.per_task(model_config),
  )


def _inject_task_id(spec, steps: Sequence[int], task: Optional[str]) -> int:
  """The task id for ``debug_inject_nonfinite_task`` (None: the first task)."""
  if not steps or task is None:
    return 0
  if task not in spec.task_names:
    raise UserError(
      f"train.debug_inject_nonfinite_task '{task}' is not a task of "
      f"'{spec.name}'{close_names(task, spec.task_names)}; name one of its tasks."
    )
  return spec.task_names.index(task)
