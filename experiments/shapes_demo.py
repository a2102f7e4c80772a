"""The demo: every stage of sora-jax on the embedded Shapes data set, in about 30 minutes on 2 CPU cores.

    make demo
runs it end to end (python -m sora_jax.demo --config experiments/shapes_demo.py --workdir runs/demo).
Stages can also be run one by one, e.g.
    python -m sora_jax.train_vae --config experiments/shapes_demo.py --workdir runs/demo/vae
    python -m sora_jax.train --config experiments/shapes_demo.py --workdir runs/demo/dit

Each section belongs to one part of the system: `data` (sora_jax/data), `vae` and `vae_train`
(models/vae.py, train_vae.py), `dit` (models/dit.py, models/text.py), `diffusion` (diffusion.py),
the top-level training keys and `optim` (train.py, optim.py), `mesh` (sharding.py), `sample`
(sampling.py) and `eval` (evaluate.py). Expected results are in docs/benchmarks.md.
"""
import ml_collections

from sora_jax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Data (sora_jax/data): the Shapes mixture, its splits and the packed token stream.
  c.data = ml_collections.ConfigDict()
  c.data.mixture = "demo"        # named size mixture in sora_jax/data/shapes.py
  c.data.num_train = 3000
  c.data.num_validation = 64
  c.data.num_test = 64
  # Where the demo's stages meet; `python -m sora_jax.demo --workdir W` points them all under W/data.
  c.data.shapes_dir = "runs/demo/data/shapes"        # tfds data dir of rendered Shapes
  c.data.latents_dir = "runs/demo/data/latents"      # encoded latents + latent_stats.json
  c.data.tokenizer = "runs/demo/data/tokenizer.model"  # sentencepiece model
  c.data.vocab_size = 128
  c.data.seq_len = 1024          # packed row length L (video tokens)
  c.data.text_len = 256          # packed text row length Lt
  c.data.max_text_tokens = 24    # per caption, after tokenization
  c.data.max_segments = 48       # per packed row
  c.data.batch_size = 4          # packed rows per global batch
  c.data.long_clips = "crop"     # "crop" in time, or "drop" (counted and reported)
  c.data.num_workers = 0
  c.data.shuffle_seed = 0
  # Packed stream (sora_jax/data/pipeline.py; its docstring explains size fitting).
  c.data.source = "latents"      # "latents" (VAE latents) or "shapes" (pooled raw frames, no VAE)
  c.data.patch = (1, 2, 2)       # spacetime patch (pt, ph, pw) in latents; D = pt*ph*pw*c
  c.data.token_budget = 0        # max tokens per sample before downscale/crop; 0 = seq_len
  c.data.min_patch_side = 2      # spatial downscale stops at this many patches on a side
  c.data.sample_latents = True   # z = mean + std * eps (per record and epoch); False = the mean
  c.data.stand_in_factors = (4, 8, 8)  # "shapes" source: causal average pool (ft, fh, fw)
  c.data.packer = "best_fit"     # or "first_fit" (grain packers)
  c.data.packing_bins = 16       # rows packed at once; more bins, less padding, more latency

  # --- Sharding (sora_jax/sharding.py): -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # The VAE, DiT, diffusion, training, sampling and evaluation sections are added by their modules'
  # owners below.
  if arg.runlocal:
    c.data.num_train = 64
  return c
