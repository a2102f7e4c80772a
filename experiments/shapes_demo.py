"""The demo: every stage of sora-jax on the embedded Shapes data set, in about 35 minutes on 2 CPU cores.

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
  c.data.num_train = 1000
  c.data.num_validation = 64
  c.data.num_test = 64
  # Where the demo's stages meet; `python -m sora_jax.demo --workdir W` points them all under W/data.
  c.data.videos_dir = "runs/demo/data/shapes"        # tfds data dir of the videos: rendered Shapes, or
                                                     # your own (data_pipelines/ingest_videos.py)
  c.data.latents_dir = "runs/demo/data/latents"      # encoded latents + latent_stats.json
  c.data.tokenizer = "runs/demo/data/tokenizer.model"  # sentencepiece model
  c.data.vocab_size = 128
  c.data.seq_len = 1024          # packed row length L (video tokens)
  c.data.text_len = 384          # packed text row length Lt (256 binds rows of images: 4.4% padding)
  c.data.max_text_tokens = 32    # per caption, after tokenization
  c.data.max_segments = 48       # per packed row
  c.data.batch_size = 2          # packed rows per global batch: 2 rows give twice the updates of 4 on the
                                 # same tokens, and a better denoiser in the demo's minutes
                                 # (docs/history.md, Issue 7)
  c.data.long_clips = "crop"     # "crop" in time, or "drop" (counted and reported)
  c.data.num_workers = 0
  c.data.shuffle_seed = 0
  # Packed stream (sora_jax/data/pipeline.py; its docstring explains size fitting).
  c.data.source = "latents"      # "latents" (VAE latents) or "shapes" (pooled raw frames, no VAE)
  c.data.token_budget = 576      # max tokens per sample before downscale/crop; 0 = seq_len. The widest
                                 # segment sets blocksparse's step time: 576 = the largest short clip
  c.data.min_patch_side = 2      # spatial downscale stops at this many patches on a side
  c.data.sample_latents = True   # z = mean + std * eps (per record and epoch); False = the mean
  c.data.stand_in_factors = (4, 8, 8)  # "shapes" source: causal average pool (ft, fh, fw)
  c.data.packer = "best_fit"     # or "first_fit" (grain packers)
  c.data.packing_bins = 64       # rows packed at once; more bins, less padding, more latency
  c.data.read_threads = 1        # threads loading and patchifying samples, per process or worker

  # --- Sharding (sora_jax/sharding.py): -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # --- Sampling (sora_jax/sampling.py, sora_jax/sample.py): defaults of `python -m sora_jax.sample`.
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = ""          # "" = the objective's default: euler|heun|unipc (flow), ddim|ddpm (ddpm)
  c.sample.time_grid = "uniform" # "uniform" (shift(linspace(1, 0))), or diffusers' "flow_match" / "unipc"
  c.sample.steps = 30
  c.sample.guidance = 4.0        # classifier-free guidance scale; 1 = no guidance (one model call)
  c.sample.num_frames = 17       # 1 (an image, written as png) or 1 + 4k, up to 481
  c.sample.height = 32
  c.sample.width = 32
  c.sample.fps = 8.0
  c.sample.row_len = 128         # packed inference rows (tokens); 0 = data.seq_len. Short rows in a batch
                                 # beat long ones with dense-mask attention (docs/history.md, Issue 6)
  c.sample.max_tile_pixels = 0   # VAE chunked decoding: tile frames above this many pixels; 0 = never

  # --- DiT (sora_jax/models/dit.py, models/text.py): 5.5M params (1.3M of them adaLN, applied per
  # segment so nearly free in FLOPs); ~1300 steps, 21 min of 2-core CPU (measured).
  c.dit = ml_collections.ConfigDict()
  c.dit.patch = (1, 2, 2)        # spacetime patch (pt, ph, pw) in latents; D = pt*ph*pw*c
  c.dit.in_dim = 0               # token dim D = pt*ph*pw*latent channels; 0 = the data's (train.py fills it)
  c.dit.vocab_size = c.data.get_ref("vocab_size")  # sentencepiece ids of the caption encoder
  c.dit.width = 192
  c.dit.depth = 6
  c.dit.num_heads = 6            # head_dim 32: RoPE splits it (t, h, w) = (12, 10, 10)
  c.dit.ffn_dim = 768
  c.dit.time_freq_dim = 256
  c.dit.rope_theta = 10000.0
  c.dit.qk_norm = True
  c.dit.text_encoder = "caption"  # jointly trained (models/text.py)
  c.dit.text_width = 128
  c.dit.text_depth = 2
  c.dit.text_heads = 4
  c.dit.attention = "auto"       # segment_attention's local kernel (models/attention.py)
  c.dit.context = "none"         # context parallelism over the `context` mesh axis: none|ring|ulysses
  c.dit.remat = "none"           # "none" | "full" | "dots" | "dots_saveable"
  c.dit.dtype = "float32"        # compute: on XLA:CPU bf16 is slower (4.4 vs 5.2 s/step); pods use bf16
  c.dit.param_dtype = "float32"

  # --- Diffusion (sora_jax/diffusion.py): objective, timesteps, CFG text dropout, prompt masks.
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.objective = "flow"     # "flow" (rectified flow, v = eps - x0) or "ddpm" (cosine schedule)
  c.diffusion.prediction = "v"       # ddpm only: "eps" or "v"
  c.diffusion.cosine_s = 0.008       # ddpm cosine schedule offset
  c.diffusion.t_mean = 0.0           # flow: logit-normal timesteps sigmoid(N(t_mean, t_std))
  c.diffusion.t_std = 1.0
  c.diffusion.time_shift = True      # t' = a t / (1 + (a-1) t), a = shift_scale * sqrt(n / shift_ref_tokens)
  c.diffusion.shift_scale = 1.0
  c.diffusion.shift_ref_tokens = 64   # about the demo mixture's mean tokens per sample (68.6): a ~ 1 there
  c.diffusion.shift_rule = "tokens"   # "tokens" (a as above) or "constant" (a = shift_scale: SD3, Wan)
  c.diffusion.object_weight = 0.0     # extra loss weight on tokens far from their clip's mean token
  c.diffusion.loss_weight = "uniform"  # "uniform" (the velocity error) or "x0" (weighted by t^2: x0 error)
  c.diffusion.text_drop = 0.1        # per-segment caption dropout for classifier-free guidance
  c.diffusion.cond_first_frame = 0.1   # image-to-video prompt (first latent frame given)
  c.diffusion.cond_first_frames = 0.05  # video continuation (first k latent frames given)
  c.diffusion.cond_last_frames = 0.05   # backwards extension (last k given)
  c.diffusion.cond_both_ends = 0.05     # interpolation (first and last latent frame given)

  # --- DiT training (sora_jax/train.py, optim.py, checkpoint.py): steps, logging, checkpoints, resume.
  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 1300           # colour 75% at 640 steps, 91% at 1280, 95% at 6000, 98% at 11000 (motion 29%):
                                 # docs/benchmarks.md, "Evaluation"
  c.train.max_train_seconds = 0.0      # wall-clock cap (checkpointed stop), for pod jobs; 0 = none: the demo trains
                                 # its steps on any machine and reports a slow stage (config.demo below)
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 100
  c.train.keep_checkpoints = 3
  c.train.sample_every_steps = 200     # sample videos during training (needs sora_jax.sampling); 0 = never
  c.train.val_every_steps = 100        # held-out loss (EMA weights, validation latents, fixed noise); 0 = never
  c.train.val_batches = 4              # validation batches it averages
  c.train.resume_from = ""             # another run's workdir or checkpoint dir: continue it (all state)
  c.train.init_from = ""               # another run's workdir or checkpoint dir: its weights, fresh optimizer
  c.train.flops_check = False          # also compile the step unrolled to check flops.py against XLA (slow)
  c.train.optim = ml_collections.ConfigDict()
  c.train.optim.lr = 2e-3              # 5e-3 diverges in quality (docs/history.md, Issue 7, fourth session)
  c.train.optim.warmup_steps = 40
  c.train.optim.schedule = "cosine"    # "cosine" or "constant" after the linear warmup
  c.train.optim.end_lr_fraction = 0.1  # cosine floor, as a fraction of lr
  c.train.optim.b1 = 0.9
  c.train.optim.b2 = 0.99
  c.train.optim.eps = 1e-8
  c.train.optim.weight_decay = 0.01    # matrices only
  c.train.optim.grad_clip = 1.0        # global norm; 0 = off
  c.train.optim.ema_decay = 0.999      # EMA of the weights (warmed up: min(decay, (1+n)/(10+n)))

  # --- VAE (sora_jax/models/vae.py): Wan 2.1's layout at toy width; 4x time, 4x space (8x cannot
  # reach 30 dB in the demo's minutes), 8 latent channels. Wan 2.1 itself: base_dim=96,
  # dim_mult=(1, 2, 4, 4), num_res_blocks=2, z_dim=16, temporal_downsample=(False, True, True).
  c.vae = ml_collections.ConfigDict()
  c.vae.base_dim = 16
  c.vae.dim_mult = (1, 2, 2)
  c.vae.num_res_blocks = 1
  c.vae.z_dim = 8
  c.vae.temporal_downsample = (True, True)
  c.vae.patch_size = 1           # pixel-unshuffle before the encoder (spatial factor x patch_size)
  c.vae.decoder_base_dim = 0     # 0 = base_dim
  c.vae.dtype = "float32"        # 3D convs are no faster in bf16 on CPU
  c.vae.logvar_init = -6.0       # posterior starts narrow: the decoder is not trained on noise
  c.vae.norm = "none"            # Wan's per-position RMS norm learns ~2x slower at this width

  # --- VAE training (sora_jax/train_vae.py): ~9-14 min of 2-core CPU (2500 steps: 30.4 dB); docs/benchmarks.md "VAE".
  c.vae_train = ml_collections.ConfigDict()
  c.vae_train.total_steps = 2500
  c.vae_train.max_train_seconds = 0.0    # wall-clock cap (checkpointed stop); 0 = none, as for the DiT
  c.vae_train.image_crop = 32            # image crops image_crop^2, image_pixels of them per step
  c.vae_train.image_pixels = 4096
  c.vae_train.video_frames = 17          # video crops video_frames x video_crop^2: 5 latent frames, so
                                         # later latents train with real (not frame-0) context
  c.vae_train.video_crop = 32
  c.vae_train.video_pixels = 17408
  c.vae_train.crop_tries = 4             # keep the busiest of this many random windows (vae_batches.py)
  c.vae_train.l1_weight = 0.0            # L1's gradient is the sign of the training noise near the
  c.vae_train.l2_weight = 1.0            # optimum: MSE alone learns faster (docs/history.md, Issue 3)
  c.vae_train.kl_weight = 1e-4           # per latent element, against per-pixel reconstruction
  c.vae_train.gan_weight = 0.0           # 3D patch discriminator (hinge); 0 = off
  c.vae_train.gan_start = 2000
  c.vae_train.disc_dim = 32
  c.vae_train.disc_layers = 3
  c.vae_train.log_every_steps = 20
  c.vae_train.val_every_steps = 0        # 0 = validate at the end only
  c.vae_train.checkpoint_every_steps = 200
  c.vae_train.keep_checkpoints = 2
  c.vae_train.num_val = 32               # validation specs, rendered noise-free
  c.vae_train.val_frames = 17
  c.vae_train.val_size = 64
  c.vae_train.recon_videos = 4           # side-by-side videos written at each validation
  c.vae_train.optim = ml_collections.ConfigDict()
  c.vae_train.optim.lr = 1e-3
  c.vae_train.optim.warmup_steps = 30
  c.vae_train.optim.schedule = "cosine"
  c.vae_train.optim.end_lr_fraction = 0.05
  c.vae_train.optim.b1 = 0.9
  c.vae_train.optim.b2 = 0.99
  c.vae_train.optim.eps = 1e-8
  c.vae_train.optim.weight_decay = 0.0
  c.vae_train.optim.grad_clip = 1.0
  c.vae_train.optim.ema_decay = 0.99

  # --- Evaluation (sora_jax/evaluate.py, detector.py): Shapes test prompts scored from pixels.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 64        # first clips of the test split (half show a held-out composition)
  c.eval.vae_clips = 32          # held-out Shapes clips for VAE PSNR/SSIM
  c.eval.seed = 0                # sampling seed and data set seed of the prompts
  c.eval.steps = 0               # 0 = sample.steps
  c.eval.guidance = 0.0          # 0 = sample.guidance
  c.eval.mixture = ""            # "" = data.mixture
  c.eval.data_dir = ""           # an ingested video data set for VAE metrics too ("" = none)
  c.eval.data_split = "test"
  c.eval.chunk = 16              # prompts per sampling call (progress lines; noise is per prompt)
  c.eval.denoise_clips = 32      # test clips for the DiT's object-token error at t = 0.7, 0.9

  # --- The demo (sora_jax/demo.py): minutes each stage takes with the step counts above on an idle
  # 2-core CPU (docs/benchmarks.md, "Demo": 34 min in all); the demo prints every stage's time
  # against these and one line for a stage slower than slow_factor times them. Update them with the
  # step counts. 0 = no expectation.
  c.demo = ml_collections.ConfigDict()
  c.demo.expected_minutes = ml_collections.ConfigDict(dict(
      data_train=0.2, data_validation=0.1, data_test=0.1, tokenizer=0.1, vae=8.5, latents=1.1, dit=20.6,
      export=0.1, samples=0.5, evaluate=3.5))
  c.demo.slow_factor = 1.5

  # The VAE, DiT, diffusion, training, sampling and evaluation sections are added by their modules'
  # owners below.
  if arg.runlocal:  # every stage in a minute or two: for smoke tests of the whole demo
    c.data.num_train = 64
    c.data.num_validation = c.data.num_test = 8
    c.vae_train.total_steps = 10
    c.vae_train.num_val = 4
    c.vae_train.checkpoint_every_steps = 5
    c.train.total_steps = 10
    c.train.log_every_steps = 5
    c.train.checkpoint_every_steps = 5
    c.train.sample_every_steps = 0
    c.sample.steps = 4
    c.eval.num_prompts = 4
    c.eval.vae_clips = 4
    c.eval.denoise_clips = 4
    for stage in c.demo.expected_minutes:  # smoke tests: no expectation to report against
      c.demo.expected_minutes[stage] = 0.0
  return c
