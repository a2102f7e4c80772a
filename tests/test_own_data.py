"""docs/own_data.md as a user runs it: every command of the page, as written, on a few generated clips
(paths moved under a temporary folder, the config at its `runlocal` size), from ingest to evaluation."""
import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own_data.md"
CONFIG = "experiments/own_videos.py"

_COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60), "yellow": (230, 220, 40)}


def page_commands() -> list[str]:
  """The page's commands: the lines of its code blocks that start with `python `."""
  blocks = re.findall(r"```\n(.*?)```", PAGE.read_text(), flags=re.S)
  return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python ")]


def _clip(colour: str, direction: int, seed: int) -> np.ndarray:
  """3 s at 8 fps of a coloured square crossing a dark 64x96 frame."""
  rng = np.random.default_rng(seed)
  frames = np.full((24, 64, 96, 3), rng.integers(0, 40), np.uint8)
  y = int(rng.integers(8, 40))
  for t in range(24):
    x = 8 + 3 * t if direction > 0 else 80 - 3 * t
    frames[t, y:y + 16, x:x + 16] = _COLOURS[colour]
  return frames


def _write_videos(root: Path) -> None:
  from sora_jax import video_io
  for split, n in (("train", 6), ("validation", 2)):
    folder = root / split
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
      colour = list(_COLOURS)[(i + (split == "validation")) % len(_COLOURS)]
      direction = 1 if i % 2 == 0 else -1
      video_io.write_video(folder / f"clip{i}.mp4", _clip(colour, direction, i), fps=8.0)
      caption = f"a {colour} square moving {'right' if direction > 0 else 'left'}"
      lines.append(json.dumps({"file": f"clip{i}.mp4", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_the_page_holds_every_stage():
  commands = " ".join(page_commands())
  for stage in ("ingest_videos.py", "sora_jax.train_vae", "encode_latents.py", "train_tokenizer.py",
                "sora_jax.train ", "sora_jax.export", "sora_jax.sample", "sora_jax.evaluate"):
    assert stage in commands, stage
  assert commands.count("--split validation") == 1 and "--splits train,validation" in commands


@pytest.mark.slow
def test_own_data_walkthrough_runs_as_written(tmp_path):
  _write_videos(tmp_path / "my_videos")
  run = tmp_path / "runs" / "mine"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  for command in page_commands():
    # The page's paths, moved under tmp_path; the config at its smoke-test size, rooted there too.
    argv = [a.replace("runs/mine", str(run)).replace("my_videos", str(tmp_path / "my_videos"))
            for a in shlex.split(command)]
    argv = [f"{CONFIG}:root={run},runlocal" if a == CONFIG else a for a in argv]
    assert argv[0] == "python"
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-3000:])
  assert (run / "bundle" / "manifest.json").is_file()
  assert (run / "samples" / "beach.mp4").stat().st_size > 0
  assert (run / "eval" / "report.html").stat().st_size > 0
  records = [json.loads(l) for l in (run / "dit" / "metrics.jsonl").read_text().splitlines()]
  assert any("val/loss" in r for r in records)  # the held-out loss on the validation latents
  metrics = json.loads((run / "eval" / "metrics.json").read_text())
  assert metrics["vae_ingested"]["psnr"]["n"] == 2  # the VAE scored on the two validation clips
  stats = json.loads((run / "data" / "latents" / "latent_stats.json").read_text())
  assert stats["vae_source"]["step"] == 10 and len(stats["vae_source"]["sha256"]) == 64
