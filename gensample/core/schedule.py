"""VP noise-schedule math (DDPM, Ho et al. 2020, arXiv 2006.11239, eq. 4; zero terminal SNR,
Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

Pure torch; no diffusers import. Conventions follow diffusers' scheduler configs so any
`scheduler.config` (DDPM/DDIM/DPMSolver/Euler) maps to the same tables:

| code name          | paper symbol                         |
|--------------------|--------------------------------------|
| ``betas[t]``       | beta_t, t = 0..T-1                   |
| ``alphas_cumprod`` | alpha_bar_t = prod_{s<=t}(1-beta_s)  |
| ``sigma``          | sqrt(1 - alpha_bar)                  |
| ``log_snr``        | lambda = log(alpha_bar / (1-alpha_bar)) |

Continuous schedules (``Schedule``, ``VPSchedule``, ``FlowSchedule``, ``schedule_for``): methods see a
grid of model times with float64 alpha_bars, whether the model is a VP table or a flow-matching model
seen through its VP twin (``core.flow``; docs/flow_matching.md "The schedule in core").
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """Improved-DDPM cosine alpha_bar(s) on s in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """beta_t, t = 0..T-1, float64, with the same rules as diffusers' DDPM/DDIM schedulers."""
    if trained_betas is not None:
        betas = torch.as_tensor(list(trained_betas), dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError("trained_betas must be a non-empty 1-D sequence")
        return betas
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = torch.arange(T + 1, dtype=torch.float64) / T
        ab = cosine_alpha_bar(s)
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(alpha_bar) so the last value is 0 (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_bar_t (float64, length T) from any diffusers VP scheduler config (dict or FrozenDict)."""
    get = config.get
    betas = make_betas(
        num_train_timesteps=get("num_train_timesteps", 1000),
        beta_start=get("beta_start", 1e-4),
        beta_end=get("beta_end", 0.02),
        beta_schedule=get("beta_schedule", "linear"),
        trained_betas=get("trained_betas", None),
    )
    if get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0)


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """alpha_bar at (possibly fractional) discrete time t in [0, T-1], by linear interpolation
    of log alpha_bar; t < 0 returns 1 (the clean end). Output float64, shape of t."""
    ab = alphas_cumprod.double()
    t = torch.as_tensor(t, dtype=torch.float64, device=ab.device)
    T = ab.numel()
    tc = t.clamp(0, T - 1)
    lo = tc.floor().long().clamp(max=T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    frac = tc - lo.double()
    log_ab = ab.log()
    # an end point with alpha_bar = 0 (zero terminal SNR) has log alpha_bar = -inf: weight it only where its
    # weight is non-zero (-inf * 0 would be NaN), so alpha_bar_at(T - 1) is exactly 0 and the rest exactly as before
    lo_term = torch.where(frac < 1, log_ab[lo] * (1 - frac), torch.zeros_like(frac))
    hi_term = torch.where(frac > 0, log_ab[hi] * frac, torch.zeros_like(frac))
    out = torch.exp(lo_term + hi_term)
    return torch.where(t < 0, torch.ones_like(out), out)


def continuous_alpha_bar(alphas_cumprod: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """alpha_bar(u) for continuous u in [0, 1], u = t / (T - 1) (u = 0 clean end, u = 1 noise end)."""
    T = alphas_cumprod.numel()
    return alpha_bar_at(alphas_cumprod, torch.as_tensor(u, dtype=torch.float64) * (T - 1))


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    return (1 - alpha_bar).clamp(min=0).sqrt()


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_bar / (1 - alpha_bar)); +inf at alpha_bar = 1, -inf at 0."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ab.log() - torch.log1p(-ab)


def timestep_from_log_snr(alphas_cumprod: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Fractional discrete time whose log-SNR is lam: the exact inverse of log_snr(alpha_bar_at(.)),
    found in the same log alpha_bar space that alpha_bar_at interpolates linearly."""
    log_ab = alphas_cumprod.double().log()  # (T,) decreasing in t
    lam = torch.as_tensor(lam, dtype=torch.float64)
    target = torch.nn.functional.logsigmoid(lam)  # log alpha_bar
    inc = -log_ab  # increasing
    q = (-target).clamp(inc[0], inc[-1])
    idx = torch.searchsorted(inc, q).clamp(1, inc.numel() - 1)
    lo, hi = inc[idx - 1], inc[idx]
    frac = ((q - lo) / (hi - lo).clamp(min=1e-300)).clamp(0, 1)
    return (idx - 1).double() + frac


def expand_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against x (B, ...)."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


# -- continuous schedules: one interface for VP tables and flows -------------------------------
class Schedule:
    """A noise schedule as methods see it: alpha_bar at a *model time* (the time the network is
    called with), the inference grid of N steps, and the model time of a noise level. Two
    implementations: ``VPSchedule`` (a betas table, integer training timesteps t in [0, T-1],
    fractional t by log-linear interpolation) and ``FlowSchedule`` (a flow-matching model seen
    through its VP twin: model time t = sigma * T, alpha_bar = (1 - sigma)^2 / ((1 - sigma)^2 +
    sigma^2); ``core.flow``). Samplers obtain one from ``schedule_for`` and never branch on which.

    num_train_timesteps: T. ``fraction(t)`` = t / T in [0, 1] (1 = the noise end) for windows
    stated as fractions of the path.
    """

    kind = "vp"
    num_train_timesteps: int = 1000

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at model time(s) t (scalar or (B,)); float64, shape of t."""
        raise NotImplementedError

    def grid(self, steps: int) -> torch.Tensor:
        """(steps,) descending model times of an N-step run (the pipeline's own grid)."""
        raise NotImplementedError

    def final_alpha_bar(self) -> float:
        """alpha_bar after the last grid step (1: the clean end)."""
        return 1.0

    def alpha_bar_pairs(self, timesteps, final_alpha_bar: float | None = None):
        """(alpha_bar at each grid time, at the next one; the final value after the last), float64 (S,) each."""
        ts = torch.as_tensor(timesteps).cpu()
        ab_t = self.alpha_bar(ts).double().reshape(-1)
        last = self.final_alpha_bar() if final_alpha_bar is None else float(final_alpha_bar)
        return ab_t, torch.cat([ab_t[1:], torch.tensor([last], dtype=torch.float64)])

    def time_of_alpha_bar(self, alpha_bar) -> torch.Tensor:
        """The (fractional) model time whose alpha_bar is the given value; float64."""
        raise NotImplementedError

    def fraction(self, t) -> float:
        return float(t) / self.num_train_timesteps


class VPSchedule(Schedule):
    """A VP betas table (``alphas_cumprod_from_config``) with diffusers' DDIM grid rules
    (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``). Integer times index the table
    exactly (bit-equal to ``alphas_cumprod[t]``); fractional ones interpolate (``alpha_bar_at``)."""

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, config: Mapping[str, Any] | None = None):
        self.alphas_cumprod = alphas_cumprod.double()
        self.config = dict(config or {})
        self.num_train_timesteps = int(self.alphas_cumprod.numel())

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "VPSchedule":
        return cls(alphas_cumprod_from_config(config), config)

    def alpha_bar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        table = self.alphas_cumprod.to(t.device)
        if bool((t >= 0).all()) and (not t.is_floating_point() or bool((t == t.round()).all())):
            return table[t.long().clamp(max=self.num_train_timesteps - 1)]
        return alpha_bar_at(table, t.double() if not t.is_floating_point() else t)  # fractional, or < 0: past the end

    def grid(self, steps: int) -> torch.Tensor:
        from .ddim import timestep_grid

        get = self.config.get
        return timestep_grid(self.num_train_timesteps, int(steps), get("timestep_spacing", "leading"),
                             int(get("steps_offset", 0)))

    def final_alpha_bar(self) -> float:
        return 1.0 if self.config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])

    def time_of_alpha_bar(self, alpha_bar) -> torch.Tensor:
        return timestep_from_log_snr(self.alphas_cumprod, log_snr(torch.as_tensor(alpha_bar, dtype=torch.float64)))


class FlowSchedule(Schedule):
    """A flow-matching model's schedule through its VP twin (``core.flow``): model time t = sigma T
    (T = ``num_train_timesteps``), alpha_bar(t) = twin_alpha_bar(t / T); the grid is
    FlowMatchEulerDiscreteScheduler's (``flow_sigmas`` with the run's ``mu`` and optional base
    ``sigmas`` callable steps -> list, as Flux pipelines pass). Grid times are float32, as the
    stock scheduler's; ``sigma_of`` maps a grid time back to its float32 sigma exactly."""

    kind = "flow"

    def __init__(self, config: Mapping[str, Any], mu: float | None = None, base_sigmas=None):
        self.config = dict(config)
        self.mu = mu
        self.base_sigmas = base_sigmas
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self._sigma_of: dict[float, float] = {}

    def sigmas(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (N + 1,), timesteps (N,)) float32, ``core.flow.flow_sigmas``."""
        from .flow import flow_sigmas

        base = self.base_sigmas(int(steps)) if callable(self.base_sigmas) else None
        sig, ts = flow_sigmas(self.config, int(steps), self.mu, base)
        self._sigma_of.update({float(t): float(s) for t, s in zip(ts.tolist(), sig[:-1].tolist())})
        return sig, ts

    def grid(self, steps: int) -> torch.Tensor:
        return self.sigmas(steps)[1]

    def sigma_of(self, t) -> torch.Tensor:
        """sigma of model time(s) t: the grid's own float32 sigma for a grid time, else t / T. float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        flat = [self._sigma_of.get(float(v), float(v) / self.num_train_timesteps) for v in t.reshape(-1).tolist()]
        return torch.tensor(flat, dtype=torch.float64, device=t.device).reshape(t.shape)

    def alpha_bar(self, t) -> torch.Tensor:
        from .flow import twin_alpha_bar

        return twin_alpha_bar(self.sigma_of(t))

    def time_of_alpha_bar(self, alpha_bar) -> torch.Tensor:
        from .flow import sigma_of_alpha_bar

        return sigma_of_alpha_bar(torch.as_tensor(alpha_bar, dtype=torch.float64)) * self.num_train_timesteps

    def fraction(self, t) -> float:
        return float(self.sigma_of(t))


def schedule_for(config: Mapping[str, Any], prediction_type: str = "epsilon", mu: float | None = None,
                 base_sigmas=None) -> Schedule:
    """The one place a sampler gets its schedule: ``FlowSchedule`` for a flow model
    (prediction_type "flow", or a FlowMatch scheduler config), else ``VPSchedule`` of the betas table."""
    from .flow import is_flow_config

    if prediction_type == "flow" or is_flow_config(config):
        return FlowSchedule(config, mu, base_sigmas)
    return VPSchedule.from_config(config)


def model_schedule(model, event_shape=None) -> Schedule:
    """``schedule_for`` of a LoadedModel: its scheduler config and prediction type, and for a flow
    model the run resolution's dynamic-shift mu (``extras["sigma_mu"](event_shape)``) and optional
    base sigmas (``extras["flow_base_sigmas"](steps)``; Flux pipelines pass linspace(1, 1/N, N))."""
    extras = getattr(model, "extras", {}) or {}
    mu = None
    if model.prediction_type == "flow" and callable(extras.get("sigma_mu")):
        mu = extras["sigma_mu"](tuple(event_shape if event_shape is not None else model.event_shape))
    return schedule_for(model.scheduler_config, model.prediction_type, mu, extras.get("flow_base_sigmas"))


def as_schedule(schedule_or_table) -> Schedule:
    """A Schedule as is; a VP alpha_bar table (T,) wrapped in a ``VPSchedule`` (the old sampler API)."""
    if isinstance(schedule_or_table, Schedule):
        return schedule_or_table
    return VPSchedule(torch.as_tensor(schedule_or_table))
