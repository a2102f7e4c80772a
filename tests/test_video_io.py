"""Video IO: every written format reads back (exactly where lossless), and bad files fail in one line."""
from pathlib import Path

import numpy as np
import pytest

from sora_jax import metrics
from sora_jax import video_io
from sora_jax.data import shapes


@pytest.fixture(scope="module")
def clip():
  o = shapes.ObjectSpec("circle", "red", "moving right", size=0.3, x=0.3, y=0.5)
  return shapes.render_clip(shapes.ClipSpec(objects=(o,), num_frames=17, height=48, width=64))


def test_lossless_formats_are_exact(clip, tmp_path):
  video_io.write_video(tmp_path / "x.npy", clip, 8)
  frames, _ = video_io.read_video(tmp_path / "x.npy")
  np.testing.assert_array_equal(frames, clip)
  video_io.write_video(tmp_path / "one.png", clip[3])
  frames, fps = video_io.read_video(tmp_path / "one.png")
  np.testing.assert_array_equal(frames, clip[3:4])
  video_io.write_video(tmp_path / "grid.png", clip)
  grid, _ = video_io.read_video(tmp_path / "grid.png")
  np.testing.assert_array_equal(grid[0], video_io.frame_grid(clip))
  assert grid.shape[1:3] == (4 * 48 + 3 * 2, 5 * 64 + 4 * 2)  # 17 frames: 4 rows of up to 5


# mp4's 4:2:0 chroma blurs the red edges; GIF only quantises colours.
@pytest.mark.parametrize("suffix,min_psnr", [(".mp4", 30.0), (".gif", 35.0)])
def test_lossy_formats_keep_length_rate_and_content(clip, tmp_path, suffix, min_psnr):
  path = tmp_path / f"x{suffix}"
  video_io.write_video(path, clip, fps=8)
  frames, fps = video_io.read_video(path)
  assert frames.shape == clip.shape and frames.dtype == np.uint8
  assert fps == pytest.approx(8.0, rel=0.01)
  assert metrics.psnr(frames, clip) > min_psnr
  rate, stream = video_io.iter_frames(path)
  times = [t for t, _ in stream]
  np.testing.assert_allclose(np.diff(times), 1 / 8, atol=0.011)  # GIF delays are centiseconds


def test_gif_with_repeated_frames_reads_back_every_frame(tmp_path):
  # GIF encoders merge identical consecutive frames into one longer frame (a still object, or a VAE
  # that copies a latent frame into two); reading expands it back, so T frames in are T frames out.
  frames = np.zeros((9, 16, 24, 3), np.uint8)
  frames[::2] = 200
  frames[4] = frames[5] = frames[3]
  frames[8] = frames[7]
  video_io.write_video(tmp_path / "r.gif", frames, fps=8)
  got, fps = video_io.read_video(tmp_path / "r.gif")
  assert got.shape == frames.shape and fps == pytest.approx(8.0, rel=0.05)
  np.testing.assert_array_equal(got.mean(axis=(1, 2, 3)) > 100, frames.mean(axis=(1, 2, 3)) > 100)


def test_unreadable_files_raise_one_line_errors(clip, tmp_path):
  video_io.write_video(tmp_path / "good.mp4", clip, 8)
  video_io.write_video(tmp_path / "good.gif", clip, 8)
  mp4 = (tmp_path / "good.mp4").read_bytes()
  gif = (tmp_path / "good.gif").read_bytes()
  cases = {
      "empty.mp4": (b"", "empty file"),
      "text.mp4": (b"just some text\n" * 20, "undecodable"),
      "half.mp4": (mp4[:len(mp4) // 2], "undecodable"),
      "half.gif": (gif[:len(gif) // 2], "truncated GIF"),
      "half.png": (None, "unreadable image"),
      "x.avi.txt": (b"abc", "suffix"),
  }
  video_io.write_video(tmp_path / "full.png", clip[0])
  png = (tmp_path / "full.png").read_bytes()
  for name, (data, why) in cases.items():
    (tmp_path / name).write_bytes(png[:len(png) // 2] if data is None else data)
    with pytest.raises(video_io.VideoReadError, match=why) as e:
      video_io.read_video(tmp_path / name)
    assert "\n" not in str(e.value) and name in str(e.value)
  with pytest.raises(video_io.VideoReadError, match="no such file"):
    video_io.read_video(tmp_path / "missing.mp4")


def write_faststart_mp4(path, frames, fps=8):
  """An mp4 with its index before the data, as web encoders write them."""
  import av
  with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    container.mux(stream.encode())


def test_cut_off_faststart_mp4_is_detected(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (34, 64, 64, 3), dtype=np.uint8)
  write_faststart_mp4(tmp_path / "fs.mp4", noise)
  assert video_io.read_video(tmp_path / "fs.mp4")[0].shape[0] == 34
  data = (tmp_path / "fs.mp4").read_bytes()
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])  # decodes some frames without an error
  # ... with frame threads; on one core (taskset) the decoder reports the cut packet instead.
  with pytest.raises(video_io.VideoReadError,
                     match="truncated \\(decoded \\d+ of 34 frames\\)|decode error after \\d+ frames"):
    video_io.read_video(tmp_path / "cut.mp4")


def test_write_rejects_bad_frames_and_suffixes(clip, tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    video_io.write_video(tmp_path / "x.mp4", clip.astype(np.float32))
  with pytest.raises(ValueError, match="'.avi'"):
    video_io.write_video(tmp_path / "x.avi", clip)
