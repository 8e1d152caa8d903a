"""The device mesh, logical-to-mesh axis rules, and how arrays are laid out on it.

One ``jax.sharding.Mesh`` with axes ("data", "fsdp", "tensor"). Parameters and
activations carry logical axis names (see ``mtx.model``); ``DEFAULT_RULES`` maps them to
mesh axes, MaxText-style, and gin may replace them (``train.logical_axis_rules``).

    batch rows       -> ("data", "fsdp")     data parallel, FSDP shards the batch too
    param "embed"    -> "fsdp"               FSDP shards every weight's embed side
    "mlp"/"heads"/"vocab" -> "tensor"        Megatron-style tensor parallelism

The per-task route's task-major batch [units, rows_per_unit, length] is laid out
differently: units over ``UNIT_AXES`` ("data") only, the rows of a unit over the other
batch axes ("fsdp"), so that every per-unit gradient is computed FSDP-style by one data
group and held sharded like the params (``unit_stack_sharding``): per device
``units / data`` x params / (fsdp x tensor), not one whole gradient per device.

The Gramian route (``mtx.train.step.gramian_gradient``) spreads its units over the batch
axes (``SPREAD_UNIT_AXES``): each device runs whole units, as a plain FSDP step runs
whole rows, so that no unit's rows are padded over fsdp devices (pure FSDP: 512 rows
in 8 units for 256 devices), and its per-unit gradients live one layer at a time.
The unit axes in effect travel with the logical rules (``rules_within_unit``).
"""

import functools
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtx.errors import UserError

log = logging.getLogger("mtx")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
UNIT_AXES = ("data",)
SPREAD_UNIT_AXES = BATCH_AXES
# The logical name under which ``rules_within_unit`` records the unit axes.
UNITS = "units"

DEFAULT_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  # Llama's grouped-query key/value heads (fewer than "heads"), split like them.
  ("kv_heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("relpos_buckets", None),
  ("layers", None),
  # LoRA adapters' own axes (mtx.model.lora) are small: replicated. Their other axes
  # carry the adapted kernel's names, so they are sharded like the kernel.
  ("lora_rank", None),
  ("lora_adapters", None),
  ("lora_parallel", None),
)


def rules_within_unit(rules: Sequence, unit_axes: Sequence[str] = UNIT_AXES) -> tuple:
  """The rules inside ``vmap(spmd_axis_name=unit_axes)`` over units: a unit's rows
  (activation_batch) take the batch axes the unit axis does not ("fsdp"), so that the
  unit axis and the rows never claim the same mesh axis; ``UNITS`` records the unit
  axes (``unit_axes_in``).

      (("activation_batch", ("data", "fsdp")), ...)
        ->  (("activation_batch", ("fsdp",)), ..., ("units", ("data",)))
  """
  unit_axes = tuple(unit_axes)

  def within(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if a not in unit_axes)
    return kept or None

  kept = tuple(
    (name, within(axes) if name == "activation_batch" else axes)
    for name, axes in rules
    if name != UNITS
  )
  return kept + ((UNITS, unit_axes),)


def unit_axes_in(rules: Sequence) -> tuple:
  """The unit axes ``rules_within_unit`` recorded in ``rules`` (``UNIT_AXES`` if none)."""
  return tuple(dict(rules).get(UNITS) or UNIT_AXES)


def unit_stack_sharding(
  param_sharding: NamedSharding, unit_axes: Sequence[str] = UNIT_AXES
) -> NamedSharding:
  """The sharding of a per-unit stack [units, *param]: ``unit_stack_spec``'s."""
  return NamedSharding(
    param_sharding.mesh, unit_stack_spec(param_sharding.spec, unit_axes)
  )


def unit_stack_spec(param_spec: P, unit_axes: Sequence[str] = UNIT_AXES) -> P:
  """How per-unit gradients [units, *param] come out of ``vmap`` over units: the unit
  axis over ``unit_axes``, the param's dimensions over the param's axes but those
  (the units hold them, so within a unit that dimension is whole).

      P("fsdp", "tensor"), units over data         -> P(("data",), "fsdp", "tensor")
      P("fsdp", "tensor"), units over data x fsdp  -> P(("data", "fsdp"), None, "tensor")
  """
  unit_axes = tuple(unit_axes)

  def without(part):
    if not part or not set(_axes_of(part)) & set(unit_axes):
      return part
    kept = tuple(a for a in _axes_of(part) if a not in unit_axes)
    return kept or None

  return P(unit_axes, *(without(part) for part in param_spec))


def group_stack_sharding(
  param_sharding: NamedSharding, unit_axes: Sequence[str] = UNIT_AXES
) -> NamedSharding:
  """The sharding of a per-group gradient stack [G, *param]: the param's, with the
  dimension it shards over "fsdp" split over the data axis too (ZeRO-2 style).

  Params are replicated over "data", so a stack sharded like them would hold G x
  params / fsdp per device; this holds G x params / (fsdp x data), and summing the
  units into groups becomes a reduce-scatter over data rather than an all-reduce. The
  Gram matrix is then a sum of local dots (k x k all-reduced), and the combined
  gradient is all-gathered over data once, into the params' own sharding.
  """
  return NamedSharding(
    param_sharding.mesh, group_stack_spec(param_sharding.spec, unit_axes)
  )


def group_stack_spec(param_spec: P, unit_axes: Sequence[str] = UNIT_AXES) -> P:
  """``group_stack_sharding``'s PartitionSpec for a param's: [None, *param_spec] with
  the dimension sharded over "fsdp" split over the unit axes it does not use too."""
  spec = list(param_spec)
  used = {a for part in spec if part for a in _axes_of(part)}
  extra = tuple(a for a in unit_axes if a not in used)
  for i, part in enumerate(spec):
    if part and "fsdp" in _axes_of(part) and extra:
      spec[i] = _axes_of(part) + extra
      break
  return P(None, *spec)


def group_split_sharding(
  param_sharding: NamedSharding, unit_axes: Sequence[str] = UNIT_AXES
) -> NamedSharding:
  """A param's sharding split over data as ``group_stack_sharding``'s stacks are: what
  their combination ``sum_i c_i g_i`` is computed in, before one all-gather."""
  stack = group_stack_sharding(param_sharding, unit_axes)
  return NamedSharding(stack.mesh, P(*stack.spec[1:]))


def unit_batch_spec(ndim: int, unit_axes: Sequence[str] = UNIT_AXES) -> P:
  """Task-major features [units, rows, ...] inside the step: units over ``unit_axes``,
  rows over the other batch axes (padded by XLA when they do not divide)."""
  unit_axes = tuple(unit_axes)
  rows = tuple(a for a in BATCH_AXES if a not in unit_axes) or None
  return P(unit_axes, rows, *([None] * (ndim - 2)))


def _axes_of(part) -> tuple:
  return (part,) if isinstance(part, str) else tuple(part)


def traced_in_mesh(fn: Callable, mesh: Mesh, rules: Sequence) -> Callable:
  """``fn`` traced with ``mesh`` and the logical ``rules`` in effect, wherever it is called.

  The model's activation constraints (``nn.with_logical_constraint``) are no-ops unless
  an abstract mesh is set when the step is traced; the legacy ``with mesh:`` context
  sets none (JAX 0.10, flax 0.12), so without this the batch layout reached the layers
  only through XLA's propagation, which on an FSDP mesh gave up the batch sharding at
  the first fsdp-sharded weight: T5-XXL's plain step needed 664 GiB per device on
  data=1 x fsdp=256 (issue 15). Setting them here, inside the jitted function, makes
  the step's program independent of the caller's contexts.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      with nn.logical_axis_rules(list(rules)):
        return fn(*args, **kwargs)

  return wrapped


def make_mesh(
  shape: Optional[Mapping[str, int]] = None,
  devices: Optional[Sequence[jax.Device]] = None,
  dcn_shape: Optional[Mapping[str, int]] = None,
) -> Mesh:
  """Builds the mesh from the devices' topology, MaxText-style.

  Args:
    shape: ``MESH_SHAPE``, axis name -> size within one slice (ICI), one size may be
      -1; None puts every device of a slice on "data".
    devices: the devices (default ``jax.devices()``).
    dcn_shape: ``DCN_MESH_SHAPE``, axis name -> size across slices (multi-slice TPU
      over the data-center network, or hosts of GPUs); None = one slice. A mesh axis
      is then ``dcn x ici`` long, slices outermost, so that only the axes given here
      (usually "data") communicate between slices.

  One slice: ``jax.make_mesh`` (``mesh_utils.create_device_mesh``), which orders TPU
  devices along the physical torus so that each mesh axis is a ring of neighbours;
  several: ``mesh_utils.create_hybrid_device_mesh``. Devices without a topology (CPU,
  including ``mtx compile``'s fake devices) keep ``jax.devices()``'s order. A topology
  order that would give processes non-contiguous batch rows (``batch_block``) falls
  back to that order too, with a warning.

  Raises:
    UserError: unknown axes, or sizes that do not multiply to the number of devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn = _sizes(dcn_shape or {}, None, "DCN_MESH_SHAPE", default=1)
  slices = math.prod(dcn.values())
  if len(devices) % slices:
    raise UserError(
      f"DCN_MESH_SHAPE {dict(dcn_shape)} makes {slices} slices, which do not divide "
      f"the {len(devices)} devices; give sizes whose product is the number of slices."
    )
  ici = _sizes(shape or {"data": -1}, len(devices) // slices, "MESH_SHAPE")
  ici_shape = [ici[a] for a in MESH_AXES]
  dcn_list = [dcn[a] for a in MESH_AXES]
  if slices > 1:
    array = _hybrid_device_array(ici_shape, dcn_list, devices)
  else:
    array = _device_array(ici_shape, devices)
  mesh = Mesh(array, MESH_AXES)
  if not _rows_contiguous(mesh):
    log.warning(
      "The topology-ordered mesh would give processes non-contiguous batch rows; "
      "using jax.devices()' order instead."
    )
    mesh = Mesh(_in_order(ici_shape, dcn_list, devices), MESH_AXES)
  return mesh


def _sizes(shape: Mapping[str, int], devices: Optional[int], name: str, default=1):
  """``{axis: size}`` over ``MESH_AXES`` from a user's shape, the -1 resolved against
  ``devices`` (None: no -1 allowed, no product check)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(
      f"Unknown mesh axes {sorted(unknown)} in {name}; use {', '.join(MESH_AXES)}."
    )
  sizes = {a: int(shape.get(a, default)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  known = math.prod(s for s in sizes.values() if s != -1)
  if len(free) > (0 if devices is None else 1) or any(
    s == 0 or s < -1 for s in sizes.values()
  ):
    raise UserError(
      f"{name} {dict(shape)} must have positive sizes"
      + (" and at most one -1." if devices is not None else ".")
    )
  if devices is None:
    return sizes
  if free:
    if devices % known:
      raise UserError(
        f"{name} {dict(shape)} does not divide the {devices} devices; make the "
        "product of the fixed sizes divide it."
      )
    sizes[free[0]] = devices // known
  if math.prod(sizes.values()) != devices:
    raise UserError(
      f"{name} {dict(shape)} needs {math.prod(sizes.values())} devices but "
      f"{devices} are present; make the sizes multiply to {devices} (or use -1 for "
      "one axis)."
    )
  return sizes


def _has_topology(devices: Sequence[jax.Device]) -> bool:
  return devices[0].platform in ("tpu", "gpu", "cuda", "rocm")


def _device_array(ici_shape: list, devices: list) -> np.ndarray:
  """One slice: the devices along the physical topology where there is one."""
  if not _has_topology(devices):
    return np.asarray(devices).reshape(ici_shape)
  mesh = jax.make_mesh(
    ici_shape,
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )
  return mesh.devices


def _hybrid_device_array(ici_shape: list, dcn_shape: list, devices: list) -> np.ndarray:
  """Several slices (``slice_index`` on multi-slice TPU, else one per process)."""
  if not _has_topology(devices):
    return _in_order(ici_shape, dcn_shape, devices)
  return mesh_utils.create_hybrid_device_mesh(
    ici_shape,
    dcn_shape,
    devices,
    process_is_granule=not hasattr(devices[0], "slice_index"),
    allow_split_physical_axes=True,
  )


def _in_order(ici_shape: list, dcn_shape: list, devices: list) -> np.ndarray:
  """``jax.devices()`` in order, slices outermost on every axis: the devices as
  [dcn..., ici...], each axis then ``dcn x ici`` long."""
  n = len(MESH_AXES)
  array = np.asarray(devices).reshape(list(dcn_shape) + list(ici_shape))
  array = array.transpose([i for a in range(n) for i in (a, a + n)])
  return array.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])


def _rows_contiguous(mesh: Mesh) -> bool:
  """Whether every process's batch rows (and units) are one contiguous block."""
  if jax.process_count() == 1 and all(
    d.process_index == mesh.devices.flat[0].process_index for d in mesh.devices.flat
  ):
    return True
  try:
    for axes in (BATCH_AXES, UNIT_AXES):
      _batch_block(mesh, mesh.devices.flat[0].process_index, axes)
  except UserError:
    return False
  return True


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(
  mesh: Mesh, ndim: int, axes: Sequence[str] = BATCH_AXES
) -> NamedSharding:
  """Leading axis over ``axes`` (the data axes; ``UNIT_AXES`` for task-major units),
  the rest replicated."""
  return NamedSharding(mesh, P(tuple(axes), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_block(
  mesh: Mesh, process_index: Optional[int] = None, axes: Sequence[str] = BATCH_AXES
) -> tuple:
  """Which block of the global batch rows this process's devices hold, of how many.

  The batch's leading axis is split over the data axes; a process feeds the rows of
  its own devices. Processes whose devices hold the same rows (a "tensor" axis across
  processes, say) form one block and must build the same rows; the data pipeline gives
  each block its own data shard(s). Returns ``(block index, number of blocks)``, with
  blocks numbered in row order: ``(jax.process_index(), jax.process_count())`` when
  every process holds its own rows, ``(0, 1)`` on one process. ``axes``: the mesh axes
  the leading axis is split over (``UNIT_AXES`` for the per-task route's units).

  Raises:
    UserError: when a process's rows are not one contiguous block of equal size
      (an unusual device order in a hand-made mesh).
  """
  process_index = jax.process_index() if process_index is None else process_index
  return _batch_block(mesh, process_index, tuple(axes))


@functools.lru_cache(maxsize=8)
def _batch_block(mesh: Mesh, process_index: int, axes: tuple) -> tuple:
  n = math.prod(mesh.shape[a] for a in axes)
  rows_of = {}
  sharding = batch_sharding(mesh, 1, axes)
  for device, index in sharding.devices_indices_map((n,)).items():
    start = index[0].start or 0
    stop = n if index[0].stop is None else index[0].stop
    rows_of.setdefault(device.process_index, set()).update(range(start, stop))
  return row_blocks(rows_of)[process_index]


def row_blocks(rows_of: Mapping[int, Any]) -> dict:
  """``{process: (block index, number of blocks)}`` from the batch shards each holds.

  Example: 4 processes, the batch in 2 shards, a "tensor" axis across process pairs:

      rows_of = {0: {0}, 1: {0}, 2: {1}, 3: {1}}  ->  {0: (0, 2), 1: (0, 2),
                                                       2: (1, 2), 3: (1, 2)}
  """
  blocks = sorted({tuple(sorted(r)) for r in rows_of.values()})
  size = len(blocks[0])
  contiguous = all(
    len(b) == size and b == tuple(range(b[0], b[0] + size)) for b in blocks
  )
  if not contiguous or len({r for b in blocks for r in b}) != size * len(blocks):
    raise UserError(
      f"The mesh gives processes batch shards {blocks} that are not "
      "equal contiguous blocks; build the mesh from jax.devices() in "
      "their order (mtx.parallel.make_mesh does)."
    )
  return {p: (blocks.index(tuple(sorted(r))), len(blocks)) for p, r in rows_of.items()}


def host_to_global(
  local: Mapping[str, np.ndarray], mesh: Mesh, axes: Sequence[str] = BATCH_AXES
) -> dict:
  """Assembles each process's rows (or units) into global arrays over ``axes``.

  ``local`` holds this process's block of rows (``batch_block`` with the same
  ``axes``): [rows/blocks, ...].
  """
  _, blocks = batch_block(mesh, axes=axes)
  out = {}
  for key, value in local.items():
    sharding = batch_sharding(mesh, value.ndim, axes)
    global_shape = (value.shape[0] * blocks,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def _path_key(path) -> tuple:
  return tuple(
    str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
  )


def like_params_shardings(
  abstract_tree: Any, params_abstract: Any, params_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings for a tree whose leaves mirror params (optimizer and mtl states).

  A leaf whose key path ends with a parameter's path and has that parameter's shape
  gets the parameter's sharding (Adam's moments, say); a leaf with a leading task axis
  and otherwise the parameter's shape gets it with the task axis unsharded; anything
  else (Adafactor's factored rows and columns, counters) is replicated: small.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(params_abstract)[0],
    jax.tree_util.tree_leaves(params_shardings),
  ):
    by_path[_path_key(path)] = (tuple(leaf.shape), sharding)

  def pick(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for i in range(len(key)):
      hit = by_path.get(key[i:])
      if hit is None:
        continue
      pshape, sharding = hit
      if shape == pshape:
        return sharding
      if shape[1:] == pshape:
        return NamedSharding(mesh, P(None, *sharding.spec))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)
