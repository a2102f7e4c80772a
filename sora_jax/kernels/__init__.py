"""Attention kernels behind `sora_jax.models.attention.segment_attention`.

blocksparse.py: plain JAX, any backend (the CPU path); splash.py: TPU Pallas; gpu.py: GPU Pallas (Triton).
"""

# checkpoint_name of the attention kernels' forward residuals (output and logsumexp): remat policies that
# save it (models/layers.py) keep the backward pass from running the forward kernel again. Self-attention
# and cross-attention name theirs apart, so a policy can keep the expensive ones (self-attention over the
# whole row) and recompute the cheap ones (cross-attention to a short caption) when memory is short.
RESIDUAL_NAME = "attention_kernel_residuals"
CROSS_RESIDUAL_NAME = "cross_attention_kernel_residuals"
