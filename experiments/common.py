"""Section builders for the experiments (big_vision style): each returns one config section, for one part of
the system, with its keys explained once here.

An experiment module calls the builders of the sections its entry points read, with its own values, so
that it reads on its own and carries nothing it does not use; experiments never import each other (this
module is the only one they share, and it imports none of them). Defaults here are the library's usual
settings, not any one experiment's recipe.

    section        read by                                        builder
    data           sora_jax/data (the packed stream), train.py    data(), with shapes_data() for Shapes
    dit            models/dit.py, models/text.py                  dit() with caption_encoder() or umt5()
    text           models/umt5.py (a frozen encoder)              UMT5_XXL
    diffusion      diffusion.py (objective, timesteps, prompts)   diffusion(), wan21_diffusion()
    train          train.py, optim.py, checkpoint.py              trainer() with optim()
    mesh           sharding.py                                    mesh()
    sample         sampling.py, sample.py (their defaults)        sample(), wan21_sample()
    vae            models/vae.py                                  vae(), wan21_vae()
    vae_train      train_vae.py                                   vae_trainer() with optim()
    lora           models/lora.py (adapters)                      wan21_finetune.py's own
    eval           evaluate.py                                    evaluation()
    demo           demo.py                                        demo()
    compile_check  compile_check.py                               compile_check()

The demo's own sections (demo_sample(), demo_dit(), demo_trainer(), demo_vae(), demo_vae_trainer()) and its
smoke-run settings (runlocal()) serve the experiments built on it.
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict

# name: (width, depth, heads, ffn_dim) of the DiT's blocks.
DIT_SIZES = {
    "demo": (192, 6, 6, 768),          # 5.5M parameters: the Shapes demo on a 2-core CPU
    "small": (256, 8, 8, 1024),        # experiments/shapes_small.py
    "B": (1152, 28, 9, 4608),          # ~1B: Open-Sora 1.2's STDiT3-XL width and depth, heads of 128
    "XL": (4096, 30, 32, 16384),       # ~11B: Open-Sora 2.0's scale
    "wan2.1-1.3B": (1536, 30, 12, 8960),   # Wan 2.1's published sizes
    "wan2.1-14B": (5120, 40, 40, 13824),
}

# Wan 2.1's frozen text encoder (UMT5-XXL's encoder, models/umt5.py), as the `text` section.
UMT5_XXL = dict(encoder="umt5", vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                layer_norm_epsilon=1e-6, max_len=512, dtype="bfloat16", param_dtype="float32", remat="full")


def data(*, latents_dir: str, tokenizer: str, seq_len: int, text_len: int, max_text_tokens: int,
         max_segments: int, batch_size: int, token_budget: int, min_patch_side: int, num_workers: int = 0,
         packing_bins: int = 64, read_threads: int = 1, **more) -> ConfigDict:
  """`data`: the packed token stream (sora_jax/data/pipeline.py, whose docstring explains size fitting).
  `more`: further keys (vocab_size, text_source, ...)."""
  return ConfigDict(dict(
      source="latents",              # "latents" (VAE latents) or "shapes" (pooled raw frames, no VAE)
      latents_dir=latents_dir,       # encoded latents + latent_stats.json (data_pipelines/encode_latents.py)
      tokenizer=tokenizer,           # sentencepiece model (data_pipelines/train_tokenizer.py)
      seq_len=seq_len,               # packed row length L (video tokens)
      text_len=text_len,             # packed text row length Lt
      max_text_tokens=max_text_tokens,  # per caption, after tokenization
      max_segments=max_segments,     # per packed row
      batch_size=batch_size,         # packed rows per global batch
      token_budget=token_budget,     # max tokens per sample before downscale/crop; 0 = seq_len
      min_patch_side=min_patch_side,  # spatial downscale stops at this many patches on a side
      long_clips="crop",             # "crop" in time, or "drop" (counted and reported)
      sample_latents=True,           # z = mean + std * eps (per record and epoch); False = the mean
      stand_in_factors=(4, 8, 8),    # "shapes" source: causal average pool (ft, fh, fw)
      packer="best_fit",             # or "first_fit" (grain packers)
      packing_bins=packing_bins,     # rows packed at once; more bins, less padding, more latency
      num_workers=num_workers,       # worker processes (0 = in-process)
      read_threads=read_threads,     # threads loading and patchifying samples, per process or worker
      shuffle_seed=0,
      **more))


def shapes_data(*, root: str, mixture: str, num_train: int, num_validation: int, num_test: int,
                videos_dir: str = "", **stream) -> ConfigDict:
  """`data` of the embedded Shapes data set (sora_jax/data/shapes.py) rendered, tokenized and encoded
  under root/data/ as `python -m sora_jax.demo --workdir root` lays it out (videos_dir: another video data
  set instead of the rendered one, e.g. data_pipelines/ingest_videos.py's); `stream`: data()'s keys."""
  d = data(latents_dir=f"{root}/data/latents", tokenizer=f"{root}/data/tokenizer.model", **stream)
  d.videos_dir = videos_dir or f"{root}/data/shapes"  # tfds data dir of the videos (train_vae.py reads it)
  d.mixture = mixture                # named size mixture in sora_jax/data/shapes.py
  d.num_train, d.num_validation, d.num_test = num_train, num_validation, num_test  # rendered per split
  return d


def dit(size: str, *, text: dict, patch=(1, 2, 2), in_dim: int = 0, attention: str = "auto",
        context: str = "none", remat: str = "none", dtype: str = "float32",
        param_dtype: str = "float32") -> ConfigDict:
  """`dit` (models/dit.py): a DiT of DIT_SIZES[size] reading the text of `text` (caption_encoder() or
  umt5())."""
  width, depth, num_heads, ffn_dim = DIT_SIZES[size]
  return ConfigDict(dict(
      patch=patch,                   # spacetime patch (pt, ph, pw) in latents; D = pt*ph*pw*c
      in_dim=in_dim,                 # token dim D; 0 = the data's (models/dit.resolve_in_dim)
      width=width, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim,
      time_freq_dim=256,
      rope_theta=10000.0,
      qk_norm=True,
      attention=attention,           # segment_attention's local kernel (models/attention.py)
      attention_axes=("full",),      # each block's self-attention, cycled: full (the segment: Wan's),
                                     # space (a latent frame), time (a place through the frames)
      mlp_conv=False,                # a depthwise 3x3x3 spacetime conv in each MLP (Sana's Mix-FFN); Wan: none
      abs_pos=False,                 # fractional (t, h, w) features added to the input (NaViT); Wan: RoPE only
      context=context,               # attention over a sequence-sharding mesh axis (`context` or
                                     # `sequence`, sharding.py): none|ring|ulysses
      remat=remat,                   # a name in models/layers.REMAT_POLICIES
      dtype=dtype,                   # compute
      param_dtype=param_dtype,
      **text))


def caption_encoder(*, vocab_size, width: int, depth: int, heads: int) -> dict:
  """dit()'s `text`: captions encoded by a small transformer trained with the DiT (models/text.py) over
  sentencepiece ids `vocab_size` (a reference to data.vocab_size keeps the two equal)."""
  return dict(text_encoder="caption", vocab_size=vocab_size, text_width=width, text_depth=depth,
              text_heads=heads)


def umt5(*, dim: int = UMT5_XXL["d_model"]) -> dict:
  """dit()'s `text`: features of a frozen UMT5 encoder (the `text` section, models/umt5.py), `dim` wide."""
  return dict(text_encoder="umt5", text_dim=dim)


def diffusion(**over) -> ConfigDict:
  """`diffusion` (sora_jax/diffusion.py): objective, timesteps, classifier-free guidance's text dropout and
  the image/video-prompt training mix; `over` replaces any of these keys."""
  d = ConfigDict(dict(
      objective="flow",              # "flow" (rectified flow, v = eps - x0) or "ddpm" (cosine schedule)
      prediction="v",                # ddpm only: "eps" or "v"
      cosine_s=0.008,                # ddpm cosine schedule offset
      t_mean=0.0,                    # flow: logit-normal timesteps sigmoid(N(t_mean, t_std))
      t_std=1.0,
      time_shift=True,               # t' = a t / (1 + (a-1) t), a = shift_scale * sqrt(n / shift_ref_tokens)
      shift_scale=1.0,
      shift_ref_tokens=64,
      shift_rule="tokens",           # "tokens" (a as above) or "constant" (a = shift_scale: SD3, Wan)
      object_weight=0.0,             # extra loss weight on tokens far from their clip's mean token
      loss_weight="uniform",         # "uniform" (the velocity error) or "x0" (weighted by t^2: x0 error)
      frame_noise_share=0.0,         # noise variance shared by a video's latent frames (PYoCo); 0 = iid
      frame_diff_weight=0.0,         # weight of the error's frame-to-frame change (diffusion.frame_diff_error)
      text_drop=0.1,                 # per-segment caption dropout for classifier-free guidance
      cond_first_frame=0.1,          # image-to-video prompt (first latent frame given)
      cond_first_frames=0.05,        # video continuation (first k latent frames given)
      cond_last_frames=0.05,         # backwards extension (last k given)
      cond_both_ends=0.05))          # interpolation (first and last latent frame given)
  d.update(over)
  return d


def optim(*, lr: float, warmup_steps: int, schedule: str = "cosine", end_lr_fraction: float = 0.1,
          b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.01,
          grad_clip: float = 1.0, ema_decay: float = 0.999) -> ConfigDict:
  """`train.optim` or `vae_train.optim` (sora_jax/optim.py): AdamW after a linear warmup."""
  return ConfigDict(dict(
      lr=lr, warmup_steps=warmup_steps,
      schedule=schedule,             # "cosine" or "constant" after the warmup
      end_lr_fraction=end_lr_fraction,  # cosine floor, as a fraction of lr
      b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay,     # matrices only
      grad_clip=grad_clip,           # global norm; 0 = off
      ema_decay=ema_decay))          # EMA of the weights (warmed up: min(decay, (1+n)/(10+n)))


def trainer(*, total_steps: int, optim: ConfigDict, log_every_steps: int = 10,
            checkpoint_every_steps: int = 100, keep_checkpoints: int = 3, max_train_seconds: float = 0.0,
            sample_every_steps: int = 0, val_every_steps: int = 100, val_batches: int = 4) -> ConfigDict:
  """`train`: the DiT trainer (sora_jax/train.py): steps, logging, checkpoints, resume."""
  return ConfigDict(dict(
      total_steps=total_steps,
      max_train_seconds=max_train_seconds,  # wall-clock cap (a checkpointed stop); 0 = none
      log_every_steps=log_every_steps,
      checkpoint_every_steps=checkpoint_every_steps,
      keep_checkpoints=keep_checkpoints,
      sample_every_steps=sample_every_steps,  # sample videos during training; 0 = never
      val_every_steps=val_every_steps,  # held-out loss (EMA weights, validation latents, fixed noise);
                                        # 0 = never
      val_batches=val_batches,       # validation batches it averages
      resume_from="",                # another run's workdir or checkpoint dir: continue it (all state)
      init_from="",                  # another run's workdir or checkpoint dir, or a bundle: its weights
      flops_check=False,             # also compile the step unrolled to check flops.py against XLA (slow)
      optim=optim))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, **more) -> ConfigDict:
  """`mesh` (sora_jax/sharding.py): devices per axis, -1 = the remaining devices; `more`: the optional
  `context` (splits each row's sequence) or `sequence` (splits it and shards the parameters like fsdp)."""
  return ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, **more))


def sample(*, num_frames: int, height: int, width: int, fps: float, steps: int = 30, guidance: float = 4.0,
           sampler: str = "", time_grid: str = "uniform", row_len: int = 0) -> ConfigDict:
  """`sample`: the defaults of `python -m sora_jax.sample` and of the trainer's sample videos
  (sora_jax/sampling.py)."""
  return ConfigDict(dict(
      sampler=sampler,               # "" = the objective's default: euler|heun|unipc (flow), ddim|ddpm (ddpm)
      time_grid=time_grid,           # "uniform" (shift(linspace(1, 0))), or diffusers' "flow_match" / "unipc"
      steps=steps,
      guidance=guidance,             # classifier-free guidance scale; 1 = no guidance (one model call)
      num_frames=num_frames,         # 1 (an image, written as png) or 1 + 4k, up to 481
      height=height,
      width=width,
      fps=fps,
      row_len=row_len,               # packed inference rows (tokens); 0 = data.seq_len
      max_tile_pixels=0))            # VAE chunked decoding: tile frames above this many pixels; 0 = never


def vae(*, base_dim: int, dim_mult: tuple, num_res_blocks: int, z_dim: int, temporal_downsample: tuple,
        norm: str, **more) -> ConfigDict:
  """`vae` (models/vae.py): the causal 3-D conv VAE in Wan 2.1's layout; `more`: further keys
  (in_channels, ...)."""
  return ConfigDict(dict(
      base_dim=base_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
      z_dim=z_dim,                   # latent channels
      temporal_downsample=temporal_downsample,  # per level after the first: 2x in time or not
      patch_size=1,                  # pixel-unshuffle before the encoder (spatial factor x patch_size)
      decoder_base_dim=0,            # 0 = base_dim
      dtype="float32",               # 3D convs are no faster in bf16 on CPU
      logvar_init=-6.0,              # posterior starts narrow: the decoder is not trained on noise
      norm=norm,                     # "rms" (Wan's per-position RMS norm) or "none"
      **more))


def wan21_vae(**more) -> ConfigDict:
  """Wan 2.1's VAE (diffusers' AutoencoderKLWan): 4x8x8 compression, 16 latent channels, 127M parameters;
  `python -m sora_jax.convert.wan_vae` converts its published weights."""
  return vae(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2, z_dim=16,
             temporal_downsample=(False, True, True), norm="rms", **more)


def wan21_diffusion(*, shift_scale: float) -> ConfigDict:
  """Wan 2.1's objective: rectified flow with a constant time shift sigma' = a sigma / (1 + (a-1) sigma),
  a = `shift_scale` (3 at 480p, 5 at 720p), and no image/video-prompt training."""
  return diffusion(shift_rule="constant", shift_scale=shift_scale, cond_first_frame=0.0,
                   cond_first_frames=0.0, cond_last_frames=0.0, cond_both_ends=0.0)


def wan21_sample(*, height: int, width: int) -> ConfigDict:
  """Wan 2.1's published sampling: 81 frames at 16 fps, 50 UniPC steps, guidance 5."""
  return sample(sampler="unipc", time_grid="unipc", steps=50, guidance=5.0, num_frames=81, height=height,
                width=width, fps=16.0)


def vae_trainer(*, total_steps: int, optim: ConfigDict, max_train_seconds: float = 0.0, video_crop: int = 32,
                checkpoint_every_steps: int = 200, num_val: int = 32, val_size: int = 64) -> ConfigDict:
  """`vae_train` (sora_jax/train_vae.py): crops, losses, the optional discriminator, validation."""
  return ConfigDict(dict(
      total_steps=total_steps,
      max_train_seconds=max_train_seconds,  # wall-clock cap (a checkpointed stop); 0 = none
      image_crop=32,                 # image crops image_crop^2, image_pixels of them per step
      image_pixels=4096,
      video_frames=17,               # video crops video_frames x video_crop^2: 5 latent frames, so later
      video_crop=video_crop,         # latents train with real (not frame-0) context
      video_pixels=17408,
      crop_tries=4,                  # keep the busiest of this many random windows (vae_batches.py)
      l1_weight=0.0,                 # L1's gradient is the sign of the training noise near the
      l2_weight=1.0,                 # optimum: MSE alone learns faster (docs/history.md, Issue 3)
      kl_weight=1e-4,                # per latent element, against per-pixel reconstruction
      gan_weight=0.0,                # 3D patch discriminator (hinge); 0 = off
      gan_start=2000,
      disc_dim=32,
      disc_layers=3,
      log_every_steps=20,
      val_every_steps=0,             # 0 = validate at the end only
      checkpoint_every_steps=checkpoint_every_steps,
      keep_checkpoints=2,
      num_val=num_val,               # validation specs, rendered noise-free
      val_frames=17,
      val_size=val_size,
      recon_videos=4,                # side-by-side videos written at each validation
      optim=optim))


def evaluation(**over) -> ConfigDict:
  """`eval` (sora_jax/evaluate.py, detector.py): Shapes test prompts scored from pixels; `over` replaces
  any of these keys."""
  e = ConfigDict(dict(
      num_prompts=64,                # first clips of the test split (half show a held-out composition)
      vae_clips=32,                  # held-out Shapes clips for VAE PSNR/SSIM
      seed=0,                        # sampling seed and data set seed of the prompts
      steps=0,                       # 0 = sample.steps
      guidance=0.0,                  # 0 = sample.guidance
      mixture="",                    # "" = data.mixture
      data_dir="",                   # an ingested video data set for VAE metrics too ("" = none)
      data_split="test",
      chunk=16,                      # prompts per sampling call (progress lines; noise is per prompt)
      denoise_clips=32))             # test clips for the DiT's object-token error at t = 0.7, 0.9
  e.update(over)
  return e


# The demo's recipe (experiments/shapes_demo.py explains its choices), which the experiments built on it
# share: shapes_small.py, own_videos.py, wan21_vae.py.

def demo_sample(**over) -> ConfigDict:
  """The demo's `sample`: 17 frames of 32x32 at 8 fps, in short packed rows; `over`: sample()'s other keys."""
  return sample(num_frames=17, height=32, width=32, fps=8.0, row_len=128, **over)


def demo_dit(data: ConfigDict, size: str = "demo") -> ConfigDict:
  """The demo's `dit`: DIT_SIZES[size] with a small caption encoder over `data`'s vocabulary."""
  return dit(size, text=caption_encoder(vocab_size=data.get_ref("vocab_size"), width=128, depth=2, heads=4))


def demo_trainer(**over) -> ConfigDict:
  """The demo's `train`: 650 steps at lr 2e-3; `over`: trainer()'s other keys (or these)."""
  return trainer(**{**dict(total_steps=650, sample_every_steps=200, optim=optim(lr=2e-3, warmup_steps=40)),
                    **over})


def demo_vae() -> ConfigDict:
  """The demo's `vae`: Wan 2.1's layout at toy width, 4x in time and space, 8 latent channels."""
  return vae(base_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, z_dim=8, temporal_downsample=(True, True),
             norm="none")


def demo_vae_trainer(**over) -> ConfigDict:
  """The demo's `vae_train`: 2500 steps at lr 1e-3; `over`: vae_trainer()'s other keys (or these)."""
  return vae_trainer(**{**dict(total_steps=2500, optim=optim(lr=1e-3, warmup_steps=30, end_lr_fraction=0.05,
                                                              weight_decay=0.0, ema_decay=0.99)), **over})


def runlocal(c: ConfigDict) -> None:
  """A few steps of each stage `c` has (train_vae, train, sample, evaluate): `runlocal` smoke runs."""
  if "vae_train" in c:
    c.vae_train.total_steps, c.vae_train.num_val, c.vae_train.checkpoint_every_steps = 10, 4, 5
  c.train.total_steps, c.train.log_every_steps, c.train.checkpoint_every_steps = 10, 5, 5
  c.train.sample_every_steps = 0
  c.sample.steps = 4
  c.eval.num_prompts = c.eval.vae_clips = c.eval.denoise_clips = 4


def demo(*, expected_minutes: dict, slow_factor: float = 1.5) -> ConfigDict:
  """`demo` (sora_jax/demo.py): minutes each stage takes on an idle 2-core CPU (0 = no expectation); the
  demo prints every stage's time against them, and one line for a stage slower than slow_factor times."""
  return ConfigDict(dict(expected_minutes=ConfigDict(expected_minutes), slow_factor=slow_factor))


def compile_check(topology: str, **more) -> ConfigDict:
  """`compile_check` (sora_jax/compile_check.py): the TPU slice a pod config is checked for; `more`:
  `cost` (how the step's cost is counted)."""
  return ConfigDict(dict(topology=topology, **more))
