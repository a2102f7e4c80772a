"""Wan 2.1 VAE weights converted from diffusers' AutoencoderKLWan give diffusers' own outputs.

A randomly initialised AutoencoderKLWan (diffusers is the reference implementation; no weights are
downloaded) is saved with `save_pretrained`, converted by `python -m sora_jax.convert.wan_vae`, loaded
back the way the bundle export loads a trained VAE (bundle.restore_ema + build_model), and both models
run on the same input: posterior mean, log-variance and reconstruction must agree to 1e-4 in float32,
for an image and a 17-frame video, through sora_jax's full-sequence and chunked paths. diffusers
encodes frame 0 then 4 frames at a time and decodes one latent frame at a time, with its feature cache.

Needs the `interop` extra (torch, diffusers, safetensors): `make test-interop`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.interop
_WHY = "needs the interop extra (torch, diffusers, safetensors): pip install -e '.[interop]' or make test-interop"
torch = pytest.importorskip("torch", reason=_WHY)
diffusers = pytest.importorskip("diffusers", reason=_WHY)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=_WHY)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from sora_jax import bundle as bundle_lib  # pylint: disable=wrong-import-position
from sora_jax.convert import wan_vae  # pylint: disable=wrong-import-position
from sora_jax.models.vae import VAE  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
# Wan 2.1's structure (4x8x8, dim_mult [1, 2, 4, 4], 2 res blocks, temporal [False, True, True]) at
# tiny widths; its own latent statistics, so the converter must take them from config.json.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True], latents_mean=[0.5, -0.25, 0.0, 1.0],
            latents_std=[2.0, 1.5, 0.5, 1.0])


def random_wan(seed: int, **kwargs):
  """An AutoencoderKLWan with signal in every tensor: RMS gammas off 1 and biases off their init,
  so that a misplaced gamma or bias cannot go unnoticed."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLWan(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.add_(0.05 * torch.randn_like(p))
  return model


def convert_cli(src: Path, out: Path) -> None:
  proc = subprocess.run([sys.executable, "-m", "sora_jax.convert.wan_vae", f"--input={src}",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[convert]" in proc.stdout


def load_converted(out: Path) -> VAE:
  """The converted run loaded as a trained VAE run is: newest checkpoint's EMA weights, its config."""
  params, step, key = bundle_lib.restore_ema(out)
  assert (step, key) == (0, "ema")
  cfg = json.loads((out / "config.json").read_text())
  return bundle_lib.build_model(lambda: VAE(cfg["vae"], rngs=nnx.Rngs(0)), params, what=str(out))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("wan")
  model = random_wan(0, **TINY)
  model.save_pretrained(root / "diffusers")  # diffusion_pytorch_model.safetensors + config.json
  convert_cli(root / "diffusers", root / "vae")
  return {"torch": model, "jax": load_converted(root / "vae"), "out": root / "vae",
          "src": root / "diffusers"}


def reference(model, x_bcthw: np.ndarray):
  """diffusers' (mean, logvar, reconstruction of the mean), channels-last numpy."""
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x_bcthw)).latent_dist
    rec = model.decode(post.mean).sample
  last = lambda t: t.permute(0, 2, 3, 4, 1).numpy()
  return last(post.mean), last(post.logvar), last(rec)


def video(num_frames: int, size: int, seed: int) -> np.ndarray:
  """A smooth moving pattern plus noise in [-1, 1], [B, C, T, H, W] (torch's layout)."""
  t, y, x = np.meshgrid(np.arange(num_frames), np.arange(size), np.arange(size), indexing="ij")
  rng = np.random.default_rng(seed)
  base = np.stack([np.sin(0.3 * x + 0.5 * t + c) * np.cos(0.2 * y - 0.3 * t) for c in range(3)])
  v = 0.8 * base + 0.2 * rng.uniform(-1, 1, base.shape)
  return np.clip(v, -1, 1).astype(np.float32)[None]


def max_errors(vae: VAE, model, x_bcthw: np.ndarray) -> dict[str, float]:
  mean_ref, logvar_ref, rec_ref = reference(model, x_bcthw)
  x = jax.numpy.asarray(x_bcthw.transpose(0, 2, 3, 4, 1))
  # The decoders are compared on the same latents (diffusers' mean), so a decoder error is not an
  # encoder error seen twice. diffusers clamps its output to [-1, 1]; sora_jax's decode does not.
  assert np.mean(np.abs(rec_ref) < 1) > 0.5, "reference output saturated: the comparison would be weak"
  errs = {}
  for name, (mean, logvar), rec in (
      ("full", vae.encode(x), vae.decode(mean_ref)),
      ("chunked", vae.encode_chunked(x), vae.decode_chunked(mean_ref))):
    assert mean.shape == mean_ref.shape and rec.shape == rec_ref.shape
    errs[f"{name} mean"] = float(np.max(np.abs(np.asarray(mean) - mean_ref)))
    errs[f"{name} logvar"] = float(np.max(np.abs(np.asarray(logvar) - logvar_ref)))
    errs[f"{name} reconstruction"] = float(np.max(np.abs(np.clip(np.asarray(rec), -1, 1) - rec_ref)))
  print(f"max abs errors, {x_bcthw.shape[2]} frames:", json.dumps(errs))
  return errs


@pytest.mark.parametrize("num_frames", [1, 17])
def test_converted_tiny_wan_equals_diffusers(tiny, num_frames):
  x = video(num_frames, 32, seed=num_frames)
  errs = max_errors(tiny["jax"], tiny["torch"], x)
  assert max(errs.values()) <= TOL, errs
  # Not vacuous: latents and outputs carry signal well above the tolerance.
  mean_ref, logvar_ref, _ = reference(tiny["torch"], x)
  assert np.std(mean_ref) > 100 * TOL and np.std(logvar_ref) > 100 * TOL


def test_conversion_records_architecture_stats_and_source(tiny):
  out = tiny["out"]
  cfg = json.loads((out / "config.json").read_text())["vae"]
  assert (cfg["base_dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"],
          cfg["temporal_downsample"]) == (8, 4, [1, 2, 4, 4], 2, [False, True, True])
  stats = json.loads((out / "latent_stats.json").read_text())
  assert stats["shift"] == TINY["latents_mean"] and stats["scale"] == TINY["latents_std"]
  record = json.loads((out / "conversion.json").read_text())
  src = tiny["src"] / wan_vae.FILE_NAME
  assert record["sha256"] == bundle_lib.sha256(src)
  n_torch = sum(p.numel() for p in tiny["torch"].parameters())
  n_jax = sum(np.asarray(v).size for v in jax.tree.leaves(nnx.state(tiny["jax"], nnx.Param)))
  assert record["parameters"] == n_torch == n_jax


def test_published_wan21_latent_stats_without_config(tiny, tmp_path):
  s = wan_vae.infer_settings(wan_vae.read_safetensors(tiny["src"] / wan_vae.FILE_NAME))
  wide = wan_vae.vae_lib.settings(dict(wan_vae.settings_dict(s), z_dim=16))
  stats = wan_vae.latent_stats(None, wide)
  assert stats["shift"][:2] == [-0.7571, -0.7089] and stats["scale"][-1] == 1.9160
  assert wan_vae.latent_stats(None, s)["scale"] == [1.0] * 4  # no statistics of 4 channels known


def _save(tensors: dict, directory: Path) -> Path:
  directory.mkdir()
  safetensors_torch.save_file(tensors, str(directory / wan_vae.FILE_NAME))
  return directory


@pytest.mark.parametrize("case", ["missing", "extra", "wan22_layout", "transposed", "not_safetensors"])
def test_bad_checkpoints_are_refused_in_one_line(tiny, tmp_path, case):
  state = {k: v.clone() for k, v in tiny["torch"].state_dict().items()}
  if case == "missing":
    del state["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
  elif case == "extra":
    state["decoder.mid_block.attentions.1.proj.weight"] = torch.zeros(32, 32, 1, 1)
  elif case == "wan22_layout":
    state["encoder.down_blocks.11.resnets.0.conv1.weight"] = torch.zeros(32, 32, 3, 3, 3)
  elif case == "transposed":  # [I, O, ...] where [O, I, ...] belongs
    state["encoder.conv_out.weight"] = state["encoder.conv_out.weight"].transpose(0, 1).contiguous()
  src = _save(state, tmp_path / "in")
  if case == "not_safetensors":
    (src / wan_vae.FILE_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  proc = subprocess.run([sys.executable, "-m", "sora_jax.convert.wan_vae", f"--input={src}",
                         f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_existing_output_is_not_overwritten(tiny):
  with pytest.raises(wan_vae.ConversionError, match="not empty"):
    wan_vae.run(tiny["src"], tiny["out"])


def test_reconstruct_cli_on_converted_vae(tiny, tmp_path):
  """The converted run works in `sora_jax.reconstruct --vae DIR` (issue 3's tool) like a trained one."""
  pytest.importorskip("sora_jax.reconstruct", reason="sora_jax.reconstruct is not built yet (issue 3)")
  frames = ((video(5, 32, seed=3)[0].transpose(1, 2, 3, 0) + 1) * 127.5).round().astype(np.uint8)
  np.save(tmp_path / "in.npy", frames)
  proc = subprocess.run([sys.executable, "-m", "sora_jax.reconstruct", f"--vae={tiny['out']}",
                         f"--input={tmp_path / 'in.npy'}", f"--out={tmp_path / 'out.npy'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = np.load(tmp_path / "out.npy")
  x = (frames.astype(np.float32) / 127.5 - 1).transpose(3, 0, 1, 2)[None]
  with torch.no_grad():
    rec = tiny["torch"].decode(tiny["torch"].encode(torch.from_numpy(x)).latent_dist.mean).sample
  want = ((rec[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5)
  assert got.shape == frames.shape and got.dtype == np.uint8
  assert np.max(np.abs(got.astype(np.float32) - want)) <= 1.0  # uint8 rounding only


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """The full-size Wan 2.1 architecture (diffusers' defaults, 126.9M parameters), random weights."""
  root = tmp_path_factory.mktemp("wan21")
  model = random_wan(1)
  assert model.config.base_dim == 96 and model.config.z_dim == 16
  model.save_pretrained(root / "diffusers")
  wan_vae.run(root / "diffusers", root / "vae")
  return {"torch": model, "jax": load_converted(root / "vae")}


@pytest.mark.slow
@pytest.mark.parametrize("num_frames", [1, 17])
def test_real_wan21_config_equals_diffusers(real, num_frames):
  vae = real["jax"]
  wan_cfg = _wan21_config().vae
  assert wan_vae.settings_dict(vae.settings) == wan_vae.settings_dict(wan_vae.vae_lib.settings(wan_cfg))
  errs = max_errors(vae, real["torch"], video(num_frames, 64, seed=0))
  assert max(errs.values()) <= TOL, errs


def _wan21_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("wan21_vae", os.path.join(ROOT, "experiments", "wan21_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
