"""Block-sparse segment attention in plain JAX: packed rows pay for their segments, not for the row.

A packed row of k segments of length l costs about k * l^2 here instead of (k * l)^2. The sequence is cut
into blocks; a (query block, key block) pair is *active* when the id ranges of the two blocks overlap.
Packed rows have contiguous, increasing segment ids, so the active key blocks of a query block form a
contiguous window `[first, first + width)` (and likewise the active query blocks of a key block). Blocks
are sorted by window width and stepped in small groups: step `t` of a group computes, for each of its
blocks, the flash-attention update against partner block `first + t`, as one batched matmul, and a group
stops after its own widest window (a while loop with a dynamic trip count). Shapes stay static under jit,
only gathers are used (no scatters), and mixed segment lengths cost about their active block pairs.
Ids that are not contiguous stay correct (the window covers every overlap and masking inside a block is
exact); they only cost more.

Memory is O(L) plus the O((L / block)^2) boolean block map: the backward pass recomputes the logits block
by block from the saved log-sum-exp (FlashAttention-2: one sweep for dq over key windows, one for dk and
dv over query windows), so nothing of size Lq * Lk is ever stored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Finite so that fully masked rows give exp(NEG - NEG) = 1 rescales instead of NaNs.
_NEG = -1e30


def pad_seq(x: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads axis 1 (the sequence) up to a multiple of `multiple`."""
  pad = -x.shape[1] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)


def _to_blocks(x_blhd, block: int):
  """[B, L, H, D] -> [B, n, H, block, D]: batch, block and head lead so block matmuls need no transposes."""
  b, l, h, d = x_blhd.shape
  return x_blhd.reshape(b, l // block, block, h, d).transpose(0, 1, 3, 2, 4)


def _from_blocks(x_bnhcd):
  b, n, h, c, d = x_bnhcd.shape
  return x_bnhcd.transpose(0, 1, 3, 2, 4).reshape(b, n * c, h, d)


def _id_ranges(ids_bnc):
  """Smallest and largest non-padding id of each block; an all-padding block gets an empty range."""
  lo = jnp.where(ids_bnc > 0, ids_bnc, jnp.iinfo(jnp.int32).max).min(-1)
  hi = jnp.where(ids_bnc > 0, ids_bnc, -1).max(-1)
  return lo, hi


def block_map(q_ids_bnc: jax.Array, kv_ids_bmc: jax.Array) -> jax.Array:
  """[B, nq, nk] bool: True where a query block and a key block may share a segment (ranges overlap)."""
  q_lo, q_hi = _id_ranges(q_ids_bnc)
  k_lo, k_hi = _id_ranges(kv_ids_bmc)
  return (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])


def windows(active_bnm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each row of the block map: first active column and the width up to the last active one."""
  m = active_bnm.shape[-1]
  col = jnp.arange(m, dtype=jnp.int32)
  first = jnp.where(active_bnm, col, m).min(-1)
  last = jnp.where(active_bnm, col, -1).max(-1)
  width = jnp.maximum(last - first + 1, 0)
  return jnp.minimum(first, m - 1), width


def _take_blocks(x_bn, idx_bm):
  """x[b, idx[b, i]] for every b, i: the per-row gather of whole blocks.

  Written with vmap so the gather carries the batch as a batching dimension: XLA then partitions it
  along a sharded batch instead of all-gathering the operand onto every device.
  """
  return jax.vmap(lambda x, i: x[i])(x_bn, idx_bm)


def _mask(q_ids_bnc, kv_ids_bnc, valid_bn):
  """[B, n, 1, cq, ck]: same non-padding segment, inside the window."""
  same = q_ids_bnc[:, :, :, None] == kv_ids_bnc[:, :, None, :]
  keep = same & (q_ids_bnc > 0)[:, :, :, None] & valid_bn[:, :, None, None]
  return keep[:, :, None]


def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _sweep(first, width, num_partners, rows, step, init, *, max_window, group):
  """Runs `step` for every block over its window of partner blocks; returns the carries in block order.

  rows: pytree of per-block arrays [B, n, ...]; step(rows_c, partner_idx [B, c], valid [B, c], carry_c)
  works on a group of c blocks at a time; init(c) makes their initial carry. Blocks are sorted by window
  width and cut into groups of `group` blocks; each group loops only as long as its own widest window, so
  a row of mixed segment lengths costs about its active block pairs rather than blocks x widest window.
  With a static `max_window` there is one group and the steps are unrolled.
  """
  n = width.shape[1]
  chunks = 1 if max_window is not None else -(-n // group)
  order = jnp.argsort(-width, axis=1, stable=True)
  first_s, width_s = _take_blocks(first, order), _take_blocks(width, order)
  rows_s = jax.tree.map(lambda x: _take_blocks(x, order), rows)
  bounds = sorted(set(np.linspace(0, n, min(chunks, n) + 1).round().astype(int).tolist()))
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    f, w = first_s[:, lo:hi], width_s[:, lo:hi]
    rows_c = jax.tree.map(lambda x, lo=lo, hi=hi: x[:, lo:hi], rows_s)

    def body(t, carry, f=f, w=w, rows_c=rows_c):
      return step(rows_c, jnp.minimum(f + t, num_partners - 1), t < w, carry)

    carry = init(hi - lo)
    if max_window is None:
      carry = lax.fori_loop(0, w[:, 0].max(), body, carry)  # sorted: column 0 is the widest
    else:
      for t in range(max_window):
        carry = body(t, carry)
    outs.append(carry)
  carry_s = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *outs)
  inverse = jnp.argsort(order, axis=1)
  return jax.tree.map(lambda x: _take_blocks(x, inverse), carry_s)


def _overflow_to_nan(x, widths, max_window):
  """A wrong `max_window` must not pass silently: any wider window turns the result into NaNs."""
  if max_window is None:
    return x
  too_wide = functools.reduce(jnp.logical_or, [w.max() > max_window for w in widths])
  return jnp.where(too_wide, jnp.nan, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_ids, kv_ids, block_q, block_k, max_window, group):
  return _forward(q, k, v, q_ids, kv_ids, block_q, block_k, max_window, group)[0]


def _forward(q, k, v, q_ids, kv_ids, block_q, block_k, max_window, group):
  scale = q.shape[-1] ** -0.5
  q_b, k_b, v_b = _to_blocks(q, block_q), _to_blocks(k, block_k), _to_blocks(v, block_k)
  batch, nq, heads, _, dim = q_b.shape
  q_ids_b = q_ids.reshape(batch, nq, block_q)
  kv_ids_b = kv_ids.reshape(batch, -1, block_k)
  active = block_map(q_ids_b, kv_ids_b)
  first, width = windows(active)

  def step(rows, j, valid, carry):
    q_c, q_ids_c = rows
    o, m, l = carry
    mask = _mask(q_ids_c, _take_blocks(kv_ids_b, j), valid)
    s = _dot("bnhqd,bnhkd->bnhqk", q_c, _take_blocks(k_b, j)) * scale
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    o = alpha[..., None] * o + _dot("bnhqk,bnhkd->bnhqd", p.astype(v.dtype), _take_blocks(v_b, j))
    return o, m_new, l

  def init(c):
    return (jnp.zeros((batch, c, heads, block_q, dim), jnp.float32),
            jnp.full((batch, c, heads, block_q), _NEG, jnp.float32),
            jnp.zeros((batch, c, heads, block_q), jnp.float32))

  o, m, l = _sweep(first, width, kv_ids_b.shape[1], (q_b, q_ids_b), step, init,
                   max_window=max_window, group=group)
  has_keys = l > 0
  o = o / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
  out = _from_blocks(o).astype(q.dtype)
  if max_window is not None:
    out = _overflow_to_nan(out, (width, windows(jnp.swapaxes(active, 1, 2))[1]), max_window)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _backward(block_q, block_k, max_window, group, res, dout):
  q, k, v, q_ids, kv_ids, out, lse = res
  scale = q.shape[-1] ** -0.5
  q_b, k_b, v_b = _to_blocks(q, block_q), _to_blocks(k, block_k), _to_blocks(v, block_k)
  do_b = _to_blocks(dout, block_q)
  batch, nq, heads, _, dim = q_b.shape
  nk = k_b.shape[1]
  q_ids_b = q_ids.reshape(batch, nq, block_q)
  kv_ids_b = kv_ids.reshape(batch, nk, block_k)
  # delta = rowsum(dO * O): the softmax-Jacobian term shared by every key of a query.
  delta = jnp.einsum("bnhqd,bnhqd->bnhq", do_b.astype(jnp.float32),
                     _to_blocks(out, block_q).astype(jnp.float32))
  active = block_map(q_ids_b, kv_ids_b)

  def probs_and_dlogits(qq, kk, vv, dd, lse_, delta_, mask):
    s = _dot("bnhqd,bnhkd->bnhqk", qq, kk) * scale
    p = jnp.where(mask, jnp.exp(s - lse_[..., None]), 0.0)
    dp = _dot("bnhqd,bnhkd->bnhqk", dd, vv)
    return p, p * (dp - delta_[..., None])

  # dq: each query block walks its window of key blocks.
  first_k, width_k = windows(active)

  def dq_step(rows, j, valid, dq):
    q_c, do_c, lse_c, delta_c, q_ids_c = rows
    mask = _mask(q_ids_c, _take_blocks(kv_ids_b, j), valid)
    kk = _take_blocks(k_b, j)
    _, ds = probs_and_dlogits(q_c, kk, _take_blocks(v_b, j), do_c, lse_c, delta_c, mask)
    return dq + _dot("bnhqk,bnhkd->bnhqd", ds.astype(k.dtype), kk)

  dq = _sweep(first_k, width_k, nk, (q_b, do_b, lse, delta, q_ids_b), dq_step,
              lambda c: jnp.zeros((batch, c, heads, block_q, dim), jnp.float32),
              max_window=max_window, group=group) * scale

  # dk, dv: each key block walks its window of query blocks (blocks indexed by the key block here).
  first_q, width_q = windows(jnp.swapaxes(active, 1, 2))

  def dkv_step(rows, i, valid, carry):
    k_c, v_c, kv_ids_c = rows
    dk, dv = carry
    mask = _mask(_take_blocks(q_ids_b, i), kv_ids_c, valid)
    qq, dd = _take_blocks(q_b, i), _take_blocks(do_b, i)
    p, ds = probs_and_dlogits(qq, k_c, v_c, dd, _take_blocks(lse, i), _take_blocks(delta, i), mask)
    dv = dv + _dot("bnhqk,bnhqd->bnhkd", p.astype(dout.dtype), dd)
    dk = dk + _dot("bnhqk,bnhqd->bnhkd", ds.astype(q.dtype), qq)
    return dk, dv

  zeros = lambda c: jnp.zeros((batch, c, heads, block_k, dim), jnp.float32)
  dk, dv = _sweep(first_q, width_q, nq, (k_b, v_b, kv_ids_b), dkv_step, lambda c: (zeros(c), zeros(c)),
                  max_window=max_window, group=group)
  dq = _from_blocks(dq).astype(q.dtype)
  dk = _from_blocks(dk * scale).astype(k.dtype)
  dv = _from_blocks(dv).astype(v.dtype)
  return dq, dk, dv, None, None


_attention.defvjp(_forward, _backward)


def max_window(q_segment_ids: np.ndarray, kv_segment_ids: np.ndarray, block_q: int,
               block_k: int) -> int:
  """The widest block window of concrete (numpy) ids in either direction: a valid `max_window`."""
  q_ids = np.asarray(pad_seq(jnp.asarray(q_segment_ids, jnp.int32), block_q))
  kv_ids = np.asarray(pad_seq(jnp.asarray(kv_segment_ids, jnp.int32), block_k))
  active = block_map(q_ids.reshape(q_ids.shape[0], -1, block_q),
                     kv_ids.reshape(kv_ids.shape[0], -1, block_k))
  return int(max(windows(active)[1].max(), windows(jnp.swapaxes(active, 1, 2))[1].max()))


def blocksparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                          kv_segment_ids: jax.Array, *, block_q: int = 64, block_k: int = 64,
                          max_window: int | None = None, group: int = 4,
                          merge_rows: bool | None = None) -> jax.Array:
  """Segment attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` computing only active blocks.

  Same contract as the dense reference: a query attends to keys of its own segment id, padding (id 0)
  queries return zeros. Lq and Lk need not be multiples of the block sizes (padding is added and removed
  here); blocks shrink to the padded lengths of short sequences.

  `max_window` (static) replaces the while loops by that many unrolled steps: for rows whose longest
  segment is bounded by the data config (`max_window` then follows from it), it lets XLA schedule and
  count the work (cost_analysis counts a while-loop body once). Rows with a wider window return NaNs.
  `group`: blocks stepped together (smaller groups follow mixed segment lengths more closely, larger
  ones batch more work per step). 64-token blocks in groups of 4 were fastest on this CPU
  (docs/history.md, Issue 9).
  `merge_rows`: sweep the batch's rows as one long row (ids kept apart), so that the blocks of all rows
  are sorted and grouped together and the batch costs the sum of its rows' active block pairs; unmerged,
  every row steps as long as the row with the widest window in each group. None = merge on a single
  device: under a sharded batch the merged row would gather every device's rows.
  """
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
  lq, lk = q.shape[1], k.shape[1]
  block_q = min(block_q, -(-lq // 8) * 8)
  block_k = min(block_k, -(-lk // 8) * 8)
  q_ids = pad_seq(q_segment_ids.astype(jnp.int32), block_q)
  kv_ids = pad_seq(kv_segment_ids.astype(jnp.int32), block_k)
  q, k, v = pad_seq(q, block_q), pad_seq(k, block_k), pad_seq(v, block_k)
  batch = q.shape[0]
  if merge_rows is None:
    merge_rows = jax.device_count() == 1
  if merge_rows and batch > 1:
    # Row r's ids move up by r * (largest id + 1): rows never share an id, and ids still increase along
    # the merged row, so every window stays contiguous. Padding (0) stays 0.
    offset = (jnp.maximum(q_ids.max(), kv_ids.max()) + 1) * jnp.arange(batch, dtype=jnp.int32)[:, None]
    q_ids, kv_ids = [jnp.where(i > 0, i + offset, 0).reshape(1, -1) for i in (q_ids, kv_ids)]
    q, k, v = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v)]
  out = _attention(q, k, v, q_ids, kv_ids, block_q, block_k, max_window, group)
  return out.reshape(batch, -1, *out.shape[2:])[:, :lq]
