"""bench.sample_trajectory on models whose data estimate is known: the sampler's hook hands over exactly
the estimate the model gives, and the measures read where the estimate puts the object."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax import patching
from sora_jax import sampling as S
from sora_jax import evaluate
from sora_jax.bench import motion_tracks, sample_trajectory
from sora_jax.data import pipeline, shapes

FACTORS = (4, 2, 2)  # stand-in latents: pooled pixels, so decoding is exact up to the pooling


def _pipe(model, steps):
  c = ml_collections.ConfigDict()
  c.data = dict(source="shapes", max_text_tokens=8, seq_len=512, stand_in_factors=FACTORS)
  c.dit = dict(in_dim=12, patch=(1, 2, 2))
  c.diffusion = dict(objective="flow", prediction="v", cosine_s=0.008, time_shift=True, shift_scale=1.0,
                     shift_ref_tokens=16)
  c.sample = dict(sampler="", steps=steps, guidance=2.0, num_frames=17, height=32, width=32, fps=8.0,
                  row_len=0, max_tile_pixels=0)
  return S.Pipeline(config_lib.complete(c), model, None, lambda s: [1 + ord(ch) % 31 for ch in s],
                    np.zeros(3, np.float32), np.ones(3, np.float32))


def _model_drawing(truth_tokens, shifted_tokens, switch):
  """A flow model whose data estimate x - t v is `shifted_tokens` while t > switch, then the truth (one
  segment at the start of row 0, as one request packs)."""
  def model(x, pos, seg, t, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
    n = truth_tokens.shape[0]
    tok = S._per_token(t, seg)
    pad = lambda a: np.pad(a, ((0, x.shape[1] - n), (0, 0)))[None]
    target = jnp.where(tok > switch, pad(shifted_tokens), pad(truth_tokens))
    return (x - target) / jnp.maximum(tok, 1e-6) * (seg[..., None] > 0)
  return model


def test_the_hook_hands_over_the_estimate_and_the_rows_read_it():
  (spec,) = evaluate.straight_specs("single", 1, FACTORS[0])
  truth = pipeline.stand_in_latents(shapes.render_clip(spec), FACTORS)
  # Displaced along the motion's axis by 2 latent pixels (4 px) while the noise is high.
  axis = 2 if ("left" in spec.objects[0].motion or "right" in spec.objects[0].motion) else 1
  shifted = np.roll(truth, 2, axis=axis)
  tokens = lambda z: np.asarray(patching.patchify(z, (1, 2, 2))[0], np.float32)
  steps = 6
  pipe = _pipe(_model_drawing(tokens(truth), tokens(shifted), 0.5), steps)

  seen = {}
  final = S.sample_latents(pipe, [(shapes.caption(spec), spec.num_frames, 32, 32)],
                           on_step=lambda k, x0s: seen.setdefault(k, x0s))
  assert sorted(seen) == list(range(steps)) and all(list(v) == [0] for v in seen.values())
  times = S.time_schedule(steps, 5 * 8 * 8, pipe.shift_fn)
  for k, x0s in seen.items():
    np.testing.assert_allclose(x0s[0], shifted if times[k] > 0.5 else truth, atol=1e-4)
  np.testing.assert_allclose(final[0], truth, atol=1e-4)  # Euler's last step lands on its estimate

  rows = sample_trajectory.trajectory(pipe, [spec], every=1)
  assert [r["step"] for r in rows] == list(range(1, steps + 1)) + ["sample", "truth"]
  for r, t in zip(rows[:-1], list(times[:steps]) + [0.0]):
    assert abs(r["t"] - t) < 1e-9
    assert r["found"] > 0.8
    if t > 0.5:
      assert 3.0 < r["place_error"] < 5.0, r  # the displacement, in pixels
    else:
      assert r["place_error"] == 0.0, r
  sample, rendered = rows[-2:]
  assert sample["read_right"] == rendered["read_right"] == 1  # the truth's motion, from the finished sample
  assert sample["ahead"] == rendered["ahead"] == 1
  assert abs(sample["speed"] - rendered["speed"]) < 0.3 and rendered["speed"] > 1.0, (sample, rendered)


def test_signed_speed_is_positive_in_the_captions_direction():
  spec = evaluate.straight_specs("single", 1, 4)[0]
  o = spec.objects[0]
  ahead = -1.0 if o.motion in ("moving left", "moving up") else 1.0
  track = 10.0 + ahead * 2.0 * np.arange(17.0)
  track[[3, 9]] = np.nan
  assert abs(sample_trajectory.signed_speed(track, spec) - 2.0) < 1e-9
  assert abs(sample_trajectory.signed_speed(track[::-1], spec) + 2.0) < 1e-9
  assert np.isnan(sample_trajectory.signed_speed(np.full(17, np.nan), spec))
