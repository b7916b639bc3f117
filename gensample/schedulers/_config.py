"""Config hygiene shared by the DDPM-family scheduler faces (TimeShift, FKC, DiSA head, masked
diffusion): flow-matching configs are refused, and keys shared with DDIM/DDPM keep the source's value;
``calling_pipeline`` tells a face which diffusers pipeline is running it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.configuration_utils import FrozenDict

# Keys that mark a flow-matching config (x_sigma = (1 - sigma) x0 + sigma eps, no betas table):
# FlowMatchEulerDiscreteScheduler and friends. Used with BETA_KEYS: a flow config has none of those.
FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
             "shift_terminal", "invert_sigmas")
BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")
# Every constructor key of diffusers' DDIMScheduler and DDPMScheduler (the DDPM family).
DDPM_FAMILY_KEYS = frozenset((set(inspect.signature(DDIMScheduler.__init__).parameters)
                              | set(inspect.signature(DDPMScheduler.__init__).parameters)) - {"self"})


def flow_matching_reason(config) -> str | None:
    """Why ``config`` (a scheduler config dict) is a flow-matching one, or None if it is not:
    a ``FlowMatch*`` class name, ``use_flow_sigmas`` / ``prediction_type="flow_prediction"`` (the
    flow mode of DPM-Solver/UniPC), or flow keys (shift, use_dynamic_shifting, ...) with no betas."""
    if not isinstance(config, Mapping):
        return None
    name = config.get("_class_name")
    if isinstance(name, str) and name.startswith("FlowMatch"):
        return f"its _class_name is {name}"
    if config.get("use_flow_sigmas"):
        return "it sets use_flow_sigmas=True"
    if config.get("prediction_type") == "flow_prediction":
        return "its prediction_type is 'flow_prediction'"
    flow = [k for k in FLOW_KEYS if k in config]
    if flow and not any(k in config for k in BETA_KEYS):
        return f"it has {', '.join(flow)} and none of {', '.join(BETA_KEYS)}"
    return None


# What to use instead of a DDPM-family face on a flow-matching model (SD3 / SD3.5, Flux), per face.
FLOW_FIXES = {
    "TimeShiftScheduler": "for Time-Shift on a flow model use gensample.schedulers.FlowTimeShiftScheduler.from_config"
                          "(config), in a stock pipeline gensample.pipelines.time_shift.enable_time_shift(pipe)",
    "FKCScheduler": "FKC on a flow model (SD3 / SD3.5, Flux) runs through `gensample run --sampler fkc --model "
                    "<pipeline folder>` (gensample.api), which steps the flow's SDE proposal and keeps the weights",
}


def is_flow_match_config(config) -> bool:
    """True for a FlowMatchEulerDiscreteScheduler-style config (a ``FlowMatchEuler`` / ``FlowMatchHeun``
    class name, or the flow keys without betas and without a class name), which
    ``FlowTimeShiftScheduler`` can take over; False for DPM-Solver / UniPC flow modes."""
    if not isinstance(config, Mapping) or flow_matching_reason(config) is None:
        return False
    name = config.get("_class_name")
    if name is not None:
        return name in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowTimeShiftScheduler")
    return not config.get("use_flow_sigmas") and config.get("prediction_type") != "flow_prediction"


def refuse_flow_config(config, cls_name: str, fix: str | None = None) -> None:
    """Raise ValueError when ``config`` is a flow-matching scheduler config (``flow_matching_reason``).
    Flow matching (x_sigma = (1 - sigma) x0 + sigma eps, a velocity model) has no betas table: a
    DDPM-family face built from it would fall back to default betas and run the model on wrong noise
    levels. The message names the fix (``fix``, else ``FLOW_FIXES[cls_name]`` when there is one)."""
    reason = flow_matching_reason(config)
    if reason is not None:
        fix = fix if fix is not None else FLOW_FIXES.get(cls_name)
        raise ValueError(
            f"flow-matching schedulers are not supported by {cls_name}: config is a flow-matching scheduler "
            f"config ({reason}); {cls_name} needs a DDPM-family config (betas: DDPMScheduler, DDIMScheduler, "
            f"PNDMScheduler, EulerDiscreteScheduler, ...). Without betas its from_config would silently fall back "
            f"to the default DDPM schedule." + (f" Instead: {fix}." if fix else ""))


def flow_pipeline_reason(pipe) -> str | None:
    """Why ``pipe`` is a flow-matching pipeline (its constructor types ``scheduler`` as a FlowMatch*
    scheduler: StableDiffusion3Pipeline, FluxPipeline, ...), or None."""
    try:
        ann = inspect.signature(type(pipe).__init__).parameters["scheduler"].annotation
    except (KeyError, TypeError, ValueError):
        return None
    name = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return f"{type(pipe).__name__} takes a {name}" if "FlowMatch" in str(name) else None


def refuse_in_flow_pipeline(scheduler, frame) -> None:
    """Raise ValueError when the pipeline running ``scheduler`` (``calling_pipeline`` from ``frame``)
    is a flow-matching one: a DDPM-family face there would run a velocity model on DDPM betas."""
    pipe = calling_pipeline(frame, max_frames=64)
    reason = flow_pipeline_reason(pipe) if pipe is not None else None
    if reason is None:
        return
    cls_name = type(scheduler).__name__
    fix = FLOW_FIXES.get(cls_name)
    raise ValueError(f"{cls_name} cannot run in {type(pipe).__name__}: it is a flow-matching pipeline ({reason}; "
                     f"x_sigma = (1 - sigma) x0 + sigma eps, a velocity model) and {cls_name} steps a DDPM betas "
                     f"schedule, so every step would use wrong noise levels." + (f" Instead: {fix}." if fix else ""))


class SourceValuesWin:
    """Mixin for a ``SchedulerMixin, ConfigMixin`` class that shares keys with DDIM/DDPM.

    diffusers lists the keys a config took from its constructor's defaults in
    ``_use_default_values``, and ``from_config`` then drops them so that the *target* class's
    defaults apply. Where the two classes' defaults differ (our ``clip_sample=False`` against DDIM's
    True) the value in effect would change silently on every conversion. For the keys we share with
    DDIM/DDPM the value in effect wins both ways: ``from_config`` keeps the source's value, and our own
    config does not mark shared keys as defaulted (so ``DDIMScheduler.from_config(ours.config)`` keeps
    ours). Keys of our own (window_size, disa_temperature, ...) keep diffusers' rule. ``from_config``
    also refuses flow-matching configs (``refuse_flow_config``).
    """

    @classmethod
    def _shared_keys(cls) -> frozenset:
        return DDPM_FAMILY_KEYS & frozenset(inspect.signature(cls.__init__).parameters)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        if isinstance(config, dict):
            refuse_flow_config(config, cls.__name__)
            defaulted = config.get("_use_default_values")
            if defaulted:
                shared = cls._shared_keys()
                config = {**config, "_use_default_values": [k for k in defaulted if k not in shared]}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _mark_shared_keys_explicit(self) -> None:
        """Drop our shared keys from our own ``_use_default_values`` (call at the end of __init__)."""
        defaulted = self._internal_dict.get("_use_default_values")
        if defaulted:
            shared = self._shared_keys()
            self._internal_dict = FrozenDict({**self._internal_dict,
                                              "_use_default_values": [k for k in defaulted if k not in shared]})


def calling_pipeline(frame, modular: bool = False, max_frames: int | None = None):
    """The innermost diffusers pipeline running a method on the call stack from ``frame`` outwards
    (a frame whose first argument ``self`` is a ``DiffusionPipeline``; with ``modular`` also a
    modular pipeline or block), or None. Per thread, so concurrent calls are told apart; a handful
    of frame reads, no model work. ``max_frames``: stop after that many frames (None: the whole stack)."""
    seen = 0
    while frame is not None and (max_frames is None or seen < max_frames):
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = frame.f_locals.get("self")
            if obj is not None and (isinstance(obj, DiffusionPipeline) or
                                    (modular and type(obj).__module__.startswith("diffusers.modular_pipelines"))):
                return obj
        frame = frame.f_back
        seen += 1
    return None


def check_model_times(grid_t, t_model: torch.Tensor, handed, dtype: torch.dtype) -> None:
    """Check that the model saw the times the Time-Shift update uses (raises otherwise): the
    ``model_timesteps`` handed to ``step`` (None: the model saw the grid time ``grid_t``; a CFG batch
    of copies [x; x] is accepted) must equal ``t_model``, the times the scheduler selects. ``dtype``:
    the units' dtype (long for VP tables, float for flow times). Shared by the VP and flow faces."""
    B = t_model.shape[0]
    if handed is None:
        if (t_model != grid_t).any():
            raise ValueError(
                f"Time-Shift evaluates the model at shifted times (e.g. {t_model[t_model != grid_t][0].item()} instead "
                f"of grid time {grid_t}), but no model time was handed to step(): the model was evaluated at the grid "
                f"time. In a stock diffusers pipeline call gensample.pipelines.time_shift.enable_time_shift(pipe) "
                f"instead of assigning the scheduler (window_size=0 runs the stock scheduler); in your own loop call "
                f"t_s = scheduler.model_timesteps(sample, t) and feed t_s to the model.")
        return
    handed = torch.as_tensor(handed, device=t_model.device).to(dtype).reshape(-1)
    if handed.numel() == 1:
        handed = handed.expand(B)
    elif handed.numel() != B and handed.numel() % B == 0:
        chunks = handed.reshape(-1, B)  # a CFG-style batch of copies [x; x; ...]
        if not (chunks == chunks[0]).all():
            raise ValueError(f"model_timesteps has {handed.numel()} rows whose {B}-row chunks differ")
        handed = chunks[0]
    if handed.shape != t_model.shape or not torch.equal(handed, t_model):
        raise ValueError("model_timesteps differs from model_timesteps(sample, timestep): the model saw other times "
                         "than the update would use (pass the sample the model saw; for pipelines that "
                         "concatenate extra channels, select on the latent channels only)")
