"""Small bundles and data sets for the fine-tuning tests, without torch: a bundle whose DiT reads a tiny
random UMT5's features (the layout convert.wan writes), and a latent data set with captions."""
from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from test_tokenizer import t5_sentencepiece

UMT5 = dict(encoder="umt5", vocab_size=160, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
            max_len=24, dtype="float32", param_dtype="float32", remat="none")
CAPTIONS = ("a red fox jumps over the lazy dog", "a red fox jumps over the lazy dog",
            "the dog sleeps", "a cat on a mat in the sun", "the dog sleeps")


def umt5_bundle_config(*, width: int = 32) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      dit=dict(in_dim=8, width=width, depth=2, num_heads=2, ffn_dim=2 * width, time_freq_dim=16,
               rope_theta=10000.0, qk_norm=True, text_encoder="umt5", text_dim=UMT5["d_model"],
               attention="reference", remat="none", dtype="float32", param_dtype="float32"),
      text=UMT5,
      data=dict(source="shapes", patch=[1, 2, 2], seq_len=64, max_text_tokens=UMT5["max_len"],
                stand_in_factors=[4, 8, 8]),
      diffusion=dict(objective="flow", time_shift=True, shift_rule="constant", shift_scale=3.0,
                     shift_ref_tokens=1),
      sample=dict(sampler="euler", time_grid="flow_match", steps=2, guidance=1.0)))


def umt5_bundle(path: Path) -> Path:
  """A bundle (no VAE) with a random DiT over UMT5 features and a random tiny UMT5."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle
  from sora_jax.models.dit import DiT
  from sora_jax.models.umt5 import UMT5Encoder
  cfg = umt5_bundle_config()
  tok = path.parent / f"{path.name}.spiece.model"
  tok.write_bytes(t5_sentencepiece())
  dit = nnx.to_pure_dict(nnx.state(DiT(cfg.dit, rngs=nnx.Rngs(0)), nnx.Param))
  dit["text"] = nnx.to_pure_dict(nnx.state(UMT5Encoder(cfg.text, rngs=nnx.Rngs(1)), nnx.Param))
  bundle.write(path, config=cfg, dit_params=dit, vae_params=None, tokenizer_model=tok,
               latent_stats={"shift": [0.0, 0.0], "scale": [1.0, 1.0]})
  return path


def latent_dataset(latents_dir: Path, split: str = "train", captions=CAPTIONS, *, channels: int = 2,
                   seed: int = 0) -> None:
  """Latent records of 1-2 latent frames of 4 x 4 or 4 x 6, one per caption."""
  from sora_jax.data import sources
  rng = np.random.default_rng(seed)
  examples = []
  for i, caption in enumerate(captions):
    t, w = 1 + i % 2, 4 + 2 * (i % 2)
    mean = rng.standard_normal((t, 4, w, channels)).astype(np.float32)
    examples.append(dict(latent_mean=mean, latent_std=np.full_like(mean, 0.1), caption=caption,
                         num_frames=1 + 4 * (t - 1), height=32, width=8 * w, fps=8.0, labels="",
                         source=f"test#{i}"))
  sources.write_latent_dataset(latents_dir, split, examples,
                               stats={"shift": [0.0] * channels, "scale": [1.0] * channels})
