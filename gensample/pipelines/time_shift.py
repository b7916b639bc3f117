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

Flow pipelines (SD3 / SD3.5, Flux: a ``FlowMatchEulerDiscreteScheduler`` and a ``transformer``):
``enable_time_shift`` installs `FlowTimeShiftScheduler` (gensample.schedulers.flow_time_shift) and one
forward pre-hook per transformer with the same per-pipeline rules. The transformer's ``timestep``
keyword is the grid time in the pipeline's own units (SD3: t; Flux: t / 1000, computed as
``t.to(dtype) / 1000``); the hook recognises the unit by recomputing the current grid time the way the
pipeline does, and writes the selected model time back in that unit. A call in which no row shifts
is left untouched, so ``window_size=0`` is the stock pipeline bit for bit.

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
from ..schedulers._config import calling_pipeline, flow_matching_reason
from ..schedulers.flow_time_shift import FlowTimeShiftScheduler
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


def _hook_of(module, cls=None) -> Optional[_TimeShiftHook]:
    """The Time-Shift hook of class ``cls`` (exactly: the flow hook subclasses the UNet one) on ``module``."""
    cls = _TimeShiftHook if cls is None else cls
    for hook in module._forward_pre_hooks.values():
        if type(hook) is cls:
            return hook
    return None


def _ts_kwargs(cfg: dict, given: dict, default_eta: float) -> dict:
    """The Time-Shift keywords of a new face: the caller's, else the scheduler config's (a saved face keeps its
    window / cutoff / variant), the variant's default and ``default_eta``."""
    ts_kw = {k: (v if v is not None else cfg.get(k)) for k, v in given.items()}
    ts_kw["variant"] = ts_kw["variant"] or DEFAULT_VARIANT
    ts_kw["eta"] = float(default_eta if ts_kw["eta"] is None else ts_kw["eta"])
    return ts_kw


def _install(pipe, module, key: str, hook_cls, old, sched):
    """The hook on ``module`` (one per module, shared by every pipeline that enabled it), the pipeline's state
    (``key``: "unet" or "transformer", and the scheduler to restore) and its new scheduler."""
    hook = _hook_of(module, hook_cls)
    if hook is None:
        hook = hook_cls()
        hook.handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    hook.users[id(pipe)] = weakref.ref(pipe)
    object.__setattr__(pipe, "_ts_state", {key: module, "scheduler": old})  # not a pipeline component
    pipe.scheduler = sched


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
    A flow-matching pipeline (a ``FlowMatchEulerDiscreteScheduler``: SD3 / SD3.5, Flux) gets a
    `FlowTimeShiftScheduler` and a hook on its ``transformer`` instead (module docstring, "Flow
    pipelines"); ``window_size=0`` then reproduces the stock pipeline bit for bit. Returns ``pipe``.
    """
    sched_old = getattr(pipe, "scheduler", None)
    if sched_old is not None and flow_matching_reason(dict(getattr(sched_old, "config", None) or {})) is not None:
        return _enable_flow_time_shift(pipe, window_size, cutoff, variant, eta, data_var)
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
    ts_kw = _ts_kwargs(cfg, given, 1.0 if type(old).__name__ == "DDPMScheduler" else 0.0)
    sched = TimeShiftScheduler.from_config(cfg, **ts_kw)
    if getattr(pipe, "vae", None) is not None and sched.config.data_var is None:
        warnings.warn("enable_time_shift on a latent pipeline: the paper's statistic ignores the data term "
                      "alpha_bar Var(x0), which for latents (variance ~1) makes it pick the noisiest window edge at "
                      "every step; pass data_var=... (docs/time_shift.md 'Data-aware statistic')", stacklevel=2)
    _install(pipe, pipe.unet, "unet", _TimeShiftHook, old, sched)
    return pipe


def disable_time_shift(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Restore the scheduler that `enable_time_shift` replaced; the UNet's hook goes when no other
    enabled pipeline uses it."""
    state = getattr(pipe, "_ts_state", None)
    if state is None:
        raise ValueError("time shift is not enabled on this pipeline")
    hook = (_hook_of(state["transformer"], _FlowTimeShiftHook) if "transformer" in state
            else _hook_of(state["unet"], _TimeShiftHook))
    if hook is not None:
        hook.users.pop(id(pipe), None)
        if not hook.live_users():
            hook.handle.remove()
    pipe.scheduler = state["scheduler"]
    object.__setattr__(pipe, "_ts_state", None)
    return pipe


# -- flow-matching pipelines (SD3 / SD3.5, Flux) -------------------------------------------------
class _FlowTimeShiftHook(_TimeShiftHook):
    """The one forward pre-hook per flow transformer: its ``timestep`` keyword (the grid time in the
    pipeline's own units: t for SD3, t / 1000 for Flux) -> the calling pipeline's
    ``scheduler.model_timesteps(hidden_states, t)`` in the same units, only when that pipeline enabled
    Time-Shift on this transformer and its scheduler is a `FlowTimeShiftScheduler`; a call whose rows
    are all unshifted passes untouched (so ``window_size=0`` is the stock pipeline bit for bit)."""

    def __call__(self, module, args, kwargs):
        pipe = calling_pipeline(sys._getframe(1))
        state = getattr(pipe, "_ts_state", None) if pipe is not None else None
        if state is None or state.get("transformer") is not module or getattr(pipe, "transformer", None) is not module:
            return None
        sched = getattr(pipe, "scheduler", None)
        if (not isinstance(sched, FlowTimeShiftScheduler) or sched.timesteps is None or sched.window_size_eff is None
                or not sched.shifting):
            return None
        received = kwargs.get("timestep")
        sample = kwargs.get("hidden_states", args[0] if args else None)
        if received is None or sample is None:
            raise ValueError(f"Time-Shift on {type(module).__name__}: the pipeline passed no timestep / hidden_states "
                             f"keyword; it cannot be fed the per-sample model time")
        received = torch.as_tensor(received)
        r0 = received.reshape(-1)[0]
        known = sched.step_index is not None or sched.begin_index is not None
        ks = [sched.current_index()] if known else range(len(sched.timesteps))
        divisor = k = None
        for d in (1, int(sched.config.num_train_timesteps)):
            grid = sched.timesteps.to(device=received.device, dtype=received.dtype)
            grid = grid if d == 1 else grid / d  # the pipeline's own op order: t.to(dtype) / 1000
            hit = [i for i in ks if bool(grid[i] == r0)]
            if hit:
                divisor, k = d, hit[0]
                break
        grid = sched.timesteps[sched.current_index() if k is None else k]
        if divisor is None:
            raise ValueError(f"Time-Shift on {type(pipe).__name__}: the transformer got timestep {float(r0)}, which is "
                             f"neither the scheduler's grid time {float(grid)} nor that time / "
                             f"{int(sched.config.num_train_timesteps)}; this pipeline's time units are unknown")
        t_model = sched.model_timesteps(sample, sched.timesteps[k])  # (rows,) float32, handed over to step()
        if bool((t_model == grid.float().to(t_model.device)).all()):
            return None  # unshifted step: the call stays the stock one
        new = t_model.to(device=received.device, dtype=received.dtype)
        if divisor != 1:
            new = new / divisor
        kwargs["timestep"] = new.reshape(received.shape) if received.numel() == new.numel() else new
        return tuple(args), kwargs



def _enable_flow_time_shift(pipe, window_size, cutoff, variant, eta, data_var):
    """`enable_time_shift` on a flow-matching pipeline: a `FlowTimeShiftScheduler` from the pipeline's
    scheduler config and the transformer hook. eta defaults to 0 (the Euler / DDIM(0) step)."""
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(pipe, DiffusionPipeline) or not isinstance(transformer, torch.nn.Module):
        what = ("is not a diffusers DiffusionPipeline" if not isinstance(pipe, DiffusionPipeline)
                else "has no `transformer` component")
        raise ValueError(f"flow-matching schedulers are not supported by TimeShiftScheduler on {type(pipe).__name__}: "
                         f"its scheduler is a flow-matching one, which needs the flow face (FlowTimeShiftScheduler) "
                         f"feeding the model time to the `transformer` of a diffusers pipeline (StableDiffusion3Pipeline, "
                         f"FluxPipeline, ...); {type(pipe).__name__} {what}")
    if getattr(pipe, "_ts_state", None) is not None:
        raise ValueError("time shift is already enabled on this pipeline; call disable_time_shift(pipe) first")
    old = pipe.scheduler
    cfg = effective_config(old)
    given = {"window_size": window_size, "cutoff": cutoff, "variant": variant, "eta": eta, "data_var": data_var}
    sched = FlowTimeShiftScheduler.from_config(cfg, **_ts_kwargs(cfg, given, 0.0))
    if getattr(pipe, "vae", None) is not None and sched.config.data_var is None and sched.config.window_size != 0:
        warnings.warn("enable_time_shift on a latent flow pipeline: the paper's statistic sigma^2 ignores the data "
                      "term (1 - sigma)^2 Var(x0); pass data_var=... (docs/time_shift.md 'Data-aware statistic')",
                      stacklevel=3)
    _install(pipe, transformer, "transformer", _FlowTimeShiftHook, old, sched)
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
