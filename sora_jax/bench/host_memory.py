"""Peak host memory of one measurement per fresh process (peak RSS never goes down within one): what the
vae_memory and finetune_memory benchmarks share. The parent starts `python -m <bench> --child=...` for
each measurement and reads back the JSON line the child prints."""
from __future__ import annotations

import json
import resource
import subprocess
import sys


def rss_mib() -> float:
  """This process's resident memory now, MiB (the baseline a measurement subtracts)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def peak_since(base_mib: float) -> dict:
  """This process's peak RSS so far, and the same above `base_mib` (from `rss_mib`)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"peak_rss_mib": round(peak, 1), "baseline_rss_mib": round(base_mib, 1),
          "peak_above_baseline_mib": round(peak - base_mib, 1)}


def run_child(module: str, args: list[str], env: dict, what: str) -> dict:
  """The last JSON line printed by `python -m module args` (one measurement in a fresh process), also
  printed here as it arrives."""
  out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{what} failed: {out.stderr.strip().splitlines()[-3:]}")
  print(lines[-1], flush=True)
  return json.loads(lines[-1])
