"""The launch recipes in scripts/: what they run, checked with stand-ins for gcloud, xpk and srun that
record their arguments; and SLURM's environment, which sora_jax.distributed reads, on 2 real processes."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Records one JSON line per call: the program's name and its arguments.
_RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def _run(script, *args, tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in ("gcloud", "xpk", "srun"):
    (bin_dir / name).write_text(_RECORDER)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS_LOG=str(log))
  proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return proc, calls


@pytest.mark.parametrize("script", ["tpu_vm.sh", "xpk.sh", "slurm_gpu.sh"])
def test_missing_arguments_print_the_usage_and_exit_2(script, tmp_path):
  proc, calls = _run(script, tmp_path=tmp_path)
  assert proc.returncode == 2 and calls == []
  assert script in proc.stdout  # the usage lines of the script's header


def test_tpu_vm_copies_installs_and_launches_on_every_worker(tmp_path):
  proc, calls = _run("tpu_vm.sh", "sora-b", "us-east5-a", "experiments/sora_b.py", "/mnt/gcs/runs/b",
                     "--config.data.latents_dir=/mnt/gcs/latents", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert [c[:4] for c in calls] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
  scp, install, launch = calls
  assert scp[4] == "scp" and "--worker=all" in scp and "sora-b:/tmp/" in scp
  for call in (install, launch):
    assert call[4:6] == ["ssh", "sora-b"] and "--worker=all" in call and "us-east5-a" in call
  assert "pip install -q -e '.[tpu]'" in install[install.index("--command") + 1]
  command = launch[launch.index("--command") + 1]
  assert ("python -m sora_jax.train --config experiments/sora_b.py --workdir /mnt/gcs/runs/b "
          "--config.data.latents_dir=/mnt/gcs/latents") in command


def test_xpk_creates_a_multislice_workload(tmp_path):
  proc, calls = _run("xpk.sh", "my-cluster", "sora-xl2", "v5p-512", "2",
                     "experiments/sora_xl.py:topology=2xv5p:8x8x4", "/gcs/runs/xl2", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr
  (call,) = calls
  assert call[:3] == ["xpk", "workload", "create"]
  opts = dict(zip(call[3::2], call[4::2]))
  assert opts["--cluster"] == "my-cluster" and opts["--tpu-type"] == "v5p-512"
  assert opts["--num-slices"] == "2" and opts["--workload"] == "sora-xl2"
  assert ("python -m sora_jax.train --config experiments/sora_xl.py:topology=2xv5p:8x8x4 "
          "--workdir /gcs/runs/xl2") in opts["--command"]


def test_slurm_runs_one_training_process_per_task(tmp_path):
  proc, calls = _run("slurm_gpu.sh", "experiments/sora_b.py", "/shared/runs/b", "--config.seed=3",
                     tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr
  (call,) = calls
  assert call[0] == "srun" and "--kill-on-bad-exit=1" in call
  i = call.index("-m")
  assert call[i + 1:] == ["sora_jax.train", "--config", "experiments/sora_b.py", "--workdir",
                          "/shared/runs/b", "--config.dit.attention=gpu", "--config.seed=3"]


_SLURM_TASK = """
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from sora_jax import distributed
n = distributed.initialize()
from jax.experimental import multihost_utils
total = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1]))
# stderr: processes other than 0 print nothing to stdout (distributed.quiet_other_processes)
print("RESULT", n, jax.process_index(), int(np.sum(total)), file=sys.stderr, flush=True)
"""


def _free_slurm_job_id() -> int:
  """A job id whose coordinator port (jax: 61440 + job_id % 4096) is free here."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    with socket.socket() as s:
      try:
        s.bind(("localhost", 61440 + job_id % 4096))
      except OSError:
        continue
    return job_id % 4096
  raise RuntimeError("no free port in 61440..65535")


def test_slurm_environment_joins_the_process_group(tmp_path):
  """What srun sets for each of 2 tasks on one node: sora_jax.distributed detects it and jax finds the
  coordinator, the process count and each id from it; an all-gather then spans both processes."""
  job_id = _free_slurm_job_id()
  script = tmp_path / "task.py"
  script.write_text(_SLURM_TASK)
  procs = []
  for rank in range(2):
    env = dict(os.environ, SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2", SLURM_PROCID=str(rank),
               SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs.append(subprocess.Popen([sys.executable, str(script), str(REPO)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  results = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT"))
  assert results == [["2", "0", "3"], ["2", "1", "3"]], outs
