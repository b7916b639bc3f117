"""Feynman-Kac steering with reward potentials (FK steering).

Singhal, Horvitz, Teehan, Ren, Yu, Cho, Ranganath, "A General Framework for Inference-time Scaling
and Steering of Diffusion Models", ICML 2025, arXiv 2501.06848 (the paper); our notes: docs/fk_steering.md.

Target: the tilted law p_lambda(x0) ~ p(x0) exp(lambda r(x0)) of a reward r. K particles per group
move by the model's own DDPM step (DDIM with eta = 1, the paper's proposal), are scored by the reward
on the Tweedie estimate x0_hat(x_t), and are reweighted by a potential G_k and resampled (the
paper's Algorithm 1). With potentials whose product along a path is exp(lambda r(x0)) (``diff``),
the weighted population targets p_lambda exactly as K grows (paper Sec. 3, the Feynman-Kac
measure with prod_t G_t = exp(lambda r(x0))).

Potentials, step k = 0 .. S (k = S is the clean end x0, scored without a model call), r_k the
reward of x0_hat at step k (docs/fk_steering.md "Potentials"):

    diff:           log G_k = lambda (r_k - r_{k-1}),   r_{-1} = 0  (the product telescopes to lambda r(x0))
    max:            log G_k = lambda max_{j <= k} r_j
    sum:            log G_k = lambda sum_{j <= k} r_j
    instantaneous:  log G_k = lambda r_k

| code name        | paper symbol                                        |
|------------------|-----------------------------------------------------|
| ``lam``          | lambda, the inverse temperature of the tilt          |
| ``rewards``      | r_phi(x0_hat(x_t)) per step, (N, S + 1) float64      |
| ``log_w``        | log of the accumulated potentials since the last resampling, (G, K) float64 |
| ``ess``          | effective sample size per group before each decision |
| ``group_size``   | k of the paper (particles per prompt / group)        |

Composition (docs/fk_steering.md "Composition"): the loop also runs FKC targets (Skreta et al. 2025,
arXiv 2503.02819: annealing p^beta, products, CFG) as its base law. Then the model call returns one
eps / x0 per expert, the move is FKC's DDIM(eta) step on eps_eff = sum_i beta_i eps_i from
x_T ~ N(0, I / B), and the log-weight of a step is the *sum* of FKC's increment c_k * R_k
(``samplers.fkc.node_coefficients`` / ``weight_rate``) and the reward potential log G_k: one SMC loop,
two potentials. The weighted population then targets (FKC's law) x exp(lambda r(x0)). The move may
also be a memoryless diffusers scheduler (DDIM / DDPM / Time-Shift; ``samplers.fkc.check_proposal``),
as in FKC (docs/compose.md "FKC over any proposal").

Flow-matching models (docs/fk_steering.md "Flow models"): the loop runs on the model's VP twin
(``core.flow``, docs/flow_matching.md) with the grid and alpha_bars of its ``core.schedule.FlowSchedule``;
the move is DDIM(eta = 1) on the twin, the flow SDE proposal, and its first step, from sigma = 1
(alpha_bar = 0), is FKC's direct draw ``samplers.fkc.zero_snr_move`` (for any FKC target).

Particles are a flat group-major batch of N = G * K rows; resampling never crosses groups
(core/smc.py). The DDPM move and the grid are ``core.ddim``'s; the CLI glue (reward resolution,
seeds, samples.npz extras) is ``gensample.runs.fk_steer``; reward plug-ins are ``gensample.rewards``.
Sections: 1. parameters, 2. potentials, 3. the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core import smc
from ..core.denoiser import check_finite
from .fkc import FKCConfig, MovePlan, combine_eps, combine_x0, node_coefficients, weight_rate

POTENTIALS = ("diff", "max", "sum", "instantaneous")
FINALS = ("resample", "weighted", "best", "one_per_group")
EXACT_POTENTIALS = ("diff",)  # product of potentials along a path = exp(lambda r(x0))


# ---------------------------------------------------------------------------------------------
# 1. Parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FKSteerConfig:
    """FK-steering parameters (paper Sec. 3 and Algorithm 1; docs/fk_steering.md "CLI").

    lam: lambda >= 0, the tilt exp(lambda r(x0)) (0: plain DDPM sampling, nothing reweighted).
    potential: diff | max | sum | instantaneous (module docstring; only diff targets the tilted law).
    resample_every: consider resampling every this many steps (1: every step, the paper's default).
    ess_threshold: at a considered step, resample a group when ESS < threshold * K; 1 resamples
        every group whose weights are not all equal (the paper's rule), 0 never resamples.
    scheme: systematic | multinomial | stratified | residual (core/smc.py).
    final: "resample" (unweighted population of K per group) | "weighted" (particles + normalised
        weights) | "best" (the particle of highest final reward per group, the paper's output)
        | "one_per_group" (one particle per group drawn by weight).
    reward_every: score the reward only at steps k with k % reward_every == 0 (and always at the
        clean end); in between each path keeps its last reward, so the potential holds (``diff``: log
        G_k = 0 there, and the product still telescopes to exp(lambda r(x0))).
    These field defaults are the only defaults: the CLI options read them.
    """

    lam: float = 10.0
    potential: str = "diff"
    resample_every: int = 1
    ess_threshold: float = 1.0
    scheme: str = "systematic"
    final: str = "resample"
    reward_every: int = 1

    def __post_init__(self):
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lam (--lambda) must be a finite number >= 0, got {self.lam!r}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {self.potential!r}")
        if isinstance(self.resample_every, bool) or not isinstance(self.resample_every, int) or self.resample_every < 1:
            raise ValueError(f"resample_every must be an integer >= 1, got {self.resample_every!r}")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1] (a fraction of K), got {self.ess_threshold!r}")
        if self.scheme not in smc.SCHEMES:
            raise ValueError(f"scheme must be one of {smc.SCHEMES}, got {self.scheme!r}")
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        if isinstance(self.reward_every, bool) or not isinstance(self.reward_every, int) or self.reward_every < 1:
            raise ValueError(f"reward_every (--reward-every) must be an integer >= 1, got {self.reward_every!r}")

    @property
    def exact(self) -> bool:
        """Whether the weighted population targets p(x0) exp(lambda r(x0)) as K grows."""
        return self.potential in EXACT_POTENTIALS or self.lam == 0


DEFAULTS = {f: getattr(FKSteerConfig(), f) for f in FKSteerConfig.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# 2. Potentials (pure: rewards so far in, log G_k out)
# ---------------------------------------------------------------------------------------------
def log_potential(potential: str, lam: float, rewards: torch.Tensor) -> torch.Tensor:
    """log G_k of step k from the rewards r_0 .. r_k of each particle's own path (module docstring).

    rewards: (N, k + 1) float64, the last column the current step. Returns (N,) float64.
    The rows are paths: after resampling, a particle's history is its ancestor's (Algorithm 1).
    """
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    r = rewards.double()
    if potential == "diff":
        prev = r[:, -2] if r.shape[1] > 1 else torch.zeros_like(r[:, -1])
        return lam * (r[:, -1] - prev)
    if potential == "max":
        return lam * r.max(1).values
    if potential == "sum":
        return lam * r.sum(1)
    return lam * r[:, -1]


def check_reward(values, n: int, step: int) -> torch.Tensor:
    """The reward's output as (n,) float64 on the CPU, or a ValueError naming what is wrong."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"the reward must return a torch.Tensor of shape ({n},), got {type(values).__name__} at step {step}")
    v = values.detach().reshape(-1) if values.numel() == n else values
    if v.shape != (n,):
        raise ValueError(f"the reward must return shape ({n},) (one value per particle), got {tuple(values.shape)} at step {step}")
    v = v.double().cpu()
    if not torch.isfinite(v).all():
        raise ValueError(f"the reward returned NaN or +-inf at step {step} (rows {torch.nonzero(~torch.isfinite(v)).flatten()[:5].tolist()})")
    return v


# ---------------------------------------------------------------------------------------------
# 3. The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class FKSteerResult:
    x: torch.Tensor  # (rows, ...) output after the final policy (G*K rows, or G for best / one_per_group)
    weights: torch.Tensor  # (rows,) float64, normalised within each group
    rewards: torch.Tensor  # (rows, S + 1) float64 reward of x0_hat per step along each output row's path; last column r(x0)
    log_w: torch.Tensor  # (G, K) float64 log-weights before the final policy
    ess: torch.Tensor  # (G, S + 1) float64 ESS before each resampling decision (last column: the clean end)
    resampled: torch.Tensor  # (G, S + 1) bool
    group: torch.Tensor  # (rows,) int64 group of each output row
    reward_calls: int = 0  # reward evaluations (each on all N particles)
    reward_seconds: float = 0.0  # wall time inside the reward (VAE decoding included when the reward decodes)


def _per_expert(out: torch.Tensor, M: int, x: torch.Tensor) -> torch.Tensor:
    """A model output as (M, N, ...): a single expert may return (N, ...)."""
    if out.ndim == x.ndim and M == 1:
        return out.unsqueeze(0)
    if out.shape[0] != M or tuple(out.shape[1:]) != tuple(x.shape):
        raise ValueError(f"model_fn must return (eps, x0) of shape {(M, *x.shape)} for {M} expert(s), got {tuple(out.shape)}")
    return out


def look_ahead(x0_experts: torch.Tensor, betas) -> torch.Tensor:
    """x0_bar = sum_i beta_i x0_i / B, the reward's look-ahead under an FKC target (float64, (N, ...)).

    With B = sum_i beta_i = 1 (one expert, CFG) it is the x0 of eps_eff that the move uses. With B != 1
    that x0, sum_i beta_i x0_i + (1 - B) x_t / sqrt(alpha_bar_t), grows like 1 / sqrt(alpha_bar_t) at high
    noise, and a reward on it makes the early potentials degenerate (measured on the oracle: anneal
    beta = 0.5, lambda = 1, K = 64 lands 6 SE off the tilted law, and still 5 SE at K = 256). Any
    look-ahead keeps ``diff`` exact (its product is exp(lambda r(x0)) whatever r_k is before the end);
    this one is bounded and is each expert's own Tweedie estimate, averaged."""
    b = torch.as_tensor(list(betas), dtype=torch.float64, device=x0_experts.device)
    return (b.reshape(-1, *([1] * (x0_experts.ndim - 1))) * x0_experts.double()).sum(0) / b.sum()


def sample_fk_steer(
    model_fn: Callable[[torch.Tensor, torch.Tensor], tuple],
    reward: Callable[[torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    cfg: FKSteerConfig,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    group_size: int,
    noise_generators: Sequence[torch.Generator],
    resample_generators: Sequence[torch.Generator],
    final_alpha_bar: float = 1.0,
    on_step: Callable[[int], None] | None = None,
    sampler: str = "fk-steer",
    target: FKCConfig | None = None,
    proposal=None,
) -> FKSteerResult:
    """FK steering (paper Algorithm 1) on G groups of K particles, optionally over an FKC target.

    model_fn(x, t) -> (eps_hat, x0_hat) from one model call at time t: each (N, ...) for one
        expert, or (M, N, ...) for the M experts of ``target`` (t: the grid time, or (N,) model times
        under a Time-Shift proposal).
    reward(x0) -> (N,) tensor: r on the model's sample space (``gensample.rewards``; the run glue
        binds prompts and decodes latents).
    x_T: (N, ...) standard normal, N = G * group_size (scaled by 1 / sqrt(B) here, FKC's start).
    alphas_cumprod: the VP table (T,), or a ``core.schedule.Schedule`` (``model_schedule``; a flow
        model's ``FlowSchedule``: the loop runs on its VP twin); timesteps: its grid (``Schedule.grid``).
    noise_generators: one per particle (the API's per-sample convention) or a single generator (one
        batched draw per step); resample_generators: one per group (or one shared).
    target: an ``FKCConfig`` whose betas, eta and quadrature define the base law (default: the
        model itself, beta = 1, eta = 1: the paper's DDPM proposal); its resampling fields are unused.
    proposal: None (the float64 DDIM(eta) move) or a set, memoryless diffusers scheduler
        (``samplers.fkc.check_proposal``), e.g. a Time-Shift scheduler. Per step k (t = timesteps[k]):

      1. eps_i, x0_i = model(x_t); eps_eff = sum_i beta_i eps_i, x0_hat its x0 (``combine_x0``);
         r_k = r(x0_hat) (B != 1: r(``look_ahead``)) when k % reward_every == 0, else r_{k-1}
      2. log w += c_k R_k (FKC, zero for beta = 1) + log G_k (``log_potential``); ESS; resample within
         groups (every ``resample_every`` steps, when ESS < ess_threshold * K)
      3. x_s = DDIM(eta) step (Song et al. 2021, eq. 12; eta = 1: DDPM) from the resampled
         (x0_hat, eps_eff), or the proposal's ``step``; a step from alpha_bar = 0 (a flow's sigma = 1,
         zero terminal SNR) is FKC's direct draw of rho_s (``zero_snr_move``) from the resampled x0_i, at the
         proposal's eta when there is one (never shifted). On a flow's twin a Time-Shift proposal
         (``TwinFlowTimeShift``) has the model called at the relabelled state (``model_input``)
    At the clean end: r_S = r(x0), log w += log G_S, then the final policy (``cfg.final``).
    """
    target = FKCConfig() if target is None else target
    if not isinstance(target, FKCConfig):
        raise TypeError(f"target must be a gensample.samplers.fkc.FKCConfig or None, got {type(target).__name__}")
    N = x_T.shape[0]
    K = int(group_size)
    if K < 1 or N % K:
        raise ValueError(f"number of particles N={N} must be a positive multiple of group_size={K}")
    batched_noise = isinstance(noise_generators, torch.Generator)
    if not batched_noise and len(noise_generators) != N:
        raise ValueError(f"noise_generators must be one torch.Generator or one per particle ({N}), got {len(noise_generators)}")
    plan = MovePlan(alphas_cumprod, timesteps, target, proposal, final_alpha_bar)  # the move (FKC's, or a proposal)
    if plan.eta <= 0:
        raise ValueError(f"FK steering needs a stochastic move (eta > 0); eta = {plan.eta} would make "
                         "resampled copies identical forever")
    G = N // K
    S = len(timesteps)
    M = len(target.betas)
    trivial = target.is_trivial
    coef = node_coefficients(plan.ab_t, plan.ab_s, target.quadrature)  # (S,) FKC weight of each model call (0 on direct steps)
    x = x_T.double() / math.sqrt(target.total_beta)  # N(0, I / B): FKC's rho_T (B = 1: x_T itself)
    rewards = torch.zeros((N, S + 1), dtype=torch.float64)  # r_k along each current path
    log_w = torch.zeros((G, K), dtype=torch.float64)
    ess_trace = torch.empty((G, S + 1), dtype=torch.float64)
    did = torch.zeros((G, S + 1), dtype=torch.bool)
    clock = {"calls": 0, "seconds": 0.0}

    def score(k: int, x0: torch.Tensor) -> None:
        if k < S and k % cfg.reward_every:  # not a scoring step: the path keeps its last reward
            rewards[:, k] = rewards[:, k - 1]
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            values = reward(x0.to(x_T.dtype))
        rewards[:, k] = check_reward(values, N, k)  # .cpu(): waits for the device, so the clock is honest
        clock["calls"] += 1
        clock["seconds"] += time.perf_counter() - t0

    def reweight(k: int, fkc_increment) -> torch.Tensor:
        nonlocal log_w
        inc = log_potential(cfg.potential, cfg.lam, rewards[:, : k + 1]).reshape(G, K)
        if fkc_increment is not None:
            inc = inc + fkc_increment.reshape(G, K)
        log_w = log_w + inc
        if not torch.isfinite(log_w).all():
            raise FloatingPointError(f"{sampler}: non-finite log-weights at step {k}")
        log_w = log_w - log_w.max(1, keepdim=True).values  # ratios unchanged; keeps exp in range
        ess = smc.effective_sample_size(log_w)  # (G,)
        ess_trace[:, k] = ess
        return ess

    for k, t in enumerate(timesteps):
        t_model, x_in, ab_in, _ = plan.model_point(k, t, x, x_T.dtype)  # (N,) model times under Time-Shift
        eps_out, x0_out = model_fn(x_in.to(x_T.dtype), t_model)  # one model call
        eps_experts = _per_expert(eps_out, M, x)  # (M, N, ...)
        check_finite(eps_experts, sampler, k)
        x0_experts = _per_expert(x0_out, M, x)
        eps_hat = combine_eps(eps_experts.double(), target.betas)  # (N, ...) float64
        x0_hat = combine_x0(x0_experts, x_in, target.betas, ab_in)  # (N, ...) float64, the move's x0 (of eps_eff)
        score(k, x0_hat if target.total_beta == 1.0 else look_ahead(x0_experts, target.betas))
        fkc_inc = None if trivial else coef[k] * weight_rate(eps_experts, target.betas).cpu()  # (N,)
        ess = reweight(k, fkc_inc)
        if (k + 1) % cfg.resample_every == 0 and cfg.ess_threshold > 0:
            want = torch.ones(G, dtype=torch.bool) if cfg.ess_threshold >= 1 else ess < cfg.ess_threshold * K
            want = want & ~(log_w == log_w[:, :1]).all(1)  # equal weights: nothing to do
            if want.any():
                (x, x0_hat, eps_hat, rewards), t_model, x0_experts, log_w = plan.resample(
                    k, [x, x0_hat, eps_hat, rewards], t_model, x0_experts, log_w, cfg.scheme, resample_generators, want)
                did[:, k] = want
        # float64 state; the proposal reads the samples' dtype, the own move draws its noise in it
        x = plan.move(k, t, x, eps_hat, x0_hat, x0_experts, t_model, target.betas, noise_generators, x_T.dtype)
        if on_step is not None:
            on_step(k)
    score(S, x)  # the clean end: r_S = r(x0)
    reweight(S, None)
    res = finalize(x.to(x_T.dtype), log_w, rewards, cfg, ess_trace, did, resample_generators)
    res.reward_calls, res.reward_seconds = clock["calls"], clock["seconds"]
    return res


def finalize(x, log_w, rewards, cfg: FKSteerConfig, ess_trace, did, resample_generators) -> FKSteerResult:
    """Apply cfg.final (resample | weighted | best | one_per_group; docs/fk_steering.md "CLI")."""
    G, K = log_w.shape
    w_bar = smc.normalized_weights(log_w)  # (G, K)
    if cfg.final == "weighted":
        return FKSteerResult(x, w_bar.reshape(-1), rewards, log_w, ess_trace, did, torch.arange(G).repeat_interleave(K))
    if cfg.final == "resample":
        (x, rewards), _, _ = smc.resample([x, rewards], log_w, cfg.scheme, resample_generators)
        return FKSteerResult(x, torch.full((G * K,), 1.0 / K, dtype=torch.float64), rewards, log_w, ess_trace, did,
                             torch.arange(G).repeat_interleave(K))
    if cfg.final == "best":
        pick = rewards[:, -1].reshape(G, K).argmax(1)  # (G,) highest r(x0) per group
    else:
        pick = smc.draw_one_per_group(log_w, resample_generators).cpu()  # (G,)
    rows = torch.arange(G) * K + pick
    return FKSteerResult(x[rows.to(x.device)], torch.ones(G, dtype=torch.float64), rewards[rows], log_w, ess_trace, did,
                         torch.arange(G))
