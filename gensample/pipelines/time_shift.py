"""Time-Shift for diffusers pipelines (Li et al., ICLR 2024, arXiv 2305.15583; docs/time_shift.md
"Python / diffusers").

Two faces:
- `enable_time_shift(pipe, ...)` makes a *stock* diffusers pipeline with a ``unet`` and a
  ``scheduler`` (DDPM, DDIM, Stable Diffusion, SD inpaint / img2img / depth2img / pix2pix, ...)
  time-shift without editing it: its scheduler becomes a `TimeShiftScheduler` built from the
  pipeline's own scheduler config, and a forward pre-hook on the UNet (not a wrapper module: the
  pipeline's ``unet`` stays the original model, so ``save_pretrained`` writes a loadable folder)
  replaces the timestep the pipeline passes by ``pipe.scheduler.model_timesteps(latents, t)``.
  The hook reads ``pipe.scheduler`` at every call, so swapping the scheduler afterwards works
  (a non-Time-Shift scheduler sees its own timestep unchanged). Under classifier-free guidance
  the UNet input is [x; x], so both halves get the same t_s. Pipelines that concatenate extra
  channels (mask, masked-image latents, depth, image latents) after the latents select t_s on the
  latent channels only (the first ``min(in_channels, out_channels)``), i.e. on what ``step``
  updates. `disable_time_shift(pipe)` undoes it.
- `TimeShiftPipeline`: our own pipeline for unconditional or class-conditional UNet2DModels.
"""

import warnings
import weakref
from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..samplers.time_shift import DEFAULT_VARIANT
from ..schedulers.time_shift import TimeShiftScheduler
from ._images import to_output_type

_TS_KEYS = ("window_size", "cutoff", "variant", "eta", "data_var")


def effective_config(scheduler) -> dict:
    """The scheduler's config values as in effect, without ``_use_default_values``: pipelines such
    as StableDiffusionPipeline patch keys (steps_offset = 1) that the source left at default, and
    ``from_config`` would otherwise replace them by our defaults."""
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def latent_channels(unet) -> Optional[int]:
    """Channels of the state the scheduler steps: the first min(in_channels, out_channels) of the
    UNet input (SD inpaint: 9 in, 4 out; learned-variance UNets: 3 in, 6 out). None if unknown."""
    cfg = getattr(unet, "config", None)
    try:
        return int(min(cfg.in_channels, cfg.out_channels))
    except (AttributeError, TypeError):
        return None


class _TimeShiftHook:
    """Forward pre-hook: timestep -> ``pipe.scheduler.model_timesteps(latents, timestep)``."""

    def __init__(self, pipe, channels: Optional[int]):
        self.pipe = weakref.ref(pipe)
        self.channels = channels

    def __call__(self, module, args, kwargs):
        pipe = self.pipe()
        sched = getattr(pipe, "scheduler", None) if pipe is not None else None
        if not isinstance(sched, TimeShiftScheduler):
            return None  # another scheduler was swapped in: leave the call unchanged
        args = list(args)
        sample = args[0] if args else kwargs["sample"]
        in_args = len(args) > 1
        timestep = args[1] if in_args else kwargs.get("timestep")
        x = sample
        if self.channels is not None and sample.ndim >= 2 and sample.shape[1] > self.channels:
            x = sample[:, : self.channels]  # the latents; extra conditioning channels follow them
        t_model = sched.model_timesteps(x, timestep)  # (B,) int64, handed over to step()
        if in_args:
            args[1] = t_model
        else:
            kwargs["timestep"] = t_model
        return tuple(args), kwargs


def enable_time_shift(
    pipe: DiffusionPipeline,
    window_size: Optional[int] = None,
    cutoff: Optional[int] = None,
    variant: Optional[str] = None,
    eta: Optional[float] = None,
    data_var: Optional[float] = None,
) -> DiffusionPipeline:
    """Turn a stock diffusers pipeline with ``unet`` and ``scheduler`` into a TS sampler, in place.

    window_size / cutoff: None picks the per-step defaults at ``set_timesteps``. variant: None
    keeps the scheduler's (a TimeShiftScheduler already there, e.g. after ``from_pretrained`` of a
    saved TS pipeline, keeps all its TS keys unless overridden) else "paper". eta: the
    scheduler's default eta (pipelines that pass ``eta`` to ``step``, as DDIMPipeline and
    StableDiffusionPipeline do, override it); None: 1.0 for a DDPMScheduler (DDPM-like TS-DDPM),
    else 0.0. data_var: the data-aware statistic (docs/time_shift.md); the paper's statistic on
    a pipeline with a VAE (a latent model) warns. Returns ``pipe``.
    """
    for part in ("unet", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise TypeError(f"pipe must have a `{part}` component, got {type(pipe).__name__}")
    if getattr(pipe, "_ts_state", None) is not None:
        raise ValueError("time shift is already enabled on this pipeline; call disable_time_shift(pipe) first")
    old = pipe.scheduler
    cfg = effective_config(old)
    given = {"window_size": window_size, "cutoff": cutoff, "variant": variant, "eta": eta, "data_var": data_var}
    if isinstance(old, TimeShiftScheduler):
        ts_kw = {k: (v if v is not None else cfg.get(k)) for k, v in given.items()}
    else:
        ts_kw = dict(given)
        ts_kw["eta"] = (1.0 if type(old).__name__ == "DDPMScheduler" else 0.0) if eta is None else eta
    ts_kw["variant"] = ts_kw["variant"] or DEFAULT_VARIANT
    ts_kw["eta"] = float(ts_kw["eta"] or 0.0)
    sched = TimeShiftScheduler.from_config(cfg, **ts_kw)
    if getattr(pipe, "vae", None) is not None and sched.config.data_var is None:
        warnings.warn("enable_time_shift on a latent pipeline: the paper's statistic ignores the data term "
                      "alpha_bar Var(x0), which for latents (variance ~1) makes it pick the noisiest window edge at "
                      "every step; pass data_var=... (docs/time_shift.md 'Data-aware statistic')", stacklevel=2)
    handle = pipe.unet.register_forward_pre_hook(_TimeShiftHook(pipe, latent_channels(pipe.unet)), with_kwargs=True)
    object.__setattr__(pipe, "_ts_state", (handle, old))  # not a pipeline component
    pipe.scheduler = sched
    return pipe


def disable_time_shift(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Remove the UNet hook and restore the scheduler that `enable_time_shift` replaced."""
    state = getattr(pipe, "_ts_state", None)
    if state is None:
        raise ValueError("time shift is not enabled on this pipeline")
    handle, old = state
    handle.remove()
    pipe.scheduler = old
    object.__setattr__(pipe, "_ts_state", None)
    return pipe


class TimeShiftPipeline(DiffusionPipeline):
    """TS-DDIM / TS-DDPM image generation with an unconditional or class-conditional UNet2DModel.

    Any scheduler passed in is converted with ``TimeShiftScheduler.from_config`` (DDIMPipeline idiom).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler):
        super().__init__()
        if not isinstance(scheduler, TimeShiftScheduler):
            scheduler = TimeShiftScheduler.from_config(effective_config(scheduler))
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 10,
        timesteps: Optional[List[int]] = None,
        eta: Optional[float] = None,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers signature)
    ):
        """Sample ``batch_size`` images. eta: None uses the scheduler config's eta (0 DDIM, 1 DDPM-like).
        output_type: "pil" | "np" | "pt" | "latent" (the raw samples, before mapping to [0, 1]).
        class_labels: int or (batch_size,) labels for class-conditional UNets (``num_class_embeds``)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of ['pil', 'np', 'pt', 'latent'], got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator list has length {len(generator)}, expected batch_size={batch_size}")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}, got {bad}")
        cfg = self.unet.config
        size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        shape = (batch_size, cfg.in_channels, *size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        kwargs = {}
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            kwargs["class_labels"] = labels.expand(batch_size) if labels.numel() == 1 else labels
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = self.scheduler.scale_model_input(latents, t)
            t_model = self.scheduler.model_timesteps(x_in, t)
            model_output = self.unet(x_in, t_model, **kwargs, return_dict=False)[0]
            latents = self.scheduler.step(model_output, t, latents, eta=eta, generator=generator,
                                          model_timesteps=t_model).prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                out = callback_on_step_end(self, i, t, tensors) or {}
                latents = out.get("latents", latents)
        if output_type == "latent":
            image = latents
        else:
            image = (latents / 2 + 0.5).clamp(0, 1)
            image = to_output_type(self, image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
