"""Spacetime patches: exact inverse, the documented token layout, and numpy/jax agreement."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sora_jax import patching


@settings(max_examples=40, deadline=None)
@given(pt=st.integers(1, 2), ph=st.integers(1, 3), pw=st.integers(1, 3),
       nt=st.integers(1, 4), nh=st.integers(1, 4), nw=st.integers(1, 4), c=st.integers(1, 5))
def test_unpatchify_inverts_patchify(pt, ph, pw, nt, nh, nw, c):
  rng = np.random.default_rng(nt * 100 + nh * 10 + nw)
  z = rng.standard_normal((nt * pt, nh * ph, nw * pw, c)).astype(np.float32)
  tokens, positions = patching.patchify(z, (pt, ph, pw))
  assert tokens.shape == (nt * nh * nw, pt * ph * pw * c)
  assert positions.dtype == np.int32 and positions.shape == (nt * nh * nw, 3)
  np.testing.assert_array_equal(patching.unpatchify(tokens, (nt, nh, nw), (pt, ph, pw)), z)


def test_token_layout_is_row_major_blocks():
  # Token i must be exactly the latent block at positions[i]: this is what samplers and the DiT's
  # position embedding rely on.
  pt, ph, pw = 1, 2, 2
  z = np.arange(3 * 4 * 6 * 2, dtype=np.float32).reshape(3, 4, 6, 2)
  tokens, positions = patching.patchify(z, (pt, ph, pw))
  assert positions[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
  for tok, (t, h, w) in zip(tokens, positions):
    block = z[t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
    np.testing.assert_array_equal(tok, block.reshape(-1))


def test_jax_arrays_match_numpy():
  import jax.numpy as jnp
  z = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
  tok_np, _ = patching.patchify(z, (2, 2, 3))
  tok_jx, _ = patching.patchify(jnp.asarray(z), (2, 2, 3))
  np.testing.assert_array_equal(np.asarray(tok_jx), tok_np)
  np.testing.assert_array_equal(np.asarray(patching.unpatchify(tok_jx, (1, 2, 2), (2, 2, 3))), z)


def test_bad_shapes_raise_one_line_errors():
  with pytest.raises(ValueError, match="not divisible by patch"):
    patching.patchify(np.zeros((1, 3, 4, 2), np.float32), (1, 2, 2))
  with pytest.raises(ValueError, match="do not fit grid"):
    patching.unpatchify(np.zeros((5, 8), np.float32), (1, 2, 2), (1, 2, 2))
