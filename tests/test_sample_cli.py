"""The sample CLI: every prompting mode writes a playable file of the requested size (tiny random models).

The CLI runs in this process (`sample.main` after parsing its flags) on a real bundle of a tiny random
DiT + VAE, so the compiled steps are shared between tests; a slow test runs every mode as a separate
`python -m sora_jax.sample` process. The causal VAE makes some checks
exact even with random weights: output frame 0 decodes from latent frame 0 alone, so an image prompt's
first frame must equal the VAE's reconstruction of the image, and a forward extension must begin with
the reconstruction of the given frames.
"""
import numpy as np
import pytest
from absl import flags
from flax import nnx

from sora_jax import sample
from sora_jax import sampling as S
from sora_jax import video_io

import test_sampling as ts  # tiny_config, tokenize


CAPTIONS = ["a red circle moving left on a black background", "a blue square on a gray background",
            "a green triangle bouncing up and down on a black background"]


def write_bundle(path):
  """A real bundle (sora_jax.bundle) of the tiny random DiT and VAE, with a trained tokenizer."""
  from sora_jax import bundle
  from sora_jax.data import tokenizer
  dit, vae = ts.tiny_models()
  tok = tokenizer.train_tokenizer(CAPTIONS * 4, path.parent / "tok.model", vocab_size=ts.V)
  assert tok.vocab_size <= ts.V
  params = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
  bundle.write(path, config=ts.tiny_config(), dit_params=params(dit), vae_params=params(vae),
               tokenizer_model=path.parent / "tok.model",
               latent_stats={"shift": [0.1] * 4, "scale": [0.5] * 4})
  return path


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
  return write_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def pipe(bundle_dir):
  return sample.load_models(str(bundle_dir), None)


@pytest.fixture
def cli(bundle_dir):
  def run(*args):
    flags.FLAGS.unparse_flags()
    argv = ["sample", f"--bundle={bundle_dir}", "--steps=2", "--guidance=2"] + list(args)
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
      "--width=24", f"--out={out}", "--also=npy,gif,png")
  for suffix in (".mp4", ".gif", ".npy"):
    frames, _ = video_io.read_video(out.with_suffix(suffix))
    assert frames.shape == (9, 16, 24, 3), suffix
  exact = np.load(out.with_suffix(".npy"))
  assert exact.dtype == np.uint8 and exact.std() > 0
  assert video_io.read_video(out.with_suffix(".png"))[0].shape[0] == 1  # a grid image of the frames


def test_one_frame_is_written_as_png_and_prompts_file_numbers_outputs(cli, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("# a comment\na red circle on a black background\n\n"
                     "a blue square moving up on a gray background | 5 | 16x16\n")
  cli(f"--prompts_file={prompts}", "--num_frames=1", "--height=24", "--width=16",
      f"--out={tmp_path / 's.mp4'}")
  img, _ = video_io.read_video(tmp_path / "s_000.png")
  assert img.shape == (1, 24, 16, 3)
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


def test_noise_file_sets_the_start(cli, pipe, tmp_path, capsys):
  args = ["--prompt=a red circle", "--num_frames=5", "--height=16", "--width=24", "--sampler=unipc"]
  t, h, w, c = pipe.geometry.latent_shape(5, 16, 24)
  # The noise the seed would draw, written in diffusers' layout [C, T, H, W], gives the seed's video.
  np.save(tmp_path / "seed0.npy", np.transpose(S._draw(0, 0, 0, (t, h, w, c)), (3, 0, 1, 2)))
  np.save(tmp_path / "other.npy", np.random.default_rng(1).normal(size=(c, t, h, w)).astype(np.float32))
  out = {}
  for name, extra in (("seed", []), ("file", [f"--noise={tmp_path / 'seed0.npy'}"]),
                      ("again", [f"--noise={tmp_path / 'seed0.npy'}", "--seed=5"]),
                      ("other", [f"--noise={tmp_path / 'other.npy'}"])):
    cli(*args, *extra, f"--out={tmp_path / name}.npy")
    out[name] = np.load(tmp_path / f"{name}.npy")
  np.testing.assert_array_equal(out["file"], out["seed"])
  np.testing.assert_array_equal(out["again"], out["file"])  # the file, not --seed, sets the noise
  assert np.abs(out["other"].astype(int) - out["file"]).mean() > 1.0
  np.save(tmp_path / "wrong.npy", np.zeros((c, t, w, h), np.float32))
  capsys.readouterr()  # the progress bars so far
  with pytest.raises(SystemExit) as e:
    cli(*args, f"--noise={tmp_path / 'wrong.npy'}", f"--out={tmp_path / 'x.npy'}")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert f"shape {(c, t, w, h)}" in err and f"[C, T, H, W] = {(c, t, h, w)}" in err, err
  with pytest.raises(SystemExit):
    cli(*args, "--prompt=a blue square", f"--noise={tmp_path / 'other.npy'}", f"--out={tmp_path / 'x.npy'}")
  assert "2 prompts were given" in capsys.readouterr().err


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
      "--height=24", "--width=16", f"--out={tmp_path / 'back.mp4'}")
  assert video_io.read_video(tmp_path / "back.mp4")[0].shape == (13, 24, 16, 3)
  # Given frames at the end come out as the VAE decodes them in their own clip (not after the
  # generated frames): backward, the input's first frames 1..8 (2 of the output's 4 latent frames).
  cli("--prompt=x", f"--extend={tmp_path / 'a.npy'}", "--direction=backward", "--num_frames=13",
      f"--out={tmp_path / 'back.npy'}")
  a, b, ft = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), pipe.geometry.temporal
  np.testing.assert_array_equal(np.load(tmp_path / "back.npy")[-2 * ft:], _recon(pipe, a[:1 + 2 * ft])[1:])
  cli("--prompt=x", f"--connect={tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", "--num_frames=13",
      f"--out={tmp_path / 'conn.npy'}")
  conn = np.load(tmp_path / "conn.npy")
  assert conn.shape == (13, 16, 16, 3)
  np.testing.assert_array_equal(conn[0], _recon(pipe, a[-1:])[0])
  np.testing.assert_array_equal(conn[-ft:], _recon(pipe, b[:1 + ft])[1:])
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


@pytest.mark.slow
def test_every_mode_as_a_separate_process(bundle_dir, tmp_path):
  import subprocess
  import sys
  np.save(tmp_path / "a.npy", _clip(9, 16, 16, 1))
  np.save(tmp_path / "b.npy", _clip(9, 16, 16, 2))
  video_io.write_video(tmp_path / "img.png", _clip(1, 16, 16, 3))
  base = [sys.executable, "-m", "sora_jax.sample", f"--bundle={bundle_dir}", "--steps=2",
          f"--prompt={CAPTIONS[0]}"]
  modes = {"text.mp4": ["--num_frames=9", "--height=16", "--width=24"],
           "image.mp4": [f"--image={tmp_path / 'img.png'}", "--num_frames=9"],
           "fwd.mp4": [f"--extend={tmp_path / 'a.npy'}", "--num_frames=17"],
           "back.mp4": [f"--extend={tmp_path / 'a.npy'}", "--direction=backward", "--num_frames=17"],
           "conn.mp4": [f"--connect={tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", "--num_frames=13"],
           "edit.mp4": [f"--edit={tmp_path / 'b.npy'}", "--strength=0.7"]}
  want = {"text.mp4": (9, 16, 24), "image.mp4": (9, 16, 16), "fwd.mp4": (17, 16, 16),
          "back.mp4": (17, 16, 16), "conn.mp4": (13, 16, 16), "edit.mp4": (9, 16, 16)}
  for name, args in modes.items():
    r = subprocess.run(base + args + [f"--out={tmp_path / name}"], capture_output=True, text=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, (name, r.stderr[-2000:])
    assert video_io.read_video(tmp_path / name)[0].shape == want[name] + (3,), name


def test_a_prompt_the_tokenizer_does_not_know_is_warned_about(cli, pipe, tmp_path, capsys):
  import dataclasses
  from sora_jax.data import tokenizer
  # A tokenizer that holds the captions' words (the bundle's tiny one spells every word).
  tok = tokenizer.train_tokenizer(CAPTIONS * 4, None, vocab_size=128)
  known = dataclasses.replace(pipe, tokenize=tok)
  assert known.caption_warning("a red circle on a black background") is None
  warning = known.caption_warning("a purple dodecahedron on a black background")
  assert warning.startswith("warning: prompt 'a purple dodecahedron")
  assert "'purple', 'dodecahedron' not in" in warning
  long = " ".join(["a red circle moving left on a black background"] * 2)
  assert f"cut at data.max_text_tokens={pipe.cfg.data.max_text_tokens}" in known.caption_warning(long)
  cli("--prompt=a purple circle", "--num_frames=1", "--height=16", "--width=16", f"--out={tmp_path / 'p.png'}")
  err = capsys.readouterr().err
  assert "warning: prompt 'a purple circle': " in err and "'purple'" in err and "vocabulary" in err
