"""Trains the caption tokenizer (sentencepiece) on the captions of a video data set.

    python data_pipelines/train_tokenizer.py --data_dir D --out tokenizer.model --vocab_size 128

D is a data dir written by build_shapes.py or ingest_videos.py; by default only the train split's
captions are used (the test split holds the held-out compositions). `--vocab_size` is an upper bound.
Id policy and encoding rules: sora_jax/data/tokenizer.py.
"""
from __future__ import annotations

import time

from absl import flags, logging

from sora_jax import config as config_lib
from sora_jax.data import sources, tokenizer

_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir holding the data set", required=True)
_OUT = flags.DEFINE_string("out", None, "where to write the .model file", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 128, "upper bound on the vocabulary size",
                              lower_bound=8)  # 4 special ids plus pieces
_SPLITS = flags.DEFINE_list("splits", ["train"], "splits whose captions to train on")
_NAME = flags.DEFINE_string("name", None, "data set name, when D holds several")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # tfds logs every step of a build at INFO
  start = time.time()
  captions = []
  try:
    for split in _SPLITS.value:
      src = sources.RecordSource(_DATA_DIR.value, split, name=_NAME.value, keys=("caption",))
      captions += [rec["caption"] for rec in src]
    tok = tokenizer.train_tokenizer(captions, _OUT.value, _VOCAB.value)
  except (FileNotFoundError, ValueError) as e:
    config_lib._fail(str(e).splitlines()[0])  # pylint: disable=protected-access
  print(f"train_tokenizer: {len(captions)} captions -> {_OUT.value} with {tok.vocab_size} pieces "
        f"(asked for at most {_VOCAB.value}) in {time.time() - start:.1f}s")


if __name__ == "__main__":
  config_lib.run(main, config=False)
