"""Posterior sampling for linear inverse problems: STSL, with DPS and PSLD baselines, and `gold`.

STSL: Rout et al., "Beyond First-Order Tweedie: Solving Inverse Problems using Latent Diffusion",
CVPR 2024, arXiv 2312.00852 (Eq. 4, Alg. 1). DPS: Chung et al., ICLR 2023, arXiv 2209.14687,
Alg. 1. PSLD: Rout et al., NeurIPS 2023, arXiv 2307.00619, Alg. 2. One loop runs all three, in
pixel space (codec = identity) or latent space (codec = VAE), on a diffusers DDIM timestep grid.

| code name            | paper symbol (STSL sec. 3; docs/stsl.md)                         |
|----------------------|------------------------------------------------------------------|
| ``z``                | z_t (latent or pixel state)                                      |
| ``eps_hat``          | eps_theta(z_t, t)                                                |
| ``z0_hat``           | first-order Tweedie E[z_0 | z_t]                                 |
| ``x_hat``            | D(z0_hat)                                                        |
| ``data_weight``      | lambda (STSL Eq. 4)                                              |
| ``trace_weight``     | eta (STSL Eq. 4; the loss uses eta / d)                          |
| ``probe_scale``      | delta of the finite-difference Hutchinson probe T_delta           |
| ``step_size``        | rho, inner gradient step                                         |
| ``inner_steps``      | K                                                                |
| ``zeta``             | zeta, DPS step weight (Alg. 1)                                   |
| ``gamma``, ``omega`` | PSLD gluing and measurement weights (Alg. 2)                     |

Per-sample norms and losses are summed over the batch (never one norm over the whole batch,
docs/stsl.md, "Design choices"), so samples do not couple. NFE counters (per batch): UNet forward sample-evaluations,
UNet VJPs, VAE decode/encode calls and their backward passes, and the paper's NFE (N * K for
STSL, N for DPS/PSLD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.ddim import ddim_eps_coefficient, x0_from_eps
from ..core.denoiser import Denoiser, check_finite
from ..core.schedule import alphas_cumprod_from_config
from .baseline import make_scheduler, scheduler_loop
from .operators import TASKS, LinearOperator, make_operator
from .registry import Option, RunContext, SampleBatch, SamplerSpec, register

METHODS = ("dps", "psld", "stsl")
DATA_LOSSES = ("norm", "sq")
INITS = ("gaussian", "measurement")
STEP_RULES = ("auto", "paper")


@dataclass(frozen=True)
class InverseConfig:
    """Parameters of the shared loop (defaults: docs/stsl.md, "Step-size rule" and "Options").

    ``step_rule="auto"`` (default) scales every guidance term as the score of the Gaussian
    likelihood N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T), r_t^2 = (1 - ab_t) / ab_t (docs/stsl.md,
    "Step-size rule"); the weights zeta / omega / data_weight / trace_weight are then unitless
    multipliers of that score (1 = the rule itself). ``step_rule="paper"`` keeps the papers' raw
    weights (DPS Alg. 1 zeta grad ||r||, PSLD Alg. 2, STSL Eq. 4 with eta / d)."""

    method: str = "stsl"
    steps: int = 50
    step_rule: str = "auto"
    noise_std: float = 0.05  # sigma_y, used by the auto rule
    prior_var: float | None = None  # v of r_t^2 = v (1 - ab) / (ab v + 1 - ab), auto rule; None: estimated
    ddim_eta: float | None = None  # None: 1 (DDPM-like ancestral); paper rule: 0 (deterministic DDIM) for PSLD / STSL
    init: str | None = None  # None: "measurement" for STSL (paper), "gaussian" for DPS / PSLD
    clamp_x0: bool = False  # DPS clamps x0_hat to [-1, 1] before A (pixel images)
    # DPS
    zeta: float = 1.0
    # PSLD
    gamma: float | None = None  # None: paper 0.1; auto 0.1 for latent models, 0 for pixel models
    omega: float = 1.0
    # STSL
    inner_steps: int = 5
    data_weight: float = 1.0
    trace_weight: float | None = None  # None: auto 1 (the derived second-order scale), paper 0.02
    step_size: float = 1.0
    probe_scale: float = 1.0
    data_loss: str = "norm"
    glue_weight: float = 0.0
    reuse_eps: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"--step-rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.init is None:
            object.__setattr__(self, "init", "measurement" if self.method == "stsl" else "gaussian")
        if self.ddim_eta is None:  # auto: ancestral for all (deterministic guided DDIM ends on saddles between modes)
            object.__setattr__(self, "ddim_eta", 1.0 if (self.method == "dps" or self.step_rule == "auto") else 0.0)
        if self.trace_weight is None:
            object.__setattr__(self, "trace_weight", 1.0 if self.step_rule == "auto" else 0.02)
        if self.gamma is None and self.step_rule == "paper":
            object.__setattr__(self, "gamma", 0.1)
        if self.data_loss not in DATA_LOSSES:
            raise ValueError(f"--data-loss must be one of {DATA_LOSSES}, got {self.data_loss!r}")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}")
        if int(self.steps) < 1 or int(self.inner_steps) < 1:
            raise ValueError(f"steps and --inner-steps must be >= 1, got {self.steps}, {self.inner_steps}")
        if not self.probe_scale > 0:
            raise ValueError(f"--probe-scale must be > 0, got {self.probe_scale}")
        if self.prior_var is not None and not (math.isfinite(self.prior_var) and self.prior_var > 0):
            raise ValueError(f"--prior-var must be a finite number > 0, got {self.prior_var}")
        for name in ("noise_std", "ddim_eta", "zeta", "gamma", "omega", "data_weight", "trace_weight", "step_size", "glue_weight"):
            v = getattr(self, name)
            if v is None:
                continue
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")

    def glue(self, latent: bool) -> float:
        """The PSLD gluing weight in use (auto: 0 on pixel models, where the gluing residual repeats
        the measurement residual and would count the likelihood twice)."""
        if self.gamma is not None:
            return float(self.gamma)
        return 0.1 if latent else 0.0


@dataclass
class Counters:
    """Honest cost accounting (per batch; rows of one batched call count once per sample)."""

    unet_forward: int = 0
    unet_backward: int = 0
    vae_decode: int = 0
    vae_decode_backward: int = 0
    vae_encode: int = 0
    vae_encode_backward: int = 0
    nfe_paper: int = 0
    prior_var: float | None = None  # v used by the auto step rule (given or estimated)

    def as_stats(self) -> dict:
        return {"nfe": self.unet_forward, **self.__dict__}


class Codec:
    """x = D(z), z = E(x). Identity for pixel models; for a diffusers AutoencoderKL
    D(z) = vae.decode(z / sf).sample and E(x) = sf * mean of q(z|x) (docs/stsl.md, "Design
    choices"). Every call runs in float32: a half-precision VAE (fp16 / bf16, as SD pipelines load it)
    is copied once to float32, so the gradients of the guidance never go through a half-precision
    decoder or encoder (the NaN / overflow risk of backpropagating an fp16 VAE)."""

    def __init__(self, vae=None, counters: Counters | None = None):
        self.vae = vae
        self.counters = counters if counters is not None else Counters()
        self.sf = float(vae.config.scaling_factor) if vae is not None else 1.0
        self._vae32 = None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae32(self):
        """The VAE in float32 (the VAE itself when it already is; else a cached float32 copy)."""
        if self._vae32 is None:
            if next(self.vae.parameters()).dtype == torch.float32:
                self._vae32 = self.vae
            else:
                import copy

                self._vae32 = copy.deepcopy(self.vae).to(torch.float32).requires_grad_(False)
        return self._vae32

    def decode(self, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if self.vae is None:
            return z
        self.counters.vae_decode += 1
        self.counters.vae_decode_backward += int(grad)
        return self.vae32.decode((z / self.sf).float()).sample.float()

    def encode(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if self.vae is None:
            return x
        self.counters.vae_encode += 1
        self.counters.vae_encode_backward += int(grad)
        return self.sf * self.vae32.encode(x.float()).latent_dist.mean.float()


# -- pure pieces ------------------------------------------------------------------------------
def tweedie_x0(z: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """First-order Tweedie z0_hat = (z - sqrt(1 - ab) eps_hat) / sqrt(ab) (Ho et al. 2020, eq. 15; STSL sec. 3)."""
    return x0_from_eps(z, eps_hat, alpha_bar)


def data_term(residual: torch.Tensor, kind: str = "norm") -> torch.Tensor:
    """Per-sample ||r||_2 ("norm", DPS/PSLD convention) or ||r||^2 ("sq", STSL Eq. 4); (B,)."""
    sq = (residual.flatten(1) ** 2).sum(1)
    return sq.clamp(min=1e-30).sqrt() if kind == "norm" else sq


def tweedie_var(alpha_bar: float, prior_var: float | None = None) -> float:
    """r_t^2, the isotropic Tweedie covariance Cov[z_0 | z_t] of a prior N(m, v I):
    v (1 - ab) / (ab v + 1 - ab) (PiGDM, Song et al. ICLR 2023, sec. 3.2, with v = 1 for data scaled to
    unit variance). ``prior_var=None`` gives the v -> inf limit (1 - ab) / ab, which bounds
    Cov = ((1 - ab)/ab)(I + (1 - ab) H_t) (second-order Tweedie) for every log-concave prior (H_t <= 0)
    (docs/stsl.md, "Step-size rule")."""
    if prior_var is None or math.isinf(prior_var):
        return (1.0 - alpha_bar) / alpha_bar
    return prior_var * (1.0 - alpha_bar) / (alpha_bar * prior_var + 1.0 - alpha_bar)


def likelihood_quad(op: LinearOperator, r: torch.Tensor, s2: float, r2: float) -> torch.Tensor:
    """Per-sample r^T (s2 I + r2 A A^T)^-1 r, (B,): the Gaussian likelihood N(y; A x0_hat, s2 I +
    r2 A A^T) of the auto rule (PiGDM, Song et al. ICLR 2023, eq. 7, with r_t^2 from `tweedie_var`).
    Exact for masks (A A^T = I on the observed entries; the missing entries of r are 0) and dense
    matrices; other operators use A A^T ~ I (their rows are normalised, ||A|| <= 1)."""
    from .operators import MatrixOperator

    flat = r.flatten(1)
    if isinstance(op, MatrixOperator):
        A = op.mat.to(device=r.device, dtype=torch.float64)
        cov = s2 * torch.eye(A.shape[0], dtype=torch.float64, device=r.device) + r2 * (A @ A.T)
        sol = torch.linalg.solve(cov, flat.double().T).T.to(flat.dtype)
        return (flat * sol).sum(1)
    return (flat**2).sum(1) / max(s2 + r2, 1e-12)


def observed_fraction(op: LinearOperator) -> float:
    """||A||_F^2 / D: the mean eigenvalue of A^T A (the observed fraction for a mask), which turns
    Tr(A^T A H) into (||A||_F^2 / D) Tr(H) in the second-order term (exact for isotropic H). Exact from
    the mask / matrix, else a fixed 16-probe Hutchinson estimate E||A v||^2 = ||A||_F^2."""
    cached = getattr(op, "_observed_fraction", None)
    if cached is not None:
        return cached
    from .operators import MaskOperator, MatrixOperator

    d = math.prod(op.in_shape)
    if isinstance(op, MaskOperator):
        val = float(op.mask.mean())
    elif isinstance(op, MatrixOperator):
        val = float((op.mat**2).sum()) / d
    else:
        g = torch.Generator().manual_seed(0)
        v = torch.randn((16, *op.in_shape), generator=g, dtype=torch.float64, device=g.device)
        val = float((op(v).flatten(1) ** 2).sum(1).mean()) / d
    op._observed_fraction = val
    return val


def hutchinson_trace(v: torch.Tensor, eps_probe: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: float, delta: float) -> torch.Tensor:
    """T_delta = v^T (s(z + delta v) - s(z)) / delta with s = -eps / sqrt(1 - ab): a one-probe
    estimate of Tr(grad^2 log p_t) (STSL Eq. 4 second term; exact in expectation for a linear
    score, -> Tr(H) as delta -> 0). Returns (B,)."""
    return -(v * (eps_probe - eps_hat)).flatten(1).sum(1) / (delta * math.sqrt(1 - alpha_bar))


def stsl_loss(z, t, alpha_bar, v, denoiser, cond, codec, op, y, cfg: InverseConfig, counters: Counters):
    """Surrogate loss, summed over the batch. Returns (loss, eps_hat, z0_hat).

    paper rule: L = lambda data(y - A D(z0_hat)) + (eta / d) T_delta  (STSL Eq. 4).
    auto rule: L = lambda r^T W r / 2 + eta c_t T_delta with W = (sigma_y^2 I + r_t^2 A A^T)^-1 and
    c_t = (1 - ab)^2 / (2 ab (sigma_y^2 + r_t^2)) * ||A||_F^2 / D: the z-dependent part of the
    second-order Tweedie term Tr(W A Cov[z_0|z_t] A^T) / 2, Cov = ((1 - ab)/ab)(I + (1 - ab) H)
    (docs/stsl.md, "The trace term's scale")."""
    n = z.shape[0]
    d = z[0].numel()
    use_trace = cfg.trace_weight > 0
    if use_trace:  # one batched UNet call on [z, z + delta v]
        eps_both = denoiser(torch.cat([z, z + cfg.probe_scale * v]), t, _double_cond(cond, n))
        eps_hat, eps_probe = eps_both[:n], eps_both[n:]
    else:
        eps_hat = denoiser(z, t, cond)
    counters.unet_forward += 2 if use_trace else 1
    z0_hat = tweedie_x0(z, eps_hat, alpha_bar)
    x_hat = codec.decode(z0_hat, grad=True)
    if cfg.clamp_x0:
        x_hat = x_hat.clamp(-1, 1)
    if cfg.step_rule == "auto":
        s2, r2 = cfg.noise_std**2, tweedie_var(alpha_bar, cfg.prior_var)
        denom = max(s2 + r2, 1e-12)
        loss = cfg.data_weight * 0.5 * likelihood_quad(op, y - op(x_hat), s2, r2)
        trace_coef = cfg.trace_weight * (1 - alpha_bar) ** 2 / (2 * alpha_bar * denom) * observed_fraction(op)
        glue_coef = cfg.glue_weight * 0.5 / denom
    else:
        loss = cfg.data_weight * data_term(y - op(x_hat), cfg.data_loss)
        trace_coef = cfg.trace_weight / d
        glue_coef = cfg.glue_weight
    if use_trace:
        loss = loss + trace_coef * hutchinson_trace(v, eps_probe, eps_hat, alpha_bar, cfg.probe_scale)
    if cfg.glue_weight > 0:
        glue = glue_term(x_hat, z0_hat, codec, op, y, squared=cfg.step_rule == "auto")
        loss = loss + glue_coef * glue
    return loss.sum(), eps_hat, z0_hat


def glue_term(x_hat, z0_hat, codec: Codec, op: LinearOperator, y, squared: bool = False) -> torch.Tensor:
    """PSLD gluing ||E(A^T y + (I - A^T A) x_hat) - z0_hat|| per sample (PSLD Alg. 2, with the
    reference code's A^T = ``back_project``); its square when ``squared``. Returns (B,)."""
    x_glue = op.back_project(y) + x_hat - op.back_project(op(x_hat))
    return data_term(codec.encode(x_glue, grad=True) - z0_hat, "sq" if squared else "norm")


def _first_cond(cond, n: int = 8):
    """The conditioning of the first sample, repeated n times (for `estimate_prior_var`)."""
    if not cond:
        return cond
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            v = v[:1].expand(n, *v.shape[1:])
        out[k] = v
    return out


def _double_cond(cond, n):
    if not cond:
        return cond
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
            v = torch.cat([v, v])
        out[k] = v
    return out


# -- the shared loop ---------------------------------------------------------------------------
def _dir_coef(ab: float, ab_prev: float, eta: float) -> float:
    """sqrt(1 - ab_prev - sigma_t^2), the eps coefficient of the DDIM update (Song et al. 2021, eq. 12),
    sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)."""
    return ddim_eps_coefficient(ab, ab_prev, eta)


def guidance_shift(ab: float, ab_prev: float, eta: float = 0.0) -> float:
    """c_t = sqrt(ab_prev / ab) (1 - ab) - dir_t sqrt(1 - ab): how far the DDIM update
    z_{t-1} = sqrt(ab_prev) z0_hat + dir_t eps (+ sigma_t n) moves per unit of score added to the prior
    score at z_t, i.e. eps -> eps - sqrt(1 - ab) g (classifier guidance; Dhariwal & Nichol 2021,
    eq. 14). >= 0 whenever ab_prev >= ab."""
    return math.sqrt(ab_prev / ab) * (1 - ab) - _dir_coef(ab, ab_prev, eta) * math.sqrt(1 - ab)


def estimate_prior_var(denoiser, cond, shape, alphas_cumprod: torch.Tensor, n: int = 8, snr: float = 0.05,
                       device="cpu") -> float:
    """Per-coordinate prior variance v of the model, from its own second-order Tweedie covariance:
    at the training time with ab/(1 - ab) closest to ``snr``, Cov[z_0 | z_t] = ((1 - ab)/sqrt(ab)) dz0_hat/dz_t,
    whose Hutchinson trace (n probes at n points z_t ~ N(0, I), fixed CPU seed 0) gives the mean
    variance c; v then inverts the Gaussian formula c = v (1 - ab) / (ab v + 1 - ab). Exact for a
    Gaussian prior; the mixture variance to O(snr) otherwise. One batched forward + backward."""
    ab_all = alphas_cumprod.double()
    idx = int(torch.argmin((ab_all / (1 - ab_all) - snr).abs()))
    ab = float(ab_all[idx])
    g = torch.Generator().manual_seed(0)
    z = torch.randn((n, *shape), generator=g, device=g.device).to(device)
    probe = torch.randn((n, *shape), generator=g, device=g.device).to(device)
    t = torch.tensor(idx, device=device)
    with torch.enable_grad():
        z = z.requires_grad_(True)
        eps = denoiser(z, t, cond)
        z0 = tweedie_x0(z, eps, ab)
        (jv,) = torch.autograd.grad((z0 * probe).sum(), z)
    c = (1 - ab) / math.sqrt(ab) * float((jv * probe).sum()) / (n * math.prod(shape))
    c = min(max(c, 1e-6), 0.999 * (1 - ab) / ab)  # the Gaussian formula needs c < (1 - ab) / ab
    return c * (1 - ab) / ((1 - ab) - ab * c)


def ddim_gain(ab: float, ab_prev: float, v: float, eta: float = 0.0) -> float:
    """M_t = d E[z_{t-1}] / d z_t of the DDIM update for a prior N(m, v I):
    sqrt(ab_prev) k + dir_t (1 - sqrt(ab) k) / sqrt(1 - ab), k = sqrt(ab) v / (ab v + 1 - ab)
    (k = d z0_hat / d z_t). Exact for a Gaussian prior (the DDIM map is then linear); > 0."""
    k = math.sqrt(ab) * v / (ab * v + 1 - ab)
    return math.sqrt(ab_prev) * k + _dir_coef(ab, ab_prev, eta) * (1 - math.sqrt(ab) * k) / math.sqrt(1 - ab)


def trust_clip(grad: torch.Tensor, ab: float, v: float) -> torch.Tensor:
    """Per-sample trust region of the auto rule: the likelihood score g moves z0_hat by
    ((1 - ab)/sqrt(ab)) g (Tweedie), which is capped at one prior standard deviation per coordinate,
    ||(1 - ab)/sqrt(ab) g|| <= sqrt(D v). Inactive for an exact model (there the shift is
    Cov A^T W r, at most the residual); it catches the 1/sqrt(ab) amplification of a learned model's
    Jacobian errors at high noise (docs/stsl.md, "Step-size rule")."""
    d = grad[0].numel()
    gmax = math.sqrt(d * v) * math.sqrt(ab) / (1 - ab)
    norm = grad.flatten(1).norm(dim=1).clamp(min=1e-30)
    scale = (gmax / norm).clamp(max=1.0)
    return grad * scale.reshape(-1, *([1] * (grad.ndim - 1)))


def _alpha_bar_prev(scheduler, i: int, ab_table: torch.Tensor) -> float:
    ts = scheduler.timesteps
    if i + 1 < len(ts):
        return float(ab_table[int(ts[i + 1])])
    final = getattr(scheduler, "final_alpha_cumprod", None)
    return float(final) if final is not None else 1.0


def draw_normal(generators, shape, device) -> torch.Tensor:
    """(len(generators), *shape) standard normal: row b drawn from generators[b] on that generator's
    own device (CPU or CUDA), then moved to ``device``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device).to(device) for g in generators])


def sample_inverse(
    denoiser: Denoiser,
    scheduler,
    codec: Codec,
    op: LinearOperator,
    y: torch.Tensor,
    z_init: torch.Tensor,
    cfg: InverseConfig,
    *,
    alphas_cumprod: torch.Tensor,
    generators: list[torch.Generator],
    cond=None,
    randn: Callable[[tuple], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    counters: Counters | None = None,
    sampler_name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Counters]:
    """Run DPS / PSLD / STSL (cfg.method) from z_init (B, *latent_shape), already initialised.

    scheduler: a diffusers DDIMScheduler with ``set_timesteps`` done; its ``step`` does the DDIM
    (eta = cfg.ddim_eta) update with the per-sample generators. y: (B, *op.out_shape).
    Returns (x0 = D(z0_hat of the last step), z0_hat, counters)."""
    counters = counters if counters is not None else codec.counters
    codec.counters = counters
    name = sampler_name or cfg.method
    randn = randn or (lambda shape: draw_normal(generators, shape, z_init.device))
    step_kwargs = {"eta": cfg.ddim_eta, "generator": generators} if cfg.ddim_eta > 0 else {"eta": 0.0}
    ab_table = alphas_cumprod.double()
    auto = cfg.step_rule == "auto"
    gamma = cfg.glue(codec.latent)
    if auto and cfg.prior_var is None:
        import dataclasses

        v = estimate_prior_var(denoiser, _first_cond(cond), tuple(z_init.shape[1:]), alphas_cumprod, device=z_init.device)
        counters.unet_forward += 8
        counters.unet_backward += 8
        cfg = dataclasses.replace(cfg, prior_var=v)
    counters.prior_var = cfg.prior_var
    z = z_init.detach()
    z0_hat = z
    for i, t in enumerate(scheduler.timesteps):
        ab = float(ab_table[int(t)])
        if cfg.method == "stsl":  # K inner gradient steps on the surrogate loss (STSL Eq. 4)
            counters.nfe_paper += cfg.inner_steps
            # auto: K steps of z <- z + (rho_t / K) grad log L, rho_t = c_t / M_t: a shift of z_t that the DDIM
            # map (gain M_t) carries into the same shift of z_{t-1} as the eps-form guidance of DPS / PSLD
            # (c_t) (docs/stsl.md, "Step-size rule")
            if auto:
                ab_prev = _alpha_bar_prev(scheduler, i, ab_table)
                rho = (cfg.step_size * guidance_shift(ab, ab_prev, cfg.ddim_eta)
                       / ddim_gain(ab, ab_prev, cfg.prior_var, cfg.ddim_eta) / cfg.inner_steps)
            else:
                rho = cfg.step_size
            eps_last = None
            for _ in range(cfg.inner_steps):
                # fresh Gaussian probe per inner step (none without the trace term: the generators' streams
                # then match the plain DDIM / DDPM sampler)
                v = randn(tuple(z.shape[1:])) if cfg.trace_weight > 0 else None
                with torch.enable_grad():
                    z_in = z.detach().requires_grad_(True)
                    loss, eps_last, _ = stsl_loss(z_in, t, ab, v, denoiser, cond, codec, op, y, cfg, counters)
                    check_finite(loss, name, i)
                    (grad,) = torch.autograd.grad(loss, z_in)
                if auto:
                    grad = trust_clip(grad, ab, cfg.prior_var)
                counters.unet_backward += 2 if cfg.trace_weight > 0 else 1
                z = (z - rho * grad).detach()
            if cfg.reuse_eps:
                eps_hat = eps_last.detach()
            else:
                eps_hat = denoiser(z, t, cond)
                counters.unet_forward += 1
            check_finite(eps_hat, name, i)
            out = scheduler.step(eps_hat, t, z, return_dict=True, **step_kwargs)
            z0_hat, z = out.pred_original_sample, out.prev_sample.detach()
        else:
            counters.nfe_paper += 1
            guided = (cfg.zeta > 0) if cfg.method == "dps" else (gamma > 0 or cfg.omega > 0)
            with torch.enable_grad() if guided else torch.no_grad():
                z_in = z.detach().requires_grad_(guided)
                eps_hat = denoiser(z_in, t, cond)
                counters.unet_forward += 1
                check_finite(eps_hat, name, i)
                grad = None
                if guided:
                    z0 = tweedie_x0(z_in, eps_hat, ab)
                    x_hat = codec.decode(z0, grad=True)
                    if cfg.clamp_x0:
                        x_hat = x_hat.clamp(-1, 1)
                    w = cfg.zeta if cfg.method == "dps" else cfg.omega
                    if auto:  # negative log of N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T)
                        s2, r2 = cfg.noise_std**2, tweedie_var(ab, cfg.prior_var)
                        loss = w * 0.5 * likelihood_quad(op, y - op(x_hat), s2, r2)
                        if cfg.method == "psld" and gamma > 0:
                            loss = loss + gamma * 0.5 * glue_term(x_hat, z0, codec, op, y, squared=True) / max(s2 + r2, 1e-12)
                    else:
                        loss = w * data_term(y - op(x_hat), "norm")
                        if cfg.method == "psld" and gamma > 0:
                            loss = loss + gamma * glue_term(x_hat, z0, codec, op, y)
                    (grad,) = torch.autograd.grad(loss.sum(), z_in)
                    counters.unet_backward += 1
                if auto and grad is not None:
                    grad = trust_clip(grad, ab, cfg.prior_var)
                    # classifier guidance in eps form (Dhariwal & Nichol 2021, eq. 14):
                    # eps' = eps - sqrt(1 - ab) grad log L = eps + sqrt(1 - ab) grad(-log L)
                    out = scheduler.step(eps_hat.detach() + math.sqrt(1 - ab) * grad, t, z_in.detach(), return_dict=True, **step_kwargs)
                    z_prev = out.prev_sample
                else:
                    out = scheduler.step(eps_hat.detach(), t, z_in.detach(), return_dict=True, **step_kwargs)
                    z_prev = out.prev_sample if grad is None else out.prev_sample - grad
            z0_hat, z = out.pred_original_sample, z_prev.detach()
        if on_step is not None:
            on_step(1)
    with torch.no_grad():
        x0 = codec.decode(z0_hat)
    return x0, z0_hat, counters


def init_latent(cfg: InverseConfig, scheduler, codec: Codec, op: LinearOperator, y: torch.Tensor, noise: torch.Tensor,
                alphas_cumprod: torch.Tensor, counters: Counters) -> torch.Tensor:
    """z_T: pure noise ("gaussian"), or the forward-diffused encoded back-projection
    sqrt(ab_1) E(A^T y) + sqrt(1 - ab_1) n ("measurement", STSL sec. 3.3)."""
    if cfg.init == "gaussian":
        return noise * scheduler.init_noise_sigma
    ab = float(alphas_cumprod.double()[int(scheduler.timesteps[0])])
    with torch.no_grad():
        z_meas = codec.encode(op.back_project(y))
    return math.sqrt(ab) * z_meas + math.sqrt(1 - ab) * noise


# -- measurement set-up (CLI / API) -------------------------------------------------------------
def pixel_shape(model) -> tuple:
    return tuple(model.extras.get("pixel_shape", model.event_shape))


def build_operator(opts: dict, model) -> LinearOperator:
    task = opts.get("task") or ("inpaint-box" if len(pixel_shape(model)) == 3 else "inpaint-random")
    return make_operator(task, pixel_shape(model), seed=opts.get("task_seed") or 0, missing=opts.get("missing"),
                         box_size=opts.get("box_size"), sr_factor=opts.get("sr_factor") or 2,
                         blur_sigma=opts.get("blur_sigma"), blur_size=opts.get("blur_size"))


def _load_measurement(path: str, op: LinearOperator) -> torch.Tensor:
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--measurement file not found: {path}")
    if p.suffix == ".npy":
        arr = np.load(p).astype(np.float64)
    elif p.suffix == ".png":
        from PIL import Image

        img = np.asarray(Image.open(p).convert("L" if op.out_shape[0] == 1 else "RGB"), dtype=np.float64)
        arr = img / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    else:
        raise ValueError(f"--measurement must be a .npy or .png file, got {path}")
    if arr.size != math.prod(op.out_shape):
        raise ValueError(f"--measurement {path} has shape {arr.shape}; task {op.name} expects {op.out_shape}")
    return torch.from_numpy(arr.reshape(op.out_shape))


def load_image(path: str, shape: tuple) -> torch.Tensor:
    """(1, C, H, W) float64 in [-1, 1] from an image file: converted to L (C = 1) or RGB (C = 3) and
    resized (bicubic) to H x W when its size differs (the model's pixel shape)."""
    from pathlib import Path

    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--from-image file not found: {path}")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"--from-image needs an image model with 1 or 3 channels; pixel shape is {tuple(shape)}")
    try:
        img = Image.open(p).convert("L" if shape[0] == 1 else "RGB")
    except OSError as err:
        raise ValueError(f"--from-image {path}: not a readable image ({err})") from err
    if img.size != (shape[2], shape[1]):
        img = img.resize((shape[2], shape[1]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float64) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def _ground_truth(opts: dict, model, ctx: RunContext) -> torch.Tensor:
    """(1, *pixel_shape): an image file (--from-image), a held-out digit (--from-digit), or a model
    sample (--from-sample SEED)."""
    shape = pixel_shape(model)
    if opts.get("from_image"):
        return load_image(opts["from_image"], shape)
    if opts.get("from_digit") is not None or (opts.get("from_sample") is None and shape == (1, 8, 8) and "mixture" not in model.extras):
        from ..eval.digits_data import real_digits

        x, _ = real_digits("test")
        idx = opts.get("from_digit") or 0
        if not 0 <= idx < len(x):
            raise ValueError(f"--from-digit must be in [0, {len(x) - 1}], got {idx}")
        return torch.from_numpy(x[idx : idx + 1]).double()
    seed = opts.get("from_sample") or 0
    gen = torch.Generator().manual_seed(int(seed))
    if "mixture" in model.extras:
        return model.extras["mixture"].sample(1, gen)
    # a DDIM(50) sample of the model (decoded for latent models)
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(50, device=ctx.device)
    den = model.denoiser()
    x = torch.randn((1, *model.event_shape), generator=gen, device=gen.device).to(ctx.device)
    cond = model.cond_for(None, 1, ctx.device)
    x = scheduler_loop(den, sched, x, cond, 1.0, [gen], RunContext(sampler="from-sample", device=ctx.device))
    return Codec(model.extras.get("vae")).decode(x).double().cpu()


_MEASUREMENTS: dict = {}


def measurement_for(opts: dict, model, ctx: RunContext):
    """(op, y (1, *out), x_true (1, *pixel) or None), cached per run configuration."""
    keys = ("model", "task", "task_seed", "missing", "box_size", "sr_factor", "blur_sigma", "blur_size",
            "measurement", "noise_std", "from_sample", "from_digit", "from_image", "height", "width")
    key = tuple(str(opts.get(k)) for k in keys)
    if key not in _MEASUREMENTS:
        op = build_operator(opts, model)
        sigma = opts.get("noise_std")
        sigma = 0.05 if sigma is None else float(sigma)
        if opts.get("measurement"):
            y, x_true = _load_measurement(opts["measurement"], op)[None], None
        else:
            x_true = _ground_truth(opts, model, ctx)
            gen = torch.Generator().manual_seed(int(opts.get("task_seed") or 0) + 7919)
            y = op.measure(x_true, sigma, [gen])
        _MEASUREMENTS.clear()
        _MEASUREMENTS[key] = (op, y.double(), x_true, sigma)
    return _MEASUREMENTS[key]


def _config_from_opts(method: str, opts: dict, model) -> InverseConfig:
    clamp = opts.get("clamp", "auto")
    clamp_x0 = (model.is_image and tuple(model.value_range) == (-1.0, 1.0)) if clamp == "auto" else clamp == "on"
    fields = {k: opts[k] for k in ("step_rule", "noise_std", "prior_var", "ddim_eta", "init", "zeta", "gamma", "omega", "inner_steps",
                                   "data_weight", "trace_weight", "step_size", "probe_scale", "data_loss", "glue_weight",
                                   "reuse_eps") if opts.get(k) is not None}
    return InverseConfig(method=method, steps=opts["steps"], clamp_x0=bool(clamp_x0) and method == "dps", **fields)


def reconstruct(model, op: LinearOperator, y: torch.Tensor, method: str = "stsl", seeds=(0,), *, ctx: RunContext | None = None,
                **params) -> tuple[torch.Tensor, Counters]:
    """Python entry point: posterior samples for measurement(s) y with a LoadedModel.

    y: (1 or len(seeds), *op.out_shape); one output per seed, (n, *pixel_shape).
    params: InverseConfig fields (steps, inner_steps, trace_weight, zeta, ...)."""
    ctx = ctx or RunContext(sampler=method)
    cfg = InverseConfig(method=method, **params)
    n = len(seeds)
    gens = ctx.generators(seeds)
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(cfg.steps, device=ctx.device)
    ac = alphas_cumprod_from_config(model.scheduler_config)
    counters = Counters()
    codec = Codec(model.extras.get("vae"), counters)
    y = torch.as_tensor(y).float().to(ctx.device)
    if y.shape[0] not in (1, n) or tuple(y.shape[1:]) != tuple(op.out_shape):
        raise ValueError(f"y must have shape (1 or {n}, {', '.join(map(str, op.out_shape))}), got {tuple(y.shape)}")
    y = y.expand(n, *op.out_shape)
    noise = ctx.randn(gens, model.event_shape)
    z = init_latent(cfg, sched, codec, op, y, noise, ac, counters)
    cond = model.cond_for(None, n, ctx.device)
    x0, _, counters = sample_inverse(model.denoiser(), sched, codec, op, y, z, cfg, alphas_cumprod=ac, generators=gens,
                                     cond=cond, randn=lambda shape: ctx.randn(gens, shape), on_step=ctx.step_done,
                                     counters=counters, sampler_name=method)
    return x0, counters


def _sample_fn(method: str):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        cfg = _config_from_opts(method, opts, model)
        op, y1, x_true, _ = measurement_for(opts, model, ctx)
        params = {k: v for k, v in cfg.__dict__.items() if k != "method"}
        x0, counters = reconstruct(model, op, y1, method, seeds, ctx=ctx, **params)
        y = y1.float().to(ctx.device).expand(len(seeds), *op.out_shape)
        return _batch(x0, y, x_true, model, counters.as_stats())

    return fn


def _batch(x0, y, x_true, model, stats) -> SampleBatch:
    n = x0.shape[0]
    extras = {"y": y.float().cpu()}
    if x_true is not None:
        xt = x_true.float().to(x0.device).expand(n, *x_true.shape[1:])
        extras["x_true"] = xt.cpu()
        if x0.ndim == 4:
            from ..eval.restoration import psnr, ssim

            extras["psnr"] = psnr(x0, xt).float().cpu()
            extras["ssim"] = ssim(x0, xt).float().cpu()
    return SampleBatch(x=x0.float(), extras=extras, stats=stats)


# -- gold: the exact posterior, sampled by DDPM with its analytic denoiser (docs/stsl.md) ------------
def _gold_fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    from ..models.posterior import GaussianMixturePosterior, PosteriorUNet

    op, y1, x_true, sigma = measurement_for(opts, model, ctx)
    if sigma <= 0:
        raise ValueError("sampler 'gold' needs --noise-std > 0 (the exact posterior is degenerate at 0)")
    post = GaussianMixturePosterior(model.extras["mixture"], op.matrix(), y1.reshape(-1), sigma)
    ac = alphas_cumprod_from_config(model.scheduler_config)
    den = Denoiser(PosteriorUNet(post, ac).to(ctx.device), ac, "epsilon", plain_callable=False)
    sched = make_scheduler("ddpm", model.scheduler_config)
    sched.set_timesteps(opts["steps"], device=ctx.device)
    gens = ctx.generators(seeds)
    x = ctx.randn(gens, model.event_shape) * sched.init_noise_sigma
    x = scheduler_loop(den, sched, x, None, 1.0, gens, ctx)
    y = y1.float().to(ctx.device).expand(len(seeds), *op.out_shape)
    return _batch(x, y, x_true, model, {"nfe": den.calls, "unet_forward": den.calls})


def _validate(opts: dict, model) -> None:
    build_operator(opts, model)  # surfaces task / shape errors before sampling
    given = [f for f in ("measurement", "from_image", "from_sample", "from_digit") if opts.get(f) not in (None, "")]
    if len(given) > 1:
        names = " / ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"pass one of --measurement FILE, --from-image PNG, --from-sample, --from-digit; got {names}")
    if opts.get("from_image"):
        load_image(opts["from_image"], pixel_shape(model))


def _validate_gold(opts: dict, model) -> None:
    if "mixture" not in model.extras:
        raise ValueError(f"sampler 'gold' needs an analytic mixture model (gmm2d, gmm-digits, gmm:FILE); got {model.name!r}")
    if opts.get("noise_std") is not None and opts["noise_std"] <= 0:
        raise ValueError("sampler 'gold' needs --noise-std > 0")
    _validate(opts, model)


def write_extra(out_dir, arrays: dict, model) -> None:
    """measurement.npy; for images also before_after.png (rows: truth | measurement (A^T y) |
    reconstructions) and metrics.json (mean PSNR / SSIM against the ground truth)."""
    import io
    from pathlib import Path

    from ..api import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    y = arrays.get("y")
    if y is None:
        return
    buf = io.BytesIO()
    np.save(buf, y[0])
    atomic_write_bytes(out_dir / "measurement.npy", buf.getvalue())
    if "psnr" in arrays:
        atomic_write_json(out_dir / "metrics.json", {
            "psnr_mean": float(np.mean(arrays["psnr"])), "psnr_std": float(np.std(arrays["psnr"])),
            "ssim_mean": float(np.mean(arrays["ssim"])), "ssim_std": float(np.std(arrays["ssim"])),
            "n": int(len(arrays["psnr"]))})
    x = arrays["x"]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        return
    from ..eval.images import make_grid, png_bytes, to_uint8

    shown = [arrays["x_true"][:1]] if "x_true" in arrays else []
    if y.shape[1:] == x.shape[1:]:
        shown.append(y[:1])
    elif y.ndim == 4 and x.shape[-1] % y.shape[-1] == 0:  # super-resolution: nearest upsampling
        f = x.shape[-1] // y.shape[-1]
        shown.append(y[:1].repeat(f, -2).repeat(f, -1))
    shown.append(x[:8])
    imgs = to_uint8(np.concatenate(shown), getattr(model, "value_range", (-1.0, 1.0)))
    grid = make_grid(imgs, ncol=len(imgs), scale=max(1, 64 // imgs.shape[1]))
    from ..eval.images import with_titles

    has_truth = "x_true" in arrays
    titles = (["truth"] if has_truth else []) + (["y"] if len(shown) == 2 + has_truth else [])
    titles += [f"sample {i + 1}" for i in range(len(imgs) - len(titles))]
    atomic_write_bytes(out_dir / "before_after.png", png_bytes(with_titles(grid, titles)))


# -- registration ---------------------------------------------------------------------------
def _common_options(init_default: str, steps_note: str) -> tuple:
    return (
        Option("task", str, None, f"forward operator: {' | '.join(TASKS)} [default inpaint-box for images, else inpaint-random]"),
        Option("measurement", str, None, "measurement y as .npy or .png (operator output shape); else made from a ground truth"),
        Option("noise_std", float, 0.05, "measurement noise sigma_y (images in [-1, 1])", min=0.0),
        Option("from_sample", int, None, "ground truth = the model's sample with this seed (saved as x_true)", min=0),
        Option("from_digit", int, None, "ground truth = held-out test digit with this index (8x8 digit models)", min=0),
        Option("from_image", str, None, "ground truth = this image file (PNG/JPEG; resized to the model's pixel shape, "
               "the VAE's for latent models)"),
        Option("task_seed", int, 0, "seed of the operator's randomness (mask, box position, motion kernel) and of the measurement noise", min=0),
        Option("missing", float, None, "inpaint-random: fraction of missing pixels [default U(0.3, 0.7)]", min=0.0, max=0.99),
        Option("box_size", int, None, "inpaint-box: hole side [default half the image side]", min=1),
        Option("sr_factor", int, 2, "sr-bicubic / sr-avgpool: downsampling factor", min=1),
        Option("blur_sigma", float, None, "gblur: Gaussian sigma [default 3 at >=128 px, else 1]", min=1e-6),
        Option("blur_size", int, None, "gblur / mblur: kernel side (odd)", min=1),
        Option("init", INITS, init_default, "z_T: pure noise, or the forward-diffused encoded A^T y"),
        Option("ddim_eta", float, None, f"DDIM eta of the update (0 deterministic, 1 ancestral) [default 1; {steps_note}]", min=0.0),
        Option("clamp", ("auto", "on", "off"), "auto", "DPS: clamp x0_hat to [-1, 1] before A (auto: image models)"),
        Option("step_rule", STEP_RULES, "auto", "guidance scale: auto = score of N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T) "
               "(weights are multipliers of it; docs/stsl.md); paper = the papers' raw weights"),
        Option("prior_var", float, None, "auto rule: per-coordinate prior variance v in r_t^2 = v (1 - ab) / (ab v + 1 - ab) "
               "[default: estimated from the model's Tweedie covariance]", min=1e-12),
    )


register(SamplerSpec(
    name="stsl", description="STSL second-order Tweedie posterior sampler for inverse problems (Rout et al. 2024)",
    fn=_sample_fn("stsl"), default_model="digits-ddpm", default_steps=15, validate=_validate, write_extra=write_extra,
    options=_common_options("measurement", "paper rule 0") + (
        Option("inner_steps", int, 5, "K inner gradient steps per timestep", min=1),
        Option("data_weight", float, 1.0, "lambda, weight of the data term", min=0.0),
        Option("trace_weight", float, None, "eta, weight of the Hutchinson trace term (0 = first order) "
               "[default: auto rule 1 = the derived second-order scale; paper rule 0.02 on eta / d]", min=0.0),
        Option("step_size", float, 1.0, "rho, inner gradient step (auto rule: multiplier of (1 - ab_t) / K)", min=0.0),
        Option("probe_scale", float, 1.0, "delta, finite-difference probe scale", min=1e-8),
        Option("data_loss", DATA_LOSSES, "norm", "data term ||r|| (norm) or ||r||^2 (sq, Eq. 4)"),
        Option("glue_weight", float, 0.0, "optional PSLD gluing term weight (latent)", min=0.0),
        Option("reuse_eps", bool, False, "reuse the last inner eps for the DDIM step (saves one UNet call per step)"),
    ),
))
register(SamplerSpec(
    name="dps", description="DPS diffusion posterior sampling (Chung et al. 2023), pixel or latent, baseline",
    fn=_sample_fn("dps"), default_model="digits-ddpm", default_steps=25, validate=_validate, write_extra=write_extra,
    options=_common_options("gaussian", "paper rule 1") + (
        Option("zeta", float, 1.0, "DPS step weight zeta on grad ||y - A x0_hat||", min=0.0),
    ),
))
register(SamplerSpec(
    name="psld", description="PSLD latent posterior sampling with the gluing term (Rout et al. 2023), baseline",
    fn=_sample_fn("psld"), default_model="digits-ldm", default_steps=100, validate=_validate, write_extra=write_extra,
    options=_common_options("gaussian", "paper rule 0") + (
        Option("gamma", float, None, "PSLD gluing weight [default 0.1; auto rule: 0 on pixel models]", min=0.0),
        Option("omega", float, 1.0, "PSLD measurement weight", min=0.0),
    ),
))
register(SamplerSpec(
    name="gold", description="exact posterior of a Gaussian-mixture prior (DDPM on its analytic denoiser), oracle",
    fn=_gold_fn, default_model="gmm-digits", default_steps=1000, validate=_validate_gold, write_extra=write_extra,
    options=_common_options("gaussian", "unused")[:12],
))
