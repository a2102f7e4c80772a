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
      max_segments=48, batch_size=2, token_budget=576, min_patch_side=2)
  c.mesh = common.mesh()
  c.sample = common.sample(num_frames=17, height=32, width=32, fps=8.0, steps=4 if arg.runlocal else 30,
                           row_len=128)

  c.dit = common.dit("demo", text=common.caption_encoder(vocab_size=c.data.get_ref("vocab_size"), width=128,
                                                         depth=2, heads=4))
  c.diffusion = common.diffusion()
  c.train = common.trainer(total_steps=1300, sample_every_steps=200,
                           optim=common.optim(lr=2e-3, warmup_steps=40))

  c.vae = common.vae(base_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, z_dim=8,
                     temporal_downsample=(True, True), norm="none")
  c.vae_train = common.vae_trainer(
      total_steps=2500,
      optim=common.optim(lr=1e-3, warmup_steps=30, end_lr_fraction=0.05, weight_decay=0.0, ema_decay=0.99))
  c.eval = common.evaluation()

  if arg.runlocal:  # a few steps of each stage
    c.vae_train.total_steps, c.vae_train.num_val, c.vae_train.checkpoint_every_steps = 10, 4, 5
    c.train.total_steps, c.train.log_every_steps, c.train.checkpoint_every_steps = 10, 5, 5
    c.train.sample_every_steps = 0
    c.eval.num_prompts = c.eval.vae_clips = c.eval.denoise_clips = 4
  return c
