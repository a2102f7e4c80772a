"""TPU segment attention: Pallas splash attention driven by a block map computed from the segment ids.

Splash attention skips a (query block, key block) pair only when its mask says the block is empty; given
segment ids alone it computes every block. The public dynamic-mask path would build a dense
[heads, Lq, Lk] mask (O(L^2) bytes). Here the per-row block map of `blocksparse.block_map` (O((L/128)^2)
bytes) becomes splash's MaskInfo directly: active blocks are marked "full" (2), so no dense mask blocks
exist at all, and the masking inside a block comes from splash's own segment-id test.
For skipped grid steps `data_next` repeats the nearest active block, so the pipeline issues no new copy.

Backward: splash's fused kernel (one pass over the key blocks computes dk, dv and per-key-block partial
dq: 5 block matmuls instead of the 7 of separate dkv and dq kernels, at the cost of a transient
[key blocks, heads, Lq, head_dim] partial-dq buffer). The kernel output and its logsumexp are named
`kernels.RESIDUAL_NAME`, so a remat policy that saves that name (models/layers.py) spares the backward pass
a second run of the forward kernel.

Contract differences smoothed over here: splash does not scale logits (q is scaled first), lets padding
queries attend to padding keys (padding query ids become -1, and their outputs are zeroed), and divides by
zero for a query block with no active key block (such a block gets one key block, fully masked).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

from sora_jax.kernels import RESIDUAL_NAME, blocksparse

# Splash tiles segment ids as [block, 128 lanes]: both block sizes must be multiples of 128.
_LANES = 128


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
                     interpret: bool = False) -> jax.Array:
  """Segment attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` with splash attention.

  Block sizes shrink to the padded sequence lengths; both must be multiples of 128. `interpret=True`
  runs the Pallas kernels on any backend (slowly), for tests.
  """
  if block_q % _LANES or block_kv % _LANES:
    raise ValueError(f"splash block sizes must be multiples of {_LANES}, got {block_q}, {block_kv}")
  lq, lk = q.shape[1], k.shape[1]
  block_q = min(block_q, -(-lq // _LANES) * _LANES)
  block_kv = min(block_kv, -(-lk // _LANES) * _LANES)
  q_ids = blocksparse.pad_seq(q_segment_ids.astype(jnp.int32), block_q)
  kv_ids = blocksparse.pad_seq(kv_segment_ids.astype(jnp.int32), block_kv)
  batch, nq, nk = q.shape[0], q_ids.shape[1] // block_q, kv_ids.shape[1] // block_kv
  active = blocksparse.block_map(q_ids.reshape(batch, nq, block_q), kv_ids.reshape(batch, nk, block_kv))
  # A query block with nothing to attend to still runs one (fully masked) block: no 0/0 in splash.
  lonely = ~active.any(-1, keepdims=True)
  active = active | (lonely & (jnp.arange(nk) == 0))
  sizes = splash_kernel.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      use_fused_bwd_kernel=True)
  to_hld = lambda x, mult: blocksparse.pad_seq(x, mult).transpose(0, 2, 1, 3)
  q_hld = to_hld(q * q.shape[-1] ** -0.5, block_q)
  k_hld, v_hld = to_hld(k, block_kv), to_hld(v, block_kv)

  def one_row(args):
    q_, k_, v_, q_ids_, kv_ids_, active_ = args
    fwd = _mask_info(active_, transpose=False)
    kernel = splash_kernel.SplashAttentionKernel(
        fwd, None, _mask_info(active_, transpose=True), block_sizes=sizes, is_mqa=False,
        save_residuals=False, mask_value=splash_kernel.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
        residual_checkpoint_name=RESIDUAL_NAME, mask_function=None, interpret=interpret)
    # Padding queries get id -1: splash would otherwise let them attend to padding keys (id 0).
    ids = splash_kernel.SegmentIds(q=jnp.where(q_ids_ > 0, q_ids_, -1), kv=kv_ids_)
    return kernel(q_, k_, v_, segment_ids=ids)

  out = jax.lax.map(one_row, (q_hld, k_hld, v_hld, q_ids, kv_ids, active))
  out = out.transpose(0, 2, 1, 3)[:, :lq]
  return jnp.where((q_segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)
