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
| ``trace_rule``       | "paper": (eta / d) T_delta; "logdet": the linearised log det term |
| ``probe_scale``      | delta of the finite-difference Hutchinson probe T_delta           |
| ``step_size``        | rho, inner gradient step                                         |
| ``inner_steps``      | K                                                                |
| ``zeta``             | zeta, DPS step weight (Alg. 1)                                   |
| ``gamma``, ``omega`` | PSLD gluing and measurement weights (Alg. 2)                     |

Per-sample norms and losses are summed over the batch (never one norm over the whole batch,
docs/stsl.md, "Design choices"), so samples do not couple. NFE counters (per batch): UNet forward sample-evaluations,
UNet VJPs, VAE decode/encode calls and their backward passes, and the paper's NFE (N * K for
STSL, N for DPS/PSLD).

This module holds the method: parameters (``InverseConfig``), the pure pieces, the loop
``sample_inverse`` and the Python entry point ``reconstruct``. The run glue of `gensample run
--sampler stsl | dps | psld | gold` (the measurement set-up from run options, the batch functions,
``write_extra`` and the registrations) lives in ``gensample.runs.stsl``; nothing here imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.ddim import ddim_eps_coefficient, x0_from_eps
from ..core.denoiser import Denoiser, check_finite
from ..core.noise import normal_rows
from ..core.schedule import alphas_cumprod_from_config, as_schedule, model_schedule
from .baseline import FlowTwinEpsDDIM, ddim_step_from_x0, make_scheduler, set_grid
from .operators import LinearOperator
from .registry import RunContext

METHODS = ("dps", "psld", "stsl")
DATA_LOSSES = ("norm", "sq")
INITS = ("gaussian", "measurement")
STEP_RULES = ("auto", "paper")
TRACE_RULES = ("logdet", "paper")


@dataclass(frozen=True)
class InverseConfig:
    """Parameters of the shared loop (defaults: docs/stsl.md, "Step-size rule" and "Options").

    ``step_rule="auto"`` (default) scales every guidance term as the score of the Gaussian
    likelihood N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T), r_t^2 = (1 - ab_t) / ab_t (docs/stsl.md,
    "Step-size rule"); the weights zeta / omega / data_weight (and trace_weight with
    ``trace_rule="logdet"``) are then unitless multipliers of that score (1 = the rule itself).
    ``step_rule="paper"`` keeps the papers' raw weights (DPS Alg. 1 zeta grad ||r||, PSLD Alg. 2,
    STSL Eq. 4 with eta / d).

    ``trace_rule`` picks STSL's second-order term (docs/stsl.md, "The trace term"): "paper" (default,
    both step rules) is STSL Eq. 4's (eta / d) T_delta with a Gaussian probe in z, eta = 0.02;
    "logdet" is the z-dependent part of (1/2) log det(sigma_y^2 I + A Cov A^T) linearised around
    Cov = r_t^2 I, probed in the range of A (measured worse than first-order STSL on the oracle
    problems, hence not the default). ``step_rule="paper"`` is then the paper's Algorithm 1 step."""

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
    trace_rule: str = "paper"  # "paper": (eta / d) T_delta (STSL Eq. 4); "logdet": the linearised log det term
    trace_weight: float | None = None  # None: paper 0.02 (on eta / d), logdet 1 (the derived scale itself)
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
        if self.trace_rule not in TRACE_RULES:
            raise ValueError(f"--trace-rule must be one of {TRACE_RULES}, got {self.trace_rule!r}")
        if self.trace_weight is None:
            object.__setattr__(self, "trace_weight", 1.0 if self.trace_rule == "logdet" else 0.02)
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
    """||A||_F^2 / D: the mean eigenvalue of A^T A (the observed fraction for a mask). Only the latent
    path uses it: there A acts on D(z), not on z, so the range probe of `range_probe` does not apply and
    Tr(A^T A H) is replaced by (||A||_F^2 / D) Tr(H), which is exact only for isotropic H (for a mask it
    brings in the curvature of unobserved pixels; docs/stsl.md, "The trace term"). Exact from the
    mask / matrix, else a fixed 16-probe Hutchinson estimate E||A v||^2 = ||A||_F^2."""
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


def range_probe(op: LinearOperator, u: torch.Tensor, s2: float, r2: float) -> torch.Tensor:
    """v = A^T B u, a probe in the range of A^T: (B, *op.out_shape) -> (B, *op.in_shape), in u's dtype.

    B B^T = (s2 + r2) W with W = (s2 I + r2 A A^T)^-1, so for E[u u^T] = I (Rademacher or Gaussian u)
    E[v^T H v] = Tr(B^T A H A^T B) = (s2 + r2) Tr(W A H A^T): the trace that the linearised log det
    term needs (docs/stsl.md, "The trace term"). Dense matrices: B = sqrt(s2 + r2) W^(1/2) (eigh of
    s2 I + r2 A A^T, float64). Every other operator: B = I, exact for masks (W A = A / (s2 + r2): the
    missing rows of A are 0) and the A A^T ~ I approximation of `likelihood_quad` otherwise."""
    from .operators import MatrixOperator

    if isinstance(op, MatrixOperator):
        A = op.mat.double()  # (M, D)
        lam, Q = torch.linalg.eigh(s2 * torch.eye(A.shape[0], dtype=torch.float64) + r2 * (A @ A.T))
        lam = lam.clamp(min=1e-12 * float(lam.max().clamp(min=1e-300)))
        B = math.sqrt(s2 + r2) * (Q * lam.rsqrt()) @ Q.T  # (M, M) symmetric
        u = (u.double() @ B.to(u.device)).to(u.dtype)  # rows: (B u_b)^T, B symmetric
    return op.adjoint(u)


def trace_probe(cfg: InverseConfig, codec: Codec, op: LinearOperator, randn: Callable[[tuple], torch.Tensor],
                event_shape: tuple, alpha_bar: float) -> torch.Tensor:
    """The probe v of T_delta for one inner step, (B, *event_shape).

    trace_rule "logdet" on a pixel model: v = A^T B u (`range_probe`), u Rademacher (the sign of a
    N(0, I) draw from each sample's generator), so E[T_delta] -> (s2 + r2) Tr(W A H A^T). Otherwise
    (trace_rule "paper", or a latent model, where A acts on D(z)): v ~ N(0, I) in z (STSL Eq. 4)."""
    if cfg.trace_rule == "logdet" and not codec.latent:
        u = torch.sign(randn(tuple(op.out_shape)))  # (B, *out_shape), +-1
        return range_probe(op, u, cfg.noise_std**2, tweedie_var(alpha_bar, cfg.prior_var))
    return randn(tuple(event_shape))


def hutchinson_trace(v: torch.Tensor, eps_probe: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: float, delta: float) -> torch.Tensor:
    """T_delta = v^T (s(z + delta v) - s(z)) / delta with s = -eps / sqrt(1 - ab): a one-probe
    estimate of v^T H v, H = grad^2 log p_t (STSL Eq. 4 second term; exact for a linear score,
    -> v^T H v as delta -> 0), so E_v T_delta = Tr(E[v v^T] H): Tr(H) for v ~ N(0, I) (Hutchinson),
    (s2 + r2) Tr(W A H A^T) for the range probe. Returns (B,)."""
    return -(v * (eps_probe - eps_hat)).flatten(1).sum(1) / (delta * math.sqrt(1 - alpha_bar))


def stsl_loss(z, t, alpha_bar, v, denoiser, cond, codec, op, y, cfg: InverseConfig, counters: Counters):
    """Surrogate loss, summed over the batch. Returns (loss, eps_hat, z0_hat).

    Data term: paper rule lambda data(y - A D(z0_hat)) (STSL Eq. 4); auto rule lambda r^T W r / 2,
    W = (sigma_y^2 I + r_t^2 A A^T)^-1 (the quadratic of -log N(y; A z0_hat, sigma_y^2 I + r_t^2 A A^T)).
    Trace term (``trace_rule``; docs/stsl.md, "The trace term"):
    - "paper": (eta / d) T_delta, v ~ N(0, I) in z (STSL Eq. 4 / Alg. 1).
    - "logdet": eta c_t T_delta, c_t = (1 - ab)^2 / (2 ab (sigma_y^2 + r_t^2)), v = A^T B u (`trace_probe`),
      so E T_delta = (sigma_y^2 + r_t^2) Tr(W A H A^T) and the term averages to the z-dependent part of
      (1/2) log det(sigma_y^2 I + A Cov A^T) linearised around Cov = r_t^2 I,
      (1/2) Tr(W A (Cov - r_t^2 I) A^T), with the second-order Tweedie covariance
      Cov[z_0|z_t] = ((1 - ab)/ab)(I + (1 - ab) H), H = grad^2 log p_t(z_t) (second-order Tweedie,
      STSL sec. 3). On a latent model v ~ N(0, I) in z and c_t carries
      ||A||_F^2 / D, the isotropic-H approximation of Tr(A^T A H) (`observed_fraction`)."""
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
    s2, r2 = cfg.noise_std**2, tweedie_var(alpha_bar, cfg.prior_var)
    denom = max(s2 + r2, 1e-12)
    if cfg.step_rule == "auto":
        loss = cfg.data_weight * 0.5 * likelihood_quad(op, y - op(x_hat), s2, r2)
        glue_coef = cfg.glue_weight * 0.5 / denom
    else:
        loss = cfg.data_weight * data_term(y - op(x_hat), cfg.data_loss)
        glue_coef = cfg.glue_weight
    if cfg.trace_rule == "logdet":
        trace_coef = cfg.trace_weight * (1 - alpha_bar) ** 2 / (2 * alpha_bar * denom)
        if codec.latent:  # isotropic-H stand-in for Tr(A^T A H): the probe is not in the range of A
            trace_coef = trace_coef * observed_fraction(op)
    else:
        trace_coef = cfg.trace_weight / d
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


def estimate_prior_var(denoiser, cond, shape, alphas_cumprod, n: int = 8, snr: float = 0.05,
                       device="cpu") -> float:
    """Per-coordinate prior variance v of the model, from its own second-order Tweedie covariance:
    at the training time with ab/(1 - ab) closest to ``snr``, Cov[z_0 | z_t] = ((1 - ab)/sqrt(ab)) dz0_hat/dz_t,
    whose Hutchinson trace (n probes at n points z_t ~ N(0, I), fixed CPU seed 0) gives the mean
    variance c; v then inverts the Gaussian formula c = v (1 - ab) / (ab v + 1 - ab). Exact for a
    Gaussian prior; the mixture variance to O(snr) otherwise. One batched forward + backward.
    ``alphas_cumprod``: the VP table, or a ``core.schedule.Schedule`` (a flow model's continuous twin:
    the probe time is the one whose alpha_bar is exactly snr / (1 + snr))."""
    from ..core.schedule import Schedule

    if isinstance(alphas_cumprod, Schedule) and alphas_cumprod.kind == "flow":  # continuous: the exact SNR's time
        t = alphas_cumprod.time_of_alpha_bar(snr / (1 + snr)).float().to(device)
        ab = float(alphas_cumprod.alpha_bar(t.cpu()))
        idx = None
    else:
        ab_all = getattr(alphas_cumprod, "alphas_cumprod", alphas_cumprod).double()
        idx = int(torch.argmin((ab_all / (1 - ab_all) - snr).abs()))
        ab = float(ab_all[idx])
    g = torch.Generator().manual_seed(0)
    z = torch.randn((n, *shape), generator=g, device=g.device).to(device)
    probe = torch.randn((n, *shape), generator=g, device=g.device).to(device)
    if idx is not None:
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


def _alpha_bar_prev(scheduler, i: int, schedule) -> float:
    """alpha_bar at the next grid time (a VP table's entry exactly, or a flow twin's), the final value after the last."""
    ts = scheduler.timesteps
    if i + 1 < len(ts):
        return float(schedule.alpha_bar(torch.as_tensor(ts[i + 1]).cpu()))
    final = getattr(scheduler, "final_alpha_cumprod", None)
    return float(final) if final is not None else 1.0


def _step_with_x0(scheduler, eps_hat, t, z, x0_hat, step_kwargs: dict):
    """The step from alpha_bar = 0 with the model's own x0 (``FlowTwinEpsDDIM`` takes it as ``pred_original_sample``;
    a stock VP DDIMScheduler goes through ``baseline.ddim_step_from_x0``)."""
    import inspect

    if "pred_original_sample" in inspect.signature(scheduler.step).parameters:
        return scheduler.step(eps_hat, t, z, return_dict=True, pred_original_sample=x0_hat, **step_kwargs)
    kw = {k: v for k, v in step_kwargs.items() if k in ("eta", "generator")}
    return ddim_step_from_x0(scheduler, eps_hat, t, z, x0_hat, **kw)


def _model_time(scheduler, z: torch.Tensor, t, ab: float, schedule):
    """(t', alpha_bar(t'), model times for ``step``) of a Time-Shift step rule: the grid (t, ab)
    themselves when no row is shifted (so a window-0 rule is the DDIM loop bit for bit), else the
    (B,) model times (int64 on a VP table, float on a flow grid) and their (B, 1, ...) alpha_bar in z's dtype."""
    t_model = scheduler.model_timesteps(z, t)  # (B,), handed to the scheduler's step
    if bool((t_model.cpu().double() == float(t)).all()):
        return t, ab, t_model
    ab_m = schedule.alpha_bar(t_model.cpu()).to(z.device).reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return t_model, ab_m, t_model


def _at_model_time(scheduler, z: torch.Tensor, t, t_m):
    """(the state the model is called at, its scale over z) at model time t': z itself on a VP table (Time-Shift
    reads x_t as a sample at t'); on a flow's twin the same flow point in the coordinates of t',
    z c(sigma_t) / c(sigma_t') (``TwinFlowTimeShift.model_input``), so that a gradient taken in z is divided by
    that scale to be one in the model's coordinates. Differentiable in z; (z, 1.0) when unshifted."""
    if t_m is t or not hasattr(scheduler, "model_input"):
        return z, 1.0
    return scheduler.model_input(z, t, t_m), scheduler.model_scale(z, t, t_m).to(z.dtype)


def draw_normal(generators, shape, device) -> torch.Tensor:
    """(len(generators), *shape) standard normal, row b from generators[b] on its own device (core.noise.normal_rows)."""
    return normal_rows(generators, shape, device=device)


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
    (eta = cfg.ddim_eta) update with the per-sample generators. A TimeShiftScheduler makes Time-Shift
    the step rule (docs/compose.md "Time-Shift in the inverse loop"): the model is called at its
    per-sample time t' (``model_timesteps``) and x0_hat and the eps-form guidance use alpha_bar(t');
    STSL's inner surrogate steps stay at the grid time and its final eps is taken at t'.
    y: (B, *op.out_shape).
    Returns (x0 = D(z0_hat of the last step), z0_hat, counters)."""
    counters = counters if counters is not None else codec.counters
    codec.counters = counters
    name = sampler_name or cfg.method
    randn = randn or (lambda shape: normal_rows(generators, shape, device=z_init.device))
    step_kwargs = {"eta": cfg.ddim_eta, "generator": generators} if cfg.ddim_eta > 0 else {"eta": 0.0}
    schedule = as_schedule(alphas_cumprod)  # a VP table or a flow model's twin (docs/flow_matching.md)
    auto = cfg.step_rule == "auto"
    gamma = cfg.glue(codec.latent)
    if auto and cfg.prior_var is None:
        import dataclasses

        v = estimate_prior_var(denoiser, _first_cond(cond), tuple(z_init.shape[1:]), schedule, device=z_init.device)
        counters.unet_forward += 8
        counters.unet_backward += 8
        cfg = dataclasses.replace(cfg, prior_var=v)
    counters.prior_var = cfg.prior_var
    z = z_init.detach()
    z0_hat = z
    shifting = hasattr(scheduler, "model_timesteps")
    for i, t in enumerate(scheduler.timesteps):
        ab = float(schedule.alpha_bar(torch.as_tensor(t).cpu()))
        x0_kw = {}  # alpha_bar = 0: the step takes x0 from the model's own output (Denoiser.eps_x0)
        t_m, ab_m = t, ab  # the model's time and its alpha_bar (per sample under Time-Shift)
        if shifting and cfg.method != "stsl":
            t_m, ab_m, step_kwargs["model_timesteps"] = _model_time(scheduler, z, t, ab, schedule)
        if cfg.method == "stsl" and ab == 0.0:
            # zero terminal SNR (a flow's sigma = 1, a rescaled VP schedule's T): z_t is independent of z_0, so
            # p(y | z_t) = p(y) is constant in z_t and the surrogate's data and trace terms have zero gradient there
            # (the inner steps would move z by 0 * inf); the step takes x0 from the model's own output
            counters.nfe_paper += 1
            with torch.no_grad():
                eps_hat, z0_direct = denoiser.eps_x0(z, t, cond)
            counters.unet_forward += 1
            check_finite(z0_direct, name, i)
            out = _step_with_x0(scheduler, eps_hat, t, z, z0_direct, step_kwargs)
            z0_hat, z = out.pred_original_sample, out.prev_sample.detach()
        elif cfg.method == "stsl":  # K inner gradient steps on the surrogate loss (STSL Eq. 4)
            counters.nfe_paper += cfg.inner_steps
            # auto: K steps of z <- z + (rho_t / K) grad log L, rho_t = c_t / M_t: a shift of z_t that the DDIM
            # map (gain M_t) carries into the same shift of z_{t-1} as the eps-form guidance of DPS / PSLD
            # (c_t) (docs/stsl.md, "Step-size rule")
            if auto:
                ab_prev = _alpha_bar_prev(scheduler, i, schedule)
                rho = (cfg.step_size * guidance_shift(ab, ab_prev, cfg.ddim_eta)
                       / ddim_gain(ab, ab_prev, cfg.prior_var, cfg.ddim_eta) / cfg.inner_steps)
            else:
                rho = cfg.step_size
            eps_last = None
            for _ in range(cfg.inner_steps):
                # fresh probe per inner step (trace_probe: Rademacher in the range of A, or Gaussian in z; none without
                # the trace term: the generators' streams then match the plain DDIM / DDPM sampler)
                v = trace_probe(cfg, codec, op, randn, tuple(z.shape[1:]), ab) if cfg.trace_weight > 0 else None
                with torch.enable_grad():
                    z_in = z.detach().requires_grad_(True)
                    loss, eps_last, _ = stsl_loss(z_in, t, ab, v, denoiser, cond, codec, op, y, cfg, counters)
                    check_finite(loss, name, i)
                    (grad,) = torch.autograd.grad(loss, z_in)
                if auto:
                    grad = trust_clip(grad, ab, cfg.prior_var)
                counters.unet_backward += 2 if cfg.trace_weight > 0 else 1
                z = (z - rho * grad).detach()
            if shifting:
                t_m, ab_m, step_kwargs["model_timesteps"] = _model_time(scheduler, z, t, ab, schedule)
            if cfg.reuse_eps and t_m is t:
                eps_hat = eps_last.detach()
            else:
                eps_hat = denoiser(_at_model_time(scheduler, z, t, t_m)[0], t_m, cond)
                counters.unet_forward += 1
            check_finite(eps_hat, name, i)
            out = scheduler.step(eps_hat, t, z, return_dict=True, **step_kwargs)
            z0_hat, z = out.pred_original_sample, out.prev_sample.detach()
        else:
            counters.nfe_paper += 1
            guided = (cfg.zeta > 0) if cfg.method == "dps" else (gamma > 0 or cfg.omega > 0)
            with torch.enable_grad() if guided else torch.no_grad():
                z_in = z.detach().requires_grad_(guided)
                z_m, scale_m = _at_model_time(scheduler, z_in, t, t_m)  # flows: t's point in t_m's twin coordinates
                if ab == 0.0:  # zero terminal SNR: eps says nothing about x0, the model's own output does
                    eps_hat, z0_direct = denoiser.eps_x0(z_m, t_m, cond)
                    x0_kw = {"pred_original_sample": z0_direct.detach()}
                else:
                    eps_hat = denoiser(z_m, t_m, cond)
                counters.unet_forward += 1
                check_finite(eps_hat, name, i)
                grad = None
                if guided:
                    z0 = tweedie_x0(z_m, eps_hat, ab_m) if ab > 0 else z0_direct
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
                    # (under a flow's Time-Shift the gradient in z is scale_m times the one in the model's coordinates)
                    root = math.sqrt(1 - ab) if t_m is t else (1 - ab_m).sqrt() / scale_m
                    eps_step = eps_hat.detach() + root * grad
                else:
                    eps_step = eps_hat.detach()
                if x0_kw:
                    out = _step_with_x0(scheduler, eps_step, t, z_in.detach(), x0_kw["pred_original_sample"], step_kwargs)
                else:
                    out = scheduler.step(eps_step, t, z_in.detach(), return_dict=True, **step_kwargs)
                z_prev = out.prev_sample if (auto or grad is None) else out.prev_sample - grad
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
    ab = float(as_schedule(alphas_cumprod).alpha_bar(torch.as_tensor(scheduler.timesteps[0]).cpu()))
    with torch.no_grad():
        z_meas = codec.encode(op.back_project(y))
    return math.sqrt(ab) * z_meas + math.sqrt(1 - ab) * noise


# -- Python entry point --------------------------------------------------------------------------
def reconstruct(model, op: LinearOperator, y: torch.Tensor, method: str = "stsl", seeds=(0,), *, ctx: RunContext | None = None,
                scheduler=None, start: Callable | None = None, latents: bool = False, **params) -> tuple:
    """Python entry point: posterior samples for measurement(s) y with a LoadedModel.

    y: (1 or len(seeds), *op.out_shape); one output per seed, (n, *pixel_shape).
    Returns (x0, counters), or (x0, z0, counters) with ``latents=True``: z0 the final latent
    estimate of a latent model (its decoding is x0; for a pixel model z0 is x0).
    params: InverseConfig fields (steps, inner_steps, trace_weight, zeta, ...).
    scheduler: the step rule, set to cfg.steps (default: the model's DDIMScheduler; a
    TimeShiftScheduler gives TS-DPS / TS-PSLD / TS-STSL, docs/compose.md).
    start(scheduler, generators) -> z_T at the scheduler's scale replaces the Gaussian start
    (One More Step: ``gensample.runs.oms.oms_start``); it draws from the per-sample generators first."""
    ctx = ctx or RunContext(sampler=method)
    cfg = InverseConfig(method=method, **params)
    n = len(seeds)
    gens = ctx.generators(seeds)
    sched = scheduler
    if sched is None and model.prediction_type == "flow":  # DDIM on the twin, eps in (docs/flow_matching.md)
        sched = FlowTwinEpsDDIM(model.scheduler_config)
        set_grid(sched, cfg.steps, ctx.device, model)
    elif sched is None:
        sched = make_scheduler("ddim", model.scheduler_config)
        sched.set_timesteps(cfg.steps, device=ctx.device)
    elif len(sched.timesteps) != cfg.steps:
        raise ValueError(f"the scheduler is set to {len(sched.timesteps)} steps, the config to {cfg.steps}")
    if start is not None and cfg.init != "gaussian":
        raise ValueError(f"a custom start (e.g. --oms-module) replaces the Gaussian z_T; it excludes --init {cfg.init}")
    ac = model_schedule(model) if model.prediction_type == "flow" else alphas_cumprod_from_config(model.scheduler_config)
    counters = Counters()
    codec = Codec(model.extras.get("vae"), counters)
    y = torch.as_tensor(y).float().to(ctx.device)
    if y.shape[0] not in (1, n) or tuple(y.shape[1:]) != tuple(op.out_shape):
        raise ValueError(f"y must have shape (1 or {n}, {', '.join(map(str, op.out_shape))}), got {tuple(y.shape)}")
    y = y.expand(n, *op.out_shape)
    if start is not None:
        z = start(sched, gens)
    else:
        noise = ctx.randn(gens, model.event_shape)
        z = init_latent(cfg, sched, codec, op, y, noise, ac, counters)
    cond = model.cond_for(None, n, ctx.device)
    x0, z0, counters = sample_inverse(model.denoiser(), sched, codec, op, y, z, cfg, alphas_cumprod=ac, generators=gens,
                                      cond=cond, randn=lambda shape: ctx.randn(gens, shape), on_step=ctx.step_done,
                                      counters=counters, sampler_name=method)
    return (x0, z0, counters) if latents else (x0, counters)
