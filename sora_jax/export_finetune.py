"""Exports a fine-tuning run (full or LoRA) as an inference bundle: its base bundle with the DiT replaced.

    python -m sora_jax.export_finetune --workdir runs/ft_14b --out runs/ft_14b/bundle [--dtype bfloat16]

The run's config.json names its base (`train.init_from`, a bundle: a converted Wan 2.1 or an exported run);
the newest checkpoint's EMA weights become the bundle's DiT: as they are after full fine-tuning, folded
into the base's kernels after LoRA (models/lora.merge, the same as `python -m sora_jax.adapter merge`).
Everything else (frozen text encoder, VAE, latent statistics, tokenizer, sampler settings) is the
base's. `python -m sora_jax.export` is the demo's layout (dit/, vae/, data/); this is the fine-tuning
runs'. Every failure is one line, exit status 2.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging


def export(workdir: str | Path, out: str | Path, *, dtype: str | None = None) -> dict:
  """Writes the bundle of fine-tuning run `workdir` to `out`; returns its manifest."""
  from sora_jax import bundle as bundle_lib, finetune  # pylint: disable=g-import-not-at-top
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  run = Path(workdir)
  if not (run / "config.json").is_file():
    raise ValueError(f"--workdir {run}: no config.json (not a training run's workdir)")
  cfg = bundle_lib.config_from_json((run / "config.json").read_text())
  base = cfg.train.init_from
  if not base or not finetune.is_bundle(base):
    raise ValueError(f"--workdir {run}: config train.init_from={base!r} is not a bundle (a fine-tuning run "
                     "starts from one; export other runs with python -m sora_jax.export)")
  weights, step, key = bundle_lib.restore_ema(run)
  manifest = bundle_lib.verify(base)
  bcfg, dit, vae, stats = bundle_lib.load_parts(base, check=False)
  frozen_text = bcfg.dit.text_encoder != "caption"
  text = dit.pop("text")
  if lora.enabled(cfg):
    merged = lora.merge(dit, weights, lora.scale_of(cfg.lora))
  else:
    merged = dict(weights)
    if not frozen_text:  # a caption encoder is part of the DiT and trained with it
      text = merged.pop("text")
    flat = lambda tree: {k for k, _ in bundle_lib._flatten(tree)}  # pylint: disable=protected-access
    want, got = flat(dit), flat(merged)
    if want != got:
      raise ValueError(f"--workdir {run}: its parameters {sorted(want ^ got)[:3]} differ from base {base}'s")
  merged["text"] = text
  source = {"base": {"path": str(Path(base).absolute()), "manifest_sha256": bundle_lib.sha256(Path(base) / "manifest.json")},
            "workdir": str(run.absolute()), "dit_step": step, "dit_weights": key,
            "lora": cfg.lora.to_dict() if lora.enabled(cfg) else None}
  written = bundle_lib.write(out, config=bcfg, dit_params=merged, vae_params=vae,
                             tokenizer_model=Path(base) / "tokenizer.model", latent_stats=stats,
                             dtype=dtype or manifest["dtype"], source=source)
  bundle_lib.load(out, check=False)  # built once: a bundle that does not load is never left behind
  return written


def main(argv, fl: dict):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  if not fl["workdir"].value or not fl["out"].value:
    print("error: --workdir and --out are required", file=sys.stderr)
    sys.exit(2)
  start = time.time()
  try:
    manifest = export(fl["workdir"].value, fl["out"].value, dtype=fl["dtype"].value)
  except (ValueError, FileNotFoundError) as e:  # BundleError included
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"[export_finetune] wrote {fl['out'].value}: DiT step {manifest['source']['dit_step']} "
        f"({manifest['source']['dit_weights']}), {size / 1e6:.1f} MB, {manifest['dtype']} in "
        f"{time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
  _FLAGS = {
      "workdir": flags.DEFINE_string("workdir", None, "the fine-tuning run's workdir"),
      "out": flags.DEFINE_string("out", None, "the bundle to write (a new or empty directory, or a bundle)"),
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "stored weight dtype (default: the "
                                 "base bundle's)"),
  }
  app.run(lambda argv: main(argv, _FLAGS))
