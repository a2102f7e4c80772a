"""Fine-tuning a converted Wan 2.1 end to end (docs/finetune.md): a random diffusers WanPipeline with
experiments/wan21_finetune.py:runlocal's sizes is converted by convert.wan; captioned clips of mixed
sizes are ingested, encoded with its VAE (its latent normalisation) and its UMT5 (cached features);
`python -m sora_jax.train` fine-tunes it from the bundle, fully or with LoRA adapters.

Needs the interop extra (torch, diffusers, transformers) to build the pipeline: `make test-interop`.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]
_WHY = "needs the interop extra (torch, diffusers, transformers): pip install -e '.[interop]'"
pytest.importorskip("torch", reason=_WHY)
pytest.importorskip("diffusers", reason=_WHY)
pytest.importorskip("transformers", reason=_WHY)

import finetune_fixtures as ff  # pylint: disable=wrong-import-position
from sora_jax import checkpoint, finetune, sharding, train  # pylint: disable=wrong-import-position

ROOT = ff.ROOT
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
           XLA_FLAGS="--xla_force_host_platform_device_count=2")  # data parallel over 2 devices


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
  """(bundle, latents dir): the converted random Wan 2.1 and the fine-tuning data encoded with it."""
  root = tmp_path_factory.mktemp("wan_ft")
  cfg = ff.finetune_config()
  pipeline = ff.wan_pipeline(root / "pipeline", cfg)
  bundle = root / "bundle"
  ff.run(["-m", "sora_jax.convert.wan", f"--pipeline={pipeline}", f"--out={bundle}", "--dtype=float32"],
         "convert.wan")
  return bundle, ff.finetune_data(root, bundle)


def _args(wan, workdir, arg="size=1.3b,runlocal", **over):
  bundle, latents = wan
  args = ["-m", "sora_jax.train", f"--config=experiments/wan21_finetune.py:{arg}",
          f"--config.init_from={bundle}", f"--config.data.latents_dir={latents}", f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in over.items()]


def _start(args):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_state(workdir, arg="size=1.3b,runlocal"):
  cfg = ff.finetune_config(arg)
  cfg.dit.in_dim = 64
  mesh = sharding.mesh_from_config(cfg.mesh, jax.devices()[:2])
  setup = train.make_setup(cfg, mesh)
  mgr = checkpoint.Manager(str(workdir / "checkpoints"))
  state = mgr.restore(mgr.latest_step(), finetune.trained(setup.abstract_state))
  mgr.close()
  return jax.device_get(state)


def _has_checkpoint(workdir, step):
  d = workdir / "checkpoints"
  return d.is_dir() and any(n.isdigit() and int(n) >= step for n in os.listdir(d))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}


def test_full_finetune_from_a_bundle_resumes_exactly_after_sigkill(wan, tmp_path):
  """Killed (SIGKILL) after checkpoint 2 of 6, resumed: the same parameters, EMA, optimizer state and
  loss, bitwise, as one uninterrupted run; both started from the bundle's weights."""
  over = dict(total_steps=6, checkpoint_every_steps=2)
  whole = tmp_path / "whole"
  p = _start(_args(wan, whole, **over))
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out[-3000:]
  assert "start: bundle (step 0 of 6)" in out

  killed = tmp_path / "killed"
  p = _start(_args(wan, killed, **over))
  t0 = time.time()
  while not _has_checkpoint(killed, 2):
    assert p.poll() is None, p.stdout.read()[-3000:]
    assert time.time() - t0 < 900
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p = _start(_args(wan, killed, **over))
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out[-3000:]
  assert "start: workdir (step" in out and "start: workdir (step 0" not in out

  a, b = _final_state(whole), _final_state(killed)
  assert int(a["step"]) == int(b["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert _losses(whole)[6] == _losses(killed)[6]
  # The run trained the bundle's weights (not a random init): step-6 parameters are near the bundle's.
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  base = bundle_lib.load_parts(wan[0])[1]
  drift = np.abs(a["params"]["blocks"]["attn"]["q"]["kernel"] - base["blocks"]["attn"]["q"]["kernel"]).max()
  assert 0 < drift < 0.05
