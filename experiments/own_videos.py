"""Your own captioned videos: the demo's models and recipe on an ingested data set (docs/own_data.md).

    python -m sora_jax.train_vae --config experiments/own_videos.py --workdir runs/mine/vae
    python -m sora_jax.train --config experiments/own_videos.py --workdir runs/mine/dit

Every path is under one run directory, `root` (default runs/mine), laid out as `make demo` lays out
runs/demo, so that export and sample find the parts without more flags:

    root/data/videos/          ingested splits (data_pipelines/ingest_videos.py --out_dir root/data/videos)
    root/data/tokenizer.model  data_pipelines/train_tokenizer.py
    root/data/latents/         data_pipelines/encode_latents.py
    root/vae/, root/dit/       the two training runs; root/bundle/ the export

`vocab_size` must be at least the tokenizer's (train_tokenizer.py --vocab_size is its upper bound). The
model sizes, steps and learning rates are the demo's (experiments/shapes_demo.py): a start for a few
hundred short clips on a CPU, not a recipe tuned for real video. `runlocal` trains a few steps of each
(a smoke test of the whole path, as tests/test_own_data.py runs it). Sections and keys:
experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, root="runs/mine", vocab_size=1024, runlocal=False)
  c = common.ConfigDict()
  c.seed = 0
  c.data = common.data(
      latents_dir=f"{arg.root}/data/latents", tokenizer=f"{arg.root}/data/tokenizer.model",
      videos_dir=f"{arg.root}/data/videos",  # train_vae.py's clips
      mixture="demo",                # evaluate.py's Shapes prompts
      vocab_size=arg.vocab_size,
      seq_len=1024,
      text_len=512,                  # packed text row: room for 8 captions of max_text_tokens
      max_text_tokens=64,            # real captions are longer than Shapes' (at most 30 tokens)
      max_segments=48, batch_size=4, token_budget=576, min_patch_side=2)  # the demo's 4 rows x 650 steps
  c.mesh = common.mesh()
  c.sample = common.demo_sample()
  c.dit = common.demo_dit(c.data)
  c.diffusion = common.diffusion()
  c.train = common.demo_trainer()
  c.vae = common.demo_vae()
  c.vae_train = common.demo_vae_trainer()
  c.eval = common.evaluation()
  if arg.runlocal:
    common.runlocal(c)
  return c
