"""FLOP counts by hand for the DiT train step, device peaks, and MFU.

Two counts per train step (global, all devices together):
- `model`: the matmul FLOPs the model needs, forward + backward (weight and input gradients) and no
  recomputation, with attention over every (query, key) pair of the row. MFU = model FLOPs / step time
  / peak, the usual definition, so remat lowers MFU; the trainer replaces the dense attention part by
  the pairs each batch's segments really need (`useful_attention_pairs`), so MFU neither rewards
  computing masked pairs nor penalises block-sparse kernels for skipping them.
- `total`: what the compiled step executes: `model` plus remat recomputation, plus elementwise work
  (softmax, norms, activations, the optimizer), so it is comparable with XLA's `cost_analysis()`.

Counting conventions: a matmul [m, k] x [k, n] is 2mkn. Its backward is two more of the same size (input
and weight gradient), except where the input is data (patch embedding, conditioning path, time
frequencies): no input gradient there. Attention is dense (the reference implementation computes every
(query, key) pair and masks), so its cost is 4 * L^2 * width per row whatever the packing.

Scans: the DiT and its text encoder run their layers in `lax.scan`, and XLA's cost model counts a loop
body once, not per trip (docs/hazards.md). Worse, work on the stacked per-layer tensors outside the loop (saved
activations, stacked gradients) is counted in full, so no simple rescaling of the scanned count is
right. The comparison therefore compiles the step a second time with every scan unrolled
(`unrolled_scans`) and compares `total` with that compiled count (tests/test_flops.py; train.py does it
when `config.train.flops_check` is set, since unrolling multiplies compile time). `StepFlops.once` (each stack
counted once) is logged beside the scanned compile's count as a rough cross-check only.

LoRA (`cfg.lora.rank` > 0, models/lora.py): the base weights are frozen, so no matmul has a weight
gradient but the adapters'; only activations that depend on the adapters get gradients (the residual
stream through the blocks, attention, the output projection), not the time path, the text projection
or the patch embedding; and each adapted block projection adds x A and (x A) B with their gradients.
`model` then counts that work (forward, input gradients where needed, adapter weight gradients): MFU
of a LoRA step is useful work over time, as for full training. Adapters are counted on the blocks'
projections (lora.targets beyond `blocks/...` are left out of the count), for a DiT reading a frozen
encoder's features (a caption encoder inside the DiT is counted as if it trained).

Elementwise terms use per-element costs of XLA's cost model fitted on this CPU (see the constants);
at the demo's width they are about 8% of `total`. What a remat policy recomputes is read from its entry
in models/layers.py's REMAT table.

Attention kernels (Pallas, and context parallelism's local loops): XLA's cost model does not count them,
so `kernel_flops` gives compile_check this count's share of them and the FLOPs they execute.

Peaks: a published dense bf16 figure per accelerator kind (PEAK_FLOPS); on CPU a matmul peak measured in
this process (`measure_cpu_peak`), since CPU throughput moves from run to run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import sharding
from sora_jax.models import dit as dit_lib
from sora_jax.models import layers
from sora_jax.models.text import MLP_RATIO as TEXT_MLP_RATIO

# Dense bf16 FLOP/s per chip (vendor data sheets), matched as substrings of `device.device_kind`,
# most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),     # v6e (Trillium)
    ("TPU v5 lite", 197e12),     # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),          # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
    ("H200", 989e12),            # SXM, dense
    ("H100 PCIe", 756e12),
    ("H100", 989e12),            # SXM, dense
    ("A100", 312e12),
    ("L4", 121e12),
    ("B200", 2250e12),
)

# Elementwise work as XLA's cost model counts it (flops per element; jax 0.10.2, CPU). Fitted by least
# squares to cost_analysis() of fully unrolled train steps minus the exact matmul count above, over seven
# shapes (widths 64-192, rows of 256-512 tokens, 8 or 48 segments, 2-6 layers); the fit reproduces those
# steps within 1.5%. Per (query, key, head) score of the masked softmax: 23.4 (11 forward, measured
# alone); per token and channel of one block (norms, modulation, RoPE, GELU, gates, residuals, and the
# dtype converts around them): about 970, forward and backward, of which we take a third as forward
# (what remat recomputes; not fitted: remat runs were not part of the fit); per parameter for AdamW,
# clipping, the EMA and the three global norms: 42.
SOFTMAX_FWD, SOFTMAX_BWD = 11.0, 12.4
BLOCK_ELEMWISE_FWD, BLOCK_ELEMWISE_BWD = 320.0, 650.0
OPTIMIZER_PER_PARAM = 42.0


@dataclasses.dataclass
class StepFlops:
  """FLOPs of one global train step; `per_layer` is one scanned layer of each stack (in `total` terms)."""
  model: float
  total: float
  per_layer: dict
  depths: dict
  model_attention: float = 0.0   # the part of `model` that is dense (query, key) attention matmuls

  @property
  def once(self) -> float:
    """`total` as XLA's cost model counts a scanned step: each stack's body once."""
    return self.total - sum((self.depths[k] - 1) * v for k, v in self.per_layer.items())


class _Counter:
  """Accumulates (model, total) FLOPs: matmuls forward + backward, with and without remat."""

  def __init__(self):
    self.model = 0.0
    self.total = 0.0

  def matmul(self, fwd: float, *, input_grad: bool = True, weight_grad: bool = True, recompute: float = 0.0):
    """A matmul of `fwd` forward FLOPs; `recompute` = how many extra forwards remat adds (0 or 1)."""
    passes = 1.0 + input_grad + weight_grad
    self.model += passes * fwd
    self.total += (passes + recompute) * fwd

  def elementwise(self, flops: float):
    self.total += flops

  def data_movement(self, fwd: float, *, grad: bool = True, recompute: float = 0.0):
    """A matmul that only moves data, written as a matmul for the MXU: the one-hot lookup of per-segment
    rows (models/dit.py `per_token_rows`) and RoPE's pair swap (layers.apply_rope). Forward and one gradient
    (the table's, or the input's; none when it is frozen); executed work, not model FLOPs."""
    self.total += (1.0 + grad + recompute) * fwd


def remat_recompute(remat: str) -> tuple[float, float]:
  """(extra forwards of weight matmuls, of attention score matmuls) per layer under a remat policy
  (models/layers.py's REMAT table)."""
  policy = layers.REMAT[remat]
  return policy.weights_again, policy.scores_again


def _attention(c: _Counter, pairs: int, width: int, heads: int, ra: float):
  """Dense attention over `pairs` (query, key) pairs, all heads: q k^T and p v, and the masked softmax."""
  c.matmul(2 * pairs * width * 2, recompute=ra)  # q k^T and p v
  c.elementwise(heads * pairs * (SOFTMAX_FWD * (1 + ra) + SOFTMAX_BWD))


def attention_flops(pairs: float, width: int, heads: int, scores_again: float = 0.0) -> tuple[float, float]:
  """(model, total) FLOPs of dense attention over `pairs` (query, key) pairs, all heads and rows: q k^T
  and p v forward and backward, the masked softmax, and what remat runs again (`scores_again`)."""
  c = _Counter()
  _attention(c, pairs, width, heads, scores_again)
  return c.model, c.total


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One attention in every layer of a stack."""
  name: str       # "self" (video), "cross" (video to caption) or "text" (the caption encoder's own)
  kind: str       # "self" or "cross": whose kernel residuals a remat policy saves (layers.Remat)
  layers: int
  width: int
  heads: int

  def lengths(self, seq_len: int, text_len: int) -> tuple[int, int]:
    """(queries, keys) per row."""
    return {"self": (seq_len, seq_len), "cross": (seq_len, text_len), "text": (text_len, text_len)}[self.name]


def attention_calls(cfg_dit) -> list[AttentionCall]:
  """The attentions of a train step: the DiT's self- and cross-attention, the caption encoder's."""
  text_depth, text_width, text_heads = caption_encoder(cfg_dit)
  depth, width, heads = cfg_dit.depth, cfg_dit.width, cfg_dit.num_heads
  return [AttentionCall("self", "self", depth, width, heads),
          AttentionCall("cross", "cross", depth, width, heads),
          AttentionCall("text", "self", text_depth, text_width, text_heads)]


def caption_encoder(cfg_dit) -> tuple[int, int, int]:
  """(depth, width, heads) of the caption encoder trained inside the DiT; depth 0 for a frozen encoder
  whose features come precomputed (UMT5: not part of the train step)."""
  if cfg_dit.text_encoder == "caption":
    return int(cfg_dit.text_depth), int(cfg_dit.text_width), int(cfg_dit.text_heads)
  return 0, int(cfg_dit.text_dim), 1


def text_layer_flops(cfg_dit, b: int, lt: int) -> tuple[float, float]:
  c = _Counter()
  depth, wt, heads = caption_encoder(cfg_dit)
  if not depth:
    return 0.0, 0.0
  mt = TEXT_MLP_RATIO * wt
  rw, ra = remat_recompute(cfg_dit.remat)
  c.matmul(4 * 2 * b * lt * wt * wt, recompute=rw)            # q, k, v, o
  c.data_movement(2 * 2 * b * lt * wt * (wt // heads), recompute=rw)  # RoPE on q, k
  _attention(c, b * lt * lt, wt, heads, ra)
  c.matmul(2 * 2 * b * lt * wt * mt, recompute=rw)            # MLP up, down
  c.elementwise(b * lt * wt * (BLOCK_ELEMWISE_FWD * (1 + rw) + BLOCK_ELEMWISE_BWD))
  return c.model, c.total


def lora_targets(cfg) -> tuple[int, tuple[str, ...]]:
  """(rank, target patterns) of a LoRA config; rank 0 when every parameter trains."""
  rank = int(cfg.lora.rank or 0) if "lora" in cfg else 0
  return rank, tuple(cfg.lora.targets) if rank else ()


def dit_layer_flops(cfg_dit, b: int, l: int, lt: int, s: int, lora: tuple[int, tuple[str, ...]] = (0, ())
                    ) -> tuple[float, float]:
  """One block's FLOPs; `lora` = (rank, targets) freezes its weights and adds the adapters' matmuls."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  c = _Counter()
  w = cfg_dit.width
  m = cfg_dit.ffn_dim
  k = lt  # cross-attention keys: the captions
  rank, targets = lora
  trains = not rank  # the block's own weights (and, in full training, the text keys' input) get gradients
  rw, ra = remat_recompute(cfg_dit.remat)
  c.data_movement(2 * b * l * (s + 1) * 6 * w, grad=trains, recompute=rw)  # the six modulations per token
  c.data_movement(2 * 2 * b * l * w * (w // cfg_dit.num_heads), recompute=rw)  # RoPE on q, k
  c.matmul(4 * 2 * b * l * w * w, weight_grad=trains, recompute=rw)  # self-attention q, k, v, o
  _attention(c, b * l * l, w, cfg_dit.num_heads, ra)
  c.matmul(2 * 2 * b * l * w * w, weight_grad=trains, recompute=rw)  # cross q, o
  c.matmul(2 * 2 * b * k * w * w, input_grad=trains, weight_grad=trains, recompute=rw)  # cross k, v
  _attention(c, b * l * k, w, cfg_dit.num_heads, ra)
  c.matmul(2 * 2 * b * l * w * m, weight_grad=trains, recompute=rw)  # MLP
  c.elementwise(b * l * w * (BLOCK_ELEMWISE_FWD * (1 + rw) + BLOCK_ELEMWISE_BWD))
  # Adapters: (rows, in, out, reads the captions) of each projection; x A needs no input gradient where x
  # is the captions' projection (frozen under LoRA).
  shapes = {"attn/q": (l, w, w, False), "attn/k": (l, w, w, False), "attn/v": (l, w, w, False),
            "attn/o": (l, w, w, False), "cross/q": (l, w, w, False), "cross/k": (k, w, w, True),
            "cross/v": (k, w, w, True), "cross/o": (l, w, w, False), "mlp/up": (l, w, m, False),
            "mlp/down": (l, m, w, False)}
  for name, (rows, din, dout, captions) in shapes.items():
    if rank and any(fnmatch.fnmatchcase(f"blocks/{name}", t) for t in targets):
      c.matmul(2 * b * rows * din * rank, input_grad=not captions, recompute=rw)  # x A
      c.matmul(2 * b * rows * rank * dout, recompute=rw)                          # (x A) B
  return c.model, c.total


def dit_train_step_flops(cfg, *, batch: int, seq_len: int, text_len: int, num_segments: int,
                         num_params: int = 0) -> StepFlops:
  """FLOPs of one DiT train step on `batch` rows (global) of the config's shapes."""
  d = cfg.dit
  b, l, lt, s = batch, seq_len, text_len, num_segments
  w, din = d.width, d.in_dim
  text_depth, text_width, _ = caption_encoder(d)
  lora = lora_targets(cfg)
  trains = not lora[0]  # LoRA: no gradient reaches the frozen time and text paths or any base weight
  c = _Counter()
  c.matmul(2 * b * l * din * w, input_grad=False, weight_grad=trains)  # patch embedding
  c.matmul(2 * b * l * (din + 1) * w, input_grad=False, weight_grad=trains)  # conditioning path (always on)
  c.matmul(2 * (b * s + 1) * d.time_freq_dim * w, input_grad=False, weight_grad=trains)  # time MLP, per
  c.matmul(2 * (b * s + 1) * w * w, input_grad=trains, weight_grad=trains)  # segment and t = 0
  c.matmul(2 * (b * s + 1) * w * 6 * w, input_grad=trains, weight_grad=trains)  # shared time projection
  c.matmul(2 * b * lt * text_width * w, input_grad=text_depth > 0, weight_grad=trains)  # text projection,
  c.matmul(2 * b * lt * w * w, input_grad=trains, weight_grad=trains)                  # two layers
  c.matmul(2 * b * l * w * din, weight_grad=trains)            # output projection
  c.data_movement(2 * b * l * (s + 1) * 2 * w, grad=trains)    # final modulation rows looked up per token
  c.elementwise(OPTIMIZER_PER_PARAM * num_params)
  text_m, text_t = text_layer_flops(d, b, lt)
  dit_m, dit_t = dit_layer_flops(d, b, l, lt, s, lora)
  model = c.model + text_depth * text_m + d.depth * dit_m
  total = c.total + text_depth * text_t + d.depth * dit_t
  dense_pairs = {"self": b * l * l, "cross": b * l * lt, "text": b * lt * lt}
  return StepFlops(model=model, total=total, per_layer={"text": text_t, "dit": dit_t},
                   depths={"text": text_depth, "dit": d.depth},
                   model_attention=attention_model_flops(cfg, dense_pairs))


def attention_model_flops(cfg, pairs: dict) -> float:
  """Model FLOPs (forward + backward) of the attention matmuls over `pairs` (query, key) pairs:
  {"self": video self-attention, "cross": video to text, "text": caption self-attention}."""
  return sum(a.layers * attention_flops(pairs[a.name], a.width, a.heads)[0] for a in attention_calls(cfg.dit))


def useful_attention_pairs(batch: dict, dit_cfg=None) -> dict:
  """The (query, key) pairs a packed batch really needs: per segment, n^2 video pairs, n * (m + 1)
  video-to-caption pairs and m^2 caption pairs. With `dit_cfg` whose `attention_axes` factorise the
  self-attention, "self" is the mean over its blocks of the pairs inside each block's groups.

  Dense attention computes every pair of the row; MFU counts only these (so it does not reward
  computing masked pairs, and block-sparse kernels are not penalised for skipping them).
  """
  seg = np.asarray(batch["segment_ids"])
  tseg = np.asarray(batch["text_segment_ids"])
  s = int(max(seg.max(initial=0), tseg.max(initial=0))) + 1
  n = np.stack([np.bincount(r, minlength=s)[1:s] for r in seg]).astype(np.float64)
  m = np.stack([np.bincount(r, minlength=s)[1:s] for r in tseg]).astype(np.float64)
  self_pairs = float((n * n).sum())
  axes = tuple(dit_cfg.attention_axes) if dit_cfg is not None else ("full",)
  if set(axes) != {"full"}:
    ids = dit_lib.attention_axis_ids(np.asarray(batch["positions"]), seg.astype(np.int32))
    per_kind = [float(sum(np.square(np.bincount(r)[1:].astype(np.float64)).sum() for r in k)) for k in ids]
    kinds = [dit_lib.ATTENTION_AXES.index(axes[i % len(axes)]) for i in range(dit_cfg.depth)]
    self_pairs = float(np.mean([per_kind[k] for k in kinds]))
  return {"self": self_pairs, "cross": float((n * m).sum()), "text": float((m * m).sum())}


def compare_with_compiled(step: StepFlops, compiled_flops: float, num_devices: int, *,
                          scanned: bool) -> float:
  """cost_analysis() FLOPs (per device) over the hand count of the same step.

  `scanned`: the compiled step kept its layer scans, so compare with `once` (a rough check, see above);
  otherwise with `total` (the real check).
  """
  expected = (step.once if scanned else step.total) / num_devices
  return compiled_flops / expected if expected else float("nan")


# ------------------------------------------------------------------------------------ attention kernels
# XLA's cost model does not see inside Pallas kernels (custom calls), nor count the loops of context
# parallelism's local kernels more than once, so compile_check adds the attention that runs in kernels
# from this count: what `total` above counts for it (`in_flops_py_total`, to take out of the comparison
# with the compiler) and the matmul FLOPs the kernels execute at their padded lengths (`executed`).
# Matmuls an attention-kernel call executes, in units of one [L, L] x [L, d] product over all heads:
# forward QK^T and PV; backward, splash's fused kernel (QK^T, dO V^T, P^T dO, dS^T Q, dS K; whole or
# over query chunks) where `splash.layout` picks it, else separate dkv (QK^T, dO V^T, P^T dO,
# dS^T Q) and dq (QK^T, dO V^T, dS K) kernels, as the GPU kernels always run. The forward runs again in
# the backward pass unless the remat policy saves its residuals (layers.Remat.kernels_once).
KERNEL_FWD_MATMULS = 2
KERNEL_BWD_MATMULS = {"fused": 5, "separate": 7}


@dataclasses.dataclass
class KernelFlops:
  """Attention inside kernels, for the whole slice: this module's count of it, and what runs."""
  in_flops_py_total: float  # what `total` counts for these attentions (matmuls + softmax)
  executed: float           # matmul FLOPs the kernels actually execute


def _splash_layout(cfg, lq: int, lk: int, width: int, heads: int):
  """`splash.layout` of one attention call, with heads per device (the `tensor` mesh axis shards them)."""
  from sora_jax.kernels import splash  # pylint: disable=g-import-not-at-top  (Pallas TPU ops)
  tensor = int(cfg.mesh.tensor) if "mesh" in cfg else 1
  local_heads = heads // tensor if tensor > 1 and heads % tensor == 0 else heads
  return splash.layout(lq, lk, local_heads, width // heads,
                       itemsize=jnp.dtype(cfg.dit.dtype).itemsize)


def kernel_bwd_matmuls(cfg, lq: int, lk: int, width: int, heads: int) -> int:
  """Backward matmuls of one attention-kernel call: 5 where splash runs its fused kernel for these
  shapes (`splash.layout`), else 7 (the GPU kernels)."""
  if cfg.dit.attention != "splash":
    return KERNEL_BWD_MATMULS["separate"]
  return KERNEL_BWD_MATMULS["fused" if _splash_layout(cfg, lq, lk, width, heads).fused else "separate"]


def _padded_lengths(cfg, lq: int, lk: int, width: int, heads: int) -> tuple[int, int]:
  """(queries, keys) an attention kernel computes with, padding included."""
  if cfg.dit.attention == "gpu":
    from sora_jax.kernels import gpu  # pylint: disable=g-import-not-at-top  (imports Triton)
    return -(-lq // gpu.BLOCK) * gpu.BLOCK, -(-lk // gpu.BLOCK) * gpu.BLOCK
  lay = _splash_layout(cfg, lq, lk, width, heads)
  return lay.chunk_len * lay.chunks, lay.lk_padded


# Attentions whose work XLA's cost model does not count: Pallas kernels (custom calls), and context
# parallelism's ring and all-to-all attention (dit.context), whose local kernels (and the ring's hops)
# are loops counted once per body. The latter are counted as splash calls of the same shapes (as
# bench/context_parallel.py first did): a minute-long row's self-attention takes splash's separate
# backward kernels (7 matmuls), and the cross-attention's local kernel is splash on a TPU host.
KERNEL_ATTENTIONS = ("splash", "gpu")


def kernel_flops(cfg, *, batch: int, seq_len: int, text_len: int, num_segments: int) -> KernelFlops:
  """Attention FLOPs of every kernel call in the step (DiT self and cross, text self), dense per row."""
  del num_segments  # the kernels' keys are the caption's text_len (segments are not keys)
  ulysses = _ulysses_shards(cfg)
  if cfg.dit.context != "none":
    cfg = cfg.copy_and_resolve_references()
    cfg.dit.attention, cfg.dit.context = "splash", "none"
  if cfg.dit.attention not in KERNEL_ATTENTIONS:
    return KernelFlops(0.0, 0.0)
  remat = layers.REMAT[cfg.dit.remat]
  tensor = sharding.mesh_sizes(cfg.mesh)["tensor"] if "mesh" in cfg else 1
  counted = executed = 0.0
  for a in attention_calls(cfg.dit):
    lq, lk = a.lengths(seq_len, text_len)
    counted += a.layers * attention_flops(batch * lq * lk, a.width, a.heads, remat.scores_again)[1]
    rerun = 0.0 if a.kind in remat.kernels_once else 1.0  # what the kernels recompute
    # Ulysses runs the local kernel over the whole row for heads / n of the heads on each of n devices
    # (self-attentions whose heads per device it divides, as models/attention.py decides): the kernel's
    # layout (query chunks, padding) is that of the fewer heads; the FLOPs per head are the same.
    local_heads = a.heads // tensor if a.heads % tensor == 0 else a.heads
    split = ulysses if lq == lk and a.kind == "self" and local_heads % ulysses == 0 else 1
    shape = (lq, lk, a.width // split, a.heads // split)
    unit_pad = 2.0 * batch * math.prod(_padded_lengths(cfg, *shape)) * a.width
    executed += a.layers * unit_pad * (KERNEL_FWD_MATMULS * (1 + rerun) + kernel_bwd_matmuls(cfg, *shape))
  return KernelFlops(counted, executed)


def _ulysses_shards(cfg) -> int:
  """The devices one row's sequence is split over when its attention is all-to-all (dit.context =
  "ulysses"; the `sequence` or `context` mesh axis, sora_jax/sharding.py), else 1."""
  if cfg.dit.context != "ulysses" or "mesh" not in cfg:
    return 1
  sizes = sharding.mesh_sizes(cfg.mesh)
  return max(sizes["sequence"], sizes["context"], 1)


# ------------------------------------------------------------------------------------------------ peaks
def published_peak(device: jax.Device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


@functools.lru_cache(maxsize=None)
def measure_cpu_peak(dtype: str = "bfloat16", n: int = 1024, seconds: float = 1.0) -> float:
  """Best matmul FLOP/s of this process's CPU: [n, n] x [n, n], `dtype` inputs, float32 accumulation
  (how the models' Dense layers run), over about `seconds` of repeats."""
  dt = jnp.dtype(dtype)
  dev = jax.local_devices(backend="cpu")[0]  # this process's own: multi-process CPU jobs see all
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt), dev)

  @jax.jit
  def chain(x):
    for _ in range(4):  # several matmuls per call amortise dispatch
      x = jnp.matmul(x, a, preferred_element_type=jnp.float32).astype(dt)
    return x

  chain(a).block_until_ready()
  best, spent = 0.0, 0.0
  while spent < seconds:
    t0 = time.perf_counter()
    chain(a).block_until_ready()
    dt_s = time.perf_counter() - t0
    spent += dt_s
    best = max(best, 4 * 2 * n**3 / dt_s)
  return best


def peak_flops(devices, dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where the figure comes from).

  CPU devices (real or fake) share one host: the measured host peak is the peak of them all.
  """
  devices = list(devices)
  if devices[0].platform == "cpu":
    return measure_cpu_peak(str(dtype)), f"measured in-process ({dtype} matmul, f32 accumulation)"
  peak = published_peak(devices[0])
  if peak is None:
    raise ValueError(f"no published peak for device kind {devices[0].device_kind!r}; known: "
                     f"{[k for k, _ in PEAK_FLOPS]}")
  return peak * len(devices), f"published dense bf16 peak of {devices[0].device_kind}"


def iterations_per_trip(length: int, per_trip: int) -> int:
  """Loop iterations `unrolled_scans(per_trip)` puts in one trip of a scan of `length` iterations: the
  smallest divisor of `length` that is at least `per_trip` (so the trips are equal), `length` itself
  when there is none (fully unrolled)."""
  if per_trip <= 1 or length <= 1:
    return max(min(per_trip, length), 1)
  return next(k for k in range(per_trip, length + 1) if length % k == 0)


@contextlib.contextmanager
def unrolled_scans(per_trip: int = 0):
  """Traces every `jax.lax.scan` unrolled, so `cost_analysis()` counts its iterations: fully (the
  default), or `iterations_per_trip(length, per_trip)` iterations per loop trip.

  Only for cost estimates: an unrolled step compiles several times slower (docs/hazards.md) but runs the same
  arithmetic. With two iterations per trip the loop body holds two layers, so the cost model's count of
  the body (once, docs/hazards.md) grows by exactly one layer over the scanned step's (compile_check). nnx.scan
  looks `jax.lax.scan` up at call time, which is what this swaps; `lax.map` (splash's rows and query
  chunks) calls its own module's scan and stays a loop. Remat keeps its recomputation apart meanwhile
  (layers.remat_kept_apart): unrolled, XLA would merge it into the forward pass, which the scanned step
  cannot.
  """
  original = jax.lax.scan

  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
    del unroll
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    k = iterations_per_trip(n, per_trip) if per_trip else True
    return original(f, init, xs, length=length, reverse=reverse, unroll=k, **kwargs)

  jax.lax.scan = scan
  try:
    with layers.remat_kept_apart():  # unrolled, XLA would merge remat's recomputation into the forward
      yield
  finally:
    jax.lax.scan = original
