"""Sampler registry: what `gensample run --sampler NAME` can run.

A sampler module registers a ``SamplerSpec`` with ``register(spec)``. Its ``fn`` draws one batch:

    fn(model: LoadedModel, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch

``seeds`` holds one derived seed per output sample (see ``sample_seed``); a sampler makes one
CPU ``torch.Generator`` per sample from them (``ctx.generators(seeds)``) so results do not depend
on batch size, sharding or device. ``opts`` is the resolved option dict (common options plus the
sampler's own ``options``). Method-specific CLI flags are declared as ``Option``s on the spec and
become `gensample run` flags automatically.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.noise import normal_rows
from ..options import FALSE_WORDS, TRUE_WORDS, Option, merge_options, parse_bool  # noqa: F401  (torch-free home; re-exported)


@dataclass
class SampleBatch:
    """One batch of output. x: (n, *event_shape) float samples, or (n, L) int64 tokens.
    extras: per-sample arrays (first dim n) saved into samples.npz beside x.
    stats: counters summed over batches (nfe, head_calls, ...) and traces (lists) kept per batch.
    """

    x: torch.Tensor
    extras: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class RunContext:
    sampler: str
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    progress: Callable[[int], None] | None = None  # called with the number of steps just done
    show_progress: bool = False

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per sample (EDM / diffusers convention: CPU noise, then move)."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def randn(self, gens: Sequence[torch.Generator], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """(len(gens), *shape) standard normal, row b from gens[b] (CPU generators: drawn on CPU), then moved."""
        return normal_rows(gens, shape, device=self.device, dtype=dtype)

    def step_done(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n)


@dataclass
class SamplerSpec:
    name: str
    description: str
    fn: Callable[..., SampleBatch]
    default_model: str
    options: Sequence[Option] = ()
    default_steps: int | Callable[[dict], int] | None = 50
    model_kinds: tuple = ("diffusion",)
    # samples that must stay together in one batch (FKC: particles of one group)
    group_size: Callable[[dict], int] | None = None
    # how many progress units one batch takes (defaults to steps)
    progress_total: Callable[[dict], int] | None = None
    output: str = "continuous"  # "continuous" (x float) | "tokens"
    validate: Callable[[dict, Any], None] | None = None  # extra checks (opts, LoadedModel)
    # extra files after a run: write_extra(out_dir: Path, arrays: dict, model) (ess.png, samples.txt)
    write_extra: Callable[[Any, dict, Any], None] | None = None
    # text models: run.json's rule for which prompt sample i gets, when not prompts[i % P] (FKC groups)
    prompt_of_sample: Callable[[dict], str] | None = None
    # implied(opts, given): fill options that other options imply (opts: resolved; given: keys the user set)
    implied: Callable[[dict, set], None] | None = None
    # group_hint(opts, g) -> the whole fix when --num-samples is not a multiple of the group size g
    group_hint: Callable[[dict, int], str] | None = None
    # runs on flow-matching models (prediction_type "flow", docs/flow_matching.md); else refused with
    # ``flow_refusal`` (the reason) or the generic one
    flow: bool = False
    flow_refusal: str | None = None


FLOW_MODEL_OPTIONS = (  # the flow form of an analytic mixture (docs/flow_matching.md "The exact oracle")
    Option("flow", bool, False, "analytic mixture models: use the model's flow-matching form (exact velocity "
           "E[eps - x0 | x_sigma], FlowMatchEulerDiscreteScheduler config)"),
    Option("flow_shift", float, None, "with --flow: the static sigma shift S of the flow grid "
           "(sigma' = S sigma / (1 + (S - 1) sigma)); default 1", min=1e-6),
)
# The reasons of samplers that do not apply to flows; OMS's is carried on its spec (runs/oms.py), this
# entry stays for callers that quote it for --oms-module on other samplers (api.py)
FLOW_REFUSALS = {
    "oms": "One More Step fixes the terminal-SNR gap of VP schedules (alpha_bar_T > 0); a flow starts at "
           "sigma = 1, pure noise, so there is no gap to fix",
}


def flow_refusal(spec: "SamplerSpec") -> str | None:
    """None when ``spec`` runs on flow models, else the reason it does not."""
    if spec.flow:
        return None
    return spec.flow_refusal or "it has not been ported to flow-matching models"


SAMPLERS: dict[str, SamplerSpec] = {}
_discovered = False


def embedded_guidance(model) -> bool:
    """True for a guidance-distilled model (Flux-dev: ``transformer.config.guidance_embeds``): its loader sets
    ``extras["embedded_guidance"]`` and feeds --guidance-scale to the network as an input (a ``guidance`` row of
    the conditioning), so the scale is not a classifier-free guidance weight there."""
    return bool((getattr(model, "extras", None) or {}).get("embedded_guidance"))


def guidance_opts(model, opts: dict) -> dict:
    """The one sampler-side rule of the guidance scale: ``opts`` as every sampler sees them. On a
    guidance-distilled model --guidance-scale is the embedded guidance, already in the conditioning, so the
    samplers' CFG weight is 1 (one conditional call per step, as FluxPipeline makes) and a CFG target
    (``--fkc-target cfg``: FKC-CFG, smc-post's and fk-steer's CFG target) is refused: it needs a true
    unconditional branch. Other models: ``opts`` unchanged."""
    if not embedded_guidance(model):
        return opts
    if opts.get("fkc_target") == "cfg":
        raise ValueError(f"--fkc-target cfg (classifier-free guidance as a target; implied by --guidance-scale when "
                         f"--fkc-target is not given) needs a true unconditional branch, but model "
                         f"{getattr(model, 'name', '?')!r} is guidance-distilled (guidance_embeds=True): its "
                         f"--guidance-scale is the embedded guidance fed to the network, not a CFG weight; pass "
                         f"--fkc-target anneal or product (the embedded guidance still applies)")
    if opts.get("guidance_scale", 1.0) in (None, 1.0):
        return opts
    return {**opts, "guidance_scale": 1.0}


def _with_guidance_rule(spec: SamplerSpec) -> SamplerSpec:
    """Route a spec's fn and validate through ``guidance_opts`` (once)."""
    if getattr(spec.fn, "_guidance_rule", False):
        return spec
    fn, validate = spec.fn, spec.validate

    @functools.wraps(fn)
    def fn_rule(model, opts, seeds, ctx):
        return fn(model, guidance_opts(model, opts), seeds, ctx)

    def validate_rule(opts, model):
        opts = guidance_opts(model, opts)
        if validate is not None:
            validate(opts, model)

    if validate is not None:
        validate_rule = functools.wraps(validate)(validate_rule)
    fn_rule._guidance_rule = True
    spec.fn, spec.validate = fn_rule, validate_rule
    return spec


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = _with_guidance_rule(spec)
    return spec


def discover() -> dict[str, SamplerSpec]:
    """Import every module of gensample.samplers and gensample.runs (the run glue of methods whose
    math file holds no CLI code) so their specs register."""
    global _discovered
    if not _discovered:
        _discovered = True
        for package in ("gensample.samplers", "gensample.runs"):
            pkg = importlib.import_module(package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if mod.name not in ("registry",) and not mod.name.startswith("_"):
                    importlib.import_module(f"{package}.{mod.name}")
    return SAMPLERS


def get(name: str) -> SamplerSpec:
    discover()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def all_options() -> dict[str, Option]:
    """Every sampler-specific option by key, as the CLI declares it once (``options.merge_options``:
    shared choices are the union of the samplers' values)."""
    discover()
    return merge_options(SAMPLERS.values())


def _type_to_json(t):
    if isinstance(t, tuple):
        return list(t)
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(t, "str")


def manifest_data(deps: Sequence[str] | None = None) -> dict:
    """The sampler manifest (``gensample.options``) as a JSON-able dict: every sampler's name,
    description, demo model, default steps and option declarations, keyed by the SHA-256 of
    ``deps`` (package files the registry is built from; default: every gensample module loaded now)."""
    import sys

    from .. import options

    discover()
    if deps is None:
        deps = options.package_files(sys.modules.values())
    samplers = {}
    for name, spec in sorted(SAMPLERS.items()):
        steps = spec.default_steps
        samplers[name] = {
            "description": spec.description, "default_model": spec.default_model,
            "default_steps": None if callable(steps) else steps, "output": spec.output,
            "grouped": spec.group_size is not None,
            "options": [{"name": o.name, "type": _type_to_json(o.type), "default": o.default, "help": o.help,
                         "min": o.min, "max": o.max, "checked": o.check is not None} for o in spec.options],
        }
    deps = sorted(set(deps))
    return {"format": options.MANIFEST_FORMAT, "key": options.source_key(deps), "deps": deps, "samplers": samplers}


def sample_seed(seed: int, index: int) -> int:
    """Per-sample seed from (global seed, sample index): independent of batch, shard and world size."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
