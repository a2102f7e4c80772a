"""The one PSNR and the one SSIM: checked against independent computations, and used by both the VAE
trainer's validation and the evaluator's report."""
import math

import ml_collections
import numpy as np
import pytest

from sora_jax import evaluate
from sora_jax import metrics
from sora_jax import train_vae


def _ssim_by_windows(a, b):
  """SSIM the slow way: every 11x11 window in the frame, weighted by the 2-D Gaussian (sigma 1.5)."""
  g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  values = []
  for t in range(a.shape[0]):
    for c in range(a.shape[3]):
      for i in range(a.shape[1] - 10):
        for j in range(a.shape[2] - 10):
          x = a[t, i:i + 11, j:j + 11, c].astype(np.float64)
          y = b[t, i:i + 11, j:j + 11, c].astype(np.float64)
          mx, my = (w * x).sum(), (w * y).sum()
          vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
          cov = (w * (x - mx) * (y - my)).sum()
          values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
  return float(np.mean(values))


def test_psnr_against_its_formula():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  assert metrics.psnr(a, a) == float("inf")
  b = np.clip(a.astype(np.int16) + 10, 0, 255).astype(np.uint8)
  mse = np.mean((a.astype(float) - b) ** 2)
  assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
  flat = np.full((2, 16, 16, 3), 100, np.uint8)
  assert metrics.psnr(flat, flat + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100))  # 28.13 dB


def test_ssim_against_a_window_by_window_computation():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (2, 13, 15, 2), dtype=np.uint8)
  b = np.clip(a * 0.7 + rng.normal(40, 20, a.shape), 0, 255).astype(np.uint8)
  assert metrics.ssim(a, b) == pytest.approx(_ssim_by_windows(a, b), rel=1e-12)
  assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a))
  assert metrics.ssim(a[0], b[0]) == pytest.approx(_ssim_by_windows(a[:1], b[:1]), rel=1e-12)  # an image
  # Two flat fields c and d: no variance, so SSIM is the luminance term (2cd + C1) / (c^2 + d^2 + C1).
  c, d, c1 = 100.0, 140.0, (0.01 * 255) ** 2
  flat_c, flat_d = np.full((1, 12, 12, 3), c, np.uint8), np.full((1, 12, 12, 3), d, np.uint8)
  assert metrics.ssim(flat_c, flat_d) == pytest.approx((2 * c * d + c1) / (c * c + d * d + c1))
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(a[:, :10], b[:, :10])


def test_scores_behave():
  rng = np.random.default_rng(0)
  a = np.full((2, 24, 24, 3), 128, np.uint8)
  a[:, 6:14, 8:20] = 230
  noisy = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
  assert metrics.ssim(a, a) == pytest.approx(1.0)
  assert metrics.psnr(a, a) > 90
  assert 25 < metrics.psnr(a, noisy) < 35  # sigma 8 -> about 30 dB
  assert metrics.ssim(a, noisy) < 0.95
  flat = np.full_like(a, 128)  # on a flat field, noise is all the structure: SSIM about c2/(64+c2)
  assert metrics.ssim(flat, np.clip(flat + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)) < 0.6
  r = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  smooth = np.repeat(np.repeat(r[:, ::4, ::4], 4, 1), 4, 2)
  assert metrics.ssim(r, smooth) < 0.9 and metrics.ssim(r, smooth) == pytest.approx(metrics.ssim(smooth, r))


class _IdentityPipe:
  """The evaluator's view of a VAE that reconstructs exactly."""
  geometry = type("G", (), {"temporal": 4, "spatial": 8})()

  def encode(self, x):
    return x

  def decode(self, z):
    return z


def test_vae_trainer_and_evaluator_score_with_the_same_functions(monkeypatch):
  calls = []
  monkeypatch.setattr(metrics, "psnr", lambda a, b: calls.append(("psnr", a.shape)) or 11.0)
  monkeypatch.setattr(metrics, "ssim", lambda a, b: calls.append(("ssim", a.shape)) or 0.5)
  clip = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)

  cfg = ml_collections.ConfigDict({"vae_train": {"val_frames": 5, "val_size": 16}})
  scores, _ = train_vae.validate(lambda params, x: x, None, [{"video": clip}], cfg, batch=1)
  assert scores["psnr"] == 11.0 and scores["ssim"] == 0.5
  assert calls == [("psnr", clip.shape), ("ssim", clip.shape)]

  calls.clear()
  out = evaluate.vae_scores(_IdentityPipe(), [("clip", clip)])
  assert out["psnr"]["mean"] == 11.0 and out["ssim"]["mean"] == 0.5
  assert calls == [("psnr", clip.shape), ("ssim", clip.shape)]
