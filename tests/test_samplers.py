"""Time grids and solvers (sora_jax/samplers.py) on problems with known answers; no torch needed.

tests/test_samplers_interop.py checks the same functions against diffusers' schedulers themselves.
"""
import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax import diffusion
from sora_jax import samplers as SM

MU, SIGMA = 0.7, 0.5


def gaussian_velocity(x, t):
  """E[eps - x0 | x_t] for x0 ~ N(MU, SIGMA^2): the exact flow, whose ODE maps eps to MU + SIGMA eps."""
  var = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
  return -MU + (t - (1 - t) * SIGMA ** 2) / var * (x - (1 - t) * MU)


def run_unipc(sigmas, velocity, x, settings=SM.UniPC()):
  """The sampling loop of sampling.denoise, without packing: one model call per step."""
  tables = SM.unipc_tables(sigmas, settings)
  s = tables.sigmas.astype(np.float64)
  x_prev, history = np.zeros_like(x), [np.zeros_like(x)] * settings.order
  for k in range(len(s) - 1):
    x, x_prev, m = SM.unipc_update(x, velocity(x, s[k]), s[k], x_prev, history, tables.at(k))
    history = [m] + history[:-1]
  return x


def run_euler(sigmas, velocity, x):
  for k in range(len(sigmas) - 1):
    x = SM.euler_step(x, velocity(x, sigmas[k]), sigmas[k], sigmas[k + 1])
  return x


@pytest.mark.parametrize("kind", SM.GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_grids_start_at_one_end_at_zero_and_strictly_decrease(kind, steps, shift):
  sig = SM.sigma_grid(steps, kind, lambda u: SM.shift(u, shift))
  assert sig.shape == (steps + 1,) and sig[-1] == 0.0
  assert sig[0] == (1.0 - 1e-6 if kind == "unipc" else 1.0)
  assert (np.diff(sig.astype(np.float32)) < 0).all(), sig
  t = SM.model_times(sig, kind)
  if kind == "unipc":  # diffusers' int64 timesteps: floor(1000 sigma)
    np.testing.assert_array_equal(t * 1000, np.round(t * 1000))
    assert ((t <= sig) & (sig < t + 1e-3)).all()
  else:
    np.testing.assert_array_equal(t, sig)


def test_flow_match_grid_shifts_its_smallest_sigma_twice():
  # diffusers' FlowMatchEulerDiscreteScheduler spaces its steps down to its (shifted) training table's
  # smallest sigma and then shifts them all: the last non-zero sigma is shift(shift(1/1000)).
  for steps, a in ((4, 3.0), (10, 5.0)):
    sig = SM.sigma_grid(steps, "flow_match", lambda u: SM.shift(u, a))
    assert sig[-2] == pytest.approx(SM.shift(SM.shift(1e-3, a), a), rel=1e-6)
    unipc = SM.sigma_grid(steps, "unipc", lambda u: SM.shift(u, a))
    assert unipc[-2] == pytest.approx(SM.shift(1 / steps * (1 - 1e-3) + 1e-3, a), rel=1e-9)
  # Unshifted, the unipc grid is linspace(1, 1/1000, K + 1) without its last point, then 0.
  np.testing.assert_allclose(SM.sigma_grid(3, "unipc")[1:], [2 / 3 + 1 / 3000, 1 / 3 + 2 / 3000, 0.0])


def test_uniform_grid_is_the_old_schedule():
  shift = lambda u: (a := 2.0) * u / (1 + (a - 1) * u)
  np.testing.assert_array_equal(SM.sigma_grid(8, "uniform", shift), shift(np.linspace(1.0, 0.0, 9)))
  np.testing.assert_array_equal(SM.sigma_grid(8), np.linspace(1.0, 0.0, 9))


def test_constant_shift_rule_ignores_the_token_count():
  d = dict(time_shift=True, shift_scale=3.0, shift_ref_tokens=16)
  cfg = lambda **kw: config_lib.complete(ml_collections.ConfigDict(dict(diffusion={**d, **kw})))
  t = np.linspace(0.0, 1.0, 11, dtype=np.float32)
  const = cfg(shift_rule="constant")
  for n in (1.0, 16.0, 4096.0):
    np.testing.assert_allclose(diffusion.time_shift(t, np.float32(n), const), SM.shift(t, 3.0), rtol=1e-6)
  # The default (and "tokens") rule is the old one: a = shift_scale * sqrt(n / ref).
  for c in (cfg(), cfg(shift_rule="tokens")):
    np.testing.assert_allclose(diffusion.time_shift(t, np.float32(64.0), c), SM.shift(t, 6.0), rtol=1e-6)
  np.testing.assert_array_equal(diffusion.time_shift(t, np.float32(64.0), cfg(time_shift=False)), t)
  with pytest.raises(ValueError, match="shift_rule='exponential' is unknown; accepted"):
    diffusion.time_shift(t, np.float32(1.0), cfg(shift_rule="exponential"))


@pytest.mark.parametrize("kind", SM.GRIDS)
def test_both_solvers_are_exact_on_a_straight_flow(kind):
  # One data point: the flow is a straight line, v = eps - x0 everywhere on it, and the data estimate
  # m = x - sigma v is x0 at every step, which both solvers must follow to the end exactly.
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 64))
  v = lambda x, t: (x - x0) / t  # = eps - x0 on the path x = (1 - t) x0 + t eps
  sig = SM.sigma_grid(7, kind, lambda u: SM.shift(u, 3.0))
  on_path = lambda s: (1 - s) * x0 + s * eps  # the unipc grid starts at 1 - 1e-6, not at eps
  np.testing.assert_allclose(run_euler(sig, lambda x, t: eps - x0, on_path(sig[0])), x0, atol=1e-12)
  s0 = float(SM.unipc_tables(sig).sigmas[0])
  np.testing.assert_allclose(run_unipc(sig, v, on_path(s0)), x0, atol=1e-6)


def test_unipc_is_higher_order_and_euler_first_order():
  x = np.random.default_rng(0).normal(size=1000)
  exact = MU + SIGMA * x
  err = {}
  for steps in (20, 40):
    sig = SM.sigma_grid(steps, "unipc", lambda u: SM.shift(u, 3.0))
    err["euler", steps] = np.abs(run_euler(sig, gaussian_velocity, x) - exact).max()
    err["unipc", steps] = np.abs(run_unipc(sig, gaussian_velocity, x) - exact).max()
  # Doubling the steps: / 2 for Euler, at least / 4 for UniPC (second order; its corrector adds one).
  assert 1.6 < err["euler", 20] / err["euler", 40] < 2.5, err
  assert err["unipc", 20] / err["unipc", 40] > 4.0, err
  assert err["unipc", 40] < err["euler", 40] / 10, err


def test_unipc_orders_warm_up_and_end_low():
  assert SM.UniPC().orders(6) == [1, 2, 2, 2, 2, 1]
  assert SM.UniPC().orders(1) == [1]
  assert SM.UniPC(order=3).orders(6) == [1, 2, 3, 3, 2, 1]
  assert SM.UniPC(order=3, lower_order_final=False).orders(4) == [1, 2, 3, 3]
  with pytest.raises(ValueError, match="diverges at sigma = 0"):
    SM.unipc_tables(SM.sigma_grid(4, "unipc"), SM.UniPC(lower_order_final=False))
  with pytest.raises(ValueError, match="order 0 is not accepted"):
    SM.UniPC(order=0)
  with pytest.raises(ValueError, match="keys \\['solver_order'\\] are unknown"):
    SM.UniPC.of({"solver_order": 2})
  assert SM.UniPC.of({"order": 3, "disable_corrector": [0, 1]}) == SM.UniPC(order=3, disable_corrector=(0, 1))


def test_per_segment_tables_equal_one_grid_at_a_time():
  # A packed row's segments have grids of their own (token-count shifts, SDEdit strengths; unused slots
  # are all 0): the tables of the stacked grids [K + 1, R, S] are those of each grid alone.
  steps = 6
  grids = [SM.sigma_grid(steps, "unipc", lambda u: SM.shift(u, 3.0)),
           SM.sigma_grid(steps, "uniform", lambda u: SM.shift(u, 1.7)) * 0.6,
           np.zeros(steps + 1),
           SM.sigma_grid(steps, "flow_match", lambda u: SM.shift(u, 5.0))]
  packed = SM.unipc_tables(np.stack(grids, -1).reshape(steps + 1, 2, 2))
  for s, g in enumerate(grids):
    alone = SM.unipc_tables(g) if g[0] > 0 else None
    for name in ("sigmas", "keep", "prev", "corr", "scale", "pred"):
      got = getattr(packed, name)[..., s // 2, s % 2]
      if alone is not None:
        np.testing.assert_array_equal(got, getattr(alone, name), err_msg=f"{name} of grid {s}")
  # An unused slot is left alone: keep x, no correction, scale 1, no data term.
  unused = {k: v[..., 1, 0] for k, v in vars(packed).items()}
  assert (unused["keep"] == 1).all() and (unused["scale"] == 1).all()
  assert not unused["prev"].any() and not unused["corr"].any() and not unused["pred"].any()


def test_unknown_grid_fails_with_one_line():
  for fn in (lambda: SM.sigma_grid(4, "karras"), lambda: SM.model_times(np.ones(2), "karras")):
    with pytest.raises(ValueError) as e:
      fn()
    assert "'karras' is unknown; accepted: ['uniform', 'flow_match', 'unipc']" in str(e.value)
  with pytest.raises(ValueError, match="steps 0 is not accepted"):
    SM.sigma_grid(0)
