"""Samplers against exact answers, packed inference against one-by-one, guidance, conditioning, sizes.

The sampler maths is checked on data whose flow is known in closed form: x0 ~ N(mu, sigma^2) per
coordinate. Then the exact velocity (or noise prediction) is a function of (x_t, t), the probability-flow
ODE maps the starting noise eps to x0 = mu + sigma * eps (flow), and ancestral sampling must draw from
N(mu, sigma^2). The packing tests use a tiny random DiT.
"""
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sora_jax import config as config_lib
from sora_jax import patching
from sora_jax.metrics import psnr
from sora_jax import sampling as S

MU, SIGMA = 0.7, 0.5
GEO = S.Geometry(temporal=4, spatial=8, channels=4, patch=(1, 2, 2))


def flow_velocity(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
  """E[eps - x0 | x_t] for x0 ~ N(MU, SIGMA^2): exact rectified-flow velocity."""
  t = S._per_token(t, seg)
  var = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
  return -MU + (t - (1 - t) * SIGMA ** 2) / var * (x - (1 - t) * MU)


def ddpm_eps(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
  """E[eps | x_t] under the cosine schedule for x0 ~ N(MU, SIGMA^2): an exact eps-prediction."""
  a, s = S.Schedule("ddpm", "eps").alpha_sigma(S._per_token(t, seg))
  var = a ** 2 * SIGMA ** 2 + s ** 2
  return s / var * (x - a * MU)


def _latents(packed, arr):
  return [patching.unpatchify(arr[p.row, p.start:p.start + p.num_tokens], p.grid, packed.patch)
          for p in packed.placements]


REQS = [S.Request("a", 9, 32, 32), S.Request("b", 1, 16, 48), S.Request("c", 5, 32, 16)]
TEXT = [[1, 2, 3], [4], [5, 6]]


def _packed(steps, reqs=REQS, seed=0, row_len=64):
  return S.pack_requests(reqs, GEO, TEXT[:len(reqs)], seed=seed, steps=steps, row_len=row_len)


def test_sizes_off_the_grid_fail_with_one_line():
  assert GEO.latent_shape(481, 32, 32) == (121, 4, 4, 4)
  assert GEO.latent_shape(1, 16, 48) == (1, 2, 6, 4)
  for args, words in [((10, 32, 32), "num_frames 10"), ((485, 32, 32), "num_frames 485"),
                      ((9, 40, 32), "height 40"), ((9, 32, 8), "width 8"), ((0, 32, 32), "num_frames 0")]:
    with pytest.raises(ValueError) as e:
      GEO.latent_shape(*args)
    assert words in str(e.value) and "\n" not in str(e.value)
  assert "1 + 4k" in str(pytest.raises(ValueError, GEO.latent_shape, 10, 32, 32).value)
  assert "multiple of 16" in str(pytest.raises(ValueError, GEO.latent_shape, 9, 40, 32).value)


def test_pack_places_every_request_without_overlap():
  grids = [(3, 2, 2), (1, 4, 4), (5, 2, 2), (1, 1, 2), (9, 2, 2)]
  placements, row_len = S.pack(grids, 24)
  assert row_len == 36  # widened to the longest request
  used = {}
  for p, g in zip(placements, grids):
    assert p.grid == g and p.start + p.num_tokens <= row_len
    for k in range(p.start, p.start + p.num_tokens):
      assert (p.row, k) not in used
      used[(p.row, k)] = p.segment
  for row in {p.row for p in placements}:  # segment ids 1..n within each row
    assert sorted(p.segment for p in placements if p.row == row) == list(
        range(1, 1 + sum(p.row == row for p in placements)))


@pytest.mark.parametrize("sampler,ratio,tol", [("euler", 2, 0.1), ("heun", 8, 0.01), ("unipc", 3, 0.01)])
def test_flow_samplers_converge_to_the_exact_ode_solution(sampler, ratio, tol):
  errs = []
  for steps in (8, 32):
    packed = _packed(steps)
    out = S.denoise(flow_velocity, packed, sampler=sampler, guidance=1.0, seed=0)
    exact = [MU + SIGMA * e for e in _latents(packed, packed.noise)]
    errs.append(max(float(np.abs(o - e).max()) for o, e in zip(out, exact)))
  # 4x the steps: error / 4 for Euler, / 16 for Heun (with slack for the time shift grid). UniPC is of
  # second order too, but at 8 steps, where its error is already 20x below Euler's, not yet asymptotically
  # (tests/test_samplers.py checks its order on 20 and 40 steps).
  assert errs[1] < errs[0] / ratio, errs
  assert errs[1] < tol, errs


def test_ddim_is_deterministic_and_converges_to_the_exact_flow():
  sched = S.Schedule("ddpm", "eps")
  a_1, s_1 = (float(v) for v in sched.alpha_sigma(jnp.float32(1.0)))
  errs = []
  for steps in (16, 64):
    packed = _packed(steps)
    out = S.denoise(ddpm_eps, packed, sampler="ddim", guidance=1.0, seed=0, schedule=sched)
    again = S.denoise(ddpm_eps, packed, sampler="ddim", guidance=1.0, seed=1, schedule=sched)
    err = 0.0
    for o, o2, e in zip(out, again, _latents(packed, packed.noise)):
      np.testing.assert_array_equal(o, o2)  # no noise is drawn: the step-noise seed does not matter
      z = (e - a_1 * MU) / np.sqrt(a_1 ** 2 * SIGMA ** 2 + s_1 ** 2)  # standardised start, kept by the ODE
      err = max(err, float(np.abs(o - (MU + SIGMA * z)).max()))
    errs.append(err)
  assert errs[1] < errs[0] / 3 and errs[1] < 0.05, errs  # first order: 4x the steps, about / 4


def test_ddpm_ancestral_samples_the_data_distribution():
  sched = S.Schedule("ddpm", "eps")
  # (Few steps shrink the variance: x0 is predicted as a mean. 100 steps are within the tolerance.)
  packed = S.pack_requests([S.Request("a", 9, 256, 256)], GEO, [[1]], seed=3, steps=100, row_len=0)
  (out,) = S.denoise(ddpm_eps, packed, sampler="ddpm", guidance=1.0, seed=3, schedule=sched)
  assert out.size > 10000
  assert abs(out.mean() - MU) < 0.02 and abs(out.std() - SIGMA) < 0.02, (out.mean(), out.std())
  # Not the ODE solution: the ancestral noise moved every sample.
  ode = MU + SIGMA * _latents(packed, packed.noise)[0]
  assert np.abs(out - ode).mean() > 0.1


def test_classifier_free_guidance_combines_both_halves():
  seen = {}

  def model(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
    seen["text"], seen["drop"] = tt, text_drop
    return jnp.where(S._per_token(text_drop, seg) > 0, -1.0, 2.0) * jnp.ones_like(x)

  packed = _packed(2)
  batch = {k: jnp.asarray(v) for k, v in packed.batch.items()}
  t = jnp.full(packed.schedule.shape[1:], 0.5, jnp.float32)
  out = S.guided(model, None, batch, jnp.asarray(packed.noise), t, 3.0, use_cfg=True, has_cond=False)
  real = packed.batch["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(out)[real], -1.0 + 3.0 * (2.0 - -1.0))
  r = packed.num_rows
  np.testing.assert_array_equal(seen["text"][:r], seen["text"][r:])  # same caption in both halves
  assert (np.asarray(seen["drop"][:r]) == 0).all() and (np.asarray(seen["drop"][r:]) == 1).all()


def test_noise_depends_only_on_seed_and_request_index():
  alone = S.pack_requests(REQS[1:2], GEO, TEXT[1:2], seed=5, steps=2, row_len=64, index_offset=1)
  packed = _packed(2, seed=5)
  np.testing.assert_array_equal(_latents(alone, alone.noise)[0], _latents(packed, packed.noise)[1])
  other = _packed(2, seed=6)
  assert not np.allclose(_latents(other, other.noise)[1], _latents(packed, packed.noise)[1])


def test_time_shift_gives_bigger_segments_more_noise():
  shift = lambda u, n: (a := np.sqrt(n / 16)) * u / (1 + (a - 1) * u)
  small, big = S.time_schedule(10, 16, shift), S.time_schedule(10, 256, shift)
  assert small[0] == big[0] == 1.0 and small[-1] == big[-1] == 0.0
  assert (big[1:-1] > small[1:-1]).all() and (np.diff(big) < 0).all()
  np.testing.assert_allclose(S.time_schedule(10, 16, shift, strength=0.5), 0.5 * small)
  with pytest.raises(ValueError, match="strength 1.5"):
    S.time_schedule(10, 16, shift, strength=1.5)


def test_request_noise_is_the_start_even_on_grids_below_one():
  # diffusers' UniPC grid starts at 1 - 1e-6 and still from the noise itself, not 0.999999 noise; and
  # a Request's own noise replaces the (seed, index) draw, whatever it is packed with.
  seen = []

  def model(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), x)
    return flow_velocity(x, pos, seg, t, tt, ts)

  shape = GEO.latent_shape(9, 32, 32)
  noise = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  reqs = [REQS[1], S.Request("a", 9, 32, 32, noise=noise)]
  packed = S.pack_requests(reqs, GEO, [[1], [2]], seed=0, steps=3, row_len=64, grid="unipc")
  assert packed.schedule[0, 0, 0] == 1.0 - 1e-6
  p = packed.placements[1]
  np.testing.assert_array_equal(_latents(packed, packed.noise)[1], noise)
  S.denoise(model, packed, sampler="unipc", guidance=1.0, seed=0)
  np.testing.assert_array_equal(seen[0][p.row, p.start:p.start + p.num_tokens],
                                patching.patchify(noise, GEO.patch)[0])
  # The other request keeps its own draw: the same as packed without the first.
  alone = S.pack_requests(REQS[1:2], GEO, [[1]], seed=0, steps=3, row_len=0)
  np.testing.assert_array_equal(_latents(packed, packed.noise)[0], _latents(alone, alone.noise)[0])
  with pytest.raises(ValueError, match=r"noise of shape \(3, 4, 4, 4\) do not match the request's latents"):
    S.pack_requests([S.Request("a", 17, 32, 32, noise=noise)], GEO, [[1]], seed=0, steps=3, row_len=0)


def test_sdedit_starts_from_the_noised_input():
  z = np.full(GEO.latent_shape(9, 32, 32), 3.0, np.float32)
  for strength, far in ((0.05, False), (1.0, True)):
    req = S.Request("a", 9, 32, 32, init_latents=z, strength=strength)
    packed = S.pack_requests([req], GEO, [[1]], seed=0, steps=16, row_len=0)
    assert packed.schedule[0, 0, 0] == pytest.approx(strength)
    (out,) = S.denoise(flow_velocity, packed, sampler="euler", guidance=1.0, seed=0)
    # The data distribution pulls towards MU; a small strength stays near the input latents.
    assert (np.abs(out - 3.0).mean() > 1.0) == far, (strength, np.abs(out - 3.0).mean())


@pytest.mark.parametrize("sampler", ["heun", "unipc"])
def test_given_frames_are_kept_exactly_and_shown_to_the_model(sampler):
  seen = {}

  def model(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
    jax.debug.callback(lambda m, x: seen.update(mask=np.asarray(m), x=np.asarray(x)), cond_mask, x)
    return flow_velocity(x, pos, seg, t, tt, ts)

  shape = GEO.latent_shape(17, 32, 32)
  cond = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  frames = np.zeros(shape[0], bool)
  frames[[0, 4]] = True
  req = S.Request("a", 17, 32, 32, cond_latents=cond, cond_frames=frames)
  packed = S.pack_requests([req, REQS[1]], GEO, [[1], [2]], seed=0, steps=4, row_len=64)
  out = S.denoise(model, packed, sampler=sampler, guidance=1.0, seed=0)
  np.testing.assert_array_equal(out[0][frames], cond[frames])
  assert not np.allclose(out[0][~frames], cond[~frames])
  mask = np.asarray(seen["mask"])[0]
  pos = packed.batch["positions"][0]
  seg = packed.batch["segment_ids"][0]
  np.testing.assert_array_equal(mask > 0, (seg == 1) & np.isin(pos[:, 0], [0, 4]))
  # The model saw the clean latents at the given tokens (as in training), at every call.
  x_seen = np.asarray(seen["x"])[0][mask > 0]
  np.testing.assert_allclose(x_seen, packed.batch["cond"][0][mask > 0])


# ------------------------------------------------------------------------------- with a tiny DiT

D, V = 16, 32


def tiny_config():
  c = ml_collections.ConfigDict()
  c.data = dict(max_text_tokens=8, seq_len=64, stand_in_factors=(2, 4, 4))
  c.dit = dict(in_dim=D, patch=(1, 2, 2), vocab_size=V, width=32, depth=1, num_heads=2, ffn_dim=64,
               text_encoder="caption", time_freq_dim=32,
               rope_theta=10000.0, qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_width=16, text_depth=1, text_heads=2,
               attention="reference", remat="none", dtype="float32", param_dtype="float32")
  c.diffusion = dict(objective="flow", prediction="v", cosine_s=0.008, time_shift=True, shift_scale=1.0,
                     shift_ref_tokens=16)
  c.vae = dict(base_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1, z_dim=4, temporal_downsample=(True, True))
  c.sample = dict(sampler="", steps=3, guidance=2.0, num_frames=5, height=16, width=16, fps=8.0,
                  row_len=0, max_tile_pixels=0)
  return config_lib.complete(c)


def tokenize(caption):
  return [1 + ord(ch) % (V - 1) for ch in caption]


@functools.lru_cache(maxsize=None)
def tiny_models():
  """(DiT, VAE) with random weights, built once per process (eager initialisation compiles every op)."""
  from sora_jax.models.dit import DiT
  from sora_jax.models.vae import VAE
  cfg = tiny_config()
  model = DiT(ml_collections.ConfigDict(cfg.dit), rngs=nnx.Rngs(0))
  # Zero-initialised output layers would make every prediction 0: give all parameters signal.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  return model, VAE(cfg.vae, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def dit():
  return tiny_models()[0]


@pytest.mark.parametrize("objective,sampler", [
    ("flow", "heun"), ("flow", "unipc"), pytest.param("ddpm", "ddpm", marks=pytest.mark.slow)])
def test_packed_inference_equals_one_by_one(dit, objective, sampler):
  geo = S.Geometry(temporal=2, spatial=4, channels=4, patch=(1, 2, 2))
  reqs = [S.Request("a red circle", 5, 16, 16), S.Request("blue", 1, 16, 32)]
  text = [tokenize(r.caption) for r in reqs]
  sched = S.Schedule(objective, "v")
  shift = lambda u, n: (a := np.sqrt(n / 16)) * u / (1 + (a - 1) * u)
  packed = S.pack_requests(reqs, geo, text, seed=7, steps=3, row_len=64, shift_fn=shift)
  assert packed.num_rows == 1 and len(packed.placements) == 2
  together = S.denoise(dit, packed, sampler=sampler, guidance=2.5, seed=7, schedule=sched)
  for i, r in enumerate(reqs):
    alone = S.pack_requests([r], geo, [text[i]], seed=7, steps=3, row_len=0, shift_fn=shift,
                            index_offset=i)
    (z,) = S.denoise(dit, alone, sampler=sampler, guidance=2.5, seed=7, schedule=sched)
    np.testing.assert_allclose(together[i], z, atol=2e-5, rtol=1e-4)
    assert np.abs(z).mean() > 0.1  # a real output, not zeros


# ------------------------------------------- conditioning honoured by a trained model (the demo's)
# Run after `make demo`:
#   SORA_BUNDLE=runs/demo/bundle .venv/bin/python -m pytest -q -m slow tests/test_sampling.py -k trained
# (or SORA_WORKDIR=runs/demo). Each test prints what it measured.


@pytest.fixture(scope="module")
def trained():
  bundle, workdir = os.environ.get("SORA_BUNDLE"), os.environ.get("SORA_WORKDIR")
  if not bundle and not workdir:
    pytest.skip("set SORA_BUNDLE (an exported bundle) or SORA_WORKDIR (a trained work directory)")
  from sora_jax import sample
  return sample.load_models(bundle, workdir)


def _render(objects, num_frames, background="black"):
  from sora_jax.data import shapes
  spec = shapes.ClipSpec(objects=tuple(shapes.ObjectSpec(**o) for o in objects), background=background,
                         num_frames=num_frames, height=32, width=32)
  return shapes.render_clip(spec), shapes.caption(spec)


@pytest.mark.slow
def test_trained_image_to_video_reproduces_the_image(trained):
  frames, caption = _render([dict(shape="circle", colour="red", motion="moving right", x=0.3)], 17)
  req = S.image_prompt(trained, caption, frames[0], 17, 32, 32)
  (video,) = S.generate(trained, [req], seed=0)
  print(f"image-to-video: first-frame PSNR {psnr(video[0], frames[0]):.1f} dB")
  assert psnr(video[0], frames[0]) >= 25.0


@pytest.mark.slow
def test_trained_extension_reproduces_and_continues(trained):
  from sora_jax import detector
  frames, caption = _render([dict(shape="square", colour="blue", motion="moving right", x=0.25)], 41)
  given = frames[:17]
  req = S.extend_prompt(trained, caption, given, 33, 32, 32, "forward")
  (video,) = S.generate(trained, [req], seed=0)
  n = 1 + 4 * (int(req.cond_frames.sum()) - 1)  # pixel frames given: the input's last n frames
  kept = psnr(video[:n], given[-n:])
  cont = psnr(video[n:], frames[17:17 + 33 - n])
  score = detector.score_clip(video[n:], caption)
  print(f"extension: given frames PSNR {kept:.1f} dB; new frames vs the true continuation {cont:.1f} dB; "
        f"new frames colour {score.colour} persistence {score.persistence} motion {score.motion}")
  assert kept >= 25.0
  assert score.colour and score.persistence


@pytest.mark.slow
def test_trained_connect_matches_both_ends(trained):
  a, _ = _render([dict(shape="triangle", colour="green", motion="moving right", x=0.3)], 9)
  b, caption = _render([dict(shape="triangle", colour="green", motion="moving right", x=0.5)], 9)
  req = S.connect_prompt(trained, caption, a, b, 17, 32, 32)
  (video,) = S.generate(trained, [req], seed=0)
  start, end = psnr(video[0], a[-1]), psnr(video[-4:], b[1:5])
  print(f"connect: start PSNR {start:.1f} dB, end PSNR {end:.1f} dB")
  assert start >= 25.0 and end >= 22.0


def test_training_samples_from_a_packed_batch(dit):
  """What train.py calls every sample_every_steps: videos for the first segments of a packed batch."""
  cfg = tiny_config()
  cfg.data.source = "latents"
  packed = S.pack_requests([S.Request("a", 5, 16, 16), S.Request("b", 1, 16, 32)], GEO, [[1, 2], [3]],
                           seed=0, steps=1, row_len=64)
  batch = dict(packed.batch)
  batch["seg_grid"] = np.zeros((packed.num_rows, 4, 3), np.int32)
  for p in packed.placements:
    batch["seg_grid"][p.row, p.segment - 1] = p.grid
  videos = S.training_samples(dit, cfg, batch, jax.random.PRNGKey(0))
  assert sorted(videos) == ["latent_preview_0", "latent_preview_1"]
  # Latent frames x (latent size * 8) pixels, from the batch's patch grids; uint8 for the metrics writer.
  assert videos["latent_preview_0"].shape == (2, 16, 16, 3)
  assert videos["latent_preview_1"].shape == (1, 16, 32, 3)
  assert all(v.dtype == np.uint8 for v in videos.values())
  # With the VAE of the training latents (train.sample_decoder), the frames are decoded pixels.
  shapes_seen = []

  def decode(z):
    shapes_seen.append(z.shape)
    return np.full((1 + 4 * (z.shape[0] - 1), 4 * z.shape[1], 4 * z.shape[2], 3), 7, np.uint8)
  videos = S.training_samples(dit, cfg, batch, jax.random.PRNGKey(0), decode=decode)
  assert sorted(videos) == ["video_0", "video_1"] and shapes_seen == [(2, 2, 2, 4), (1, 2, 4, 4)]
  assert videos["video_0"].shape == (5, 8, 8, 3) and (videos["video_0"] == 7).all()
