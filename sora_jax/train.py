"""Trains the text-conditioned DiT on packed spacetime-patch rows, on any mesh from this CPU to a pod.

    python -m sora_jax.train --config experiments/shapes_demo.py --workdir runs/demo/dit

Read top to bottom: the state and its shardings, the pure train step, compile-first reporting (memory,
FLOPs vs the compiler's count), then the loop (metrics, checkpoints, samples, preemption).

- State: a plain dict pytree {step, params, ema, opt_state, rng, bad_step} (params and ema as
  `nnx.to_pure_dict`), sharded by sharding.state_shardings (FSDP by default, tensor parallel when the
  mesh has a `tensor` axis > 1); the batch is sharded over data x fsdp.
- The step is one `jax.jit` with explicit in/out shardings and the state donated; the model is rebuilt
  inside it with `nnx.merge` (docs/hazards.md: the functional form, not nnx.jit). Per-step randomness is
  `fold_in(rng, step)`, so a resumed run draws exactly what an uninterrupted one would.
- A non-finite loss or gradient never reaches the parameters: the step keeps the old params, optimizer
  and EMA and records the first bad step in `bad_step`; the loop checks it at every log step and before
  every save, stops naming that step, and writes no checkpoint.
- Resume precedence (`resolve_start`, the one place it is decided): this workdir's own checkpoints, then
  `config.train.resume_from` (another run's checkpoint directory: everything, including the data
  position), then `config.train.init_from` (weights only: params and EMA; fresh optimizer, step 0:
  another run's checkpoints, or an inference bundle such as a converted Wan 2.1, sora_jax/finetune.py),
  then scratch.
- A run on the pipeline's latents records the VAE they came from (LATENTS_VAE) and refuses to resume on
  another VAE's (`pin_latents`); it logs a held-out loss on the validation latents (`val/loss`, every
  `train.val_every_steps`) and decodes its periodic sample videos through that VAE.
- LoRA (`config.lora.rank` > 0, models/lora.py): "params", "ema" and the optimizer hold only the
  adapters; the base weights ride in the state as "frozen" (read from the init_from bundle at every
  start, no gradient, no optimizer state) and are left out of checkpoints (finetune.trained).
- SIGTERM (preemption) finishes the current step, saves a checkpoint with the data position, exits 0;
  while the loop waits for data (which may never come), it saves and exits at once.
- Config mistakes end the command with one line (exit 2) before any data is read or step compiled
  (`check_config`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sora_jax import atomic, checkpoint, finetune, flops, metrics, optim, sampling, sharding
from sora_jax import config as config_lib
from sora_jax import distributed

_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", None, "where checkpoints, metrics and samples go")

log = logging.getLogger("sora_jax.train")

State = dict[str, Any]
LossFn = Callable[[nnx.Module, dict, jax.Array, ml_collections.ConfigDict], tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------------- state, shardings
def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  from sora_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  model = DiT(cfg.dit, rngs=rngs)
  return lora.apply(model, cfg.lora, rngs=rngs) if lora.enabled(cfg) else model


def default_loss_fn() -> LossFn:
  from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
  return diffusion.loss_fn


def _ema_decay(cfg, step):
  # Warm the EMA up ((1 + n) / (10 + n) caps the decay early on) so that short runs, like the demo's,
  # get an EMA that has forgotten the random init.
  decay = float(cfg.train.optim.ema_decay)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


@dataclasses.dataclass
class Setup:
  """What the loop needs: the model's graph, the optimizer, and the state's abstract form and layout."""
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: State        # jax.ShapeDtypeStruct leaves carrying their shardings
  shardings: State
  num_params: int              # trained parameters (under LoRA: the adapters)
  trainable: Any = nnx.Param   # the nnx filter of trained parameters; the other Params are "frozen"
  num_frozen: int = 0


def make_setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               model_fn: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module] = make_model) -> Setup:
  """Builds the model abstractly (no memory), and the shardings of the whole train state."""
  total = int(cfg.train.total_steps)
  tx = optim.make_optimizer(cfg.train.optim, total)
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_fn(cfg, nnx.Rngs(0)))
  trainable = lora.trainable(cfg)
  graphdef, abs_params, abs_frozen, abs_rest = nnx.split(abstract_model, trainable, nnx.Param, ...)
  if jax.tree.leaves(nnx.to_pure_dict(abs_rest)):
    raise ValueError("the model holds non-Param state "
                     f"({sorted(str(p) for p, _ in abs_rest.flat_state())}); this trainer carries "
                     "params only: pass randomness through the loss's rng")
  param_sh = sharding.state_shardings(abs_params, mesh)
  params = nnx.to_pure_dict(abs_params)
  rep = sharding.replicated(mesh)
  abs_opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  scalar_i32 = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = {"step": scalar_i32, "params": params, "ema": params, "opt_state": abs_opt,
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "bad_step": scalar_i32}
  shardings = {"step": rep, "params": param_sh, "ema": param_sh, "opt_state": opt_sh, "rng": rep,
               "bad_step": rep}
  frozen = nnx.to_pure_dict(abs_frozen)
  if jax.tree.leaves(frozen):  # LoRA: the base, sharded like the full model
    abstract["frozen"], shardings["frozen"] = frozen, sharding.state_shardings(abs_frozen, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          shardings)
  count = lambda tree: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))
  return Setup(graphdef, tx, optim.make_schedule(cfg.train.optim, total), abstract, shardings,
               count(params), trainable, count(frozen))


def init_state(cfg, setup: Setup, model_fn=make_model, weights: dict | None = None) -> State:
  """A fresh state, created directly in its sharded layout (no full copy on any one device).

  `weights` (a pure dict of some parameters, e.g. a bundle's: finetune.py; consumed) replace the random
  init of those parameters; XLA drops the init they replace."""

  def init(seed, weights):
    with nnx.use_eager_sharding(False):
      model = model_fn(cfg, nnx.Rngs(jax.random.fold_in(seed, 0)))
    if weights is not None:
      nnx.update(model, weights)
    params = nnx.to_pure_dict(nnx.state(model, setup.trainable))
    state = {"step": jnp.int32(0), "params": params, "ema": params, "opt_state": setup.tx.init(params),
             "rng": jax.random.fold_in(seed, 1), "bad_step": jnp.int32(-1)}
    if "frozen" in setup.abstract_state:
      state["frozen"] = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(setup.trainable))))
    return state

  # `weights` are donated: they become the params (or the frozen base) without a second copy in HBM.
  return jax.jit(init, out_shardings=setup.shardings, donate_argnums=1)(jax.random.PRNGKey(int(cfg.seed)),
                                                                         weights)


# ---------------------------------------------------------------------------------------- train step
def make_train_step(cfg, setup: Setup, loss_fn: LossFn) -> Callable[[State, dict], tuple[State, dict]]:
  """The pure step: (state, global batch) -> (new state, scalar metrics)."""
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    frozen = (state["frozen"],) if "frozen" in state else ()  # LoRA's base: an input, never differentiated

    def loss_of(params):
      model = nnx.merge(graphdef, params, *frozen)
      return loss_fn(model, batch, rng, cfg)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optim.ema_update(state["ema"], params, _ema_decay(cfg, step))
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {
        "step": step + 1,
        "params": keep(params, state["params"]),
        "ema": keep(ema, state["ema"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": state["rng"],
        # Steps are counted from 1 in logs and checkpoints: the step that produced state step + 1.
        "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step + 1),
        **({"frozen": state["frozen"]} if frozen else {}),
    }
    scalars = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    scalars.update(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates), lr=schedule(step),
                   tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32))
    return new_state, scalars

  return train_step


def batch_shardings(batch: dict, mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def compile_step(step_fn, setup: Setup, batch: dict, mesh):
  """`lower().compile()` of the jitted step for this batch's shapes, with the state donated."""
  b_sh = batch_shardings(batch, mesh)
  jitted = jax.jit(step_fn, in_shardings=(setup.shardings, b_sh),
                   out_shardings=(setup.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  # `batch` is host-local: the step sees the global batch, process_count times as many rows.
  abstract_batch = {k: jax.ShapeDtypeStruct((np.shape(v)[0] * jax.process_count(),) + np.shape(v)[1:],
                                            np.asarray(v).dtype, sharding=b_sh[k])
                    for k, v in batch.items()}
  with sharding.use_mesh(mesh):
    lowered = jitted.lower(setup.abstract_state, abstract_batch)
  return lowered.compile()


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def memory_report(compiled) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  return {k.replace("_size_in_bytes", "_mib"): getattr(mem, k, 0) / 2**20 for k in keys}


# --------------------------------------------------------------------------------------- resume policy
@dataclasses.dataclass(frozen=True)
class Start:
  kind: str                    # "workdir" | "resume_from" | "init_from" | "bundle" | "scratch"
  directory: str | None = None
  step: int | None = None


def resolve_start(cfg, ckpt_dir: str, own: checkpoint.Manager) -> Start:
  """The one place resume precedence is decided: own workdir > resume_from > init_from > scratch."""
  step = own.latest_step()
  if step is not None:
    return Start("workdir", ckpt_dir, step)
  for kind in ("resume_from", "init_from"):
    path = cfg.train[kind]
    if not path:
      continue
    if kind == "init_from" and finetune.is_bundle(path):  # an inference bundle: its DiT's weights
      return Start("bundle", path)
    # A run's workdir or its checkpoints/ directory are both accepted.
    directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    other = checkpoint.Manager(directory)
    step = other.latest_step()
    other.close()
    if step is None:
      raise ValueError(f"config.train.{kind}={path!r} holds no finished checkpoint")
    return Start(kind, directory, step)
  return Start("scratch")


def load_start(start: Start, cfg, setup: Setup, own: checkpoint.Manager, data_iter,
               model_fn=make_model) -> State:
  """The state to start from. A damaged newest checkpoint falls back to the newest one that restores
  (checkpoint.Manager.restore_newest: one warning line each, naming it and why); in this run's own
  directory the damaged ones are set aside, another run's are left as they are. Under LoRA the frozen
  base, which checkpoints do not hold, is read again from the init_from bundle (or the seeded init)."""
  lora_base = "frozen" in setup.abstract_state
  init_from = cfg.train.init_from  # under LoRA a bundle or nothing (check_config)
  workdir = os.path.dirname(own.directory)
  if start.kind == "scratch":
    return init_state(cfg, setup, model_fn)
  if start.kind == "bundle":
    return init_state(cfg, setup, model_fn, finetune.bundle_weights(cfg, setup, start.directory, workdir=workdir))
  trained = finetune.trained(setup.abstract_state)
  if start.kind == "workdir":
    state = own.restore_newest(trained, data_iter)[1]
  else:
    other = checkpoint.Manager(start.directory)
    try:
      if start.kind == "resume_from":
        state = other.restore_newest(trained, data_iter, set_aside=False)[1]
      else:  # init_from: weights only. The source must have this model's parameter tree and optimizer chain.
        loaded = other.restore_newest(trained, set_aside=False)[1]
        state = init_state(cfg, setup, model_fn)
        state["params"], state["ema"] = loaded["params"], loaded["ema"]
    finally:
      other.close()
  if lora_base and "frozen" not in state:  # checkpoints do not hold the base: its bundle, or the seeded init
    state["frozen"] = (finetune.bundle_weights(cfg, setup, init_from, workdir=workdir) if init_from
                       else init_state(cfg, setup, model_fn)["frozen"])
  return state


# ---------------------------------------------------------------------------------------------- loop
class NonFiniteLoss(RuntimeError):
  pass


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).item(), tree)


def _maybe_samples(cfg, step: int, state: State, setup: Setup, writer: metrics.MetricWriter,
                   batch: dict, decode: Callable | None = None) -> None:
  """Periodic sample videos (sampling.training_samples), decoded to pixels by `decode`
  (`sample_decoder`), else latent previews."""
  model = nnx.merge(setup.graphdef, state["ema"], *([state["frozen"]] if "frozen" in state else []))
  t0 = time.time()
  try:
    videos = sampling.training_samples(model, cfg, batch, jax.random.PRNGKey(step), decode=decode)
  except Exception as e:  # pylint: disable=broad-except  # a side output must not end a training run
    log.warning("step %d: sample videos failed: %s: %s", step, type(e).__name__, e)
    return
  fps = float(config_lib.complete(cfg).sample.fps)
  for name, frames in videos.items():
    writer.write_video(step, f"samples/{name}", np.asarray(frames), fps=fps)
  log.info("step %d: %d sample videos (EMA weights, captions of the last batch) in %.1fs", step,
           len(videos), time.time() - t0)


def sample_decoder(cfg, workdir: str) -> Callable[[np.ndarray], np.ndarray] | None:
  """normalised latents [t, h, w, c] -> uint8 frames, through the VAE that encoded the training latents
  (latent_stats.json's record), for the periodic sample videos; None (latent previews) for the raw
  "shapes" source or when that VAE is not where the record says (one warning)."""
  from sora_jax import bundle, train_vae  # pylint: disable=g-import-not-at-top
  from sora_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  record = pipeline.latents_vae(cfg, workdir=workdir)
  if not record or not record.get("path"):
    return None
  try:
    vae, _, _ = train_vae.load(record["path"], step=record.get("step"))
  except (FileNotFoundError, ValueError) as e:
    log.warning("sample videos are latent previews: %s does not load (%s)", sources.describe_vae(record),
                str(e).splitlines()[0])
    return None
  weights = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
  if record.get("sha256") and bundle.params_sha256(weights) != record["sha256"]:
    log.warning("sample videos are latent previews: %s now holds other weights", sources.describe_vae(record))
    return None
  shift, scale = pipeline.latent_stats(cfg, workdir=workdir)
  return sampling.Pipeline(cfg, None, vae, None, shift, scale).decode


def held_out_loss(cfg, setup: Setup, loss_fn: LossFn, mesh, workdir: str) -> Callable[[State], float] | None:
  """state -> the loss of its EMA weights on the first `train.val_batches` batches of the validation split,
  with timesteps and noise fixed by the seed (comparable from step to step); None when
  train.val_every_steps is 0.
  Without a validation split the run says so now, before training, and trains without a held-out loss
  (a stale split, one of another VAE, stops it: sources.StaleLatents)."""
  if int(cfg.train.val_every_steps) <= 0:
    return None
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    it = pipeline.make_iterator(cfg, split="validation", workdir=workdir)
  except FileNotFoundError as e:
    log.warning("no held-out loss: %s (encode a validation split with data_pipelines/encode_latents.py, "
                "or set --config.train.val_every_steps=0)", str(e).splitlines()[0])
    return None
  batches = []
  for batch in it:
    if np.any(batch["segment_ids"] > 0):  # the split's last batch is padded with empty rows
      batches.append(batch)
    if len(batches) == int(cfg.train.val_batches):
      break
  if not batches:
    raise config_lib.ConfigError("config.train.val_every_steps: the validation split holds no sample that "
                                 "fits a row")
  graphdef = setup.graphdef

  @jax.jit
  def loss_of(params, rest, batch, rng):
    return loss_fn(nnx.merge(graphdef, params, *rest), batch, rng, cfg)[0]

  key = jax.random.PRNGKey(int(cfg.seed) + 1)

  def evaluate(state: State) -> float:
    # Parameters the state carries untrained (a LoRA run's frozen base) complete the model.
    rest = tuple(state[k] for k in ("frozen",) if k in state)
    with sharding.use_mesh(mesh):
      losses = [loss_of(state["ema"], rest, pipeline.to_global(b, mesh), jax.random.fold_in(key, i))
                for i, b in enumerate(batches)]
    return float(np.mean(jax.device_get(losses)))

  return evaluate


def prepare_config(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A resolved copy of the config with `dit.in_dim` = 0 filled in from the data's latent channels."""
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from sora_jax.models import dit  # pylint: disable=g-import-not-at-top
  cfg = config_lib.complete(cfg.copy_and_resolve_references())
  channels = lambda: len(pipeline.latent_stats(cfg, workdir=workdir)[0])
  cfg.dit.in_dim = dit.resolve_in_dim(cfg.dit, channels)
  return cfg


def check_config(cfg: ml_collections.ConfigDict, devices=None, *, pipeline: bool = True) -> None:
  """Raises config.ConfigError (one line: the key, its value, what is accepted) for a config this
  trainer cannot run, before any data is read or anything compiled. `pipeline`: the batches come from
  sora_jax.data.pipeline (not a caller's stream), so its size-fitting settings are checked too."""
  from sora_jax.models import attention, layers  # pylint: disable=g-import-not-at-top
  cfg = config_lib.complete(cfg)
  cfg_get = lambda key: functools.reduce(lambda node, k: node[k], key.split("."), cfg)
  given = lambda key: key.rsplit(".", 1)[-1] in cfg_get(key.rsplit(".", 1)[0])
  fail = lambda key, accepted: config_lib.ConfigError(f"config.{key}={cfg_get(key)!r}: {accepted}")
  if int(cfg.train.total_steps) < 1:
    raise fail("train.total_steps", "must be >= 1")
  for key in ("data.batch_size", "data.seq_len", "train.log_every_steps", "train.checkpoint_every_steps",
              "train.keep_checkpoints", "train.val_batches"):
    if given(key) and int(cfg_get(key)) < 1:
      raise fail(key, "must be >= 1")
  for key in ("train.sample_every_steps", "train.val_every_steps", "train.max_train_seconds"):  # 0 = off
    if given(key) and float(cfg_get(key)) < 0:
      raise fail(key, "must be >= 0 (0: off)")
  if cfg.dit.remat not in layers.REMAT:
    raise fail("dit.remat", f"accepted: {sorted(layers.REMAT)}")
  try:
    attention.resolve(cfg.dit.attention)
  except ValueError as e:
    raise fail("dit.attention", str(e).split("; ")[-1]) from None
  if "context" in cfg.dit:
    try:
      attention.check_context(cfg.dit.context)
    except ValueError as e:
      raise fail("dit.context", str(e).split("; ")[-1]) from None
  try:
    optim.make_optimizer(cfg.train.optim, int(cfg.train.total_steps))
  except ValueError as e:
    raise config_lib.ConfigError(f"config.train.{e}") from None
  d = cfg.data
  budget = int(d.token_budget) or int(d.seq_len)
  if pipeline and budget > int(d.seq_len):
    raise fail("data.token_budget", f"exceeds data.seq_len={d.seq_len}: a sample must fit a row")
  side = int(d.min_patch_side)
  # Size fitting never shrinks a sample below min_patch_side patches a side: a smaller budget drops
  # every sample, and the endless training stream would wait forever for a first row.
  if pipeline and budget < side * side:
    key = "data.token_budget" if int(d.token_budget) else "data.seq_len"
    raise config_lib.ConfigError(
        f"config.{key}={cfg_get(key)} leaves {budget} tokens per sample, below the smallest sample "
        f"({side}x{side} patches, data.min_patch_side={side}): every sample would be dropped; give at "
        f"least {side * side}")
  rank = int(cfg.lora.rank or 0) if "lora" in cfg else 0
  if rank < 0:
    raise fail("lora.rank", "must be >= 0 (0: every parameter trains)")
  if rank and cfg.train.init_from and not finetune.is_bundle(cfg.train.init_from):
    raise fail("train.init_from", "a LoRA run's base must be a bundle (python -m sora_jax.export_finetune "
                                  "or sora_jax.convert.wan write one)")
  if rank:  # the adapters' targets and rank, on the model built abstractly
    try:
      with nnx.use_eager_sharding(False):
        nnx.eval_shape(lambda: make_model(cfg, nnx.Rngs(0)))
    except ValueError as e:
      raise config_lib.ConfigError(f"config.{e}") from None
  try:
    mesh = sharding.mesh_from_config(cfg.mesh, devices)
    seq_axis = sharding.sequence_axis(mesh)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{e}") from None
  if seq_axis and cfg.dit.context == "none":
    # Each local kernel would gather the whole sequence onto every device and compute all of it there.
    raise fail("dit.context", f"the mesh shards the sequence over `{seq_axis}` "
                              f"(mesh {dict(mesh.shape)}): accepted: 'ring', 'ulysses'")
  n = sharding.batch_size_multiple(mesh)
  if int(d.batch_size) % n:
    raise fail("data.batch_size", f"must be a multiple of the mesh's data x fsdp = {n} devices "
                                  f"(mesh {dict(mesh.shape)})")


LATENTS_VAE = "latents_vae.json"  # in a DiT run directory: the VAE whose latents it trains on


def pin_latents(cfg, workdir: str, *, resuming: bool) -> None:
  """A DiT trains on one VAE's latents for its whole run. A fresh run records that VAE (workdir/
  LATENTS_VAE, which export checks too); a resumed run whose latents were re-encoded by another VAE
  since (the VAE trained further, say) stops with config.ConfigError naming both."""
  from sora_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  now = pipeline.latents_vae(cfg, workdir=workdir)
  path = os.path.join(workdir, LATENTS_VAE)
  if now is None:
    return
  if resuming and os.path.isfile(path):
    with open(path) as f:
      before = json.load(f)
    if before.get("sha256") != now.get("sha256"):
      raise config_lib.ConfigError(
          f"{workdir} trained on latents of {sources.describe_vae(before)}; config.data.latents_dir now "
          f"holds latents of {sources.describe_vae(now)}: train a new DiT (another --workdir), or "
          "re-encode the latents with the VAE it trained on")
  elif distributed.is_main():
    atomic.write_text(path, json.dumps(now, indent=2))


def make_data(cfg, start: Start):
  """The training stream and its to_global; a resumed run continues its checkpoints' stream, also on
  another number of processes (distributed.data_iterator)."""
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  resumed = start.directory if start.kind in ("workdir", "resume_from") else None
  return distributed.data_iterator(cfg, resumed, split="train"), pipeline.to_global


def train(cfg: ml_collections.ConfigDict, workdir: str, *, model_fn=make_model,
          loss_fn: LossFn | None = None, data=None, devices=None) -> State:
  """Trains to cfg.train.total_steps (or until preempted) and returns the final state.

  `data` is (host-local batch iterator with get_state/set_state, to_global(batch, mesh)); by default the
  Grain pipeline of sora_jax.data.pipeline.
  """
  loss_fn = loss_fn or default_loss_fn()
  check_config(cfg, devices, pipeline=data is None)
  cfg = prepare_config(cfg, workdir)
  mesh = sharding.mesh_from_config(cfg.mesh, devices)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main():  # what export and the sampler rebuild the model from (bundle.py)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint.Manager(ckpt_dir, max_to_keep=int(cfg.train.keep_checkpoints),
                            save_interval_steps=max(int(cfg.train.checkpoint_every_steps), 1))
  writer = metrics.MetricWriter(workdir)
  # Installed before the (long) compile: a SIGTERM then ends the run cleanly at the first step boundary.
  preempt = checkpoint.Preemption()
  try:
    setup = make_setup(cfg, mesh, model_fn)
    start = resolve_start(cfg, ckpt_dir, ckpt)
    data_iter, to_global = data if data is not None else make_data(cfg, start)
    held_out, decode = None, None
    if data is None:  # the pipeline's latents (a caller's own stream has no VAE, nor a validation split)
      pin_latents(cfg, workdir, resuming=start.kind == "workdir")
      held_out = held_out_loss(cfg, setup, loss_fn, mesh, workdir)
      decode = sample_decoder(cfg, workdir) if int(cfg.train.sample_every_steps) else None
    state = load_start(start, cfg, setup, ckpt, data_iter, model_fn)
    first = int(jax.device_get(state["step"]))
    log.info("start: %s (step %d of %d); mesh %s; %.2fM params trained, %.2fM frozen; param shardings: %s",
             start.kind, first, int(cfg.train.total_steps), dict(mesh.shape), setup.num_params / 1e6,
             setup.num_frozen / 1e6, sharding.describe(setup.shardings["params"]))
    if first >= int(cfg.train.total_steps):
      log.info("already at total_steps=%d; nothing to do", int(cfg.train.total_steps))
      return state
    try:
      with preempt.waiting():
        batch = next(data_iter)
    except checkpoint.Preempted:
      log.info("SIGTERM while waiting for the first batch; exiting")
      return state
    compiled, step_flops, peak = _compile_and_report(cfg, setup, make_train_step(cfg, setup, loss_fn),
                                                     batch, mesh, writer, first)
    return _loop(cfg, state, batch, first, compiled, data_iter, to_global, mesh, ckpt, writer, setup,
                 step_flops, peak, preempt, held_out=held_out, decode=decode)
  finally:
    preempt.restore()
    ckpt.close()
    writer.close()


def _compile_and_report(cfg, setup: Setup, step_fn, batch: dict, mesh, writer, step: int):
  """Compiles the step; logs memory, FLOPs (hand count vs XLA) and the peak.

  Returns (compiled step, flops.StepFlops of the global batch, peak FLOP/s of the mesh)."""
  b, l = batch["segment_ids"].shape
  if b * jax.process_count() % sharding.batch_size_multiple(mesh):
    raise ValueError(f"global batch {b * jax.process_count()} is not a multiple of data x fsdp = "
                     f"{sharding.batch_size_multiple(mesh)}")
  t0 = time.time()
  compiled = compile_step(step_fn, setup, batch, mesh)
  report = {"compile_s": time.time() - t0, **memory_report(compiled)}
  step_flops = flops.dit_train_step_flops(
      cfg, batch=b * jax.process_count(), seq_len=l, text_len=batch["text_tokens"].shape[1],
      num_segments=batch["seg_valid"].shape[1], num_params=setup.num_params)
  peak, peak_source = flops.peak_flops(mesh.devices.flat, cfg.dit.dtype)
  cost = compiled_flops(compiled)
  report.update(peak_tflops=peak / 1e12, model_tflops_per_step=step_flops.model / 1e12,
                tflops_per_step=step_flops.total / 1e12, cost_analysis_tflops_per_device=cost / 1e12,
                cost_analysis_over_once_count=flops.compare_with_compiled(step_flops, cost, mesh.size,
                                                                          scanned=True))
  if cfg.dit.attention != "reference":
    log.info("dit.attention=%r: the hand count is of dense attention, and a kernel's loops are counted "
             "once by cost_analysis(); the FLOP comparison holds for attention='reference'",
             cfg.dit.attention)
  if cfg.train.flops_check:
    # cost_analysis() counts a scan body once: compare the hand count with an unrolled compile.
    t1 = time.time()
    with flops.unrolled_scans():  # a new function object, or jit's trace cache returns the scanned one
      unrolled = compiled_flops(compile_step(lambda s, b: step_fn(s, b), setup, batch, mesh))
    report.update(unrolled_compile_s=time.time() - t1,
                  unrolled_cost_analysis_tflops_per_device=unrolled / 1e12,
                  cost_analysis_over_hand_count=flops.compare_with_compiled(step_flops, unrolled, mesh.size,
                                                                            scanned=False))
  log.info("compiled in %.1fs; peak from %s; %s", report["compile_s"], peak_source, json.dumps(report))
  writer.write_scalars(step, {f"compile/{k}": v for k, v in report.items()})
  return compiled, step_flops, peak


def _check_finite(state: State) -> None:
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    raise NonFiniteLoss(f"non-finite loss or gradient at step {bad}; stopping without saving "
                        "(parameters are those after the last finite step)")


def _loop(cfg, state, batch, first, compiled, data_iter, to_global, mesh, ckpt, writer, setup,
          step_flops: flops.StepFlops, peak: float, preempt, *, held_out=None, decode=None) -> State:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  total = int(cfg.train.total_steps)
  block_every_step = distributed.block_each_step()
  log_every = max(int(cfg.train.log_every_steps), 1)
  sample_every = int(cfg.train.sample_every_steps)
  bar = tqdm(total=total, initial=first, disable=jax.process_index() != 0, dynamic_ncols=True)
  pending: list[dict] = []
  t_last, steps_since, model_flops = time.time(), 0, 0.0
  # MFU counts the attention pairs the batch's segments need, not the dense row (flops.py).
  non_attention = step_flops.model - step_flops.model_attention
  step = first
  # A wall-clock budget (the demo's): stop at a step boundary with a checkpoint, as at total_steps.
  budget = float(cfg.train.max_train_seconds or 0)
  deadline = time.time() + budget if budget > 0 else float("inf")
  if preempt.flag:  # SIGTERM during the compile: nothing new to save
    log.info("SIGTERM before the first step; exiting")
    return state
  while step < total:
    if batch is None:
      try:
        with preempt.waiting():
          batch = next(data_iter)
      except checkpoint.Preempted:  # the data position is that of the last step's batch
        _check_finite(state)
        ckpt.save(step, finetune.trained(state), data_iter=data_iter, force=True)
        ckpt.wait()
        log.info("SIGTERM while waiting for data: saved step %d; exiting", step)
        break
    state, scalars = compiled(state, to_global(batch, mesh))
    last_batch, batch = batch, None
    step += 1
    steps_since += 1
    pairs = flops.useful_attention_pairs(last_batch, cfg.dit)  # host-local rows; scaled to the global batch
    model_flops += non_attention + jax.process_count() * flops.attention_model_flops(cfg, pairs)
    pending.append(scalars)
    if block_every_step:
      jax.block_until_ready(state["step"])
    bar.update(1)
    last = step == total or time.time() > deadline
    if last and step < total:
      log.info("max_train_seconds=%.0f reached at step %d of %d; stopping", budget, step, total)
    if step % log_every == 0 or last or preempt.flag:
      _check_finite(state)
      host = _host(pending)
      dt = (time.time() - t_last) / steps_since
      tokens = sum(h["tokens"] for h in host) / steps_since
      row = dict(host[-1])
      row.update(loss=float(np.mean([h["loss"] for h in host])), step_time_s=dt,
                 tokens_per_s=tokens / dt, mfu=model_flops / steps_since / dt / peak)
      writer.write_scalars(step, row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                      mfu=f"{row['mfu']:.1%}")
      if budget > 0:  # the bar ends where the run will: at the step the time cap is projected to reach
        bar.total = max(step, min(total, step + int(max(deadline - time.time(), 0.0) / dt)))
        bar.refresh()
      pending, t_last, steps_since, model_flops = [], time.time(), 0, 0.0
    if sample_every and step % sample_every == 0:
      _maybe_samples(cfg, step, state, setup, writer, last_batch, decode)
      t_last = time.time()  # sampling time is not step time
    if held_out is not None and (step % int(cfg.train.val_every_steps) == 0 or last):
      writer.write_scalars(step, {"val/loss": held_out(state)})
      t_last = time.time()
    if preempt.flag or last or step % ckpt.save_interval_steps == 0:
      _check_finite(state)
      if ckpt.save(step, finetune.trained(state), data_iter=data_iter, force=preempt.flag or last):
        log.info("step %d: checkpoint started", step)
    if preempt.flag:
      ckpt.wait()
      log.info("SIGTERM: saved step %d; exiting", step)
      break
    if last:
      break
  bar.close()
  return state


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
  log.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save's details at INFO
  if not _WORKDIR.value:
    config_lib._fail("--workdir is required")  # pylint: disable=protected-access
  cfg = config_lib.get_config()
  distributed.initialize()  # joins the process group on multi-host launches; no-op on one host
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    train(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint.Unrestorable, sources.StaleLatents) as e:
    config_lib._fail(str(e))  # pylint: disable=protected-access
  except FileNotFoundError as e:  # the data, its statistics or the tokenizer: not built yet
    config_lib._fail(str(e).splitlines()[0])  # pylint: disable=protected-access
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  config_lib.run(main)
