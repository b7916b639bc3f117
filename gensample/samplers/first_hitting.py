"""First-hitting sampler (FHS) and the ancestral grid sampler for masked diffusion models.

Zheng, Chen, Mao, Liu, Zhu, Zhang, "Masked Diffusion Models are Secretly Time-Agnostic Masked
Models and Exploit Inaccurate Categorical Sampling", ICLR 2025, arXiv 2409.02908.
Notes: docs/first_hitting.md (ancestral step, first-hitting sampler, precision, scheduler).
Baseline semantics: MDLM (Sahoo et al. 2024) ``ddpm_cache`` with ``noise_removal``.

Code name -> paper symbol:
    x            x_t, Long[B, L]; ``mask_token_id`` is m
    alpha(t)     alpha_t, probability that a token is still clean at time t (alpha_0 = 1)
    logits       the network output (B, L, K') in its own dtype; log mu = log_softmax(logits / T)
                 with the mask (and exclude ids) at -inf is formed in float64 only for the rows
                 that are sampled (FHS: B x k rows; ancestral: the rows revealed in the step, in
                 bounded chunks; the MDLM float32 / b-bit emulation: every masked row)
    t, s         current and next time (s < t) of an ancestral step
    tau          next first-hitting time, tau = alpha^-1(1 - (1 - alpha_t) r)   (paper sec. 4.1)
    r            u^(1/n) for one reveal, Beta(n - k + 1, k) for k reveals
    n            number of masked positions in a row
The network never sees t unless ``time_conditioning``; then it gets sigma(t) = -log alpha_t,
with alpha floored at ``SIGMA_ALPHA_FLOOR`` so that t = 1 on the linear schedule (alpha_1 = 0)
gives the finite sigma_max = -log(1e-3) of MDLM's log-linear schedule instead of +inf.

The `gensample run --sampler fhs | mdm-ancestral` glue (options, batch function, samples.txt) is in
``gensample.runs.first_hitting``; the diffusers face, ``MaskedDiffusionScheduler``, is in
``gensample.schedulers.first_hitting`` (nothing here imports either).
"""

from __future__ import annotations

import math
import time
from dataclasses import MISSING, dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch

from .. import _moved
from ..core.categorical import PRECISIONS, Generators, masked_argmax, masked_log_softmax, sample_rows, uniform

SCHEDULES = ("linear", "loglinear", "cosine")
FINAL_STEPS = ("sample", "argmax")
METHODS = ("first_hitting", "ancestral")
SCHEDULE_EPS = 1e-3  # epsilon of the log-linear and cosine schedules (MDLM)
SIGMA_ALPHA_FLOOR = 1e-3  # alpha_t floor of the time input: sigma <= -log(1e-3), MDLM's log-linear sigma(1)


# -- 1. schedules (docs/first_hitting.md) ------------------------------------------------------------------
def mask_alpha(t, schedule: str = "linear") -> torch.Tensor:
    """alpha_t: linear 1 - t; loglinear 1 - (1 - eps) t; cosine eps + (1 - eps) cos(pi t / 2)
    (MDLM's cosine; MD4's "cosine" 1 - sin(pi t / 2) differs). eps = 1e-3. float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "loglinear":
        return 1.0 - (1.0 - SCHEDULE_EPS) * t
    if schedule == "cosine":
        return SCHEDULE_EPS + (1.0 - SCHEDULE_EPS) * torch.cos(math.pi * t / 2)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def mask_alpha_inv(a, schedule: str = "linear") -> torch.Tensor:
    """t with alpha_t = a (inverse of ``mask_alpha``), clamped to [0, 1]. float64."""
    a = torch.as_tensor(a, dtype=torch.float64)
    if schedule == "linear":
        t = 1.0 - a
    elif schedule == "loglinear":
        t = (1.0 - a) / (1.0 - SCHEDULE_EPS)
    elif schedule == "cosine":
        t = (2 / math.pi) * torch.arccos(((a - SCHEDULE_EPS) / (1.0 - SCHEDULE_EPS)).clamp(-1.0, 1.0))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return t.clamp(0.0, 1.0)


def time_input(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """sigma(t) = -log max(alpha_t, 1e-3), the time input of time-conditioned models (SEDD / MDLM
    convention). The floor only acts where alpha_t < 1e-3 (linear schedule, t > 0.999): there the
    model gets MDLM's sigma_max = -log(1e-3) ~ 6.91 instead of sigma(1) = +inf. float64."""
    return -torch.log(mask_alpha(t, schedule).clamp_min(SIGMA_ALPHA_FLOOR))


# -- 2. parameters --------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskedDiffusionConfig:
    """Sampling parameters (defaults: docs/first_hitting.md)."""

    mask_token_id: int
    schedule: str = "linear"
    num_inference_steps: int | None = None  # ancestral grid size N
    t_min: float = 1e-5  # last grid time; a final step t_min -> 0 follows when t_min > 0
    final_step: str = "sample"  # "sample" (exact) | "argmax" (MDLM noise_removal)
    tokens_per_step: int = 1  # FHS k
    precision: str = "float64"
    uniform_bits: int | None = None
    temperature: float = 1.0
    time_conditioning: bool = False
    cache: bool = True
    exclude_ids: tuple = ()

    def __post_init__(self):
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {self.mask_token_id!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.final_step not in FINAL_STEPS:
            raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {self.final_step!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_inference_steps is not None and (not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got {self.num_inference_steps!r}")
        if not (isinstance(self.tokens_per_step, int) and self.tokens_per_step >= 1):
            raise ValueError(f"tokens_per_step must be an int >= 1, got {self.tokens_per_step!r}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


DEFAULTS = {f.name: f.default for f in fields(MaskedDiffusionConfig) if f.default is not MISSING}  # the one home of defaults


# -- 3. pure step functions -----------------------------------------------------------------
def excluded_ids(cfg: MaskedDiffusionConfig) -> tuple:
    """Token ids never sampled: the mask and ``exclude_ids`` (MDLM "subs": mask logit -inf)."""
    return (cfg.mask_token_id, *cfg.exclude_ids)


def token_log_probs(logits: torch.Tensor, cfg: MaskedDiffusionConfig) -> torch.Tensor:
    """log mu over the vocabulary, float64 (..., K'); the mask and exclude ids get -inf (MDLM "subs").
    Pass only the rows you sample: the samplers below never call this on a full (B, L, K') tensor."""
    return masked_log_softmax(logits, excluded_ids(cfg), cfg.temperature)


def hitting_fraction(n: torch.Tensor, k: int, generator: Generators) -> torch.Tensor:
    """r = (1 - alpha_tau) / (1 - alpha_t) after revealing min(k, n) of n masks (paper sec. 4.1).

    The masking times of n masks are iid with CDF (1 - alpha)/(1 - alpha_t); the k-th latest is
    the k-th largest of n uniforms ~ Beta(n - k + 1, k) = S_{n-k+1} / S_{n+1} with S_j a sum of j
    Exp(1) (Renyi's representation). For k = 1 this is u^(1/n), drawn exactly so. n: (B,) int64.
    Rows with n = 0 return 1 (no change). Returns (B,) float64.
    """
    B = n.shape[0]
    n = n.to("cpu")
    if k == 1:
        u = uniform((B,), generator, dtype=torch.float64)
        r = u ** (1.0 / n.clamp_min(1).double())
    elif isinstance(generator, torch.Generator):
        n_max = int(n.max()) if B else 0
        E = -torch.log1p(-uniform((B, n_max + 1), generator, dtype=torch.float64))  # (B, n_max + 1) Exp(1)
        S = torch.cumsum(E, 1)
        total = S.gather(1, n[:, None])[:, 0]  # S_{n+1}
        part = S.gather(1, (n - n.clamp_max(k)).clamp_min(0)[:, None])[:, 0]  # S_{n-k+1}
        r = part / total
    else:  # one generator per row: each row draws exactly n_b + 1 exponentials (batch-independent)
        r = torch.ones(B, dtype=torch.float64)
        for b, (g, n_b) in enumerate(zip(generator, n.tolist())):
            u = torch.rand(n_b + 1, generator=g, dtype=torch.float64, device=g.device).cpu()
            S = torch.cumsum(-torch.log1p(-u), 0)
            r[b] = S[n_b - min(k, n_b)] / S[n_b]
    return torch.where(n > 0, r, torch.ones_like(r))


def first_hitting_time(t: torch.Tensor, r: torch.Tensor, schedule: str) -> torch.Tensor:
    """tau = alpha^-1(1 - (1 - alpha_t) r) (paper sec. 4.1, first-hitting time); linear: tau = t r. float64 (B,)."""
    return mask_alpha_inv(1.0 - (1.0 - mask_alpha(t, schedule)) * r, schedule)


def choose_masked_positions(is_masked: torch.Tensor, k: int, generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """min(k, n_b) distinct masked positions per row, uniformly (random scores, -inf elsewhere, top-k).

    is_masked: (B, L) bool. Returns positions (B, k') int64 and valid (B, k') bool, k' = min(k, L).
    """
    B, L = is_masked.shape
    k = min(k, L)
    scores = uniform((B, L), generator, dtype=torch.float64).to(is_masked.device)
    scores = scores.masked_fill(~is_masked, float("-inf"))
    top, pos = scores.topk(k, dim=1)
    return pos, torch.isfinite(top)


def next_hitting_time(x: torch.Tensor, t: torch.Tensor, cfg: MaskedDiffusionConfig, generator: Generators) -> torch.Tensor:
    """tau for each row (B,) float64 on CPU: the time of the next min(k, n) reveals (FHS step 1).
    Rows without masks keep t."""
    n = (x == cfg.mask_token_id).sum(1).cpu()  # (B,)
    r = hitting_fraction(n, cfg.tokens_per_step, generator)
    return torch.where(n > 0, first_hitting_time(t.cpu(), r, cfg.schedule), t.cpu())


def fhs_reveal(x: torch.Tensor, logits: torch.Tensor, cfg: MaskedDiffusionConfig, generator: Generators) -> torch.Tensor:
    """Reveal min(k, n) uniformly chosen masked positions, each drawn from its own row of mu
    (FHS steps 3-4). The k chosen rows are gathered from the logits *before* any float64 upcast:
    B x k x K' float64 work, never B x L x K'.

    x: (B, L) int64; logits: (B, L, K') network output on this x (any float dtype). Returns x_new.
    """
    B = x.shape[0]
    pos, valid = choose_masked_positions(x == cfg.mask_token_id, cfg.tokens_per_step, generator)  # (B, k)
    k = pos.shape[1]
    rows = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # (B, k, K') model dtype
    owner = torch.arange(B, device=x.device).repeat_interleave(k)  # (B k,)
    tokens = sample_rows(rows.reshape(B * k, -1), owner, generator, exclude=excluded_ids(cfg),
                         temperature=cfg.temperature, precision=cfg.precision,
                         uniform_bits=cfg.uniform_bits).view(B, k)  # (B, k)
    x_new = x.clone()
    x_new.scatter_(1, pos, torch.where(valid, tokens, x.gather(1, pos)))
    return x_new


def ancestral_step(x: torch.Tensor, logits: torch.Tensor, t: float, s: float, cfg: MaskedDiffusionConfig,
                   generator: Generators) -> torch.Tensor:
    """One grid step t -> s (MDLM eq. for the reverse posterior q(x_s | x_t, x0 = mu)): each masked
    position stays masked with weight 1 - alpha_s or becomes v with weight (alpha_s - alpha_t) mu[i, v].
    Unmasked positions are frozen and draw nothing.

    Exact float64 path (default): the two-stage form of the same law. The weights sum to 1 - alpha_t
    (mu sums to 1), so a masked position moves with probability p = (alpha_s - alpha_t) / (1 - alpha_t)
    (one float64 uniform per masked position, ``move_mask``) and, if it moves, takes v ~ mu (Gumbel-max
    on its own float64 row). Only the positions that move are upcast and draw V uniforms: on a fine
    grid that is about L rows over the whole run instead of (masked rows) x (grid steps).
    Emulation paths (``precision="float32"`` or ``uniform_bits``): MDLM ``ddpm_cache`` verbatim, one
    Gumbel-max over the K' + 1 entries of every masked row (mask weight last), to keep its artefact.

    x: (B, L) int64; logits: (B, L, K') network output (any float dtype). Returns the new x.
    """
    a_t, a_s = mask_alpha(t, cfg.schedule).item(), mask_alpha(s, cfg.schedule).item()
    masked = x == cfg.mask_token_id
    B, L, K = logits.shape
    flat = logits.reshape(B * L, K)  # a view: rows are gathered chunk by chunk inside sample_rows
    x_new = x.clone()
    if cfg.precision == "float64" and cfg.uniform_bits is None:
        p_move = (a_s - a_t) / (1.0 - a_t) if a_s > a_t else 0.0
        moves = move_mask(masked, p_move, generator)  # (B, L) bool, subset of masked
        b_idx, l_idx = moves.nonzero(as_tuple=True)  # (M',) row-major
        draw = sample_rows(flat, b_idx, generator, rows=b_idx * L + l_idx, exclude=excluded_ids(cfg),
                           temperature=cfg.temperature)  # (M',) in [0, K)
        x_new[b_idx, l_idx] = draw
        return x_new
    move = math.log(a_s - a_t) if a_s > a_t else float("-inf")
    stay = math.log(1.0 - a_s) if a_s < 1.0 else float("-inf")
    b_idx, l_idx = masked.nonzero(as_tuple=True)  # (M,), (M,) row-major: a row's positions in order
    draw = sample_rows(flat, b_idx, generator, rows=b_idx * L + l_idx, exclude=excluded_ids(cfg),
                       temperature=cfg.temperature, shift=move, extra_log_w=stay,
                       precision=cfg.precision, uniform_bits=cfg.uniform_bits)  # (M,) in [0, K]
    draw = torch.where(draw == K, cfg.mask_token_id, draw)
    x_new[b_idx, l_idx] = draw
    return x_new


def move_mask(masked: torch.Tensor, p: float, generator: Generators) -> torch.Tensor:
    """Which masked positions are revealed in an ancestral step: independent Bernoulli(p), one float64
    uniform per masked position (row-major; with a list of generators, row b draws its own n_b uniforms
    from generator b, so a row's draws do not depend on the rest of the batch). p = 0 draws nothing.
    masked: (B, L) bool. Returns (B, L) bool, True only where ``masked``."""
    out = torch.zeros_like(masked)
    if p <= 0.0 or not masked.any():
        return out
    if isinstance(generator, torch.Generator):
        u = uniform((int(masked.sum()),), generator, dtype=torch.float64).to(masked.device)
        out[masked] = u < p
        return out
    gens = list(generator)
    if len(gens) != masked.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {masked.shape[0]} rows; need one per row")
    for b, g in enumerate(gens):
        n_b = int(masked[b].sum())
        if n_b:
            u = torch.rand(n_b, generator=g, dtype=torch.float64, device=g.device).to(masked.device)
            out[b, masked[b]] = u < p
    return out


def final_argmax_step(x: torch.Tensor, logits: torch.Tensor, cfg: MaskedDiffusionConfig) -> torch.Tensor:
    """MDLM ``noise_removal``: every still-masked position takes argmax mu (greedy, not exact)."""
    return fill_masks_argmax(x, logits, cfg)


def fill_masks_argmax(x: torch.Tensor, logits: torch.Tensor, cfg: MaskedDiffusionConfig) -> torch.Tensor:
    """x with each masked position set to argmax mu (mask and exclude ids never chosen); only the
    masked rows are touched, no float64 copy."""
    masked = x == cfg.mask_token_id
    out = x.clone()
    out[masked] = masked_argmax(logits[masked], excluded_ids(cfg))
    return out


def ancestral_times(num_steps: int, t_min: float) -> list[float]:
    """MDLM grid linspace(1, t_min, N + 1), plus 0 when t_min > 0 (the final step). float64 values."""
    grid = np.linspace(1.0, t_min, num_steps + 1).tolist()
    return grid + [0.0] if t_min > 0 else grid


# -- 4. loops ---------------------------------------------------------------------------------
Network = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def check_logits(logits: torch.Tensor, x: torch.Tensor, name: str, step: int) -> torch.Tensor:
    """Validate a network output (B, L, K') for input x (B, L): shape, no NaN / +inf (-inf is allowed:
    an excluded token). The full scan runs only when the cheap sum test flags a problem."""
    if hasattr(logits, "logits"):
        logits = logits.logits
    elif isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not torch.is_tensor(logits) or logits.ndim != 3 or logits.shape[:2] != x.shape:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"network must return logits (B, L, K) for input {tuple(x.shape)}, got {shape}")
    total = logits.sum()  # NaN anywhere -> NaN; +inf anywhere -> +inf or NaN
    if not (torch.isfinite(total) or total == float("-inf")):
        if torch.isnan(logits).any() or (logits == float("inf")).any():
            raise FloatingPointError(f"{name}: non-finite values (NaN/+Inf) in the model output at step {step}")
    return logits


class _Evaluator:
    """Calls the network on selected rows, checks the output, counts and times. Returns the raw
    logits in the network's dtype (the samplers upcast only the rows they sample)."""

    def __init__(self, network: Network, cfg: MaskedDiffusionConfig, name: str):
        self.network, self.cfg, self.name = network, cfg, name
        self.stats = {"nfe": 0, "model_rows": 0, "model_time_s": 0.0, "categorical_time_s": 0.0}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        time_in = time_input(t, self.cfg.schedule).float().to(x.device) if self.cfg.time_conditioning else None
        logits = check_logits(self.network(x, time_in), x, self.name, step)
        self.stats["nfe"] += 1
        self.stats["model_rows"] += x.shape[0]
        self.stats["model_time_s"] += time.perf_counter() - t0
        return logits

    def timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if out.is_cuda:  # time the work, not the kernel launches
            torch.cuda.synchronize(out.device)
        self.stats["categorical_time_s"] += time.perf_counter() - t0
        return out


def _rows(generator: Generators, idx: torch.Tensor) -> Generators:
    """The generators of the selected rows (a single shared generator stays as is)."""
    if isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in idx.tolist()]


def sample_first_hitting(network: Network, x: torch.Tensor, cfg: MaskedDiffusionConfig, generator: Generators,
                         on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """FHS (Zheng et al. 2024, sec. 4.1, Algorithm "first-hitting sampler") from x (B, L) with masks; t starts at 1.

    Each iteration: evaluate mu on the current x at the new time, reveal min(k, n) positions.
    NFE is exactly ceil(n / k) for rows with n masks. Returns (x0, stats).
    """
    ev = _Evaluator(network, cfg, "fhs")
    t = torch.ones(x.shape[0], dtype=torch.float64)
    step = 0
    while True:
        active = (x == cfg.mask_token_id).any(1).nonzero()[:, 0]
        if active.numel() == 0:
            break
        gens = _rows(generator, active)
        tau = next_hitting_time(x[active], t[active], cfg, gens)  # (A,)
        # the network sees the pre-jump x at the new time tau; time-agnostic nets ignore it
        logits = ev(x[active], tau, step)
        x_a = ev.timed(fhs_reveal, x[active], logits, cfg, gens)
        del logits
        x = x.clone()
        x[active] = x_a
        t[active] = tau
        step += 1
        if on_step is not None:
            on_step(1)
    ev.stats["steps"] = step
    return x, ev.stats


def sample_ancestral(network: Network, x: torch.Tensor, cfg: MaskedDiffusionConfig, generator: Generators,
                     on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Ancestral grid sampler with caching (MDLM ``ddpm_cache``; docs/first_hitting.md).

    Grid linspace(1, t_min, N + 1); then, if t_min > 0, a final step to 0: ``final_step="sample"``
    is the exact step to s = 0, ``"argmax"`` is MDLM's noise removal. mu is re-evaluated only on
    rows whose tokens changed since their last evaluation (time-agnostic model, ``cache=True``).
    The cache holds the raw logits (B, L, K') in the network's dtype, not float64 probabilities.
    """
    if cfg.num_inference_steps is None:
        raise ValueError("the ancestral sampler needs num_inference_steps (--steps)")
    ev = _Evaluator(network, cfg, "mdm-ancestral")
    times = ancestral_times(cfg.num_inference_steps, cfg.t_min)
    B, L = x.shape
    cached = None  # (B, L, K') network dtype
    stale = torch.ones(B, dtype=torch.bool, device=x.device)
    reuse = cfg.cache and not cfg.time_conditioning
    for j, (t, s) in enumerate(zip(times[:-1], times[1:])):
        has_mask = (x == cfg.mask_token_id).any(1)
        if not has_mask.any():
            if on_step is not None:
                on_step(len(times) - 1 - j)
            break
        need = (stale if reuse else torch.ones_like(stale)) & has_mask
        if need.any():
            idx = need.nonzero()[:, 0]
            t_vec = torch.full((idx.numel(),), t, dtype=torch.float64)
            logits = ev(x[idx], t_vec, j)
            if cached is None and idx.numel() == B:
                cached = logits  # the first call covers every row: keep it, no copy
            else:
                if cached is None:
                    cached = torch.zeros((B, L, logits.shape[-1]), dtype=logits.dtype, device=x.device)
                cached[idx] = logits
            del logits
            stale[idx] = False
        is_final = s == 0.0 and cfg.t_min > 0
        if is_final and cfg.final_step == "argmax":
            x_new = final_argmax_step(x, cached, cfg)
        else:
            x_new = ev.timed(ancestral_step, x, cached, t, s, cfg, generator)
        stale |= (x_new != x).any(1)
        x = x_new
        if on_step is not None:
            on_step(1)
    ev.stats["steps"] = len(times) - 1
    return x, ev.stats


def initial_tokens(batch: int, length: int, mask_token_id: int, prompt: Sequence[int] = (), device=None) -> torch.Tensor:
    """(B, L) all-mask start with ``prompt`` ids fixed at the first positions (never masked)."""
    if len(prompt) >= length:
        raise ValueError(f"prompt has {len(prompt)} tokens; it must be shorter than --length ({length})")
    x = torch.full((batch, length), int(mask_token_id), dtype=torch.long, device=device)
    if len(prompt):
        x[:, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
    return x


def expected_ancestral_nfe(num_steps: int, num_masks: int, skip_finished: bool = True) -> float:
    """E[NFE] per row of the cached ancestral sampler, linear schedule, grid 1 -> 0 (docs/first_hitting.md).

    MDLM count: 1 + (N - 1)(1 - (1 - 1/N)^L) (a call follows every step that changed the row,
    even the step that revealed its last mask). ``skip_finished=True`` (our sampler) makes no call on
    a row without masks, which removes that call when the last grid interval reveals nothing:
    minus (1 - 1/N)^L.
    """
    N, L = num_steps, num_masks
    none_last = (1 - 1 / N) ** L
    return 1 + (N - 1) * (1 - none_last) - (none_last if skip_finished else 0.0)


# -- deprecated import path (one release): the diffusers face moved to gensample.schedulers.first_hitting (gensample._moved)
__getattr__ = _moved.moved(__name__, "gensample.schedulers.first_hitting",
                           ("MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput"))
