"""Attention kernels behind `sora_jax.models.attention.segment_attention`.

blocksparse.py: plain JAX, any backend (the CPU path); splash.py: TPU Pallas; gpu.py: GPU Pallas (Triton).
"""
