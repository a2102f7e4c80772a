"""Packed segment attention: what each implementation costs, on this CPU, a TPU topology and a GPU.

    python -m sora_jax.bench.attention --what=cpu              # fwd+bwd time, L=4096, k=8 equal segments
    python -m sora_jax.bench.attention --what=memory           # compiled temp bytes against L
    python -m sora_jax.bench.attention --what=align            # segment-aligned packing or not
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m sora_jax.bench.attention --what=tpu   # AOT, needs libtpu
    python -m sora_jax.bench.attention --what=gpu              # on a GPU host: exactness and timings

Every timing is fwd+bwd of sum(out * w) under one jit, the minimum of `--repeats` runs after a warm-up,
with all implementations measured in the same process (this CPU's speed drifts between processes).
"""
from __future__ import annotations

import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.kernels import blocksparse
from sora_jax.models import attention

_WHAT = flags.DEFINE_list("what", ["cpu"], "sections: cpu, memory, align, tpu, gpu")
_L = flags.DEFINE_integer("seq_len", 4096, "row length L")
_K = flags.DEFINE_integer("segments", 8, "equal segments per row")
_B = flags.DEFINE_integer("batch", 1, "rows")
_H = flags.DEFINE_integer("heads", 4, "heads")
_D = flags.DEFINE_integer("head_dim", 64, "head dim")
_BLOCKS = flags.DEFINE_list("blocks", ["32", "64", "128"], "blocksparse block sizes to time")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per measurement")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology for --what=tpu")


def equal_segments(batch: int, length: int, k: int) -> np.ndarray:
  return np.repeat(np.arange(1, k + 1, dtype=np.int32), length // k)[None].repeat(batch, 0)


def ids_from_lengths(lengths, length: int) -> np.ndarray:
  ids = np.zeros(length, np.int32)
  pos = 0
  for s, n in enumerate(lengths):
    ids[pos:pos + n] = s + 1
    pos += n
  return ids


def grad_fn(fn, ids_q, ids_kv, w):
  """jit(grad) of sum(attention * w) with respect to q, k, v: one fwd+bwd."""
  return jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v, ids_q, ids_kv) * w).sum(), (0, 1, 2)))


def time_ms(f, *args, repeats: int) -> float:
  return time_wall_cpu_ms(f, *args, repeats=repeats)[0]


def time_wall_cpu_ms(f, *args, repeats: int) -> tuple[float, float]:
  """Best wall-clock and best process CPU time (all threads) of `repeats` runs, in ms.

  On a shared CPU the wall clock measures the neighbours too; CPU time measures this process's work.
  """
  jax.block_until_ready(f(*args))
  wall = cpu = float("inf")
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(*args))
    wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
  return wall * 1e3, cpu * 1e3


def qkvw(batch, lq, lk, heads, dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda l: jnp.asarray(rng.normal(size=(batch, l, heads, dim)), dtype)
  return make(lq), make(lk), make(lk), make(lq)


def bs(block):
  return functools.partial(blocksparse.blocksparse_attention, block_q=block, block_k=block)


def bench_cpu():
  b, l, k, h, d = _B.value, _L.value, _K.value, _H.value, _D.value
  ids = jnp.asarray(equal_segments(b, l, k))
  q, kk, v, w = qkvw(b, l, l, h, d)
  print(f"fwd+bwd, B={b} L={l} k={k} heads={h} head_dim={d}, f32, {jax.devices()[0].device_kind}")
  print(f"  (best of {_REPEATS.value}: wall ms, CPU ms of this process; ratios to the reference; "
        f"target <= 1.5/k = {1.5 / k:.3f})")
  ref = time_wall_cpu_ms(grad_fn(attention._reference, ids, ids, w), q, kk, v,
                         repeats=_REPEATS.value)
  print(f"  reference (dense mask)   wall {ref[0]:8.1f}  cpu {ref[1]:8.1f}")
  for block in map(int, _BLOCKS.value):
    t = time_wall_cpu_ms(grad_fn(bs(block), ids, ids, w), q, kk, v, repeats=_REPEATS.value)
    print(f"  blocksparse block={block:<4d}  wall {t[0]:8.1f}  cpu {t[1]:8.1f}   ratio wall "
          f"{t[0] / ref[0]:.3f}  cpu {t[1] / ref[1]:.3f}")


def temp_bytes(fn, b, l, h, d, ids):
  x = jax.ShapeDtypeStruct((b, l, h, d), jnp.float32)
  w = jnp.zeros((b, l, h, d))
  compiled = grad_fn(fn, ids, ids, w).lower(x, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def bench_memory():
  h, d = _H.value, _D.value
  print(f"compiled fwd+bwd temp bytes (memory_analysis), B=1 heads={h} head_dim={d}, f32")
  print("  L      segments  reference MiB  blocksparse(64) MiB")
  for l in (1024, 2048, 4096, 8192, 16384):
    ids = jnp.asarray(equal_segments(1, l, l // 512))
    ref = temp_bytes(attention._reference, 1, l, h, d, ids) if l <= 8192 else float("nan")
    sparse = temp_bytes(bs(64), 1, l, h, d, ids)
    print(f"  {l:<6d} {l // 512:<9d} {ref / 2**20:13.1f}  {sparse / 2**20:19.1f}")


def demo_lengths(n: int, mixture: str, seed: int = 0) -> list[int]:
  """Token counts of Shapes samples: 4x8x8 VAE latents cut into 1x2x2 patches."""
  from sora_jax.data import shapes
  out = []
  for i in range(n):
    s = shapes.sample_spec("train", i, seed=seed, mixture=mixture)
    out.append((1 + (s.num_frames - 1) // 4) * (s.height // 16) * (s.width // 16))
  return out


def pack_rows(lengths, length: int, align: int, rows: int) -> np.ndarray:
  """First-fit packing (arrival order) with every segment's slot rounded up to `align` tokens."""
  bins: list[list[int]] = []
  used: list[int] = []
  for n in lengths:
    slot = -(-n // align) * align
    if slot > length:
      continue
    for i, u in enumerate(used):
      if u + slot <= length:
        break
    else:
      if len(bins) == rows:
        break
      bins.append([])
      used.append(0)
      i = len(bins) - 1
    bins[i].append(n)
    used[i] += slot
  ids = np.zeros((len(bins), length), np.int32)
  for r, segs in enumerate(bins):
    pos = 0
    for s, n in enumerate(segs):
      ids[r, pos:pos + n] = s + 1
      pos += -(-n // align) * align
  return ids


def stepped_pairs(widths_bn: np.ndarray, group: int) -> int:
  """Block pairs blocksparse computes: blocks sorted by window width, each group to its widest window."""
  w = -np.sort(-widths_bn, axis=1)
  n = w.shape[1]
  return sum(int(w[:, lo].max()) * min(group, n - lo) * w.shape[0] for lo in range(0, n, group))


def bench_align():
  l, h, d = _L.value, _H.value, _D.value
  rows = 4
  for mixture in ("demo", "small"):
    lengths = demo_lengths(3000, mixture)
    print(f"segment-aligned packing, mixture={mixture} (mean {np.mean(lengths):.0f} tokens), L={l}, "
          f"{rows} rows, heads={h} head_dim={d}, blocksparse block 64, fwd+bwd")
    base = None
    for align in (1, 8, 16, 32, 64):
      ids = jnp.asarray(pack_rows(lengths, l, align, rows))
      q, kk, v, w = qkvw(ids.shape[0], l, l, h, d)
      ms = time_wall_cpu_ms(grad_fn(bs(64), ids, ids, w), q, kk, v, repeats=_REPEATS.value)[1]
      real = int((ids > 0).sum())
      block_map = blocksparse.block_map(ids.reshape(rows, -1, 64), ids.reshape(rows, -1, 64))
      active = int(block_map.sum())
      stepped = stepped_pairs(np.asarray(blocksparse.windows(block_map)[1]), group=4)
      rate = real / ms * 1e3
      base = base or rate
      print(f"  align {align:<3d} real tokens {real / (rows * l):.3f} of the row, active 64-blocks "
            f"{active / (rows * (l // 64) ** 2):.3f}, computed {stepped / (rows * (l // 64) ** 2):.3f}, "
            f"{ms:7.1f} CPU ms, {rate:8.0f} real tokens per CPU s ({rate / base:.2f}x unaligned)")


def bench_tpu():
  from jax.experimental import topologies
  from sora_jax.kernels import splash
  topo = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value)
  dev = topo.devices[0]
  sharding = jax.sharding.SingleDeviceSharding(dev)
  h, d = 8, 128
  print(f"AOT for {dev.device_kind} ({_TOPOLOGY.value}, one chip), heads={h} head_dim={d}, bf16")

  def compile_(fn, l, static_ids=None):
    x = jax.ShapeDtypeStruct((1, l, h, d), jnp.bfloat16, sharding=sharding)
    ids = jax.ShapeDtypeStruct((1, l), jnp.int32, sharding=sharding)
    if static_ids is not None:
      f = lambda q, k, v: jnp.sum(fn(q, k, v, static_ids, static_ids).astype(jnp.float32))
      return jax.jit(jax.grad(f, (0, 1, 2))).lower(x, x, x).compile()
    f = lambda q, k, v, i: jnp.sum(fn(q, k, v, i, i).astype(jnp.float32))
    return jax.jit(jax.grad(f, (0, 1, 2))).lower(x, x, x, ids).compile()

  def flops(c):
    ca = c.cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca).get("flops", 0.0)

  if len(topo.devices) >= 4:
    # Under a mesh the kernel runs per shard (sharding.per_shard): batch over data, heads over tensor.
    from sora_jax import sharding as sharding_lib
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=topo.devices[:4])
    with sharding_lib.use_mesh(mesh):
      named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
      x = jax.ShapeDtypeStruct((4, 2048, h, d), jnp.bfloat16, sharding=named("data", None, "tensor"))
      ids = jax.ShapeDtypeStruct((4, 2048), jnp.int32, sharding=named("data"))
      f = lambda q, k, v, i: jnp.sum(attention.segment_attention(
          q, k, v, i, i, implementation="splash").astype(jnp.float32))
      c = jax.jit(jax.grad(f, (0, 1, 2))).lower(x, x, x, ids).compile()
      print(f"  sharded: B=4 L=2048 on mesh {dict(mesh.shape)}: splash fwd+bwd compiles, temp "
            f"{c.memory_analysis().temp_size_in_bytes / 2**20:.1f} MiB per chip")
  print("  fwd+bwd, L, then compiled GFLOPs and temp MiB: reference / splash")
  for l in (2048, 4096, 8192):
    ref = compile_(attention._reference, l)
    spl = compile_(splash.splash_attention, l)
    mib = lambda c: c.memory_analysis().temp_size_in_bytes / 2**20
    print(f"  L={l:<6d} reference {flops(ref) / 1e9:8.1f} GFLOP {mib(ref):8.1f} MiB"
          f" | splash {flops(spl) / 1e9:6.2f} GFLOP (Pallas calls are not counted) {mib(spl):6.1f} MiB")
  print("  L=4096: blocksparse with a static max_window (widest window in blocks), block 128: compiled")
  print("  GFLOP and its ratio to one segment; splash: active blocks (grid steps that run) / all blocks")
  print("  lengths                          sum l^2/L^2  blocksparse GFLOP  ratio  splash 512  splash 128")
  layouts = [[4096], [2048] * 2, [1024] * 4, [512] * 8, [256] * 16, [2048, 1024, 512, 512],
             [300, 700, 1000, 60, 900, 1100]]
  one = None
  for lengths in layouts:
    ids = jnp.asarray(ids_from_lengths(lengths, 4096)[None])
    window = blocksparse.max_window(ids, ids, 128, 128)
    fn = functools.partial(blocksparse.blocksparse_attention, block_q=128, block_k=128,
                           max_window=window)
    g = flops(compile_(fn, 4096, static_ids=ids))
    one = one or g
    sq = sum(n * n for n in lengths) / 4096 ** 2
    frac = lambda b: float(blocksparse.block_map(ids.reshape(1, -1, b), ids.reshape(1, -1, b)).mean())
    print(f"  {str(lengths):32s} {sq:11.4f} {g / 1e9:18.2f} {g / one:6.3f} {frac(512):11.4f} "
          f"{frac(128):11.4f}")


def bench_gpu():
  from sora_jax.kernels import gpu
  from jax.experimental.pallas.ops.gpu import attention as stock
  print(jax.devices()[0].device_kind, jax.__version__)
  # Exactness on the device, f32 (HIGHEST precision in the kernels): padding, singletons, cross-attention.
  b, l, lt, h, d = 2, 512, 96, 4, 64
  rng = np.random.default_rng(0)
  ids = jnp.asarray(np.stack([ids_from_lengths([200, 1, 150, 3, 1], l), ids_from_lengths([1, 1, 480], l)]))
  tids = jnp.asarray(np.stack([ids_from_lengths([20, 3, 30, 1, 1], lt), ids_from_lengths([2, 5, 40], lt)]))
  q, k, v, w = qkvw(b, l, l, h, d)
  _, kt, vt, _ = qkvw(b, l, lt, h, d, seed=1)
  # XLA's GPU dots may use TF32 for f32 by default: the reference and blocksparse must not.
  jax.config.update("jax_default_matmul_precision", "highest")
  for name, (kk, vv, kid) in {"self": (k, v, ids), "cross": (kt, vt, tids)}.items():
    ref_out = jax.jit(attention._reference)(q, kk, vv, ids, kid)
    ref = grad_fn(attention._reference, ids, kid, w)(q, kk, vv)
    for impl in ("gpu", "blocksparse"):
      fn = functools.partial(attention.segment_attention, implementation=impl)
      try:
        err_out = float(jnp.abs(jax.jit(fn)(q, kk, vv, ids, kid) - ref_out).max())
        got = grad_fn(fn, ids, kid, w)(q, kk, vv)
        err = max(float(jnp.abs(a - r).max()) for a, r in zip(got, ref))
        print(f"  {name:5s} {impl:11s} f32 max|out-ref| {err_out:.2e}  max|grad-ref| {err:.2e}")
      except Exception as e:  # noqa: BLE001 - report and go on to the timings
        print(f"  {name:5s} {impl:11s} failed: {type(e).__name__}: {str(e)[:2000]}")
  jax.config.update("jax_default_matmul_precision", None)
  # Timings, bf16: ours, the stock Pallas mha with segment ids (every block), XLA dense reference.
  stock_fn = lambda q, k, v, i, j: jnp.where((i > 0)[:, :, None, None], stock.mha(
      q, k, v, i, sm_scale=q.shape[-1] ** -0.5), 0)
  rows = [(f"L={l} k={k_} equal", equal_segments(1, l, k_))
          for l, k_ in ((4096, 8), (16384, 8), (16384, 64), (65536, 64))]
  rows.append(("L=16384 Shapes 'small' mixture, 2 rows",
               pack_rows(demo_lengths(3000, "small"), 16384, 1, 2)))
  h, d = 16, 64
  gpu32 = functools.partial(gpu.gpu_attention, block_q=32, block_k=32)
  gpu128 = functools.partial(gpu.gpu_attention, block_q=128, block_k=128)
  for label, ids in rows:
    ids = jnp.asarray(ids)
    b, l = ids.shape
    q, kk, v, w = qkvw(b, l, l, h, d, dtype=jnp.bfloat16)
    row = {}
    for name, fn in (("gpu", gpu.gpu_attention), ("gpu_block32", gpu32), ("gpu_block128", gpu128),
                     ("stock_mha", stock_fn), ("blocksparse", bs(128)),
                     ("reference", attention._reference)):
      if name == "reference" and l > 4096:
        continue
      try:
        row[name] = time_ms(grad_fn(fn, ids, ids, w), q, kk, v, repeats=10)
      except Exception as e:  # noqa: BLE001 - a benchmark row reports what failed and moves on
        row[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    sq = float(sum((np.bincount(r[r > 0]) ** 2).sum() for r in np.asarray(ids)))
    print(f"  fwd+bwd bf16 {label} heads={h} head_dim={d} (sum l^2 / (B L^2) = {sq / (b * l * l):.4f}): "
          + ", ".join(f"{n} {t:.2f} ms" if isinstance(t, float) else f"{n} {t}" for n, t in row.items()))


def main(argv):
  del argv
  sections = {"cpu": bench_cpu, "memory": bench_memory, "align": bench_align, "tpu": bench_tpu,
              "gpu": bench_gpu}
  for what in _WHAT.value:
    if what not in sections:
      raise ValueError(f"--what {what!r} is unknown; accepted: {sorted(sections)}")
    sections[what]()


if __name__ == "__main__":
  app.run(main)
