"""Diffusion objectives: per-segment loss normalisation, conditioning tokens out of the loss, exact
inversions of every parameterisation, the resolution-dependent shift, and prompt masks."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax import diffusion

S = 4


def cfg(**kw):
  c = ml_collections.ConfigDict()
  c.diffusion = ml_collections.ConfigDict(dict(
      objective="flow", prediction="v", cosine_s=0.008, t_mean=0.0, t_std=1.0, time_shift=True,
      shift_scale=1.0, shift_ref_tokens=16, text_drop=0.1, cond_first_frame=0.0, cond_first_frames=0.0,
      cond_last_frames=0.0, cond_both_ends=0.0))
  c.diffusion.update(kw)
  return config_lib.complete(c)


def grid_positions(nt, nh, nw):
  t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
  return np.stack([t, h, w], -1).reshape(-1, 3).astype(np.int32)


def batch_of(grids, L=48, D=4, seed=0):
  """One packed row of segments with the given patch grids (ids 1..n), padding after."""
  rng = np.random.default_rng(seed)
  pos, seg = np.zeros((1, L, 3), np.int32), np.zeros((1, L), np.int32)
  i = 0
  for k, g in enumerate(grids):
    n = int(np.prod(g))
    pos[0, i:i + n], seg[0, i:i + n] = grid_positions(*g), k + 1
    i += n
  valid = np.zeros((1, S), np.int32)
  valid[0, :len(grids)] = 1
  return dict(tokens=rng.normal(size=(1, L, D)).astype(np.float32), positions=pos, segment_ids=seg,
              loss_mask=(seg > 0).astype(np.float32), text_tokens=np.ones((1, 8), np.int32),
              text_segment_ids=np.repeat(np.arange(1, 5), 2)[None].astype(np.int32), seg_valid=valid)


def test_duplicating_a_segments_tokens_does_not_change_its_weight():
  err_a, err_b = np.array([1.0, 3.0]), np.array([10.0, 20.0, 30.0])
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  err = np.concatenate([err_a, err_b, [99.0]])[None]
  loss, seg_loss, has = diffusion.segment_mean_loss(jnp.asarray(err), jnp.asarray(seg > 0, jnp.float32),
                                                    jnp.asarray(seg), S)
  assert float(loss) == pytest.approx((2.0 + 20.0) / 2)
  np.testing.assert_allclose(seg_loss[0, :2], [2.0, 20.0])
  assert has[0].tolist() == [True, True, False, False]
  # Segment 1 four times as long (its tokens repeated): same per-segment mean, same overall loss.
  seg4 = np.array([[1] * 8 + [2, 2, 2, 0]])
  err4 = np.concatenate([np.tile(err_a, 4), err_b, [99.0]])[None]
  loss4, _, _ = diffusion.segment_mean_loss(jnp.asarray(err4), jnp.asarray(seg4 > 0, jnp.float32),
                                            jnp.asarray(seg4), S)
  assert float(loss4) == pytest.approx(float(loss))


def test_object_tokens_are_those_far_from_their_segments_mean():
  # Segment 1: a flat background of 0.5 with one token 3 units off; segment 2: flat at -2 (an offset from
  # zero is not an object); padding holds large values but is never marked.
  x0 = np.zeros((1, 12, 4), np.float32)
  x0[0, :6], x0[0, 2] = 0.5, 3.5
  x0[0, 6:10] = -2.0
  x0[0, 10:] = 9.0
  seg = np.array([[1] * 6 + [2] * 4 + [0] * 2], np.int32)
  obj = diffusion.object_tokens(jnp.asarray(x0), jnp.asarray(seg), S)
  assert np.asarray(obj)[0].tolist() == [0, 0, 1, 0, 0, 0] + [0] * 6
  # object_weight scales those tokens' errors inside their segment's mean: with a model that is wrong
  # only on the object token, its segment's loss grows by the weight.
  b = batch_of([(1, 2, 3), (1, 2, 2)], L=12, D=4)
  b["tokens"] = x0
  wrong_on_object = lambda x, *a, **k: jnp.where(jnp.asarray(obj)[..., None] > 0, 100.0, 0.0) + 0 * x
  base, _ = diffusion.loss_fn(wrong_on_object, b, jax.random.PRNGKey(0), cfg(text_drop=0.0))
  heavy, _ = diffusion.loss_fn(wrong_on_object, b, jax.random.PRNGKey(0), cfg(text_drop=0.0, object_weight=4.0))
  assert float(heavy) > 2.0 * float(base)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_conditioning_tokens_are_excluded_from_the_loss(objective):
  c = cfg(cond_first_frame=1.0, objective=objective)
  batch = {k: jnp.asarray(v) for k, v in batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)]).items()}
  seen = {}

  def model(garbage_at_given):
    def f(x, positions, segment_ids, t, text, text_seg, *, cond, cond_mask, text_drop):
      seen["cond_mask"], seen["x"] = cond_mask, x
      return jnp.where(cond_mask[..., None] > 0, garbage_at_given, 0.0) * jnp.ones_like(x)
    return f

  rng = jax.random.key(0)
  loss0, m0 = diffusion.loss_fn(model(0.0), batch, rng, c)
  loss1, m1 = diffusion.loss_fn(model(1e6), batch, rng, c)
  assert float(loss0) == float(loss1) and np.isfinite(float(loss0))
  # The given tokens are exactly the first latent frame of each video (images are never conditioned),
  # and the model sees them clean.
  f0 = (batch["positions"][..., 0] == 0) & (batch["segment_ids"] != 2) & (batch["segment_ids"] > 0)
  np.testing.assert_array_equal(np.asarray(seen["cond_mask"]) > 0, np.asarray(f0))
  np.testing.assert_array_equal(np.asarray(seen["x"])[np.asarray(f0)], np.asarray(batch["tokens"])[np.asarray(f0)])
  assert float(m0["cond_token_frac"]) == pytest.approx(10 / 33)  # 4 + 6 first-frame tokens of 33


@pytest.mark.parametrize("objective,prediction", [("flow", "v"), ("ddpm", "eps"), ("ddpm", "v")])
def test_exact_prediction_recovers_x0_and_eps(objective, prediction):
  c = cfg(objective=objective, prediction=prediction)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0, eps = jax.random.normal(k1, (64, 4)), jax.random.normal(k2, (64, 4))
  t = jax.random.uniform(k3, (64,), minval=0.02, maxval=0.98)
  x_t, target = diffusion.noisy(x0, eps, t, c)
  np.testing.assert_allclose(diffusion.predict_x0(x_t, target, t, c), x0, atol=1e-4)
  np.testing.assert_allclose(diffusion.predict_eps(x_t, target, t, c), eps, atol=1e-4)


def test_time_shift_gives_bigger_segments_more_noise():
  c = cfg(shift_ref_tokens=16)
  t = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(diffusion.time_shift(t, jnp.float32(16), c), t, atol=1e-6)
  big, small = diffusion.time_shift(t, jnp.float32(64), c), diffusion.time_shift(t, jnp.float32(4), c)
  assert np.all(np.asarray(big[1:-1]) > np.asarray(t[1:-1]))
  assert np.all(np.asarray(small[1:-1]) < np.asarray(t[1:-1]))
  assert float(big[0]) == 0.0 and float(big[-1]) == pytest.approx(1.0)
  assert np.all(np.diff(np.asarray(big)) > 0)  # still monotone
  # a = sqrt(64 / 16) = 2: t = 0.5 -> 2 * 0.5 / (1 + 0.5) = 2/3
  assert float(big[5]) == pytest.approx(2 / 3, rel=1e-6)
  np.testing.assert_allclose(diffusion.time_shift(t, jnp.float32(64), cfg(time_shift=False)), t)


@pytest.mark.parametrize("mode", ["first_frame", "first_frames", "last_frames", "both_ends"])
def test_prompt_masks_follow_their_mode_and_leave_tokens_to_learn(mode):
  c = cfg(**{f"cond_{mode}": 1.0})
  b = batch_of([(5, 1, 2), (1, 2, 2), (2, 2, 1), (3, 1, 1)])
  pos, seg = jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
  for seed in range(5):
    mask = np.asarray(diffusion.sample_cond_mask(jax.random.key(seed), pos, seg, S, c)) > 0
    f = b["positions"][0, :, 0]
    for k, nt in zip(range(1, 5), (5, 1, 2, 3)):
      given_frames = sorted(set(f[(b["segment_ids"][0] == k) & mask[0]].tolist()))
      if nt == 1 or (mode == "both_ends" and nt < 3):
        assert given_frames == [], (k, given_frames)
        continue
      assert len(given_frames) < nt  # never the whole segment
      if mode == "first_frame":
        assert given_frames == [0]
      elif mode == "first_frames":
        assert given_frames == list(range(len(given_frames))) and given_frames
      elif mode == "last_frames":
        assert given_frames == list(range(nt - len(given_frames), nt)) and given_frames
      else:
        assert given_frames == [0, nt - 1]
    assert not mask[0][b["segment_ids"][0] == 0].any()


def test_loss_fn_under_jit_reaches_every_parameter():
  """The jitted loss on a random-weight DiT is finite and every parameter gets a gradient (no dead path:
  text encoder, null text, conditioning projection, adaLN, output)."""
  from flax import nnx
  from sora_jax.models.dit import DiT
  dit = ml_collections.ConfigDict(dict(
      in_dim=4, vocab_size=16, width=16, depth=1, num_heads=2, ffn_dim=32, text_encoder="caption", time_freq_dim=16,
      rope_theta=10000.0, qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_width=8, text_depth=1, text_heads=2, attention="reference",
      remat="none", dtype="float32", param_dtype="float32", context="none"))
  c = cfg(cond_first_frame=1.0, text_drop=0.5)
  # eval_shape + numpy values: eager init would compile one small program per parameter shape.
  model = nnx.eval_shape(lambda: DiT(dit, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype),
                                 nnx.state(model, nnx.Param)))
  batch = {k: jnp.asarray(v) for k, v in batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)]).items()}

  @nnx.jit
  def step(model, rng):
    return nnx.value_and_grad(lambda m: diffusion.loss_fn(m, batch, rng, c), has_aux=True)(model)

  (loss, metrics), grads = step(model, jax.random.key(0))
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(metrics["num_segments"]) == 3
  for path, g in nnx.to_flat_state(grads):
    assert np.isfinite(np.asarray(g[...])).all() and np.abs(np.asarray(g[...])).max() > 0, path


@pytest.mark.slow
def test_dit_fits_a_fixed_batch():
  """Gradient flows through the zero-initialised, adaLN-Zero model: the flow loss on one batch falls fast."""
  import optax
  from flax import nnx
  from sora_jax.models.dit import DiT
  dit = ml_collections.ConfigDict(dict(
      in_dim=4, vocab_size=16, width=32, depth=2, num_heads=2, ffn_dim=64, text_encoder="caption", time_freq_dim=32,
      rope_theta=10000.0, qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_width=16, text_depth=1, text_heads=2, attention="reference",
      remat="none", dtype="float32", param_dtype="float32", context="none"))
  c = cfg(text_drop=0.0)
  model = nnx.jit(lambda: DiT(dit, rngs=nnx.Rngs(0)))()
  batch = {k: jnp.asarray(v) for k, v in batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)]).items()}
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, rng):
    loss, grads = nnx.value_and_grad(lambda m: diffusion.loss_fn(m, batch, rng, c)[0])(model)
    opt.update(model, grads)
    return loss

  # Same noise and times every step (fixed rng): a pure fitting problem.
  losses = [float(step(model, opt, jax.random.key(0))) for _ in range(150)]
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_x0_loss_weight_is_the_clean_signal_error():
  """loss_weight="x0": each segment's velocity error times its t^2 equals the x0 error of the implied
  clean estimate (x0_hat = x_t - t v_hat), averaged per segment then over segments."""
  batch = {k: jnp.asarray(v) for k, v in batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)]).items()}
  seen = {}

  def model(x_t, pos, seg, t_bs, *args, **kw):
    seen.update(x_t=x_t, t_bs=t_bs)
    return jnp.zeros_like(x_t) + 0.3  # any wrong velocity

  c = cfg(loss_weight="x0", text_drop=0.0)
  loss, _ = diffusion.loss_fn(model, batch, jax.random.key(1), c)
  seg = np.asarray(batch["segment_ids"])
  t_tok = np.asarray(diffusion.per_token(seen["t_bs"], batch["segment_ids"]))[..., None]
  x0_hat = np.asarray(seen["x_t"]) - t_tok * 0.3
  err = np.mean((x0_hat - np.asarray(batch["tokens"])) ** 2, axis=-1)
  want = np.mean([err[seg == k].mean() for k in (1, 2, 3)])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  uniform, _ = diffusion.loss_fn(model, batch, jax.random.key(1), cfg(text_drop=0.0))
  assert float(uniform) > float(loss)  # t^2 < 1


def test_frame_shared_noise_is_shared_across_frames_only():
  # Two segments of a 4 x 3 x 3 token grid each in one row: with a = 0.5, tokens of one segment at one
  # (h, w) correlate by 0.5 across frames; other cells and the other segment do not; variance stays 1.
  from sora_jax import patching
  pos = np.asarray(patching.grid_positions((4, 3, 3)))
  positions = jnp.asarray(np.concatenate([pos, pos])[None])
  seg = jnp.asarray(np.repeat([1, 2], len(pos))[None])
  d, n = 4096, len(pos)
  eps = np.asarray(diffusion.training_noise(jax.random.PRNGKey(0), (1, 2 * n, d), seg, positions, 0.5))[0]
  corr = lambda i, j: float(np.corrcoef(eps[i], eps[j])[0, 1])
  same_cell = [j for j in range(1, n) if tuple(pos[j][1:]) == tuple(pos[0][1:])]
  other_cell = [j for j in range(1, n) if tuple(pos[j][1:]) != tuple(pos[0][1:])]
  assert all(abs(corr(0, j) - 0.5) < 0.05 for j in same_cell) and len(same_cell) == 3
  assert all(abs(corr(0, j)) < 0.05 for j in other_cell)
  assert abs(corr(0, n)) < 0.05  # the same cell of the other segment
  np.testing.assert_allclose(eps.var(axis=1), 1.0, atol=0.07)
  iid = np.asarray(diffusion.training_noise(jax.random.PRNGKey(0), (1, 2 * n, d), seg, positions, 0.0))[0]
  assert abs(float(np.corrcoef(iid[0], iid[same_cell[0]])[0, 1])) < 0.05
  cfg = ml_collections.ConfigDict(dict(diffusion=dict(frame_noise_share=1.0)))
  with pytest.raises(ValueError, match="frame_noise_share=1.0"):
    diffusion.frame_share(cfg)


def test_sampling_noise_shares_frames_as_training_does():
  from sora_jax import sampling
  geometry = sampling.Geometry(temporal=4, spatial=8, channels=8, patch=(1, 2, 2))
  reqs = [sampling.Request("a", 17, 64, 64)]
  noise = {a: sampling.pack_requests(reqs, geometry, [np.zeros(3, np.int32)], seed=0, steps=2, row_len=0,
                                     frame_share=a).noise[0] for a in (0.0, 0.5)}
  grid = geometry.grid(17, 64, 64)
  per_frame = grid[1] * grid[2]
  a, b = noise[0.5][:per_frame].ravel(), noise[0.5][per_frame:2 * per_frame].ravel()
  assert abs(float(np.corrcoef(a, b)[0, 1]) - 0.5) < 0.1
  a, b = noise[0.0][:per_frame].ravel(), noise[0.0][per_frame:2 * per_frame].ravel()
  assert abs(float(np.corrcoef(a, b)[0, 1])) < 0.1


def test_next_frame_tokens_pair_each_place_with_the_next_latent_frame():
  b = batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)])
  idx, valid = (np.asarray(a) for a in diffusion.next_frame_tokens(
      jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]), S))
  pos, seg = b["positions"][0], b["segment_ids"][0]
  want = {}  # by brute force: (segment, t, h, w) -> index
  for i in range(len(seg)):
    if seg[i]:
      want[(seg[i], *pos[i])] = i
  for i in range(len(seg)):
    j = want.get((seg[i], pos[i][0] + 1, pos[i][1], pos[i][2])) if seg[i] else None
    assert valid[0, i] == (j is not None), i
    if j is not None:
      assert idx[0, i] == j
  assert valid[0].sum() == 2 * 4 + 0 + 1 * 6  # (3-1) frames of 4, an image, (2-1) frames of 6


def test_frame_diff_error_is_zero_for_an_error_frames_share_and_counts_jitter():
  b = batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)])
  pos, seg = b["positions"], b["segment_ids"]
  weight = (seg > 0).astype(np.float32)
  args = (jnp.asarray(weight), jnp.asarray(pos), jnp.asarray(seg), S)
  shared = np.sin(pos[..., 1:2] + 2.0 * pos[..., 2:3] + np.arange(4.0))  # the same in every frame
  assert float(diffusion.frame_diff_error(jnp.asarray(shared), *args)) == pytest.approx(0.0, abs=1e-7)
  jitter = shared + np.random.default_rng(0).normal(size=shared.shape)
  got = float(diffusion.frame_diff_error(jnp.asarray(jitter), *args))
  # Brute force: per segment, the mean over (place, frame) pairs of the channel-mean squared change.
  per_seg = []
  for k in (1, 3):  # segment 2 is an image: no pairs
    rows = {tuple(pos[0, i]): jitter[0, i] for i in range(seg.shape[1]) if seg[0, i] == k}
    diffs = [np.mean((rows[(t + 1, h, w)] - r) ** 2) for (t, h, w), r in rows.items() if (t + 1, h, w) in rows]
    per_seg.append(np.mean(diffs))
  assert got == pytest.approx(np.mean(per_seg), rel=1e-5)
  # A token without loss weight (a given frame) drops its pairs.
  weight[0, 0] = 0.0
  fewer = float(diffusion.frame_diff_error(jnp.asarray(jitter), jnp.asarray(weight), *args[1:]))
  assert fewer != pytest.approx(got)


def test_frame_diff_weight_adds_its_term_to_the_loss():
  batch = {k: jnp.asarray(v) for k, v in batch_of([(3, 2, 2), (1, 3, 3), (2, 2, 3)]).items()}
  model = lambda x_t, *a, **k: 0.5 * x_t  # any prediction
  plain, m = diffusion.loss_fn(model, batch, jax.random.key(1), cfg(text_drop=0.0))
  both, m2 = diffusion.loss_fn(model, batch, jax.random.key(1), cfg(text_drop=0.0, frame_diff_weight=0.5))
  assert "loss_frame_diff" not in m and float(m2["loss_frame_diff"]) > 0
  assert float(both) == pytest.approx(float(plain) + 0.5 * float(m2["loss_frame_diff"]), rel=1e-6)


def _bench_dit(*flags):
  """bench.dit's JSON lines for a 64-wide DiT on synthetic rows of 64 (segments of 16), one step each."""
  import json
  import os
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, "-m", "sora_jax.bench.dit", "--width=64", "--heads=2", "--seq_len=64", "--seg_len=16",
       "--in_dim=32", "--dtype=float32", "--steps=1", *flags],
      capture_output=True, text=True, check=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=os.path.dirname(os.path.dirname(__file__)))
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_dit_times_the_step_at_each_rows_per_step_and_frame_diff_weight():
  # bench.dit's side-by-side timing: one JSON line per (rows, weight), each a fresh model on the same batch
  # and noise, so the term shows as a higher loss (lr 1e-4 barely moves the weights in one step).
  rows = _bench_dit("--depth=1", "--batch=1,2", "--frame_diff_weights=0,1")
  assert [(r["batch"], r["frame_diff_weight"]) for r in rows] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
  assert all(r["step_s"] > 0 and r["mfu"] > 0 for r in rows)
  assert rows[1]["loss"] > rows[0]["loss"] and rows[3]["loss"] > rows[2]["loss"]


def test_bench_dit_on_dumped_rows_merged_or_row_by_row_gives_the_same_loss(tmp_path):
  # --rows: real packed rows (here two rows of 4 segments, two of one segment) stepped `batch` at a time;
  # blocksparse's merged sweep is the same attention, so each batch size gives one loss either way.
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(__file__))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  make_rows = ("import numpy as np, sys; from sora_jax.bench import dit; "  # its flags stay out of this process
               "a, b = dit.synthetic_batch(2, 64, 16, 4, 16, 32), dit.synthetic_batch(2, 64, 16, 4, 64, 32); "
               "np.savez(sys.argv[1], **{k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a})")
  subprocess.run([sys.executable, "-c", make_rows, str(tmp_path / "rows.npz")], check=True, env=env, cwd=repo,
                 timeout=300)
  out = subprocess.run(
      [sys.executable, "-m", "sora_jax.bench.dit", "--width=64", "--depth=1", "--heads=2", "--dtype=float32",
       "--attention=blocksparse", f"--rows={tmp_path / 'rows.npz'}", "--batch=2,4", "--merge_rows=false,true",
       "--steps=1"],
      capture_output=True, text=True, check=True, timeout=300, env=env, cwd=repo)
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [(r["batch"], r["merge_rows"], r["steps_per_pass"]) for r in rows] == [
      (2, "false", 2), (2, "true", 2), (4, "false", 1), (4, "true", 1)]
  assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
  assert rows[2]["loss"] == pytest.approx(rows[3]["loss"], rel=1e-5)
  assert all(r["step_s"] > 0 and 0 < r["real_tokens_per_s"] <= r["tokens_per_s"] for r in rows)


def test_bench_dit_times_the_step_without_and_with_mlp_conv():
  # The same step with and without dit.mlp_conv: the conv starts as the identity (and behind the MLP's
  # zero-initialised gate), so the first loss is the same.
  rows = _bench_dit("--depth=2", "--batch=1", "--mlp_conv=false,true")
  assert [r["mlp_conv"] for r in rows] == [False, True]
  assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
