"""The sample CLI: every prompting mode writes a playable file of the requested size (tiny random models).

The CLI runs in this process (`sample.main` after parsing its flags) with the model loader pointed at a
tiny random DiT + VAE, so the compiled steps are shared between tests. The causal VAE makes some checks
exact even with random weights: output frame 0 decodes from latent frame 0 alone, so an image prompt's
first frame must equal the VAE's reconstruction of the image, and a forward extension must begin with
the reconstruction of the given frames.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx

from sora_jax import sample
from sora_jax import sampling as S
from sora_jax import video_io

import test_sampling as ts  # tiny_config, tokenize


@pytest.fixture(scope="module")
def pipe():
  from sora_jax.models.dit import DiT
  from sora_jax.models.vae import VAE
  cfg = ts.tiny_config()
  cfg.vae = dict(base_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1, z_dim=4, temporal_downsample=(True, True))
  vae = VAE(cfg.vae, rngs=nnx.Rngs(1))
  dit = DiT(ml_collections.ConfigDict(cfg.dit), rngs=nnx.Rngs(0))
  state = nnx.state(dit, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(dit, jax.tree.unflatten(
      treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  shift, scale = np.full(4, 0.1, np.float32), np.full(4, 0.5, np.float32)
  return S.Pipeline(cfg, dit, vae, ts.tokenize, shift, scale)


@pytest.fixture
def cli(pipe, monkeypatch):
  monkeypatch.setattr(sample, "load_models", lambda bundle, workdir: pipe)

  def run(*args):
    flags.FLAGS.unparse_flags()
    argv = ["sample", "--bundle=unused", "--steps=2", "--guidance=2"] + list(args)
    flags.FLAGS(argv)
    sample.main(argv[:1])
  yield run
  flags.FLAGS.unparse_flags()


def _clip(frames, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _recon(pipe, frames):
  return pipe.decode(pipe.encode(frames))


def test_text_to_video_writes_every_format_at_the_requested_size(cli, tmp_path):
  out = tmp_path / "v.mp4"
  cli("--prompt=a red circle moving left on a black background", "--num_frames=9", "--height=16",
      "--width=32", f"--out={out}", "--also=npy,gif,png")
  for suffix in (".mp4", ".gif", ".npy"):
    frames, _ = video_io.read_video(out.with_suffix(suffix))
    assert frames.shape == (9, 16, 32, 3), suffix
  exact = np.load(out.with_suffix(".npy"))
  assert exact.dtype == np.uint8 and exact.std() > 0
  assert video_io.read_video(out.with_suffix(".png"))[0].shape[0] == 1  # a grid image of the frames


def test_one_frame_is_written_as_png_and_prompts_file_numbers_outputs(cli, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("# a comment\na red circle on a black background\n\n"
                     "a blue square moving up on a gray background | 5 | 16x16\n")
  cli(f"--prompts_file={prompts}", "--num_frames=1", "--height=32", "--width=16",
      f"--out={tmp_path / 's.mp4'}")
  img, _ = video_io.read_video(tmp_path / "s_000.png")
  assert img.shape == (1, 32, 16, 3)
  vid, _ = video_io.read_video(tmp_path / "s_001.mp4")
  assert vid.shape == (5, 16, 16, 3)


def test_bad_size_fails_with_one_line_naming_it(cli, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli("--prompt=x", "--num_frames=6", "--height=16", "--width=16", f"--out={tmp_path / 'x.mp4'}")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "num_frames 6" in err and "1 + 4k" in err and len(err.splitlines()) == 1
  with pytest.raises(SystemExit):
    cli("--prompt=x", "--num_frames=5", "--height=20", "--width=16", f"--out={tmp_path / 'x.mp4'}")
  assert "height 20" in capsys.readouterr().err


def test_image_prompt_becomes_the_first_frame(cli, pipe, tmp_path):
  image = _clip(1, 16, 16)
  video_io.write_video(tmp_path / "img.png", image)
  cli("--prompt=a red circle moving left", f"--image={tmp_path / 'img.png'}", "--num_frames=9",
      f"--out={tmp_path / 'o.npy'}")
  out = np.load(tmp_path / "o.npy")
  assert out.shape == (9, 16, 16, 3)  # the size defaults to the image's
  np.testing.assert_array_equal(out[0], _recon(pipe, image)[0])


def test_extend_forward_begins_with_the_given_frames(cli, pipe, tmp_path):
  clip = _clip(9, 16, 16)
  np.save(tmp_path / "in.npy", clip)
  cli("--prompt=a blue square", f"--extend={tmp_path / 'in.npy'}", "--direction=forward",
      "--num_frames=17", f"--out={tmp_path / 'o.npy'}")
  out = np.load(tmp_path / "o.npy")
  assert out.shape == (17, 16, 16, 3)
  # 17 frames = 5 latent frames; up to half (2) are given: the last 5 input frames, decoded exactly.
  np.testing.assert_array_equal(out[:5], _recon(pipe, clip[-5:]))


def test_extend_backward_and_connect_and_edit_write_requested_sizes(cli, pipe, tmp_path):
  np.save(tmp_path / "a.npy", _clip(9, 16, 16, 1))
  np.save(tmp_path / "b.npy", _clip(9, 16, 16, 2))
  cli("--prompt=x", f"--extend={tmp_path / 'a.npy'}", "--direction=backward", "--num_frames=13",
      "--height=16", "--width=32", f"--out={tmp_path / 'back.mp4'}")
  assert video_io.read_video(tmp_path / "back.mp4")[0].shape == (13, 16, 32, 3)
  cli("--prompt=x", f"--connect={tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", "--num_frames=13",
      f"--out={tmp_path / 'conn.npy'}")
  conn = np.load(tmp_path / "conn.npy")
  assert conn.shape == (13, 16, 16, 3)
  np.testing.assert_array_equal(conn[0], _recon(pipe, np.load(tmp_path / "a.npy")[-1:])[0])
  cli("--prompt=x", f"--edit={tmp_path / 'b.npy'}", "--strength=0.5", f"--out={tmp_path / 'e.gif'}")
  assert video_io.read_video(tmp_path / "e.gif")[0].shape == (9, 16, 16, 3)  # the input's size


def test_edit_strength_controls_how_much_of_the_input_survives(pipe):
  clip = _clip(5, 16, 16, 3)
  z_in = pipe.encode(clip)
  dist = []
  for strength in (0.1, 1.0):
    req = S.edit_prompt(pipe, "x", clip, 5, 16, 16, strength)
    (z,) = S.sample_latents(pipe, [req], steps=2, guidance=1.0)
    dist.append(float(np.abs(z - z_in).mean()))
  assert dist[0] < dist[1] / 3, dist


def test_two_modes_at_once_are_refused(cli, tmp_path, capsys):
  np.save(tmp_path / "a.npy", _clip(5, 16, 16))
  with pytest.raises(SystemExit):
    cli("--prompt=x", f"--image={tmp_path / 'a.npy'}", f"--edit={tmp_path / 'a.npy'}",
        f"--out={tmp_path / 'x.mp4'}")
  assert "one prompting mode" in capsys.readouterr().err
