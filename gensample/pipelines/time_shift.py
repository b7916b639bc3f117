"""Time-Shift for diffusers pipelines (Li et al., ICLR 2024, arXiv 2305.15583; specs/time_shift.md sec. 4).

Two faces:
- `enable_time_shift(pipe, ...)` makes a *stock* DDPMPipeline / DDIMPipeline /
  StableDiffusionPipeline time-shift without editing it: its scheduler becomes a
  `TimeShiftScheduler` built from the pipeline's own scheduler config, and its UNet is wrapped in
  `TimeShiftModelWrapper`, which swaps the timestep the pipeline passes for
  ``scheduler.model_timesteps(sample, t)``. Under classifier-free guidance the UNet input is
  [x; x], so both halves get the same t_s. `disable_time_shift(pipe)` undoes it.
- `TimeShiftPipeline`: our own pipeline for unconditional or class-conditional UNet2DModels.

The scheduler recomputes t_s from the same sample in ``step`` (no hidden state), so the wrapper
and the scheduler agree as long as the pipeline feeds the UNet the sample it steps
(``scale_model_input`` is the identity for VP schedulers).
"""

from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin  # noqa: F401  (SchedulerMixin: module exposes the base)
from diffusers.utils.torch_utils import randn_tensor

from ..samplers.time_shift import DEFAULT_VARIANT, TimeShiftScheduler


class TimeShiftModelWrapper(torch.nn.Module):
    """Calls ``unet(sample, scheduler.model_timesteps(sample, timestep), ...)``.

    Attribute reads the wrapper does not have (``config``, ``dtype``, ``device``, ...) fall
    through to the wrapped UNet, so pipelines use it like the UNet itself.
    """

    def __init__(self, unet: torch.nn.Module, scheduler: TimeShiftScheduler):
        super().__init__()
        if not isinstance(scheduler, TimeShiftScheduler):
            raise TypeError(f"scheduler must be a TimeShiftScheduler, got {type(scheduler).__name__}")
        self.unet = unet
        object.__setattr__(self, "ts_scheduler", scheduler)  # not a submodule

    def forward(self, sample: torch.Tensor, timestep, *args, **kwargs):
        t_model = self.ts_scheduler.model_timesteps(sample, timestep)  # (B,) int64
        return self.unet(sample, t_model, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)


def effective_config(scheduler) -> dict:
    """The scheduler's config values as in effect, without ``_use_default_values``: pipelines such
    as StableDiffusionPipeline patch keys (steps_offset = 1) that the source left at default, and
    ``from_config`` would otherwise replace them by our defaults."""
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def enable_time_shift(
    pipe: DiffusionPipeline,
    window_size: Optional[int] = None,
    cutoff: Optional[int] = None,
    variant: str = DEFAULT_VARIANT,
    eta: Optional[float] = None,
) -> DiffusionPipeline:
    """Turn a stock diffusers pipeline with ``unet`` and ``scheduler`` into a TS sampler, in place.

    window_size / cutoff: None picks the spec's per-step defaults at ``set_timesteps``.
    eta: the scheduler's default eta (pipelines that pass ``eta`` to ``step``, as DDIMPipeline
    and StableDiffusionPipeline do, override it); None: 1.0 for a DDPMScheduler (DDPM-like
    TS-DDPM), else 0.0. Returns ``pipe``.
    """
    for part in ("unet", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise TypeError(f"pipe must have a `{part}` component, got {type(pipe).__name__}")
    if isinstance(pipe.unet, TimeShiftModelWrapper):
        raise ValueError("time shift is already enabled on this pipeline; call disable_time_shift(pipe) first")
    if eta is None:
        eta = 1.0 if type(pipe.scheduler).__name__ == "DDPMScheduler" else 0.0
    sched = TimeShiftScheduler.from_config(effective_config(pipe.scheduler), window_size=window_size, cutoff=cutoff,
                                           variant=variant, eta=float(eta))
    pipe._ts_original = (pipe.unet, pipe.scheduler)
    pipe.scheduler = sched
    pipe.unet = TimeShiftModelWrapper(pipe._ts_original[0], sched)
    return pipe


def disable_time_shift(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Restore the UNet and scheduler that `enable_time_shift` replaced."""
    original = getattr(pipe, "_ts_original", None)
    if original is None:
        raise ValueError("time shift is not enabled on this pipeline")
    pipe.unet, pipe.scheduler = original
    del pipe._ts_original
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
        output_type: "pil" | "np" | "pt". class_labels: int or (batch_size,) labels for
        class-conditional UNets (``num_class_embeds``)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be one of ['pil', 'np', 'pt'], got {output_type!r}")
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
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
