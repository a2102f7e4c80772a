"""Diffusion objectives over packed rows: rectified flow (default) and DDPM, timestep sampling and shifts,
conditioning masks for image/video prompts, text dropout for classifier-free guidance, and the loss.

Conventions (docs/architecture.md): t in [0, 1] per segment, t = 1 is pure noise.
- Rectified flow: x_t = (1 - t) x_0 + t eps; the model predicts v = eps - x_0.
- DDPM (cfg.diffusion.objective = "ddpm"): cosine schedule alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)),
  normalised to alpha_bar(0) = 1; x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps; the model predicts eps or
  v = sqrt(ab) eps - sqrt(1 - ab) x_0 (cfg.diffusion.prediction). Time is continuous; the DiT sees t.
- Timesteps: logit-normal per segment (flow; uniform for DDPM), then the resolution/duration shift
      a = shift_scale * sqrt(n / shift_ref_tokens),   t' = a t / (1 + (a - 1) t)
  with n the segment's token count (patches over time, height and width), so a segment with 4x the
  tokens of the reference gets a = 2 and more noise at the same t; n = shift_ref_tokens is unchanged.
  (This is SD3's shift with the factor tied to the token count; sampling applies the same shift to its
  time grid: `time_shift(t, num_tokens, cfg)`.) diffusion.shift_rule = "constant" makes a = shift_scale
  for every segment instead (SD3; Wan 2.1 samples with a = flow_shift = 3, or 5 at 720p).
- Loss: per-token squared error (mean over D), averaged over each segment's loss tokens (loss_mask = 1,
  not given as conditioning), then over the segments that have any, so a long video weighs as much as
  an image.

Every public function takes the full config `cfg` and reads `cfg.diffusion`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

COND_MODES = ("none", "first_frame", "first_frames", "last_frames", "both_ends")


# --- Time and schedules -------------------------------------------------------------------------

SHIFT_RULES = ("tokens", "constant")


def shift_factor(num_tokens, cfg):
  """The time-shift factor a of a segment with `num_tokens` tokens; 1 (no shift) if diffusion.time_shift off.

  diffusion.shift_rule "tokens" (the default): a = shift_scale * sqrt(n / shift_ref_tokens), float32;
  "constant": a = shift_scale whatever the size (diffusers' `shift` / `flow_shift`; Wan 2.1: 3, 5 at 720p).
  """
  d = cfg.diffusion
  if not d.time_shift:
    return 1.0
  rule = d.shift_rule or "tokens"
  if rule == "constant":
    return float(d.shift_scale)
  if rule != "tokens":
    raise ValueError(f"diffusion.shift_rule={rule!r} is unknown; accepted: {list(SHIFT_RULES)}")
  return d.shift_scale * jnp.sqrt(jnp.maximum(num_tokens, 1).astype(jnp.float32) / d.shift_ref_tokens)


def time_shift(t: jax.Array, num_tokens: jax.Array, cfg) -> jax.Array:
  """Shifts t towards 1 (more noise): t' = a t / (1 + (a - 1) t) with a = shift_factor(num_tokens, cfg)."""
  a = shift_factor(num_tokens, cfg)
  return a * t / (1.0 + (a - 1.0) * t)


def sample_time(rng: jax.Array, shape, cfg) -> jax.Array:
  """Unshifted timesteps: logit-normal(t_mean, t_std) for flow, uniform for DDPM."""
  d = cfg.diffusion
  if d.objective == "flow":
    return jax.nn.sigmoid(d.t_mean + d.t_std * jax.random.normal(rng, shape))
  return jax.random.uniform(rng, shape)


def cosine_alpha_bar(t: jax.Array, cfg) -> jax.Array:
  """DDPM cosine schedule alpha_bar(t), t in [0, 1]; clipped away from 0 so x_0 = x_t / sqrt(ab) stays finite."""
  s = cfg.diffusion.cosine_s
  f = jnp.cos((t + s) / (1 + s) * jnp.pi / 2) ** 2 / jnp.cos(s / (1 + s) * jnp.pi / 2) ** 2
  return jnp.clip(f, 1e-5, 1.0)


def noisy(x0: jax.Array, eps: jax.Array, t_tok: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """(x_t, regression target) for clean x0 [..., D], noise eps and per-token t [...]."""
  d = cfg.diffusion
  t = t_tok[..., None]
  if d.objective == "flow":
    return (1 - t) * x0 + t * eps, eps - x0
  if d.objective != "ddpm":
    raise ValueError(f"diffusion.objective={d.objective!r} is unknown; accepted: 'flow', 'ddpm'")
  ab = cosine_alpha_bar(t, cfg)
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
  if d.prediction == "eps":
    return x_t, eps
  if d.prediction == "v":
    return x_t, jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
  raise ValueError(f"diffusion.prediction={d.prediction!r} is unknown; accepted: 'eps', 'v'")


def predict_x0(x_t: jax.Array, pred: jax.Array, t_tok: jax.Array, cfg) -> jax.Array:
  """The clean-signal estimate from the model's prediction (for samplers and guidance)."""
  d = cfg.diffusion
  t = t_tok[..., None]
  if d.objective == "flow":
    return x_t - t * pred
  ab = cosine_alpha_bar(t, cfg)
  if d.prediction == "eps":
    return (x_t - jnp.sqrt(1 - ab) * pred) / jnp.sqrt(ab)
  return jnp.sqrt(ab) * x_t - jnp.sqrt(1 - ab) * pred


def predict_eps(x_t: jax.Array, pred: jax.Array, t_tok: jax.Array, cfg) -> jax.Array:
  """The noise estimate from the model's prediction."""
  d = cfg.diffusion
  t = t_tok[..., None]
  if d.objective == "flow":
    return x_t + (1 - t) * pred
  ab = cosine_alpha_bar(t, cfg)
  if d.prediction == "eps":
    return pred
  return jnp.sqrt(1 - ab) * x_t + jnp.sqrt(ab) * pred


# --- Per-segment helpers ------------------------------------------------------------------------

def per_token(values_bs: jax.Array, segment_ids_bl: jax.Array) -> jax.Array:
  """Gathers a per-segment value [B, S] to tokens [B, L] (segment id k reads index k-1; padding reads 0)."""
  idx = jnp.clip(segment_ids_bl - 1, 0, values_bs.shape[1] - 1)
  return jnp.take_along_axis(values_bs, idx, axis=1)


def _one_hot_segments(segment_ids_bl: jax.Array, num_segments: int) -> jax.Array:
  """[B, L, S] float32, row k-1 for segment id k; padding rows are all zero."""
  return jax.nn.one_hot(segment_ids_bl - 1, num_segments, dtype=jnp.float32)


def segment_token_counts(segment_ids_bl: jax.Array, num_segments: int) -> jax.Array:
  """Tokens per segment [B, S] float32."""
  return _one_hot_segments(segment_ids_bl, num_segments).sum(axis=1)


def segment_num_frames(positions_bl3: jax.Array, segment_ids_bl: jax.Array, num_segments: int) -> jax.Array:
  """Latent frames (in time patches) per segment [B, S] int32: 1 + the largest time position; 0 if empty."""
  oh = _one_hot_segments(segment_ids_bl, num_segments) > 0
  return jnp.max(jnp.where(oh, positions_bl3[..., 0:1] + 1, 0), axis=1).astype(jnp.int32)


def segment_mean_loss(err_bl: jax.Array, weight_bl: jax.Array, segment_ids_bl: jax.Array,
                      num_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, seg_loss [B, S], seg_has_loss [B, S]): the weighted mean error within each segment, then the
  mean over segments with any weight, across the whole batch."""
  oh = _one_hot_segments(segment_ids_bl, num_segments)
  w_sum = jnp.einsum("bl,bls->bs", weight_bl, oh)
  e_sum = jnp.einsum("bl,bls->bs", weight_bl * err_bl, oh)
  has = w_sum > 0
  seg_loss = jnp.where(has, e_sum / jnp.maximum(w_sum, 1e-12), 0.0)
  loss = seg_loss.sum() / jnp.maximum(has.sum(), 1)
  return loss, seg_loss, has


def object_tokens(x0_bld: jax.Array, segment_ids_bl: jax.Array, num_segments: int,
                  threshold: float = 1.0) -> jax.Array:
  """[B, L] float32: 1 where a token is further than `threshold` (rms over D, normalised latent units)
  from its segment's mean token, the parts of a clip that are not its flat background."""
  oh = _one_hot_segments(segment_ids_bl, num_segments)
  mean_bsd = jnp.einsum("bls,bld->bsd", oh, x0_bld) / jnp.maximum(oh.sum(1), 1.0)[..., None]
  dev = jnp.sqrt(jnp.mean(jnp.square(x0_bld - jnp.einsum("bls,bsd->bld", oh, mean_bsd)), axis=-1))
  return ((dev > threshold) & (segment_ids_bl > 0)).astype(jnp.float32)


def next_frame_tokens(positions_bl3: jax.Array, segment_ids_bl: jax.Array, num_segments: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(index [B, L] int32, valid [B, L] bool): for each token, the token at the same (h, w) one latent frame
  later in its segment. A segment's tokens lie frame by frame (patching.patchify), so it sits one
  frame's worth of tokens further on; valid is False on a segment's last frame and on padding."""
  seg = segment_ids_bl
  first = ((positions_bl3[..., 0] == 0) & (seg > 0)).astype(jnp.float32)
  per_frame = jnp.einsum("bl,bls->bs", first, _one_hot_segments(seg, num_segments))
  length = seg.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)[None] + per_token(per_frame, seg).astype(jnp.int32)
  idx = jnp.minimum(idx, length - 1)
  at = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  same_place = jnp.all(at(positions_bl3[..., 1:]) == positions_bl3[..., 1:], axis=-1)
  valid = (seg > 0) & (at(seg) == seg) & (at(positions_bl3[..., 0]) == positions_bl3[..., 0] + 1) & same_place
  return idx, valid


def frame_diff_error(residual_bld: jax.Array, weight_bl: jax.Array, positions_bl3: jax.Array,
                     segment_ids_bl: jax.Array, num_segments: int) -> jax.Array:
  """The mean over segments of the squared change of the prediction's error from one latent frame to the
  next at the same place (`diffusion.frame_diff_weight`): zero when a clip's error is the same in every
  frame, large when it jitters from frame to frame. Both tokens of a pair must carry loss weight."""
  idx, valid = next_frame_tokens(positions_bl3, segment_ids_bl, num_segments)
  nxt = jnp.take_along_axis(residual_bld, idx[..., None], axis=1)
  err = jnp.mean(jnp.square(nxt - residual_bld), axis=-1)
  weight = weight_bl * jnp.take_along_axis(weight_bl, idx, axis=1) * valid
  return segment_mean_loss(err, weight, segment_ids_bl, num_segments)[0]


def sample_cond_mask(rng: jax.Array, positions_bl3: jax.Array, segment_ids_bl: jax.Array, num_segments: int,
                     cfg) -> jax.Array:
  """Random image/video-prompt masks [B, L] float32 (1 = given), one mode per segment.

  Modes (probabilities cfg.diffusion.cond_<mode>, the rest is "none"): first latent frame; the first k;
  the last k (k uniform in 1..nt-1); both ends (first and last latent frame, needs nt >= 3). Images and
  segments too short for a mode are never conditioned, so every segment keeps tokens to learn from.
  """
  d = cfg.diffusion
  p = [float(d.cond_first_frame), float(d.cond_first_frames), float(d.cond_last_frames), float(d.cond_both_ends)]
  if sum(p) > 1.0 + 1e-6 or min(p) < 0:
    raise ValueError(f"diffusion.cond_* probabilities {p} must be >= 0 and sum to <= 1")
  probs = jnp.array(p, jnp.float32)
  b = segment_ids_bl.shape[0]
  r_mode, r_k = jax.random.split(rng)
  u = jax.random.uniform(r_mode, (b, num_segments))
  mode = jnp.sum(u[..., None] >= jnp.cumsum(probs), axis=-1)  # 0..3 = a mode, 4 = none
  mode = jnp.where(mode < 4, mode + 1, 0)                      # 0 none, 1..4 = COND_MODES[1:]
  nt = segment_num_frames(positions_bl3, segment_ids_bl, num_segments)
  k = 1 + jnp.floor(jax.random.uniform(r_k, (b, num_segments)) * (nt - 1)).astype(jnp.int32)
  mode = jnp.where(nt >= jnp.where(mode == 4, 3, 2), mode, 0)
  mode_t, k_t, nt_t = (per_token(v, segment_ids_bl) for v in (mode, k, nt))
  f = positions_bl3[..., 0]
  given = (((mode_t == 1) & (f == 0)) | ((mode_t == 2) & (f < k_t)) | ((mode_t == 3) & (f >= nt_t - k_t))
           | ((mode_t == 4) & ((f == 0) | (f == nt_t - 1))))
  return (given & (segment_ids_bl > 0)).astype(jnp.float32)


# --- The training loss --------------------------------------------------------------------------

def frame_share(cfg) -> float:
  """`diffusion.frame_noise_share` a in [0, 1): the fraction of the noise variance that a video's latent
  frames share at each spatial position (eps = sqrt(1 - a) e_own + sqrt(a) e_shared: PYoCo's mixed noise,
  a prior that neighbouring frames look alike). 0 (the default, and Wan's): independent noise."""
  a = float(cfg.diffusion.frame_noise_share)
  if not 0.0 <= a < 1.0:
    raise ValueError(f"diffusion.frame_noise_share={a} is outside [0, 1)")
  return a


def training_noise(rng: jax.Array, shape, segment_ids: jax.Array, positions: jax.Array, a: float
                   ) -> jax.Array:
  """Noise [B, L, D] for packed tokens: independent per token, with a part shared by the tokens of one
  segment at one (h, w) position (every latent frame) when a > 0 (`frame_share`)."""
  r_own, r_shared = jax.random.split(rng)
  eps = jax.random.normal(r_own, shape, jnp.float32)
  if not a:
    return eps
  # One key per (row, segment, h, w), folded in from the shared key: the same draw at every frame.
  cell = (segment_ids.astype(jnp.int32) * 4096 + positions[..., 1]) * 4096 + positions[..., 2]
  row = jnp.broadcast_to(jnp.arange(shape[0], dtype=jnp.int32)[:, None], cell.shape)
  keys = jax.vmap(jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(r_shared, r), c)))(row, cell)
  shared = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, shape[-1:], jnp.float32)))(keys)
  return jnp.sqrt(1.0 - a) * eps + jnp.sqrt(a) * shared


def mix_frame_noise(own_thwc: np.ndarray, shared_hwc: np.ndarray, a: float) -> np.ndarray:
  """Sampling's initial noise [t, h, w, c] with the same frame-shared part as `training_noise`."""
  if not a:
    return own_thwc
  return (np.sqrt(1.0 - a) * own_thwc + np.sqrt(a) * shared_hwc[None]).astype(np.float32)


def loss_fn(model, batch: dict, rng: jax.Array, cfg) -> tuple[jax.Array, dict]:
  """The diffusion loss of `model` (a DiT or any callable with its signature) on a packed batch.

  batch: the packed-batch dict of docs/architecture.md (tokens, positions, segment_ids, loss_mask,
  text_tokens, text_segment_ids; the number of segments S is read from seg_valid's shape).
  Returns (scalar loss, dict of scalar metrics).
  """
  d = cfg.diffusion
  x0 = batch["tokens"].astype(jnp.float32)
  seg = batch["segment_ids"].astype(jnp.int32)
  pos = batch["positions"].astype(jnp.int32)
  s = batch["seg_valid"].shape[1]
  r_t, r_eps, r_drop, r_cond = jax.random.split(rng, 4)

  counts = segment_token_counts(seg, s)
  t_bs = time_shift(sample_time(r_t, counts.shape, cfg), counts, cfg)
  eps = training_noise(r_eps, x0.shape, seg, pos, frame_share(cfg))
  t_tok = per_token(t_bs, seg)
  x_t, target = noisy(x0, eps, t_tok, cfg)

  cond_mask = sample_cond_mask(r_cond, pos, seg, s, cfg)
  text_drop = (jax.random.uniform(r_drop, t_bs.shape) < d.text_drop).astype(jnp.float32)
  x_t = jnp.where(cond_mask[..., None] > 0, x0, x_t)

  pred = model(x_t, pos, seg, t_bs, batch["text_tokens"], batch["text_segment_ids"],
               cond=x0 * cond_mask[..., None], cond_mask=cond_mask, text_drop=text_drop)
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  weight = batch["loss_mask"].astype(jnp.float32) * (1.0 - cond_mask) * (seg > 0)
  if d.object_weight:
    weight = weight * (1.0 + d.object_weight * object_tokens(x0, seg, s))
  loss, seg_loss, has = segment_mean_loss(err, weight, seg, s)
  extra = {}
  if d.frame_diff_weight:
    # An error that changes from frame to frame is an object that jitters or drifts off its path; the
    # plain loss weighs it like one the clip's frames share. This term adds the frame-to-frame change.
    extra["loss_frame_diff"] = frame_diff_error(pred.astype(jnp.float32) - target, weight, pos, seg, s)
  if d.loss_weight == "x0":
    # The flow objective's velocity error is the clean-signal error over t: |v - v_hat| = |x0 - x0_hat| / t.
    # Weighting each segment's loss by its t^2 trains on the x0 error, Sora's "predict the clean patches",
    # which moves the loss from nearly clean inputs (small t) to the noisy ones where layout and motion
    # are decided. (Per segment: inside segment_mean_loss a per-token t^2 would cancel.)
    loss = (seg_loss * jnp.square(t_bs)).sum() / jnp.maximum(has.sum(), 1)
  if extra:
    loss = loss + d.frame_diff_weight * extra["loss_frame_diff"]

  is_image = segment_num_frames(pos, seg, s) == 1
  img, vid = has & is_image, has & ~is_image
  metrics = {
      "loss": loss,
      "loss_image": (seg_loss * img).sum() / jnp.maximum(img.sum(), 1),
      "loss_video": (seg_loss * vid).sum() / jnp.maximum(vid.sum(), 1),
      "num_segments": has.sum().astype(jnp.float32),
      "t_mean": (t_bs * has).sum() / jnp.maximum(has.sum(), 1),
      "cond_token_frac": cond_mask.sum() / jnp.maximum((seg > 0).sum(), 1),
      **extra,
  }
  return loss, metrics
