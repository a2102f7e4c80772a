"""Renders one split of the Shapes data set (docs/data.md) into a tensorflow-datasets ArrayRecord data set.

    python data_pipelines/build_shapes.py --out_dir D --split train --num_examples 200 [--seed 0] \
        [--mixture demo]

writes D/shapes/<split>/1.0.0/ (read it with `sora_jax.data.sources.video_source(D, split)`). The output
is a pure function of (split, num_examples, seed, mixture): two builds are byte-identical. A split that
was already built with the same arguments is kept (pass --force to rebuild), so re-running is cheap.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from absl import flags, logging

from sora_jax import config as config_lib
from sora_jax.data import shapes, shapes_dataset

_OUT_DIR = flags.DEFINE_string("out_dir", None, "tfds data dir to write into", required=True)
_SPLIT = flags.DEFINE_enum("split", "train", list(shapes.SPLITS), "which split to render")
_NUM = flags.DEFINE_integer("num_examples", None, "how many examples", required=True, lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "data set seed", lower_bound=0)
_MIXTURE = flags.DEFINE_enum("mixture", "demo", list(shapes.MIXTURES), "size mixture")
_FORCE = flags.DEFINE_bool("force", False, "rebuild even if an identical build exists")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # tfds logs every step of a build at INFO
  params = dict(split=_SPLIT.value, num_examples=_NUM.value, seed=_SEED.value,
                mixture=_MIXTURE.value, version=shapes_dataset.sources.VERSION)
  stamp = Path(_OUT_DIR.value) / shapes_dataset.NAME / _SPLIT.value / "build_params.json"
  data_dir = stamp.parent / params["version"]
  if (not _FORCE.value and stamp.is_file() and (data_dir / "dataset_info.json").is_file()
      and json.loads(stamp.read_text()) == params):
    print(f"build_shapes: {data_dir} already holds this build ({params}); --force rebuilds it")
    return
  stamp.unlink(missing_ok=True)
  start = time.time()
  out = shapes_dataset.build_shapes(_OUT_DIR.value, _SPLIT.value, _NUM.value, _SEED.value,
                                    _MIXTURE.value)
  stamp.write_text(json.dumps(params, sort_keys=True) + "\n")
  print(f"build_shapes: wrote {_NUM.value} {_SPLIT.value} examples ({_MIXTURE.value} mixture, seed "
        f"{_SEED.value}) to {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
  config_lib.run(main, config=False)
