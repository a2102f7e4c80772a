"""encode_latents: records equal the VAE's chunked encoding, stats match them, shards resume."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx

from sora_jax import checkpoint, config
from sora_jax.models.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, z_dim=4, temporal_downsample=[True, True])


def _workdir(path: Path) -> VAE:
  vae = VAE(TINY, rngs=nnx.Rngs(0))
  path.mkdir(parents=True)
  (path / "config.json").write_text(config.to_json(ml_collections.ConfigDict({"vae": TINY})))
  mgr = checkpoint.Manager(str(path / "checkpoints"))
  mgr.save(1, {"ema": nnx.to_pure_dict(nnx.state(vae, nnx.Param))}, force=True)
  mgr.close()
  return vae


def _encode(vae_dir, data_dir, out_dir):
  r = subprocess.run([sys.executable, str(ROOT / "data_pipelines" / "encode_latents.py"),
                      f"--vae={vae_dir}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                      "--splits=train,validation", "--shard_size=2"],
                     capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))  # 8 fake devices (conftest): clips spread
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


@pytest.mark.slow
def test_latent_dataset_matches_the_vae_and_resumes(tmp_path):
  from sora_jax.data import sources
  from sora_jax.data.shapes_dataset import build_shapes
  data = tmp_path / "shapes"
  build_shapes(data, "train", 3)
  build_shapes(data, "validation", 1)
  vae = _workdir(tmp_path / "vae")
  out = tmp_path / "latents"
  _encode(tmp_path / "vae", data, out)
  videos = sources.video_source(data, "train")
  lat = sources.latent_source(out, "train")
  assert len(lat) == 3 and len(sources.latent_source(out, "validation")) == 1
  means = []
  for i in range(3):
    v, r = videos[i], lat[i]
    mean, logvar = vae.encode_chunked(np.asarray(v["video"], np.float32)[None] / 127.5 - 1.0)
    np.testing.assert_allclose(r["latent_mean"], mean[0], atol=1e-5)
    np.testing.assert_allclose(r["latent_std"], np.exp(0.5 * np.asarray(logvar[0])), rtol=1e-4)
    assert (r["caption"], r["num_frames"], r["labels"]) == (v["caption"], v["num_frames"], v["labels"])
    means.append(r["latent_mean"].reshape(-1, 4))
  stats = json.loads((out / "latent_stats.json").read_text())
  allm = np.concatenate(means)
  np.testing.assert_allclose(stats["shift"], allm.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["scale"], allm.std(0), rtol=1e-4, atol=1e-5)
  assert stats["vae"]["z_dim"] == 4
  # Interrupted run: one shard and the written data sets lost; a re-run redoes only that shard.
  shards = sorted((out / "_shards" / "train").glob("shard-*.npz"))
  assert len(shards) == 2
  kept = shards[0].stat().st_mtime_ns
  shards[1].unlink()
  shutil.rmtree(out / "latents")
  log = _encode(tmp_path / "vae", data, out)
  assert "(1 were done before this run)" in log
  assert shards[0].stat().st_mtime_ns == kept
  np.testing.assert_array_equal(sources.latent_source(out, "train")[2]["latent_mean"],
                                lat[2]["latent_mean"])
  # The VAE trained on: a re-run encodes every split again; statistics and splits name the new VAE.
  vae2 = VAE(TINY, rngs=nnx.Rngs(1))
  mgr = checkpoint.Manager(str(tmp_path / "vae" / "checkpoints"))
  mgr.save(2, {"ema": nnx.to_pure_dict(nnx.state(vae2, nnx.Param))}, force=True)
  mgr.close()
  log = _encode(tmp_path / "vae", data, out)
  assert "encoding every split again" in log and "(0 were done before this run)" in log
  stats = json.loads((out / "latent_stats.json").read_text())
  assert stats["vae_source"]["step"] == 2
  for split in ("train", "validation"):
    assert sources.latents_vae(out, split) == stats["vae_source"]
  mean, _ = vae2.encode_chunked(np.asarray(videos[0]["video"], np.float32)[None] / 127.5 - 1.0)
  np.testing.assert_allclose(sources.latent_source(out, "train")[0]["latent_mean"], mean[0], atol=1e-5)


def _latent_examples(n):
  rng = np.random.default_rng(0)
  for i in range(n):
    yield {"latent_mean": rng.standard_normal((2, 2, 2, 4)).astype(np.float32),
           "latent_std": np.ones((2, 2, 2, 4), np.float32), "caption": f"clip {i}", "num_frames": 5,
           "height": 16, "width": 16, "fps": 8.0, "labels": "", "source": f"t/{i}"}


def test_a_stale_mix_of_latents_statistics_and_vae_is_refused(tmp_path):
  """Latents of one VAE with the statistics of another (a re-run that rewrote only the statistics) are
  refused by the pipeline; a DiT run pinned to one VAE's latents refuses to go on with another's."""
  from sora_jax import train
  from sora_jax.data import pipeline, sources
  old = {"path": "runs/demo/vae", "step": 1000, "sha256": "a" * 64}
  new = {"path": "runs/demo/vae", "step": 2500, "sha256": "b" * 64}
  lat = tmp_path / "latents"
  sources.write_latent_dataset(lat, "train", _latent_examples(2), vae=old)
  sources.write_latent_stats(lat, {"shift": [0.0] * 4, "scale": [1.0] * 4, "vae_source": old})
  cfg = ml_collections.ConfigDict({"data": {"source": "latents", "latents_dir": str(lat)}})
  assert sources.check_latents(lat, "train")["vae_source"] == old
  dit = tmp_path / "dit"
  dit.mkdir()
  train.pin_latents(cfg, str(dit), resuming=False)  # a fresh DiT run records the VAE of its latents
  assert json.loads((dit / train.LATENTS_VAE).read_text()) == old

  sources.write_latent_stats(lat, {"shift": [0.0] * 4, "scale": [1.0] * 4, "vae_source": new})
  with pytest.raises(sources.StaleLatents, match=r"'train' latents come from VAE .* step 1000 .* "
                                                 r"latent_stats.json from VAE .* step 2500"):
    pipeline.open_source(cfg, "train")
  # The latents re-encoded by the new VAE too: consistent again, but not what the DiT trained on.
  sources.write_latent_dataset(lat, "train", _latent_examples(2), vae=new)
  assert sources.check_latents(lat, "train")["vae_source"] == new
  with pytest.raises(config.ConfigError, match=r"trained on latents of VAE .* step 1000 .* now holds "
                                               r"latents of VAE .* step 2500"):
    train.pin_latents(cfg, str(dit), resuming=True)
