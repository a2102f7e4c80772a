"""sora-XL-minute: sora-XL (experiments/sora_xl.py, ~11B parameters) trained on single sequences of a
whole minute of 720p video at 24 fps, with context parallelism (issue 11, docs/context_parallel.md).

A minute is 1 + 1440 frames; the 4x8x8 VAE makes 361 x 90 x 160 latents and 1x2x2 patches
361 x 45 x 80 = 1,299,600 tokens, one sequence per row (rows are padded to 1,302,528 = 32 x 318 x 128 so
each of the 32 context shards is a whole number of 128-token blocks). No chip holds that
sequence's activations: the `context` mesh axis shards the sequence of every activation (act_seq) and
self-attention runs as ring or all-to-all attention over it (dit.context).

    python -m sora_jax.compile_check --config experiments/sora_xl_minute.py --topology v5p:8x8x4
Train (v5p-512 = 256 chips: 8 context groups of 32 chips, FSDP over the groups):
    python -m sora_jax.train --config experiments/sora_xl_minute.py --workdir gs://BUCKET/runs/minute \\
        --config.data.latents_dir=gs://BUCKET/minute_latents --config.data.tokenizer=gs://BUCKET/tok.model
Expected (docs/benchmarks.md, "Pod compile checks"; how it was found: docs/history.md, Issue 11): what
compiled on this CPU machine.

`runlocal` is the same recipe at toy size on 8 fake CPU devices (context 4, fsdp 2). Everything but the
rows, the mesh and the attention is sora-XL's; sections and keys: experiments/common.py.
"""
from experiments import common
from sora_jax.config import parse_arg

MINUTE_TOKENS = 361 * 45 * 80  # latent frames x (90 / 2) x (160 / 2)

SLICES = {
    # 256 chips: 8 rows per step, each row's sequence over 32 chips (40.7k tokens per chip). Mesh axes
    # must be products of the torus dimensions (8, 8, 4): context 32 = 8 x 4, fsdp 8. Compiled on this
    # machine: 92.4 of 95 GB per chip (docs/history.md, Issue 11); context 8 x fsdp 32 needs 144 GB.
    "v5p:8x8x4": dict(batch_size=8, mesh=dict(data=1, fsdp=8, context=32, tensor=1)),
    # 512 chips (v5p-1024): 16 context groups of 32 (the same per-chip shapes; not compiled here).
    "v5p:8x8x8": dict(batch_size=16, mesh=dict(data=1, fsdp=16, context=32, tensor=1)),
}


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:8x8x4", context="ring", runlocal=False)
  if arg.context not in ("ring", "ulysses"):
    raise ValueError(f"context={arg.context!r}; accepted: 'ring', 'ulysses'")
  if not arg.runlocal and arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  if arg.runlocal:  # sora-B's toy rows (experiments/sora_b.py:runlocal), over 4 context shards
    rows = dict(seq_len=1024, batch_size=2, text_len=128, max_segments=64)
    mesh = dict(data=1, fsdp=2, context=4, tensor=1)
  else:
    pod = SLICES[arg.topology]
    # Each context shard must hold whole 128-token blocks: 1,302,528 tokens = 32 x 318 x 128.
    unit = 128 * pod["mesh"]["context"]
    rows = dict(seq_len=-(-MINUTE_TOKENS // unit) * unit, batch_size=pod["batch_size"], text_len=512,
                max_segments=4)  # one minute-long video per row (short clips may share its padding)
    mesh = pod["mesh"]
  c = common.ConfigDict()
  c.seed = 0

  # Latents of real videos (data_pipelines/ingest_videos.py then encode_latents.py with a 16-channel
  # 4x8x8 VAE); paths are overridden on the command line (docs/pods.md).
  c.data = common.data(
      latents_dir="data/sora/latents", tokenizer="data/sora/tokenizer.model", vocab_size=32000,
      max_text_tokens=256, token_budget=0, min_patch_side=8, num_workers=4, packing_bins=128, read_threads=8,
      **rows)
  c.mesh = common.mesh(**mesh)
  # The defaults of `python -m sora_jax.sample` on an exported bundle (the demo's sizes).
  c.sample = common.sample(num_frames=17, height=32, width=32, fps=8.0, row_len=128)

  # Attention over the sharded sequence (sora_jax/models/attention.py: "ring" | "ulysses"), around the
  # backend's local kernel.
  c.dit = common.dit(
      "XL",
      text=common.caption_encoder(vocab_size=c.data.get_ref("vocab_size"), width=1024, depth=12, heads=8),
      in_dim=1 * 2 * 2 * 16, attention="auto", context=arg.context, remat="full", dtype="bfloat16")
  c.diffusion = common.diffusion(shift_ref_tokens=4096)
  c.train = common.trainer(
      total_steps=200_000, log_every_steps=50, checkpoint_every_steps=1000,
      optim=common.optim(lr=5e-5, warmup_steps=2000, b2=0.999, ema_decay=0.9999))
  c.vae = common.wan21_vae()         # the VAE whose latents the data holds

  if arg.runlocal:  # sora-B's toy model
    c.dit.update(dict(depth=2, width=256, num_heads=2, text_depth=1, ffn_dim=1024, remat="dots"))
    c.train.optim.lr = 1e-4
    c.compile_check = common.compile_check("v5p:4x4x4")
  else:
    # One compile of this step takes about half of compile_check's 10 minutes on a 2-core machine (545
    # while loops), so its cost comes from that compile alone: attention is 97% of the step and counted
    # by hand, and the layers the scan's count leaves out are priced at the counted work's rate
    # (docs/benchmarks.md, "Pod compile checks").
    c.compile_check = common.compile_check(arg.topology, cost="one")
  return c
