"""The video compression network: a causal 3D-convolution VAE over pixels in [-1, 1], channels-last.

Images and videos share one latent space: convolutions are causal in time (padded only on the past
side), so frame 0 is encoded alone and a one-frame video is an image. `T = 1 + ft*k` frames become
`1 + k` latent frames, `H, W` shrink by the spatial factor.

The layout mirrors the Wan 2.1 video VAE (diffusers' `AutoencoderKLWan`) so that its weights can be
loaded by renaming: `encoder.{conv_in, down_blocks[i], mid_block, norm_out, conv_out}`, `quant_conv`,
`post_quant_conv`, `decoder.{conv_in, mid_block, up_blocks[i].{resnets, upsamplers}, norm_out,
conv_out}`; residual blocks hold `norm1, conv1, norm2, conv2, conv_shortcut`; resamplers hold
`resample` (a per-frame 2D conv) and `time_conv`. Conv kernels are `[kt, kh, kw, in, out]` (torch's
`[out, in, kt, kh, kw]` transposed). The Wan 2.1 config is `base_dim=96, dim_mult=(1, 2, 4, 4),
num_res_blocks=2, z_dim=16, temporal_downsample=(False, True, True)`.

Long videos are encoded and decoded in chunks (frame 0, then `ft` frames / one latent frame at a
time): every causal conv carries its last input frames from chunk to chunk, so the result equals the
full-sequence computation and memory stays flat in video length. Frames above a pixel budget are
tiled spatially with linear blending over the overlaps.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

CONV_DIMS = ("NDHWC", "DHWIO", "NDHWC")
CONV2D_DIMS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class VAESettings:
  """The VAE section of a config (`cfg.vae`), with Wan 2.1's values as defaults."""
  base_dim: int = 96
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_dim: int = 16
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  patch_size: int = 1            # pixel-unshuffle before the encoder (and shuffle after the decoder)
  in_channels: int = 3
  dtype: str = "float32"         # compute dtype; parameters stay float32
  decoder_base_dim: int = 0      # 0 = base_dim
  logvar_init: float = -6.0      # initial posterior log-variance (quant_conv's bias)
  norm: str = "rms"              # "rms" (Wan: x / ||x|| * sqrt(C) * gamma) or "none" (x * gamma)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(t) for t in self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1) * self.patch_size

  def latent_frames(self, num_frames: int) -> int:
    return 1 + (num_frames - 1) // self.temporal_factor


_FIELDS = {f.name for f in dataclasses.fields(VAESettings)}


def settings(cfg: Any) -> VAESettings:
  """VAESettings from a ConfigDict / dict / VAESettings; keys outside the VAE's are ignored."""
  if isinstance(cfg, VAESettings):
    return cfg
  items = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  kw = {k: v for k, v in items.items() if k in _FIELDS}
  for k in ("dim_mult", "temporal_downsample"):
    if k in kw:
      kw[k] = tuple(kw[k])
  s = VAESettings(**kw)
  if len(s.temporal_downsample) != len(s.dim_mult) - 1:
    raise ValueError(f"vae.temporal_downsample={list(s.temporal_downsample)} must have "
                     f"len(dim_mult) - 1 = {len(s.dim_mult) - 1} entries")
  if s.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"vae.dtype={s.dtype!r}; accepted: 'float32', 'bfloat16'")
  if s.norm not in ("rms", "none"):
    raise ValueError(f"vae.norm={s.norm!r}; accepted: 'rms', 'none'")
  if s.patch_size < 1:
    raise ValueError(f"vae.patch_size={s.patch_size}; must be >= 1")
  return s


def conv3d(x, kernel, t_stride: int = 1):
  """A 3D conv, VALID (strided) in time and SAME in space: `[B, T, H, W, I] x [kt, kh, kw, I, O]`.

  XLA:CPU runs 3D convolutions several times slower than the same work done as one 2D conv per
  temporal tap (docs/benchmarks.md, "VAE"), so on CPU it is computed that way; TPU
  and GPU get the native 3D conv. Both forms are the same sum, checked by tests/test_vae.py.
  """
  if jax.default_backend() != "cpu":
    return _conv3d_native(x, kernel, t_stride)
  return _conv3d_as_2d(x, kernel, t_stride)


def _conv3d_native(x, kernel, t_stride: int = 1):
  kh, kw = kernel.shape[1:3]
  return jax.lax.conv_general_dilated(
      x, kernel, (t_stride, 1, 1), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=CONV_DIMS)


def _conv3d_as_2d(x, kernel, t_stride: int = 1):
  kt, kh, kw = kernel.shape[:3]
  b, t, h, w, _ = x.shape
  t_out = (t - kt) // t_stride + 1
  y = None
  for i in range(kt):
    xi = x[:, i:i + t_stride * (t_out - 1) + 1:t_stride]
    if kh == kw == 1:
      yi = jnp.einsum("bthwi,io->bthwo", xi, kernel[i, 0, 0])
    else:
      yi = jax.lax.conv_general_dilated(
          xi.reshape(b * t_out, h, w, -1), kernel[i], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
          dimension_numbers=CONV2D_DIMS).reshape(b, t_out, h, w, -1)
    y = yi if y is None else y + yi
  return y


# ----------------------------------------------------------------------------------------------
# The stream: per-chunk caches of every causal layer, visited in a fixed order.


class _Stream:
  """Carries each causal layer's past input frames between chunks.

  `past` is the list left by the previous chunk (None for the chunk that holds frame 0, where the
  past is zeros); layers call `take()` then `give(new)` once each, in the same order every chunk.
  `first` marks the chunk that starts at frame 0 (full-sequence calls are such a chunk).
  """

  def __init__(self, past: list | None, first: bool):
    self.past, self.first, self.out = past, first, []

  def take(self):
    """The past of the calling layer."""
    return None if self.past is None else self.past[len(self.out)]

  def give(self, cache) -> None:
    self.out.append(cache)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names, *, zero: bool = False) -> nnx.Param:
  """A conv kernel: truncated-normal fan-in init (or zeros), annotated with logical axis names.

  Drawn with numpy from a seed taken off `rngs`: initialising a few hundred kernels with jax.random
  means either hundreds of eager compilations or one huge threefry program, minutes on a busy CPU.
  Under a trace (jit, eval_shape) the key has no value, so jax.random draws instead.
  """
  key = rngs.params()
  scale = 1.0 / math.sqrt(math.prod(shape[:-1]))
  if zero:
    value = jnp.zeros(shape, jnp.float32)
  elif isinstance(key, jax.core.Tracer):
    value = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * (scale / 0.87962566)
  else:
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    normal = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    # std 1/sqrt(fan_in) after truncation at two standard deviations (its std is 0.8796).
    value = jnp.asarray(np.clip(normal, -2, 2) * (scale / 0.87962566))
  return nnx.Param(value, sharding_names=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Normalises each position over channels only (Wan's RMS_norm): per frame, so chunking is exact.

  `norm="none"` keeps the gamma (the same parameters, so weights convert either way) but skips the
  normalisation. A per-position norm throws away each pixel's feature magnitude: at a small width and
  a short budget the VAE then has to re-encode brightness in directions, and learns about twice as
  slowly (docs/history.md, Issue 3). Zero-initialised residual branches keep a norm-free stack stable.
  """

  def __init__(self, dim: int, norm: str = "rms", *, rngs: nnx.Rngs):
    del rngs
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.dim, self.normalize = dim, norm == "rms"

  def __call__(self, x):
    if not self.normalize:
      return x * self.gamma[...].astype(x.dtype)
    xf = x.astype(jnp.float32)
    # x / ||x|| * sqrt(C), as torch's F.normalize(eps=1e-12): a zero vector stays zero.
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, 1e-12) * math.sqrt(self.dim) * self.gamma[...]
    return y.astype(x.dtype)


class CausalConv3d(nnx.Module):
  """3D conv padded by `kt - 1` past frames (zeros at frame 0, cached frames in later chunks)."""

  def __init__(self, in_dim: int, out_dim: int, kernel: int | Sequence[int] = 3, *,
               zero_init: bool = False, rngs: nnx.Rngs):
    kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    self.kernel_size = (kt, kh, kw)
    self.kernel = _param(rngs, (kt, kh, kw, in_dim, out_dim),
                         (None, None, None, "conv_in", "conv_out"), zero=zero_init)
    self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32))

  def __call__(self, x, stream: _Stream | None = None):
    kt = self.kernel_size[0]
    if kt > 1:
      if stream is None:  # a stand-alone full-sequence call
        stream = _Stream(None, True)
      past = stream.take()
      if past is None:
        past = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
      x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
      stream.give(x[:, -(kt - 1):])
    y = conv3d(x, self.kernel[...].astype(x.dtype))
    return y + self.bias[...].astype(y.dtype)


class Conv2d(nnx.Module):
  """A per-frame 2D conv over `[B, T, H, W, C]` (the resamplers' spatial convs)."""

  def __init__(self, in_dim: int, out_dim: int, kernel: int = 3, *, rngs: nnx.Rngs):
    self.kernel = _param(rngs, (kernel, kernel, in_dim, out_dim), (None, None, "conv_in", "conv_out"))
    self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32))

  def __call__(self, x, *, stride: int = 1, padding="SAME"):
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]), self.kernel[...].astype(x.dtype), (stride, stride), padding,
        dimension_numbers=CONV2D_DIMS)
    y = y + self.bias[...].astype(y.dtype)
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nnx.Module):
  """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut; starts as the identity."""

  def __init__(self, in_dim: int, out_dim: int, norm: str = "rms", *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, norm, rngs=rngs)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, rngs=rngs)
    self.norm2 = RMSNorm(out_dim, norm, rngs=rngs)
    # Zero-initialised so each block starts as its shortcut: deep stacks train fast from step 0.
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, zero_init=True, rngs=rngs)
    self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, rngs=rngs) if in_dim != out_dim else None

  def __call__(self, x, stream: _Stream):
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), stream)
    x = self.conv2(jax.nn.silu(self.norm2(x)), stream)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the positions of each frame (never across time: stays causal)."""

  def __init__(self, dim: int, norm: str = "rms", *, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, norm, rngs=rngs)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, rngs=rngs)
    self.proj = Conv2d(dim, dim, 1, rngs=rngs)
    self.proj.kernel[...] = jnp.zeros_like(self.proj.kernel[...])

  def __call__(self, x, stream: _Stream | None = None):
    del stream
    b, t, h, w, c = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(b, t, h, w, c)
    return x + self.proj(y)


class MidBlock(nnx.Module):
  def __init__(self, dim: int, norm: str = "rms", *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, norm, rngs=rngs),
                             ResidualBlock(dim, dim, norm, rngs=rngs)])
    self.attentions = nnx.List([AttentionBlock(dim, norm, rngs=rngs)])

  def __call__(self, x, stream: _Stream):
    x = self.resnets[0](x, stream)
    x = self.attentions[0](x)
    return self.resnets[1](x, stream)


class Resample(nnx.Module):
  """2x spatial down/up-sampling per frame, and for the "3d" modes 2x in time as well.

  downsample3d: `time_conv` (kernel 3, stride 2, no padding) over frames [2j, 2j+1, 2j+2] gives
  output frame j+1; frame 0 passes through. upsample3d: `time_conv` (kernel 3, causal, 2*dim
  outputs) turns every latent frame after frame 0 into two frames; frame 0 stays one frame, and
  frame 0 is never in that conv's past (as in Wan, whose cache for it starts from zeros).
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, *, out_dim: int | None = None, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"resample mode {mode!r}; accepted: {list(self.MODES)}")
    self.mode = mode
    # The temporal convs start as plain resampling in time: frame 0 bypasses them, so with a random
    # init every later frame would sit behind two random projections that frame 0 does not have, and
    # the VAE learns later frames far more slowly (docs/history.md, Issue 3).
    eye = jnp.eye(dim, dtype=jnp.float32)
    if mode.startswith("down"):
      self.resample = Conv2d(dim, dim, 3, rngs=rngs)
      if mode == "downsample3d":
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), rngs=rngs)
        # Latent frame j+1 = mean of frames 2j+1 and 2j+2 (the two new frames it covers).
        self.time_conv.kernel[...] = jnp.stack([0 * eye, 0.5 * eye, 0.5 * eye])[:, None, None]
    else:
      self.resample = Conv2d(dim, out_dim or dim // 2, 3, rngs=rngs)
      if mode == "upsample3d":
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs)
        # Both output frames copy the current latent frame (nearest-neighbour in time).
        both = jnp.concatenate([eye, eye], axis=1)
        self.time_conv.kernel[...] = jnp.stack([0 * both, 0 * both, both])[:, None, None]

  def _time_down(self, x, stream: _Stream):
    conv = self.time_conv
    if stream.first:
      head, past = x[:, :1], None
    else:
      head, past = x[:, :0], stream.take()
    stream.give(x[:, -1:])
    seq = x if past is None else jnp.concatenate([past.astype(x.dtype), x], axis=1)
    if seq.shape[1] < 3:
      return head
    if (seq.shape[1] - 1) % 2:
      raise ValueError(f"temporal downsampling got a chunk of {x.shape[1]} frames; chunks after "
                       "frame 0 need an even number of frames at every temporal level")
    y = conv3d(seq, conv.kernel[...].astype(x.dtype), 2)
    y = y + conv.bias[...].astype(y.dtype)
    return jnp.concatenate([head, y], axis=1)

  def _time_up(self, x, stream: _Stream):
    head, rest = (x[:, :1], x[:, 1:]) if stream.first else (x[:, :0], x)
    past = stream.take()
    if past is None:
      past = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
    if rest.shape[1] == 0:
      stream.give(past)
      return head
    seq = jnp.concatenate([past.astype(x.dtype), rest], axis=1)
    stream.give(seq[:, -2:])
    conv = self.time_conv
    y = conv3d(seq, conv.kernel[...].astype(x.dtype))
    y = y + conv.bias[...].astype(y.dtype)
    b, t, h, w, c2 = y.shape
    # Channels [:C] are the earlier of the two frames, [C:] the later (Wan's interleaving).
    y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)
    return jnp.concatenate([head, y], axis=1)

  def __call__(self, x, stream: _Stream):
    if self.mode == "upsample3d":
      x = self._time_up(x, stream)
    if self.mode.startswith("up"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      x = self.resample(x)
    else:
      # Pad bottom/right by one, then a stride-2 VALID conv (Wan's ZeroPad2d((0, 1, 0, 1))).
      x = self.resample(x, stride=2, padding=((0, 1), (0, 1)))
    if self.mode == "downsample3d":
      x = self._time_down(x, stream)
    return x


class Encoder(nnx.Module):
  def __init__(self, s: VAESettings, *, rngs: nnx.Rngs):
    dims = [s.base_dim * m for m in (1, *s.dim_mult)]
    self.conv_in = CausalConv3d(s.in_channels * s.patch_size ** 2, dims[0], 3, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(s.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, s.norm, rngs=rngs))
        in_dim = out_dim
      if i != len(s.dim_mult) - 1:
        mode = "downsample3d" if s.temporal_downsample[i] else "downsample2d"
        blocks.append(Resample(out_dim, mode, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], s.norm, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], s.norm, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * s.z_dim, 3, rngs=rngs)

  def __call__(self, x, stream: _Stream):
    x = self.conv_in(x, stream)
    for block in self.down_blocks:
      x = block(x, stream)
    x = self.mid_block(x, stream)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


class UpBlock(nnx.Module):
  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None,
               norm: str = "rms", *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(in_dim if j == 0 else out_dim, out_dim, norm, rngs=rngs)
                             for j in range(num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(out_dim, mode, rngs=rngs)] if mode else [])

  def __call__(self, x, stream: _Stream):
    for r in self.resnets:
      x = r(x, stream)
    for u in self.upsamplers:
      x = u(x, stream)
    return x


class Decoder(nnx.Module):
  def __init__(self, s: VAESettings, *, rngs: nnx.Rngs):
    base = s.decoder_base_dim or s.base_dim
    dims = [base * m for m in (s.dim_mult[-1], *s.dim_mult[::-1])]
    temporal_up = tuple(s.temporal_downsample[::-1])
    self.conv_in = CausalConv3d(s.z_dim, dims[0], 3, rngs=rngs)
    self.mid_block = MidBlock(dims[0], s.norm, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim //= 2  # the previous upsampler's conv halves the channels (Wan 2.1)
      mode = None
      if i != len(s.dim_mult) - 1:
        mode = "upsample3d" if temporal_up[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, s.num_res_blocks, mode, s.norm, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], s.norm, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], s.in_channels * s.patch_size ** 2, 3, rngs=rngs)

  def __call__(self, z, stream: _Stream):
    x = self.conv_in(z, stream)
    x = self.mid_block(x, stream)
    for block in self.up_blocks:
      x = block(x, stream)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


def _patchify(x, p: int):
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h // p, w // p, p * p * c)


def _unpatchify(x, p: int):
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h, w, p, p, c // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h * p, w * p, c // (p * p))


class VAE(nnx.Module):
  """The causal video VAE: `encode(x) -> (mean, logvar)`, `decode(z) -> x`, and chunked forms.

  `x` is `[B, T, H, W, C]` in [-1, 1] with T = 1 + ft*k and H, W multiples of the spatial factor;
  latents are `[B, 1 + k, H / fs, W / fs, z_dim]`. `decode` is not clipped (losses need the raw
  output); clip to [-1, 1] before turning it into pixels.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    self.settings = s = settings(cfg)
    self.encoder = Encoder(s, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * s.z_dim, 2 * s.z_dim, 1, rngs=rngs)
    # A posterior that starts with unit variance buries the signal in sampling noise and the decoder
    # learns to blur; starting narrow lets reconstruction lead, and the KL term widens it as it pays.
    self.quant_conv.bias[...] = jnp.concatenate([jnp.zeros((s.z_dim,)),
                                                 jnp.full((s.z_dim,), s.logvar_init)])
    self.post_quant_conv = CausalConv3d(s.z_dim, s.z_dim, 1, rngs=rngs)
    self.decoder = Decoder(s, rngs=rngs)

  @property
  def dtype(self):
    return jnp.dtype(self.settings.dtype)

  def check_video(self, x) -> None:
    """Raises one line naming the bad shape if `x` is not a `[B, 1 + ft*k, H, W, C]` video on the grid."""
    s = self.settings
    if x.ndim != 5 or x.shape[-1] != s.in_channels:
      raise ValueError(f"VAE input shape {tuple(x.shape)}: expected [B, T, H, W, {s.in_channels}]")
    t, h, w = x.shape[1:4]
    if t < 1 or (t - 1) % s.temporal_factor:
      raise ValueError(f"VAE input has {t} frames; accepted: 1 + {s.temporal_factor}*k")
    if h % s.spatial_factor or w % s.spatial_factor or h == 0 or w == 0:
      raise ValueError(f"VAE input is {h}x{w}; height and width must be positive multiples of "
                       f"{s.spatial_factor}")

  # --- streaming cores: one chunk, given the previous chunk's caches.
  def _encode_stream(self, x, stream: _Stream):
    h = self.encoder(_patchify(x.astype(self.dtype), self.settings.patch_size), stream)
    h = self.quant_conv(h).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _decode_stream(self, z, stream: _Stream):
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)), stream)
    return _unpatchify(x, self.settings.patch_size).astype(jnp.float32)

  # --- full-sequence forms (training).
  def encode(self, x):
    self.check_video(x)
    return self._encode_stream(x, _Stream(None, True))

  def decode(self, z):
    return self._decode_stream(z, _Stream(None, True))

  def __call__(self, x, *, key: jax.Array | None = None):
    """Returns (reconstruction, mean, logvar); samples the posterior when `key` is given."""
    mean, logvar = self.encode(x)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return self.decode(z), mean, logvar

  # --- chunked and tiled forms (inference on long or large videos).
  def encode_chunked(self, x, *, max_tile_pixels: int = 0, tile_overlap: float = 0.25):
    """`encode` computed frame 0 first, then `ft` frames at a time; tiled if H*W > max_tile_pixels."""
    x = jnp.asarray(x)
    self.check_video(x)
    s = self.settings
    graphdef, state = nnx.split(self)
    fn = lambda xt: _chunked(graphdef, state, xt, s.temporal_factor, encode=True)
    return _tiled(fn, x, s.spatial_factor, 1.0 / s.spatial_factor, max_tile_pixels, tile_overlap,
                  n_out=2)

  def decode_chunked(self, z, *, max_tile_pixels: int = 0, tile_overlap: float = 0.25):
    """`decode` one latent frame at a time; tiled (in latent units) if the output frame is too big."""
    z = jnp.asarray(z)
    s = self.settings
    graphdef, state = nnx.split(self)
    fn = lambda zt: (_chunked(graphdef, state, zt, 1, encode=False),)
    budget = max_tile_pixels // s.spatial_factor ** 2 if max_tile_pixels else 0
    return _tiled(fn, z, 1, float(s.spatial_factor), budget, tile_overlap, n_out=1)[0]


def kl_divergence(mean, logvar):
  """KL(q(z|x) || N(0, I)) summed over latent elements, per example: `[B]`."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------------------------
# Chunked and tiled drivers.


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _stream_step(graphdef, state, x, past, first: bool, encode: bool):
  vae = nnx.merge(graphdef, state)
  stream = _Stream(past, first)
  out = vae._encode_stream(x, stream) if encode else (vae._decode_stream(x, stream),)
  return out, stream.out


def _chunked(graphdef, state, x, chunk: int, *, encode: bool):
  """Frame 0, then `chunk` frames at a time, carrying every causal layer's cache between calls."""
  pieces = [x[:, :1]] + [x[:, s:s + chunk] for s in range(1, x.shape[1], chunk)]
  outs, past = [], None
  for k, piece in enumerate(pieces):
    out, past = _stream_step(graphdef, state, piece, past, k == 0, encode)
    outs.append(out)
  n = len(outs[0])
  joined = tuple(jnp.concatenate([o[i] for o in outs], axis=1) for i in range(n))
  return joined if encode else joined[0]


def _ramp(n: int, overlap_before: int, overlap_after: int) -> np.ndarray:
  w = np.ones(n, np.float32)
  if overlap_before:
    w[:overlap_before] = (np.arange(overlap_before) + 1) / (overlap_before + 1)
  if overlap_after:
    w[n - overlap_after:] = np.minimum(w[n - overlap_after:],
                                       (np.arange(overlap_after)[::-1] + 1) / (overlap_after + 1))
  return w


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
  if size <= tile:
    return [0]
  starts = list(range(0, size - tile, step)) + [size - tile]
  return sorted(set(starts))


def _tiled(fn: Callable, x, unit: int, scale: float, max_pixels: int, overlap: float, n_out: int):
  """Applies `fn` to overlapping spatial tiles of `x` and blends the outputs linearly.

  Tiles are multiples of `unit` input pixels; an input tile of size n maps to n*scale outputs.
  Without a budget (or a frame under it) it is just `fn(x)`.
  """
  h, w = x.shape[2:4]
  if not max_pixels or h * w <= max_pixels:
    return fn(x)
  side = max(unit, int(math.sqrt(max_pixels)) // unit * unit)
  tile_h = min(h, side)
  tile_w = min(w, max(unit, max_pixels // tile_h // unit * unit))
  step_h = max(unit, int(tile_h * (1 - overlap)) // unit * unit)
  step_w = max(unit, int(tile_w * (1 - overlap)) // unit * unit)
  out_h, out_w = int(round(h * scale)), int(round(w * scale))
  acc, wsum = None, np.zeros((out_h, out_w), np.float32)
  rows, cols = _tile_starts(h, tile_h, step_h), _tile_starts(w, tile_w, step_w)
  for i in rows:
    for j in cols:
      outs = fn(x[:, :, i:i + tile_h, j:j + tile_w])
      oi, oj = int(round(i * scale)), int(round(j * scale))
      th, tw = outs[0].shape[2:4]
      # Ramps only on the sides that overlap a neighbour, so frame borders keep full weight.
      ov_top = (th - int(round(step_h * scale))) if i > rows[0] else 0
      ov_bot = (th - int(round(step_h * scale))) if i < rows[-1] else 0
      ov_left = (tw - int(round(step_w * scale))) if j > cols[0] else 0
      ov_right = (tw - int(round(step_w * scale))) if j < cols[-1] else 0
      wt = np.outer(_ramp(th, max(ov_top, 0), max(ov_bot, 0)), _ramp(tw, max(ov_left, 0),
                                                                      max(ov_right, 0)))
      if acc is None:
        acc = [np.zeros((o.shape[0], o.shape[1], out_h, out_w, o.shape[-1]), np.float32)
               for o in outs]
      for a, o in zip(acc, outs):
        a[:, :, oi:oi + th, oj:oj + tw] += np.asarray(o, np.float32) * wt[None, None, :, :, None]
      wsum[oi:oi + th, oj:oj + tw] += wt
  return tuple(jnp.asarray(a / wsum[None, None, :, :, None]) for a in acc[:n_out])


# ----------------------------------------------------------------------------------------------
# Optional adversarial loss: a 3D patch discriminator (hinge), used by train_vae after a warm-up.


class PatchDiscriminator3D(nnx.Module):
  """Judges overlapping spacetime patches as real or reconstructed; returns logits `[B, t, h, w]`."""

  def __init__(self, dim: int = 32, num_layers: int = 3, in_channels: int = 3, *, rngs: nnx.Rngs):
    convs, in_dim = [], in_channels
    for i in range(num_layers):
      out_dim = dim * 2 ** i
      convs.append(nnx.Conv(in_dim, out_dim, (3, 4, 4), strides=(1, 2, 2) if i == 0 else (2, 2, 2),
                            padding="SAME", rngs=rngs))
      in_dim = out_dim
    self.convs = nnx.List(convs)
    self.norms = nnx.List([nnx.GroupNorm(dim * 2 ** i, num_groups=min(8, dim * 2 ** i), rngs=rngs)
                           for i in range(1, num_layers)])
    self.head = nnx.Conv(in_dim, 1, (3, 3, 3), padding="SAME", rngs=rngs)

  def __call__(self, x):
    h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
    for conv, norm in zip(self.convs[1:], self.norms):
      h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
    return self.head(h)[..., 0]


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  return -jnp.mean(logits_fake)
