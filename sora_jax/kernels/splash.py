"""TPU segment attention: Pallas splash attention driven by a block map computed from the segment ids.

Splash attention skips a (query block, key block) pair only when its mask says the block is empty; given
segment ids alone it computes every block. The public dynamic-mask path would build a dense
[heads, Lq, Lk] mask (O(L^2) bytes). Here the per-row block map of `blocksparse.block_map` (O((L/128)^2)
bytes) becomes splash's MaskInfo directly: active blocks are marked "full" (2), so no dense mask blocks
exist at all, and the masking inside a block comes from splash's own segment-id test.
For skipped grid steps `data_next` repeats the nearest active block, so the pipeline issues no new copy.

Backward: splash's fused kernel, which computes dk, dv and a partial dq per key block in one pass over
the key blocks: 5 block matmuls instead of the 7 of separate dkv and dq kernels, at the cost of a
transient [key blocks, heads, Lq, head_dim] buffer (in q's dtype) summed afterwards, which grows with
Lq * Lk (64 GiB per row for sora_xl's 64k-token rows). Attention is separable over queries, so long rows
run as `query_chunks` calls over query chunks (a lax.map inside the row), each attending to all keys:
the buffer shrinks by the chunk count, the forward executes the same blocks, and dk, dv are the sum of
the chunks' contributions, accumulated in f32. Only where even one query block's buffer is too large
does the backward fall back to separate dkv and dq kernels. The kernel output and its logsumexp are
named `kernels.RESIDUAL_NAME` (`CROSS_RESIDUAL_NAME` for cross-attention), so a remat policy that saves
that name (models/layers.py) spares the backward pass a second run of the forward kernel.

Contract differences smoothed over here: splash does not scale logits (q is scaled first), lets padding
queries attend to padding keys (padding query ids become -1, and their outputs are zeroed), and divides by
zero for a query block with no active key block (such a block gets one key block, fully masked).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

from sora_jax.kernels import RESIDUAL_NAME, blocksparse

# Splash tiles segment ids as [block, 128 lanes]: both block sizes must be multiples of 128.
_LANES = 128
# Largest partial-dq buffer (bytes, per row, call and query chunk) of the fused backward kernel. Rows and
# query chunks run one at a time (lax.map) and layers one at a time (scan), so one such buffer is live
# per chip. 4 GiB is an eighth of the smallest HBM the pod configs target (v6e / v4: 32 GB) and 4% of
# v5p's 95 GB. sora_b's calls fit whole (16k rows: self-attention 32 key blocks x 9 heads x 16k x 128 in
# bf16 = 1.1 GiB); sora_xl's self-attention (64k rows: 128 key blocks x 32 heads x 64k x 128 x 2 bytes =
# 64 GiB; 16 GiB at v6e's 32k rows) runs in 16 (4) query chunks of 4 GiB.
FUSED_BWD_MAX_BYTES = 4 << 30


def block_sizes(lq: int, lk: int, block_q: int = 512, block_kv: int = 512) -> tuple[int, int]:
  """The block sizes splash_attention uses: the requested ones, shrunk to the 128-padded lengths. Keys
  that fit in two requested blocks but would be padded further by them run as one block of their
  128-padded length (cross-attention's 512 caption tokens plus 64 null tokens: one block of 640 keys,
  not two of 512 that compute 1024)."""
  if block_q % _LANES or block_kv % _LANES:
    raise ValueError(f"splash block sizes must be multiples of {_LANES}, got {block_q}, {block_kv}")
  lq128, lk128 = -(-lq // _LANES) * _LANES, -(-lk // _LANES) * _LANES
  one_block = block_kv < lk128 <= 2 * block_kv and lk128 % block_kv
  return min(block_q, lq128), (lk128 if one_block else min(block_kv, lk128))


def partial_dq_bytes(lq: int, lk: int, heads: int, head_dim: int, *, block_q: int = 512,
                     block_kv: int = 512, itemsize: int = 2) -> int:
  """Bytes of the fused backward kernel's partial-dq buffer for one row: [nk, heads, Lq_padded, head_dim]
  in q's dtype (`itemsize` bytes; the kernel allocates it like q)."""
  bq, bkv = block_sizes(lq, lk, block_q, block_kv)
  return -(-lk // bkv) * heads * (-(-lq // bq) * bq) * head_dim * itemsize


def query_chunks(lq: int, lk: int, heads: int, head_dim: int, *, block_q: int = 512,
                 block_kv: int = 512, itemsize: int = 2) -> int:
  """How many query chunks splash_attention (same arguments, heads per device) splits a row into so that
  the fused backward's partial-dq buffer of each is at most FUSED_BWD_MAX_BYTES: 1 for calls that fit
  whole, 0 where not even one query block fits (then the backward runs separate dkv and dq kernels).
  Chunks hold equal numbers of query blocks; the query blocks are padded to a multiple of the count."""
  bq, _ = block_sizes(lq, lk, block_q, block_kv)
  nq = -(-lq // bq)
  per_block = partial_dq_bytes(bq, lk, heads, head_dim, block_q=bq, block_kv=block_kv, itemsize=itemsize)
  blocks_per_chunk = min(nq, FUSED_BWD_MAX_BYTES // per_block)
  return -(-nq // blocks_per_chunk) if blocks_per_chunk else 0


class Layout(NamedTuple):
  """How splash_attention runs one call: block sizes, query chunks and the padded lengths."""
  block_q: int
  block_kv: int
  chunks: int      # query chunks (lax.map over them); 1 for a whole row
  fused: bool      # splash's fused backward kernel, else separate dkv and dq kernels
  chunk_len: int   # queries per chunk: equal numbers of query blocks, the last ones padding
  lk_padded: int   # keys padded to whole key blocks


def layout(lq: int, lk: int, heads: int, head_dim: int, *, block_q: int = 512, block_kv: int = 512,
           itemsize: int = 2) -> Layout:
  """The Layout of splash_attention (same arguments, heads per device); flops.kernel_flops counts the
  kernels' FLOPs at its padded lengths, chunk_len * chunks queries by lk_padded keys."""
  chunks = query_chunks(lq, lk, heads, head_dim, block_q=block_q, block_kv=block_kv, itemsize=itemsize)
  bq, bkv = block_sizes(lq, lk, block_q, block_kv)
  n = max(chunks, 1)
  return Layout(bq, bkv, n, chunks > 0, -(-lq // (bq * n)) * bq, -(-lk // bkv) * bkv)


def _mask_info(active_nm, *, transpose: bool):
  """MaskInfo for one row (one head, broadcast over heads) from its [nq, nk] block map.

  Forward/dq kernels walk key blocks j for each query block i; the dkv kernel walks query blocks i for
  each key block j (`transpose`), and `data_next` then names query blocks.
  """
  nq, nk = active_nm.shape
  if transpose:
    first, width = blocksparse.windows(active_nm.T)  # per key block, over query blocks
    idx = jnp.arange(nq, dtype=jnp.int32)[:, None]
    data_next = jnp.clip(idx, first[None, :], first[None, :] + jnp.maximum(width, 1)[None, :] - 1)
  else:
    first, width = blocksparse.windows(active_nm)
    idx = jnp.arange(nk, dtype=jnp.int32)[None, :]
    data_next = jnp.clip(idx, first[:, None], first[:, None] + jnp.maximum(width, 1)[:, None] - 1)
  small = jnp.int8 if max(nq, nk) <= 127 else jnp.int16 if max(nq, nk) <= 32767 else jnp.int32
  return mask_info_lib.MaskInfo(
      data_next=data_next.astype(small)[None],
      mask_next=None,
      block_mask=jnp.where(active_nm, 2, 0).astype(jnp.int8)[None],
      partial_mask_blocks=None,
      q_sequence=None,
      is_dynamic_mask=True,
  )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, *, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False, residual_name: str = RESIDUAL_NAME) -> jax.Array:
  """Segment attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` with splash attention.

  Block sizes shrink to the padded sequence lengths; both must be multiples of 128. `interpret=True`
  runs the Pallas kernels on any backend (slowly), for tests. The forward kernel's residuals are named
  `residual_name` for remat policies (models/layers.py).
  """
  lq, lk, heads, head_dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
  block_q, block_kv, chunks, fused, chunk_len, _ = layout(lq, lk, heads, head_dim, block_q=block_q,
                                                          block_kv=block_kv, itemsize=q.dtype.itemsize)
  q_ids = blocksparse.pad_seq(q_segment_ids.astype(jnp.int32), chunk_len)
  kv_ids = blocksparse.pad_seq(kv_segment_ids.astype(jnp.int32), block_kv)
  batch, nq, nk = q.shape[0], q_ids.shape[1] // block_q, kv_ids.shape[1] // block_kv
  active = blocksparse.block_map(q_ids.reshape(batch, nq, block_q), kv_ids.reshape(batch, nk, block_kv))
  # A query block with nothing to attend to still runs one (fully masked) block: no 0/0 in splash.
  lonely = ~active.any(-1, keepdims=True)
  active = active | (lonely & (jnp.arange(nk) == 0))
  sizes = splash_kernel.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      **(dict(use_fused_bwd_kernel=True) if fused else dict(block_q_dq=block_q, block_kv_dq=block_kv)))
  to_hld = lambda x, mult: blocksparse.pad_seq(x, mult).transpose(0, 2, 1, 3)
  q_hld = to_hld(q * q.shape[-1] ** -0.5, chunk_len)
  k_hld, v_hld = to_hld(k, block_kv), to_hld(v, block_kv)

  def one_call(q_, k_, v_, q_ids_, kv_ids_, active_):
    fwd = _mask_info(active_, transpose=False)
    kernel = splash_kernel.SplashAttentionKernel(
        fwd, None if fused else fwd, _mask_info(active_, transpose=True), block_sizes=sizes, is_mqa=False,
        save_residuals=False, mask_value=splash_kernel.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
        residual_checkpoint_name=residual_name, mask_function=None, interpret=interpret)
    # Padding queries get id -1: splash would otherwise let them attend to padding keys (id 0).
    ids = splash_kernel.SegmentIds(q=jnp.where(q_ids_ > 0, q_ids_, -1), kv=kv_ids_)
    return kernel(q_, k_, v_, segment_ids=ids)

  def one_row(args):
    q_, k_, v_, q_ids_, kv_ids_, active_ = args
    if chunks == 1:
      return one_call(q_, k_, v_, q_ids_, kv_ids_, active_)
    # Every chunk attends to all of k and v; their gradients sum over the chunks in the map's backward,
    # in f32 (the map accumulates a closed-over array's cotangent in that array's dtype).
    k32, v32 = k_.astype(jnp.float32), v_.astype(jnp.float32)
    def one_chunk(c):
      q_c, ids_c, active_c = c
      return one_call(q_c, k32.astype(k_.dtype), v32.astype(v_.dtype), ids_c, kv_ids_, active_c)
    q_c = q_.reshape(heads, chunks, chunk_len, head_dim).transpose(1, 0, 2, 3)
    out = jax.lax.map(one_chunk, (q_c, q_ids_.reshape(chunks, chunk_len),
                                  active_.reshape(chunks, nq // chunks, nk)))
    return out.transpose(1, 0, 2, 3).reshape(heads, chunks * chunk_len, head_dim)

  out = jax.lax.map(one_row, (q_hld, k_hld, v_hld, q_ids, kv_ids, active))
  out = out.transpose(0, 2, 1, 3)[:, :lq]
  return jnp.where((q_segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)
