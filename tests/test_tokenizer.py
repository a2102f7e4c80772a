"""The caption tokenizer: id policy, exact round trips on Shapes captions, truncation, training CLI."""
import pickle
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.data import shapes, shapes_dataset, tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _captions(split, n):
  return [shapes.caption(shapes.sample_spec(split, i)) for i in range(n)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_tokenizer(_captions("train", 300), None, vocab_size=128)


def test_shapes_captions_round_trip_with_one_piece_per_word(tok):
  for text in _captions("test", 200):  # test captions include the held-out compositions
    ids = tok.encode(text, 64)
    assert ids.dtype == np.int32
    assert ids[-1] == tokenizer.EOS_ID
    assert tokenizer.PAD_ID not in ids and tokenizer.UNK_ID not in ids and tokenizer.BOS_ID not in ids
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.replace(",", " ,").split()) + 3  # about one piece per word
    assert len(ids) <= 32


def test_truncation_keeps_eos_and_padding_is_exact(tok):
  text = _captions("train", 1)[0]
  full = tok.encode(text, 64)
  cut = tok.encode(text, 4)
  np.testing.assert_array_equal(cut, np.r_[full[:3], tokenizer.EOS_ID])
  padded = tok.encode(text, 40, pad=True)
  assert padded.shape == (40,)
  np.testing.assert_array_equal(padded[:len(full)], full)
  assert (padded[len(full):] == tokenizer.PAD_ID).all()
  with pytest.raises(ValueError, match="max_len 0"):
    tok.encode(text, 0)


def test_training_is_deterministic_and_the_model_pickles(tok, tmp_path):
  again = tokenizer.train_tokenizer(_captions("train", 300), tmp_path / "t.model", vocab_size=128)
  assert again.serialized() == tok.serialized()
  loaded = tokenizer.Tokenizer(tmp_path / "t.model")
  clone = pickle.loads(pickle.dumps(loaded))
  text = _captions("validation", 1)[0]
  np.testing.assert_array_equal(clone.encode(text, 32), tok.encode(text, 32))


def test_vocab_size_is_an_upper_bound_and_bad_inputs_fail_clearly(tmp_path):
  small = tokenizer.train_tokenizer(["a red circle", "a blue square"], None, vocab_size=1000)
  assert small.vocab_size < 1000
  with pytest.raises(ValueError, match="no non-empty captions"):
    tokenizer.train_tokenizer(["", "  "], None, vocab_size=64)
  with pytest.raises(FileNotFoundError, match="train_tokenizer"):
    tokenizer.Tokenizer(tmp_path / "missing.model")


def test_command_line_trains_on_a_built_data_set(tmp_path):
  shapes_dataset.build_shapes(tmp_path / "d", "train", 16)
  out = tmp_path / "tok.model"
  subprocess.run([sys.executable, str(ROOT / "data_pipelines" / "train_tokenizer.py"),
                  f"--data_dir={tmp_path / 'd'}", f"--out={out}", "--vocab_size=128"],
                 check=True, capture_output=True)
  tok = tokenizer.Tokenizer(out)
  text = shapes.caption(shapes.sample_spec("train", 0))
  assert tok.decode(tok.encode(text, 64)) == text
