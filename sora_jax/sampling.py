"""Sampling: turn captions (and optional image/video prompts) into videos of any size and duration.

The generator the evaluator and the CLI call:

    videos = sampling.generate(models, requests, *, seed=0, steps=None, guidance=None, sampler=None,
                               row_len=None, rows_per_call=8, index_offset=0, progress=False)
    # models: sora_jax.bundle.load(path) / load_workdir(W), or a Pipeline
    # requests: [(caption, num_frames, height, width), ...] or Requests (image/video conditioning)
    # -> list of uint8 numpy arrays [num_frames, height, width, 3], in request order

steps, guidance, sampler and row_len default to the model config's `sample` section. Request i's
noise is drawn from `fold_in(PRNGKey(seed), index_offset + i)`, so a request's video does not depend on
what else it was packed with, unless the Request brings its own (`Request.noise`, the sample CLI's
--noise); `sample_latents` is the same without decoding.

How it works:
- Every request becomes a latent grid of spacetime patches (`Geometry` checks the size: frame counts 1 or
  1 + ft*k up to 481, heights and widths on the patch grid; otherwise one line naming the value and
  what is accepted). `check_size` bounds it: at most `max_tokens` patch tokens (the DiT's training row),
  and a decode that fits this machine's memory; otherwise one line saying the limit.
- Packed inference: requests are packed first-fit-decreasing into rows of `row_len` tokens (NaViT style,
  as in training) and denoised together, one diffusion time per segment (each segment keeps its own
  time-shifted schedule), so several small prompts share one model call per step. Packed output equals
  one-by-one output up to float rounding (tests/test_sampling.py).
- Samplers: Euler, Heun and UniPC (diffusers' UniPCMultistepScheduler for flow prediction; settings in
  the optional `sample.unipc` section, default Wan 2.1's) on the rectified-flow ODE; DDIM (deterministic)
  and DDPM (ancestral) for the DDPM objective. The solver maths and the grids are in samplers.py.
- Time grids (`sample.time_grid`): "uniform" (the default: linspace(1, 0) under the training's time shift,
  `diffusion.time_shift`, which by default grows with each segment's token count), or diffusers'
  "flow_match" (FlowMatchEulerDiscreteScheduler) and "unipc" (UniPCMultistepScheduler), which with
  `diffusion.shift_rule = "constant"` and `shift_scale = 3.0` are the grids of Wan 2.1's pipelines.
- Classifier-free guidance: the unconditional branch is the same rows with `text_drop = 1` (its
  caption features zeroed), stacked on the batch axis; out = uncond + guidance * (cond - uncond).
- Image and video prompts all go through one mechanism, the DiT's `cond` / `cond_mask` inputs (the
  modes diffusion.loss_fn trains with random masks): clean latents of the given latent frames and a
  per-token mask. Given tokens hold their clean latents at every step, as in training, so they come out
  exactly. `image_prompt` (first frame), `extend_prompt` (forward: first frames; backward: last frames),
  `connect_prompt` (first and last latent frame) build such Requests. Given frames at the end were
  encoded in the given video's own causal context, so they are decoded in it too (`Request.tail_latents`)
  and replace the output's last frames; given frames at the start decode the same either way. SDEdit
  (`edit_prompt`: `init_latents`, `strength`) instead starts the segment's ODE at t = strength from the
  noised input.
- Latents are decoded by the VAE's chunked decoder (frame 0, then one latent frame at a time).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import config as config_lib
from sora_jax import diffusion
from sora_jax import patching
from sora_jax import samplers

MAX_FRAMES = 481  # one minute at 8 fps
FLOW_SAMPLERS = ("euler", "heun", "unipc")
DDPM_SAMPLERS = ("ddim", "ddpm")


# ----------------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Pixels <-> latents <-> patch grid for one VAE and one DiT patch size."""
  temporal: int           # VAE temporal factor ft: T frames -> 1 + (T - 1) // ft latent frames
  spatial: int            # VAE spatial factor
  channels: int           # latent channels c
  patch: tuple[int, int, int]
  max_frames: int = MAX_FRAMES

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[t, h, w, c] of a video of this size; raises a one-line ValueError for sizes off the grid."""
    ft, fs, (pt, ph, pw) = self.temporal, self.spatial, self.patch
    if not isinstance(num_frames, (int, np.integer)) or not 1 <= num_frames <= self.max_frames or (
        (num_frames - 1) % ft) or ((num_frames - 1) // ft + 1) % pt:
      ok = [n for n in range(1, self.max_frames + 1) if (n - 1) % ft == 0 and ((n - 1) // ft + 1) % pt == 0]
      raise ValueError(f"num_frames {num_frames} is not accepted: use one of {ok[:4]}..{ok[-1]} "
                       f"(1 + {ft * pt}k up to {self.max_frames})" if pt > 1 else
                       f"num_frames {num_frames} is not accepted: use 1 or 1 + {ft}k up to "
                       f"{self.max_frames} (e.g. {', '.join(str(n) for n in ok[1:4])}, {ok[-1]})")
    for name, size, p in (("height", height, ph), ("width", width, pw)):
      step = fs * p
      if not isinstance(size, (int, np.integer)) or size < step or size % step:
        raise ValueError(f"{name} {size} is not accepted: use a positive multiple of {step} "
                         f"(VAE factor {fs} x patch {p}), e.g. {2 * step} or {3 * step}")
    return 1 + (num_frames - 1) // ft, height // fs, width // fs, self.channels

  def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    return patching.patch_grid(self.latent_shape(num_frames, height, width), self.patch)

  def num_tokens(self, num_frames: int, height: int, width: int) -> int:
    return math.prod(self.grid(num_frames, height, width))

  def pixel_frames(self, latent_frames: int) -> int:
    return 1 + (latent_frames - 1) * self.temporal


# Peak bytes of the VAE's chunked decoder per output pixel of one frame, per channel of its
# full-resolution level: 4 output frames per latent frame, the causal caches and the convolutions'
# temporaries. Measured from memory_analysis() of the demo VAE's decode step (about 4.2 kB per pixel
# at 16 channels); rounded up.
_DECODE_BYTES_PER_PIXEL_CHANNEL = 300


def max_tokens(cfg) -> int:
  """The most patch tokens one video may have: config `sample.max_tokens`, else `data.seq_len`, the
  longest row the DiT was trained on. Beyond it the model sees lengths and positions it never saw,
  and each step's attention costs quadratically more."""
  return int(cfg.sample.max_tokens or 0) or int(cfg.data.seq_len)


def available_memory() -> tuple[int, str]:
  """(bytes, what they are): the first local accelerator's memory, else the host's physical memory."""
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{dev.device_kind} memory"
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def decode_bytes(vae_settings, num_frames: int, height: int, width: int, max_tile_pixels: int = 0) -> int:
  """About the peak memory of decoding one video with the chunked (and, above max_tile_pixels, tiled)
  decoder: one latent frame's activations at full resolution, plus the float32 video it builds."""
  s = vae_settings
  frame = height * width if not max_tile_pixels else min(height * width, max_tile_pixels)
  channels = (s.decoder_base_dim or s.base_dim) * s.dim_mult[0]  # of the full-resolution level
  return _DECODE_BYTES_PER_PIXEL_CHANNEL * channels * frame + 2 * 4 * 3 * num_frames * height * width


def check_size(pipe, num_frames: int, height: int, width: int, *, memory: tuple[int, str] | None = None
               ) -> None:
  """Raises a one-line ValueError if a video of this size has more tokens than the model takes
  (`max_tokens`) or would not fit this machine's memory to decode (`decode_bytes`)."""
  g = pipe.geometry
  tokens, limit = g.num_tokens(num_frames, height, width), max_tokens(pipe.cfg)
  size = f"{num_frames}x{height}x{width}"
  if tokens > limit:
    raise ValueError(f"{size} (frames x height x width) is {tokens} tokens; this model samples at most "
                     f"{limit} per video (its training row, data.seq_len; sample.max_tokens sets another)")
  if pipe.vae is not None:
    need = decode_bytes(pipe.vae.settings, num_frames, height, width,
                        int(pipe.sample_setting("max_tile_pixels", None, 0)))
    have, what = memory or available_memory()
    if need > have // 2:  # the models, the packed rows and the caller need the rest
      raise ValueError(f"{size} needs about {need / 2**30:.1f} GiB to decode; the limit here is half "
                       f"the {have / 2**30:.1f} GiB of {what} (sample.max_tile_pixels tiles frames)")


# ----------------------------------------------------------------------------------------------------
# Requests and packing


@dataclasses.dataclass
class Request:
  """One video to generate. Conditioning arrays are normalised latents ([t, h, w, c] of the output)."""
  caption: str
  num_frames: int
  height: int
  width: int
  cond_latents: np.ndarray | None = None  # clean latents of the given frames (anything elsewhere)
  cond_frames: np.ndarray | None = None   # bool [t]: which latent frames are given
  init_latents: np.ndarray | None = None  # SDEdit: start from these latents noised to t = strength
  strength: float = 1.0
  noise: np.ndarray | None = None         # the initial noise [t, h, w, c]; None: drawn from (seed, index)
  # Given frames at the end (backward extension, connect): their latents were encoded after the given
  # video's own frame 0, so decoding them after generated frames changes them. `tail_latents` are the
  # latents of that clip, frame 0 included; its decoded frames after frame 0 become the output's last.
  tail_latents: np.ndarray | None = None

  @classmethod
  def of(cls, r: Request | Sequence) -> Request:
    if isinstance(r, Request):
      return r
    if len(r) != 4:
      raise ValueError(f"request {r!r} is not a Request or (caption, num_frames, height, width)")
    caption, n, h, w = r
    return cls(str(caption), int(n), int(h), int(w))


@dataclasses.dataclass(frozen=True)
class Placement:
  row: int
  segment: int        # segment id in its row (1, 2, ...)
  start: int          # first token in the row
  grid: tuple[int, int, int]

  @property
  def num_tokens(self) -> int:
    return math.prod(self.grid)


def pack(grids: Sequence[tuple[int, int, int]], row_len: int) -> tuple[list[Placement], int]:
  """First-fit-decreasing packing of token grids into rows of `row_len` tokens.

  Returns a placement per grid (in input order) and the row length actually used: a request longer than
  `row_len` widens every row to its length rather than failing, since inference has no fixed batch shape.
  """
  sizes = [math.prod(g) for g in grids]
  row_len = max([int(row_len)] + sizes)
  free: list[int] = []        # tokens left per row
  count: list[int] = []       # segments per row
  out: list[Placement | None] = [None] * len(grids)
  for i in sorted(range(len(grids)), key=lambda i: -sizes[i]):
    row = next((r for r, f in enumerate(free) if f >= sizes[i]), None)
    if row is None:
      row = len(free)
      free.append(row_len)
      count.append(0)
    count[row] += 1
    out[i] = Placement(row, count[row], row_len - free[row], tuple(grids[i]))
    free[row] -= sizes[i]
  return out, row_len


# ----------------------------------------------------------------------------------------------------
# Time schedules


def time_schedule(steps: int, num_tokens: int, shift_fn: Callable | None = None, strength: float = 1.0,
                  grid: str = "uniform") -> np.ndarray:
  """float64 [steps + 1]: diffusion times from `strength` (1 = pure noise) down to 0.

  `grid` picks the unshifted spacing (samplers.sigma_grid: "uniform", or diffusers' "flow_match" and
  "unipc"); `shift_fn(t, num_tokens)` (diffusion.time_shift, the same shift as in training) moves steps
  towards high noise, by default more for segments with more tokens. SDEdit scales the whole schedule by
  its strength.
  """
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength {strength} is not accepted: use a value in (0, 1]")
  fn = None if shift_fn is None else (lambda u: shift_fn(u, num_tokens))
  return samplers.sigma_grid(steps, grid, fn) * strength


# ----------------------------------------------------------------------------------------------------
# The packed problem


@dataclasses.dataclass
class Packed:
  """Everything the sampler loop needs, in row layout (numpy, host)."""
  placements: list[Placement]
  indices: list[int]             # each placement's request index (the key of its noise)
  batch: dict[str, np.ndarray]   # positions, segment_ids, text_tokens, text_segment_ids, cond, cond_mask
  noise: np.ndarray              # [R, L, D] initial noise
  init: np.ndarray               # [R, L, D] SDEdit start latents (zeros where none)
  schedule: np.ndarray           # [K + 1, R, S] per-segment times (unused segment slots: 0)
  patch: tuple[int, int, int]
  model_times: np.ndarray        # [K + 1, R, S] the times the model sees there (samplers.model_times)
  strength: np.ndarray           # [R, S] SDEdit strength; 1 = start from pure noise

  @property
  def has_cond(self) -> bool:
    return bool(self.batch["cond_mask"].any())

  @property
  def num_rows(self) -> int:
    return self.noise.shape[0]

  def rows(self, start: int, stop: int) -> Packed:
    """The sub-problem of rows [start, stop): rows are independent, so they may be denoised apart."""
    keep = [k for k, p in enumerate(self.placements) if start <= p.row < stop]
    return Packed([dataclasses.replace(self.placements[k], row=self.placements[k].row - start) for k in keep],
                  [self.indices[k] for k in keep], {k: v[start:stop] for k, v in self.batch.items()},
                  self.noise[start:stop], self.init[start:stop], self.schedule[:, start:stop], self.patch,
                  self.model_times[:, start:stop], self.strength[start:stop])


def _round_up(n: int, m: int) -> int:
  return max(m, -(-int(n) // m) * m)


def request_key(seed: int, index: int) -> jax.Array:
  """The key of request `index`: its initial noise is draw 0, ancestral step k's noise draw k."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


FRAME_SHARED_DRAW = 1 << 30  # the draw of the frame-shared noise part (steps' draws count from 1)


def _draw(seed: int, index: int, draw: int, shape) -> np.ndarray:
  return np.asarray(jax.random.normal(jax.random.fold_in(request_key(seed, index), draw), shape, jnp.float32))


def _token_mask(cond_frames: np.ndarray, grid, patch) -> np.ndarray:
  """Per-token conditioning mask from per-latent-frame flags."""
  nt, nh, nw = grid
  frames = np.asarray(cond_frames, bool)
  if frames.shape != (nt * patch[0],):
    raise ValueError(f"cond_frames of shape {frames.shape} do not match {nt * patch[0]} latent frames")
  per_patch = frames.reshape(nt, patch[0])
  if (per_patch.any(1) != per_patch.all(1)).any():
    raise ValueError(f"given latent frames {np.flatnonzero(frames).tolist()} split a time patch of "
                     f"{patch[0]} frames; give whole time patches")
  return np.repeat(per_patch[:, 0], nh * nw).astype(np.float32)


def pack_requests(requests: Sequence[Request], geometry: Geometry, texts: Sequence[np.ndarray], *,
                  seed: int, steps: int, row_len: int, shift_fn: Callable | None = None,
                  index_offset: int = 0, grid: str = "uniform",
                  negative_texts: Sequence[np.ndarray] | None = None, frame_share: float = 0.0) -> Packed:
  """Packs requests (with their captions as the DiT reads them: ids [n], or features [n, text_dim] of a
  frozen encoder) into rows, with noise and per-segment schedules. `negative_texts` (one per request)
  become the unconditional half's captions (`neg_text_tokens`), in the same row layout. `frame_share`:
  the drawn noise's part shared by a video's latent frames (diffusion.frame_share, as in training).

  Request i draws its noise from `request_key(seed, index_offset + i)` unless it brings `Request.noise`.
  Each segment gets its own time grid (`time_schedule`: its token count sets its shift, its strength
  scales it), as column [:, row, segment - 1] of `schedule`.
  """
  grids = [geometry.grid(r.num_frames, r.height, r.width) for r in requests]
  placements, row_len = pack(grids, row_len)
  rows = 1 + max(p.row for p in placements)
  segs = max(p.segment for p in placements)
  d = patching.token_dim(geometry.channels, geometry.patch)
  captions = {"text": [np.asarray(x) for x in texts]}
  if negative_texts is not None:
    captions["neg_text"] = [np.asarray(x) for x in negative_texts]
  # Text rows are rounded up to 16 tokens so that captions of different lengths share a compiled step.
  text_len = _round_up(max(sum(len(c[i]) for i, p in enumerate(placements) if p.row == r)
                           for c in captions.values() for r in range(rows)), 16)
  b = dict(positions=np.zeros((rows, row_len, 3), np.int32),
           segment_ids=np.zeros((rows, row_len), np.int32),
           cond=np.zeros((rows, row_len, d), np.float32),
           cond_mask=np.zeros((rows, row_len), np.float32))
  noise = np.zeros((rows, row_len, d), np.float32)
  init = np.zeros((rows, row_len, d), np.float32)
  # Unused segment slots keep t = 0 at every step, so the loop leaves them alone.
  schedule = np.zeros((steps + 1, rows, segs), np.float64)
  for name, cs in captions.items():
    b[f"{name}_tokens"] = np.zeros((rows, text_len) + cs[0].shape[1:], cs[0].dtype)
    b[f"{name}_segment_ids"] = np.zeros((rows, text_len), np.int32)
    fill = [0] * rows
    for c, p in zip(cs, placements):
      b[f"{name}_tokens"][p.row, fill[p.row]:fill[p.row] + len(c)] = c
      b[f"{name}_segment_ids"][p.row, fill[p.row]:fill[p.row] + len(c)] = p.segment
      fill[p.row] += len(c)
  strengths = np.ones((rows, segs), np.float64)
  for i, (r, p) in enumerate(zip(requests, placements)):
    shape = geometry.latent_shape(r.num_frames, r.height, r.width)
    sl = (p.row, slice(p.start, p.start + p.num_tokens))
    for name in ("cond_latents", "init_latents", "noise"):
      z = getattr(r, name)
      if z is not None and tuple(z.shape) != shape:
        raise ValueError(f"{name} of shape {tuple(z.shape)} do not match the request's latents {shape}")
    if r.noise is None:
      z = diffusion.mix_frame_noise(_draw(seed, index_offset + i, 0, shape),
                                    _draw(seed, index_offset + i, FRAME_SHARED_DRAW, shape[1:]), frame_share)
    else:
      z = np.asarray(r.noise, np.float32)
    eps, pos = patching.patchify(z, geometry.patch)
    noise[sl] = eps
    b["positions"][sl] = pos
    b["segment_ids"][sl] = p.segment
    if r.cond_frames is not None and np.any(r.cond_frames):
      if r.cond_latents is None:
        raise ValueError(f"request {r.caption!r} has cond_frames but no cond_latents")
      mask = _token_mask(r.cond_frames, p.grid, geometry.patch)
      b["cond"][sl] = patching.patchify(np.asarray(r.cond_latents, np.float32), geometry.patch)[0] * mask[:, None]
      b["cond_mask"][sl] = mask
    strength = 1.0
    if r.init_latents is not None:
      init[sl] = patching.patchify(np.asarray(r.init_latents, np.float32), geometry.patch)[0]
      strength = float(r.strength)
    schedule[:, p.row, p.segment - 1] = time_schedule(steps, p.num_tokens, shift_fn, strength, grid)
    strengths[p.row, p.segment - 1] = strength
  return Packed(placements, [index_offset + i for i in range(len(requests))], b, noise, init, schedule,
                geometry.patch, samplers.model_times(schedule, grid), strengths)


# ----------------------------------------------------------------------------------------------------
# The denoising loop


@dataclasses.dataclass(frozen=True)
class Schedule:
  """What a sampler needs from the diffusion objective (diffusion.py), as a hashable static value."""
  objective: str = "flow"     # "flow" | "ddpm"
  prediction: str = "v"       # ddpm: "eps" | "v" (flow always predicts v = eps - x0)
  cosine_s: float = 0.008

  @classmethod
  def from_config(cls, cfg) -> Schedule:
    d = cfg.diffusion
    if d.objective not in ("flow", "ddpm"):
      raise ValueError(f"diffusion.objective={d.objective!r} is unknown; accepted: 'flow', 'ddpm'")
    return cls(str(d.objective), str(d.prediction), float(d.cosine_s))

  @property
  def _cfg(self):
    import types  # pylint: disable=g-import-not-at-top
    return types.SimpleNamespace(diffusion=types.SimpleNamespace(
        objective=self.objective, prediction=self.prediction, cosine_s=self.cosine_s))

  def alpha_sigma(self, t):
    """(alpha, sigma) with x_t = alpha x0 + sigma eps, for per-token times t."""
    if self.objective == "flow":
      return 1.0 - t, t
    from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
    ab = diffusion.cosine_alpha_bar(t, self._cfg)
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)

  def x0_eps(self, x, pred, t):
    """(x0, eps) estimates from the model's prediction at per-token times t [..., 1]."""
    if self.objective == "flow":
      return x - t * pred, x + (1.0 - t) * pred
    from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
    return (diffusion.predict_x0(x, pred, t[..., 0], self._cfg),
            diffusion.predict_eps(x, pred, t[..., 0], self._cfg))

  def samplers(self) -> tuple[str, ...]:
    return FLOW_SAMPLERS if self.objective == "flow" else DDPM_SAMPLERS


def _per_token(t_bs: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, S] per-segment values -> [B, L, 1] per token (0 on padding)."""
  t = jnp.concatenate([jnp.zeros_like(t_bs[:, :1]), t_bs], axis=1)
  return jnp.take_along_axis(t, segment_ids, axis=1)[..., None]


def _split_model(model) -> tuple[Any, Any]:
  """(static part, state): an nnx.Module's graphdef and state, or a plain function and None."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  return model, None


def _call(static, state, *args, **kw):
  if state is None:
    return static(*args, **kw)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.merge(static, state)(*args, **kw)


def guided(static, state, batch, x, t_bs, guidance, *, use_cfg: bool, has_cond: bool):
  """The model's prediction with classifier-free guidance: uncond + g * (cond - uncond).

  The unconditional half is the same rows with the negative captions (`neg_text_tokens`) when the batch
  has them, else with text_drop = 1 (captions zeroed), stacked on the batch axis so both halves cost one
  model call.
  """
  cond = dict(cond=batch["cond"], cond_mask=batch["cond_mask"]) if has_cond else {}
  args = (batch["positions"], batch["segment_ids"], t_bs.astype(jnp.float32))
  text = (batch["text_tokens"], batch["text_segment_ids"])
  no_drop = jnp.zeros(t_bs.shape, jnp.float32)
  if not use_cfg:
    return _call(static, state, x, *args, *text, **cond, text_drop=no_drop).astype(jnp.float32)
  two = lambda a: jnp.concatenate([a, a], axis=0)
  if "neg_text_tokens" in batch:
    neg, drop = (batch["neg_text_tokens"], batch["neg_text_segment_ids"]), no_drop
  else:
    neg, drop = text, jnp.ones(t_bs.shape, jnp.float32)
  text = tuple(jnp.concatenate([a, n], axis=0) for a, n in zip(text, neg))
  out = _call(static, state, two(x), *map(two, args), *text, **{k: two(v) for k, v in cond.items()},
              text_drop=jnp.concatenate([no_drop, drop], axis=0)).astype(jnp.float32)
  c, u = jnp.split(out, 2, axis=0)
  return u + guidance * (c - u)


@functools.partial(jax.jit, static_argnames=("static", "sched", "sampler", "use_cfg", "has_cond"))
def _step(state, batch, x, tc_bs, tn_bs, z, guidance, solver, carry, *, static, sched: Schedule, sampler: str,
          use_cfg: bool, has_cond: bool):
  """One sampler step from per-segment times t_cur [R, S] to t_next [R, S]; jitted once per shape.

  solver: this step's per-segment inputs besides the times: the times the model sees ("model",
  "model_next": samplers.model_times) and UniPC's coefficients ("coef": samplers.UniPCTables.at(k)).
  carry: what a multistep solver keeps between steps (UniPC: "x_prev", "history"; else empty).
  Returns (x at t_next, the new carry, the data estimate x0 at t_cur that the step moved towards).
  """
  seg = batch["segment_ids"]
  tc, tn = _per_token(tc_bs, seg), _per_token(tn_bs, seg)
  # Given tokens hold their clean latents at every step, as in training (diffusion.loss_fn).
  given = ((lambda x: jnp.where(batch["cond_mask"][..., None] > 0, batch["cond"], x)) if has_cond
           else (lambda x: x))
  model = lambda x, t_bs: guided(static, state, batch, x, t_bs, guidance, use_cfg=use_cfg,
                                 has_cond=has_cond)
  x = given(x)
  out = model(x, solver["model"])
  if sampler == "unipc":
    tok = lambda c: jax.vmap(_per_token, (0, None))(c, seg) if c.ndim == 3 else _per_token(c, seg)
    coef = {k: tok(c) for k, c in solver["coef"].items()}
    x_new, x_c, m = samplers.unipc_update(x, out, tc, carry["x_prev"], carry["history"], coef)
    carry = {"x_prev": x_c, "history": (m,) + tuple(carry["history"][:-1])}
  elif sampler in FLOW_SAMPLERS:
    x_new = samplers.euler_step(x, out, tc, tn)
    if sampler == "heun":
      # Heun's correction needs the velocity at t_next; a segment reaching t = 0 keeps the Euler step.
      v2 = model(given(x_new), solver["model_next"])
      x_new = jnp.where(tn > 0, x + (tn - tc) * 0.5 * (out + v2), x_new)
  else:
    x0, eps_hat = sched.x0_eps(x, out, tc)
    a_n, s_n = sched.alpha_sigma(tn)
    if sampler == "ddim":
      x_new = a_n * x0 + s_n * eps_hat
    else:
      # Ancestral: sample q(x_tn | x_tc, x0) at the predicted x0 (variance-preserving schedule).
      ab_c, ab_n = sched.alpha_sigma(tc)[0] ** 2, a_n ** 2
      alpha = ab_c / ab_n
      one_c = jnp.maximum(1.0 - ab_c, 1e-12)
      var = (1.0 - ab_n) / one_c * (1.0 - alpha)
      mean = (a_n * (1.0 - alpha) * x0 + jnp.sqrt(alpha) * (1.0 - ab_n) * x) / one_c
      x_new = mean + jnp.sqrt(jnp.maximum(var, 0.0)) * z
  x_new = given(jnp.where(tn < tc, x_new, x))  # a segment whose schedule has ended stays put
  x0 = given(sched.x0_eps(x, out, tc)[0])
  pad = lambda a: jnp.where((seg > 0)[..., None], a, 0.0)
  return pad(x_new), carry, pad(x0)


def denoise(model, packed: Packed, *, sampler: str, guidance: float, seed: int,
            schedule: Schedule | None = None, progress: bool = False,
            unipc: samplers.UniPC | None = None,
            on_step: Callable[[int, list[np.ndarray]], None] | None = None) -> list[np.ndarray]:
  """Runs the sampler over packed rows; returns each placement's normalised latents [t, h, w, c].

  `model` has the DiT's call signature (an nnx.Module or a plain function). `unipc`: the UniPC settings
  (default: Wan 2.1's, samplers.UniPC()). `on_step(k, x0s)`, if given, is called after step k with each
  placement's data estimate at that step (the guided prediction of the clean latents, [t, h, w, c]): the
  sampled trajectory, for bench.sample_trajectory.
  """
  sched = schedule or Schedule()
  if sampler not in sched.samplers():
    raise ValueError(f"sampler {sampler!r} does not apply to the {sched.objective!r} objective; "
                     f"accepted: {list(sched.samplers())}")
  static, state = _split_model(model)
  step = functools.partial(_step, static=static, sched=sched, sampler=sampler,
                           use_cfg=float(guidance) != 1.0, has_cond=packed.has_cond)
  batch = {k: jnp.asarray(v) for k, v in packed.batch.items()}
  eps = jnp.asarray(packed.noise)
  t0 = _per_token(jnp.asarray(packed.schedule[0], jnp.float32), batch["segment_ids"])
  a0, s0 = sched.alpha_sigma(t0)
  # SDEdit segments start at t = strength < 1 from their noised input latents; the rest from the noise
  # itself, also where a grid starts just below 1 (diffusers' UniPC grid: 1 - 1e-6).
  edit = _per_token(jnp.asarray(packed.strength < 1.0, jnp.float32), batch["segment_ids"]) > 0
  x = jnp.where(edit, a0 * jnp.asarray(packed.init) + s0 * eps, eps)
  steps = packed.schedule.shape[0] - 1
  it = range(steps)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(it, desc=f"{sampler} x{packed.num_rows} rows", unit="step", leave=False)
  g = jnp.float32(guidance)
  zero = jnp.zeros_like(eps)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  sigmas, tables, carry = packed.schedule, None, {}
  if sampler == "unipc":
    unipc = unipc or samplers.UniPC()
    tables = samplers.unipc_tables(packed.schedule, unipc)
    sigmas = tables.sigmas  # below 1, as the coefficients need
    carry = {"x_prev": zero, "history": (zero,) * unipc.order}
  for k in it:
    z = _step_noise(packed, seed, k + 1) if sampler == "ddpm" else zero
    solver = {"model": f32(packed.model_times[k]), "model_next": f32(packed.model_times[k + 1])}
    if tables is not None:
      solver["coef"] = {name: f32(c) for name, c in tables.at(k).items()}
    x, carry, x0 = step(state, batch, x, f32(sigmas[k]), f32(sigmas[k + 1]), z, g, solver, carry)
    if on_step is not None:
      on_step(k, _unpack(packed, np.asarray(x0)))
  return _unpack(packed, np.asarray(jax.block_until_ready(x)))


def _unpack(packed: Packed, x: np.ndarray) -> list[np.ndarray]:
  """Each placement's latents [t, h, w, c] from rows [R, L, D]."""
  return [patching.unpatchify(x[p.row, p.start:p.start + p.num_tokens], p.grid, packed.patch)
          for p in packed.placements]


def _step_noise(packed: Packed, seed: int, draw: int) -> jax.Array:
  """Ancestral step noise in row layout, drawn per request from its own key so packing cannot change it."""
  z = np.zeros_like(packed.noise)
  for i, p in zip(packed.indices, packed.placements):
    z[p.row, p.start:p.start + p.num_tokens] = _draw(seed, i, draw, (p.num_tokens, z.shape[-1]))
  return jnp.asarray(z)


# ----------------------------------------------------------------------------------------------------
# Models: everything generation needs, from a bundle, a training workdir, or parts


@dataclasses.dataclass
class Pipeline:
  """The trained parts and settings that sampling needs."""
  cfg: Any                       # the full config (sections data, vae, dit, diffusion, sample)
  dit: Any                       # the DiT (EMA weights), or any callable with its signature
  vae: Any | None                # models.vae.VAE; None when cfg.data.source == "shapes" (pooled pixels)
  tokenize: Any                  # data.tokenizer.Tokenizer, or any caption -> ids function
  shift: np.ndarray              # latent normalisation: z_norm = (z - shift) / scale
  scale: np.ndarray
  text_encoder: Any | None = None  # a frozen encoder (models.umt5.UMT5Encoder) when the DiT reads features

  def __post_init__(self):
    config_lib.complete(self.cfg)  # the sample section's defaults; optional keys of older bundles

  @property
  def geometry(self) -> Geometry:
    patch = tuple(int(p) for p in self.cfg.dit.patch)
    if self.vae is None:
      ft, fh, fw = (int(f) for f in self.cfg.data.stand_in_factors)
      if fh != fw:
        raise ValueError(f"data.stand_in_factors {(ft, fh, fw)}: sampling needs equal spatial factors")
      return Geometry(ft, fh, 3, patch)
    s = self.vae.settings
    return Geometry(s.temporal_factor, s.spatial_factor, s.z_dim, patch)

  @property
  def schedule(self) -> Schedule:
    return Schedule.from_config(self.cfg)

  @property
  def time_grid(self) -> str:
    return str(self.sample_setting("time_grid", None, "uniform"))

  @property
  def unipc(self) -> samplers.UniPC:
    return samplers.UniPC.of(self.sample_setting("unipc", None, None))

  def shift_fn(self, u: np.ndarray, num_tokens: int) -> np.ndarray:
    return _shift_fn(self.cfg)(u, num_tokens)

  def text_ids(self, caption: str) -> np.ndarray:
    """Caption ids exactly as training saw them (data.tokenizer's encode: pieces + EOS, truncated)."""
    max_len = int(self.cfg.data.max_text_tokens)
    if hasattr(self.tokenize, "encode"):
      return np.asarray(self.tokenize.encode(caption, max_len), np.int32)
    return np.asarray(self.tokenize(caption), np.int32)[:max_len]

  def caption_warning(self, caption: str) -> str | None:
    """One line when the model cannot read `caption` as written: words its tokenizer never saw (spelled
    letter by letter, each letter a token) and pieces cut at the caption limit; else None."""
    if not hasattr(self.tokenize, "unknown_words"):
      return None
    if self.text_encoder is None:
      key, limit = "data.max_text_tokens", int(self.cfg.data.max_text_tokens)
    else:
      key, limit = "text.max_len", int(self.cfg.text.max_len)
    unknown, cut = self.tokenize.unknown_words(caption), self.tokenize.overflow(caption, limit)
    if not unknown and not cut:
      return None
    parts = []
    if unknown:
      words = ", ".join(repr(w) for w in unknown)
      parts.append(f"{words} not in the tokenizer's vocabulary (spelled letter by letter: the model never "
                   "saw them)")
    if cut:
      parts.append(f"{cut} of its tokens cut at {key}={limit}")
    return f"warning: prompt {caption!r}: " + "; ".join(parts)

  def text(self, caption: str) -> np.ndarray:
    """The caption as the DiT reads it: ids for the jointly trained caption encoder; for a frozen encoder
    its features [text.max_len, text_dim], the caption's tokens followed by zeros (Wan's pipeline pads
    every caption's UMT5 features to max_sequence_length with zeros, and the DiT attends to them)."""
    if self.text_encoder is None:
      return self.text_ids(caption)
    from sora_jax.data.tokenizer import clean_wan_prompt  # pylint: disable=g-import-not-at-top
    max_len = int(self.cfg.text.max_len)
    ids = np.asarray(self.tokenize.encode(clean_wan_prompt(caption), max_len), np.int32)
    return _encode_text(self.text_encoder, ids, max_len)

  def sample_setting(self, name: str, value, default):
    """An explicit argument, else the config's `sample` section, else the built-in default."""
    if value is not None and value != "":
      return value
    got = self.cfg.sample[name]
    return default if got is None or got == "" else got

  # --- pixels <-> normalised latents
  def encode(self, frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] (T = 1 + ft*k, H and W on the grid) -> normalised latents [t, h, w, c]."""
    if self.vae is None:
      from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      return np.asarray(pipeline.stand_in_latents(np.asarray(frames, np.uint8),
                                                  tuple(self.cfg.data.stand_in_factors)), np.float32)
    x = np.asarray(frames, np.float32) / 127.5 - 1.0
    mean, _ = self.vae.encode_chunked(jnp.asarray(x)[None])
    return (np.asarray(mean[0], np.float32) - self.shift) / self.scale

  def decode(self, z_norm: np.ndarray) -> np.ndarray:
    """Normalised latents [t, h, w, c] -> uint8 [T, H, W, 3], through the VAE's chunked decoder."""
    z = np.asarray(z_norm, np.float32) * self.scale + self.shift
    if self.vae is None:  # the stand-in "latents" are pooled pixels: undo the pooling by repetition
      g = self.geometry
      x = np.repeat(np.repeat(z, g.spatial, axis=1), g.spatial, axis=2)
      x = np.concatenate([x[:1], np.repeat(x[1:], g.temporal, axis=0)], axis=0)
    else:
      tile = int(self.sample_setting("max_tile_pixels", None, 0))
      x = np.asarray(self.vae.decode_chunked(jnp.asarray(z)[None], max_tile_pixels=tile)[0])
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def as_pipeline(models) -> Pipeline:
  """A Pipeline from a Pipeline or a loaded bundle (sora_jax.bundle)."""
  if isinstance(models, Pipeline):
    return models
  missing = [k for k in ("config", "dit", "vae", "tokenizer", "latent_shift", "latent_scale")
             if not hasattr(models, k)]
  if missing:
    raise TypeError(f"{type(models).__name__} is not a Pipeline or a loaded bundle (missing {missing})")
  return Pipeline(models.config, models.dit, models.vae, models.tokenizer,
                  np.asarray(models.latent_shift, np.float32), np.asarray(models.latent_scale, np.float32),
                  getattr(models, "text_encoder", None))


def _encode_text(encoder, ids: np.ndarray, max_len: int) -> np.ndarray:
  """A frozen encoder's features of one caption, zero past its tokens: float32 [max_len, width]."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  n = len(ids)
  row = np.zeros((1, max_len), np.int32)
  row[0, :n] = ids
  seg = (np.arange(max_len) < n).astype(np.int32)[None]
  graphdef, state = nnx.split(encoder)
  feats = np.array(_run_encoder(graphdef, state, jnp.asarray(row), jnp.asarray(seg))[0], np.float32)
  feats[n:] = 0.0
  return feats


@functools.partial(jax.jit, static_argnums=0)
def _run_encoder(graphdef, state, ids, seg):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.merge(graphdef, state)(ids, seg)


# ----------------------------------------------------------------------------------------------------
# Image and video prompts: all become (cond_latents, cond_frames) or (init_latents, strength)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [T, H', W', 3] -> [T, height, width, 3] (bicubic; identity when the size already matches)."""
  frames = np.asarray(frames, np.uint8)
  if frames.shape[1:3] == (height, width):
    return frames
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def usable_frames(n: int, ft: int) -> int:
  """The largest 1 + ft*k <= n."""
  return 1 + (n - 1) // ft * ft


def _check_frames(name: str, frames: np.ndarray, need: int) -> None:
  if frames.shape[0] < need:
    raise ValueError(f"{name} has {frames.shape[0]} frames; this mode needs at least {need}")


def image_prompt(pipe: Pipeline, caption: str, image: np.ndarray, num_frames: int, height: int,
                 width: int) -> Request:
  """Image-to-video: the image (uint8 [H, W, 3] or [1, H, W, 3]) becomes the first frame."""
  image = np.asarray(image).reshape((-1,) + np.asarray(image).shape[-3:])[:1]
  g = pipe.geometry
  t, h, w, c = g.latent_shape(num_frames, height, width)
  z = np.zeros((t, h, w, c), np.float32)
  z[:1] = pipe.encode(resize_frames(image, height, width))
  given = np.zeros(t, bool)
  given[:g.patch[0]] = True
  if g.patch[0] > 1:
    raise ValueError(f"image prompts need a time patch of 1 latent frame; this model's is {g.patch[0]}")
  return Request(caption, num_frames, height, width, cond_latents=z, cond_frames=given)


def extend_prompt(pipe: Pipeline, caption: str, video: np.ndarray, num_frames: int, height: int,
                  width: int, direction: str = "forward") -> Request:
  """Video extension: the output continues `video` (forward) or leads into it (backward).

  Up to half of the output's latent frames are given. Forward, the output begins with the last frames of
  the video (their latents are exact: the VAE is causal). Backward, the output ends with the video's
  first frames; frame 0 of a clip is encoded as an image, so the given latents are those of the video's
  frames 1..4k, as the last frames of a longer clip (as in training's "last_frames" mode).
  """
  if direction not in ("forward", "backward"):
    raise ValueError(f"direction {direction!r} is unknown; accepted: 'forward', 'backward'")
  g = pipe.geometry
  t, h, w, c = g.latent_shape(num_frames, height, width)
  if t < 2:
    raise ValueError(f"num_frames {num_frames} leaves nothing to generate; use at least {1 + g.temporal}")
  video = resize_frames(video, height, width)
  z = np.zeros((t, h, w, c), np.float32)
  given = np.zeros(t, bool)
  tail = None
  k = max(1, t // 2)
  if direction == "forward":
    k = min(k, 1 + (video.shape[0] - 1) // g.temporal)
    n = usable_frames(min(video.shape[0], g.pixel_frames(k)), g.temporal)
    z[:k] = pipe.encode(video[video.shape[0] - n:])
    given[:k] = True
  else:
    _check_frames("the video", video, 1 + g.temporal)
    k = min(k, (video.shape[0] - 1) // g.temporal)
    tail = pipe.encode(video[:1 + k * g.temporal])
    z[t - k:] = tail[1:]
    given[t - k:] = True
  return Request(caption, num_frames, height, width, cond_latents=z, cond_frames=given, tail_latents=tail)


def connect_prompt(pipe: Pipeline, caption: str, video_a: np.ndarray, video_b: np.ndarray,
                   num_frames: int, height: int, width: int) -> Request:
  """A video that begins like `video_a` and ends like `video_b` (training's "both_ends" mode).

  The first latent frame is a's last frame (encoded as an image, exactly as frame 0 of a clip is); the
  last latent frame holds b's frames 1..ft, encoded after b's frame 0.
  """
  g = pipe.geometry
  t, h, w, c = g.latent_shape(num_frames, height, width)
  if t < 3:
    raise ValueError(f"num_frames {num_frames} is too short to connect two videos; use at least "
                     f"{g.pixel_frames(3)}")
  b = resize_frames(video_b, height, width)
  _check_frames("the second video", b, 1 + g.temporal)
  z = np.zeros((t, h, w, c), np.float32)
  z[:1] = pipe.encode(resize_frames(np.asarray(video_a)[-1:], height, width))
  tail = pipe.encode(b[:1 + g.temporal])
  z[-1:] = tail[1:]
  given = np.zeros(t, bool)
  given[0] = given[-1] = True
  return Request(caption, num_frames, height, width, cond_latents=z, cond_frames=given, tail_latents=tail)


def edit_prompt(pipe: Pipeline, caption: str, video: np.ndarray, num_frames: int, height: int,
                width: int, strength: float) -> Request:
  """SDEdit video-to-video: start from the video's latents noised to t = strength, under a new caption."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength {strength} is not accepted: use a value in (0, 1]")
  pipe.geometry.latent_shape(num_frames, height, width)
  video = resize_frames(video, height, width)
  _check_frames("the video to edit", video, num_frames)
  return Request(caption, num_frames, height, width, init_latents=pipe.encode(video[:num_frames]),
                 strength=float(strength))


# ----------------------------------------------------------------------------------------------------
# The generator


def sample_latents(models, requests: Sequence[Request | Sequence], *, seed: int = 0,
                   steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                   row_len: int | None = None, rows_per_call: int = 8, index_offset: int = 0,
                   progress: bool = False, negative_prompt: str | None = None,
                   on_step: Callable[[int, dict[int, np.ndarray]], None] | None = None) -> list[np.ndarray]:
  """Normalised latents [t, h, w, c] per request; see `generate`. `on_step(k, {request: x0})`: each
  request's data estimate after sampler step k (`denoise`), called once per step and group of rows."""
  pipe = as_pipeline(models)
  reqs = [Request.of(r) for r in requests]
  if not reqs:
    return []
  sched = pipe.schedule
  steps = int(pipe.sample_setting("steps", steps, 30))
  guidance = float(pipe.sample_setting("guidance", guidance, 1.0))
  sampler = str(pipe.sample_setting("sampler", sampler, sched.samplers()[0]))
  row_len = int(pipe.sample_setting("row_len", row_len, 0) or pipe.cfg.data.seq_len)
  # A few small requests need less than a full row: pad to a multiple of 64 tokens, not to row_len, so
  # one-by-one calls stay cheap and still share compiled shapes.
  total = sum(pipe.geometry.num_tokens(r.num_frames, r.height, r.width) for r in reqs)
  row_len = min(row_len, _round_up(total, 64))
  if negative_prompt is None and pipe.text_encoder is not None:
    negative_prompt = ""  # as Wan's pipeline: a frozen encoder's unconditional text is the empty prompt's
  negatives = None
  if negative_prompt is not None and guidance != 1.0:
    neg = pipe.text(negative_prompt)
    negatives = [neg] * len(reqs)
  packed = pack_requests(reqs, pipe.geometry, [pipe.text(r.caption) for r in reqs], seed=seed,
                         steps=steps, row_len=row_len, shift_fn=pipe.shift_fn, index_offset=index_offset,
                         grid=pipe.time_grid, negative_texts=negatives,
                         frame_share=diffusion.frame_share(pipe.cfg))
  out: list[np.ndarray | None] = [None] * len(reqs)
  for r0 in range(0, packed.num_rows, rows_per_call):
    part = packed.rows(r0, r0 + rows_per_call)
    hook = None if on_step is None else (
        lambda k, x0s, part=part: on_step(k, {i - index_offset: z for i, z in zip(part.indices, x0s)}))
    latents = denoise(pipe.dit, part, sampler=sampler, guidance=guidance, seed=seed, schedule=sched,
                      progress=progress, unipc=pipe.unipc if sampler == "unipc" else None, on_step=hook)
    for i, z in zip(part.indices, latents):
      out[i - index_offset] = z
  return out


def generate(models, requests: Sequence[Request | Sequence], *, seed: int = 0, steps: int | None = None,
             guidance: float | None = None, sampler: str | None = None, row_len: int | None = None,
             rows_per_call: int = 8, index_offset: int = 0, progress: bool = False,
             negative_prompt: str | None = None) -> list[np.ndarray]:
  """Videos for `requests`: a list of uint8 [num_frames, height, width, 3], in request order.

  models: a loaded bundle (sora_jax.bundle) or a Pipeline. requests: (caption, num_frames, height, width)
  tuples or Requests (which may carry image/video conditioning). steps, guidance, sampler, row_len default
  to the config's `sample` section. Request i's noise comes from fold_in(PRNGKey(seed), index_offset + i):
  the result for a request does not depend on the others it is packed with. `negative_prompt`: the
  unconditional half's caption under guidance (default: the hidden caption of training's text dropout;
  "" for a frozen text encoder, as Wan's pipeline).
  """
  pipe = as_pipeline(models)
  reqs = [Request.of(r) for r in requests]
  latents = sample_latents(pipe, reqs, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           row_len=row_len, rows_per_call=rows_per_call, index_offset=index_offset,
                           progress=progress, negative_prompt=negative_prompt)
  videos = [pipe.decode(z) for z in latents]
  for r, v in zip(reqs, videos):
    if r.tail_latents is not None:
      tail = pipe.decode(r.tail_latents)[1:]
      v[-len(tail):] = tail
  return videos


def training_samples(model, cfg, batch: dict, key: jax.Array, *, max_videos: int = 2,
                     decode: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Sample videos for the trainer's periodic logging: the first captions and sizes of a packed batch.

  Uses cfg.sample's steps and guidance and the batch's text tokens and patch grids (row 0). With the raw
  "shapes" source the pooled-pixel latents are shown as pixels; with VAE latents, `decode` (normalised
  latents -> uint8 frames, e.g. Pipeline.decode) gives the frames, and without it the first three
  normalised latent channels are shown, upsampled to pixel size, as a preview.
  Returns {name: uint8 [T, H, W, 3]}.
  """
  seg_ids = np.asarray(jax.device_get(batch["segment_ids"]))[0]
  grids = np.asarray(jax.device_get(batch["seg_grid"]))[0]
  text = np.asarray(jax.device_get(batch["text_tokens"]))[0]
  text_seg = np.asarray(jax.device_get(batch["text_segment_ids"]))[0]
  cfg = config_lib.complete(cfg)
  patch = tuple(int(p) for p in cfg.dit.patch)
  stand_in = cfg.data.source == "shapes"
  channels = 3 if stand_in else int(cfg.dit.in_dim) // math.prod(patch)
  geometry = Geometry(1, 1, channels, patch)  # latent units: the grid is all that sampling needs here
  reqs, ids = [], []
  for k, grid in enumerate(grids[:max_videos]):
    if not grid.any() or not (seg_ids == k + 1).any():
      break
    nt, nh, nw = (int(g) for g in grid)
    reqs.append(Request(f"segment {k + 1}", nt * patch[0], nh * patch[1], nw * patch[2]))
    ids.append(text[text_seg == k + 1])
  if not reqs:
    return {}
  seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
  sched = Schedule.from_config(cfg)
  steps = int(cfg.sample.steps or 30)
  guidance = float(cfg.sample.guidance or 1.0)
  grid = str(cfg.sample.time_grid or "uniform")
  packed = pack_requests(reqs, geometry, ids, seed=seed, steps=steps, row_len=0, shift_fn=_shift_fn(cfg),
                         grid=grid, frame_share=diffusion.frame_share(cfg))
  latents = denoise(model, packed, sampler=sched.samplers()[0], guidance=guidance, seed=seed,
                    schedule=sched)
  out = {}
  for k, z in enumerate(latents):
    if decode is not None and not stand_in:
      out[f"video_{k}"] = decode(np.asarray(z, np.float32))
      continue
    if stand_in:
      ft, fh, fw = (int(f) for f in cfg.data.stand_in_factors)
      x = np.repeat(np.repeat(z, fh, axis=1), fw, axis=2)
      x = np.concatenate([x[:1], np.repeat(x[1:], ft, axis=0)], axis=0)
      name = f"video_{k}"
    else:
      x = np.repeat(np.repeat(z[..., :3] / 2.0, 8, axis=1), 8, axis=2)  # about [-1, 1] after / 2
      name = f"latent_preview_{k}"
    out[name] = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  return out


def _shift_fn(cfg) -> Callable:
  """diffusion.time_shift as a grid's shift_fn(u, num_tokens): the factor from the config, the shift in
  u's precision, so that a constant factor gives diffusers' grids to the last bit."""
  from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
  return lambda u, n: samplers.shift(u, float(diffusion.shift_factor(jnp.float32(n), cfg)))
