"""Wan 2.1's whole text-to-video pipeline, converted, samples in sora_jax what diffusers samples.

A tiny random diffusers `WanPipeline` (UMT5 encoder, T5 tokenizer over a sentencepiece model trained
here, WanTransformer3DModel, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler with shift 3) is saved
with `save_pretrained` (plus the tokenizer's `spiece.model`, as the published folders ship it), converted
by `python -m sora_jax.convert.wan`, and sampled by `python -m sora_jax.sample` from the same initial
noise, prompt, empty negative prompt, 4 Euler steps and guidance 5, at the pipeline's default
max_sequence_length (512, zero-padded text features): every frame must be within 1 uint8 level of
diffusers' output.

Needs the `interop` extra (torch, diffusers, transformers): `make test-interop`.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.interop
_WHY = "needs the interop extra (torch, diffusers, transformers): pip install -e '.[interop]' or make test-interop"
torch = pytest.importorskip("torch", reason=_WHY)
diffusers = pytest.importorskip("diffusers", reason=_WHY)
transformers = pytest.importorskip("transformers", reason=_WHY)

from test_tokenizer import t5_sentencepiece  # pylint: disable=wrong-import-position
from test_umt5_interop import random_umt5  # pylint: disable=wrong-import-position
from test_wan_interop import random_wan  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red fox jumps over the lazy dog"
FRAMES, HEIGHT, WIDTH = 5, 32, 48  # 2 latent frames of 4 x 6 latents: 2 x 2 x 3 tokens
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def t5_tokenizer(proto: bytes):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(proto)
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(proto)
  vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  return transformers.T5Tokenizer(vocab=vocab, extra_ids=0,
                                  _spm_precompiled_charsmap=model.normalizer_spec.precompiled_charsmap), len(vocab)


def random_transformer(seed: int):
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**DIT).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm2.weight") or "norm_q" in name or "norm_k" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  # A strong text path and prediction, so that the prompt, the negative prompt, guidance and the sampler
  # all show in the frames (checked in the test); at init they barely move a random VAE's output.
  with torch.no_grad():
    model.proj_out.weight.mul_(60.0)
    model.condition_embedder.text_embedder.linear_2.weight.mul_(5.0)
    for block in model.blocks:
      block.attn2.to_out[0].weight.mul_(10.0)
  return model


def run(args, what):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{what} failed:\n{proc.stderr[-3000:]}"
  return proc


def test_converted_pipeline_samples_what_diffusers_samples(tmp_path):
  proto = t5_sentencepiece()
  tokenizer, vocab_size = t5_tokenizer(proto)
  pipe = diffusers.WanPipeline(
      tokenizer=tokenizer, text_encoder=random_umt5(vocab_size, seed=1),
      transformer=random_transformer(2), vae=random_wan(3, **VAE),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
  src = tmp_path / "pipeline"
  pipe.save_pretrained(src)
  (src / "tokenizer" / "spiece.model").write_bytes(proto)

  noise = np.random.default_rng(4).standard_normal((16, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8))
  noise = noise.astype(np.float32)

  def reference(guidance):
    with torch.no_grad():
      frames = pipe(prompt=PROMPT, negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=4, guidance_scale=guidance, latents=torch.from_numpy(noise[None]),
                    output_type="np").frames[0]
    return np.round(np.asarray(frames, np.float64) * 255.0)

  want = reference(5.0)
  # The comparison resolves the settings: guidance 4 instead of 5 moves frames by far more than a level.
  assert np.abs(reference(4.0) - want).max() > 10.0

  bundle = tmp_path / "bundle"
  run(["sora_jax.convert.wan", f"--pipeline={src}", f"--out={bundle}", "--dtype=float32"], "convert")
  np.save(tmp_path / "noise.npy", noise)
  out = tmp_path / "video.npy"
  run(["sora_jax.sample", f"--bundle={bundle}", f"--prompt={PROMPT}", "--negative_prompt=",
       f"--noise={tmp_path / 'noise.npy'}", "--sampler=euler", "--steps=4", "--guidance=5",
       f"--num_frames={FRAMES}", f"--height={HEIGHT}", f"--width={WIDTH}", f"--out={out}"], "sample")
  got = np.load(out).astype(np.float64)
  assert got.shape == want.shape == (FRAMES, HEIGHT, WIDTH, 3)
  assert np.abs(got - want).max() <= 1.0, np.abs(got - want).max()
  assert want.std() > 5.0  # frames with content, not a flat field that any model would match
