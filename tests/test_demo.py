"""`make demo`'s driver end to end at the demo config's `runlocal` size (every stage, a few minutes on
2 cores): it leaves the bundle, the samples and the evaluation where README.md says, and a second run
resumes instead of redoing the training."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sora_jax import bundle

REPO = Path(__file__).resolve().parents[1]


def _demo(workdir, *extra):
  cmd = [sys.executable, "-m", "sora_jax.demo", "--config", "experiments/shapes_demo.py:runlocal",
         f"--workdir={workdir}", *extra]
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as `make demo` runs (conftest asks for 8)
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout + r.stderr


def test_a_stage_slower_than_expected_is_named_with_its_times():
  from experiments import shapes_demo
  from sora_jax import demo
  cfg = shapes_demo.get_config()
  assert cfg.train.max_train_seconds == 0 and cfg.vae_train.max_train_seconds == 0  # fixed steps, no caps
  expected = demo.expected_seconds(cfg, "dit")
  assert expected > 0 and demo.expected_seconds(cfg, "data-train") > 0
  assert demo.timing_lines(cfg, "dit", expected) == [
      f"[demo] dit: {expected / 60:.0f} min, expected about {expected / 60:.0f} min"]
  took = round(2 * expected / 60)  # twice the expectation: past the demo's slow_factor
  lines = demo.timing_lines(cfg, "dit", took * 60)
  assert lines[1] == (f"[demo] the dit stage took {took} min; expected about {expected / 60:.0f} min on an idle "
                      f"2-core CPU: this machine ({os.cpu_count()} cores) is slower or busy")


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path):
  w = tmp_path / "demo"
  out = _demo(w, "--config.demo.expected_minutes.tokenizer=0.0001")
  assert "[demo] the tokenizer stage took" in out and "is slower or busy" in out
  assert "stopped at step" not in out and "may stop training" not in out  # no cap in the demo's path
  stages = [m.group(1) for line in out.splitlines() if (m := re.match(r"\[demo\] (\S+) \(\d+s\): ", line))]
  assert stages == ["data-train", "data-validation", "data-test", "tokenizer", "vae", "latents", "dit",
                    "export", "samples", "evaluate"], stages
  assert "[eval] report:" in out and f"everything is under {w}/" in out

  manifest = json.loads((w / "bundle" / "manifest.json").read_text())
  assert manifest["files"] and all(len(f["sha256"]) == 64 for f in manifest["files"].values())
  assert len(list((w / "samples").glob("*.mp4"))) >= 4  # the demo prompts' videos (images are PNGs)
  metrics = json.loads((w / "eval" / "metrics.json").read_text())
  for key in ("colour", "motion", "persistence"):
    score = metrics["generation"]["groups"]["all"][key]
    lo, hi = score["ci95"]
    assert score["n"] > 0 and lo <= score["rate"] <= hi and score["rate"] == score["k"] / score["n"], score
  assert (w / "eval" / "report.html").stat().st_size > 0

  # Run again: the finished DiT is not trained further, and the bundle written again (verified against
  # its new manifest) holds the same weights.
  steps = sorted(p.name for p in (w / "dit" / "checkpoints").iterdir())
  _, dit, vae, _ = bundle.load_parts(w / "bundle")
  out = _demo(w, "--only=dit,export")
  assert "already at total_steps=10; nothing to do" in out and "[demo] finished" in out
  assert sorted(p.name for p in (w / "dit" / "checkpoints").iterdir()) == steps
  _, dit2, vae2, _ = bundle.load_parts(w / "bundle")
  for a, b in zip(jax.tree.leaves((dit, vae)), jax.tree.leaves((dit2, vae2)), strict=True):
    np.testing.assert_array_equal(a, b)
