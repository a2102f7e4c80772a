"""The VAE trainer: joint image/video pixel-budget batches, resume == uninterrupted, loading, metrics."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sora_jax import train_vae
from sora_jax.data.vae_batches import Crop, VAEBatches

ROOT = Path(__file__).resolve().parents[1]


def _demo_config():
  spec = importlib.util.spec_from_file_location("shapes_demo", ROOT / "experiments" / "shapes_demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The tiny VAE run over experiments/shapes_demo.py, as dotted keys: _tiny_config sets them in this process,
# test_faults.py hands them to `python -m sora_jax.train_vae` as --config.KEY=VALUE flags.
# 8 crops of each kind: the conftest's 8 fake devices split every batch (data parallel).
TINY_VAE = {
    "vae.base_dim": 4, "vae.dim_mult": (1, 2), "vae.num_res_blocks": 1, "vae.z_dim": 4,
    "vae.temporal_downsample": (True,),
    "vae_train.total_steps": 4, "vae_train.image_crop": 16, "vae_train.image_pixels": 8 * 256,
    "vae_train.video_frames": 5, "vae_train.video_crop": 16, "vae_train.video_pixels": 8 * 1280,
    "vae_train.log_every_steps": 2, "vae_train.checkpoint_every_steps": 2, "vae_train.num_val": 2,
    "vae_train.val_frames": 5, "vae_train.val_size": 16, "vae_train.recon_videos": 1,
    "vae_train.max_train_seconds": 0.0, "vae_train.optim.warmup_steps": 1,
}


def set_keys(cfg, values: dict):
  """Sets each dotted key of `values` in `cfg` (as --config.KEY=VALUE does), in place; returns `cfg`."""
  for key, value in values.items():
    *path, last = key.split(".")
    node = cfg
    for name in path:
      node = node[name]
    node[last] = value
  return cfg


def _tiny_config(data_dir):
  cfg = set_keys(_demo_config(), TINY_VAE)
  cfg.data.videos_dir = str(data_dir)
  return cfg


def _fake_source():
  rng = np.random.default_rng(0)
  clips = [rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)
           for t, h, w in ((1, 32, 32), (9, 48, 32), (17, 32, 64), (1, 24, 24), (3, 32, 32))]
  return [{"video": c} for c in clips]


def test_busiest_crop_finds_the_object():
  # A flat frame with one small bright square: with crop_tries=1 most 8x8 windows miss it; the busiest
  # of 32 windows usually holds some of it (1 - 0.948^32 = 82%), and is still a window of the frame.
  from sora_jax.data.vae_batches import _crop_2d
  frame = np.zeros((1, 64, 64, 3), np.uint8)
  frame[0, 40:46, 10:16] = 255
  hits = {}
  for tries in (1, 32):
    rng = np.random.default_rng(0)
    crops = [_crop_2d(frame, 8, 8, rng, tries) for _ in range(200)]
    hits[tries] = np.mean([c.max() > 0 for c in crops])
  assert hits[1] < 0.1 and hits[32] > 0.65, hits
  assert all(c.shape == (1, 8, 8, 3) for c in crops)


def test_batches_fill_pixel_budgets_with_grid_crops():
  image = Crop.for_budget(1, 16, 16, 1000)
  video = Crop.for_budget(5, 16, 24, 5000)
  assert (image.batch, video.batch) == (3, 2)  # 1000 // 256, 5000 // 1920
  batches = VAEBatches(_fake_source(), image=image, video=video, seed=1)
  b = batches.batch(7)
  assert b["images"].shape == (3, 1, 16, 16, 3) and b["videos"].shape == (2, 5, 16, 24, 3)
  assert b["images"].dtype == np.uint8
  np.testing.assert_array_equal(batches.batch(7)["videos"], b["videos"])  # a function of the step
  assert not np.array_equal(batches.batch(8)["videos"], b["videos"])
  # A video crop is a contiguous window of one source clip.
  clips = [r["video"] for r in _fake_source()]
  v = b["videos"][0]
  assert any(c.shape[0] >= 5 and any(
      np.array_equal(c[s:s + 5, y:y + 16, x:x + 24], v)
      for s in range(c.shape[0] - 4) for y in range(c.shape[1] - 15) for x in range(c.shape[2] - 23))
      for c in clips)
  it = batches.iterate(7)
  np.testing.assert_array_equal(next(it)["images"], b["images"])
  it.close()
  # Each host builds only its rows: any span of rows equals those rows of the whole batch.
  part = batches.batch(7, {"images": (1, 3), "videos": (1, 2)})
  np.testing.assert_array_equal(part["images"], b["images"][1:3])
  np.testing.assert_array_equal(part["videos"], b["videos"][1:2])
  it = batches.iterate(7, spans={"images": (2, 3), "videos": (0, 1)})
  np.testing.assert_array_equal(next(it)["images"], b["images"][2:3])
  it.close()
  with pytest.raises(ValueError, match=r"rows \[2, 4\) of a batch of 3 images"):
    batches.rows(7, "images", 2, 4)


def test_each_process_builds_the_rows_its_devices_hold():
  import jax
  from sora_jax import sharding
  # One process holds every row; the 2-process case is test_two_processes_train_the_same_vae_as_one.
  n = jax.device_count()
  mesh = jax.make_mesh((n, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert train_vae.local_rows(sharding.batch_sharding(mesh, 5), (2 * n, 1, 8, 8, 3)) == (0, 2 * n)


def test_crop_larger_than_budget_is_a_one_line_error():
  with pytest.raises(ValueError, match="smaller than one 5x32x32 crop"):
    Crop.for_budget(5, 32, 32, 1000)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(shapes_videos, tmp_path):
  from sora_jax import bundle
  cfg = _tiny_config(shapes_videos)
  full = tmp_path / "full"
  summary = train_vae.train(cfg, str(full))
  assert summary["step"] == 4 and np.isfinite(summary["val_psnr"])
  metrics = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
  assert any("val/psnr" in m and "val/ssim" in m for m in metrics)
  assert any("videos/l1" in m and "images/l1" in m and "pixels_per_s" in m for m in metrics)
  assert list((full / "reconstructions").glob("step000004_00.*"))
  # Interrupt after step 2: a copy that lost its last checkpoint resumes from step 2.
  resumed = tmp_path / "resumed"
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  train_vae.train(cfg, str(resumed))
  a, step_a, _ = bundle.restore_ema(full)
  b, step_b, _ = bundle.restore_ema(resumed)
  assert step_a == step_b == 4
  for (ka, va), (kb, vb) in zip(bundle._flatten(a), bundle._flatten(b)):  # pylint: disable=protected-access
    assert ka == kb
    np.testing.assert_allclose(va, vb, rtol=1e-6, atol=1e-7, err_msg=ka)
  # And the trained workdir loads as a working VAE (what reconstruct and encode_latents use).
  vae, loaded_cfg, step = train_vae.load(full)
  assert step == 4 and loaded_cfg.vae.base_dim == 4
  mean, logvar = vae.encode_chunked(np.zeros((1, 5, 16, 16, 3), np.float32))
  assert mean.shape == (1, 3, 8, 8, 4)


@pytest.mark.slow
def test_discriminator_trains_only_after_gan_start(shapes_videos):
  import jax
  from sora_jax import optim
  cfg = _tiny_config(shapes_videos)
  cfg.vae_train.update(dict(gan_weight=0.5, gan_start=1, disc_dim=4, disc_layers=2, total_steps=3))
  tx = optim.make_optimizer(cfg.vae_train.optim, 3)
  disc_tx = optim.make_optimizer(cfg.vae_train.optim, 3)
  state, graphdef, disc_graphdef = train_vae.init_state(cfg, tx, disc_tx)
  step = jax.jit(train_vae.make_train_step(cfg, graphdef, tx, optim.make_schedule(cfg.vae_train.optim, 3),
                                           disc_graphdef, disc_tx))
  batches = VAEBatches(_fake_source(), image=Crop.for_budget(1, 16, 16, 512),
                       video=Crop.for_budget(5, 16, 16, 1280), seed=0)
  before = jax.tree.leaves(state["disc_params"])
  state, m0 = step(state, batches.batch(0))
  after0 = jax.tree.leaves(state["disc_params"])
  assert all(np.array_equal(a, b) for a, b in zip(before, after0))  # step 0 < gan_start: frozen
  # Its optimizer starts counting at gan_start: the warmup's first step has lr 0.
  for i in (1, 2):
    state, m1 = step(state, batches.batch(i))
  after1 = jax.tree.leaves(state["disc_params"])
  assert any(not np.array_equal(a, b) for a, b in zip(after0, after1))
  assert np.isfinite(float(m1["gan/d_loss"])) and np.isfinite(float(m1["gan/g_loss"]))


_WORKER = r"""
import os, sys
repo, data_dir, devices, workdir = sys.argv[1:5]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path[:0] = [repo, os.path.join(repo, "tests")]
from absl import flags
from sora_jax import distributed
flags.FLAGS(sys.argv[:1] + sys.argv[5:])
distributed.initialize()
import test_train_vae
from sora_jax import train_vae
train_vae.train(test_train_vae._tiny_config(data_dir), workdir)
"""


@pytest.mark.slow
def test_two_processes_train_the_same_vae_as_one(shapes_videos, tmp_path):
  """Data parallel across hosts: 2 processes x 2 devices and 1 process x 4 devices draw the same global
  batches, split them differently, and end at the same weights; process 0 alone writes files."""
  import subprocess
  import sys
  from sora_jax import bundle
  from test_multihost_inference import REPO, _env, run_two
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  runs = run_two([sys.executable, str(script), str(REPO), str(shapes_videos), "2", str(tmp_path / "two")])
  assert "[vae] step 4/4" in runs[0][1] and "[vae]" not in runs[1][1]
  r = subprocess.run([sys.executable, str(script), str(REPO), str(shapes_videos), "4", str(tmp_path / "one")],
                     env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  a, step_a, _ = bundle.restore_ema(tmp_path / "two")
  b, step_b, _ = bundle.restore_ema(tmp_path / "one")
  assert step_a == step_b == 4
  for (ka, va), (kb, vb) in zip(bundle._flatten(a), bundle._flatten(b)):  # pylint: disable=protected-access
    assert ka == kb
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6, err_msg=ka)
  assert list((tmp_path / "two" / "reconstructions").glob("step000004_00.*"))


def test_a_missing_split_stops_the_run_before_anything_is_compiled(tmp_path):
  from sora_jax import config
  from sora_jax.data.shapes_dataset import build_shapes
  build_shapes(tmp_path, "train", 2)  # no validation split: the VAE could not be scored at the end
  with pytest.raises(config.ConfigError, match=r"config.data.videos_dir=.*no built split 'validation'"):
    train_vae.train(_tiny_config(tmp_path), str(tmp_path / "vae"))
  assert not (tmp_path / "vae" / "checkpoints").exists()
  with pytest.raises(config.ConfigError, match=r"no built split 'train'"):
    train_vae.train(_tiny_config(tmp_path / "empty"), str(tmp_path / "vae2"))
