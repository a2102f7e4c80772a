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
Training defaults here are for continuing from the published weights (`--config.init_from=BUNDLE`): a
small learning rate, Wan's constant time shift (3 at 480p), no image/video-prompt training.
"""
import ml_collections

from experiments import shapes_demo
from sora_jax.config import parse_arg

# Per slice: (global batch in rows, remat policy, mesh). One 81-frame 480x832 video is 21 x 30 x 52 =
# 32,760 tokens: a row of 32,768 holds one, or up to 21 images of 480x832.
SLICES = {
    "v5p:2x2x1": dict(batch_size=4, remat="full", mesh=dict(data=1, fsdp=-1, tensor=1)),
    "v5p:4x4x4": dict(batch_size=64, remat="dots", mesh=dict(data=1, fsdp=-1, tensor=1)),
}
UMT5_XXL = dict(encoder="umt5", vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                layer_norm_epsilon=1e-6, max_len=512, dtype="bfloat16", param_dtype="float32", remat="full")


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:2x2x1", runlocal=False)
  if arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  pod = SLICES[arg.topology]
  c = shapes_demo.get_config()

  c.data.source = "latents"
  c.data.latents_dir = "data/wan21/latents"   # encode_latents.py with the converted Wan VAE
  c.data.seq_len = 32768
  c.data.max_segments = 16
  c.data.text_len = 512 * 16           # every caption's 512 UMT5 features (zero past its tokens)
  c.data.max_text_tokens = 512
  c.data.batch_size = pod["batch_size"]
  c.data.token_budget = 0
  c.data.min_patch_side = 8
  c.mesh = ml_collections.ConfigDict(pod["mesh"])

  c.dit = ml_collections.ConfigDict(dict(
      patch=(1, 2, 2), in_dim=64, width=1536, depth=30, num_heads=12, ffn_dim=8960, time_freq_dim=256, rope_theta=10000.0,
      qk_norm=True, text_encoder="umt5", text_dim=4096, attention="splash", context="none", remat=pod["remat"],
      dtype="bfloat16", param_dtype="float32"))
  c.text = ml_collections.ConfigDict(UMT5_XXL)
  c.vae.update(dict(base_dim=96, decoder_base_dim=0, dim_mult=(1, 2, 4, 4), num_res_blocks=2, z_dim=16,
                    temporal_downsample=(False, True, True), patch_size=1, norm="rms"))

  c.diffusion.shift_rule = "constant"  # Wan: sigma' = 3 sigma / (1 + 2 sigma) at 480p (5 at 720p)
  c.diffusion.shift_scale = 3.0
  c.diffusion.cond_first_frame = c.diffusion.cond_first_frames = 0.0
  c.diffusion.cond_last_frames = c.diffusion.cond_both_ends = 0.0

  c.sample.update(dict(sampler="unipc", time_grid="unipc", steps=50, guidance=5.0, num_frames=81,
                       height=480, width=832, fps=16.0, row_len=0))

  c.train.total_steps = 10_000
  c.train.max_train_seconds = 0.0
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 0
  c.train.optim.lr = 1e-5
  c.train.optim.warmup_steps = 100
  c.train.optim.schedule = "constant"
  c.train.optim.b2 = 0.999
  c.train.optim.weight_decay = 0.01
  c.train.optim.ema_decay = 0.9999

  c.compile_check = ml_collections.ConfigDict()
  c.compile_check.topology = arg.topology
  if arg.runlocal:  # the same layout, tiny: a smoke run on one CPU host
    c.data.seq_len, c.data.batch_size, c.data.max_segments, c.data.text_len = 1024, 2, 4, 512 * 4
    c.dit.update(dict(width=128, depth=2, num_heads=1, ffn_dim=256, text_dim=64, attention="auto",
                      dtype="float32"))
    c.text.update(dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       dtype="float32"))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
