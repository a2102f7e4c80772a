"""Reads Shapes videos (rendered or generated) and scores them against what their caption asks for.

The evaluator of the Shapes spec (docs/data.md), written against the renderer's world
(sora_jax/data/shapes.py) but reading only pixels and the caption's labels (`CaptionLabels`), so a
generated video is judged exactly like a render:

- Pixels. Each frame's background is its per-channel median (objects cover well under half a frame).
  A pixel is *foreground* when it differs from that background by more than 40/255 in some channel;
  a foreground pixel takes the palette colour of its hue (nearest of red/yellow/green/blue hues) when
  saturated (s >= 0.3, v >= 0.25), `white` when unsaturated and lighter than the background, and no
  colour otherwise. Hue is used rather than RGB distance because anti-aliasing (and a generator's
  contrast errors) blend an object towards the background, which changes RGB but not hue.
- Objects. Connected components (8-neighbour, per frame) of one colour; an object is *present* in a
  frame when its colour has a component of at least 1% of min(H, W)^2 pixels (58% of the smallest
  object the renderer draws) that fills at least 30% of its bounding box and is solid (at least 15%
  of its pixels survive an erosion by the 4-neighbour cross); clusters of noise pixels are not.
- Shape: soft coverage of the largest component (contrast over its interior contrast, including the
  uncoloured edge pixels around it) compared by soft IoU with a circle, a square and an upright
  triangle of the same area and centroid; majority vote over frames where it does not touch the border.
- Cut: for a caption with a close-up, the frame where the close-up colour's mask changes most (area
  ratio and IoU with the previous frame); found when that change is large (score >= 0.9).
- Motion: the centroid track (fractions of W and H) over the wide shot (unscored when a cut leaves
  fewer than 4 wide-shot frames, i.e. under 11% of the frame of travel). Still when the track spans
  < 5% of the frame on both axes; otherwise the axis is the one it spans more, bouncing when it turns
  back by > 3% of the frame along that axis at least once, else the sign of the net displacement.
  A bouncing prompt whose clip is too short to guarantee a reversal (0.3 extents/s for under 1 extent)
  also accepts a straight motion along the right axis, since the renderer may not reach an edge.

Scores, one Bernoulli trial per clip (a two-object clip is right only when both objects are):
- colour: the k most frequent foreground colours (k = the caption's distinct colours) are its colours;
- motion (videos): every object's motion matches;
- persistence: every object is present in >= 90% of the frames it should be visible in (all frames
  of the wide shot; after a cut, only the close-up object);
- shot consistency (captions with a cut): a cut is found, and the close-up object has the same colour
  and shape before (wide shot) and after it (largest component of the dominant colour);
- shape (reported, not asked for by the spec): every object's majority shape matches.

Two objects of one colour (they then differ in shape) are split into the two largest components,
linked over frames by nearest centroid, and matched to the caption's objects by shape (then motion).
Each rate comes with a 95% Wilson interval. Pure noise scores at or below chance: colours follow the
noise's hue statistics, not the prompt, and noise has no compact components, so no object is present.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from sora_jax.data import shapes

COLOUR_NAMES: tuple[str, ...] = tuple(shapes.COLOURS)  # class k + 1 in a class map
_FG_THRESHOLD = 40.0 / 255.0
_MIN_SAT, _MIN_VAL = 0.3, 0.25
_MIN_MOTION_FRAMES = 4  # a wide shot shorter than this (0.375 s, 11% of the frame) shows no motion
_MIN_AREA_FRAC = 0.01    # of min(H, W)^2
_MIN_FILL = 0.3
_MIN_SOLID = 0.15         # smallest render: 3 of 16 pixels survive; uniform noise: 99% of clusters < 0.1
_STILL = 0.05             # the spec: still means displacement under 5% of the frame
TURN = 0.03               # a turn back by this much (of the frame) along the axis is a reversal
_PERSIST = 0.9
_CUT_SCORE = 0.9
_MIN_SHAPE_PIXELS = 6


def _hue(rgb: np.ndarray) -> np.ndarray:
  """Hue in degrees [0, 360) of float RGB in [0, 1], last axis channels."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  mx, mn = rgb.max(-1), rgb.min(-1)
  d = np.maximum(mx - mn, 1e-6)
  h = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
  return (60.0 * h) % 360.0


_CHROMATIC = [c for c in COLOUR_NAMES if c != "white"]
_PALETTE_HUES = np.array([_hue(np.array(shapes.COLOURS[c], np.float32) / 255.0) for c in _CHROMATIC])
_CHROMATIC_CLASS = np.array([COLOUR_NAMES.index(c) + 1 for c in _CHROMATIC], np.int8)
_WHITE_CLASS = COLOUR_NAMES.index("white") + 1


def classify_pixels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Colour class per pixel, int8 [T, H, W] (0 = background/uncoloured, k + 1 = COLOUR_NAMES[k]), and
  each pixel's contrast with its frame's background, float32 [T, H, W] (max over channels, in [0, 1])."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames {frames.dtype}{list(frames.shape)}; accepted: uint8 [T, H, W, 3]")
  f = frames.astype(np.float32) / 255.0
  bg = np.median(f.reshape(f.shape[0], -1, 3), axis=1)[:, None, None, :]
  contrast = np.abs(f - bg).max(-1)
  fg = contrast > _FG_THRESHOLD
  mx, mn = f.max(-1), f.min(-1)
  sat = (mx - mn) / np.maximum(mx, 1e-6)
  dist = np.abs(_hue(f)[..., None] - _PALETTE_HUES)
  nearest = np.argmin(np.minimum(dist, 360.0 - dist), axis=-1)
  out = np.zeros(f.shape[:3], np.int8)
  chroma = fg & (sat >= _MIN_SAT) & (mx >= _MIN_VAL)
  out[chroma] = _CHROMATIC_CLASS[nearest[chroma]]
  brighter = mx - bg.max(-1) > _FG_THRESHOLD  # white is lighter than the background, never darker
  out[fg & (sat < _MIN_SAT) & brighter] = _WHITE_CLASS
  return out, contrast


# ------------------------------------------------------------------------------------------ components
@dataclasses.dataclass(frozen=True)
class Blob:
  """One connected component of one colour in one frame (pixel coordinates, y down)."""
  area: int
  cx: float
  cy: float
  box: tuple[int, int, int, int]   # y0, x0, y1, x1 (exclusive ends)
  mask: np.ndarray                 # bool crop of the box
  alpha: np.ndarray                # soft coverage in [0, 1] over the box grown by a pixel
  touches_border: bool
  solid: bool                      # has an interior: >= 15% of it survives a 4-neighbour erosion


_CROSS = ndimage.generate_binary_structure(2, 1)


def _blobs(mask_hw: np.ndarray, contrast_hw: np.ndarray, min_area: float) -> list[Blob]:
  """Compact components of at least `min_area` pixels, largest first.

  `contrast_hw` is the contrast of this colour's and of uncoloured pixels (zero on other colours):
  a blob's soft coverage takes its component plus the uncoloured edge pixels around it.
  """
  labels, n = ndimage.label(mask_hw, structure=np.ones((3, 3)))
  if n == 0:
    return []
  H, W = mask_hw.shape
  out = []
  for i, sl in enumerate(ndimage.find_objects(labels)):
    crop = labels[sl] == i + 1
    area = int(crop.sum())
    if area < min_area or area < _MIN_FILL * crop.size:
      continue
    ys, xs = np.nonzero(crop)
    y0, x0 = sl[0].start, sl[1].start
    box = (y0, x0, sl[0].stop, sl[1].stop)
    solid = ndimage.binary_erosion(np.pad(crop, 1), _CROSS).sum() >= _MIN_SOLID * area
    pad = (slice(max(y0 - 1, 0), min(box[2] + 1, H)), slice(max(x0 - 1, 0), min(box[3] + 1, W)))
    own = (labels[pad] == i + 1) | ((labels[pad] == 0) & (contrast_hw[pad] > 0))
    c = np.where(own, contrast_hw[pad], 0.0)
    alpha = np.clip(c / max(np.percentile(c[_crop_in(pad, sl, crop)], 90), 1e-6), 0.0, 1.0)
    out.append(Blob(area, float(xs.mean() + x0 + 0.5), float(ys.mean() + y0 + 0.5), box, crop,
                    alpha, y0 == 0 or x0 == 0 or box[2] == H or box[3] == W, bool(solid)))
  return sorted(out, key=lambda b: -b.area)


def object_blob_counts(frames: np.ndarray) -> np.ndarray:
  """Per frame, int [T]: how many components would count as an object, of any palette colour, by the
  rule that makes an object present (at least 1% of min(H, W)^2 pixels, filling 30% of its box, solid).

  A continuous companion to the binary scores: a render of one object reads 1 in every frame; a
  generator that draws it in fragments, or adds objects, reads more; one that loses it reads 0.
  """
  cls, con = classify_pixels(frames)
  min_area = _MIN_AREA_FRAC * min(cls.shape[1:]) ** 2
  out = np.zeros(len(cls), np.int64)
  for t in range(len(cls)):
    for cid in np.unique(cls[t]):
      if cid:
        out[t] += sum(b.solid for b in _blobs(cls[t] == cid, _own(cls[t], con[t], cid), min_area))
  return out


def _own(cls_hw: np.ndarray, con_hw: np.ndarray, colour_id: int) -> np.ndarray:
  """Contrast of one colour's and of uncoloured pixels; zero on other colours."""
  return np.where((cls_hw == colour_id) | (cls_hw == 0), con_hw, 0.0)


def _crop_in(outer: tuple[slice, slice], inner: tuple[slice, slice], mask: np.ndarray) -> np.ndarray:
  """`mask` (the crop of `inner`) placed inside a bool array the shape of `outer`."""
  out = np.zeros((outer[0].stop - outer[0].start, outer[1].stop - outer[1].start), bool)
  out[inner[0].start - outer[0].start:inner[0].stop - outer[0].start,
      inner[1].start - outer[1].start:inner[1].stop - outer[1].start] = mask
  return out


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, d: float) -> np.ndarray:
  """Pixels from the outline (negative inside) of a shape of diameter/side `d` centred on its box."""
  if shape == "circle":
    return np.sqrt(dx * dx + dy * dy) - d / 2
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) - d / 2
  h = d * math.sqrt(3) / 2                 # equilateral, apex up: slanted edges have unit normal
  return np.maximum((h * np.abs(dx) - (d / 2) * (dy + h / 2)) / d, dy - h / 2)  # (h, -d/2) / d


def classify_shape(alpha: np.ndarray) -> str | None:
  """`circle`, `square` or `triangle` for one object's soft coverage (float [h, w] in [0, 1], zero off
  the object), or None when it covers too few pixels to tell.

  Each shape is placed at the coverage's centroid with the coverage's area, drawn with a one-pixel
  anti-aliased edge, and compared by soft IoU (sum of minima over sum of maxima): this uses the
  partly covered edge pixels instead of thresholding them, so it holds on small, noisy or blurred
  objects where a bounding box would be off by a pixel.
  """
  area = float(alpha.sum())
  if area < _MIN_SHAPE_PIXELS:
    return None
  h, w = alpha.shape
  y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
  cx, cy = float((alpha * x).sum() / area), float((alpha * y).sum() / area)
  sizes = {"circle": 2 * math.sqrt(area / math.pi), "square": math.sqrt(area),
           "triangle": math.sqrt(4 * area / math.sqrt(3))}
  iou = {}
  for shape, d in sizes.items():
    # A triangle's centroid sits a sixth of its height below its box centre.
    box_cy = cy - (d * math.sqrt(3) / 12 if shape == "triangle" else 0.0)
    t = np.clip(0.5 - _signed_distance(shape, x - cx, y - box_cy, d), 0.0, 1.0)
    iou[shape] = np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9)
  return max(iou, key=iou.get)


def _majority(votes: Iterable[str | None]) -> str | None:
  votes = [v for v in votes if v is not None]
  if not votes:
    return None
  names, counts = np.unique(votes, return_counts=True)
  return str(names[np.argmax(counts)])


def _shape_of(blobs: Sequence[Blob | None]) -> str | None:
  blobs = [b for b in blobs if b is not None]
  inside = [b for b in blobs if not b.touches_border] or blobs
  return _majority(classify_shape(b.alpha) for b in inside)


# ---------------------------------------------------------------------------------------------- motion
def classify_motion(track_xy: np.ndarray) -> str | None:
  """A Shapes motion (docs/data.md) for a centroid track [n, 2] in frame fractions (x right, y down);
  None if n < 2."""
  track_xy = np.asarray(track_xy, np.float64)
  if len(track_xy) < 2:
    return None
  span = track_xy.max(0) - track_xy.min(0)
  if span.max() < _STILL:
    return "still"
  axis = int(np.argmax(span))
  p = track_xy[:, axis]
  if _reversals(p) > 0:
    return ("bouncing left and right", "bouncing up and down")[axis]
  forward = p[-1] > p[0]
  return (("moving left", "moving right"), ("moving up", "moving down"))[axis][int(forward)]


def _reversals(p: np.ndarray) -> int:
  """Turns of a 1-D track, with hysteresis TURN so jitter is not a turn."""
  turns, direction, extreme = 0, 0, p[0]
  for v in p[1:]:
    if direction == 0:
      if abs(v - p[0]) > TURN:
        direction, extreme = (1 if v > p[0] else -1), v
    elif direction * (v - extreme) > 0:
      extreme = v
    elif direction * (extreme - v) > TURN:
      turns, direction, extreme = turns + 1, -direction, v
  return turns


def motion_matches(predicted: str | None, prompt: str, num_frames: int, fps: float = shapes.FPS) -> bool:
  """Whether a read motion satisfies the prompt's (see the module docstring for bouncing)."""
  if predicted == prompt:
    return True
  if prompt in shapes.BOUNCING_MOTIONS and predicted in shapes.STRAIGHT_MOTIONS:
    guaranteed_reversal = shapes.SPEED * (num_frames - 1) / fps >= 1.0
    horizontal = prompt == "bouncing left and right"
    return not guaranteed_reversal and (predicted in ("moving left", "moving right")) == horizontal
  return False


# ------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class ObjectReading:
  colour: str
  shape: str | None           # majority shape read in the wide shot
  motion: str | None          # None for an image or an object too rarely seen to track
  presence: float             # fraction of the frames it should be visible in


@dataclasses.dataclass
class ClipReading:
  """What the detector read from one video, in the caption's object order."""
  colours: tuple[str, ...]    # the most frequent foreground colours, as many as the caption names
  objects: tuple[ObjectReading, ...]
  cut_frame: int | None       # detected cut (close-up captions only)
  close_up: tuple[str | None, str | None] | None  # (colour, shape) read after the cut


@dataclasses.dataclass
class ClipScore:
  colour: bool
  motion: bool | None         # None: an image
  persistence: bool
  consistency: bool | None    # None: no cut in the caption
  shape: bool
  reading: ClipReading


def _cut_frame(cls: np.ndarray, colour_id: int) -> int | None:
  m = cls == colour_id
  area = m.sum((1, 2)).astype(np.float64)
  if len(m) < 2:
    return None
  inter = (m[1:] & m[:-1]).sum((1, 2))
  union = np.maximum((m[1:] | m[:-1]).sum((1, 2)), 1)
  score = np.abs(np.log((area[1:] + 1) / (area[:-1] + 1))) + 1.0 - inter / union
  t = int(np.argmax(score))
  return t + 1 if score[t] >= _CUT_SCORE else None


def _two_tracks(cls: np.ndarray, con: np.ndarray, colour_id: int, min_area: float
                ) -> list[list[Blob | None]]:
  """Two per-frame tracks of one colour's two largest solid components, linked by nearest centroid."""
  per_frame = [[b for b in _blobs(cls[t] == colour_id, _own(cls[t], con[t], colour_id), min_area) if b.solid]
               for t in range(len(cls))]
  tracks: list[list[Blob | None]] = [[], []]
  last: list[Blob | None] = [None, None]
  for blobs in per_frame:
    blobs = blobs[:2]
    if len(blobs) == 2 and all(last):
      d = lambda a, b: (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2
      if d(last[0], blobs[1]) + d(last[1], blobs[0]) < d(last[0], blobs[0]) + d(last[1], blobs[1]):
        blobs = blobs[::-1]
    elif len(blobs) == 1 and any(last):
      near = min((i for i in range(2) if last[i]),
                 key=lambda i: (last[i].cx - blobs[0].cx) ** 2 + (last[i].cy - blobs[0].cy) ** 2)
      blobs = [blobs[0], None] if near == 0 else [None, blobs[0]]
    blobs = list(blobs) + [None] * (2 - len(blobs))
    for i in range(2):
      tracks[i].append(blobs[i])
      last[i] = blobs[i] or last[i]
  return tracks


def colour_track(cls: np.ndarray, con: np.ndarray, colour_id: int, min_area: float
                 ) -> tuple[list[Blob | None], np.ndarray]:
  """The largest component per frame, and a centroid per frame over all this colour's compact parts
  (so an object cut in two by an occluder keeps its centre); NaN where absent."""
  track, xy = [], np.full((len(cls), 2), np.nan)
  for t in range(len(cls)):
    blobs = _blobs(cls[t] == colour_id, _own(cls[t], con[t], colour_id), min_area / 4)
    big = [b for b in blobs if b.area >= min_area and b.solid]
    track.append(big[0] if big else None)
    if big:
      a = np.array([b.area for b in blobs], np.float64)
      xy[t] = (a @ np.array([[b.cx, b.cy] for b in blobs])) / a.sum()
  return track, xy


def read_clip(frames: np.ndarray, labels: shapes.CaptionLabels) -> ClipReading:
  """Reads colours, shapes, motions, presence and the cut of `frames` for the objects `labels` names."""
  cls, con = classify_pixels(frames)
  T, H, W = cls.shape
  min_area = _MIN_AREA_FRAC * min(H, W) ** 2
  counts = np.bincount(cls.ravel(), minlength=len(COLOUR_NAMES) + 1)[1:]
  wanted = list(dict.fromkeys(o[0] for o in labels.objects))
  order = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
  colours = tuple(COLOUR_NAMES[i] for i in order[:len(wanted)])

  cut = None
  if labels.close_up is not None:
    cut = _cut_frame(cls, COLOUR_NAMES.index(labels.close_up[0]) + 1)
  wide = slice(0, cut if cut else T)
  scale = np.array([W, H], np.float64)

  # Per caption object: the track of its colour over the wide shot.
  blob_tracks: list[list[Blob | None]] = [None] * len(labels.objects)  # type: ignore[list-item]
  xy_tracks: list[np.ndarray] = [None] * len(labels.objects)  # type: ignore[list-item]
  for colour in wanted:
    idx = [i for i, o in enumerate(labels.objects) if o[0] == colour]
    cid = COLOUR_NAMES.index(colour) + 1
    if len(idx) == 1:
      blob_tracks[idx[0]], xy_tracks[idx[0]] = colour_track(cls[wide], con[wide], cid, min_area)
    else:
      tracks = _two_tracks(cls[wide], con[wide], cid, min_area)
      xys = [np.array([(b.cx, b.cy) if b else (np.nan, np.nan) for b in tr]) for tr in tracks]
      shapes_read = [_shape_of(tr) for tr in tracks]
      motions = [_motion_of(xy, scale) for xy in xys]

      def agreement(perm):
        return (sum(shapes_read[p] == labels.objects[i][1] for i, p in zip(idx, perm)),
                sum(motions[p] is not None and labels.objects[i][2] is not None and
                    motion_matches(motions[p], labels.objects[i][2], cut or T) for i, p in zip(idx, perm)))
      best = max(itertools.permutations(range(2)), key=agreement)
      for i, p in zip(idx, best):
        blob_tracks[i], xy_tracks[i] = tracks[p], xys[p]

  objects = []
  for i, (colour, shape, motion) in enumerate(labels.objects):
    present = np.array([b is not None for b in blob_tracks[i]])
    seen = present.sum()
    frames_due = present.size
    if cut and labels.close_up == (colour, shape):
      after = colour_track(cls[cut:], con[cut:], COLOUR_NAMES.index(colour) + 1, min_area)[0]
      seen += sum(b is not None for b in after)
      frames_due += len(after)
    read_motion = None
    if motion is not None and present.size >= _MIN_MOTION_FRAMES and present.mean() >= 0.5:
      read_motion = _motion_of(xy_tracks[i], scale)
    objects.append(ObjectReading(colour, _shape_of(blob_tracks[i]), read_motion, seen / frames_due))

  close_up = None
  if labels.close_up is not None and cut:
    after = cls[cut:]
    n = np.bincount(after.ravel(), minlength=len(COLOUR_NAMES) + 1)[1:]
    if n.max() > 0:
      colour = COLOUR_NAMES[int(np.argmax(n))]
      track = colour_track(after, con[cut:], COLOUR_NAMES.index(colour) + 1, min_area)[0]
      present = np.mean([b is not None for b in track])
      close_up = (colour, _shape_of(track)) if present >= 0.5 else (None, None)
    else:
      close_up = (None, None)
  return ClipReading(colours, tuple(objects), cut, close_up)


def _motion_of(xy: np.ndarray, scale: np.ndarray) -> str | None:
  ok = ~np.isnan(xy[:, 0])
  return classify_motion(xy[ok] / scale)


def score_clip(frames: np.ndarray, labels: shapes.CaptionLabels | shapes.ClipSpec | str) -> ClipScore:
  """Scores one video against its caption (a caption string, its parsed labels, or a ClipSpec)."""
  if isinstance(labels, str):
    labels = shapes.parse_caption(labels)
  elif isinstance(labels, shapes.ClipSpec):
    labels = labels.labels()
  r = read_clip(frames, labels)
  wide_frames = r.cut_frame or len(frames)  # motion is read over the wide shot only
  colour_ok = set(r.colours) == {o[0] for o in labels.objects}
  is_video = labels.objects[0][2] is not None
  motion_ok = None
  if is_video and wide_frames >= _MIN_MOTION_FRAMES:
    motion_ok = all(o.motion is not None and motion_matches(o.motion, want[2], wide_frames)
                    for o, want in zip(r.objects, labels.objects))
  persistence_ok = all(o.presence >= _PERSIST for o in r.objects)
  consistency_ok = None
  if labels.close_up is not None:
    i = [(o[0], o[1]) for o in labels.objects].index(labels.close_up)
    before = (r.objects[i].colour if r.objects[i].presence > 0 else None, r.objects[i].shape)
    consistency_ok = bool(r.cut_frame and r.close_up is not None and None not in before
                          and before == r.close_up)
  shape_ok = all(o.shape == want[1] for o, want in zip(r.objects, labels.objects))
  return ClipScore(colour_ok, motion_ok, persistence_ok, consistency_ok, shape_ok, r)


# ------------------------------------------------------------------------------------------ statistics
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a binomial rate k / n (95% by default); (0, 1) when n == 0."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class Rate:
  k: int
  n: int

  @property
  def rate(self) -> float:
    return self.k / self.n if self.n else float("nan")

  @property
  def interval(self) -> tuple[float, float]:
    return wilson_interval(self.k, self.n)

  def to_dict(self) -> dict:
    lo, hi = self.interval
    return {"rate": self.rate, "k": self.k, "n": self.n, "ci95": [lo, hi]}

  def __str__(self) -> str:
    lo, hi = self.interval
    return f"{100 * self.rate:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={self.n})"


METRICS = ("colour", "motion", "persistence", "consistency", "shape")


def summarize(scores: Sequence[ClipScore]) -> dict[str, Rate]:
  """Rates of each metric over the clips it applies to."""
  out = {}
  for m in METRICS:
    vals = [getattr(s, m) for s in scores if getattr(s, m) is not None]
    out[m] = Rate(int(sum(vals)), len(vals))
  return out


UNTRACKED = "untracked"


def motion_readings(labels: Sequence[shapes.CaptionLabels], scores: Sequence[ClipScore]
                    ) -> dict[str, dict[str, int]]:
  """{prompted motion: {read motion: objects}} over the clips whose motion is scored: how motion fails.
  A read of UNTRACKED is an object seen too rarely to track. Straight or still prompts read as bouncing
  are tracks that turn back by more than the turn threshold: an object that jitters."""
  out: dict[str, dict[str, int]] = {}
  for lab, sc in zip(labels, scores):
    if sc.motion is None:
      continue
    for (_, _, want), got in zip(lab.objects, sc.reading.objects):
      row = out.setdefault(want, {})
      read = got.motion or UNTRACKED
      row[read] = row.get(read, 0) + 1
  return {m: out[m] for m in shapes.MOTIONS if m in out}


def chance_level(labels: Sequence[shapes.CaptionLabels]) -> dict[str, float]:
  """Expected rate of a reader guessing uniformly at random, per metric, for these captions
  (persistence has no guess: a video without the object scores 0)."""
  def colour(l):
    k = len({o[0] for o in l.objects})
    return 1.0 / math.comb(len(COLOUR_NAMES), k)
  videos = [l for l in labels if l.objects[0][2] is not None]
  cuts = [l for l in labels if l.close_up is not None]
  return {
      "colour": float(np.mean([colour(l) for l in labels])) if labels else float("nan"),
      "motion": (float(np.mean([(1 / len(shapes.MOTIONS)) ** len(l.objects) for l in videos]))
                 if videos else float("nan")),
      "persistence": 0.0,
      "consistency": 1.0 / (len(COLOUR_NAMES) * len(shapes.SHAPES)) if cuts else float("nan"),
      "shape": (float(np.mean([(1 / len(shapes.SHAPES)) ** len(l.objects) for l in labels]))
                if labels else float("nan")),
  }


# ------------------------------------------------------------------------------------------ benchmark
_KINDS = ("ground_truth", "train_noise", "blurred", "uniform_noise", "gaussian_noise")


def benchmark_videos(spec: shapes.ClipSpec, kind: str, rng: np.random.Generator) -> np.ndarray:
  """A video for `spec` of one benchmark kind: the evaluation render, the training render (noise 6/255),
  the render blurred (Gaussian sigma 0.8 px) plus noise 8/255 (a stand-in for a VAE's softness), or pure
  noise (uniform, or Gaussian around mid-gray with std 64) of the spec's size."""
  shape = (spec.num_frames, spec.height, spec.width, 3)
  if kind == "ground_truth":
    return shapes.render_clip(spec)
  if kind == "train_noise":
    return shapes.render_clip(spec, noise_std=shapes.TRAIN_NOISE_STD, seed=int(rng.integers(1 << 30)))
  if kind == "blurred":
    x = ndimage.gaussian_filter(shapes.render_clip(spec).astype(np.float32), (0, 0.8, 0.8, 0))
    return np.clip(np.rint(x + rng.normal(0, 8, shape)), 0, 255).astype(np.uint8)
  if kind == "uniform_noise":
    return rng.integers(0, 256, shape, dtype=np.uint8)
  if kind == "gaussian_noise":
    return np.clip(np.rint(rng.normal(128, 64, shape)), 0, 255).astype(np.uint8)
  raise ValueError(f"video kind {kind!r} is unknown; accepted: {list(_KINDS)}")


def _main(argv: Sequence[str]) -> None:
  """python -m sora_jax.detector --kind ground_truth --num_per_split 300 --mixture demo"""
  import argparse  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description="Scores the detector on rendered or noise videos of Shapes specs.")
  p.add_argument("--kind", choices=_KINDS, default="ground_truth")
  p.add_argument("--num_per_split", type=int, default=300)
  p.add_argument("--mixture", default="demo", choices=list(shapes.MIXTURES))
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  rng = np.random.default_rng(a.seed)
  specs = [shapes.sample_spec(split, i, a.seed, a.mixture) for split in shapes.SPLITS
           for i in range(a.num_per_split)]
  start = time.time()
  scores = [score_clip(benchmark_videos(s, a.kind, rng), s) for s in specs]
  held = [sc for s, sc in zip(specs, scores)
          if any((o.colour, o.shape, o.motion) in shapes.HELD_OUT for o in s.objects) and not s.is_image]
  print(f"{a.kind}, {len(specs)} clips ({a.mixture} mixture, all splits), {time.time() - start:.0f}s")
  chance = chance_level([s.labels() for s in specs])
  for name, group in (("all", scores), ("held-out compositions", held)):
    print(f"  {name}: " + "; ".join(f"{m} {r}" for m, r in summarize(group).items()))
  print("  chance: " + "; ".join(f"{m} {100 * v:.1f}%" for m, v in chance.items()))


if __name__ == "__main__":
  _main(sys.argv[1:])
