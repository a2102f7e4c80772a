"""The Shapes world: structured labels, the renderer, the caption grammar and the deterministic sampler.

This module is the single definition of the embedded benchmark (docs/data.md states the spec and writes
down every choice it leaves open). A clip is described by a `ClipSpec` (objects, background,
size, an optional cut to a close-up); `render_clip` turns it into `uint8 [T, H, W, 3]` frames,
`caption` / `parse_caption` implement the caption grammar, and `sample_spec(split, index, seed,
mixture)` draws the spec of example `index` of a split, so a data set is a pure function of
(split, index, seed, mixture). `object_coverage` / `object_centroids` give evaluators and tests the
exact per-frame mask and centroid of every object, from the same geometry the renderer draws.

Geometry (all in pixels of the wide shot, y pointing down): an object of `size` s has a diameter of
`s * min(H, W)`; circles have that diameter, squares that side, triangles (equilateral, pointing up)
that side, centred on their bounding box. Straight motions travel 0.3 frame extents per second, capped
at 0.6 extents over the clip so the object never leaves the frame; bouncing motions travel 0.3 extents
per second and reflect when the object's edge meets the frame's edge. A close-up is a 2x zoom whose
camera follows the chosen object, so that object sits at the frame centre after the cut.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Sequence

import numpy as np

FPS = 8.0
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
STRAIGHT_MOTIONS = ("moving left", "moving right", "moving up", "moving down")
BOUNCING_MOTIONS = ("bouncing left and right", "bouncing up and down")
MOTIONS = STRAIGHT_MOTIONS + ("still",) + BOUNCING_MOTIONS
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SPLITS = ("train", "validation", "test")

TRAIN_NOISE_STD = 6.0 / 255.0  # per-pixel noise of training renders, in [0, 1] units
SPEED = 0.3                     # frame extents per second (60% per 2 s)
MAX_STRAIGHT_TRAVEL = 0.6       # extents over a whole clip: straight movers stay inside the frame
CLOSE_UP_ZOOM = 2.0
MAX_STRAIGHT_SECONDS = 4.0      # longer clips use only bouncing (or still) motions

# (colour, shape, motion) compositions that never appear in train or validation; half of the test
# split's videos show one of them. Every colour, shape and motion still appears in train on its own.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "moving up"),
    ("green", "circle", "moving left"),
    ("blue", "square", "bouncing left and right"),
    ("yellow", "triangle", "moving right"),
    ("white", "circle", "bouncing up and down"),
    ("blue", "circle", "moving down"),
    ("yellow", "square", "bouncing left and right"),
    ("green", "triangle", "bouncing up and down"),
)
HELD_OUT_TEST_FRACTION = 0.5

@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  """One object. Positions are fractions of the frame at frame 0; `direction` (+1/-1) is the initial
  direction of a bouncing motion (straight motions imply theirs)."""
  shape: str
  colour: str
  motion: str
  size: float = 0.25
  x: float = 0.5
  y: float = 0.5
  direction: int = 1

  def __post_init__(self):
    _check("shape", self.shape, SHAPES)
    _check("colour", self.colour, tuple(COLOURS))
    _check("motion", self.motion, MOTIONS)
    if not 0.05 <= self.size <= 0.6:
      raise ValueError(f"object size {self.size} must be in [0.05, 0.6] of the shorter frame side")
    if self.direction not in (1, -1):
      raise ValueError(f"object direction {self.direction} must be 1 or -1")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Everything needed to render and caption one clip (an image when num_frames == 1).

  `cut_frame` > 0 cuts at that frame from the wide shot to a close-up of `objects[cut_object]`.
  """
  objects: tuple[ObjectSpec, ...]
  background: str = "black"
  num_frames: int = 17
  height: int = 32
  width: int = 32
  fps: float = FPS
  cut_frame: int = 0
  cut_object: int = 0

  def __post_init__(self):
    object.__setattr__(self, "objects", tuple(
        o if isinstance(o, ObjectSpec) else ObjectSpec(**o) for o in self.objects))
    if not 1 <= len(self.objects) <= 2:
      raise ValueError(f"a clip has 1 or 2 objects, got {len(self.objects)}")
    _check("background", self.background, tuple(BACKGROUNDS))
    if self.num_frames < 1 or (self.num_frames - 1) % 4:
      raise ValueError(f"num_frames {self.num_frames} must be 1 or 1 + 4k")
    for name, v in (("height", self.height), ("width", self.width)):
      if v % 16 or not 32 <= v <= 256:
        raise ValueError(f"{name} {v} must be a multiple of 16 in [32, 256]")
    if self.cut_frame and not 0 < self.cut_frame < self.num_frames:
      raise ValueError(f"cut_frame {self.cut_frame} must be 0 (no cut) or in [1, {self.num_frames - 1}]")
    if not 0 <= self.cut_object < len(self.objects):
      raise ValueError(f"cut_object {self.cut_object} must index one of {len(self.objects)} objects")
    idents = [(o.colour, o.shape) for o in self.objects]
    if len(set(idents)) != len(idents):
      raise ValueError(f"objects must differ in colour or shape (captions name them), got {idents}")
    if self.num_frames == 1 and any(o.motion != "still" for o in self.objects):
      raise ValueError("an image (num_frames == 1) has only still objects")

  @property
  def is_image(self) -> bool:
    return self.num_frames == 1

  @property
  def seconds(self) -> float:
    return (self.num_frames - 1) / self.fps

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str | bytes) -> "ClipSpec":
    d = json.loads(text)
    d["objects"] = tuple(ObjectSpec(**o) for o in d["objects"])
    return cls(**d)

  def labels(self) -> "CaptionLabels":
    """What the caption says about this clip (the part an evaluator can check from text)."""
    return CaptionLabels(
        objects=tuple((o.colour, o.shape, None if self.is_image else o.motion) for o in self.objects),
        background=self.background,
        close_up=((self.objects[self.cut_object].colour, self.objects[self.cut_object].shape)
                  if self.cut_frame else None))


@dataclasses.dataclass(frozen=True)
class CaptionLabels:
  """A parsed caption: objects as (colour, shape, motion or None for an image), background, and the
  (colour, shape) of the close-up after a cut, or None."""
  objects: tuple[tuple[str, str, str | None], ...]
  background: str
  close_up: tuple[str, str] | None = None


def _check(name: str, value, accepted: Sequence[str]) -> None:
  if value not in accepted:
    raise ValueError(f"{name} {value!r} is not one of {list(accepted)}")


# ------------------------------------------------------------------------------------------- captions
def caption(spec: ClipSpec) -> str:
  """The spec's caption of a clip (docs/data.md, "The Shapes spec")."""
  parts = []
  for o in spec.objects:
    parts.append(f"a {o.colour} {o.shape}" + ("" if spec.is_image else f" {o.motion}"))
  text = " and ".join(parts) + f" on a {spec.background} background"
  if spec.cut_frame:
    o = spec.objects[spec.cut_object]
    text += f", then a close-up of the {o.colour} {o.shape}"
  return text


def _alternatives(words) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest match first


_OBJ = rf"a ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)})(?: ({_alternatives(MOTIONS)}))?"
_CAPTION_RE = re.compile(
    rf"^{_OBJ}(?: and {_OBJ})? on a ({_alternatives(BACKGROUNDS)}) background"
    rf"(?:, then a close-up of the ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)}))?$")


def parse_caption(text: str) -> CaptionLabels:
  """Inverse of `caption` on the labels it expresses; raises ValueError off the grammar."""
  m = _CAPTION_RE.match(text.strip())
  if m is None:
    raise ValueError(f"caption {text!r} does not follow the Shapes grammar "
                     "('a {colour} {shape} [{motion}] [and a ...] on a {background} background[, then ...]')")
  g = m.groups()
  objects = [(g[0], g[1], g[2])]
  if g[3] is not None:
    objects.append((g[3], g[4], g[5]))
  if len({o[2] is None for o in objects}) > 1:
    raise ValueError(f"caption {text!r} gives a motion for one object but not the other")
  close_up = (g[7], g[8]) if g[7] is not None else None
  if close_up is not None and close_up not in [(o[0], o[1]) for o in objects]:
    raise ValueError(f"caption {text!r} cuts to a close-up of an object it does not show")
  return CaptionLabels(objects=tuple(objects), background=g[6], close_up=close_up)


# ------------------------------------------------------------------------------------------- geometry
def _half_extents(o: ObjectSpec, min_side: float) -> tuple[float, float]:
  d = o.size * min_side
  return (d / 2, d * np.sqrt(3) / 4) if o.shape == "triangle" else (d / 2, d / 2)


def _straight_speed(extent: float, seconds: float) -> float:
  if seconds <= 0:
    return 0.0
  return min(SPEED * extent, MAX_STRAIGHT_TRAVEL * extent / seconds)


def object_centres(spec: ClipSpec) -> np.ndarray:
  """World (wide-shot) centres of each object's bounding box: float64 [T, N, 2] as (x, y) pixels."""
  H, W = spec.height, spec.width
  t = np.arange(spec.num_frames) / spec.fps
  out = np.zeros((spec.num_frames, len(spec.objects), 2))
  for i, o in enumerate(spec.objects):
    x0, y0 = o.x * W, o.y * H
    hx, hy = _half_extents(o, min(H, W))
    xs, ys = np.full_like(t, x0), np.full_like(t, y0)
    if o.motion in STRAIGHT_MOTIONS:
      horizontal = o.motion in ("moving left", "moving right")
      sign = -1.0 if o.motion in ("moving left", "moving up") else 1.0
      if horizontal:
        xs = x0 + sign * _straight_speed(W, spec.seconds) * t
      else:
        ys = y0 + sign * _straight_speed(H, spec.seconds) * t
    elif o.motion in BOUNCING_MOTIONS:
      horizontal = o.motion == "bouncing left and right"
      extent, start, half = (W, x0, hx) if horizontal else (H, y0, hy)
      lo, span = half, extent - 2 * half
      s = np.mod(start - lo + o.direction * SPEED * extent * t, 2 * span)
      pos = lo + np.where(s <= span, s, 2 * span - s)
      if horizontal:
        xs = pos
      else:
        ys = pos
    out[:, i, 0], out[:, i, 1] = xs, ys
  return out


def _cameras(spec: ClipSpec, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame camera centre [T, 2] (world px) and zoom [T]."""
  cam = np.tile([[spec.width / 2, spec.height / 2]], (spec.num_frames, 1)).astype(np.float64)
  zoom = np.ones(spec.num_frames)
  if spec.cut_frame:
    cam[spec.cut_frame:] = centres[spec.cut_frame:, spec.cut_object]
    zoom[spec.cut_frame:] = CLOSE_UP_ZOOM
  return cam, zoom


def _signed_distance(o: ObjectSpec, dx: np.ndarray, dy: np.ndarray, min_side: float) -> np.ndarray:
  """Signed distance (world px, negative inside) from the object's bounding-box centre offsets."""
  d = o.size * min_side
  if o.shape == "circle":
    return np.sqrt(dx * dx + dy * dy) - d / 2
  if o.shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) - d / 2
  h = d * np.sqrt(3) / 2  # triangle: apex at (0, -h/2), base at y = +h/2
  ay = dy + h / 2
  edge = (h * np.abs(dx) - (d / 2) * ay) / d
  return np.maximum(edge, dy - h / 2)


def object_coverage(spec: ClipSpec) -> np.ndarray:
  """Visible coverage of each object in each frame, float32 [T, N, H, W] in [0, 1].

  Anti-aliased (one-pixel ramp) and occlusion-aware: later objects are drawn over earlier ones, so the
  coverages sum to at most 1 per pixel. The renderer composites exactly these.
  """
  T, H, W = spec.num_frames, spec.height, spec.width
  centres = object_centres(spec)
  cam, zoom = _cameras(spec, centres)
  u = (np.arange(W) + 0.5 - W / 2)[None, None, :]
  v = (np.arange(H) + 0.5 - H / 2)[None, :, None]
  z = zoom[:, None, None]
  wx = cam[:, 0, None, None] + u / z  # world coordinates of every screen pixel, [T, 1, W]
  wy = cam[:, 1, None, None] + v / z  # [T, H, 1]
  alphas = []
  for i, o in enumerate(spec.objects):
    dx = wx - centres[:, i, 0, None, None]
    dy = wy - centres[:, i, 1, None, None]
    sd = _signed_distance(o, dx, dy, min(H, W)) * z  # in screen pixels
    alphas.append(np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32))
  visible = []
  for i, a in enumerate(alphas):
    for later in alphas[i + 1:]:
      a = a * (1.0 - later)
    visible.append(a)
  return np.stack(visible, axis=1)


def object_centroids(spec: ClipSpec, coverage: np.ndarray | None = None) -> np.ndarray:
  """Screen-space centroid of each object's visible coverage: float32 [T, N, 2] as (x, y) pixels;
  NaN in frames where the object is not visible."""
  cov = object_coverage(spec) if coverage is None else coverage
  mass = cov.sum(axis=(2, 3))
  xs = (cov * (np.arange(spec.width) + 0.5)[None, None, None, :]).sum(axis=(2, 3))
  ys = (cov * (np.arange(spec.height) + 0.5)[None, None, :, None]).sum(axis=(2, 3))
  with np.errstate(invalid="ignore", divide="ignore"):
    out = np.stack([xs / mass, ys / mass], axis=-1)
  out[mass < 1e-3] = np.nan
  return out.astype(np.float32)


def render_clip(spec: ClipSpec, *, noise_std: float = 0.0, seed: int = 0,
                coverage: np.ndarray | None = None) -> np.ndarray:
  """Renders `spec` as uint8 [T, H, W, 3]. `noise_std` (in [0, 1] pixel units) adds Gaussian noise
  drawn from `seed`; noise_std=0 gives the exact evaluation render."""
  cov = object_coverage(spec) if coverage is None else coverage  # [T, N, H, W]
  frames = np.empty(cov.shape[:1] + cov.shape[2:] + (3,), np.float32)
  frames[:] = np.asarray(BACKGROUNDS[spec.background], np.float32)
  frames *= (1.0 - cov.sum(axis=1))[..., None]
  for i, o in enumerate(spec.objects):
    frames += cov[:, i, :, :, None] * np.asarray(COLOURS[o.colour], np.float32)
  if noise_std > 0:
    rng = np.random.default_rng(seed)
    frames += rng.standard_normal(frames.shape, dtype=np.float32) * np.float32(noise_std * 255.0)
  np.rint(frames, out=frames)
  np.clip(frames, 0, 255, out=frames)
  return frames.astype(np.uint8)


# ------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class SizeBucket:
  """One bucket of a mixture: its probability, frame counts and (height, width) sizes, drawn uniformly."""
  weight: float
  num_frames: tuple[int, ...]
  sizes: tuple[tuple[int, int], ...]


_SMALL_SIZES_64 = ((32, 32), (48, 48), (64, 64), (48, 64), (64, 48), (32, 64), (64, 32))
_LONG_FRAMES = (65, 97, 129, 193, 241, 321, 481)

MIXTURES: dict[str, tuple[SizeBucket, ...]] = {
    # The demo: cheap enough for 2 CPU cores. 16:9 and 9:16 round to 2:1 and 1:2 at these sizes.
    "demo": (
        SizeBucket(0.30, (1,), _SMALL_SIZES_64),
        SizeBucket(0.62, (9, 17, 33), _SMALL_SIZES_64),
        SizeBucket(0.08, _LONG_FRAMES, ((32, 32), (32, 64), (64, 32))),
    ),
    # One size only (17 frames of 32x32): the diagnostic of training without mixed sizes or packing
    # (sora_jax/bench/dit_overfit.py, docs/benchmarks.md).
    "single": (SizeBucket(1.0, (17,), ((32, 32),)),),
    # More pixels and more of them: up to 128 px for images and short clips.
    "small": (
        SizeBucket(0.30, (1,), _SMALL_SIZES_64 + ((96, 96), (128, 128), (96, 128), (128, 96),
                                                   (64, 128), (128, 64), (80, 144), (144, 80))),
        SizeBucket(0.60, (9, 17, 33), _SMALL_SIZES_64 + ((96, 96), (128, 128), (96, 128), (128, 96),
                                                          (64, 128), (128, 64))),
        SizeBucket(0.10, _LONG_FRAMES, ((32, 32), (32, 64), (64, 32), (48, 48))),
    ),
}

_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}
_TWO_OBJECTS_P = 0.35
_CUT_P = 0.2


def allowed_motions(num_frames: int, fps: float = FPS) -> tuple[str, ...]:
  if num_frames == 1:
    return ("still",)
  if (num_frames - 1) / fps > MAX_STRAIGHT_SECONDS:
    return ("still",) + BOUNCING_MOTIONS
  return MOTIONS


def _overlap_frames(spec: ClipSpec) -> int:
  if len(spec.objects) < 2:
    return 0
  c = object_centres(spec)
  m = min(spec.height, spec.width)
  (ax, ay), (bx, by) = (_half_extents(o, m) for o in spec.objects)
  dx = np.abs(c[:, 0, 0] - c[:, 1, 0])
  dy = np.abs(c[:, 0, 1] - c[:, 1, 1])
  return int(np.sum((dx < ax + bx + 1) & (dy < ay + by + 1)))


def _place(rng: np.random.Generator, o: dict, spec_kw: dict) -> dict:
  """Draws a start position (and bouncing direction) keeping the whole trajectory inside the frame."""
  H, W = spec_kw["height"], spec_kw["width"]
  seconds = (spec_kw["num_frames"] - 1) / FPS
  probe = ObjectSpec(o["shape"], o["colour"], o["motion"], o["size"])
  hx, hy = _half_extents(probe, min(H, W))
  lo_x, hi_x = hx / W, 1 - hx / W
  lo_y, hi_y = hy / H, 1 - hy / H
  x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
  m = o["motion"]
  if m in STRAIGHT_MOTIONS:
    horizontal = m in ("moving left", "moving right")
    travel = _straight_speed(1.0, seconds) * seconds  # in extents
    lo, hi = (lo_x, hi_x) if horizontal else (lo_y, hi_y)
    forward = m in ("moving right", "moving down")
    start = rng.uniform(lo, hi - travel) if forward else rng.uniform(lo + travel, hi)
    if horizontal:
      x = start
    else:
      y = start
  o = dict(o, x=round(float(x), 4), y=round(float(y), 4))
  o["direction"] = int(rng.choice([-1, 1])) if m in BOUNCING_MOTIONS else 1
  return o


def sample_spec(split: str, index: int, seed: int = 0, mixture: str = "demo") -> ClipSpec:
  """The spec of example `index` of `split`: a pure function of its arguments.

  train and validation never contain a HELD_OUT composition; in test, a HELD_OUT_TEST_FRACTION share
  of the videos shows one (as the first object) whenever the clip's length allows its motion.
  """
  _check("split", split, SPLITS)
  _check("mixture", mixture, tuple(MIXTURES))
  if index < 0:
    raise ValueError(f"index {index} must be >= 0")
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 0x5A4E])
  buckets = MIXTURES[mixture]
  w = np.array([b.weight for b in buckets])
  bucket = buckets[rng.choice(len(buckets), p=w / w.sum())]
  num_frames = int(bucket.num_frames[rng.integers(len(bucket.num_frames))])
  height, width = (int(v) for v in bucket.sizes[rng.integers(len(bucket.sizes))])
  motions = allowed_motions(num_frames)
  held_out = set(HELD_OUT)
  n_objects = 2 if rng.random() < _TWO_OBJECTS_P else 1
  background = str(rng.choice(list(BACKGROUNDS)))
  force_held_out = split == "test" and num_frames > 1 and rng.random() < HELD_OUT_TEST_FRACTION
  objects: list[dict] = []
  while len(objects) < n_objects:
    if force_held_out and not objects:
      choices = [h for h in HELD_OUT if h[2] in motions]
      colour, shape, motion = choices[rng.integers(len(choices))]
    else:
      colour = str(rng.choice(list(COLOURS)))
      shape = str(rng.choice(SHAPES))
      motion = str(rng.choice(motions))
    if split != "test" and (colour, shape, motion) in held_out:
      continue
    if any((colour, shape) == (p["colour"], p["shape"]) for p in objects):
      continue
    objects.append(dict(shape=shape, colour=colour, motion=motion,
                        size=round(float(rng.uniform(0.2, 0.3)), 4)))
  cut_frame, cut_object = 0, 0
  if num_frames >= 9 and rng.random() < _CUT_P:
    cut_frame = int(rng.integers(num_frames // 3, 2 * num_frames // 3 + 1))
    cut_object = int(rng.integers(n_objects))
  kw = dict(background=background, num_frames=num_frames, height=height, width=width,
            cut_frame=cut_frame, cut_object=cut_object)
  best, best_overlap = None, None
  for _ in range(20 if n_objects == 2 else 1):  # keep two objects apart when some placement does
    spec = ClipSpec(objects=tuple(ObjectSpec(**_place(rng, o, kw)) for o in objects), **kw)
    overlap = _overlap_frames(spec)
    if best is None or overlap < best_overlap:
      best, best_overlap = spec, overlap
    if overlap == 0:
      break
  return best


def first_specs(mixture: str, n: int, keep: Callable[[ClipSpec], bool], what: str,
                split: str = "test") -> list[ClipSpec]:
  """The first n specs of `split` of `mixture` (seed 0) for which keep(spec) holds; `what` names them in
  the error raised when the first 100 n specs hold fewer."""
  out, i = [], 0
  while len(out) < n:
    if i >= 100 * n:
      raise ValueError(f"mixture {mixture!r} has too few {what} ({len(out)} of the first {i} {split} clips; "
                       f"asked for {n})")
    s = sample_spec(split, i, 0, mixture)
    i += 1
    if keep(s):
      out.append(s)
  return out


def noise_std_for(split: str) -> float:
  """Pixel noise of a split's records: training renders are noisy; evaluation splits carry the same
  noise on disk (so the VAE sees one distribution), while evaluators re-render with noise_std=0."""
  _check("split", split, SPLITS)
  return TRAIN_NOISE_STD


def render_example(split: str, index: int, seed: int = 0, mixture: str = "demo"
                   ) -> tuple[ClipSpec, np.ndarray]:
  """The spec and the recorded (noisy) frames of one data set example."""
  spec = sample_spec(split, index, seed, mixture)
  noise_seed = int(np.random.SeedSequence([seed, _SPLIT_IDS[split], index, 0x401]).generate_state(1)[0])
  return spec, render_clip(spec, noise_std=noise_std_for(split), seed=noise_seed)
