"""Packing: every capacity of a row (video tokens, text tokens, segment slots) holds, nothing is split
or lost, the Shapes mixture packs tightly, and the benchmark's baselines count what they claim."""
import ml_collections
import numpy as np
from hypothesis import given, settings, strategies as st

from sora_jax.bench import packing as bench
from sora_jax.data import pipeline


class Records:
  """Record i: zero latents [t, 2, 2, 1] of sizes[i] frames (one token each) and a caption whose
  length in ids is text_lens[i]."""

  def __init__(self, sizes, text_lens):
    self.sizes, self.text_lens = sizes, text_lens

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    z = np.zeros((self.sizes[i], 2, 2, 1), np.float32)
    return dict(latent_mean=z, latent_std=z, caption=str(self.text_lens[i]), fps=8.0)


def text_ids(caption: str) -> np.ndarray:
  return np.arange(1, int(caption) + 1, dtype=np.int32)


def config(**data):
  d = dict(source="latents", seq_len=32, text_len=12, max_text_tokens=12,
           max_segments=5, batch_size=2, long_clips="crop", num_workers=0, shuffle_seed=0,
           token_budget=0, min_patch_side=1, sample_latents=False, stand_in_factors=(4, 8, 8),
           packer="best_fit", packing_bins=3)
  d.update(data)
  return ml_collections.ConfigDict(dict(data=d, dit=dict(patch=(1, 2, 2))))


STATS = (np.zeros(1, np.float32), np.ones(1, np.float32))


@settings(max_examples=25, deadline=None)
@given(items=st.lists(st.tuples(st.integers(1, 32), st.integers(1, 12)), min_size=1, max_size=30),
       packer=st.sampled_from(pipeline.PACKERS), bins=st.integers(1, 4))
def test_rows_respect_every_capacity_and_lose_nothing(items, packer, bins):
  sizes, text_lens = [s for s, _ in items], [t for _, t in items]
  cfg = config(packer=packer, packing_bins=bins)
  it = pipeline.make_iterator(cfg, split="validation", source=Records(sizes, text_lens),
                              tokenize=text_ids, stats=STATS)
  seen = []
  for batch in it:
    for b in range(batch["segment_ids"].shape[0]):
      num = int(batch["seg_valid"][b].sum())
      assert num <= cfg.data.max_segments
      for k in range(num):
        i = int(batch["seg_index"][b, k])
        assert (batch["segment_ids"][b] == k + 1).sum() == sizes[i]  # whole: never split across rows
        assert (batch["text_segment_ids"][b] == k + 1).sum() == text_lens[i]
        seen.append(i)
  assert sorted(seen) == list(range(len(items)))


def test_shapes_mixture_packs_tightly():
  # Sizes and caption lengths of the demo mixture; the packed stream must stay near NaViT's 2%.
  grids, captions = bench.mixture("demo", 400)
  sizes = [t * (h // 2) * (w // 2) for t, h, w in grids]
  records = Records([s for s in sizes], [min(len(c.split()) + 1, 24) for c in captions])
  cfg = config(seq_len=1024, text_len=384, max_text_tokens=24, max_segments=48, batch_size=4,
               packing_bins=64)
  it = pipeline.make_iterator(cfg, source=records, tokenize=text_ids, stats=STATS)
  used = cap = samples = 0
  while samples < len(sizes):
    batch = next(it)
    used += int((batch["segment_ids"] > 0).sum())
    cap += batch["segment_ids"].size
    samples += int(batch["seg_valid"].sum())
  assert 1 - used / cap < 0.02


def test_baselines_count_padding_and_drops():
  # Pad-to-longest over [2, 6 | 4, 4] (b = round(8 / 4) = 2): useful (8 + 8) / (12 + 8).
  r = bench.pad_to_longest(8, [2, 6, 4, 4])
  assert r["useful"] == 16 / 20 and r["dropped"] == 0
  # Buckets at L = 8: size 2 -> batches of 4 (5 samples: 1 full batch, 1 dropped); size 8 -> 1 each.
  r = bench.size_buckets(8, [2, 2, 2, 2, 2, 8, 8])
  assert r["dropped"] == 1 and r["useful"] == 1.0 and r["samples_per_ktok"] == 1000 * 6 / 24


def test_chips_fed_arithmetic():
  r = bench.chips_fed(1e5, params=1e9, width=2048, depth=20, context=16384)
  flops = 6e9 + 12 * 20 * 2048 * 16384
  assert r["flops_per_token"] == flops
  np.testing.assert_allclose(r["chips_per_core"], 1e5 / (0.4 * 459e12 / flops))
