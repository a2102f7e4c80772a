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
