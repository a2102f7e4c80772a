"""compile_check: the real train step compiled ahead of time for a TPU slice (needs libtpu, the `tpu`
extra), its memory report, the kernel FLOP accounting and the extrapolation over depth."""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs libtpu (pip install -e '.[tpu]')")

from sora_jax import compile_check, flops  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5p:2x2x1"  # 4 chips


def tiny_config(**dit):
  from experiments import sora_b
  c = sora_b.get_config("topology=v5p:2x2x1")
  c.data.update(dict(seq_len=256, text_len=32, max_segments=4, batch_size=4))
  c.data.vocab_size = 64
  c.dit.update(dict(width=128, depth=2, num_heads=1, ffn_dim=512, text_width=32, text_depth=2, text_heads=1,
                    attention="reference", remat="full"))
  c.dit.update(dit)
  return c


def test_memory_of_the_real_step_is_the_sharded_state_plus_batch():
  cfg = tiny_config()
  rep = compile_check.check(cfg, TOPOLOGY, skip_cost=True)
  assert rep["fits"] and rep["chips"] == 4 and rep["hbm_gb_per_chip"] == 95.0
  assert rep["peak_flops_per_chip"] == 459e12  # v5p, dense bf16
  # FSDP: each chip holds a quarter of params, EMA and Adam's two moments (16 bytes per parameter)
  # and of the global batch; a replicated state would be 4x this.
  batch_bytes = sum(math.prod(v.shape) * v.dtype.itemsize
                    for v in compile_check.abstract_batch(cfg).values())
  expected = (16 * rep["params_b"] * 1e9 + batch_bytes) / 4
  assert 0.9 < rep["memory_gb"]["argument"] * 1e9 / expected < 1.25
  assert rep["memory_gb"]["temp"] > 0 and rep["memory_gb_per_chip"] < rep["hbm_gb_per_chip"]
  assert rep["flops_per_step"] == flops.dit_train_step_flops(
      cfg, batch=4, seq_len=256, text_len=32, num_segments=4,
      num_params=round(rep["params_b"] * 1e9)).model


def test_unusable_compiler_time_falls_back_to_the_roofline(monkeypatch):
  # libtpu's cost model reports negative seconds for v6e steps; the estimate then comes from the
  # roofline of the compiler's own FLOPs and bytes, and says so.
  cost = compile_check.Cost(flops=4.59e12, bytes=2765e9 * 3.0, seconds=-15.9)  # 0.01 s of FLOPs, 3 s of bytes
  monkeypatch.setattr(compile_check, "cost_jobs", lambda *a: {})
  monkeypatch.setattr(compile_check, "combine_costs", lambda *a: (cost, {"method": "stub"}))
  rep = compile_check.check(tiny_config(), TOPOLOGY)
  assert rep["xla_time_source"].startswith("roofline") and "-15.900" in rep["xla_time_source"]
  assert rep["xla_seconds"] == pytest.approx(3.0)
  assert rep["estimated_step_s"] == pytest.approx(3.0 + rep["kernel_seconds"]) and rep["estimated_mfu"] > 0


def test_kernel_flops_count_splash_calls_and_vanish_for_xla_attention(monkeypatch):
  from sora_jax.kernels import splash
  cfg = tiny_config(attention="splash", remat="none")
  kw = dict(batch=4, seq_len=256, text_len=32, num_segments=4)
  k = flops.kernel_flops(cfg, **kw)
  d = cfg.dit
  # DiT self-attention alone: 2 layers x (2 forward + 5 fused-backward matmuls) of 2 * B * L^2 * width.
  self_attn = d.depth * 7 * 2 * 4 * 256 * 256 * d.width
  assert k.executed > self_attn
  assert k.executed < 1.2 * self_attn + d.depth * 7 * 2 * 4 * 256 * 128 * d.width + \
      d.text_depth * 7 * 2 * 4 * 128 * 128 * d.text_width
  # "full" reruns the forward kernel in the backward pass; "dots" saves its residuals and does not.
  remat = flops.kernel_flops(tiny_config(attention="splash", remat="full"), **kw)
  assert remat.executed / k.executed == pytest.approx(9 / 7)
  dots = flops.kernel_flops(tiny_config(attention="splash", remat="dots"), **kw)
  assert dots.executed == k.executed and dots.in_flops_py_total == remat.in_flops_py_total
  # "full_save_self_attention" reruns only the cross-attention kernels' forward: 2 of its matmuls per layer.
  own = flops.kernel_flops(tiny_config(attention="splash", remat="full_save_self_attention"), **kw)
  cross_fwd = d.depth * 2 * 2 * 4 * 256 * 128 * d.width  # keys: 32 text tokens + 4 segments, padded to 128
  assert own.executed == pytest.approx(k.executed + cross_fwd)
  assert own.in_flops_py_total == remat.in_flops_py_total
  # The GPU kernels: separate dq and dkv kernels (7 backward matmuls), lengths padded to 64-row blocks.
  gpu = flops.kernel_flops(tiny_config(attention="gpu", remat="none"), **kw)
  per = lambda n, lq, lk, w: n * 2 * 4 * lq * lk * w * (2 + 7)
  assert gpu.executed == pytest.approx(per(d.depth, 256, 256, d.width) + per(d.depth, 256, 64, d.width) +
                                       per(d.text_depth, 64, 64, d.text_width))
  # Splash takes separate dkv and dq kernels too where its partial-dq buffer would be large.
  monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 0)
  separate = flops.kernel_flops(cfg, **kw)
  assert separate.executed / k.executed == pytest.approx(9 / 7)
  assert separate.in_flops_py_total == k.in_flops_py_total
  assert flops.kernel_flops(tiny_config(attention="reference"), **kw).executed == 0


def test_kernel_flops_count_the_keys_the_kernel_pads_to():
  # Cross-attention to 576 caption keys, computed as one splash block of 640 keys (splash.layout; two
  # blocks of 512 would compute 1024); the caption's own 576 queries run as two blocks of 512.
  from experiments import sora_b
  cfg = sora_b.get_config()
  cfg.dit.update(dict(depth=1, text_depth=1))
  kw = dict(batch=2, seq_len=16384, text_len=576, num_segments=64)
  d = cfg.dit
  per = lambda lq, lk, w: 2 * 2 * lq * lk * w * (2 + 5)  # 2 forward and 5 fused-backward matmuls ("dots")
  want = per(16384, 16384, d.width) + per(16384, 640, d.width) + per(1024, 640, d.text_width)
  assert flops.kernel_flops(cfg, **kw).executed == pytest.approx(want)


def test_kernel_flops_under_ulysses_lay_out_a_devices_heads():
  # Wan 2.1 14B, one 75,776-token row over a 4-chip `sequence` axis: Ulysses runs splash over the whole
  # row with 10 of the 40 heads per chip, in 7 query chunks of 11,264 (40 heads: 30 of 2,560), so its
  # padded queries, not the FLOPs per head, differ from the unsharded kernel's.
  from experiments import wan21_t2v_14b
  from sora_jax.kernels import splash
  cfg = wan21_t2v_14b.get_config("topology=v5p:2x2x1")
  whole = cfg.copy_and_resolve_references()
  whole.dit.context = "none"
  l, w, depth = int(cfg.data.seq_len), cfg.dit.width, cfg.dit.depth
  kw = dict(batch=1, seq_len=l, text_len=512, num_segments=1)
  def queries(heads):  # the padded queries a kernel call computes
    lay = splash.layout(l, l, heads, 128, itemsize=2)
    return lay.chunks * lay.chunk_len
  assert queries(10) == 7 * 11264 and queries(40) == 30 * 2560
  per_query = 2 * l * w * depth * (2 + 5)  # full_save_attention: 2 forward, 5 fused backward matmuls
  got = flops.kernel_flops(cfg, **kw).executed - flops.kernel_flops(whole, **kw).executed
  assert got == pytest.approx(per_query * (queries(10) - queries(40)))


def test_kernel_backward_matmuls_follow_splash_fused_backward(monkeypatch):
  # Per call, as splash_attention decides: the fused kernel (5), whole or in query chunks, everywhere in
  # sora_b and sora_xl (64k-token self-attention in 16 chunks); separate dkv and dq kernels (7) only
  # where one query block's partial dq exceeds the budget, and always on GPU.
  from experiments import sora_b, sora_xl
  from sora_jax.kernels import splash
  b, xl = sora_b.get_config(), sora_xl.get_config()
  assert [flops.kernel_bwd_matmuls(b, lq, lk, 1152, 9) for lq, lk in
          [(16384, 16384), (16384, 576)]] == [5, 5]
  assert flops.kernel_bwd_matmuls(b, 512, 512, 1024, 8) == 5
  assert [flops.kernel_bwd_matmuls(xl, lq, lk, 4096, 32) for lq, lk in
          [(65536, 65536), (65536, 640)]] == [5, 5]
  monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 1 << 30)  # one block's 64k-key partial dq: 0.5 GiB
  assert flops.kernel_bwd_matmuls(xl, 65536, 65536, 4096, 32) == 5
  monkeypatch.setattr(splash, "FUSED_BWD_MAX_BYTES", 256 << 20)
  assert flops.kernel_bwd_matmuls(xl, 65536, 65536, 4096, 32) == 7
  xl.mesh.tensor = 4  # 8 heads per device: one block's partial dq is 128 MiB again
  assert flops.kernel_bwd_matmuls(xl, 65536, 65536, 4096, 32) == 5
  xl.mesh.tensor, xl.dit.attention = 1, "gpu"
  assert flops.kernel_bwd_matmuls(xl, 65536, 640, 4096, 32) == 7


def test_out_of_memory_errors_are_read():
  e = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                   "space hbm. Used 120.50G of 95.74G hbm. Exceeded hbm capacity by 24.76G.")
  assert compile_check._oom_bytes(e) == pytest.approx(120.5 * 2**30)
  assert compile_check._oom_bytes(ValueError("shapes do not match")) is None
  e = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
                   "memory required for HLO temporaries (34.43G) exceeds available HBM (31.24G).")
  assert compile_check._oom_bytes(e) == pytest.approx(34.43 * 2**30)


def test_planner_bisects_remat_policies_then_tries_tensor_parallelism(monkeypatch):
  # Memory per (remat, tensor) in GB, falling along REMAT_ORDER; 95 GB chips. Without tensor parallelism
  # full_save_attention is the first that fits; with tensor=2 dots_saveable fits, less recomputation,
  # so it wins; tensor=4 is only tried for policies before that one (none), which does not fit.
  gb = {1: dict(none=None, dots_saveable=150, dots=120, full_save_attention=90, full_save_self_attention=80,
                full=60),
        2: dict(none=130, dots_saveable=94, dots=80), 4: dict(none=96)}

  def fake_compile(c, mesh, what, per_trip=None):
    assert mesh.shape["tensor"] == c.mesh.tensor and mesh.shape["fsdp"] == 4 // c.mesh.tensor
    total = gb[c.mesh.tensor][c.dit.remat]
    if total is None:  # the compiler's own refusal, read back by _oom_bytes
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 300.0G of 95.7G hbm.")
    return compile_check.Compiled({"total": total * 1e9}, compile_check.Cost(0.0, 0.0, 0.0), 0, 0.0)
  monkeypatch.setattr(compile_check, "compile_and_release", fake_compile)
  cfg = tiny_config(num_heads=4)
  chosen, tried, real = compile_check.plan(cfg, TOPOLOGY)
  assert (chosen.dit.remat, chosen.mesh.tensor, chosen.mesh.fsdp) == ("dots_saveable", 2, -1)
  assert real.memory["total"] == 94e9  # the chosen candidate's compile, for check() to reuse
  assert [(t["remat"], t["tensor"]) for t in tried] == [
      ("full_save_attention", 1), ("dots_saveable", 1), ("dots", 1), ("dots_saveable", 2), ("none", 2),
      ("none", 4)]
  assert tried[4]["memory_gb"] == 130 and tried[0]["fsdp"] == 4 and tried[3]["fsdp"] == 2
  assert cfg.dit.remat == "full" and cfg.mesh.tensor == 1  # the caller's config is left alone
  # A budget of compiles keeps the best found so far.
  chosen, tried, _ = compile_check.plan(cfg, TOPOLOGY, max_compiles=1)
  assert (chosen.dit.remat, chosen.mesh.tensor, len(tried)) == ("full_save_attention", 1, 1)
  for t in gb:  # nothing fits
    gb[t].update({r: 100 for r in compile_check.REMAT_ORDER if r != "none"})
  with pytest.raises(ValueError, match="nothing tried fits"):
    compile_check.plan(cfg, TOPOLOGY)


def test_compiles_in_their_own_processes_give_what_compiles_here_give():
  # compile_all's spawned processes (two at once) compile the same programs as this process.
  cfg = tiny_config()
  mesh = compile_check.sharding.mesh_from_config(cfg.mesh, compile_check.topology_devices(TOPOLOGY))
  jobs = [compile_check.Compile("real", cfg), compile_check.Compile("unrolled", cfg, per_trip=0)]
  here = compile_check.compile_all(jobs, mesh)
  there = compile_check.compile_all(jobs, mesh, topology=TOPOLOGY, processes=2)
  for a, b in zip(here, there):
    assert (a.memory, a.cost, a.num_params) == (b.memory, b.cost, b.num_params) and not b.refused


def test_iterations_per_trip_keep_the_trips_equal():
  assert [flops.iterations_per_trip(n, 2) for n in (0, 1, 2, 3, 8, 9, 28, 29, 30, 40)] == \
      [1, 1, 2, 3, 2, 3, 2, 29, 2, 2]


def test_scanned_cost_adds_the_layers_the_loop_counts_once(monkeypatch):
  # The real step's count holds the work outside the loops and one layer of each stack; the compile with
  # more layers per loop trip holds 2 DiT layers (depth 6) and the whole text stack (depth 3 is odd: 3
  # per trip). The whole step is the scanned count plus depth - 1 layers of each.
  cfg = tiny_config(depth=6, text_depth=3)
  dit, text, outside = compile_check.Cost(30, 300, 3), compile_check.Cost(10, 100, 1), compile_check.Cost(5, 50, 1)
  hand = flops.StepFlops(model=0, total=0, per_layer={"dit": 3.0, "text": 1.0}, depths={"dit": 6, "text": 3})
  per_trip_log = []

  def fake_compile(c, mesh, what, per_trip=None):
    per_trip_log.append(per_trip)
    return compile_check.Compiled({}, outside + dit * 2 + text * 3, 0, 0.0)
  monkeypatch.setattr(compile_check, "compile_and_release", fake_compile)
  total, how = compile_check.step_cost(cfg, None, hand, method="scanned", scanned=outside + dit + text)
  assert per_trip_log == [2] and "2 and 3 layers per loop trip" in how["method"]
  want = outside + dit * 6 + text * 3
  assert (total.flops, total.bytes, total.seconds) == pytest.approx((want.flops, want.bytes, want.seconds))
  # Stacks one layer deep: the scanned count is the whole step, and nothing more is compiled.
  total, _ = compile_check.step_cost(tiny_config(depth=1, text_depth=1), None, hand, method="scanned",
                                     scanned=outside + dit + text)
  assert per_trip_log == [2] and total == outside + dit + text


def test_one_compile_cost_prices_the_missing_layers_at_the_counted_rate():
  # 100 FLOPs counted per chip at 10 bytes and 0.01 s per FLOP; flops.py's DiT layer is 40 FLOPs over 4
  # chips (no kernels with reference attention), its text layer 8: 5 more DiT and 2 more text layers.
  cfg = tiny_config(depth=6, text_depth=3)
  hand = flops.StepFlops(model=0, total=0, per_layer={"dit": 40.0, "text": 8.0}, depths={"dit": 6, "text": 3})
  mesh = types.SimpleNamespace(devices=np.empty(4))
  total, _ = compile_check.step_cost(cfg, mesh, hand, method="one", scanned=compile_check.Cost(100, 1000, 1.0))
  assert (total.flops, total.bytes, total.seconds) == pytest.approx((154, 1540, 1.54))


def test_host_memory_guard_stops_the_process_with_one_line():
  # A limit the process is already over: the guard ends it with exit status 4 and says what it was doing.
  code = ("import time; from sora_jax import compile_check as cc; cc.progress('compiling the moon'); "
          "cc.guard_host_memory(1e6); time.sleep(60)")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == compile_check.EXIT_HOST_MEMORY, r.stderr[-2000:]
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: host memory:") and "while compiling the moon" in err and "limit 0.0 GB" in err


@pytest.mark.slow
def test_cost_methods_match_the_fully_unrolled_step_and_flops_py():
  # Width 512 on rows of 1024 (at width 128 the per-layer work is too small against the loop's and the
  # first layer's overheads to compare methods). Measured: shallow within 1% of the unrolled step's time
  # and 8% of its FLOPs; scanned within 1% of its FLOPs and 8.2% of its time (the loop's own traffic; 4%
  # before the unrolled compile kept remat's recomputation apart, `52fe3f4`).
  cfg = tiny_config(depth=4, text_depth=4, width=512, num_heads=4, ffn_dim=2048)
  cfg.data.update(dict(seq_len=1024, text_len=64))
  full = compile_check.check(cfg, TOPOLOGY, cost="unrolled", processes=2)
  for method, rel_flops, rel_s in (("shallow", 0.1, 0.02), ("scanned", 0.02, 0.1)):
    rep = compile_check.check(cfg, TOPOLOGY, cost=method, processes=2)
    assert rep["xla_tflops_per_step"] == pytest.approx(full["xla_tflops_per_step"], rel=rel_flops), method
    assert rep["xla_seconds"] == pytest.approx(full["xla_seconds"], rel=rel_s), method
    assert rep["memory_gb_per_chip"] == full["memory_gb_per_chip"] and rep["flops_agree"], method
    assert 0 < rep["estimated_mfu"] < 1


@pytest.mark.slow
def test_cli_prints_one_json_line_and_fails_when_the_step_does_not_fit(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  base = [sys.executable, "-m", "sora_jax.compile_check", "--config",
          "experiments/sora_b.py:topology=v5p:2x2x1", "--config.data.seq_len=1024",
          "--config.data.text_len=64", "--config.dit.depth=1", "--config.dit.text_depth=1",
          # Width 512: at width 128 on rows of 256 the elementwise work, which flops.py fits on XLA:CPU,
          # outweighs the matmuls, and TPU's count of it put the FLOP check at 0.80 (exit 3).
          "--config.dit.width=512", "--config.dit.num_heads=4", "--config.dit.attention=reference"]
  ok = subprocess.run(base + ["--config.data.batch_size=4"], cwd=REPO, env=env, capture_output=True,
                      text=True, timeout=1200)
  assert ok.returncode == 0, ok.stderr[-2000:]
  line = json.loads(ok.stdout.strip().splitlines()[-1])
  assert sorted(line) == sorted(compile_check.JSON_KEYS) and line["fits"]
  # Dense reference attention over 16k-token rows: [B, H, L, L] f32 scores do not fit in 95 GB.
  big = subprocess.run(base + ["--config.data.batch_size=16", "--config.data.seq_len=65536"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1200)
  assert big.returncode == 1, big.stderr[-2000:]
  assert json.loads(big.stdout.strip().splitlines()[-1])["fits"] is False
