"""The Shapes data set: the spec's rules (docs/data.md) hold for every sampled clip, and builds are exact
and repeatable."""
import dataclasses
import hashlib
import pickle
from pathlib import Path
import subprocess
import sys

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from sora_jax.data import shapes, shapes_dataset, sources

N_SPECS = 600
ROOT = Path(__file__).resolve().parents[1]


def _specs(split, n=N_SPECS, mixture="demo", seed=0):
  return [shapes.sample_spec(split, i, seed, mixture) for i in range(n)]


@pytest.fixture(scope="module")
def train_specs():
  return _specs("train")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Two builds of the same 24 train examples: one in this process, one by the command line in
  another process (protobuf's map order varies between processes, not within one)."""
  dirs = [tmp_path_factory.mktemp(f"shapes{i}") for i in range(2)]
  shapes_dataset.build_shapes(dirs[0], "train", 24, seed=3)
  subprocess.run([sys.executable, str(ROOT / "data_pipelines" / "build_shapes.py"), f"--out_dir={dirs[1]}",
                  "--split=train", "--num_examples=24", "--seed=3"], check=True, capture_output=True)
  return dirs


def test_two_builds_are_byte_identical(built):
  def digests(d):
    files = sorted(p for p in (d / "shapes" / "train" / sources.VERSION).iterdir()
                   if "array_record" in p.name)
    assert files, f"no record files under {d}"
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
  assert digests(built[0]) == digests(built[1])


def test_records_read_back_exactly_and_captions_parse_to_their_labels(built):
  src = sources.video_source(built[0], "train")
  assert len(src) == 24
  for i, rec in enumerate(src):
    spec, frames = shapes.render_example("train", i, seed=3)
    assert rec["video"].dtype == np.uint8
    np.testing.assert_array_equal(rec["video"], frames)
    assert (rec["num_frames"], rec["height"], rec["width"]) == frames.shape[:3]
    assert rec["fps"] == shapes.FPS
    stored = shapes.ClipSpec.from_json(rec["labels"])
    assert stored == spec
    assert shapes.parse_caption(rec["caption"]) == stored.labels()


def test_plain_tfds_data_source_reads_the_same_arrays(built):
  import tensorflow_datasets as tfds
  ds = tfds.data_source("shapes/train", split="train", data_dir=str(built[1]))
  src = sources.video_source(built[1], "train")
  for i in (0, 5, 23):
    np.testing.assert_array_equal(ds[i]["video"], src[i]["video"])
    assert ds[i]["caption"].decode() == src[i]["caption"]


def test_latent_records_round_trip_and_sources_pickle(tmp_path):
  rng = np.random.default_rng(0)
  examples = []
  for i, (t, h, w) in enumerate([(1, 4, 4), (3, 2, 8), (5, 4, 2)]):
    examples.append({"latent_mean": rng.normal(size=(t, h, w, 4)).astype(np.float32),
                     "latent_std": rng.uniform(0.1, 1, size=(t, h, w, 4)).astype(np.float32),
                     "caption": f"clip {i}", "num_frames": 1 + 4 * (t - 1), "height": 8 * h,
                     "width": 8 * w, "fps": 8.0, "labels": "", "source": f"s/{i}"})
  stats = {"shift": np.zeros(4, np.float32), "scale": np.ones(4, np.float32), "vae": {"z": 4}}
  sources.write_latent_dataset(tmp_path, "train", examples, stats=stats)
  src = pickle.loads(pickle.dumps(sources.latent_source(tmp_path, "train")))
  assert len(src) == 3
  for ex, rec in zip(examples, src):
    for k in sources.LATENT_KEYS:
      if k.startswith("latent"):
        np.testing.assert_array_equal(rec[k], ex[k])
      else:
        assert rec[k] == ex[k]
  assert sources.read_latent_stats(tmp_path) == {"shift": [0.0] * 4, "scale": [1.0] * 4, "vae": {"z": 4}}
  with pytest.raises(ValueError, match="latent example lacks"):
    sources.write_latent_dataset(tmp_path / "bad", "train", [{"caption": "x"}])
  assert not list((tmp_path / "bad" / "latents").glob("train/*"))  # nothing half-written is left
  with pytest.raises(FileNotFoundError, match="no built split 'validation'"):
    sources.latent_source(tmp_path, "validation")


def test_sampling_is_a_pure_function_of_its_arguments():
  a = shapes.sample_spec("train", 17, seed=5)
  assert a == shapes.sample_spec("train", 17, seed=5)
  assert a != shapes.sample_spec("train", 17, seed=6)
  assert a != shapes.sample_spec("validation", 17, seed=5)
  np.testing.assert_array_equal(shapes.render_example("test", 4)[1], shapes.render_example("test", 4)[1])


def test_held_out_compositions_only_in_test():
  held = set(shapes.HELD_OUT)
  for split in ("train", "validation"):
    for spec in _specs(split, 1500):
      for o in spec.objects:
        assert (o.colour, o.shape, o.motion) not in held, (split, spec)
  seen = {(o.colour, o.shape, o.motion) for s in _specs("test", 400) for o in s.objects}
  assert held <= seen
  # each held-out part still appears in train on its own, so the test measures recombination
  train = [(o.colour, o.shape, o.motion) for s in _specs("train", 1500) for o in s.objects]
  for colour, shape, motion in held:
    assert any(c == colour and m == motion for c, _, m in train)
    assert any(sh == shape and m == motion for _, sh, m in train)
    assert any(c == colour and sh == shape for c, sh, _ in train)


_ASPECTS = {"1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "16:9": 16 / 9, "9:16": 9 / 16, "2:1": 2.0, "1:2": 0.5}


def aspect_name(height: int, width: int) -> str | None:
  """The spec's aspect ratio (width:height) that (height, width) rounds from, or None."""
  for name, r in _ASPECTS.items():
    for short in range(32, 257, 16):
      h, w = (short, short * r) if r >= 1 else (short / r, short)
      if (int(round(h / 16) * 16), int(round(w / 16) * 16)) == (height, width):
        return name
  return None


@pytest.mark.parametrize("mixture", sorted(shapes.MIXTURES))
def test_sizes_obey_shapes_md(mixture):
  specs = _specs("train", 800, mixture)
  for s in specs:
    assert s.num_frames == 1 or (s.num_frames - 1) % 4 == 0
    assert s.num_frames <= 481
    assert s.height % 16 == 0 and s.width % 16 == 0 and 32 <= min(s.height, s.width)
    assert max(s.height, s.width) <= (64 if mixture == "demo" and s.num_frames > 1 else 256)
    assert aspect_name(s.height, s.width) is not None, (s.height, s.width)
    if s.seconds > shapes.MAX_STRAIGHT_SECONDS:
      assert all(o.motion not in shapes.STRAIGHT_MOTIONS for o in s.objects)
      assert s.height * s.width <= 64 * 48
    for o in s.objects:
      assert 0.2 <= o.size <= 0.3
  if mixture == "single":  # the fixed-size diagnostic: one size, no images or long clips by design
    assert {(s.num_frames, s.height, s.width) for s in specs} == {(17, 32, 32)}
    return
  images = np.mean([s.is_image for s in specs])
  long = np.mean([s.seconds > shapes.MAX_STRAIGHT_SECONDS for s in specs])
  assert 0.25 < images < 0.35
  assert 0.03 < long < 0.15


def test_objects_stay_visible_and_move_as_captioned(train_specs):
  for spec in train_specs:
    if spec.is_image:
      continue
    cov = shapes.object_coverage(spec)
    cen = shapes.object_centroids(spec, cov)
    wide = slice(0, spec.cut_frame or spec.num_frames)
    for i, o in enumerate(spec.objects):
      mass = cov[:, i].sum(axis=(1, 2))
      if len(spec.objects) == 1:  # persistence: fully visible in every frame, cut or not
        assert (mass > 0).all()
      if len(spec.objects) == 1 and spec.seconds <= shapes.MAX_STRAIGHT_SECONDS:
        # the wide shot never clips the object: its area is constant
        np.testing.assert_allclose(mass[wide], mass[0], rtol=0.03)
      c = cen[wide, i]
      if len(spec.objects) > 1 or len(c) < 5:
        continue
      d = (c[-1] - c[0]) / np.array([spec.width, spec.height])
      if o.motion == "still":
        assert np.abs(d).max() < 0.05
      elif o.motion in shapes.STRAIGHT_MOTIONS:
        axis = 0 if o.motion in ("moving left", "moving right") else 1
        sign = -1 if o.motion in ("moving left", "moving up") else 1
        seconds = (len(c) - 1) / spec.fps
        speed = min(shapes.SPEED, shapes.MAX_STRAIGHT_TRAVEL / spec.seconds)  # extents per second
        expected = speed * seconds
        assert sign * d[axis] == pytest.approx(expected, rel=0.1, abs=0.02)
        assert abs(d[1 - axis]) < 0.02


def test_bouncing_reverses_inside_the_frame():
  o = shapes.ObjectSpec("square", "red", "bouncing left and right", size=0.25, x=0.5, y=0.5)
  spec = shapes.ClipSpec(objects=(o,), num_frames=481, height=32, width=64)
  cov = shapes.object_coverage(spec)
  mass = cov[:, 0].sum(axis=(1, 2))
  np.testing.assert_allclose(mass, mass[0], rtol=0.03)  # never leaves the frame
  x = shapes.object_centroids(spec, cov)[:, 0, 0]
  turns = np.sum(np.diff(np.sign(np.diff(x))) != 0)
  # 0.3 widths/s over 60 s with 0.875 widths of room: about 20 reversals
  assert 15 <= turns <= 25


def test_close_up_centres_and_doubles_the_object():
  o = shapes.ObjectSpec("circle", "blue", "moving right", size=0.25, x=0.3, y=0.4)
  other = shapes.ObjectSpec("square", "white", "still", size=0.2, x=0.85, y=0.85)
  spec = shapes.ClipSpec(objects=(o, other), num_frames=17, height=48, width=64, cut_frame=8)
  cov = shapes.object_coverage(spec)
  cen = shapes.object_centroids(spec, cov)
  np.testing.assert_allclose(cen[8:, 0], [[32.0, 24.0]] * 9, atol=0.05)
  area = cov[:, 0].sum(axis=(1, 2))
  assert area[8:].mean() / area[:8].mean() == pytest.approx(4.0, rel=0.05)
  frames = shapes.render_clip(spec)
  assert tuple(frames[12, 24, 32]) == shapes.COLOURS["blue"]  # identity kept across the cut


def test_noise_only_in_noisy_renders():
  spec = dataclasses.replace(shapes.sample_spec("train", 2), background="gray")
  clean = shapes.render_clip(spec)
  np.testing.assert_array_equal(clean, shapes.render_clip(spec, noise_std=0.0, seed=9))
  bg = clean == 128
  assert bg.mean() > 0.5
  noisy = shapes.render_clip(spec, noise_std=shapes.TRAIN_NOISE_STD, seed=1).astype(np.float32)
  assert np.std(noisy[bg] - 128.0) == pytest.approx(6.0, rel=0.1)


_objects = st.builds(
    shapes.ObjectSpec, shape=st.sampled_from(shapes.SHAPES), colour=st.sampled_from(list(shapes.COLOURS)),
    motion=st.sampled_from(shapes.MOTIONS), size=st.floats(0.2, 0.3), x=st.floats(0.2, 0.8),
    y=st.floats(0.2, 0.8), direction=st.sampled_from([1, -1]))


@st.composite
def _clip_specs(draw):
  objects = draw(st.lists(_objects, min_size=1, max_size=2, unique_by=lambda o: (o.colour, o.shape)))
  num_frames = draw(st.sampled_from([1, 5, 9, 17]))
  if num_frames == 1:
    objects = [dataclasses.replace(o, motion="still") for o in objects]
  cut = draw(st.integers(1, num_frames - 1)) if num_frames > 1 and draw(st.booleans()) else 0
  return shapes.ClipSpec(
      objects=tuple(objects), background=draw(st.sampled_from(list(shapes.BACKGROUNDS))),
      num_frames=num_frames, height=draw(st.sampled_from([32, 48])),
      width=draw(st.sampled_from([32, 64])), cut_frame=cut,
      cut_object=draw(st.integers(0, len(objects) - 1)))


@settings(max_examples=60, deadline=None)
@given(_clip_specs())
def test_any_spec_renders_and_round_trips(spec):
  assert shapes.parse_caption(shapes.caption(spec)) == spec.labels()
  assert shapes.ClipSpec.from_json(spec.to_json()) == spec
  frames = shapes.render_clip(spec)
  assert frames.shape == (spec.num_frames, spec.height, spec.width, 3) and frames.dtype == np.uint8
  cov = shapes.object_coverage(spec)
  assert cov.min() >= 0 and cov.sum(axis=1).max() <= 1 + 1e-5


def test_caption_grammar_examples_and_rejections():
  assert shapes.parse_caption("a red circle moving left on a black background") == shapes.CaptionLabels(
      objects=(("red", "circle", "moving left"),), background="black")
  two = shapes.parse_caption("a red circle on a gray background".replace("on a", "and a white square on a"))
  assert two.objects == (("red", "circle", None), ("white", "square", None))
  cut = shapes.parse_caption("a blue triangle bouncing up and down on a gray background, "
                             "then a close-up of the blue triangle")
  assert cut.close_up == ("blue", "triangle")
  for bad in ("a purple circle moving left on a black background",
              "a red circle moving sideways on a black background",
              "a red circle moving left",
              "a red circle moving left and a blue square on a black background",
              "a red circle moving left on a black background, then a close-up of the blue square"):
    with pytest.raises(ValueError):
      shapes.parse_caption(bad)


def test_invalid_specs_name_the_bad_value():
  o = shapes.ObjectSpec("circle", "red", "still")
  with pytest.raises(ValueError, match="num_frames 10"):
    shapes.ClipSpec(objects=(o,), num_frames=10)
  with pytest.raises(ValueError, match="width 40"):
    shapes.ClipSpec(objects=(o,), width=40)
  with pytest.raises(ValueError, match="'purple'"):
    shapes.ObjectSpec("circle", "purple", "still")
  with pytest.raises(ValueError, match="differ"):
    shapes.ClipSpec(objects=(o, o))
  with pytest.raises(ValueError, match="split 'dev'"):
    shapes.sample_spec("dev", 0)


def test_first_specs_keeps_order_and_names_what_is_missing():
  specs = shapes.first_specs("demo", 5, lambda s: s.num_frames == 1, "images")
  every = [shapes.sample_spec("test", i, 0, "demo") for i in range(200)]
  assert specs == [s for s in every if s.num_frames == 1][:5]
  with pytest.raises(ValueError, match="too few never-clips.*asked for 2"):
    shapes.first_specs("demo", 2, lambda s: False, "never-clips")
