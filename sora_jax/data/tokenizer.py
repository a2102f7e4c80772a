"""Caption tokenizers: sentencepiece models, the project's own or a published T5 / UMT5 one.

Special ids are read from the model. The project's (train_tokenizer, fixed for every model it trains):
  pad = 0, unk = 1, bos = 2, eos = 3; pieces start at 4.
A published T5 / UMT5 `spiece.model` (Wan 2.1's tokenizer is google/umt5-xxl's):
  pad = 0, eos = 1, unk = 2, no bos.
`encode(text, max_len)` returns the caption's pieces followed by EOS, with no BOS (packed text rows
mark caption boundaries with segment ids, so BOS would carry nothing), as int32 of length
<= max_len. A caption too long is truncated to max_len - 1 pieces and still ends with EOS, so the
end of every caption is visible to the model. Encoding never yields the pad id; `pad=True` pads to
exactly max_len with it. With a T5 model this is what transformers' T5Tokenizer gives for
`(text, max_length=max_len, truncation=True, add_special_tokens=True, padding="max_length")`.

    tok = Tokenizer("tokenizer.model"); ids = tok.encode("a red circle ...", 24)
    train_tokenizer(captions, "tokenizer.model", vocab_size=128)   # data_pipelines/train_tokenizer.py
    wan = Tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer/spiece.model")
    ids = wan.encode(clean_wan_prompt(prompt), 512, pad=True)
"""
from __future__ import annotations

import html
import io
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

# The project's id policy (train_tokenizer); a loaded model's own ids are the Tokenizer's attributes.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A loaded sentencepiece model; picklable (for grain workers).

  `pad_id`, `unk_id`, `bos_id`, `eos_id` are the model's (-1 where it has none, as T5's bos).
  """

  def __init__(self, model: str | os.PathLike | bytes):
    if isinstance(model, (bytes, bytearray)):
      self._proto = bytes(model)
    else:
      path = Path(model)
      if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist; "
                                "make one with data_pipelines/train_tokenizer.py")
      self._proto = path.read_bytes()
    self._load()

  def _load(self):
    import sentencepiece as spm
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)
    sp = self._sp
    ids = sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(f"tokenizer special ids (pad, unk, bos, eos) = {ids}; encoding needs a pad and an eos "
                       f"id (>= 0): the project's are {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}, T5's (0, 2, -1, 1)")

  def __getstate__(self):
    return {"_proto": self._proto}

  def __setstate__(self, state):
    self._proto = state["_proto"]
    self._load()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, max_len: int, *, pad: bool = False) -> np.ndarray:
    """int32 [n <= max_len] (pieces + EOS, see the module docstring), or [max_len] with `pad`."""
    if max_len < 1:
      raise ValueError(f"max_len {max_len} must be >= 1")
    pieces = self._sp.encode(text, out_type=int)[:max_len - 1]
    ids = np.asarray(pieces + [self.eos_id], np.int32)
    if pad:
      ids = np.pad(ids, (0, max_len - len(ids)), constant_values=self.pad_id)
    return ids

  def unknown_words(self, text: str) -> list[str]:
    """The words of `text` the model does not know: the unknown piece, or spelled in pieces of mostly one
    character (under two on average), as a tokenizer trained on a small caption corpus breaks a word it
    never saw ("purple" -> p u r p le). A large vocabulary's subwords ("do de ca hedron") pass."""
    out = []
    for word in text.split():
      ids = self._sp.encode(word, out_type=int)
      pieces = [p for p in (self._sp.id_to_piece(i).replace("\u2581", "") for i in ids) if p]
      spelled = len(pieces) > 1 and sum(map(len, pieces)) < 2 * len(pieces)
      if self.unk_id in ids or (len(word) > 1 and spelled):
        out.append(word)
    return out

  def overflow(self, text: str, max_len: int) -> int:
    """How many of `text`'s pieces `encode(text, max_len)` cuts off."""
    return max(0, len(self._sp.encode(text, out_type=int)) - (max_len - 1))

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, ignoring pad, bos and eos."""
    keep = [int(i) for i in ids if int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
    return self._sp.decode(keep)


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


def clean_wan_prompt(text: str) -> str:
  """A prompt as diffusers' WanPipeline cleans it before tokenizing.

  ftfy.fix_text (mojibake and the like) only where ftfy is installed, since diffusers skips it
  otherwise and does not require it; then HTML entities unescaped twice (so "&amp;lt;" is "<"),
  the ends stripped, and every run of whitespace (Unicode's too) made one space.
  """
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError:
    ftfy = None
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip()
