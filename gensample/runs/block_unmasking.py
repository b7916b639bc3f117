"""`gensample run --sampler fhs-block`: semi-autoregressive block unmasking of diffusion LMs from the CLI and
``gensample.run`` (docs/masked_lms.md, "Models and the CLI").

The math (first-hitting and the confidence strategies, threshold commits, EOS stop) is
``gensample.samplers.block_unmasking.sample_blocks``; this module builds the token rows from the prompts
(chat template where the tokenizer has one) or an ``--infill`` template, picks the network (the
opt-in prefix cache, DiffusionGemma's encoder cache), runs the sampler on rows that share a prompt
length together, and writes ``texts.jsonl`` beside the tokens.

Infill template syntax: text with mask spans anywhere. ``[MASK]`` is one masked token, ``[MASK]xN`` is N
masked tokens (e.g. ``"The [MASK]x3 sat on the [MASK]."``); the text between spans is tokenized piece by
piece (no special tokens) and kept fixed. With ``--infill`` the generation window is the whole template
(``--gen-length`` must be unset or equal to its token count) and follows the prompt, if any.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from ..io import atomic_write_bytes
from ..models.diffusion_gemma import DiffusionGemmaNetwork
from ..models.llada import PrefixCachedNetwork
from ..samplers.block_unmasking import CONFIDENCE_KINDS, REMASKING, BlockConfig, sample_blocks
from ..samplers.first_hitting import SCHEDULES
from ..samplers.registry import Option, RunContext, SampleBatch, SamplerSpec, register

DEFAULT_GEN_LENGTH = 64
BLOCK_CACHES = ("none", "prefix")
_SPAN = re.compile(r"\[MASK\](?:x(\d+))?")


def parse_infill(template: str, tokenizer, mask_token_id: int) -> list[int]:
    """Token ids of an infill template: text pieces encoded (no special tokens), ``[MASK]`` -> one mask id,
    ``[MASK]xN`` -> N mask ids (N >= 1)."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"--infill must be a non-empty template string, got {template!r}")
    ids, pos, spans = [], 0, 0
    for m in _SPAN.finditer(template):
        if m.start() > pos:
            ids += tokenizer.encode(template[pos:m.start()])
        count = int(m.group(1)) if m.group(1) is not None else 1
        if count < 1:
            raise ValueError(f"--infill: a span [MASK]xN needs N >= 1, got {m.group(0)!r}")
        ids += [int(mask_token_id)] * count
        pos, spans = m.end(), spans + 1
    if pos < len(template):
        ids += tokenizer.encode(template[pos:])
    if not spans:
        raise ValueError(f"--infill template {template!r} has no mask span; write [MASK] (one token) or [MASK]xN")
    return ids


def _prompts(opts: dict) -> list[str]:
    p = opts.get("prompt")
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _encode_prompt(model, text: str, chat: bool) -> list[int]:
    tok = model.extras["tokenizer"]
    if hasattr(tok, "encode_prompt"):
        return list(tok.encode_prompt(text, chat))
    return list(tok.encode(text))


def _window(opts: dict, model) -> tuple[list[int], int]:
    """(template ids of the generation window, gen_length): the infill template, or gen_length masks."""
    mask = int(model.extras["mask_token_id"])
    if opts.get("infill"):
        ids = parse_infill(opts["infill"], model.extras["tokenizer"], mask)
        g = opts.get("gen_length")
        if g is not None and g != len(ids):
            raise ValueError(f"--gen-length {g} disagrees with the --infill template ({len(ids)} tokens); leave it unset")
        return ids, len(ids)
    g = int(opts.get("gen_length") or DEFAULT_GEN_LENGTH)
    return [mask] * g, g


def _block_length(opts: dict, model, gen_length: int) -> int:
    canvas = model.extras.get("canvas_length")
    b = opts.get("block_length")
    if b is None:
        return int(canvas) if canvas else gen_length
    return int(b)


def _steps(opts: dict, block_length: int) -> int:
    return int(opts.get("steps") or block_length)


def _validate(opts: dict, model) -> None:
    materialize = model.extras.get("materialize")
    if materialize is not None:  # mlm: folders build their network where --trust-remote-code is known
        materialize(bool(opts.get("trust_remote_code")))
    tok = model.extras["tokenizer"]
    if model.extras.get("time_conditioning"):
        raise ValueError(f"fhs-block needs a time-agnostic network (its blocks have no global time); {model.name!r} "
                         "is time-conditioned: use --sampler fhs or mdm-ancestral")
    window, gen_length = _window(opts, model)
    block = _block_length(opts, model, gen_length)
    if block > gen_length:
        raise ValueError(f"--block-length must be <= the generation length ({gen_length}), got {block}")
    if model.extras.get("canvas_length") and opts.get("block_length") not in (None, model.extras["canvas_length"]):
        raise ValueError(f"--block-length must equal the model's canvas_length ({model.extras['canvas_length']}) "
                         f"for {model.name!r}, got {opts['block_length']}")
    chat = bool(opts.get("chat_template", True))
    lengths = [len(_encode_prompt(model, p, chat)) for p in _prompts(opts)] or [0]
    max_len = model.extras.get("max_length", model.extras.get("length"))
    if max_len is not None and max(lengths) + gen_length > max_len:
        raise ValueError(f"prompt ({max(lengths)} tokens) + generation ({gen_length}) exceed the model's "
                         f"maximum length {max_len}")
    if model.extras.get("family") == "diffusion_gemma" and min(lengths) == 0:
        raise ValueError("DiffusionGemma needs a prompt (--prompt): its decoder attends to an encoded context")
    if opts.get("threshold") is not None and opts.get("remasking", "fhs") not in CONFIDENCE_KINDS:
        raise ValueError(f"--threshold applies to --remasking {', '.join(CONFIDENCE_KINDS[:-1])} or "
                         f"{CONFIDENCE_KINDS[-1]}, got {opts.get('remasking', 'fhs')!r}")
    if opts.get("stop_at_eos") and not getattr(tok, "eos_ids", ()):
        raise ValueError(f"--stop-at-eos needs a tokenizer with an EOS token; {model.name!r} has none")
    if opts.get("block_cache", "none") == "prefix" and model.extras.get("network_cached") is None:
        raise ValueError(f"--block-cache prefix: {model.name!r} has no prefix cache (LLaDA and Dream folders have one)")
    _config(opts, model, gen_length, block)


def _config(opts: dict, model, gen_length: int, block: int) -> BlockConfig:
    tok = model.extras["tokenizer"]
    eos = getattr(tok, "eos_ids", ())
    return BlockConfig(
        gen_length=gen_length, block_length=block, steps=_steps(opts, block),
        remasking=opts.get("remasking") or "fhs", temperature=float(opts.get("temperature", 1.0)),
        top_k=opts.get("top_k"), top_p=opts.get("top_p"), threshold=opts.get("threshold"),
        mask_token_id=int(model.extras["mask_token_id"]), eos_token_id=int(eos[0]) if eos else None,
        stop_at_eos=bool(opts.get("stop_at_eos")), exclude_ids=tuple(model.extras.get("exclude_ids", ())),
        schedule=opts.get("masking_schedule") or "linear")


def _network(opts: dict, model):
    if model.extras.get("family") == "diffusion_gemma":
        return model.extras["network_cached"]  # its encoder cache is exact: always on
    if opts.get("block_cache", "none") == "prefix":
        return model.extras["network_cached"]
    return model.extras["network"]


def _run(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    window, gen_length = _window(opts, model)
    block = _block_length(opts, model, gen_length)
    cfg = _config(opts, model, gen_length, block)
    chat = bool(opts.get("chat_template", True))
    prompts = _prompts(opts)
    indices = model.batch_indices(len(seeds))
    encoded = [_encode_prompt(model, p, chat) for p in prompts]  # each prompt once
    rows = [encoded[i % len(encoded)] if encoded else [] for i in indices]
    width = max(map(len, encoded), default=0)
    pad = model.extras.get("pad_token_id")
    pad = int(pad if pad is not None else model.extras["mask_token_id"])
    device = ctx.device if ctx.device is not None else torch.device("cpu")
    net = _network(opts, model)
    out = torch.full((len(seeds), width + gen_length), pad, dtype=torch.long)
    stats = {"nfe": 0, "committed": 0}
    t0 = time.perf_counter()
    # rows with the same prompt length run together (no padding inside a call: the logits are exact)
    for n in sorted({len(r) for r in rows}):
        members = [b for b, r in enumerate(rows) if len(r) == n]
        x = torch.tensor([rows[b] + window for b in members], dtype=torch.long, device=device)
        editable = torch.zeros_like(x, dtype=torch.bool)
        editable[:, n:] = x[:, n:] == cfg.mask_token_id
        gens = ctx.generators([seeds[b] for b in members])
        if isinstance(net, (PrefixCachedNetwork, DiffusionGemmaNetwork)):
            net.reset(seeds=[seeds[b] for b in members])  # empty caches; DiffusionGemma: canvas noise per seed
        if device.type != "cpu":
            gens = [torch.Generator(device).manual_seed(int(seeds[b])) for b in members]
        x, st = sample_blocks(net, x, cfg, gens, editable=editable, on_step=lambda info: ctx.step_done(1))
        out[members, width - n:] = x.cpu()
        stats["nfe"] += int(st["nfe"])
        stats["committed"] += int(st["committed"])
        if hasattr(net, "refreshes"):  # the prefix cache: full-sequence calls among the block calls it served
            stats["cache_refreshes"] = stats.get("cache_refreshes", 0) + int(net.refreshes)
            stats["cache_calls"] = stats.get("cache_calls", 0) + int(net.calls)
    stats["sampling_time_s"] = time.perf_counter() - t0
    stats["sampler_calls"] = len({len(r) for r in rows})  # one per prompt length in the batch
    prompt_len = torch.tensor([len(r) for r in rows], dtype=torch.long)
    extras = {"prompt_length": prompt_len.numpy(), "pad_length": (width - prompt_len).numpy()}
    return SampleBatch(x=out, extras=extras, stats=stats)


def write_texts(out_dir, arrays: dict, model) -> None:
    """texts.jsonl (one object per sample: index, prompt, text = the generated window decoded up to the first EOS,
    text_full = the whole window, tokens = its ids), written atomically."""
    tok = model.extras["tokenizer"]
    tokens = arrays["tokens"]
    pads = arrays.get("pad_length")
    plens = arrays.get("prompt_length")
    idx = arrays.get("indices")
    lines = []
    for r, row in enumerate(tokens):
        row = [int(v) for v in row]
        start = (int(pads[r]) + int(plens[r])) if pads is not None else 0
        prompt_ids, gen = row[int(pads[r]) if pads is not None else 0:start], row[start:]
        cut = tok.decode_until_eos(gen) if hasattr(tok, "decode_until_eos") else tok.decode(gen)
        rec = {"index": int(idx[r]) if idx is not None else r, "prompt": tok.decode(prompt_ids), "text": cut,
               "text_full": tok.decode(gen), "tokens": gen}
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_bytes(Path(out_dir) / "texts.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))


def _progress_total(cfg: dict) -> int:
    g = cfg.get("gen_length") or DEFAULT_GEN_LENGTH
    b = cfg.get("block_length") or g
    return -(-g // b) * int(cfg.get("steps") or b)


register(SamplerSpec(
    name="fhs-block",
    description="Semi-autoregressive block unmasking for diffusion LMs (LLaDA, Dream, DiffusionGemma, MDLM): "
                "first-hitting or confidence remasking per block, float64 draws",
    fn=_run,
    default_model="mdm-text",
    options=(
        Option("gen_length", int, None, f"Tokens generated after the prompt (default {DEFAULT_GEN_LENGTH}; with --infill: "
               "the template's length)", min=1),
        Option("block_length", int, None, "Semi-autoregressive block size (default: the whole generation; "
               "DiffusionGemma: its canvas_length)", min=1),
        Option("remasking", REMASKING, "fhs", "Which masked positions a step commits: fhs (first-hitting, exact), "
               "low-confidence, margin, entropy, random"),
        Option("threshold", float, None, "Fast-dLLM parallel commits: also commit every position whose confidence "
               "exceeds this (confidence strategies only)", min=0.0),
        Option("temperature", float, 1.0, "Softmax temperature of the token draws (0: argmax)", min=0.0),
        Option("top_k", int, None, "Draw only among the k most likely tokens", min=1),
        Option("top_p", float, None, "Nucleus sampling: the smallest set of tokens with probability >= p", min=1e-9, max=1.0),
        Option("infill", str, None, "Template with mask spans anywhere: [MASK] = one token, [MASK]xN = N tokens, "
               "e.g. 'The [MASK]x3 sat'"),
        Option("stop_at_eos", bool, False, "Stop a sample once an EOS follows only filled positions; the rest becomes EOS"),
        Option("chat_template", bool, True, "Wrap each prompt in the tokenizer's chat template when it has one"),
        Option("block_cache", BLOCK_CACHES, "none", "LLaDA/Dream: Fast-dLLM prefix cache (approximate inside a block; "
               "exact at each block's first call). DiffusionGemma always uses its exact encoder cache"),
        Option("masking_schedule", SCHEDULES, None, "alpha_t of the first-hitting block times (fhs; default linear)"),
        Option("trust_remote_code", bool, False, "mlm: models only: allow the folder's own modeling code to run"),
    ),
    default_steps=None,
    model_kinds=("masked_lm",),
    progress_total=_progress_total,
    output="tokens",
    validate=_validate,
    write_extra=write_texts,
))
