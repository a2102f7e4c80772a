"""sora_jax.platforms: on a machine without a TPU, commands start JAX without probing libtpu (whose
start-up errors read as failures, issue #23), while a TPU, an explicit JAX_PLATFORMS and the compile
check's TPU topologies are left alone."""
import importlib.util
import os
from pathlib import Path
import subprocess
import sys

import pytest

from sora_jax import platforms

ROOT = Path(__file__).resolve().parents[1]
# What libtpu (and JAX about it) prints when started on a machine without a TPU.
LIBTPU_MARKERS = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "Source Location Trace",
                  "libtpu", "Unable to initialize backend")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("environ, evidence, expected", [
    ({}, {}, "cpu"),
    ({"JAX_PLATFORMS": "tpu"}, {}, None),  # the user's choice
    ({"JAX_PLATFORMS": ""}, {}, None),     # JAX's own automatic choice, asked for
    ({}, {"tpu_device": True}, None),      # a TPU VM
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}, None),  # a GKE TPU pod
    ({}, {"plugins": {"xla_cuda12"}, "nvidia_device": True}, "cuda,cpu"),
    ({}, {"plugins": {"xla_cuda12"}}, "cpu"),  # the gpu extra installed, no GPU
    ({}, {"plugins": {"xla_rocm7"}, "nvidia_device": True}, None),  # a plugin whose device it cannot see
])
def test_platforms_are_set_only_where_nothing_chose_them_and_no_tpu_is_attached(environ, evidence, expected):
  kw = dict(tpu_device=False, plugins=set(), nvidia_device=False) | evidence
  assert platforms.default_platforms(environ, **kw) == expected


PROBE = ("import {first}, os, jax\n"
         "backend = jax.default_backend()  # starts the backends\n"
         "mapped = any('libtpu' in line for line in open('/proc/self/maps'))\n"
         "print(backend, os.environ.get('JAX_PLATFORMS'), mapped)\n")


def test_commands_on_this_machine_start_jax_without_libtpu(tmp_path):
  if platforms.tpu_device_present() or any(os.environ.get(k) for k in platforms.TPU_VARIABLES):
    pytest.skip("a TPU is attached: JAX is meant to start libtpu here")
  if not Path("/proc/self/maps").exists():
    pytest.skip("needs /proc/self/maps to see which libraries a process loaded")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  # libtpu takes a lock file per host; while another process holds it (a compile check running here)
  # the probe gives up quietly, which would hide what a user without one sees.
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
  commands = {
      "sora_jax first": (["-c", PROBE.format(first="sora_jax")], {}),
      "jax first": (["-c", PROBE.format(first="jax, sora_jax")], {}),
      # A real entry point that starts the backend (distributed.write_on_main) before it reads --input.
      "reconstruct": (["-m", "sora_jax.reconstruct", f"--vae={tmp_path}/vae", f"--input={tmp_path}/in.mp4",
                       f"--out={tmp_path}/out.mp4"], {}),
  }
  if HAS_LIBTPU:
    # Control: JAX's automatic choice, asked for explicitly, is honoured and does probe libtpu, so the
    # checks above would see it.
    commands["explicit automatic"] = (["-c", PROBE.format(first="sora_jax")], {"JAX_PLATFORMS": ""})
    # The compile check still describes TPU slices through libtpu, with the backend on CPU.
    commands["compile check"] = (["-c", "import jax\nfrom sora_jax import compile_check\n"
                                  "print(len(compile_check.topology_devices('v5p:2x2x1')), jax.default_backend())"],
                                 {})
  procs = {k: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env | extra, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, (argv, extra) in commands.items()}
  out = {k: p.communicate(timeout=240) + (p.returncode,) for k, p in procs.items()}

  for k in ("sora_jax first", "jax first"):
    stdout, stderr, rc = out[k]
    assert rc == 0, stderr
    assert stdout.split() == ["cpu", "cpu", "False"], (k, stdout)  # the backend, JAX_PLATFORMS, libtpu mapped
    assert not [m for m in LIBTPU_MARKERS if m in stderr], (k, stderr)
  stdout, stderr, rc = out["reconstruct"]
  assert rc == 2 and stderr == f"error: {tmp_path}/in.mp4: no such file\n", stderr  # the one line, alone
  if HAS_LIBTPU:
    stdout, stderr, rc = out["explicit automatic"]
    assert rc == 0 and stdout.split() == ["cpu", "True"], stdout  # JAX_PLATFORMS stays empty: no word
    stdout, stderr, rc = out["compile check"]
    assert rc == 0 and stdout.split()[-2:] == ["4", "cpu"], stderr
