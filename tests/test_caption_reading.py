"""evaluate.caption_reading (and its command, bench.caption_reading): the swaps, the paired interval, and a
model that reads only one kind of word."""
import numpy as np

from sora_jax import evaluate
from sora_jax.bench import caption_reading
from sora_jax.data import shapes
from test_evaluate import _LatentPipe

WORDS = sorted({w for table in evaluate.CAPTION_SWAPS.values() for w in table} | {
    "a", "moving", "on", "black", "gray", "background", "still", "bouncing", "and"})


class _WordPipe(_LatentPipe):
  """Captions as word ids (words outside WORDS read as 0), so a model can key on one word."""

  def text(self, caption):
    return np.array([WORDS.index(w) + 1 if w in WORDS else 0 for w in caption.split()], np.int32)


def test_swaps_change_only_their_kind():
  cap = "a green circle moving left on a black background"
  assert evaluate.swap_words(cap, "direction") == "a green circle moving right on a black background"
  assert evaluate.swap_words(cap, "colour") == "a yellow circle moving left on a black background"
  assert evaluate.swap_words(cap, "shape") == "a green square moving left on a black background"
  for table in evaluate.CAPTION_SWAPS.values():
    assert all(a != b and b in table for a, b in table.items())  # a word of the same kind, never itself


def test_paired_increase_and_its_interval():
  rng = np.random.default_rng(0)
  true = rng.uniform(0.5, 1.5, 200)
  same = evaluate.paired_increase(true, true)
  assert same == {"increase": 0.0, "ci95": [0.0, 0.0], "n": 200}
  worse = evaluate.paired_increase(true, 1.3 * true + 0.01 * rng.standard_normal(200))
  assert abs(worse["increase"] - 0.3) < 0.01 and worse["ci95"][0] > 0.28 and worse["ci95"][1] < 0.32


def test_a_model_that_reads_only_the_direction_word():
  left, up = WORDS.index("left") + 1, WORDS.index("up") + 1

  def model(x_t, pos, seg, t, text, text_seg, **kw):
    # x0 estimate: a constant set by how many "left"/"up" words the row's captions hold; colour and shape
    # words change nothing. (Flow: x0_hat = x_t - t v.)
    count = ((text == left) | (text == up)).sum(axis=1)[:, None, None].astype(np.float32)
    return (x_t - 0.1 * count) / t[0, 0]

  specs = evaluate.straight_specs("demo", 12, 8)
  specs = [s for s in specs if (s.num_frames - 1) % 8 == 0]
  got = evaluate.caption_reading(_WordPipe(model), specs, times=(0.7,))
  for kind in ("colour", "shape"):
    assert got[kind]["0.7"]["increase"] == 0.0 and got[kind]["0.7"]["error"] == got["true"]["0.7"]
  assert abs(got["direction"]["0.7"]["increase"]) > 1e-3
  assert got["direction"]["0.7"]["n"] >= 3  # the clips with object tokens, paired
  assert all(shapes.caption(s).split()[3] == "moving" for s in specs)
  table = caption_reading.format_table(got)
  assert table.splitlines()[3].startswith("| direction | ") and "| colour | +0.0% [+0.0%, +0.0%] |" in table
