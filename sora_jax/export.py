"""Exports an inference bundle (sora_jax/bundle.py) from training work directories.

    python -m sora_jax.export --workdir runs/demo --out runs/demo/bundle [--dtype bfloat16]
        [--config experiments/shapes_demo.py]

The work directory is laid out as `make demo` leaves it: W/dit/ (DiT trainer: checkpoints/<step>/state),
W/vae/ (VAE trainer, same layout), W/data/tokenizer.model and W/data/latents/latent_stats.json. The
newest checkpoint of each trainer gives its EMA weights. The config is, in order: --config (with its
--config.* overrides), W/dit/config.json, W/config.json, W/vae/config.json, else
experiments/shapes_demo.py with its data paths pointed under W (the demo's own config; a different one
fails loudly when the weights' shapes disagree with it). The bundle is written next to --out and
renamed into place; the command prints a summary. Every failure ends with one line naming what is wrong.
Launched multi-host (as `train` is), process 0 exports and the others wait for it.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from absl import flags
from absl import logging

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import distributed

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none (several
  entry points share names like --workdir)."""
  flags.DEFINE_string("workdir", None, "run directory holding dit/, vae/ and data/")
  flags.DEFINE_string("out", None, "the bundle directory to write (replaced if it exists)")
  flags.DEFINE_enum("dtype", "float32", list(bundle_lib.DTYPES), "stored weight dtype")

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                            "shapes_demo.py")


def demo_config(workdir: str):
  """experiments/shapes_demo.py with its data paths under `workdir`, as `make demo` runs it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("shapes_demo_config", _DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  data = os.path.join(workdir, "data")
  cfg.data.videos_dir = os.path.join(data, "shapes")
  cfg.data.latents_dir = os.path.join(data, "latents")
  cfg.data.tokenizer = os.path.join(data, "tokenizer.model")
  return cfg


def export(workdir: str, out: str, *, dtype: str = "float32", cfg=None) -> dict:
  """Writes the bundle of `workdir` to `out`; returns its manifest."""
  if not os.path.isdir(workdir):
    raise bundle_lib.BundleError(f"--workdir {workdir} does not exist")
  if cfg is None and bundle_lib.WorkdirLayout(Path(workdir)).config_file() is None:
    print(f"[export] {workdir} holds no config.json; using {_DEMO_CONFIG} with data under {workdir}/data",
          flush=True)
    cfg = demo_config(workdir)
  cfg, dit, vae, stats, tok, source = bundle_lib.read_workdir(workdir, cfg)
  # Build the models once from the weights: a config that does not fit them fails here, not at load.
  bundle_lib.assemble(cfg, dit, vae, tok, stats, manifest={}, path=workdir)
  return bundle_lib.write(out, config=cfg, dit_params=dit, vae_params=vae, tokenizer_model=tok,
                          latent_stats=stats, dtype=dtype, source=source)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  if not FLAGS.workdir or not FLAGS.out:
    config_lib._fail("--workdir and --out are required")  # pylint: disable=protected-access
  distributed.initialize()  # on a multi-host launch: process 0 writes, the others wait for it
  cfg = config_lib.get_config() if flags.FLAGS["config"].present else None
  start = time.time()
  try:
    manifest = distributed.write_on_main(lambda: export(FLAGS.workdir, FLAGS.out, dtype=FLAGS.dtype, cfg=cfg))
  except (bundle_lib.BundleError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  size = sum(f["bytes"] for f in manifest["files"].values())
  p = manifest["parameters"]
  print(f"[export] wrote {FLAGS.out}: {len(manifest['files'])} files, {size / 1e6:.1f} MB, {FLAGS.dtype}; "
        f"DiT {p['dit'] / 1e6:.2f}M + text {p['text_encoder'] / 1e6:.2f}M + VAE {p['vae'] / 1e6:.2f}M params "
        f"(DiT step {manifest['source']['dit_step']}, VAE step {manifest['source']['vae_step']}) "
        f"in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
  define_flags()
  config_lib.run(main)
