"""GPU segment attention: Pallas (Triton) flash attention that walks only the key blocks of its segments.

The stock Pallas GPU `mha(..., segment_ids=)` loops over every key block (cost (sum of lengths)^2), has one
id array for queries and keys (no cross-attention), and lets padding attend to padding. These kernels take
separate query and key ids and, per query block, the window of key blocks from `blocksparse.block_map`
(and per key block the window of query blocks for dk/dv): the loop trip count is read from memory, so a
packed row costs what its segments cost. Forward, dq and dk/dv are three kernels (FlashAttention-2);
nothing of size Lq * Lk is stored. `interpret=True` runs them on any backend, for tests. The forward's
output and logsumexp are named `kernels.RESIDUAL_NAME` (see splash.py) for remat policies to save.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sora_jax.kernels import RESIDUAL_NAME, blocksparse

_NEG = -1e30
BLOCK = 64  # gpu_attention's default query and key block (rows); flops.kernel_flops pads its FLOP count to it
# Contract the last dim of both operands (a @ b.T) and the first of both (a.T @ b).
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot(a, b, dims):
  # HIGHEST: f32 inputs must not silently drop to TF32 (the kernels are tested against f32 to 1e-5).
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, first_ref, width_ref, o_ref, lse_ref, *,
                scale: float, block_k: int):
  q, q_ids = q_ref[...], q_ids_ref[...]
  first = first_ref[0]

  def body(t, carry):
    o, m, l = carry
    kv = pl.ds((first + t) * block_k, block_k)
    mask = (q_ids[:, None] == kv_ids_ref[kv][None, :]) & (q_ids[:, None] > 0)
    s = jnp.where(mask, _dot(q, k_ref[kv, :], _NT) * scale, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    o = alpha[:, None] * o + _dot(p.astype(v_ref.dtype), v_ref[kv, :], _NN)
    return o, m_new, alpha * l + p.sum(-1)

  block_q, dim = q.shape
  init = (jnp.zeros((block_q, dim), jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  o, m, l = lax.fori_loop(0, width_ref[0], body, init)
  has_keys = l > 0
  l_safe = jnp.where(has_keys, l, 1.0)
  o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(l_safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, first_ref,
               width_ref, dq_ref, *, scale: float, block_k: int):
  q, do, q_ids = q_ref[...], do_ref[...], q_ids_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  first = first_ref[0]

  def body(t, dq):
    kv = pl.ds((first + t) * block_k, block_k)
    k = k_ref[kv, :]
    mask = (q_ids[:, None] == kv_ids_ref[kv][None, :]) & (q_ids[:, None] > 0)
    p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v_ref[kv, :], _NT) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, _NN)

  dq = lax.fori_loop(0, width_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, first_ref,
                width_ref, dk_ref, dv_ref, *, scale: float, block_q: int):
  k, v, kv_ids = k_ref[...], v_ref[...], kv_ids_ref[...]
  first = first_ref[0]

  def body(t, carry):
    dk, dv = carry
    rows = pl.ds((first + t) * block_q, block_q)
    q, do, q_ids = q_ref[rows, :], do_ref[rows, :], q_ids_ref[rows]
    mask = (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] > 0)
    p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse_ref[rows][:, None]), 0.0)
    ds = p * (_dot(do, v, _NT) - delta_ref[rows][:, None])
    dv = dv + _dot(p.astype(do.dtype), do, _TN)
    dk = dk + _dot(ds.astype(q.dtype), q, _TN)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, width_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(block: int, lq: int, lk: int, dim: int, *, rows_are_q: bool):
  """(q spec, kv spec) for grid (block index n, batch b, head h): one side blocked, the other whole."""
  blk = lambda n, b, h: (b, n, h, 0)
  full = lambda n, b, h: (b, 0, h, 0)
  if rows_are_q:
    return (pl.BlockSpec((None, block, None, dim), blk), pl.BlockSpec((None, lk, None, dim), full))
  return (pl.BlockSpec((None, lq, None, dim), full), pl.BlockSpec((None, block, None, dim), blk))


def _window_specs():
  one = pl.BlockSpec((None, 1), lambda n, b, h: (b, n))
  return [one, one]


def _plan(q_ids, kv_ids, block_q, block_k):
  batch = q_ids.shape[0]
  active = blocksparse.block_map(q_ids.reshape(batch, -1, block_q), kv_ids.reshape(batch, -1, block_k))
  kv_first, kv_width = blocksparse.windows(active)
  q_first, q_width = blocksparse.windows(jnp.swapaxes(active, 1, 2))
  return kv_first, kv_width, q_first, q_width


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
                        interpret=interpret, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_ids, kv_ids, block_q, block_k, interpret, residual_name):
  return _forward(q, k, v, q_ids, kv_ids, block_q, block_k, interpret, residual_name)[0]


def _forward(q, k, v, q_ids, kv_ids, block_q, block_k, interpret, residual_name):
  batch, lq, heads, dim = q.shape
  lk = k.shape[1]
  kv_first, kv_width, q_first, q_width = _plan(q_ids, kv_ids, block_q, block_k)
  q_spec, kv_spec = _specs(block_q, lq, lk, dim, rows_are_q=True)
  ids_q = pl.BlockSpec((None, block_q), lambda n, b, h: (b, n))
  ids_kv = pl.BlockSpec((None, lk), lambda n, b, h: (b, 0))
  kernel = functools.partial(_fwd_kernel, scale=dim ** -0.5, block_k=block_k)
  out, lse = _call(
      kernel, (lq // block_q, batch, heads),
      [q_spec, kv_spec, kv_spec, ids_q, ids_kv, *_window_specs()],
      [q_spec, pl.BlockSpec((None, None, block_q), lambda n, b, h: (b, h, n))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, lq), jnp.float32)],
      interpret, "segment_attention_fwd",
  )(q, k, v, q_ids, kv_ids, kv_first, kv_width)
  out, lse = checkpoint_name(out, residual_name), checkpoint_name(lse, residual_name)
  return out, (q, k, v, q_ids, kv_ids, out, lse, kv_first, kv_width, q_first, q_width)


def _backward(block_q, block_k, interpret, residual_name, res, dout):
  del residual_name
  q, k, v, q_ids, kv_ids, out, lse, kv_first, kv_width, q_first, q_width = res
  batch, lq, heads, dim = q.shape
  lk = k.shape[1]
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
  scale = dim ** -0.5
  row_q = pl.BlockSpec((None, None, block_q), lambda n, b, h: (b, h, n))
  full_q = pl.BlockSpec((None, None, lq), lambda n, b, h: (b, h, 0))

  q_spec, kv_spec = _specs(block_q, lq, lk, dim, rows_are_q=True)
  dq = _call(
      functools.partial(_dq_kernel, scale=scale, block_k=block_k), (lq // block_q, batch, heads),
      [q_spec, kv_spec, kv_spec, q_spec, row_q, row_q,
       pl.BlockSpec((None, block_q), lambda n, b, h: (b, n)),
       pl.BlockSpec((None, lk), lambda n, b, h: (b, 0)), *_window_specs()],
      q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, "segment_attention_dq",
  )(q, k, v, dout, lse, delta, q_ids, kv_ids, kv_first, kv_width)

  q_full, kv_blk = _specs(block_k, lq, lk, dim, rows_are_q=False)
  dk, dv = _call(
      functools.partial(_dkv_kernel, scale=scale, block_q=block_q), (lk // block_k, batch, heads),
      [q_full, kv_blk, kv_blk, q_full, full_q, full_q,
       pl.BlockSpec((None, lq), lambda n, b, h: (b, 0)),
       pl.BlockSpec((None, block_k), lambda n, b, h: (b, n)), *_window_specs()],
      [kv_blk, kv_blk], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret, "segment_attention_dkv",
  )(q, k, v, dout, lse, delta, q_ids, kv_ids, q_first, q_width)
  return dq, dk, dv, None, None


_attention.defvjp(_forward, _backward)


def gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                  kv_segment_ids: jax.Array, *, block_q: int = BLOCK, block_k: int = BLOCK,
                  interpret: bool = False, residual_name: str = RESIDUAL_NAME) -> jax.Array:
  """Segment attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` with the Pallas GPU kernels.

  Block sizes must be powers of two (>= 16, Triton's smallest dot); sequences are padded to them and the
  head dim to a power of two. The forward's output and logsumexp are named `residual_name` for remat.
  """
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"{name}={block} must be a power of two >= 16")
  lq, dim = q.shape[1], q.shape[-1]
  pad_dim = max(16, 1 << (dim - 1).bit_length()) - dim
  # Zero head-dim padding leaves q.k unchanged; the 1/sqrt(dim) scale is applied to q here (the kernels
  # scale by the padded dim, so undo that first).
  rescale = ((dim + pad_dim) / dim) ** 0.5
  pad = lambda x, mult: jnp.pad(blocksparse.pad_seq(x, mult), ((0, 0),) * 3 + ((0, pad_dim),))
  q_ids = blocksparse.pad_seq(q_segment_ids.astype(jnp.int32), block_q)
  kv_ids = blocksparse.pad_seq(kv_segment_ids.astype(jnp.int32), block_k)
  out = _attention(pad(q * rescale, block_q), pad(k, block_k), pad(v, block_k), q_ids, kv_ids,
                   block_q, block_k, interpret, residual_name)
  return out[:, :lq, :, :dim]
