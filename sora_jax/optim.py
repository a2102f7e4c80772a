"""Optimizers shared by the trainers: AdamW with warmup, a cosine or constant schedule, global-norm
clipping, and the exponential moving average of weights used for sampling.

The config section (`train.optim` for the DiT, `vae_train.optim` for the VAE in experiments/*.py) holds:
  lr, warmup_steps, schedule ("cosine" | "constant"), end_lr_fraction (cosine floor, fraction of lr),
  b1, b2, eps, weight_decay (applied to matrices only, not to biases, norms or embeddings' scales),
  grad_clip (global norm; 0 disables), ema_decay (used by the trainers, not by the optimizer).
"""
from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "constant")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr over cfg.warmup_steps, then cosine decay to the floor or constant."""
  warmup = int(cfg.warmup_steps)
  lr = float(cfg.lr)
  kind = cfg.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule {kind!r} is unknown; accepted: {list(SCHEDULES)}")
  if warmup < 0 or total_steps < 1:
    raise ValueError(f"optim.warmup_steps={warmup} and total_steps={total_steps}: need warmup >= 0, "
                     "total_steps >= 1")
  if kind == "constant":
    after = optax.constant_schedule(lr)
  else:
    decay_steps = max(total_steps - warmup, 1)
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.end_lr_fraction))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


DECAYED = ("kernel", "embed")


def _decay_mask(params):
  # Weight decay on weight matrices (dense/conv kernels, the caption embedding) only: decaying norm
  # scales, biases and the null-text vector towards zero hurts. Decided by the leaf's name, not its rank:
  # scanned layers stack a `layers` axis on every leaf, which makes a [depth, width] norm scale 2-D.
  def decayed(path, _):
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) in DECAYED
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW on the schedule above, after global-norm clipping of the gradients."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  clip = float(cfg.grad_clip)
  if clip < 0:
    raise ValueError(f"optim.grad_clip={clip}: must be >= 0 (0 disables clipping)")
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  return optax.chain(*parts)


def ema_update(ema, params, decay: float | jax.Array):
  """One EMA step, ema <- decay * ema + (1 - decay) * params, leaf by leaf (kept in ema's dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)
