"""Wan 2.1 text-to-video, 14B: experiments/wan21_t2v_1_3b.py at the published 14B size (40 blocks of width
5120, 40 heads of 128, FFN 13824), trained at MaxDiffusion's published shape: 81 frames of 720x1280
(21 x 45 x 80 = 75,600 tokens, one video per row), Wan's 720p time shift of 5: one video per chip on 8
v5p chips (the default), or MaxDiffusion's v5p-8 shape, one video per step over 4 chips
(`topology=v5p:2x2x1`).

    python -m sora_jax.convert.wan --pipeline Wan2.1-T2V-14B-Diffusers --out runs/wan21_14b/bundle
    python -m sora_jax.compile_check --config experiments/wan21_t2v_14b.py --topology v5p:2x2x2
    python -m sora_jax.compile_check --config experiments/wan21_t2v_14b.py:topology=v5p:2x2x1
Measured (docs/benchmarks.md, "Wan 2.1 interop" and "Pod compile checks"), beside MaxDiffusion's
measured 135.9 TFLOP/s per v5p chip (29.6% of 459): v5p:2x2x2, 84.1 GB per chip of 95, estimated MFU
36.0% (165 TFLOP/s per chip); v5p:2x2x1, 74.0 GB, 40.6% (186 TFLOP/s per chip). Training settings are
the 1.3B's; sections and keys: experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg

# 75,600 tokens padded to whole 512-token splash blocks.
SEQ_LEN = 75_776
SLICES = {
    # One video per chip. With float32 parameters the train state (parameters, EMA, AdamW's two moments:
    # 16 bytes x 14.3B) plus float32 gradients is over a v5p chip's 95 GB on 4 chips by arithmetic.
    # MaxDiffusion trains Wan in bfloat16 weights (weights_dtype=bfloat16), which halves it: the
    # parameters, the EMA and the moments follow param_dtype here. The price: an update smaller than half
    # a bf16 step of its weight (2^-9 of it) rounds away, so lr 1e-5 moves only weights within ~500x of
    # their update; the EMA at decay 0.9999 does not move in bf16 at all (it is kept only because the
    # trainer's state always holds one). Even so, a video per chip on 4 chips compiles to 98.2 GB per
    # chip: 28.6 GB of state and 69.5 GB of temporaries (full remat's residual stream alone is 40 x
    # 75,776 x 5120 x 2 bytes = 31 GB); 8 chips halve the state (docs/benchmarks.md, "Wan 2.1 interop").
    "v5p:2x2x2": dict(batch_size=8, remat="full", param_dtype="bfloat16",
                      mesh=dict(data=1, fsdp=-1, tensor=1), context="none"),
    # MaxDiffusion's own shape: one video per step on 4 chips. The `sequence` mesh axis (sora_jax/
    # sharding.py; MaxDiffusion shards activation_length over fsdp) splits the row's 75,776 tokens 4
    # ways and shards the parameters as fsdp does; self-attention is all-to-all (Ulysses: 10 of the 40
    # heads per chip over the whole row, the splash kernel unchanged). A quarter of a row's activations
    # per chip leaves room to save the attention kernels' outputs instead of running them again: 74.0
    # GB and 40.6% estimated MFU, against full remat's 55.7 GB and 33.7% (attention is 2/3 of the work).
    "v5p:2x2x1": dict(batch_size=1, remat="full_save_attention", param_dtype="bfloat16",
                      mesh=dict(data=1, fsdp=1, sequence=4, tensor=1), context="ulysses"),
}


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:2x2x2", runlocal=False)
  if arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  pod = SLICES[arg.topology]
  c = common.ConfigDict()
  c.seed = 0
  c.data = common.data(
      latents_dir="data/wan21/latents",   # encode_latents.py with the converted Wan VAE
      tokenizer="runs/demo/data/tokenizer.model",
      seq_len=SEQ_LEN, max_segments=1, text_len=512, max_text_tokens=512, batch_size=pod["batch_size"],
      token_budget=0, min_patch_side=8)
  c.mesh = common.mesh(**pod["mesh"])
  c.sample = common.wan21_sample(height=720, width=1280)

  c.dit = common.dit("wan2.1-14B", text=common.umt5(), in_dim=64, attention="splash", context=pod["context"],
                     remat=pod["remat"], dtype="bfloat16", param_dtype=pod["param_dtype"])
  c.text = common.ConfigDict(common.UMT5_XXL)
  c.vae = common.wan21_vae()
  c.diffusion = common.wan21_diffusion(shift_scale=5.0)  # Wan at 720p
  c.train = common.trainer(
      total_steps=10_000, checkpoint_every_steps=500,
      optim=common.optim(lr=1e-5, warmup_steps=100, schedule="constant", b2=0.999, ema_decay=0.9999))
  # The scanned step alone takes about 3 minutes of one core to compile for 8 chips, each unrolled cost
  # compile (the default method's two) about 8: its cost comes from the one compile.
  c.compile_check = common.compile_check(arg.topology, cost="one")

  if arg.runlocal:  # experiments/wan21_t2v_1_3b.py:runlocal's tiny model and rows (480p): a smoke run
    c.data.seq_len, c.data.batch_size, c.data.max_segments, c.data.text_len = 1024, 2, 4, 512 * 4
    c.dit.update(dict(width=128, depth=2, num_heads=1, ffn_dim=256, text_dim=64, attention="auto",
                      context="none", remat="full", dtype="float32", param_dtype="float32"))
    c.text.update(dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       dtype="float32"))
    c.mesh = common.mesh()
    c.sample = common.wan21_sample(height=480, width=832)
    c.diffusion = common.wan21_diffusion(shift_scale=3.0)
  return c
