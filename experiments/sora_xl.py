"""sora-XL: an ~11B-parameter text-to-video DiT, the scale of Open-Sora 2.0 (width 4096, 32 heads of 128,
depth 30; text encoder 1024 x 12), on v5p or v6e pods: 16-channel 4x8x8 latents, 1x2x2 patches, rows
of 64k packed tokens (32k on v6e, whose chips have a third of v5p's HBM), 512 text tokens per row.

    python -m sora_jax.compile_check --config experiments/sora_xl.py --topology v5p:8x8x4
    python -m sora_jax.compile_check --config experiments/sora_xl.py:topology=v6e:16x16 --topology v6e:16x16
The low-resolution stage (rows of 16k at the same tokens per step): `experiments/sora_xl.py:seq_len=16384`.
Train (v5p-512, 64 hosts; or GKE via XPK: scripts/xpk.sh, multi-slice with --num_slices):
    python -m sora_jax.train --config experiments/sora_xl.py --workdir gs://BUCKET/runs/sora_xl \\
        --config.data.latents_dir=gs://BUCKET/latents --config.data.tokenizer=gs://BUCKET/tok.model
Expected (docs/benchmarks.md, "Pod compile checks"): fits in HBM; compiler-estimated MFU as recorded there.

Shares everything but the sizes with sora_b (imported and mutated).
"""
import ml_collections

from experiments import sora_b
from sora_jax.config import parse_arg

SLICES = {
    # full_save_attention: the attention kernels' outputs are kept, so their forward runs once, and the
    # fused backward runs over 16 query chunks (7 kernel matmuls per call): 46.6% estimated MFU, 75.3 of
    # 95 GB per chip (docs/history.md, Issue 8, seventh session).
    "v5p:8x8x4": dict(batch_size=256, seq_len=65536, remat="full_save_attention",
                      mesh=dict(data=1, fsdp=-1, tensor=1)),
    # full_save_self_attention: only the self-attention kernels' outputs are kept (both would need 34.43G
    # of temporaries of 31.24G); the cross-attention kernels run again: 53.0% estimated MFU, 30.95 of
    # 32 GB per chip (`full`: 44.7%, 20.42 GB).
    "v6e:16x16": dict(batch_size=256, seq_len=32768, remat="full_save_self_attention",
                      mesh=dict(data=1, fsdp=-1, tensor=1)),
    # Two v5p-512 slices over DCN (scripts/xpk.sh): data parallel across slices, FSDP within.
    "2xv5p:8x8x4": dict(batch_size=512, seq_len=65536, remat="full_save_attention",
                        mesh=dict(data=2, fsdp=-1, tensor=1)),
}

# Row lengths of the training stages (`experiments/sora_xl.py:seq_len=16384`): 16k for the low-resolution
# stage where most steps are taken (e.g. 256 px, ~8 s per row), 64k for the high-resolution one.
STAGE_SEQ_LENS = (16384, 32768, 65536)


def get_config(arg=None):
  arg = parse_arg(arg, topology="v5p:8x8x4", seq_len=0, runlocal=False)
  if arg.topology not in SLICES:
    raise ValueError(f"topology={arg.topology!r} has no preset; accepted: {sorted(SLICES)}")
  pod = dict(SLICES[arg.topology])
  if arg.seq_len:  # another training stage's row length, at the preset's tokens per step
    if arg.seq_len not in STAGE_SEQ_LENS:
      raise ValueError(f"seq_len={arg.seq_len} is not a stage row length; accepted: {STAGE_SEQ_LENS}")
    pod.update(batch_size=pod["seq_len"] * pod["batch_size"] // arg.seq_len, seq_len=arg.seq_len)
  c = sora_b.get_config("runlocal" if arg.runlocal else None)
  if arg.runlocal:
    return c
  c.data.seq_len = pod["seq_len"]
  c.data.batch_size = pod["batch_size"]
  c.data.max_segments = 128
  c.mesh = ml_collections.ConfigDict(pod["mesh"])
  c.dit.width = 4096
  c.dit.depth = 30
  c.dit.num_heads = 32
  c.dit.ffn_dim = 16384
  c.dit.text_width = 1024
  c.dit.text_depth = 12
  c.dit.text_heads = 8
  c.dit.remat = pod["remat"]
  c.train.optim.lr = 5e-5
  c.compile_check.topology = arg.topology
  return c
