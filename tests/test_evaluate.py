"""The evaluator: VAE metrics, generation scores by group with intervals, and an offline report."""
import json
import os
import re

import ml_collections
import numpy as np
import pytest

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import detector
from sora_jax import evaluate
from sora_jax import export
from sora_jax import report
from sora_jax.data import shapes

import test_export


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_run")
  info = test_export.make_workdir(root / "run")
  with open(os.path.join(info["workdir"], "dit", "metrics.jsonl"), "w") as f:
    for step in range(1, 40):
      f.write(json.dumps({"step": step, "loss": 1.0 / step + 0.1, "compile/flops": 1e9}) + "\n")
  export.export(info["workdir"], str(root / "bundle"))
  export.export(info["workdir"], str(root / "bundle16"), dtype="bfloat16")
  return {"f32": str(root / "bundle"), "bf16": str(root / "bundle16"), "root": root}


def _ground_truth_generator(specs):
  by_request = {(shapes.caption(s), s.num_frames, s.height, s.width): s for s in specs}

  def generate(bundle, requests, *, seed, index_offset, **kw):
    del bundle, seed, index_offset, kw
    return [shapes.render_clip(by_request[tuple(r)]) for r in requests]
  return generate


def _write_ingested(data_dir):
  """A two-clip video data set like data_pipelines/ingest_videos.py writes, sizes off any grid."""
  from sora_jax.data import sources
  rng = np.random.default_rng(0)
  examples = []
  for i, (t, h, w) in enumerate([(10, 40, 50), (7, 33, 32)]):
    examples.append({"video": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), "caption": f"clip {i}",
                     "num_frames": t, "height": h, "width": w, "fps": 8.0, "labels": "",
                     "source": f"file{i}.mp4#0"})
  sources.write_dataset(data_dir, name="ingested", split="test", features=sources.video_features(),
                        examples=examples)
  return str(data_dir)


def test_evaluate_scores_ground_truth_as_perfect_and_writes_an_offline_report(tiny_bundle, tmp_path):
  b = bundle_lib.load(tiny_bundle["f32"])
  specs = evaluate.test_prompts(20, seed=0, mixture="demo")
  out = str(tmp_path / "eval")
  ingested = _write_ingested(tmp_path / "ingested")
  result = evaluate.evaluate(b, out, generate=_ground_truth_generator(specs), num_prompts=20, vae_clips=1,
                             denoise_clips=3, mixture="demo", compare=b, compare_prompts=3,
                             data_dir=ingested, data_split="test")
  # The first vae_clips ingested clips, cropped to the VAE's grid (10 frames -> 9, 40x50 -> 40x48).
  assert [(c["frames"], c["size"]) for c in result["vae_ingested"]["clips"]] == [(9, [40, 48])]
  assert result["comparison"]["videos"] == 3 and result["comparison"]["max_abs_diff"] == 0
  assert result["comparison"]["same_verdicts"] == 3
  groups = result["generation"]["groups"]
  assert groups["all"]["colour"]["n"] == 20
  for group, metrics in groups.items():
    for m, r in metrics.items():
      if r["n"]:
        assert r["rate"] == 1.0, (group, m, r)
        assert 0.0 < r["ci95"][0] < 1.0 and r["ci95"][1] == pytest.approx(1.0)
  assert groups["held-out compositions"]["colour"]["n"] >= 5
  # By motion kind: straight, bouncing and still videos are disjoint and none of them holds an image.
  kinds = {g: groups.get(g, {"colour": {"n": 0}})["colour"]["n"]
           for g in ("straight motions", "bouncing motions", "still objects")}
  assert kinds["straight motions"] == sum(
      not s.is_image and all(o.motion.startswith("moving") for o in s.objects) for s in specs) > 0
  assert sum(kinds.values()) <= groups["videos"]["colour"]["n"]
  # By colour: each group holds the prompts with an object of that colour.
  for c in shapes.COLOURS:
    assert groups.get(f"{c} objects", {"colour": {"n": 0}})["colour"]["n"] == sum(
        any(o.colour == c for o in s.objects) for s in specs)
  assert result["vae_shapes"]["psnr"]["n"] == 1 and np.isfinite(result["vae_shapes"]["ssim"]["mean"])
  assert result["vae_shapes"]["detector"]["all"]["colour"]["n"] == 1 and "detector" not in result["vae_ingested"]
  # The report opens offline: every image it shows is a local file next to it, nothing is fetched.
  page = open(os.path.join(out, "report.html")).read()
  srcs = re.findall(r"src='([^']+)'", page)
  assert {"samples_grid.png", "vae_shapes_reconstructions.png", "curves_dit.png"} <= set(srcs)
  assert all(os.path.isfile(os.path.join(out, s)) for s in srcs)
  assert "http" not in page and "<script" not in page
  saved = json.load(open(os.path.join(out, "metrics.json")))
  assert saved["generation"]["groups"]["all"]["motion"]["k"] == groups["all"]["motion"]["k"]
  # How motion is read: ground truth reads every prompted motion as itself (the diagonal), in the report too.
  read = saved["generation"]["motion_read"]
  assert sum(sum(r.values()) for r in read.values()) >= groups["all"]["motion"]["n"] > 0
  assert all(set(r) == {want} or want in shapes.BOUNCING_MOTIONS for want, r in read.items()), read
  assert "the motion read against the motion prompted" in page and "(0 of " in page
  assert "colour" in evaluate.headline(result) and "report.html" in evaluate.headline(result)
  # The continuous measures, with their settings: ground truth through the "generator" reads 1 blob.
  blobs = saved["blobs_per_frame"]
  ones = sum(evaluate.is_one_object(s) for s in specs)
  assert blobs["generated"] == blobs["ground_truth"] and blobs["generated"]["mean"] == 1.0
  assert blobs["generated"]["n"] == ones >= 5 and blobs["vae_reconstruction"]["n"] <= 1
  assert sum(c["blobs_per_frame"] is not None for c in saved["generation"]["clips"]) == ones
  err = saved["object_token_error"]
  assert err["settings"]["clips"] == 3 and err["settings"]["seed"] == 0 and err["settings"]["objective"] == "flow"
  assert set(err["by_t"]) == {"0.7", "0.9"} and saved["settings"]["denoise_clips"] == 3
  assert "blobs per frame" in evaluate.headline(result) and "object tokens" in evaluate.headline(result)
  assert "Continuous measures" in page and "object-token error at t = 0.7" in page
  # The caption reading: the same error on 3 straight clips with the direction, then the colour word swapped.
  reading = saved["caption_reading"]
  assert reading["settings"]["clips"] == 3 and reading["settings"]["kinds"] == ["direction", "colour"]
  assert set(reading["true"]) == set(reading["direction"]) == set(reading["colour"]) == {"0.7", "0.9"}
  assert all(c["n"] <= 3 and len(c["ci95"]) == 2 for kind in ("direction", "colour") for c in reading[kind].values())
  assert "direction word swapped" in page and "caption reading" in evaluate.headline(result)
  # The settings table shows what sampling used (the settings' 0 = the bundle config's), the headline
  # every detector metric, and the labelled grids at their own size.
  used = saved["sampling"]
  assert saved["settings"]["steps"] == 0 and used["steps"] == b.config.sample.steps > 0
  assert used["guidance"] == b.config.sample.guidance and used["sampler"]
  for key in ("steps", "guidance", "sampler"):
    assert f"<td>{key}</td><td>{used[key]}</td>" in page
  assert "shape accuracy (all prompts)" in page and "shape " in evaluate.headline(result)
  assert "<div class=unscaled><img src='samples_grid.png'" in page


def test_generation_requests_keep_their_index_and_long_clips_go_alone():
  specs = [shapes.sample_spec("test", i, 0, "demo") for i in range(40)]
  assert any(s.num_frames >= evaluate.LONG_CLIP for s in specs)
  calls = []

  def generate(bundle, requests, *, seed, index_offset, **kw):
    calls.append((index_offset, list(requests), kw))
    return [np.full((r[1], r[2], r[3], 3), index_offset + j, np.uint8) for j, r in enumerate(requests)]
  videos = evaluate.generate_videos(None, specs, seed=0, steps=5, guidance=0.0, chunk=8, generate=generate)
  for i, (s, v) in enumerate(zip(specs, videos)):
    assert v.shape == (s.num_frames, s.height, s.width, 3) and v[0, 0, 0, 0] == i
  for offset, reqs, kw in calls:
    assert len(reqs) <= 8 and kw == {"steps": 5}
    assert len(reqs) == 1 or all(r[1] < evaluate.LONG_CLIP for r in reqs)


@pytest.mark.slow
def test_evaluate_with_the_real_sampler(tiny_bundle, tmp_path):
  b = bundle_lib.load(tiny_bundle["f32"])
  result = evaluate.evaluate(b, str(tmp_path / "eval"), num_prompts=2, vae_clips=1, denoise_clips=2, steps=2,
                             guidance=2.0, mixture="demo")
  gen = result["generation"]
  assert gen["skipped"] == 0 and len(gen["clips"]) == 2
  # Random weights make noise: the detector must not credit it beyond chance.
  assert gen["groups"]["all"]["persistence"]["rate"] == 0.0


@pytest.mark.slow
def test_bf16_bundle_samples_within_tolerance_of_f32(tiny_bundle):
  from sora_jax import sampling
  reqs = [("a red circle moving left on a black background", 9, 32, 32),
          ("a blue square on a gray background", 1, 32, 48)]
  a = sampling.generate(bundle_lib.load(tiny_bundle["f32"]), reqs, seed=3, steps=3, guidance=2.0)
  b = sampling.generate(bundle_lib.load(tiny_bundle["bf16"]), reqs, seed=3, steps=3, guidance=2.0)
  for x, y in zip(a, b):
    d = np.abs(x.astype(np.int16) - y.astype(np.int16))
    # The documented tolerance (docs/benchmarks.md, "Evaluation"): mean |difference| <= 1 level of 255.
    assert d.mean() <= 1.0, d.mean()
    assert x.std() > 1.0  # a real picture, not a constant


def test_bootstrap_mean():
  m = evaluate.bootstrap_mean([1.0, 2.0, 3.0, 4.0])
  assert m["mean"] == 2.5 and m["ci95"][0] < 2.5 < m["ci95"][1]


def test_fit_to_vae_crops_to_the_grid():
  x = np.zeros((20, 50, 70, 3), np.uint8)
  assert evaluate.fit_to_vae(x, 4, 8).shape == (17, 48, 64, 3)


def test_report_pictures(tmp_path):
  video = shapes.render_clip(shapes.ClipSpec(objects=(shapes.ObjectSpec("circle", "red", "moving left",
                                                                        0.25, 0.7, 0.5),)))
  strip = report.frames_strip(video, long_side=96)
  assert strip.shape[0] == 96 and strip.shape[1] == 3 * 96 + 4
  np.testing.assert_array_equal(strip[:96:3, :96:3], video[0])  # first frame, 3x nearest neighbour
  grid = report.grid_png(str(tmp_path / "g.png"), [("a", [video, video]), ("b", [video[:1]])])
  assert os.path.getsize(grid) > 0
  assert report.curve_png(str(tmp_path / "c.png"), "t", {"loss": [(1, 2.0), (2, 1.0), (3, float("nan"))]})
  assert report.curve_png(str(tmp_path / "d.png"), "t", {"loss": []}) is None


class _FakePipe:
  """A VAE pipeline stand-in: the identity, or one that loses everything (mid-gray frames)."""
  geometry = type("G", (), {"temporal": 4, "spatial": 8})()

  def __init__(self, lossless: bool):
    self.lossless = lossless

  def encode(self, x):
    return x

  def decode(self, z):
    return z if self.lossless else np.full_like(z, 128)


def test_detector_on_vae_reconstructions_is_the_ceiling_through_the_vae():
  specs = [s for s in evaluate.test_prompts(12, seed=0, mixture="demo")]
  clips = [(shapes.caption(s), shapes.render_clip(s)) for s in specs]
  perfect = evaluate.vae_scores(_FakePipe(True), clips, specs=specs)["detector"]["all"]
  assert perfect["colour"]["n"] == 12 and perfect["colour"]["rate"] == 1.0
  assert perfect["motion"]["n"] > 0 and perfect["motion"]["rate"] == 1.0
  lost = evaluate.vae_scores(_FakePipe(False), clips, specs=specs)["detector"]["all"]
  assert lost["colour"]["rate"] == 0.0 and lost["persistence"]["rate"] == 0.0
  assert "detector" not in evaluate.vae_scores(_FakePipe(True), clips[:2])
  # A clip the VAE would crop no longer matches its spec's motion: refused, not scored.
  with pytest.raises(ValueError, match="off the VAE's grid"):
    evaluate.vae_scores(_FakePipe(True), [(n, c[:, :, :-4]) for n, c in clips[:1]], specs=specs[:1])


# ---------------------------------------------------------------------------------- continuous measures
def _square(frame, y, x, size, rgb):
  frame[y:y + size, x:x + size] = rgb


def test_blobs_per_frame_counts_objects_as_the_detector_sees_them():
  red, green = shapes.COLOURS["red"], shapes.COLOURS["green"]
  frames = np.zeros((4, 64, 64, 3), np.uint8)
  _square(frames[0], 20, 20, 16, red)                        # one object
  for x in (4, 28, 52):                                      # the same object in three fragments
    _square(frames[1], 20, x, 8, red)
  for y, x in ((5, 5), (40, 50), (55, 20)):                  # specks under the presence area: nothing
    _square(frames[2], y, x, 3, red)
  _square(frames[3], 8, 8, 14, red)                          # two objects of different colours
  _square(frames[3], 40, 40, 14, green)
  assert detector.object_blob_counts(frames).tolist() == [1, 3, 0, 2]
  assert evaluate.blobs_per_frame(frames) == pytest.approx(6 / 4)
  # Renders of one-object prompts, images and long clips included, read exactly one blob per frame.
  specs = [s for s in evaluate.test_prompts(70, seed=0, mixture="demo") if evaluate.is_one_object(s)]
  assert len(specs) >= 10 and any(s.is_image for s in specs) and any(s.num_frames >= 65 for s in specs)
  assert all(evaluate.blobs_per_frame(shapes.render_clip(s)) == 1.0 for s in specs)


_FLOW = config_lib.complete(
    ml_collections.ConfigDict({"diffusion": {"objective": "flow", "prediction": "v", "cosine_s": 0.008}}))


def _packed_batch(seed=0):
  """Two segments in one row (and padding), each a flat background with a few bright object tokens."""
  rng = np.random.default_rng(seed)
  seg = np.array([[1] * 6 + [2] * 5 + [0] * 3], np.int32)
  x0 = 0.1 * rng.standard_normal((1, 14, 8)).astype(np.float32)
  x0[0, [1, 7]] += 3.0
  x0[0, seg[0] == 0] = 0.0
  eps = rng.standard_normal(x0.shape).astype(np.float32) * (seg > 0)[..., None]
  batch = dict(tokens=x0, segment_ids=seg, positions=np.zeros((1, 14, 3), np.int32),
               text_tokens=np.array([[5, 6, 7, 0]], np.int32), text_segment_ids=np.array([[1, 1, 2, 0]], np.int32))
  return batch, eps


def _oracle(x0, eps, cfg, what):
  """A fake DiT that predicts what the objective asks for exactly (`what` = "target"), or nothing."""
  import jax.numpy as jnp
  from sora_jax import diffusion

  def dit(x_t, positions, segment_ids, t, text, text_segment_ids, *, text_drop):
    assert float(jnp.max(text_drop)) == 0.0 and int(jnp.max(text)) > 0  # caption given, not dropped
    t_tok = jnp.full(segment_ids.shape, t[0, 0])
    _, target = diffusion.noisy(jnp.asarray(x0), jnp.asarray(eps), t_tok, cfg)
    return target if what == "target" else jnp.zeros_like(x_t)
  return dit


@pytest.mark.parametrize("objective,prediction", [("flow", "v"), ("ddpm", "eps"), ("ddpm", "v")])
def test_denoise_errors_vanish_for_the_exact_prediction(objective, prediction):
  from sora_jax import diffusion
  cfg = ml_collections.ConfigDict(_FLOW.to_dict())
  cfg.diffusion.objective, cfg.diffusion.prediction = objective, prediction
  batch, eps = _packed_batch()
  exact = evaluate.denoise_errors(_oracle(batch["tokens"], eps, cfg, "target"), cfg, batch, eps,
                                  num_segments=2, times=(0.7, 0.9))
  want_obj = np.asarray(diffusion.object_tokens(batch["tokens"], batch["segment_ids"], 2)) > 0
  np.testing.assert_array_equal(exact["object"], want_obj)
  assert exact["object"][0].tolist().count(True) == 2 and not exact["object"][0, 11:].any()
  for t in (0.7, 0.9):
    assert np.max(exact[t]["model"][exact["valid"]]) < 1e-8
  wrong = evaluate.denoise_errors(_oracle(batch["tokens"], eps, cfg, "zero"), cfg, batch, eps,
                                  num_segments=2, times=(0.7,))
  assert wrong[0.7]["model"][wrong["object"]].min() > 0.1
  if objective == "flow":
    # v = 0 leaves x0_hat = x_t: the error is t^2 |eps - x0|^2; shrinkage is (1-t) x_t / ((1-t)^2 + t^2).
    x0, t = batch["tokens"], 0.7
    np.testing.assert_allclose(wrong[t]["model"], t * t * np.mean((eps - x0) ** 2, -1), rtol=1e-5, atol=1e-7)
    x_t = (1 - t) * x0 + t * eps
    np.testing.assert_allclose(wrong[t]["shrinkage"],
                               np.mean((x_t * (1 - t) / ((1 - t) ** 2 + t ** 2) - x0) ** 2, -1), rtol=1e-5)


class _LatentPipe:
  """A pipeline stand-in with no VAE: pooled pixels, scaled so objects stand out as object tokens."""
  from sora_jax import sampling as _sampling
  geometry = _sampling.Geometry(8, 8, 3, (1, 2, 2))  # 8 frames per latent frame: 13-frame clips are off it
  cfg = config_lib.complete(
      ml_collections.ConfigDict({**_FLOW.to_dict(), "data": {"seq_len": 128}, "sample": {"row_len": 0}}))

  def __init__(self, dit):
    self.dit = dit

  def encode(self, frames):
    from sora_jax.data import pipeline
    return 4.0 * pipeline.stand_in_latents(frames, (8, 8, 8))

  def text(self, caption):
    return np.array([3 + len(caption) % 7, 4], np.int32)

  def sample_setting(self, name, value, default):
    return self.cfg.sample.get(name, default) if value is None else value


def test_object_token_error_averages_each_clips_object_tokens():
  import jax.numpy as jnp
  from sora_jax import patching
  specs = evaluate.test_prompts(8, seed=0, mixture="demo")
  specs = [s for s in specs if (s.num_frames - 1) % 8 == 0]
  off_grid = shapes.ClipSpec(objects=specs[0].objects, num_frames=13)
  pipe = _LatentPipe(lambda x_t, pos, seg, t, *a, **kw: x_t / t[0, 0])  # predicts x0 = 0 at every t
  got = evaluate.object_token_error(pipe, specs + [off_grid], seed=0, rows_per_call=1)
  got_on_grid = evaluate.object_token_error(pipe, specs, seed=0)
  assert got_on_grid["by_t"] == got["by_t"]  # rows one at a time or eight: the same numbers
  want = []
  for s in specs:
    tokens = patching.patchify(pipe.encode(shapes.render_clip(s)), (1, 2, 2))[0]
    obj = np.sqrt(np.mean((tokens - tokens.mean(0)) ** 2, -1)) > 1.0  # diffusion.object_tokens, by hand
    if obj.any():
      want.append(float(np.mean(tokens[obj] ** 2)))
  assert len(want) >= 4
  st = got["settings"]
  assert st["off_grid"] == 1 and st["without_object_tokens"] == len(specs) - len(want)
  assert st["times"] == [0.7, 0.9] and st["text_drop"] == 0.0 and st["guidance"] == 1.0
  for t in ("0.7", "0.9"):
    assert got["by_t"][t]["object"]["n"] == len(want)
    assert got["by_t"][t]["object"]["mean"] == pytest.approx(np.mean(want), rel=1e-5)
  # The noise is fixed by the seed: two bundles (here: one, twice) are compared on the same draws.
  same = lambda x_t, *a, **kw: jnp.zeros_like(x_t)
  a, b, c = (evaluate.object_token_error(_LatentPipe(same), specs[:3], seed=s)["by_t"]["0.9"]["object"]["mean"]
             for s in (0, 0, 1))
  assert a == b and a != c
  # Latents at hand (vae_scores encodes the same first clips) are used instead of encoding again.
  given = [pipe.encode(shapes.render_clip(s)) for s in specs[:2]]
  assert evaluate.object_token_error(pipe, specs, latents=given)["by_t"] == got_on_grid["by_t"]
  flat = evaluate.object_token_error(pipe, specs, latents=[np.zeros_like(z) for z in given])
  assert flat["settings"]["without_object_tokens"] == got_on_grid["settings"]["without_object_tokens"] + 2


def test_vae_reconstructions_give_the_blobs_ceiling_through_the_vae():
  specs = evaluate.test_prompts(12, seed=0, mixture="demo")
  clips = [(shapes.caption(s), shapes.render_clip(s)) for s in specs]
  ones = sum(evaluate.is_one_object(s) for s in specs)
  perfect = evaluate.vae_scores(_FakePipe(True), clips, specs=specs)["blobs_per_frame"]
  assert perfect["mean"] == 1.0 and perfect["n"] == ones
  assert evaluate.vae_scores(_FakePipe(False), clips, specs=specs)["blobs_per_frame"]["mean"] == 0.0


# ---------------------------------------------------------------------------------------- learning curve
def _run_with_two_dit_checkpoints(root):
  """A demo-layout run whose DiT kept checkpoints at steps 3 and 7 (different EMA weights)."""
  from flax import nnx
  from sora_jax.models.dit import DiT
  w = str(root / "run")
  cfg = config_lib.complete(test_export.tiny_config())
  cfg.dit.in_dim = 4 * test_export.C
  dit = lambda: DiT(cfg.dit, rngs=nnx.Rngs(0))
  test_export._save_run(os.path.join(w, "dit"), test_export._params(dit, 5), test_export._params(dit, 6), step=3)
  test_export.make_workdir(w)
  # A tiny latent scale: the random VAE's latents then vary by more than the object-token threshold.
  stats_path = os.path.join(w, "data", "latents", "latent_stats.json")
  stats = json.load(open(stats_path))
  json.dump({**stats, "scale": [1e-3] * test_export.C}, open(stats_path, "w"))
  with open(os.path.join(w, "dit", "metrics.jsonl"), "w") as f:
    for r in ({"step": 0, "compile/model_tflops_per_step": 2.0},
              *({"step": s, "loss": 1.0, "tokens_per_s": 100.0, "step_time_s": 0.5} for s in (2, 4, 6, 7))):
      f.write(json.dumps(r) + "\n")
  return w


def test_learning_curve_evaluates_each_checkpoint_and_draws_the_curve(tmp_path, monkeypatch):
  from sora_jax.bench import learning_curve
  w = _run_with_two_dit_checkpoints(tmp_path)
  out = str(tmp_path / "curve")
  specs = evaluate.test_prompts(5, seed=0, mixture="demo")
  kw = dict(generate=_ground_truth_generator(specs), num_prompts=5, vae_clips=1, denoise_clips=2,
            mixture="demo")
  with pytest.raises(bundle_lib.BundleError, match=r"no checkpoint at step\(s\) \[5\].*steps \[3, 7\]"):
    learning_curve.learning_curve(w, out, checkpoint_steps=[3, 5], **kw)
  curve = learning_curve.learning_curve(w, out, checkpoint_steps=[7, 3], **kw)
  rows = curve["rows"]
  assert [r["step"] for r in rows] == [3, 7]
  assert [r["train_flops"] for r in rows] == [6e12, 14e12] and [r["train_tokens"] for r in rows] == [150.0, 350.0]
  for r in rows:
    assert r["colour"]["rate"] == 1.0 and r["colour"]["n"] == 5 and r["blobs_per_frame"]["mean"] == 1.0
    straight = sum(not s.is_image and all(o.motion.startswith("moving") for o in s.objects) for s in specs)
    assert (r["motion_straight"] or {"n": 0})["n"] == straight
    assert os.path.isfile(os.path.join(out, r["report"]))
  # Each step is its own DiT: same clips and noise, different weights, different errors.
  e3, e7 = (r["object_token_error"]["0.9"] for r in rows)
  assert e3["n"] == e7["n"] > 0 and e3["mean"] != e7["mean"]
  assert json.load(open(os.path.join(out, "step_3", "metrics.json")))["bundle_source"]["dit_step"] == 3
  saved = json.load(open(os.path.join(out, "learning_curve.json")))
  assert saved["rows"][1]["object_token_error"]["0.9"]["mean"] == e7["mean"]
  assert saved["blobs_ground_truth"]["mean"] == 1.0 and saved["times"] == [0.7, 0.9]
  lines = open(os.path.join(out, "learning_curve.csv")).read().splitlines()
  head = lines[0].split(",")
  assert len(lines) == 3 and {"step", "train_flops", "colour_lo", "motion_straight_n", "blobs_per_frame",
                              "object_token_error_t0.9_hi"} <= set(head)
  assert float(lines[2].split(",")[head.index("object_token_error_t0.9")]) == pytest.approx(e7["mean"])
  from PIL import Image
  assert Image.open(os.path.join(out, "learning_curve.png")).size[0] > 0
  page = open(os.path.join(out, "report.html")).read()
  assert "src='learning_curve.png'" in page and "step_3/report.html" in page
  assert all(f"<th>{label}</th>" in page for _, _, label in evaluate.CURVE_RATES.values())
  # Run again: the finished steps are read back, not evaluated again.
  monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated a finished step again"))
  assert learning_curve.learning_curve(w, out, checkpoint_steps=[3, 7], **kw)["rows"] == rows
  # A bundle's report shows a learning curve passed to it, with the plot copied next to it.
  other = tmp_path / "eval"
  other.mkdir()
  result = json.load(open(os.path.join(out, "step_7", "metrics.json")))
  page = open(evaluate.write_report(str(other), result, gen_extra=None, vae_examples={}, curves=[],
                                    learning_curve=evaluate._learning_curve(
                                        os.path.join(out, "learning_curve.json"), str(other)))).read()
  assert "Learning curve" in page and (other / "learning_curve.png").is_file()


def test_train_compute_across_a_resume():
  from sora_jax.bench import learning_curve
  # Started at 0 (2 TFLOP/step), logged at 2 and 4, resumed from 4 on a bigger batch (3 TFLOP/step).
  records = [{"step": 0, "compile/model_tflops_per_step": 2.0},
             {"step": 2, "tokens_per_s": 10.0, "step_time_s": 1.0},
             {"step": 4, "tokens_per_s": 10.0, "step_time_s": 1.0, "compile/model_tflops_per_step": 3.0},
             {"step": 6, "tokens_per_s": 30.0, "step_time_s": 1.0}]
  got = learning_curve.train_compute(records, 6)
  assert got["train_flops"] == pytest.approx((4 * 2 + 2 * 3) * 1e12) and got["train_tokens"] == 4 * 10 + 2 * 30
  assert learning_curve.train_compute(records, 3) == {"train_flops": 6e12, "train_tokens": 30.0}
  assert learning_curve.train_compute([], 3) == {"train_flops": None, "train_tokens": None}
