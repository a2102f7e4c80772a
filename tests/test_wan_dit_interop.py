"""Wan 2.1's DiT (diffusers' WanTransformer3DModel), converted, gives diffusers' outputs in sora_jax,
alone and packed.

A tiny randomly initialised WanTransformer3DModel (no download) with signal in every tensor is saved as
safetensors, converted by sora_jax.convert.wan, and run on two videos of different sizes and an image,
each with its own timestep and caption features: sora_jax's DiT on each sample alone, and on all three
packed into one row with padding, must equal diffusers' output to 1e-4 in float32.

Needs the `interop` extra (torch, diffusers, safetensors): `make test-interop`.
"""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.interop
_WHY = "needs the interop extra (torch, diffusers, safetensors): pip install -e '.[interop]' or make test-interop"
torch = pytest.importorskip("torch", reason=_WHY)
diffusers = pytest.importorskip("diffusers", reason=_WHY)


import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from sora_jax import bundle as bundle_lib  # pylint: disable=wrong-import-position
from sora_jax import patching  # pylint: disable=wrong-import-position
from sora_jax.convert import safetensors_io, wan  # pylint: disable=wrong-import-position
from sora_jax.models.dit import DiT  # pylint: disable=wrong-import-position

TOL = 1e-4
C, TEXT_DIM = 16, 32
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
            text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# (latent frames, height, width) in latents, the diffusion time in [0, 1], caption length in tokens
SAMPLES = [((3, 4, 6), 0.83, 7), ((2, 6, 4), 0.31, 5), ((1, 4, 4), 0.57, 9)]


def random_wan(seed: int):
  """A WanTransformer3DModel with signal in every tensor: norm weights off 1, biases off 0, and the
  modulation tables at their random init."""
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**TINY).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm2.weight") or "norm_q" in name or "norm_k" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("wan_dit")
  ref = random_wan(0)
  ref.save_pretrained(root)
  cfg_json = json.loads((root / "config.json").read_text())
  tensors = safetensors_io.read(root)
  dit_cfg, patch = wan.dit_config(cfg_json, dtype="float32")
  dit_cfg["attention"] = "reference"
  params = wan.dit_params(tensors, dit_cfg, patch)
  cfg = ml_collections.ConfigDict(dit_cfg)
  ours = bundle_lib.build_model(lambda: DiT(cfg, rngs=nnx.Rngs(0)), params, what="converted Wan DiT")
  return ref, ours, patch


def inputs(seed: int):
  rng = np.random.default_rng(seed)
  out = []
  for (t, h, w), time, lt in SAMPLES:
    out.append(dict(latents=rng.normal(size=(C, t, h, w)).astype(np.float32), time=time,
                    text=rng.normal(size=(lt, TEXT_DIM)).astype(np.float32)))
  return out


def reference(ref, sample, patch):
  """diffusers' prediction for one sample, as sora_jax tokens [n, D]."""
  with torch.no_grad():
    out = ref(torch.from_numpy(sample["latents"][None]), torch.tensor([sample["time"] * 1000.0]),
              torch.from_numpy(sample["text"][None]), return_dict=False)[0][0].numpy()
  return patching.patchify(np.moveaxis(out, 0, -1), patch)[0]


def run_packed(ours, samples, patch, *, row_len: int, text_len: int):
  """sora_jax's prediction for `samples` packed into one row (in order, padding at the end)."""
  d = C * int(np.prod(patch))
  x = np.zeros((1, row_len, d), np.float32)
  pos = np.zeros((1, row_len, 3), np.int32)
  seg = np.zeros((1, row_len), np.int32)
  text = np.zeros((1, text_len, TEXT_DIM), np.float32)
  tseg = np.zeros((1, text_len), np.int32)
  spans, at, at_t = [], 0, 0
  for k, s in enumerate(samples):
    tok, p = patching.patchify(np.moveaxis(s["latents"], 0, -1), patch)
    n, m = len(tok), len(s["text"])
    x[0, at:at + n], pos[0, at:at + n], seg[0, at:at + n] = tok, p, k + 1
    text[0, at_t:at_t + m], tseg[0, at_t:at_t + m] = s["text"], k + 1
    spans.append((at, at + n))
    at, at_t = at + n, at_t + m
  t = np.asarray([[s["time"] for s in samples]], np.float32)
  out = np.asarray(ours(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(t), jnp.asarray(text),
                        jnp.asarray(tseg)))
  return [out[0, a:b] for a, b in spans], out[0, at:]


def test_converted_dit_equals_diffusers_alone_and_packed(models):
  ref, ours, patch = models
  samples = inputs(1)
  want = [reference(ref, s, patch) for s in samples]
  for s, w in zip(samples, want):
    (got,), _ = run_packed(ours, [s], patch, row_len=len(w), text_len=len(s["text"]))
    np.testing.assert_allclose(got, w, atol=TOL, rtol=0)
  packed, pad = run_packed(ours, samples, patch, row_len=sum(len(w) for w in want) + 5,
                           text_len=sum(len(s["text"]) for s in samples) + 3)
  for got, w in zip(packed, want):
    np.testing.assert_allclose(got, w, atol=TOL, rtol=0)
  assert np.all(pad == 0)
  assert min(np.abs(w).max() for w in want) > 0.1  # the reference output is not trivially small


def test_conversion_refuses_image_to_video_and_unused_tensors(models):
  ref, _, _ = models
  cfg = dict(ref.config)
  with pytest.raises(wan.ConversionError, match="image_dim"):
    wan.dit_config(dict(cfg, image_dim=1280))
  dit_cfg, patch = wan.dit_config(cfg)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  with pytest.raises(wan.ConversionError, match="no place"):
    wan.dit_params(dict(tensors, extra=np.zeros(3, np.float32)), dit_cfg, patch)
  del tensors["blocks.1.ffn.net.2.bias"]
  with pytest.raises(wan.ConversionError, match="blocks.1.ffn.net.2.bias is missing"):
    wan.dit_params(tensors, dit_cfg, patch)
