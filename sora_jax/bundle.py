"""Inference bundles: everything that sample, reconstruct and evaluate need, with no training config.

`python -m sora_jax.export` writes one from training work directories; `load(path)` reads it back, after
checking every file against the bundle's manifest. Layout of a bundle directory B:

    B/manifest.json              format, versions, dtype, where the weights came from, and the SHA-256
                                 and byte size of every other file in B
    B/config.json                the resolved config (all sections; dit.in_dim filled in)
    B/tokenizer.model            the sentencepiece caption tokenizer
    B/latent_stats.json          {"shift": [c], "scale": [c], ...}: models see (z - shift) / scale
    B/weights/dit/               orbax PyTree: the DiT's EMA parameters without its text encoder
    B/weights/text_encoder/      orbax PyTree: the text encoder's parameters: the jointly trained caption
                                 encoder's EMA (the DiT's `text`), or a frozen UMT5's
                                 (config.dit.text_encoder = "umt5", config.text its settings)
    B/weights/vae/               orbax PyTree: the VAE's EMA parameters (absent when the DiT was trained
                                 on pooled pixels, config.data.source == "shapes")

Weights are stored as orbax PyTrees of plain arrays (no pickle), in float32 or, with
`--dtype bfloat16`, with every float32 array rounded to bfloat16 (half the bytes; `load` casts them back
to the models' parameter dtype). `load_workdir` builds the same object straight from training work
directories laid out as `make demo` leaves them (see `WorkdirLayout`).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import atomic, config as config_lib

FORMAT = "sora-jax-bundle"
FORMAT_VERSION = 2  # 2: the Wan 2.1-aligned DiT (docs/architecture.md); text encoder beside or inside it
MANIFEST = "manifest.json"
DTYPES = ("float32", "bfloat16")
_PACKAGES = ("sora-jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "sentencepiece",
             "ml-collections")


class BundleError(ValueError):
  """A bundle that is missing, incomplete, or does not match its manifest."""


@dataclasses.dataclass
class Bundle:
  """A loaded bundle: what `sampling.as_pipeline` takes (config, dit, vae, tokenizer, latent stats)."""
  config: ml_collections.ConfigDict
  dit: Any                              # models.dit.DiT with the EMA weights (and its caption encoder)
  vae: Any | None                       # models.vae.VAE with the EMA weights, or None (pooled pixels)
  tokenizer: Any                        # data.tokenizer.Tokenizer
  latent_shift: np.ndarray
  latent_scale: np.ndarray
  manifest: dict
  path: str
  text_encoder: Any | None = None       # a frozen text encoder (models.umt5.UMT5Encoder), or None when the
                                        # caption encoder is part of the DiT


# ---------------------------------------------------------------------------------------- the manifest
def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def params_sha256(tree) -> str:
  """SHA-256 of a parameter tree's values (floats as float32) in path order: the same weights give the
  same digest whether read from a checkpoint, a bundle or a built model (keys compared as strings)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  h = hashlib.sha256()
  for path, leaf in sorted(((jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in leaves),
                           key=lambda kv: kv[0]):
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
      x = x.astype(np.float32)
    h.update(f"{path}:{x.dtype.str}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def _files(root: Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p != root / MANIFEST)


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def verify(path: str | os.PathLike) -> dict:
  """The manifest of bundle `path`, after checking that its files are exactly those it lists, with
  their SHA-256; raises BundleError (one line: the first bad file and how to fix it) otherwise."""
  root = Path(path)
  if not (root / MANIFEST).is_file():
    raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing (write one with "
                      "python -m sora_jax.export --workdir W --out B)")
  try:
    manifest = json.loads((root / MANIFEST).read_text())
  except json.JSONDecodeError as e:
    raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON ({e.msg} at line {e.lineno}); "
                      "re-export the bundle") from None
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise BundleError(f"bundle {root}: format {manifest.get('format')!r} v{manifest.get('format_version')}"
                      f" is not {FORMAT!r} v{FORMAT_VERSION}; re-export it with this version")
  listed = manifest.get("files", {})
  present = set(_files(root))
  for name in sorted(set(listed) - present):
    raise BundleError(f"bundle {root} does not match its manifest: {name} is missing; re-export it")
  for name in sorted(present - set(listed)):
    raise BundleError(f"bundle {root} does not match its manifest: {name} is not listed in it "
                      "(added after export); remove it or re-export the bundle")
  for name in sorted(listed):
    got = sha256(root / name)
    if got != listed[name]["sha256"]:
      raise BundleError(f"bundle {root} does not match its manifest: {name} has sha256 {got[:12]}..., "
                        f"the manifest says {listed[name]['sha256'][:12]}... (modified after export); "
                        "re-export the bundle")
  return manifest


# -------------------------------------------------------------------------------------------- writing
def _this_process_only():
  """Orbax options under which a bundle read or write involves only the calling process.

  A bundle holds host numpy arrays, never sharded ones, so no other process has a part in it. Orbax's
  default (every process of a jax.distributed job takes part, in lockstep) would make a multi-host job
  hang whenever one process writes (export, on process 0) or reads (reconstruct, on process 0) alone.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"bundle_p{me}")


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())


def _save_tree(directory: Path, tree: Mapping) -> None:
  ckptr = _checkpointer()
  ckptr.save(directory.absolute(), jax.tree.map(np.asarray, dict(tree)))
  ckptr.wait_until_finished()
  ckptr.close()


def _cast(tree: Mapping, dtype: str) -> dict:
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not accepted; accepted: {list(DTYPES)}")
  target = jnp.bfloat16 if dtype == "bfloat16" else np.float32

  def cast(x):
    x = np.asarray(x)
    return x.astype(target) if x.dtype in (np.float32, np.dtype(jnp.bfloat16)) else x
  return jax.tree.map(cast, dict(tree))


def split_text_encoder(dit_params: Mapping) -> tuple[dict, dict]:
  """(the DiT's parameters without its text encoder, the text encoder's: the `text` subtree, which for a
  frozen encoder such as UMT5 is carried beside the DiT's own parameters under the same key)."""
  params = dict(dit_params)
  if "text" not in params:
    raise BundleError(f"DiT parameters have no `text` subtree (text encoder); top-level keys: "
                      f"{sorted(params)}")
  text = params.pop("text")
  return params, text


def write(out: str | os.PathLike, *, config: ml_collections.ConfigDict | Mapping, dit_params: Mapping,
          vae_params: Mapping | None, tokenizer_model: str | os.PathLike, latent_stats: Mapping,
          dtype: str = "float32", source: Mapping | None = None) -> dict:
  """Writes a bundle to `out` (replacing a bundle there, never anything else) and returns its manifest.

  The bundle is assembled in a sibling temporary directory and swapped into place only when complete
  (sora_jax/atomic.py), so `out` never holds a half-written bundle, and a failed export keeps the old one.
  """
  out = Path(out)
  if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
    raise BundleError(f"--out {out} exists and is not a bundle; refusing to replace it (give a new or "
                      "empty directory, or an existing bundle)")
  tmp = out.with_name(out.name + ".tmp-export")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  cfg = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  atomic.write_json(tmp / "config.json", cfg, sort_keys=True)
  shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
  atomic.write_json(tmp / "latent_stats.json", dict(latent_stats), sort_keys=True)
  dit, text = split_text_encoder(dit_params)
  _save_tree(tmp / "weights" / "dit", _cast(dit, dtype))
  _save_tree(tmp / "weights" / "text_encoder", _cast(text, dtype))
  if vae_params is not None:
    _save_tree(tmp / "weights" / "vae", _cast(vae_params, dtype))
  count = lambda t: int(sum(np.asarray(x).size for x in jax.tree.leaves(t)))
  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "dtype": dtype,
      "versions": versions(),
      "source": dict(source or {}),
      "parameters": {"dit": count(dit), "text_encoder": count(text),
                     "vae": count(vae_params) if vae_params is not None else 0},
      "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in _files(tmp)},
  }
  atomic.write_json(tmp / MANIFEST, manifest, sort_keys=True)
  atomic.replace_dir(tmp, out)  # never a moment with neither the old bundle nor the new one
  return manifest


# -------------------------------------------------------------------------------------------- loading
def _restore_tree(directory: Path, subtree: str | None = None) -> dict:
  """A PyTree of host numpy arrays from an orbax checkpoint `directory` (optionally one top-level key),
  laid out on one device whatever mesh it was saved from."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = directory.absolute()
  meta = _checkpointer().metadata(directory)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if subtree is not None:
    if subtree not in tree:
      raise BundleError(f"checkpoint {directory} has no {subtree!r}; it holds {sorted(tree)}")
    tree = {subtree: tree[subtree]}
  dev = jax.local_devices(backend="cpu")[0]  # jax.devices() lists other hosts' devices too
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(dev)),
      dict(tree))
  options = _this_process_only()
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                           multiprocessing_options=options)
  restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=subtree is not None))
  restored = jax.tree.map(np.asarray, restored)
  return restored[subtree] if subtree is not None else restored


def build_model(ctor, params: Mapping, *, what: str):
  """`ctor()` built abstractly, then filled with `params` (a pure dict), cast to its parameter dtypes.

  Raises BundleError naming the first parameter whose path or shape differs.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(ctor)
  graphdef, state = nnx.split(abstract)
  want = nnx.to_pure_dict(state)
  flat_want = dict(_flatten(want))
  flat_got = dict(_flatten(params))
  for k in sorted(set(flat_want) | set(flat_got)):
    if k not in flat_got:
      raise BundleError(f"{what}: parameter {k} is missing from the stored weights (config and weights "
                        "disagree)")
    if k not in flat_want:
      raise BundleError(f"{what}: stored parameter {k} is not in the model built from the config")
    if tuple(flat_got[k].shape) != tuple(flat_want[k].shape):
      raise BundleError(f"{what}: parameter {k} is stored as {list(flat_got[k].shape)}, the config "
                        f"builds {list(flat_want[k].shape)}")
  filled = jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), want, _unflatten_like(want, flat_got))
  nnx.replace_by_pure_dict(state, filled)
  return nnx.merge(graphdef, state)


def _flatten(tree, prefix=""):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
  else:
    yield prefix, tree


def _unflatten_like(like, flat, prefix=""):
  if isinstance(like, Mapping):
    return {k: _unflatten_like(v, flat, f"{prefix}/{k}" if prefix else str(k)) for k, v in like.items()}
  return flat[prefix]


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A config.json written by a training run or a bundle, of any age (config.complete fills the keys an
  older one lacks)."""
  return config_lib.complete(ml_collections.ConfigDict(json.loads(text)))


def assemble(cfg: ml_collections.ConfigDict, dit_params: Mapping, vae_params: Mapping | None,
             tokenizer_model: str | os.PathLike | bytes, latent_stats: Mapping, *, manifest: dict,
             path: str) -> Bundle:
  """Models from parameters: the Bundle that `load` and `load_workdir` return."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from sora_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  text_encoder = None
  if cfg.dit.text_encoder != "caption":  # a frozen encoder beside the DiT, not inside it
    from sora_jax.models.umt5 import UMT5Encoder  # pylint: disable=g-import-not-at-top
    dit_params, text_params = split_text_encoder(dit_params)
    text_encoder = build_model(lambda: UMT5Encoder(cfg.text, rngs=nnx.Rngs(0)), text_params,
                               what=f"{path}: text encoder")
  dit = build_model(lambda: DiT(cfg.dit, rngs=nnx.Rngs(0)), dit_params, what=f"{path}: DiT")
  vae = None
  if vae_params is not None:
    from sora_jax.models.vae import VAE  # pylint: disable=g-import-not-at-top
    vae = build_model(lambda: VAE(cfg.vae, rngs=nnx.Rngs(0)), vae_params, what=f"{path}: VAE")
  return Bundle(cfg, dit, vae, Tokenizer(tokenizer_model),
                np.asarray(latent_stats["shift"], np.float32), np.asarray(latent_stats["scale"], np.float32),
                manifest, str(path), text_encoder)


def _open(path: str | os.PathLike, check: bool) -> tuple[Path, ml_collections.ConfigDict]:
  """A bundle's root and config, after checking its files against the manifest (or, without `check`,
  only that it has one)."""
  root = Path(path)
  if check:
    verify(root)
  elif not (root / MANIFEST).is_file():
    raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
  return root, config_from_json((root / "config.json").read_text())


def load_parts(path: str | os.PathLike, *, check: bool = True) -> tuple[ml_collections.ConfigDict, dict,
                                                                       dict | None, dict]:
  """(config, DiT params incl. caption encoder, VAE params or None, latent stats) of a bundle, as
  stored (bfloat16 bundles stay bfloat16 here); checks the manifest first unless `check` is False."""
  root, cfg = _open(path, check)
  dit = _restore_tree(root / "weights" / "dit")
  dit["text"] = _restore_tree(root / "weights" / "text_encoder")
  vae = _restore_tree(root / "weights" / "vae") if (root / "weights" / "vae").is_dir() else None
  stats = json.loads((root / "latent_stats.json").read_text())
  return cfg, dit, vae, stats


def check_manifest_fields(root: Path, manifest: Mapping, dit: Mapping, vae: Mapping | None) -> None:
  """Raises BundleError (one line) if the manifest's own dtype and parameter counts, which no checksum
  covers, disagree with the weights (dit: the DiT's parameters including its `text` subtree)."""
  dit = dict(dit)
  text = dit.pop("text", {})
  parts = {"dit": dit, "text_encoder": text, "vae": vae or {}}
  for name, tree in parts.items():
    said = manifest.get("parameters", {}).get(name)
    got = int(sum(np.asarray(x).size for x in jax.tree.leaves(tree)))
    if said != got:
      raise BundleError(f"bundle {root}: {MANIFEST} says parameters.{name}={said}, its weights hold {got} "
                        "(manifest edited after export); re-export the bundle")
  floats = {str(np.asarray(x).dtype) for t in parts.values() for x in jax.tree.leaves(t)
            if np.issubdtype(np.asarray(x).dtype, np.floating) or np.asarray(x).dtype == jnp.bfloat16}
  if floats and floats != {manifest.get("dtype")}:
    raise BundleError(f"bundle {root}: {MANIFEST} says dtype={manifest.get('dtype')!r}, its weights are "
                      f"{sorted(floats)} (manifest edited after export); re-export the bundle")


def load_text_encoder(path: str | os.PathLike, *, check: bool = True):
  """(config, the frozen text encoder, tokenizer) of a bundle whose DiT reads a frozen encoder's features
  (config.dit.text_encoder != "caption"), without reading the DiT's or the VAE's weights (a 14B DiT need
  not be in memory to cache caption features: data_pipelines/encode_text.py)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from sora_jax.models.umt5 import UMT5Encoder  # pylint: disable=g-import-not-at-top
  root, cfg = _open(path, check)
  if cfg.dit.text_encoder == "caption":
    raise BundleError(f"bundle {root}: its DiT trains its own caption encoder (dit.text_encoder='caption'); "
                      "only a frozen encoder's features are cached")
  params = _restore_tree(root / "weights" / "text_encoder")
  encoder = build_model(lambda: UMT5Encoder(cfg.text, rngs=nnx.Rngs(0)), params, what=f"{root}: text encoder")
  return cfg, encoder, Tokenizer(root / "tokenizer.model")


def load(path: str | os.PathLike, *, check: bool = True) -> Bundle:
  """A bundle's models, tokenizer and latent statistics, after checking its files against the manifest
  and the manifest's own fields against the weights (BundleError, one line, when they do not match)."""
  root = Path(path)
  if not root.is_dir():
    raise BundleError(f"bundle {root} does not exist (write one with python -m sora_jax.export)")
  manifest = verify(root) if check else json.loads((root / MANIFEST).read_text())
  cfg, dit, vae, stats = load_parts(root, check=False)
  if check:
    check_manifest_fields(root, manifest, dit, vae)
  return assemble(cfg, dit, vae, root / "tokenizer.model", stats, manifest=manifest, path=str(root))


# ------------------------------------------------------------------------------- training work dirs
@dataclasses.dataclass(frozen=True)
class WorkdirLayout:
  """Where the parts of a run live, as `make demo` lays them out under one work directory W:
  W/dit/checkpoints (DiT trainer), W/vae/checkpoints (VAE trainer), W/data/tokenizer.model and
  W/data/latents/latent_stats.json. The config is W/dit/config.json, else W/config.json, else
  W/vae/config.json; the VAE section always comes from W/vae/config.json when the VAE trainer wrote
  one (it describes the weights in W/vae)."""
  root: Path

  @property
  def dit(self) -> Path:
    return self.root / "dit"

  @property
  def vae(self) -> Path:
    return self.root / "vae"

  def config_file(self) -> Path | None:
    for p in (self.dit / "config.json", self.root / "config.json", self.vae / "config.json"):
      if p.is_file():
        return p
    return None

  def tokenizer(self, cfg) -> Path:
    given = cfg.data.tokenizer if cfg is not None else ""
    return Path(given) if given else self.root / "data" / "tokenizer.model"

  def latents_dir(self, cfg) -> Path:
    given = cfg.data.latents_dir if cfg is not None else ""
    return Path(given) if given else self.root / "data" / "latents"


def _checkpoints_dir(run_dir: Path) -> Path:
  return run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir


def checkpoint_steps(run_dir: Path) -> list[int]:
  """The steps of a trainer's run dir that hold a finished checkpoint, ascending (as many as its
  keep_checkpoints allowed)."""
  base = _checkpoints_dir(Path(run_dir))
  return sorted(int(p.name) for p in base.glob("*") if p.name.isdigit() and (p / "state").is_dir())


def latest_checkpoint(run_dir: Path, step: int | None = None) -> tuple[Path, int]:
  """(the `state` directory of the newest finished checkpoint of a trainer's run dir, or of the one at
  `step`, its step)."""
  base = _checkpoints_dir(run_dir)
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise BundleError(f"{run_dir} holds no finished checkpoint (looked for {base}/<step>/state)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise BundleError(f"{run_dir} has no checkpoint at step {step}; it has steps {steps}")
  return base / str(step) / "state", step


def _restore_params(state_dir: Path) -> tuple[dict, str]:
  meta = _checkpointer().metadata(state_dir.absolute())
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  key = "ema" if "ema" in tree else "params"
  if key not in tree:
    raise KeyError(f"neither 'ema' nor 'params'; it holds {sorted(tree)}")
  return _restore_tree(state_dir, key), key


def restore_ema(run_dir: Path, step: int | None = None) -> tuple[dict, int, str]:
  """(EMA parameters of a run's newest checkpoint that restores, or of the one at `step`, its step, which
  key they came from); a run without an EMA gives its raw parameters ("params"). Without `step`, a
  damaged newer checkpoint is named with the reason in a warning and skipped; BundleError (one line,
  every checkpoint and why) if none restores."""
  if step is not None:
    state_dir, step = latest_checkpoint(run_dir, step)
    params, key = _restore_params(state_dir)
    return params, step, key
  from sora_jax import checkpoint  # pylint: disable=g-import-not-at-top
  base = _checkpoints_dir(run_dir)
  steps = sorted((int(p.name) for p in base.glob("*") if p.name.isdigit()), reverse=True)
  if not steps:
    raise BundleError(f"{run_dir} holds no finished checkpoint (looked for {base}/<step>/state)")
  failed = []
  for step in steps:
    state_dir = base / str(step) / "state"
    try:
      if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir.name}/ is missing")
      params, key = _restore_params(state_dir)
    except Exception as e:  # pylint: disable=broad-except  # any damage: try the next older one
      reason = checkpoint.failure_reason(e)
      failed.append(f"{state_dir.parent}: {reason}")
      logging.getLogger("sora_jax.bundle").warning("checkpoint %s is unusable (%s); trying an older one",
                                                   state_dir.parent, reason)
      continue
    return params, step, key
  raise BundleError(f"no checkpoint of {run_dir} restores: {'; '.join(failed)}")


def resolve_config(cfg: ml_collections.ConfigDict, latent_stats: Mapping) -> ml_collections.ConfigDict:
  """A plain copy of `cfg` with the values the trainer derives filled in (dit.in_dim, models/dit.py)."""
  from sora_jax.models import dit  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.dit.in_dim = dit.resolve_in_dim(cfg.dit, lambda: len(latent_stats["shift"]))
  return cfg


def read_workdir(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict, dict | None, dict, Path, dict]:
  """(resolved config, DiT EMA params, VAE EMA params or None, latent stats, tokenizer path, source
  record) of a work directory laid out as `WorkdirLayout` says. `cfg` overrides the config it holds.

  The VAE, the latent statistics and the DiT must come from one VAE (data/sources.py): the VAE is W/vae's
  checkpoint at the step the latents were encoded from (when kept; else its newest), and a VAE, DiT run
  or statistics of another VAE stop this with sources.StaleLatents naming what to rebuild."""
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
  layout = WorkdirLayout(Path(workdir))
  if not layout.root.is_dir():
    raise BundleError(f"work directory {workdir} does not exist")
  if not checkpoint_steps(layout.dit):
    raise BundleError(f"{layout.dit} holds no finished DiT checkpoint (looked for "
                      f"{_checkpoints_dir(layout.dit)}/<step>/state); train one with python -m "
                      f"sora_jax.train --config ... --workdir {layout.dit}")
  if cfg is None:
    path = layout.config_file()
    if path is None:
      raise BundleError(f"{workdir} has no dit/config.json or config.json; pass the training config "
                        "(--config experiments/x.py)")
    cfg = config_from_json(path.read_text())
  stand_in = config_lib.complete(cfg).data.source == "shapes"
  vae_config = layout.vae / "config.json"
  if not stand_in and vae_config.is_file():
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.vae = config_from_json(vae_config.read_text()).vae
  if stand_in:
    stats = {"shift": [0.0, 0.0, 0.0], "scale": [1.0, 1.0, 1.0], "source": "shapes (pooled pixels)"}
  else:
    stats_path = layout.latents_dir(cfg) / "latent_stats.json"
    if not stats_path.is_file():
      raise BundleError(f"{stats_path} is missing (data_pipelines/encode_latents.py writes it)")
    stats = json.loads(stats_path.read_text())
  cfg = resolve_config(cfg, stats)
  dit, dit_step, dit_key = restore_ema(layout.dit)
  encoded_by = None if stand_in else stats.get("vae_source")
  if encoded_by and encoded_by.get("sha256"):
    trained_on = layout.dit / "latents_vae.json"  # train.LATENTS_VAE
    if trained_on.is_file():
      before = json.loads(trained_on.read_text())
      if before.get("sha256") != encoded_by["sha256"]:
        raise sources.StaleLatents(
            f"{layout.dit} trained on latents of {sources.describe_vae(before)}, but "
            f"{layout.latents_dir(cfg)} now holds latents of {sources.describe_vae(encoded_by)}: the "
            "bundle would pair the DiT with the wrong VAE; train the DiT again on these latents, or "
            "re-encode them with the VAE it trained on")
  vae_step = encoded_by.get("step") if encoded_by else None
  if stand_in:
    vae, vae_step, vae_key = None, None, None
  else:
    vae, vae_step, vae_key = restore_ema(
        layout.vae, vae_step if vae_step in checkpoint_steps(layout.vae) else None)
    if encoded_by and encoded_by.get("sha256") and params_sha256(vae) != encoded_by["sha256"]:
      raise sources.StaleLatents(
          f"{layout.latents_dir(cfg)} holds latents of {sources.describe_vae(encoded_by)}, but {layout.vae} "
          f"has no checkpoint with those weights (steps {checkpoint_steps(layout.vae)}; step {vae_step}'s "
          f"differ): re-encode the latents with this VAE (data_pipelines/encode_latents.py) and train the "
          "DiT on them")
  tok = layout.tokenizer(cfg)
  if not tok.is_file():
    raise BundleError(f"tokenizer {tok} is missing (data_pipelines/train_tokenizer.py writes it)")
  source = {"workdir": str(Path(workdir).absolute()), "dit_step": dit_step, "dit_weights": dit_key,
            "vae_step": vae_step, "vae_weights": vae_key}
  return cfg, dit, vae, stats, tok, source


def load_workdir(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None) -> Bundle:
  """The same object as `load`, straight from training work directories (no manifest to check)."""
  cfg, dit, vae, stats, tok, source = read_workdir(workdir, cfg)
  return assemble(cfg, dit, vae, tok, stats, manifest={"source": source}, path=str(workdir))
