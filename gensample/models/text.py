"""Text conditioning of Stable Diffusion-class models (Rombach et al. 2022, arXiv 2112.10752, sec. 3.3).

A prompt becomes the cross-attention context of the UNet: the CLIP tokenizer pads/truncates it to
``tokenizer.model_max_length`` tokens and the text encoder's last hidden state (B, L, D) is passed
as ``encoder_hidden_states``, as Stable Diffusion does. Classifier-free guidance (Ho & Salimans
2022) uses the negative prompt (default the empty prompt "") as the unconditional branch.

This module imports torch only inside functions; the CLI reads ``--prompts FILE`` with
``read_prompts_file`` from ``gensample.options`` (re-exported here), which needs no package import.
See docs/text_to_image.md for the run options.
"""

from __future__ import annotations

from typing import Any, Sequence

EMPTY_PROMPT_NOTE = "no prompt given: every sample is conditioned on the empty prompt \"\""

# the prompt readers live in the torch-free gensample.options (this package's __init__ imports torch)
from ..options import normalize_prompts, read_prompts_file  # noqa: E402,F401  (re-exported)



def max_tokens(tokenizer, text_encoder=None) -> int:
    """The token length prompts are padded / truncated to: ``tokenizer.model_max_length``, or the
    encoder's position count when the tokenizer was saved without a limit (77 for CLIP)."""
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 100_000:  # a tokenizer saved without a limit: use the encoder's positions
        config = getattr(text_encoder, "config", None)
        max_len = int(getattr(config, "max_position_embeddings", 77))
    return max_len


def token_usage(tokenizer, prompts: Sequence[str], text_encoder=None, max_len: int | None = None) -> dict:
    """What the text encoder sees of each prompt, for run.json: ``{"max_tokens": L, "tokens":
    [n_i], "tokens_used": [min(n_i, L)], "truncated": [indices of prompts longer than L]}``
    (n_i counts the begin / end tokens the tokenizer adds). L: ``max_len``, else ``max_tokens``."""
    if max_len is None:
        max_len = max_tokens(tokenizer, text_encoder)
    ids = tokenizer(list(prompts), truncation=False, verbose=False).input_ids
    counts = [len(row) for row in ids]
    return {"max_tokens": max_len, "tokens": counts, "tokens_used": [min(c, max_len) for c in counts],
            "truncated": [i for i, c in enumerate(counts) if c > max_len]}


def module_device_dtype(module, default_dtype: str | None = "float32") -> tuple:
    """(device, dtype) of ``module``'s first parameter; for a module without parameters (cpu, the
    torch dtype named ``default_dtype``, or None)."""
    import torch

    try:
        p = next(module.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return torch.device("cpu"), getattr(torch, default_dtype) if default_dtype else None


def warn_truncated(tokenizer, prompts: Sequence[str], text_encoder=None) -> dict:
    """One warning per prompt the tokenizer will cut, naming how many tokens are kept; returns
    ``token_usage``."""
    import warnings

    usage = token_usage(tokenizer, prompts, text_encoder)
    for i in usage["truncated"]:
        head = " ".join(prompts[i].split())[:40]
        warnings.warn(f"prompt {head!r}... is {usage['tokens'][i]} tokens long; the text encoder reads only the first "
                      f"{usage['max_tokens']} (begin/end tokens included), the rest is ignored", UserWarning, stacklevel=2)
    return usage


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device) -> "Any":
    """(P, L, D) CLIP last hidden states of ``prompts`` (Stable Diffusion's text conditioning).

    Tokens are padded to ``tokenizer.model_max_length`` and truncated there (a prompt that is cut
    gets one warning, ``warn_truncated``); the attention mask is passed only when the encoder's
    config asks for it (``use_attention_mask``), as diffusers' StableDiffusionPipeline.encode_prompt
    does. Runs without gradients."""
    import torch

    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    max_len = max_tokens(tokenizer, text_encoder)
    warn_truncated(tokenizer, prompts, text_encoder)
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(device)
    mask = tok.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = text_encoder(ids, attention_mask=mask)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden  # (P, L, D)


class PromptEncoder:
    """How a text-to-image family turns prompts into its denoiser's keyword arguments.

    A family loader puts one in ``LoadedModel.extras["prompt_encoder"]``; ``LoadedModel`` calls
    only these methods, so samplers never see which family they run. Subclasses implement
    ``encode``; the rest have defaults.

    - ``encode(prompts) -> dict``: a *flat* dict of tensors with one row per prompt (dim 0), on the
      encoders' device, e.g. ``{"encoder_hidden_states": (P, L, D)}``. Flat so that the sampler can
      repeat rows (``Denoiser``) and concatenate the CFG branches (``concat_cond``).
    - ``encode_negative(prompt or None) -> dict``: one row, CFG's unconditional branch (default: the
      prompt, or "" when None, encoded like any other).
    - ``cache_key()``: changes whenever ``encode`` would return something else for the same prompt
      (encoder device / dtype, a resolution the conditioning depends on).
    - ``device``: where ``encode`` runs. ``token_usage(prompts)``: what run.json records.
    """

    def encode(self, prompts: Sequence[str]) -> dict:
        raise NotImplementedError

    def encode_negative(self, prompt: str | None) -> dict:
        return self.encode(["" if prompt is None else prompt])

    def cache_key(self) -> tuple:
        return (str(self.device),)

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def token_usage(self, prompts: Sequence[str]) -> dict:
        return {}


class ClipPromptEncoder(PromptEncoder):
    """Stable Diffusion 1.x / 2.x: one CLIP tokenizer + text encoder, ``encoder_hidden_states`` (sec. 3.3)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def device(self):
        return module_device_dtype(self.text_encoder)[0]

    def cache_key(self) -> tuple:
        device, dtype = module_device_dtype(self.text_encoder, default_dtype=None)
        return (str(device), str(dtype))

    def encode(self, prompts: Sequence[str]) -> dict:
        return {"encoder_hidden_states": encode_prompts(self.tokenizer, self.text_encoder, list(prompts), self.device)}

    def token_usage(self, prompts: Sequence[str]) -> dict:
        return token_usage(self.tokenizer, prompts, self.text_encoder)
