"""flops.py: the hand count equals the traced matmuls exactly, and XLA's cost model within 5%."""
import types

import jax
import ml_collections
import numpy as np
import pytest

from sora_jax import diffusion, flops, sharding, train
import train_fixtures as tf


def _demo_config(**overrides):
  import importlib.util
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("shapes_demo", os.path.join(root, "experiments/shapes_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config().copy_and_resolve_references()
  cfg.dit.in_dim = 16  # 2x2 patches of 4 latent channels
  # The hand count is of dense attention; kernels' while loops are counted once by cost_analysis().
  cfg.dit.attention = "reference"
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def _step_inputs(cfg):
  mesh = sharding.mesh_from_config({"data": 1}, jax.devices()[:1])
  setup = train.make_setup(cfg, mesh)
  batch = tf.synthetic_batch(0, cfg)
  return mesh, setup, batch


def _hand(cfg, setup):
  d = cfg.data
  return flops.dit_train_step_flops(cfg, batch=d.batch_size, seq_len=d.seq_len, text_len=d.text_len,
                                    num_segments=d.max_segments, num_params=setup.num_params)


def _traced_matmul_flops(fn, *args) -> float:
  """2 * output elements * contracted size of every dot_general in the step's jaxpr (scan bodies once)."""
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        k = int(np.prod([eqn.invars[0].aval.shape[i] for i in lc]))
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return float(total)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_matmul_count_equals_traced_matmuls(monkeypatch, remat):
  """With the elementwise terms off, `once` is the matmuls the traced step contains: exactly without
  remat; within 1% with full remat, whose traced recomputation also holds forward matmuls that nothing
  in the backward pass reads (XLA removes them; the hand count leaves them out)."""
  for name in ("SOFTMAX_FWD", "SOFTMAX_BWD", "BLOCK_ELEMWISE_FWD", "BLOCK_ELEMWISE_BWD",
               "OPTIMIZER_PER_PARAM"):
    monkeypatch.setattr(flops, name, 0.0)
  cfg = _demo_config(**{"data.seq_len": 128, "data.text_len": 32, "data.max_segments": 8,
                        "data.batch_size": 2, "dit.remat": remat, "train.total_steps": 10})
  mesh, setup, batch = _step_inputs(cfg)
  traced = _traced_matmul_flops(train.make_train_step(cfg, setup, diffusion.loss_fn), setup.abstract_state,
                                batch)
  np.testing.assert_allclose(_hand(cfg, setup).once, traced, rtol=1e-3 if remat == "none" else 1e-2)


def _unrolled_ratio(cfg):
  mesh, setup, batch = _step_inputs(cfg)
  with flops.unrolled_scans():
    compiled = train.compile_step(train.make_train_step(cfg, setup, diffusion.loss_fn), setup, batch, mesh)
  return flops.compare_with_compiled(_hand(cfg, setup), train.compiled_flops(compiled), 1, scanned=False)


def test_within_5_percent_of_cost_analysis_short_rows():
  """The demo DiT on rows of 256 tokens, 2 layers (compiles unrolled in seconds)."""
  cfg = _demo_config(**{"data.seq_len": 256, "data.text_len": 64, "data.batch_size": 2, "dit.depth": 2,
                        "train.total_steps": 10})
  assert abs(_unrolled_ratio(cfg) - 1) < 0.05


@pytest.mark.slow
def test_within_5_percent_of_cost_analysis_demo_config():
  """experiments/shapes_demo.py's DiT and rows exactly (4 x 1024 tokens, 6 layers), unrolled."""
  assert abs(_unrolled_ratio(_demo_config(**{"train.total_steps": 10})) - 1) < 0.05


def test_peaks():
  dev = lambda kind: types.SimpleNamespace(device_kind=kind, platform="tpu")
  assert flops.published_peak(dev("TPU v5 lite")) == 197e12
  assert flops.published_peak(dev("TPU v5")) == 459e12
  assert flops.published_peak(dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert flops.published_peak(dev("TPU v99")) is None
  peak, source = flops.peak_flops(jax.devices()[:8], "float32")
  assert 1e9 < peak < 1e13 and "measured" in source


def test_useful_attention_pairs():
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  tseg = np.array([[1, 2, 2, 0], [1, 1, 1, 0]])
  pairs = flops.useful_attention_pairs({"segment_ids": seg, "text_segment_ids": tseg})
  assert pairs == {"self": 9 + 4 + 36, "cross": 3 * 1 + 2 * 2 + 6 * 3, "text": 1 + 4 + 9}
  cfg = _demo_config()
  dense = {"self": 2 * 6 * 6, "cross": 2 * 6 * 5, "text": 2 * 4 * 4}
  assert flops.attention_model_flops(cfg, pairs) < flops.attention_model_flops(cfg, dense)

  # Factorised self-attention (dit.attention_axes): segment 1 is 2 frames of 1x2, segment 2 one frame of 1x2.
  pos = np.array([[[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 1]]])
  one = {"segment_ids": np.array([[1, 1, 1, 1, 2, 2]]), "text_segment_ids": np.array([[1, 2]]), "positions": pos}
  frames, places = 2 * 2 * 2 + 2 * 2, 2 * 2 * 2 + 1 + 1  # groups of a frame; groups of a place
  for axes, depth, want in [(("full",), 4, 16 + 4), (("space",), 4, frames), (("space", "time"), 4,
                            (frames + places) / 2), (("full", "time", "time"), 3, (20 + 2 * places) / 3)]:
    d = ml_collections.ConfigDict(dict(attention_axes=axes, depth=depth))
    assert flops.useful_attention_pairs(one, d)["self"] == want, axes


def test_lora_matmul_count_equals_traced_matmuls(monkeypatch):
  """Under LoRA the hand count keeps only the matmuls autodiff emits: no weight gradients of the frozen
  base, no gradients into the time and text paths, the adapters' matmuls with theirs (exact, no remat)."""
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  for name in ("SOFTMAX_FWD", "SOFTMAX_BWD", "BLOCK_ELEMWISE_FWD", "BLOCK_ELEMWISE_BWD",
               "OPTIMIZER_PER_PARAM"):
    monkeypatch.setattr(flops, name, 0.0)
  cfg = _demo_config(**{"data.seq_len": 128, "data.text_len": 32, "data.max_segments": 8,
                        "data.batch_size": 2, "train.total_steps": 10})
  cfg.dit.update(dict(text_encoder="umt5", text_dim=24))
  cfg.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0, targets=lora.DEFAULT_TARGETS))
  mesh, setup, batch = _step_inputs(cfg)
  batch["text_tokens"] = np.zeros(batch["text_tokens"].shape + (24,), np.float32)
  traced = _traced_matmul_flops(train.make_train_step(cfg, setup, diffusion.loss_fn), setup.abstract_state,
                                batch)
  hand = _hand(cfg, setup)
  np.testing.assert_allclose(hand.once, traced, rtol=1e-3)
  cfg.lora.rank = 0
  assert hand.model < 0.75 * _hand(cfg, setup).model  # about 2/3 of full training's work


def test_unrolled_scans_keep_remat_recomputation_apart():
  """Inside flops.unrolled_scans, scan_layers' remat prevents CSE (its recomputation stays in the program);
  outside, and after the context ends, it does not (the scanned step needs no barriers)."""
  from flax import nnx
  from sora_jax.models import layers

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(4, 4, rngs=nnx.Rngs(key))
  graph, params = nnx.split(make(jax.random.split(jax.random.key(0), 2)))

  def prevent_cse():
    def f(params, x):
      h = layers.scan_layers(nnx.merge(graph, params), x, lambda blk, h: jax.numpy.tanh(blk(h)), "full")
      return h.sum()
    eqns = str(jax.make_jaxpr(jax.grad(f))(params, jax.numpy.ones((3, 4))))
    return {flag for flag in (True, False) if f"prevent_cse={flag}" in eqns}

  assert prevent_cse() == {False}
  with flops.unrolled_scans():
    assert prevent_cse() == {True}
  assert prevent_cse() == {False}
