"""FKCScheduler: the diffusers face of Feynman-Kac Correctors (FKC), arXiv 2503.02819.

A ``SchedulerMixin, ConfigMixin`` shell: the parameters (``FKCConfig``, ``DEFAULTS``), the pure
step functions (``eps_and_x0``, ``ddim_move``, ``weight_rate``, ``node_coefficients``,
``zero_snr_move``, ...) and the ``sample_fkc`` loop live in ``gensample.samplers.fkc``; this module
only calls them (docs/fkc.md "Where it lives").

Where the scheduler can and cannot go (a stock pipeline, flow-matching configs, step keywords):

- FKC is a weighted particle method: each step returns a log-weight increment that must be summed
  and used to resample (paper Sec. 4). A stock pipeline (``DDPMPipeline``, ``DDIMPipeline``,
  ``StableDiffusionPipeline``, a modular pipeline, ...) keeps only ``prev_sample``. With a
  non-trivial target (``FKCConfig.is_trivial`` is False: more than one non-zero exponent, or one
  that is not 1) ``step`` therefore raises at
  the first step when it is called from such a pipeline, naming the fix: ``FKCPipeline``
  (``FKCPipeline.from_pipe(pipe)``) or ``gensample run --sampler fkc``. A pipeline of your own
  that does sum ``log_weight_increment`` and resamples steps inside
  ``with scheduler.collecting_log_weights():``; a plain loop of your own (no pipeline object on
  the call stack) is never refused. With ``fkc_betas=[1.0]`` every increment is exactly zero, the
  step is DDIM(eta) on the model's own law, and a stock pipeline only gets a one-time warning.
- ``step`` takes the stock pipelines' keywords (``eta``, ``use_clipped_model_output``,
  ``generator``, ``variance_noise``, ``return_dict``) with DDIMScheduler's meaning, so that the
  trivial target runs in ``DDIMPipeline`` / ``DDPMPipeline`` / SD as DDIM / DDPM does. FKC
  never clips or thresholds x0 (that would change the SDE the weights correct), so it matches the
  stock schedulers with ``clip_sample=False``; ``previous_timestep`` is DDPMScheduler's.
- Flow-matching configs (``FlowMatchEulerDiscreteScheduler`` and friends, ``use_flow_sigmas``,
  ``prediction_type="flow_prediction"``) are refused by ``from_config`` / ``from_pretrained``:
  the scheduler would otherwise silently run on a default DDPM betas table.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core import smc
from ._config import calling_pipeline, refuse_flow_config, refuse_in_flow_pipeline
from ..core.ddim import SPACINGS, q_sample
from ..core.param import PREDICTION_TYPES
from ..core.schedule import alphas_cumprod_from_config
from ..samplers.fkc import (DEFAULTS, FKCConfig, _betas_like, combine_eps, combine_x0, ddim_move, direct_steps, eps_and_x0,
                            node_coefficients, spaced_timesteps, weight_rate, zero_snr_move)


# ---------------------------------------------------------------------------------------------
# diffusers face: FKCScheduler
# ---------------------------------------------------------------------------------------------


@dataclass
class FKCSchedulerOutput(BaseOutput):
    """prev_sample (N, ...), pred_original_sample (N, ...), log_weight_increment (N,) float64."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    log_weight_increment: torch.Tensor | None = None


SCHEDULER_QUADRATURES = ("euler", "logsnr")  # rules that need only the current step


class FKCScheduler(SchedulerMixin, ConfigMixin):
    """FKC move + weight step as a diffusers scheduler (docs/fkc.md "Where it lives").

    ``step(model_output, t, sample)`` takes either one raw model output (one expert with exponent
    ``fkc_betas[0]``, e.g. annealing) or a list / stacked (M, N, ...) tensor of expert outputs
    (exponents ``fkc_betas``) in the config's ``prediction_type``, forms eps_i and x0_i from each
    (``eps_and_x0``), makes a DDIM(eta = fkc_eta) step on eps_eff = sum beta_i eps_i and returns
    the FK log-weight increment (float64, rule ``fkc_quadrature``) in the output's
    ``log_weight_increment``; ``return_dict=False`` gives diffusers' (prev_sample,
    pred_original_sample). Zero-terminal-SNR schedules start with ``zero_snr_move``. Resampling
    is ``resample(...)`` (within groups of ``group_size``). Initial noise must be multiplied by
    ``init_noise_sigma`` = 1 / sqrt(B). Loads any DDPM/DDIM config (``from_config``; flow-matching
    configs are refused); the noise is drawn on the generator's device (CPU or CUDA) and moved to
    the sample's.

    The increments are the point of the method: called from a stock diffusers pipeline, which
    discards them, ``step`` raises for a non-trivial target (module docstring; use
    ``gensample.pipelines.fkc.FKCPipeline`` or ``gensample run --sampler fkc``). Your own loop::

        sched.set_timesteps(50)
        x = torch.randn(N, C, H, W, generator=g) * sched.init_noise_sigma
        log_w = torch.zeros(N, dtype=torch.float64)
        for t in sched.timesteps:
            out = sched.step([unet(x, t, c).sample for c in conds], t, x, generator=g)
            x, log_w = out.prev_sample, log_w + out.log_weight_increment
            # resample within groups when the ESS drops: sched.resample([x], log_w.reshape(G, K), g)
    """

    _compatibles = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "UniPCMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
        fkc_betas: Sequence[float] = (1.0,),
        fkc_eta: float = DEFAULTS["eta"],
        fkc_resample: str = DEFAULTS["resample"],
        fkc_ess_threshold: float = DEFAULTS["ess_threshold"],
        fkc_scheme: str = DEFAULTS["scheme"],
        fkc_quadrature: str = DEFAULTS["quadrature"],
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        if fkc_quadrature not in SCHEDULER_QUADRATURES:
            raise ValueError(f"fkc_quadrature must be one of {SCHEDULER_QUADRATURES} (one step at a time), got {fkc_quadrature!r}")
        self.fkc = FKCConfig(betas=tuple(fkc_betas), eta=fkc_eta, resample=fkc_resample,
                             ess_threshold=fkc_ess_threshold, scheme=fkc_scheme, quadrature=fkc_quadrature)
        # stored as a list of floats: the config survives a JSON save / load unchanged
        self.register_to_config(fkc_betas=[float(b) for b in self.fkc.betas])
        cfg = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
               "beta_schedule": beta_schedule, "trained_betas": trained_betas, "rescale_betas_zero_snr": rescale_betas_zero_snr}
        ab = alphas_cumprod_from_config(cfg)
        self.alphas_cumprod = ab.float()
        self.betas = (1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])).float()
        self.alphas = 1.0 - self.betas
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(ab[0])
        self.init_noise_sigma = 1.0 / math.sqrt(self.fkc.total_beta)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy().astype(np.int64))
        self._ab64 = ab
        self._collecting = 0  # > 0 inside collecting_log_weights()
        self._warned_trivial = False

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """ConfigMixin.from_config, refusing flow-matching configs (``refuse_flow_config``): FKC on
        flow-matching models (SD3, Flux) runs through ``gensample run --sampler fkc``, not this face;
        ``set_timesteps`` called by a flow-matching pipeline raises the same way."""
        refuse_flow_config(config, cls.__name__)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @contextlib.contextmanager
    def collecting_log_weights(self):
        """Declare that the code stepping this scheduler sums ``log_weight_increment`` and resamples:
        inside this block ``step`` is allowed from a pipeline of your own (module docstring)."""
        self._collecting += 1
        try:
            yield self
        finally:
            self._collecting -= 1

    def _check_weights_collected(self) -> None:
        """Raise when a stock pipeline steps a non-trivial target (its increments would be lost);
        warn once when the target is trivial (all increments are exactly zero)."""
        if self._collecting:
            return
        pipe = calling_pipeline(sys._getframe(2), modular=True, max_frames=64)
        if pipe is None:
            return
        name = type(pipe).__name__
        betas = [float(b) for b in self.fkc.betas]
        if self.fkc.is_trivial:
            if not self._warned_trivial:
                self._warned_trivial = True
                warnings.warn(f"FKCScheduler(fkc_betas={betas}) in {name}: the target is the model's own law, every FK "
                              f"log-weight increment is zero and nothing is reweighted; this samples as DDIM(eta) does. "
                              f"For an FKC target use gensample.pipelines.fkc.FKCPipeline.", UserWarning, stacklevel=3)
            return
        raise ValueError(
            f"FKCScheduler(fkc_betas={betas}) is being stepped by {name}, which keeps only prev_sample: the FK "
            f"log-weight increments are thrown away, no particle is resampled and the start noise is not scaled "
            f"by init_noise_sigma, so the output would not follow the FKC target. Use "
            f"gensample.pipelines.fkc.FKCPipeline (e.g. FKCPipeline.from_pipe(pipe)(..., target='anneal', beta=2.0)) "
            f"or `gensample run --sampler fkc`; a pipeline of your own that sums out.log_weight_increment and "
            f"resamples can step inside `with scheduler.collecting_log_weights():`. fkc_betas=[1.0] is plain "
            f"DDIM(eta) sampling.")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None, mu=None):
        """The DDIM-style grid of N steps or a custom descending ``timesteps`` list. ``sigmas`` / ``mu``
        exist only so that a flow-matching pipeline (Flux passes them) reaches the ValueError naming
        the fix instead of diffusers' generic one; a DDPM-family face takes neither."""
        refuse_in_flow_pipeline(self, sys._getframe(1))  # SD3 / Flux pipelines: ValueError naming the fix
        if sigmas is not None or mu is not None:
            raise ValueError(f"sigmas / mu are flow-matching grid arguments; {type(self).__name__} takes "
                             f"num_inference_steps or timesteps, got sigmas={sigmas!r}, mu={mu!r}")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.long)
            if ts.ndim != 1 or ts.numel() == 0 or (ts[1:] >= ts[:-1]).any() or ts.min() < 0 or ts.max() >= self.config.num_train_timesteps:
                raise ValueError(f"timesteps must be a non-empty, strictly descending list of integers in [0, {self.config.num_train_timesteps - 1}]")
        else:
            ts = spaced_timesteps(self.config.num_train_timesteps, num_inference_steps,
                                  self.config.timestep_spacing, self.config.steps_offset)
        self.num_inference_steps = len(ts)
        self.timesteps = ts.to(device)

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The grid time the step from ``timestep`` goes to (-1 after the last one), as DDPMScheduler's."""
        ts = self.timesteps.cpu().tolist()
        t = int(timestep)
        if t not in ts:
            raise ValueError(f"timestep {t} is not in the current schedule (set_timesteps)")
        i = ts.index(t)
        return torch.tensor(ts[i + 1] if i + 1 < len(ts) else -1)

    def _next_alpha_bar(self, timestep: int) -> float:
        ts = self.timesteps.cpu().tolist()
        if timestep not in ts:
            raise ValueError(f"timestep {timestep} is not in the current schedule (set_timesteps)")
        i = ts.index(timestep)
        return float(self._ab64[ts[i + 1]]) if i + 1 < len(ts) else self.final_alpha_cumprod

    def step(
        self,
        model_output,
        timestep,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One FKC step: the DDIM(eta) move on eps_eff = sum_i beta_i eps_i (Song et al. 2021, eq. 12)
        and the FK log-weight increment of the step (paper Sec. 3; docs/fkc.md "Weight rules").

        model_output: one raw model output (N, ...) or M expert outputs ([M] list or (M, N, ...)),
        in the config's prediction_type. The keywords are DDIMScheduler.step's: ``eta`` (None: the
        config's ``fkc_eta``; the FK weights do not depend on it), ``use_clipped_model_output``
        (accepted; FKC never clips x0, so re-deriving eps from it changes nothing, as in
        DDIMScheduler with clip_sample=False), ``generator`` / ``variance_noise`` (the move's
        noise; not both), ``return_dict`` (False: diffusers' (prev_sample, pred_original_sample),
        without the increment). Raises when a stock pipeline steps a non-trivial target (module
        docstring)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before step(...)")
        if not self.fkc.is_trivial or not self._warned_trivial:
            self._check_weights_collected()
        eta = self.fkc.eta if eta is None else eta
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0 (None: fkc_eta = {self.fkc.eta}), got {eta!r}")
        eta = float(eta)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to step(), not both")
        if variance_noise is not None and tuple(variance_noise.shape) != tuple(sample.shape):
            raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)}, got {tuple(variance_noise.shape)}")
        t = int(timestep)
        if isinstance(model_output, (list, tuple)):
            outs = torch.stack(list(model_output))
        elif model_output.shape == sample.shape:
            outs = model_output[None]
        else:
            outs = model_output
        if outs.shape[1:] != sample.shape:
            raise ValueError(f"expert outputs must each have the sample's shape {tuple(sample.shape)}, got {tuple(outs.shape)}")
        ab_t = self._ab64[t]
        ab_s = torch.tensor(self._next_alpha_bar(t), dtype=torch.float64)
        pairs = [eps_and_x0(o, sample, ab_t, self.config.prediction_type) for o in outs]
        eps = torch.stack([e for e, _ in pairs])  # (M, N, ...) float64, formed from the raw outputs
        x0s = torch.stack([x0 for _, x0 in pairs])
        direct = bool(direct_steps(ab_t.reshape(1), ab_s.reshape(1))[0]) if self._zero_snr_start(t) else False
        if direct:  # zero terminal SNR start (docs/fkc.md "Zero terminal SNR"): no weight, sample rho_s
            inc = torch.zeros(sample.shape[0], dtype=torch.float64)
        else:
            coef = node_coefficients(ab_t.reshape(1), ab_s.reshape(1), self.fkc.quadrature)[0]
            inc = coef * weight_rate(eps, self.fkc.betas).cpu()
        eps_eff = combine_eps(eps, self.fkc.betas)
        noise = None
        if eta > 0 and variance_noise is not None:
            noise = variance_noise.to(device=sample.device, dtype=sample.dtype)
        elif eta > 0:  # drawn on the generator's device (CPU or CUDA), then moved
            gen = generator[0] if isinstance(generator, list) else generator
            dev = gen.device if gen is not None else sample.device
            noise = randn_tensor(sample.shape, generator=generator, device=dev, dtype=sample.dtype).to(sample.device)
        x0 = combine_x0(x0s, sample, self.fkc.betas, ab_t)
        if direct:
            prev = zero_snr_move(sample, x0s, self.fkc.betas, ab_s, eta, noise)
            x0 = x0s.mean(0) if len(self.fkc.betas) == 1 else (_betas_like(self.fkc.betas, x0s) * x0s).sum(0) / self.fkc.total_beta
        else:
            prev = ddim_move(sample, eps_eff, ab_t, ab_s, eta, noise, x0)
        x0 = x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return FKCSchedulerOutput(prev_sample=prev, pred_original_sample=x0, log_weight_increment=inc)

    def _zero_snr_start(self, timestep: int) -> bool:
        """True when the schedule starts at alpha_bar = 0 and ``timestep`` is one of its first,
        directly sampled steps (``direct_steps``)."""
        ts = self.timesteps.cpu().tolist()
        ab_t = self._ab64[torch.as_tensor(ts)]
        ab_s = torch.cat([ab_t[1:], torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        return bool(direct_steps(ab_t, ab_s)[ts.index(timestep)])

    def resample(self, tensors, log_w: torch.Tensor, generator=None, force: bool = False):
        """Resample flat group-major tensors by (G, K) log_w under the configured policy.

        Returns (tensors, log_w, resampled (G,) bool). ``force`` ignores the policy."""
        G, K = log_w.shape
        if force or self.fkc.resample == "every":
            want = torch.ones(G, dtype=torch.bool)
        elif self.fkc.resample == "ess":
            want = smc.effective_sample_size(log_w).cpu() < self.fkc.ess_threshold * K
        else:
            want = torch.zeros(G, dtype=torch.bool)
        if not want.any():
            return list(tensors), log_w, want
        out, lw, _ = smc.resample(list(tensors), log_w, self.fkc.scheme, generator, mask=want)
        return out, lw, want

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self._ab64.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        ab = ab.reshape(shape) if ab.ndim else ab
        return q_sample(original_samples.double(), noise.double(), ab).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
