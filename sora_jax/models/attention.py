"""Segment-respecting attention: a token attends only to keys of its own packed segment.

`segment_attention` is the single dispatch point for every implementation; models call nothing else.
Implementations (all equal to "reference" within float rounding, forward and gradients):
- "reference": dense mask, O(Lq * Lk) memory; the ground truth.
- "blocksparse": plain JAX, computes only query/key blocks that share a segment (any backend; the CPU
  path). sora_jax/kernels/blocksparse.py.
- "splash": TPU Pallas splash attention driven by a per-row block map built from the segment ids.
  sora_jax/kernels/splash.py.
- "gpu": GPU Pallas (Triton) flash attention that walks only the key blocks sharing a segment.
  sora_jax/kernels/gpu.py.
- "auto": "splash" on TPU, "gpu" on GPU, "blocksparse" elsewhere (decided by jax.default_backend()).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax import sharding

# Pallas kernels are custom calls XLA cannot partition: they run per device block (sharding.per_shard),
# batch over the data axes and heads over `tensor`, like the activations around them.
_KERNEL_NAMES = (("act_batch", "act_seq", "act_heads", None),) * 3 + (("act_batch", "act_seq"),) * 2


def _reference(q, k, v, q_segment_ids, kv_segment_ids):
  """Dense-mask attention: O(Lq * Lk) memory; the ground truth the kernels are tested against."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] > 0)
  logits = jnp.where(mask[:, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  # A query with no valid key (padding) gets all-masked logits; zero it instead of a uniform average.
  probs = jnp.where(mask[:, None].any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _blocksparse(q, k, v, q_segment_ids, kv_segment_ids):
  from sora_jax.kernels import blocksparse
  return blocksparse.blocksparse_attention(q, k, v, q_segment_ids, kv_segment_ids)


def _splash(q, k, v, q_segment_ids, kv_segment_ids):
  from sora_jax.kernels import splash
  return sharding.per_shard(splash.splash_attention, q, k, v, q_segment_ids, kv_segment_ids,
                            names=_KERNEL_NAMES)


def _gpu(q, k, v, q_segment_ids, kv_segment_ids):
  from sora_jax.kernels import gpu
  return sharding.per_shard(gpu.gpu_attention, q, k, v, q_segment_ids, kv_segment_ids,
                            names=_KERNEL_NAMES)


_IMPLEMENTATIONS = {"reference": _reference, "blocksparse": _blocksparse, "splash": _splash,
                    "gpu": _gpu}
_AUTO = {"tpu": "splash", "gpu": "gpu"}


def resolve(implementation: str) -> str:
  """The concrete implementation name for `implementation` on the current default backend."""
  if implementation == "auto":
    return _AUTO.get(jax.default_backend(), "blocksparse")
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown; "
                     f"accepted: {sorted(_IMPLEMENTATIONS) + ['auto']}")
  return implementation


def segment_attention(q, k, v, q_segment_ids, kv_segment_ids, *, implementation: str = "reference"):
  """Attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` restricted to equal segment ids.

  Segment id 0 is padding: its queries return zeros and its keys are never attended to.
  """
  return _IMPLEMENTATIONS[resolve(implementation)](q, k, v, q_segment_ids, kv_segment_ids)
