"""`smc-post`: SMC-corrected posterior sampling for linear inverse problems (docs/smc_posterior.md).

Problem: y = A x + sigma_y n, prior p(x) given by a diffusion model. A particle system of K
particles per measurement follows the twisted path of the Twisted Diffusion Sampler (Wu et al.,
NeurIPS 2023, arXiv 2306.17775, Sec. 3, Alg. 1):

    target at time t:  gamma_t(x_t) ∝ p_t(x_t) L_t(y | x_t),
    twist:             L_t(y | x_t) = N(y; A x0_hat(x_t), sigma_y^2 I + r_t^2 A A^T)

(PiGDM, Song et al., ICLR 2023, Eq. 7; r_t^2 = v (1 - ab_t) / (ab_t v + 1 - ab_t) is the Tweedie
covariance of a N(m, v I) prior, `stsl.tweedie_var`; v -> inf gives (1 - ab_t) / ab_t). At the end
of the path the twist is replaced by the true likelihood N(y; A x0, sigma_y^2 I) evaluated at the
output x0, so as K grows the weighted particles converge to p(x | y) of the model's prior (TDS
Thm. 1: consistency needs only a positive twist and the exact final likelihood).

Proposal (TDS Eq. 9, the guided ancestral step): from x_t, with the DDIM eta = 1 (DDPM-variance)
update of Song et al. 2021, Eq. 12,
    mu = sqrt(ab') x0_hat + sqrt(1 - ab' - s^2) eps_hat,  s^2 = (1 - ab')/(1 - ab) (1 - ab/ab'),
    x_{t'} ~ q = N(mu + h, s^2 I),  h = s^2 g / (1 + s^2 k'^2 a / S'^2),  g = grad_{x_t} log L_t,
where the damping 1 / (1 + s^2 k'^2 a / S'^2) is the optimal-proposal gain of a linear-Gaussian
step (Doucet, Godsill & Andrieu 2000, Sec. II-D) with k' = d x0_hat / d x_{t'} of the N(m, v I)
prior, S'^2 = sigma_y^2 + r_{t'}^2 a and a the largest eigenvalue of A A^T: it stops the shift
from overshooting the measurement when sigma_y is small (any proposal is corrected by the weights).

Weights (TDS Eq. 8), float64, per particle:
    log w_T = log L_T(y | x_T),
    log w  += log p(x_{t'} | x_t) - log q(x_{t'} | x_t) + log L_{t'}(y | x_{t'}) - log L_t(y | x_t),
    log p - log q = -(|h|^2 + 2 s h . z) / (2 s^2)   (x_{t'} = mu + h + s z),
    last step:  log w += log N(y; A x0, sigma_y^2 I) - log L_{t_1}(y | x_{t_1}),  x0 = x0_hat(x_{t_1}).
Terms constant over particles (log-determinants, 2 pi) are dropped: they cancel in the normalised
weights. Resampling within each system whenever ESS < threshold * K (`gensample.core.smc`).

A A^T (docs/smc_posterior.md, "Limitations"): exact for masks (A A^T = I on the observed entries)
and dense matrices; other operators use the scalar approximation A A^T ~ I inside the twist (their
rows are normalised), which only costs efficiency: the final likelihood is exact for every operator.

| code name   | symbol                                   |
|-------------|------------------------------------------|
| ``log_w``   | log w, (G, K) float64                    |
| ``log_l``   | log L_t(y | x_t) per particle, float64   |
| ``grad``    | g = grad_{x_t} log L_t                   |
| ``shift``   | h, the proposal's mean shift             |
| ``s``       | sqrt of the ancestral step variance s^2  |

This module holds the method: ``SMCPosteriorConfig``, the particle loop ``sample_smc_posterior`` and
the Python entry point ``posterior_samples`` (with ``grid`` and ``draw_blocks``). The run glue of
`gensample run --sampler smc-post` (options, option parsing, validation, the batch function and the
registration) lives in ``gensample.runs.smc_posterior``; nothing here imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core import smc
from ..core.ddim import timestep_grid
from ..core.denoiser import check_finite
from ..core.noise import normal_blocks
from ..core.schedule import alphas_cumprod_from_config, as_schedule, model_schedule
from .fkc import combine_eps, direct_steps, node_coefficients, weight_rate
from .operators import LinearOperator, MatrixOperator
from .registry import RunContext, sample_seed
from .stsl import Codec, estimate_prior_var, likelihood_quad, trust_clip, tweedie_var

FINALS = ("resample", "weighted")
NAME = "smc-post"
_RESAMPLE_SEED_INDEX = 2**40  # sample_seed(system seed, this) seeds a system's resampler


@dataclass(frozen=True)
class SMCPosteriorConfig:
    """Settings of the particle system (defaults: docs/smc_posterior.md, "Options")."""

    particles: int = 16
    steps: int = 50
    noise_std: float = 0.05
    prior_var: float | None = None  # v of r_t^2; None: estimated from the model (`stsl.estimate_prior_var`)
    ess_threshold: float = 0.5  # resample when ESS < threshold * K (1: every step, 0: never)
    scheme: str = "systematic"
    final: str = "resample"
    guidance_weight: float = 1.0  # multiplier of the proposal shift h (0: plain DDPM proposal, pure reweighting)
    # FKC prior target prod_i p_i^{beta_i} (docs/compose.md "FKC targets with a measurement"; reached as the
    # steps grow: FKC's weights are a quadrature): exponents of the experts handed to sample_smc_posterior;
    # (1.0,) is the model's own prior. quadrature: FKC's weight rule.
    betas: tuple = (1.0,)
    quadrature: str = "logsnr"

    def __post_init__(self):
        if isinstance(self.particles, bool) or int(self.particles) != self.particles or self.particles < 1:
            raise ValueError(f"--particles must be an integer >= 1, got {self.particles!r}")
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std > 0):
            raise ValueError(f"--noise-std must be a finite number > 0 for smc-post (the likelihood is degenerate at 0), "
                             f"got {self.noise_std!r}")
        if self.prior_var is not None and not (math.isfinite(self.prior_var) and self.prior_var > 0):
            raise ValueError(f"--prior-var must be a finite number > 0, got {self.prior_var!r}")
        if not (0.0 <= self.ess_threshold <= 1.0):
            raise ValueError(f"--ess-threshold must be in [0, 1], got {self.ess_threshold!r}")
        if self.scheme not in smc.SCHEMES:
            raise ValueError(f"--scheme must be one of {list(smc.SCHEMES)}, got {self.scheme!r}")
        if self.final not in FINALS:
            raise ValueError(f"--final must be one of {list(FINALS)}, got {self.final!r}")
        if not (math.isfinite(self.guidance_weight) and self.guidance_weight >= 0):
            raise ValueError(f"--guidance-weight must be a finite number >= 0, got {self.guidance_weight!r}")
        betas = tuple(float(b) for b in self.betas)
        if not betas or not all(math.isfinite(b) for b in betas) or sum(betas) <= 0:
            raise ValueError(f"betas must be finite numbers with a positive sum, got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        if self.quadrature not in ("euler", "logsnr"):
            raise ValueError(f"--quadrature must be euler or logsnr for smc-post (one model call per step), got {self.quadrature!r}")

    @property
    def tempered(self) -> bool:
        """True when the prior path is an FKC target other than the model itself."""
        return self.betas != (1.0,)


DEFAULTS = {f: getattr(SMCPosteriorConfig(), f) for f in SMCPosteriorConfig.__dataclass_fields__}  # the one home of smc-post defaults


class TargetPrior:
    """The prior part of a twisted target p_t(x) -> prod_i p_{i,t}(x)^{beta_i} (an FKC target; Skreta
    et al. 2025, Sec. 3; followed up to the time discretisation of FKC's weights): called like a denoiser, it returns eps_eff = sum_i beta_i eps_i (with its
    graph, for the twist's gradient) and keeps the FK weight rate ||sum beta eps||^2 - sum beta ||eps||^2
    of that call in ``rate`` ((N,) float64, `fkc.weight_rate`).

    experts(x, t) -> (M, N, ...) eps of the M experts (one batched model call)."""

    def __init__(self, experts, betas):
        self.experts, self.betas = experts, tuple(betas)
        self.rate: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        eps = self.experts(x, t)
        if isinstance(eps, tuple):
            eps = eps[0]
        self.rate = weight_rate(eps.detach(), self.betas).cpu()
        return combine_eps(eps, self.betas)

    def eps_x0(self, x: torch.Tensor, t, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_eff, x0_bar) on the direct steps of a zero-SNR start (from alpha_bar = 0, a flow's sigma = 1, and
        while alpha_bar <= ``fkc.ZERO_SNR_DIRECT_UNTIL``), where the x0 of eps_eff, sum_i beta_i x0_i + (1 - B) x /
        sqrt(alpha_bar), is infinite or huge for B != 1: x0_bar = sum_i beta_i x0_i / B, the x0 of the target path
        to first order in alpha_bar (``fkc.zero_snr_move``), from the experts' own x0 (their raw outputs). The
        twist only has to be positive (the final likelihood is exact); the same log L enters both sides of the
        step's weight."""
        out = self.experts(x, t)
        if not isinstance(out, tuple):
            raise ValueError(f"{NAME}: alpha_bar = 0 at the first grid time (zero terminal SNR) needs the experts' x0 "
                             f"(experts(x, t) -> (eps, x0), runs.fkc._expert_fn)")
        eps, x0 = out
        self.rate = weight_rate(eps.detach(), self.betas).cpu()
        b = torch.tensor(self.betas, dtype=x0.dtype, device=x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return combine_eps(eps, self.betas), (b * x0).sum(0) / float(sum(self.betas))


@dataclass
class SMCPosteriorResult:
    x: torch.Tensor  # (G, ...) with final "resample" (one particle per system), (G*K, ...) with "weighted"
    weights: torch.Tensor  # (rows,) float64, normalised within each system
    log_w: torch.Tensor  # (G, K) float64 final log-weights (before the final policy)
    ess: torch.Tensor  # (G, N + 1) float64 ESS before each resampling decision and at the end
    resampled: torch.Tensor  # (G,) int64 number of resampling events per system
    stats: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None  # latent models: the latent x0 estimates of the rows of x (x decodes them)


def _aat_max_eig(op: LinearOperator) -> float:
    """Largest eigenvalue of A A^T: 1 for masks, exact for dense matrices, 1 otherwise (rows normalised)."""
    if isinstance(op, MatrixOperator):
        return float(torch.linalg.eigvalsh(op.mat @ op.mat.T).max().clamp(min=0))
    return 1.0


def ancestral_coefs(ab: float, ab_prev: float) -> tuple[float, float]:
    """(s, dir) of the DDIM eta = 1 update (Song et al. 2021, Eq. 12): s^2 = (1 - ab')/(1 - ab) (1 - ab/ab'),
    dir = sqrt(1 - ab' - s^2); the DDPM posterior variance on a strided grid."""
    s2 = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
    s2 = min(max(s2, 0.0), 1.0 - ab_prev)
    return math.sqrt(s2), math.sqrt(max(1.0 - ab_prev - s2, 0.0))


def proposal_gain(s2: float, ab_prev: float, v: float, sigma_y: float, aat: float) -> float:
    """1 / (1 + s^2 k'^2 a / S'^2): optimal-proposal damping of a linear-Gaussian step (module docstring)."""
    k = math.sqrt(ab_prev) * v / (ab_prev * v + 1.0 - ab_prev)
    big_s2 = sigma_y**2 + tweedie_var(ab_prev, v) * aat
    return 1.0 / (1.0 + s2 * k * k * aat / big_s2)


def twist(denoiser, op: LinearOperator, y: torch.Tensor, x: torch.Tensor, t, ab: float, sigma_y: float, r2: float, cond=None,
          codec=None, direct: bool = False):
    """eps_hat, x0_hat, log L_t(y | x_t) (float64, constants dropped) and its gradient at x (one forward + one VJP).

    log L_t = -r^T (sigma_y^2 I + r2 A A^T)^-1 r / 2, r = y - A D(x0_hat) (`stsl.likelihood_quad`); D is
    ``codec.decode`` for latent models (`stsl.Codec`, gradients through the decoder), else the identity."""
    with torch.enable_grad():
        xin = x.detach().requires_grad_(True)
        if ab > 0 and not direct:
            eps = denoiser(xin, t, cond)
            x0 = (xin - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        elif hasattr(denoiser, "eps_x0"):  # zero terminal SNR (a flow's sigma = 1): x0 from the model's own output
            eps, x0 = denoiser.eps_x0(xin, t, cond)
        else:
            raise ValueError(f"{NAME}: alpha_bar = 0 at the first grid time (zero terminal SNR) needs x0 from the model's "
                             f"own parameterisation (a denoiser with eps_x0)")
        x_img = x0 if codec is None else codec.decode(x0, grad=True)
        res = y.double() - op(x_img).double()
        log_l = -0.5 * likelihood_quad(op, res, sigma_y**2, r2)
        (grad,) = torch.autograd.grad(log_l.sum(), xin)
    return eps.detach(), x0.detach(), log_l.detach().double().cpu(), grad.detach()


def sample_smc_posterior(denoiser, op: LinearOperator, y: torch.Tensor, x_T: torch.Tensor, cfg: SMCPosteriorConfig, *,
                         alphas_cumprod, timesteps, final_alpha_bar: float = 1.0, noise_generators,
                         resample_generators, cond=None, on_step=None, sampler: str = NAME, codec=None,
                         experts=None) -> SMCPosteriorResult:
    """Run G independent systems of K = cfg.particles particles (docs/smc_posterior.md, "Proposal", "Weights").

    x_T: (G*K, *shape) group-major start noise; y: (1 or G*K, *op.out_shape); timesteps: the descending
    model timesteps of the grid; noise_generators: one per system (its K particles' move noise is drawn
    as one (K, *shape) block from it, on the generator's own device) or one per row; resample_generators:
    one per system. codec: `stsl.Codec`
    of a latent model (x_T and the moves are latents z; the twist and the output use D(z0_hat)), None for pixels.
    final_alpha_bar: accepted for the scheduler contract only; the output is x0_hat at the last grid point
    (the deterministic final DDIM step), where the twist becomes the true likelihood.
    experts(x, t) -> (M, N, ...) eps: with cfg.betas != (1,), the prior path is the FKC target
    prod_i p_i^{beta_i} (docs/compose.md "FKC targets with a measurement"): the moves use
    eps_eff = sum beta_i eps_i, x_T is scaled by 1 / sqrt(B) (rho_T = N(0, I / B)), and every step adds
    FKC's weight increment c_k * rate (`fkc.node_coefficients`, cfg.quadrature) to the twist's. The
    target at t = 0, prod_i p_i^{beta_i}(x) N(y; A x, sigma_y^2 I), is reached only as the number of
    steps grows (and K -> inf): the twist's weights are exact for the N-step chain they correct
    (docs/smc_posterior.md "Limitations"), but FKC's increments are a one-node quadrature of the
    continuous FK weight (Skreta et al. 2025, Sec. 3), so at finite steps the prior part also carries
    FKC's discretisation bias (docs/fkc.md "Discretisation bias";
    measured in docs/compose.md "Measured": the mean of the observed coordinate is off by +0.16 / +0.10
    / +0.06 at 50 / 200 / 800 steps on the 2-D annealed posterior). ``denoiser`` then only serves the
    prior-variance estimate (v / B for the tempered path: exact for a Gaussian)."""
    K = int(cfg.particles)
    rows = x_T.shape[0]
    if rows % K:
        raise ValueError(f"x_T must have a multiple of --particles ({K}) rows, got {rows}")
    G = rows // K
    if len(noise_generators) not in (G, rows):
        raise ValueError(f"noise_generators must hold one generator per system ({G}) or per particle ({rows}), "
                         f"got {len(noise_generators)}")
    if len(resample_generators) != G:
        raise ValueError(f"resample_generators must hold one generator per system ({G}), got {len(resample_generators)}")
    y = y.to(x_T.device)
    if y.shape[0] == 1 and rows > 1:
        y = y.expand(rows, *y.shape[1:])
    schedule = as_schedule(alphas_cumprod)  # a VP table or a flow model's twin (docs/flow_matching.md)
    ts = torch.as_tensor(timesteps).cpu().tolist()  # model times: ints on a VP table, floats on a flow grid
    ab_t, ab_s = schedule.alpha_bar_pairs(timesteps, 1.0)  # (S,) float64 each; the output is x0_hat (alpha_bar 1)
    abs_ = ab_t.tolist()
    v = cfg.prior_var
    if v is None:
        cond8 = None if not cond else {k: vv[:1].expand(8, *vv.shape[1:]) if isinstance(vv, torch.Tensor) and vv.ndim else vv
                                       for k, vv in cond.items()}  # the first row's conditioning at the 8 probe points
        v = estimate_prior_var(denoiser, cond8, tuple(x_T.shape[1:]), schedule, device=x_T.device)
    aat = _aat_max_eig(op)
    sy = float(cfg.noise_std)
    dev = x_T.device
    t_dev = lambda t: torch.tensor(t, device=dev)  # noqa: E731
    prior = denoiser
    B = float(sum(cfg.betas))
    if cfg.tempered:
        if experts is None:
            raise ValueError(f"betas {cfg.betas} need the experts' eps (experts=...): the target is prod_i p_i^beta_i")
        prior = TargetPrior(experts, cfg.betas)
        if cfg.prior_var is None:
            v = v / B  # the tempered path's variance (exact for Gaussian experts sharing their variance)
        x_T = (x_T.double() / math.sqrt(B)).to(x_T.dtype)  # rho_T = N(0, I / B)
    fk_coef = node_coefficients(ab_t, ab_s, cfg.quadrature) if cfg.tempered else None  # (S,) FKC weight of each call
    # a tempered path's zero-SNR start (alpha_bar_T = 0: a flow's sigma = 1): FKC's direct steps (``fkc.direct_steps``,
    # no FK weight), whose x0 is the experts' x0_bar and whose move samples the target path (docs/compose.md)
    direct = (direct_steps(ab_t, ab_s) if cfg.tempered else torch.zeros(len(abs_), dtype=torch.bool)).tolist() + [False]

    x = x_T.detach()
    eps, x0, log_l, grad = twist(prior, op, y, x, t_dev(ts[0]), abs_[0], sy, tweedie_var(abs_[0], v), cond, codec,
                                 direct[0])
    rate = prior.rate if cfg.tempered else None
    log_w = log_l.reshape(G, K).clone()
    ess_trace, n_res = [], torch.zeros(G, dtype=torch.int64)
    unet_fwd = unet_bwd = 1
    for i in range(len(ts)):
        check_finite(eps, sampler, i)
        if not torch.isfinite(log_w).all():
            raise FloatingPointError(f"{sampler}: non-finite log-weights at step {i}")
        ess = smc.effective_sample_size(log_w)
        ess_trace.append(ess)
        want = ess < cfg.ess_threshold * K
        if K > 1 and bool(want.any()):
            carried = [x, eps, x0, grad, log_l.reshape(-1)] + ([rate] if rate is not None else [])
            carried, log_w, _ = smc.resample(carried, log_w, cfg.scheme, resample_generators, mask=want)
            x, eps, x0, grad, log_l = carried[:5]
            rate = carried[5] if rate is not None else None
            n_res += want.long()
        ab = abs_[i]
        if rate is not None:  # FKC's increment of the step from t_i (experts at x_t_i), paper Sec. 3
            log_w = log_w + (fk_coef[i] * rate).reshape(G, K)
        if i == len(ts) - 1:  # last step: output x0_hat, twist -> the true likelihood N(y; A x0, sigma_y^2 I)
            with torch.no_grad():
                x_img = x0 if codec is None else codec.decode(x0)
            res = y.double() - op(x_img).double()
            log_true = (-0.5 * likelihood_quad(op, res, sy**2, 0.0)).cpu()
            log_w = log_w + (log_true - log_l).reshape(G, K)
            if on_step is not None:
                on_step(1)
            break
        ab_prev = abs_[i + 1]
        # a direct step of a tempered zero-SNR start: the target path's own draw, x' ~ N(sqrt(ab') x0_bar, (1 - ab') / B)
        # (fkc.zero_snr_move at eta = 1); from alpha_bar = 0 untempered, the ancestral step is the same with B = 1
        s, dir_ = (math.sqrt((1.0 - ab_prev) / B), 0.0) if direct[i] or ab == 0.0 else ancestral_coefs(ab, ab_prev)
        g = trust_clip(grad, ab, v)
        shift = cfg.guidance_weight * s * s * proposal_gain(s * s, ab_prev, v, sy, aat) * g
        z = normal_blocks(noise_generators, rows, tuple(x.shape[1:]), device=dev)
        x_new = math.sqrt(ab_prev) * x0 + dir_ * eps + shift + s * z
        hd, zd = shift.double().flatten(1), z.double().flatten(1)
        if s > 0:  # log p(x'|x) - log q(x'|x, y), both N(., s^2 I)
            log_pq = (-((hd**2).sum(1) + 2 * s * (hd * zd).sum(1)) / (2 * s * s)).cpu()
        else:
            log_pq = torch.zeros(rows, dtype=torch.float64)
        eps, x0, log_l_new, grad = twist(prior, op, y, x_new, t_dev(ts[i + 1]), ab_prev, sy, tweedie_var(ab_prev, v),
                                         cond, codec, direct[i + 1])
        rate = prior.rate if cfg.tempered else None
        unet_fwd += 1
        unet_bwd += 1
        log_w = log_w + (log_pq + log_l_new - log_l).reshape(G, K)
        log_l, x = log_l_new, x_new.detach()
        if on_step is not None:
            on_step(1)
    if not torch.isfinite(log_w).all():
        raise FloatingPointError(f"{sampler}: non-finite final log-weights")
    ess_trace.append(smc.effective_sample_size(log_w))
    ess_all = torch.stack(ess_trace, 1)  # (G, N + 1)
    w_bar = smc.normalized_weights(log_w)
    lat = None
    if cfg.final == "weighted":
        out, weights = x_img, w_bar.reshape(-1)
        lat = x0 if codec is not None else None
    else:  # one particle per system, drawn from its normalised weights
        pick = smc.draw_one_per_group(log_w, resample_generators).cpu()
        rows_kept = (torch.arange(G) * K + pick).to(x_img.device)
        out, weights = x_img[rows_kept], torch.ones(G, dtype=torch.float64)
        lat = x0[rows_kept.to(x0.device)] if codec is not None else None
    stats = {"prior_var": v, "unet_forward_per_particle": unet_fwd, "unet_backward_per_particle": unet_bwd,
             "resample_events": int(n_res.sum())}
    return SMCPosteriorResult(out, weights, log_w, ess_all, n_res, stats,
                              latents=None if lat is None else lat.detach())


def draw_blocks(generators, rows: int, shape: tuple, device) -> torch.Tensor:
    """(rows, *shape) standard normal, one block of rows / len(generators) per generator (core.noise.normal_blocks)."""
    return normal_blocks(generators, rows, shape, device=device)


def grid(model, steps: int, device="cpu"):
    """(alphas_cumprod, descending timesteps, final alpha_bar) of the model's DDIM grid with `steps` steps:
    the timesteps of diffusers' DDIMScheduler on the model's config (``timestep_spacing``, default
    "leading", and ``steps_offset``; `core.ddim.timestep_grid`), and its final alpha_bar, 1 when
    ``set_alpha_to_one`` (default) else alpha_bar at t = 0 (as float32, the scheduler's precision)."""
    cfg = model.scheduler_config
    if model.prediction_type == "flow":  # the model's own sigma grid; the loop runs on the VP twin
        schedule = model_schedule(model)
        return schedule, schedule.grid(int(steps)).to(device), 1.0
    ac = alphas_cumprod_from_config(cfg)
    ts = timestep_grid(int(cfg.get("num_train_timesteps", 1000)), int(steps), cfg.get("timestep_spacing", "leading"),
                       int(cfg.get("steps_offset", 0))).to(device)
    final = 1.0 if cfg.get("set_alpha_to_one", True) else float(ac[0].float())
    return ac, ts, final


def posterior_samples(model, op: LinearOperator, y: torch.Tensor, seeds, cfg: SMCPosteriorConfig, *, ctx: RunContext | None = None,
                      cond=None, on_step=None, experts=None, start=None) -> SMCPosteriorResult:
    """Python entry point (pixel or latent models): one system of cfg.particles particles per seed (final
    "resample": one output per seed) or, with final "weighted", seeds in consecutive groups of K
    particles (len(seeds) a multiple of K; every particle returned with its weight).
    y: (1, *op.out_shape), the measurement shared by all systems.
    experts(x, t) -> (M, rows, ...) eps: the FKC target of cfg.betas (`sample_smc_posterior`).
    start(x_Tp) -> x_T maps the systems' unit-variance start draw (rows, *event) to another start
    (One More Step: ``gensample.runs.oms.oms_start`` with ``x_Tp``)."""
    ctx = ctx or RunContext(sampler=NAME)
    K = int(cfg.particles)
    seeds = [int(s) for s in seeds]
    if cfg.final == "weighted":
        if len(seeds) % K:
            raise ValueError(f"with --final weighted the number of samples ({len(seeds)}) must be a multiple of --particles ({K})")
        system_seeds = seeds[::K]  # a system's randomness comes from its first particle's seed
    else:
        system_seeds = seeds
    y = torch.as_tensor(y).double()
    if y.ndim == len(op.out_shape):
        y = y[None]
    if y.shape[0] != 1 or tuple(y.shape[1:]) != tuple(op.out_shape):
        raise ValueError(f"y must have shape (1, {', '.join(map(str, op.out_shape))}), got {tuple(y.shape)}")
    ac, ts, final_ab = grid(model, cfg.steps, ctx.device)
    gens = ctx.generators(system_seeds)  # one per system: start noise and move noise of its K particles
    rgens = [torch.Generator().manual_seed(sample_seed(s, _RESAMPLE_SEED_INDEX)) for s in system_seeds]
    x_T = normal_blocks(gens, len(system_seeds) * K, tuple(model.event_shape), device=ctx.device)
    if start is not None:
        x_T = start(x_T)
    den = model.denoiser()
    if cond is None:
        cond = model.cond_for(None, x_T.shape[0], ctx.device)
    vae = model.extras.get("vae")
    codec = Codec(vae) if vae is not None else None
    res = sample_smc_posterior(den, op, y.to(ctx.device), x_T, cfg, alphas_cumprod=ac, timesteps=ts, final_alpha_bar=final_ab,
                               noise_generators=gens, resample_generators=rgens, cond=cond,
                               on_step=ctx.step_done if on_step is None else on_step, codec=codec, experts=experts)
    res.stats.update(nfe=den.calls, model_rows=den.rows)
    if codec is not None:
        res.stats.update(vae_decode=codec.counters.vae_decode, vae_decode_backward=codec.counters.vae_decode_backward)
    return res
