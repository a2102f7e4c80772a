"""Fine-tuning published weights: a training run that starts from an inference bundle (a converted Wan
2.1, sora_jax/convert/wan.py, or any exported run), fully or through LoRA adapters (models/lora.py).

train.py's resume policy calls this module; it is not an entry point (docs/finetune.md has the recipe).

- `--config.train.init_from=BUNDLE` starts a run from the bundle's DiT weights (params and EMA; a fresh
  optimizer at step 0). The weights are restored straight into the run's sharded layout (each process
  reads its own shards, cast to the parameter dtype), and the bundle's DiT architecture and latent
  normalisation must be the run's: a mismatch is one line naming the key, not a silently broken model.
- Under LoRA (`lora.rank` > 0) the bundle's weights are the *frozen base*: the train state carries them
  under "frozen" (sharded like the full model, never donated into an update, no optimizer state, no EMA),
  and checkpoints hold only what trains (`trained(state)`: adapters, their EMA and optimizer state, step,
  rng). Every start of a LoRA run, resumes included, reads the base from `train.init_from` again; without
  it the base is the seeded random init (benchmarks, compile checks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from sora_jax import config as config_lib

# The DiT config keys that fix its parameters' meaning: a bundle and the run that starts from it must agree.
ARCH_KEYS = ("in_dim", "width", "depth", "num_heads", "ffn_dim", "time_freq_dim", "rope_theta", "qk_norm",
             "text_encoder")
TEXT_KEYS = {"caption": ("vocab_size", "text_width", "text_depth", "text_heads"), "umt5": ("text_dim",)}


def is_bundle(path: str | Path) -> bool:
  """Whether `path` is an inference bundle (sora_jax/bundle.py), not a run's workdir or checkpoints."""
  p = Path(path)
  return (p / "manifest.json").is_file() and (p / "weights" / "dit").is_dir()


def trained(state: Mapping) -> dict:
  """What a checkpoint holds: the state without the frozen base (which stays in its bundle)."""
  return {k: v for k, v in state.items() if k != "frozen"}


def base_abstract(setup) -> dict:
  """The part of the state a bundle fills: every parameter, or under LoRA the frozen base."""
  return setup.abstract_state["frozen"] if "frozen" in setup.abstract_state else setup.abstract_state["params"]


def bundle_config(path: str | Path):
  from sora_jax import bundle  # pylint: disable=g-import-not-at-top
  return bundle.config_from_json((Path(path) / "config.json").read_text())


def check_config(cfg, path: str | Path) -> None:
  """The run's DiT architecture is the bundle's (ValueError, one line, naming the first key that differs)."""
  theirs = bundle_config(path).dit
  for key in ARCH_KEYS + TEXT_KEYS.get(theirs.text_encoder, ()):
    mine, stored = cfg.dit[key], theirs[key]
    if mine != stored:
      raise ValueError(f"config.dit.{key}={mine!r} but bundle {path} has dit.{key}={stored!r}; fine-tuning "
                       f"keeps the bundle's architecture (set --config.dit.{key} to match)")


def check_latent_stats(cfg, path: str | Path, workdir: str | None) -> None:
  """The training latents are normalised as the bundle's DiT expects (its own latent_stats.json); skipped
  where the run reads no latent data set (pooled pixels, synthetic batches)."""
  if config_lib.complete(cfg).data.source != "latents":
    return
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    shift, scale = pipeline.latent_stats(cfg, workdir=workdir)
  except (FileNotFoundError, ValueError):
    return
  theirs = json.loads((Path(path) / "latent_stats.json").read_text())
  if not (np.allclose(shift, theirs["shift"], rtol=1e-5, atol=1e-6) and
          np.allclose(scale, theirs["scale"], rtol=1e-5, atol=1e-6)):
    raise ValueError(f"the latent data set ({cfg.data.latents_dir or 'default'}) is normalised "
                     f"differently from bundle {path}'s latent_stats.json; re-encode it with "
                     "data_pipelines/encode_latents.py --latent_stats=bundle --vae BUNDLE")


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    out.update(_flat(v, key) if isinstance(v, Mapping) else {key: v})
  return out


def _stored(directory: Path) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = ocp.StandardCheckpointer().metadata(directory.absolute())
  tree = getattr(meta, "item_metadata", meta)
  return dict(getattr(tree, "tree", tree))


def restore_weights(path: str | Path, abstract: Mapping) -> dict:
  """The bundle's DiT weights for the leaves of `abstract` (a pure dict of jax.ShapeDtypeStructs with
  shardings), laid out and typed as it says; a caption-encoder DiT's `text` comes from the bundle's
  text_encoder weights. ValueError (one line) names the first parameter missing on either side or
  stored with another shape."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = Path(path)
  parts = {"dit": ({k: v for k, v in abstract.items() if k != "text"}, root / "weights" / "dit")}
  if "text" in abstract:
    parts["text"] = (abstract["text"], root / "weights" / "text_encoder")
  out = {}
  for name, (want, directory) in parts.items():
    stored = _flat(_stored(directory))
    flat = _flat(want)
    for key in sorted(set(stored) | set(flat)):
      what = f"{name}/{key}" if name == "text" else key
      if key not in stored:
        raise ValueError(f"bundle {path}: parameter {what} is missing (the bundle's model is not this config's)")
      if key not in flat:
        raise ValueError(f"bundle {path}: stored parameter {what} has no place in the model built from the config")
      if tuple(stored[key].shape) != tuple(flat[key].shape):
        raise ValueError(f"bundle {path}: parameter {what} is stored as {list(stored[key].shape)}, the config "
                         f"builds {list(flat[key].shape)}")
    restored = ocp.PyTreeCheckpointer().restore(
        directory.absolute(), args=ocp.args.PyTreeRestore(
            item=dict(want), restore_args=ocp.checkpoint_utils.construct_restore_args(dict(want))))
    if name == "text":
      out["text"] = restored
    else:
      out.update(restored)
  return out


def bundle_weights(cfg, setup, path: str | Path, *, workdir: str | None = None) -> dict:
  """The bundle's weights in the run's layout (all parameters, or the frozen base under LoRA), after
  checking that the bundle's architecture and latent normalisation are the run's."""
  check_config(cfg, path)
  check_latent_stats(cfg, path, workdir)
  return restore_weights(path, base_abstract(setup))
