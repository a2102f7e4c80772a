import numpy as np

from sora_jax.bench import motion_by_noise


class PixelPipe:
  """An identity 'VAE': latents are the frames in [-1, 1]."""

  def encode(self, frames):
    return np.asarray(frames, np.float32) / 127.5 - 1.0

  def decode(self, z):
    return np.round((np.clip(z, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def test_specs_are_uncut_videos_whose_objects_all_move():
  specs = motion_by_noise.moving_specs("demo", 8)
  assert len(specs) == 8
  for s in specs:
    assert s.num_frames > 1 and not s.cut_frame
    assert all(o.motion != "still" for o in s.objects)


def test_latent_rows_score_the_truth_fully_and_heavy_noise_lower():
  specs = motion_by_noise.moving_specs("single", 6)
  rows = motion_by_noise.latent_rows(PixelPipe(), specs, [0.0, 1.5], seed=0)
  clean, noisy = rows["0.0"], rows["1.5"]
  assert clean["motion"]["k"] == clean["motion"]["n"] == 6
  assert clean["persistence"]["rate"] == 1.0
  assert noisy["motion"]["k"] < clean["motion"]["k"]
