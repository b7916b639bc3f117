"""Config hygiene shared by the DDPM-family scheduler faces (TimeShift, FKC, DiSA head, masked
diffusion): flow-matching configs are refused, and keys shared with DDIM/DDPM keep the source's value;
``calling_pipeline`` tells a face which diffusers pipeline is running it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

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


def refuse_flow_config(config, cls_name: str) -> None:
    """Raise ValueError when ``config`` is a flow-matching scheduler config (``flow_matching_reason``).
    Flow matching (x_sigma = (1 - sigma) x0 + sigma eps, a velocity model) has no betas table: a
    DDPM-family face built from it would fall back to default betas and run the model on wrong noise
    levels."""
    reason = flow_matching_reason(config)
    if reason is not None:
        raise ValueError(
            f"flow-matching schedulers are not supported by {cls_name} yet: config is a flow-matching scheduler "
            f"config ({reason}); {cls_name} needs a DDPM-family config (betas: DDPMScheduler, DDIMScheduler, "
            f"PNDMScheduler, EulerDiscreteScheduler, ...). Without betas its from_config would silently fall back "
            f"to the default DDPM schedule.")


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
