"""Multi-host: process-group detection, and a 2-process job (jax.distributed on localhost, 4 fake CPU
devices each, gloo) that trains with the real train.py and checkpoints, then continues on 1 process
with 8 devices on another mesh with the same parameters and the same data stream."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from sora_jax import distributed

REPO = Path(__file__).resolve().parents[1]


def test_detect_reads_the_environment_and_stays_single_process_without_one():
  assert distributed.detect({}) == ("", {})
  assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4",
                             "JAX_PROCESS_ID": "3"}) == (
      "environment", {"coordinator_address": "h:1234", "num_processes": 4, "process_id": 3})
  assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"})[0] == "slurm"
  assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})[0] == ""  # one task: no group
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})[0] == "tpu"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"})[0] == ""
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1"})


class _Counting:
  """A stand-in stream shard: batches {"x": [[shard, n]]}, n counting up; state {"n": n}."""

  def __init__(self, shard):
    self.shard, self.n = shard, 0

  def __next__(self):
    self.n += 1
    return {"x": np.array([[self.shard, self.n]])}

  def get_state(self):
    return {"n": self.n}

  def set_state(self, s):
    self.n = s["n"]


def test_reshard_data_position_continues_every_shard(tmp_path):
  d = tmp_path / "7" / "data_iter"
  d.mkdir(parents=True)
  for i, n in enumerate([5, 6, 7, 8]):
    (d / f"process_{i}-of-4.json").write_text(json.dumps({"json": {"n": n}}))
  distributed.reshard_data_position(str(tmp_path / "7"), 2)
  merged = [distributed.MergedShards([_Counting(2 * j), _Counting(2 * j + 1)]) for j in range(2)]
  for j, m in enumerate(merged):
    m.set_state(json.loads((d / f"process_{j}-of-2.json").read_text())["json"])
  rows = np.concatenate([next(m)["x"] for m in merged])
  # Global rows in process order, each shard one step past where its 4-process reader stopped.
  np.testing.assert_array_equal(rows, [[0, 6], [1, 7], [2, 8], [3, 9]])
  with pytest.raises(ValueError, match="must divide"):
    distributed.reshard_data_position(str(tmp_path / "7"), 3)


def test_data_iterator_continues_the_checkpoints_stream_on_fewer_processes(tmp_path, monkeypatch):
  from sora_jax.data import pipeline
  monkeypatch.setattr(pipeline, "make_iterator",
                      lambda cfg, *, split, process_index=0, process_count=1: _Counting(process_index))
  assert isinstance(distributed.data_iterator(None, None), _Counting)  # a fresh stream: the pipeline's own
  assert isinstance(distributed.data_iterator(None, str(tmp_path)), _Counting)  # no checkpoint yet
  for step, n0 in ((2, 10), (4, 20)):  # two steps written by 4 processes
    d = tmp_path / str(step) / "data_iter"
    d.mkdir(parents=True)
    for i in range(4):
      (d / f"process_{i}-of-4.json").write_text(json.dumps({"json": {"n": n0 + i}}))
  assert distributed.stream_processes(str(tmp_path)) == 4
  # This 1-process job reads all 4 shards, and either step restores (files for 1 process were added).
  it = distributed.data_iterator(None, str(tmp_path))
  assert isinstance(it, distributed.MergedShards) and len(it.iterators) == 4
  for step, n0 in ((2, 10), (4, 20)):
    d = tmp_path / str(step) / "data_iter"
    assert (d / "process_3-of-4.json").exists()  # the originals stay
    it.set_state(json.loads((d / "process_0-of-1.json").read_text())["json"])
    np.testing.assert_array_equal(next(it)["x"], [[i, n0 + i + 1] for i in range(4)])
  # What this job saves still continues the 4-process stream.
  (tmp_path / "6" / "data_iter").mkdir(parents=True)
  (tmp_path / "6" / "data_iter" / "process_0-of-1.json").write_text(json.dumps({"json": it.get_state()}))
  assert distributed.stream_processes(str(tmp_path)) == 4


def test_the_trainer_continues_the_stream_of_the_checkpoints_it_resumes(monkeypatch):
  from sora_jax import train
  seen = []
  monkeypatch.setattr(distributed, "data_iterator", lambda cfg, directory, **kw: seen.append(directory))
  for kind in ("workdir", "resume_from", "init_from", "bundle", "scratch"):
    train.make_data(None, train.Start(kind, f"/{kind}", 2))
  # Weights-only starts (init_from, a bundle) and scratch begin a fresh stream.
  assert seen == ["/workdir", "/resume_from", None, None, None]


# ---------------------------------------------------------------------------------- the 2-process job
def tiny_config(stats_dir: str, workdir_total_steps: int = 4) -> ml_collections.ConfigDict:
  from experiments import shapes_demo
  c = shapes_demo.get_config()
  c.data.update(dict(source="latents", latents_dir=str(stats_dir), seq_len=64, token_budget=0, text_len=48,
                     max_text_tokens=8, max_segments=8, batch_size=8, min_patch_side=1,
                     sample_latents=False, packing_bins=4, num_workers=0, read_threads=1))
  c.data.vocab_size = 300  # byte-level test tokenizer: ids 1..256
  c.dit.update(dict(in_dim=16, width=32, depth=2, num_heads=2, ffn_dim=64, text_width=16, text_depth=1,
                    text_heads=2, attention="reference"))
  c.train.total_steps = workdir_total_steps
  c.train.checkpoint_every_steps = 2
  c.train.log_every_steps = 1
  c.train.sample_every_steps = 0
  c.train.optim.warmup_steps = 1
  return c


class Recorder:
  """Wraps (iterator, to_global): records each step's global rows as {global row index: checksum}."""

  def __init__(self, it, to_global):
    self.it, self._to_global, self.steps = it, to_global, []

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)

  def to_global(self, batch, mesh):
    out = self._to_global(batch, mesh)
    rows = {}
    for shard in out["tokens"].addressable_shards:
      data = np.asarray(shard.data)
      for r in range(data.shape[0]):
        rows[int(shard.index[0].start or 0) + r] = float(np.abs(data[r]).sum())
    self.steps.append(rows)
    return out


def records_and_tokenizer():
  from tests.test_pipeline import LatentRecords, tokenize
  return LatentRecords([(1 + i % 3, 4, 4) for i in range(200)]), tokenize


_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import logging
from absl import flags
from sora_jax import distributed
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # as the entry points do
flags.FLAGS(["worker", f"--coordinator={sys.argv[2]}", "--num_processes=2", f"--process_id={sys.argv[3]}"])
assert distributed.initialize() == 2
import jax, numpy as np
from jax.experimental import multihost_utils
from sora_jax import train
from sora_jax.data import pipeline
from tests.test_multihost import tiny_config, Recorder, records_and_tokenizer
stats, workdir, out = sys.argv[4], sys.argv[5], sys.argv[6]
cfg = tiny_config(stats)
cfg.mesh.update(dict(data=2, fsdp=4, tensor=1))
records, tokenize = records_and_tokenizer()
rec = Recorder(pipeline.make_iterator(cfg, source=records, tokenize=tokenize), pipeline.to_global)
state = train.train(cfg, workdir, data=(rec, rec.to_global))
params = multihost_utils.process_allgather(state["params"], tiled=True)
if jax.process_index() == 0:
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(os.path.join(out, "params.npz"), **flat)
with open(os.path.join(out, f"rows_{jax.process_index()}.json"), "w") as f:
  json.dump(rec.steps, f)
"""


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_then_one_process_resumes_on_another_mesh(tmp_path):
  from sora_jax.data import sources
  stats = tmp_path / "stats"
  sources.write_latent_stats(stats, {"shift": [0.0] * 4, "scale": [1.0] * 4})
  work2, out = tmp_path / "two", tmp_path / "out"
  out.mkdir()
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), str(REPO), f"localhost:{port}", str(i),
                             str(stats), str(work2), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=1800)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [l[-3000:] for l in logs]
  # Logging from process 0 only: process 1 prints no INFO lines of ours.
  assert "sora_jax.train: start" in logs[0] and "sora_jax.train: start" not in logs[1]
  check_one_process_resume(stats, work2, out, tmp_path)


def check_one_process_resume(stats, work2, out, tmp_path):
  """After the 2-process job: its checkpoints restore exactly on 1 process with another mesh, and a
  resume from its step 2 continues its data stream and ends at its parameters."""
  from sora_jax import checkpoint, sharding, train
  from sora_jax.data import pipeline
  ckpt2 = work2 / "checkpoints"
  assert sorted(int(p.name) for p in ckpt2.iterdir() if p.name.isdigit()) == [2, 4]
  assert sorted(p.name for p in (ckpt2 / "2" / "data_iter").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  saved = dict(np.load(out / "params.npz"))
  rows2 = [json.load(open(out / f"rows_{i}.json")) for i in range(2)]
  global2 = [{int(k): v for r in (rows2[0][s], rows2[1][s]) for k, v in r.items()} for s in range(4)]
  assert all(sorted(g) == list(range(8)) for g in global2)

  # One process, 8 devices, another mesh (tensor parallel): the step-4 checkpoint restores to exactly
  # the parameters the two processes ended with.
  cfg = tiny_config(str(stats))
  cfg.mesh.update(dict(data=1, fsdp=4, tensor=2))
  mesh = sharding.mesh_from_config(cfg.mesh)
  setup = train.make_setup(cfg, mesh)
  assert any("tensor" in str(s.spec) for s in jax.tree.leaves(setup.shardings["params"]))
  mgr = checkpoint.Manager(str(ckpt2))
  restored = mgr.restore(4, setup.abstract_state)
  mgr.close()
  for k, v in _flat(restored["params"]).items():
    np.testing.assert_array_equal(v, saved[k], err_msg=k)

  # Resume from step 2 on that mesh, reading both shards of the 2-process stream (the trainer's
  # data_iterator): steps 3 and 4 see the same global batches, and the parameters end where the
  # 2-process run's did.
  work1 = tmp_path / "one"
  shutil.copytree(ckpt2 / "2", work1 / "checkpoints" / "2")
  records, tokenize = records_and_tokenizer()
  rec = Recorder(distributed.data_iterator(cfg, str(work1 / "checkpoints"), source=records, tokenize=tokenize),
                 pipeline.to_global)
  state = train.train(cfg, str(work1), data=(rec, rec.to_global))
  assert int(state["step"]) == 4
  assert rec.steps == global2[2:]
  for k, v in _flat(state["params"]).items():
    np.testing.assert_allclose(v, saved[k], rtol=1e-4, atol=1e-5, err_msg=k)
