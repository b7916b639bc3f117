"""The schedule-flaw baselines of One More Step, as options of ``ddim`` (declared by the ddim spec
in ``baseline.py``; docs/oms.md "The ddim flags").

- Zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  WACV 2024, arXiv 2305.08891, Alg. 1 + sec. 3.3 trailing spacing): diffusers'
  ``rescale_betas_zero_snr=True`` with ``timestep_spacing="trailing"``. At alpha_bar_T = 0 the
  eps parameterisation is singular (x0 = (x - sqrt(1 - a) eps) / sqrt(a) is 0/0), so the raw
  model output is fed to a DDIMScheduler built with the model's own ``prediction_type``; the
  model must predict v or x0 (sec. 3.2).
- Offset noise (crosslabs 2023; diffusers' ``--noise_offset``): a model trained on
  eps + delta n, n ~ N(0, 1) of shape (B, C, 1, 1), is started from that law.

This module depends on ``core`` and the registry only (``baseline`` imports it).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..core.denoiser import Denoiser, check_finite, concat_cond
from ..core.param import cfg_combine, rescale_cfg
from .registry import Option, RunContext, SampleBatch

logger = logging.getLogger(__name__)

DDIM_FLAW_OPTIONS = (
    Option("rescale-zero-snr", bool, False, "diffusers rescale_betas_zero_snr + trailing spacing (v-pred models, Lin et al.)"),
    Option("offset-noise", float, 0.0, "delta: start from eps + delta n, n ~ N(0,1) per channel (offset-noise models)", min=0.0),
)


def zero_snr_wanted(opts: dict, model) -> bool:
    """--rescale-zero-snr, or a model whose own schedule is already zero-terminal-SNR."""
    return bool(opts.get("rescale_zero_snr")) or bool(model.scheduler_config.get("rescale_betas_zero_snr"))


def start_noise(ctx: RunContext, gens: Sequence[torch.Generator], shape: Sequence[int], delta: float) -> torch.Tensor:
    """x_T / init_noise_sigma: eps, or eps + delta n with n ~ N(0, 1) of shape (B, C, 1, 1) (offset
    noise); both drawn from each sample's generator (``ctx.randn``); delta = 0 is exactly eps."""
    eps = ctx.randn(gens, shape)
    if not delta:
        return eps
    n = ctx.randn(gens, (shape[0],) + (1,) * (len(shape) - 1))  # (B, C, 1, 1): one draw per channel
    return eps + delta * n


def zero_snr_scheduler(model, steps: int, device, spacing: str | None = None):
    """DDIMScheduler on the model's schedule rescaled to zero terminal SNR (trailing unless
    ``spacing``), prediction_type = the model's; ValueError for eps-prediction models."""
    from diffusers import DDIMScheduler

    if model.prediction_type == "epsilon":
        raise ValueError(f"--rescale-zero-snr needs a v_prediction or sample model (eps is singular at "
                         f"alpha_bar_T = 0, Lin et al. 2023 sec. 3.2); {model.name!r} predicts epsilon. "
                         f"Try --model digits-flawed-zsnr")
    if not model.scheduler_config.get("rescale_betas_zero_snr"):
        logger.warning("%s was not trained on the zero-terminal-SNR schedule; Lin et al. fine-tune first", model.name)
    cfg = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    cfg.update(rescale_betas_zero_snr=True, timestep_spacing=spacing or "trailing", prediction_type=model.prediction_type)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps, device=device)
    return sched


def raw_guided(den: Denoiser, x, t, cond, w: float, phi: float) -> torch.Tensor:
    """Model output in its own parameterisation with CFG (w) and rescaled CFG (phi; Lin et al.
    sec. 3.4, diffusers' rescale_noise_cfg) applied to the raw output."""
    t = torch.as_tensor(t, device=x.device)
    if w == 1.0 or cond is None:
        return den._raw(x, t, cond)
    if den.null_cond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional input (the model has no null condition)")
    n = x.shape[0]
    out = den._raw(torch.cat([x, x]), t, concat_cond(cond, den.null_cond, n, n))
    out_c, out_u = out[:n], out[n:]
    guided = cfg_combine(out_u, out_c, w)
    return rescale_cfg(guided, out_c, phi) if phi > 0 else guided


def direct_loop(sched, x_T, cond, opts: dict, gens, ctx: RunContext, den: Denoiser) -> torch.Tensor:
    """The pipeline loop feeding the raw (guided) model output to ``sched`` (built with the model's
    prediction_type), from x_T already at the scheduler's scale."""
    import inspect

    params = inspect.signature(sched.step).parameters
    kwargs = {"generator": gens} if "generator" in params else {}
    if "eta" in params and opts.get("eta") is not None:
        kwargs["eta"] = opts["eta"]
    w = opts.get("guidance_scale", 1.0)
    phi = opts.get("guidance_rescale")
    phi = den.guidance_rescale if phi is None else float(phi)
    x = x_T
    eta = float(kwargs.get("eta", 0.0))
    for i, t in enumerate(sched.timesteps):
        out = raw_guided(den, sched.scale_model_input(x, t), t, cond, w, phi)
        check_finite(out, ctx.sampler, i)
        if eta > 0 and float(sched.alphas_cumprod[int(t)]) == 0.0:
            # the stochastic step from alpha_bar = 0: DDIMScheduler's float32 sigma^2 rounds above 1 - alpha_bar_prev
            # there, and sqrt(1 - alpha_bar_prev - sigma^2) is NaN; the same step in float64 with the clamp
            from .baseline import ddim_step_from_x0
            from .fkc import eps_and_x0

            eps_hat, x0_hat = eps_and_x0(out, x, 0.0, sched.config.prediction_type)
            x = ddim_step_from_x0(sched, eps_hat, t, x, x0_hat, eta=eta, generator=kwargs.get("generator")).prev_sample
        else:
            x = sched.step(out.to(x.dtype), t, x, **kwargs).prev_sample
        ctx.step_done()
    return x


def sample_zero_snr_ddim(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    """``ddim --rescale-zero-snr`` (and any ddim run on a zero-terminal-SNR model)."""
    if opts.get("eps_scale", 1.0) != 1.0 or opts.get("eps_scale_slope", 0.0) != 0.0:
        raise ValueError("--eps-scale / --eps-scale-slope cannot be combined with --rescale-zero-snr "
                         "(the zero-SNR path feeds the raw v / x0 output, not eps)")
    return sample_direct(model, opts, seeds, ctx, zero_snr_scheduler(model, opts["steps"], ctx.device))


def sample_direct(model, opts: dict, seeds: list[int], ctx: RunContext, sched) -> SampleBatch:
    """Samples of ``direct_loop`` with a set stock scheduler built with the model's prediction_type: the
    start noise (``--offset-noise``) at the scheduler's scale, the run's class label, one row per seed."""
    gens = ctx.generators(seeds)
    den = model.denoiser()
    x_T = start_noise(ctx, gens, model.event_shape, opts.get("offset_noise") or 0.0) * sched.init_noise_sigma
    cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
    x = direct_loop(sched, x_T, cond, opts, gens, ctx, den)
    return SampleBatch(x=x, stats={"nfe": den.calls, "model_rows": den.rows})
