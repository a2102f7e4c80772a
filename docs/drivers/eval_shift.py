"""`python -m sora_jax.evaluate` with the sampler's time-shift scale multiplied by $SHIFT_FACTOR
(training unchanged).

    SHIFT_FACTOR=3 PYTHONPATH=. .venv/bin/python docs/drivers/eval_shift.py --bundle B --out_dir E \
        --num_prompts 32 --vae_clips 2
(docs/history.md, Issue 7: "sampled with 3x the time shift").
"""
import os

from absl import app
import ml_collections

from sora_jax import evaluate, sampling

_shift = sampling._diffusion_shift  # pylint: disable=protected-access


def _scaled(u, n, cfg):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.diffusion.shift_scale = float(c.diffusion.shift_scale) * float(os.environ["SHIFT_FACTOR"])
  return _shift(u, n, c)


sampling._diffusion_shift = _scaled  # pylint: disable=protected-access
evaluate.define_flags()
app.run(evaluate.main)
