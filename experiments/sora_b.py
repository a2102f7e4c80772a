"""sora-B: a ~1B-parameter text-to-video DiT (depth 28, width 1152, like Open-Sora 1.2's STDiT3-XL) on a
TPU pod: 16-channel latents of a 4x8x8 VAE, 1x2x2 patches (64-dim tokens), rows of 16k packed tokens,
512 text tokens per row, splash attention, FSDP over the whole slice.

Check it fits and how fast the compiler thinks it runs, from any machine with libtpu (docs/pods.md):
    python -m sora_jax.compile_check --config experiments/sora_b.py --topology v5p:4x4x4
Train on a v5p-128 slice (64 chips, 16 hosts; scripts/tpu_vm.sh copies the repo and runs this on all):
    python -m sora_jax.train --config experiments/sora_b.py --workdir gs://BUCKET/runs/sora_b \\
        --config.data.latents_dir=gs://BUCKET/latents --config.data.tokenizer=gs://BUCKET/tok.model
Other slices: `experiments/sora_b.py:topology=v6e:8x8` picks that slice's batch and remat.
Expected (docs/benchmarks.md, "Pod compile checks"): fits in HBM; compiler-estimated MFU as recorded there.

Head dim 128 (9 heads of 128 rather than STDiT3's 16 of 72) keeps the MXU and splash's lanes full.
Sections and keys: experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg

# Per slice: (global batch in rows, remat policy, mesh). Rows are 16k tokens; the batch is a multiple of
# the chips so that every chip holds whole rows (FSDP shards the batch like the parameters).
SLICES = {
    "v5p:4x4x4": dict(batch_size=128, remat="dots", mesh=dict(data=1, fsdp=-1, tensor=1)),
    # `--plan`'s choice (3 compiles): 29.55 of 32 GB, 32.5% estimated MFU. Its XLA part is priced by the
    # roofline (libtpu's v6e estimate is unusable), where bytes, not FLOPs, bound it, so recomputing
    # more does not help: full_save_attention 30.8% at 6.26 GB (docs/history.md, Issue 8, eighth session).
    "v6e:8x8": dict(batch_size=64, remat="dots", mesh=dict(data=1, fsdp=-1, tensor=1)),
    "v5p:2x2x1": dict(batch_size=4, remat="full", mesh=dict(data=1, fsdp=-1, tensor=1)),
}


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:4x4x4", seq_len=16384, runlocal=False)
  if arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  pod = SLICES[arg.topology]
  c = common.ConfigDict()
  c.seed = 0

  # Latents of real videos (data_pipelines/ingest_videos.py then encode_latents.py with a 16-channel
  # 4x8x8 VAE); paths are overridden on the command line (docs/pods.md).
  c.data = common.data(
      latents_dir="data/sora/latents", tokenizer="data/sora/tokenizer.model", vocab_size=32000,
      seq_len=arg.seq_len, text_len=512, max_text_tokens=256,
      max_segments=64,               # 256 px images are 256 tokens: up to 64 per row
      batch_size=pod["batch_size"],
      token_budget=0,                # a sample may fill a row (the demo caps its own at 576)
      min_patch_side=8, num_workers=4, packing_bins=128, read_threads=8)
  c.mesh = common.mesh(**pod["mesh"])
  # The defaults of `python -m sora_jax.sample` on an exported bundle (the demo's sizes).
  c.sample = common.sample(num_frames=17, height=32, width=32, fps=8.0, row_len=128)

  c.dit = common.dit(
      "B", text=common.caption_encoder(vocab_size=c.data.get_ref("vocab_size"), width=1024, depth=8, heads=8),
      in_dim=1 * 2 * 2 * 16,         # 1x2x2 patches of 16 channels
      attention="splash",            # TPU Pallas; "gpu" on GPU clusters (scripts/slurm_gpu.sh sets it)
      remat=pod["remat"],
      dtype="bfloat16")              # bf16 matmul inputs, f32 accumulation (the demo computes in f32 on CPU)
  c.diffusion = common.diffusion(shift_ref_tokens=4096)
  c.train = common.trainer(
      total_steps=200_000, log_every_steps=50, checkpoint_every_steps=1000,
      optim=common.optim(lr=1e-4, warmup_steps=2000, b2=0.999, ema_decay=0.9999))
  # The 16-channel 4x8x8 VAE whose latents the data holds: Wan 2.1's (experiments/wan21_vae.py).
  c.vae = common.wan21_vae()
  c.compile_check = common.compile_check(arg.topology)

  if arg.runlocal:  # the same shapes but tiny, for a smoke run on one CPU host
    c.data.seq_len, c.data.batch_size, c.data.text_len = 1024, 8, 128
    c.dit.depth, c.dit.width, c.dit.num_heads, c.dit.text_depth, c.dit.ffn_dim = 2, 256, 2, 1, 1024
    c.dit.attention, c.mesh = "auto", common.mesh(data=1, fsdp=-1)
  return c
