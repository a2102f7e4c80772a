"""LoRA adapters on their own: save a LoRA run's adapters, merge them into a bundle, or sample with them
unmerged (docs/finetune.md).

    python -m sora_jax.adapter save --workdir runs/ft_lora --out runs/ft_lora/adapter
    python -m sora_jax.adapter merge --adapter runs/ft_lora/adapter --bundle runs/wan21_1.3b/bundle \
        --out runs/ft_lora/bundle [--dtype float32]
    python -m sora_jax.sample --bundle runs/wan21_1.3b/bundle --adapter runs/ft_lora/adapter --prompt "..."

An adapter directory A holds the run's EMA adapters (models/lora.py: `lora_a`, `lora_b` at the DiT's
projection paths) and what they need to be used again:

    A/adapter.json   format, the `lora` config (rank, alpha, targets), the base bundle it was trained on
                     (path and the SHA-256 of its manifest.json, which itself lists every file's SHA-256),
                     the run and step it came from, the parameter count, and every weight file's SHA-256
    A/weights/       orbax PyTree of the adapters

`merge` folds them into the base's kernels (kernel + alpha / rank * A B, models/lora.merge) and writes a
plain bundle; `apply` wraps a loaded bundle's DiT with them instead. Both refuse an adapter whose base
bundle is not the one given (its manifest differs). Every failure is one line, exit status 2.
"""
from __future__ import annotations

import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping

from absl import app, flags, logging
import ml_collections
import numpy as np

FORMAT = "sora-jax-lora"
FORMAT_VERSION = 1
META = "adapter.json"


class AdapterError(ValueError):
  """An adapter directory that is missing, damaged, or not for the bundle it is used with."""


def _sha(path: Path) -> str:
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  return bundle_lib.sha256(path)


def base_identity(bundle: str | Path) -> dict:
  """What identifies a base bundle: its path and the SHA-256 of its manifest (which lists every file's)."""
  root = Path(bundle)
  return {"path": str(root.absolute()), "manifest_sha256": _sha(root / "manifest.json")}


def save(workdir: str | Path, out: str | Path) -> dict:
  """Writes the newest checkpoint's EMA adapters of a LoRA run to `out`; returns the adapter.json dict."""
  from sora_jax import bundle as bundle_lib, finetune  # pylint: disable=g-import-not-at-top
  run = Path(workdir)
  config = run / "config.json"
  if not config.is_file():
    raise AdapterError(f"--workdir {run}: no config.json (not a training run's workdir)")
  cfg = bundle_lib.config_from_json(config.read_text())
  rank = int(cfg.lora.rank or 0) if "lora" in cfg else 0
  if rank <= 0:
    raise AdapterError(f"--workdir {run} trained every parameter (lora.rank={rank}); export it as a bundle "
                       "with python -m sora_jax.export instead")
  params, step, key = bundle_lib.restore_ema(run)
  init_from = cfg.train.init_from
  base = base_identity(init_from) if init_from and finetune.is_bundle(init_from) else None
  out = Path(out)
  tmp = out.with_name(out.name + ".tmp-adapter")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  bundle_lib._save_tree(tmp / "weights", params)  # pylint: disable=protected-access
  files = sorted(p for p in tmp.rglob("*") if p.is_file())
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "lora": {"rank": rank, "alpha": float(cfg.lora.alpha or rank), "targets": list(cfg.lora.targets)},
      "base": base, "source": {"workdir": str(run.absolute()), "step": step, "weights": key},
      "parameters": int(sum(np.asarray(x).size for x in _leaves(params))),
      "files": {str(p.relative_to(tmp)): {"sha256": _sha(p), "bytes": p.stat().st_size} for p in files},
  }
  (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
  if out.exists():
    if not (out / META).is_file():
      shutil.rmtree(tmp)
      raise AdapterError(f"--out {out} exists and is not an adapter; refusing to replace it")
    shutil.rmtree(out)
  tmp.rename(out)
  return meta


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def load(path: str | Path) -> tuple[dict, dict]:
  """(adapter.json, the adapters as a pure dict of numpy arrays), after checking every file's SHA-256."""
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  root = Path(path)
  if not (root / META).is_file():
    raise AdapterError(f"{root} is not an adapter: {META} is missing (write one with python -m "
                       "sora_jax.adapter save)")
  meta = json.loads((root / META).read_text())
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise AdapterError(f"{root}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
                       f"{FORMAT!r} v{FORMAT_VERSION}")
  for name, f in sorted(meta["files"].items()):
    p = root / name
    if not p.is_file() or _sha(p) != f["sha256"]:
      raise AdapterError(f"adapter {root}: {name} is missing or modified since it was saved; save it again")
  return meta, bundle_lib._restore_tree(root / "weights")  # pylint: disable=protected-access


def check_base(meta: dict, bundle: str | Path, adapter: str | Path) -> None:
  """Refuses an adapter trained on another base than `bundle` (compared by manifest SHA-256)."""
  want = (meta.get("base") or {}).get("manifest_sha256")
  if want is None:
    raise AdapterError(f"adapter {adapter} was trained from a random base (no train.init_from bundle); it "
                       "belongs to no bundle")
  got = base_identity(bundle)["manifest_sha256"]
  if got != want:
    raise AdapterError(f"adapter {adapter} was trained on bundle {meta['base']['path']} (manifest "
                       f"{want[:12]}...), not on {bundle} (manifest {got[:12]}...)")


def lora_config(meta: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(meta["lora"]))


def merge(adapter: str | Path, bundle: str | Path, out: str | Path, *, dtype: str | None = None) -> dict:
  """Writes `bundle` with the adapter folded into its DiT to `out`; returns the new bundle's manifest."""
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  meta, adapters = load(adapter)
  check_base(meta, bundle, adapter)
  manifest = bundle_lib.verify(bundle)
  cfg, dit, vae, stats = bundle_lib.load_parts(bundle, check=False)
  text = dit.pop("text")
  try:
    merged = lora.merge(dit, adapters, lora.scale_of(lora_config(meta)))
  except ValueError as e:
    raise AdapterError(f"adapter {adapter} does not fit bundle {bundle}: {e}") from None
  merged["text"] = text
  source = {"base": base_identity(bundle), "adapter": str(Path(adapter).absolute()), "lora": meta["lora"],
            "adapter_source": meta["source"]}
  written = bundle_lib.write(out, config=cfg, dit_params=merged, vae_params=vae,
                             tokenizer_model=Path(bundle) / "tokenizer.model", latent_stats=stats,
                             dtype=dtype or manifest["dtype"], source=source)
  # Built once from the merged weights, so a bundle that does not load is never left behind silently.
  bundle_lib.load(out, check=False)
  return written


def apply(loaded, bundle: str | Path, adapter: str | Path):
  """A loaded bundle (sora_jax.bundle.load) whose DiT carries the adapter unmerged (models/lora.py)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  meta, adapters = load(adapter)
  check_base(meta, bundle, adapter)
  dit = lora.apply(loaded.dit, lora_config(meta), rngs=nnx.Rngs(0))
  want = nnx.to_pure_dict(nnx.state(dit, lora.LoRAParam))
  got_paths = {"/".join(p) for p in _paths(adapters)}
  want_paths = {"/".join(p) for p in _paths(want)}
  if got_paths != want_paths:
    raise AdapterError(f"adapter {adapter}: its weights {sorted(got_paths ^ want_paths)[:3]} do not match "
                       "the adapters its lora config puts on this bundle's DiT")
  nnx.update(dit, _map(lambda w, x: jnp.asarray(x, w.dtype), want, adapters))
  return dataclasses.replace(loaded, dit=dit)


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _paths(v, prefix + (str(k),))
    else:
      yield prefix + (str(k),)


def _map(fn, like, other):
  return {k: _map(fn, v, other[k]) if isinstance(v, Mapping) else fn(v, other[k]) for k, v in like.items()}


# ------------------------------------------------------------------------------------------ the command
def _define_flags() -> dict:
  # Defined only when run as a program: sample.py imports this module and has its own --bundle and --out.
  return {
      "workdir": flags.DEFINE_string("workdir", None, "save: the LoRA run's workdir"),
      "adapter": flags.DEFINE_string("adapter", None, "merge: the adapter directory"),
      "bundle": flags.DEFINE_string("bundle", None, "merge: the base bundle the adapter was trained on"),
      "out": flags.DEFINE_string("out", None, "the adapter (save) or bundle (merge) to write"),
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "merge: stored weight dtype "
                                 "(default: the base bundle's)"),
  }


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def main(argv, fl: dict):
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  commands = ("save", "merge")
  if len(argv) != 2 or argv[1] not in commands:
    _fail(f"give one command, {' or '.join(commands)} (got {argv[1:]})")
  workdir, adapter, bundle, out = (fl[k].value for k in ("workdir", "adapter", "bundle", "out"))
  start = time.time()
  try:
    if argv[1] == "save":
      if not workdir or not out:
        _fail("save needs --workdir and --out")
      meta = save(workdir, out)
      size = sum(v["bytes"] for v in meta["files"].values())
      print(f"[adapter] wrote {out}: rank {meta['lora']['rank']}, {meta['parameters'] / 1e6:.3f}M parameters, "
            f"{size / 1e6:.2f} MB (step {meta['source']['step']}, {meta['source']['weights']}) in "
            f"{time.time() - start:.1f}s", flush=True)
    else:
      if not adapter or not bundle or not out:
        _fail("merge needs --adapter, --bundle and --out")
      manifest = merge(adapter, bundle, out, dtype=fl["dtype"].value)
      size = sum(v["bytes"] for v in manifest["files"].values())
      print(f"[adapter] merged {adapter} into {bundle}: wrote {out}, {size / 1e6:.1f} MB, {manifest['dtype']} "
            f"in {time.time() - start:.1f}s", flush=True)
  except (ValueError, FileNotFoundError) as e:  # AdapterError and BundleError included
    _fail(str(e).splitlines()[0])


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
