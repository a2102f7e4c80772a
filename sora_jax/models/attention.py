"""Segment-respecting attention: a token attends only to keys of its own packed segment.

`segment_attention` is the single dispatch point for every implementation; models call nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


_IMPLEMENTATIONS = {"reference": _reference}


def segment_attention(q, k, v, q_segment_ids, kv_segment_ids, *, implementation: str = "reference"):
  """Attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` restricted to equal segment ids.

  Segment id 0 is padding: its queries return zeros and its keys are never attended to.
  """
  try:
    fn = _IMPLEMENTATIONS[implementation]
  except KeyError:
    raise ValueError(f"attention implementation {implementation!r} is unknown; "
                     f"accepted: {sorted(_IMPLEMENTATIONS)}") from None
  return fn(q, k, v, q_segment_ids, kv_segment_ids)
