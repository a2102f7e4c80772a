"""All-to-all (DeepSpeed-Ulysses) attention over a sequence mesh axis (`context` or `sequence`).

The sequence is sharded over the n devices of the axis everywhere but in attention. Here one all-to-all
trades the sequence sharding for a head sharding: each device then holds the whole sequence for H/n of
the heads, runs any local segment-attention kernel over it (block-sparse, splash, the GPU kernel: no
change to the kernel), and a second all-to-all trades back. The segment ids (small) are all-gathered.
Gradients are those of the collectives (an all-to-all transposes to the reverse all-to-all).

Needs the heads on each device (H, or H / tensor under tensor parallelism) to be divisible by n, and
holds one full-length sequence of H/n heads per device: see docs/context_parallel.md for when this beats
ring attention.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax import lax


def ulysses_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                            kv_segment_ids: jax.Array, *, axis_name: str, axis_size: int,
                            local_fn: Callable[..., jax.Array]) -> jax.Array:
  """The per-device body (call inside shard_map): q `[B, Lq/n, H, D]`, k, v `[B, Lk/n, H, D]` are this
  device's sequence shards; `local_fn(q, k, v, q_ids, kv_ids)` is single-device segment attention.
  Returns this device's sequence shard of the output."""
  heads = q.shape[2]
  if heads % axis_size:
    raise ValueError(f"ulysses attention needs the {heads} heads per device divisible by the "
                     f"context axis size {axis_size}; use ring attention instead")
  # [B, L/n, H, D] -> [B, L, H/n, D]: split the heads, gather the sequence (in device order).
  to_heads = lambda x: lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
  gather = lambda ids: lax.all_gather(ids, axis_name, axis=1, tiled=True)
  out = local_fn(to_heads(q), to_heads(k), to_heads(v), gather(q_segment_ids), gather(kv_segment_ids))
  return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
