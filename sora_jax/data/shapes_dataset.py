"""The Shapes data set on disk: renders a split with `shapes.render_example` and writes it with
`sources.write_dataset` (data set name "shapes"); data_pipelines/build_shapes.py is its command line."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from sora_jax.data import shapes, sources

NAME = "shapes"


def shapes_examples(split: str, num_examples: int, seed: int = 0, mixture: str = "demo"
                    ) -> Iterator[dict]:
  """Records 0..num_examples-1 of a split, in order, as `sources.video_features()` dicts."""
  for i in range(num_examples):
    spec, frames = shapes.render_example(split, i, seed, mixture)
    yield {
        "video": frames,
        "caption": shapes.caption(spec),
        "num_frames": spec.num_frames,
        "height": spec.height,
        "width": spec.width,
        "fps": spec.fps,
        "labels": spec.to_json(),
        "source": f"shapes/{mixture}/seed{seed}/{split}/{i}",
    }


def build_shapes(out_dir: str | os.PathLike, split: str, num_examples: int, seed: int = 0,
                 mixture: str = "demo") -> Path:
  """Renders and writes one split; returns its data set directory. Rebuilding replaces it."""
  if num_examples < 1:
    raise ValueError(f"num_examples {num_examples} must be >= 1")
  shapes.sample_spec(split, 0, seed, mixture)  # validates split and mixture before touching disk
  return sources.write_dataset(
      out_dir, name=NAME, split=split, features=sources.video_features(),
      examples=shapes_examples(split, num_examples, seed, mixture),
      description=f"Shapes ({mixture} mixture, seed {seed}): rendered captioned clips, see docs/data.md")
