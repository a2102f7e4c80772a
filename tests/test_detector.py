"""The Shapes detector reads ground-truth renders correctly, gives no credit to noise or wrong prompts."""
import math

import numpy as np
import pytest

from sora_jax import detector
from sora_jax.data import shapes


def _clip(*objects, **kw):
  kw.setdefault("num_frames", 17)
  return shapes.ClipSpec(objects=tuple(shapes.ObjectSpec(*o) if isinstance(o, tuple) else o
                                       for o in objects), **kw)


def _assert_all_right(specs, noise_std=0.0):
  scores = [detector.score_clip(shapes.render_clip(s, noise_std=noise_std, seed=i), s)
            for i, s in enumerate(specs)]
  summary = detector.summarize(scores)
  bad = [(shapes.caption(s), sc.reading) for s, sc in zip(specs, scores)
         if False in (sc.colour, sc.motion, sc.persistence, sc.consistency, sc.shape)]
  for metric, rate in summary.items():
    if rate.n:
      assert rate.rate >= 0.99, (metric, str(rate), bad[:3])
  return summary


def test_ground_truth_renders_of_every_split_and_mixture():
  specs = [shapes.sample_spec(split, i, seed=3, mixture=mix)
           for mix, n in (("demo", 36), ("small", 12)) for split in shapes.SPLITS for i in range(n)]
  # The sample covers every kind of clip the evaluation meets.
  assert any(s.is_image for s in specs) and any(s.num_frames >= 65 for s in specs)
  assert any(len(s.objects) == 2 for s in specs) and sum(bool(s.cut_frame) for s in specs) >= 10
  assert any((o.colour, o.shape, o.motion) in shapes.HELD_OUT for s in specs for o in s.objects)
  summary = _assert_all_right(specs)
  assert summary["consistency"].n >= 10 and summary["motion"].n >= 60


def test_every_demo_size_shape_and_object_size():
  sizes = sorted({hw for b in shapes.MIXTURES["demo"] for hw in b.sizes})
  specs = []
  for i, (h, w) in enumerate(sizes):
    for j, shape in enumerate(shapes.SHAPES):
      for k, size in enumerate((0.2, 0.3)):
        colour = list(shapes.COLOURS)[(i + j + k) % 5]
        motion = shapes.STRAIGHT_MOTIONS[(i + j) % 4]
        start = {"moving left": (0.7, 0.5), "moving right": (0.3, 0.5),
                 "moving up": (0.5, 0.7), "moving down": (0.5, 0.3)}[motion]
        specs.append(_clip((shape, colour, motion, size, *start), height=h, width=w, num_frames=9,
                           background=("black", "gray")[k]))
  _assert_all_right(specs)


def test_held_out_compositions_cuts_and_training_noise():
  specs = []
  for i, (colour, shape, motion) in enumerate(shapes.HELD_OUT):
    n = 33 if motion in shapes.BOUNCING_MOTIONS else 17
    x, y = {"moving up": (0.5, 0.75), "moving down": (0.5, 0.25), "moving left": (0.75, 0.5),
            "moving right": (0.25, 0.5)}.get(motion, (0.4, 0.6))
    specs.append(_clip((shape, colour, motion, 0.25, x, y), num_frames=n, height=48, width=64,
                       cut_frame=(0, n // 2)[i % 2], background=("black", "gray")[i % 2]))
  _assert_all_right(specs, noise_std=shapes.TRAIN_NOISE_STD)


def test_pure_noise_scores_at_most_chance():
  rng = np.random.default_rng(0)
  specs = [s for s in (shapes.sample_spec("test", i, seed=1) for i in range(80)) if s.num_frames <= 33]
  specs = specs[:48]
  scores = []
  for s in specs:
    frames = rng.integers(0, 256, (s.num_frames, s.height, s.width, 3), dtype=np.uint8)
    scores.append(detector.score_clip(frames, s))
  summary = detector.summarize(scores)
  chance = detector.chance_level([s.labels() for s in specs])
  for metric, rate in summary.items():
    if rate.n == 0:
      continue
    p = chance[metric]
    # Not above chance: within three standard errors (plus one clip) of a prompt-blind guesser.
    assert rate.rate <= p + 3 * math.sqrt(max(p * (1 - p), 0.01) / rate.n) + 1 / rate.n, (metric, str(rate), p)
  assert summary["persistence"].rate <= 0.05 and summary["motion"].rate <= 0.1


def test_wrong_prompts_are_scored_wrong():
  spec = _clip(("circle", "red", "moving left", 0.25, 0.7, 0.5), height=48, width=48)
  frames = shapes.render_clip(spec)
  assert detector.score_clip(frames, "a red circle moving left on a black background").shape
  wrong_colour = detector.score_clip(frames, "a blue circle moving left on a black background")
  wrong_motion = detector.score_clip(frames, "a red circle moving right on a black background")
  wrong_axis = detector.score_clip(frames, "a red circle bouncing up and down on a black background")
  wrong_shape = detector.score_clip(frames, "a red triangle moving left on a black background")
  assert not wrong_colour.colour and not wrong_colour.persistence
  assert wrong_motion.colour and not wrong_motion.motion
  assert not wrong_axis.motion
  assert wrong_shape.motion and not wrong_shape.shape


def test_two_objects_of_one_colour_are_told_apart_by_shape():
  spec = _clip(("circle", "red", "moving right", 0.25, 0.25, 0.3),
               ("square", "red", "moving left", 0.25, 0.75, 0.7), height=48, width=64)
  frames = shapes.render_clip(spec)
  assert detector.score_clip(frames, spec).motion
  swapped = "a red circle moving left and a red square moving right on a black background"
  assert not detector.score_clip(frames, swapped).motion


def test_shot_consistency_needs_the_same_object_after_the_cut():
  spec = _clip(("circle", "green", "moving right", 0.25, 0.3, 0.5), num_frames=17, cut_frame=8,
               height=48, width=48)
  frames = shapes.render_clip(spec)
  ok = detector.score_clip(frames, spec)
  assert ok.consistency and ok.reading.cut_frame == 8
  other = _clip(("square", "green", "moving right", 0.25, 0.3, 0.5), num_frames=17, cut_frame=8,
                height=48, width=48)
  spliced = np.concatenate([frames[:8], shapes.render_clip(other)[8:]])
  assert not detector.score_clip(spliced, spec).consistency
  no_cut = detector.score_clip(shapes.render_clip(_clip(*spec.objects, height=48, width=48)), spec)
  assert not no_cut.consistency


def test_persistence_counts_missing_frames():
  spec = _clip(("triangle", "yellow", "bouncing left and right", 0.25, 0.5, 0.5), num_frames=65,
               height=32, width=32, background="gray")
  frames = shapes.render_clip(spec)
  gone = frames.copy()
  gone[10:20] = shapes.BACKGROUNDS["gray"]          # 10 of 65 frames without the object: 85%
  assert detector.score_clip(frames, spec).persistence
  assert not detector.score_clip(gone, spec).persistence
  gone[15:20] = frames[15:20]                       # 5 of 65 missing: 92%
  assert detector.score_clip(gone, spec).persistence


@pytest.mark.parametrize("track,expected", [
    ([(0.5, 0.5), (0.51, 0.5), (0.52, 0.49), (0.5, 0.5)], "still"),
    ([(0.5, 0.5), (0.45, 0.5), (0.4, 0.51), (0.35, 0.5)], "moving left"),
    ([(0.5, 0.3), (0.5, 0.4), (0.5, 0.5)], "moving down"),
    ([(0.5, 0.6), (0.5, 0.8), (0.5, 0.7), (0.5, 0.5)], "bouncing up and down"),
    ([(0.2, 0.5), (0.22, 0.5), (0.5, 0.5), (0.8, 0.5), (0.6, 0.5)], "bouncing left and right"),
])
def test_classify_motion(track, expected):
  assert detector.classify_motion(np.array(track)) == expected


def test_bouncing_needs_a_reversal_only_when_the_clip_guarantees_one():
  assert detector.motion_matches("moving left", "bouncing left and right", num_frames=17)
  assert not detector.motion_matches("moving left", "bouncing left and right", num_frames=33)
  assert not detector.motion_matches("moving up", "bouncing left and right", num_frames=17)
  assert not detector.motion_matches("bouncing left and right", "moving left", num_frames=17)


def test_wilson_interval():
  lo, hi = detector.wilson_interval(50, 100)
  assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
  lo, hi = detector.wilson_interval(100, 100)
  assert hi > 1 - 1e-9 and 0.96 < lo < 0.965
  assert detector.wilson_interval(0, 0) == (0.0, 1.0)


def test_motion_readings_show_a_jittering_track_as_bouncing():
  mover = _clip(("circle", "red", "moving left", 0.25, 0.7, 0.5), height=48, width=48)
  still = _clip(("square", "blue", "still", 0.25, 0.5, 0.5), height=48, width=48)
  image = _clip(("triangle", "green", "still", 0.25, 0.5, 0.5), height=48, width=48, num_frames=1)
  frames = shapes.render_clip(mover)
  # Each 4-frame chunk drawn back to front (a model that draws each latent frame's object apart): the
  # track still goes left overall but turns back inside every chunk.
  order = np.concatenate([np.arange(i, min(i + 4, 17))[::-1] for i in range(0, 17, 4)])
  videos = [(mover, frames), (mover, frames[order]), (still, shapes.render_clip(still)),
            (image, shapes.render_clip(image))]
  scores = [detector.score_clip(v, s) for s, v in videos]
  assert [sc.motion for sc in scores] == [True, False, True, None]
  got = detector.motion_readings([s.labels() for s, _ in videos], scores)
  assert got == {"moving left": {"moving left": 1, "bouncing left and right": 1}, "still": {"still": 1}}
  assert list(got) == [m for m in shapes.MOTIONS if m in got]  # in the data set's order of motions
