"""MaskedDiffusionScheduler: the diffusers face of the first-hitting sampler (FHS) and the ancestral
grid sampler for masked diffusion models, arXiv 2409.02908.

A ``SchedulerMixin, ConfigMixin`` shell: the schedules, ``MaskedDiffusionConfig``, the pure step
functions (``fhs_reveal``, ``next_hitting_time``, ``ancestral_step``, ...) and the loops
``sample_first_hitting`` / ``sample_ancestral`` live in ``gensample.samplers.first_hitting``; this
module only calls them (docs/first_hitting.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..core.categorical import Generators, uniform
from ..samplers.first_hitting import (METHODS, MaskedDiffusionConfig, ancestral_step, ancestral_times, check_logits,
                                      fhs_reveal, fill_masks_argmax, final_argmax_step, mask_alpha, next_hitting_time,
                                      time_input)
from ._config import refuse_flow_config


# -- diffusers scheduler ----------------------------------------------------------------------
@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """prev_sample: Long[B, L]; pred_original_sample: Long[B, L] (masks filled by argmax mu);
    changed: Bool[B] (any token revealed: the model cache is invalid); t: Float[B] times after the step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    changed: torch.Tensor
    t: torch.Tensor


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Masked-diffusion scheduler: first-hitting (default) or ancestral grid (docs/first_hitting.md).

    Mirrors diffusers' AmusedScheduler / VQDiffusionScheduler: ``sample`` is a LongTensor of token
    ids, ``model_output`` the network's logits (B, L, K'). The mask logit (if present) is forced to
    -inf. ``set_timesteps(num_inference_steps)`` builds the ancestral grid; for FHS pass
    ``num_masked`` (n): the timesteps are then ceil(n / k) integer counters and per-row continuous
    times live in ``self.t`` (use ``time_input()`` for time-conditioned networks).
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, mask_token_id: int = 0, masking_schedule: str = "linear", sampler: str = "first_hitting",
                 t_min: float = 1e-5, final_step: str = "sample", tokens_per_step: int = 1,
                 noise_dtype: str = "float64", temperature: float = 1.0, time_conditioning: bool = False,
                 exclude_ids: list | None = None):
        if sampler not in METHODS:
            raise ValueError(f"sampler must be one of {METHODS}, got {sampler!r}")
        self._cfg = self._make_cfg(None)
        self.timesteps = None
        self.num_inference_steps = None
        self.t = None
        self._times = None
        self._step_index = None
        self.init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a flow-matching config is refused (``refuse_flow_config``):
        it would silently give a masked scheduler with every default."""
        if isinstance(config, dict):
            refuse_flow_config(config, cls.__name__)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _make_cfg(self, steps):
        c = self.config
        return MaskedDiffusionConfig(
            mask_token_id=int(c.mask_token_id), schedule=c.masking_schedule, num_inference_steps=steps,
            t_min=float(c.t_min), final_step=c.final_step, tokens_per_step=int(c.tokens_per_step),
            precision=c.noise_dtype, temperature=float(c.temperature), time_conditioning=bool(c.time_conditioning),
            exclude_ids=tuple(c.exclude_ids or ()))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_masked: int | None = None):
        if self.config.sampler == "ancestral":
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be a positive int for the ancestral sampler, got {num_inference_steps!r}")
            self._cfg = self._make_cfg(int(num_inference_steps))
            self._times = ancestral_times(int(num_inference_steps), float(self.config.t_min))
            self.timesteps = torch.tensor(self._times[:-1], dtype=torch.float64, device=device)
            self.num_inference_steps = len(self._times) - 1
        else:
            n = num_masked if num_masked is not None else num_inference_steps
            if n is None or int(n) < 0:
                raise ValueError(f"num_masked must be a non-negative int for the first-hitting sampler, got {n!r}")
            self._cfg = self._make_cfg(None)
            k = int(self.config.tokens_per_step)
            count = -(-int(n) // k)
            self.timesteps = torch.arange(count - 1, -1, -1, dtype=torch.long, device=device)
            self.num_inference_steps = count
        self.t = None
        self._step_index = 0

    def time_input(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """sigma(t) = -log alpha_t for time-conditioned networks (t defaults to the current per-row times)."""
        t = self.t if t is None else t
        if t is None:
            raise ValueError("no current time: call step() first or pass t")
        return time_input(t, self.config.masking_schedule)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _resolve_step(self, timestep) -> tuple[int, float | None, float | None]:
        """(grid index, t, s) of the step that ``timestep`` names; t, s are None for FHS counters.

        Ancestral: ``timestep`` is a continuous time t in (0, 1]; the step goes from t to the
        largest grid time below it (on the grid: the next grid point), so a caller that skips or
        repeats timesteps gets the step it asked for. FHS: one of ``self.timesteps`` (a counter;
        the reveal itself does not depend on it).
        """
        ts = float(timestep.item() if torch.is_tensor(timestep) else timestep)
        if self.config.sampler == "ancestral":
            grid = self._times
            if not 0.0 < ts <= 1.0 + 1e-12:
                raise ValueError(f"timestep must be a continuous time in (0, 1] for the ancestral sampler, got {ts}")
            below = [j for j, g in enumerate(grid) if g < ts - 1e-12]
            if not below:
                raise ValueError(f"timestep {ts} is at or below the last grid time {grid[-1]}: no step left")
            j = below[0]
            return j, min(ts, 1.0), grid[j]
        counters = self.timesteps.tolist()
        if not float(ts).is_integer() or int(ts) not in counters:
            raise ValueError(f"timestep must be one of the first-hitting counters {counters[:3]}..{counters[-1:]} "
                             f"(set_timesteps(num_masked=n)), got {timestep!r}")
        return counters.index(int(ts)) + 1, None, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Generators | None = None, return_dict: bool = True):
        """One step at ``timestep`` (see ``_resolve_step``). model_output: logits (B, L, K') on
        ``sample`` (B, L) int64. ``return_dict=False`` gives diffusers' ``(prev_sample,
        pred_original_sample)``; ``changed`` and ``t`` are in the output dataclass."""
        if self._step_index is None:
            raise ValueError("call set_timesteps() before step()")
        if sample.dtype != torch.long or sample.ndim != 2:
            raise TypeError(f"sample must be a LongTensor (B, L), got {sample.dtype} {tuple(sample.shape)}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        cfg = self._cfg
        logits = check_logits(model_output, sample, "MaskedDiffusionScheduler", self._step_index)
        B = sample.shape[0]
        next_index, t, s = self._resolve_step(timestep)
        if self.t is None:
            self.t = torch.ones(B, dtype=torch.float64)
        if self.config.sampler == "ancestral":
            if s == 0.0 and cfg.t_min > 0 and cfg.final_step == "argmax":
                prev = final_argmax_step(sample, logits, cfg)
            else:
                prev = ancestral_step(sample, logits, t, s, cfg, generator)
            self.t = torch.full((B,), s, dtype=torch.float64)
        else:
            # time-agnostic networks: tau is bookkeeping; time-conditioned ones should use
            # sample_first_hitting, which draws tau before the model call
            self.t = next_hitting_time(sample, self.t, cfg, generator)
            prev = fhs_reveal(sample, logits, cfg, generator)
        self._step_index = next_index
        changed = (prev != sample).any(1)
        pred = fill_masks_argmax(sample, logits, cfg)
        if not return_dict:
            return prev, pred
        return MaskedDiffusionSchedulerOutput(prev_sample=prev, pred_original_sample=pred, changed=changed, t=self.t)

    def add_noise(self, original_samples: torch.Tensor, timesteps, generator: Generators | None = None) -> torch.Tensor:
        """Forward process q(x_t | x_0): each token independently becomes the mask with prob 1 - alpha_t.
        timesteps: scalar or (B,) continuous times in [0, 1]."""
        x0 = original_samples
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if ((t < 0) | (t > 1)).any():
            raise ValueError("timesteps must be continuous times in [0, 1]")
        keep = mask_alpha(t, self.config.masking_schedule)
        keep = keep.expand(x0.shape[0]) if keep.numel() == 1 else keep
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        u = uniform(x0.shape, g, dtype=torch.float64)
        return torch.where(u.to(x0.device) >= keep[:, None].to(x0.device), torch.full_like(x0, self.config.mask_token_id), x0)

    def __len__(self) -> int:
        return 1000
