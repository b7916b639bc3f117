"""FlowTimeShiftScheduler: the diffusers face of Time-Shift (arXiv 2305.15583) on flow-matching models.

A stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` runs a ``FlowMatchEulerDiscreteScheduler``:
x_sigma = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity v = eps - x0, and each
step is the Euler update x + (sigma_{k+1} - sigma_k) v. This class *is* that scheduler (a subclass:
its grid, ``set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)``, ``scale_noise``,
``set_begin_index``, float ``timesteps`` and ``sigmas`` are the stock ones, bit for bit) plus
Time-Shift's per-sample model time (Algorithm 3 of Li et al.) on the sigma grid:

- the selection and the shifted update are those of ``gensample.samplers.time_shift.FlowTimeShift``
  (the ``ts-ddim`` / ``ts-ddpm`` sampler on flows; docs/flow_matching.md "Time-Shift on flows"):
  at step k >= 1 with t_k > t_c the model time is the candidate t_k + j (|j| <= w // 2, model-time
  units t = sigma T) whose flow reference (1 - sigma)^2 Var_data + sigma^2 (or sigma^2, the paper's
  statistic) is nearest to the sample's variance; the update is DDIM(eta) on the VP twin from the
  chosen sigma to the next grid sigma (eta = 0: the Euler step x + (sigma_{k+1} - sigma_m) v);
- a step in which no row is shifted is the stock ``FlowMatchEulerDiscreteScheduler.step`` itself,
  so ``window_size < 2``, ``cutoff >= timesteps[0]`` or ``enabled=False`` reproduce the stock
  pipeline bit for bit.

The model time must reach the transformer: in a stock pipeline call
``gensample.pipelines.time_shift.enable_time_shift(pipe)`` (a hook rewrites the transformer's
``timestep`` in the pipeline's own units: SD3 passes t, Flux t / 1000). ``step`` recomputes the
model time from the sample it updates and raises when a shifted step got no handed-over time (the
scheduler assigned by hand) or a different one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader looks the loadable base classes up in the module that defines a
# component's class (``get_class_obj_and_candidates``): without this name here a saved pipeline
# holding this scheduler would not load back.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from ..samplers.time_shift import DEFAULT_VARIANT, FlowTimeShift, default_window_cutoff
from ._config import check_model_times, flow_matching_reason, is_flow_match_config

# the Time-Shift keys this face adds to FlowMatchEulerDiscreteScheduler's config
TIME_SHIFT_KEYS = ("window_size", "cutoff", "variant", "eta", "enabled", "data_var")


class FlowTimeShiftScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with per-sample shifted model times (Time-Shift, arXiv 2305.15583).

    Config: every FlowMatchEulerDiscreteScheduler key (``from_config`` of an SD3 / Flux scheduler
    config keeps them all) plus ``window_size`` / ``cutoff`` (model-time units, t = sigma T; None:
    the per-step defaults of ``default_window_cutoff``, fixed at ``set_timesteps``), ``variant``
    (only "paper" on a flow), ``eta`` (0: Euler / DDIM on the twin; > 0: DDIM(eta) on the twin for
    the shifted steps), ``enabled`` and ``data_var`` (None: the paper's statistic sigma^2; a number
    >= 0, != 1: the data-aware (1 - sigma)^2 Var_data + sigma^2).

    ``model_timesteps(sample, t)`` -> (B,) float32 model times for the rows of ``sample`` at grid
    time ``t`` (handed over to the next ``step``); ``step(..., model_timesteps=...)`` accepts them
    explicitly. ``shifting`` is False when the configuration reproduces the stock scheduler.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """``FlowMatchEulerDiscreteScheduler.from_config``, refusing a config whose grid this face would not
        rebuild: a DDPM-family (betas) config, or the flow mode of another scheduler (DPM-Solver / UniPC with
        ``use_flow_sigmas`` / ``flow_prediction``), whose keys (``flow_shift``, ...) diffusers would drop
        with a log line, running shift 1.0 silently (so not even ``window_size=0`` would be the stock
        pipeline). ``enable_time_shift`` on such a pipeline refuses through this."""
        raw = config if isinstance(config, Mapping) else getattr(config, "config", None)
        if isinstance(raw, Mapping) and not is_flow_match_config(raw):
            reason = flow_matching_reason(raw)
            what = (f"the flow mode of {raw.get('_class_name') or 'another scheduler'} ({reason}), whose sigma grid it "
                    f"does not rebuild; keep that scheduler, or switch the pipeline to FlowMatchEulerDiscreteScheduler "
                    f"first" if reason is not None else
                    "a DDPM-family (betas) config; for Time-Shift on it use gensample.schedulers.TimeShiftScheduler")
            raise ValueError(f"{cls.__name__} takes a FlowMatchEulerDiscreteScheduler config (SD3 / SD3.5, Flux); "
                             f"this one is {what}")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        window_size: int | None = None,
        cutoff: int | None = None,
        variant: str = DEFAULT_VARIANT,
        eta: float = 0.0,
        enabled: bool = True,
        data_var: float | None = None,
    ):
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
                         base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
                         max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
                         use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                         use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
                         stochastic_sampling=stochastic_sampling)
        self._stepper_args = dict(window_size=window_size, cutoff=cutoff, eta=eta, data_var=data_var,
                                  enabled=enabled, variant=variant)
        FlowTimeShift(self._flow_config(), **self._stepper_args)  # validates the TS parameters (ValueError)
        self.init_noise_sigma = 1.0  # a flow starts at sigma = 1: x = eps (pipelines that scale by it stay stock)
        self._stepper: FlowTimeShift | None = None
        self._handed: dict = {}  # step index -> (rows,) model times handed over by model_timesteps
        self.window_size_eff: int | None = None
        self.cutoff_eff: int | None = None

    def _flow_config(self) -> dict:
        return {k: v for k, v in self.config.items() if k not in TIME_SHIFT_KEYS and not k.startswith("_")}

    # -- grid --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """The stock grid (``FlowMatchEulerDiscreteScheduler.set_timesteps``, same arguments), then the
        effective window / cutoff for its N steps. When they shift, the Time-Shift stepper's own grid
        (``core.flow.flow_sigmas``) must equal the stock one bit for bit (ValueError otherwise, e.g.
        for custom ``timesteps`` that are not sigmas * T)."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)
        n = len(self.timesteps)
        T = int(self.config.num_train_timesteps)
        w_def, c_def = default_window_cutoff(n, T)
        self.window_size_eff = w_def if self.config.window_size is None else int(self.config.window_size)
        self.cutoff_eff = c_def if self.config.cutoff is None else int(self.config.cutoff)
        self._handed = {}
        self._stepper = None
        if not self.shifting:
            return
        if self.config.stochastic_sampling:
            raise ValueError("stochastic_sampling=True cannot be combined with Time-Shift (window_size >= 2): use "
                             "eta=1.0 for a stochastic Time-Shift step, or window_size=0 for the stock scheduler")
        stepper = FlowTimeShift(self._flow_config(), **self._stepper_args)
        base = None if sigmas is None else (lambda steps, s=[float(v) for v in sigmas]: s)
        try:
            stepper.set_timesteps(n, mu=mu, base_sigmas=base)
            same = (timesteps is None and torch.equal(stepper.timesteps, self.timesteps.cpu())
                    and torch.equal(stepper.sigmas, self.sigmas.cpu()))
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"{type(self).__name__}: the Time-Shift grid does not reproduce this set_timesteps call "
                             f"(timesteps={'custom' if timesteps is not None else 'None'}); pass num_inference_steps "
                             f"(and sigmas / mu as the pipeline does), or window_size=0 for the stock scheduler")
        self._stepper = stepper

    @property
    def shifting(self) -> bool:
        """False when the configuration reproduces FlowMatchEulerDiscreteScheduler exactly."""
        if self.timesteps is None or self.window_size_eff is None:
            raise ValueError("call set_timesteps(...) before model_timesteps/step")
        return (bool(self.config.enabled) and self.window_size_eff >= 2
                and self.cutoff_eff < float(self.timesteps[0]))

    def current_index(self, timestep=None) -> int:
        """The step index the next ``step`` will use: ``step_index`` once stepping, else the begin
        index, else the index of ``timestep`` on the grid (as ``_init_step_index`` finds it)."""
        if self.step_index is not None:
            return int(self.step_index)
        if self.begin_index is not None:
            return int(self.begin_index)
        if timestep is None:
            return 0
        return int(self.index_for_timestep(torch.as_tensor(timestep).to(self.timesteps.device)))

    # -- the TS hook -------------------------------------------------------------------------
    def model_timesteps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """(B,) float32 model times for the rows of ``sample`` (x_sigma at grid time ``timestep``),
        by ``FlowTimeShift.model_timesteps``; the grid time itself when this step does not shift.
        Handed over to the next ``step`` at this grid time."""
        k = self.current_index(timestep)
        t_model = self._times(sample, k)
        self._handed[k] = t_model
        return t_model

    def _times(self, sample: torch.Tensor, k: int) -> torch.Tensor:
        grid_t = self.timesteps[k].float()
        if not self.shifting:
            return torch.full((sample.shape[0],), float(grid_t), dtype=torch.float32, device=sample.device)
        return self._stepper.model_timesteps(sample, grid_t.cpu())

    # -- diffusers contract ------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: torch.Tensor | None = None, return_dict: bool = True,
             model_timesteps: torch.Tensor | None = None, eta: float | None = None):
        """FlowMatchEulerDiscreteScheduler.step when no row of this step is shifted (bit for bit);
        otherwise ``FlowTimeShift.step`` from each row's model time to the next grid sigma (DDIM(eta)
        on the VP twin; eta = 0 is the Euler step x + (sigma_{k+1} - sigma_m) v). ``return_dict=False``
        gives ``(prev_sample,)`` as the stock scheduler."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            return super().step(model_output, timestep, sample, return_dict=return_dict)  # the stock ValueError
        if self.window_size_eff is None:
            raise ValueError("call set_timesteps(...) before step")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = int(self.step_index)
        if sample.shape[0] and self.shifting:
            t_model = self._times(sample, k)
            handed = model_timesteps if model_timesteps is not None else self._handed.get(k)
            check_model_times(float(self.timesteps[k]), t_model, handed, torch.float32)
        else:
            t_model = None
        self._handed.pop(k, None)
        if t_model is None or bool((t_model == self.timesteps[k].float().to(t_model.device)).all()):
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, per_token_timesteps=per_token_timesteps,
                                return_dict=return_dict)
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps cannot be combined with Time-Shift (window_size >= 2)")
        out = self._stepper.step(model_output, self._stepper.timesteps[k], sample, generator=generator,
                                 model_timesteps=t_model.cpu(), eta=eta)
        prev = out.prev_sample.to(model_output.dtype)
        if not torch.isfinite(prev).all():
            raise FloatingPointError(f"{type(self).__name__}.step: non-finite values at grid time {float(self.timesteps[k])}")
        self._step_index += 1
        if not return_dict:
            return (prev,)
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


__all__ = ["FlowTimeShiftScheduler", "TIME_SHIFT_KEYS"]
