"""The caption tokenizer: a sentencepiece model trained on the data set's captions.

Id policy (fixed for every model this project trains):
  pad = 0, unk = 1, bos = 2, eos = 3; pieces start at 4.
  `encode(text, max_len)` returns the caption's pieces followed by EOS, with no BOS (packed text rows
  mark caption boundaries with segment ids, so BOS would carry nothing), as int32 of length
  <= max_len. A caption too long is truncated to max_len - 1 pieces and still ends with EOS, so the
  end of every caption is visible to the model. Encoding never yields the pad id; `pad=True` pads to
  exactly max_len with it.

    tok = Tokenizer("tokenizer.model"); ids = tok.encode("a red circle ...", 24)
    train_tokenizer(captions, "tokenizer.model", vocab_size=128)   # data_pipelines/train_tokenizer.py
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A loaded sentencepiece model with the id policy above; picklable (for grain workers)."""

  def __init__(self, model: str | os.PathLike | bytes):
    if isinstance(model, (bytes, bytearray)):
      self._proto = bytes(model)
    else:
      path = Path(model)
      if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist; "
                                "make one with data_pipelines/train_tokenizer.py")
      self._proto = path.read_bytes()
    self._sp = self._load(self._proto)
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f"tokenizer special ids (pad, unk, bos, eos) = {ids}; this project needs "
                       f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (train it with train_tokenizer)")

  @staticmethod
  def _load(proto: bytes):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp

  def __getstate__(self):
    return {"_proto": self._proto}

  def __setstate__(self, state):
    self._proto = state["_proto"]
    self._sp = self._load(self._proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def encode(self, text: str, max_len: int, *, pad: bool = False) -> np.ndarray:
    """int32 [n <= max_len] (pieces + EOS, see the module docstring), or [max_len] with `pad`."""
    if max_len < 1:
      raise ValueError(f"max_len {max_len} must be >= 1")
    pieces = self._sp.encode(text, out_type=int)[:max_len - 1]
    ids = np.asarray(pieces + [EOS_ID], np.int32)
    if pad:
      ids = np.pad(ids, (0, max_len - len(ids)), constant_values=PAD_ID)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, ignoring pad, bos and eos."""
    keep = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._sp.decode(keep)

  def serialized(self) -> bytes:
    return self._proto


def train_tokenizer(captions: Iterable[str], out: str | os.PathLike | None, vocab_size: int, *,
                    model_type: str = "bpe") -> Tokenizer:
  """Trains a sentencepiece model in-process on `captions`; writes it to `out` unless None.

  `vocab_size` is an upper bound: a corpus with fewer distinct pieces (the Shapes grammar has a few
  dozen words) gets a smaller vocabulary instead of an error. BPE is the default because on a small
  corpus it merges up to whole words (a Shapes caption is one piece per word, at most 30 ids with
  EOS, at vocab_size 128), where unigram stops early and spells words in fragments.
  """
  import sentencepiece as spm
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise ValueError("no non-empty captions to train the tokenizer on")
  if vocab_size < 8:
    raise ValueError(f"vocab_size {vocab_size} must be >= 8 (4 special ids plus pieces)")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
  proto = buf.getvalue()
  if out is not None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(proto)
    tmp.replace(out)
  return Tokenizer(proto)
