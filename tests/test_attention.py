"""Every segment-attention implementation equals the dense reference, forward and gradients, in f32."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from sora_jax.kernels import blocksparse
from sora_jax.models import attention, layers


def _ids(lengths, length):
  ids = np.zeros(length, np.int32)
  pos = 0
  for s, n in enumerate(lengths):
    ids[pos:pos + n] = s + 1
    pos += n
  return ids


def _inputs(batch, lq, lk, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda l: jnp.asarray(rng.normal(size=(batch, l, heads, dim)), jnp.float32)
  return make(lq), make(lk), make(lk), make(lq)


def _out_and_grads(fn, q, k, v, w, q_ids, kv_ids):
  def loss(q, k, v):
    out = fn(q, k, v, q_ids, kv_ids)
    return (out * w).sum(), out
  (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids, tol=1e-5):
  run = jax.jit(_out_and_grads, static_argnums=0)
  want, want_grads = run(attention._reference, q, k, v, w, jnp.asarray(q_ids), jnp.asarray(kv_ids))
  got, got_grads = run(fn, q, k, v, w, jnp.asarray(q_ids), jnp.asarray(kv_ids))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)
  for name, a, b in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(a, b, atol=tol, rtol=0, err_msg=f"d{name}")


# Rows with trailing padding, single-token segments (also at block edges), one segment filling the row.
_SELF_ROWS = [[37, 1, 1, 50, 7, 1], [1, 1, 100], [128]]
_TEXT_ROWS = [[5, 1, 9, 2, 1, 3], [4, 1, 20], [9]]


# merge_rows: the batch swept as one row (the single-device default) or row by row (tests see 8 devices).
@pytest.mark.parametrize("merge_rows", [False, True])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (8, 32), (64, 64)])
def test_blocksparse_self_attention_matches_reference(block_q, block_k, merge_rows):
  q, k, v, w = _inputs(3, 128, 128, 2, 16)
  ids = np.stack([_ids(r, 128) for r in _SELF_ROWS])
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=block_q, block_k=block_k,
                         merge_rows=merge_rows)
  _assert_matches_reference(fn, q, k, v, w, ids, ids)


@pytest.mark.parametrize("merge_rows", [False, True])
def test_blocksparse_cross_attention_matches_reference(merge_rows):
  q, k, v, w = _inputs(3, 128, 40, 2, 16)  # Lq != Lk, neither a multiple of the key block
  q_ids = np.stack([_ids(r, 128) for r in _SELF_ROWS])
  kv_ids = np.stack([_ids(r, 40) for r in _TEXT_ROWS])
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=32, block_k=16, merge_rows=merge_rows)
  _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids)


@pytest.mark.parametrize("merge_rows", [False, True])
def test_blocksparse_random_layouts_match_reference(merge_rows):
  rng = np.random.default_rng(1)
  rows = []
  for _ in range(4):
    lengths = rng.integers(1, 60, size=12)
    lengths = lengths[np.cumsum(lengths) <= 200]
    rows.append(_ids(lengths, 200))
  ids = np.stack(rows)
  q, k, v, w = _inputs(4, 200, 200, 1, 8, seed=2)
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=32, block_k=32, merge_rows=merge_rows)
  _assert_matches_reference(fn, q, k, v, w, ids, ids)


def test_blocksparse_static_window_matches_and_overflow_is_nan():
  q, k, v, w = _inputs(3, 128, 128, 2, 16)
  ids = np.stack([_ids(r, 128) for r in _SELF_ROWS])
  window = blocksparse.max_window(ids, ids, 32, 32)
  assert window == 4  # the 128-token segment spans all 4 blocks
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=32, block_k=32, max_window=window)
  _assert_matches_reference(fn, q, k, v, w, ids, ids)
  short = jax.jit(functools.partial(blocksparse.blocksparse_attention, block_q=32, block_k=32,
                                    max_window=window - 1))(q, k, v, ids, ids)
  assert np.isnan(np.asarray(short)).all()


def test_block_map_counts_only_shared_segment_blocks():
  # k aligned equal segments of l tokens in blocks of b: exactly k (l/b)^2 of (k l/b)^2 pairs are active.
  ids = np.repeat(np.arange(1, 9), 64)[None]
  active = blocksparse.block_map(jnp.asarray(ids).reshape(1, -1, 16), jnp.asarray(ids).reshape(1, -1, 16))
  assert int(active.sum()) == 8 * 4 ** 2
  # Padding blocks are never active.
  padded = np.concatenate([ids[:, :256], np.zeros((1, 256), np.int32)], axis=1)
  active = blocksparse.block_map(jnp.asarray(padded).reshape(1, -1, 16),
                                 jnp.asarray(padded).reshape(1, -1, 16))
  assert not bool(active[:, 16:].any()) and not bool(active[:, :, 16:].any())


def test_blocksparse_memory_does_not_grow_quadratically():
  def temp(fn, l):
    ids = jnp.asarray(np.repeat(np.arange(1, l // 64 + 1), 64)[None], jnp.int32)
    x = jax.ShapeDtypeStruct((1, l, 2, 16), jnp.float32)
    f = jax.grad(lambda q, k, v: fn(q, k, v, ids, ids).sum(), (0, 1, 2))
    return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=32, block_k=32)
  ratio = temp(fn, 512) / temp(fn, 256)
  ref_ratio = temp(attention._reference, 512) / temp(attention._reference, 256)
  assert ratio < 2.6 and ref_ratio > 3.5, (ratio, ref_ratio)


def test_segments_never_see_each_other():
  q, k, v, _ = _inputs(1, 64, 64, 1, 8)
  ids = jnp.asarray(_ids([20, 30], 64)[None])
  fn = jax.jit(functools.partial(blocksparse.blocksparse_attention, block_q=16, block_k=16))
  out = fn(q, k, v, ids, ids)
  # Change segment 2's keys and values: segment 1's outputs are untouched, padding stays zero.
  out2 = fn(q, k.at[:, 20:].multiply(3.0), v.at[:, 20:].add(1.0), ids, ids)
  np.testing.assert_array_equal(out[:, :20], out2[:, :20])
  assert not np.allclose(out[:, 20:50], out2[:, 20:50])
  assert not np.asarray(out2[:, 50:]).any()


def test_dispatch_names_and_errors():
  assert attention.resolve("auto") == "blocksparse"  # tests run on CPU
  with pytest.raises(ValueError, match="'flash'.*accepted"):
    attention.segment_attention(*_inputs(1, 8, 8, 1, 4)[:3], jnp.ones((1, 8)), jnp.ones((1, 8)),
                                implementation="flash")
  q, k, v, w = _inputs(2, 64, 24, 1, 8)
  q_ids = np.stack([_ids([10, 1, 30], 64), _ids([64], 64)])
  kv_ids = np.stack([_ids([5, 1, 10], 24), _ids([3], 24)])
  auto = functools.partial(attention.segment_attention, implementation="auto")
  _assert_matches_reference(auto, q, k, v, w, q_ids, kv_ids)


def test_gpu_kernels_interpret_match_reference():
  from sora_jax.kernels import gpu
  q, k, v, w = _inputs(2, 64, 64, 1, 16)
  ids = np.stack([_ids([20, 1, 30], 64), _ids([1, 1, 40], 64)])
  fn = functools.partial(gpu.gpu_attention, block_q=16, block_k=32, interpret=True)
  _assert_matches_reference(fn, q, k, v, w, ids, ids)


@pytest.mark.slow
def test_gpu_kernels_interpret_cross_attention_match_reference():
  from sora_jax.kernels import gpu
  q, k, v, w = _inputs(2, 64, 24, 2, 12)  # head dim 12 pads to 16
  q_ids = np.stack([_ids([20, 1, 30], 64), _ids([1, 1, 40], 64)])
  kv_ids = np.stack([_ids([4, 1, 7], 24), _ids([2, 3, 9], 24)])
  fn = functools.partial(gpu.gpu_attention, block_q=16, block_k=16, interpret=True)
  _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids)


def _splash_backward(monkeypatch, backward: str, lk: int = 256):
  """Forces splash_attention's backward: "fused" (these tiny rows' default), "chunked" (the fused kernel
  over query chunks of one block of 128, as for long rows) or "separate" dkv and dq kernels (a zero
  partial-dq budget: not even one query block fits)."""
  from sora_jax.kernels import splash
  if backward == "separate":
    monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 0)
  if backward == "chunked":  # one f32 query block of 128 against the row's key blocks of 128
    monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", -(-lk // 128) * 128 * 128 * 4)
  return splash


@pytest.mark.parametrize("backward", ["fused", "chunked", "separate"])
def test_splash_interpret_matches_reference(backward, monkeypatch):
  splash = _splash_backward(monkeypatch, backward)
  q, k, v, w = _inputs(2, 256, 256, 1, 128)
  ids = np.stack([_ids([100, 1, 1, 90], 256), _ids([256], 256)])
  fn = functools.partial(splash.splash_attention, block_q=128, block_kv=128, interpret=True)
  if backward == "chunked":
    assert splash.query_chunks(256, 256, 1, 128, block_q=128, block_kv=128, itemsize=4) == 2
  _assert_matches_reference(fn, q, k, v, w, ids, ids)


@pytest.mark.slow
def test_splash_interpret_query_chunks_pad_the_last_chunk(monkeypatch):
  # 300 queries = 3 blocks of 128; chunks of at most 2 blocks: 2 chunks of 2, the last block padding.
  from sora_jax.kernels import splash
  monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 2 * 2 * 2 * 128 * 128 * 4)  # 2 of 2 heads x 2 kv blocks
  assert splash.query_chunks(300, 200, 2, 128, block_q=128, block_kv=128, itemsize=4) == 2
  q, k, v, w = _inputs(2, 300, 200, 2, 128)
  q_ids = np.stack([_ids([100, 1, 1, 190], 300), _ids([1, 260], 300)])
  kv_ids = np.stack([_ids([10, 1, 3, 180], 200), _ids([7, 150], 200)])
  fn = functools.partial(splash.splash_attention, block_q=128, block_kv=128, interpret=True)
  _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["fused", "separate"])
def test_splash_interpret_cross_attention_matches_reference(backward, monkeypatch):
  splash = _splash_backward(monkeypatch, backward)
  q, k, v, w = _inputs(2, 256, 100, 2, 128)
  q_ids = np.stack([_ids([100, 1, 1, 90], 256), _ids([1, 200], 256)])
  kv_ids = np.stack([_ids([10, 1, 3, 20], 100), _ids([7, 50], 100)])
  fn = functools.partial(splash.splash_attention, block_q=128, block_kv=128, interpret=True)
  _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids)


def test_splash_short_keys_run_as_one_block_not_two_padded():
  # 300 keys: two blocks of 256 would compute 512 keys, one block of 384 (their 128-padded length) does;
  # cross-attention's 512 caption + 64 null tokens are one block of 640 keys, not 1024.
  from sora_jax.kernels import splash
  assert splash.block_sizes(256, 300, 128, 256) == (128, 384)
  assert splash.layout(16384, 576, 9, 128).lk_padded == 640
  assert splash.block_sizes(256, 256, 128, 128) == (128, 128)  # no padding saved: the requested blocks
  q, k, v, w = _inputs(2, 256, 300, 1, 128)
  q_ids = np.stack([_ids([100, 1, 1, 90], 256), _ids([1, 200], 256)])
  kv_ids = np.stack([_ids([10, 1, 3, 250], 300), _ids([7, 150], 300)])
  fn = functools.partial(splash.splash_attention, block_q=128, block_kv=256, interpret=True)
  _assert_matches_reference(fn, q, k, v, w, q_ids, kv_ids)


def _pallas_calls(jaxpr) -> list[str]:
  """Names of the live pallas_calls in `jaxpr` and its sub-jaxprs (scan, remat, ... bodies).

  Live as XLA's dead-code elimination sees it: jax's own DCE keeps every pallas_call, but XLA drops a
  side-effect-free custom call whose results nothing reads (a remat body can trace a kernel forward
  only for residuals that the policy saved). Sub-jaxprs count all their outputs as used.
  """
  names, live = [], {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if not eqn.effects and not any(v in live for v in eqn.outvars):
      continue
    live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    if eqn.primitive.name == "pallas_call":
      names.append(str(eqn.params["name"]))
      continue
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          names += _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          names += _pallas_calls(sub)
  return names


def _phases(names):
  return sorted(next(p for p in ("fwd", "dkv", "dq") if f"_{p}" in n) for n in names)


@pytest.mark.parametrize("backward,kernels", [("fused", ["dkv", "fwd"]), ("chunked", ["dkv", "fwd"]),
                                              ("separate", ["dkv", "dq", "fwd"])])
def test_splash_backward_is_one_fused_kernel_or_dkv_and_dq(backward, kernels, monkeypatch):
  splash = _splash_backward(monkeypatch, backward)
  q, k, v, w = _inputs(1, 256, 256, 1, 128)
  ids = jnp.asarray(_ids([100, 156], 256)[None])
  fn = functools.partial(splash.splash_attention, block_q=128, block_kv=128, interpret=True)
  grad = jax.grad(lambda q, k, v: (fn(q, k, v, ids, ids) * w).sum(), (0, 1, 2))
  assert _phases(_pallas_calls(jax.make_jaxpr(grad)(q, k, v).jaxpr)) == kernels


def test_splash_fused_backward_in_query_chunks_while_partial_dq_is_large():
  from sora_jax.kernels import splash
  # [key blocks, heads, Lq padded, head_dim] in q's dtype: 2 x 1 x 256 x 128 f32 for the tests' rows.
  assert splash.partial_dq_bytes(256, 200, 1, 128, block_q=128, block_kv=128, itemsize=4) == 2 * 256 * 128 * 4
  assert splash.partial_dq_bytes(300, 1000, 2, 64) == 2 * 2 * 384 * 64 * 2  # kv blocks of 512, Lq to 384
  # sora_b (16k rows, 9 heads of 128) runs every call whole (1.1 GiB of partial dq, 2.25 GiB in f32);
  # sora_xl's 64k rows (32 heads of 128: 64 GiB) run self-attention in 16 query chunks of 4 GiB, v6e's
  # 32k rows (16 GiB) in 4; cross-attention to 512 text tokens + 128 segments runs whole.
  assert splash.query_chunks(16384, 16384, 9, 128) == splash.query_chunks(16384, 576, 9, 128) == 1
  assert splash.query_chunks(16384, 16384, 9, 128, itemsize=4) == 1
  assert splash.query_chunks(65536, 65536, 32, 128) == 16 and splash.query_chunks(65536, 640, 32, 128) == 1
  assert splash.query_chunks(32768, 32768, 32, 128) == 4 and splash.query_chunks(512, 512, 8, 128) == 1
  assert splash.query_chunks(100, 512, 8, 128) == 1  # one short block
  # Chunks hold equal block counts: 5 blocks at 2 per chunk make 3 chunks (the last padded).
  one_block = splash.partial_dq_bytes(512, 65536, 32, 128)
  assert one_block == 128 * 32 * 512 * 128 * 2
  assert splash.query_chunks(5 * 512, 65536, 32, 128) == 1
  splash_max = splash.FUSED_BWD_MAX_BYTES
  try:
    splash.FUSED_BWD_MAX_BYTES = 2 * one_block
    assert splash.query_chunks(5 * 512, 65536, 32, 128) == 3
    splash.FUSED_BWD_MAX_BYTES = one_block - 1  # not even one query block: separate dkv and dq kernels
    assert splash.query_chunks(5 * 512, 65536, 32, 128) == 0
    assert not splash.layout(5 * 512, 65536, 32, 128).fused
  finally:
    splash.FUSED_BWD_MAX_BYTES = splash_max
  assert splash.layout(65536, 65536, 32, 128).fused


def _layer_grad(implementation: str, remat: str, x, ids):
  """d(loss)/d(params, x) of one residual self-attention layer run by the DiT's scan_layers/remat."""
  with nnx.use_eager_sharding(False):
    blocks = layers.stack_layers(
        lambda r: layers.Attention(128, 1, implementation=implementation, dtype=jnp.float32, rngs=r),
        1, nnx.Rngs(0))
  graph, params = nnx.split(blocks)

  def loss(params, x):
    h = layers.scan_layers(nnx.merge(graph, params), x, lambda blk, h: h + blk(h, ids, h, ids), remat)
    return (h * jnp.cos(h)).sum()
  return jax.grad(loss, (0, 1)), params


@pytest.mark.parametrize("implementation", ["splash", "splash_chunked", "gpu"])
def test_remat_policies_save_kernel_residuals(implementation, monkeypatch):
  # Under "dots" / "dots_saveable" the backward pass reuses the kernel's saved output and logsumexp:
  # the gradient holds the forward kernel once; "full" reruns it (so the count can see a rerun).
  # "splash_chunked": blocks of 128 and a partial-dq budget of one block, so the row runs in 2 query chunks.
  from sora_jax.kernels import gpu, splash
  blocks = {}
  if implementation == "splash_chunked":
    implementation, blocks = "splash", dict(block_q=128, block_kv=128)
    monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 2 * 128 * 128 * 4)
    assert splash.query_chunks(256, 256, 1, 128, itemsize=4, **blocks) == 2
  monkeypatch.setattr(splash, "splash_attention",
                      functools.partial(splash.splash_attention, interpret=True, **blocks))
  monkeypatch.setattr(gpu, "gpu_attention", functools.partial(gpu.gpu_attention, interpret=True))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 256, 128)), jnp.float32)
  ids = jnp.asarray(_ids([90, 1, 120], 256)[None])
  want_fwd = {"none": 1, "dots": 1, "dots_saveable": 1, "full_save_attention": 1, "full": 2}
  for remat, n in want_fwd.items():
    grad, params = _layer_grad(implementation, remat, x, ids)
    names = _pallas_calls(jax.make_jaxpr(grad)(params, x).jaxpr)
    assert _phases(names).count("fwd") == n, (remat, names)
  if implementation == "gpu":
    return  # the gradients of the GPU kernels are checked in interpret mode above; tracing is enough here
  grad, params = _layer_grad("reference", "none", x, ids)
  want = jax.jit(grad)(params, x)
  for remat in ("dots", "full_save_attention", "full"):
    grad, params = _layer_grad(implementation, remat, x, ids)
    got = jax.jit(grad)(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()), err_msg=remat)


class _SelfCross(nnx.Module):
  """The DiT block's two attentions: self over the row, cross (named apart for remat) to a short context."""

  def __init__(self, implementation, rngs):
    kw = dict(implementation=implementation, dtype=jnp.float32, rngs=rngs)
    self.attn = layers.Attention(128, 1, **kw)
    self.cross = layers.Attention(128, 1, cross=True, **kw)

  def __call__(self, h, ids, ctx, ctx_ids):
    h = h + self.attn(h, ids, h, ids)
    return h + self.cross(h, ids, ctx, ctx_ids)


def test_remat_saves_self_attention_and_reruns_cross_attention(monkeypatch):
  # "full_save_self_attention" keeps the self-attention kernel's residuals and runs the cross-attention
  # kernel again: 3 forward kernels in the gradient, against 2 when both are saved and 4 under "full";
  # the gradients equal the reference's under each.
  from sora_jax.kernels import splash
  monkeypatch.setattr(splash, "splash_attention",
                      functools.partial(splash.splash_attention, interpret=True, block_q=128, block_kv=128))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(1, 256, 128)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(1, 128, 128)), jnp.float32)
  ids = jnp.asarray(_ids([90, 1, 120], 256)[None])
  ctx_ids = jnp.asarray(_ids([40, 30, 50], 128)[None])

  def layer_grad(implementation, remat):
    with nnx.use_eager_sharding(False):
      blocks = layers.stack_layers(lambda r: _SelfCross(implementation, r), 1, nnx.Rngs(0))
    graph, params = nnx.split(blocks)
    def loss(params, x):
      h = layers.scan_layers(nnx.merge(graph, params), x, lambda blk, h: blk(h, ids, ctx, ctx_ids), remat)
      return (h * jnp.cos(h)).sum()
    return jax.grad(loss, (0, 1)), params

  want_fwd = {"full_save_attention": 2, "full_save_self_attention": 3, "full": 4}
  grad, params = layer_grad("reference", "none")
  want = jax.jit(grad)(params, x)
  for remat, n in want_fwd.items():
    grad, params = layer_grad("splash", remat)
    assert _phases(_pallas_calls(jax.make_jaxpr(grad)(params, x).jaxpr)).count("fwd") == n, remat
    got = jax.jit(grad)(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()), err_msg=remat)


def test_blocksparse_sharded_batch_matches_and_gathers_nothing():
  # Under data parallelism each device must gather only its own rows' blocks (no all-gather of k, v).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(3)
  q, k, v, _ = _inputs(8, 64, 64, 1, 8)
  ids = jnp.asarray(np.stack([_ids(rng.integers(1, 20, size=4), 64) for _ in range(8)]))
  fn = functools.partial(blocksparse.blocksparse_attention, block_q=16, block_k=16)
  step = jax.jit(jax.value_and_grad(lambda q, k, v, i: (fn(q, k, v, i, i) ** 2).sum(), (0, 1, 2)))
  want = jax.block_until_ready(step(q, k, v, ids))
  sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
             for x in (q, k, v, ids)]
  got = jax.block_until_ready(step(*sharded))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert "all-gather" not in step.lower(*sharded).compile().as_text()
