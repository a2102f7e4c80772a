"""bench.latent_contrast: each colour's latent distance from each background, per unit of pixel distance."""
import numpy as np

from sora_jax.bench import latent_contrast
from sora_jax.data import shapes


class _LinearVAE:
  """encode: 4x4 average pooling of pixels in [-1, 1], then a 3 -> 3 channel map."""

  def __init__(self, gains):
    self.gains = np.asarray(gains, float)

  def encode(self, frames):
    x = np.asarray(frames, float) / 127.5 - 1.0
    t, h, w, c = x.shape
    return x.reshape(t, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)) * self.gains


def test_an_isometric_encoder_gives_every_colour_the_same_contrast_per_pixel():
  out = latent_contrast.contrasts(_LinearVAE([2.0, 2.0, 2.0]))
  assert set(out) == set(shapes.BACKGROUNDS)
  for row in out.values():
    assert set(row) == set(shapes.COLOURS)
    for v in row.values():
      np.testing.assert_allclose(v["per_pixel"], 2.0, rtol=1e-6)


def test_a_squeezed_channel_shows_as_the_colour_that_lives_in_it():
  out = latent_contrast.contrasts(_LinearVAE([2.0, 0.2, 2.0]))  # the green channel squeezed 10x
  black = out["black"]
  assert black["green"]["per_pixel"] < 0.5 * min(black[c]["per_pixel"] for c in ("red", "blue"))
