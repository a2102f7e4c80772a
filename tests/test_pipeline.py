"""The packed grain pipeline: exact round trips, consistent segment metadata, size fitting, long-clip
accounting, process sharding, global arrays, and exact resume."""
import json

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sora_jax import patching
from sora_jax.data import pipeline, sources
from sora_jax.models import dit


def tokenize(text: str) -> np.ndarray:
  """Byte-level ids: enough to check which caption landed in which text segment."""
  return np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 1


class LatentRecords:
  """In-memory latent data set: record i has latents of sizes[i] = (t, h, w) and caption "clip i"."""

  def __init__(self, sizes, channels=4, seed=0):
    self.sizes = list(sizes)
    self.channels = channels
    self.seed = seed

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    t, h, w = self.sizes[i]
    rng = np.random.default_rng([self.seed, i])
    return dict(latent_mean=rng.standard_normal((t, h, w, self.channels)).astype(np.float32),
                latent_std=np.full((t, h, w, self.channels), 0.1, np.float32),
                caption=f"clip {i}", fps=8.0, num_frames=1 + 4 * (t - 1))


def make_config(stats_dir, **data):
  d = dict(source="latents", latents_dir=str(stats_dir), videos_dir="", tokenizer="",
           seq_len=64, text_len=48, max_text_tokens=8, max_segments=8, batch_size=2,
           long_clips="crop", num_workers=0, shuffle_seed=0, token_budget=0, min_patch_side=1,
           sample_latents=False, stand_in_factors=(4, 8, 8), packer="best_fit", packing_bins=4)
  d.update(data)
  return ml_collections.ConfigDict(dict(data=d, dit=dict(patch=(1, 2, 2))))


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("latents")
  sources.write_latent_stats(path, {"shift": [0.5, -0.5, 0.0, 1.0], "scale": [2.0, 1.0, 0.5, 1.0]})
  return path


def expected_latents(cfg, record, index, epoch=0):
  spec = pipeline.make_spec(cfg)
  prep = pipeline.PrepareSample(spec, None, tokenize, 1)
  z = prep.latents(record, index, epoch)
  fit = pipeline.fit_to_budget(z.shape[:3], spec.patch, spec.token_budget,
                               min_patch_side=spec.min_patch_side, long_clips=spec.long_clips)
  return pipeline.pool_space(z[:fit.keep_t], fit.scale)


def unpack(batch, patch=(1, 2, 2)):
  """Every row's samples as latents [t, h, w, c] (normalised, after size fitting), in segment order."""
  return [patching.unpack_row(batch["tokens"][b], batch["segment_ids"][b], batch["seg_grid"][b], patch)
          for b in range(batch["tokens"].shape[0])]


def check_batch_consistency(batch, cfg):
  """Segment ids, positions, text segment ids and seg_* entries must describe the same samples."""
  for b in range(batch["tokens"].shape[0]):
    seg_l = batch["segment_ids"][b]
    num = int(batch["seg_valid"][b].sum())
    assert batch["seg_valid"][b].tolist() == [1] * num + [0] * (cfg.data.max_segments - num)
    np.testing.assert_array_equal(batch["loss_mask"][b], (seg_l > 0).astype(np.float32))
    assert set(np.unique(seg_l[seg_l > 0])) == set(range(1, num + 1))
    assert set(np.unique(batch["text_segment_ids"][b])) - {0} == set(range(1, num + 1))
    for k in range(num):
      ids = np.flatnonzero(seg_l == k + 1)
      assert ids.tolist() == list(range(ids[0], ids[0] + len(ids)))  # contiguous, in patchify order
      grid = batch["seg_grid"][b, k]
      assert len(ids) == grid.prod()
      pos = batch["positions"][b, ids]
      np.testing.assert_array_equal(pos.max(0) + 1, grid)
      assert len({tuple(p) for p in pos}) == len(ids)
    # Padding carries nothing.
    assert not batch["tokens"][b][seg_l == 0].any() and not batch["positions"][b][seg_l == 0].any()


size = st.tuples(st.integers(1, 6), st.sampled_from([2, 4, 6, 8]), st.sampled_from([2, 4, 6, 8]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(size, min_size=3, max_size=14), packer=st.sampled_from(pipeline.PACKERS))
def test_round_trip_random_size_mixtures(stats_dir, sizes, packer):
  cfg = make_config(stats_dir, packer=packer)
  records = LatentRecords(sizes)
  it = pipeline.make_iterator(cfg, split="validation", source=records, tokenize=tokenize)
  seen = []
  for batch in it:
    check_batch_consistency(batch, cfg)
    for b, row in enumerate(unpack(batch)):
      for k, z in enumerate(row):
        i = int(batch["seg_index"][b, k])
        np.testing.assert_array_equal(z, expected_latents(cfg, records[i], i))
        text = batch["text_tokens"][b][batch["text_segment_ids"][b] == k + 1]
        np.testing.assert_array_equal(text, tokenize(f"clip {i}")[:cfg.data.max_text_tokens])
        seen.append(i)
  # One pass of a finite split sees every record exactly once.
  assert sorted(seen) == list(range(len(sizes)))


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 40), h=st.sampled_from([2, 4, 6, 8, 12, 16, 32]),
       w=st.sampled_from([2, 4, 6, 8, 12, 16, 32]), budget=st.integers(1, 300),
       long_clips=st.sampled_from(pipeline.LONG_CLIPS), min_side=st.integers(1, 3))
def test_fit_to_budget_keeps_aspect_and_fits(t, h, w, budget, long_clips, min_side):
  fit = pipeline.fit_to_budget((t, h, w), (1, 2, 2), budget, min_patch_side=min_side,
                               long_clips=long_clips)
  assert fit.tokens <= budget
  assert h % (2 * fit.scale) == 0 and w % (2 * fit.scale) == 0  # one integer factor for both sides
  full = t * (h // 2) * (w // 2)
  if full <= budget:
    assert fit.scale == 1 and fit.keep_t == t  # what fits is never touched
  if fit.keep_t < t:  # cut in time only at the smallest allowed grid
    assert long_clips == "crop" or fit.keep_t == 0
    smaller = [s for s in range(fit.scale + 1, max(h, w) + 1)
               if h % (2 * s) == 0 and w % (2 * s) == 0 and min(h, w) // (2 * s) >= min_side]
    assert not smaller


def test_long_clips_are_cropped_or_dropped_and_counted(stats_dir):
  # Records 1 and 3 have 10 frames of 4 tokens = 40 > budget 16; min_patch_side 2 forbids downscale.
  sizes = [(2, 4, 4), (10, 4, 4), (1, 4, 4), (10, 4, 4), (3, 4, 4)]
  records = LatentRecords(sizes)
  totals = {}
  for mode in pipeline.LONG_CLIPS:
    cfg = make_config(stats_dir, long_clips=mode, token_budget=16, min_patch_side=2)
    batches = list(pipeline.make_iterator(cfg, split="validation", source=records, tokenize=tokenize))
    valid = np.concatenate([b["seg_valid"].ravel() for b in batches]) > 0
    index = np.concatenate([b["seg_index"].ravel() for b in batches])[valid]
    cropped = np.concatenate([b["seg_cropped"].ravel() for b in batches])[valid]
    totals[mode] = (sorted(index.tolist()), dict(zip(index.tolist(), cropped.tolist())),
                    sum(int(b["seg_dropped"].sum()) for b in batches))
    if mode == "crop":
      for b in batches:
        for row_b, row in enumerate(unpack(b)):
          for k, z in enumerate(row):
            i = int(b["seg_index"][row_b, k])
            full = expected_latents(make_config(stats_dir), records[i], i)
            np.testing.assert_array_equal(z, full[:z.shape[0]])  # a crop keeps the first frames
  assert totals["crop"] == ([0, 1, 2, 3, 4], {0: 0, 1: 6, 2: 0, 3: 6, 4: 0}, 0)
  assert totals["drop"][0] == [0, 2, 4] and totals["drop"][2] == 2


def test_oversized_sample_is_downscaled_keeping_aspect(stats_dir):
  # 1 x 16 x 8 latents = 32 tokens > budget 10: pooled by 2 -> 1 x 8 x 4 = 8 tokens (2:1 kept).
  cfg = make_config(stats_dir, token_budget=10)
  batch = next(pipeline.make_iterator(cfg, split="validation", source=LatentRecords([(1, 16, 8)]),
                                      tokenize=tokenize))
  assert batch["seg_grid"][0, 0].tolist() == [1, 4, 2] and batch["seg_scale"][0, 0] == 2


def test_processes_see_disjoint_shards_covering_each_epoch(stats_dir):
  records = LatentRecords([(1, 2, 2)] * 40)
  cfg = make_config(stats_dir)
  per_process = []
  for pi in range(2):
    it = pipeline.make_iterator(cfg, source=records, tokenize=tokenize, process_index=pi,
                                process_count=2, num_epochs=1)
    idx = [int(i) for b in it for i, v in zip(b["seg_index"].ravel(), b["seg_valid"].ravel()) if v]
    assert len(idx) == 20
    per_process.append(set(idx))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(range(40))


def test_epochs_reshuffle_and_resample_noise(stats_dir):
  records = LatentRecords([(1, 2, 2)] * 6)
  cfg = make_config(stats_dir, sample_latents=True, max_segments=6, seq_len=6, batch_size=1,
                    packing_bins=1)
  it = pipeline.make_iterator(cfg, source=records, tokenize=tokenize)
  first, second = next(it), next(it)  # each row is exactly one epoch of six one-token samples
  assert sorted(first["seg_index"][0]) == sorted(second["seg_index"][0]) == list(range(6))
  assert first["seg_index"][0].tolist() != second["seg_index"][0].tolist()
  tok = lambda b, i: b["tokens"][0][b["segment_ids"][0] == 1 + b["seg_index"][0].tolist().index(i)]
  assert not np.array_equal(tok(first, 0), tok(second, 0))  # z = mean + std * eps, fresh eps per epoch


def test_to_global_shards_batch_over_data_axes(stats_dir):
  import jax
  from sora_jax import sharding
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  cfg = make_config(stats_dir, batch_size=8)
  batch = next(pipeline.make_iterator(cfg, source=LatentRecords([(2, 4, 4)] * 30), tokenize=tokenize))
  out = pipeline.to_global(batch, mesh)
  assert out["tokens"].shape == (8, 64, 16)
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")
  assert sorted(s.index[0].start for s in out["segment_ids"].addressable_shards) == list(range(8))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])


def resume_matches(cfg, records, k=3, n=4):
  it = pipeline.make_iterator(cfg, source=records, tokenize=tokenize)
  for _ in range(k):
    next(it)
  state = json.dumps(it.get_state())  # as orbax's grain checkpoint handler stores it
  expected = [next(it) for _ in range(n)]
  resumed = pipeline.make_iterator(cfg, source=records, tokenize=tokenize)
  resumed.set_state(json.loads(state))
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_is_exact_in_process(stats_dir):
  sizes = [(1 + i % 5, 2 * (1 + i % 3), 2 * (1 + i % 4)) for i in range(23)]
  cfg = make_config(stats_dir, sample_latents=True, long_clips="drop", token_budget=24,
                    min_patch_side=2)
  resume_matches(cfg, LatentRecords(sizes))


def test_resume_is_exact_with_two_workers(stats_dir):
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; entry points parse them
    flags.FLAGS.mark_as_parsed()
  sizes = [(1 + i % 5, 2 * (1 + i % 3), 2 * (1 + i % 4)) for i in range(23)]
  cfg = make_config(stats_dir, sample_latents=True, num_workers=2)
  resume_matches(cfg, LatentRecords(sizes))


def test_unknown_options_raise_one_line_errors(stats_dir):
  with pytest.raises(ValueError, match="long_clips 'trim' is unknown"):
    pipeline.make_spec(make_config(stats_dir, long_clips="trim"))
  with pytest.raises(ValueError, match="token_budget 100 exceeds seq_len 64"):
    pipeline.make_spec(make_config(stats_dir, token_budget=100))


def test_stand_in_latents_are_causal_average_pools():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (9, 16, 24, 3), dtype=np.uint8)
  z = pipeline.stand_in_latents(video, (4, 8, 8))
  assert z.shape == (3, 2, 3, 3)
  later = video.copy()
  later[1:] = 0
  np.testing.assert_array_equal(pipeline.stand_in_latents(later)[0], z[0])  # frame 0 stands alone
  np.testing.assert_allclose(z[1, 0, 0], (video[1:5, :8, :8] / 127.5 - 1).mean((0, 1, 2)), rtol=1e-5)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  from sora_jax.data import shapes_dataset
  path = tmp_path_factory.mktemp("shapes")
  shapes_dataset.build_shapes(path, "validation", 6)
  return path


def test_shapes_source_end_to_end(shapes_dir):
  from sora_jax.data import shapes
  tmp_path = shapes_dir
  cfg = make_config(tmp_path, source="shapes", videos_dir=str(tmp_path), seq_len=256, text_len=160,
                    max_text_tokens=80, max_segments=6)
  batches = list(pipeline.make_iterator(cfg, split="validation", tokenize=tokenize))
  src = sources.video_source(tmp_path, "validation")
  assert dit.resolve_in_dim(cfg.dit, lambda: len(pipeline.latent_stats(cfg)[0])) == 12  # 3 channels x 1x2x2
  seen = 0
  for batch in batches:
    check_batch_consistency(batch, cfg)
    for b, row in enumerate(unpack(batch)):
      for k, z in enumerate(row):
        i = int(batch["seg_index"][b, k])
        spec = shapes.sample_spec("validation", i)
        assert batch["seg_is_image"][b, k] == (spec.num_frames == 1)
        assert batch["seg_fps"][b, k] == spec.fps
        full = pipeline.stand_in_latents(src[i]["video"])
        np.testing.assert_array_equal(z, pipeline.pool_space(full[:z.shape[0]], batch["seg_scale"][b, k]))
        seen += 1
  assert seen == 6


def test_inspect_cli_prints_stats_and_dumps_batches(shapes_dir, tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  from sora_jax.data import shapes, tokenizer
  tokenizer.train_tokenizer([shapes.caption(shapes.sample_spec("validation", i)) for i in range(50)],
                            tmp_path / "tok.model", 64)
  repo = Path(__file__).resolve().parents[1]
  dump = tmp_path / "b.npz"
  out = subprocess.run(
      [sys.executable, "-m", "sora_jax.data.inspect", "--config", "experiments/shapes_demo.py",
       "--config.data.source=shapes", f"--config.data.videos_dir={shapes_dir}",
       f"--config.data.tokenizer={tmp_path / 'tok.model'}", "--config.data.seq_len=256", "--config.data.token_budget=0",
       "--config.data.batch_size=2", "--split=validation", "--num_batches=5", f"--dump={dump}"],
      cwd=repo, capture_output=True, text=True, timeout=120, check=True)
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  d = np.load(dump)
  assert d["tokens"].shape[1:] == (256, 12) and d["tokens"].shape[0] == 2 * stats["batches"]
  assert stats["samples_per_batch"] * stats["batches"] == d["seg_valid"].sum() == 6
  np.testing.assert_allclose(stats["padding_fraction"], (d["segment_ids"] == 0).mean())
  assert stats["dropped"] == 0 and stats["cropped"] == ((d["seg_cropped"] > 0) & (d["seg_valid"] > 0)).sum()
  assert stats["frames_cut"] == d["seg_cropped"].sum()


_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
sys.path.insert(0, sys.argv[3])
from tests.test_pipeline import LatentRecords, make_config, tokenize
from sora_jax import sharding
from sora_jax.data import pipeline
cfg = make_config(sys.argv[4], batch_size=4)
it = pipeline.make_iterator(cfg, source=LatentRecords([(1 + i % 3, 4, 4) for i in range(400)]),
                            tokenize=tokenize)
local = next(it)
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
glob = pipeline.to_global(local, mesh)
rows = [s.index[0].start for s in glob["seg_index"].addressable_shards]
mine = np.concatenate([np.asarray(s.data) for s in sorted(glob["seg_index"].addressable_shards,
                                                          key=lambda s: s.index[0].start)])
print(json.dumps(dict(shape=list(glob["tokens"].shape), local_rows=local["tokens"].shape[0],
                      rows=sorted(rows), same=bool((mine == local["seg_index"]).all()),
                      index=sorted(int(i) for i, v in zip(local["seg_index"].ravel(),
                                                          local["seg_valid"].ravel()) if v))))
"""


@pytest.mark.slow
def test_two_processes_build_one_global_batch(stats_dir, tmp_path):
  import socket
  import subprocess
  import sys
  from pathlib import Path
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "two_process.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  repo = str(Path(__file__).resolve().parents[1])
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), f"localhost:{port}", str(i), repo,
                             str(stats_dir)], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
  for r in res:
    assert r["shape"] == [4, 64, 16] and r["local_rows"] == 2 and r["same"]
  # Process i's two rows are global rows 2i and 2i + 1 (one per device), and the two processes read
  # different samples (first batches come from the first epoch of 200 records per process).
  assert sorted(tuple(r["rows"]) for r in res) == [(0, 1), (2, 3)]
  assert not set(res[0]["index"]) & set(res[1]["index"])
