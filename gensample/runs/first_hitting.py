"""`gensample run --sampler fhs | mdm-ancestral`: the masked-diffusion samplers' run options, batch
function and registration.

The method (first-hitting sampler, Zheng et al. 2024; MDLM's cached ancestral sampler) and its loops
live in ``gensample.samplers.first_hitting``, its ``MaskedDiffusionScheduler`` in
``gensample.schedulers.first_hitting``; this module reads the
model's tokenizer / mask id / schedule, builds a ``MaskedDiffusionConfig`` (defaults: its fields,
``first_hitting.DEFAULTS``) and registers the two specs (docs/first_hitting.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.categorical import PRECISIONS
from ..io import atomic_write_bytes
from ..samplers.first_hitting import (
    DEFAULTS,
    FINAL_STEPS,
    SCHEDULES,
    MaskedDiffusionConfig,
    initial_tokens,
    sample_ancestral,
    sample_first_hitting,
)
from ..samplers.registry import Option, RunContext, SampleBatch, SamplerSpec, register


def _sequence_length(opts: dict, model) -> int:
    length = opts.get("length") or model.extras["length"]
    max_len = model.extras.get("max_length", model.extras["length"])
    if max_len is not None and length > max_len:
        raise ValueError(f"--length must be <= {max_len} for model {model.name!r}, got {length}")
    return int(length)


def _prompt_ids(opts: dict, model) -> list[int]:
    text = opts.get("prompt")
    return [] if not text else list(model.extras["tokenizer"].encode(text))


def _validate(opts: dict, model, fhs: bool) -> None:
    materialize = model.extras.get("materialize")
    if materialize is not None:  # mlm: loads its network here, where --trust-remote-code is known
        materialize(bool(opts.get("trust_remote_code")))
    length = _sequence_length(opts, model)
    prompt = _prompt_ids(opts, model)
    if len(prompt) >= length:
        raise ValueError(f"--prompt encodes to {len(prompt)} tokens; it must be shorter than --length ({length})")
    if fhs and opts.get("steps") is not None:
        raise ValueError("--steps does not apply to fhs (it makes one model call per revealed token); "
                         "use --tokens-per-step to reveal several tokens per call")
    chain = model.extras.get("chain")
    if chain is not None and prompt and not torch.isfinite(chain.log_prob(torch.tensor([prompt]))).all():
        raise ValueError(f"--prompt {opts.get('prompt')!r} has probability 0 under the Markov chain")


def _make_cfg(opts: dict, model, steps: int | None) -> MaskedDiffusionConfig:
    return MaskedDiffusionConfig(
        mask_token_id=int(model.extras["mask_token_id"]),
        schedule=opts.get("masking_schedule") or model.extras.get("masking_schedule") or DEFAULTS["schedule"],
        num_inference_steps=steps, final_step=opts.get("final_step") or DEFAULTS["final_step"],
        tokens_per_step=int(opts.get("tokens_per_step") or DEFAULTS["tokens_per_step"]),
        precision=opts.get("precision") or DEFAULTS["precision"],
        temperature=float(opts.get("temperature") or DEFAULTS["temperature"]), exclude_ids=tuple(model.extras.get("exclude_ids", ())),
        time_conditioning=bool(model.extras.get("time_conditioning", False)))


def _run(method: str):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        length = _sequence_length(opts, model)
        x = initial_tokens(len(seeds), length, model.extras["mask_token_id"], _prompt_ids(opts, model), ctx.device)
        gens = ctx.generators(seeds)
        if ctx.device is not None and torch.device(ctx.device).type != "cpu":
            # draw the token noise where the logits live (one generator per sample, same seeds)
            gens = [torch.Generator(ctx.device).manual_seed(int(s)) for s in seeds]
        t0 = time.perf_counter()
        if method == "first_hitting":
            cfg = _make_cfg(opts, model, None)
            x, stats = sample_first_hitting(model.extras["network"], x, cfg, gens, ctx.step_done)
        else:
            cfg = _make_cfg(opts, model, opts.get("steps") or length)
            x, stats = sample_ancestral(model.extras["network"], x, cfg, gens, ctx.step_done)
        stats["masking_schedule"] = cfg.schedule
        stats["sampling_time_s"] = time.perf_counter() - t0
        stats.pop("steps", None)
        return SampleBatch(x=x, stats=stats)

    return fn


def write_samples_txt(out_dir, arrays: dict, model) -> None:
    """samples.txt: one decoded sample per line (newlines in a sample shown as spaces), written atomically."""
    tok = model.extras["tokenizer"]
    lines = [tok.decode(row.tolist()).replace("\n", " ") for row in arrays["tokens"]]
    atomic_write_bytes(Path(out_dir) / "samples.txt", ("\n".join(lines) + "\n").encode("utf-8"))


_COMMON = (
    Option("length", int, None, "Sequence length in tokens (default: the model's)", min=1),
    Option("prompt", str, None, "Text (or token ids for markov models) fixed at the start, never masked"),
    Option("temperature", float, DEFAULTS["temperature"], "Softmax temperature of the token draws", min=1e-6),
    Option("precision", PRECISIONS, DEFAULTS["precision"], "Categorical-sampling precision; float32 reproduces the MDLM/SEDD truncation"),
    Option("masking_schedule", SCHEDULES, None, "Masking schedule alpha_t (linear, loglinear, cosine; eps=1e-3); "
           "default: the model's (mdlm: from its checkpoint config; toy models: linear)"),
    Option("trust_remote_code", bool, False, "mlm: models only: allow the folder's own modeling code to run "
           "(transformers trust_remote_code; never asked interactively)"),
)

register(SamplerSpec(
    name="fhs",
    description="First-hitting sampler for masked diffusion (Zheng et al. 2024): one model call per revealed token",
    fn=_run("first_hitting"),
    default_model="mdm-text",
    options=_COMMON + (Option("tokens_per_step", int, DEFAULTS["tokens_per_step"], "Tokens revealed per model call (parallel FHS)", min=1),),
    default_steps=None,
    model_kinds=("masked_lm",),
    progress_total=lambda cfg: -(-(cfg.get("length") or 64) // (cfg.get("tokens_per_step") or 1)),
    output="tokens",
    validate=lambda opts, model: _validate(opts, model, fhs=True),
    write_extra=write_samples_txt,
))

register(SamplerSpec(
    name="mdm-ancestral",
    description="Masked-diffusion ancestral grid sampler with caching (MDLM ddpm_cache), --steps grid points",
    fn=_run("ancestral"),
    default_model="mdm-text",
    options=_COMMON + (Option("final_step", FINAL_STEPS, DEFAULTS["final_step"], "Last step t_min -> 0: exact sample, or argmax (MDLM)"),),
    default_steps=None,
    model_kinds=("masked_lm",),
    progress_total=lambda cfg: (cfg.get("steps") or cfg.get("length") or 64) + 1,
    output="tokens",
    validate=lambda opts, model: _validate(opts, model, fhs=False),
    write_extra=write_samples_txt,
))
