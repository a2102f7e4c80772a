"""Segment-respecting attention: a token attends only to keys of its own packed segment.

`segment_attention` is the single dispatch point for every implementation; models call nothing else.
Two independent choices (config `dit.attention` and `dit.context`): the local kernel, and how a sequence
sharded over the `context` mesh axis is attended. Local kernels (all equal to "reference" within float
rounding, forward and gradients):
- "reference": dense mask, O(Lq * Lk) memory; the ground truth.
- "blocksparse": plain JAX, computes only query/key blocks that share a segment (any backend; the CPU
  path). sora_jax/kernels/blocksparse.py.
- "splash": TPU Pallas splash attention driven by a per-row block map built from the segment ids.
  sora_jax/kernels/splash.py.
- "gpu": GPU Pallas (Triton) flash attention that walks only the key blocks sharing a segment.
  sora_jax/kernels/gpu.py.
- "auto": "splash" on TPU, "gpu" on GPU, "blocksparse" elsewhere (decided by jax.default_backend()).
Context parallelism (issue 11), for sequences sharded over a mesh axis (`context`, or `sequence`, which
also shards the parameters; sharding.sequence_axis):
- "none": the sequence is whole on every device (the local kernel alone).
- "ring": ring attention rotates key/value shards around the axis (sora_jax/kernels/ring.py, its own
  block-sparse kernel per pair of shards).
- "ulysses": all-to-all attention swaps sequence for head sharding around the local kernel
  (sora_jax/kernels/ulysses.py).
Without such an axis (or for cross-attention, whose keys are not sharded) "ring" and "ulysses" run the
local kernel on each device's query shard against all keys.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sora_jax import sharding
from sora_jax.kernels import RESIDUAL_NAME

# Pallas kernels are custom calls XLA cannot partition: they run per device block (sharding.per_shard),
# batch over the data axes and heads over `tensor`, like the activations around them. The sequence is
# whole per device (a kernel on a sequence shard would drop the keys of the other shards).
_KERNEL_NAMES = (("act_batch", None, "act_heads", None),) * 3 + (("act_batch", None),) * 2
_CONTEXT_NAMES = (("act_batch", "act_seq", "act_heads", None),) * 3 + (("act_batch", "act_seq"),) * 2


def _reference(q, k, v, q_segment_ids, kv_segment_ids, residual_name=None):
  """Dense-mask attention: O(Lq * Lk) memory; the ground truth the kernels are tested against. Plain XLA
  (as is blocksparse): no kernel residuals to name, so `residual_name` is unused."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] > 0)
  logits = jnp.where(mask[:, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  # A query with no valid key (padding) gets all-masked logits; zero it instead of a uniform average.
  probs = jnp.where(mask[:, None].any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _blocksparse(q, k, v, q_segment_ids, kv_segment_ids, residual_name=None):
  from sora_jax.kernels import blocksparse
  return blocksparse.blocksparse_attention(q, k, v, q_segment_ids, kv_segment_ids)


def _splash(q, k, v, q_segment_ids, kv_segment_ids, residual_name=RESIDUAL_NAME):
  return sharding.per_shard(_local_kernel("splash", residual_name), q, k, v, q_segment_ids,
                            kv_segment_ids, names=_KERNEL_NAMES)


def _gpu(q, k, v, q_segment_ids, kv_segment_ids, residual_name=RESIDUAL_NAME):
  return sharding.per_shard(_local_kernel("gpu", residual_name), q, k, v, q_segment_ids,
                            kv_segment_ids, names=_KERNEL_NAMES)


def _local_kernel(name: str, residual_name: str = RESIDUAL_NAME):
  """The single-device function of a local implementation, for use inside shard_map; a Pallas kernel
  names its forward residuals `residual_name`."""
  if name == "splash":
    from sora_jax.kernels import splash
    return functools.partial(splash.splash_attention, residual_name=residual_name)
  if name == "gpu":
    from sora_jax.kernels import gpu
    return functools.partial(gpu.gpu_attention, residual_name=residual_name)
  return {"reference": _reference, "blocksparse": _blocksparse}[name]


def _context_parallel(kind, local, q, k, v, q_segment_ids, kv_segment_ids, residual_name=RESIDUAL_NAME):
  """Ring or all-to-all attention over the sequence axis of the current mesh around the resolved local
  kernel `local` (see the docstring)."""
  from sora_jax.kernels import ring, ulysses
  mesh = sharding.current_mesh()
  axis = sharding.sequence_axis(mesh)
  if axis is None:
    return _IMPLEMENTATIONS[local](q, k, v, q_segment_ids, kv_segment_ids, residual_name)
  n = mesh.shape[axis]
  args = (q, k, v, q_segment_ids, kv_segment_ids)
  specs = [sharding.spec_for_shape(nm, x.shape, mesh) for nm, x in zip(_CONTEXT_NAMES, args)]
  if specs[0][1] != axis:
    raise ValueError(f"{kind} attention: query length {q.shape[1]} is not divisible by the {axis} "
                     f"axis size {n}")
  if specs[1][1] != axis or q.shape[1] != k.shape[1]:
    # Keys not sharded like the queries (cross-attention to a short caption row): every device attends
    # its query shard to all keys.
    specs = specs[:1] + [P(s[0], None, *s[2:]) for s in specs[1:3]] + [specs[3], P(specs[4][0], None)]
    body = _local_kernel(local, residual_name)
  elif kind == "ring" or (q.shape[2] // (mesh.shape["tensor"] if specs[0][2] else 1)) % n:
    # Ulysses needs each device's heads divisible by n; other attentions (a text encoder with fewer
    # heads) take the ring.
    body = functools.partial(ring.ring_attention_shard, axis_name=axis, axis_size=n)
  else:
    body = functools.partial(ulysses.ulysses_attention_shard, axis_name=axis, axis_size=n,
                             local_fn=_local_kernel(local, residual_name))
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0],
                       check_vma=False)(*args)


_IMPLEMENTATIONS = {"reference": _reference, "blocksparse": _blocksparse, "splash": _splash, "gpu": _gpu}
_AUTO = {"tpu": "splash", "gpu": "gpu"}
CONTEXT = ("none", "ring", "ulysses")


def resolve(implementation: str) -> str:
  """The concrete implementation name for `implementation` on the current default backend."""
  if implementation == "auto":
    return _AUTO.get(jax.default_backend(), "blocksparse")
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown; "
                     f"accepted: {sorted(_IMPLEMENTATIONS) + ['auto']}")
  return implementation


def check_context(context: str) -> str:
  """`context` if it names a context parallelism (CONTEXT), else ValueError naming what is accepted."""
  if context not in CONTEXT:
    raise ValueError(f"context parallelism {context!r} is unknown; accepted: {list(CONTEXT)}")
  return context


def segment_attention(q, k, v, q_segment_ids, kv_segment_ids, *, implementation: str = "reference",
                      context: str = "none", residual_name: str = RESIDUAL_NAME):
  """Attention of q `[B, Lq, H, D]` over k, v `[B, Lk, H, D]` restricted to equal segment ids, by the local
  kernel `implementation`, over a sequence sharded by `context` ("none": not sharded).

  Segment id 0 is padding: its queries return zeros and its keys are never attended to. The Pallas
  kernels name their forward residuals `residual_name` (kernels.RESIDUAL_NAME or CROSS_RESIDUAL_NAME)
  for remat policies to save.
  """
  local = resolve(implementation)
  if check_context(context) != "none":
    return _context_parallel(context, local, q, k, v, q_segment_ids, kv_segment_ids, residual_name)
  return _IMPLEMENTATIONS[local](q, k, v, q_segment_ids, kv_segment_ids, residual_name)
