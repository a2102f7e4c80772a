"""Context-parallel causal VAE: a long video's frames spread over the devices of the `context` axis.

A minute of 720p does not fit one chip's memory in the VAE (its activations are hundreds of GB at full
resolution). Like CogVideoX's context-parallel VAE, the frames after frame 0 are cut into n equal
temporal chunks, one per device along the mesh axis, and all devices run their chunk at once. Every
causal layer (causal conv, temporal down/up-sampling) needs the last 1-2 input frames of the chunk
before its own: its `_Stream.take(x)` sends the tail of its input to the next device with one
`lax.ppermute` (a halo exchange per layer) and receives the previous device's. Frame 0 is encoded or
decoded first, alone and replicated (it is one frame), and its caches are device 0's past, exactly as
`VAE.encode_chunked` / `decode_chunked` do on one device; the results are equal to theirs.

    mean, logvar = vae_cp.encode(vae, x_btHWc, mesh)     # (T - 1) / temporal_factor divisible by n
    x_btHWc = vae_cp.decode(vae, z_bthwc, mesh)          # (t - 1) divisible by n

Each device's chunk must hold at least 2 frames at every temporal level (a layer's past is up to 2
frames), so encoding needs at least 2 * temporal_factor frames per device and decoding 2 latent frames.
"""
from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sora_jax.models import vae as vae_lib


class _HaloStream(vae_lib._Stream):  # pylint: disable=protected-access
  """A stream whose past comes from the previous device along `axis` (device 0: frame 0's caches)."""

  def __init__(self, frame0_caches: list, axis: str, size: int):
    super().__init__(frame0_caches, first=False)
    self.axis, self.size = axis, size

  def take(self, x=None):
    cache0 = self.past[len(self.out)]
    need = cache0.shape[1]
    if x is None or x.shape[1] < need:
      got = None if x is None else x.shape[1]
      raise ValueError(f"context-parallel VAE: a layer's chunk has {got} frames per device, its past "
                       f"needs {need}; use fewer devices or a longer video")
    tail = x[:, x.shape[1] - need:].astype(cache0.dtype)
    halo = lax.ppermute(tail, self.axis, [(i, i + 1) for i in range(self.size - 1)])
    return jnp.where(lax.axis_index(self.axis) == 0, cache0, halo)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _run(graphdef, state, x, mesh: Mesh, axis: str, encode: bool):
  n = mesh.shape[axis]
  vae = nnx.merge(graphdef, state)
  head = vae_lib._Stream(None, True)  # pylint: disable=protected-access
  out0 = vae._encode_stream(x[:, :1], head) if encode else (vae._decode_stream(x[:, :1], head),)  # pylint: disable=protected-access

  def body(state_, rest, caches):
    model = nnx.merge(graphdef, state_)
    stream = _HaloStream(caches, axis, n)
    return (model._encode_stream(rest, stream) if encode  # pylint: disable=protected-access
            else (model._decode_stream(rest, stream),))  # pylint: disable=protected-access

  seq = P(None, axis)
  outs = jax.shard_map(body, mesh=mesh, in_specs=(P(), seq, P()), out_specs=seq, check_vma=False)(
      state, x[:, 1:], head.out)
  return tuple(jnp.concatenate([a, b], axis=1) for a, b in zip(out0, outs))


def _check_split(frames_after_0: int, unit: int, n: int, what: str) -> None:
  if frames_after_0 % (unit * n) or frames_after_0 == 0:
    raise ValueError(f"context-parallel VAE: {what} has {frames_after_0} frames after frame 0; "
                     f"accepted: a positive multiple of {unit * n} ({n} devices x {unit})")


def encode(vae: vae_lib.VAE, x: jax.Array, mesh: Mesh, *, axis: str = "context"):
  """`vae.encode_chunked(x)` with frames 1.. spread over `mesh`'s `axis`: (mean, logvar)."""
  x = jnp.asarray(x)
  vae.check_video(x)
  _check_split(x.shape[1] - 1, vae.settings.temporal_factor, mesh.shape[axis], "the video")
  graphdef, state = nnx.split(vae)
  return _run(graphdef, state, x, mesh, axis, True)


def decode(vae: vae_lib.VAE, z: jax.Array, mesh: Mesh, *, axis: str = "context") -> jax.Array:
  """`vae.decode_chunked(z)` with latent frames 1.. spread over `mesh`'s `axis`."""
  z = jnp.asarray(z)
  _check_split(z.shape[1] - 1, 1, mesh.shape[axis], "the latent")
  graphdef, state = nnx.split(vae)
  return _run(graphdef, state, z, mesh, axis, False)[0]
