"""Benchmarks whose measured numbers go into docs/benchmarks.md, each runnable as `python -m sora_jax.bench.<name>`."""
