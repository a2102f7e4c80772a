"""Spacetime patches: latents `[t, h, w, c]` <-> tokens `[n, pt*ph*pw*c]` with integer positions.

A token is one `pt x ph x pw` block of latents, flattened in (t, h, w, c) order; tokens are laid out
row-major over the patch grid (t, then h, then w), and `positions[i] = (t, h, w)` is the block's index on
that grid. The same layout is used on the host (numpy, in the data pipeline) and on device (jax.numpy,
in samplers), so every function here takes either kind of array and returns the same kind.
Inverting a patchify is exact: it is a reshape and a transpose, no arithmetic.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

Patch = tuple[int, int, int]


def _xp(x):
  """numpy for numpy inputs, jax.numpy for jax arrays (and tracers)."""
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def _check_patch(patch: Sequence[int]) -> Patch:
  if len(patch) != 3 or any(int(p) < 1 for p in patch):
    raise ValueError(f"patch {tuple(patch)} must be three positive ints (pt, ph, pw)")
  return tuple(int(p) for p in patch)


def patch_grid(latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> Patch:
  """The patch grid (nt, nh, nw) of latents of shape [t, h, w, ...]; each must divide exactly."""
  pt, ph, pw = _check_patch(patch)
  t, h, w = (int(s) for s in latent_shape[:3])
  if t % pt or h % ph or w % pw:
    raise ValueError(f"latent shape {(t, h, w)} is not divisible by patch {(pt, ph, pw)}")
  return t // pt, h // ph, w // pw


def token_dim(channels: int, patch: Sequence[int] = (1, 2, 2)) -> int:
  """D, the length of one token: pt * ph * pw * c."""
  pt, ph, pw = _check_patch(patch)
  return pt * ph * pw * int(channels)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
  """int32 [nt*nh*nw, 3]: the (t, h, w) patch index of every token, row-major over the grid (read-only)."""
  return _grid_positions(*(int(g) for g in grid))


@functools.lru_cache(maxsize=1024)
def _grid_positions(nt: int, nh: int, nw: int) -> np.ndarray:
  # Data sets hold few distinct sizes, and the data pipeline asks for them once per sample.
  out = np.indices((nt, nh, nw), dtype=np.int32).reshape(3, -1).T.copy()
  out.flags.writeable = False
  return out


def patchify(latents_thwc, patch: Sequence[int] = (1, 2, 2)):
  """latents [t, h, w, c] -> (tokens [n, pt*ph*pw*c], positions int32 [n, 3]); n = nt*nh*nw."""
  pt, ph, pw = _check_patch(patch)
  nt, nh, nw = patch_grid(latents_thwc.shape, patch)
  c = latents_thwc.shape[-1]
  xp = _xp(latents_thwc)
  x = latents_thwc.reshape(nt, pt, nh, ph, nw, pw, c)
  x = xp.transpose(x, (0, 2, 4, 1, 3, 5, 6))  # grid axes first, then the block's own (pt, ph, pw, c)
  tokens_nd = x.reshape(nt * nh * nw, pt * ph * pw * c)
  return tokens_nd, grid_positions((nt, nh, nw)).copy()


def unpatchify(tokens_nd, grid: Sequence[int], patch: Sequence[int] = (1, 2, 2)):
  """tokens [nt*nh*nw, pt*ph*pw*c] (patchify's layout) -> latents [nt*pt, nh*ph, nw*pw, c]."""
  pt, ph, pw = _check_patch(patch)
  nt, nh, nw = (int(g) for g in grid)
  n, d = tokens_nd.shape
  if n != nt * nh * nw or d % (pt * ph * pw):
    raise ValueError(f"tokens of shape {(n, d)} do not fit grid {(nt, nh, nw)} with patch "
                     f"{(pt, ph, pw)}: need {nt * nh * nw} tokens of a multiple of {pt * ph * pw}")
  c = d // (pt * ph * pw)
  xp = _xp(tokens_nd)
  x = tokens_nd.reshape(nt, nh, nw, pt, ph, pw, c)
  x = xp.transpose(x, (0, 3, 1, 4, 2, 5, 6))
  return x.reshape(nt * pt, nh * ph, nw * pw, c)


def unpack_row(tokens_ld, segment_ids_l, seg_grid_s3, patch: Sequence[int] = (1, 2, 2)) -> list:
  """The latents of every segment of one packed row, in segment-id order (1, 2, ...).

  Tokens of segment k+1 are gathered in row order (the packer keeps each sample contiguous and in
  patchify order) and reshaped with that segment's grid `seg_grid[k]`.
  """
  segment_ids_l = np.asarray(segment_ids_l)
  out = []
  for k, grid in enumerate(np.asarray(seg_grid_s3)):
    if not grid.any():
      break
    out.append(unpatchify(tokens_ld[segment_ids_l == k + 1], grid, patch))
  return out
