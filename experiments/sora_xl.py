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

Everything but the sizes, rows and learning rate is sora-B's (experiments/sora_b.py); sections and
keys: experiments/common.py.
"""
from experiments import common
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
  c = common.ConfigDict()
  c.seed = 0

  # Latents of real videos (data_pipelines/ingest_videos.py then encode_latents.py with a 16-channel
  # 4x8x8 VAE); paths are overridden on the command line (docs/pods.md).
  c.data = common.data(
      latents_dir="data/sora/latents", tokenizer="data/sora/tokenizer.model", vocab_size=32000,
      seq_len=pod["seq_len"], text_len=512, max_text_tokens=256, max_segments=128,
      batch_size=pod["batch_size"], token_budget=0, min_patch_side=8, num_workers=4, packing_bins=128,
      read_threads=8)
  c.mesh = common.mesh(**pod["mesh"])
  # The defaults of `python -m sora_jax.sample` on an exported bundle (the demo's sizes).
  c.sample = common.sample(num_frames=17, height=32, width=32, fps=8.0, row_len=128)

  c.dit = common.dit(
      "XL",
      text=common.caption_encoder(vocab_size=c.data.get_ref("vocab_size"), width=1024, depth=12, heads=8),
      in_dim=1 * 2 * 2 * 16, attention="splash", remat=pod["remat"], dtype="bfloat16")
  c.diffusion = common.diffusion(shift_ref_tokens=4096)
  c.train = common.trainer(
      total_steps=200_000, log_every_steps=50, checkpoint_every_steps=1000,
      optim=common.optim(lr=5e-5, warmup_steps=2000, b2=0.999, ema_decay=0.9999))
  c.vae = common.wan21_vae()         # the VAE whose latents the data holds
  c.compile_check = common.compile_check(arg.topology)

  if arg.runlocal:  # sora-B's toy model (experiments/sora_b.py:runlocal): a smoke run on one CPU host
    c.data.update(dict(seq_len=1024, batch_size=8, text_len=128, max_segments=64))
    c.dit.update(dict(depth=2, width=256, num_heads=2, text_depth=1, ffn_dim=1024, remat="dots",
                      attention="auto"))
    c.train.optim.lr = 1e-4
    c.mesh = common.mesh(data=1, fsdp=-1)
    c.compile_check.topology = "v5p:4x4x4"
  return c
