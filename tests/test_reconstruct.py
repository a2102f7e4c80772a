"""reconstruct: off-grid inputs are padded and cropped back without changing real frames; CLI errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from sora_jax import reconstruct as rec
from sora_jax.models.vae import VAE

TINY = dict(base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, z_dim=4, temporal_downsample=(True, True))


def test_pad_to_grid():
  frames = np.arange(6 * 10 * 14 * 3, dtype=np.uint8).reshape(6, 10, 14, 3) % 251
  padded = rec.pad_to_grid(frames, 4, 8)
  assert padded.shape == (9, 16, 16, 3)
  np.testing.assert_array_equal(padded[:6, :10, :14], frames)
  np.testing.assert_array_equal(padded[8], padded[5])  # the last real frame repeats
  assert rec.pad_to_grid(frames[:1, :8, :8], 4, 8).shape == (1, 8, 8, 3)


def test_off_grid_input_is_cropped_back_and_padding_is_invisible_to_earlier_frames():
  vae = VAE(TINY, rngs=nnx.Rngs(0))
  frames = np.random.default_rng(0).integers(0, 255, (7, 10, 14, 3), dtype=np.uint8)
  out = rec.reconstruct(vae, frames)
  assert out.shape == frames.shape and out.dtype == np.uint8
  # Frames 0..4 fill two latent frames on their own; padding frames 7, 8 cannot reach them.
  np.testing.assert_array_equal(rec.reconstruct(vae, frames[:5]), out[:5])


def _run(*args):
  return subprocess.run([sys.executable, "-m", "sora_jax.reconstruct", *args], capture_output=True,
                        text=True, timeout=300)


def test_cli_rejects_unreadable_inputs_in_one_line(tmp_path):
  empty = tmp_path / "empty.npy"
  np.save(empty, np.zeros((0, 8, 8, 3), np.uint8))
  for path, words in ((tmp_path / "missing.mp4", "no such file"), (empty, "not uint8 [T>0")):
    r = _run(f"--vae={tmp_path}", f"--input={path}", f"--out={tmp_path / 'o.npy'}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last, r.stderr
  r = _run(f"--vae={tmp_path}", f"--input={empty}", f"--out={tmp_path / 'o.avi'}")
  assert r.returncode == 2 and "suffix" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_cli_round_trips_an_off_grid_video_from_a_workdir(tmp_path):
  from sora_jax import checkpoint, config
  import ml_collections
  vae = VAE(TINY, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
  cfg = ml_collections.ConfigDict({"vae": dict(TINY, dim_mult=list(TINY["dim_mult"]),
                                               temporal_downsample=list(TINY["temporal_downsample"]))})
  (tmp_path / "config.json").write_text(config.to_json(cfg))
  mgr = checkpoint.Manager(str(tmp_path / "checkpoints"))
  mgr.save(3, {"ema": params}, force=True)
  mgr.close()
  frames = np.random.default_rng(1).integers(0, 255, (6, 12, 20, 3), dtype=np.uint8)
  np.save(tmp_path / "in.npy", frames)
  r = _run(f"--vae={tmp_path}", f"--input={tmp_path / 'in.npy'}", f"--out={tmp_path / 'out.npy'}")
  assert r.returncode == 0, r.stderr
  out = np.load(tmp_path / "out.npy")
  assert out.shape == frames.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, rec.reconstruct(vae, frames))
  assert "PSNR" in r.stdout
