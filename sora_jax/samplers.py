"""Time grids and ODE solvers for the rectified flow, as pure functions (no models, no packing).

Conventions (diffusion.py): sigma = t in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps, the model predicts
v = eps - x0, and the DiT embeds t * 1000, which is diffusers' `timestep = sigma * num_train_timesteps`.

A grid is K + 1 sigmas from (about) 1 down to exactly 0, one per step boundary; the solver takes K steps
and calls the model K times (Heun: up to 2K). `sigma_grid(steps, kind, shift)` makes one:
- "uniform" (sora-jax's): u = linspace(1, 0, K + 1), sigma = shift(u).
- "flow_match": what diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(K) gives: K points
  linspace(1, shift(1 / 1000), K), each shifted (so the last non-zero sigma is shifted twice: the training
  table it starts from is already shifted), then a terminal 0.
- "unipc": what diffusers' UniPCMultistepScheduler.set_timesteps(K) gives with use_flow_sigmas:
  linspace(1, 1 / 1000, K + 1) without its last point, shifted, the first lowered by 1e-6 (so that
  log(1 - sigma) is finite), then a terminal 0. The model sees floor(1000 sigma) / 1000, not sigma:
  diffusers casts these timesteps to int64 (`model_times`).
`shift` is any increasing map of [0, 1] onto itself (diffusion.time_shift with a segment's token count,
or `shift(u, a)` with a constant a as in Wan); a packed row holds one grid per segment.

Solvers, given sigmas broadcastable to x (per segment, gathered to tokens by the caller):
- `euler_step`: x + (sigma_next - sigma) v, diffusers' FlowMatchEulerDiscreteScheduler.step.
- UniPC (Zhao et al. 2023), diffusers' UniPCMultistepScheduler for flow_prediction with predict_x0:
  a multistep predictor (UniP) and corrector (UniC) on the data estimates m = x - sigma v, in the
  log-SNR variable lambda = log((1 - sigma) / sigma). Both are linear in the current sample, the
  previous sample and the last few m, with coefficients that depend only on the grid, so
  `unipc_tables` computes them once per grid (numpy, float64) and `unipc_update` applies one step.
  One difference: at the last step to sigma = 0, diffusers' "bh1" variant gives NaN (B(h) = -h = -inf
  times a zero term); here it gives the limit, the data estimate, as "bh2" does in both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

GRIDS = ("uniform", "flow_match", "unipc")
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' timestep = sigma * 1000
UNIPC_MAX_SIGMA = 1.0 - 1e-6  # lambda = log((1 - sigma) / sigma) must be finite where the model is called


def shift(u, a):
  """SD3's time shift u -> a u / (1 + (a - 1) u): a > 1 moves every step towards noise; a = 1 is the identity.

  Computed in u's precision (numpy), as diffusers computes its float32 training table and float64 steps.
  """
  u = np.asarray(u)
  if not np.issubdtype(u.dtype, np.floating):
    u = u.astype(np.float64)
  a = u.dtype.type(a)
  return a * u / (1 + (a - 1) * u)


def sigma_grid(steps: int, kind: str = "uniform", shift_fn: Callable | None = None) -> np.ndarray:
  """float64 [steps + 1]: the sigmas of grid `kind` (see the module docstring), ending at exactly 0.

  Their float32 roundings are diffusers' `scheduler.sigmas` for the "flow_match" and "unipc" kinds.
  `shift_fn(u)` maps unshifted times to shifted ones in their precision (None: no shift).
  """
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps {steps} is not accepted: use a positive integer")
  fn = (lambda u: u) if shift_fn is None else shift_fn
  sh = lambda u: np.asarray(fn(np.asarray(u, np.float64)), np.float64).reshape(np.shape(u))
  if kind == "uniform":
    t = sh(np.linspace(1.0, 0.0, steps + 1)).copy()
    t[0], t[-1] = 1.0, 0.0  # a float32 shift need not hit the end points exactly
    return t
  n = NUM_TRAIN_TIMESTEPS
  if kind == "flow_match":
    # The scheduler's training table is already shifted: its smallest sigma is shift(1 / n), computed in
    # float32, and set_timesteps spaces the steps evenly (in timesteps) down to it before shifting again.
    low, high = (float(np.asarray(fn(np.full(1, v, np.float32)), np.float32)[0]) for v in (1.0 / n, 1.0))
    u = np.linspace(high * n, low * n, steps) / n
    return np.concatenate([sh(u), [0.0]])
  if kind == "unipc":
    t = sh(np.linspace(1.0, 1.0 / n, steps + 1)[:-1]).copy()
    if abs(t[0] - 1.0) < 1e-6:
      t[0] -= 1e-6  # as UNIPC_MAX_SIGMA
    return np.concatenate([t, [0.0]])
  raise ValueError(f"time grid {kind!r} is unknown; accepted: {list(GRIDS)}")


def model_times(sigmas: np.ndarray, kind: str = "uniform") -> np.ndarray:
  """The times the model sees at `sigmas` (float64, same shape): sigma itself, except on the "unipc"
  grid, where diffusers hands the model int64 timesteps, floor(1000 sigma), taken before the float32 cast."""
  sigmas = np.asarray(sigmas, np.float64)
  if kind == "unipc":
    n = NUM_TRAIN_TIMESTEPS
    return np.trunc(sigmas * n) / n
  if kind not in GRIDS:
    raise ValueError(f"time grid {kind!r} is unknown; accepted: {list(GRIDS)}")
  return sigmas


def euler_step(x, v, sigma, sigma_next):
  """One Euler step of dx/dsigma = v from sigma to sigma_next."""
  return x + (sigma_next - sigma) * v


# ----------------------------------------------------------------------------------------------------
# UniPC


@dataclasses.dataclass(frozen=True)
class UniPC:
  """The settings of diffusers' UniPCMultistepScheduler that change the result; the defaults are those
  of the published Wan 2.1 diffusers folders (scheduler/scheduler_config.json)."""
  order: int = 2                      # solver_order
  variant: str = "bh2"                # solver_type: B(h) = e^h - 1 ("bh2") or h ("bh1")
  lower_order_final: bool = True      # first order at the last step (and order <= steps left)
  disable_corrector: tuple[int, ...] = ()  # steps whose result the next step does not correct

  def __post_init__(self):
    if not isinstance(self.order, (int, np.integer)) or self.order < 1:
      raise ValueError(f"UniPC order {self.order} is not accepted: use a positive integer (Wan: 2)")
    if self.variant not in ("bh1", "bh2"):
      raise ValueError(f"UniPC variant {self.variant!r} is unknown; accepted: 'bh1', 'bh2'")

  @classmethod
  def of(cls, settings) -> UniPC:
    """From a config section (or dict) with any of order, variant, lower_order_final, disable_corrector."""
    if isinstance(settings, UniPC):
      return settings
    got = dict(settings or {})
    unknown = sorted(set(got) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"sample.unipc keys {unknown} are unknown; accepted: order, variant, "
                       "lower_order_final, disable_corrector")
    if "disable_corrector" in got:
      got["disable_corrector"] = tuple(int(k) for k in got["disable_corrector"])
    return cls(**got)

  def orders(self, steps: int) -> list[int]:
    """The predictor's order at each step: it warms up from 1 as the history fills."""
    return [min(self.order, k + 1, steps - k if self.lower_order_final else self.order) for k in range(steps)]


@dataclasses.dataclass
class UniPCTables:
  """Per-step coefficients (float32) of UniPC on one grid per segment; arrays [K, ...] or [K, J, ...],
  with `...` the shape of the grid's segment axes and J = order + 1 slots for m_k, m_{k-1}, ..., m_{k-order}.

  `sigmas` [K + 1, ...] are the grid's, at most UNIPC_MAX_SIGMA (a grid starting at 1, such as "uniform",
  starts 1e-6 below it, as diffusers' own). Step k, with m_k = x_k - sigma_k v_k from the model:
      corrected x_k = keep x_k + prev x_{k-1} + sum_j corr[j] m_{k-j}      (UniC; keep = 1 at k = 0)
      x_{k+1}       = scale x_k + sum_j pred[j] m_{k-j}                    (UniP, from the corrected x_k)
  """
  sigmas: np.ndarray
  keep: np.ndarray
  prev: np.ndarray
  corr: np.ndarray
  scale: np.ndarray
  pred: np.ndarray

  def at(self, k: int) -> dict[str, np.ndarray]:
    """Step k's coefficients, for `unipc_update`."""
    return {name: getattr(self, name)[k] for name in ("keep", "prev", "corr", "scale", "pred")}


def _b_terms(hh, order: int, variant: str):
  """(phi_1 h, B(h), [b_1 .. b_order]) of the B(h) update, elementwise in hh = -h."""
  h_phi_1 = np.expm1(hh)
  bh = h_phi_1 if variant == "bh2" else hh
  b, phi, fact = [], h_phi_1 / hh - 1.0, 1
  for i in range(1, order + 1):
    b.append(phi * fact / bh)
    fact *= i + 1
    phi = phi / hh - 1.0 / fact
  return h_phi_1, bh, b


def _solve(rks, b):
  """rho with sum_j rho_j rk_j^(i-1) = b_i, i = 1..n (the B(h) order conditions), elementwise."""
  n = len(b)
  mat = np.stack([np.stack([r ** i for r in rks], -1) for i in range(n)], -2)
  return list(np.moveaxis(np.linalg.solve(mat, np.stack(b, -1)[..., None])[..., 0], -1, 0))


def _update(sig, lam, s0, t, hist, order, variant, corrector):
  """Coefficients (scale on the start sample, [coef of m_{s0}, then of the older m]) of one UniP
  (corrector=False: from sigma[s0] to sigma[t] with the m at s0 and before) or UniC step."""
  alpha_t = 1.0 - sig[t]
  h = lam[t] - lam[s0]
  hh = -h
  h_phi_1, bh, b = _b_terms(hh, order, variant)
  rks = [(lam[i] - lam[s0]) / h for i in hist] + [np.ones_like(h)]
  if corrector:
    rho = [np.full_like(h, 0.5)] if order == 1 else _solve(rks, b)
  else:
    rho = [] if order == 1 else [np.full_like(h, 0.5)] if order == 2 else _solve(rks[:-1], b[:-1])
  # x_t = (sigma_t / sigma_s0) x - alpha_t phi_1 m_s0 - alpha_t B sum_i rho_i (m_i - m_s0) / rk_i,
  # where the corrector's last term is rho_last (m_t - m_s0) (rk = 1).
  older = [-alpha_t * bh * rho[j] / rks[j] for j in range(len(hist))]
  newest = -alpha_t * bh * rho[-1] if corrector else None
  m_s0 = -alpha_t * h_phi_1 - sum(older) - (newest if corrector else 0.0)
  return sig[t] / sig[s0], m_s0, older, newest


def unipc_tables(sigmas: np.ndarray, settings: UniPC = UniPC()) -> UniPCTables:
  """The coefficients of every step of UniPC on grids `sigmas` [K + 1, ...] (one grid per trailing index).

  Computed in float64 from the float32 sigmas the solver runs on (as diffusers does, so that
  1 - sigma at the first step is the same number). Grids that are all 0 (unused segment slots) get the
  identity.
  """
  run = np.minimum(np.asarray(sigmas, np.float64), UNIPC_MAX_SIGMA).astype(np.float32)
  sig = run.astype(np.float64)
  steps, shape = sig.shape[0] - 1, sig.shape[1:]
  if steps < 1:
    raise ValueError(f"a grid of {steps + 1} sigmas has no steps: give at least 2")
  unused = ~(sig[0] > 0)
  sig = np.where(unused, np.linspace(0.5, 0.0, steps + 1).reshape((-1,) + (1,) * len(shape)), sig)
  p = settings.order
  orders = settings.orders(steps)
  if orders[-1] > 1 and np.any(sig[-1] == 0):
    raise ValueError(f"UniPC of order {orders[-1]} at the last step diverges at sigma = 0: set "
                     "lower_order_final (as diffusers' default does)")
  keep, prev, corr = np.ones((steps,) + shape), np.zeros((steps,) + shape), np.zeros((steps, p + 1) + shape)
  scale, pred = np.zeros((steps,) + shape), np.zeros((steps, p + 1) + shape)
  # The last step's lambda is inf (sigma = 0): the B(h) terms take their limits there (e^-inf = 0).
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.log(1.0 - sig) - np.log(sig)
    for k in range(steps):
      q = orders[k]
      scale[k], pred[k, 0], older, _ = _update(sig, lam, k, k + 1, [k - i for i in range(1, q)], q,
                                               settings.variant, False)
      for j, c in enumerate(older, 1):
        pred[k, j] = c
      if k == 0 or (k - 1) in settings.disable_corrector:
        continue
      q = orders[k - 1]
      prev[k], corr[k, 1], older, corr[k, 0] = _update(sig, lam, k - 1, k, [k - 1 - i for i in range(1, q)],
                                                       q, settings.variant, True)
      keep[k] = 0.0
      for j, c in enumerate(older, 2):
        corr[k, j] = c
  for arr, identity in ((keep, 1.0), (prev, 0.0), (corr, 0.0), (scale, 1.0), (pred, 0.0)):
    arr[..., unused] = identity
  tables = UniPCTables(run, keep, prev, corr, scale, pred)
  for f in dataclasses.fields(tables):
    v = getattr(tables, f.name)
    if not np.isfinite(v).all():
      raise ValueError(f"UniPC coefficients {f.name} are not finite on this grid: sigmas must decrease "
                       "strictly from below 1 while they are positive")
    setattr(tables, f.name, v.astype(np.float32))
  return tables


def unipc_update(x, v, sigma, x_prev, history, coef: dict):
  """One UniPC step: (x_next, x_corrected, m) from the sample x at `sigma` and the model's v there.

  x_prev: the previous step's corrected sample; history: the previous data estimates, newest first
  (a sequence of `order` arrays like x, zeros before the first step); coef: `UniPCTables.at(k)` with each
  array broadcastable to x (e.g. gathered per token). The caller keeps (x_corrected, [m] + history[:-1]).
  """
  m = x - sigma * v
  ms = [m] + list(history)
  x_c = coef["keep"] * x + coef["prev"] * x_prev + sum(coef["corr"][j] * ms[j] for j in range(len(ms)))
  x_next = coef["scale"] * x_c + sum(coef["pred"][j] * ms[j] for j in range(len(ms)))
  return x_next, x_c, m
