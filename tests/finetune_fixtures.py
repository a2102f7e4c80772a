"""Small bundles and data sets for the fine-tuning tests, without torch: a bundle whose DiT reads a tiny
random UMT5's features (the layout convert.wan writes), and a latent data set with captions."""
from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from sora_jax import config as config_lib
from test_tokenizer import t5_sentencepiece

UMT5 = dict(encoder="umt5", vocab_size=160, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
            max_len=24, dtype="float32", param_dtype="float32", remat="none")
CAPTIONS = ("a red fox jumps over the lazy dog", "a red fox jumps over the lazy dog",
            "the dog sleeps", "a cat on a mat in the sun", "the dog sleeps")


def umt5_bundle_config(*, width: int = 32) -> ml_collections.ConfigDict:
  return config_lib.complete(ml_collections.ConfigDict(dict(
      seed=0,
      dit=dict(in_dim=8, patch=[1, 2, 2], width=width, depth=2, num_heads=2, ffn_dim=2 * width,
               time_freq_dim=16, rope_theta=10000.0, qk_norm=True, attention_axes=("full",), mlp_conv=False, abs_pos=False, text_encoder="umt5",
               text_dim=UMT5["d_model"], attention="reference", remat="none", dtype="float32", param_dtype="float32"),
      text=UMT5,
      data=dict(source="shapes", seq_len=64, max_text_tokens=UMT5["max_len"],
                stand_in_factors=[4, 8, 8]),
      diffusion=dict(objective="flow", time_shift=True, shift_rule="constant", shift_scale=3.0,
                     shift_ref_tokens=1),
      sample=dict(sampler="euler", time_grid="flow_match", steps=2, guidance=1.0))))


def randomize_zeros(params, seed: int = 0, std: float = 0.3):
  """Parameters (pure dict) with every all-zero array (adaLN-Zero tables, the output layer, the
  conditioning path) drawn at random: a model whose blocks and outputs all matter, as trained weights do."""
  rng = np.random.default_rng(seed)
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: (std * rng.standard_normal(np.shape(x))).astype(np.float32)
                      if not np.asarray(x).any() else np.asarray(x), params)


def umt5_bundle(path: Path) -> Path:
  """A bundle (no VAE) with a random DiT (no zero parts) over UMT5 features and a random tiny UMT5."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle
  from sora_jax.models.dit import DiT
  from sora_jax.models.umt5 import UMT5Encoder
  cfg = umt5_bundle_config()
  tok = path.parent / f"{path.name}.spiece.model"
  tok.write_bytes(t5_sentencepiece())
  dit = randomize_zeros(nnx.to_pure_dict(nnx.state(DiT(cfg.dit, rngs=nnx.Rngs(0)), nnx.Param)))
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


# ------------------------------------------------------------------------ a converted Wan 2.1 (torch)
ROOT = Path(__file__).resolve().parents[1]
WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
VIDEOS = (  # (file, frames, height, width, caption): mixed sizes, an image, two clips sharing a caption
    ("fox.npy", 9, 32, 48, "a red fox runs across the snow"),
    ("dog.npy", 9, 48, 48, "a dog sleeps by the fire"),
    ("sun.npy", 1, 32, 32, "the sun sets over the sea"),
    ("cat.npy", 5, 48, 32, "a cat jumps onto a table"),
    ("fox2.npy", 9, 32, 48, "a red fox runs across the snow"),
)


def finetune_config(arg: str = "size=1.3b,runlocal"):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("wan21_finetune", ROOT / "experiments" / "wan21_finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def wan_pipeline(out: Path, cfg) -> Path:
  """A random diffusers WanPipeline whose transformer has cfg.dit's sizes (saved with save_pretrained and
  the tokenizer's spiece.model, as the published folders are)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from test_umt5_interop import random_umt5  # pylint: disable=g-import-not-at-top
  from test_wan_interop import random_wan  # pylint: disable=g-import-not-at-top
  from test_wan_pipeline_interop import t5_tokenizer  # pylint: disable=g-import-not-at-top
  d = cfg.dit
  proto = t5_sentencepiece()
  tokenizer, vocab_size = t5_tokenizer(proto)
  torch.manual_seed(0)
  transformer = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=d.num_heads, attention_head_dim=d.width // d.num_heads,
      in_channels=16, out_channels=16, text_dim=d.text_dim, freq_dim=d.time_freq_dim, ffn_dim=d.ffn_dim,
      num_layers=d.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
  pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=random_umt5(vocab_size, seed=1),
                               transformer=transformer, vae=random_wan(3, **WAN_VAE),
                               scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
  pipe.save_pretrained(out)
  (out / "tokenizer" / "spiece.model").write_bytes(proto)
  return out


def run(args, what, *, timeout=900, **kw):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env, **kw)
  assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


def finetune_data(root: Path, bundle: Path) -> Path:
  """Captioned clips -> ingest_videos -> encode_latents (Wan's VAE and normalisation) -> encode_text:
  the latent directory a fine-tuning run reads."""
  import json  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  videos = root / "videos_in"
  videos.mkdir(parents=True)
  lines = []
  for name, t, h, w, caption in VIDEOS:
    # Smooth moving gradients (something a VAE and a DiT can model), not white noise.
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = np.stack([np.stack([np.sin(2 * np.pi * (xx + 0.1 * k) + phase[c]) * np.cos(np.pi * yy)
                                 for c in range(3)], -1) for k in range(t)])
    np.save(videos / name, np.round((frames + 1) * 127.5).clip(0, 255).astype(np.uint8))
    lines.append(json.dumps({"file": name, "caption": caption}))
  (videos / "captions.jsonl").write_text("\n".join(lines) + "\n")
  data = root / "videos"
  run([str(ROOT / "data_pipelines" / "ingest_videos.py"), f"--input={videos}", f"--out_dir={data}",
       "--fps=8", "--max_seconds=1", "--max_pixels=2304", "--num_workers=0"], "ingest_videos")
  latents = root / "latents"
  run([str(ROOT / "data_pipelines" / "encode_latents.py"), f"--vae={bundle}", "--latent_stats=bundle",
       f"--data_dir={data}", f"--out_dir={latents}", "--splits=train"], "encode_latents")
  run([str(ROOT / "data_pipelines" / "encode_text.py"), f"--bundle={bundle}", f"--latents_dir={latents}",
       "--splits=train"], "encode_text")
  return latents
