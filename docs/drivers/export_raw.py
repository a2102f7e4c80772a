"""Exports a run with its DiT's raw parameters instead of the EMA (the VAE keeps its EMA).

    PYTHONPATH=. .venv/bin/python docs/drivers/export_raw.py runs/demo B_raw
then `python -m sora_jax.evaluate --bundle B_raw --out_dir E --num_prompts 32 --vae_clips 2`
(docs/history.md, Issue 7: "raw weights instead of the EMA").
"""
import sys

from sora_jax import bundle, export

_ema = bundle.restore_ema


def _raw(run_dir):
  if "dit" not in str(run_dir):
    return _ema(run_dir)
  state_dir, step = bundle.latest_checkpoint(run_dir)
  return bundle._restore_tree(state_dir, "params"), step, "params"  # pylint: disable=protected-access


bundle.restore_ema = _raw
export.export(sys.argv[1], sys.argv[2])
