"""Video ingestion: good files all land as clips of legal sizes, bad files are reported, the run exits 0."""
import json
from pathlib import Path
import subprocess
import sys

from hypothesis import given, strategies as st
import numpy as np
import pytest

from sora_jax import video_io
from sora_jax.data import ingest, sources
from test_video_io import write_faststart_mp4

ROOT = Path(__file__).resolve().parents[1]


def _noise_clip(T, H, W, seed):
  """A random image held still: frames survive lossy codecs well enough to compare colours."""
  rng = np.random.default_rng(seed)
  return np.repeat(rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8), T, axis=0)


# name -> (frames, height, width, fps, expected clip frame counts with --max_seconds 2 at 8 fps)
GOOD = {
    "a.mp4": (40, 96, 160, 16, [17]),          # 2.5 s at 16 fps -> 20 frames -> one 17-frame clip
    "long.mp4": (130, 64, 112, 8, [17] * 7 + [9]),  # split; the 11-frame tail snaps to 9
    "big.mp4": (24, 240, 320, 24, [5]),         # downscaled into the pixel budget
    "slow.mp4": (5, 48, 48, 4, [9]),            # 4 fps is upsampled by holding frames
    "c.gif": (12, 48, 64, 8, [9]),
    "d.png": (1, 50, 70, None, [1]),            # an image is a one-frame clip, trimmed to 48x64
    "e.jpg": (1, 64, 48, None, [1]),
    "sub/f.mp4": (9, 32, 32, 8, [9]),
    "g.npy": (5, 32, 64, None, [5]),
}
BAD = {  # name -> the reason the report must give
    "corrupt.mp4": "undecodable",
    "truncated.mp4": "undecodable",
    "zero.webm": "empty file",
    "text.mp4": "undecodable",
    "cut.gif": "truncated GIF",
    "nocaption.mp4": "no caption",
    "notes.txt": "not a video or image",
    "gone.mp4": "missing",
    "strip.png": "aspect ratio",
    # With frame threads the decoder ends quietly at the cut and the declared frame count catches it;
    # on one core (taskset) it reports the broken packet itself. Rejected either way.
    "cut_faststart.mp4": ("truncated (decoded", "decode error after"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  (d / "sub").mkdir()
  captions = []
  for i, (name, (T, H, W, fps, _)) in enumerate(GOOD.items()):
    frames = _noise_clip(T, H, W, i)
    if name.endswith(".jpg"):
      from PIL import Image
      Image.fromarray(frames[0]).save(d / name, quality=95)
    else:
      video_io.write_video(d / name, frames, fps or 8)
    captions.append({"file": name, "caption": f"  the clip   {name} "})
  video_io.write_video(d / "nocaption.mp4", _noise_clip(9, 32, 32, 0), 8)
  (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  good_mp4 = (d / "a.mp4").read_bytes()
  (d / "truncated.mp4").write_bytes(good_mp4[:len(good_mp4) // 2])
  (d / "zero.webm").write_bytes(b"")
  (d / "text.mp4").write_text("this is not a video\n")
  gif = (d / "c.gif").read_bytes()
  (d / "cut.gif").write_bytes(gif[:len(gif) * 2 // 3])
  (d / "notes.txt").write_text("notes")
  video_io.write_video(d / "strip.png", _noise_clip(1, 20, 200, 0))
  noise = np.random.default_rng(0).integers(0, 256, (34, 64, 64, 3), dtype=np.uint8)
  write_faststart_mp4(d / "faststart.mp4", noise)
  data = (d / "faststart.mp4").read_bytes()
  (d / "faststart.mp4").unlink()
  (d / "cut_faststart.mp4").write_bytes(data[:len(data) // 2])  # decodes 17 frames, no error
  for name in sorted(set(BAD) - {"nocaption.mp4"}):
    captions.append({"file": name, "caption": "a caption"})
  lines = [json.dumps(c) for c in captions] + ["{not json"]
  (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return d


@pytest.fixture(scope="module")
def ingested(folder, tmp_path_factory):
  out = tmp_path_factory.mktemp("ingested")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "data_pipelines" / "ingest_videos.py"), f"--input={folder}",
       f"--out_dir={out}", "--max_seconds=2", "--num_workers=2"], capture_output=True, text=True)
  return proc, out


def test_bad_files_are_reported_and_the_run_succeeds(ingested):
  proc, out = ingested
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = [l for l in proc.stdout.splitlines() if l.startswith("ingest:")]
  assert len(summary) == 1 and f"{len(GOOD)} files" in summary[0], proc.stdout
  report = json.loads((out / ingest.REPORT).read_text())
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  for name, why in BAD.items():
    assert any(w in reasons.get(name, "") for w in ((why,) if isinstance(why, str) else why)), (
        name, reasons.get(name))
  assert any("bad captions line" in r for r in reasons.values())
  assert sorted(f["file"] for f in report["ingested"]) == sorted(GOOD)
  assert report["num_skipped"] == len(BAD) + 1


def test_every_good_file_becomes_clips_of_legal_sizes(ingested, folder):
  _, out = ingested
  src = sources.video_source(out, "train")
  by_file = {}
  for rec in src:
    name = rec["source"].split("#")[0]
    by_file.setdefault(name, []).append(rec)
  assert sorted(by_file) == sorted(GOOD)
  for name, recs in by_file.items():
    T, H, W, _, expected = GOOD[name]
    assert [r["num_frames"] for r in recs] == expected, name
    for r in recs:
      t, h, w, c = r["video"].shape
      assert (t, h, w, c) == (r["num_frames"], r["height"], r["width"], 3)
      assert h % 16 == 0 and w % 16 == 0 and h * w <= 128 * 128 and min(h, w) >= 32
      assert abs(np.log((w / h) / (W / H))) < 0.12, (name, (h, w), (H, W))  # aspect kept, no square crop
      assert r["fps"] == 8.0 and r["caption"] == f"the clip {name}" and r["labels"] == ""
  # a lossless image that fits the budget is only trimmed to multiples of 16, centred
  png = np.asarray(video_io.read_video(folder / "d.png")[0])[0]
  np.testing.assert_array_equal(by_file["d.png"][0]["video"][0], png[1:49, 3:67])


def test_no_good_file_exits_nonzero_with_a_report(tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "x.mp4").write_bytes(b"garbage")
  (tmp_path / "in" / "captions.jsonl").write_text(json.dumps({"file": "x.mp4", "caption": "c"}) + "\n")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "data_pipelines" / "ingest_videos.py"), f"--input={tmp_path / 'in'}",
       f"--out_dir={tmp_path / 'out'}", "--num_workers=0"], capture_output=True, text=True)
  assert proc.returncode == 1
  report = json.loads((tmp_path / "out" / ingest.REPORT).read_text())
  assert report["num_files"] == 0 and report["skipped"][0]["file"] == "x.mp4"
  assert not list((tmp_path / "out").glob("videos/train/*/dataset_info.json"))


def test_resample_holds_frames_in_time():
  frames = [(i / 16, np.full((1, 1, 3), i, np.uint8)) for i in range(40)]  # 2.5 s at 16 fps
  out = [int(f[0, 0, 0]) for f in ingest.resample(iter(frames), 16, 8)]
  assert out == list(range(0, 40, 2))
  slow = [(i / 4, np.full((1, 1, 3), i, np.uint8)) for i in range(3)]  # 0.75 s at 4 fps
  assert [int(f[0, 0, 0]) for f in ingest.resample(iter(slow), 4, 8)] == [0, 0, 1, 1, 2, 2]


@given(st.integers(20, 4000), st.integers(20, 4000))
def test_target_size_keeps_aspect_within_budget(h, w):
  opts = ingest.IngestOptions(max_pixels=128 * 128)
  (rh, rw), (oh, ow) = ingest.target_size(h, w, opts)
  assert oh % 16 == 0 and ow % 16 == 0 and oh >= 16 and ow >= 16
  assert 0 <= rh - oh < 16 and 0 <= rw - ow < 16
  assert abs(rh / rw - h / w) / (h / w) < 0.1 or min(rh, rw) <= 40  # tiny sides round coarsely
  if max(h, w) / min(h, w) <= opts.max_aspect:  # wider inputs are rejected by process_file
    assert oh * ow <= opts.max_pixels and min(oh, ow) >= 32


def test_snap_frames():
  assert [ingest.snap_frames(n) for n in (1, 2, 4, 5, 8, 9, 33, 34)] == [1, 1, 1, 5, 5, 9, 33, 33]
