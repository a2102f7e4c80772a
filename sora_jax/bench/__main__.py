"""`make bench`: every CPU benchmark behind docs/benchmarks.md, one after another.

    python -m sora_jax.bench --all              # everything below (tens of minutes on 2 cores)
    python -m sora_jax.bench --only attention,packing

Each benchmark runs in its own process, as its docstring's command would run it; the ones that need a
TPU topology (libtpu) or a GPU are left to their modules' own flags (see each module's docstring).
"""
from __future__ import annotations

import subprocess
import sys

from absl import app, flags

_ALL = flags.DEFINE_bool("all", False, "run every benchmark")
_ONLY = flags.DEFINE_list("only", [], "run these benchmarks")

BENCHMARKS = {
    "packing": ["--seq_lens", "1024,4096", "--num_samples", "3000"],
    "attention": ["--what=cpu,memory"],
    "dit": [],
    "vae_memory": [],
    "finetune_memory": [],
    "vae_conv": ["--config", "experiments/shapes_demo.py"],
    "sampling": ["--what=packed,minute"],
}


def main(argv):
  del argv
  names = list(BENCHMARKS) if _ALL.value else _ONLY.value
  unknown = set(names) - set(BENCHMARKS)
  if not names or unknown:
    print(f"error: pick --all or --only from {sorted(BENCHMARKS)} (got {sorted(unknown) or 'none'})",
          file=sys.stderr)
    sys.exit(2)
  failed = []
  for name in names:
    cmd = [sys.executable, "-m", f"sora_jax.bench.{name}", *BENCHMARKS[name]]
    print(f"[bench] {' '.join(cmd)}", flush=True)
    if subprocess.call(cmd):
      failed.append(name)
  if failed:
    print(f"[bench] failed: {failed}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
