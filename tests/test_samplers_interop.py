"""sora-jax's time grids and solvers give diffusers' schedulers' own numbers (Wan 2.1's samplers).

Grids: samplers.sigma_grid equals FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N) (the tiny Wan
test pipeline's scheduler) and UniPCMultistepScheduler in the flow configuration of the published Wan 2.1
diffusers folders, sigmas and timesteps, for N in (1, 4, 10, 50) and shift 3 (480p) and 5 (720p).

Solvers: a toy model (a channel-mixing linear map of x, a position pattern and a timestep-dependent term,
written once in torch and once in jnp) is sampled by diffusers' `scheduler.step` in WanPipeline's loop and
by sampling.denoise from the same initial noise, given in diffusers' layout through Request.noise; the
final latents agree to 1e-5 in float32. UniPC's other settings (order, B(h) variant, disabled correctors)
are checked on the pure solver functions.

Needs the `interop` extra (torch, diffusers): `make test-interop`.
"""
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.interop
_WHY = "needs the interop extra (torch, diffusers): pip install -e '.[interop]' or make test-interop"
torch = pytest.importorskip("torch", reason=_WHY)
diffusers = pytest.importorskip("diffusers", reason=_WHY)

from sora_jax import patching  # pylint: disable=wrong-import-position
from sora_jax import samplers as SM  # pylint: disable=wrong-import-position
from sora_jax import sampling as S  # pylint: disable=wrong-import-position

# scheduler/scheduler_config.json of the published Wan 2.1 diffusers folders (Wan-AI/Wan2.1-*-Diffusers),
# less the DDPM beta keys that use_flow_sigmas ignores. Wan's docs: flow_shift 3.0 at 480p, 5.0 at 720p.
WAN_UNIPC = dict(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                 predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
                 use_flow_sigmas=True, flow_shift=3.0, timestep_spacing="linspace", final_sigmas_type="zero",
                 thresholding=False)
STEPS = (1, 4, 10, 50)
SHIFTS = (3.0, 5.0)
GEO = S.Geometry(temporal=4, spatial=8, channels=4, patch=(1, 2, 2))
REQ = (9, 32, 48)  # frames, height, width: latents [C, T, H, W] = [4, 3, 4, 6], 18 tokens


def flow_match(shift):
  return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)


def unipc(shift, **kw):
  return diffusers.UniPCMultistepScheduler(**{**WAN_UNIPC, "flow_shift": shift, **kw})


def grid(kind, steps, shift):
  return SM.sigma_grid(steps, kind, lambda u: SM.shift(u, shift))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_grids_equal_diffusers(steps, shift):
  ref = flow_match(shift)
  ref.set_timesteps(steps)
  sig = grid("flow_match", steps, shift)
  np.testing.assert_allclose(sig.astype(np.float32), ref.sigmas.numpy(), atol=1e-6, rtol=0)
  # The DiT embeds t * 1000 in float32: with t the float32 sigma, that is diffusers' timestep.
  t = SM.model_times(sig, "flow_match")[:-1].astype(np.float32)
  np.testing.assert_array_equal(t * np.float32(1000), ref.timesteps.numpy())

  ref = unipc(shift)
  ref.set_timesteps(steps)
  sig = grid("unipc", steps, shift)
  np.testing.assert_allclose(sig.astype(np.float32), ref.sigmas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(SM.model_times(sig, "unipc")[:-1] * 1000, ref.timesteps.numpy())


def test_unipc_defaults_are_wans_published_settings():
  c = unipc(3.0).config
  want = SM.UniPC(order=c.solver_order, variant=c.solver_type, lower_order_final=c.lower_order_final,
                  disable_corrector=tuple(c.disable_corrector))
  assert SM.UniPC() == want


# ------------------------------------------------------------------------------ the toy model

def _toy_parts(channels):
  rng = np.random.default_rng(0)
  w = (-0.6 * np.eye(channels) + 0.2 * rng.normal(size=(channels, channels))).astype(np.float32)
  pattern = rng.normal(size=(channels,) + GEO.latent_shape(*REQ)[:3]).astype(np.float32)  # [C, T, H, W]
  bias = rng.normal(size=channels).astype(np.float32)
  return w, pattern, bias


def torch_toy(x, timestep):
  """v for diffusers' latents x [1, C, T, H, W] at `timestep` (the number the DiT embeds)."""
  w, pattern, bias = (torch.from_numpy(a) for a in _toy_parts(x.shape[1]))
  t = timestep.to(torch.float32)
  return (torch.einsum("ij,bjthw->bithw", w, x) + 0.5 * torch.tanh(x) + pattern[None] * torch.cos(t / 250.0)
          + bias[:, None, None, None] * (t / 1000.0))


def jax_toy(x, pos, seg, t_bs, tt, ts, *, cond=None, cond_mask=None, text_drop=None):
  """The same v for sora-jax's packed tokens x [R, L, D] (one request at the start of row 0)."""
  c = GEO.channels
  w, pattern, bias = _toy_parts(c)
  tokens, _ = patching.patchify(np.transpose(pattern, (1, 2, 3, 0)), GEO.patch)
  pat = jnp.zeros(x.shape[1:]).at[:tokens.shape[0]].set(tokens)
  t = S._per_token(t_bs, seg) * 1000.0  # the DiT's embedding input
  r, l, d = x.shape
  mixed = jnp.einsum("ij,rlpj->rlpi", w, x.reshape(r, l, d // c, c)).reshape(r, l, d)
  return mixed + 0.5 * jnp.tanh(x) + pat[None] * jnp.cos(t / 250.0) + jnp.tile(bias, d // c) * (t / 1000.0)


def diffusers_sample(scheduler, noise, steps, every_step=False):
  """WanPipeline's denoising loop (guidance 1) with the toy model: the final latents [C, T, H, W], or
  the latents after every step."""
  scheduler.set_timesteps(steps)
  scheduler.set_begin_index(0)
  x, seen = torch.from_numpy(noise)[None], []
  for t in scheduler.timesteps:
    x = scheduler.step(torch_toy(x, t.expand(1)), t, x, return_dict=False)[0]
    seen.append(x[0].numpy())
  return seen if every_step else seen[-1]


def sora_sample(kind, sampler, noise, steps, shift):
  req = S.Request("toy", *REQ, noise=np.transpose(noise, (1, 2, 3, 0)))
  packed = S.pack_requests([req], GEO, [[1]], seed=0, steps=steps, row_len=0, grid=kind,
                           shift_fn=lambda u, n: SM.shift(u, shift))
  (z,) = S.denoise(jax_toy, packed, sampler=sampler, guidance=1.0, seed=0)
  return np.transpose(z, (3, 0, 1, 2))


def _noise(seed=1):
  t, h, w, c = GEO.latent_shape(*REQ)
  return np.random.default_rng(seed).normal(size=(c, t, h, w)).astype(np.float32)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_on_the_flow_match_grid_equals_diffusers(steps, shift):
  noise = _noise()
  want = diffusers_sample(flow_match(shift), noise, steps)
  got = sora_sample("flow_match", "euler", noise, steps, shift)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want - noise).mean() > 0.1  # the toy moved the latents


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_equals_diffusers(steps, shift):
  noise = _noise()
  want = diffusers_sample(unipc(shift), noise, steps)
  got = sora_sample("unipc", "unipc", noise, steps, shift)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want - noise).mean() > 0.1


@pytest.mark.parametrize("settings", [
    dict(solver_order=1), dict(solver_order=3), dict(solver_type="bh1"),
    dict(solver_order=3, disable_corrector=[0, 3])])
def test_unipc_settings_equal_diffusers(settings):
  """The solver functions alone (diffusers' layout, one grid) under UniPC's other settings."""
  steps, shift = 10, 3.0
  ref = unipc(shift, **settings)
  mine = SM.UniPC(order=ref.config.solver_order, variant=ref.config.solver_type,
                  lower_order_final=ref.config.lower_order_final,
                  disable_corrector=tuple(ref.config.disable_corrector))
  noise = _noise(2)
  want = diffusers_sample(ref, noise, steps, every_step=True)
  sig = grid("unipc", steps, shift)
  tables = SM.unipc_tables(sig, mine)
  timesteps = SM.model_times(sig, "unipc") * 1000
  x = jnp.asarray(noise)[None]
  x_prev, history = jnp.zeros_like(x), [jnp.zeros_like(x)] * mine.order
  for k in range(steps):
    v = torch_toy(torch.tensor(np.asarray(x)), torch.tensor([timesteps[k]]))
    x, x_prev, m = SM.unipc_update(x, jnp.asarray(v.numpy()), jnp.float32(tables.sigmas[k]), x_prev,
                                   history, {n: jnp.asarray(c) for n, c in tables.at(k).items()})
    history = [m] + history[:-1]
    if k == steps - 1 and mine.variant == "bh1":
      # diffusers' bh1 multiplies B(h) = -h = -inf by a zero term at the step to sigma = 0: NaN. The
      # limit (here) is the data estimate m, as with bh2.
      assert np.isnan(want[k]).all() and np.isfinite(np.asarray(x)).all()
      np.testing.assert_array_equal(x, m)
      continue
    np.testing.assert_allclose(np.asarray(x)[0], want[k], atol=1e-5, rtol=0, err_msg=f"step {k}")


def test_unipc_without_lower_order_final_diverges_in_diffusers_too():
  # Why samplers.unipc_tables refuses it: a second-order last step to sigma = 0 divides by
  # lambda_s1 - lambda_s0 over an infinite h.
  with np.errstate(all="ignore"):
    want = diffusers_sample(unipc(3.0, lower_order_final=False), _noise(), 4)
  assert not np.isfinite(want).all()
  with pytest.raises(ValueError, match="diverges at sigma = 0"):
    SM.unipc_tables(grid("unipc", 4, 3.0), SM.UniPC(lower_order_final=False))
