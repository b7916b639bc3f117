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
float32 coefficient order). The scheduler is a shell around the two: the diffusers face,
``TimeShiftScheduler`` (with its factory ``make_time_shift_scheduler`` and ``estimate_data_var``),
is in ``gensample.schedulers.time_shift``; nothing here imports it.

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
reference is exact for every t, so an exact sampler is never shifted. The reference is
1 - ab_t (1 - Var_data): increasing in t for Var_data < 1, decreasing for Var_data > 1 (still
one-to-one, so it still locates a time), flat only at Var_data = 1 (refused).

The `gensample run` glue (options, batch function, registration) is in ``gensample.runs.time_shift``.

Epsilon scaling (Ning et al., ICLR 2024, arXiv 2308.15321) is the baseline: the ``ddim``
sampler's ``--eps-scale`` (`baseline.epsilon_scale`).
"""

from __future__ import annotations

from types import SimpleNamespace

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .. import _moved
from ..core.ddim import x0_from_eps
from ..core.denoiser import check_finite

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
    data_var: None (the paper's statistic) or Var_data >= 0, != 1 (data-aware statistic)."""

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
        if (isinstance(data_var, bool) or not isinstance(data_var, (int, float)) or not np.isfinite(data_var)
                or data_var < 0 or data_var == 1.0):
            raise ValueError(f"data_var must be None or a finite number >= 0 other than 1, got {data_var!r}: the "
                             f"reference variance 1 - ab (1 - Var_data) rises with t for Var_data < 1, falls with t "
                             f"for Var_data > 1, and is the constant 1 at Var_data = 1, where it cannot locate a time "
                             f"(every candidate ties and the smallest would be chosen)")


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
    (1 - alpha_bar_tau) + alpha_bar_tau Var_data = 1 - alpha_bar_tau (1 - Var_data)
    (docs/time_shift.md "Data-aware statistic"). alpha_bar falls with tau, so the reference rises
    with tau for Var_data < 1 and falls with tau for Var_data > 1 (constant at Var_data = 1, refused
    by ``check_params``); ``select_shift`` is a nearest-value search and works either way.
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


# -- flow-matching models (docs/flow_matching.md "Time-Shift on flows") ---------------------
def flow_reference_variance(sigma: torch.Tensor, data_var: float | None = None) -> torch.Tensor:
    """E[var_hat(x_sigma)] of a flow state x_sigma = (1 - sigma) x0 + sigma eps: (1 - sigma)^2 Var_data +
    sigma^2 (data-aware), or sigma^2 (the paper's statistic, which drops the data term). It is the VP
    reference (1 - ab) + ab Var_data of the twin times c(sigma)^2. sigma: float64 tensor; same shape out."""
    sigma = sigma.double()
    return sigma**2 if data_var is None else (1 - sigma) ** 2 * float(data_var) + sigma**2


class FlowTimeShift:
    """Time-Shift (Algorithm 3) on a flow model's own sigma grid, stepped in flow space.

    The loop state is x_sigma; the model output is the velocity. Window and cutoff are in model-time
    units (t = sigma T, as the VP sampler's are in training timesteps, so the VP defaults carry over):
    at step k >= 1 with t_k > t_c the model is evaluated at the candidate t_k + j, j in [-h, h]
    (clipped to [0, T]), whose flow reference `flow_reference_variance` is nearest to the sample's
    var_hat. The update is DDIM(eta) on the twin from the chosen sigma_m to the next grid sigma:
    eps_hat = x + (1 - sigma_m) v, x0_hat = x - sigma_m v, then x_s = c(sigma_s) [sqrt(ab_s) x0_hat +
    sqrt(1 - ab_s - s^2) eps_hat + s z]. Only the ``paper`` selection rule; ``enabled=False`` or w < 2
    is the twin DDIM (`samplers.baseline.FlowTwinDDIM`) exactly."""

    takes_velocity = True
    init_noise_sigma = 1.0

    def __init__(self, config: dict, window_size: int | None = None, cutoff: int | None = None, eta: float = 0.0,
                 data_var: float | None = None, enabled: bool = True, variant: str = DEFAULT_VARIANT):
        if variant != "paper":
            raise ValueError(f"variant must be 'paper' on a flow-matching model (the reference_pnm rule moves the step's "
                             f"target off the model's own sigma grid), got {variant!r}")
        check_params(window_size, cutoff, variant, eta, data_var)
        self.config = dict(config)
        self.window_size, self.cutoff, self.eta = window_size, cutoff, float(eta)
        self.data_var, self.enabled = data_var, bool(enabled)
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.timesteps = self.sigmas = None
        self.window_size_eff = self.cutoff_eff = None

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None, base_sigmas=None):
        from ..core.schedule import FlowSchedule

        self._schedule = FlowSchedule(self.config, mu, base_sigmas)
        self.sigmas, ts = self._schedule.sigmas(int(num_inference_steps))
        self.timesteps = ts if device is None else ts.to(device)
        w_def, c_def = default_window_cutoff(int(num_inference_steps), self.num_train_timesteps)
        self.window_size_eff = w_def if self.window_size is None else int(self.window_size)
        self.cutoff_eff = c_def if self.cutoff is None else int(self.cutoff)

    @property
    def shifting(self) -> bool:
        return self.enabled and self.window_size_eff >= 2 and self.cutoff_eff < float(self.timesteps[0])

    def _index(self, timestep) -> int:
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu().float()).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep {float(timestep)} is not on the grid; call set_timesteps first")
        return int(hits[0])

    def model_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) float32 model times of Algorithm 3 at grid time ``timestep`` for the flow state ``sample``."""
        k = self._index(timestep)
        t = float(self.timesteps[k])
        B = sample.shape[0]
        if not (self.shifting and k >= 1 and t > self.cutoff_eff):
            return torch.full((B,), t, dtype=torch.float32, device=sample.device)
        h = self.window_size_eff // 2
        cand = (torch.arange(-h, h + 1, dtype=torch.float64) + t).clamp(0, self.num_train_timesteps)  # (W,)
        cand = torch.unique(cand.float()).double()  # ascending, float32 model times
        sig = torch.where(cand == t, torch.tensor(float(self.sigmas[k]), dtype=torch.float64), cand / self.num_train_timesteps)
        ref = flow_reference_variance(sig, self.data_var)  # (W,)
        dist = (sample_variance(sample).cpu()[:, None] - ref[None, :]) ** 2  # (B, W)
        return cand[dist.argmin(dim=1)].float().to(sample.device)  # ties: the smallest time

    def step(self, model_output, timestep, sample, generator=None, model_timesteps=None, eta: float | None = None,
             return_dict: bool = True):
        from types import SimpleNamespace

        from ..core.flow import eps_x0_from_velocity, twin_ddim_update, twin_scale
        from ..core.noise import normal_like

        eta = self.eta if eta is None else float(eta)
        k = self._index(timestep)
        t_model = self.model_timesteps(sample, timestep) if model_timesteps is None else model_timesteps
        sigma_m = self._schedule.sigma_of(t_model.cpu()).to(sample.device)  # (B,) float64, grid sigma when unshifted
        eps_hat, x0_hat = eps_x0_from_velocity(model_output, sample, sigma_m)
        # drawn in the sample's dtype (as DDIMScheduler and FKC's move draw theirs), used in float64
        noise = normal_like(sample, generator) if eta > 0 else None
        sigma_s = float(self.sigmas[k + 1])
        prev = (twin_ddim_update(x0_hat, eps_hat, sigma_m, sigma_s, eta, noise) * twin_scale(sigma_s)).to(sample.dtype)
        if not return_dict:
            return (prev, x0_hat.to(sample.dtype))
        return SimpleNamespace(prev_sample=prev, pred_original_sample=x0_hat.to(sample.dtype), model_timesteps=t_model,
                               target_timesteps=None)


class TwinFlowTimeShift(FlowTimeShift):
    """``FlowTimeShift`` as the step rule of a loop written on the VP twin (FKC's ``--time-shift`` proposal,
    the inverse loop's ``--time-shift``): the face of ``TimeShiftScheduler`` (eps in, the twin state z =
    x_sigma / c(sigma_t) at grid time t), with the flow rule inside, so a composed sampler shifts exactly as
    ``ts-ddim`` does on the flow (docs/flow_matching.md "Compositions on flows").

    - selection: ``FlowTimeShift.model_timesteps`` on the flow state x_sigma = c(sigma_t) z;
    - evaluation: the network sees the same flow state under the shifted label sigma_m, which in the twin
      coordinates of sigma_m is z_m = z c(sigma_t) / c(sigma_m) (``model_input``; 1 where unshifted). The
      eps (and x0) read off the velocity there are the ones ``FlowTimeShift`` forms, eps = x_sigma +
      (1 - sigma_m) v, x0 = x_sigma - sigma_m v, since eps and x0 do not depend on the coordinates;
    - update: DDIM(eta) (Song et al. 2021, eq. 12) from alpha_bar(sigma_m) to the next grid alpha_bar, with
      x0 = (z_m - sqrt(1 - ab_m) eps) / sqrt(ab_m), or the caller's ``pred_original_sample`` (the x0 of the
      velocity, which a step from sigma_m = 1, alpha_bar = 0, needs). float64 math, the sample's dtype out.

    Mapped back by c(sigma_s), its output is ``FlowTimeShift.step``'s (tests/test_flow_compose.py)."""

    takes_velocity = False

    def _sigma_t(self, timestep) -> float:
        return float(self.sigmas[self._index(timestep)])

    def model_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) float32 model times of Algorithm 3, selected on the flow state c(sigma_t) z."""
        from ..core.flow import twin_to_flow

        return super().model_timesteps(twin_to_flow(sample, self._sigma_t(timestep)), timestep)

    def model_scale(self, sample: torch.Tensor, timestep, model_timesteps: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) float64 c(sigma_t) / c(sigma_m): twin coordinates of grid time -> of the model time."""
        from ..core.flow import twin_scale

        sigma_m = self._schedule.sigma_of(torch.as_tensor(model_timesteps).cpu()).to(sample.device)
        ratio = twin_scale(torch.tensor(self._sigma_t(timestep), dtype=torch.float64)) / twin_scale(sigma_m)
        return ratio.reshape(-1, *([1] * (sample.ndim - 1)))

    def model_input(self, sample: torch.Tensor, timestep, model_timesteps: torch.Tensor) -> torch.Tensor:
        """z_m = z c(sigma_t) / c(sigma_m): the state the network is evaluated at, in the twin coordinates of
        its (shifted) time; z itself where no row is shifted. Differentiable in ``sample``."""
        if bool((torch.as_tensor(model_timesteps).cpu().float() == float(self.timesteps[self._index(timestep)])).all()):
            return sample
        return (sample.double() * self.model_scale(sample, timestep, model_timesteps)).to(sample.dtype)

    def step(self, model_output, timestep, sample, eta: float | None = None, generator=None, return_dict: bool = True,
             model_timesteps=None, pred_original_sample=None):
        from ..core.flow import twin_alpha_bar, twin_ddim_update
        from ..core.noise import normal_like

        eta = self.eta if eta is None else float(eta)
        k = self._index(timestep)
        t_model = self.model_timesteps(sample, timestep) if model_timesteps is None else model_timesteps
        sigma_m = self._schedule.sigma_of(torch.as_tensor(t_model).cpu()).to(sample.device)  # (B,) float64
        eps_hat = model_output.double()
        if pred_original_sample is not None:
            x0_hat = pred_original_sample.double()
        elif bool((sigma_m < 1).all()):
            ab_m = twin_alpha_bar(sigma_m).reshape((-1,) + (1,) * (sample.ndim - 1))
            z_m = sample.double() * self.model_scale(sample, timestep, t_model)
            x0_hat = x0_from_eps(z_m, eps_hat, ab_m)
        else:
            raise ValueError("a step from alpha_bar = 0 (the flow's sigma = 1) needs pred_original_sample: x0 is not a "
                             "function of eps there (use Denoiser.eps_x0)")
        noise = normal_like(sample, generator) if eta > 0 else None  # the sample's dtype, used in float64
        prev = twin_ddim_update(x0_hat, eps_hat, sigma_m, float(self.sigmas[k + 1]), eta, noise).to(sample.dtype)
        if not return_dict:
            return (prev, x0_hat.to(sample.dtype))
        return SimpleNamespace(prev_sample=prev, pred_original_sample=x0_hat.to(sample.dtype), model_timesteps=t_model,
                               target_timesteps=None)


# -- the loop -------------------------------------------------------------------------------
def _zero_snr_start(scheduler, t) -> bool:
    """True when the VP grid's first time has alpha_bar = 0 (a zero-terminal-SNR schedule, trailing grid)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    return table is not None and float(table[int(t)]) == 0.0


def zero_snr_first_step(denoiser, scheduler, x: torch.Tensor, t_model: torch.Tensor, cond, guidance_scale: float,
                        generator, name: str) -> torch.Tensor:
    """The first step of TS-DDIM / TS-DDPM from alpha_bar = 0 (zero terminal SNR, Lin et al. 2023): never shifted
    (Algorithm 3 shifts from the second step on), and x0 is not a function of eps there, so, as a flow's
    step from sigma = 1, x0 and eps are read off the model's own (guided) output (``Denoiser.guided_eps_x0``:
    x0 = -v, eps = x for v-prediction) and the DDIM(eta) update (Song et al. 2021, eqs. 12 and 16) goes to the
    next grid time (``baseline.ddim_step_from_x0``); the noise is drawn as the scheduler's step draws it.
    Epsilon models are refused."""
    from .baseline import ddim_step_from_x0

    if getattr(denoiser, "prediction_type", "epsilon") == "epsilon" or not hasattr(denoiser, "guided_eps_x0"):
        raise ValueError(f"{name}: the schedule has zero terminal SNR (alpha_bar = 0 at the first grid time), where eps "
                         f"carries no information on x0; the model must predict v or x0 (Lin et al. 2023, sec. 3.2)")
    eps_hat, x0_hat = denoiser.guided_eps_x0(x, t_model, cond, guidance_scale)
    check_finite(x0_hat, name, 0)
    prev = ddim_step_from_x0(scheduler, eps_hat, scheduler.timesteps[0], x, x0_hat, eta=float(scheduler.config.eta),
                             generator=generator).prev_sample
    check_finite(prev, name, 0)
    return prev


def sample_time_shift(
    denoiser: Callable,
    x_T: torch.Tensor,
    scheduler,  # a set TimeShiftScheduler (gensample.schedulers.time_shift) or a flow stepper (FlowTimeShift)
    *,
    cond=None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    name: str = "ts-ddim",
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """TS-DDIM / TS-DDPM loop (Algorithm 3) on a scheduler whose timesteps are set; the scheduler
    only holds the grid and the alpha_bar tables (its math is `time_shift_times` / the DDIM update).

    denoiser: a `core.denoiser.Denoiser` (``.guided``) or a callable eps(x, t (B,), cond). With a flow
    stepper (``FlowTimeShift``, ``takes_velocity``) the state is the flow x_sigma and the model output the
    velocity (``Denoiser.velocity``, or the callable's output).
    x_T: (B, ...) start noise. Returns (x_0, trace) with trace lists per step: grid ``timestep``,
    and ``ts_mean`` / ``ts_min`` / ``ts_max`` of the shifted time over the batch (the model time
    for ``paper``, the target time for ``reference_pnm``).
    """
    trace: dict = {"timestep": [], "ts_mean": [], "ts_min": [], "ts_max": []}
    x = x_T
    flow = getattr(scheduler, "takes_velocity", False)  # a flow model's stepper: the state is x_sigma, the output v
    for i, t in enumerate(scheduler.timesteps):
        t_model = scheduler.model_timesteps(x, t)  # (B,) int64 (flow: float32 model times)
        if i == 0 and not flow and _zero_snr_start(scheduler, t):
            eps_hat = None  # alpha_bar = 0: the step below reads x0 off the model's own output
        elif flow and hasattr(denoiser, "velocity"):
            eps_hat = denoiser.velocity(x, t_model, cond, guidance_scale)
        elif hasattr(denoiser, "guided") and not flow:
            eps_hat = denoiser.guided(x, t_model, cond, guidance_scale)
        else:
            eps_hat = denoiser(x, t_model, cond)
        if i == 0 and not flow and _zero_snr_start(scheduler, t):
            x = zero_snr_first_step(denoiser, scheduler, x, t_model, cond, guidance_scale, generator, name)
            scheduler._handed.pop(int(t), None)  # the step was taken here: drop the handed model times
            out = SimpleNamespace(target_timesteps=t_model)
        else:
            check_finite(eps_hat, name, i)
            out = scheduler.step(eps_hat, t, x, generator=generator, model_timesteps=t_model)
            x = out.prev_sample
        shown = out.target_timesteps if not flow and scheduler.config.variant == "reference_pnm" else t_model
        shown = shown.double()
        as_time = float if flow else int  # float model times on a flow grid
        trace["timestep"].append(as_time(t))
        trace["ts_mean"].append(float(shown.mean()))
        trace["ts_min"].append(as_time(shown.min()))
        trace["ts_max"].append(as_time(shown.max()))
        if on_step is not None:
            on_step(1)
    return x, trace


# -- deprecated import path (one release): the diffusers face moved to gensample.schedulers.time_shift (gensample._moved)
__getattr__ = _moved.moved(__name__, "gensample.schedulers.time_shift", (
    "TimeShiftScheduler", "TimeShiftSchedulerOutput", "make_time_shift_scheduler", "estimate_data_var"))
