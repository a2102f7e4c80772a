"""The device mesh and the logical-to-physical axis rules: the only file that names mesh axes.

Models annotate parameters and activations with logical names (`embed`, `act_batch`, ...); the rules
below map them onto the physical axes `data`, `fsdp`, `tensor`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> physical mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
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
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(shape)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(shape)} needs {math.prod(sizes)} devices; {len(devices)} are present")
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(names: Sequence[str | None]) -> P:
  rules = dict(LOGICAL_AXIS_RULES)
  return P(*(rules.get(n) if n is not None else None for n in names))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Makes `constrain` active (inside jit) for models traced within this context."""
  global _current_mesh
  prev, _current_mesh = _current_mesh, mesh
  try:
    with jax.sharding.use_mesh(mesh):
      yield mesh
  finally:
    _current_mesh = prev


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  if _current_mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(_current_mesh, logical_to_spec(names)))
