"""Time-Shift sampler (TS-DDIM / TS-DDPM): Li et al., "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024, arXiv 2305.15583 (docs/time_shift.md).

Exposure bias: the sampled x_t is not distributed as q(x_t). Per sample, TS evaluates the network
at the time t_s in a window around the nominal t whose noise level best matches the sample's own
variance (the paper's Algorithm 3, "Time-Shift Sampler"), and stops shifting below a cutoff t_c.

| code name           | paper symbol / meaning                                    |
|---------------------|-----------------------------------------------------------|
| ``var_hat``         | var(x_t) of Algorithm 3: unbiased variance over C*H*W of sample b |
| ``reference``       | the variance a sample at time tau should have: 1 - alpha_bar_tau (paper), or (1 - alpha_bar_tau) + alpha_bar_tau Var_data (``data_var``) |
| ``window_size``     | w; half-width h = floor(w / 2)                            |
| ``cutoff``          | t_c (shift only while the time is > t_c)                  |
| ``grid[k]``         | tau_k, the nominal grid time of step k                    |
| ``t_model``         | t_s,b, the shifted time (LongTensor[B]); "shifted", never "next" |
| ``t_target``        | tau_{k+1}, the step's target time (-1: alpha_bar = final value) |
| ``eta``             | DDIM eta (0: DDIM, 1: DDPM-like)                          |

Algorithm 3's selection is `time_shift_times`; the DDIM update (Song et al. 2021, eq. 12) taken
"with that time" is the shared one of ``core.ddim`` (`predict_x0` here only fixes diffusers'
float32 coefficient order). The scheduler is a shell around the two.

Two selection rules (``variant``; docs/time_shift.md "Two rules"):
- ``"paper"`` (Algorithm 3, strided grid): at step k >= 1 with tau_k > t_c the model is evaluated
  at t_s = select(x, window around tau_k); x0_hat, sigma and the update use alpha_bar_{t_s}; the
  next step starts on the grid time tau_{k+1}.
- ``"reference_pnm"`` (the rule of the published TS-DPM PNMSolver code, behind the paper's tables):
  the model stays at tau_k; the *target* of the step is replaced by select(x, window around
  tau_{k+1}) when tau_{k+1} > t_c; the next step again starts on the grid.

Data-aware statistic (``data_var``, ours; docs/time_shift.md "Data-aware statistic"): for
x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, E[var_hat(x_t)] = (1 - ab_t) + ab_t E[var_hat(x0)]. The
paper's reference drops the second term, which is why it needs a cutoff and why on latents (whose
variance is ~1) it always picks the noisiest window edge. With ``data_var`` = E[var_hat(x0)] the
reference is exact for every t, so an exact sampler is never shifted.

The `gensample run` glue (options, batch function, registration) is in ``gensample.runs.time_shift``.

Epsilon scaling (Ning et al., ICLR 2024, arXiv 2308.15321) is the baseline: the ``ddim``
sampler's ``--eps-scale`` (`baseline.epsilon_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core.ddim import ddim_sigma, ddim_update, eps_from_x0, q_sample, timestep_grid, v_from_eps, x0_from_eps
from ..core.denoiser import check_finite
from ..core.param import PREDICTION_TYPES, to_eps

VARIANTS = ("paper", "reference_pnm")
# Chosen by measurement on digits-ddpm (docs/time_shift.md "Measured").
DEFAULT_VARIANT = "paper"
# Defaults for T = 1000 (the paper's Fig. 7 settings, docs/time_shift.md "Defaults"):
# steps -> window w; t_c = 300, or 200 at <= 10 steps.
DEFAULT_WINDOWS = {5: 40, 10: 40, 20: 30, 50: 8, 100: 2}


# -- parameters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeShiftParams:
    """Resolved TS parameters. window_size w >= 0 (w < 2: no shift), cutoff t_c >= 0,
    data_var: None (the paper's statistic) or Var_data in [0, 1) (data-aware statistic)."""

    window_size: int
    cutoff: int
    variant: str = DEFAULT_VARIANT
    eta: float = 0.0
    enabled: bool = True
    data_var: float | None = None

    def __post_init__(self):
        check_params(self.window_size, self.cutoff, self.variant, self.eta, self.data_var)


def check_params(window_size, cutoff, variant, eta, data_var=None) -> None:
    """Validate user-facing TS parameters (None window/cutoff = per-step default)."""
    for name, val in (("window_size", window_size), ("cutoff", cutoff)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0):
            raise ValueError(f"{name} must be an integer >= 0 or None, got {val!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if data_var is not None:
        if isinstance(data_var, bool) or not isinstance(data_var, (int, float)) or not 0.0 <= data_var < 1.0:
            raise ValueError(f"data_var must be None or a number in [0, 1) (for Var_data >= 1 the reference "
                             f"variance (1 - ab) + ab Var_data no longer grows with t, so it cannot locate a time), "
                             f"got {data_var!r}")


def default_window_cutoff(num_inference_steps: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """Defaults of docs/time_shift.md "Defaults", scaled by T / 1000: the table entry with the
    largest step count <= num_inference_steps (5 below 5 steps); t_c = 200 at <= 10 steps, else 300."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    keys = sorted(DEFAULT_WINDOWS)
    key = max([k for k in keys if k <= num_inference_steps], default=keys[0])
    scale = num_train_timesteps / 1000.0
    cutoff = 200 if num_inference_steps <= 10 else 300
    return int(round(DEFAULT_WINDOWS[key] * scale)), int(round(cutoff * scale))


def check_window_stride(grid: Sequence[int], window_size: int, eta: float) -> None:
    """With eta > 0 a shifted time must stay strictly between the step's two grid times, else
    sigma^2 = eta^2 (1 - ab_target)/(1 - ab_model) (1 - ab_model/ab_target) is negative (NaN): require
    h = w // 2 < the smallest grid stride, i.e. window_size in [0, 2 * stride - 1]."""
    if eta <= 0 or window_size < 2 or len(grid) < 2:
        return
    stride = int(min(a - b for a, b in zip(grid[:-1], grid[1:])))
    if window_size // 2 >= stride:
        raise ValueError(f"window_size {window_size} (half-width {window_size // 2}) must be in [0, {2 * stride - 1}] "
                         f"with eta = {eta} > 0: the half-width must stay below the grid stride {stride} (more steps "
                         f"shrink the stride); use a smaller window or eta = 0")


# -- pure math ------------------------------------------------------------------------------
def sample_variance(x: torch.Tensor) -> torch.Tensor:
    """var(x_t) of Algorithm 3 per sample: unbiased variance (divide by D - 1) of the sample's
    entries, centred on its own mean. x: (B, ...) with D >= 2 entries per sample. (B,) float64."""
    if x.ndim < 2 or x[0].numel() < 2:
        raise ValueError(f"sample must have shape (B, ...) with >= 2 entries per sample, got {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1).double()  # (B, D)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return (centred * centred).sum(dim=1) / (flat.shape[1] - 1)  # (B,); two-pass, 3x faster than .var


def reference_variance(alphas_cumprod: torch.Tensor, data_var: float | None = None) -> torch.Tensor:
    """E[var_hat(x_tau)] for every tau: 1 - alpha_bar_tau (Algorithm 3) or, with Var_data given,
    (1 - alpha_bar_tau) + alpha_bar_tau Var_data (docs/time_shift.md "Data-aware statistic").
    alphas_cumprod: (T,). Returns (T,) float64."""
    ab = alphas_cumprod.double()
    return 1 - ab if data_var is None else (1 - ab) + ab * float(data_var)


def window_candidates(centre: int, window_size: int, num_train_timesteps: int, device=None) -> torch.Tensor:
    """[t - w/2, t + w/2] of Algorithm 3, clipped to [0, T-1], ascending. (W,) int64."""
    h = int(window_size) // 2
    lo, hi = max(0, int(centre) - h), min(num_train_timesteps - 1, int(centre) + h)
    return torch.arange(lo, hi + 1, dtype=torch.long, device=device)  # (W,)


def select_shift(var_hat: torch.Tensor, reference: torch.Tensor, centre: int, window_size: int) -> torch.Tensor:
    """t_s,b = argmin_{tau in [c - w/2, c + w/2]} (var_hat_b - reference_tau)^2 (Algorithm 3),
    ties to the smallest tau. var_hat: (B,) float64; reference: (T,) float64, e.g.
    1 - alpha_bar. Returns (B,) int64 inside the window; each row depends only on its own var_hat."""
    T = reference.numel()
    cand = window_candidates(centre, window_size, T, device=var_hat.device)  # (W,)
    dist = (var_hat.double()[:, None] - reference.double().to(var_hat.device)[cand][None, :]) ** 2  # (B, W)
    # argmin returns the first minimum; cand is ascending, so ties go to the smallest tau.
    return cand[dist.argmin(dim=1)]  # (B,)


def time_shift_times(x: torch.Tensor, k: int, grid: Sequence[int], reference: torch.Tensor, window_size: int,
                     cutoff: int, variant: str = DEFAULT_VARIANT, enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3 of Li et al. (2024) on a strided grid: the times step k uses.

        t_s <- -1                                     (so the first step, k = 0, is never shifted)
        for k, tau_k in grid:
            model time  = t_s if shifted else tau_k
            x_{k+1}     = DDIM step from x_k "with that time" to tau_{k+1}   (time_shift_update)
            t_s         = argmin_{tau in [tau_k - w/2, tau_k + w/2]} |var(x) - reference_tau|
                          if tau_k > t_c else -1

    The selection for step k reads the state x = x_k it is about to update (the strided form of
    "var(x_{t-1})"). ``reference_pnm`` keeps the model at tau_k and moves the *target*
    tau_{k+1} instead (window around tau_{k+1}, when tau_{k+1} > t_c).

    x: (B, ...) state at grid time grid[k]; grid: descending ints; reference: (T,) float64
    (`reference_variance`). Returns (t_model, t_target), each (B,) int64; t_target -1 means
    "past the end" (alpha_bar = the final value). No shift when ``enabled`` is False, w < 2 or
    t_c >= grid[0].
    """
    B, dev = x.shape[0], x.device
    t = int(grid[k])
    n = int(grid[k + 1]) if k + 1 < len(grid) else -1
    t_model = torch.full((B,), t, dtype=torch.long, device=dev)
    t_target = torch.full((B,), n, dtype=torch.long, device=dev)
    active = enabled and window_size >= 2 and cutoff < int(grid[0]) and k >= 1
    if active and variant == "paper" and t > cutoff:
        t_model = select_shift(sample_variance(x), reference, t, window_size)
    elif active and variant == "reference_pnm" and n > cutoff:
        t_target = select_shift(sample_variance(x), reference, n, window_size)
    return t_model, t_target


def predict_x0(x_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar_model: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab) at the model's (shifted) time (DDIM, Song et al.
    2021, eq. 12; ``core.ddim.x0_from_eps``). alpha_bar_model broadcasts against x_t ((B, 1, ...) or
    scalar); the coefficients are cast to x_t's dtype as diffusers' DDIMScheduler does, so equal
    inputs give bit-equal outputs."""
    return x0_from_eps(x_t, eps_hat, alpha_bar_model, coef_dtype=x_t.dtype)


def dynamic_threshold(x0_hat: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample s = the ratio-quantile
    of |x0_hat|, clamped to [1, max_value]; x0_hat is clipped to [-s, s] and divided by s."""
    B = x0_hat.shape[0]
    flat = x0_hat.reshape(B, -1).float().abs()  # (B, D)
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)  # (B,)
    s = s.reshape(B, *([1] * (x0_hat.ndim - 1))).to(x0_hat.dtype)
    return torch.maximum(torch.minimum(x0_hat, s), -s) / s


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
    """TS-DDIM / TS-DDPM loop (Algorithm 3) on a scheduler whose timesteps are set; the scheduler
    only holds the grid and the alpha_bar tables (its math is `time_shift_times` / the DDIM update).

    denoiser: a `core.denoiser.Denoiser` (``.guided``) or a callable eps(x, t (B,), cond).
    x_T: (B, ...) start noise. Returns (x_0, trace) with trace lists per step: grid ``timestep``,
    and ``ts_mean`` / ``ts_min`` / ``ts_max`` of the shifted time over the batch (the model time
    for ``paper``, the target time for ``reference_pnm``).
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


def estimate_data_var(denoiser: Callable, x_T: torch.Tensor, train_config: dict, steps: int = 50, cond=None) -> float:
    """Var_data = E[var_hat(x0)] estimated once from the model: the batch mean of var_hat over
    DDIM samples (``steps`` steps, no shift, conditioning ``cond``) drawn from ``x_T`` (B, ...).
    The estimate carries the model's own error; pass a value measured on the data when known."""
    sched = make_time_shift_scheduler(train_config, enabled=False)
    sched.set_timesteps(min(int(steps), int(sched.config.num_train_timesteps)), device=x_T.device)
    x, _ = sample_time_shift(denoiser, x_T, sched, cond=cond, name="ts-data-var")
    return float(sample_variance(x).mean())


# -- diffusers scheduler face ---------------------------------------------------------------
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
    builds them), plus ``window_size`` / ``cutoff`` (None: per-step defaults, fixed at
    ``set_timesteps``), ``variant`` ("paper" | "reference_pnm"), ``eta`` (used when ``step`` is
    not given one), ``enabled`` and ``data_var`` (None: the paper's statistic; a number in
    [0, 1): the data-aware one). ``window_size < 2``, ``cutoff >= timesteps[0]`` or
    ``enabled=False`` give DDIM exactly. ``clip_sample`` defaults to False (SD latents must not
    be clamped); ``from_config`` takes it from the source config when it has the key.

    The paper variant changes the time the *model* is called with, which a stock pipeline cannot
    know. ``model_timesteps(sample, t)`` -> LongTensor[B] gives that time (Algorithm 3, a pure
    function of (sample, t)) and hands it over to the next ``step`` at t; ``step`` recomputes it
    from the sample it updates and raises when the handed times disagree, or when the
    configuration shifts at t but no time was handed (a stock pipeline after
    ``pipe.scheduler = TimeShiftScheduler.from_config(...)``: call
    ``gensample.pipelines.time_shift.enable_time_shift(pipe)`` instead). ``reference_pnm`` needs
    no hand-over: the model stays at the grid time.
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
        clip_sample: bool = False,
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
        data_var: float | None = None,
    ):
        check_params(window_size, cutoff, variant, eta, data_var)
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
        self._grid: tuple = ()
        self._handed: dict = {}  # grid time -> (B,) model times handed over by model_timesteps
        self.window_size_eff: int | None = None
        self.cutoff_eff: int | None = None
        # alpha_bar with the final value appended at index T (float32) and the reference variance
        self._ab_table = torch.cat([self.alphas_cumprod, self.final_alpha_cumprod.reshape(1).to(self.alphas_cumprod.dtype)])
        self._reference = reference_variance(self.alphas_cumprod, data_var)

    # -- grid --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list | None = None):
        """DDIM grid for N steps (``core.ddim.timestep_grid``, as DDIMScheduler.set_timesteps), or a strictly descending custom list
        in [0, T-1]; fixes the effective window / cutoff for this N. Each step goes to the next
        grid entry (for every ``timestep_spacing``)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(list(timesteps), dtype=np.int64)
            if ts.ndim != 1 or ts.size < 1 or (np.diff(ts) >= 0).any() or ts.min() < 0 or ts.max() > T - 1:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T - 1}], got {list(timesteps)}")
            self.timesteps = torch.from_numpy(ts).to(device)
            self.num_inference_steps = int(ts.size)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps!r}")
            self.timesteps = timestep_grid(T, int(num_inference_steps), self.config.timestep_spacing,
                                           self.config.steps_offset).to(device)
            self.num_inference_steps = int(num_inference_steps)
        self._grid = tuple(int(t) for t in self.timesteps.tolist())
        self._handed = {}
        w_def, c_def = default_window_cutoff(self.num_inference_steps, T)
        if float(self.config.eta) > 0 and len(self._grid) > 1:  # keep the default inside check_window_stride's range
            w_def = min(w_def, 2 * min(a - b for a, b in zip(self._grid[:-1], self._grid[1:])) - 1)
        self.window_size_eff = w_def if self.config.window_size is None else int(self.config.window_size)
        self.cutoff_eff = c_def if self.config.cutoff is None else int(self.config.cutoff)
        if self.shifting:
            check_window_stride(self._grid, self.window_size_eff, float(self.config.eta))

    def _check_ready(self):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before model_timesteps/step")

    @property
    def shifting(self) -> bool:
        """False when the configuration reproduces DDIM exactly (docs/time_shift.md "Identities")."""
        self._check_ready()
        return bool(self.config.enabled) and self.window_size_eff >= 2 and self.cutoff_eff < self._grid[0]

    def _step_index_of(self, timestep) -> int:
        t = torch.as_tensor(timestep)
        if t.numel() != 1:
            t = t.reshape(-1)
            if not (t == t[0]).all():
                raise ValueError("timestep must be the scheduler's (scalar) grid time, not per-sample values")
            t = t[0]
        t = int(t.item())
        if t not in self._grid:
            raise ValueError(f"timestep {t} is not on the grid set by set_timesteps: {list(self._grid)}")
        return self._grid.index(t)

    def _times(self, sample: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return time_shift_times(sample, k, self._grid, self._reference, self.window_size_eff, self.cutoff_eff,
                                self.config.variant, bool(self.config.enabled))

    # -- the TS hook -------------------------------------------------------------------------
    def model_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) int64 time to evaluate the model at for each row of ``sample`` (x at grid time t),
        by Algorithm 3 (`time_shift_times`); handed over to the next ``step`` at this t."""
        self._check_ready()
        t_model, _ = self._times(sample, self._step_index_of(timestep))
        self._handed[self._grid[self._step_index_of(timestep)]] = t_model
        return t_model

    def target_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) int64 time of the step's target noise level (-1: alpha_bar = final value)."""
        self._check_ready()
        return self._times(sample, self._step_index_of(timestep))[1]

    # -- diffusers contract ------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _resolve_model_times(self, t: int, t_model: torch.Tensor, handed) -> None:
        """Check that the model saw the time the update uses (raises otherwise)."""
        B = t_model.shape[0]
        if handed is None:
            if (t_model != t).any():
                raise ValueError(
                    f"Time-Shift evaluates the model at shifted times (e.g. {t_model[t_model != t][0].item()} instead "
                    f"of grid time {t}), but no model time was handed to step(): the model was evaluated at the grid "
                    f"time. In a stock diffusers pipeline call gensample.pipelines.time_shift.enable_time_shift(pipe) "
                    f"instead of assigning the scheduler; in your own loop call "
                    f"t_s = scheduler.model_timesteps(sample, t) and feed t_s to the model.")
            return
        handed = torch.as_tensor(handed, device=t_model.device).long().reshape(-1)
        if handed.numel() == 1:
            handed = handed.expand(B)
        elif handed.numel() != B and handed.numel() % B == 0:
            chunks = handed.reshape(-1, B)  # a CFG-style batch of copies [x; x; ...]
            if not (chunks == chunks[0]).all():
                raise ValueError(f"model_timesteps has {handed.numel()} rows whose {B}-row chunks differ")
            handed = chunks[0]
        if handed.shape != t_model.shape or not torch.equal(handed, t_model):
            raise ValueError("model_timesteps differs from model_timesteps(sample, timestep): the model saw other times "
                             "than the update would use (pass the sample the model saw; for pipelines that "
                             "concatenate extra channels, select on the latent channels only)")

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        model_timesteps: torch.Tensor | None = None,
    ):
        """One TS-DDIM update from grid time ``timestep`` to the next grid time (Algorithm 3 with
        the DDIM update, eq. 12 of Song et al.). model_output: the model's prediction (config
        prediction_type) at ``model_timesteps(sample, timestep)``; sample: (B, ...) x at the grid
        time. ``return_dict=False`` gives diffusers' ``(prev_sample, pred_original_sample)``; the
        model / target times are in the output dataclass."""
        self._check_ready()
        eta = self.config.eta if eta is None else eta
        check_params(None, None, self.config.variant, eta)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
        k = self._step_index_of(timestep)
        t = self._grid[k]
        if self.shifting:
            check_window_stride(self._grid, self.window_size_eff, float(eta))
        t_model, t_target = self._times(sample, k)  # recomputed from the sample being updated
        handed = model_timesteps if model_timesteps is not None else self._handed.get(t)
        self._handed.pop(t, None)
        self._resolve_model_times(t, t_model, handed)
        shape = (sample.shape[0],) + (1,) * (sample.ndim - 1)
        ab_table = self._ab_table.to(sample.device)
        alpha_bar_model = ab_table[t_model].reshape(shape)  # (B, 1, ...) float32
        alpha_bar_target = ab_table[torch.where(t_target < 0, len(self.alphas_cumprod), t_target)].reshape(shape)

        eps_hat = model_output
        if self.config.prediction_type != "epsilon":
            eps_hat = to_eps(model_output, sample, alpha_bar_model.reshape(-1).double(), self.config.prediction_type)
        x0_hat = predict_x0(sample, eps_hat, alpha_bar_model)
        if self.config.thresholding:
            x0_hat = dynamic_threshold(x0_hat, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0_hat = x0_hat.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:
            # eps re-derived from the clipped x0_hat (GLIDE; DDIMScheduler's option)
            eps_hat = eps_from_x0(sample, x0_hat, alpha_bar_model, coef_dtype=sample.dtype)
        sigma = ddim_sigma(alpha_bar_model, alpha_bar_target, eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = ddim_update(x0_hat, eps_hat, alpha_bar_target, sigma, noise, coef_dtype=x0_hat.dtype)
        if not torch.isfinite(prev_sample).all():
            raise FloatingPointError(f"TimeShiftScheduler.step: non-finite values (NaN/Inf) at grid time {t} "
                                     f"(model times {sorted(set(t_model.tolist()))[:4]}..., eta {eta})")
        if not return_dict:
            return (prev_sample, x0_hat)
        return TimeShiftSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat,
                                        model_timesteps=t_model, target_timesteps=t_target)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, per-sample t, on the sample's device."""
        ab = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        t = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = ab[t].reshape(shape)
        return q_sample(original_samples, noise, a)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0 (Salimans & Ho 2022)."""
        ab = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        t = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        a = ab[t].reshape((-1,) + (1,) * (sample.ndim - 1))
        return v_from_eps(sample, noise, a)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# -- factory --------------------------------------------------------------------------------
def make_time_shift_scheduler(train_config: dict, **overrides) -> TimeShiftScheduler:
    """TimeShiftScheduler on a model's training schedule, eps parameterisation (the Denoiser
    converts other prediction types first; one convention inside)."""
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg["prediction_type"] = "epsilon"
    cfg.update(overrides)
    return TimeShiftScheduler.from_config(cfg)
