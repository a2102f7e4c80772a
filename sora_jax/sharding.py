"""The device mesh and the logical-to-physical axis rules: the only file that names mesh axes.

Models annotate parameters and activations with logical names (`embed`, `act_batch`, ...); the rules
below map them onto the physical axes `data`, `fsdp`, `tensor`. The trainers ask this file for the
shardings of parameters (`state_shardings`), of batches (`batch_sharding`) and of replicated values.

Parameters: FSDP by default (`embed` over `fsdp`), tensor parallelism when the `tensor` axis is > 1
(`mlp` and `heads` over `tensor`). Two optional axes shard the sequence of activations (`act_seq`), and
attention across them is sora_jax/kernels/ring.py or ulysses.py (`dit.context`):
- `context` (issue 11): the sequence only; parameters are replicated along it (sharded over `fsdp`).
- `sequence` (MaxText's name; MaxDiffusion's `activation_length` over `fsdp`): the sequence, and the
  parameters like `fsdp` (`embed` over fsdp x sequence, all-gathered per layer), but never the batch. A
  batch smaller than the devices that shard the parameters then trains: one 75k-token video over 4 chips
  (experiments/wan21_t2v_14b.py:topology=v5p:2x2x1).
Each exists only in meshes that name it, so three-axis meshes are unchanged. A dimension that the mesh
axis does not divide stays replicated (tiny test models, odd vocabularies), and a mesh axis is used at
most once per array.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

from flax import nnx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "context", "tensor")
# Present in a mesh only when its shape names it (make_mesh).
OPTIONAL_AXES = ("sequence", "context")

# Logical name -> physical mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", ("sequence", "context")),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("vocab", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)

_current_mesh: Mesh | None = None


def make_mesh(shape: dict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over MESH_AXES from {axis: size}; one size may be -1 for "all remaining devices"."""
  devices = list(devices if devices is not None else jax.devices())
  axes = tuple(a for a in MESH_AXES if a not in OPTIONAL_AXES or a in shape)
  sizes = [int(shape.get(a, 1)) for a in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(shape)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(shape)} needs {math.prod(sizes)} devices; {len(devices)} are present")
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    # Multi-slice: slices are joined by the data-centre network (DCN), much slower than the links
    # inside a slice, so only `data` (one gradient reduction per step) spans slices.
    if sizes[0] % slices:
      raise ValueError(f"mesh {dict(shape)}: data={sizes[0]} must be a multiple of the {slices} slices")
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, *sizes[1:]),
                                                (slices,) + (1,) * (len(axes) - 1), devices)
    return Mesh(grid, axes, axis_types=axis_types)
  return jax.make_mesh(tuple(sizes), axes, axis_types=axis_types, devices=devices)


def logical_to_spec(names: Sequence[str | None], mesh: Mesh | None = None) -> P:
  """The PartitionSpec of logical `names` by LOGICAL_AXIS_RULES; with `mesh`, without the optional axes
  (`sequence`, `context`) that the mesh does not name."""
  rules = dict(LOGICAL_AXIS_RULES)
  spec = [rules.get(n) if n is not None else None for n in names]
  return P(*(_in_mesh(a, mesh) for a in spec)) if mesh is not None else P(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Makes `constrain` active (inside jit) for models traced within this context."""
  global _current_mesh
  prev, _current_mesh = _current_mesh, mesh
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _current_mesh = prev


def current_mesh() -> Mesh | None:
  """The mesh of the enclosing `use_mesh`, or None."""
  return _current_mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  if _current_mesh is None:
    return x
  spec = logical_to_spec(names, _current_mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_current_mesh, spec))


def _in_mesh(axes, mesh: Mesh):
  """`axes` (a PartitionSpec entry) without the axes `mesh` lacks (an unnamed optional axis)."""
  kept = tuple(a for a in _axes_tuple(axes) if a in mesh.shape)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def sequence_axis(mesh: Mesh | None) -> str | None:
  """The mesh axis that shards the sequence of activations (`act_seq`) in `mesh`, for the collectives of
  context-parallel attention; None when the sequence is whole on every device."""
  if mesh is None:
    return None
  axes = [a for a in _axes_tuple(dict(LOGICAL_AXIS_RULES)["act_seq"]) if mesh.shape.get(a, 1) > 1]
  if len(axes) > 1:
    raise ValueError(f"mesh {dict(mesh.shape)} shards the sequence over {axes}; give one of them size > 1")
  return axes[0] if axes else None


def per_shard(fn, *args, names: Sequence[Sequence[str | None]]):
  """`fn(*args)` run on each device's block of `args` (split by logical `names`, one tuple per arg);
  the output is laid out like the first arg. Outside `use_mesh` it is `fn(*args)`.

  For Pallas kernels (Mosaic/Triton custom calls), which XLA cannot partition: without this, a kernel
  on sharded inputs fails to compile on a multi-device TPU mesh.
  """
  mesh = _current_mesh
  if mesh is None or mesh.size == 1:
    return fn(*args)
  specs = tuple(spec_for_shape(n, a.shape, mesh) for n, a in zip(names, args))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def mesh_sizes(cfg_mesh) -> dict[str, int]:
  """{axis: size} of a config's `mesh` section for every axis of MESH_AXES: a section names only the axes
  it sizes, the others are 1 (-1 is kept: the remaining devices)."""
  return {a: int(cfg_mesh.get(a, 1)) for a in MESH_AXES}


def mesh_from_config(cfg_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of a config's `mesh` section ({data, fsdp, [sequence,] [context,] tensor}, -1 = the remaining
  devices)."""
  sizes = mesh_sizes(cfg_mesh)
  return make_mesh({a: sizes[a] for a in MESH_AXES if a not in OPTIONAL_AXES or a in cfg_mesh}, devices)


def _axes_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for_shape(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for an array of `shape` with logical dimension `names`, fitted to `mesh`.

  Drops, per dimension, mesh axes of size 1, axes already used by an earlier dimension, and axes
  whose size does not divide the dimension.
  """
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  rules = dict(LOGICAL_AXIS_RULES)
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule; accepted: {sorted(rules)}")
    kept = []
    size = 1
    for axis in _axes_tuple(rules.get(name) if name is not None else None):
      n = mesh.shape.get(axis, 1)
      if n == 1 or axis in used or dim % (size * n):
        continue
      kept.append(axis)
      size *= n
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def _logical_names(variable: nnx.Variable):
  md = variable.get_metadata()
  return md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """NamedShardings for an (abstract) nnx.State, as a pure dict like `nnx.to_pure_dict(state)`."""
  out: dict = {}
  for path, var in abstract_state.flat_state():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, spec_for_shape(_logical_names(var), var.shape, mesh))
  return out


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """The leading (batch) axis over data x fsdp; the rest replicated (along `sequence` and `context` too:
  the model's first constraint splits the rows' sequence)."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh) -> int:
  """A global batch must be a multiple of this (the size of the batch-sharding axes)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(shardings: Any) -> str:
  """One line per distinct PartitionSpec with its count, for the startup log."""
  counts: dict[str, int] = {}
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    key = str(s.spec)
    counts[key] = counts.get(key, 0) + 1
  return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
