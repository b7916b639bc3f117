"""Feynman-Kac Correctors with SMC resampling (FKC).

Skreta, Akhound-Sadegh, Ohanesian et al., "Feynman-Kac Correctors in Diffusion: Annealing,
Guidance, and Product of Experts", ICML 2025, arXiv 2503.02819 (the paper); our notes: docs/fkc.md.

Target path rho_t ~ prod_i q_{i,t}^{beta_i} (paper Sec. 3): annealing p^beta (one expert), products
p1*p2 (betas (1, 1)), geometric averages, CFG p(x|c)^w p(x)^(1-w) (betas (w, 1-w)).
Move: a DDIM step with eta^2 = c on eps_eff = sum_i beta_i eps_i (docs/fkc.md "Design choices"; eta = 1 is
the paper's "target score" DDPM step). Log-weight per step, Euler with the scores at the start of the
step (docs/fkc.md "Weight rules"; the default rule is ``logsnr``, see ``node_coefficients``):

    Delta log w_k = 1/2 (Delta_k / sigma_k^2) (||sum_i beta_i eps_i||^2 - sum_i beta_i ||eps_i||^2),
    Delta_k = log(alpha_bar_{k+1} / alpha_bar_k),  sigma_k^2 = 1 - alpha_bar_k.

No divergence term; initial noise N(0, I / B), B = sum_i beta_i.

| code name          | paper symbol                                         |
|--------------------|------------------------------------------------------|
| ``betas``          | beta_i, exponents of the experts                     |
| ``eps_experts``    | eps_i = eps_theta(x_k, t_k, c_i), stacked (M, N, ...) |
| ``eps_eff``        | sum_i beta_i eps_i (= -sigma S)                      |
| ``delta``          | Delta_k = int g^2 dtau over the step (VP)            |
| ``log_w``          | log-weights (G, K) float64 (paper Sec. 4, SMC)       |
| ``eta``            | sqrt(c), the free noise level of the simulated SDE   |
| ``ess``            | effective sample size per group                      |

Particles are a flat group-major batch of N = G * K rows (G groups of K particles); resampling
never crosses groups (core/smc.py). The DDIM move and the timestep grid are the shared ones of
``core.ddim``; the `gensample run --sampler fkc` glue (target resolution, experts, ESS plot) is in
``gensample.runs.fkc``. Sections: 1. parameters, 2. pure step functions, 3. the loop. The diffusers
face, ``FKCScheduler``, is in ``gensample.schedulers.fkc``; nothing here imports it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import _moved
from ..core import smc
from ..core.ddim import (alpha_bar_pairs, ddim_sigma, ddim_update, eps_from_v, eps_from_x0, timestep_grid, x0_from_eps,
                         x0_from_v)
from ..core.denoiser import check_finite
from ..core.noise import normal_like
from ..core.flow import eps_x0_from_velocity, sigma_of_alpha_bar, twin_to_flow
from ..core.param import PREDICTION_TYPES
from ..core.schedule import as_schedule

TARGETS = ("anneal", "product", "cfg")
POLICIES = ("every", "ess", "never")
FINALS = ("resample", "weighted", "one_per_group")
QUADRATURES = ("euler", "trapezoid", "logsnr", "right")


# ---------------------------------------------------------------------------------------------
# 1. Parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FKCConfig:
    """FKC parameters (paper Sec. 3-4; docs/fkc.md "CLI"), validated on construction.

    betas: exponent beta_i per expert (any real, sum B > 0).
    eta: DDIM eta, eta^2 = c (1 = target-score DDPM step, 1/sqrt(B) = tempered noise, 0 = ODE).
    resample: "every" step | when "ess" < ess_threshold * K | "never".
    window: (t_hi, t_lo): resample only while t_lo <= t / T <= t_hi (1 = noise end).
    scheme: systematic | multinomial | stratified | residual (core/smc.py).
    final: "resample" (unweighted population) | "weighted" (particles + weights) |
        "one_per_group" (one particle per group drawn by weight).
    quadrature: weight rule of each step, ``node_coefficients``: "logsnr" (default, chosen by the
        exact infinite-K Gaussian recursion, docs/fkc.md "Discretisation bias", and kept by the error
        over 20 seeds, where euler / logsnr / right do not differ beyond the seed spread of about
        4 binomial SEs per run, docs/fkc.md "Weight rules over seeds"), "euler" (the
        reference code), "trapezoid", "right"; none needs an extra model call.
    These field defaults are the only defaults: the CLI options and FKCPipeline read them.
    max_log_increment: opt-in clamp of the group-centred increment to +-m (biased; EDM2 code).
    """

    betas: tuple = (1.0,)
    eta: float = 1.0
    resample: str = "ess"
    ess_threshold: float = 0.7
    window: tuple = (1.0, 0.0)
    scheme: str = "systematic"
    final: str = "resample"
    quadrature: str = "logsnr"
    max_log_increment: float | None = None

    def __post_init__(self):
        betas = tuple(float(b) for b in self.betas)
        if not betas or not all(math.isfinite(b) for b in betas):
            raise ValueError(f"betas must be a non-empty sequence of finite numbers, got {self.betas!r}")
        if sum(betas) <= 0:
            raise ValueError(f"the sum of betas must be > 0 (initial noise is N(0, I/B)), got {sum(betas)}")
        object.__setattr__(self, "betas", betas)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.resample not in POLICIES:
            raise ValueError(f"resample must be one of {POLICIES}, got {self.resample!r}")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1] (a fraction of K), got {self.ess_threshold}")
        hi, lo = (float(v) for v in self.window)
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"window must be (t_hi, t_lo) with 0 <= t_lo <= t_hi <= 1, got {self.window!r}")
        object.__setattr__(self, "window", (hi, lo))
        if self.scheme not in smc.SCHEMES:
            raise ValueError(f"scheme must be one of {smc.SCHEMES}, got {self.scheme!r}")
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        if self.quadrature not in QUADRATURES:
            raise ValueError(f"quadrature must be one of {QUADRATURES}, got {self.quadrature!r}")
        if self.max_log_increment is not None and not self.max_log_increment > 0:
            raise ValueError(f"max_log_increment must be > 0 or None, got {self.max_log_increment}")

    @property
    def total_beta(self) -> float:
        return float(sum(self.betas))

    @property
    def is_trivial(self) -> bool:
        """beta = 1 with one expert, or w in {0, 1}: all increments vanish (docs/fkc.md "Design choices")."""
        nonzero = [b for b in self.betas if b != 0.0]
        return len(nonzero) == 1 and nonzero[0] == 1.0


DEFAULTS = {f: getattr(FKCConfig(), f) for f in FKCConfig.__dataclass_fields__}  # the one home of FKC defaults
TARGET_BETA = {"anneal": 2.0, "product": 1.0}  # default exponent per --fkc-target (CLI and pipeline)


# ---------------------------------------------------------------------------------------------
# 2. Pure step functions (tensors in, tensors out)
# ---------------------------------------------------------------------------------------------
def _betas_like(betas: Sequence[float], eps_experts: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(list(betas), dtype=torch.float64, device=eps_experts.device)
    if b.numel() != eps_experts.shape[0]:
        raise ValueError(f"got {eps_experts.shape[0]} expert outputs for {b.numel()} betas")
    return b.reshape(-1, *([1] * (eps_experts.ndim - 1)))  # (M, 1, ...)


def combine_eps(eps_experts: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
    """eps_eff = sum_i beta_i eps_i (the target-path score, paper Sec. 3), in float64, returned in the input dtype.

    eps_experts: (M, N, ...). Returns (N, ...)."""
    b = _betas_like(betas, eps_experts)
    return (b * eps_experts.double()).sum(0).to(eps_experts.dtype)


def weight_rate(eps_experts: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
    """||sum_i beta_i eps_i||^2 - sum_i beta_i ||eps_i||^2 per particle (docs/fkc.md "Weight rules").

    Norms summed over all elements of a particle. eps_experts: (M, N, ...). Returns (N,) float64.
    Annealing: beta(beta-1)||eps||^2; CFG: w(w-1)||eps_c - eps_u||^2; product: 2<eps_1, eps_2>.
    """
    b = _betas_like(betas, eps_experts)
    e = eps_experts.double().flatten(2)  # (M, N, D)
    eff = (b.flatten(2) * e).sum(0)  # (N, D)
    return (eff**2).sum(-1) - (b.flatten(1)[:, :, None] * e**2).sum((0, 2))


ALPHA_BAR_MIN = 2.0**-24  # zero-terminal-SNR clamp of alpha_bar_T (diffusers' Euler schedulers use the same)


def clamp_alpha_bar(alpha_bar) -> torch.Tensor:
    """alpha_bar as float64, raised to ``ALPHA_BAR_MIN`` where it is 0 (zero terminal SNR, docs/fkc.md
    "Zero terminal SNR"); values above the clamp are returned unchanged."""
    return torch.as_tensor(alpha_bar, dtype=torch.float64).clamp(min=ALPHA_BAR_MIN)


def step_delta(alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """Delta_k = int g^2 dtau = log(alpha_bar_s / alpha_bar_t) for VP (g^2 of the paper's SDE over one step;
    docs/fkc.md "Weight rules"). alpha_bar_t is clamped at ``ALPHA_BAR_MIN`` (zero terminal SNR)."""
    return torch.log(torch.as_tensor(alpha_bar_s, dtype=torch.float64) / clamp_alpha_bar(alpha_bar_t))


ZERO_SNR_DIRECT_UNTIL = 1e-3  # zero-SNR start: sample rho_s directly while alpha_bar_s <= this


def direct_steps(alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """(S,) bool: the steps moved by ``zero_snr_move`` (no weight). On a schedule that starts at
    alpha_bar = 0 (zero terminal SNR): the first step, and every following step that ends at
    alpha_bar_s <= ``ZERO_SNR_DIRECT_UNTIL``. Elsewhere none (docs/fkc.md "Zero terminal SNR")."""
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64).reshape(-1)
    ab_s = torch.as_tensor(alpha_bar_s, dtype=torch.float64).reshape(-1)
    if not ab_t.numel() or ab_t[0] > 0:
        return torch.zeros(ab_t.shape, dtype=torch.bool)
    early = torch.cumprod((ab_s <= ZERO_SNR_DIRECT_UNTIL).to(torch.int64), 0).bool()  # a prefix
    early[0] = True
    return early


def _log_snr(ab: torch.Tensor) -> torch.Tensor:
    return torch.log(ab) - torch.log1p(-ab)


def node_coefficients(alpha_bar_t, alpha_bar_s, rule: str = "euler") -> torch.Tensor:
    """Coefficient c_k of each model call: Delta log w_k = c_k * weight_rate(eps(x_k, t_k)). (S,) float64.

    The continuous weight (paper Sec. 3, the weighted SDE of each target) is
    1/2 int g^2 / sigma^2 (||sum beta_i eps_i||^2 - sum beta_i ||eps_i||^2) dtau, and
    int g^2 / sigma^2 dtau = Delta lambda, lambda = log(alpha_bar / (1 - alpha_bar)) (docs/fkc.md "Weight rules"):

    - euler: c_k = 1/2 Delta_k / sigma_k^2 (scores held at the step start, the reference code);
    - trapezoid: each node carries half of its two neighbouring steps (Euler at the clean end);
    - logsnr: c_k = 1/2 (lambda_{k+1} - lambda_k), eps held at the step start (the step into
      alpha_bar = 1, where lambda is infinite, falls back to Euler);
    - right: step k-1 is weighted at node k with 1/2 (lambda_k - lambda_{k-1}) (the eps of the next
      model call, so no extra call); node 0 carries nothing; the last step is weighted at its start
      as in logsnr.
    A step that starts at alpha_bar = 0 (zero terminal SNR) carries no weight: ``zero_snr_move``
    samples its end point from the target path directly (docs/fkc.md "Zero terminal SNR").
    """
    if rule not in QUADRATURES:
        raise ValueError(f"quadrature must be one of {QUADRATURES}, got {rule!r}")
    raw_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64).reshape(-1)
    ab_t = clamp_alpha_bar(raw_t)
    ab_s = torch.as_tensor(alpha_bar_s, dtype=torch.float64).reshape(-1)
    start = direct_steps(raw_t, ab_s)  # zero-SNR start: moved by zero_snr_move, no weight
    delta = torch.where(start, 0.0, step_delta(ab_t, ab_s))
    sig2 = 1.0 - ab_t
    euler = 0.5 * delta / sig2
    if rule == "euler":
        return euler
    if rule == "trapezoid":
        node = 0.5 * delta + 0.5 * torch.cat([torch.zeros(1, dtype=torch.float64), delta[:-1]])
        node[-1] = node[-1] + 0.5 * delta[-1]  # no model call at the clean end: Euler there
        return 0.5 * node / sig2
    finite = ab_s < 1.0
    left = torch.where(finite, 0.5 * (_log_snr(torch.where(finite, ab_s, 0.5)) - _log_snr(ab_t)), euler)
    left = torch.where(start, 0.0, left)
    if rule == "logsnr":
        return left
    out = torch.zeros_like(left)
    out[1:] = left[:-1]
    out[-1] = out[-1] + left[-1]
    return out


def log_weight_increment(eps_experts: torch.Tensor, betas: Sequence[float], alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """Euler FK increment 1/2 (Delta_k / sigma_k^2) rate (docs/fkc.md "Weight rules"). Returns (N,) float64."""
    sigma2_t = 1.0 - clamp_alpha_bar(alpha_bar_t)
    return 0.5 * step_delta(alpha_bar_t, alpha_bar_s) / sigma2_t * weight_rate(eps_experts, betas)


def combine_x0(x0_experts: torch.Tensor, x_t: torch.Tensor, betas: Sequence[float], alpha_bar_t) -> torch.Tensor:
    """x0 of eps_eff: (x_t - sqrt(1 - ab_t) eps_eff) / sqrt(ab_t) written through each expert's own x0,

    sum_i beta_i x0_i + (1 - B) x_t / sqrt(ab_t) (exact when each (eps_i, x0_i) pair is consistent at
    ab_t), so that with v- or x0-prediction no 0/0 is formed at alpha_bar = 0; the (1 - B) term uses
    the clamped alpha_bar. x0_experts: (M, N, ...). Returns (N, ...) float64."""
    b = _betas_like(betas, x0_experts)
    out = (b * x0_experts.double()).sum(0)
    B = float(sum(betas))
    if B != 1.0:
        out = out + (1.0 - B) * x_t.double() / clamp_alpha_bar(alpha_bar_t).sqrt()
    return out


def eps_and_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t, prediction_type: str):
    """(eps_hat, x0_hat) in float64 from a raw model output, each formed directly where the
    parameterisation gives it (v: x0 = sqrt(ab) x - sqrt(1 - ab) v, eps = sqrt(ab) v + sqrt(1 - ab) x;
    sample: x0 is the output; flow: eps = x_sigma + (1 - sigma) v, x0 = x_sigma - sigma v with
    x_sigma = c(sigma) x_t on the twin, ``core.flow``), so both stay finite at alpha_bar = 0 for v /
    sample / flow models; for eps
    models x0 divides by the clamped sqrt(alpha_bar) (docs/fkc.md "Zero terminal SNR")."""
    if prediction_type not in PREDICTION_TYPES + ("flow",):
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES + ('flow',)}, got {prediction_type!r}")
    ab = torch.as_tensor(alpha_bar_t, dtype=torch.float64, device=x_t.device)
    out, x = model_output.double(), x_t.double()
    if prediction_type == "flow":  # x_t: the VP twin state; out: the velocity at c(sigma) x_t (core.flow)
        sigma = sigma_of_alpha_bar(ab.reshape(-1) if ab.ndim else ab)
        return eps_x0_from_velocity(out, twin_to_flow(x, sigma), sigma)
    if prediction_type == "v_prediction":
        return eps_from_v(x, out, ab), x0_from_v(x, out, ab)
    if prediction_type == "sample":
        return eps_from_x0(x, out, ab), out
    return out, x0_from_eps(x, out, ab, alpha_bar_floor=ALPHA_BAR_MIN)


def ddim_move(x_t: torch.Tensor, eps_eff: torch.Tensor, alpha_bar_t, alpha_bar_s, eta: float,
              noise: torch.Tensor | None, x0_hat: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM step with noise eta (Song et al. 2021, eq. 12; eta = 1 is DDPM ancestral), in float64.

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma_s^2) eps_eff + sigma_s z,
    sigma_s = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). Returns x_t's dtype.
    x0_hat defaults to (x_t - sqrt(1 - ab_t) eps_eff) / sqrt(ab_t); pass ``combine_x0(...)`` to form
    it from the experts' own x0 predictions. ab_t is clamped at ``ALPHA_BAR_MIN`` (zero terminal SNR).
    """
    ab_t = clamp_alpha_bar(alpha_bar_t).to(x_t.device)
    ab_s = torch.as_tensor(alpha_bar_s, dtype=torch.float64).to(x_t.device)
    x, e = x_t.double(), eps_eff.double()
    if x0_hat is None:
        x0_hat = x0_from_eps(x, e, ab_t)
    if eta > 0 and noise is None:
        raise ValueError("ddim_move needs noise when eta > 0")
    sigma_s = ddim_sigma(ab_t, ab_s, eta, clamp=True)
    out = ddim_update(x0_hat.double(), e, ab_s, sigma_s, noise.double() if eta > 0 else None, clamp=True)
    return out.to(x_t.dtype)


def zero_snr_move(x_t: torch.Tensor, x0_experts: torch.Tensor, betas: Sequence[float], alpha_bar_s, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """The first step of a zero-terminal-SNR schedule (alpha_bar_t = 0), for any exponents.

    At alpha_bar = 0 each expert's marginal is N(0, I) and the target rho_T = N(0, I / B) is the
    initial law. The DDIM step on eps_eff has an x-coefficient (1 - B) sqrt(ab_s / ab_t) that is
    infinite there for B != 1 (and the FK weight of the step, 1/2 int g^2 beta(beta-1)||s||^2,
    diverges), so instead we sample rho_s = prod_i q_{i,s}^{beta_i} to first order in ab_s:
    q_{i,s} ~ N(sqrt(ab_s) x0_i, I) gives rho_s ~ N(sqrt(ab_s) x0_bar, I / B), x0_bar = sum beta_i x0_i / B,

        x_s = sqrt(ab_s) x0_bar + sqrt(1 - ab_s) (sqrt(1 - eta^2) x_t + eta z / sqrt(B)),

    (x_t ~ N(0, I / B)), which for B = 1 is exactly DDIM(eta) from alpha_bar = 0. x0_experts:
    (M, N, ...) the experts' x0 predictions from their raw outputs (``eps_and_x0``). float64 math.
    """
    B = float(sum(betas))
    b = _betas_like(betas, x0_experts)
    x0_bar = (b * x0_experts.double()).sum(0) / B
    ab_s = torch.as_tensor(alpha_bar_s, dtype=torch.float64).to(x_t.device)
    e = min(max(float(eta), 0.0), 1.0)
    out = math.sqrt(1.0 - e * e) * x_t.double()
    if e > 0:
        if noise is None:
            raise ValueError("zero_snr_move needs noise when eta > 0")
        out = out + e * noise.double() / math.sqrt(B)
    return (ab_s.sqrt() * x0_bar + (1 - ab_s).sqrt() * out).to(x_t.dtype)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Descending int64 timesteps, diffusers' leading | trailing | linspace spacing (``core.ddim.timestep_grid``)."""
    return timestep_grid(num_train_timesteps, steps, spacing, steps_offset)


# ---------------------------------------------------------------------------------------------
# 3. The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class FKCResult:
    x: torch.Tensor  # (N, ...) particles, final policy applied (N rows, or G for one_per_group)
    weights: torch.Tensor  # (rows,) float64, normalised within each group
    log_w: torch.Tensor  # (G, K) float64 final log-weights (before the final policy)
    ess: torch.Tensor  # (G, S) float64 ESS before each step's resampling decision
    resampled: torch.Tensor  # (G, S) bool, whether the group resampled at that step
    group: torch.Tensor  # (rows,) int64 group index of each output row


class MovePlan:
    """The move of an FKC particle loop (``sample_fkc``, ``fk_steer.sample_fk_steer``), set up once.

    The move is FKC's own float64 DDIM(eta) step (``ddim_move``; eta = ``cfg.eta``) or a proposal scheduler's
    ``step`` (``check_proposal``; its own eta, ``proposal_eta``). The steps of a zero-SNR start (``direct``:
    alpha_bar_T = 0, a flow's sigma = 1) are ``zero_snr_move`` at the move's eta, never shifted. Under a
    Time-Shift proposal the model is called at per-particle model times (``model_point``), on a flow's twin
    at the same flow point in the model time's coordinates (the proposal's ``model_input``); the twin
    steppers of a flow also take the experts' x0 (``takes_x0``). ``ab_t`` / ``ab_s``: the grid's alpha_bar
    pairs, float64 (S,) (docs/compose.md "FKC over any proposal")."""

    def __init__(self, alphas_cumprod, timesteps, cfg: "FKCConfig", proposal=None, final_alpha_bar: float = 1.0):
        self.schedule = as_schedule(alphas_cumprod)  # a VP table or any core.schedule.Schedule (flows: the twin)
        self.proposal, self.step_kwargs, self.eta = proposal, {}, float(cfg.eta)
        if proposal is not None:
            self.step_kwargs = check_proposal(proposal, timesteps, cfg)
            self.eta = proposal_eta(proposal, self.step_kwargs)
            final_alpha_bar = float(getattr(proposal, "final_alpha_cumprod", 1.0))  # where its last step goes
        self.ab_t, self.ab_s = self.schedule.alpha_bar_pairs(timesteps, final_alpha_bar)
        self.direct = direct_steps(self.ab_t, self.ab_s)  # (S,) bool
        self.shifted = proposal is not None and hasattr(proposal, "model_timesteps")
        self.relabel = getattr(proposal, "model_input", None) if self.shifted else None
        self.takes_x0 = proposal is not None and "pred_original_sample" in inspect.signature(proposal.step).parameters

    def model_point(self, k: int, t, x: torch.Tensor, dtype: torch.dtype):
        """(t_model, x_in, ab_in, shifted) of step k: the model time(s) (the grid's t, or (N,) per particle), the
        state the model sees, its alpha_bar (a float64 scalar, or (N, 1, ...)) and whether the step is shifted.
        x: the loop's state (``dtype``: the samples' dtype, which the proposal reads)."""
        if not (self.shifted and not bool(self.direct[k])):
            return t, x, self.ab_t[k], False
        xs = x.to(dtype)
        t_model = self.proposal.model_timesteps(xs, t)
        x_in = self.relabel(xs, t, t_model).to(x.dtype) if self.relabel is not None else x
        ab_in = self.schedule.alpha_bar(torch.as_tensor(t_model).cpu()).reshape(-1, *([1] * (x.ndim - 1))).to(x.device)
        return t_model, x_in, ab_in, True

    def resample(self, k: int, tensors: list, t_model, x0_experts, log_w, scheme: str, generators, mask):
        """``smc.resample`` of the loop's per-particle tensors together with the move's own per-particle state:
        the model times of a shifted step and the experts' x0 that a zero-SNR draw reads.
        Returns (tensors, t_model, x0_experts, log_w)."""
        shift_k = self.shifted and not bool(self.direct[k])
        start = bool(self.direct[k]) and x0_experts is not None
        extra = ([t_model] if shift_k else []) + ([x0_experts.movedim(0, 1)] if start else [])
        out, log_w, _ = smc.resample(list(tensors) + extra, log_w, scheme, generators, mask=mask)
        n = len(tensors)
        if shift_k:
            t_model = out[n]
        if start:
            x0_experts = out[-1].movedim(1, 0)
        return out[:n], t_model, x0_experts, log_w

    def move(self, k: int, t, x: torch.Tensor, eps_eff, x0_eff, x0_experts, t_model, betas, generators,
             dtype: torch.dtype) -> torch.Tensor:
        """x at the next grid time, in x's dtype: the proposal's step (fed the samples' ``dtype``; its noise from
        the same generators), else ``zero_snr_move`` on a direct step, else ``ddim_move``, their noise drawn in
        ``dtype`` (one draw per particle from its own generator, or one batched draw) when eta > 0."""
        if self.proposal is not None and not bool(self.direct[k]):
            kw = dict(self.step_kwargs)
            if self.shifted:
                kw["model_timesteps"] = t_model
            if self.takes_x0 and x0_eff is not None:  # the twin steppers of a flow: the x0 of the velocities
                kw["pred_original_sample"] = x0_eff.to(dtype)
            out = self.proposal.step(eps_eff.to(dtype), t, x.to(dtype), generator=generators, return_dict=True, **kw)
            return out.prev_sample.to(x.dtype)
        noise = normal_like(x.to(dtype), generators) if self.eta > 0 else None
        if bool(self.direct[k]):  # zero terminal SNR: sample rho_s directly (docs/fkc.md "Zero terminal SNR")
            return zero_snr_move(x, x0_experts, betas, self.ab_s[k], self.eta, noise)
        return ddim_move(x, eps_eff, self.ab_t[k], self.ab_s[k], self.eta, noise, x0_eff)


def _in_window(cfg: FKCConfig, t_frac: float) -> bool:
    hi, lo = cfg.window
    return lo <= t_frac <= hi


def sample_fkc(
    expert_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    cfg: FKCConfig,
    alphas_cumprod,
    timesteps: torch.Tensor,
    *,
    group_size: int,
    noise_generators: Sequence[torch.Generator],
    resample_generators: Sequence[torch.Generator],
    final_alpha_bar: float = 1.0,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    sampler: str = "fkc",
    proposal=None,
) -> FKCResult:
    """FKC-SMC (paper Sec. 3-4; docs/fkc.md), one loop for every target.

    expert_eps(x, t) -> (M, N, ...) eps of each expert at x (N, ...) and timestep t (one batched
        model call); t is the scalar grid time, or (N,) per-particle model times when the proposal
        is a Time-Shift scheduler. x_T: (N, ...) standard normal noise, N = G * group_size; it is scaled by
        1 / sqrt(B) here. noise_generators: one CPU generator per particle (move noise; the API's
        per-sample convention) or a single generator (one batched draw per step, faster);
        resample_generators: one per group (or one shared). on_step(k, x, log_w) is called after each
        step; a tensor it returns replaces x (diffusers callback_on_step_end).
    alphas_cumprod: the VP table (T,), or a ``core.schedule.Schedule`` (``schedule_for``; a flow
        model's ``FlowSchedule``: the loop runs on the VP twin, docs/flow_matching.md); timesteps: its
        grid of model times (``Schedule.grid``). The resampling window reads ``Schedule.fraction``.
    proposal: None (FKC's own float64 DDIM(eta) move, ``ddim_move``) or a memoryless scheduler with
        ``set_timesteps`` done on ``timesteps`` and eps parameterisation (DDIMScheduler, DDPMScheduler,
        TimeShiftScheduler; on a flow's twin ``FlowTwinEpsDDIM`` / ``TwinFlowTimeShift``, which also take
        the experts' x0 as ``pred_original_sample``; ``check_proposal``): its ``step`` moves the
        particles (docs/compose.md "FKC over any proposal"), with its own eta except DDIMScheduler (cfg.eta).
        Steps of a zero-SNR start (``direct_steps``: a flow's sigma = 1) are ``zero_snr_move`` at the
        proposal's eta (``proposal_eta``), unshifted. A scheduler with ``model_timesteps``
        (Time-Shift) sets the time the experts are evaluated at, per particle (at the state its
        ``model_input`` gives, if it has one: on a flow's twin the same flow point in the model time's
        coordinates); the rate of the weight
        comes from those outputs (the ones the move uses) while its coefficient stays the grid
        interval's, c_k of ``node_coefficients``, so that the coefficients sum to the path's
        1/2 (lambda_end - lambda_start) for any shift (the FK weight over the interval each particle
        traverses; docs/compose.md "Time-Shift inside FKC").
    """
    N = x_T.shape[0]
    K = int(group_size)
    if K < 1 or N % K:
        raise ValueError(f"number of particles N={N} must be a positive multiple of group_size={K}")
    G = N // K
    batched_noise = isinstance(noise_generators, torch.Generator)
    if not batched_noise and len(noise_generators) != N:
        raise ValueError(f"noise_generators must be one generator or one per particle ({N}), got {len(noise_generators)}")
    plan = MovePlan(alphas_cumprod, timesteps, cfg, proposal, final_alpha_bar)
    if plan.eta == 0 and cfg.resample != "never":
        warnings.warn("FKC with eta=0 (ODE move) and resampling duplicates particles forever "
                      "(docs/fkc.md \"Design choices\"); use eta > 0", RuntimeWarning, stacklevel=2)
    coef = node_coefficients(plan.ab_t, plan.ab_s, cfg.quadrature)  # (S,) weight of each model call
    x = (x_T.double() / math.sqrt(cfg.total_beta)).to(x_T.dtype)  # N(0, I/B) = rho_T for VP (docs/fkc.md)
    log_w = torch.zeros((G, K), dtype=torch.float64)
    ess_trace = torch.empty((G, len(timesteps)), dtype=torch.float64)
    did = torch.zeros((G, len(timesteps)), dtype=torch.bool)
    trivial = cfg.is_trivial
    for k, t in enumerate(timesteps):
        t_model, x_in, ab_in, _ = plan.model_point(k, t, x, x.dtype)  # (N,) per particle under Time-Shift
        out = expert_eps(x_in, t_model)  # (M, N, ...) eps, or a pair (eps, x0) formed from the raw output
        eps_experts, x0_experts = out if isinstance(out, tuple) else (out, None)
        check_finite(eps_experts, sampler, k)
        if not trivial:
            rate = weight_rate(eps_experts, cfg.betas).cpu()  # (N,)
            # the grid interval [t_k, t_{k+1}] the particle traverses, also under Time-Shift (the model
            # time only changes the eps that gives the rate): the coefficients telescope to 1/2 Delta lambda
            # of the path (docs/compose.md "Time-Shift inside FKC")
            inc = (coef[k] * rate).reshape(G, K)
            if cfg.max_log_increment is not None:
                inc = inc - inc.mean(1, keepdim=True)
                inc = inc.clamp(-cfg.max_log_increment, cfg.max_log_increment)
            log_w = log_w + inc
            if not torch.isfinite(log_w).all():
                raise FloatingPointError(f"{sampler}: non-finite log-weights at step {k}")
            log_w = log_w - log_w.max(1, keepdim=True).values  # keep in range; ratios unchanged
        ess = smc.effective_sample_size(log_w)  # (G,)
        ess_trace[:, k] = ess
        eps_eff = combine_eps(eps_experts, cfg.betas)  # (N, ...)
        x0_eff = None  # a proposal that takes no x0 forms it from eps_eff itself
        if x0_experts is not None and (proposal is None or plan.takes_x0) and not plan.direct[k]:
            x0_eff = combine_x0(x0_experts, x_in, cfg.betas, ab_in).to(x.dtype)
        if plan.direct[k] and x0_experts is None:  # eps models at zero SNR: x0 through the clamped alpha_bar
            x0_experts = torch.stack([eps_and_x0(e, x, plan.ab_t[k], "epsilon")[1] for e in eps_experts])
        if cfg.resample != "never" and _in_window(cfg, plan.schedule.fraction(t)):
            want = ess < cfg.ess_threshold * K if cfg.resample == "ess" else torch.ones(G, dtype=torch.bool)
            want = want & ~(log_w == log_w[:, :1]).all(1)  # equal weights: nothing to do
            if want.any():
                tensors = [x, eps_eff] + ([] if x0_eff is None else [x0_eff])
                tensors, t_model, x0_experts, log_w = plan.resample(k, tensors, t_model, x0_experts, log_w, cfg.scheme,
                                                                    resample_generators, want)
                x, eps_eff = tensors[0], tensors[1]
                x0_eff = tensors[2] if x0_eff is not None else None
                did[:, k] = want
        x = plan.move(k, t, x, eps_eff, x0_eff, x0_experts, t_model, cfg.betas, noise_generators, x.dtype)
        if on_step is not None:
            new_x = on_step(k, x, log_w)
            x = new_x if isinstance(new_x, torch.Tensor) else x
    return finalize(x, log_w, cfg, ess_trace, did, resample_generators)


PROPOSALS = ("fkc", "ddim", "ddpm")  # FKC's own float64 DDIM(eta) move | diffusers DDIMScheduler | DDPMScheduler


def check_proposal(proposal, timesteps: torch.Tensor, cfg: FKCConfig) -> dict:
    """Check that a scheduler can serve as FKC's move and return the extra ``step`` keywords.

    FKC resamples particles between steps, so the move must be memoryless (a one-step scheduler
    whose ``step`` depends only on (eps, t, x)): DDIM, DDPM and Time-Shift qualify; multistep
    solvers (DPM-Solver, PNDM) keep model outputs of earlier particles and do not. The scheduler
    must predict eps (FKC combines the experts in eps; the twin steppers of a flow take eps by
    construction) and hold the same grid as the loop."""
    name = type(proposal).__name__
    if name not in ONE_STEP_PROPOSALS:
        raise ValueError(f"FKC's proposal must be a one-step scheduler ({', '.join(ONE_STEP_PROPOSALS)}), got {name}: "
                         f"multistep solvers keep state across resampling")
    if name not in TWIN_PROPOSALS and proposal.config.prediction_type != "epsilon":  # the twin steppers take eps
        raise ValueError(f"FKC's proposal scheduler must use prediction_type 'epsilon' (the experts' eps are combined), "
                         f"got {proposal.config.prediction_type!r}")
    if proposal.timesteps is None or not torch.equal(proposal.timesteps.cpu().double(), torch.as_tensor(timesteps).cpu().double()):
        raise ValueError("FKC's proposal scheduler must be set to the loop's timesteps (call set_timesteps first)")
    if hasattr(proposal, "model_timesteps"):  # Time-Shift: per-particle model times (docs/compose.md "Time-Shift inside FKC")
        if getattr(proposal, "shifting", True) and abs(cfg.total_beta - 1.0) > 1e-12:
            raise ValueError(f"--time-shift needs exponents summing to 1 (sum(betas) = 1: --fkc-target cfg, or --beta 1), "
                             f"got sum {cfg.total_beta:g}: Time-Shift's statistic references the untempered path variance "
                             f"1 - alpha_bar, and a shifted model time breaks the x-cancellation of the tempered DDIM move "
                             f"(docs/compose.md \"Time-Shift inside FKC\")")
        if cfg.quadrature not in ("euler", "logsnr"):
            raise ValueError(f"--time-shift needs --quadrature euler or logsnr (per-particle model times: a rule that reads "
                             f"only the current step), got {cfg.quadrature!r}")
    # DDIMScheduler steps with cfg.eta (--proposal ddim --eta); the others carry their own: DDPMScheduler 1, a
    # Time-Shift scheduler its config's (make_proposal sets 1 for --proposal ddpm), the twin steppers theirs
    return {"eta": float(cfg.eta)} if name == "DDIMScheduler" else {}


# FKC's memoryless moves: diffusers' one-step schedulers, and for flow models the steppers on the VP twin
# (samplers.baseline.FlowTwinEpsDDIM: --proposal ddim|ddpm; samplers.time_shift.TwinFlowTimeShift: --time-shift)
TWIN_PROPOSALS = ("FlowTwinEpsDDIM", "TwinFlowTimeShift")
ONE_STEP_PROPOSALS = ("DDIMScheduler", "DDPMScheduler", "TimeShiftScheduler") + TWIN_PROPOSALS


def proposal_eta(proposal, step_kwargs: dict) -> float:
    """The DDIM eta of a proposal's step (the zero-SNR start moves with it): the step keywords', else 1 for
    DDPMScheduler, else the scheduler's own (``eta`` attribute or config)."""
    if "eta" in step_kwargs:
        return float(step_kwargs["eta"])
    if type(proposal).__name__ == "DDPMScheduler":
        return 1.0
    own = getattr(proposal, "eta", None)
    return float(own if own is not None else proposal.config.eta)


def finalize(x, log_w, cfg: FKCConfig, ess_trace, did, resample_generators) -> FKCResult:
    """Apply cfg.final: resample | weighted | one_per_group (docs/fkc.md "CLI")."""
    G, K = log_w.shape
    w_bar = smc.normalized_weights(log_w)  # (G, K)
    group = torch.arange(G).repeat_interleave(K)
    if cfg.final == "weighted":
        return FKCResult(x, w_bar.reshape(-1), log_w, ess_trace, did, group)
    if cfg.final == "resample":
        (x,), _, _ = smc.resample([x], log_w, cfg.scheme, resample_generators)
        return FKCResult(x, torch.full((G * K,), 1.0 / K, dtype=torch.float64), log_w, ess_trace, did, torch.arange(G).repeat_interleave(K))
    # one_per_group: one draw from w_bar per group
    pick = smc.draw_one_per_group(log_w, resample_generators).cpu()  # (G,)
    rows = torch.arange(G) * K + pick
    return FKCResult(x[rows.to(x.device)], torch.ones(G, dtype=torch.float64), log_w, ess_trace, did, torch.arange(G))


# -- deprecated import path (one release): the diffusers face moved to gensample.schedulers.fkc (gensample._moved)
__getattr__ = _moved.moved(__name__, "gensample.schedulers.fkc", ("FKCScheduler", "FKCSchedulerOutput"))
