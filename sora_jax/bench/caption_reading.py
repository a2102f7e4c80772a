"""Which words of the caption the DiT reads: its object-token error with one word of the caption swapped.

    python -m sora_jax.bench.caption_reading --bundle runs/demo/bundle [--mixture demo] [--num_clips 64]
        [--times 0.5,0.7,0.9] [--out F.json]

`evaluate.caption_reading` on the first `num_clips` one-object straight-motion test clips of a Shapes mixture
(evaluate.straight_specs), for every kind of word it swaps: the motion's direction (left <-> right, up <->
down), the colour, the shape. The evaluator reports the direction and the colour at its two times; this
command adds the shape and other times. A row's increase is mean(error, swapped) / mean(error, true) - 1 with
a 95% paired bootstrap interval over clips; one within its interval of 0 says the word is ignored: then the
binary motion score can only be chance, whatever the sampler does.
"""
from __future__ import annotations

import json

from absl import app, flags

from sora_jax import evaluate
from sora_jax.bench import motion_tracks

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("bundle", None, "inference bundle")
  flags.DEFINE_string("mixture", "demo", "Shapes mixture whose test split gives the clips")
  flags.DEFINE_integer("num_clips", 64, "one-object straight-motion test clips", lower_bound=2)
  flags.DEFINE_list("times", ["0.5", "0.7", "0.9"], "diffusion times")
  flags.DEFINE_integer("seed", 0, "noise and bootstrap seed")
  flags.DEFINE_string("out", "", "also write the results as JSON here")


def format_table(got: dict) -> str:
  times = list(got["true"])
  lines = ["| word swapped | " + " | ".join(f"t = {t}" for t in times) + " |", "|---|" + "---|" * len(times),
           "| none (the error) | " + " | ".join(f"{got['true'][t]:.4f}" for t in times) + " |"]
  for kind in got["settings"]["kinds"]:
    cells = [got[kind][t] for t in times]
    lines.append(f"| {kind} | " + " | ".join(
        f"{c['increase']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}]" for c in cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  pipe, specs = motion_tracks.straight_clips(FLAGS.bundle, FLAGS.mixture, FLAGS.num_clips)
  got = evaluate.caption_reading(pipe, specs, times=tuple(float(t) for t in FLAGS.times), seed=FLAGS.seed)
  print(format_table(got))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"bundle": FLAGS.bundle, "mixture": FLAGS.mixture, **got}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
