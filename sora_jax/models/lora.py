"""Low-rank adapters (LoRA) on a model's projections, chosen by path, with no LoRA branch in the model.

    model = DiT(cfg.dit, rngs=nnx.Rngs(0))
    lora.apply(model, cfg.lora, rngs=nnx.Rngs(1))   # blocks/attn/q etc. now carry lora_a, lora_b
    nnx.split(model, lora.LoRAParam, nnx.Param, ...) # (graph, adapters, frozen base, rest)

`apply` replaces every `layers.Dense` / `layers.DenseIn` whose module path (e.g. "blocks/attn/q",
"blocks/mlp/up") matches one of `cfg.lora.targets` (fnmatch patterns) by a subclass that keeps the base
layer's own `kernel` and `bias` variables, at the same paths, and adds

    y = base(x) + (alpha / rank) * (x A) B,    A [in..., rank], B [rank, out...], B = 0 at init

so an untrained adapter is exactly the base model, a base bundle's weights load into the wrapped model
unchanged, and `merge` folds the adapter into the kernel (kernel + alpha / rank * A B) for a plain
bundle. A is drawn as peft draws it (uniform, bound 1 / sqrt(fan_in)). The adapters are
`nnx.LoRAParam`s (a subclass of nnx.Param): the trainer trains those and freezes the rest.

Stacked layers (the DiT's blocks, created by nnx.vmap with a leading `layers` axis) get stacked
adapters: A and B take the kernel's leading `layers` axes, so nnx.scan slices them with the block. The
adapters carry logical axis names derived from the kernel's (A: the kernel's input names and the rank
unnamed; B: the rank unnamed and the kernel's output names), so sharding.py shards them by the same
rules as the base: FSDP over `embed`, tensor parallelism over `heads` / `mlp`.

Why not flax's `nnx.LoRA` / `nnx.LoRALinear`: they are two-dimensional ([in] -> [out]), have no alpha
scale, and LoRA moves the base layer under `base_module` (new parameter paths); the DiT's projections
are [W] -> [heads, head_dim] and [heads, head_dim] -> [W], stacked over layers, and must keep their paths.
`nnx.LoRAParam` is used as the adapters' variable type.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import layers

LoRAParam = nnx.LoRAParam
# Every projection of Wan's block: self-attention q, k, v, o; cross-attention q, k, v, o; MLP up, down.
DEFAULT_TARGETS = ("blocks/attn/*", "blocks/cross/*", "blocks/mlp/*")
STACK_AXIS = "layers"


def enabled(cfg) -> bool:
  """Whether a config trains LoRA adapters (`lora.rank` > 0) rather than every parameter."""
  return "lora" in cfg and int(cfg.lora.rank or 0) > 0


def trainable(cfg):
  """The nnx filter of what trains: the adapters under LoRA, else every parameter."""
  return LoRAParam if enabled(cfg) else nnx.Param


def scale_of(cfg_lora) -> float:
  """alpha / rank (alpha 0 means alpha = rank, scale 1)."""
  rank = int(cfg_lora.rank)
  alpha = float(cfg_lora.alpha or rank)
  return alpha / rank


def _names(variable) -> tuple:
  md = variable.get_metadata()
  names = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
  return tuple(names) if names else (None,) * variable.ndim


def _add_adapter(module, kernel, *, n_in: int, rank: int, scale: float, rngs: nnx.Rngs) -> None:
  names = _names(kernel)
  lead = 0
  while lead < len(names) and names[lead] == STACK_AXIS:
    lead += 1
  shape = tuple(kernel.shape)
  fan_in = int(np.prod(shape[lead:lead + n_in]))
  if not 1 <= rank <= min(fan_in, int(np.prod(shape[lead + n_in:]))):
    raise ValueError(f"lora.rank={rank} for a projection of shape {shape}: accepted 1 to "
                     f"min(fan in, fan out)")
  # peft's kaiming_uniform(a=sqrt(5)): uniform with bound 1 / sqrt(fan_in), per stacked layer.
  init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                           in_axis=tuple(range(lead, lead + n_in)), out_axis=-1,
                                           batch_axis=tuple(range(lead)))
  dtype = kernel[...].dtype
  module.lora_a = LoRAParam(init(rngs.params(), shape[:lead + n_in] + (rank,), dtype),
                            out_sharding=names[:lead + n_in] + (None,))
  module.lora_b = LoRAParam(jnp.zeros(shape[:lead] + (rank,) + shape[lead + n_in:], dtype),
                            out_sharding=names[:lead] + (None,) + names[lead + n_in:])
  module.lora_scale, module.lora_in = scale, n_in


def _delta(module, x: jax.Array) -> jax.Array:
  """scale * (x A) B in float32: matmul inputs in the compute dtype, float32 accumulation (layers.Dense)."""
  dt, n = module.dtype, module.lora_in
  a, b = module.lora_a[...].astype(dt), module.lora_b[...].astype(dt)
  h = jax.lax.dot_general(x.astype(dt), a, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
                          preferred_element_type=jnp.float32)
  y = jax.lax.dot_general(h.astype(dt), b, (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return module.lora_scale * y


class _Adapted:
  """Takes over a projection's kernel and bias (same paths) and adds a low-rank adapter on its output;
  `N_IN` is how many leading kernel axes the projection contracts."""
  N_IN = 1

  def __init__(self, base, *, rank: int, scale: float, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
    _add_adapter(self, self.kernel, n_in=self.N_IN, rank=rank, scale=scale, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (super().__call__(x).astype(jnp.float32) + _delta(self, x)).astype(self.dtype)


class LoRADense(_Adapted, layers.Dense):
  """A `layers.Dense` plus a low-rank adapter."""


class LoRADenseIn(_Adapted, layers.DenseIn):
  """A `layers.DenseIn` ([..., heads, head_dim] -> [..., out]) plus a low-rank adapter."""
  N_IN = 2


_WRAPPERS = {layers.Dense: LoRADense, layers.DenseIn: LoRADenseIn}


def projections(model: nnx.Module) -> dict[str, nnx.Module]:
  """The model's adaptable projections by path ("blocks/attn/q", ...)."""
  return {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)
          if type(m) in _WRAPPERS and path}


def apply(model: nnx.Module, cfg_lora, *, rngs: nnx.Rngs) -> nnx.Module:
  """Wraps, in place, the projections matched by `cfg_lora.targets` (rank, alpha); returns the model."""
  rank, scale = int(cfg_lora.rank), scale_of(cfg_lora)
  targets = tuple(cfg_lora.targets)
  found = projections(model)
  chosen = []
  for pattern in targets:
    hits = [p for p in found if fnmatch.fnmatchcase(p, pattern)]
    if not hits:
      raise ValueError(f"lora.targets pattern {pattern!r} matches no projection; the model has "
                       f"{sorted(found)}")
    chosen += [p for p in hits if p not in chosen]
  with nnx.use_eager_sharding(False):
    for path in chosen:
      *parents, name = path.split("/")
      parent = model
      for p in parents:
        parent = getattr(parent, p)
      base = getattr(parent, name)
      setattr(parent, name, _WRAPPERS[type(base)](base, rank=rank, scale=scale, rngs=rngs))
  return model


# ---------------------------------------------------------------------------------- pure-dict weights
def split_params(params: Mapping) -> tuple[dict, dict]:
  """(base parameters, adapters) of a wrapped model's pure parameter dict."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      b, a = split_params(v)
      if b:
        base[k] = b
      if a:
        adapters[k] = a
    elif k in ("lora_a", "lora_b"):
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def merge(base: Mapping, adapters: Mapping, scale: float) -> dict:
  """Base parameters (pure dict) with every adapter folded in: kernel + scale * A B, computed and returned
  in float32 (a bundle's writer rounds to its stored dtype once).

  Raises ValueError naming an adapter whose projection is not in `base`.
  """
  out = {}
  for k, v in base.items():
    out[k] = merge(v, adapters.get(k, {}), scale) if isinstance(v, Mapping) else v
  for k in adapters:
    if k in ("lora_a", "lora_b"):
      if "kernel" not in base:
        raise ValueError(f"adapter {k} has no kernel beside it in the base parameters")
      continue
    if k not in base:
      raise ValueError(f"adapter for {k!r} has no projection in the base parameters (keys {sorted(base)})")
  if "lora_a" in adapters:
    kernel = np.asarray(out["kernel"], np.float32)
    a, b = np.asarray(adapters["lora_a"], np.float32), np.asarray(adapters["lora_b"], np.float32)
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    n_in = a.ndim - lead - 1
    letters = "abcdefghijklmnopqrstuvw"
    lo, li, lout = letters[:lead], letters[lead:lead + n_in], letters[lead + n_in:kernel.ndim]
    product = np.einsum(f"{lo}{li}z,{lo}z{lout}->{lo}{li}{lout}", a, b)
    out["kernel"] = kernel + np.float32(scale) * product
  return out
