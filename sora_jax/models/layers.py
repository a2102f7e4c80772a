"""Transformer pieces shared by the DiT and its text encoder: dense layers with logical-axis annotations,
RMS norms, rotary position embeddings over any number of axes, segment-restricted attention, MLPs,
and the stacked-and-scanned layer helpers.

Precision policy: parameters are stored in `param_dtype` (float32); matmul inputs are cast to the
compute `dtype` (bfloat16 by default) and accumulate in float32 (`preferred_element_type`), which is
both the fast path on TPU and, per docs/hazards.md, on this CPU; norms and softmax run in float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import sharding
from sora_jax.kernels import CROSS_RESIDUAL_NAME, RESIDUAL_NAME
from sora_jax.models.attention import segment_attention

Names = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Remat:
  """A remat policy (`dit.remat`, `text.remat`): what the backward pass finds saved, and so what it runs
  again. flops.py counts the recomputation from `weights_again` and `scores_again`; compile_check from
  `kernels_once` too, and its memory planner tries the policies in REMAT's order."""
  policy: Callable | None          # jax.checkpoint policy of each scanned layer; None: no remat at all
  weights_again: float             # extra forwards of the weight matmuls and the elementwise work
  scores_again: float              # extra forwards of XLA attention's score matmuls and softmax
  kernels_once: tuple[str, ...]    # attention kernels ("self", "cross") whose forward runs once


# The attention kernels name their forward residuals, one [L, heads, head_dim] output and one [heads, L]
# f32 logsumexp per call (`kernels.RESIDUAL_NAME`, `CROSS_RESIDUAL_NAME` for cross-attention); a policy
# that saves them does not run the Pallas forward kernel again in the backward pass.
_kernel_residuals = jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME, CROSS_RESIDUAL_NAME)
_save_kernel_residuals = functools.partial(jax.checkpoint_policies.save_from_both_policies, _kernel_residuals)
_BOTH = ("self", "cross")

# The remat policies by config name, least recomputation first: memory falls along this order.
REMAT: dict[str, Remat] = {
    # Keeps every activation.
    "none": Remat(None, 0.0, 0.0, _BOTH),
    # Saves every matmul output and the kernels' residuals.
    "dots_saveable": Remat(_save_kernel_residuals(jax.checkpoint_policies.dots_saveable), 0.0, 0.0, _BOTH),
    # Saves the matmul outputs without batch dims (the weights' matmuls, not XLA attention's scores, which
    # are recomputed) and the kernels' residuals.
    "dots": Remat(_save_kernel_residuals(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
                  0.0, 1.0, _BOTH),
    # Recomputes everything but the attention kernels, whose residuals are saved: at long rows, where
    # attention is most of the work, nearly "full"'s memory for far less recomputation.
    "full_save_attention": Remat(_kernel_residuals, 1.0, 1.0, _BOTH),
    # Saves only the self-attention kernels' residuals and runs the cross-attention kernels again: half
    # the saved bytes (a cross-attention output is as large as a self-attention one), for a second
    # forward of kernels whose keys are only the short caption.
    "full_save_self_attention": Remat(jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME),
                                      1.0, 1.0, ("self",)),
    # Recomputes the whole block: the least memory.
    "full": Remat(jax.checkpoint_policies.nothing_saveable, 1.0, 1.0, ()),
}


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Names, dtype=jnp.float32) -> nnx.Param:
  """A parameter annotated with logical axis names (sharding.py maps them to mesh axes)."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=names)


class Dense(nnx.Module):
  """x [..., in] @ kernel [in, *out] (+ bias) -> [..., *out]; bf16 inputs, f32 accumulation."""

  def __init__(self, in_dim: int, out_dims: int | Sequence[int], names: Names, *, use_bias: bool = True,
               zero_init: bool = False, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_dims = (out_dims,) if isinstance(out_dims, int) else tuple(out_dims)
    # fan-in scaled normal init; zero_init for the layers adaLN-Zero and the conditioning path need.
    init = nnx.initializers.zeros if zero_init else nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=tuple(range(1, 1 + len(out_dims))))
    self.kernel = param(rngs, init, (in_dim, *out_dims), names, param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, out_dims, names[1:], param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(self.dtype)


class DenseIn(nnx.Module):
  """[..., H, Dh] -> [..., out]: the attention output projection (contracts heads and head_dim)."""

  def __init__(self, heads: int, head_dim: int, out_dim: int, *, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    self.kernel = param(rngs, init, (heads, head_dim, out_dim), ("heads", "head_dim", "embed"), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (out_dim,), ("embed",), param_dtype)
    self.dtype = dtype

  def __call__(self, x_blhd: jax.Array) -> jax.Array:
    y = jnp.einsum("blhd,hdo->blo", x_blhd.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return (y + self.bias[...]).astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMS norm over the trailing `shape` axes in float32, with a learned scale of that shape (`use_scale=False`
  where adaLN supplies the scale). A tuple shape normalises several axes together: the DiT's QK-norm runs
  over (heads, head_dim), across all heads at once, as Wan 2.1 does."""

  def __init__(self, shape: int | Sequence[int], names: Names = ("embed",), *, use_scale: bool = True,
               eps: float = 1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    self.scale = param(rngs, nnx.initializers.ones, shape, names, param_dtype) if use_scale else None
    self.axes = tuple(range(-len(shape), 0))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.axes, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...]
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """Layer norm over the last axis in float32; `affine=False` where adaLN supplies scale and shift."""

  def __init__(self, dim: int, *, affine: bool = True, eps: float = 1e-6, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype) if affine else None
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def rope_split(head_dim: int, num_axes: int) -> tuple[int, ...]:
  """How head_dim is split between position axes: equal even parts, the remainder to the first (time)."""
  if head_dim % 2 or head_dim < 2 * num_axes:
    raise ValueError(f"head_dim={head_dim} must be even and at least {2 * num_axes} for {num_axes}-axis RoPE")
  part = 2 * (head_dim // num_axes // 2)
  return (head_dim - part * (num_axes - 1),) + (part,) * (num_axes - 1)


def rope_angles(positions_bln: jax.Array, dims: Sequence[int], theta: float) -> jax.Array:
  """Per-token rotation angles [B, L, head_dim / 2] from integer positions [B, L, n] (no tables).

  Axis a rotates its own `dims[a]` channels with frequencies theta^(-2i / dims[a]), so a query-key dot
  product depends only on the position difference along every axis.
  """
  parts = []
  for a, d in enumerate(dims):
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    parts.append(positions_bln[..., a:a + 1].astype(jnp.float32) * freqs)
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x_blhd: jax.Array, angles_blk: jax.Array) -> jax.Array:
  """Rotates consecutive channel pairs (2i, 2i+1) of x [B, L, H, D] by angles [B, L, D/2] (in float32).

  out = x cos + (x R) sin with R the fixed [D, D] pair-swap (x R)[2i] = -x[2i+1], (x R)[2i+1] = x[2i]: a
  tiny matmul on the MXU instead of a reshape to [..., D/2, 2], whose trailing axis of 2 is padded to a
  full tile on TPU and forces layout copies of q and k in every layer, forward and backward
  (docs/pods.md). Exact (one +-1 term per output; HIGHEST keeps f32 inputs exact on TPU), so the
  arithmetic is the pairwise form's: out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin.
  """
  h, d = x_blhd.shape[-2:]
  i = np.arange(0, d, 2)
  swap = np.zeros((d, d), np.float32)
  swap[i + 1, i], swap[i, i + 1] = -1.0, 1.0
  # Heads as a batch dim of the matmul: remat's `dots` policy (dots without batch dims) then recomputes
  # this cheap product instead of saving an f32 copy of q and k per layer (8 GB per chip in sora_b).
  swap = jnp.asarray(np.broadcast_to(swap, (h, d, d)), x_blhd.dtype)
  partner = jnp.einsum("blhd,hde->blhe", x_blhd, swap, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
  cos = jnp.repeat(jnp.cos(angles_blk), 2, axis=-1)[:, :, None]
  sin = jnp.repeat(jnp.sin(angles_blk), 2, axis=-1)[:, :, None]
  return (x_blhd.astype(jnp.float32) * cos + partner * sin).astype(x_blhd.dtype)


def positions_in_segment(segment_ids_bl: jax.Array) -> jax.Array:
  """Index of each token within its (contiguous) packed segment: [B, L] int32, starting at 0."""
  idx = jnp.arange(segment_ids_bl.shape[1], dtype=jnp.int32)[None]
  is_start = jnp.concatenate([jnp.ones_like(segment_ids_bl[:, :1], dtype=bool),
                              segment_ids_bl[:, 1:] != segment_ids_bl[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  return idx - start


class Attention(nnx.Module):
  """Multi-head attention restricted to equal segment ids, with RMS QK-norm and optional RoPE.

  Self-attention when called with kv = x; cross-attention when kv comes from another sequence
  (kv_dim may differ from the query width). q, k, v and the output projection have biases; the QK-norm
  (RMS over all heads together) comes before RoPE.
  """

  def __init__(self, dim: int, heads: int, *, kv_dim: int | None = None, qk_norm: bool = True,
               implementation: str = "reference", context: str = "none", cross: bool = False,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"width {dim} is not divisible by num_heads={heads}")
    head_dim = dim // heads
    kv_dim = kv_dim or dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Dense(dim, (heads, head_dim), ("embed", "heads", "head_dim"), **kw)
    self.k = Dense(kv_dim, (heads, head_dim), ("embed", "heads", "head_dim"), **kw)
    self.v = Dense(kv_dim, (heads, head_dim), ("embed", "heads", "head_dim"), **kw)
    self.o = DenseIn(heads, head_dim, dim, **kw)
    # QK-norm across heads (one RMS over heads x head_dim, Wan 2.1's "rms_norm_across_heads").
    self.q_norm = RMSNorm((heads, head_dim), ("heads", "head_dim"), **kw) if qk_norm else None
    self.k_norm = RMSNorm((heads, head_dim), ("heads", "head_dim"), **kw) if qk_norm else None
    self.implementation, self.context = implementation, context
    self.residual_name = CROSS_RESIDUAL_NAME if cross else RESIDUAL_NAME  # for remat policies

  def __call__(self, x_bld, q_segment_ids, kv_bmd, kv_segment_ids, *, q_angles=None, kv_angles=None):
    names = ("act_batch", "act_seq", "act_heads", None)
    q = sharding.constrain(self.q(x_bld), names)
    k = sharding.constrain(self.k(kv_bmd), names)
    v = sharding.constrain(self.v(kv_bmd), names)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if q_angles is not None:
      q, k = apply_rope(q, q_angles), apply_rope(k, kv_angles)
    out = segment_attention(q, k, v, q_segment_ids, kv_segment_ids, implementation=self.implementation,
                            context=self.context, residual_name=self.residual_name)
    return self.o(sharding.constrain(out, names))


class NeighbourConv(nnx.Module):
  """A depthwise spacetime convolution over packed tokens: 3 taps per channel along each grid axis, applied
  one axis after another (a separable 3x3x3 kernel per channel), each tap reading the token's neighbour
  in its own segment by index (`neighbours` [B, L, A, 2] int32 and `valid` [B, L, A, 2] bool for A axes,
  the token one step back and one step forward; dit.spacetime_neighbours). An absent neighbour (the
  grid's edge, another segment, padding) reads zero, as a zero-padded convolution does. Starts as the
  identity (centre tap 1, side taps 0)."""

  def __init__(self, channels: int, axes: int = 3, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[:, 1].set(1)
    self.taps = param(rngs, init, (axes, 3, channels), (None, None, "mlp"), param_dtype)

  def __call__(self, h_blc: jax.Array, neighbours) -> jax.Array:
    index, valid = neighbours
    taps = self.taps[...].astype(h_blc.dtype)
    for a in range(taps.shape[0]):
      back, fwd = (_neighbour_take(h_blc, index[:, :, a, k], valid[:, :, a, k], index[:, :, a, 1 - k],
                                   valid[:, :, a, 1 - k]) for k in range(2))
      h_blc = taps[a, 0] * back + taps[a, 1] * h_blc + taps[a, 2] * fwd
    return h_blc


def _take_rows(x_blc, index_bl, valid_bl):
  return jnp.where(valid_bl[..., None], jnp.take_along_axis(x_blc, index_bl[..., None], axis=1), 0)


@jax.custom_vjp
def _neighbour_take(x_blc, index_bl, valid_bl, opposite_index_bl, opposite_valid_bl):
  """Each token's neighbour on one side (zero where it has none). Its transpose is the same read from the
  opposite side (the neighbour relation pairs tokens one to one), so the backward pass is a gather too:
  on XLA:CPU the scatter-add autodiff would make of it is about 4x slower."""
  return _take_rows(x_blc, index_bl, valid_bl)


_neighbour_take.defvjp(
    lambda x, i, v, oi, ov: (_take_rows(x, i, v), (oi, ov)),
    lambda res, g: (_take_rows(g, *res), None, None, None, None))


class MLP(nnx.Module):
  """Two-layer MLP with GELU (tanh approximation); with `conv`, a NeighbourConv on the hidden layer
  before the activation (Sana's Mix-FFN, separable), which then needs the tokens' `neighbours`."""

  def __init__(self, dim: int, hidden: int, *, conv: bool = False, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = Dense(dim, hidden, ("embed", "mlp"), **kw)
    self.conv = NeighbourConv(hidden, param_dtype=param_dtype, rngs=rngs) if conv else None
    self.down = Dense(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x_bld: jax.Array, neighbours=None) -> jax.Array:
    h = self.up(x_bld)
    if self.conv is not None:
      h = self.conv(h, neighbours)
    h = sharding.constrain(jax.nn.gelu(h, approximate=True), ("act_batch", "act_seq", "act_mlp"))
    return self.down(h)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
  """`depth` layers as one module whose params gain a leading `layers` axis (nnx.vmap over inits)."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=depth, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make_layer(r)

  return create(rngs)


# Inside a scan, remat's recomputation cannot be merged back into the forward pass, so prevent_cse=False
# is safe and saves XLA the barriers. Unrolled, it is not (docs/hazards.md): the TPU compiler merges
# much of the recomputation into the forward pass, and a cost estimate compiled unrolled would miss work
# the trained, scanned step does (sora_b at depth 1 and width 512 under remat `full` counted 0.82 of
# flops.py's FLOPs on v5p:2x2x1, 0.96 under `dots`, 1.00 under `none`). flops.unrolled_scans keeps the
# recomputation apart while it traces the layers unrolled.
_prevent_cse = False


@contextlib.contextmanager
def remat_kept_apart():
  """Within this context scan_layers' remat prevents CSE: its recomputation stays in the program even
  where the layers are unrolled (flops.unrolled_scans)."""
  global _prevent_cse
  before, _prevent_cse = _prevent_cse, True
  try:
    yield
  finally:
    _prevent_cse = before


def scan_layers(layers: nnx.Module, x, step: Callable, remat: str, per_layer: jax.Array | None = None):
  """Runs `x = step(layer, x)` through stacked `layers` with nnx.scan, remat per layer by policy name;
  with `per_layer` (an array with a leading layers axis), `x = step(layer, x, per_layer[i])`."""
  if remat not in REMAT:
    raise ValueError(f"remat={remat!r} is unknown; accepted: {sorted(REMAT)}")

  def body(x, layer, *xs):
    return step(layer, x, *xs)

  if remat != "none":
    body = nnx.remat(body, policy=REMAT[remat].policy, prevent_cse=_prevent_cse)
  extra = () if per_layer is None else (per_layer,)
  body = nnx.scan(body, in_axes=(nnx.Carry, 0) + (0,) * len(extra), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
  return body(x, layers, *extra)
