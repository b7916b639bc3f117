"""Time-Shift sampler (TS-DDIM / TS-DDPM): Li et al., "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024, arXiv 2305.15583 (specs/time_shift.md).

Exposure bias: the sampled x_t is not distributed as q(x_t). Per sample, TS evaluates the network
at the time t_s in a window around the nominal t whose noise level 1 - alpha_bar_{t_s} best
matches the sample's own pixel variance (spec sec. 2), and stops shifting below a cutoff t_c.

| code name           | paper / spec symbol                                     |
|---------------------|---------------------------------------------------------|
| ``var_hat``         | v_hat_b, unbiased variance over C*H*W of sample b       |
| ``window_size``     | w; half-width h = floor(w / 2)                          |
| ``cutoff``          | t_c (shift only while the centre time is > t_c)         |
| ``timestep``        | tau_k, the nominal grid time of step k                  |
| ``t_shift``         | t_s,b (LongTensor[B])                                   |
| ``prev_timestep``   | n = tau_{k+1} (alpha_bar = 1 past the end)              |
| ``alpha_bar_s``     | alpha_bar at the time the model output refers to        |
| ``alpha_bar_n``     | alpha_bar of the step's target                          |
| ``eta``             | DDIM eta (0: DDIM, 1: DDPM-like)                        |

Two selection rules (spec sec. 2 table; ``variant``):
- ``"paper"`` (Algorithm 3, strided form of spec sec. 2): at step k >= 1 with tau_k > t_c the model
  is evaluated at t_s = select(x, centre tau_k); x0_hat, sigma and the update use alpha_bar_{t_s};
  the next step starts on the grid time tau_{k+1}.
- ``"reference_pnm"`` (the PNMSolver rule behind the published tables): the model stays at tau_k;
  the *target* of the step is replaced by select(x, centre tau_{k+1}) when tau_{k+1} > t_c; the
  next step again starts on the grid.

Epsilon scaling (Ning et al., ICLR 2024, arXiv 2308.15321; spec sec. 6) is the baseline: the
``ddim`` sampler's ``--eps-scale`` uses `epsilon_scale` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.denoiser import check_finite
from ..core.param import PREDICTION_TYPES, to_eps
from .registry import Option, RunContext, SampleBatch, SamplerSpec, register

VARIANTS = ("paper", "reference_pnm")
# Chosen by measurement on digits-ddpm (docs/time_shift.md, benchmarks/bench_time_shift.py --eval).
DEFAULT_VARIANT = "paper"
# Proposed defaults for T = 1000 (spec sec. 3): steps -> window w; t_c = 300, or 200 at <= 10 steps.
DEFAULT_WINDOWS = {5: 40, 10: 40, 20: 30, 50: 8, 100: 2}


# -- parameters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeShiftParams:
    """Resolved TS parameters. window_size w >= 0 (w < 2: no shift), cutoff t_c >= 0."""

    window_size: int
    cutoff: int
    variant: str = DEFAULT_VARIANT
    eta: float = 0.0
    enabled: bool = True

    def __post_init__(self):
        check_params(self.window_size, self.cutoff, self.variant, self.eta)


def check_params(window_size, cutoff, variant, eta) -> None:
    """Validate user-facing TS parameters (None window/cutoff = per-step default)."""
    for name, val in (("window_size", window_size), ("cutoff", cutoff)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0):
            raise ValueError(f"{name} must be an integer >= 0 or None, got {val!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def default_window_cutoff(num_inference_steps: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """Spec sec. 3 proposed defaults, scaled by T / 1000: the table entry with the largest step
    count <= num_inference_steps (5 below 5 steps); t_c = 200 at <= 10 steps, else 300."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    keys = sorted(DEFAULT_WINDOWS)
    key = max([k for k in keys if k <= num_inference_steps], default=keys[0])
    scale = num_train_timesteps / 1000.0
    cutoff = 200 if num_inference_steps <= 10 else 300
    return int(round(DEFAULT_WINDOWS[key] * scale)), int(round(cutoff * scale))


# -- pure step functions --------------------------------------------------------------------
def sample_variance(x: torch.Tensor) -> torch.Tensor:
    """v_hat_b: unbiased variance (divide by D - 1) of each sample's entries, centred on its own
    mean (spec sec. 2 "Statistic"). x: (B, ...) with D >= 2 entries per sample. Returns (B,) float64."""
    if x.ndim < 2 or x[0].numel() < 2:
        raise ValueError(f"sample must have shape (B, ...) with >= 2 entries per sample, got {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1).double()  # (B, D)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return (centred * centred).sum(dim=1) / (flat.shape[1] - 1)  # (B,); two-pass, 3x faster than .var


def window_candidates(centre: int, window_size: int, num_train_timesteps: int, device=None) -> torch.Tensor:
    """W(c) = {max(0, c-h) .. min(T-1, c+h)}, h = floor(w/2), ascending (spec sec. 2). (W,) int64."""
    h = int(window_size) // 2
    lo, hi = max(0, int(centre) - h), min(num_train_timesteps - 1, int(centre) + h)
    return torch.arange(lo, hi + 1, dtype=torch.long, device=device)  # (W,)


def select_shift(var_hat: torch.Tensor, one_minus_alpha_bar: torch.Tensor, centre: int, window_size: int) -> torch.Tensor:
    """t_s,b = argmin_{tau in W(c)} (v_hat_b - (1 - alpha_bar_tau))^2, ties to the smallest tau
    (spec sec. 2 "Selection"). var_hat: (B,) float64; one_minus_alpha_bar: (T,) float64.
    Returns (B,) int64 inside W(c); each row depends only on its own v_hat."""
    T = one_minus_alpha_bar.numel()
    cand = window_candidates(centre, window_size, T, device=var_hat.device)  # (W,)
    dist = (var_hat.double()[:, None] - one_minus_alpha_bar.double()[cand][None, :]) ** 2  # (B, W)
    # argmin returns the first minimum; cand is ascending, so ties go to the smallest tau.
    return cand[dist.argmin(dim=1)]  # (B,)


def predict_x0(x_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - alpha_bar_s) eps_hat) / sqrt(alpha_bar_s) (DDIM, Song et al. 2021,
    eq. 12). alpha_bar_s broadcasts against x_t ((B, 1, ...) or scalar). Same operation order as
    diffusers' DDIMScheduler, so equal inputs give bit-equal outputs."""
    beta_s = 1 - alpha_bar_s
    return (x_t - (beta_s**0.5).to(x_t.dtype) * eps_hat) / (alpha_bar_s**0.5).to(x_t.dtype)


def ddim_sigma(alpha_bar_s: torch.Tensor, alpha_bar_n: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma = eta sqrt((1 - ab_n) / (1 - ab_s)) sqrt(1 - ab_s / ab_n) (DDIM eq. 16; spec sec. 2)."""
    variance = ((1 - alpha_bar_n) / (1 - alpha_bar_s)) * (1 - alpha_bar_s / alpha_bar_n)
    return eta * variance**0.5


def ddim_update(x0_hat, eps_hat, alpha_bar_n, sigma, noise=None) -> torch.Tensor:
    """x_n = sqrt(ab_n) x0_hat + sqrt(1 - ab_n - sigma^2) eps_hat + sigma z (DDIM eq. 12)."""
    dt = x0_hat.dtype
    x_n = (alpha_bar_n**0.5).to(dt) * x0_hat + ((1 - alpha_bar_n - sigma**2) ** 0.5).to(dt) * eps_hat
    if noise is not None:
        x_n = x_n + sigma.to(dt) * noise
    return x_n


def dynamic_threshold(x0_hat: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample s = the ratio-quantile
    of |x0_hat|, clamped to [1, max_value]; x0_hat is clipped to [-s, s] and divided by s."""
    B = x0_hat.shape[0]
    flat = x0_hat.reshape(B, -1).float().abs()  # (B, D)
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)  # (B,)
    s = s.reshape(B, *([1] * (x0_hat.ndim - 1))).to(x0_hat.dtype)
    return torch.maximum(torch.minimum(x0_hat, s), -s) / s


def epsilon_scale(timestep, scale: float = 1.0, slope: float = 0.0) -> float:
    """Epsilon Scaling factor lambda_t = k t + b (Ning et al. 2024; spec sec. 6), with b = ``scale``
    and k = ``slope`` per training timestep t; the update uses eps_hat / lambda_t."""
    lam = float(scale) + float(slope) * float(timestep)
    if not lam > 0:
        raise ValueError(f"epsilon scale lambda_t = eps_scale + eps_scale_slope * t must be > 0, got {lam} at t={timestep}")
    return lam


# -- the loop -------------------------------------------------------------------------------
def sample_time_shift(
    denoiser: Callable,
    x_T: torch.Tensor,
    scheduler: "TimeShiftScheduler",
    *,
    cond=None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    name: str = "ts-ddim",
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """TS-DDIM / TS-DDPM loop (spec sec. 4 "Loop"), on a scheduler whose timesteps are set.

    denoiser: a `core.denoiser.Denoiser` (``.guided``) or a callable eps(x, t (B,), cond).
    x_T: (B, ...) start noise. Returns (x_0, trace) with trace lists per step: grid ``timestep``,
    and ``ts_mean`` / ``ts_min`` / ``ts_max`` of the timestep the model saw over the batch.
    """
    trace: dict = {"timestep": [], "ts_mean": [], "ts_min": [], "ts_max": []}
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        t_model = scheduler.model_timesteps(x, t)  # (B,) int64
        if hasattr(denoiser, "guided"):
            eps_hat = denoiser.guided(x, t_model, cond, guidance_scale)
        else:
            eps_hat = denoiser(x, t_model, cond)
        check_finite(eps_hat, name, i)
        out = scheduler.step(eps_hat, t, x, generator=generator, model_timesteps=t_model)
        x = out.prev_sample
        shown = out.target_timesteps if scheduler.config.variant == "reference_pnm" else t_model
        shown = shown.double()
        trace["timestep"].append(int(t))
        trace["ts_mean"].append(float(shown.mean()))
        trace["ts_min"].append(int(shown.min()))
        trace["ts_max"].append(int(shown.max()))
        if on_step is not None:
            on_step(1)
    return x, trace


# -- diffusers scheduler face ---------------------------------------------------------------
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402


@dataclass
class TimeShiftSchedulerOutput(BaseOutput):
    """prev_sample: x at the next grid time; pred_original_sample: x0_hat; model_timesteps: (B,)
    time the model output refers to; target_timesteps: (B,) time of prev_sample's noise level
    (-1 past the end; differs from the grid only for ``reference_pnm``)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    model_timesteps: torch.Tensor | None = None
    target_timesteps: torch.Tensor | None = None


class TimeShiftScheduler(SchedulerMixin, ConfigMixin):
    """DDIM (eta = 0) / DDPM-like (eta = 1) with per-sample shifted time steps (arXiv 2305.15583).

    Keeps the DDIMScheduler config keys, grid and alpha_bar tables (an internal DDIMScheduler
    builds them), plus ``window_size`` / ``cutoff`` (None: per-step defaults of spec sec. 3, fixed
    at ``set_timesteps``), ``variant`` ("paper" | "reference_pnm"), ``eta`` (used when ``step`` is
    not given one) and ``enabled``. ``window_size < 2``, ``cutoff >= timesteps[0]`` or
    ``enabled=False`` give DDIM exactly.

    Extra method: ``model_timesteps(sample, t)`` -> LongTensor[B], the timestep to give the model
    for this sample (paper variant: shifted; reference_pnm: the grid t). ``step`` recomputes it
    from the same ``sample`` (no hidden state); pass ``model_timesteps=`` to have it checked.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["TimeShiftScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        window_size: int | None = None,
        cutoff: int | None = None,
        variant: str = DEFAULT_VARIANT,
        eta: float = 0.0,
        enabled: bool = True,
    ):
        from diffusers import DDIMScheduler

        check_params(window_size, cutoff, variant, eta)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        base = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._base = base
        self.betas = base.betas
        self.alphas = base.alphas
        self.alphas_cumprod = base.alphas_cumprod  # (T,) float32, as DDIMScheduler
        self.final_alpha_cumprod = base.final_alpha_cumprod
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = base.timesteps
        self._custom_timesteps = False
        self._tables: dict = {}
        self._memo = None
        self._grid: tuple = ()
        self.window_size_eff: int | None = None
        self.cutoff_eff: int | None = None

    # -- grid --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list | None = None):
        """DDIM grid for N steps (DDIMScheduler.set_timesteps), or a strictly descending custom list
        in [0, T-1]; fixes the effective window / cutoff for this N."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(list(timesteps), dtype=np.int64)
            if ts.ndim != 1 or ts.size < 1 or (np.diff(ts) >= 0).any() or ts.min() < 0 or ts.max() > T - 1:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T - 1}], got {list(timesteps)}")
            self.timesteps = torch.from_numpy(ts).to(device)
            self.num_inference_steps = int(ts.size)
            self._custom_timesteps = True
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps!r}")
            self._base.set_timesteps(int(num_inference_steps), device=device)
            self.timesteps = self._base.timesteps
            self.num_inference_steps = int(num_inference_steps)
            self._custom_timesteps = False
        self._grid = tuple(int(t) for t in self.timesteps.tolist())
        self._memo = None
        w_def, c_def = default_window_cutoff(self.num_inference_steps, T)
        self.window_size_eff = w_def if self.config.window_size is None else int(self.config.window_size)
        self.cutoff_eff = c_def if self.config.cutoff is None else int(self.config.cutoff)

    def _check_ready(self):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before model_timesteps/step")

    def _prev_timestep(self, timestep: int) -> int:
        """Next grid time n = tau_{k+1} (DDIM's t - T // N rule on the standard grids; -1 at the end)."""
        if self._custom_timesteps:
            k = self._grid.index(timestep)
            return self._grid[k + 1] if k + 1 < len(self._grid) else -1
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    @property
    def shifting(self) -> bool:
        """False when the configuration reproduces DDIM exactly (spec sec. 4 "Config")."""
        self._check_ready()
        return bool(self.config.enabled) and self.window_size_eff >= 2 and self.cutoff_eff < self._grid[0]

    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar float32 with the final value appended at index T, 1 - alpha_bar float64) on device."""
        key = str(device)
        if key not in self._tables:
            ab = torch.cat([self.alphas_cumprod, self.final_alpha_cumprod.reshape(1).to(self.alphas_cumprod.dtype)])
            self._tables[key] = (ab.to(device), (1 - self.alphas_cumprod.double()).to(device))
        return self._tables[key]

    def _timestep_int(self, timestep) -> int:
        t = torch.as_tensor(timestep)
        if t.numel() != 1:
            t = t.reshape(-1)
            if not (t == t[0]).all():
                raise ValueError("timestep must be the scheduler's (scalar) grid time, not per-sample values")
            t = t[0]
        t = int(t.item())
        if t not in self._grid:
            raise ValueError(f"timestep {t} is not on the grid set by set_timesteps: {list(self._grid)}")
        return t

    def _shift_from(self, sample: torch.Tensor, centre: int) -> torch.Tensor:
        # t_s is a pure function of (sample, centre); the one-entry memo only skips recomputing it
        # in `step` for the very tensor `model_timesteps` just saw (same object, unmodified).
        key = (id(sample), sample._version, sample.data_ptr(), centre, self.window_size_eff)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1].clone()
        _, one_minus_ab = self._table(sample.device)
        t_s = select_shift(sample_variance(sample), one_minus_ab, centre, self.window_size_eff)
        self._memo = (key, t_s)
        return t_s.clone()

    # -- the TS hook -------------------------------------------------------------------------
    def model_timesteps(self, sample: torch.Tensor, timestep, step_index: int | None = None) -> torch.Tensor:
        """(B,) int64 timestep to evaluate the model at for each row of ``sample`` (x at grid time t).

        paper: select(sample, centre t) at every step but the first while t > cutoff, else t.
        reference_pnm (and no-shift configurations): t. ``step_index`` is accepted for the
        spec's signature and only checked against the grid.
        """
        self._check_ready()
        t = self._timestep_int(timestep)
        if step_index is not None and self._grid[step_index] != t:
            raise ValueError(f"step_index {step_index} is grid time {self._grid[step_index]}, not {t}")
        B = sample.shape[0]
        first = t == self._grid[0]
        if self.config.variant == "paper" and self.shifting and not first and t > self.cutoff_eff:
            return self._shift_from(sample, t)
        return torch.full((B,), t, dtype=torch.long, device=sample.device)

    def target_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) int64 time of the step's target noise level (-1: alpha_bar = final value).
        reference_pnm: select(sample, centre n) when n > cutoff (not on the first step); else n."""
        self._check_ready()
        t = self._timestep_int(timestep)
        n = self._prev_timestep(t)
        first = t == self._grid[0]
        if self.config.variant == "reference_pnm" and self.shifting and not first and n > self.cutoff_eff:
            return self._shift_from(sample, n)
        return torch.full((sample.shape[0],), max(n, -1), dtype=torch.long, device=sample.device)

    # -- diffusers contract ------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        model_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One TS-DDIM update from grid time ``timestep`` to the next grid time (spec sec. 2,
        "Strided form"). model_output: the model's prediction (config prediction_type) at
        ``model_timesteps(sample, timestep)``; sample: (B, ...) x at the grid time."""
        self._check_ready()
        eta = self.config.eta if eta is None else eta
        check_params(None, None, self.config.variant, eta)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
        t_model = self.model_timesteps(sample, timestep)  # (B,) recomputed: no hidden state
        if model_timesteps is not None and not torch.equal(torch.as_tensor(model_timesteps, device=t_model.device).long().reshape(-1).expand_as(t_model), t_model):
            raise ValueError("model_timesteps differs from model_timesteps(sample, timestep): pass the sample the model saw")
        t_target = self.target_timesteps(sample, timestep)  # (B,), -1 = final
        ab_table, _ = self._table(sample.device)
        shape = (sample.shape[0],) + (1,) * (sample.ndim - 1)
        alpha_bar_s = ab_table[t_model].reshape(shape)  # (B, 1, ...) float32
        alpha_bar_n = ab_table[torch.where(t_target < 0, len(self.alphas_cumprod), t_target)].reshape(shape)

        eps_hat = model_output
        if self.config.prediction_type != "epsilon":
            eps_hat = to_eps(model_output, sample, alpha_bar_s.reshape(-1).double(), self.config.prediction_type)
        x0_hat = predict_x0(sample, eps_hat, alpha_bar_s)
        if self.config.thresholding:
            x0_hat = dynamic_threshold(x0_hat, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0_hat = x0_hat.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:
            # eps re-derived from the clipped x0_hat (GLIDE; DDIMScheduler's option)
            eps_hat = (sample - (alpha_bar_s**0.5).to(sample.dtype) * x0_hat) / ((1 - alpha_bar_s) ** 0.5).to(sample.dtype)
        sigma = ddim_sigma(alpha_bar_s, alpha_bar_n, eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = ddim_update(x0_hat, eps_hat, alpha_bar_n, sigma, noise)
        if not return_dict:
            return (prev_sample, x0_hat, t_model, t_target)
        return TimeShiftSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat,
                                        model_timesteps=t_model, target_timesteps=t_target)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, per-sample t, on the sample's device."""
        ab = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        t = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = ab[t].reshape(shape)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0 (Salimans & Ho 2022)."""
        ab = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        t = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        a = ab[t].reshape((-1,) + (1,) * (sample.ndim - 1))
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# -- registry ---------------------------------------------------------------------------------
def make_time_shift_scheduler(train_config: dict, **overrides) -> TimeShiftScheduler:
    """TimeShiftScheduler on a model's training schedule, eps parameterisation (the Denoiser
    converts other prediction types first; one convention inside)."""
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg["prediction_type"] = "epsilon"
    cfg.update(overrides)
    return TimeShiftScheduler.from_config(cfg)


def _sample_ts(eta_fixed: float | None):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        from .baseline import check_steps

        steps = opts["steps"]
        check_steps(steps, model.scheduler_config)
        eta = eta_fixed if eta_fixed is not None else opts.get("eta", 0.0)
        sched = make_time_shift_scheduler(model.scheduler_config, window_size=opts.get("window"),
                                          cutoff=opts.get("cutoff"), variant=opts["variant"], eta=float(eta))
        sched.set_timesteps(steps, device=ctx.device)
        den = model.denoiser()
        gens = ctx.generators(seeds)
        x_T = ctx.randn(gens, model.event_shape) * sched.init_noise_sigma
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        x, trace = sample_time_shift(den, x_T, sched, cond=cond, guidance_scale=opts.get("guidance_scale", 1.0),
                                     generator=gens, name=ctx.sampler, on_step=ctx.step_done)
        # lists, so that run.json keeps one entry per batch (numbers would be summed over batches)
        stats = {"nfe": den.calls, "model_rows": den.rows,
                 "ts_window_cutoff": [sched.window_size_eff, sched.cutoff_eff], **trace}
        return SampleBatch(x=x, stats=stats)

    return fn


_TS_OPTIONS = (
    Option("window", int, None, "TS window size w (h = w//2; < 2 disables); default per step count (spec table)", min=0),
    Option("cutoff", int, None, "TS cutoff t_c: shift only while t > t_c; default 200 at <= 10 steps else 300", min=0),
    Option("variant", VARIANTS, DEFAULT_VARIANT, "TS selection rule: paper (Algorithm 3) or reference_pnm (published code)"),
)

register(SamplerSpec(
    name="ts-ddim",
    description="Time-Shift DDIM (Li et al. 2024, arXiv 2305.15583): per-sample shifted model time",
    fn=_sample_ts(None),
    default_model="digits-ddpm",
    default_steps=10,
    options=_TS_OPTIONS + (Option("eta", float, 0.0, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)", min=0.0),),
))
register(SamplerSpec(
    name="ts-ddpm",
    description="Time-Shift DDPM (DDIM with eta = 1; Li et al. 2024, arXiv 2305.15583)",
    fn=_sample_ts(1.0),
    default_model="digits-ddpm",
    default_steps=10,
    options=_TS_OPTIONS,
))
