"""TimeShiftScheduler: the diffusers face of the Time-Shift sampler (TS-DDIM / TS-DDPM), arXiv 2305.15583.

A ``SchedulerMixin, ConfigMixin`` shell: the parameters (``check_params``, ``default_window_cutoff``),
the selection rule of Algorithm 3 (``time_shift_times``, ``reference_variance``), ``predict_x0``
and the ``sample_time_shift`` loop live in ``gensample.samplers.time_shift``; this module holds the
scheduler, its factory ``make_time_shift_scheduler`` on a model's training schedule, and
``estimate_data_var`` (which builds a scheduler with that factory; docs/time_shift.md).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ._config import SourceValuesWin, check_model_times, is_flow_match_config, refuse_in_flow_pipeline
from ..core.ddim import ddim_sigma, ddim_update, eps_from_v, eps_from_x0, q_sample, timestep_grid, v_from_eps, x0_from_v
from ..core.param import PREDICTION_TYPES
from ..samplers.time_shift import (DEFAULT_VARIANT, check_params, check_window_stride, default_window_cutoff, dynamic_threshold,
                                   predict_x0, reference_variance, sample_time_shift, sample_variance, time_shift_times)


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


class TimeShiftScheduler(SourceValuesWin, SchedulerMixin, ConfigMixin):
    """DDIM (eta = 0) / DDPM-like (eta = 1) with per-sample shifted time steps (arXiv 2305.15583).

    Keeps the DDIMScheduler config keys, grid and alpha_bar tables (an internal DDIMScheduler
    builds them), plus ``window_size`` / ``cutoff`` (None: per-step defaults, fixed at
    ``set_timesteps``), ``variant`` ("paper" | "reference_pnm"), ``eta`` (used when ``step`` is
    not given one), ``enabled`` and ``data_var`` (None: the paper's statistic; a number in
    >= 0, != 1: the data-aware one). ``window_size < 2``, ``cutoff >= timesteps[0]`` or
    ``enabled=False`` give DDIM exactly. ``clip_sample`` defaults to False (SD latents must not
    be clamped). ``from_config``: for every key shared with DDIM/DDPM the source's value wins,
    also where the source left it at its own default (``SourceValuesWin``: DDIMScheduler()'s
    ``clip_sample=True`` stays True; a source without the key gets ours); a
    FlowMatchEulerDiscreteScheduler config gives ``FlowTimeShiftScheduler`` (the flow face), other
    flow-matching configs are refused with a ValueError.

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

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """``SourceValuesWin.from_config``; a FlowMatchEulerDiscreteScheduler config (SD3 / SD3.5, Flux)
        gives the flow face, ``FlowTimeShiftScheduler`` (gensample.schedulers.flow_time_shift), with
        the same Time-Shift keyword arguments; other flow-matching configs (DPM-Solver's flow mode) are
        refused. A DDPM config whose ``variance_type`` is not the posterior
        variance (fixed_small) gets a warning: the eta = 1 step (TS-DDPM) always draws with the
        posterior variance of DDIM(eta = 1), never beta_t (fixed_large) or a learned one."""
        if is_flow_match_config(dict(config) if isinstance(config, Mapping) else None):
            # a flow-matching pipeline's scheduler (SD3 / Flux): the flow face, same Time-Shift keys
            from .flow_time_shift import FlowTimeShiftScheduler

            return FlowTimeShiftScheduler.from_config(dict(config), return_unused_kwargs=return_unused_kwargs, **kwargs)
        vt = config.get("variance_type") if isinstance(config, dict) else None
        if vt not in (None, "fixed_small", "fixed_small_log"):
            warnings.warn(f"{cls.__name__}.from_config: the source's variance_type={vt!r} is not used; the eta = 1 "
                          f"step draws with the DDPM posterior variance (fixed_small), as DDIM(eta = 1) does",
                          UserWarning, stacklevel=2)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
        self._mark_shared_keys_explicit()

    # -- grid --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list | None = None,
                      sigmas=None, mu=None):
        """DDIM grid for N steps (``core.ddim.timestep_grid``, as DDIMScheduler.set_timesteps), or a strictly descending custom list
        in [0, T-1]; fixes the effective window / cutoff for this N. Each step goes to the next
        grid entry (for every ``timestep_spacing``). Called by a flow-matching pipeline (SD3, Flux) it
        raises a ValueError naming ``FlowTimeShiftScheduler`` / ``enable_time_shift``."""
        refuse_in_flow_pipeline(self, sys._getframe(1))
        if sigmas is not None or mu is not None:  # accepted only to reach the refusal above from a Flux pipeline
            raise ValueError(f"sigmas / mu are flow-matching grid arguments; TimeShiftScheduler takes "
                             f"num_inference_steps or timesteps, got sigmas={sigmas!r}, mu={mu!r}")
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
        if isinstance(eta, torch.Generator):  # DDPMScheduler.step(model_output, t, sample, generator) positionally
            if generator is not None:
                raise TypeError("step() got a torch.Generator as eta and another as generator: pass generator= once")
            eta, generator = None, eta
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
        check_model_times(t, t_model, handed, torch.long)
        shape = (sample.shape[0],) + (1,) * (sample.ndim - 1)
        ab_table = self._ab_table.to(sample.device)
        alpha_bar_model = ab_table[t_model].reshape(shape)  # (B, 1, ...) float32
        alpha_bar_target = ab_table[torch.where(t_target < 0, len(self.alphas_cumprod), t_target)].reshape(shape)

        eps_hat, x0_hat = model_output, None
        if self.config.prediction_type == "v_prediction":
            # x0 and eps straight from v (Salimans & Ho 2022), in DDIMScheduler's float32 order (the roots in the
            # table's float32, cast to the sample's dtype): finite at alpha_bar = 0 (a zero-terminal-SNR schedule's
            # first step: x0 = -v, eps = x), where the x0 of eps is 0/0
            x0_hat = x0_from_v(sample, model_output, alpha_bar_model, coef_dtype=sample.dtype)
            eps_hat = eps_from_v(sample, model_output, alpha_bar_model, coef_dtype=sample.dtype)
        elif self.config.prediction_type == "sample":
            x0_hat = model_output
            eps_hat = eps_from_x0(sample, x0_hat, alpha_bar_model, coef_dtype=sample.dtype)
        else:  # epsilon (the config is checked at construction)
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

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """sigma^2 / eta^2 of a DDIM step from ``timestep`` to ``prev_timestep`` (Song et al. 2021,
        eq. 16; ``core.ddim.ddim_sigma`` at eta = 1), alpha_bar of a negative ``prev_timestep`` being
        the final value: DDIMScheduler's helper of the same name, kept for code that calls it."""
        ab_t = self.alphas_cumprod[int(timestep)]
        ab_s = self.alphas_cumprod[int(prev_timestep)] if int(prev_timestep) >= 0 else self.final_alpha_cumprod
        return ddim_sigma(ab_t, ab_s, 1.0) ** 2

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


# -- the data-aware statistic from the model (a factory-built scheduler on the loop) --------
def estimate_data_var(denoiser: Callable, x_T: torch.Tensor, train_config: dict, steps: int = 50, cond=None) -> float:
    """Var_data = E[var_hat(x0)] estimated once from the model: the batch mean of var_hat over
    DDIM samples (``steps`` steps, no shift, conditioning ``cond``) drawn from ``x_T`` (B, ...).
    The estimate carries the model's own error; pass a value measured on the data when known."""
    sched = make_time_shift_scheduler(train_config, enabled=False)
    sched.set_timesteps(min(int(steps), int(sched.config.num_train_timesteps)), device=x_T.device)
    x, _ = sample_time_shift(denoiser, x_T, sched, cond=cond, name="ts-data-var")
    return float(sample_variance(x).mean())
