"""Which JAX platforms this project's processes initialise, decided once on `import sora_jax` (its
__init__.py), before jax picks a backend.

Every install carries libtpu (the `tpu` extra: compile_check compiles for TPU slices on any machine). With
JAX_PLATFORMS unset JAX starts every backend it knows, and libtpu, started on a machine without a TPU,
prints errors about the TPU hosts it cannot find ("Failed to find host bounds", "unexpected worker
hostname", "Unable to initialize backend 'tpu'") that read as failures (issue #23). So where nothing
says a TPU is attached, JAX_PLATFORMS is set to the platforms the machine has: "cpu", or "cuda,cpu" with
jax's CUDA plugin installed and an NVIDIA device present. Child processes (spawned compiles, data
workers, launched commands) inherit it.

JAX keeps its own choice, and picks the TPU, when:
- a TPU is attached: its device files (/dev/accel* on v4 and v5p, /dev/vfio/<n> on v5e and later, as
  sora_jax.distributed detects TPU VMs) or the variables GKE sets (TPU_ACCELERATOR_TYPE,
  TPU_WORKER_HOSTNAMES);
- JAX_PLATFORMS is set, even empty (JAX's automatic choice), or jax's config already names platforms;
- a PJRT plugin other than CUDA's is installed: this module cannot tell whether its device is present.

compile_check is unaffected: jax.experimental.topologies loads libtpu itself, whatever the platforms,
to describe the slice it compiles for.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, MutableMapping

TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
TPU_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")
# jax's own test for a visible NVIDIA GPU (jax/_src/hardware_utils.py); /dev/dxg is WSL2's.
_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_device_present() -> bool:
  """Whether this host exposes TPU chips (a TPU VM, or a pod with the TPU devices mounted)."""
  return any(glob.glob(p) for p in TPU_DEVICE_FILES)


def jax_plugins() -> set[str]:
  """Names of the PJRT plugins jax would load: modules of the `jax_plugins` namespace package and
  entry points of that group (found without importing jax or the plugins)."""
  names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  return names


def default_platforms(environ: Mapping[str, str], *, tpu_device: bool, plugins: set[str],
                      nvidia_device: bool) -> str | None:
  """The JAX_PLATFORMS for a process that has not chosen, from what the machine shows; None leaves the
  choice to JAX."""
  if "JAX_PLATFORMS" in environ:
    return None
  if tpu_device or any(environ.get(k) for k in TPU_VARIABLES):
    return None
  if any("cuda" not in p for p in plugins):
    return None
  return "cuda,cpu" if plugins and nvidia_device else "cpu"


def apply(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Sets JAX_PLATFORMS (and jax's config, when jax is already imported) unless JAX should choose;
  returns what it set."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.config.jax_platforms is not None:
    return None  # chosen already: by the caller, or by jax itself on a TPU VM
  value = default_platforms(environ, tpu_device=tpu_device_present(), plugins=jax_plugins(),
                            nvidia_device=any(os.path.exists(p) for p in _NVIDIA_DEVICE_FILES))
  if value is None:
    return None
  environ["JAX_PLATFORMS"] = value
  if jax is not None:  # imported before sora_jax: its config read the environment already
    jax.config.update("jax_platforms", value)
  return value
