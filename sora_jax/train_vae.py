"""Trains the causal video VAE (models/vae.py) on joint image and video crops.

    python -m sora_jax.train_vae --config experiments/shapes_demo.py --workdir runs/demo/vae

Read top to bottom: loading a trained VAE (used by reconstruct and encode_latents too), the state,
the loss and the pure train step, validation (PSNR/SSIM on noise-free renders of validation specs,
side-by-side reconstruction videos), then the loop.

- Batches (data/vae_batches.py): every step holds a batch of image crops and a batch of video crops,
  each sized by its pixel budget (`vae_train.image_pixels`, `vae_train.video_pixels`). They are a
  function of (seed, step), so the data position needs no checkpoint of its own.
- Loss: L1 + l2_weight * L2 over pixels, + kl_weight * KL per latent element, and optionally a 3D
  patch discriminator (hinge) from `gan_start` on.
- State: {step, params, ema, opt_state, rng[, disc_params, disc_opt_state]} with params and ema as
  `nnx.to_pure_dict`; the layout sora_jax/bundle.py reads (W/checkpoints/<step>/state, key "ema").
  A run resumes from its own newest checkpoint. The config is written to W/config.json.
- A non-finite loss, gradient or parameter never reaches the weights: as in train.py, the step keeps
  the old state and records the first bad step in `bad_step` (carried in training, not checkpointed:
  it is always -1 in a checkpoint); the loop checks it at every log step and before every save, stops
  naming that step, and writes no checkpoint.
- Validation clips are padded to one shape (`val_frames` x `val_size`^2: later frames by repeating
  the last one, which the causal model cannot see from earlier frames; space by edge replication) so
  validation compiles once; scores count only the clip's own pixels.
- `vae_train.max_train_seconds` stops early (with a checkpoint) when a slow machine would overrun
  the demo's budget; the number of steps actually run is logged.
- SIGTERM (preemption) finishes the current step, saves a checkpoint, and exits 0 without the final
  validation; while waiting for data it exits at once (checkpoint.Preemption).
- Devices and hosts: data parallel over the config's `mesh` (sharding.mesh_from_config). The state is
  replicated; each step's image and video batches are split over the mesh's data x fsdp devices, so
  their sizes must be multiples of it. Each process builds only the rows its devices hold (row i of a
  step's batch is a function of (seed, step, i); data/vae_batches.py), so a run gives the same batches
  on any number of hosts and resumes on another one. Only process 0 prints, writes metrics and
  reconstructions; orbax writes each checkpoint from all processes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sora_jax import atomic, checkpoint, metrics, optim
from sora_jax import config as config_lib
from sora_jax import distributed
from sora_jax import sharding
from sora_jax.models import vae as vae_lib

_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", None, "where checkpoints, metrics and reconstructions go")

log = logging.getLogger("sora_jax.train_vae")
State = dict[str, Any]


# ------------------------------------------------------------------------------------------ loading
def load(path: str | os.PathLike, step: int | None = None
         ) -> tuple[vae_lib.VAE, ml_collections.ConfigDict, int | None]:
  """(VAE with EMA weights, config, step) from a VAE training workdir (its newest checkpoint, or the one
  at `step`) or an inference bundle."""
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  root = Path(path)
  if (root / "weights" / "vae").is_dir():
    cfg, _, params, _ = bundle_lib.load_parts(root, check=False)
    step = None
  elif (root / "config.json").is_file() and (root / "checkpoints").is_dir():
    cfg = bundle_lib.config_from_json((root / "config.json").read_text())
    params, step, _ = bundle_lib.restore_ema(root, step)
  else:
    raise FileNotFoundError(f"--vae {path}: neither a VAE workdir (config.json + checkpoints/) nor a "
                            "bundle (weights/vae/)")
  if params is None:
    raise FileNotFoundError(f"--vae {path}: the bundle holds no VAE weights (trained on raw pixels)")
  model = bundle_lib.build_model(lambda: vae_lib.VAE(cfg.vae, rngs=nnx.Rngs(0)), params,
                                 what=f"{path}: VAE")
  return model, cfg, step


# ------------------------------------------------------------------------------------------ state
def _pure(module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init_state(cfg, tx, disc_tx=None) -> tuple[State, Any, Any]:
  """(state, VAE graphdef, discriminator graphdef or None) at step 0."""
  t = cfg.vae_train
  model = vae_lib.VAE(cfg.vae, rngs=nnx.Rngs(int(cfg.seed)))
  graphdef, _ = nnx.split(model, nnx.Param)
  params = _pure(model)
  state = {"step": jnp.int32(0), "params": params, "ema": jax.tree.map(jnp.copy, params),
           "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(int(cfg.seed))),
           "bad_step": jnp.int32(-1)}
  disc_graphdef = None
  if t.gan_weight > 0:
    disc = vae_lib.PatchDiscriminator3D(t.disc_dim, t.disc_layers, rngs=nnx.Rngs(int(cfg.seed) + 1))
    disc_graphdef, _ = nnx.split(disc, nnx.Param)
    state["disc_params"] = _pure(disc)
    state["disc_opt_state"] = disc_tx.init(state["disc_params"])
  return state, graphdef, disc_graphdef


# ------------------------------------------------------------------------------------------ step
def _to_unit(x):
  return x.astype(jnp.float32) / 127.5 - 1.0


def make_train_step(cfg, graphdef, tx, schedule, disc_graphdef=None, disc_tx=None):
  t = cfg.vae_train
  gan = disc_graphdef is not None

  def recon_losses(params, batch, rng):
    model = nnx.merge(graphdef, params)
    out, total_px = {}, 0
    loss = 0.0
    for i, name in enumerate(("images", "videos")):
      x = _to_unit(batch[name])
      recon, mean, logvar = model(x, key=jax.random.fold_in(rng, i))
      err = recon - x
      l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
      kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / np.prod(mean.shape[1:])
      px = int(np.prod(x.shape[:4]))
      loss += px * (t.l1_weight * l1 + t.l2_weight * l2) + px * t.kl_weight * kl
      total_px += px
      out.update({f"{name}/l1": l1, f"{name}/l2": l2, f"{name}/kl": kl,
                  f"{name}/recon": recon, f"{name}/x": x})
    return loss / total_px, out

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    gan_on = (step >= t.gan_start).astype(jnp.float32) if gan else 0.0

    def loss_of(params):
      loss, out = recon_losses(params, batch, rng)
      if gan:
        disc = nnx.merge(disc_graphdef, state["disc_params"])
        g = sum(vae_lib.hinge_g_loss(disc(out[f"{n}/recon"])) for n in ("images", "videos")) / 2
        out["gan/g_loss"] = g
        loss = loss + t.gan_weight * gan_on * g
      return loss, out

    (loss, out), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # The EMA warms up ((1 + n) / (10 + n) caps the decay) so that a short run's EMA forgets the init.
    n = step.astype(jnp.float32)
    decay = jnp.minimum(float(t.optim.ema_decay), (1.0 + n) / (10.0 + n))
    new = dict(state, step=step + 1, params=params, opt_state=opt_state,
               ema=optim.ema_update(state["ema"], params, decay))
    m = {"loss": loss, "lr": schedule(step), "grad_norm": optax.global_norm(grads),
         "param_norm": optax.global_norm(params), "update_norm": optax.global_norm(updates)}
    # A huge learning rate can overflow the parameters while loss and gradient are still finite.
    ok = jnp.isfinite(loss) & jnp.isfinite(m["grad_norm"]) & jnp.isfinite(m["param_norm"])
    for name in ("images", "videos"):
      for k in ("l1", "l2", "kl"):
        m[f"{name}/{k}"] = out[f"{name}/{k}"]
      # PSNR of the (noisy) training crops, in [0, 255] units: a cheap progress signal.
      m[f"{name}/psnr"] = 10 * jnp.log10(4.0 / jnp.maximum(out[f"{name}/l2"], 1e-12))
    if gan:
      def d_loss_of(dparams):
        disc = nnx.merge(disc_graphdef, dparams)
        return sum(vae_lib.hinge_d_loss(disc(out[f"{n}/x"]), disc(jax.lax.stop_gradient(
            out[f"{n}/recon"]))) for n in ("images", "videos")) / 2
      d_loss, d_grads = jax.value_and_grad(d_loss_of)(state["disc_params"])
      d_updates, d_opt = disc_tx.update(d_grads, state["disc_opt_state"], state["disc_params"])
      keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(gan_on > 0, u, v), a, b)
      new["disc_params"] = keep(optax.apply_updates(state["disc_params"], d_updates),
                                state["disc_params"])
      new["disc_opt_state"] = keep(d_opt, state["disc_opt_state"])
      m["gan/d_loss"], m["gan/g_loss"] = d_loss, out["gan/g_loss"]
      ok = ok & jnp.isfinite(d_loss)
    # Steps are counted from 1 in logs and checkpoints: the step that produced state step + 1.
    new = {k: v if k == "step" else jax.tree.map(lambda a, b: jnp.where(ok, a, b), v, state[k])
           for k, v in new.items()}
    new["bad_step"] = jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step + 1)
    return new, m

  return train_step


# ------------------------------------------------------------------------------------- validation
def validation_clips(cfg, data_dir: str) -> list[dict]:
  """Noise-free renders of the validation split's specs (or its stored videos for other data), cut
  to at most val_frames frames (1 + ft*k) and val_size^2 pixels."""
  from sora_jax.data import shapes, sources  # pylint: disable=g-import-not-at-top
  t, s = cfg.vae_train, vae_lib.settings(cfg.vae)
  src = sources.video_source(data_dir, "validation")
  clips = []
  for i in range(min(int(t.num_val), len(src))):
    rec = src[i]
    labels = rec.get("labels") or ""
    video = (shapes.render_clip(shapes.ClipSpec.from_json(labels), noise_std=0.0) if labels
             else np.asarray(rec["video"]))
    frames = min(video.shape[0], int(t.val_frames))
    frames = 1 + (frames - 1) // s.temporal_factor * s.temporal_factor
    h = min(video.shape[1], int(t.val_size)) // s.spatial_factor * s.spatial_factor
    w = min(video.shape[2], int(t.val_size)) // s.spatial_factor * s.spatial_factor
    y0, x0 = (video.shape[1] - h) // 2, (video.shape[2] - w) // 2
    clips.append({"video": video[:frames, y0:y0 + h, x0:x0 + w], "caption": rec.get("caption", "")})
  if not clips:
    raise ValueError(f"{data_dir}: the validation split is empty")
  return clips


def _pad_to(video: np.ndarray, frames: int, size: int) -> np.ndarray:
  t, h, w = video.shape[:3]
  return np.pad(video, ((0, frames - t), (0, size - h), (0, size - w), (0, 0)), mode="edge")


def make_reconstruct_fn(graphdef):
  """Jitted uint8 [B, T, H, W, 3] -> uint8 reconstruction through the posterior mean."""

  @jax.jit
  def reconstruct(params, video_u8):
    model = nnx.merge(graphdef, params)
    mean, _ = model.encode(_to_unit(video_u8))
    x = jnp.clip(model.decode(mean), -1.0, 1.0)
    return jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)

  return reconstruct


def validate(reconstruct, params, clips: list[dict], cfg, *, batch: int = 4) -> tuple[dict, list]:
  """Mean PSNR/SSIM over `clips` (videos and images separately too), and the reconstructions."""
  t = cfg.vae_train
  recons = []
  for i in range(0, len(clips), batch):
    part = clips[i:i + batch]
    x = np.stack([_pad_to(c["video"], int(t.val_frames), int(t.val_size)) for c in part])
    x = np.concatenate([x, np.repeat(x[-1:], batch - len(part), axis=0)])  # one compiled shape
    y = np.asarray(reconstruct(params, x))
    for c, r in zip(part, y):
      f, h, w = c["video"].shape[:3]
      recons.append(r[:f, :h, :w])
  scores = {"psnr": [], "ssim": [], "image_psnr": [], "video_psnr": []}
  for c, r in zip(clips, recons):
    p = metrics.psnr(c["video"], r)
    scores["psnr"].append(p)
    scores["ssim"].append(metrics.ssim(c["video"], r))
    scores["image_psnr" if c["video"].shape[0] == 1 else "video_psnr"].append(p)
  return {k: float(np.mean(v)) for k, v in scores.items() if v}, recons


def write_side_by_side(out_dir: Path, step: int, clips: list[dict], recons: list, n: int) -> None:
  from sora_jax import video_io  # pylint: disable=g-import-not-at-top
  for i, (c, r) in enumerate(zip(clips[:n], recons[:n])):
    both = np.concatenate([c["video"], np.zeros_like(c["video"][:, :, :2]), r], axis=2)
    suffix = ".png" if both.shape[0] == 1 else ".mp4"
    video_io.write_video(out_dir / f"step{step:06d}_{i:02d}{suffix}", both, fps=8.0)


# ------------------------------------------------------------------------------------------ main
def _data_dir(cfg, workdir: str) -> str:
  return config_lib.complete(cfg).data.videos_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data",
                                             "shapes")


class NonFiniteLoss(FloatingPointError):
  pass


def _check_finite(state: State) -> None:
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    raise NonFiniteLoss(f"non-finite VAE loss, gradient or parameters at step {bad}; stopping without "
                        "saving (parameters are those after the last finite step)")


def _checkpointed(state: State) -> State:
  """The state as checkpoints hold it: without `bad_step`, which is -1 whenever one is written."""
  return {k: v for k, v in state.items() if k != "bad_step"}


def local_rows(batch_sharding, shape) -> tuple[int, int]:
  """The rows [start, stop) of a batch-sharded global array that this process's devices hold."""
  spans = {(i[0].start or 0, shape[0] if i[0].stop is None else i[0].stop)
           for i in batch_sharding.addressable_devices_indices_map(shape).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"this process's rows of a {shape[0]}-row batch are not contiguous: {sorted(spans)}")
  return start, stop


def check_config(cfg: ml_collections.ConfigDict, devices=None) -> tuple[Any, Any]:
  """The (image, video) crops of a step; raises config.ConfigError (one line: the key, its value, what
  is accepted) for a config this trainer cannot run, before any data is read or anything compiled."""
  from sora_jax.data.vae_batches import Crop  # pylint: disable=g-import-not-at-top
  t = cfg.vae_train
  for key in ("total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if int(t[key]) < 1:
      raise config_lib.ConfigError(f"config.vae_train.{key}={t[key]}: must be >= 1")
  try:
    s = vae_lib.settings(cfg.vae)
    optim.make_optimizer(t.optim, int(t.total_steps))
    mesh = sharding.mesh_from_config(cfg.mesh, devices)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f"config.{e}") from None
  crops = {}
  for name, frames, size in (("image", 1, t.image_crop), ("video", t.video_frames, t.video_crop)):
    if (frames - 1) % s.temporal_factor or size % s.spatial_factor:
      raise config_lib.ConfigError(
          f"config.vae_train.{name} crop {frames}x{size}x{size} is off the VAE's grid: frames "
          f"1 + {s.temporal_factor}*k, size a multiple of {s.spatial_factor}")
    try:
      crops[name] = Crop.for_budget(int(frames), size, size, int(t[name + "_pixels"]))
    except ValueError as e:
      raise config_lib.ConfigError(f"config.vae_train.{name}_pixels={t[name + '_pixels']}: {e}") from None
  n_dp = sharding.batch_size_multiple(mesh)
  for name, crop in crops.items():
    if crop.batch % n_dp:
      raise config_lib.ConfigError(
          f"config.vae_train.{name}_pixels={t[name + '_pixels']} makes {crop.batch} {name} crops per "
          f"step, not a multiple of the mesh's data x fsdp = {n_dp} devices; give a multiple of {n_dp} "
          f"crops of {crop.frames}x{crop.height}x{crop.width} pixels")
  return crops["image"], crops["video"]


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training; returns the final validation scores."""
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from sora_jax.data.vae_batches import VAEBatches  # pylint: disable=g-import-not-at-top
  t = cfg.vae_train
  image, video = check_config(cfg)
  s = vae_lib.settings(cfg.vae)
  if distributed.is_main():
    os.makedirs(workdir, exist_ok=True)
    Path(workdir, "config.json").write_text(config_lib.to_json(cfg))
  data_dir = _data_dir(cfg, workdir)
  # Both splits before anything is compiled or trained: a missing validation split would otherwise
  # only show at the end, when the trained VAE is scored on it.
  try:
    train_src = sources.video_source(data_dir, "train")
    clips = validation_clips(cfg, data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise config_lib.ConfigError(
        f"config.data.videos_dir={data_dir}: {str(e).splitlines()[0]} (the VAE trains on the train split "
        "and is scored on the validation split: ingest both, data_pipelines/ingest_videos.py --split)"
    ) from None
  batches = VAEBatches(train_src, image=image, video=video, seed=int(cfg.seed), crop_tries=int(t.crop_tries))

  total = int(t.total_steps)
  tx = optim.make_optimizer(t.optim, total)
  schedule = optim.make_schedule(t.optim, total)
  disc_tx = optim.make_optimizer(t.optim, total) if t.gan_weight > 0 else None
  state, graphdef, disc_graphdef = init_state(cfg, tx, disc_tx)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  mesh = sharding.mesh_from_config(cfg.mesh)
  # Host values that are the same on every process: device_put gives each process its devices' parts.
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh, 5)
  state = jax.device_put(state, replicated)

  ckpt = checkpoint.Manager(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                            save_interval_steps=int(t.checkpoint_every_steps))
  # The newest checkpoint that restores; damaged newer ones are named, set aside, and skipped.
  resumed = ckpt.restore_newest(jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _checkpointed(state)))
  if resumed is not None:
    state = dict(resumed[1], bad_step=state["bad_step"])
    log.info("resumed from step %d", resumed[0])
  start = int(state["step"])
  writer = metrics.MetricWriter(workdir)

  # Installed before the compile: a SIGTERM then ends the run cleanly at the first step boundary.
  preempt = checkpoint.Preemption()
  try:
    step_fn = make_train_step(cfg, graphdef, tx, schedule, disc_graphdef, disc_tx)
    spans = {"images": local_rows(batch_sharding, image.shape),
             "videos": local_rows(batch_sharding, video.shape)}
    example = pipeline.to_global(batches.batch(0, spans), mesh)
    t0 = time.time()
    compiled = jax.jit(step_fn, donate_argnums=(0,), out_shardings=replicated).lower(state, example).compile()
    compile_s = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = float((cost or {}).get("flops", 0.0))
    mem = compiled.memory_analysis()
    pixels = image.batch * image.height * image.width + video.batch * video.frames * video.height * \
        video.width
    print(f"[vae] {n_params / 1e6:.2f}M params, factors t{s.temporal_factor} s{s.spatial_factor}, "
          f"z {s.z_dim}; batch {image.batch}x{image.shape[1:4]} images + {video.batch}x"
          f"{video.shape[1:4]} videos = {pixels} px/step; compiled in {compile_s:.1f}s; "
          f"{step_flops / 1e9:.1f} GFLOP/step; temp memory "
          f"{getattr(mem, 'temp_size_in_bytes', 0) / 2**20:.0f} MiB", flush=True)

    reconstruct = make_reconstruct_fn(graphdef)
    recon_dir = Path(workdir, "reconstructions")

    def run_validation(step):
      scores, recons = validate(lambda p, x: reconstruct(p, jax.device_put(x, replicated)), state["ema"],
                                clips, cfg)
      writer.write_scalars(step, {f"val/{k}": v for k, v in scores.items()})
      if distributed.is_main():
        write_side_by_side(recon_dir, step, clips, recons, int(t.recon_videos))
      print(f"[vae] step {step}: validation (EMA, noise-free renders, {len(clips)} clips) "
            + " ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
      return scores

    budget = float(t.max_train_seconds)
    t_start = last_t = time.time()
    last_cpu = time.process_time()  # CPU seconds: on a shared machine, wall time says little
    last_step, step = start, start
    it = batches.iterate(start, spans=spans)
    block_every_step = distributed.block_each_step()
    try:
      for step in range(start, total):
        try:
          with preempt.waiting():
            host_batch = next(it)
        except checkpoint.Preempted:
          break
        state, m = compiled(state, pipeline.to_global(host_batch, mesh))
        if block_every_step:
          jax.block_until_ready(m)
        done = step + 1
        out_of_time = budget > 0 and time.time() - t_start > budget
        if done % int(t.log_every_steps) == 0 or done == total or out_of_time:
          _check_finite(state)
          m = jax.device_get(m)
          now = time.time()
          dt = (now - last_t) / max(done - last_step, 1)
          cpu = time.process_time()
          m.update({"step_time_s": dt, "pixels_per_s": pixels / dt,
                    "cpu_s_per_step": (cpu - last_cpu) / max(done - last_step, 1),
                    "gflops_per_s": step_flops / dt / 1e9, "train_minutes": (now - t_start) / 60})
          writer.write_scalars(done, m)
          print(f"[vae] step {done}/{total} loss {m['loss']:.4f} video psnr(noisy) "
                f"{m['videos/psnr']:.2f} image psnr {m['images/psnr']:.2f} {dt:.2f}s/step "
                f"({m['cpu_s_per_step']:.2f} CPU-s/step) {pixels / dt:.0f} px/s", flush=True)
          last_t, last_step, last_cpu = now, done, cpu
        if int(t.val_every_steps) and done % int(t.val_every_steps) == 0 and done != total:
          _check_finite(state)
          run_validation(done)
        if out_of_time or preempt.flag or done % ckpt.save_interval_steps == 0:
          _check_finite(state)  # before every save: a checkpoint never holds non-finite weights
          ckpt.save(done, _checkpointed(state), force=out_of_time or preempt.flag)
        if preempt.flag:
          break
        if out_of_time:
          print(f"[vae] stopping at step {done}: vae_train.max_train_seconds={budget:.0f} reached",
                flush=True)
          break
    except BaseException:
      ckpt.close()  # an earlier step's (finite) save may still be in flight: finish it
      raise
    finally:
      it.close()
    done = int(state["step"])
    if preempt.flag:
      if done > start:  # a SIGTERM that came while waiting for data found this step unsaved
        _check_finite(state)
        ckpt.save(done, _checkpointed(state), force=True)  # a no-op if the loop saved it
      ckpt.close()
      writer.close()
      print(f"[vae] SIGTERM: saved step {done}; exiting" if done > start else
            "[vae] SIGTERM before the first step; exiting", flush=True)
      return {"step": done, "preempted": True}
    _check_finite(state)
    ckpt.save(done, _checkpointed(state), force=True)
    scores = run_validation(done)
    ckpt.wait()
    ckpt.close()
    summary = {"step": done, "params": n_params, "train_seconds": time.time() - t_start,
               "pixels_per_step": pixels, **{f"val_{k}": v for k, v in scores.items()}}
    if distributed.is_main():
      atomic.write_text(Path(workdir, "final_metrics.json"), json.dumps(summary, indent=2))
    writer.flush()
    writer.close()
    return summary
  finally:
    preempt.restore()


def main(argv):
  del argv
  cfg = config_lib.get_config()
  if not _WORKDIR.value:
    config_lib._fail("--workdir is required")  # pylint: disable=protected-access
  logging.getLogger().setLevel(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize()  # joins the process group on multi-host launches; no-op on one host
  try:
    train(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint.Unrestorable) as e:
    config_lib._fail(str(e))  # pylint: disable=protected-access
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  config_lib.run(main)
