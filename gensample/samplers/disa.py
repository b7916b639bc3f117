"""DiSA: diffusion step annealing for autoregressive models with a diffusion head.

Zhao et al. 2025, "DiSA: Diffusion Step Annealing in Autoregressive Image Generation"
(arXiv 2505.20297), on MAR (Li et al. 2024, arXiv 2406.11838). Notes: docs/disa.md.

A MAR-style model fills N continuous tokens in K masked-autoregressive iterations; at iteration k
a small diffusion head draws each new token with S(k) respaced DDPM steps. DiSA lets S(k) shrink
from U (early, many tokens unknown) to L (late, the next token is nearly determined).

| code name                     | paper symbol (docs/disa.md section)                         |
|-------------------------------|-------------------------------------------------------------|
| ``ar_steps``, ``k``           | K AR iterations, k = 0..K-1 (schedules)                      |
| ``upper``, ``lower``          | U early steps, L late steps, M = U - L (schedules)           |
| ``StepBudgetSchedule.steps``  | S(k) = L + i(k) (schedules)                                  |
| ``mar_mask_lengths``          | m_k, tokens still masked before iteration k (head sampler)   |
| ``tokens_per_step``           | n_k = m_k - m_{k+1} (head sampler)                            |
| ``respaced_timesteps``        | {round(j (T-1)/(S-1))} by a running float sum (head sampler) |
| ``RespacedTable``             | respaced beta_i = 1 - alpha_bar_{t_i}/alpha_bar_{t_{i-1}}    |
| ``temperature``               | tau, scales the per-step noise only (head sampler)           |
| ``timestep_clip``             | the reference DiSA path's t -> min(t, 950) (head sampler), off|
| ``head_calls`` / ``head_rows``| sum_k S(k) / sum_k n_k S(k) (x2 under CFG) (head sampler)    |

Layout: schedule and table math first (pure), then the head step and head sampler,
then the AR loop ``sample_mar``. The diffusers scheduler shell ``DiSAHeadScheduler`` is in
``gensample.schedulers.disa``; nothing here imports it.
The run glue of `gensample run --sampler disa | mar` (``schedule_from_opts``, validation, the
batch function and the two registrations) lives in ``gensample.runs.disa``; nothing here imports it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence

import torch

from .. import _moved
from ..core.ddim import ddpm_posterior, ddpm_posterior_mean, x0_from_eps_reciprocal
from ..core.denoiser import check_finite

SCHEDULES = ("constant", "linear", "cosine", "two-stage")
CFG_SCHEDULES = ("linear", "constant")
VARIANCE_TYPES = ("auto", "fixed_small", "learned_range")


def head_variance(variance_type: str, v_hat: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    """The variance interpolant to use, or None for the fixed beta-tilde (Nichol & Dhariwal 2021, eq. 15; docs/disa.md, head sampler).

    "auto" (the default): use v when the head outputs 2C channels [eps, v] (as MAR's DiffLoss, which
    samples with the learned range), else the fixed posterior variance. "learned_range" requires
    the 2C output; "fixed_small" requires a C output. A 2C output is never silently cut to eps.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    if variance_type == "learned_range" and v_hat is None:
        raise ValueError(f"variance_type 'learned_range' needs a head output of {2 * channels} channels "
                         f"(eps, v); the head returned {channels}")
    if variance_type == "fixed_small" and v_hat is not None:
        raise ValueError(f"the head returns {2 * channels} channels (eps, v: a learned variance), but "
                         f"variance_type is 'fixed_small', which would drop v; use 'auto' or 'learned_range'")
    return v_hat


# -- 1. step-budget schedules (DiSA sec. 3; docs/disa.md, schedules) -------------------------------
def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def budget_index(kind: str, k: int, num_iters: int, span: int, switch: float = 0.5) -> int:
    """i(k) in [0, span] for iteration k of K = ``num_iters`` (DiSA sec. 3; docs/disa.md, schedules), exact.

    linear:    i = floor((K-1-k) M / (K-1)) in integers. The reference takes int() of a float
               quotient, which is one short for some (K, M, k), e.g. K=11, M=90, k=3 gives 62, not 63.
    cosine:    i = floor((cos(pi k / (K-1)) + 1) / 2 * M); cos is irrational, so float64 is used
               and a value within 1e-9 of an integer is taken as that integer (so k = (K-1)/2
               with even M gives exactly M/2, not M/2 - 1).
    two-stage: i = M while k < switch (K-1) (exact rational comparison), else 0.
    constant:  i = M, i.e. S(k) = U. NOTE: the reference code's "constant" strategy means L
               (i = 0); here constant means "no annealing at U" (docs/disa.md, schedules).
    K = 1 (the reference divides by zero) gives i = M.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if num_iters == 1 or kind == "constant":
        return span
    last = num_iters - 1
    if kind == "linear":
        return (last - k) * span // last
    if kind == "cosine":
        v = (math.cos(math.pi * k / last) + 1.0) / 2.0 * span
        r = round(v)
        return int(r) if abs(v - r) < 1e-9 else math.floor(v)
    return span if Fraction(k) < Fraction(switch) * last else 0  # two-stage


@dataclass(frozen=True)
class StepBudgetSchedule:
    """S(k): diffusion-head steps at AR iteration k of K (DiSA sec. 3; docs/disa.md, schedules).

    kind: "constant" (S = U everywhere), "linear", "cosine", "two-stage", or "callable"
        (``fn(k, K) -> int``; its values are checked to lie in [1, ...] when used).
    upper, lower: U >= L >= 1. switch: fraction of (K-1) where two-stage drops from U to L.
    """

    kind: str = "linear"
    upper: int = 50
    lower: int = 5
    switch: float = 0.5
    fn: Optional[Callable[[int, int], int]] = field(default=None, compare=False)

    def __post_init__(self):
        kinds = SCHEDULES + ("callable",)
        if self.kind not in kinds:
            raise ValueError(f"schedule must be one of {kinds}, got {self.kind!r}")
        if self.kind == "callable" and not callable(self.fn):
            raise TypeError("schedule 'callable' needs fn=callable(k, K) -> int")
        _check_int("head_steps_min (L)", self.lower, 1)
        _check_int("head_steps_max (U)", self.upper, 1)
        if self.lower > self.upper:
            raise ValueError(f"head_steps_min (L={self.lower}) must be <= head_steps_max (U={self.upper})")
        if not 0.0 <= float(self.switch) <= 1.0:
            raise ValueError(f"switch must be in [0, 1], got {self.switch}")

    def steps(self, k: int, num_iters: int) -> int:
        _check_int("num_iters (K)", num_iters, 1)
        if not 0 <= k < num_iters:
            raise ValueError(f"k must be in [0, {num_iters - 1}], got {k}")
        if self.kind == "callable":
            s = self.fn(k, num_iters)
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"schedule fn({k}, {num_iters}) must return an int >= 1, got {s!r}")
            return s
        return self.lower + budget_index(self.kind, k, num_iters, self.upper - self.lower, self.switch)

    def sequence(self, num_iters: int) -> list[int]:
        return [self.steps(k, num_iters) for k in range(num_iters)]

    def to_config(self) -> dict:
        return {"kind": self.kind, "upper": self.upper, "lower": self.lower, "switch": self.switch}


# -- 2. MAR unmasking schedule (MAR sec. 3.3, cosine mask ratio) ------------------------------------------
def mar_mask_lengths(num_tokens: int, num_iters: int) -> list[int]:
    """m_0 = N, ..., m_K = 0: tokens still masked before each iteration (MAR's cosine rule).

    m_{k+1} = clamp(floor(N cos(pi/2 (k+1)/K)), 1, m_k - 1) for k < K-1 (float cos, as MAR), and the
    last iteration predicts everything left. An iteration can predict 0 tokens only if K > N-ish
    (m_k = 1 early); the AR loop then skips the head.
    """
    _check_int("num_tokens (N)", num_tokens, 1)
    _check_int("ar_steps (K)", num_iters, 1)
    lengths = [num_tokens]
    for k in range(num_iters - 1):
        raw = math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iters))
        lengths.append(max(1, min(lengths[-1] - 1, raw)))
    return lengths + [0]


def tokens_per_step(num_tokens: int, num_iters: int) -> list[int]:
    """n_k = m_k - m_{k+1}: tokens drawn at iteration k (sum = N)."""
    m = mar_mask_lengths(num_tokens, num_iters)
    return [m[k] - m[k + 1] for k in range(num_iters)]


def cfg_scale_at(kind: str, guidance_scale: float, num_tokens: int, num_iters: int, k: int) -> float:
    """MAR's CFG ramp (MAR's linear CFG schedule; docs/disa.md, head sampler): linear w_k = 1 + (w-1)(N - m'_{k+1})/N, with
    m'_{k+1} = max(1, min(m_k - 1, floor(N cos(pi/2 (k+1)/K)))) also at the last step; constant w_k = w."""
    if kind not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return guidance_scale
    m_k = mar_mask_lengths(num_tokens, num_iters)[k]
    raw = math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iters))
    m_next = max(1, min(m_k - 1, raw))
    return 1.0 + (guidance_scale - 1.0) * (num_tokens - m_next) / num_tokens


def head_budget(schedule: StepBudgetSchedule, num_tokens: int, num_iters: int,
                num_train_timesteps: int = 1000, timestep_clip: int | None = None) -> tuple[int, int]:
    """(sum_k S'(k), sum_k n_k S'(k)) per image, S' = distinct respaced steps (docs/disa.md, head sampler)."""
    calls = rows = 0
    for k, n_k in enumerate(tokens_per_step(num_tokens, num_iters)):
        if n_k == 0:
            continue
        s = len(respaced_timesteps(schedule.steps(k, num_iters), num_train_timesteps, timestep_clip))
        calls, rows = calls + s, rows + n_k * s
    return calls, rows


# -- 3. respaced DDPM tables (Nichol & Dhariwal 2021, sec. 4; docs/disa.md, head sampler) ---------------
def respaced_timesteps(num_steps: int, num_train_timesteps: int = 1000, timestep_clip: int | None = None) -> list[int]:
    """Ascending distinct training timesteps kept for ``num_steps`` head steps.

    As in MAR's (improved-DDPM) ``space_timesteps``: a running float sum of stride (T-1)/(S-1),
    each value rounded with Python's round (half to even), so S = 21 keeps 499, not 500. With
    ``timestep_clip`` c, every t > c becomes c (the reference DiSA code path; docs/disa.md, head sampler), which
    merges the top steps (S = 50 -> 48 distinct steps at c = 950).
    """
    _check_int("num_steps", num_steps, 1)
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be <= num_train_timesteps ({num_train_timesteps}), got {num_steps}")
    stride = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    if timestep_clip is not None:
        _check_int("timestep_clip", timestep_clip, 0)
        taken = [min(t, timestep_clip) for t in taken]
    return sorted(set(taken))


@dataclass(frozen=True)
class RespacedTable:
    """Coefficients of the respaced DDPM chain, float64, index i = 0..S'-1 (i = 0 is the clean end).

    timesteps: (S',) int64 original training t fed to the head. betas_i = 1 - ab_i / ab_{i-1} (ab_{-1} = 1).
    """

    timesteps: torch.Tensor
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # on x0_hat
    posterior_mean_coef2: torch.Tensor  # on x_t

    def __len__(self) -> int:
        return int(self.timesteps.numel())


def respace(alphas_cumprod: torch.Tensor, num_steps: int, timestep_clip: int | None = None) -> RespacedTable:
    """The respaced chain for ``num_steps`` (docs/disa.md, head sampler; DDPM posterior q(x_{i-1} | x_i, x0), Ho et al. eq. 6-7)."""
    ab_train = alphas_cumprod.double().cpu()
    ts = respaced_timesteps(num_steps, ab_train.numel(), timestep_clip)
    ab = ab_train[torch.tensor(ts)]  # (S',)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas, coef_x0, coef_xt, post_var = ddpm_posterior(ab, ab_prev)  # post_var: beta-tilde; 0 at i = 0
    # log of beta-tilde with the i = 0 entry replaced by i = 1 (it is 0); a 1-step chain never adds noise.
    first = post_var[1:2] if len(ts) > 1 else post_var.new_ones(1)
    log_var = torch.log(torch.cat([first, post_var[1:]]))
    return RespacedTable(
        timesteps=torch.tensor(ts, dtype=torch.long),
        betas=betas,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        posterior_log_variance_clipped=log_var,
        posterior_mean_coef1=coef_x0,
        posterior_mean_coef2=coef_xt,
    )


class HeadDDPM:
    """Respaced DDPM tables for the head, cached per step count (docs/disa.md, head sampler)."""

    def __init__(self, alphas_cumprod: torch.Tensor, timestep_clip: int | None = None,
                 variance_type: str = "auto"):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        if timestep_clip is not None:
            _check_int("timestep_clip", timestep_clip, 0)
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.timestep_clip = timestep_clip
        self.variance_type = variance_type
        self._tables: dict[int, RespacedTable] = {}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def table(self, num_steps: int) -> RespacedTable:
        if num_steps not in self._tables:
            self._tables[num_steps] = respace(self.alphas_cumprod, num_steps, self.timestep_clip)
        return self._tables[num_steps]


# -- 4. one head step and the head sampler -------------------------------------------------------
def ddpm_head_step(table: RespacedTable, i: int, x_t: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor,
                   temperature: float = 1.0, v_hat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{i-1} = mu(x_i, x0_hat) + 1[i > 0] sigma_i xi tau (docs/disa.md, head sampler). Returns (x_prev, x0_hat).

    sigma_i^2 = beta-tilde_i (fixed small), or with a learned interpolant v in [-1, 1]:
    log sigma^2 = f log beta_i + (1 - f) log beta-tilde_i, f = (v + 1)/2. No clipping of x0_hat.
    Coefficients are float64 tables cast to x_t's dtype (as the reference does).
    """
    def c(vec):
        return vec[i].to(device=x_t.device, dtype=x_t.dtype)

    ab = c(table.alphas_cumprod)
    x0_hat = x0_from_eps_reciprocal(x_t, eps_hat, ab)
    mean = ddpm_posterior_mean(x0_hat, x_t, c(table.posterior_mean_coef1), c(table.posterior_mean_coef2))
    if v_hat is None:
        log_var = c(table.posterior_log_variance_clipped)
    else:
        frac = (v_hat + 1) / 2
        log_var = frac * c(table.betas).log() + (1 - frac) * c(table.posterior_log_variance_clipped)
    if i == 0:
        return mean, x0_hat
    return mean + torch.exp(0.5 * log_var) * noise * temperature, x0_hat


@dataclass
class HeadCounter:
    """Sequential head calls, token rows evaluated, head seconds."""

    calls: int = 0
    rows: int = 0
    seconds: float = 0.0


def _head_eps(head, x_t, t, z, z_uncond, guidance_scale, counter: HeadCounter):
    """eps (and v if the head outputs 2C) with CFG on eps only: eps_u + w (eps_c - eps_u); the
    unconditional half mirrors x_t (MAR's forward_with_cfg) and v comes from the conditional half."""
    c = x_t.shape[-1]
    cfg = z_uncond is not None
    if cfg:
        out = head(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([z, z_uncond]))
    else:
        out = head(x_t, t, z)
    counter.calls += 1
    counter.rows += out.shape[0]
    if out.shape[-1] not in (c, 2 * c):
        raise ValueError(f"head output has {out.shape[-1]} channels; expected {c} (eps) or {2 * c} (eps, v)")
    eps, v = out[:, :c], (out[:, c:] if out.shape[-1] == 2 * c else None)
    if cfg:
        m = x_t.shape[0]
        eps = eps[m:] + guidance_scale * (eps[:m] - eps[m:])
        v = None if v is None else v[:m]
    return eps, v


def sample_head(head, z: torch.Tensor, table: RespacedTable, draw_noise: Callable[[], torch.Tensor], *,
                temperature: float = 1.0, guidance_scale: float = 1.0, z_uncond: torch.Tensor | None = None,
                variance_type: str = "auto", counter: HeadCounter | None = None,
                sampler: str = "disa", path: list | None = None) -> torch.Tensor:
    """Draw tokens x0 ~ head(. | z) by ancestral DDPM over ``table`` (docs/disa.md, head sampler).

    z: (M, D) conditions; z_uncond: (M, D) for CFG (None = no CFG). draw_noise() -> (M, C) standard
    normal: called once for x_T, then once at every step, the last one too (the reference's RNG order).
    Returns (M, C). ``path`` (a list) receives x_T, ..., x_0 if given (straightness metric, sec. 6).
    """
    counter = HeadCounter() if counter is None else counter
    x = draw_noise()  # x_T; tau does not scale it
    if path is not None:
        path.append(x)
    for i in reversed(range(len(table))):
        t = table.timesteps[i].to(z.device).expand(x.shape[0])  # (M,) original training t
        eps, v = _head_eps(head, x, t, z, z_uncond, guidance_scale, counter)
        check_finite(eps, sampler, i)
        noise = draw_noise()
        x, _ = ddpm_head_step(table, i, x, eps, noise, temperature, head_variance(variance_type, v, x.shape[-1]))
        if path is not None:
            path.append(x)
    return x


def path_straightness(path: torch.Tensor) -> torch.Tensor:
    """||x_0 - x_T|| / sum_i ||x_{i-1} - x_i|| per token (DiSA sec. 3 straightness; 1 = straight).

    path: (S+1, M, C) from x_T to x_0. Returns (M,) float64.
    """
    p = path.double()
    chord = (p[-1] - p[0]).norm(dim=-1)
    length = (p[1:] - p[:-1]).norm(dim=-1).sum(0)
    return chord / length.clamp(min=1e-300)


# -- 5. the MAR loop with DiSA (MAR sec. 3.3; DiSA sec. 3) ------------------------------------------
@dataclass(frozen=True)
class DiSAConfig:
    """Resolved DiSA sampling parameters (the one home of defaults; run.json dumps it)."""

    ar_steps: int = 8
    schedule: StepBudgetSchedule = field(default_factory=StepBudgetSchedule)
    temperature: float = 1.0
    guidance_scale: float = 1.0
    cfg_schedule: str = "linear"

    def __post_init__(self):
        _check_int("ar_steps", self.ar_steps, 1)
        if not isinstance(self.schedule, StepBudgetSchedule):
            raise TypeError(f"schedule must be a StepBudgetSchedule, got {type(self.schedule).__name__}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")


def sample_mar(backbone, head, ddpm: HeadDDPM, cfg: DiSAConfig, generators: Sequence[torch.Generator], *,
               num_tokens: int, token_dim: int, class_labels: torch.Tensor | None = None,
               null_class: int | None = None, device=torch.device("cpu"), dtype=torch.float32,
               on_step: Callable[[int], None] | None = None, sampler: str = "disa", record_paths: bool = False,
               orders: torch.Tensor | None = None,
               noise_fn: Callable[[int, tuple[int, int]], torch.Tensor] | None = None):
    """MAR generation with a DiSA step budget (MAR sec. 3.3; DiSA sec. 3). Returns (tokens, stats).

    Per image b (generator g_b, so results do not depend on batch composition): a random order
    (randperm from g_b), then at each iteration k the n_k tokens masked now but not next are drawn
    by ``sample_head`` with S(k) = cfg.schedule.steps(k, K) steps, their noise from g_b.
    CFG (guidance_scale != 1) doubles the backbone batch with ``null_class`` labels and the head
    batch; noise is drawn for the conditional half only (the unconditional half mirrors it).
    tokens: (B, N, C). stats: head_calls, head_rows, nfe (= head_calls), backbone_calls,
    backbone_rows, head_time_s, backbone_time_s, head_steps (the S'(k) list), and with
    ``record_paths`` a list per k of (S'+1, B n_k, C) head trajectories.

    Fixed randomness (a comparison with other code, e.g. the reference MAR's ``sample_tokens``):
    ``orders`` (B, N) int64, one permutation of 0..N-1 per image, replaces the randperm draws (the
    first m_{k+1} slots of an order are still masked after iteration k); ``noise_fn(k, (B n_k, C))``
    replaces the generator draws at iteration k: it is called once for x_T, then once per head step
    (the last step too), and returns standard normal noise of that shape, rows image-major with the
    slots of each image ascending (the conditional half under CFG).
    """
    bsz, n_k_list = len(generators), tokens_per_step(num_tokens, cfg.ar_steps)
    use_cfg = cfg.guidance_scale != 1.0
    if use_cfg and (class_labels is None or null_class is None):
        raise ValueError("guidance_scale != 1 needs a class-conditional model with a null class")
    if orders is None:
        orders = torch.stack([torch.randperm(num_tokens, generator=g) for g in generators])  # (B, N)
    else:
        orders = _check_orders(orders, bsz, num_tokens)
    orders = orders.to(device)
    tokens = torch.zeros(bsz, num_tokens, token_dim, device=device, dtype=dtype)  # (B, N, C)
    masked = torch.ones(bsz, num_tokens, dtype=torch.bool, device=device)
    counter, stats = HeadCounter(), {"backbone_calls": 0, "backbone_rows": 0, "backbone_time_s": 0.0, "head_steps": []}
    labels_in = class_labels
    if use_cfg:
        labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_class)])
    paths = []
    m_lengths = mar_mask_lengths(num_tokens, cfg.ar_steps)
    for k, n_k in enumerate(n_k_list):
        t0 = time.perf_counter()
        if use_cfg:
            z_all = backbone(torch.cat([tokens, tokens]), torch.cat([masked, masked]), labels_in)  # (2B, N, D)
        else:
            z_all = backbone(tokens, masked, labels_in)  # (B, N, D)
        _sync(device)
        stats["backbone_time_s"] += time.perf_counter() - t0
        stats["backbone_calls"] += 1
        stats["backbone_rows"] += z_all.shape[0]
        if n_k == 0:
            stats["head_steps"].append(0)
            if on_step is not None:
                on_step(1)
            continue
        pos = orders[:, m_lengths[k + 1]: m_lengths[k]].sort(dim=1).values  # (B, n_k) slots drawn now
        rows = torch.arange(bsz, device=device)[:, None].expand_as(pos)
        z = z_all[:bsz][rows, pos].reshape(bsz * n_k, -1)  # (B n_k, D)
        z_u = z_all[bsz:][rows, pos].reshape(bsz * n_k, -1) if use_cfg else None
        table = ddpm.table(cfg.schedule.steps(k, cfg.ar_steps))
        stats["head_steps"].append(len(table))
        w_k = cfg_scale_at(cfg.cfg_schedule, cfg.guidance_scale, num_tokens, cfg.ar_steps, k)

        def draw_noise(k=k, n_k=n_k):
            if noise_fn is not None:
                return _checked_noise(noise_fn(k, (bsz * n_k, token_dim)), (bsz * n_k, token_dim), k, device, dtype)
            noise = [torch.randn((n_k, token_dim), generator=g) for g in generators]
            return torch.cat(noise).to(device=device, dtype=dtype)  # (B n_k, C), rows image-major

        t0 = time.perf_counter()
        path = [] if record_paths else None
        x0 = sample_head(head, z, table, draw_noise, temperature=cfg.temperature, guidance_scale=w_k, z_uncond=z_u,
                         variance_type=ddpm.variance_type, counter=counter, sampler=sampler, path=path)
        _sync(device)
        counter.seconds += time.perf_counter() - t0
        if record_paths:
            paths.append(torch.stack(path))
        tokens = tokens.clone()
        tokens[rows, pos] = x0.reshape(bsz, n_k, token_dim).to(tokens.dtype)
        masked = masked.clone()
        masked[rows, pos] = False
        if on_step is not None:
            on_step(1)
    stats.update(head_calls=counter.calls, head_rows=counter.rows, nfe=counter.calls, head_time_s=counter.seconds)
    if record_paths:
        stats["paths"] = paths
    return tokens, stats


def _check_orders(orders, bsz: int, num_tokens: int) -> torch.Tensor:
    """orders must be (B, N) integers, each row a permutation of 0..N-1."""
    if not isinstance(orders, torch.Tensor):
        raise TypeError(f"orders must be a torch.Tensor of shape ({bsz}, {num_tokens}), got {type(orders).__name__}")
    if orders.shape != (bsz, num_tokens) or orders.is_floating_point() or orders.is_complex():
        raise ValueError(f"orders must be an integer tensor of shape ({bsz}, {num_tokens}) (one order per image), "
                         f"got {orders.dtype} {tuple(orders.shape)}")
    orders = orders.long().cpu()
    bad = (orders.sort(dim=1).values != torch.arange(num_tokens)).any(dim=1)  # (B,)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"orders: every row must be a permutation of 0..{num_tokens - 1}, got row {row} = "
                         f"{orders[row].tolist()}")
    return orders


def _checked_noise(noise, shape: tuple[int, int], k: int, device, dtype) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise_fn({k}, {shape}) must return a tensor of shape {shape}, got {got}")
    return noise.to(device=device, dtype=dtype)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def evidence_metrics(backbone, head, ddpm: HeadDDPM, generators, class_labels, *, num_tokens: int, token_dim: int,
                     ar_steps: int = 8, num_steps: int = 50, draws: int = 32, null_class=None, seed: int = 0) -> dict:
    """DiSA's evidence per AR iteration k (DiSA sec. 3, variance and straightness), from one full-step MAR run:
    straightness of the head's reverse paths, and the head's sample variance for fixed z
    (``draws`` samples per token, per-dimension variance averaged over dims and tokens).
    Returns {"straightness": [K], "variance": [K]} (float lists)."""
    conds = []

    def recording_head(x_t, t, z):  # keeps each iteration's z (one object per iteration)
        if not conds or conds[-1] is not z:
            conds.append(z)
        return head(x_t, t, z)

    cfg = DiSAConfig(ar_steps=ar_steps, schedule=StepBudgetSchedule("constant", num_steps, num_steps))
    _, stats = sample_mar(backbone, recording_head, ddpm, cfg, generators, num_tokens=num_tokens, token_dim=token_dim,
                          class_labels=class_labels, null_class=null_class, record_paths=True)
    g = torch.Generator().manual_seed(seed)
    straightness, variance = [], []
    for path, z in zip(stats["paths"], conds):
        straightness.append(float(path_straightness(path).mean()))
        z_rep = z.repeat_interleave(draws, 0)  # (M draws, D)
        x = sample_head(head, z_rep, ddpm.table(num_steps), lambda: torch.randn((z_rep.shape[0], token_dim), generator=g))
        variance.append(float(x.reshape(-1, draws, token_dim).var(1).mean()))
    return {"straightness": straightness, "variance": variance}


# -- deprecated import path (one release): the diffusers face moved to gensample.schedulers.disa (gensample._moved)
__getattr__ = _moved.moved(__name__, "gensample.schedulers.disa", ("DiSAHeadScheduler", "DiSAHeadSchedulerOutput"))
