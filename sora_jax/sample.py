"""Generate videos from captions, optionally prompted with an image or videos.

    python -m sora_jax.sample --bundle runs/demo/bundle --prompt "a red circle moving left on a black background" \
        --num_frames 33 --height 32 --width 48 --seed 0 --steps 30 --guidance 4 --out out.mp4
    python -m sora_jax.sample --workdir runs/demo --prompts_file prompts.txt --out samples/s.mp4

Prompting with images and videos (one mode at a time):
    --image img.png                         the image is the first frame (image-to-video)
    --extend in.mp4 --direction forward     continue in.mp4 (backward: lead into it)
    --connect a.mp4,b.mp4                   begin like a.mp4, end like b.mp4
    --edit in.mp4 --strength 0.6            SDEdit in.mp4 under the new caption

Outputs go by the suffix of --out: .mp4 (PyAV), .gif, .png (a grid of the frames; a one-frame video is
written as .png whatever --out says) or .npy (the exact uint8 frames [T, H, W, 3]); --also=npy,gif
writes the same video in more formats next to it. Several prompts write `<stem>_<i>.<suffix>`.

The initial noise is drawn from (--seed, the prompt's index), or read from --noise F.npy: float32
[C, T, H, W] in normalised latent units, the layout of diffusers' `pipe(..., latents=...)` without its
batch axis, so that a video can be reproduced from the noise another implementation started from. It
is one video's noise, so --noise takes exactly one prompt; --seed then only keys DDPM's step noise.

Under guidance, --negative_prompt TEXT is the caption of the unconditional half (by default the caption is
hidden as training's text dropout hides it; models with a frozen UMT5 encoder default to "", as Wan's
pipeline does).

A prompts file has one prompt per line, `caption` or `caption | num_frames | HxW`; empty lines and lines
starting with # are skipped. Defaults (frames, size, steps, guidance, sampler) come from the model's
config `sample` section. Models come from an exported bundle (--bundle) or a training work directory
(--workdir, laid out as runs/demo: vae/, dit/, data/; its config is --config, else the one saved in it,
else experiments/shapes_demo.py's). `--adapter A` puts a LoRA adapter (python -m sora_jax.adapter save) on
the bundle's DiT without merging it: the videos of the bundle `python -m sora_jax.adapter merge` writes.

Multi-host (launched as `train` is, docs/pods.md): every process loads the models, the prompts are split
into one contiguous block per process, each samples its block on its own devices, and process 0 writes
every output. A prompt's noise depends only on (--seed, its index), so the videos are the same on any
number of processes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from absl import flags
import numpy as np

from sora_jax import config as config_lib
from sora_jax import distributed
from sora_jax import sampling
from sora_jax import video_io

_BUNDLE = config_lib.flag(flags.DEFINE_string, "bundle", None, "an exported inference bundle directory")
_ADAPTER = config_lib.flag(flags.DEFINE_string, "adapter", None,
                           "a LoRA adapter (python -m sora_jax.adapter save) applied, unmerged, to --bundle")
_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", None, "a training work directory (vae/, dit/, data/)")
_PROMPT = config_lib.flag(flags.DEFINE_multi_string, "prompt", [], "a caption (repeatable)")
_PROMPTS_FILE = config_lib.flag(flags.DEFINE_string, "prompts_file", None, "one prompt per line: caption [| frames | HxW]")
_NUM_FRAMES = config_lib.flag(flags.DEFINE_integer, "num_frames", None, "1 (an image) or 1 + 4k, up to 481",
                                 lower_bound=1)
_HEIGHT = config_lib.flag(flags.DEFINE_integer, "height", None, "pixels; a multiple of the patch grid",
                             lower_bound=1)
_WIDTH = config_lib.flag(flags.DEFINE_integer, "width", None, "pixels; a multiple of the patch grid",
                            lower_bound=1)
_SEED = config_lib.flag(flags.DEFINE_integer, "seed", 0, "noise seed (per prompt: fold_in(seed, prompt index))",
                           lower_bound=0)
_STEPS = config_lib.flag(flags.DEFINE_integer, "steps", None, "sampler steps", lower_bound=1)
_GUIDANCE = config_lib.flag(flags.DEFINE_float, "guidance", None, "classifier-free guidance scale (1 = none)",
                               lower_bound=0.0)
_SAMPLER = config_lib.flag(flags.DEFINE_string, "sampler", None,
                           "euler|heun|unipc (flow objective), ddim|ddpm (ddpm objective)")
_ROW_LEN = config_lib.flag(flags.DEFINE_integer, "row_len", None, "tokens per packed row", lower_bound=1)
_FPS = config_lib.flag(flags.DEFINE_float, "fps", None, "frame rate of the written video",
                          lower_bound=0.0)
_OUT = config_lib.flag(flags.DEFINE_string, "out", "sample.mp4", "output path; the suffix picks the format")
_ALSO = config_lib.flag(flags.DEFINE_list, "also", [], "more formats of the same video: npy, gif, png, mp4")
_IMAGE = config_lib.flag(flags.DEFINE_string, "image", None, "image-to-video: the first frame")
_EXTEND = config_lib.flag(flags.DEFINE_string, "extend", None, "a video to extend")
_DIRECTION = config_lib.flag(flags.DEFINE_enum, "direction", "forward", ["forward", "backward"], "of --extend")
_CONNECT = config_lib.flag(flags.DEFINE_list, "connect", None, "two videos a,b: the output begins like a, ends like b")
_EDIT = config_lib.flag(flags.DEFINE_string, "edit", None, "a video to edit (SDEdit) under the prompt")
_STRENGTH = config_lib.flag(flags.DEFINE_float, "strength", 0.6, "of --edit: 1 = ignore the input, 0 = keep it",
                               lower_bound=0.0, upper_bound=1.0)
_NEGATIVE = config_lib.flag(flags.DEFINE_string, "negative_prompt", None,
                            "the unconditional caption under guidance (default: the caption dropped as in "
                            "training; \"\" for a UMT5 model, as Wan's pipeline)")
_NOISE = config_lib.flag(flags.DEFINE_string, "noise", None,
                         "an .npy of the initial noise, float32 [C, T, H, W] (one prompt only)")


def read_prompts(path: str) -> list[tuple[str, int | None, int | None, int | None]]:
  """(caption, num_frames or None, height or None, width or None) per non-empty, non-comment line."""
  out = []
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    parts = [p.strip() for p in line.split("|")]
    try:
      if len(parts) == 1:
        out.append((parts[0], None, None, None))
      elif len(parts) == 3:
        h, w = parts[2].lower().split("x")
        out.append((parts[0], int(parts[1]), int(h), int(w)))
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f"{path}:{n}: {line!r} is not `caption` or `caption | num_frames | HxW`") from None
    if not out[-1][0]:
      raise ValueError(f"{path}:{n}: {line!r} has an empty caption")
    # 0 is a size, not "unset": the model's checks then name it (sampling.Geometry).
    bad = [f"{name} {v}" for name, v in zip(("num_frames", "height", "width"), out[-1][1:])
           if v is not None and v < 1]
    if bad:
      raise ValueError(f"{path}:{n}: {line!r}: {', '.join(bad)}; sizes must be positive")
  if not out:
    raise ValueError(f"{path} has no prompts")
  return out


def load_models(bundle: str | None, workdir: str | None, cfg=None, adapter: str | None = None
                ) -> sampling.Pipeline:
  """Models from an exported bundle (with a LoRA `adapter` on its DiT, unmerged), or from a training
  work directory: its config is `cfg`, else the one saved in it, else the demo's
  (experiments/shapes_demo.py with data paths under it, as export)."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from sora_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  if bool(bundle) == bool(workdir):
    raise ValueError("give exactly one of --bundle or --workdir")
  if adapter and not bundle:
    raise ValueError("--adapter needs --bundle (the base bundle it was trained on)")
  if bundle:
    loaded = bundle_lib.load(bundle)
    if adapter:
      from sora_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
      loaded = adapter_lib.apply(loaded, bundle, adapter)
    return sampling.as_pipeline(loaded)
  if cfg is None and bundle_lib.WorkdirLayout(Path(workdir)).config_file() is None:
    from sora_jax import export  # pylint: disable=g-import-not-at-top
    cfg = export.demo_config(workdir)
  return sampling.as_pipeline(bundle_lib.load_workdir(workdir, cfg))


def _read(path: str) -> np.ndarray:
  return video_io.read_video(path)[0]


def _grid_size(size: int, step: int) -> int:
  return max(step, size // step * step)


def build_requests(pipe: sampling.Pipeline, prompts) -> list[sampling.Request]:
  """Requests for the prompts, with the one image/video prompting mode given on the command line."""
  modes = [name for name, v in (("--image", _IMAGE.value), ("--extend", _EXTEND.value),
                                ("--connect", _CONNECT.value), ("--edit", _EDIT.value)) if v]
  if len(modes) > 1:
    raise ValueError(f"{' and '.join(modes)} given; use one prompting mode at a time")
  if _CONNECT.value is not None and len(_CONNECT.value) != 2:
    raise ValueError(f"--connect {','.join(_CONNECT.value)}: give exactly two videos, a,b")
  g = pipe.geometry
  source = None  # the prompt video whose size is the default output size
  if _IMAGE.value:
    source = _read(_IMAGE.value)
  elif _EXTEND.value:
    source = _read(_EXTEND.value)
  elif _CONNECT.value:
    source = [_read(p) for p in _CONNECT.value]
  elif _EDIT.value:
    source = _read(_EDIT.value)
  first = source[0] if isinstance(source, list) else source
  reqs = []
  for caption, n, h, w in prompts:
    n = n if n is not None else _NUM_FRAMES.value
    h = h if h is not None else _HEIGHT.value
    w = w if w is not None else _WIDTH.value
    if first is not None:  # a prompt video sets the default size (rounded down onto the grid)
      h = h or _grid_size(first.shape[1], g.spatial * g.patch[1])
      w = w or _grid_size(first.shape[2], g.spatial * g.patch[2])
      if _EDIT.value and not n:
        n = sampling.usable_frames(min(first.shape[0], g.max_frames), g.temporal)
    n = int(pipe.sample_setting("num_frames", n, 17))
    h, w = int(pipe.sample_setting("height", h, 32)), int(pipe.sample_setting("width", w, 32))
    sampling.check_size(pipe, n, h, w)  # before any sampling: sizes beyond the model or this machine
    if _IMAGE.value:
      reqs.append(sampling.image_prompt(pipe, caption, source, n, h, w))
    elif _EXTEND.value:
      reqs.append(sampling.extend_prompt(pipe, caption, source, n, h, w, _DIRECTION.value))
    elif _CONNECT.value:
      reqs.append(sampling.connect_prompt(pipe, caption, source[0], source[1], n, h, w))
    elif _EDIT.value:
      reqs.append(sampling.edit_prompt(pipe, caption, source, n, h, w, _STRENGTH.value))
    else:
      pipe.geometry.latent_shape(n, h, w)  # fail on a bad size before loading anything else
      reqs.append(sampling.Request(caption, n, h, w))
  return reqs


def with_noise(pipe: sampling.Pipeline, reqs: Sequence[sampling.Request], path: str
               ) -> list[sampling.Request]:
  """The one request, starting from the noise in `path` (float [C, T, H, W], diffusers' latent layout)."""
  if len(reqs) != 1:
    raise ValueError(f"--noise is one video's initial noise but {len(reqs)} prompts were given: "
                     "give one prompt per run")
  r = reqs[0]
  t, h, w, c = pipe.geometry.latent_shape(r.num_frames, r.height, r.width)
  noise = np.load(path, allow_pickle=False)
  if noise.shape != (c, t, h, w):
    raise ValueError(f"--noise {path} has shape {tuple(noise.shape)}; the request ({r.num_frames} frames, "
                     f"{r.height}x{r.width}) needs latents [C, T, H, W] = {(c, t, h, w)}")
  if not np.issubdtype(noise.dtype, np.floating) or not np.isfinite(noise).all():
    raise ValueError(f"--noise {path} holds {noise.dtype} values that are not all finite floats")
  return [dataclasses.replace(r, noise=np.ascontiguousarray(np.transpose(noise, (1, 2, 3, 0)), np.float32))]


def output_paths(out: str, count: int, index: int, frames: int, also) -> list[Path]:
  """Where prompt `index` of `count` goes: numbered when several; .png for one frame; --also formats."""
  path = Path(out)
  suffix = path.suffix.lower()
  if suffix not in video_io.WRITE_SUFFIXES:
    raise ValueError(f"--out {out}: suffix {suffix!r} is not one of {list(video_io.WRITE_SUFFIXES)}")
  stem = path.with_suffix("") if count == 1 else path.with_name(f"{path.stem}_{index:03d}")
  if frames == 1 and suffix in (".mp4", ".gif"):
    suffix = ".png"
  paths = [Path(f"{stem}{suffix}")]
  for fmt in also:
    s = "." + fmt.lower().lstrip(".")
    if s not in video_io.WRITE_SUFFIXES:
      raise ValueError(f"--also {fmt}: accepted {[x[1:] for x in video_io.WRITE_SUFFIXES]}")
    if Path(f"{stem}{s}") not in paths:
      paths.append(Path(f"{stem}{s}"))
  return paths


def check_writable(path: Path) -> None:
  """Raises a one-line ValueError if `path` cannot be written (its folder cannot be made or written
  into, or it is a folder or a read-only file), by making and removing a file beside it: a failure
  after sampling would lose the whole generation."""
  if path.is_dir():
    raise ValueError(f"--out: {path} is a folder; give a file path")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}."):
      pass
    if path.exists() and not os.access(path, os.W_OK):
      raise PermissionError(13, "the file is read-only")
  except OSError as e:
    raise ValueError(f"--out: {path} cannot be written ({e.strerror or e})") from None


def generate_shared(pipe: sampling.Pipeline, reqs: Sequence[sampling.Request], **kwargs) -> list[np.ndarray]:
  """sampling.generate over every request, each process sampling one contiguous block of them (with its
  index offset, so request i's noise is fold_in(seed, i) as on one process); all videos on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  per = -(-len(reqs) // jax.process_count())
  blocks = [(i, reqs[i:i + per]) for i in range(0, len(reqs), per)]
  done = distributed.map_shared(
      lambda b: sampling.generate(pipe, b[1], index_offset=b[0], **kwargs), blocks)
  return [v for block in done for v in block]


def main(argv):
  if len(argv) > 1:
    config_lib._fail(f"unexpected arguments {argv[1:]}")
  distributed.initialize()  # joins the process group on multi-host launches; no-op on one host
  try:
    if not _PROMPT.value and not _PROMPTS_FILE.value:
      raise ValueError("give --prompt or --prompts_file")
    prompts = [(p.strip(), None, None, None) for p in _PROMPT.value]
    for i, (caption, *_) in enumerate(prompts, 1):
      if not caption:  # training never saw an empty caption (ingest refuses them)
        raise ValueError(f"--prompt #{i} is empty; give a caption")
    if _PROMPTS_FILE.value:
      prompts += read_prompts(_PROMPTS_FILE.value)
    start = time.time()
    cfg = config_lib.get_config() if "config" in flags.FLAGS and flags.FLAGS["config"].present else None
    pipe = load_models(_BUNDLE.value, _WORKDIR.value, cfg, _ADAPTER.value)
    loaded = time.time()
    reqs = build_requests(pipe, prompts)
    if _NOISE.value:
      reqs = with_noise(pipe, reqs, _NOISE.value)
    # 0 means unset too: reconstruct shares this flag with a default of 0.
    fps = float(pipe.sample_setting("fps", _FPS.value or None, 8.0))
    for i, r in enumerate(reqs):  # check every output path before spending time on sampling
      for path in output_paths(_OUT.value, len(reqs), i, r.num_frames, _ALSO.value):
        check_writable(path)
    # Words the model never saw: the video will not show them. Said once the request is valid (a
    # mistake is one line).
    for r in reqs:
      warning = pipe.caption_warning(r.caption)
      if warning and distributed.is_main():
        print(warning, file=sys.stderr, flush=True)
    videos = generate_shared(pipe, reqs, seed=_SEED.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
                             sampler=_SAMPLER.value, row_len=_ROW_LEN.value, progress=distributed.is_main(),
                             negative_prompt=_NEGATIVE.value)
  except (ValueError, TypeError, FileNotFoundError) as e:  # BundleError and VideoReadError included
    config_lib._fail(str(e).splitlines()[0])

  def write():
    for i, (r, v) in enumerate(zip(reqs, videos)):
      for path in output_paths(_OUT.value, len(reqs), i, r.num_frames, _ALSO.value):
        video_io.write_video(path, v, fps=fps)
        print(f"wrote {path} ({v.shape[0]} frames, {v.shape[1]}x{v.shape[2]}): {r.caption}", flush=True)
  distributed.write_on_main(write)
  print(f"loaded in {loaded - start:.1f}s, generated {len(reqs)} video(s) in {time.time() - loaded:.1f}s",
        flush=True)


if __name__ == "__main__":
  # --config is optional here: the model's config comes from the bundle or work directory.
  config_lib.run(main)
