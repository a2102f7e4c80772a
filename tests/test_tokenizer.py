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
  assert pickle.dumps(again) == pickle.dumps(tok)  # the same model proto
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


# A published T5 / UMT5 spiece.model's id policy (Wan 2.1's tokenizer): pad 0, eos 1, unk 2, no bos.
T5_IDS = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
T5_SENTENCES = [
    "a red fox jumps over the lazy dog", "two cats sleep on a warm windowsill",
    "the camera pans slowly to the left", "a woman walks along the beach at sunset",
    "waves crash against the rocky shore", "a car drives through the rain",
    "children play football in a sunny park", "an old man reads a newspaper",
    "the city skyline glows at night", "a drone flies over snowy mountains",
    "close-up of a flower opening in time-lapse", "a chef chops onions quickly",
    "Ein Hund läuft über die grüne Wiese", "Le chat noir dort près de la fenêtre",
    "Une tasse de café fumant", "一只猫在桌子上跳舞", "夕阳下的海边", "El perro corre en la playa",
    "Köln, Zürich und Straße", "a robot dances in a neon-lit street",
    "slow motion of water drops falling", "a bird sings on a branch",
    "the train leaves the station at dawn", "a kite flies high above the field",
    "rain falls on the quiet lake",
]


def t5_sentencepiece(sentences=T5_SENTENCES, vocab_size=160) -> bytes:
  """A unigram sentencepiece model with T5's special ids, trained in-process (serialized proto)."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
      hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2, **T5_IDS)
  return buf.getvalue()


def test_a_t5_policy_model_uses_its_own_special_ids(tmp_path):
  (tmp_path / "spiece.model").write_bytes(t5_sentencepiece())
  tok = tokenizer.Tokenizer(tmp_path / "spiece.model")
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, -1)
  text = "a red fox jumps over the lazy dog"
  ids = tok.encode(text, 64)
  assert ids[-1] == 1 and 0 not in ids[:-1] and 1 not in ids[:-1]
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode(text, 3), np.r_[ids[:2], 1])
  padded = tok.encode(text, 40, pad=True)
  assert padded.shape == (40,) and (padded[len(ids):] == 0).all()
  np.testing.assert_array_equal(tok.encode("", 8, pad=True), [1, 0, 0, 0, 0, 0, 0, 0])
  clone = pickle.loads(pickle.dumps(tok))
  assert (clone.pad_id, clone.eos_id, clone.bos_id) == (0, 1, -1)
  np.testing.assert_array_equal(clone.encode(text, 64), ids)


def test_a_model_without_pad_or_eos_is_refused():
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(T5_SENTENCES), model_writer=buf, vocab_size=100,
                                 hard_vocab_limit=False, num_threads=1, minloglevel=2)  # pad_id defaults to -1
  with pytest.raises(ValueError, match=r"\(pad, unk, bos, eos\) = \(-1, 0, 1, 2\)"):
    tokenizer.Tokenizer(buf.getvalue())


@pytest.mark.parametrize("raw, clean", [
    ("  a red\tfox \n\n jumps  ", "a red fox jumps"),
    ("cats &amp; dogs &amp;lt;3", "cats & dogs <3"),        # unescaped twice, as diffusers does
    ("wide\u3000space\u00a0and\u2003more", "wide space and more"),  # Unicode whitespace is whitespace
    ("", ""),
    ("一只猫 在跳舞", "一只猫 在跳舞"),
])
def test_clean_wan_prompt(raw, clean):
  assert tokenizer.clean_wan_prompt(raw) == clean
