"""The DiT over packed rows: segments are independent, RoPE is relative, the final layer starts at zero,
parameters carry logical axes that shard, remat does not change the maths."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sora_jax import sharding
from sora_jax.models import layers
from sora_jax.models.dit import DiT, per_token_rows, row_one_hot, spacetime_neighbours

D, V, S = 8, 32, 4


def tiny_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      in_dim=D, vocab_size=V, width=32, depth=2, num_heads=2, ffn_dim=64, text_encoder="caption", time_freq_dim=32,
      rope_theta=10000.0, qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_width=16, text_depth=2, text_heads=2, attention="reference",
      remat="none", dtype="float32", param_dtype="float32", context="none"))
  c.update(kw)
  return c


def random_model(cfg, seed=1):
  """A DiT with random values in every parameter (zero-initialised ones included), so every path carries
  signal; built with eval_shape + numpy because eager init compiles one small program per shape."""
  model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)

  def fill(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), x.dtype)
    return jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype)

  nnx.update(model, jax.tree.map_with_path(fill, state))
  return model


@nnx.jit
def _forward(model, r):
  return model(r["x"], r["positions"], r["segment_ids"], r["t"], r["text_tokens"], r["text_segment_ids"],
               cond=r["cond"], cond_mask=r["cond_mask"], text_drop=r["text_drop"])


def grid_positions(nt, nh, nw):
  t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
  return np.stack([t, h, w], -1).reshape(-1, 3).astype(np.int32)


def make_segment(rng, grid, caption_len, t):
  n = int(np.prod(grid))
  return dict(x=rng.normal(size=(n, D)).astype(np.float32), pos=grid_positions(*grid),
              cond=rng.normal(size=(n, D)).astype(np.float32),
              cond_mask=(grid_positions(*grid)[:, 0] == 0).astype(np.float32) * (grid[0] > 1),
              text=rng.integers(1, V, size=caption_len).astype(np.int32), t=t)


def pack(segments, L, Lt, drop=()):
  """One packed row (batch of 1) of the given segments, ids 1..n in order, padding after."""
  x, pos = np.zeros((1, L, D), np.float32), np.zeros((1, L, 3), np.int32)
  cond, cmask = np.zeros((1, L, D), np.float32), np.zeros((1, L), np.float32)
  seg, text, tseg = np.zeros((1, L), np.int32), np.zeros((1, Lt), np.int32), np.zeros((1, Lt), np.int32)
  t, text_drop = np.zeros((1, S), np.float32), np.zeros((1, S), np.float32)
  i = j = 0
  for k, s in enumerate(segments):
    n, m = len(s["x"]), len(s["text"])
    x[0, i:i + n], pos[0, i:i + n], cond[0, i:i + n], cmask[0, i:i + n] = s["x"], s["pos"], s["cond"], s["cond_mask"]
    seg[0, i:i + n] = k + 1
    text[0, j:j + m], tseg[0, j:j + m] = s["text"], k + 1
    t[0, k] = s["t"]
    text_drop[0, k] = float(k in drop)
    i, j = i + n, j + m
  return dict(x=x, positions=pos, segment_ids=seg, t=t, text_tokens=text, text_segment_ids=tseg,
              cond=cond, cond_mask=cmask, text_drop=text_drop), i


def run(model, row):
  return np.asarray(_forward(model, {k: jnp.asarray(v) for k, v in row.items()}))


@pytest.mark.parametrize("mlp_conv,abs_pos", [(False, False), (True, False), (False, True)])
def test_packed_segments_match_running_alone(mlp_conv, abs_pos):
  model = random_model(tiny_cfg(mlp_conv=mlp_conv, abs_pos=abs_pos))
  rng = np.random.default_rng(0)
  segs = [make_segment(rng, (3, 2, 2), 5, 0.3), make_segment(rng, (1, 3, 3), 3, 0.9),
          make_segment(rng, (2, 2, 3), 7, 0.6)]
  row, _ = pack(segs, L=40, Lt=20, drop=(1,))
  packed = run(model, row)
  # Different neighbours: the same first segment next to other content must not change.
  other, _ = pack([segs[0], make_segment(rng, (2, 3, 3), 4, 0.1)], L=40, Lt=20)
  assert np.abs(run(model, other)[0, :12] - packed[0, :12]).max() < 1e-5
  start = 0
  for k, s in enumerate(segs):
    n = len(s["x"])
    alone_row, _ = pack([s], L=24, Lt=10, drop=(0,) if k == 1 else ())
    alone = run(model, alone_row)
    np.testing.assert_allclose(packed[0, start:start + n], alone[0, :n], atol=1e-5, rtol=0)
    assert np.abs(alone[0, :n]).max() > 1e-2  # the comparison is not between zeros
    start += n
  assert np.all(packed[0, start:] == 0)  # padding outputs nothing


def test_final_layer_zero_init_gives_zero_output():
  model = DiT(tiny_cfg(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  row, _ = pack([make_segment(rng, (2, 2, 2), 4, 0.5)], L=10, Lt=8)
  assert np.all(run(model, row) == 0)


def test_rope_depends_only_on_relative_position():
  dims = layers.rope_split(32, 3)
  assert sum(dims) == 32 and all(d % 2 == 0 for d in dims)
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32) for _ in range(2))

  def score(pq, pk):
    aq = layers.rope_angles(jnp.asarray([[pq]], jnp.int32), dims, 10000.0)
    ak = layers.rope_angles(jnp.asarray([[pk]], jnp.int32), dims, 10000.0)
    return float(jnp.sum(layers.apply_rope(q, aq) * layers.apply_rope(k, ak)))

  base = score((1, 2, 3), (4, 0, 5))
  assert abs(score((7, 12, 4), (10, 10, 6)) - base) < 1e-4  # same offsets, shifted on every axis
  for axis in range(3):  # a different offset along any single axis changes the score
    pk = [4, 0, 5]
    pk[axis] += 1
    assert abs(score((1, 2, 3), tuple(pk)) - base) > 1e-3


def test_rope_rotates_consecutive_pairs():
  """apply_rope's pair-swap matmul keeps the checkpoint convention: channels (2i, 2i+1) rotate by angle i."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 3, 12)).astype(np.float32)
  ang = rng.uniform(-3, 3, size=(2, 5, 6)).astype(np.float32)
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  want = np.empty_like(x)
  want[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
  want[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
  np.testing.assert_allclose(np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(ang))), want, atol=1e-6)


def test_per_token_rows_equal_gather_by_segment():
  """The one-hot lookup of per-segment rows is exact: segment k's row, row 0 for padding, `given_row` for
  given tokens, for f32 and bf16 tables."""
  rng = np.random.default_rng(4)
  seg = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [2, 2, 2, 1, 1, 1, 1, 0]])
  given = rng.random(seg.shape) < 0.3
  for dtype in (jnp.float32, jnp.bfloat16):
    table = jnp.asarray(rng.normal(size=(2, 3, 6, 5)), dtype)
    row = jnp.asarray(rng.normal(size=(6, 5)), dtype)
    want = np.take_along_axis(np.asarray(table, np.float32), np.clip(seg - 1, 0, 2)[:, :, None, None], axis=1)
    want = np.where(given[:, :, None, None], np.asarray(row, np.float32)[None, None], want)
    got = per_token_rows(table, row, row_one_hot(jnp.asarray(seg), jnp.asarray(given), 3, dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_text_drop_hides_the_caption_whatever_its_length():
  model = random_model(tiny_cfg())
  rng = np.random.default_rng(3)
  a = make_segment(rng, (2, 2, 2), 6, 0.5)
  b = dict(a, text=rng.integers(1, V, size=3).astype(np.int32))  # another caption, another length
  out = [run(model, pack([s], L=10, Lt=8, drop=drop)[0]) for s in (a, b) for drop in ((0,), ())]
  np.testing.assert_allclose(out[0], out[2], atol=1e-6)  # dropped: caption does not matter
  assert np.abs(out[1] - out[3]).max() > 1e-3  # kept: it does
  assert np.abs(out[0] - out[1]).max() > 1e-3


def test_params_are_annotated_and_shard_on_a_mesh():
  cfg = tiny_cfg()
  model = random_model(cfg)  # built outside any mesh (eager sharding off)
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  allowed = {"embed", "mlp", "heads", "head_dim", "vocab", "layers", None}
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    assert set(names) <= allowed, (path, names)
    assert (names[0] == "layers") == ("blocks" in path), path

  rng = np.random.default_rng(4)
  rows = [pack([make_segment(rng, (2, 2, 2), 4, 0.4), make_segment(rng, (1, 2, 2), 3, 0.7)], L=16, Lt=8)[0]
          for _ in range(4)]
  batch = {k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]}
  graphdef = nnx.graphdef(model)

  def fwd(state, b):
    m = nnx.merge(graphdef, state)
    return m(b["x"], b["positions"], b["segment_ids"], b["t"], b["text_tokens"], b["text_segment_ids"],
             cond=b["cond"], cond_mask=b["cond_mask"], text_drop=b["text_drop"])

  want = jax.jit(fwd)(state, batch)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with sharding.use_mesh(mesh):
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(s, mesh)), specs)
    sharded = jax.device_put(state, shardings)
    got = jax.block_until_ready(jax.jit(fwd)(sharded, batch))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _loss_and_grads(remat):
  rng = np.random.default_rng(5)
  row, _ = pack([make_segment(rng, (2, 2, 2), 4, 0.4), make_segment(rng, (1, 2, 2), 3, 0.7)], L=14, Lt=8)
  r = {k: jnp.asarray(v) for k, v in row.items()}

  def loss(m):
    return jnp.mean(_forward(m, r) ** 2)

  return nnx.jit(nnx.value_and_grad(loss))(random_model(tiny_cfg(remat=remat)))


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_keeps_loss_and_grads(remat):
  (l0, g0), (l1, g1) = _loss_and_grads("none"), _loss_and_grads(remat)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_compute_is_close_to_f32():
  rng = np.random.default_rng(6)
  row, _ = pack([make_segment(rng, (2, 2, 2), 4, 0.4)], L=10, Lt=8)
  f32 = run(random_model(tiny_cfg()), row)
  bf16 = run(random_model(tiny_cfg(dtype="bfloat16")), row)
  assert bf16.dtype == np.float32
  rel = np.abs(bf16 - f32).max() / np.abs(f32).max()
  assert rel < 0.1, rel


@pytest.mark.parametrize("attention", ["reference", "blocksparse"])
def test_space_and_time_attention_keep_to_a_frame_and_a_place(attention):
  rng = np.random.default_rng(0)
  segs = [make_segment(rng, (3, 2, 2), 5, 0.3), make_segment(rng, (1, 3, 3), 3, 0.9),
          make_segment(rng, (2, 2, 3), 7, 0.6)]
  for s in segs:
    s["cond_mask"][:] = 0.0  # given frames are modulated apart; keep every token a plain one here
  row, n = pack(segs, L=40, Lt=20)
  changed = {k: v.copy() for k, v in row.items()}
  changed["x"][0, 3] += 1.0  # segment 1, frame 0, place (1, 1)
  same_frame = (row["segment_ids"][0] == 1) & (row["positions"][0, :, 0] == 0)
  same_place = (row["segment_ids"][0] == 1) & np.all(row["positions"][0, :, 1:] == (1, 1), axis=-1)
  for axes, reach in [(("space",), same_frame), (("time",), same_place), (("space", "time"), None)]:
    model = random_model(tiny_cfg(attention=attention, attention_axes=axes))
    moved = np.abs(run(model, changed) - run(model, row)).max(-1)[0] > 1e-6
    if reach is not None:  # one block kind alone: the change stays inside its group
      np.testing.assert_array_equal(moved, reach)
    else:  # space then time: the whole segment, and no other
      np.testing.assert_array_equal(moved, row["segment_ids"][0] == 1)
  # The full pattern is the plain DiT: the same parameters give the same output.
  plain, full = tiny_cfg(attention=attention), tiny_cfg(attention=attention, attention_axes=("full",))
  np.testing.assert_array_equal(run(random_model(plain), row), run(random_model(full), row))
  with pytest.raises(ValueError, match="attention_axes"):
    DiT(tiny_cfg(attention_axes=("diagonal",)), rngs=nnx.Rngs(0))


def _conv_by_grid(h, grid, taps):
  """A segment's hidden [n, C] through the separable zero-padded 3-tap convolutions on its (T, H, W) grid."""
  x = h.reshape(*grid, -1)
  for a in range(3):
    p = np.pad(x, [(1, 1) if i == a else (0, 0) for i in range(4)])
    side = lambda k: np.take(p, np.arange(k, k + x.shape[a]), axis=a)
    x = taps[a, 0] * side(0) + taps[a, 1] * side(1) + taps[a, 2] * side(2)
  return x.reshape(h.shape)


def test_mlp_conv_is_a_zero_padded_spacetime_conv_of_each_segment_alone():
  rng = np.random.default_rng(0)
  grids = [(3, 2, 2), (1, 3, 3), (2, 2, 3), (2, 1, 4)]
  row, n = pack([make_segment(rng, g, 3, 0.5) for g in grids], L=50, Lt=20)
  index, valid = spacetime_neighbours(jnp.asarray(row["positions"]), jnp.asarray(row["segment_ids"]))
  # The neighbours by brute force: the token of the same segment one step along the axis.
  pos, seg = row["positions"][0], row["segment_ids"][0]
  for i in range(50):
    for a in range(3):
      for k, step in enumerate((-1, 1)):
        want = pos[i] + step * np.eye(3, dtype=int)[a]
        hit = np.flatnonzero((seg == seg[i]) & np.all(pos == want, -1)) if seg[i] else []
        assert bool(valid[0, i, a, k]) == (len(hit) == 1), (i, a, step)
        if len(hit):
          assert int(index[0, i, a, k]) == hit[0]
  with nnx.use_eager_sharding(False):
    conv = layers.NeighbourConv(5, rngs=nnx.Rngs(0))
  h = rng.normal(size=(1, 50, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(conv(jnp.asarray(h), (index, valid))), h)  # starts as the identity
  taps = rng.normal(size=(3, 3, 5)).astype(np.float32)
  conv.taps[...] = jnp.asarray(taps)
  out = np.asarray(conv(jnp.asarray(h), (index, valid)))[0]
  start = 0
  for g in grids:
    m = int(np.prod(g))
    np.testing.assert_allclose(out[start:start + m], _conv_by_grid(h[0, start:start + m], g, taps), atol=1e-5)
    start += m
  assert start < 50  # the random padding after the segments leaks into none of them
  # The backward pass (a gather from the opposite side) is the transpose of the forward one.
  weights = rng.normal(size=out.shape).astype(np.float32)
  grad = lambda take: jax.grad(lambda x: jnp.sum(take(x) * weights))(jnp.asarray(h))
  for a in range(3):
    for k in range(2):
      plain = lambda x: jnp.where(valid[:, :, a, k, None], jnp.take_along_axis(x, index[:, :, a, k, None], 1), 0)
      custom = lambda x: layers._neighbour_take(x, index[:, :, a, k], valid[:, :, a, k],  # pylint: disable=protected-access
                                                index[:, :, a, 1 - k], valid[:, :, a, 1 - k])
      np.testing.assert_allclose(np.asarray(grad(custom)), np.asarray(grad(plain)), atol=1e-6)


def test_abs_pos_features_are_each_segments_fractional_place():
  from sora_jax.models.dit import ABS_POS_FREQS, fractional_positions
  from sora_jax import patching
  grids = [(3, 2, 6), (1, 4, 8), (5, 1, 2)]
  pos = np.concatenate([patching.grid_positions(g) for g in grids] + [np.zeros((6, 3), np.int32)])
  seg = np.concatenate([np.full(int(np.prod(g)), k + 1) for k, g in enumerate(grids)] + [np.zeros(6, int)])
  feats = np.asarray(fractional_positions(jnp.asarray(pos)[None], jnp.asarray(seg)[None]))[0]
  assert feats.shape == (len(seg), 6 * ABS_POS_FREQS)
  k = np.arange(1, ABS_POS_FREQS + 1)
  start = 0
  for g in grids:
    for i, p in enumerate(patching.grid_positions(g)):
      u = (p + 0.5) / np.asarray(g)  # by hand: the token's place as a fraction of its own segment's grid
      want = np.concatenate([np.concatenate([np.cos(np.pi * k * u[a]), np.sin(np.pi * k * u[a])]) for a in range(3)])
      np.testing.assert_allclose(feats[start + i], want, atol=1e-5)
    start += int(np.prod(g))
  # The same fraction of the frame at two widths reads the same: w = 1 of 6 and w = 0 of 2 (u = 0.25).
  np.testing.assert_allclose(feats[1, 4 * ABS_POS_FREQS:], feats[36 + 32, 4 * ABS_POS_FREQS:], atol=1e-6)
  assert np.abs(feats[1] - feats[36 + 32]).max() > 0.1  # while t and h differ
  # The layer starts at zero: a model with abs_pos starts as the one without.
  assert np.all(np.asarray(DiT(tiny_cfg(abs_pos=True), rngs=nnx.Rngs(0)).pos_embed.kernel[...]) == 0)
