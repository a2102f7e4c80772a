"""Attention kernels behind `sora_jax.models.attention.segment_attention`.

blocksparse.py: plain JAX, any backend (the CPU path); splash.py: TPU Pallas; gpu.py: GPU Pallas (Triton).
"""

# checkpoint_name of the attention kernels' forward residuals (output and logsumexp): remat policies that
# save it (models/layers.py) keep the backward pass from running the forward kernel again.
RESIDUAL_NAME = "attention_kernel_residuals"
