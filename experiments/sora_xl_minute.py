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

`runlocal` is the same recipe at toy size on 8 fake CPU devices (context 4, fsdp 2).
"""
import ml_collections

from experiments import sora_xl
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
  if arg.runlocal:
    c = sora_xl.get_config("runlocal=True")
    c.data.seq_len, c.data.batch_size, c.data.text_len = 1024, 2, 128
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=2, context=4, tensor=1))
  else:
    if arg.topology not in SLICES:
      raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
    pod = SLICES[arg.topology]
    c = sora_xl.get_config()
    # Each context shard must hold whole 128-token blocks: 1,302,528 tokens = 32 x 318 x 128.
    unit = 128 * pod["mesh"]["context"]
    c.data.seq_len = -(-MINUTE_TOKENS // unit) * unit
    c.data.batch_size = pod["batch_size"]
    c.data.max_segments = 4     # one minute-long video per row (short clips may share its padding)
    c.mesh = ml_collections.ConfigDict(pod["mesh"])
    c.dit.remat = "full"
    c.compile_check.topology = arg.topology
    # One compile of this step takes most of compile_check's time on a 2-core machine (the ring's
    # hundreds of loops per layer), so its cost comes from that compile alone: attention is 97% of the
    # step and counted by hand, and the layers the scan's count leaves out are priced at the counted
    # work's rate (docs/benchmarks.md, "Pod checks within a laptop's memory").
    c.compile_check.cost = "one"
  # Attention over the sharded sequence (sora_jax/models/attention.py: "ring" | "ulysses"), around the
  # backend's local kernel (the same whatever the choice here).
  c.dit.context = arg.context
  c.dit.attention = "auto"
  return c
