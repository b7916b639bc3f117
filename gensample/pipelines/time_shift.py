"""Time-Shift for diffusers pipelines (Li et al., ICLR 2024, arXiv 2305.15583; docs/time_shift.md
"Python / diffusers").

Two faces:
- `enable_time_shift(pipe, ...)` makes a *stock* diffusers pipeline with a ``unet`` and a
  ``scheduler`` (DDPM, DDIM, Stable Diffusion, SD inpaint / img2img / depth2img / pix2pix, ...)
  time-shift without editing it: its scheduler becomes a `TimeShiftScheduler` built from the
  pipeline's own scheduler config, and a forward pre-hook on the UNet replaces the timestep the
  pipeline passes by ``pipe.scheduler.model_timesteps(latents, t)``. `disable_time_shift(pipe)`
  undoes it.
- `TimeShiftPipeline`: our own pipeline for unconditional or class-conditional UNet2DModels.

Per-pipeline design (docs/time_shift.md "Several pipelines, one UNet"). A UNet is a module that
several pipelines may share (``from_pipe``, components passed by hand), so a hook on it must know
*whose* call is running. ``enable_time_shift`` marks the pipeline (``_ts_state``) and puts at most
one hook on a UNet, whatever the number of pipelines enabled on it. At each UNet call the hook looks
up the calling pipeline on the call stack: the innermost frame whose ``self`` is a
``DiffusionPipeline`` (the pipeline's ``__call__`` or a method it calls; per thread, so concurrent
calls are told apart). It shifts the timestep only when that pipeline enabled Time-Shift on this
very UNet and its current scheduler is a ``TimeShiftScheduler``; otherwise the call passes
unchanged. Hence:
- a pipeline that did not enable Time-Shift is untouched, whatever it shares: a ``from_pipe``
  copy that keeps the stock scheduler runs stock; one that shares our ``TimeShiftScheduler``
  object (pipelines that keep the scheduler they get, e.g. DDPMPipeline, StableDiffusionPipeline)
  is not fed shifted times, so its step raises with the fix (``enable_time_shift`` on it) instead
  of mixing DDIM and Time-Shift;
- any number of pipelines sharing a UNet can be enabled; each call uses its own scheduler;
- a scheduler swapped in after enabling is honoured (a stock one sees its own timesteps);
- the UNet stays the original model (no wrapper), so ``save_pretrained`` writes a loadable folder.
Rejected alternatives: a flag that the scheduler sets between ``set_timesteps`` and its last step
stays set when a run stops early (exception, ``interrupt``) and would then shift another
pipeline's call; wrapping ``__call__`` per instance needs a per-instance subclass (``type(pipe)``
changes). The look-up does not run the model: a handful of frame reads per UNet call.

Under classifier-free guidance the UNet input is [x; x], so both halves get the same t_s.
Pipelines that concatenate extra channels (mask, masked-image latents, depth, image latents) after
the latents select t_s on the latent channels only (the first ``min(in_channels, out_channels)``),
i.e. on what ``step`` updates.
"""

import sys
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..samplers.time_shift import DEFAULT_VARIANT
from ..schedulers._config import calling_pipeline, refuse_flow_config
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
    """The one forward pre-hook per UNet: timestep -> ``pipe.scheduler.model_timesteps(latents, t)``
    for the calling pipeline ``pipe`` when it enabled Time-Shift on this UNet, else unchanged.
    ``users`` holds the enabled pipelines (weakly, by id) so that the last ``disable`` removes it."""

    def __init__(self):
        self.users: dict = {}  # id(pipe) -> weakref.ref(pipe)
        self.handle = None

    def live_users(self) -> list:
        self.users = {k: r for k, r in self.users.items() if r() is not None}
        return [r() for r in self.users.values()]

    def __call__(self, module, args, kwargs):
        pipe = calling_pipeline(sys._getframe(1))  # from torch's module call that ran this hook outwards
        state = getattr(pipe, "_ts_state", None) if pipe is not None else None
        if state is None or state.get("unet") is not module or getattr(pipe, "unet", None) is not module:
            return None  # not a Time-Shift pipeline's call (or its UNet was replaced): unchanged
        sched = getattr(pipe, "scheduler", None)
        if not isinstance(sched, TimeShiftScheduler):
            return None  # another scheduler was swapped in: leave the call unchanged
        args = list(args)
        sample = args[0] if args else kwargs["sample"]
        in_args = len(args) > 1
        timestep = args[1] if in_args else kwargs.get("timestep")
        x = sample
        channels = latent_channels(module)
        if channels is not None and sample.ndim >= 2 and sample.shape[1] > channels:
            x = sample[:, :channels]  # the latents; extra conditioning channels follow them
        t_model = sched.model_timesteps(x, timestep)  # (B,) int64, handed over to step()
        if in_args:
            args[1] = t_model
        else:
            kwargs["timestep"] = t_model
        return tuple(args), kwargs


def _hook_of(unet) -> Optional[_TimeShiftHook]:
    for hook in unet._forward_pre_hooks.values():
        if isinstance(hook, _TimeShiftHook):
            return hook
    return None


def enable_time_shift(
    pipe: DiffusionPipeline,
    window_size: Optional[int] = None,
    cutoff: Optional[int] = None,
    variant: Optional[str] = None,
    eta: Optional[float] = None,
    data_var: Optional[float] = None,
) -> DiffusionPipeline:
    """Turn a stock diffusers pipeline with ``unet`` and ``scheduler`` into a TS sampler, in place.

    Only ``pipe`` is affected: other pipelines sharing its UNet (``from_pipe``) keep running stock
    unless enabled too (module docstring). Each argument left None takes the value the pipeline's
    scheduler config carries (a saved ``TimeShiftScheduler``, or the hidden keys a stock scheduler
    keeps after ``DDIMPipeline`` converted it, e.g. after ``from_pretrained``), else the default:
    window_size / cutoff: the per-step defaults at ``set_timesteps``; variant: "paper"; eta: 1.0
    for a DDPMScheduler (DDPM-like TS-DDPM), else 0.0 (pipelines that pass ``eta`` to ``step``, as
    DDIMPipeline and StableDiffusionPipeline do, override it); data_var: the paper's statistic (on
    a pipeline with a VAE, a latent model, this warns; docs/time_shift.md "Data-aware statistic").
    A flow-matching scheduler (SD3, Flux) is refused with a ValueError. Returns ``pipe``.
    """
    sched_old = getattr(pipe, "scheduler", None)
    if sched_old is not None and hasattr(sched_old, "config"):
        refuse_flow_config(sched_old.config, "TimeShiftScheduler")
    for part in ("unet", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise TypeError(f"pipe must have a `{part}` component, got {type(pipe).__name__}")
    if getattr(pipe, "_ts_state", None) is not None:
        raise ValueError("time shift is already enabled on this pipeline; call disable_time_shift(pipe) first")
    if isinstance(pipe, TimeShiftPipeline):
        raise ValueError("pipe is a TimeShiftPipeline, which time-shifts by itself; enable_time_shift is for stock "
                         "pipelines")
    old = pipe.scheduler
    cfg = effective_config(old)
    given = {"window_size": window_size, "cutoff": cutoff, "variant": variant, "eta": eta, "data_var": data_var}
    ts_kw = {k: (v if v is not None else cfg.get(k)) for k, v in given.items()}
    if ts_kw["eta"] is None:
        ts_kw["eta"] = 1.0 if type(old).__name__ == "DDPMScheduler" else 0.0
    ts_kw["variant"] = ts_kw["variant"] or DEFAULT_VARIANT
    ts_kw["eta"] = float(ts_kw["eta"])
    sched = TimeShiftScheduler.from_config(cfg, **ts_kw)
    if getattr(pipe, "vae", None) is not None and sched.config.data_var is None:
        warnings.warn("enable_time_shift on a latent pipeline: the paper's statistic ignores the data term "
                      "alpha_bar Var(x0), which for latents (variance ~1) makes it pick the noisiest window edge at "
                      "every step; pass data_var=... (docs/time_shift.md 'Data-aware statistic')", stacklevel=2)
    unet = pipe.unet
    hook = _hook_of(unet)
    if hook is None:
        hook = _TimeShiftHook()
        hook.handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    hook.users[id(pipe)] = weakref.ref(pipe)
    object.__setattr__(pipe, "_ts_state", {"unet": unet, "scheduler": old})  # not a pipeline component
    pipe.scheduler = sched
    return pipe


def disable_time_shift(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Restore the scheduler that `enable_time_shift` replaced; the UNet's hook goes when no other
    enabled pipeline uses it."""
    state = getattr(pipe, "_ts_state", None)
    if state is None:
        raise ValueError("time shift is not enabled on this pipeline")
    hook = _hook_of(state["unet"])
    if hook is not None:
        hook.users.pop(id(pipe), None)
        if not hook.live_users():
            hook.handle.remove()
    pipe.scheduler = state["scheduler"]
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
