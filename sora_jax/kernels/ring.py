"""Ring attention over a sequence mesh axis (`context` or `sequence`): segment attention of a sequence
sharded over devices.

Each of the n devices along the axis holds one contiguous 1/n of the queries, keys and values. The key
and value blocks (with their segment ids) travel around the ring with `lax.ppermute`; at hop t device i
attends its queries to the block of device i - t with the block-sparse local kernel
(sora_jax/kernels/blocksparse.py), and folds the hop's flash-attention carry (unnormalised output,
running max, running sum) into its own, so the result is exact. A hop whose visiting block shares no
segment with the local queries (their segment-id ranges do not overlap) is skipped with `lax.cond`: in a
packed row of short videos most hops are skipped, in one long video none are.

The backward pass is the ring again: every hop recomputes its probabilities from the final log-sum-exp
(blocksparse's FlashAttention-2 backward), dq stays home, and dk/dv accumulators travel with their key
block and are back on their owner after n hops. Memory per device is O(L / n); nothing of size L is
gathered. The hops are a `lax.fori_loop` in each direction (the forward's last hop, which passes nothing
on, after it), so the program does not grow with n (unrolled, 32 hops made a minute-long row's step 38 MB
of StableHLO and 16 GB of host memory to compile); the loop body sends the visiting block on while it
computes with it, so XLA can overlap the permute with the hop's compute. XLA's cost model counts a loop
body once, so compile_check counts the ring's FLOPs by hand (flops.kernel_flops).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sora_jax.kernels import blocksparse as bs


def _ranges_overlap(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
  """Scalar bool: some row's query and key blocks may share a segment (their id ranges overlap)."""
  return bs.block_map(q_ids[:, None, :], kv_ids[:, None, :]).any()


def _local_carry(q_b, q_ids_b, k_b, v_b, kv_ids_b, group):
  """One hop's flash carry (o unnormalised, m, l) in blocksparse's block layout, from a fresh start."""
  scale = q_b.shape[-1] ** -0.5
  batch, _, heads, block_q, dim = q_b.shape
  first, width = bs.windows(bs.block_map(q_ids_b, kv_ids_b))

  def step(rows, j, valid, carry):
    q_c, q_ids_c = rows
    o, m, l = carry
    mask = bs._mask(q_ids_c, bs._take_blocks(kv_ids_b, j), valid)  # pylint: disable=protected-access
    s = bs._dot("bnhqd,bnhkd->bnhqk", q_c, bs._take_blocks(k_b, j)) * scale  # pylint: disable=protected-access
    s = jnp.where(mask, s, bs._NEG)  # pylint: disable=protected-access
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    o = alpha[..., None] * o + bs._dot("bnhqk,bnhkd->bnhqd", p.astype(v_b.dtype),  # pylint: disable=protected-access
                                       bs._take_blocks(v_b, j))  # pylint: disable=protected-access
    return o, m_new, l

  def init(c):
    return (jnp.zeros((batch, c, heads, block_q, dim), jnp.float32),
            jnp.full((batch, c, heads, block_q), bs._NEG, jnp.float32),  # pylint: disable=protected-access
            jnp.zeros((batch, c, heads, block_q), jnp.float32))

  return bs._sweep(first, width, kv_ids_b.shape[1], (q_b, q_ids_b), step, init,  # pylint: disable=protected-access
                   max_window=None, group=group)


def _merge(carry, hop):
  """Folds one hop's flash carry into the running one (both over disjoint key sets)."""
  o, m, l = carry
  o_h, m_h, l_h = hop
  m_new = jnp.maximum(m, m_h)
  a, a_h = jnp.exp(m - m_new), jnp.exp(m_h - m_new)
  return a[..., None] * o + a_h[..., None] * o_h, m_new, a * l + a_h * l_h


def _rotate(xs, axis_name: str, n: int):
  """Sends every array to the next device along the ring (device i -> i + 1)."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, q_ids, kv_ids, axis_name, n, block, group):
  return _ring_fwd(q, k, v, q_ids, kv_ids, axis_name, n, block, group)[0]


def _ring_fwd(q, k, v, q_ids, kv_ids, axis_name, n, block, group):
  batch, _, heads, dim = q.shape
  q_b = bs._to_blocks(q, block)  # pylint: disable=protected-access
  q_ids_b = q_ids.reshape(batch, -1, block)
  nq = q_b.shape[1]
  empty = lambda: (jnp.zeros((batch, nq, heads, block, dim), jnp.float32),
                   jnp.full((batch, nq, heads, block), bs._NEG, jnp.float32),  # pylint: disable=protected-access
                   jnp.zeros((batch, nq, heads, block), jnp.float32))

  def hop(carry, kv):
    k_t, v_t, ids_t = kv
    local = lambda: _local_carry(q_b, q_ids_b, bs._to_blocks(k_t, block), bs._to_blocks(v_t, block),  # pylint: disable=protected-access
                                 ids_t.reshape(batch, -1, block), group)
    return _merge(carry, lax.cond(_ranges_overlap(q_ids, ids_t), local, empty))

  # Hops 0 .. n - 2 pass their block on (the permute is in flight while the hop computes); the last
  # hop keeps it.
  carry, kv = lax.fori_loop(0, n - 1, lambda _, s: (hop(*s), _rotate(s[1], axis_name, n)),
                            (empty(), (k, v, kv_ids)))
  o, m, l = hop(carry, kv)
  has_keys = l > 0
  o = o / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
  out = bs._from_blocks(o).astype(q.dtype)  # pylint: disable=protected-access
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(axis_name, n, block, group, res, dout):
  q, k, v, q_ids, kv_ids, out, lse = res

  def hop(_, state):
    dq, (k_t, v_t, ids_t, dk_t, dv_t) = state

    def local():
      dq_h, dk_h, dv_h, _, _ = bs._backward(block, block, None, group,  # pylint: disable=protected-access
                                            (q, k_t, v_t, q_ids, ids_t, out, lse), dout)
      return dq_h.astype(jnp.float32), dk_h.astype(jnp.float32), dv_h.astype(jnp.float32)

    skip = lambda: (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                    jnp.zeros(v.shape, jnp.float32))
    dq_h, dk_h, dv_h = lax.cond(_ranges_overlap(q_ids, ids_t), local, skip)
    return dq + dq_h, _rotate((k_t, v_t, ids_t, dk_t + dk_h, dv_t + dv_h), axis_name, n)

  # dk/dv of the visiting block travel with it and are home again after n rotations.
  travel = (k, v, kv_ids, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, (_, _, _, dk, dv) = lax.fori_loop(0, n, hop, (jnp.zeros(q.shape, jnp.float32), travel))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                         kv_segment_ids: jax.Array, *, axis_name: str, axis_size: int,
                         block: int = 128, group: int = 4, max_groups: int = 8) -> jax.Array:
  """The per-device body (call inside shard_map): local q `[B, Lq/n, H, D]` and k, v `[B, Lk/n, H, D]`
  are this device's contiguous shards; returns this device's shard of the segment attention output.

  Every device's shard must have the same length (shard_map guarantees it); the shards are padded to a
  multiple of `block` here (padding ids are 0, so padded keys are never attended to). `group`: blocks
  stepped together by the local kernel (blocksparse.blocksparse_attention), raised so that a hop runs
  at most `max_groups` loops: a shard of 80k tokens is 640 blocks, and one loop per 4 of them would be
  hundreds of while loops per hop to compile.
  """
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"ring attention needs equal q and kv shard lengths, got {q.shape[1]} and {k.shape[1]}")
  lq = q.shape[1]
  block = min(block, -(-lq // 8) * 8)
  num_blocks = -(-lq // block)
  group = max(group, -(-num_blocks // max_groups))
  pad = lambda x: bs.pad_seq(x, block)
  out = _ring(pad(q), pad(k), pad(v), pad(q_segment_ids.astype(jnp.int32)),
              pad(kv_segment_ids.astype(jnp.int32)), axis_name, axis_size, block, group)
  return out[:, :lq]
