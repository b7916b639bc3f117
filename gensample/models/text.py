"""Text conditioning of Stable Diffusion-class models (Rombach et al. 2022, arXiv 2112.10752, sec. 3.3).

A prompt becomes the cross-attention context of the UNet: the CLIP tokenizer pads/truncates it to
``tokenizer.model_max_length`` tokens and the text encoder's last hidden state (B, L, D) is passed
as ``encoder_hidden_states``, as Stable Diffusion does. Classifier-free guidance (Ho & Salimans
2022) uses the negative prompt (default the empty prompt "") as the unconditional branch.

This module is import-light (no torch at import time): the CLI reads ``--prompts FILE`` with it.
See docs/text_to_image.md for the run options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

EMPTY_PROMPT_NOTE = "no prompt given: every sample is conditioned on the empty prompt \"\""


def normalize_prompts(value: Any, flag: str = "--prompt") -> list[str] | None:
    """None | str | sequence of str -> None or a non-empty list of str (ValueError otherwise)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{flag} must be a string or a non-empty list of strings, got {value!r}")


def read_prompts_file(path: str | Path) -> list[str]:
    """``--prompts FILE``: one prompt per line (blank lines skipped; a line may be ``""``-less text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read the file ({err.__class__.__name__}: {err})") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt (one prompt per line)")
    return prompts


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device) -> "Any":
    """(P, L, D) CLIP last hidden states of ``prompts`` (Stable Diffusion's text conditioning).

    Tokens are padded to ``tokenizer.model_max_length`` and truncated there; the attention mask
    is passed only when the encoder's config asks for it (``use_attention_mask``), as diffusers'
    StableDiffusionPipeline.encode_prompt does. Runs without gradients."""
    import torch

    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 100_000:  # a tokenizer saved without a limit: use the encoder's positions
        max_len = int(getattr(text_encoder.config, "max_position_embeddings", 77))
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(device)
    mask = tok.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = text_encoder(ids, attention_mask=mask)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden  # (P, L, D)
