"""Wan 2.1 text-to-video, 1.3B: the published model's DiT (30 blocks of width 1536, 12 heads of 128, FFN
8960), its frozen UMT5-XXL text encoder (features cached per caption, padded to 512 tokens) and its
4x8x8, 16-channel VAE, in sora-jax (one DiT family: models/dit.py is Wan's block; docs/architecture.md).

Load the published weights (a diffusers folder, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) and sample:
    python -m sora_jax.convert.wan --pipeline Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_1.3b/bundle
    python -m sora_jax.sample --bundle runs/wan21_1.3b/bundle --prompt "a cat surfing a wave at sunset" \\
        --num_frames 81 --height 480 --width 832 --out cat.mp4
Check a training step fits a slice and how fast the compiler thinks it runs (docs/pods.md):
    python -m sora_jax.compile_check --config experiments/wan21_t2v_1_3b.py --topology v5p:2x2x1
The converted model equals diffusers' (tests/test_wan_dit_interop.py, tests/test_wan_pipeline_interop.py).
Training defaults here are for continuing from the published weights (`--config.train.init_from=BUNDLE`): a
small learning rate, Wan's constant time shift (3 at 480p), no image/video-prompt training. Sections and
keys: experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg

# Per slice: (global batch in rows, remat policy, mesh). One 81-frame 480x832 video is 21 x 30 x 52 =
# 32,760 tokens: a row of 32,768 holds one, or up to 21 images of 480x832.
SLICES = {
    "v5p:2x2x1": dict(batch_size=4, remat="full", mesh=dict(data=1, fsdp=-1, tensor=1)),
    # One row per chip: remat `dots` needs 96.93 GB per chip (of 95); full_save_attention 18.05 GB, estimated
    # MFU 41.5% against dots' 42.9% (docs/benchmarks.md, "Pod compile checks").
    "v5p:4x4x4": dict(batch_size=64, remat="full_save_attention", mesh=dict(data=1, fsdp=-1, tensor=1)),
}


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:2x2x1", runlocal=False)
  if arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  pod = SLICES[arg.topology]
  c = common.ConfigDict()
  c.seed = 0
  c.data = common.data(
      latents_dir="data/wan21/latents",   # encode_latents.py with the converted Wan VAE
      tokenizer="runs/demo/data/tokenizer.model",
      seq_len=32768, max_segments=16,
      text_len=512 * 16,             # every caption's 512 UMT5 features (zero past its tokens)
      max_text_tokens=512, batch_size=pod["batch_size"], token_budget=0, min_patch_side=8)
  c.mesh = common.mesh(**pod["mesh"])
  c.sample = common.wan21_sample(height=480, width=832)

  c.dit = common.dit("wan2.1-1.3B", text=common.umt5(), in_dim=64, attention="splash", remat=pod["remat"],
                     dtype="bfloat16")
  c.text = common.ConfigDict(common.UMT5_XXL)
  c.vae = common.wan21_vae()
  c.diffusion = common.wan21_diffusion(shift_scale=3.0)  # Wan at 480p: sigma' = 3 sigma / (1 + 2 sigma)
  c.train = common.trainer(
      total_steps=10_000, checkpoint_every_steps=500,
      optim=common.optim(lr=1e-5, warmup_steps=100, schedule="constant", b2=0.999, ema_decay=0.9999))
  c.compile_check = common.compile_check(arg.topology)

  if arg.runlocal:  # the same layout, tiny: a smoke run on one CPU host
    c.data.seq_len, c.data.batch_size, c.data.max_segments, c.data.text_len = 1024, 2, 4, 512 * 4
    c.dit.update(dict(width=128, depth=2, num_heads=1, ffn_dim=256, text_dim=64, attention="auto",
                      dtype="float32"))
    c.text.update(dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       dtype="float32"))
    c.mesh = common.mesh()
  return c
