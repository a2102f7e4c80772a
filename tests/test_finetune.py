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
          f"--config.train.init_from={bundle}", f"--config.data.latents_dir={latents}",
          f"--workdir={workdir}"]
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
  over = {"train.total_steps": 6, "train.checkpoint_every_steps": 2}
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
  # Exported as a bundle: the base's with the run's EMA DiT weights.
  from sora_jax import export_finetune  # pylint: disable=g-import-not-at-top
  export_finetune.export(whole, tmp_path / "bundle")
  exported = bundle_lib.load_parts(tmp_path / "bundle")[1]
  np.testing.assert_array_equal(exported.pop("text")["embed"], base["text"]["embed"])
  jax.tree.map(np.testing.assert_array_equal, exported, a["ema"])


def _dir_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fixed_loss(cfg, model, batch, seeds=8):
  """The diffusion loss of `model` on one batch averaged over fixed draws of t and noise (no training noise
  in the comparison)."""
  from sora_jax import diffusion  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  loss = nnx.jit(lambda m, b, r: diffusion.loss_fn(m, b, r, cfg)[0])
  return float(np.mean([loss(model, batch, jax.random.key(s)) for s in range(seeds)]))


def test_lora_finetune_trains_only_adapters_and_merges_into_a_bundle(wan, tmp_path):
  """Rank-8 LoRA on every projection: the loss falls, the base stays bit-identical, the adapter is under
  5% of the base's size, and sampling with the adapter unmerged equals sampling the merged bundle."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import adapter, bundle as bundle_lib, sampling  # pylint: disable=g-import-not-at-top
  from sora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  bundle, latents = wan
  cfg = ff.finetune_config("size=1.3b,runlocal,lora=8")
  cfg.train.init_from, cfg.data.latents_dir = str(bundle), str(latents)
  cfg.train.total_steps = 30
  work = tmp_path / "lora"
  state = train.train(cfg, str(work), devices=jax.devices()[:2])
  assert int(state["step"]) == 30

  # The base is bit-identical to the bundle's weights after training (and the bundle is untouched).
  base = bundle_lib.load_parts(bundle)[1]
  base.pop("text")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["frozen"]), base)
  trained_leaves = jax.tree.leaves(state["params"])
  assert len(trained_leaves) == 2 * 10  # lora_a and lora_b on 10 projections (stacked over blocks)

  # The loss falls: logged training losses, and the same batch under fixed draws before and after.
  losses = [l for _, l in sorted(_losses(work).items())]
  assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8]), losses
  run_cfg = train.prepare_config(cfg, str(work))
  batch = next(pipeline.make_iterator(run_cfg, split="train"))
  plain = bundle_lib.load(bundle).dit
  tuned = nnx.merge(train.make_setup(run_cfg, sharding.mesh_from_config(run_cfg.mesh, jax.devices()[:2])).graphdef,
                    jax.device_get(state["params"]), base)
  before, after = _fixed_loss(run_cfg, plain, batch), _fixed_loss(run_cfg, tuned, batch)
  assert after < 0.85 * before, (before, after)

  # The adapter on its own: a few percent of the base.
  out = ff.run(["-m", "sora_jax.adapter", "save", f"--workdir={work}", f"--out={tmp_path / 'adapter'}"],
               "adapter save").stdout
  assert "[adapter] wrote" in out
  ratio = _dir_bytes(tmp_path / "adapter" / "weights") / _dir_bytes(bundle / "weights" / "dit")
  assert ratio < 0.05, ratio
  meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
  assert meta["base"]["manifest_sha256"] == adapter.base_identity(bundle)["manifest_sha256"]
  print(f"adapter {ratio:.2%} of the base DiT's bytes; a LoRA checkpoint "
        f"{_dir_bytes(work / 'checkpoints' / '30') / _dir_bytes(bundle / 'weights' / 'dit'):.2%}")

  # Merged into a bundle, it samples what the unmerged adapter samples (normalised latents, 1e-4).
  merged = tmp_path / "merged"
  ff.run(["-m", "sora_jax.adapter", "merge", f"--adapter={tmp_path / 'adapter'}", f"--bundle={bundle}",
          f"--out={merged}"], "adapter merge")
  reqs = [("a red fox runs across the snow", 5, 32, 48), ("the sun sets over the sea", 1, 32, 32)]
  kw = dict(seed=3, steps=4)
  with_merged = sampling.sample_latents(bundle_lib.load(merged), reqs, **kw)
  unmerged = adapter.apply(bundle_lib.load(bundle), bundle, tmp_path / "adapter")
  with_adapter = sampling.sample_latents(unmerged, reqs, **kw)
  plain_latents = sampling.sample_latents(bundle_lib.load(bundle), reqs, **kw)
  for m, u, p in zip(with_merged, with_adapter, plain_latents):
    np.testing.assert_allclose(u, m, atol=1e-4, rtol=0)
    assert np.abs(u - p).max() > 1e-2  # the adapter does change the samples
  # The sample CLI with --adapter writes the merged bundle's frames (the same noise, 1 uint8 level).
  ff.run(["-m", "sora_jax.sample", f"--bundle={bundle}", f"--adapter={tmp_path / 'adapter'}",
          f"--prompt={reqs[0][0]}", "--num_frames=5", "--height=32", "--width=48", "--steps=4", "--seed=3",
          f"--out={tmp_path / 'cli.npy'}"], "sample --adapter")
  want = sampling.generate(bundle_lib.load(merged), reqs[:1], **kw)[0].astype(np.int32)
  assert np.abs(np.load(tmp_path / "cli.npy").astype(np.int32) - want).max() <= 1
  # Exporting the run itself gives the merged bundle's DiT.
  from sora_jax import export_finetune  # pylint: disable=g-import-not-at-top
  export_finetune.export(work, tmp_path / "exported")
  jax.tree.map(np.testing.assert_array_equal, bundle_lib.load_parts(tmp_path / "exported")[1],
               bundle_lib.load_parts(merged)[1])
  # An adapter is refused on another base.
  with pytest.raises(adapter.AdapterError, match="was trained on bundle"):
    adapter.merge(tmp_path / "adapter", merged, tmp_path / "again")
