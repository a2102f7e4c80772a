"""Fine-tuning Wan 2.1 text-to-video (1.3B or 14B) on your captioned videos: fully, or with LoRA adapters.

Starts from the published weights converted into a bundle, reads latents encoded with Wan's own VAE and
normalisation and UMT5 features cached once per caption, packed into rows as pretraining packs them
(docs/finetune.md has the whole recipe, from a folder of videos to a fine-tuned bundle):

    python -m sora_jax.convert.wan --pipeline Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_1.3b/bundle
    python data_pipelines/ingest_videos.py --input clips/ --out_dir data/ft/videos --max_pixels 399360 \\
        --fps 16 --max_seconds 5.0625
    python data_pipelines/encode_latents.py --vae runs/wan21_1.3b/bundle --latent_stats bundle \\
        --data_dir data/ft/videos --out_dir data/ft/latents --splits train
    python data_pipelines/encode_text.py --bundle runs/wan21_1.3b/bundle --latents_dir data/ft/latents \\
        --splits train
    python -m sora_jax.train --config experiments/wan21_finetune.py:size=1.3b,lora=32 \\
        --config.train.init_from=runs/wan21_1.3b/bundle --config.data.latents_dir=data/ft/latents \\
        --workdir runs/ft_1.3b_lora32
    python -m sora_jax.adapter save --workdir runs/ft_1.3b_lora32 --out runs/ft_1.3b_lora32/adapter
    python -m sora_jax.adapter merge --adapter runs/ft_1.3b_lora32/adapter \\
        --bundle runs/wan21_1.3b/bundle --out runs/ft_1.3b_lora32/bundle

Arguments: size (1.3b | 14b: experiments/wan21_t2v_1_3b.py / wan21_t2v_14b.py: 480p rows of one 81-frame
video or up to 16 images for 1.3B, 720p rows of one 81-frame video for 14B), lora (the adapter rank; 0 =
full fine-tuning), topology (the slice's preset batch, remat and mesh), runlocal (the same layout at a
tiny width, for this CPU: tests/test_finetune.py builds a random diffusers Wan pipeline of exactly this
shape and converts it). Full fine-tuning uses lr 1e-5 (the base config's); LoRA lr 1e-4 with
alpha = rank, on every projection of every block (self- and cross-attention q, k, v, o and the MLP).
Expected: a rank-32 adapter of 1.3B is 43.7M parameters, 3.1% of the base (14B: 153M, 1.1%); the 14B
memory and MFU estimates per slice are in docs/benchmarks.md ("Fine-tuning and LoRA"). Sections and keys:
experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg
from sora_jax.models import lora

# The published models as experiments/wan21_t2v_1_3b.py and wan21_t2v_14b.py set them up
# (tests/test_experiments.py holds the three files to the same values): DiT size and parameter dtype;
# rows of one 81-frame video (or up to 16 images) at 480p for 1.3B, of one 720p video for 14B; Wan's
# time shift and sampling size at that resolution.
MODELS = {
    "1.3b": dict(dit="wan2.1-1.3B", param_dtype="float32", seq_len=32768, max_segments=16, text_len=512 * 16,
                 shift_scale=3.0, height=480, width=832),
    "14b": dict(dit="wan2.1-14B", param_dtype="bfloat16", seq_len=75_776, max_segments=1, text_len=512,
                shift_scale=5.0, height=720, width=1280),
}
# size -> {topology: global batch in rows, remat, mesh, attention}; a 14B row holds one 720p 81-frame
# video (75,776 tokens). On v6e (32 GB per chip) no chip can hold a whole row's activations (40 layers
# of a [75,776, 5120] residual stream, even fully rematerialised): the `context` axis splits each row
# over 2 or 4 chips, with all-to-all (Ulysses) attention (docs/context_parallel.md); docs/benchmarks.md
# ("Fine-tuning and LoRA") has which of these fit, full and LoRA.
FSDP = dict(data=1, fsdp=-1, tensor=1)
SPLASH = dict(attention="splash", context="none")
ULYSSES = dict(attention="auto", context="ulysses")
SLICES = {
    "1.3b": {
        "v5p:2x2x1": dict(batch_size=4, remat="full", mesh=FSDP, **SPLASH),
        "v5p:4x4x4": dict(batch_size=64, remat="full_save_attention", mesh=FSDP, **SPLASH),  # as t2v's
    },
    "14b": {
        "v5p:2x2x1": dict(batch_size=4, remat="full", mesh=FSDP, **SPLASH),
        "v5p:2x2x2": dict(batch_size=8, remat="full", mesh=FSDP, **SPLASH),
        "v6e:2x4": dict(batch_size=4, remat="full", mesh=dict(data=1, fsdp=4, context=2, tensor=1),
                        **ULYSSES),
        "v6e:4x8": dict(batch_size=8, remat="full", mesh=dict(data=1, fsdp=8, context=4, tensor=1),
                        **ULYSSES),
    },
}
DEFAULT_TOPOLOGY = {"1.3b": "v5p:2x2x1", "14b": "v5p:2x2x2"}  # the t2v presets' slices


def get_config(arg=None):
  arg = parse_arg(arg, size="1.3b", lora=0, topology="", runlocal=False)
  if arg.size not in SLICES:
    raise ValueError(f"size={arg.size!r} is unknown; accepted: {sorted(SLICES)}")
  topology = arg.topology or DEFAULT_TOPOLOGY[arg.size]
  if topology not in SLICES[arg.size]:
    raise ValueError(f"topology={topology!r} has no {arg.size} preset; accepted: {sorted(SLICES[arg.size])}")
  if arg.lora < 0:
    raise ValueError(f"lora={arg.lora}: the adapter rank, >= 0 (0 = full fine-tuning)")
  pod = SLICES[arg.size][topology]
  model = MODELS["1.3b" if arg.runlocal else arg.size]  # runlocal: one tiny layout, at 480p, for both
  c = common.ConfigDict()
  c.seed = 0
  c.data = common.data(
      latents_dir="data/ft/latents", tokenizer="runs/demo/data/tokenizer.model",
      text_source="features",        # data_pipelines/encode_text.py's cached UMT5 features
      max_text_tokens=512,           # every caption padded to 512 features, as Wan's pipeline pads
      seq_len=model["seq_len"], max_segments=model["max_segments"], text_len=model["text_len"],
      batch_size=pod["batch_size"], token_budget=0, min_patch_side=8)
  c.mesh = common.mesh(**pod["mesh"])
  c.sample = common.wan21_sample(height=model["height"], width=model["width"])

  c.dit = common.dit(model["dit"], text=common.umt5(), in_dim=64, remat=pod["remat"], dtype="bfloat16",
                     param_dtype=model["param_dtype"], attention=pod["attention"], context=pod["context"])
  c.text = common.ConfigDict(common.UMT5_XXL)
  c.vae = common.wan21_vae()
  # Wan's, with its caption dropout (text_drop 0.1): classifier-free guidance keeps working.
  c.diffusion = common.wan21_diffusion(shift_scale=model["shift_scale"])
  c.lora = common.ConfigDict(dict(
      rank=arg.lora,                 # 0: every parameter trains
      alpha=float(arg.lora),         # scale alpha / rank = 1
      targets=lora.DEFAULT_TARGETS))  # fnmatch patterns over the DiT's projections (models/lora.py)
  c.train = common.trainer(         # train.init_from: the converted bundle (required for a meaningful run)
      total_steps=2_000, checkpoint_every_steps=250, keep_checkpoints=2,
      optim=common.optim(lr=1e-4 if arg.lora else 1e-5, warmup_steps=50, schedule="constant", b2=0.999,
                         weight_decay=0.0 if arg.lora else 0.01, ema_decay=0.999))
  c.compile_check = common.compile_check(topology)

  if arg.runlocal:
    # Wan's layout at a width where a rank-8 adapter is a few percent of the base (as at full size):
    # 4 heads of 128, FFN 1024, 2 blocks, over a 32-wide UMT5's features; rows of 64 tokens.
    c.dit.update(dict(width=512, depth=2, num_heads=4, ffn_dim=1024, text_dim=32, attention="reference",
                      context="none", remat="none", dtype="float32"))
    c.text.update(dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       dtype="float32"))
    c.data.update(dict(seq_len=64, max_segments=4, text_len=512 * 4, batch_size=2, min_patch_side=2,
                       packing_bins=4))
    c.mesh = common.mesh()
    c.train.update(dict(total_steps=20, log_every_steps=1, checkpoint_every_steps=10))
    c.train.optim.update(dict(warmup_steps=2, lr=3e-3 if arg.lora else 3e-4, ema_decay=0.9))
  return c
