"""Cached caption features (data_pipelines/encode_text.py): what sampling would compute, once per
caption; packed rows of padded features; a DiT train step on them."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import finetune_fixtures as ff
from sora_jax.data import sources, text_features

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the module fixture runs encode_text.py in a subprocess (~40 s)


def _encode_text(bundle, latents, *extra):
  r = subprocess.run([sys.executable, str(ROOT / "data_pipelines" / "encode_text.py"), f"--bundle={bundle}",
                      f"--latents_dir={latents}", *extra], capture_output=True, text=True, timeout=600,
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
  return r


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  bundle = ff.umt5_bundle(root / "bundle")
  ff.latent_dataset(root / "latents")
  r = _encode_text(bundle, root / "latents", "--splits=train", "--shard_size=3", "--batch=2")
  assert r.returncode == 0, r.stderr[-3000:]
  return bundle, root / "latents", r.stdout


def test_features_are_what_sampling_computes_once_per_caption(cached):
  from sora_jax import bundle as bundle_lib, sampling
  bundle, latents, log = cached
  # Shard 1 holds captions 0-2 (2 distinct), shard 2 captions 3-4 (2 distinct).
  assert "5 records, 4 captions encoded by this run" in log
  pipe = sampling.as_pipeline(bundle_lib.load(bundle))
  src = text_features.with_text_features(latents, "train")
  assert len(src) == len(ff.CAPTIONS)
  for i, caption in enumerate(ff.CAPTIONS):
    rec = src[i]
    want = pipe.text(caption)                        # [max_len, d], zero past the caption's tokens
    n = len(pipe.tokenize.encode(caption, ff.UMT5["max_len"]))
    assert rec["caption"] == caption and rec["latent_mean"].shape[-1] == 2
    assert rec["text_features"].shape == (n, ff.UMT5["d_model"])
    np.testing.assert_allclose(rec["text_features"], want[:n], atol=1e-5)
    np.testing.assert_array_equal(text_features.pad(rec["text_features"], ff.UMT5["max_len"])[n:], want[n:])
  # A re-run finds every shard done and encodes nothing.
  again = _encode_text(bundle, latents, "--splits=train", "--shard_size=3")
  assert again.returncode == 0 and "0 captions encoded by this run" in again.stdout


def test_rebuilt_latents_with_other_captions_are_refused(tmp_path, cached):
  _, latents, _ = cached
  ff.latent_dataset(tmp_path, captions=("another caption",) + ff.CAPTIONS[1:])
  src = text_features.WithTextFeatures(sources.latent_source(tmp_path, "train"),
                                       text_features.source(latents, "train"))
  with pytest.raises(ValueError, match="record 0: cached features are of caption 'a red fox"):
    src[0]  # pylint: disable=pointless-statement
  assert src[2]["text_features"].shape[1] == ff.UMT5["d_model"]
  with pytest.raises(ValueError, match="has 5 records, the latent data set"):
    text_features.WithTextFeatures(list(range(3)), text_features.source(latents, "train"))


def _config(latents):
  """The bundle's DiT, trained for two steps on the cached features (data.text_source = "features")."""
  cfg = ml_collections.ConfigDict(train_config_base())
  cfg.dit = ff.umt5_bundle_config().dit
  cfg.dit.in_dim = 0  # filled in from the data
  cfg.data = ml_collections.ConfigDict(dict(
      source="latents", latents_dir=str(latents), text_source="features", seq_len=32,
      text_len=3 * ff.UMT5["max_len"], max_text_tokens=ff.UMT5["max_len"], max_segments=3, batch_size=2,
      token_budget=0, min_patch_side=2, long_clips="crop", sample_latents=True, packer="best_fit",
      packing_bins=4, num_workers=0, shuffle_seed=0))
  return cfg


def test_packed_rows_hold_each_captions_padded_features(cached):
  from sora_jax.data import pipeline
  _, latents, _ = cached
  cfg = _config(latents)
  batch = next(pipeline.make_iterator(cfg, split="train"))
  text, tseg = batch["text_tokens"], batch["text_segment_ids"]
  assert text.dtype == np.float32 and text.shape == (2, 3 * ff.UMT5["max_len"], ff.UMT5["d_model"])
  src = text_features.with_text_features(latents, "train")
  seen = 0
  for b in range(2):
    for k in range(3):
      rows = text[b][tseg[b] == k + 1]
      if not len(rows):
        continue
      seen += 1
      rec = src[int(batch["seg_index"][b, k])]
      assert rows.shape[0] == ff.UMT5["max_len"]  # every caption padded to max_text_tokens, as Wan pads to 512
      np.testing.assert_array_equal(rows, text_features.pad(rec["text_features"], ff.UMT5["max_len"]))
      # The video tokens of that segment are that record's.
      assert (batch["segment_ids"][b] == k + 1).sum() == np.prod(batch["seg_grid"][b, k])
  assert seen >= 3
  assert (text[tseg == 0] == 0).all()


def test_a_train_step_on_cached_features(cached, tmp_path):
  from sora_jax import train
  _, latents, _ = cached
  state = train.train(_config(latents), str(tmp_path / "w"), devices=jax.devices()[:1])
  assert int(state["step"]) == 2
  rows = [__import__("json").loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses and all(np.isfinite(losses))


def train_config_base():
  """The trainer's own keys (experiments/shapes_demo.py's values for a 2-step run)."""
  return dict(seed=0, mesh=dict(data=1, fsdp=1, tensor=1),
              train=dict(total_steps=2, max_train_seconds=0.0, log_every_steps=1, checkpoint_every_steps=2,
                         keep_checkpoints=1, sample_every_steps=0, val_every_steps=0, resume_from="",
                         init_from="", flops_check=False,
                         optim=dict(lr=1e-3, warmup_steps=1, schedule="constant", b1=0.9, b2=0.99, eps=1e-8,
                                    weight_decay=0.0, grad_clip=1.0, ema_decay=0.99)),
              diffusion=dict(objective="flow", prediction="v", cosine_s=0.008, t_mean=0.0, t_std=1.0,
                             time_shift=True, shift_scale=3.0, shift_ref_tokens=1, shift_rule="constant",
                             object_weight=0.0, text_drop=0.1, cond_first_frame=0.0, cond_first_frames=0.0,
                             cond_last_frames=0.0, cond_both_ends=0.0))
