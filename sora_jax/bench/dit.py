"""DiT train-step throughput: diffusion.loss_fn forward + backward + an SGD update, on packed rows.

    python -m sora_jax.bench.dit                                    # the demo's cfg.dit, L=1024, B=4
    python -m sora_jax.bench.dit --width=1152 --depth=28 --heads=16 --seq_len=8192 --batch=2 \
        --seg_len=1024 --remat=full                                 # DiT-XL-like, on an accelerator
    python -m sora_jax.bench.dit --dtype=float32 --batch=2 --in_dim=32 --frame_diff_weights=0,1
                                                                    # the demo's step without and with
                                                                    # diffusion.frame_diff_weight, side by side
    python -m sora_jax.bench.dit --dtype=float32 --attention=blocksparse --in_dim=32 --batch=2,4
                                                                    # 2 and 4 rows a step, side by side

    python -m sora_jax.data.inspect --config experiments/shapes_demo.py --workdir runs/demo/dit \
        --config.data.batch_size=4 --num_batches 8 --dump R.npz
    python -m sora_jax.bench.dit --dtype=float32 --attention=blocksparse --rows R.npz --batch=2,4 \
        --merge_rows=false,true                                     # the demo's real rows, 2 or 4 a step,
                                                                    # blocksparse row by row or merged
    python -m sora_jax.bench.dit --dtype=float32 --attention=blocksparse --rows R.npz \
        --attention_axes=full --attention_axes=space,time           # full against factorised attention
    python -m sora_jax.bench.dit --dtype=float32 --attention=blocksparse --rows R.npz \
        --mlp_conv=false,true                                       # without and with dit.mlp_conv

Rows hold equal segments of `seg_len` tokens (4 latent frames, a square-ish grid) with 12-token captions,
or with --rows the packed rows dumped by data.inspect (the demo's: mixed sizes). Model FLOPs come from
sora_jax/flops.py (no remat recomputation; attention dense over the row, or with --rows over the pairs
its segments need, as the trainer counts), the peak from flops.peak_flops (measured in-process on CPU,
published for accelerators). The step is the minimum of `--steps` runs after a warm-up; with --rows every
setting steps through the same rows, `batch` at a time (the cost depends on the rows' layout), and the
step is the mean over those batches of each one's minimum. With --rows, space and time blocks
(`--attention_axes`) count the pairs inside their groups; synthetic rows count each segment's.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import diffusion, flops
from sora_jax.kernels import blocksparse
from sora_jax.models import attention
from sora_jax.models.dit import DiT

FLAGS = flags.FLAGS
flags.DEFINE_integer("width", 0, "DiT width; 0 = the demo config's")
flags.DEFINE_integer("depth", 0, "DiT depth; 0 = the demo config's")
flags.DEFINE_integer("heads", 0, "attention heads; 0 = the demo config's")
flags.DEFINE_integer("seq_len", 1024, "packed row length L")
flags.DEFINE_list("batch", ["4"], "rows per step; several (e.g. 2,4) are each timed in turn, one JSON line each")
flags.DEFINE_integer("seg_len", 64, "tokens per segment (a multiple of 4)")
flags.DEFINE_integer("in_dim", 64, "token dim D (the demo's latents: 16 channels x 1x2x2 patches)")
flags.DEFINE_string("remat", "none", "cfg.dit.remat")
flags.DEFINE_string("dtype", "bfloat16", "cfg.dit.dtype")
flags.DEFINE_string("attention", "reference", "cfg.dit.attention")
flags.DEFINE_integer("steps", 5, "timed steps")
flags.DEFINE_list("frame_diff_weights", ["0"], "diffusion.frame_diff_weight values, each timed in turn (one "
                  "JSON line each)")
flags.DEFINE_multi_string("attention_axes", ["full"], "dit.attention_axes as comma-separated block kinds "
                          "(full, space, time); repeat the flag to time each in turn")
flags.DEFINE_list("mlp_conv", ["false"], "dit.mlp_conv values (false, true), each timed in turn")
flags.DEFINE_string("rows", "", "packed rows to time on (.npz of data.inspect --dump); empty = synthetic rows")
flags.DEFINE_list("merge_rows", ["auto"], "blocksparse's merge_rows (auto: on one device), each timed in turn: "
                  "auto, true, false")
_MERGE = {"auto": None, "true": True, "false": False}


def synthetic_batch(b: int, l: int, lt: int, s: int, seg_len: int, in_dim: int) -> dict:
  nseg = l // seg_len
  per_frame = seg_len // 4
  nh = max(d for d in range(1, int(per_frame ** 0.5) + 1) if per_frame % d == 0)
  grid = np.stack(np.meshgrid(np.arange(4), np.arange(nh), np.arange(per_frame // nh), indexing="ij"), -1)
  pos, seg = np.zeros((b, l, 3), np.int32), np.zeros((b, l), np.int32)
  for k in range(nseg):
    pos[:, k * seg_len:(k + 1) * seg_len] = grid.reshape(-1, 3)
    seg[:, k * seg_len:(k + 1) * seg_len] = k + 1
  per = min(12, lt // nseg)
  tseg = np.zeros((b, lt), np.int32)
  tseg[:, :nseg * per] = np.repeat(np.arange(1, nseg + 1), per)
  rng = np.random.default_rng(0)
  batch = dict(tokens=rng.normal(size=(b, l, in_dim)).astype(np.float32), positions=pos, segment_ids=seg,
               loss_mask=np.ones((b, l), np.float32), text_tokens=rng.integers(1, 128, (b, lt)).astype(np.int32),
               text_segment_ids=tseg, seg_valid=(np.arange(s) < nseg)[None].repeat(b, 0).astype(np.int32))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def main(_):
  from experiments import shapes_demo  # pylint: disable=g-import-not-at-top
  cfg = shapes_demo.get_config()
  d = cfg.dit
  d.in_dim = FLAGS.in_dim
  d.width, d.depth, d.num_heads = FLAGS.width or d.width, FLAGS.depth or d.depth, FLAGS.heads or d.num_heads
  d.remat, d.dtype, d.attention = FLAGS.remat, FLAGS.dtype, FLAGS.attention
  if d.width >= 512:  # a caption encoder in proportion to a big DiT
    d.text_width, d.text_depth, d.text_heads = 512, 4, 8
  bad = [m for m in FLAGS.merge_rows if m not in _MERGE]
  if bad:
    raise app.UsageError(f"--merge_rows {','.join(bad)}: accepted: {', '.join(_MERGE)}")
  if FLAGS.rows:
    with np.load(FLAGS.rows) as f:
      rows = {k: f[k] for k in _BATCH_KEYS}
    d.in_dim = rows["tokens"].shape[-1]
  else:
    l, lt = FLAGS.seq_len, cfg.data.text_len
    s = max(cfg.data.max_segments, l // FLAGS.seg_len)
  for b in map(int, FLAGS.batch):
    if FLAGS.rows:
      n = len(rows["tokens"]) // b
      if not n:
        raise app.UsageError(f"--batch {b}: more than the {len(rows['tokens'])} rows in {FLAGS.rows}")
      batches = [{k: jnp.asarray(v[i * b:(i + 1) * b]) for k, v in rows.items()} for i in range(n)]
    else:
      batches = [synthetic_batch(b, l, lt, s, FLAGS.seg_len, d.in_dim)]
    for merge in FLAGS.merge_rows:
      # The DiT reaches blocksparse through attention's table; the bench swaps in the setting it times.
      attention._IMPLEMENTATIONS["blocksparse"] = (  # pylint: disable=protected-access
          lambda q, k, v, qi, ki, residual_name=None, m=_MERGE[merge]:
          blocksparse.blocksparse_attention(q, k, v, qi, ki, merge_rows=m))
      for w in FLAGS.frame_diff_weights:
        for axes in FLAGS.attention_axes:
          for conv in FLAGS.mlp_conv:
            if conv not in ("false", "true"):
              raise app.UsageError(f"--mlp_conv={conv}: accepted: false, true")
            cfg.diffusion.frame_diff_weight, d.attention_axes = float(w), tuple(axes.split(","))
            d.mlp_conv = conv == "true"
            time_step(cfg, batches, merge)


_BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "text_tokens", "text_segment_ids",
               "seg_valid")


def time_step(cfg, batches: list[dict], merge: str = "auto") -> None:
  """Compiles one train step of cfg's DiT and times it on `batches` (their mean step); one JSON line."""
  d = cfg.dit
  batch = batches[0]
  (b, l), lt, s = batch["segment_ids"].shape, batch["text_tokens"].shape[1], batch["seg_valid"].shape[1]
  model = nnx.jit(lambda: DiT(d, rngs=nnx.Rngs(0)))()
  graphdef, state = nnx.split(model)
  num_params = sum(x.size for x in jax.tree.leaves(state))

  def step(state, batch, rng):
    def loss(st):
      return diffusion.loss_fn(nnx.merge(graphdef, st), batch, rng, cfg)
    (l_, _), g = jax.value_and_grad(loss, has_aux=True)(state)
    return l_, jax.tree.map(lambda p, gp: p - 1e-4 * gp.astype(p.dtype), state, g)

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  first_loss = None
  for x in batches:  # warm-up
    loss, state = compiled(state, x, jax.random.key(0))
    first_loss = loss if first_loss is None else first_loss
  jax.block_until_ready(loss)
  times = [[] for _ in batches]
  for i in range(FLAGS.steps):
    for j, x in enumerate(batches):
      t0 = time.perf_counter()
      loss, state = compiled(state, x, jax.random.key(i + 1))
      jax.block_until_ready(loss)
      times[j].append(time.perf_counter() - t0)
  best = float(np.mean([min(t) for t in times]))
  step_flops = flops.dit_train_step_flops(cfg, batch=b, seq_len=l, text_len=lt, num_segments=s,
                                          num_params=num_params)
  model_flops = step_flops.model
  if FLAGS.rows:  # as the trainer counts: attention over the pairs the rows' segments need
    model_flops += float(np.mean([flops.attention_model_flops(cfg, flops.useful_attention_pairs(x, d))
                                  for x in batches])) - step_flops.model_attention
  peak, peak_source = flops.peak_flops(jax.devices()[:1], d.dtype)
  print(json.dumps(dict(
      device=jax.devices()[0].device_kind, width=d.width, depth=d.depth, heads=d.num_heads, seq_len=l,
      batch=b, rows=FLAGS.rows or f"synthetic, segments of {FLAGS.seg_len}", steps_per_pass=len(batches),
      real_tokens_per_s=round(float(np.mean([(x["segment_ids"] > 0).sum() for x in batches])) / best),
      remat=d.remat, dtype=d.dtype, attention=d.attention, merge_rows=merge,
      frame_diff_weight=cfg.diffusion.frame_diff_weight, attention_axes=",".join(d.attention_axes),
      mlp_conv=d.mlp_conv,
      params_m=round(num_params / 1e6, 2),
      compile_s=round(compile_s, 1), step_s=round(best, 4),
      tokens_per_s=round(b * l / best), model_tflops_per_s=round(model_flops / best / 1e12, 3),
      mfu=round(model_flops / best / peak, 4), peak=f"{peak / 1e12:.1f} TFLOP/s, {peak_source}",
      loss=round(float(first_loss), 4))))


if __name__ == "__main__":
  app.run(main)
