"""`python -m sora_jax.compile_check` with splash's chunked backward changed at run time:
- $BUDGET_MIB: the partial-dq budget (`splash.FUSED_BWD_MAX_BYTES`, default 4096);
- $BF16_SUM=1: dk, dv summed over query chunks in k's dtype (no f32 copies of k and v);
- $OFFLOAD=1: adds remat policy `full_offload_attention`, which offloads the attention kernels'
  residuals to pinned host memory and recomputes the rest.

    BUDGET_MIB=1024 PYTHONPATH=. .venv/bin/python docs/drivers/compile_check_splash.py \
        --config experiments/sora_xl.py:topology=v6e:16x16 --topology v6e:16x16 \
        --config.dit.remat=full_save_attention --memory_only
(docs/history.md, Issue 8: the v6e `full_save_attention` and offload checks).
"""
import dataclasses
import os
import types

import jax
import jax.numpy as jnp

from sora_jax import compile_check
from sora_jax import config as config_lib
from sora_jax.kernels import CROSS_RESIDUAL_NAME, RESIDUAL_NAME, splash
from sora_jax.models import layers

splash.FUSED_BWD_MAX_BYTES = int(os.environ.get("BUDGET_MIB", "4096")) << 20
if os.environ.get("BF16_SUM") == "1":  # splash.py's only float32 is the cast of k and v for the chunks
  splash.jnp = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if not k.startswith("__")})
  splash.jnp.float32 = jnp.bfloat16
if os.environ.get("OFFLOAD") == "1":  # counted as full_save_attention, its residuals offloaded instead
  layers.REMAT["full_offload_attention"] = dataclasses.replace(
      layers.REMAT["full_save_attention"],
      policy=jax.checkpoint_policies.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=[RESIDUAL_NAME, CROSS_RESIDUAL_NAME],
          offload_src="device", offload_dst="pinned_host"))

if __name__ == "__main__":
  config_lib.run(compile_check.main)
