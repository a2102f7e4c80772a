"""Context parallelism (issue 11): ring and all-to-all attention over a sharded sequence equal the
single-device dense reference, forward and gradients, on 8 fake CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import sharding
from sora_jax.models.attention import segment_attention


def _packed_ids(lengths_per_row, seq_len):
  """Rows of contiguous segments 1, 2, ... with the given lengths, then padding (0)."""
  rows = []
  for lengths in lengths_per_row:
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(seq_len)])
    rows.append(ids[:seq_len])
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(ids, heads, dim, seed=0):
  b, l = ids.shape
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q, k, v, w = (jax.random.normal(key, (b, l, heads, dim), jnp.float32) for key in (kq, kk, kv, kw))
  return q, k, v, w


def _loss(q, k, v, w, ids, *, implementation, context):
  out = segment_attention(q, k, v, ids, ids, implementation=implementation, context=context)
  return jnp.sum(out * w), out


def _value_and_grads(q, k, v, w, ids, implementation, context):
  fn = jax.value_and_grad(functools.partial(_loss, implementation=implementation, context=context),
                          argnums=(0, 1, 2), has_aux=True)
  (_, out), grads = fn(q, k, v, w, ids)
  return out, grads


def _check(context, mesh_shape, ids, heads, dim=8):
  q, k, v, w = _inputs(ids, heads, dim)
  want_out, want_grads = jax.jit(functools.partial(_value_and_grads, implementation="reference",
                                                   context="none"))(q, k, v, w, ids)
  mesh = sharding.make_mesh(mesh_shape)
  with sharding.use_mesh(mesh):
    step = jax.jit(functools.partial(_value_and_grads, implementation="auto", context=context))
    hlo = step.lower(q, k, v, w, ids).as_text()
    # The sequence really is sharded: the attention talks along the ring / all-to-all, no fallback.
    assert {"ring": "collective_permute", "ulysses": "all_to_all"}[context] in hlo
    got_out, got_grads = jax.block_until_ready(step(q, k, v, w, ids))  # >2 fake devices: block
  np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=2e-5)
  for got, want, name in zip(got_grads, want_grads, "qkv"):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")
  # Padding queries (id 0) return zeros and get no gradient.
  pad = np.asarray(ids) == 0
  assert np.all(np.asarray(got_out)[pad] == 0)


# Shards are 64 tokens (context 4, L 256) or 32 (context 8): segments straddle shard boundaries, one
# row has a segment spanning every shard, rows end in padding.
ROWS = [[100, 7, 60, 50], [256], [30, 30, 3, 120]]


@pytest.mark.parametrize("context", ["ring", "ulysses"])
def test_context_4_matches_reference(context):
  ids = _packed_ids(ROWS[:2], 256)
  _check(context, {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}, ids, heads=4)


@pytest.mark.parametrize("context", ["ring", "ulysses"])
def test_context_8_matches_reference(context):
  ids = _packed_ids(ROWS[2:], 256)
  _check(context, {"data": 1, "fsdp": 1, "context": 8, "tensor": 1}, ids, heads=8)


@pytest.mark.parametrize("context", ["ring", "ulysses"])
def test_dit_with_context_axis_matches_reference(context):
  """The whole DiT with its activations sharded over `context` (act_seq) equals the unsharded model:
  norms, modulation gathers, RoPE and cross-attention to the unsharded caption row all see a sharded
  sequence; the self-attention runs over the ring / all-to-all inside the jitted forward."""
  from flax import nnx
  from test_dit import make_segment, pack, random_model, tiny_cfg
  rng = np.random.default_rng(0)
  # 64 tokens in shards of 16: the second video straddles two shards, padding fills the last.
  segs = [make_segment(rng, (3, 2, 2), 5, 0.3), make_segment(rng, (2, 3, 4), 3, 0.9),
          make_segment(rng, (1, 2, 4), 7, 0.6)]
  row, _ = pack(segs, L=64, Lt=20, drop=(1,))
  row = {k: jnp.asarray(v) for k, v in row.items()}

  def forward(model, r):
    return model(r["x"], r["positions"], r["segment_ids"], r["t"], r["text_tokens"],
                 r["text_segment_ids"], cond=r["cond"], cond_mask=r["cond_mask"], text_drop=r["text_drop"])

  # 4 heads: Ulysses splits the heads of every attention (text encoder included) over the 4 devices.
  cfg = dict(width=48, num_heads=4, text_heads=4)
  want = nnx.jit(forward)(random_model(tiny_cfg(**cfg)), row)
  model = random_model(tiny_cfg(attention="auto", context=context, **cfg))
  with sharding.use_mesh(sharding.make_mesh({"data": 1, "fsdp": 2, "context": 4})):
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, r: forward(nnx.merge(graphdef, s), r))
    hlo = step.lower(state, row).as_text()
    got = jax.block_until_ready(step(state, row))
  assert {"ring": "collective_permute", "ulysses": "all_to_all"}[context] in hlo
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  assert np.abs(np.asarray(want)).max() > 1e-2


def test_ring_program_does_not_grow_with_the_ring():
  """The hops are loops, not unrolled: the lowered step has as many permutes and loops for a ring of 8
  as for a ring of 4 (unrolled, 32 hops made a minute-long row's step 38 MB of StableHLO)."""
  ids = _packed_ids(ROWS[:2], 256)
  q, k, v, w = _inputs(ids, heads=8, dim=8)
  step = jax.jit(functools.partial(_value_and_grads, implementation="auto", context="ring"))
  counts = []
  for n in (4, 8):
    with sharding.use_mesh(sharding.make_mesh({"data": 8 // n, "fsdp": 1, "context": n, "tensor": 1})):
      hlo = step.lower(q, k, v, w, ids).as_text()
    counts.append((hlo.count("collective_permute"), hlo.count("stablehlo.while")))
  assert counts[0] == counts[1], counts
  assert counts[0][0] > 0
