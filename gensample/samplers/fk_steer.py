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

Particles are a flat group-major batch of N = G * K rows; resampling never crosses groups
(core/smc.py). The DDPM move and the grid are ``core.ddim``'s; the CLI glue (reward resolution,
seeds, samples.npz extras) is ``gensample.runs.fk_steer``; reward plug-ins are ``gensample.rewards``.
Sections: 1. parameters, 2. potentials, 3. the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core import smc
from ..core.ddim import alpha_bar_pairs, ddim_sigma, ddim_update
from ..core.denoiser import check_finite
from ..core.noise import normal, normal_rows

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
    These field defaults are the only defaults: the CLI options read them.
    """

    lam: float = 10.0
    potential: str = "diff"
    resample_every: int = 1
    ess_threshold: float = 1.0
    scheme: str = "systematic"
    final: str = "resample"

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
) -> FKSteerResult:
    """FK steering (paper Algorithm 1) with the DDPM proposal, on G groups of K particles.

    model_fn(x, t) -> (eps_hat, x0_hat), each (N, ...), from one model call at grid time t.
    reward(x0) -> (N,) tensor: r on the model's sample space (``gensample.rewards``).
    x_T: (N, ...) standard normal, N = G * group_size. noise_generators: one per particle (the
    API's per-sample convention) or a single generator (one batched draw per step);
    resample_generators: one per group (or one shared). Per step k (t = timesteps[k]):

      1. eps_hat, x0_hat = model(x_t); r_k = r(x0_hat)
      2. log w += log G_k (``log_potential``); ESS; resample within groups (every
         ``resample_every`` steps, when ESS < ess_threshold * K)
      3. x_s = DDPM step (DDIM eq. 12 with eta = 1) from the resampled (x0_hat, eps_hat)
    At the clean end: r_S = r(x0), log w += log G_S, a last resampling decision is left to the final
    policy (``cfg.final``).
    """
    N = x_T.shape[0]
    K = int(group_size)
    if K < 1 or N % K:
        raise ValueError(f"number of particles N={N} must be a positive multiple of group_size={K}")
    batched_noise = isinstance(noise_generators, torch.Generator)
    if not batched_noise and len(noise_generators) != N:
        raise ValueError(f"noise_generators must be one torch.Generator or one per particle ({N}), got {len(noise_generators)}")
    G = N // K
    S = len(timesteps)
    ab_t, ab_s = alpha_bar_pairs(alphas_cumprod, timesteps, final_alpha_bar)
    event = tuple(x_T.shape[1:])
    x = x_T.double()
    rewards = torch.zeros((N, S + 1), dtype=torch.float64)  # r_k along each current path
    log_w = torch.zeros((G, K), dtype=torch.float64)
    ess_trace = torch.empty((G, S + 1), dtype=torch.float64)
    did = torch.zeros((G, S + 1), dtype=torch.bool)

    def reweight(k: int, values) -> torch.Tensor:
        nonlocal log_w
        rewards[:, k] = check_reward(values, N, k)
        log_w = log_w + log_potential(cfg.potential, cfg.lam, rewards[:, : k + 1]).reshape(G, K)
        log_w = log_w - log_w.max(1, keepdim=True).values  # ratios unchanged; keeps exp in range
        ess = smc.effective_sample_size(log_w)  # (G,)
        ess_trace[:, k] = ess
        return ess

    for k, t in enumerate(timesteps):
        eps_hat, x0_hat = model_fn(x.to(x_T.dtype), t)  # (N, ...) each, one model call
        check_finite(eps_hat, sampler, k)
        eps_hat, x0_hat = eps_hat.double(), x0_hat.double()
        with torch.no_grad():
            ess = reweight(k, reward(x0_hat.to(x_T.dtype)))
        if (k + 1) % cfg.resample_every == 0 and cfg.ess_threshold > 0:
            want = torch.ones(G, dtype=torch.bool) if cfg.ess_threshold >= 1 else ess < cfg.ess_threshold * K
            want = want & ~(log_w == log_w[:, :1]).all(1)  # equal weights: nothing to do
            if want.any():
                (x0_hat, eps_hat, rewards), log_w, _ = smc.resample([x0_hat, eps_hat, rewards], log_w, cfg.scheme,
                                                                   resample_generators, mask=want)
                did[:, k] = want
        sigma_s = ddim_sigma(ab_t[k], ab_s[k], 1.0, clamp=True)  # DDPM posterior std (eta = 1)
        if batched_noise:  # one (N, ...) draw per step (faster; depends on the batch)
            noise = normal((N, *event), noise_generators, device=x.device, dtype=torch.float64)
        else:  # one draw per particle from its own generator (batch-independent)
            noise = normal_rows(noise_generators, event, device=x.device, dtype=torch.float64)
        x = ddim_update(x0_hat, eps_hat, ab_s[k], sigma_s, noise, clamp=True)  # (N, ...) float64
        if on_step is not None:
            on_step(k)
    with torch.no_grad():
        reweight(S, reward(x.to(x_T.dtype)))  # the clean end: r_S = r(x0)
    return finalize(x.to(x_T.dtype), log_w, rewards, cfg, ess_trace, did, resample_generators)


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
