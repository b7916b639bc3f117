"""DiSAHeadScheduler: the diffusers face of DiSA's diffusion head (MAR's respaced ancestral DDPM), arXiv 2505.20297.

A ``SchedulerMixin, ConfigMixin`` shell: the respaced tables (``HeadDDPM``), the head step
(``ddpm_head_step``, ``head_variance``), the step-budget schedules and the AR loop ``sample_mar``
live in ``gensample.samplers.disa``; this module only calls them (docs/disa.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core.ddim import q_sample
from ..core.schedule import alphas_cumprod_from_config, make_betas
from ..samplers.disa import HeadDDPM, ddpm_head_step, head_variance
from ._config import SourceValuesWin


# -- diffusers face: a scheduler for the head ----------------------------------------------------
@dataclass
class DiSAHeadSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class DiSAHeadScheduler(SourceValuesWin, SchedulerMixin, ConfigMixin):
    """MAR's respaced ancestral DDPM for a per-token head (docs/disa.md, head sampler), as a diffusers scheduler.

    DiSA calls ``set_timesteps(S(k))`` once per AR iteration; tables are cached per step count.
    ``timesteps`` are the original training t (descending) to feed the head. ``step`` takes
    ``noise`` (per-step standard normal, e.g. from per-image generators) or draws it with
    ``generator``; ``disa_temperature`` scales that noise only. Differs from DDPMScheduler in the
    timestep spacing (running float sum, banker's rounding), the clipped-log posterior variance
    and the temperature, so MAR parity needs this class (docs/disa.md, head sampler).
    ``from_config``: the source's value wins for every key shared with DDPM (beta_schedule,
    variance_type, ...), also where the source left it at its own default; flow-matching configs
    are refused (``SourceValuesWin``).
    """

    _compatibles = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "squaredcos_cap_v2", trained_betas=None, prediction_type: str = "epsilon",
                 variance_type: str = "auto", disa_temperature: float = 1.0,
                 disa_timestep_clip: Optional[int] = None):
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type must be 'epsilon' for the MAR head, got {prediction_type!r}")
        allowed = ("auto", "fixed_small", "fixed_small_log", "learned_range")
        if variance_type not in allowed:
            raise ValueError(f"variance_type must be one of {allowed} for the MAR head, got {variance_type!r}")
        self.ddpm = HeadDDPM(alphas_cumprod_from_config(self.config), disa_timestep_clip,
                             "fixed_small" if variance_type == "fixed_small_log" else variance_type)
        self.alphas_cumprod = self.ddpm.alphas_cumprod.float()
        # diffusers' scheduler attributes: the training chain beta_t, alpha_t = 1 - beta_t (T,)
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas).float()
        self.alphas = 1.0 - self.betas
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._table = None
        self._step_index = None
        self._mark_shared_keys_explicit()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._table = self.ddpm.table(num_inference_steps)
        self.num_inference_steps = len(self._table)
        self.timesteps = self._table.timesteps.flip(0).to(device)
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, noise: torch.Tensor | None = None,
             generator=None, return_dict: bool = True):
        if self._table is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = len(self._table) - 1 - self._step_index
        if int(timestep) != int(self._table.timesteps[i]):
            raise ValueError(f"timestep {int(timestep)} is not the expected {int(self._table.timesteps[i])} at step {self._step_index}")
        c = sample.shape[1] if sample.ndim > 1 else 1
        eps, v = model_output, None
        if model_output.shape != sample.shape:
            if sample.ndim < 2 or model_output.shape[1] != 2 * c or model_output.shape[2:] != sample.shape[2:]:
                raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)} (eps) or twice its "
                                 f"channels (eps, v); got {tuple(model_output.shape)}")
            eps, v = model_output[:, :c], model_output[:, c:]
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev, x0_hat = ddpm_head_step(self._table, i, sample, eps, noise, self.config.disa_temperature,
                                      head_variance(self.ddpm.variance_type, v, c))
        self._step_index += 1
        if not return_dict:
            return (prev, x0_hat)
        return DiSAHeadSchedulerOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(original_samples.device)[timesteps.long().to(original_samples.device)]
        ab = ab.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return q_sample(original_samples, noise, ab)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
